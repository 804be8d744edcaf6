"""Linear probe: class-balanced multinomial logistic regression on gallery embeddings, and its calibration.

Stored beside the gallery as ``probe.npz`` (weights) + ``probe.json`` (species, encoder fingerprint,
the :class:`Calibration` chosen by measurement; file names in :mod:`index.layout`). The probe is the
closed-world half of the blend: it only knows the species it was trained on, and ``retrieval.blend``
keeps it from touching any other. A fine-tuned network's head is a probe too (``finetune.export``).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy.special import logsumexp, softmax

from index.atomic import atomic_write, write_json_atomic
from index.layout import PROBE_META, PROBE_WEIGHTS, check_encoder
from index.photos import first_few
from retrieval.metric import DEFAULT_SHRINK, Whitening

logger = logging.getLogger(__name__)

PROBE_FORMAT = 1


@dataclass
class Calibration:
    """The gallery's calibration: how kNN and probe are blended and when to answer "unknown".

    Chosen by measurement (cross-validation over the gallery, or validation photos; see
    ``retrieval.calibrate``) and recorded with the probe.
    """

    C: float = 10.0  # inverse L2 regularisation strength of the logistic regression
    blend_weight: float = 0.5  # share of the probe in the blend (0 = kNN only, 1 = probe only)
    k: int = 30  # neighbours that vote in the blend's kNN part
    temperature: float = 0.03  # kNN vote temperature
    unknown_threshold: float = 0.5  # best blended score under this -> unknown
    selected_on: str = "default"  # "cv:N-fold", "val:PATH" or "default": where these values come from
    metrics: dict[str, float] = field(default_factory=dict)  # validation figures of kNN / probe / blend
    rule: str = ""  # how the settings were chosen: "seq-nll", "argmax" ("" = not recorded: older files, defaults)
    metric: str = "cosine"  # the kNN vote's metric: "cosine" or "whitened" (retrieval.metric; fitted with the probe)
    weight_fixed: str = ""  # why the blend weight was fixed rather than chosen, in words ("" = chosen by the rule)
    selection_sha256: list[str] = field(default_factory=list)  # the validation photos that chose ([]: none, or older)
    # gallery species with too few distinct photos to cross-validate -> their photo counts: left out of the choice
    # (and of a probe trained here); the kNN vote alone answers them
    left_out: dict[str, int] = field(default_factory=dict)


@dataclass
class LinearProbe:
    """A trained probe: logits = embeddings @ weight.T + bias over ``species``."""

    species: list[str]  # the classes, in column order
    weight: np.ndarray  # (n_species, dim) float32
    bias: np.ndarray  # (n_species,) float32
    fingerprint: str  # encoder fingerprint of the embeddings it was trained on
    calibration: Calibration = field(default_factory=Calibration)  # blend settings chosen for this gallery
    trained_on: int = 0  # number of reference embeddings used
    source: str | None = None  # where the weights come from: None = logistic regression, 'finetune:DIR' = a fine-tuned head
    whitening: Whitening | None = None  # the kNN vote's whitened metric when calibration.metric == "whitened"

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
        return softmax(self.logits(embeddings), axis=1)

    def scores(self, embeddings: np.ndarray) -> list[dict[str, float]]:
        """Per embedding: species -> probability."""
        return [dict(zip(self.species, row.tolist(), strict=True)) for row in self.predict_proba(embeddings)]

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | Path) -> None:
        """Write probe.npz + probe.json atomically into ``folder`` (a gallery or a fine-tuned model folder)."""
        folder = Path(folder)
        buf = io.BytesIO()
        arrays = {"weight": self.weight.astype(np.float32), "bias": self.bias.astype(np.float32)}
        if self.whitening is not None:
            arrays.update(whiten_mean=self.whitening.mean, whiten_matrix=self.whitening.matrix)
        np.savez(buf, **arrays)
        atomic_write(folder / PROBE_WEIGHTS, buf.getvalue())
        meta = {
            "format": PROBE_FORMAT,
            "species": self.species,
            "fingerprint": self.fingerprint,
            "dim": self.dim,
            "trained_on": self.trained_on,
            "source": self.source,
            "settings": asdict(self.calibration),
            "whitening": None if self.whitening is None else {
                "shrink": self.whitening.shrink, "photos": self.whitening.photos,
                "species": list(self.whitening.species)},
        }
        write_json_atomic(folder / PROBE_META, meta, sort_keys=False)

    @classmethod
    def load(cls, folder: str | Path, *, expected_fingerprint: str | None = None) -> LinearProbe:
        """Load a probe; refuse one trained on another encoder's embeddings (EncoderMismatchError)."""
        folder = Path(folder)
        meta_path = folder / PROBE_META
        if not meta_path.is_file():
            raise FileNotFoundError(f"no probe in {folder}; train one with 'speciesid probe train --index {folder}'")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if expected_fingerprint is not None:
            check_encoder(f"the probe in {folder}", meta["fingerprint"], expected_fingerprint,
                          fix=f"retrain it with 'speciesid probe train --index {folder}'")
        arrays = np.load(folder / PROBE_WEIGHTS)
        if arrays["weight"].shape[0] != len(meta["species"]):  # the two files of two saves (one being replaced)
            raise ValueError(f"the probe in {folder}: its weights have {arrays['weight'].shape[0]} rows for "
                             f"{len(meta['species'])} species (being replaced?); train it again: speciesid probe "
                             f"train --index {folder}")
        whitening = None
        if "whiten_matrix" in arrays.files:
            fitted = meta.get("whitening") or {}
            whitening = Whitening(mean=arrays["whiten_mean"], matrix=arrays["whiten_matrix"],
                                  shrink=float(fitted.get("shrink", DEFAULT_SHRINK)), photos=int(fitted.get("photos", 0)),
                                  species=tuple(fitted.get("species", ())))
        return cls(
            species=list(meta["species"]),
            weight=arrays["weight"],
            bias=arrays["bias"],
            fingerprint=meta["fingerprint"],
            calibration=Calibration(**meta.get("settings", {})),
            trained_on=int(meta.get("trained_on", 0)),
            source=meta.get("source"),
            whitening=whitening,
        )

    def added_since(self, gallery: Mapping[str, int]) -> list[str]:
        """The gallery's species (species -> searchable references) this probe neither knows nor left out when it
        was made: added since, so it cannot name them."""
        known = set(self.species) | set(self.calibration.left_out)
        return sorted(s for s, n in gallery.items() if n > 0 and s not in known)

    def out_of_date(self, gallery: Mapping[str, int]) -> str:
        """In words, how the gallery (species -> searchable references now) moved on since this probe was made,
        "" when it did not: species added since (the probe cannot name them), species gone (left out of its
        answers) and, for a probe trained here, references that left or came."""
        left_out = self.calibration.left_out
        added = self.added_since(gallery)
        parts = []
        if added:
            parts.append(f"{len(added)} species added since the probe was {'made' if self.source else 'trained'} "
                         f"({first_few(added)}): it cannot name them (the blend answers them by the kNN vote alone)")
        if not self.source:  # a fine-tuned head's species and photos are not the gallery's own
            gone = sorted(s for s in self.species if gallery.get(s, 0) <= 0)
            if gone:
                parts.append(f"{len(gone)} species it was trained on are no longer in the gallery ({first_few(gone)}): "
                             "they are left out of its answers")
            then, now = self.trained_on + sum(left_out.values()), sum(gallery.values())
            held = (f"the probe trained on {then} references" if not left_out else
                    f"the gallery held {then} references when the probe was trained")
            if self.trained_on and now < then:
                parts.append(f"{held} and the gallery now holds {now}: photos that left it may have trained it")
            elif self.trained_on and now > then and not added:
                parts.append(f"{held} and the gallery now holds {now}: {now - then} references were added since")
        return "; ".join(parts) + (" (retrain: speciesid probe train)" if parts else "")

    def scaled(self, temperature: float) -> LinearProbe:
        """A copy whose logits are divided by ``temperature`` (same ranking, other confidence)."""
        return replace(self, weight=(self.weight / temperature).astype(np.float32),
                       bias=(self.bias / temperature).astype(np.float32))


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
        calibration=Calibration(C=C),
        trained_on=len(x),
    )


