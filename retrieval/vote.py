"""Nearest-neighbour voting: neighbours -> species probabilities, rolled up to genus and family."""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol, TypeVar

E = TypeVar("E", bound=Enum)  # a string enum parse_choice reads (Rank, the identify Method)


class Rank(str, Enum):
    """Taxonomic rank that scores can be reported at."""

    SPECIES = "species"
    GENUS = "genus"
    FAMILY = "family"


#: Defaults measured by benchmarks/tune_knn.py (leave-one-out on ph-snakes train, MobileNetV1; see docs).
DEFAULT_K = 30
DEFAULT_TEMPERATURE = 0.03
DEFAULT_UNKNOWN_THRESHOLD = 0.56


def is_count(value: object) -> bool:
    """Whether ``value`` is a whole number >= 1 (an integer, not a bool): a k, a top, a count of photos."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= 1


@dataclass
class VoteConfig:
    """How neighbours are turned into species scores."""

    k: int = DEFAULT_K  # neighbours that vote
    temperature: float = DEFAULT_TEMPERATURE  # weight = exp(similarity / T); small T trusts the nearest more
    unknown_threshold: float = DEFAULT_UNKNOWN_THRESHOLD  # best score under this -> answer "unknown"

    def __post_init__(self) -> None:
        if not is_count(self.k):
            raise ValueError(f"k must be a whole number of at least 1, got {self.k!r}")
        check_temperature(self.temperature)
        if not 0.0 <= self.unknown_threshold <= 1.0:
            raise ValueError(f"unknown_threshold must be in [0, 1], got {self.unknown_threshold}")


class Votable(Protocol):
    """Anything with a species label and a similarity (e.g. ``index.gallery.Neighbour``)."""

    species: str
    similarity: float


def check_temperature(temperature: float) -> float:
    """``temperature`` when it is a finite number > 0 (the vote divides by it), else ValueError."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return temperature


def knn_vote(neighbours: Sequence[Votable], temperature: float = DEFAULT_TEMPERATURE) -> dict[str, float]:
    """Weighted vote: each neighbour adds exp(similarity / T); scores are normalised to sum to 1.

    Returns species -> probability, best first. No neighbours (or only ``-inf`` ones: a search's padding, no
    reference) -> empty dict. ValueError for a temperature that is not a finite number > 0, or a NaN similarity.
    """
    if not (type(temperature) is float and 0.0 < temperature < math.inf):  # the usual case, told apart cheaply
        check_temperature(temperature)
    if not neighbours:
        return {}
    sims = [n.similarity for n in neighbours]
    if math.isnan(sum(sims)) and any(math.isnan(x) for x in sims):  # one sum: no per-neighbour check on the way
        raise ValueError("similarities must be numbers, got NaN: the embeddings compared were not finite")
    top = max(sims)
    if top == -math.inf:  # only padding: no reference voted
        return {}
    scores: dict[str, float] = defaultdict(float)
    for n, x in zip(neighbours, sims, strict=True):
        scores[n.species] += math.exp((x - top) / temperature)  # padding (-inf) adds 0
    total = sum(scores.values())
    return dict(sorted(((s, v / total) for s, v in scores.items()), key=lambda kv: -kv[1]))


def rollup(scores: Mapping[str, float], parent: Mapping[str, str | None], rank: Rank) -> dict[str, float]:
    """Sum species scores up to ``rank`` (``parent`` maps species -> genus or family), best first.

    Species whose parent is unknown are summed under ``"unknown <rank>"``.
    """
    if rank is Rank.SPECIES:
        return dict(sorted(scores.items(), key=lambda kv: -kv[1]))
    out: dict[str, float] = defaultdict(float)
    for species, score in scores.items():
        out[parent.get(species) or f"unknown {rank.value}"] += score
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def top_k(scores: Mapping[str, float], k: int) -> list[tuple[str, float]]:
    """The k best (label, score) pairs; ValueError for a k that is not a whole number >= 1 (the answer's ``top``)."""
    if not is_count(k):
        raise ValueError(f"top must be a whole number of at least 1, got {k!r}")
    return sorted(scores.items(), key=lambda kv: -kv[1])[:k]


def parse_choice(kind: type[E], value: str | E, what: str) -> E:
    """``value`` (any case) as a member of the string enum ``kind``; ValueError naming ``what`` and the choices."""
    if isinstance(value, kind):
        return value
    try:
        return kind(str(value).lower())
    except ValueError:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(m.value for m in kind)}") from None


def parse_rank(value: str | Rank) -> Rank:
    """'species' / 'genus' / 'family' -> Rank, with a clear error otherwise."""
    return parse_choice(Rank, value, "rank")


def venomous_probability(scores: Mapping[str, float], venomous: Mapping[str, bool | None]) -> float | None:
    """Total probability on species flagged medically important venomous (None if no flag is known)."""
    flags: Iterable[bool | None] = (venomous.get(s) for s in scores)
    if all(f is None for f in flags):
        return None
    return float(sum(p for s, p in scores.items() if venomous.get(s)))
