"""Open an encoder on the runtime asked for, or on the best faithful one for this CPU (``auto``).

Warm path (nothing imports torch): the weights digest comes from the digest cache (keyed by the weights
files' identity), the recorded ``auto`` choice or the asked entry names a cached export, which is loaded.

Cold path: the torch model is loaded in fp32 (the reference), candidates are exported in order
(:func:`retrieval.runtimes.candidates`), each is checked on real photos (cosine >= 0.995 to fp32), the first
that passes is used and the choice recorded. A runtime that is not installed is skipped (``auto``) or named
with its pip command (explicit). int8 needs calibration photos; without real photos it is skipped and the
choice is made again the next time photos are given.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval.cpu import cpu_kind, cuda_driver_present
from retrieval.encoders import (
    PRECISIONS,
    SCALE_VIEW,
    Encoder,
    EncoderConfig,
    ParsedSpec,
    Photos,
    cache_digest,
    check_choice,
    check_options,
    finetuned_test_size,
    parse_spec,
    resolve_pool,
    resolve_runtime,
)
from retrieval.runtimes import (
    CALIBRATION_PHOTOS,
    CHECK_PHOTOS,
    EXTRAS,
    PACKAGES,
    RUNTIME_PRECISIONS,
    candidates,
)
from retrieval.runtimes.cache import (
    EXPORT_FORMAT,
    DigestCache,
    EntryKey,
    cache_root,
    models_dir,
    package_version,
    read_choice,
    read_entry,
    weights_identity,
    write_choice,
)

if TYPE_CHECKING:  # imported on the cold path only: the warm path never loads torch
    from retrieval.torch_encoders import TorchEncoder

logger = logging.getLogger(__name__)
#: The errors of a cache folder that cannot be written: `auto` then runs on torch (needing no export).
CACHE_UNWRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT})
#: The errors of a cache folder that cannot be made (``SPECIESID_CACHE`` under a regular file: ENOTDIR; under a
#: folder where none can be made, such as ``/proc``: ENOENT; a name too long; a file in its place: EEXIST): the same
#: as :data:`CACHE_UNWRITABLE`, but only while the cache folder is not there yet.
CACHE_UNMADE = frozenset({errno.ENOTDIR, errno.ENOENT, errno.ENAMETOOLONG, errno.EEXIST})


def cache_unwritable(exc: OSError) -> bool:
    """True when ``exc`` says the runtime cache cannot be made or written: one of :data:`CACHE_UNWRITABLE`, or one
    of :data:`CACHE_UNMADE` while the cache folder is not a folder yet (it, a folder above it or one in it being
    made: ``mkdir(parents=True)`` names the deepest). Any other error, and one of those inside an existing cache
    (a disk error, a file another process removed), is not: it is raised, not hidden behind "cannot write the
    runtime cache"."""
    if exc.errno in CACHE_UNWRITABLE:
        return True
    root = cache_root().absolute()
    if exc.errno not in CACHE_UNMADE or root.is_dir():
        return False
    for name in (exc.filename, exc.filename2):
        if isinstance(name, (str, Path)):
            path = Path(name).absolute()
            if path == root or root in path.parents or path in root.parents:
                return True
    return False


class RuntimeMissingError(ValueError):
    """An explicitly asked runtime is not installed."""


def runtime_installed(runtime: str) -> bool:
    """True when the packages a runtime needs are installed (torch always is)."""
    return runtime == "torch" or all(package_version(p) is not None for p in PACKAGES[runtime])


def runtime_version(runtime: str) -> str:
    """The version of the package that runs models for ``runtime``."""
    return str(package_version({"onnx": "onnxruntime", "openvino": "openvino"}.get(runtime, runtime)))


def missing_message(runtime: str) -> str:
    """What to install for a runtime."""
    return (f"runtime {runtime!r} is not installed: pip install 'speciesid[{EXTRAS[runtime]}]' "
            f"(or choose --runtime torch)")


