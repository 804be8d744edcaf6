"""Zero-shot text prior: score species from their names alone with a CLIP-style text encoder.

Each species gets a prompt ensemble (templates x names: scientific, common, and the taxonomic string
BioCLIP was trained on), averaged and re-normalised as in open_clip's zero-shot classifier and
pybioclip. The class embeddings are cached on disk per encoder fingerprint and species list.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from index.store import SpeciesSummary
from retrieval.encoders import Encoder
from retrieval.identify import TextPriorScores
from retrieval.prompts import TEMPLATES

logger = logging.getLogger(__name__)

TEXT_PRIOR_FILE = "text_prior.json"
CACHE_DIR = "text_prior_cache"


def species_names(taxon: SpeciesSummary) -> list[str]:
    """The names a species is prompted with: scientific, taxonomic string, and common name."""
    names = [taxon.species]
    ranks = " ".join(x for x in (taxon.family, taxon.species) if x)
    if ranks != taxon.species:
        names.append(ranks)
    if taxon.common_name:
        names.append(f"{taxon.common_name} ({taxon.species})")
    return names


def prompts_for(taxon: SpeciesSummary, templates: Sequence[str] = TEMPLATES) -> list[str]:
    """Every template filled with every name of the species."""
    return [t.format(name) for name in species_names(taxon) for t in templates]


def class_embeddings(encoder: Encoder, taxa: Sequence[SpeciesSummary], templates: Sequence[str] = TEMPLATES) -> np.ndarray:
    """(n_species, dim): mean of each species' normalised prompt embeddings, re-normalised."""
    out = np.zeros((len(taxa), encoder.dim), dtype=np.float32)
    for i, taxon in enumerate(taxa):
        emb = encoder.encode_text(prompts_for(taxon, templates)).mean(axis=0)
        out[i] = emb / max(float(np.linalg.norm(emb)), 1e-12)
    return out


def _cache_key(fingerprint: str, taxa: Sequence[SpeciesSummary], templates: Sequence[str]) -> str:
    payload = json.dumps(
        [fingerprint, [species_names(t) for t in taxa], list(templates)], sort_keys=True, ensure_ascii=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def build_text_prior(
    encoder: Encoder,
    taxa: Sequence[SpeciesSummary],
    cache_dir: str | Path,
    *,
    strength: float = 1.0,
    templates: Sequence[str] = TEMPLATES,
) -> TextPriorScores:
    """Text prior over ``taxa``, computed once per (encoder, species list, templates) and cached on disk."""
    if not encoder.supports_text:
        raise ValueError(
            f"encoder {encoder.spec!r} is image-only: a text prior needs a CLIP-style encoder (e.g. bioclip)"
        )
    taxa = sorted(taxa, key=lambda t: t.species)
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{_cache_key(encoder.fingerprint, taxa, templates)}.npy"
    if path.is_file():
        emb = np.load(path)
        logger.info("text prior: %d species from cache %s", len(taxa), path)
    else:
        emb = class_embeddings(encoder, taxa, templates)
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npy")
        os.close(fd)
        np.save(tmp, emb)
        os.replace(tmp, path)
        logger.info("text prior: %d species embedded and cached at %s", len(taxa), path)
    scale = float(getattr(encoder, "logit_scale", 100.0))
    return TextPriorScores(
        species=[t.species for t in taxa],
        embeddings=emb,
        logit_scale=scale,
        strength=strength,
        taxa={t.species: t for t in taxa},
    )


def save_text_prior_config(folder: str | Path, taxa: Sequence[SpeciesSummary], strength: float, fingerprint: str) -> None:
    """Record which species the gallery's text prior covers (the embeddings live in the cache)."""
    folder = Path(folder)
    data = {
        "fingerprint": fingerprint,
        "strength": strength,
        "species": [
            {"species": t.species, "genus": t.genus, "family": t.family, "common_name": t.common_name,
             "venomous": t.venomous}
            for t in sorted(taxa, key=lambda t: t.species)
        ],
    }
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, folder / TEXT_PRIOR_FILE)


def load_text_prior(folder: str | Path, encoder: Encoder) -> TextPriorScores | None:
    """The gallery's text prior, if one was configured and the encoder can read text; else None."""
    path = Path(folder) / TEXT_PRIOR_FILE
    if not path.is_file() or not encoder.supports_text:
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("fingerprint") != encoder.fingerprint:
        logger.warning("text prior in %s was made with another encoder; ignoring it", folder)
        return None
    taxa = [SpeciesSummary(count=0, **t) for t in data["species"]]
    return build_text_prior(encoder, taxa, Path(folder) / CACHE_DIR, strength=float(data.get("strength", 1.0)))
