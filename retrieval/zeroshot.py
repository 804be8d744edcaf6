"""Zero-shot scoring with a CLIP-style encoder: prompt ensembles -> class embeddings -> softmax.

One implementation for both users: the text prior (a class per species, prompted by its names) and the
cleaning filter (target / off-target classes from a prompt file). A class embedding is the mean of its
prompts' normalised text embeddings, re-normalised, as in open_clip's zero-shot classifier and pybioclip;
class probabilities are ``softmax(logit_scale * cos(image, class))``. Class embeddings are cached on disk
per encoder (fingerprint and precision) and prompt list.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.special import softmax

from index.atomic import atomic_write
from retrieval.encoders import Encoder
from retrieval.metric import l2_normalize

logger = logging.getLogger(__name__)
#: Prompts encoded per call (the progress bar moves once a batch).
TEXT_BATCH = 64


def class_embeddings(encoder: Encoder, classes: Sequence[Sequence[str]], *, progress: bool = False) -> np.ndarray:
    """(n_classes, dim): each class's normalised prompt embeddings averaged, then re-normalised.

    ``progress``: a bar over the prompts (encoding a shipped prompt file takes ~20 s on a CPU)."""
    if not encoder.supports_text:
        raise ValueError(
            f"encoder {encoder.spec!r} is image-only: zero-shot scoring needs a CLIP-style encoder (e.g. bioclip)"
        )
    from tqdm import tqdm

    prompts_flat = [p for prompts in classes for p in prompts]
    with tqdm(total=len(prompts_flat), desc="zero-shot: encoding prompts", unit="prompt", disable=not progress) as bar:
        parts = []
        for start in range(0, len(prompts_flat), TEXT_BATCH):
            parts.append(encoder.encode_text(prompts_flat[start : start + TEXT_BATCH]))
            bar.update(len(parts[-1]))
    flat = np.concatenate(parts) if parts else np.zeros((0, encoder.dim), dtype=np.float32)
    out = np.zeros((len(classes), encoder.dim), dtype=np.float32)
    start = 0
    for i, prompts in enumerate(classes):
        if not prompts:
            raise ValueError(f"zero-shot class #{i} has no prompts")
        out[i] = l2_normalize(flat[start : start + len(prompts)].mean(axis=0))
        start += len(prompts)
    return out


def cached_class_embeddings(
    encoder: Encoder, classes: Sequence[Sequence[str]], cache_dir: str | Path | None, *, progress: bool = False
) -> np.ndarray:
    """:func:`class_embeddings`, kept in ``cache_dir`` per (encoder, precision, prompts); ``None``: no cache.

    Encoding the ~400 prompts of a shipped prompt file costs ~20 s on a CPU with BioCLIP's ViT-B-16.
    """
    if cache_dir is None:
        return class_embeddings(encoder, classes, progress=progress)
    payload = json.dumps([encoder.fingerprint, encoder.text_dtype, [list(c) for c in classes]], ensure_ascii=True)
    path = Path(cache_dir) / f"{hashlib.sha256(payload.encode()).hexdigest()[:24]}.npy"
    if path.is_file():
        emb = np.load(path)
        if emb.shape == (len(classes), encoder.dim):
            logger.info("zero-shot: %d class embeddings from cache %s", len(classes), path)
            return emb
    emb = class_embeddings(encoder, classes, progress=progress)
    atomic_write(path, lambda tmp: np.save(tmp, emb))
    logger.info("zero-shot: %d class embeddings computed and cached at %s", len(classes), path)
    return emb


def zero_shot_probabilities(image_emb: np.ndarray, class_emb: np.ndarray, logit_scale: float) -> np.ndarray:
    """(N, n_classes) softmax over classes of ``logit_scale * cos(image, class)``."""
    logits = float(logit_scale) * (np.atleast_2d(np.asarray(image_emb, np.float32)) @ np.asarray(class_emb, np.float32).T)
    return softmax(logits, axis=1)


def logit_scale(encoder: Encoder) -> float:
    """The encoder's CLIP temperature (100 when it has none)."""
    return float(getattr(encoder, "logit_scale", 100.0))
