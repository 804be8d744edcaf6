"""Labelled photos for fine-tuning: dataset records -> (image, class index), splits, class balance, loaders.

Small sets (the usual local case: a few thousand photos; :data:`CACHE_LIMIT` photos, :data:`CACHE_PIXELS` pixels
decoded) are decoded once into memory (training photos downscaled to at most ``cache_side`` px on the short side,
so every epoch only pays for augmentation; validation photos as a gallery decodes them for the model's input);
large sets (a global stage on SnakeCLEF) are decoded from disk in the loader workers, where an unreadable photo is
warned about and stood in for (training) or left out (evaluation), never fatal. Photos are read by
``index.sources.read_source`` (files and webdataset shard members, as ``index build`` reads them).

Every evaluation (validation, the head's init, the test-size choice, the final evaluation) sees a photo exactly
as a gallery's encoder at that side would: decoded by ``retrieval.images.model_image`` (at reduced scale, down
to twice the side), then the model's evaluation transform at that side (:class:`EvalView`,
:meth:`FinetuneData.eval_loader`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from finetune.augment import eval_transform, train_transform
from finetune.config import BALANCE_MODES, FinetuneConfig
from index.datasets import load_dataset, require_records
from index.sources import read_source, split_locator
from retrieval.images import decode_image, max_pixels_setting, model_image, sha256_bytes, sha256_file
from retrieval.preprocess import timm_input_side

logger = logging.getLogger(__name__)

__all__ = [
    "BALANCE_MODES", "CACHE_BYTES_PER_PIXEL", "CACHE_LIMIT", "CACHE_PIXELS", "CACHE_SIDE", "EvalView", "FinetuneData",
    "LabelledPhotos", "PhotoDataset", "Split",
    "balanced_sampler", "build_data", "class_weights", "load_photos", "loader", "split_photos", "stratified_split",
]

#: Sets up to this many photos are decoded once and kept in memory (when their pixels fit :data:`CACHE_PIXELS`).
CACHE_LIMIT = 20_000
#: Training photos are kept at most this many px on the short side (the augmentation crops from them).
CACHE_SIDE = 448
#: A set's decoded photos kept in memory hold at most this many pixels, counted as they are decoded: what
#: :data:`CACHE_LIMIT` 4:3 photos (a phone camera's 4000x3000) take at :data:`CACHE_SIDE` px on the short side.
#: Validation photos are kept as a gallery decodes them (up to ~4x the model side on the short side), so a set of
#: large ones reaches it with fewer photos; the photos past it are read from disk on their turn instead.
CACHE_PIXELS = CACHE_LIMIT * CACHE_SIDE * (CACHE_SIDE * 4 // 3)
#: Bytes of memory a decoded photo's pixel takes: Pillow keeps an RGB image at 4 bytes a pixel (RGBX); measured:
#: 4.01 bytes a pixel of process memory for 100 1000x1000 RGB images (Pillow 13.0). The cache's most, a set:
#: ``CACHE_BYTES_PER_PIXEL * CACHE_PIXELS`` (21.4 GB), for the training and the validation set each.
CACHE_BYTES_PER_PIXEL = 4


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


def load_photos(dataset: str, root: str | Path, metadata: str | Path | None = None, *,
                options: str = "--") -> LabelledPhotos:
    """A dataset layout (``index.datasets``) as paths + species labels (``options``: the prefix of the options
    that gave them, named in errors: ``--val-`` for --val-root)."""
    scan = load_dataset(dataset, root, metadata=metadata, options=options)
    for warning in scan.warnings:
        logger.warning("%s", warning)
    require_records(scan, options=options)
    return LabelledPhotos([Path(r.path) for r in scan.records], [r.species for r in scan.records])


def stratified_split(labels: Sequence[str], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, val) indices: ``fraction`` of every species (at least 1 when it has 2+ photos) goes to val.

    Not scikit-learn's ``train_test_split(stratify=...)``: that one refuses a species with a single photo and
    rounds over the whole set, so species of 2-6 photos can get no validation photo at all (then their F1 is
    an unearned 0 in the macro-F1 that early stopping reads); here every species of 2+ photos is in val.
    """
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


