"""The models' eval preprocessing in numpy + PIL, bit for bit what open_clip's and timm's transforms give.

Both libraries' eval transforms on a PIL image are: PIL resize (shortest side, or "squash" to a fixed size),
a centre crop (zero padding when the image is smaller), ``/ 255`` in float32, ``(x - mean) / std`` in float32.
Done here without torch, so the warm query path never imports it (tests compare against the torch transforms).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

#: open_clip's defaults (OPENAI_DATASET_MEAN / STD).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL_MODES = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
              "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS,
              "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}


@dataclass(frozen=True)
class PreprocessConfig:
    """One eval transform: resize, centre crop, normalise."""

    size: tuple[int, int]  # (height, width) of the model input
    resize: tuple[int, ...]  # (short side,) for mode "shortest"; (height, width) for "squash"
    mode: str = "shortest"  # "shortest" (keep aspect, resize the short side) or "squash"
    interpolation: str = "bicubic"  # PIL resampling of the resize: bicubic, bilinear, nearest, ...
    mean: tuple[float, float, float] = OPENAI_MEAN  # per-channel mean subtracted, RGB order, on a 0-1 scale
    std: tuple[float, float, float] = OPENAI_STD  # per-channel standard deviation divided by, RGB order

    def to_dict(self) -> dict:
        """JSON-ready."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping) -> PreprocessConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(size=tuple(data["size"]), resize=tuple(data["resize"]), mode=data["mode"],
                   interpolation=data["interpolation"], mean=tuple(data["mean"]), std=tuple(data["std"]))

    @property
    def input_size(self) -> int:
        """The longer side of the model input."""
        return int(max(self.size))


def from_open_clip(cfg: Mapping | None) -> PreprocessConfig | None:
    """open_clip's ``preprocess_cfg`` (``model.visual.preprocess_cfg`` or a config file's) -> a config, or None
    for a transform this module does not reproduce (resize mode 'longest', a non-square 'shortest')."""
    cfg = dict(cfg or {})
    size = cfg.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))
    mode = cfg.get("resize_mode") or "shortest"
    interp = cfg.get("interpolation") or "bicubic"
    interp = "bilinear" if interp == "bilinear" else "bicubic"  # open_clip: anything else ('random') is bicubic
    mean, std = _triple(cfg.get("mean", OPENAI_MEAN)), _triple(cfg.get("std", OPENAI_STD))
    if mode == "shortest" and h == w:
        return PreprocessConfig((h, w), (h,), "shortest", interp, mean, std)
    if mode == "squash":
        return PreprocessConfig((h, w), (h, w), "squash", interp, mean, std)
    return None


def timm_input_side(data_cfg: Mapping) -> int:
    """The input side, in px, of a model with timm's data config ``data_cfg`` (the longer of its input's height
    and width): what a gallery decodes its photos for (``retrieval.images.model_image``), and what fine-tuning
    evaluates at by default."""
    return int(max(data_cfg["input_size"][1:]))


def from_timm(data_cfg: Mapping) -> PreprocessConfig | None:
    """timm's ``resolve_model_data_config`` dict -> a config, or None for crop modes not reproduced here."""
    _, h, w = data_cfg["input_size"]
    crop_pct = data_cfg.get("crop_pct") or 0.875
    crop_mode = data_cfg.get("crop_mode") or "center"
    interp = data_cfg.get("interpolation") or "bilinear"
    if interp not in _PIL_MODES:
        return None
    mean, std = _triple(data_cfg["mean"]), _triple(data_cfg["std"])
    scale = (math.floor(h / crop_pct), math.floor(w / crop_pct))
    if crop_mode == "center" and scale[0] == scale[1]:
        return PreprocessConfig((h, w), (scale[0],), "shortest", interp, mean, std)
    if crop_mode == "squash":
        return PreprocessConfig((h, w), scale, "squash", interp, mean, std)
    return None


def squash_config(cfg: PreprocessConfig, side: int) -> PreprocessConfig:
    """The whole photo squashed to ``side`` x ``side`` (no crop), normalised like ``cfg`` (a multi-scale view)."""
    return PreprocessConfig((side, side), (side, side), "squash", cfg.interpolation, cfg.mean, cfg.std)


def _triple(v: float | Sequence[float]) -> tuple[float, float, float]:
    v = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else (v,) * 3))
    return (v[0], v[1], v[2])


def _shortest(w: int, h: int, short_to: int) -> tuple[int, int]:
    """torchvision's output size for Resize(int) (its ``_compute_resized_output_size``)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = short_to, int(short_to * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def _center_crop(image: Image.Image, ch: int, cw: int) -> Image.Image:
    """torchvision's CenterCrop on a PIL image (zero padding first when the image is smaller)."""
    w, h = image.size
    if cw > w or ch > h:
        left, top = (cw - w) // 2 if cw > w else 0, (ch - h) // 2 if ch > h else 0
        canvas = Image.new(image.mode, (max(w, cw), max(h, ch)), 0)
        canvas.paste(image, (left, top))
        image = canvas
        w, h = image.size
        if (w, h) == (cw, ch):
            return image
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return image.crop((left, top, left + cw, top + ch))


def resize_and_crop(image: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """The geometric part of the transform (an RGB image of ``cfg.size``)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    w, h = image.size
    if cfg.mode == "shortest":
        nw, nh = _shortest(w, h, cfg.resize[0])
    elif cfg.mode == "squash":
        nh, nw = cfg.resize
    else:
        raise ValueError(f"unknown resize mode {cfg.mode!r}")
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), _PIL_MODES[cfg.interpolation])
    return _center_crop(image, *cfg.size)


def to_array(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """An image of ``cfg.size`` -> normalised float32 CHW (ToTensor + Normalize)."""
    x = np.asarray(image, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(cfg.mean, dtype=np.float32)) / np.asarray(cfg.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_image(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """One PIL image -> the model input, float32 (3, H, W)."""
    return to_array(resize_and_crop(image, cfg), cfg)
