"""Image transforms for fine-tuning: field-photo augmentation for training, the model's own for evaluation.

Training: RandomResizedCrop (a snake often fills only part of the frame, so crops down to ``scale[0]`` of the
area), horizontal flip (vertical optional), colour jitter and timm RandAugment together (field photos vary in
light, exposure and camera), normalised with the model's own mean/std. Hue is left alone by default and
RandAugment draws from colour-preserving operations (:data:`FIELD_OPS`): colour is a species trait. Evaluation:
the gallery encoder's transform (``timm.data.create_transform(**model_data_config, is_training=False)``) on the
photo decoded as a gallery decodes it (``retrieval.images.model_image``: ``finetune.data.EvalView``), so
validation figures are those the gallery will see.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image

from finetune.config import AugmentConfig

__all__ = ["FIELD_OPS", "AugmentConfig", "eval_transform", "model_data_config", "rand_augment", "train_transform"]

#: RandAugment operations that keep a photo's colours (snake species are told apart by colour and pattern, so
#: Invert / Solarize / Posterize / Color / Equalize, which rewrite colours, are left out): geometry, light, focus.
FIELD_OPS = (
    "AutoContrast", "Rotate", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
    "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)


def model_data_config(model: torch.nn.Module) -> dict:
    """timm's resolved data config of a model (input_size, interpolation, mean, std, crop_pct, crop_mode)."""
    from timm.data import resolve_model_data_config

    return resolve_model_data_config(model)


def train_transform(data_cfg: dict, size: int, aug: AugmentConfig | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """The training transform at ``size`` px (square)."""
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision import transforms as T

    aug = aug or AugmentConfig()
    mean, std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])
    tfl: list = [RandomResizedCropAndInterpolation(
        size, scale=tuple(aug.scale), ratio=tuple(aug.ratio), interpolation=data_cfg.get("interpolation", "bilinear"))]
    if aug.hflip > 0:
        tfl.append(T.RandomHorizontalFlip(aug.hflip))
    if aug.vflip > 0:
        tfl.append(T.RandomVerticalFlip(aug.vflip))
    if aug.color_jitter > 0 or aug.hue > 0:
        cj = aug.color_jitter
        tfl.append(T.ColorJitter(brightness=cj, contrast=cj, saturation=cj, hue=aug.hue))
    if aug.auto_augment:
        tfl.append(rand_augment(aug.auto_augment, size, mean, aug.ra_ops))
    tfl += [T.ToTensor(), T.Normalize(mean, std)]
    if aug.re_prob > 0:
        tfl.append(RandomErasing(aug.re_prob, mode="pixel", device="cpu"))
    return T.Compose(tfl)


def rand_augment(policy: str, size: int = 224, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 ops: str = "field") -> Callable[[Image.Image], Image.Image]:
    """timm's RandAugment of ``policy`` (``--rand-augment``) at ``size`` px; ``ops`` "field" draws from
    :data:`FIELD_OPS`, "all" from timm's set. A policy timm cannot read is refused in one line."""
    from timm.data.auto_augment import rand_augment_transform

    hparams = {"translate_const": int(size * 0.45), "img_mean": tuple(round(255 * m) for m in mean)}
    try:
        return rand_augment_transform(policy, hparams, transforms=list(FIELD_OPS) if ops == "field" else None)
    except (AssertionError, ValueError, KeyError, TypeError) as exc:  # timm asserts on what it cannot parse
        raise ValueError(f"--rand-augment {policy!r} is not a timm RandAugment policy; use e.g. rand-m9-mstd0.5 "
                         "(rand, then m: magnitude 0-10, n: operations per photo, mstd: magnitude spread), "
                         "or none for off") from exc


def eval_transform(data_cfg: dict, size: int | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """The model's own evaluation transform (what ``TimmEncoder`` uses), optionally at another size."""
    from timm.data import create_transform

    cfg = dict(data_cfg)
    if size is not None:
        cfg["input_size"] = (3, size, size)
    return create_transform(**cfg, is_training=False)
