"""Image (and text) encoders: one factory, ``create_encoder(spec)``, over open_clip and timm, run by PyTorch,
ONNX Runtime or OpenVINO (``runtime``; see :mod:`retrieval.runtimes` and docs/runtimes.md).

Spec strings (see :func:`list_encoders`):

- ``bioclip`` (the default) = ``open_clip:hf-hub:imageomics/bioclip``; ``bioclip-2`` = ``open_clip:hf-hub:imageomics/bioclip-2``
- ``open_clip:ARCH`` (random weights unless ``@TAG`` or ``weights=``), ``open_clip:ARCH@TAG``,
  ``open_clip:hf-hub:ORG/REPO``, ``open_clip:local-dir:PATH``
- ``timm:NAME`` (pretrained from the hub unless ``weights=`` or ``@random``), ``timm:hf-hub:ORG/REPO``,
  ``timm:local-dir:PATH``
- ``local-dir:PATH``: an open_clip or timm folder, told apart by its config file

This module imports no torch: the :class:`Encoder` interface works on numpy arrays, the torch encoders live in
:mod:`retrieval.torch_encoders` and the exported ones in :mod:`retrieval.runtimes.exported`, so a query
answered by a cached exported model never loads torch.
"""

from __future__ import annotations

import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from retrieval.metric import l2_normalize
from retrieval.preprocess import PreprocessConfig, preprocess_image, squash_config

logger = logging.getLogger(__name__)

#: Named encoders: short name -> full spec. The one registry of names: SPEC_FORMS lists them first, so a name added
#: here shows in `speciesid encoders list`, every --encoder help and the "Valid forms" of a refused spec.
ALIASES: dict[str, str] = {
    "bioclip": "open_clip:hf-hub:imageomics/bioclip",
    "bioclip-2": "open_clip:hf-hub:imageomics/bioclip-2",
}
DEFAULT_ENCODER = "bioclip"
SPEC_FORMS: tuple[str, ...] = (
    *ALIASES,
    "open_clip:ARCH[@TAG]",
    "open_clip:hf-hub:ORG/REPO",
    "open_clip:local-dir:PATH",
    "timm:NAME[@random]",
    "timm:hf-hub:ORG/REPO",
    "timm:local-dir:PATH",
    "local-dir:PATH",
)
PRECISIONS = ("auto", "fp32", "bf16", "int8", "fp16")
#: The block of a local-dir config.json that ``speciesid finetune`` writes (what marks a network fine-tuned here).
FINETUNE_RECORD = "speciesid"
RUNTIMES = ("auto", "torch", "onnx", "openvino")
#: Feature pooling: the model's own (average pooling for CNNs), generalised-mean pooling with p = 3 (timm CNNs), or
#: ``auto``: gem3 for timm CNNs, the model's own for everything else (see :func:`resolve_pool`).
POOLS = ("auto", "model", "gem3")
#: Test-time views, each embedded and averaged (L2-normalised): the eval crop alone (``single``), plus its mirror
#: image (``flip``), plus the whole photo squashed to ``SCALE_VIEW`` px (``ms``), or all four (``flipms``).
VIEWS = ("single", "flip", "ms", "flipms")
SCALE_VIEW = 288
#: What a new gallery is built with (chosen by measurement on ph-snakes: docs/accuracy.md).
DEFAULT_POOL = "model"
DEFAULT_VIEWS = "single"
#: Environment variables that set how an encoder runs when the command line (or the server's ``serve`` options) does
#: not: read by every command and by the server alike (:func:`run_options`).
RUNTIME_ENV = "SPECIESID_RUNTIME"
PRECISION_ENV = "SPECIESID_PRECISION"
DEVICE_ENV = "SPECIESID_DEVICE"
#: The devices ``--device`` takes.
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
#: Photos for an export's faithfulness check and int8 calibration: a list of paths/bytes, or a callable giving one.
Photos = Sequence[str | Path | bytes] | Callable[[], Sequence[str | Path | bytes]]


#: What a gallery built before the pool and views options were recorded was built with.
BUILT_BEFORE_OPTIONS = {"pool": "model", "views": "single"}