def _open(path: Path, max_side: int | None, data: bytes | None = None, *, model_side: int | None = None,
          max_pixels: int | None = None) -> Image.Image:
    """A photo (a file, or a ``SHARD#MEMBER`` of a webdataset shard: ``index.sources.read_source``, the reader
    ``index build`` uses; ``data``: its bytes, already read) decoded by ``retrieval.images.decode_image``, at most
    ``max_side`` px on the short side; with ``model_side``, as a gallery decodes it for a model input of that side
    (``retrieval.images.model_image``) instead. Over ``max_pixels`` decoded (default: SPECIESID_MAX_PIXELS,
    ``retrieval.images.max_pixels_setting``): a ``PixelLimitError`` (a ValueError)."""
    data = read_source(path) if data is None else data
    max_pixels = max_pixels_setting() if max_pixels is None else max_pixels
    if model_side:
        return model_image(data, model_side, max_pixels=max_pixels, name=str(path))
    img = decode_image(data, max_pixels=max_pixels, name=str(path), draft=max_side)
    if max_side and min(img.size) > max_side:
        w, h = img.size
        r = max_side / min(w, h)
        img = img.resize((max(1, round(w * r)), max(1, round(h * r))), Image.BILINEAR)
    return img


class PhotoDataset(torch.utils.data.Dataset):
    """(tensor, class index) pairs; decoded photos cached in memory for small sets (``cache``: None, the default,
    when the set has at most :data:`CACHE_LIMIT` photos, as many of them as fit :data:`CACHE_PIXELS` decoded, the
    rest read from disk; True, all of them; False, none).

    ``model_side``: photos decoded as a gallery decodes them for a model input of that side (evaluation photos,
    :class:`EvalView` at that side reads the cache); else downscaled to ``cache_side`` (training photos).

    A photo that cannot be read when its turn comes (a set too large to decode up front) is warned about once
    and, in training (``stand_in``), replaced by another photo of its species; in evaluation it is left out
    (the item is None, which :func:`loader`'s batches drop). Never fatal. ``max_pixels``: the most pixels a photo
    may decode to (default ``retrieval.images.max_pixels_setting()``, SPECIESID_MAX_PIXELS); one over it is
    unreadable.
    """

    def __init__(
        self,
        photos: LabelledPhotos,
        class_index: dict[str, int],
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        cache_side: int | None = CACHE_SIDE,
        cache: bool | None = None,
        stand_in: bool = True,
        model_side: int | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.max_pixels = max_pixels_setting() if max_pixels is None else max_pixels
        self.paths = photos.paths
        self.targets = [class_index[s] for s in photos.labels]
        self.transform = transform
        self.cache_side = cache_side
        self.model_side = model_side
        self.stand_in = stand_in
        self._warned: set[int] = set()  # photos already warned about (in this process)
        self._cache: list[Image.Image | None] | None = None
        self._sha256: list[str | None] = [None] * len(photos)  # digests of the bytes read by :meth:`preload`
        self._bounded = cache is None  # the cache's pixels are counted against CACHE_PIXELS
        if cache if cache is not None else len(photos) <= CACHE_LIMIT:
            self._cache = [None] * len(photos)

    def preload(self, progress: bool = False) -> list[str]:
        """Decode every photo into the cache now (before loader workers fork), and keep the digest of the bytes
        read (:meth:`sha256`: the run's photo lists need no second read); unreadable photos are left out of the set.
        Returns their paths, with why. When the decoded photos' pixels would pass :data:`CACHE_PIXELS`, decoding
        stops there: the photos decoded so far stay cached, the rest are read from disk on their turn
        (:meth:`image`; their digests are read by :meth:`sha256`, and an unreadable one is found on its turn).
        """
        from tqdm.auto import tqdm

        bad: list[str] = []
        if self._cache is None:
            return bad
        unread: set[int] = set()
        pixels = 0
        for i, p in enumerate(tqdm(self.paths, desc="decoding photos", unit="img", disable=not progress)):
            try:
                data = read_source(p)
                image = _open(p, self.cache_side, data, model_side=self.model_side, max_pixels=self.max_pixels)
            except (OSError, ValueError) as exc:
                bad.append(_why(p, exc))
                unread.add(i)
                continue
            self._sha256[i] = sha256_bytes(data)
            pixels += image.width * image.height
            if self._bounded and pixels > CACHE_PIXELS:
                logger.info("the first %d photos decoded would hold over %s pixels (finetune.data.CACHE_PIXELS: "
                            "%.1f GB at %d bytes a pixel): the %d decoded before stay in memory, the set's other %d "
                            "are read from disk on their turn", i + 1, f"{CACHE_PIXELS:,}",
                            CACHE_BYTES_PER_PIXEL * CACHE_PIXELS / 1e9, CACHE_BYTES_PER_PIXEL, i - len(unread),
                            len(self.paths) - i)
                break
            self._cache[i] = image
        if unread:
            keep = [i for i in range(len(self.paths)) if i not in unread]
            self.paths = [self.paths[i] for i in keep]
            self.targets = [self.targets[i] for i in keep]
            self._sha256 = [self._sha256[i] for i in keep]
            if self._cache is not None:
                self._cache = [self._cache[i] for i in keep]
        return bad

    def unhashed(self) -> list[Path]:
        """The photos whose digest :meth:`sha256` would still have to read (a set too large to preload)."""
        return [p for p, d in zip(self.paths, self._sha256, strict=True) if d is None]

    def sha256(self, progress: bool = False) -> list[str | None]:
        """The sha256 of every photo's bytes (None: unreadable), for the run's photo lists: the digests taken when
        :meth:`preload` read them, the rest read now (``retrieval.images.sha256_file``; a bar with ``progress``)."""
        from tqdm.auto import tqdm

        todo = [i for i, d in enumerate(self._sha256) if d is None]
        for i in tqdm(todo, desc="hashing photos for the photo lists", unit="img", disable=not progress or not todo):
            self._sha256[i] = sha256_file(self.paths[i])
        return list(self._sha256)

    def image(self, i: int) -> Image.Image:
        """Photo ``i`` as this dataset decodes it (the cache when it holds it)."""
        if self._cache is not None and self._cache[i] is not None:
            return self._cache[i]
        return _open(self.paths[i], self.cache_side, model_side=self.model_side, max_pixels=self.max_pixels)

    def model_image(self, i: int, side: int) -> Image.Image:
        """Photo ``i`` as a gallery decodes it for a model input of ``side`` px (``retrieval.images.model_image``):
        the cache when it holds the photo so, else read now."""
        if side == self.model_side:
            return self.image(i)
        return _open(self.paths[i], None, model_side=side, max_pixels=self.max_pixels)

    def readable(self, i: int, *, stand_in: bool, side: int | None = None) -> Image.Image | None:
        """Photo ``i`` (with ``side``: as a gallery decodes it for that side, :meth:`model_image`); when it cannot
        be read, another photo of its species (``stand_in``) or None (left out), with a warning the first time."""
        try:
            return self.image(i) if side is None else self.model_image(i, side)
        except (OSError, ValueError) as exc:  # a large set, read from disk: a photo that cannot be, on its turn
            if stand_in:
                return self._stand_in(i, exc)
            self._warn(i, f"unreadable photo, left out: {_why(self.paths[i], exc)}")
            return None

    def _warn(self, i: int, message: str) -> None:
        if i not in self._warned:
            self._warned.add(i)
            logger.warning("%s", message)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        image = self.readable(i, stand_in=self.stand_in)
        return None if image is None else (self.transform(image), self.targets[i])

    def _stand_in(self, i: int, exc: Exception) -> Image.Image | None:
        """Another photo of the same species, for an unreadable one of a set too large to decode up front (None,
        the photo left out, when no other photo of its species can be read)."""
        n = len(self.paths)
        for j in ((i + d) % n for d in range(1, n)):  # the next of its species, wrapping round
            if self.targets[j] != self.targets[i]:
                continue
            try:
                image = self.image(j)
            except (OSError, ValueError):
                continue
            self._warn(i, f"unreadable photo ({_why(self.paths[i], exc)}): {self.paths[j]} used in its place")
            return image
        self._warn(i, f"unreadable photo, left out: {_why(self.paths[i], exc)}; and no other photo of its species "
                   "could be read")
        return None


def _why(path: Path, exc: Exception) -> str:
    """An unreadable photo's path and why (the decoder's message names it already)."""
    return str(exc) if str(path) in str(exc) else f"{path}: {exc}"


class EvalView(torch.utils.data.Dataset):
    """A dataset's photos as a gallery's encoder at ``side`` px gets them: each decoded as the gallery decodes it
    (``retrieval.images.model_image``; the dataset's cache when it holds the photos so), under the model's
    evaluation transform at that side (:func:`finetune.augment.eval_transform`). An unreadable photo is left out."""

    def __init__(self, base: PhotoDataset, data_cfg: dict, side: int) -> None:
        self.base = base
        self.side = int(side)
        own = self.side == timm_input_side(data_cfg)  # the model's own input size, as its config says
        self.transform = eval_transform(data_cfg, None if own else self.side)
        self.targets = base.targets

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        image = self.base.readable(i, stand_in=False, side=self.side)
        return None if image is None else (self.transform(image), self.base.targets[i])


def class_weights(targets: Sequence[int], n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 over the samples (all 1 for a balanced set): scikit-learn's "balanced".

    Every class must have a photo (the species list comes from the training photos).
    """
    from sklearn.utils.class_weight import compute_class_weight

    w = compute_class_weight("balanced", classes=np.arange(n_classes), y=np.asarray(targets))
    return torch.tensor(w, dtype=torch.float32)


def balanced_sampler(targets: Sequence[int], n_classes: int, generator: torch.Generator) -> torch.utils.data.Sampler:
    """Draw every class equally often (with replacement), one epoch = as many draws as photos."""
    counts = np.bincount(np.asarray(targets), minlength=n_classes)
    w = 1.0 / counts[np.asarray(targets)]
    return torch.utils.data.WeightedRandomSampler(
        torch.tensor(w, dtype=torch.double), num_samples=len(targets), replacement=True, generator=generator
    )


def loader(ds: torch.utils.data.Dataset, batch_size: int, *, device: torch.device, shuffle: bool = False,
           sampler: torch.utils.data.Sampler | None = None, workers: int = 0,
           generator: torch.Generator | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader over ``ds`` (all batches kept; pinned memory on CUDA). Items that are None (photos left out)
    are dropped from their batch; a batch of none is None. Workers fork (Linux): they share the decoded photos.
    A run never loads LanceDB (whose threads do not survive a fork); a library caller that opened a gallery in
    this process before fine-tuning gets LanceDB's fork warning. Starting workers from a fork server instead was
    tried and dropped: the test suite's process crashed (a segfault) minutes after one such loader had run."""
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle if sampler is None else False, sampler=sampler,
        num_workers=workers, generator=generator, pin_memory=device.type == "cuda", drop_last=False,
        persistent_workers=False, collate_fn=collate_readable,
    )


def collate_readable(items: list) -> Any:
    """torch's default batch of the items that are not None (None when every one is)."""
    kept = [item for item in items if item is not None]
    return torch.utils.data.default_collate(kept) if kept else None


@dataclass
class Split:
    """Training and validation photos of a run, and the species (head order)."""

    train: LabelledPhotos
    val: LabelledPhotos
    species: list[str]
    val_source: str  # "val:DIR" or "split:FRACTION" (recorded in the output's config.json)
    # what the photos were when the run started, per folder ("root", "val_root"): :func:`photo_inventory`
    inventory: dict[str, list[list]] = field(default_factory=dict)

    @property
    def class_index(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.species)}


