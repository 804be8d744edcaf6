"""Zero-shot text prior: score species from their names alone with a CLIP-style text encoder.

Each species gets a prompt ensemble (templates x names: scientific, common, and the taxonomic string
BioCLIP was trained on), scored with :mod:`retrieval.zeroshot` (class embeddings cached on disk per
encoder and species list). The gallery records which species its prior covers in ``text_prior.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from index.atomic import write_json_atomic
from index.formats import from_dict
from index.layout import GalleryLayout, check_encoder
from index.store import SpeciesSummary
from retrieval.encoders import Encoder
from retrieval.probe import probe_text_prior_sha256
from retrieval.prompts import TEMPLATES
from retrieval.zeroshot import cached_class_embeddings, logit_scale, zero_shot_probabilities

logger = logging.getLogger(__name__)


@dataclass
class TextPriorScores:
    """Zero-shot species scores from text alone, ready to blend."""

    species: list[str]  # the candidate species, in column order
    embeddings: np.ndarray  # (n_species, dim) prompt-ensemble text embeddings, L2-normalised
    logit_scale: float = 100.0  # CLIP's temperature: softmax(scale * cosine)
    strength: float = 1.0  # photos' worth of evidence the prior counts as (see blend.text_weight)
    taxa: dict[str, SpeciesSummary] = field(default_factory=dict)  # metadata of photo-less species

    def scores(self, embeddings: np.ndarray) -> list[dict[str, float]]:
        """Per image embedding: species -> probability."""
        p = zero_shot_probabilities(embeddings, self.embeddings, self.logit_scale)
        return [dict(zip(self.species, row.tolist(), strict=True)) for row in p]


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


def build_text_prior(
    encoder: Encoder,
    taxa: Sequence[SpeciesSummary],
    cache_dir: str | Path | None,
    *,
    strength: float = 1.0,
    templates: Sequence[str] = TEMPLATES,
) -> TextPriorScores:
    """Text prior over ``taxa``, computed once per (encoder, species list, templates) and cached on disk."""
    taxa = sorted(taxa, key=lambda t: t.species)
    emb = cached_class_embeddings(encoder, [prompts_for(t, templates) for t in taxa], cache_dir)
    return TextPriorScores(
        species=[t.species for t in taxa],
        embeddings=emb,
        logit_scale=logit_scale(encoder),
        strength=strength,
        taxa={t.species: t for t in taxa},
    )


def save_text_prior(
    folder: str | Path, encoder: Encoder, taxa: Sequence[SpeciesSummary], strength: float = 1.0
) -> TextPriorScores:
    """Set up the gallery's text prior over ``taxa``: embed (or reuse) their prompts, record the species list."""
    layout = GalleryLayout(Path(folder))
    prior = build_text_prior(encoder, taxa, layout.text_prior_cache, strength=strength)
    data = {
        "fingerprint": encoder.fingerprint,
        "strength": strength,
        "species": [
            {"species": t.species, "genus": t.genus, "family": t.family, "common_name": t.common_name,
             "venomous": t.venomous}
            for t in sorted(taxa, key=lambda t: t.species)
        ],
    }
    write_json_atomic(layout.text_prior, data, sort_keys=False)
    return prior


def remove_text_prior(folder: str | Path) -> bool:
    """Remove the gallery's text prior (``text_prior.json``; its class embeddings' cache stays): a probe trained
    without one replaces the probe it belonged to. Whether there was one."""
    path = GalleryLayout(Path(folder)).text_prior
    if not path.is_file():
        return False
    path.unlink()
    logger.info("removed the text prior of %s (%s): the new probe has none", folder, path.name)
    return True


def prior_sha256(prior: bytes) -> str:
    """The sha256 (hex) of a ``text_prior.json``'s bytes ``prior``: what a probe records of its prior
    (:func:`text_prior_digest`), what :func:`load_text_prior` checks, and the store's name of it
    (:func:`retrieval.probe_share.text_prior_name`)."""
    return hashlib.sha256(prior).hexdigest()