def _wants_cuda(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    if device != "auto" or not cuda_driver_present():
        return False
    import torch

    return bool(torch.cuda.is_available())


def open_encoder(config: EncoderConfig, *, photos: Photos | None = None) -> Encoder:
    """The encoder for a resolved ``config`` (:meth:`EncoderConfig.resolved`; see the module docstring for how the
    runtime is chosen)."""
    runtime = resolve_runtime(config.runtime)
    check_choice("precision", config.precision, PRECISIONS)
    parsed = parse_spec(config.spec)
    check_options(config.pool, config.views)
    config = replace(config, pool=resolve_pool(config.pool, parsed))
    logger.info("loading encoder %s (runtime %s, precision %s, device %s, pool %s, views %s)", config.spec, runtime,
                config.precision, config.device, config.pool, config.views)
    if config.views in ("ms", "flipms"):  # the exported towers take one input size; the scale view is another
        if runtime not in ("auto", "torch"):
            raise ValueError(f"views {config.views!r} add a {SCALE_VIEW}-px view: they run on --runtime torch only")
        runtime = "torch"
    if runtime == "torch" or config.precision == "fp16" or _wants_cuda(config.device):
        if runtime not in ("auto", "torch"):
            raise ValueError(f"runtime {runtime!r} runs on the CPU: use --runtime torch for CUDA or fp16")
        from retrieval.torch_encoders import create_torch_encoder, fp16_needs_cuda

        if config.precision == "fp16" and not _wants_cuda(config.device):  # before the model loads
            raise ValueError(fp16_needs_cuda(config.device))
        return create_torch_encoder(parsed, config.spec, config)
    if runtime != "auto":
        if not runtime_installed(runtime):
            raise RuntimeMissingError(missing_message(runtime))
        if config.precision != "auto" and config.precision not in RUNTIME_PRECISIONS[runtime]:
            raise ValueError(f"runtime {runtime} runs {', '.join(RUNTIME_PRECISIONS[runtime])}, "
                             f"not {config.precision}")
    kind = cpu_kind()
    identity = weights_identity(parsed.library, parsed.source, parsed.name, parsed.tag, config.weights)
    digest = DigestCache().get(identity)
    if digest is not None:
        digest = cache_digest(digest, config.pool, finetuned_test_size(parsed))
        warm = _open_warm(config, parsed, runtime, kind, digest, photos)
        if warm is not None:
            return warm
    return _open_cold(config, parsed, runtime, kind, photos)


# ------------------------------------------------------------------------------------------ warm path
def _entry_key(digest: str, runtime: str, precision: str, kind: str) -> EntryKey:
    return EntryKey(digest, runtime, runtime_version(runtime), precision, kind)


def _load_entry(config: EncoderConfig, key: EntryKey, info: dict,
                text_encoder: Encoder | None = None) -> Encoder | None:
    from retrieval.runtimes.exported import ExportedEncoder

    try:
        return ExportedEncoder(key.folder(), info, config, text_encoder=text_encoder)
    except Exception as exc:  # noqa: BLE001 - a damaged entry is rebuilt, never fatal
        logger.warning("cannot load the cached %s %s model at %s (%s): exporting it again", key.runtime,
                       key.precision, key.folder(), exc)
        return None


def _open_warm(config: EncoderConfig, parsed: ParsedSpec, runtime: str, kind: str, digest: str,
               photos: Photos | None) -> Encoder | None:
    """The recorded choice for this request, loaded without torch when it is an export; None: decide again."""
    choice = read_choice(digest, runtime, config.precision, kind)
    if choice is None or choice.get("chosen") is None or (choice.get("retry_with_photos") and photos is not None):
        return None
    rt, prec = choice["chosen"]["runtime"], choice["chosen"]["precision"]
    if rt == "torch":
        from retrieval.torch_encoders import create_torch_encoder

        logger.info("encoder %s: torch %s (recorded choice for %s)", config.spec, prec, kind)
        return create_torch_encoder(parsed, config.spec, config, prec)
    if not runtime_installed(rt):
        return None
    key = _entry_key(digest, rt, prec, kind)
    info = read_entry(key)
    if info is None or not info.get("accepted"):
        return None
    enc = _load_entry(config, key, info)
    if enc is not None:
        logger.info("encoder %s: %s %s (recorded choice for %s)", config.spec, rt, prec, kind)
    return enc


def _refuse(info: dict, spec: str, digest: str) -> None:
    """Refuse (ValueError) an export its faithfulness check rejected, naming this request's encoder ``spec``: the
    verdict (``info``, the cache entry's) is of the weights (``digest``), and may have been recorded for another
    spec of the same weights (another folder, another user), which the message must not name."""
    faith = info.get("faithfulness") or {}
    earlier = (f" (the cached verdict on these weights, digest {digest[:16]})"
               if info.get("spec") not in (None, spec) else "")
    raise ValueError(
        f"{info['runtime']} {info['precision']} is not faithful for {spec}: min cosine to torch fp32 "
        f"{faith.get('min_cosine', float('nan')):.4f} < {faith.get('threshold')} on {faith.get('n_photos')} photos"
        f"{earlier}; use another --precision (fp32) or --runtime"
    )


# ------------------------------------------------------------------------------------------ cold path
def _photo_name(items: Sequence, pos: int) -> str:
    """How a log names the photo at ``pos`` of ``items``: its stored source (``GalleryPhotos.source``: not read
    again), else the item itself (a path), else its position."""
    source = getattr(items, "source", None)
    if callable(source):
        return str(source(pos))
    item = items[pos]
    return f"number {pos} (bytes)" if isinstance(item, bytes) else str(item)


class _Photos:
    """Check and calibration sets, decoded and preprocessed on first use."""

    def __init__(self, photos: Photos | None, reference: TorchEncoder) -> None:
        self.source = photos
        self.reference = reference
        self._check: np.ndarray | None = None
        self._calib: np.ndarray | None = None
        self.real = False

    def _load(self) -> None:
        if self._check is not None:
            return
        from index.sources import read_source
        from retrieval.images import ImageLoadError, model_image

        # a sequence, not listed: a gallery's (retrieval.galleries.GalleryPhotos) reads an item when it is taken
        items = self.source() if callable(self.source) else (self.source or [])
        arrays = []
        positions = np.unique(np.linspace(0, max(len(items) - 1, 0), min(len(items), CHECK_PHOTOS
                                                                          + CALIBRATION_PHOTOS)).astype(int))
        for pos in positions if len(items) else []:
            try:
                item = items[pos]  # may read it (an upload kept in an S3 store)
                data = item if isinstance(item, bytes) else read_source(item)
                image = model_image(data, self.reference.input_size)
                arrays.append(self.reference.preprocess(image))
            except (OSError, ImageLoadError, ValueError) as exc:
                logger.debug("check photo %s skipped: %s", _photo_name(items, pos), exc)
        if len(arrays) >= 8:
            x = np.stack(arrays)
            n_check = min(CHECK_PHOTOS, len(x) // 2 if len(x) < 2 * CHECK_PHOTOS else CHECK_PHOTOS)
            check_idx = np.unique(np.linspace(0, len(x) - 1, n_check).astype(int))
            rest = np.setdiff1d(np.arange(len(x)), check_idx)
            self._check, self._calib, self.real = x[check_idx], x[rest][:CALIBRATION_PHOTOS], True
        else:
            self._check, self._calib, self.real = self._synthetic(), None, False

    def _synthetic(self) -> np.ndarray:
        """Smooth random images (no real photos given): enough to catch a broken export, not to calibrate."""
        from PIL import Image

        rng = np.random.default_rng(0)
        out = []
        for _ in range(CHECK_PHOTOS):
            small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((3 * self.reference.input_size // 2,) * 2, Image.Resampling.BICUBIC)
            noise = rng.normal(0, 12, (*image.size[::-1], 3))
            image = Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
            out.append(self.reference.preprocess(image))
        return np.stack(out)

    @property
    def check(self) -> np.ndarray:
        self._load()
        return self._check  # type: ignore[return-value]

    @property
    def calibration(self) -> np.ndarray | None:
        self._load()
        return self._calib


def _open_cold(config: EncoderConfig, parsed: ParsedSpec, runtime: str, kind: str,
               photos: Photos | None) -> Encoder:
    from retrieval.torch_encoders import create_torch_encoder

    ref_config = replace(config, device="cpu", precision="fp32", runtime="torch")
    ref = create_torch_encoder(parsed, config.spec, ref_config, "fp32")
    ref.batch_size = config.batch_size
    digest_full = cache_digest(ref.weights_digest, config.pool, ref.test_size)
    sample = _Photos(photos, ref)
    reference_emb: np.ndarray | None = None
    tried: list[dict] = []
    onnx_dir = None
    order = candidates(kind, ref.family, runtime, config.precision)
    if ref.preprocess_config is None:  # a transform numpy does not reproduce: exported towers cannot be fed
        logger.info("encoder %s: its preprocessing needs torch, so it runs on torch", config.spec)
        order = [c for c in order if c[0] == "torch"] or [("torch", "fp32")]

    def build(key: EntryKey) -> dict:  # export one candidate into the cache (replacing a damaged entry there)
        nonlocal reference_emb, onnx_dir
        if reference_emb is None:
            reference_emb = ref.encode_batch(sample.check)
        if onnx_dir is None:
            onnx_dir = _export_onnx_once(ref, sample.check)
        return _build_entry(ref, config, key, onnx_dir / "model.onnx", sample, reference_emb, kind)

    try:
        for rt, prec in order:
            if rt == "torch":
                if prec == "fp32":
                    chosen = ref
                else:
                    if reference_emb is None:
                        reference_emb = ref.encode_batch(sample.check)
                    faith = ref.try_precision(prec, sample.check, reference_emb)
                    tried.append({"runtime": rt, "precision": prec, **faith})
                    if not faith["passed"]:
                        continue
                    chosen = ref
                _record(runtime, config, digest_full, kind, rt, prec, tried, sample, photos)
                logger.info("encoder %s: torch %s on %s", config.spec, prec, kind)
                return chosen
            if not runtime_installed(rt):
                if runtime != "auto":
                    raise RuntimeMissingError(missing_message(rt))
                logger.info("runtime %s is not installed (pip install 'speciesid[%s]'): skipped", rt, EXTRAS[rt])
                tried.append({"runtime": rt, "precision": prec, "status": "not installed"})
                continue
            key = _entry_key(digest_full, rt, prec, kind)
            info = read_entry(key)
            if info is None and prec == "int8" and (sample.calibration is None or not sample.real):
                logger.info("%s int8 needs real photos to calibrate on: skipped this time", rt)
                tried.append({"runtime": rt, "precision": prec, "status": "no photos"})
                continue
            try:
                cached = info is not None
                info = info if cached else build(key)
                enc = _load_entry(config, key, info, text_encoder=ref) if info.get("accepted") else None
                if enc is None and cached and info.get("accepted"):  # damaged on disk: export it again
                    info = build(key)
                    enc = _load_entry(config, key, info, text_encoder=ref) if info.get("accepted") else None
            except OSError as exc:  # the cache cannot be made or written (read-only, full, ...): torch needs none
                if not cache_unwritable(exc):
                    raise
                if runtime != "auto":
                    raise OSError(f"cannot export {config.spec} for {rt} into the cache {models_dir()} ({exc}): "
                                  "point SPECIESID_CACHE at a writable folder, or use --runtime torch") from exc
                logger.warning("cannot write the runtime cache %s (%s): running on torch fp32 (set SPECIESID_CACHE "
                               "to a writable folder to get the faster runtimes)", models_dir(), exc)
                return ref
            faith = info.get("faithfulness") or {}
            status = "not faithful" if not info.get("accepted") else ("accepted" if enc else "failed to load")
            tried.append({"runtime": rt, "precision": prec, "status": status, "min_cosine": faith.get("min_cosine")})
            if not info.get("accepted"):
                logger.info("%s %s rejected: min cosine %.4f to torch fp32", rt, prec, faith.get("min_cosine", 0))
                if runtime != "auto" and config.precision != "auto":
                    _refuse(info, config.spec, digest_full)
                continue
            if enc is None:
                continue
            _record(runtime, config, digest_full, kind, rt, prec, tried, sample, photos)
            logger.info("encoder %s: %s %s on %s (min cosine %.4f to torch fp32)", config.spec, rt, prec, kind,
                        faith.get("min_cosine", float("nan")))
            return enc
    finally:
        if onnx_dir is not None:
            import shutil

            shutil.rmtree(onnx_dir, ignore_errors=True)
    last = f"the last, {_attempt(tried[-1])}" if tried else "none could be tried"
    raise ValueError(f"no runtime could run {config.spec} here ({len(tried)} tried, {last}; -v logs each attempt): "
                     "--runtime torch runs it without an export")


def _attempt(tried: dict) -> str:
    """One entry of what ``_open_cold`` tried, in words ('onnx int8: not faithful (min cosine 0.9812 to torch
    fp32)')."""
    status = tried.get("status") or ("faithful" if tried.get("passed") else "not faithful")
    cosine = tried.get("min_cosine")
    return (f"{tried['runtime']} {tried['precision']}: {status}"
            + (f" (min cosine {cosine:.4f} to torch fp32)" if isinstance(cosine, float) else ""))


def _record(runtime: str, config: EncoderConfig, digest: str, kind: str, rt: str, prec: str, tried: list[dict],
            sample: _Photos, photos: Photos | None) -> None:
    """Remember the choice; decide again when photos are first offered if int8 was skipped for want of them."""
    retry = photos is None and any(t.get("status") == "no photos" for t in tried)
    write_choice(digest, runtime, config.precision, kind, {
        "spec": config.spec, "chosen": {"runtime": rt, "precision": prec}, "tried": tried,
        "photos": "real" if sample.real else "synthetic", "retry_with_photos": retry,
    })


def _export_onnx_once(ref: TorchEncoder, example: np.ndarray) -> Path:
    """The fp32 ONNX export every candidate starts from (a temporary folder in the cache)."""
    import tempfile

    from retrieval.runtimes.export import export_onnx

    base = models_dir()
    base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".onnx-", dir=base))
    t0 = time.perf_counter()
    # a note (INFO): the command line shows it without -v (api.cli.setup_logging), the first use being slower
    logger.info("preparing %s for this CPU (once; cached under %s)", ref.spec, base, extra={"note": True})
    export_onnx(ref.image_module(), example, folder / "model.onnx")
    logger.info("ONNX export of %s: %.1f s", ref.spec, time.perf_counter() - t0)
    return folder


def _build_entry(ref: TorchEncoder, config: EncoderConfig, key: EntryKey, onnx_fp32: Path, sample: _Photos,
                 reference_emb: np.ndarray, kind: str) -> dict:
    """Export one candidate into its cache folder (written whole), check it, return its export.json."""
    from index.atomic import atomic_directory, write_json_atomic
    from retrieval.runtimes.export import build_files, embed_with, faithfulness, runner_for

    t0 = time.perf_counter()
    with atomic_directory(key.folder()) as tmp:
        files, hint = build_files(key.runtime, key.precision, tmp, onnx_fp32, family=ref.family, kind=kind,
                                  calibration=sample.calibration if key.precision == "int8" else None,
                                  progress=config.progress)
        run = runner_for(key.runtime, tmp, files, hint)
        faith = faithfulness(reference_emb, embed_with(run, sample.check))
        faith["photos"] = "real" if sample.real else "synthetic"
        del run
        info = _export_info(ref, config, key, files if faith["passed"] else [], hint, faith, sample, t0)
        if not faith["passed"]:
            for f in files:
                (tmp / f).unlink(missing_ok=True)
        write_json_atomic(tmp / "export.json", info, sort_keys=False)
    return info


def _export_info(ref: TorchEncoder, config: EncoderConfig, key: EntryKey, files: list[str], hint: str, faith: dict,
                 sample: _Photos, t0: float) -> dict:
    calib = sample.calibration
    return {
        "format": EXPORT_FORMAT, "spec": config.spec, "fingerprint": ref.fingerprint, "digest": key.digest,
        "weights_digest": ref.weights_digest,
        "runtime": key.runtime, "runtime_version": key.runtime_version, "precision": key.precision,
        "cpu_kind": key.cpu_kind, "hint": hint, "accepted": bool(faith["passed"]), "files": files,
        "faithfulness": faith,
        "calibration": ({"photos": int(len(calib))} if key.precision == "int8" and calib is not None else None),
        "preprocess": ref.preprocess_config.to_dict(), "dim": ref.dim, "input_size": ref.input_size,
        "test_size": ref.test_size,
        "family": ref.family, "supports_text": ref.supports_text,
        "logit_scale": float(getattr(ref, "logit_scale", 100.0)),
        "versions": {p: package_version(p) for p in ("torch", "open_clip_torch", "timm", "onnx", "onnxruntime",
                                                     "openvino", "nncf")},
        "export_seconds": round(time.perf_counter() - t0, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