@dataclass(frozen=True)
class EncoderConfig:
    """How to build and run an encoder. spec, weights, pool and views may be left unset (None): :meth:`resolved`
    fills them from a gallery's record, else with a new gallery's defaults; an encoder is made from a resolved one."""

    spec: str | None = None  # one of SPEC_FORMS; None = the gallery's own, else DEFAULT_ENCODER
    weights: str | None = None  # weights file (.safetensors/.pt/.bin) replacing the spec's; None with spec None or
    # the gallery's own spec = the gallery's own, else the spec's own weights
    device: str = "auto"  # "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:N"
    precision: str = "auto"  # fp32, bf16, int8, fp16 (CUDA); auto = the fastest faithful one here
    batch_size: int = 32  # images per forward pass
    runtime: str | None = None  # auto, torch, onnx, openvino; None = $SPECIESID_RUNTIME, else auto
    pool: str | None = None  # one of POOLS; None = the gallery's own (spec None or its own), else DEFAULT_POOL
    views: str | None = None  # one of VIEWS; None = the gallery's own (spec None or its own), else DEFAULT_VIEWS
    progress: bool = True  # a first use's export shows its converters' progress bars (NNCF's) on stderr; -q: not

    def resolved(self, built: Mapping[str, Any] | None = None) -> EncoderConfig:
        """This config with unset spec, weights, pool and views taken from ``built`` (a gallery's record: the
        ``encoder`` of its ``gallery.json``; one from before the options has :data:`BUILT_BEFORE_OPTIONS`) when the
        spec is unset or names the gallery's own (:func:`spec_key`), else a new gallery's defaults (also with no
        gallery, None): another encoder keeps none of the gallery's weights, pooling or views (``--pool gem3`` is
        for timm CNNs). Weights given without a spec go with the gallery's spec."""
        if built is None:
            return replace(self, spec=self.spec or DEFAULT_ENCODER, pool=self.pool or DEFAULT_POOL,
                           views=self.views or DEFAULT_VIEWS)
        gallery_spec = str(built["spec"])
        own = not self.spec or spec_key(self.spec) == spec_key(gallery_spec)
        # another encoder keeps none of the gallery's options, but a local folder of the gallery's library may be a
        # copy of its model (a gallery used on another machine): it keeps the pooling and views, and the
        # fingerprint check says whether the weights are the same
        if own or _local_copy_of(str(self.spec), gallery_spec):
            pool = built.get("pool", BUILT_BEFORE_OPTIONS["pool"])
            views = built.get("views", BUILT_BEFORE_OPTIONS["views"])
        else:
            pool, views = DEFAULT_POOL, DEFAULT_VIEWS
        return replace(self, spec=self.spec or gallery_spec,
                       weights=(self.weights or built.get("weights")) if own else self.weights,
                       pool=self.pool or pool, views=self.views or views)

    @property
    def is_resolved(self) -> bool:
        """Whether spec, pool and views are set (what an encoder is made from)."""
        return None not in (self.spec, self.pool, self.views)


def portable(config: EncoderConfig) -> EncoderConfig:
    """``config`` with a relative ``local-dir:`` folder and ``weights`` file made absolute: what a gallery records
    must find them again from whatever folder it is used."""
    spec, folder = config.spec, local_folder(config.spec or "")
    if spec and folder is not None and not folder.is_absolute():
        spec = spec.partition("local-dir:")[0] + "local-dir:" + str(folder.resolve())
    weights = str(Path(config.weights).resolve()) if config.weights else config.weights
    return replace(config, spec=spec, weights=weights)


def preprocess_with(image: Image.Image, config: PreprocessConfig | None,
                    transform: Callable[[Image.Image], Any] | None) -> np.ndarray:
    """One RGB PIL image -> a float32 (C, H, W) array: numpy preprocessing, else the library's transform."""
    if config is not None:
        return preprocess_image(image, config)
    return np.asarray(transform(image), dtype=np.float32)  # type: ignore[misc]


def check_options(pool: str, views: str) -> None:
    """Refuse unknown pooling / view names."""
    if pool not in POOLS:
        raise ValueError(f"unknown pooling {pool!r}; choose one of {', '.join(POOLS)}")
    if views not in VIEWS:
        raise ValueError(f"unknown views {views!r}; choose one of {', '.join(VIEWS)}")


_TRANSFORMER_NAMES = ("vit", "deit", "beit", "eva", "swin", "cait", "xcit", "levit", "pit", "mvit", "hiera",
                      "vision_transformer", "visiontransformer", "naflex")


