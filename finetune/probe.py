"""Linear probe: class-balanced multinomial logistic regression on gallery embeddings.

Stored beside the gallery as ``probe.npz`` (weights) + ``probe.json`` (species, encoder fingerprint,
the settings chosen on validation data). The probe is the closed-world half of the blend: it only
knows the species it was trained on, and ``retrieval.blend`` keeps it from touching any other.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

PROBE_WEIGHTS = "probe.npz"
PROBE_META = "probe.json"
PROBE_FORMAT = 1


@dataclass
class ProbeSettings:
    """Settings chosen on validation data and recorded with the probe."""

    C: float = 10.0  # inverse L2 regularisation strength of the logistic regression
    blend_weight: float = 0.5  # share of the probe in the blend (0 = kNN only, 1 = probe only)
    k: int = 30  # neighbours that vote in the blend's kNN part
    temperature: float = 0.03  # kNN vote temperature
    unknown_threshold: float = 0.5  # best blended score under this -> unknown
    selected_on: str = "default"  # "cv:N-fold", "val:PATH" or "default": where these values come from
    metrics: dict[str, float] = field(default_factory=dict)  # validation figures of kNN / probe / blend


@dataclass
class LinearProbe:
    """A trained probe: logits = embeddings @ weight.T + bias over ``species``."""

    species: list[str]  # the classes, in column order
    weight: np.ndarray  # (n_species, dim) float32
    bias: np.ndarray  # (n_species,) float32
    fingerprint: str  # encoder fingerprint of the embeddings it was trained on
    settings: ProbeSettings = field(default_factory=ProbeSettings)
    trained_on: int = 0  # number of reference embeddings used
    source: str | None = None  # where the weights come from: None = logistic regression, 'finetune:DIR' = a fine-tuned head

    @property
    def dim(self) -> int:
        """Embedding width."""
        return int(self.weight.shape[1])

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, dim) -> (N, n_species) raw scores."""
        emb = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
        if emb.shape[1] != self.dim:
            raise ValueError(f"probe expects {self.dim}-d embeddings, got {emb.shape[1]}-d")
        return emb @ self.weight.T + self.bias

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, dim) -> (N, n_species) probabilities (softmax)."""
        z = self.logits(embeddings)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def scores(self, embeddings: np.ndarray) -> list[dict[str, float]]:
        """Per embedding: species -> probability."""
        return [dict(zip(self.species, row.tolist(), strict=True)) for row in self.predict_proba(embeddings)]

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | Path) -> None:
        """Write probe.npz + probe.json atomically into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".probe.", suffix=".npz")
        os.close(fd)
        try:
            np.savez(tmp, weight=self.weight.astype(np.float32), bias=self.bias.astype(np.float32))
            os.replace(tmp, folder / PROBE_WEIGHTS)
        finally:
            Path(tmp).unlink(missing_ok=True)
        meta = {
            "format": PROBE_FORMAT,
            "species": self.species,
            "fingerprint": self.fingerprint,
            "dim": self.dim,
            "trained_on": self.trained_on,
            "source": self.source,
            "settings": asdict(self.settings),
        }
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".probe.", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=2)
        os.replace(tmp, folder / PROBE_META)

    @classmethod
    def load(cls, folder: str | Path, *, expected_fingerprint: str | None = None) -> LinearProbe:
        """Load a probe; refuse one trained on another encoder's embeddings."""
        folder = Path(folder)
        meta_path = folder / PROBE_META
        if not meta_path.is_file():
            raise FileNotFoundError(f"no probe in {folder}; train one with 'speciesid probe train --index {folder}'")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if expected_fingerprint is not None and meta["fingerprint"] != expected_fingerprint:
            raise ValueError(
                f"the probe in {folder} was trained on embeddings of encoder {meta['fingerprint']}, "
                f"not {expected_fingerprint}; retrain it with 'speciesid probe train --index {folder}'"
            )
        arrays = np.load(folder / PROBE_WEIGHTS)
        return cls(
            species=list(meta["species"]),
            weight=arrays["weight"],
            bias=arrays["bias"],
            fingerprint=meta["fingerprint"],
            settings=ProbeSettings(**meta.get("settings", {})),
            trained_on=int(meta.get("trained_on", 0)),
            source=meta.get("source"),
        )


def has_probe(folder: str | Path) -> bool:
    """True when ``folder`` holds a saved probe."""
    return (Path(folder) / PROBE_META).is_file()


def train_probe(
    embeddings: np.ndarray,
    labels: Sequence[str],
    *,
    fingerprint: str,
    C: float = 10.0,
    max_iter: int = 3000,
) -> LinearProbe:
    """Fit a class-balanced multinomial logistic regression (scikit-learn, lbfgs)."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(embeddings, dtype=np.float32)
    species = sorted(set(labels))
    if len(species) < 2:
        raise ValueError(f"a probe needs at least 2 species with reference photos, got {len(species)}")
    if len(x) != len(labels):
        raise ValueError(f"{len(x)} embeddings but {len(labels)} labels")
    index = {s: i for i, s in enumerate(species)}
    y = np.array([index[s] for s in labels])
    clf = LogisticRegression(C=C, class_weight="balanced", max_iter=max_iter)
    clf.fit(x, y)
    weight, bias = clf.coef_, clf.intercept_
    if weight.shape[0] == 1:  # binary: sklearn keeps one row; softmax over [-z/2, z/2] is the same sigmoid
        weight = np.vstack([-weight / 2, weight / 2])
        bias = np.array([-bias[0] / 2, bias[0] / 2])
    return LinearProbe(
        species=species,
        weight=weight.astype(np.float32),
        bias=bias.astype(np.float32),
        fingerprint=fingerprint,
        settings=ProbeSettings(C=C),
        trained_on=len(x),
    )
