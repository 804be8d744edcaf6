"""The PyTorch encoders (open_clip and timm): the reference every exported runtime is checked against.

Loading is lean: an open_clip checkpoint is adopted by a model built on the meta device (no random
initialisation that is then overwritten), the weights digest comes from the user cache when the weights
files are unchanged (keyed by their identity), and only the image tower is cast to bf16/fp16 until text is
first encoded. Imported only when torch is wanted (see :mod:`retrieval.runtimes.select`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from index.errors import exception_chain
from retrieval.encoders import (
    Encoder,
    EncoderConfig,
    ParsedSpec,
    check_options,
    finetuned_test_size,
    make_fingerprint,
    resolve_pool,
    spec_error,
    timm_family,
)
from retrieval.preprocess import from_open_clip, from_timm, timm_input_side
from retrieval.runtimes.cache import DigestCache, weights_identity

logger = logging.getLogger(__name__)

TORCH_PRECISIONS = ("fp32", "bf16", "fp16", "int8")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
def seeded_init(seed: int = 0) -> Iterator[None]:
    """Reproducible random initialisation without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def pick_precision(precision: str, device: torch.device, *, transformer: bool) -> str:
    """'auto' -> bf16/fp16 on CUDA; on CPU bf16 for transformers where bf16 is native, else fp32."""
    if precision not in ("auto", *TORCH_PRECISIONS):
        raise ValueError(f"unknown precision {precision!r}; choose one of auto, {', '.join(TORCH_PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        # Measured here (docs/benchmarks.md): bf16 weights make a ViT-B/16 ~3x faster on CPUs with native
        # bf16. MobileNetV1 also runs ~1.7x faster in bf16 but lost 1.9 points of kNN top-1 on ph-snakes
        # (0.805 -> 0.786, benchmarks/tune_knn.py --precision bf16), so CNNs stay fp32 by default.
        return "bf16" if transformer and cpu_has_fast_bf16() else "fp32"
    if precision == "int8" and device.type != "cpu":
        raise ValueError("int8 (dynamic quantisation of the Linear layers) runs on the CPU only")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(fp16_needs_cuda(str(device)))
    return precision


def fp16_needs_cuda(device: str) -> str:
    """The refusal of fp16 off CUDA: torch runs fp16 on a CPU, but ~2.4x slower than fp32 and unchecked."""
    return (f"--precision fp16 is for CUDA GPUs, and device {device!r} runs on the CPU here (fp16 is slower there "
            "than fp32); use --precision auto (the fastest faithful one on this CPU), bf16 or fp32")


def quantize_linear_int8(module: torch.nn.Module) -> torch.nn.Module:
    """PyTorch dynamic int8 of the Linear layers (fbgemm/x86 kernels; attention in-projections stay fp32)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        return torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)


def weights_digest(parsed: ParsedSpec, config: EncoderConfig, model: torch.nn.Module) -> str:
    """:func:`state_dict_digest`, from the user cache when the weights files are unchanged."""
    identity = weights_identity(parsed.library, parsed.source, parsed.name, parsed.tag, config.weights)
    cache = DigestCache()
    digest = cache.get(identity)
    if digest is None:
        digest = state_dict_digest(model)
        cache.put(identity, digest)
    return digest


class TorchEncoder(Encoder):
    """Shared by the two torch encoders: precision changes, the image tower for export."""

    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    runtime = "torch"
    weights_digest: str  # full sha256 of the weights (the fingerprint keeps 16 hex digits)

    def image_module(self) -> torch.nn.Module:
        """(N, 3, H, W) float32 -> (N, dim) unnormalised features (what exporters trace)."""
        raise NotImplementedError

    def set_precision(self, precision: str) -> None:
        """Run the image tower at ``fp32``/``bf16``/``fp16``, or ``int8`` (dynamic, Linear layers)."""
        self.precision = precision
        if precision == "int8":
            if not any(isinstance(m, torch.nn.Linear) for m in self.image_module().modules()):
                raise ValueError(f"torch int8 quantises Linear layers and {self.spec} has none: use "
                                 "--runtime openvino or onnx for int8, or another --precision")
            self._set_image_module(quantize_linear_int8(self.image_module().float()))
            self.dtype = torch.float32
        else:
            self.dtype = _DTYPES[precision]
            self.image_module().to(self.device, dtype=self.dtype)

    def _set_image_module(self, module: torch.nn.Module) -> None:
        raise NotImplementedError

    def _forward_with(self, module: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return module(batch)

    def _forward_images(self, batch: torch.Tensor) -> torch.Tensor:
        return self._forward_with(self.image_module(), batch)

    def try_precision(self, precision: str, check: np.ndarray, reference: np.ndarray) -> dict:
        """Run the image tower at ``precision`` if it stays faithful on ``check`` photos (cosine to the
        fp32 ``reference`` embeddings); returns the figures (``passed`` says whether it switched)."""
        import copy

        from retrieval.runtimes.export import faithfulness

        module = copy.deepcopy(self.image_module())
        if precision == "int8":
            module, dtype = quantize_linear_int8(module.float()), torch.float32
        else:
            dtype = _DTYPES[precision]
            module.to(self.device, dtype=dtype)
        feats = []
        with torch.inference_mode():
            for i in range(0, len(check), 16):
                x = torch.from_numpy(np.ascontiguousarray(check[i : i + 16])).to(self.device, dtype=dtype)
                f = self._forward_with(module, x).float()
                feats.append(torch.nn.functional.normalize(f, dim=-1).cpu().numpy())
        faith = faithfulness(reference, np.concatenate(feats))
        if faith["passed"]:
            self._set_image_module(module)
            self.dtype, self.precision = dtype, precision
        return faith

    def _encode_plain(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Preprocessed (N, C, H, W) array or tensor -> (N, dim) float32, L2-normalised."""
        x = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
        if x.ndim != 4:
            raise ValueError(f"expected a (N, C, H, W) batch, got shape {tuple(x.shape)}")
        with torch.inference_mode():
            x = x.to(self.device, dtype=self.dtype, non_blocking=True)
            feats = torch.nn.functional.normalize(self._forward_images(x).float(), dim=-1)
        return feats.cpu().numpy().astype(np.float32, copy=False)

    def _forward_array(self, batch: np.ndarray) -> np.ndarray:
        return self._encode_plain(batch)


def _open_clip_checkpoint(parsed: ParsedSpec, pretrained: str | None) -> str | None:
    """The checkpoint file open_clip would load for this spec (None: random weights)."""
    from open_clip import factory
    from open_clip import pretrained as oc_pretrained

    if parsed.source == "local-dir":
        return factory._find_checkpoint_in_dir(Path(parsed.name))
    if parsed.source == "hf-hub":
        return oc_pretrained.download_pretrained_from_hf(parsed.name)
    if pretrained is None:
        return None
    if Path(pretrained).is_file():
        return pretrained
    cfg = oc_pretrained.get_pretrained_cfg(parsed.name, pretrained)
    return oc_pretrained.download_pretrained(cfg) if cfg else None


@contextlib.contextmanager
def _weights_that_fit(weights: str | None, target: str):
    """A ``--weights`` file made for another model (or no checkpoint at all) becomes a ValueError saying so."""
    try:
        yield
    except (RuntimeError, KeyError, EOFError) as exc:
        if not weights:
            raise
        detail = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc).strip())
        raise ValueError(f"--weights {weights} does not load into {target}: {detail[:300]}") from exc