def fit_temperature(
    logits: np.ndarray, y: np.ndarray, grid: Sequence[float] | None = None
) -> tuple[float, float]:
    """(temperature, mean log-loss at it): the softmax temperature of fixed ``logits`` (N, n) that minimises the
    log-loss of the true classes ``y`` (N,), from ``grid`` (default 0.1-10, geometric). No ranking changes."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y)
    grid = np.geomspace(0.1, 10.0, 81) if grid is None else np.asarray(grid, dtype=np.float64)

    def nll(t: float) -> float:
        zt = z / t
        return float(np.mean(logsumexp(zt, axis=1) - zt[np.arange(len(y)), y]))

    best = float(min(grid, key=nll))
    return best, nll(best)


def fit_head_temperature(
    probe: LinearProbe, embeddings: np.ndarray, labels: Sequence[str], grid: Sequence[float] | None = None
) -> float:
    """The softmax temperature of a fixed head that minimises log-loss on held-out photos.

    A fine-tuned head trained with label smoothing and mixup is under-confident (on ph-snakes val: ECE 0.20,
    0.05 after scaling); dividing its logits by the temperature changes no ranking, only the probabilities.
    Fit it on photos the head did not train on (the gallery's would make it over-confident).
    """
    cols = {s: i for i, s in enumerate(probe.species)}
    keep = [i for i, s in enumerate(labels) if s in cols]
    if not keep:
        raise ValueError("none of the held-out photos is of a species the head knows: cannot fit its temperature")
    z = probe.logits(np.asarray(embeddings, dtype=np.float32)[keep])
    return fit_temperature(z, np.array([cols[labels[i]] for i in keep]), grid)[0]