def timm_family(name: str) -> str:
    """'transformer' or 'cnn', from a timm architecture or class name."""
    low = name.lower()
    return "transformer" if any(t in low for t in _TRANSFORMER_NAMES) else "cnn"


def local_timm_config(parsed: ParsedSpec) -> dict | None:
    """config.json of a ``timm:local-dir:`` folder (None for other specs, or when it cannot be read)."""
    if parsed.library != "timm" or parsed.source != "local-dir":
        return None
    import json

    try:
        return json.loads((Path(parsed.name) / "config.json").read_text())
    except (OSError, ValueError):
        return None


def resolve_pool(pool: str, parsed: ParsedSpec) -> str:
    """``auto`` -> ``gem3`` for a timm CNN (by its architecture name; a local folder's config.json), else ``model``
    (also for a network fine-tuned here, whose head was trained on its own pooling)."""
    if pool != "auto":
        return pool
    if parsed.library != "timm":
        return "model"
    name = parsed.name
    if parsed.source == "local-dir":
        cfg = local_timm_config(parsed)
        if cfg is None:
            return "model"
        if FINETUNE_RECORD in cfg:  # a fine-tuned network: its head was trained on the model's own pooling
            return "model"
        name = str(cfg.get("architecture", name))
    return "gem3" if timm_family(name) == "cnn" else "model"


def finetuned_test_size(parsed: ParsedSpec) -> int | None:
    """The input side a network fine-tuned here is embedded at when ``speciesid finetune`` chose one other than
    its training size (timm's ``pretrained_cfg.test_input_size``, written by ``finetune``), else None.

    Only networks fine-tuned here: a hub model's own ``test_input_size`` is left to timm users, so galleries built
    with those models keep their embeddings."""
    cfg = local_timm_config(parsed)
    if not cfg or FINETUNE_RECORD not in cfg:
        return None
    pcfg = cfg.get("pretrained_cfg") or {}
    test, train = pcfg.get("test_input_size"), pcfg.get("input_size")
    if not test or list(test) == list(train or []):
        return None
    return int(max(test[1:]))


def options_suffix(pool: str, views: str, size: int | None = None) -> str:
    """The fingerprint's record of the embedding options ('' for the model's pooling, a single view and the
    model's own input size; ``size``: a test size other than the training one, :func:`finetuned_test_size`)."""
    return ((f"+pool={pool}" if pool != "model" else "") + (f"+views={views}" if views != "single" else "")
            + (f"+size={size}" if size else ""))


def make_fingerprint(spec: str, digest: str, pool: str = "model", views: str = "single",
                     size: int | None = None) -> str:
    """``spec#digest16[+pool=..][+views=..][+size=..]``: what every gallery, probe and text prior records. The
    options sit after the digest, so :func:`index.layout.check_encoder` refuses a gallery built with other ones."""
    return f"{spec}#{digest[:16]}{options_suffix(pool, views, size)}"


def cache_digest(digest: str, pool: str, size: int | None = None) -> str:
    """The key of an exported image tower: the weights digest, changed when the pooling layer is not the model's
    or the input size is a chosen test size (:func:`finetuned_test_size`)."""
    if pool == "model" and not size:
        return digest
    import hashlib

    key = f"{digest}|pool={pool}" + (f"|size={size}" if size else "")
    return hashlib.sha256(key.encode()).hexdigest()


def stack_views(tensors: Sequence) -> Any:
    """Preprocessed photos (each what :meth:`Encoder.preprocess_views` gives) -> one batch for ``encode_batch``."""
    if tensors and isinstance(tensors[0], tuple):
        return tuple(np.stack([t[g] for t in tensors]) for g in range(len(tensors[0])))
    return np.stack(tensors)


def batch_len(batch: Any) -> int:
    """Photos in a batch from :func:`stack_views`."""
    return len(batch[0]) if isinstance(batch, tuple) else len(batch)


def concat_views(batches: Sequence) -> Any:
    """Batches (from :func:`stack_views`) -> one batch."""
    if batches and isinstance(batches[0], tuple):
        return tuple(np.concatenate([b[g] for b in batches]) for g in range(len(batches[0])))
    return np.concatenate(batches)


@dataclass(frozen=True)
class ParsedSpec:
    """A spec string split into its parts."""

    library: str  # "open_clip" or "timm"
    source: str  # "alias", "name", "hf-hub" or "local-dir"
    name: str  # architecture name, hub id or folder path
    tag: str | None = None  # open_clip pretrained tag, or "random"