def _load_open_clip_no_init(open_clip: ModuleType, model_name: str, pretrained: str | None, checkpoint: str):
    """Build on the meta device (no initialisation), then adopt the checkpoint's tensors (``assign=True``)."""
    from open_clip.factory import load_checkpoint

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns "initialized randomly" for load_weights=False
    try:
        with torch.device("meta"):
            model = open_clip.create_model(model_name, pretrained=pretrained, load_weights=False, device="meta")
    finally:
        root.setLevel(level)
    original = model.load_state_dict
    model.load_state_dict = lambda sd, strict=True: original(sd, strict=strict, assign=True)
    try:
        load_checkpoint(model, checkpoint, strict=True)
    finally:
        del model.load_state_dict
    for module in model.modules():  # the text tower's causal mask is a buffer no checkpoint holds: rebuild it
        mask = module._buffers.get("attn_mask")
        if mask is not None and mask.is_meta and mask.ndim == 2 and mask.shape[0] == mask.shape[1]:
            module._buffers["attn_mask"] = torch.full(tuple(mask.shape), float("-inf")).triu_(1)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device: {left[:5]}")
    return model


class OpenClipEncoder(TorchEncoder):
    """An open_clip CLIP model (BioCLIP, BioCLIP-2, OpenAI/LAION CLIP, local folders)."""

    supports_text = True

    def __init__(self, parsed: ParsedSpec, spec: str, config: EncoderConfig, precision: str | None = None) -> None:
        import open_clip

        self.spec = spec
        self.device = resolve_device(config.device)
        self.batch_size = config.batch_size
        if parsed.source == "hf-hub":
            model_name, pretrained = f"hf-hub:{parsed.name}", None
        elif parsed.source == "local-dir":
            path = Path(parsed.name)
            if not path.is_dir():
                what = "is not a folder" if path.exists() else "does not exist"
                raise ValueError(f"open_clip folder {path} {what}: give the folder that holds open_clip_config.json "
                                 "and its weights")
            if not (path / "open_clip_config.json").is_file():
                raise ValueError(f"{path} is not an open_clip folder: open_clip_config.json is missing")
            model_name, pretrained = f"local-dir:{path}", None
        else:
            known = open_clip.list_models()
            if parsed.name not in known:
                near = [m for m in known if parsed.name.lower() in m.lower()][:10]
                raise spec_error(spec, f"open_clip has no architecture {parsed.name!r} (similar: {near})")
            model_name = parsed.name
            pretrained = None if parsed.tag in (None, "random") else parsed.tag
        if config.weights:
            if parsed.source != "name":
                raise ValueError("--weights goes with 'open_clip:ARCH'; hub and local-dir specs carry their own")
            pretrained = str(config.weights)
        if pretrained is None and parsed.source == "name":
            logger.warning("encoder %s has random weights: fine for speed tests, useless for accuracy", spec)
        self.model_name = model_name
        model = None
        checkpoint = None
        with contextlib.suppress(Exception):
            checkpoint = _open_clip_checkpoint(parsed, pretrained)
        if checkpoint is not None:
            try:
                model = _load_open_clip_no_init(open_clip, model_name, pretrained, checkpoint)
            except Exception as exc:  # noqa: BLE001 - any surprise: the library's own (slower) loading
                logger.info("loading %s without initialisation failed (%s): loading it the usual way", spec, exc)
        if model is None:
            with _weights_that_fit(config.weights, f"open_clip:{model_name}"), seeded_init():
                model = open_clip.create_model(model_name, pretrained=pretrained)
        model.eval()
        self.model = model
        self.weights_digest = weights_digest(parsed, config, model)
        check_options(config.pool, config.views)
        if config.pool not in ("model", "auto"):
            raise ValueError(f"--pool {config.pool} is for timm CNNs; {spec} keeps its own pooling")
        self.views = config.views
        self.fingerprint = make_fingerprint(spec, self.weights_digest, self.pool, self.views)
        scale = getattr(model, "logit_scale", None)
        self.logit_scale = float(scale.detach().float().exp()) if scale is not None else 100.0  # CLIP's temperature
        pcfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        self.preprocess_config = from_open_clip(pcfg)
        if self.preprocess_config is None:
            from open_clip.transform import PreprocessCfg, image_transform_v2

            self.transform = image_transform_v2(PreprocessCfg(**pcfg), is_train=False)
        size = getattr(model.visual, "image_size", 224)
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.input_size = int(max(size))
        self._tokenizer = None
        self._text_dtype: torch.dtype | None = None
        trunk = getattr(model.visual, "trunk", None)  # open_clip's timm towers keep the timm model here
        self.family = _timm_family(type(trunk if trunk is not None else model.visual).__name__)
        self.dtype = torch.float32
        self.set_precision(precision or pick_precision(config.precision, self.device, transformer=True))
        with torch.inference_mode():
            probe = torch.zeros(1, 3, *size, device=self.device, dtype=self.dtype)
            self.dim = int(self._forward_images(probe).shape[-1])

    def image_module(self) -> torch.nn.Module:
        return self.model.visual

    def _set_image_module(self, module: torch.nn.Module) -> None:
        self.model.visual = module

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (N, dim) float32, L2-normalised, in the image embedding space."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        import open_clip

        if self._tokenizer is None:
            self._tokenizer = open_clip.get_tokenizer(self.model_name)
        text_dtype = torch.float32 if self.precision == "int8" else self.dtype
        if self._text_dtype != text_dtype:  # the text tower is cast on first use only
            visual = self.model.visual
            self.model.visual = torch.nn.Identity()
            self.model.to(self.device, dtype=text_dtype)
            self.model.visual = visual
            self._text_dtype = text_dtype
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), 256):
                tokens = self._tokenizer(list(texts[start : start + 256])).to(self.device)
                feats = self.model.encode_text(tokens).float()
                out.append(torch.nn.functional.normalize(feats, dim=-1).cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)

    @property
    def text_dtype(self) -> str:
        """What the text tower runs in (part of the zero-shot cache key)."""
        return str(torch.float32 if self.precision == "int8" else self.dtype)


