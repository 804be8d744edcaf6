"""Shared bits for the benchmark scripts: paths to ../shared, cached embeddings, timing helpers."""

from __future__ import annotations

import hashlib
import os
import resource
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: The shared assets: ``../shared`` beside the repo, or $SPECIESID_SHARED (the tests' rule: tests/conftest.py).
SHARED = Path(os.environ.get("SPECIESID_SHARED") or REPO.parent / "shared")
PH_SNAKES = SHARED / "data" / "ph-snakes"
MOBILENET = SHARED / "models" / "mobilenetv1_100.coral_in1k"
MOBILENET_SPEC = f"timm:local-dir:{MOBILENET}"
VIT_SPEC = "open_clip:ViT-B-16"  # random weights: exactly BioCLIP's compute
CACHE = REPO / "runs" / "cache"


def require_shared() -> None:
    """Exit with a clear message when the shared assets are not found (``../shared``, or $SPECIESID_SHARED)."""
    if not PH_SNAKES.is_dir() or not MOBILENET.is_dir():
        sys.exit(f"benchmarks need {PH_SNAKES} and {MOBILENET} (the shared assets beside the repo, or set "
                 "SPECIESID_SHARED to the folder that holds data/ph-snakes and models/)")


def split_embeddings(encoder_spec: str, split: str, precision: str = "fp32") -> tuple[np.ndarray, list[str], list[str]]:
    """Embeddings, species labels and paths of one ph-snakes split, cached under runs/cache."""
    from index.datasets import load_dataset
    from retrieval.encoders import create_encoder
    from retrieval.pipeline import embed_sources

    tag = encoder_spec.replace("/", "_").replace(":", "_")
    path = CACHE / f"{tag}-{precision}-{split}.npz"
    scan = load_dataset("folder", PH_SNAKES / split)
    labels = [r.species for r in scan.records]
    paths = [str(r.path) for r in scan.records]
    if path.is_file():
        data = np.load(path, allow_pickle=False)
        if list(data["paths"]) == paths:
            return data["emb"], labels, paths
    enc = create_encoder(encoder_spec, precision=precision)
    emb, errors = embed_sources(paths, enc, progress=True, desc=f"embed {split}")
    assert not any(errors), [e for e in errors if e]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, emb=emb, paths=np.array(paths))
    return emb, labels, paths


def finetuned_embeddings(folder: str | Path, paths: list[str]) -> np.ndarray:
    """Embeddings of ``paths`` by a ``speciesid finetune`` output folder (timm local-dir), torch fp32 on the CPU, at
    the test size the run chose (as a gallery built with it embeds)."""
    from retrieval.encoders import create_encoder
    from retrieval.pipeline import embed_sources

    enc = create_encoder(f"timm:local-dir:{folder}", runtime="torch", precision="fp32", device="cpu")
    emb, errors = embed_sources(paths, enc)
    bad = [f"{p}: {e}" for p, e in zip(paths, errors, strict=True) if e]
    if bad:
        raise RuntimeError(f"{folder}: {len(bad)} photos could not be embedded, e.g. {bad[:3]}")
    return emb


def gallery_from_embeddings(root: Path, enc, records, emb: np.ndarray):
    """A gallery at ``root`` from already computed embeddings (byte-identical photos stored once)."""
    from index.gallery import Gallery

    g = Gallery.create(root, enc.describe())
    digests = [hashlib.sha256(Path(r.path).read_bytes()).hexdigest() for r in records]
    seen: set[str] = set()
    keep = [i for i, d in enumerate(digests) if not (d in seen or seen.add(d))]
    g.add([records[i] for i in keep], [digests[i] for i in keep], emb[keep])
    return g


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server a benchmark starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile_values(values_ms: list[float]) -> dict[str, float]:
    """{p50, p95, p99} of a list of milliseconds."""
    v = np.asarray(values_ms)
    return {f"p{q}": float(np.percentile(v, q)) for q in (50, 95, 99)}


def percentiles(values_ms: list[float]) -> str:
    """'p50 / p95 / p99' of a list of milliseconds."""
    return ", ".join(f"{name} {ms:.1f} ms" for name, ms in percentile_values(values_ms).items())


