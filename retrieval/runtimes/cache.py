"""The user cache: weights digests keyed by file identity, and exported image towers (no torch here).

Layout (``$SPECIESID_CACHE``, else the platform's user cache folder + ``speciesid``)::

    digests.json                              weights identity -> sha256 digest (state_dict_digest's value)
    models/<digest16>/<runtime>-<version>-<precision>-<cpu kind>/
        export.json                           what was exported, how faithful it is, the preprocessing
        model.xml + model.bin | model.onnx    the image tower (OpenVINO IR or ONNX)
        blobs/                                OpenVINO's compiled-model cache (CACHE_DIR)
    models/<digest16>/choice-<runtime>-<precision>-<cpu kind>.json   what was chosen for a request, and why

A weights identity names the files the weights come from with their size, mtime and inode, so an edited
file is digested again; HF-hub files are content-addressed. Entries are written whole (index.atomic).
"""

from __future__ import annotations

import json
import logging
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from index.atomic import write_json_atomic

logger = logging.getLogger(__name__)

#: Bumped when the export format changes: older entries are stale and rebuilt.
EXPORT_FORMAT = 1
_MAX_DIGESTS = 512
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".npz")


def cache_root() -> Path:
    """``$SPECIESID_CACHE``, else ``$XDG_CACHE_HOME/speciesid`` / ``~/.cache/speciesid`` (Linux),
    ``~/Library/Caches/speciesid`` (macOS), ``%LOCALAPPDATA%\\speciesid\\Cache`` (Windows)."""
    env = os.environ.get("SPECIESID_CACHE")
    if env:
        return Path(env).expanduser()
    system = platform.system()
    if system == "Windows" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "speciesid" / "Cache"
    if system == "Darwin":
        return Path.home() / "Library" / "Caches" / "speciesid"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "speciesid"


def package_version(name: str) -> str | None:
    """An installed distribution's version (None when it is not installed), without importing it."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------ weights identity
def file_identity(path: Path) -> str:
    """``resolved path|size|mtime_ns|inode`` of a file (symbolic links followed)."""
    real = path.resolve()
    st = real.stat()
    return f"{real}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _weight_files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    except OSError:
        return []


def hf_snapshot(repo: str) -> Path | None:
    """The local HF-hub snapshot folder of ``repo`` at its cached ``main`` ref (None when not cached)."""
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not hub:
        home = os.environ.get("HF_HOME") or str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                                                / "huggingface")
        hub = str(Path(home) / "hub")
    repo_dir = Path(hub) / ("models--" + repo.replace("/", "--"))
    try:
        commit = (repo_dir / "refs" / "main").read_text().strip()
    except OSError:
        return None
    snap = repo_dir / "snapshots" / commit
    return snap if snap.is_dir() else None


def weights_folder(source: str, name: str) -> Path | None:
    """Where an open_clip/timm spec's weights and config live on disk (local-dir, or a cached HF snapshot)."""
    if source == "local-dir":
        return Path(name)
    if source == "hf-hub":
        return hf_snapshot(name)
    return None


def weights_identity(library: str, source: str, name: str, tag: str | None, weights: str | None) -> str | None:
    """A string that changes whenever the weights a spec loads could change; None when it cannot be told
    without the library (open_clip pretrained tags): then the digest is computed every time.

    Random weights (no file) are identified by the libraries' versions: their seeded initialisation.
    """
    head = f"{library}|{source}|{name}"
    if weights:
        path = Path(weights)
        return f"{head}|weights|{file_identity(path)}" if path.is_file() else None
    folder = weights_folder(source, name)
    if folder is not None:
        files = _weight_files(folder)
        if not files:
            return None
        return head + "|" + "|".join(file_identity(f) for f in files)
    random = (library == "open_clip" and tag in (None, "random")) or (library == "timm" and tag == "random")
    if random:
        versions = [package_version(p) for p in ("torch", "open_clip_torch" if library == "open_clip" else "timm")]
        return f"{head}|random|" + "|".join(str(v) for v in versions)
    return None