_timm_family = timm_family


class GeM(torch.nn.Module):
    """Generalised-mean pooling, ``mean(x ** p) ** (1 / p)`` over the feature map (p = 3: between average and max
    pooling; +0.5 points of blend top-1 for MobileNetV1 on ph-snakes, docs/accuracy.md). Exports to ONNX as is."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, flatten: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.p, self.eps = float(p), float(eps)  # plain floats: the weights digest stays the weights'
        self.flatten = flatten if flatten is not None else torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps (N, C, H, W) pooled to (N, C, 1, 1) in float32, then ``flatten``ed, in ``x``'s dtype."""
        pooled = x.float().clamp(min=self.eps).pow(self.p).mean(dim=(2, 3), keepdim=True).pow(1.0 / self.p)
        return self.flatten(pooled.to(x.dtype))


def use_gem(model: torch.nn.Module, spec: str, p: float = 3.0) -> None:
    """Replace a timm CNN's global average pooling by :class:`GeM` (in place)."""
    from timm.layers import SelectAdaptivePool2d

    for owner in (model, getattr(model, "head", None)):
        pool = getattr(owner, "global_pool", None) if owner is not None else None
        if isinstance(pool, SelectAdaptivePool2d) and pool.pool_type:
            owner.global_pool = GeM(p, flatten=pool.flatten)
            return
    raise ValueError(f"--pool gem3 needs a timm CNN with a global pooling layer; {spec} has none")