def evenly(items: list, n: int | None) -> list:
    """n items evenly spaced over the list (all when n is None or >= len)."""
    if n is None or n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def median(values: list[float]) -> float:
    """Median of a list."""
    return float(statistics.median(values))


def min_max(values: list[float], fmt: str = ".0f") -> str:
    """The range of ``values`` as ``A-B`` (each formatted with ``fmt``), for a "median (min-max)" line."""
    return f"{min(values):{fmt}}-{max(values):{fmt}}"


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def status_mib(field: str) -> float:
    """A VmXXX line of /proc/self/status, MiB: VmRSS (now) or VmHWM (peak; ru_maxrss can carry the parent's peak
    over a fork); NaN where /proc is missing."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return float("nan")
    return next((int(x.split()[1]) / 1024.0 for x in lines if x.startswith(field + ":")), float("nan"))


class CpuWatch:
    """How much CPU other processes used while a benchmark ran (this machine is shared and noisy)."""

    def __init__(self) -> None:
        self.t0, self.busy0, self.ours0 = self._snap()

    @staticmethod
    def _snap() -> tuple[float, float, float]:
        try:
            with open("/proc/stat") as fh:
                v = [int(x) for x in fh.readline().split()[1:9]]
            busy = (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            busy = float("nan")
        ours = sum(
            r.ru_utime + r.ru_stime
            for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
        )
        return time.monotonic(), busy, ours

    def report(self) -> str:
        """'other processes used X of N cores on average' since construction."""
        t, busy, ours = self._snap()
        wall = max(t - self.t0, 1e-9)
        other = max(0.0, (busy - self.busy0) - (ours - self.ours0)) / wall
        return (
            f"other processes used {other:.2f} of {os.cpu_count()} cores on average during this run "
            f"(load average now {os.getloadavg()[0]:.2f})"
        )


def dedup(train_emb: np.ndarray, train_paths: list[str], val_emb: np.ndarray, val_paths: list[str]) -> dict:
    """Train photos kept (byte-identical copies once), val photos kept (no leak from train: same bytes, or cosine at
    or above the ``speciesid clean`` leak rule), the leaks."""
    from index.pairs import similar_pairs
    from retrieval.findings import DEFAULT_DUP_THRESHOLD
    from retrieval.images import sha256_bytes

    sha = {p: sha256_bytes(Path(p).read_bytes()) for p in train_paths + val_paths}
    seen: set[str] = set()
    keep_tr = np.array([i for i, p in enumerate(train_paths) if not (sha[p] in seen or seen.add(sha[p]))])
    leaks = {j: ("sha256", 1.0) for j, p in enumerate(val_paths) if sha[p] in seen}
    for j, _, s in similar_pairs(val_emb, train_emb[keep_tr], threshold=DEFAULT_DUP_THRESHOLD):
        leaks.setdefault(int(j), ("cosine", float(s)))
    keep_va = np.array([j for j in range(len(val_paths)) if j not in leaks])
    return {"train": keep_tr, "val": keep_va, "leaks": leaks}


@dataclass
class FrozenSplits:
    """ph-snakes embedded by the frozen MobileNetV1 (fp32 on the runtime ``auto`` picks for it: OpenVINO where
    installed; cached under runs/cache): all of train, and val de-duplicated
    against train (:func:`dedup`); labels are indices into ``species``."""

    species: list[str]  # sorted species of train
    train: np.ndarray  # train embeddings
    y: np.ndarray  # train labels
    train_paths: list[str]
    val: np.ndarray  # the val photos kept
    yv: np.ndarray
    val_paths: list[str]  # of the kept photos
    val_total: int  # val photos before de-duplication


def frozen_splits() -> FrozenSplits:
    """:class:`FrozenSplits` of ph-snakes (``require_shared`` first)."""
    tr, tr_species, tr_paths = split_embeddings(MOBILENET_SPEC, "train")
    va, va_species, va_paths = split_embeddings(MOBILENET_SPEC, "val")
    keep = dedup(tr, tr_paths, va, va_paths)["val"]
    species = sorted(set(tr_species))
    return FrozenSplits(species, tr, np.array([species.index(s) for s in tr_species]), tr_paths, va[keep],
                        np.array([species.index(s) for s in va_species])[keep], [va_paths[i] for i in keep],
                        len(va_paths))