def photo_inventory(photos: LabelledPhotos, root: str | Path) -> list[list]:
    """[path relative to ``root``, species, size, mtime_ns] of every photo, sorted: what a checkpoint records of
    the photos it trained on, so that a resume on other photos is refused (``finetune.checkpoint.check_photos``).
    A shard member (``SHARD#MEMBER``) has its shard's size and time; an unreadable entry -1, -1."""
    base = os.path.abspath(Path(root).expanduser())
    if not os.path.isdir(base):  # a shard, a glob of shards or a manifest table: the folder holding it
        base = os.path.dirname(base)
    rows = []
    for path, label in zip(photos.paths, photos.labels, strict=True):
        text = os.fspath(path)
        try:  # links not followed: a renamed folder of links is a change
            rel = os.path.relpath(os.path.abspath(text), base)
        except ValueError:  # another drive (Windows)
            rel = text
        parts = split_locator(text)
        try:
            st = os.stat(text if parts is None or os.path.isfile(text) else parts[0])
            stamp = [st.st_size, st.st_mtime_ns]
        except OSError:
            stamp = [-1, -1]
        rows.append([rel, label, *stamp])
    return sorted(rows)


def split_photos(cfg: FinetuneConfig) -> Split:
    """The run's photos: ``--val-root``, or a stratified ``--val-split`` of ``--root``.

    Validation species without training photos are dropped (with a warning); at least 2 species are needed.
    """
    from retrieval.protocol import SPLIT_SOURCE, VAL_SOURCE

    photos = load_photos(cfg.dataset, cfg.root, cfg.metadata)
    inventory = {"root": photo_inventory(photos, cfg.root)}
    if cfg.val_root:
        train_photos = photos
        val_photos = load_photos(cfg.val_dataset or cfg.dataset, cfg.val_root, cfg.val_metadata, options="--val-")
        inventory["val_root"] = photo_inventory(val_photos, cfg.val_root)
        val_source = f"{VAL_SOURCE}{Path(cfg.val_root).resolve()}"  # absolute: evaluate may run from another folder
    else:
        tr_idx, va_idx = stratified_split(photos.labels, cfg.val_split, cfg.seed)
        train_photos, val_photos = photos.subset(tr_idx), photos.subset(va_idx)
        val_source = f"{SPLIT_SOURCE}{cfg.val_split}"
    species = train_photos.species
    if len(species) < 2:
        raise ValueError(f"fine-tuning needs at least 2 species, found {len(species)} under {cfg.root}")
    extra = sorted(set(val_photos.labels) - set(species))
    if extra:
        logger.warning("validation species with no training photos are ignored: %s", extra)
        known = set(species)
        val_photos = val_photos.subset([i for i, s in enumerate(val_photos.labels) if s in known])
    if not len(val_photos):
        if cfg.val_root:
            raise ValueError(f"none of the photos under --val-root {cfg.val_root} is of a training species (see the "
                             "warning above): give validation photos of the species under --root")
        raise ValueError("no validation photos: every species has a single photo; give --val-root, or 2+ photos a "
                         "species for --val-split to hold some out")
    return Split(train_photos, val_photos, species, val_source, inventory)


