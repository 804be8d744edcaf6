"""Photos -> answers: encoder + gallery search + kNN vote."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from index.gallery import Gallery, Neighbour
from retrieval.encoders import Encoder
from retrieval.vote import Rank, VoteConfig, knn_vote, rollup, top_k, venomous_probability


@dataclass
class Prediction:
    """One candidate species with its probability and what is known of it."""

    species: str  # binomial
    score: float  # probability in [0, 1]
    common_name: str | None = None  # English common name
    genus: str | None = None  # genus name
    family: str | None = None  # family name
    venomous: bool | None = None  # medically important venomous, when known


@dataclass
class Identification:
    """The answer for one photo (or one multi-photo observation)."""

    predictions: list[Prediction]  # best first
    neighbours: list[Neighbour]  # nearest reference photos, the evidence
    unknown: bool  # True when the best score is under the unknown threshold (or the gallery is empty)
    scores: dict[str, float] = field(default_factory=dict)  # every species with a non-zero score
    genus_scores: dict[str, float] = field(default_factory=dict)  # species scores summed per genus
    family_scores: dict[str, float] = field(default_factory=dict)  # species scores summed per family
    venomous_score: float | None = None  # probability mass on medically important venomous species

    def at_rank(self, rank: Rank) -> dict[str, float]:
        """Scores at the given rank."""
        return {Rank.SPECIES: self.scores, Rank.GENUS: self.genus_scores, Rank.FAMILY: self.family_scores}[rank]

    def to_dict(self, *, neighbours: int | None = None) -> dict[str, object]:
        """JSON-ready dict (``neighbours`` limits the evidence list)."""
        return {
            "predictions": [asdict(p) for p in self.predictions],
            "neighbours": [n.to_dict() for n in self.neighbours[:neighbours]],
            "unknown": self.unknown,
            "genus_scores": self.genus_scores,
            "family_scores": self.family_scores,
            "venomous_score": self.venomous_score,
        }


class Identifier:
    """Identify photos against a gallery with the encoder that built it."""

    def __init__(self, encoder: Encoder, gallery: Gallery, config: VoteConfig | None = None) -> None:
        if encoder.fingerprint != gallery.fingerprint:
            raise ValueError(
                f"encoder {encoder.spec!r} (fingerprint {encoder.fingerprint}) did not build gallery "
                f"{gallery.root}; it was built with {gallery.encoder_spec!r} ({gallery.fingerprint})"
            )
        self.encoder = encoder
        self.gallery = gallery
        self.config = config or VoteConfig()

    def identify_images(self, images: Sequence[Image.Image], *, top: int = 5) -> list[Identification]:
        """One answer per photo."""
        return self.identify_embeddings(self.encoder.encode_images(images), top=top)

    def identify_embeddings(self, embeddings: np.ndarray, *, top: int = 5) -> list[Identification]:
        """One answer per embedding row."""
        return [self.answer(n, top=top) for n in self.gallery.search(embeddings, self.config.k)]

    def identify_observation(self, embeddings: np.ndarray, *, top: int = 5) -> Identification:
        """Several photos of one animal -> one answer: the neighbours of all photos vote together."""
        per_photo = self.gallery.search(embeddings, self.config.k)
        merged = sorted((n for ns in per_photo for n in ns), key=lambda n: -n.similarity)
        return self.answer(merged, top=top)

    def search(self, embeddings: np.ndarray, k: int) -> list[list[Neighbour]]:
        """Raw neighbours of each embedding."""
        return self.gallery.search(embeddings, k)

    def answer(self, neighbours: list[Neighbour], *, top: int = 5) -> Identification:
        """Vote over neighbours and dress the result with taxonomy."""
        scores = knn_vote(neighbours, self.config.temperature)
        info: dict[str, Neighbour] = {}
        for n in neighbours:
            info.setdefault(n.species, n)
        predictions = [
            Prediction(
                species=s,
                score=float(p),
                common_name=info[s].common_name,
                genus=info[s].genus,
                family=info[s].family,
                venomous=info[s].venomous,
            )
            for s, p in top_k(scores, top)
        ]
        best = predictions[0].score if predictions else 0.0
        return Identification(
            predictions=predictions,
            neighbours=neighbours,
            unknown=best < self.config.unknown_threshold or not predictions,
            scores=scores,
            genus_scores=rollup(scores, {s: n.genus for s, n in info.items()}, Rank.GENUS),
            family_scores=rollup(scores, {s: n.family for s, n in info.items()}, Rank.FAMILY),
            venomous_score=venomous_probability(scores, {s: n.venomous for s, n in info.items()}),
        )
