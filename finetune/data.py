"""Labelled photos for fine-tuning: dataset records -> (image, class index), splits, class balance.

Small sets (the usual local case: a few thousand photos) are decoded once into memory, downscaled to at
most ``cache_side`` px on the short side, so every epoch only pays for augmentation; large sets (a global
stage on SnakeCLEF) are decoded from disk in the loader workers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from index.datasets import load_dataset
from retrieval.images import decode_image

logger = logging.getLogger(__name__)

#: Sets up to this many photos are decoded once and kept in memory.
CACHE_LIMIT = 20_000
BALANCE_MODES = ("weights", "sampler", "none")


@dataclass
class LabelledPhotos:
    """Photo paths with species labels."""

    paths: list[Path]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: Sequence[int]) -> LabelledPhotos:
        return LabelledPhotos([self.paths[i] for i in idx], [self.labels[i] for i in idx])

    @property
    def species(self) -> list[str]:
        return sorted(set(self.labels))


def load_photos(dataset: str, root: str | Path, metadata: str | Path | None = None) -> LabelledPhotos:
    """A dataset layout (``index.datasets``) as paths + species labels."""
    scan = load_dataset(dataset, root, metadata=metadata)
    for warning in scan.warnings:
        logger.warning("%s", warning)
    if not scan.records:
        raise ValueError(f"no photos found under {root} for dataset {dataset!r}")
    return LabelledPhotos([Path(r.path) for r in scan.records], [r.species for r in scan.records])


def stratified_split(labels: Sequence[str], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, val) indices: ``fraction`` of every species (at least 1 when it has 2+ photos) goes to val."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--val-split must be between 0 and 1, got {fraction}")
    rng = np.random.default_rng(seed)
    arr = np.asarray(labels)
    train: list[int] = []
    val: list[int] = []
    for s in sorted(set(labels)):
        members = rng.permutation(np.flatnonzero(arr == s))
        n_val = int(round(fraction * len(members)))
        n_val = min(max(n_val, 1 if len(members) >= 2 else 0), len(members) - 1)
        val.extend(members[:n_val].tolist())
        train.extend(members[n_val:].tolist())
    return sorted(train), sorted(val)


def _open(path: Path, max_side: int | None) -> Image.Image:
    img = decode_image(path.read_bytes(), name=str(path), draft=max_side)
    if max_side and min(img.size) > max_side:
        w, h = img.size
        r = max_side / min(w, h)
        img = img.resize((max(1, round(w * r)), max(1, round(h * r))), Image.BILINEAR)
    return img


class PhotoDataset(torch.utils.data.Dataset):
    """(tensor, class index) pairs; decoded photos cached in memory for small sets."""

    def __init__(
        self,
        photos: LabelledPhotos,
        class_index: dict[str, int],
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        cache_side: int | None = 448,
        cache: bool | None = None,
    ) -> None:
        self.paths = photos.paths
        self.targets = [class_index[s] for s in photos.labels]
        self.transform = transform
        self.cache_side = cache_side
        self._cache: list[Image.Image | None] | None = None
        if cache if cache is not None else len(photos) <= CACHE_LIMIT:
            self._cache = [None] * len(photos)

    def preload(self, progress: bool = False) -> list[str]:
        """Decode every photo into the cache now (before loader workers fork). Returns unreadable paths."""
        from tqdm.auto import tqdm

        bad = []
        if self._cache is None:
            return bad
        for i, p in enumerate(tqdm(self.paths, desc="decoding photos", unit="img", disable=not progress)):
            try:
                self._cache[i] = _open(p, self.cache_side)
            except (OSError, ValueError) as exc:
                bad.append(f"{p}: {exc}")
        return bad

    def image(self, i: int) -> Image.Image:
        if self._cache is not None and self._cache[i] is not None:
            return self._cache[i]
        return _open(self.paths[i], self.cache_side)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.image(i)), self.targets[i]


class TransformView(torch.utils.data.Dataset):
    """The same photos (and cache) under another transform."""

    def __init__(self, base: PhotoDataset, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.base = base
        self.transform = transform
        self.targets = base.targets

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.base.image(i)), self.base.targets[i]


def class_weights(targets: Sequence[int], n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 over the samples (all 1 for a balanced set)."""
    counts = np.bincount(np.asarray(targets), minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, len(targets) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def balanced_sampler(targets: Sequence[int], n_classes: int, generator: torch.Generator) -> torch.utils.data.Sampler:
    """Draw every class equally often (with replacement), one epoch = as many draws as photos."""
    counts = np.bincount(np.asarray(targets), minlength=n_classes)
    w = 1.0 / counts[np.asarray(targets)]
    return torch.utils.data.WeightedRandomSampler(
        torch.tensor(w, dtype=torch.double), num_samples=len(targets), replacement=True, generator=generator
    )
