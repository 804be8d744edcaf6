"""Image (and text) encoders: one factory, ``create_encoder(spec)``, over open_clip and timm.

Spec strings (see :func:`list_encoders`):

- ``bioclip`` (the default) = ``open_clip:hf-hub:imageomics/bioclip``; ``bioclip-2`` = ``open_clip:hf-hub:imageomics/bioclip-2``
- ``open_clip:ARCH`` (random weights unless ``@TAG`` or ``weights=``), ``open_clip:ARCH@TAG``,
  ``open_clip:hf-hub:ORG/REPO``, ``open_clip:local-dir:PATH``
- ``timm:NAME`` (pretrained from the hub unless ``weights=`` or ``@random``), ``timm:hf-hub:ORG/REPO``,
  ``timm:local-dir:PATH``
- ``local-dir:PATH``: an open_clip or timm folder, told apart by its config file
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

#: Named encoders: short name -> full spec.
ALIASES: dict[str, str] = {
    "bioclip": "open_clip:hf-hub:imageomics/bioclip",
    "bioclip-2": "open_clip:hf-hub:imageomics/bioclip-2",
}
DEFAULT_ENCODER = "bioclip"
SPEC_FORMS: tuple[str, ...] = (
    "bioclip",
    "bioclip-2",
    "open_clip:ARCH[@TAG]",
    "open_clip:hf-hub:ORG/REPO",
    "open_clip:local-dir:PATH",
    "timm:NAME[@random]",
    "timm:hf-hub:ORG/REPO",
    "timm:local-dir:PATH",
    "local-dir:PATH",
)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class EncoderConfig:
    """How to build and run an encoder."""

    spec: str = DEFAULT_ENCODER  # encoder spec string, one of SPEC_FORMS
    weights: str | None = None  # weights file (.safetensors/.pt/.bin) that replaces the spec's own
    device: str = "auto"  # "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:N"
    precision: str = "auto"  # weight dtype: fp32, bf16, fp16; auto = bf16 where it is fast, else fp32
    batch_size: int = 32  # images per forward pass


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


def _spec_error(spec: str, why: str) -> ValueError:
    forms = "\n  ".join(SPEC_FORMS)
    return ValueError(f"unknown encoder spec {spec!r}: {why}. Valid forms:\n  {forms}")


def parse_spec(spec: str) -> ParsedSpec:
    """Split a spec string; raise ``ValueError`` listing the valid forms when it is not one."""
    if not spec or not isinstance(spec, str):
        raise _spec_error(str(spec), "empty spec")
    full = ALIASES.get(spec, spec)
    if full.startswith("local-dir:"):
        path = Path(full[len("local-dir:") :])
        if (path / "open_clip_config.json").is_file():
            return ParsedSpec("open_clip", "local-dir", str(path))
        if (path / "config.json").is_file():
            return ParsedSpec("timm", "local-dir", str(path))
        raise _spec_error(spec, f"{path} holds neither open_clip_config.json (open_clip) nor config.json (timm)")
    library, sep, rest = full.partition(":")
    if not sep or library not in ("open_clip", "timm") or not rest:
        raise _spec_error(spec, "expected a known name or a 'open_clip:' / 'timm:' prefix")
    for source in ("hf-hub", "local-dir"):
        if rest.startswith(source + ":"):
            name = rest[len(source) + 1 :]
            if not name:
                raise _spec_error(spec, f"nothing after '{source}:'")
            return ParsedSpec(library, source, name)
    name, _, tag = rest.partition("@")
    if library == "timm" and tag not in ("", "random"):
        raise _spec_error(spec, "timm specs take no pretrained tag other than '@random' (use --weights FILE)")
    return ParsedSpec(library, "name", name, tag or None)


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU; use --device cpu")
    return dev


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - depends on the torch build
        return False


def state_dict_digest(module: torch.nn.Module) -> str:
    """sha256 over the module's parameters and buffers, in name order (the weights' identity)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().to("cpu").contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@contextlib.contextmanager
