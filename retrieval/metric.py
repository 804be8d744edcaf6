"""The kNN vote's metric: cosine, or cosine after within-class whitening of the gallery's embeddings.

Within-class whitening (WCCN, the metric of LDA) learns from the gallery's labelled photos which directions of
the embedding vary *inside* a species (pose, light, background, camera) and scales them down, so that the nearest
references are the ones that share the species' traits rather than the photo's conditions:

    W     = the photos' deviations from their species' mean embedding
    Sigma = (1 - shrink) * cov(W) + shrink * tr(cov(W)) / d * I       (shrunk toward a sphere: n < d is common)
    z(x)  = L2((x - mean) @ Sigma^(-1/2))                              (the vote's similarity: z(q) . z(r))

Whether the vote uses it is chosen with the probe's settings (``retrieval.calibrate``, by out-of-fold scores); the
transform itself needs only the species of the gallery's photos, so it follows the gallery: it is fitted when the
probe is (``speciesid probe train`` / ``probe import``, kept in the probe's files) and fitted again, from the
sums of :class:`WhiteningStats` (saved with the gallery and brought up to date by the rows that came and went,
``retrieval.whitening_sync``), when the gallery gains or loses a species or grows or shrinks by more than
:data:`REFIT_CHANGE`. (A whitening fitted before three ph-snakes species were added let
those species take 19% of the other species' queries instead of 5% with cosine; refitted, 6%.) The gallery's
stored vectors stay plain L2 embeddings: the vote re-ranks the nearest references by cosine
(:data:`RERANK_CANDIDATES` of them) in the whitened space, so any index kind serves it.
On ph-snakes (MobileNetV1, outer CV inside train) it moved the kNN vote from 0.698 to 0.770 (docs/accuracy.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

METRICS = ("cosine", "whitened")
#: Shrinkage toward a sphere, measured by outer CV inside ph-snakes train (kNN 0.748 / 0.770 / 0.768 / 0.765 at
#: 0.1 / 0.3 / 0.45 / 0.6; Ledoit-Wolf's own choice, ~0.11, fits the covariance, not the vote).
DEFAULT_SHRINK = 0.3
#: References re-ranked per query in the whitened space (the cosine neighbours they are drawn from).
RERANK_CANDIDATES = 200
#: The whitening is fitted again when the gallery's photo count moved by more than this share since its fit.
REFIT_CHANGE = 0.1


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """``x`` scaled to unit L2 norm along its last axis (a zero vector stays zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def unit_queries(embeddings: np.ndarray | Sequence[float] | Sequence[Sequence[float]], dim: int) -> np.ndarray:
    """Query embeddings made anywhere (an encoder, another tool, a mean of embeddings) as the gallery compares them:
    ``(n, dim)`` float32, each row scaled to unit length, so a vector and 100 times it get the same answer. One row
    may be given as a 1-D vector. ValueError for another width, or a row that is all zeros or not finite (NaN,
    inf), naming that row: it has no direction to compare."""
    v = query_rows(embeddings, dim)
    refuse_rows(~np.isfinite(v).all(axis=1) | ~v.any(axis=1), v, one=np.ndim(embeddings) == 1)
    return unit_rows(v)


def query_rows(embeddings: np.ndarray | Sequence[float] | Sequence[Sequence[float]], dim: int) -> np.ndarray:
    """``embeddings`` as ``(n, dim)`` float64 rows, not scaled (one row may be given as a 1-D vector); ValueError
    for another width. :func:`unit_queries` checks and scales the rows."""
    v = np.asarray(embeddings, dtype=np.float64)
    if v.ndim == 1:
        v = v[None]
    if v.ndim != 2 or v.shape[1] != dim:
        raise ValueError(f"embeddings must be {dim} numbers per row (shape (n, {dim}) or ({dim},)), the gallery "
                         f"encoder's width; got shape {list(np.shape(embeddings))}")
    return v


def refuse_rows(bad: np.ndarray, v: np.ndarray, *, one: bool = False) -> None:
    """ValueError naming the first row of ``v`` marked in ``bad`` (all zeros, or not finite), when there is one."""
    if bad.any():
        rows = np.flatnonzero(bad)
        what = "all zeros" if np.isfinite(v[rows[0]]).all() else "not finite (NaN or inf)"
        more = f" (and {len(rows) - 1} more rows)" if len(rows) > 1 else ""
        which = "the embedding" if one else f"embedding row {int(rows[0])}"
        raise ValueError(f"{which} is {what}{more}: an embedding must be finite and not all "
                         "zeros; drop that row, or embed its photo again")


def unit_rows(v: np.ndarray) -> np.ndarray:
    """The rows of ``v`` (2-D, each finite and not all zeros: :func:`refuse_rows`) scaled to unit length, float32."""
    v = np.asarray(v, dtype=np.float64)
    if not len(v):
        return v.astype(np.float32)
    v = v / np.abs(v).max(axis=1, keepdims=True)  # scale first: tiny or huge values must not under/overflow the norm
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


@dataclass
class Whitening:
    """z(x) = L2((x - mean) @ matrix): the whitened embedding the vote compares."""

    mean: np.ndarray  # (d,) float32: the gallery's mean embedding
    matrix: np.ndarray  # (d, d) float32: Sigma^(-1/2) of the shrunk within-class covariance
    shrink: float = DEFAULT_SHRINK  # the shrinkage it was fitted with
    species: tuple[str, ...] = ()  # the species of the photos it was fitted on
    photos: int = 0  # how many photos it was fitted on

    def fits(self, counts: Mapping[str, int]) -> bool:
        """Whether it still describes a gallery holding ``counts`` (species -> photos): same species, and a photo
        count within :data:`REFIT_CHANGE` of the one it was fitted on."""
        total = sum(counts.values())
        return set(counts) == set(self.species) and abs(total - self.photos) <= REFIT_CHANGE * max(self.photos, 1)

    @property
    def dim(self) -> int:
        """Embedding width."""
        return int(self.mean.shape[0])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(N, d) or (d,) embeddings -> whitened, L2-normalised, float32, same shape."""
        x = np.asarray(x, dtype=np.float32)
        if x.shape[-1] != self.dim:
            raise ValueError(f"the whitening expects {self.dim}-d embeddings, got {x.shape[-1]}-d")
        return l2_normalize((x - self.mean) @ self.matrix).astype(np.float32)


@dataclass
class WhiteningStats:
    """Sums over labelled embeddings that fix the whitening, added batch by batch (a gallery never sits in
    memory): the within-class scatter is sum(x x^T) - sum over species of n_s mean_s mean_s^T."""

    dim: int  # embedding width
    count: int = 0  # photos added
    total: np.ndarray | None = None  # (d,) sum of the embeddings
    scatter: np.ndarray | None = None  # (d, d) sum of x x^T
    species_sum: dict[str, np.ndarray] = field(default_factory=dict)  # species -> (d,) sum of its embeddings
    species_count: dict[str, int] = field(default_factory=dict)  # species -> photos

    def add(self, embeddings: np.ndarray, labels: Sequence[str]) -> None:
        """Add a batch of embeddings (N, d) and their species."""
        self._accumulate(embeddings, labels, 1)

    def remove(self, embeddings: np.ndarray, labels: Sequence[str]) -> None:
        """Take out a batch added before (references deleted or excluded since); a species left with no photo
        is dropped."""
        self._accumulate(embeddings, labels, -1)

    def _accumulate(self, embeddings: np.ndarray, labels: Sequence[str], sign: int) -> None:
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim != 2 or len(x) != len(labels):
            raise ValueError(f"{len(x)} embeddings but {len(labels)} labels")
        if x.shape[1] != self.dim:
            raise ValueError(f"the whitening expects {self.dim}-d embeddings, got {x.shape[1]}-d")
        if not len(x):
            return
        if self.total is None:
            self.total, self.scatter = np.zeros(self.dim), np.zeros((self.dim, self.dim))
        names, y = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
        if sign < 0:
            short = [s for i, s in enumerate(names.tolist()) if self.species_count.get(s, 0) < int((y == i).sum())]
            if short:
                raise ValueError(f"cannot remove photos never added: species {short[:3]}")
        self.count += sign * len(x)
        self.total += sign * x.sum(0)
        self.scatter += sign * (x.T @ x)
        for i, s in enumerate(names.tolist()):
            part = x[y == i]
            self.species_sum[s] = self.species_sum.get(s, 0.0) + sign * part.sum(0)
            self.species_count[s] = self.species_count.get(s, 0) + sign * len(part)
            if not self.species_count[s]:
                del self.species_sum[s], self.species_count[s]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The sums as arrays (``np.savez``); :meth:`from_arrays` reads them back."""
        names = sorted(self.species_count)
        return {"count": np.asarray(self.count, dtype=np.int64),
                "total": np.zeros(self.dim) if self.total is None else self.total,
                "scatter": np.zeros((self.dim, self.dim)) if self.scatter is None else self.scatter,
                "species": np.asarray(names, dtype=str),
                "species_sum": np.stack([self.species_sum[s] for s in names]) if names else np.zeros((0, self.dim)),
                "species_count": np.asarray([self.species_count[s] for s in names], dtype=np.int64)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> WhiteningStats:
        """The sums written by :meth:`to_arrays`."""
        total = np.asarray(arrays["total"], dtype=np.float64)
        count = int(arrays["count"])
        names = [str(s) for s in arrays["species"]]
        sums = np.asarray(arrays["species_sum"], dtype=np.float64)
        return cls(dim=int(total.shape[0]), count=count, total=total if count else None,
                   scatter=np.asarray(arrays["scatter"], dtype=np.float64) if count else None,
                   species_sum={s: sums[i] for i, s in enumerate(names)},
                   species_count={s: int(c) for s, c in zip(names, arrays["species_count"], strict=True)})

    def fit(self, shrink: float = DEFAULT_SHRINK) -> Whitening:
        """The whitening of everything added (see the module docstring)."""
        if not 0.0 < shrink <= 1.0:
            raise ValueError(f"shrink must be in (0, 1], got {shrink}")
        if not self.count:
            raise ValueError("the whitening needs reference photos: the gallery is empty")
        names = list(self.species_sum)
        sums = np.stack([self.species_sum[s] for s in names])  # (species, d)
        counts = np.asarray([self.species_count[s] for s in names], dtype=np.float64)
        within = self.scatter - (sums / counts[:, None]).T @ sums  # one product, not an outer product a species
        cov = within / self.count
        scale = float(np.trace(cov)) / self.dim
        if scale <= 1e-12:
            raise ValueError("the whitening needs a species with 2+ different reference photos "
                             "(no within-species spread)")
        cov = (1.0 - shrink) * cov + shrink * scale * np.eye(self.dim)
        vals, vecs = np.linalg.eigh((cov + cov.T) / 2)
        matrix = (vecs / np.sqrt(vals)) @ vecs.T  # symmetric Sigma^(-1/2)
        return Whitening(mean=(self.total / self.count).astype(np.float32), matrix=matrix.astype(np.float32),
                         shrink=float(shrink), species=tuple(sorted(self.species_count)), photos=self.count)


def fit_whitening(embeddings: np.ndarray, labels: Sequence[str] | np.ndarray,
                  shrink: float = DEFAULT_SHRINK) -> Whitening:
    """Fit the within-class whitening on labelled embeddings (see the module docstring)."""
    x = np.atleast_2d(np.asarray(embeddings))
    stats = WhiteningStats(dim=x.shape[-1])
    stats.add(x, [str(v) for v in labels])
    return stats.fit(shrink)