class DigestCache:
    """``digests.json``: weights identity -> sha256 digest (what ``state_dict_digest`` returns)."""

    def __init__(self, root: Path | None = None) -> None:
        self.path = (root or cache_root()) / "digests.json"

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, identity: str | None) -> str | None:
        """The cached digest of these weights, if any."""
        if identity is None:
            return None
        value = self._read().get(identity)
        return value if isinstance(value, str) and len(value) == 64 else None

    def put(self, identity: str | None, digest: str) -> None:
        """Remember a digest (best effort: a read-only cache is only logged)."""
        if identity is None:
            return
        table = self._read()
        table.pop(identity, None)
        table[identity] = digest
        while len(table) > _MAX_DIGESTS:  # oldest first (dicts keep insertion order)
            table.pop(next(iter(table)))
        try:
            write_json_atomic(self.path, table, sort_keys=False)
        except OSError as exc:
            logger.info("cannot write the digest cache %s: %s", self.path, exc)


# ------------------------------------------------------------------------------------- export entries
@dataclass(frozen=True)
class EntryKey:
    """What an exported image tower depends on."""

    digest: str  # full sha256 of the weights
    runtime: str  # "onnx" or "openvino"
    runtime_version: str
    precision: str  # "fp32", "bf16", "int8"
    cpu_kind: str

    def folder(self, root: Path | None = None) -> Path:
        """This entry's folder."""
        name = f"{self.runtime}-{self.runtime_version}-{self.precision}-{self.cpu_kind}"
        return models_dir(root) / self.digest[:16] / name


def models_dir(root: Path | None = None) -> Path:
    """``<cache>/models``."""
    return (root or cache_root()) / "models"


def read_entry(key: EntryKey, root: Path | None = None) -> dict | None:
    """The entry's export.json when it is current (same format, weights, runtime version); else None."""
    path = key.folder(root) / "export.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    current = (
        data.get("format") == EXPORT_FORMAT
        and data.get("digest") == key.digest
        and data.get("runtime") == key.runtime
        and data.get("runtime_version") == key.runtime_version
        and data.get("precision") == key.precision
        and data.get("cpu_kind") == key.cpu_kind
    )
    if not current:
        logger.info("cache entry %s is stale: rebuilding it", path.parent)
        return None
    if data.get("accepted") and not all((path.parent / f).is_file() for f in data.get("files", [])):
        logger.info("cache entry %s lacks its model files: rebuilding it", path.parent)
        return None
    return data


def choice_path(digest: str, runtime: str, precision: str, kind: str, root: Path | None = None) -> Path:
    """Where the choice for these weights, this (runtime, precision) request and CPU kind is recorded."""
    return models_dir(root) / digest[:16] / f"choice-{runtime}-{precision}-{kind}.json"


def installed_runtimes() -> dict[str, str | None]:
    """Versions of the optional runtimes (None when missing): a recorded choice is redone when they change."""
    return {name: package_version(name) for name in ("openvino", "nncf", "onnxruntime", "onnx")}


def read_choice(digest: str, runtime: str, precision: str, kind: str, root: Path | None = None) -> dict | None:
    """The recorded choice, when still valid for the installed runtimes."""
    try:
        data = json.loads(choice_path(digest, runtime, precision, kind, root).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("format") != EXPORT_FORMAT or data.get("installed") != installed_runtimes():
        return None
    return data


def write_choice(digest: str, runtime: str, precision: str, kind: str, data: dict, root: Path | None = None) -> None:
    """Record a choice (best effort)."""
    data = {"format": EXPORT_FORMAT, "installed": installed_runtimes(), **data}
    try:
        write_json_atomic(choice_path(digest, runtime, precision, kind, root), data, sort_keys=False)
    except OSError as exc:
        logger.info("cannot record the runtime choice: %s", exc)


def entries(root: Path | None = None) -> Iterable[tuple[Path, dict]]:
    """Every export entry in the cache, with its export.json."""
    base = models_dir(root)
    for path in sorted(base.glob("*/*/export.json")):
        try:
            yield path.parent, json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
