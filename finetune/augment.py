"""Image transforms for fine-tuning: field-photo augmentation for training, the model's own for evaluation.

Training: RandomResizedCrop (a snake often fills only part of the frame, so crops down to ``scale[0]`` of the
area), horizontal flip (vertical optional), colour jitter and timm RandAugment together (field photos vary in
light, white balance and camera), normalised with the model's own mean/std. Evaluation: exactly what the
gallery encoder does (``timm.data.create_transform(**model_data_config, is_training=False)``), so validation
figures are those the gallery will see.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image


@dataclass
class AugmentConfig:
    """Training augmentation."""

    scale: tuple[float, float] = (0.35, 1.0)  # RandomResizedCrop area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect range
    hflip: float = 0.5  # horizontal flip probability
    vflip: float = 0.0  # vertical flip probability
    color_jitter: float = 0.3  # brightness/contrast/saturation strength (hue gets a quarter of it)
    auto_augment: str | None = "rand-m9-mstd0.5"  # timm RandAugment policy string; None or "" = off
    re_prob: float = 0.0  # random erasing probability


def model_data_config(model: torch.nn.Module) -> dict:
    """timm's resolved data config of a model (input_size, interpolation, mean, std, crop_pct, crop_mode)."""
    from timm.data import resolve_model_data_config

    return resolve_model_data_config(model)


def train_transform(data_cfg: dict, size: int, aug: AugmentConfig | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """The training transform at ``size`` px (square)."""
    from timm.data.transforms_factory import transforms_imagenet_train

    aug = aug or AugmentConfig()
    cj = aug.color_jitter
    return transforms_imagenet_train(
        img_size=size,
        scale=tuple(aug.scale),
        ratio=tuple(aug.ratio),
        hflip=aug.hflip,
        vflip=aug.vflip,
        color_jitter=(cj, cj, cj, cj / 4) if cj > 0 else None,
        force_color_jitter=cj > 0,
        auto_augment=aug.auto_augment or None,
        interpolation=data_cfg.get("interpolation", "bilinear"),
        mean=tuple(data_cfg["mean"]),
        std=tuple(data_cfg["std"]),
        re_prob=aug.re_prob,
    )


def eval_transform(data_cfg: dict, size: int | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """The model's own evaluation transform (what ``TimmEncoder`` uses), optionally at another size."""
    from timm.data import create_transform

    cfg = dict(data_cfg)
    if size is not None:
        cfg["input_size"] = (3, size, size)
    return create_transform(**cfg, is_training=False)