def text_prior_digest(folder: str | Path) -> str:
    """The sha256 of the gallery's ``text_prior.json`` ("" without one): what ``probe train`` records in the
    probe's ``probe.json`` (:attr:`retrieval.probe.LinearProbe.text_prior_sha256`) after writing the prior."""
    path = GalleryLayout(Path(folder)).text_prior
    return prior_sha256(path.read_bytes()) if path.is_file() else ""


def load_text_prior(folder: str | Path, encoder: Encoder, *, expected_sha256: str | None = None
                    ) -> TextPriorScores | None:
    """The gallery's text prior, if one was set up and the encoder can read text; else None.

    A prior made with another encoder is refused (EncoderMismatchError), like everything derived from it.
    ``expected_sha256``: the digest of the prior the gallery's probe was trained with (its ``probe.json``; ""
    for none, None when it records none: any prior is taken); a ``text_prior.json`` of another digest (a
    ``probe train`` cut off between its two writes, a ``probe restore`` of a probe trained with another prior) is
    not this probe's: warned about, and None.
    """
    layout = GalleryLayout(Path(folder))
    if not layout.text_prior.is_file() or not encoder.supports_text:
        return None
    raw = layout.text_prior.read_bytes()
    digest = prior_sha256(raw)
    if expected_sha256 is not None and digest != expected_sha256:
        logger.warning("the text prior of %s (%s, sha256 %s) is not the one its probe was trained with (%s): "
                       "answering without it; run 'speciesid probe train --index %s' to set up the prior and the "
                       "probe together", folder, layout.text_prior.name, digest[:12],
                       f"sha256 {expected_sha256[:12]}" if expected_sha256 else "none", folder)
        return None
    return _prior_of(json.loads(raw), encoder, layout.text_prior_cache, f"the text prior of {folder}", folder)


def warm_text_prior(folder: str | Path, encoder: Encoder, prior: bytes) -> None:
    """Compute (and cache) the class embeddings of the text prior ``prior`` (a ``text_prior.json``'s bytes) in the
    gallery's cache, so that :func:`load_text_prior` finds them there: a follower of the store's shared probe calls
    it on its own thread before writing the prior into the folder (no answer waits on the prompts). Nothing for an
    encoder that cannot read text; EncoderMismatchError for another encoder's prior."""
    if encoder.supports_text:
        _prior_of(json.loads(prior), encoder, GalleryLayout(Path(folder)).text_prior_cache, "the text prior taken",
                  folder)


def _prior_of(data: dict, encoder: Encoder, cache_dir: Path, what: str, folder: str | Path) -> TextPriorScores:
    """The :class:`TextPriorScores` of a ``text_prior.json``'s content, its embeddings cached in ``cache_dir``."""
    check_encoder(what, data.get("fingerprint", "?#?"), encoder.fingerprint,
                  fix=f"set it up again with 'speciesid probe train --index {folder}'")
    return build_text_prior(encoder, _taxa(data), cache_dir, strength=float(data.get("strength", 1.0)))


def _taxa(data: dict) -> list[SpeciesSummary]:
    """The species of a read ``text_prior.json``, with the flags it records (one reading: answers' and the CLI's)."""
    return [from_dict(SpeciesSummary, {**t, "count": 0}, "text_prior.json's species") for t in data["species"]]


def text_prior_taxa(root: str | Path) -> list[SpeciesSummary]:
    """The species of a gallery's text prior with the genus, family and venomous flag its ``text_prior.json``
    records, as answers take them: [] without one, unreadable, or when its sha256 is not the one the gallery's probe
    records (:func:`load_text_prior` answers without it). What venom advice's refusal and hint count, and the
    checklist species ``index info`` says the prior can name; the file is read once, its digest and species alike."""
    expected = probe_text_prior_sha256(root)
    try:
        raw = GalleryLayout(Path(root)).text_prior.read_bytes()
        if expected is not None and prior_sha256(raw) != expected:
            return []
        return _taxa(json.loads(raw.decode("utf-8")))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return []