def list_encoders() -> list[str]:
    """The accepted spec forms (aliases first)."""
    return list(SPEC_FORMS)


def spec_error(spec: str, why: str) -> ValueError:
    """The ValueError of an encoder spec refused for ``why``, listing the valid forms."""
    forms = "\n  ".join(SPEC_FORMS)
    return ValueError(f"unknown encoder spec {spec!r}: {why}. Valid forms:\n  {forms}")


#: Spec prefixes that name a folder on this machine (``local-dir:``: an open_clip or timm folder, by its config file).
LOCAL_PREFIXES = ("local-dir:", "timm:local-dir:", "open_clip:local-dir:")


def local_folder(spec: str) -> Path | None:
    """The folder a ``local-dir:`` spec names (see :data:`LOCAL_PREFIXES`; an alias expanded), as written, whether it
    exists or not (unlike :func:`parse_spec`, which reads its config file); None for every other spec."""
    full = ALIASES.get(spec, spec)
    for prefix in LOCAL_PREFIXES:
        if full.startswith(prefix):
            return Path(full[len(prefix):])
    return None


def _local_copy_of(spec: str, gallery_spec: str) -> bool:
    """Whether ``spec`` is a ``local-dir:`` folder of the same library (timm / open_clip) as the gallery's spec: maybe
    a copy of its model in another folder (False when either cannot be parsed)."""
    try:
        mine, theirs = parse_spec(spec), parse_spec(gallery_spec)
    except ValueError:
        return False
    return mine.source == "local-dir" and mine.library == theirs.library


def spec_key(spec: str) -> tuple[str, str]:
    """What two specs are compared by: ("local", the resolved folder) for a ``local-dir:`` spec (whichever prefix
    names it, by any path), else ("named", the spec with its alias expanded)."""
    folder = local_folder(spec)
    return ("local", str(folder.expanduser().resolve())) if folder is not None else ("named", ALIASES.get(spec, spec))


def parse_spec(spec: str) -> ParsedSpec:
    """Split a spec string; raise ``ValueError`` listing the valid forms when it is not one."""
    if not spec or not isinstance(spec, str):
        raise spec_error(str(spec), "empty spec")
    full = ALIASES.get(spec, spec)
    if full.startswith("local-dir:"):
        path = Path(full[len("local-dir:") :])
        if not path.is_dir():
            what = "is not a folder" if path.exists() else "does not exist"
            raise ValueError(f"encoder folder {path} {what}: give "
                             "local-dir: a folder holding open_clip_config.json (open_clip) or config.json (timm)")
        if (path / "open_clip_config.json").is_file():
            return ParsedSpec("open_clip", "local-dir", str(path))
        if (path / "config.json").is_file():
            return ParsedSpec("timm", "local-dir", str(path))
        raise spec_error(spec, f"{path} holds neither open_clip_config.json (open_clip) nor config.json (timm)")
    library, sep, rest = full.partition(":")
    if not sep or library not in ("open_clip", "timm") or not rest:
        raise spec_error(spec, "expected a known name or a 'open_clip:' / 'timm:' prefix")
    for source in ("hf-hub", "local-dir"):
        if rest.startswith(source + ":"):
            name = rest[len(source) + 1 :]
            if not name:
                raise spec_error(spec, f"nothing after '{source}:'")
            return ParsedSpec(library, source, name)
    name, _, tag = rest.partition("@")
    if library == "timm" and tag not in ("", "random"):
        raise spec_error(spec, "timm specs take no pretrained tag other than '@random' (use --weights FILE)")
    return ParsedSpec(library, "name", name, tag or None)