def seeded_init(seed: int = 0):
    """Reproducible random initialisation without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class Encoder(ABC):
    """Turns photos into L2-normalised float32 embeddings."""

    spec: str  # the spec string it was created from
    dim: int  # embedding width
    input_size: int  # side of the square model input, in pixels
    fingerprint: str  # spec + weights digest: what every derived artefact records
    device: torch.device
    dtype: torch.dtype
    batch_size: int
    supports_text: bool = False
    transform: Callable[[Image.Image], torch.Tensor]  # the model's own eval preprocessing

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One RGB PIL image -> a CHW float tensor, with the model's own eval transform."""
        return self.transform(image)

    @abstractmethod
    def _forward_images(self, batch: torch.Tensor) -> torch.Tensor:
        """Model forward on a preprocessed batch (already on device and dtype)."""

    def encode_batch(self, batch: torch.Tensor) -> np.ndarray:
        """Preprocessed (N, C, H, W) tensor -> (N, dim) float32, L2-normalised."""
        if batch.ndim != 4:
            raise ValueError(f"expected a (N, C, H, W) batch, got shape {tuple(batch.shape)}")
        with torch.inference_mode():
            x = batch.to(self.device, dtype=self.dtype, non_blocking=True)
            feats = self._forward_images(x).float()
            feats = torch.nn.functional.normalize(feats, dim=-1)
        return feats.cpu().numpy().astype(np.float32, copy=False)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images -> (N, dim) float32, L2-normalised, in batches of ``batch_size``."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            out.append(self.encode_batch(torch.stack([self.preprocess(_rgb(im)) for im in chunk])))
        return np.concatenate(out, axis=0)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (N, dim) float32, L2-normalised (text-capable encoders only)."""
        raise ValueError(
            f"encoder {self.spec!r} is image-only and cannot encode text; use a CLIP-style encoder "
            "such as 'bioclip' or 'open_clip:...'"
        )

    def describe(self) -> dict[str, object]:
        """What to record next to anything derived from this encoder."""
        return {
            "spec": self.spec,
            "fingerprint": self.fingerprint,
            "dim": self.dim,
            "device": str(self.device),
            "precision": str(self.dtype).removeprefix("torch."),
            "supports_text": self.supports_text,
        }


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    from retrieval.images import to_rgb

    return to_rgb(image)


def _pick_dtype(precision: str, device: torch.device, *, transformer: bool) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # Measured here (docs/benchmarks.md): bf16 weights make a ViT-B/16 ~3x faster on CPUs with native
        # bf16. MobileNetV1 also runs ~1.7x faster in bf16 but lost 1.9 points of kNN top-1 on ph-snakes
        # (0.805 -> 0.786, benchmarks/tune_knn.py --precision bf16), so CNNs stay fp32 by default.
        return torch.bfloat16 if transformer and cpu_has_fast_bf16() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class OpenClipEncoder(Encoder):
    """An open_clip CLIP model (BioCLIP, BioCLIP-2, OpenAI/LAION CLIP, local folders)."""

    supports_text = True

    def __init__(self, parsed: ParsedSpec, spec: str, config: EncoderConfig) -> None:
        import open_clip

        self.spec = spec
        self.device = resolve_device(config.device)
        self.batch_size = config.batch_size
        if parsed.source == "hf-hub":
            model_name, pretrained = f"hf-hub:{parsed.name}", None
        elif parsed.source == "local-dir":
            path = Path(parsed.name)
            if not (path / "open_clip_config.json").is_file():
                raise ValueError(f"{path} is not an open_clip folder: open_clip_config.json is missing")
            model_name, pretrained = f"local-dir:{path}", None
        else:
            known = open_clip.list_models()
            if parsed.name not in known:
                near = [m for m in known if parsed.name.lower() in m.lower()][:10]
                raise _spec_error(spec, f"open_clip has no architecture {parsed.name!r} (similar: {near})")
            model_name = parsed.name
            pretrained = None if parsed.tag in (None, "random") else parsed.tag
        if config.weights:
            if parsed.source != "name":
                raise ValueError("--weights goes with 'open_clip:ARCH'; hub and local-dir specs carry their own")
            pretrained = str(config.weights)
        if pretrained is None and parsed.source == "name":
            logger.warning("encoder %s has random weights: fine for speed tests, useless for accuracy", spec)
        with seeded_init():
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
        model.eval()
        self.fingerprint = f"{spec}#{state_dict_digest(model)[:16]}"
        scale = getattr(model, "logit_scale", None)
        self.logit_scale = float(scale.detach().exp()) if scale is not None else 100.0  # CLIP's softmax temperature
        self.dtype = _pick_dtype(config.precision, self.device, transformer=True)
        self.model = model.to(self.device, dtype=self.dtype)
        self.transform = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        with torch.inference_mode():
            size = getattr(model.visual, "image_size", 224)
            size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
            self.input_size = int(max(size))
            probe = torch.zeros(1, 3, *size, device=self.device, dtype=self.dtype)
            self.dim = int(self.model.encode_image(probe).shape[-1])

    def _forward_images(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(batch)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (N, dim) float32, L2-normalised, in the image embedding space."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), 256):
                tokens = self.tokenizer(list(texts[start : start + 256])).to(self.device)
                feats = self.model.encode_text(tokens).float()
                out.append(torch.nn.functional.normalize(feats, dim=-1).cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)


class TimmEncoder(Encoder):
    """A timm image model used as a feature extractor (pooled penultimate features)."""

    def __init__(self, parsed: ParsedSpec, spec: str, config: EncoderConfig) -> None:
        import timm
        from timm.data import create_transform, resolve_model_data_config

        self.spec = spec
        self.device = resolve_device(config.device)
        self.batch_size = config.batch_size
        kwargs: dict[str, object] = {"num_classes": 0}
        if parsed.source == "local-dir":
            path = Path(parsed.name)
            if not (path / "config.json").is_file():
                raise ValueError(f"{path} is not a timm folder: config.json is missing")
            name, pretrained = f"local-dir:{path}", True
        elif parsed.source == "hf-hub":
            name, pretrained = f"hf-hub:{parsed.name}", True
        else:
            name = parsed.name
            if not timm.is_model(name):
                near = timm.list_models(f"*{name}*")[:10]
                raise _spec_error(spec, f"timm has no model {name!r} (similar: {near})")
            pretrained = parsed.tag != "random"
        if config.weights:
            if parsed.source != "name":
                raise ValueError("--weights goes with 'timm:NAME'; hub and local-dir specs carry their own")
            weights = Path(config.weights)
            if not weights.is_file():
                raise ValueError(f"weights file {weights} does not exist")
            pretrained = True
            kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
        with seeded_init():
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        model.eval()
        self.fingerprint = f"{spec}#{state_dict_digest(model)[:16]}"
        self.dtype = _pick_dtype(config.precision, self.device, transformer=False)
        # channels_last: measured 1.5-2x faster for CNNs on CPU (oneDNN), harmless for ViTs.
        self.model = model.to(self.device, dtype=self.dtype, memory_format=torch.channels_last)
        data_cfg = resolve_model_data_config(model)
        self.transform = create_transform(**data_cfg, is_training=False)
        self.dim = int(model.num_features)
        self.input_size = int(max(data_cfg["input_size"][1:]))

    def _forward_images(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch.contiguous(memory_format=torch.channels_last))


def create_encoder(
    spec: str = DEFAULT_ENCODER,
    weights: str | None = None,
    device: str = "auto",
    *,
    precision: str = "auto",
    batch_size: int = 32,
) -> Encoder:
    """Build an encoder from a spec string (see module docstring); unknown specs raise ``ValueError``."""
    config = EncoderConfig(spec=spec, weights=weights, device=device, precision=precision, batch_size=batch_size)
    return create_encoder_from_config(config)


def create_encoder_from_config(config: EncoderConfig) -> Encoder:
    """Build an encoder from an :class:`EncoderConfig`."""
    parsed = parse_spec(config.spec)
    cls = OpenClipEncoder if parsed.library == "open_clip" else TimmEncoder
    logger.info("loading encoder %s on %s", config.spec, config.device)
    return cls(parsed, config.spec, config)