#: The weights files timm reads from a ``local-dir`` folder (``timm.models.load_state_dict_from_path``:
#: ``model.safetensors`` or ``pytorch_model.bin`` first, else the first file of these kinds).
TIMM_WEIGHTS = ("*.safetensors", "*.pth", "*.pth.tar", "*.bin")
#: How to make a timm folder, said when one is refused (README, "Encoders and weights").
MAKE_TIMM_FOLDER = ("make one with timm.models.save_for_hf(model, DIR, safe_serialization=True), or download one: "
                    "hf download timm/NAME --local-dir DIR")


def check_timm_folder(path: Path) -> None:
    """Refuse a ``timm:local-dir:`` folder that timm could not load, naming the folder and what is missing or wrong
    (rather than timm's own "No suitable checkpoints" or "Unknown model"): it must exist, hold a JSON
    ``config.json`` whose ``architecture`` is a timm model, and a weights file (:data:`TIMM_WEIGHTS`)."""
    import difflib
    import json

    import timm

    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise ValueError(f"timm folder {path} {what}: give the folder that holds config.json and model.safetensors; "
                         f"{MAKE_TIMM_FOLDER}")
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{path} is not a timm folder: config.json is missing; {MAKE_TIMM_FOLDER}")
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{config} cannot be read as JSON ({exc}); {MAKE_TIMM_FOLDER}") from exc
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"{config} names no \"architecture\" (the timm model the folder holds, such as "
                         f"\"mobilenetv1_100\"); {MAKE_TIMM_FOLDER}")
    if not timm.is_model(arch):
        near = difflib.get_close_matches(arch, timm.list_models(), n=5)
        raise ValueError(f"{config}: architecture {arch!r} is not a timm model (similar: "
                         f"{', '.join(near) or 'none'}); correct it, or remake the folder from the model")
    if not any(any(path.glob(pattern)) for pattern in TIMM_WEIGHTS):
        raise ValueError(f"{path} holds config.json but no weights: model.safetensors (or pytorch_model.bin) is "
                         f"missing; {MAKE_TIMM_FOLDER}")


