"""Blending the three sources of species scores: kNN vote, linear probe, zero-shot text prior.

Open-world rule: the probe only *redistributes the kNN mass that falls on species it knows*. A species
added after the probe was trained keeps exactly its kNN score, so new species are never suppressed:

    M        = sum of kNN scores over probe species
    blend(s) = (1 - w) * knn(s) + w * M * probe(s)     for s the probe knows
    blend(s) = knn(s)                                  otherwise

The text prior is mixed in last with weight ``lam`` (see :func:`text_weight`), which shrinks as photo
evidence grows; species with no photos at all can only get their score from it.
"""

from __future__ import annotations

from collections.abc import Mapping


def blend_knn_probe(knn: Mapping[str, float], probe: Mapping[str, float], weight: float) -> dict[str, float]:
    """Open-world blend of kNN and probe scores (both probability dicts), best first."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"blend weight must be in [0, 1], got {weight}")
    if not probe:
        return dict(sorted(knn.items(), key=lambda kv: -kv[1]))
    mass = sum(p for s, p in knn.items() if s in probe)
    out = {s: p for s, p in knn.items() if s not in probe}
    for s, p in probe.items():
        value = (1.0 - weight) * knn.get(s, 0.0) + weight * mass * p
        if value > 0.0:
            out[s] = value
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def text_weight(references_per_species: float, strength: float) -> float:
    """Weight of the text prior: ``strength / (strength + median photos per species)``.

    An empty gallery gives 1 (pure zero-shot); 70 photos per species with strength 1 gives ~0.014.
    """
    if strength <= 0:
        return 0.0
    return float(strength / (strength + max(references_per_species, 0.0)))


def mix_text_prior(photo: Mapping[str, float], text: Mapping[str, float], lam: float) -> dict[str, float]:
    """(1 - lam) * photo + lam * text over the union of species, best first."""
    if not text or lam <= 0:
        return dict(sorted(photo.items(), key=lambda kv: -kv[1]))
    out: dict[str, float] = {s: (1.0 - lam) * p for s, p in photo.items()}
    for s, p in text.items():
        out[s] = out.get(s, 0.0) + lam * p
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


#: What a species not recorded in the photo's country keeps of its score: a prior, not a verdict (range tables have
#: gaps, and a snake can be far from home); a setting chosen, not measured (no photos with countries here).
ABSENT_WEIGHT = 0.1


def apply_country(
    scores: Mapping[str, float], present: Mapping[str, bool | None], absent_weight: float = ABSENT_WEIGHT
) -> dict[str, float]:
    """Reweight by presence in a country: absent species x ``absent_weight``; unknown presence kept.

    Renormalised to the original total mass. If every species with a score is absent, the scores are
    returned unchanged (better an answer outside the range than none).
    """
    total = sum(scores.values())
    out = {s: p * (absent_weight if present.get(s) is False else 1.0) for s, p in scores.items()}
    kept = sum(out.values())
    if kept <= 0.0 or total <= 0.0:
        return dict(sorted(scores.items(), key=lambda kv: -kv[1]))
    return dict(sorted(((s, p * total / kept) for s, p in out.items() if p > 0), key=lambda kv: -kv[1]))