def run_options(device: str | None = None, runtime: str | None = None, precision: str | None = None, *,
                environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """How an encoder is asked to run here: each of ``device``, ``runtime`` and ``precision`` as given, else its
    variable in ``environ`` (default the process's: :data:`DEVICE_ENV`, :data:`RUNTIME_ENV`, :data:`PRECISION_ENV`),
    else ``auto``; read by :func:`read_option`, a refused variable's value naming it. The one rule
    the command line and the server (whose settings read the same variables) both follow, so that on one machine a
    gallery's encoder runs the same way in both (docs/runtimes.md, "The command line and the server")."""
    return {"device": _asked("device", device, DEVICE_ENV, environ),
            "runtime": resolve_runtime(runtime, environ=environ),
            "precision": _asked("precision", precision, PRECISION_ENV, environ)}


def resolve_runtime(runtime: str | None, *, environ: Mapping[str, str] | None = None) -> str:
    """The runtime asked for: ``runtime``, else ``$SPECIESID_RUNTIME`` (in ``environ``, default the process's),
    else ``auto``; checked."""
    return _asked("runtime", runtime, RUNTIME_ENV, environ)


def _asked(what: str, given: str | None, variable: str, environ: Mapping[str, str] | None) -> str:
    """``given``, else ``variable``'s value, else ``auto``, read by :func:`read_option` (a blank one counts as not
    given); a refusal names ``variable`` when the value came from it."""
    env = os.environ if environ is None else environ
    if given is not None and given.strip():
        return read_option(what, given)
    return read_option(what, env.get(variable), variable)


#: What :func:`read_option` checks a runtime and a precision against (a device: :func:`check_device`).
OPTION_CHOICES = {"runtime": RUNTIMES, "precision": PRECISIONS}


def read_option(what: str, value: object, source: str | None = None) -> str:
    """The one reading of a ``device``, ``runtime`` or ``precision`` (``what``) by the command line and the server's
    settings alike: stripped and lower-cased, ``auto`` when None or blank (an empty ``SPECIESID_DEVICE=`` line of a
    .env), then checked (:func:`check_device`, :func:`check_choice`); a refusal names ``source`` (the variable the
    value came from) when given."""
    text = "" if value is None else str(value).strip().lower()
    text = text or "auto"
    if what == "device":
        check_device(text, source)
        return text
    return check_choice(what, text, OPTION_CHOICES[what], source)


def check_choice(what: str, value: str, choices: Sequence[str], source: str | None = None) -> str:
    """``value`` when it is one of ``choices``, else ``ValueError`` naming them (and ``source``, the variable or
    setting it came from, when given)."""
    if value not in choices:
        raise ValueError(f"{source + ': ' if source else ''}unknown {what} {value!r}; choose one of "
                         f"{', '.join(choices)}")
    return value


class Encoder(ABC):
    """Turns photos into L2-normalised float32 embeddings."""

    spec: str  # the spec string it was created from
    dim: int  # embedding width
    input_size: int  # side of the square model input, in pixels
    test_size: int | None = None  # input_size when it is a test size chosen by fine-tuning (``+size=`` in fingerprint)
    fingerprint: str  # spec + weights digest: what every derived artefact records
    device: Any  # where it runs ("cpu", or a torch.device for torch encoders)
    dtype: Any  # torch dtype (torch encoders) or the runtime's precision name
    batch_size: int
    runtime: str = "torch"  # "torch", "onnx" or "openvino"
    precision: str = "fp32"  # "fp32", "bf16", "fp16" or "int8"
    family: str = "transformer"  # "transformer" or "cnn" (what the runtime choice depends on)
    supports_text: bool = False
    preprocess_config: PreprocessConfig | None = None  # the eval transform, reproduced in numpy
    transform: Callable[[Image.Image], Any] | None = None  # the library's own transform (when numpy cannot)
    pool: str = "model"  # one of POOLS (applied inside the image tower)
    views: str = "single"  # one of VIEWS (applied here: preprocessing, then the average of the embeddings)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """One RGB PIL image -> a float32 (C, H, W) array, with the model's own eval transform."""
        return preprocess_with(image, self.preprocess_config, self.transform)

    def preprocess_views(self, image: Image.Image) -> np.ndarray | tuple[np.ndarray, ...]:
        """One RGB image -> the model input of every view: (C, H, W) for a single view, (V, C, H, W) for views of
        one size, a tuple of those per size otherwise (``stack_views`` batches them, ``encode_batch`` averages)."""
        base = self.preprocess(image)
        if self.views == "single":
            return base
        flip = self.views in ("flip", "flipms")
        groups = [[base] + ([base[:, :, ::-1]] if flip else [])]
        if self.views in ("ms", "flipms"):
            cfg = self.preprocess_config
            if cfg is None:
                raise ValueError(f"views {self.views!r} need a preprocessing numpy reproduces ({self.spec})")
            scaled = preprocess_image(image, squash_config(cfg, SCALE_VIEW))
            groups.append([scaled] + ([scaled[:, :, ::-1]] if flip else []))
        stacked = tuple(np.ascontiguousarray(np.stack(g)) for g in groups)
        return stacked[0] if len(stacked) == 1 else stacked

    @abstractmethod
    def _forward_array(self, batch: np.ndarray) -> np.ndarray:
        """Model forward on a preprocessed float32 (N, C, H, W) batch -> (N, dim) unnormalised features."""

    def encode_batch(self, batch: Any) -> np.ndarray:
        """Preprocessed (N, C, H, W) array -> (N, dim) float32, L2-normalised. Views: (N, V, C, H, W), or a tuple
        of those (one per input size): every view is embedded, the L2-normalised embeddings averaged, renormalised."""
        if isinstance(batch, tuple) or batch.ndim == 5:
            groups = batch if isinstance(batch, tuple) else (batch,)
            total = None
            for g in groups:
                n, v = g.shape[:2]
                e = self._encode_plain(g.reshape(n * v, *g.shape[2:])).reshape(n, v, -1).sum(axis=1)
                total = e if total is None else total + e
            return l2_normalize(total).astype(np.float32)
        return self._encode_plain(batch)

    def _encode_plain(self, batch: Any) -> np.ndarray:
        """(N, C, H, W) -> (N, dim) float32, L2-normalised."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4:
            raise ValueError(f"expected a (N, C, H, W) batch, got shape {tuple(batch.shape)}")
        feats = np.asarray(self._forward_array(batch), dtype=np.float32)
        return l2_normalize(feats).astype(np.float32, copy=False)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images -> (N, dim) float32, L2-normalised, in batches of ``batch_size``."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            out.append(self.encode_batch(stack_views([self.preprocess_views(_rgb(im)) for im in chunk])))
        return np.concatenate(out, axis=0)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (N, dim) float32, L2-normalised (text-capable encoders only)."""
        raise ValueError(
            f"encoder {self.spec!r} is image-only and cannot encode text; use a CLIP-style encoder "
            "such as 'bioclip' or 'open_clip:...'"
        )

    @property
    def text_dtype(self) -> str:
        """What the text tower computes in (part of the zero-shot cache key)."""
        return str(self.dtype)

    def describe(self) -> dict[str, object]:
        """What to record next to anything derived from this encoder."""
        return {
            "spec": self.spec,
            "fingerprint": self.fingerprint,
            "dim": self.dim,
            "device": str(self.device),
            "runtime": self.runtime,
            "precision": str(self.dtype).removeprefix("torch.") if self.runtime == "torch" else self.precision,
            "supports_text": self.supports_text,
            "pool": self.pool,
            "views": self.views,
        }


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    from retrieval.images import to_rgb

    return to_rgb(image)


def create_encoder(spec: str = DEFAULT_ENCODER, *, photos: Photos | None = None, **options: Any) -> Encoder:
    """Build an encoder from a spec string (see module docstring) and :class:`EncoderConfig` ``options`` (unset
    pool / views: a new gallery's defaults); unknown specs raise ``ValueError``.

    ``photos``: real photos for checking (and int8-calibrating) an exported model the first time one is made
    for these weights on this CPU (see :func:`retrieval.runtimes.select.open_encoder`).
    """
    return create_encoder_from_config(EncoderConfig(spec=spec, **options).resolved(None), photos=photos)


def create_encoder_from_config(config: EncoderConfig, *, photos: Photos | None = None) -> Encoder:
    """Build an encoder from a resolved :class:`EncoderConfig`, on the runtime it asks for (or the one ``auto``
    picks)."""
    from retrieval.runtimes.select import open_encoder

    if not config.is_resolved:
        raise ValueError(f"encoder options not resolved ({config}): call config.resolved(built) with the gallery's "
                         "recorded encoder, or config.resolved(None) for a new gallery's defaults")
    check_device(config.device)
    return open_encoder(config, photos=photos)


def check_device(device: str | None, source: str | None = None) -> None:
    """Refuse a ``--device`` other than auto, cpu, cuda or cuda:N (before anything is loaded); ``source``: the
    variable it was read from, named in the message."""
    if not re.fullmatch(DEVICE_PATTERN, device or ""):
        raise ValueError(f"{source + ': ' if source else ''}unknown device {device!r}; use auto (CUDA when present), "
                         "cpu, cuda or cuda:N")