class TimmEncoder(TorchEncoder):
    """A timm image model used as a feature extractor (pooled penultimate features)."""

    def __init__(self, parsed: ParsedSpec, spec: str, config: EncoderConfig, precision: str | None = None) -> None:
        import timm
        from timm.data import create_transform, resolve_model_data_config

        self.spec = spec
        self.device = resolve_device(config.device)
        self.batch_size = config.batch_size
        kwargs: dict[str, object] = {"num_classes": 0}
        if parsed.source == "local-dir":
            path = Path(parsed.name)
            check_timm_folder(path)
            name, pretrained = f"local-dir:{path}", True
        elif parsed.source == "hf-hub":
            name, pretrained = f"hf-hub:{parsed.name}", True
        else:
            name = parsed.name
            if not timm.is_model(name):
                near = timm.list_models(f"*{name}*")[:10]
                raise spec_error(spec, f"timm has no model {name!r} (similar: {near})")
            pretrained = parsed.tag != "random"
        if config.weights:
            if parsed.source != "name":
                raise ValueError("--weights goes with 'timm:NAME'; hub and local-dir specs carry their own")
            weights = Path(config.weights)
            if not weights.is_file():
                raise ValueError(f"weights file {weights} does not exist")
            pretrained = True
            kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
        with _weights_that_fit(config.weights, f"timm:{name}"), seeded_init():
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        model.eval()
        self.weights_digest = weights_digest(parsed, config, model)
        check_options(config.pool, config.views)
        self.family = _timm_family(type(model).__name__)
        pool = config.pool if config.pool != "auto" else resolve_pool("auto", parsed)
        if pool == "gem3":
            use_gem(model, spec)
        self.pool, self.views = pool, config.views
        # a network fine-tuned here is embedded at the test size its run chose (``finetune.engine.choose_test_size``)
        self.test_size = finetuned_test_size(parsed)
        self.fingerprint = make_fingerprint(spec, self.weights_digest, self.pool, self.views, self.test_size)
        data_cfg = resolve_model_data_config(model, use_test_size=self.test_size is not None)
        self.preprocess_config = from_timm(data_cfg)
        if self.preprocess_config is None:
            self.transform = create_transform(**data_cfg, is_training=False)
        self.dim = int(model.num_features)
        self.input_size = timm_input_side(data_cfg)
        # channels_last: measured 1.5-2x faster for CNNs on CPU (oneDNN), harmless for ViTs.
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.dtype = torch.float32
        self.set_precision(precision or pick_precision(config.precision, self.device,
                                                       transformer=self.family == "transformer"))

    def image_module(self) -> torch.nn.Module:
        return self.model

    def _set_image_module(self, module: torch.nn.Module) -> None:
        self.model = module

    def _forward_with(self, module: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return module(batch.contiguous(memory_format=torch.channels_last))


#: How long the hub's reachability check waits for a connection, in seconds: a setting, not a measurement (one
#: connection, where the libraries would retry each file five times with growing waits).
HUB_CONNECT_TIMEOUT_S = 3.0


def create_torch_encoder(parsed: ParsedSpec, spec: str, config: EncoderConfig,
                         precision: str | None = None) -> TorchEncoder:
    """The torch encoder of a parsed spec (``precision``: a resolved one, else ``config.precision``).

    Weights that come from the Hugging Face hub: when one connection to it fails (:func:`hub_unreachable`), they are
    loaded from the local cache alone (hub offline mode for this load), and when they are not cached the error comes
    at once, saying what to do, rather than after the libraries' retries of every file."""
    cls = OpenClipEncoder if parsed.library == "open_clip" else TimmEncoder
    unreachable = hub_unreachable() if _from_hub(parsed, config) else None
    try:
        with _hub_offline(unreachable is not None):
            return cls(parsed, spec, config, precision)
    except (OSError, RuntimeError) as exc:  # the hub unreachable (open_clip wraps it in a RuntimeError)
        # offline, only a cache miss is told as one: any other failure (CUDA out of memory...) goes up as it came
        missed = _cache_miss(exc) if unreachable is not None else _hub_unreachable(exc)
        if parsed.source in ("hf-hub", "alias", "name") and missed:
            raise ValueError(_offline_message(spec, unreachable, exc, parsed)) from exc
        raise


def _from_hub(parsed: ParsedSpec, config: EncoderConfig) -> bool:
    """Whether the spec's weights come from the Hugging Face hub (or its cache)."""
    if config.weights or parsed.source == "local-dir":
        return False
    if parsed.source == "hf-hub":
        return True
    return parsed.tag != "random" if parsed.library == "timm" else parsed.tag not in (None, "random")


def hub_unreachable(timeout: float = HUB_CONNECT_TIMEOUT_S) -> str | None:
    """Why the Hugging Face hub (``HF_ENDPOINT``) cannot be reached from here, or None when a connection to it opens,
    or a proxy applies to it (``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY`` for its scheme, not bypassed by
    ``NO_PROXY``: only the download through it can tell then). ``HF_HUB_OFFLINE`` set counts as unreachable."""
    import socket
    import threading
    from urllib.parse import urlparse
    from urllib.request import getproxies, proxy_bypass

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or _offline_asked():
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (80 if url.scheme == "http" else 443)
    proxies = getproxies()  # as the libraries' HTTP clients read them
    if (proxies.get(url.scheme) or proxies.get("all")) and not proxy_bypass(url.netloc or host):
        return None
    outcome: list[BaseException | None] = []

    def connect() -> None:  # in a thread: a name lookup has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=connect, name="speciesid-hub-check", daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    if outcome and outcome[0] is None:
        return None
    why = outcome[0] if outcome else f"no answer in {timeout:g} s"
    return f"no connection to {host}:{port}: {why}"


@contextlib.contextmanager
def _hub_offline(forced: bool) -> Iterator[None]:
    """Hub offline mode for one load (``forced``): the cache answers, nothing waits on the network."""
    if not forced:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True  # read by huggingface_hub at each request
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _offline_asked() -> bool:
    """Whether the user set HF_HUB_OFFLINE (read now: huggingface_hub read it once, at its import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _offline_message(spec: str, unreachable: str | None, exc: BaseException, parsed: ParsedSpec | None = None) -> str:
    """What to do when the weights of ``spec`` are neither cached nor downloadable, with the library's cause whole:
    for weights of a hub repository (``parsed``), the download command to run elsewhere and the spec to give then."""
    cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    user_offline = _offline_asked()
    why = f" ({unreachable}), and they are not in the local Hugging Face cache" if unreachable else ""
    if parsed is not None and parsed.source == "hf-hub":
        folder = parsed.name.rsplit("/", 1)[-1]
        how = (f"download them once elsewhere (hf download {parsed.name} --local-dir {folder}), copy "
               f"the folder here and give --encoder {parsed.library}:local-dir:{folder}")
    else:
        how = "download them once elsewhere and give --encoder open_clip:local-dir:DIR (or timm:local-dir:DIR)"
    return (f"cannot download the weights of {spec} from the Hugging Face hub{why}. Without network, {how}"
            + ("" if user_offline else "; HF_HUB_OFFLINE=1 skips even the hub's connection check")
            + f" (README, 'Offline'). The library said: {cause}")


def _cache_miss(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) is huggingface_hub saying, in offline mode, that a file is not in the
    local cache (``LocalEntryNotFoundError``, ``OfflineModeIsEnabled``; open_clip and timm wrap them)."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    return any(isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled))
               for e in exception_chain(exc, context=True))


def _hub_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the hub could not be reached."""
    words = ("hf hub", "connection", "offline", "name or service", "localentrynotfound",
             "outgoing traffic has been disabled")
    return any(any(word in f"{type(e).__name__} {e}".lower() for word in words)
               for e in exception_chain(exc, context=True))