@dataclass
class FinetuneData:
    """The datasets of a run: training (augmented; its cache for augmentation only), validation (cached as a
    gallery decodes its photos at the model's own side); evaluation batches of either: :meth:`eval_loader`."""

    train: PhotoDataset
    val: PhotoDataset
    n_classes: int
    class_weight: torch.Tensor | None  # the loss's class weights (``--balance weights``), else None
    data_cfg: dict  # timm's data config of the backbone (the evaluation transform's)

    @property
    def model_side(self) -> int:
        """The backbone's own input side (what the epochs' validation embeds at)."""
        return timm_input_side(self.data_cfg)

    def eval_loader(self, dataset: PhotoDataset, cfg: FinetuneConfig, *, side: int | None = None,
                    device: torch.device, workers: int) -> torch.utils.data.DataLoader:
        """The one way evaluation batches are made (validation, the head's init, the test-size choice, the final
        evaluation, the budget's timing): ``dataset``'s photos as a gallery embeds them at ``side`` px (the model's
        own by default; :class:`EvalView`), in batches of twice the training batch, unreadable photos left out."""
        return loader(EvalView(dataset, self.data_cfg, side or self.model_side), 2 * cfg.batch_size,
                      workers=workers, device=device)

    def train_loader(self, cfg: FinetuneConfig, epoch: int, *, device: torch.device,
                     workers: int) -> torch.utils.data.DataLoader:
        """The epoch's shuffled (or class-balanced) batches; seeded by (seed, epoch) so a resumed run repeats them."""
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        sampler = balanced_sampler(self.train.targets, self.n_classes, gen) if cfg.balance == "sampler" else None
        return loader(self.train, cfg.batch_size, shuffle=True, sampler=sampler, workers=workers, generator=gen,
                      device=device)


def build_data(split: Split, data_cfg: dict, cfg: FinetuneConfig, *, train_size: int, device: torch.device,
               progress: bool = False) -> FinetuneData:
    """Datasets with the model's transforms (training: augmentation at ``train_size`` px; validation: as a gallery
    embeds its photos at the model's own side, an unreadable one left out); photos decoded now."""
    class_index = split.class_index
    model_side = timm_input_side(data_cfg)
    max_pixels = max_pixels_setting()  # SPECIESID_MAX_PIXELS, read once: as index build reads it
    train_ds = PhotoDataset(split.train, class_index, train_transform(data_cfg, train_size, cfg.augment),
                            max_pixels=max_pixels)
    val_ds = PhotoDataset(split.val, class_index, eval_transform(data_cfg), stand_in=False,
                          model_side=model_side, max_pixels=max_pixels)
    for bad in train_ds.preload(progress) + val_ds.preload(progress):
        logger.warning("unreadable photo, left out: %s", bad)
    unread = [split.species[c] for c in sorted(set(class_index.values()) - set(train_ds.targets))]
    if unread:
        raise ValueError(f"no training photo of {', '.join(unread)} could be read (see the warnings above): fix or "
                         "remove those photos, or the species' folder")
    unvalidated = [split.species[c] for c in sorted(set(class_index.values()) - set(val_ds.targets))]
    if unvalidated:
        logger.warning("%d training species have no validation photo (the val macro-F1 is over the species that "
                       "have): %s", len(unvalidated), ", ".join(unvalidated))
    cw = class_weights(train_ds.targets, len(split.species)).to(device) if cfg.balance == "weights" else None
    return FinetuneData(train_ds, val_ds, len(split.species), cw, data_cfg)
