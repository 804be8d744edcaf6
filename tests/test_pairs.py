"""``index.pairs.similar_pairs`` equals a brute-force full similarity matrix, tile by tile and across tiles.

Random unit vectors (32-d: unrelated rows stay below cosine ~0.8) with near-copies planted at known cosines, some
inside one tile, some across tile boundaries; thresholds just above and below each planted cosine.
"""

from __future__ import annotations

import numpy as np
import pytest

from index.pairs import similar_pairs

DIM = 32
#: Cosines of the planted near-copies (1.0: the same vector twice).
PLANTED = (1.0, 0.995, 0.98, 0.96, 0.93)
#: Just above and just below each planted cosine, and a low one that takes every planted pair.
THRESHOLDS = sorted({1.0, 0.6} | {round(c + d, 4) for c in PLANTED for d in (-2e-3, 2e-3) if c + d <= 1.0})


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _near(rng: np.random.Generator, u: np.ndarray, cos: float) -> np.ndarray:
    """A unit vector at exactly ``cos`` from unit ``u`` (float64)."""
    w = rng.standard_normal(DIM)
    w -= (w @ u) * u
    w /= np.linalg.norm(w)
    return cos * u + np.sqrt(max(0.0, 1.0 - cos * cos)) * w


def _within(rng: np.random.Generator, n: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    x = _unit(rng, n)
    for k, (i, j) in enumerate(pairs):
        x[j] = _near(rng, x[i], PLANTED[k % len(PLANTED)])
    return x.astype(np.float32)


def _reference(a: np.ndarray, b: np.ndarray | None, threshold: float) -> tuple[set[tuple[int, int]], np.ndarray]:
    """Brute force: the whole matrix at once in float64 (same 1e-6 rounding slack as the implementation)."""
    sims = a.astype(np.float64) @ (a if b is None else b).astype(np.float64).T
    hit = sims >= threshold - 1e-6
    if b is None:
        hit &= np.triu(np.ones_like(hit), k=1)
    # the test is only well posed when no similarity sits in the float32-vs-float64 rounding band
    band = (sims > threshold - 1e-4) & (sims < threshold - 1e-5)
    assert not band.any(), "a similarity sits on the threshold: choose other data"
    i, j = np.nonzero(hit)
    return set(zip(i.tolist(), j.tolist(), strict=True)), sims


def _check(got: list[tuple[int, int, float]], want: set[tuple[int, int]], sims: np.ndarray, within: bool) -> None:
    assert {(i, j) for i, j, _ in got} == want
    assert len(got) == len(want)  # no pair twice
    for i, j, s in got:
        assert isinstance(i, int) and isinstance(j, int) and isinstance(s, float)
        assert s <= 1.0 and s == pytest.approx(min(sims[i, j], 1.0), abs=1e-5)
        assert not within or i < j
    keys = [(-s, i, j) for i, j, s in got]
    assert keys == sorted(keys)  # best first, then (i, j)


#: Planted (i, j) of one set of 300 rows: inside a 64-row tile, across a tile edge, far apart, a chain.
WITHIN_PAIRS = [(5, 6), (63, 64), (0, 299), (100, 170), (128, 191), (200, 201), (201, 250), (70, 71), (10, 260),
                (255, 256)]


@pytest.mark.parametrize("block", [1, 7, 64, 2048])
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_within_one_set_equals_brute_force(block, threshold):
    a = _within(np.random.default_rng(0), 300, WITHIN_PAIRS)
    want, sims = _reference(a, None, threshold)
    got = similar_pairs(a, threshold=threshold, block=block)
    _check(got, want, sims, within=True)
    if threshold == 0.6:
        assert len(got) >= len(WITHIN_PAIRS)  # every planted pair (a chain adds its third side)


@pytest.mark.parametrize("block", [1, 7, 64, 2048])
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_against_another_set_equals_brute_force(block, threshold):
    rng = np.random.default_rng(1)
    a = _within(rng, 200, [(3, 150)])  # a's own near pair: never reported across sets by itself
    b = _unit(rng, 150)
    for k, (i, j) in enumerate([(0, 0), (3, 149), (63, 64), (64, 63), (199, 1), (150, 100), (120, 127)]):
        b[j] = _near(rng, a[i].astype(np.float64), PLANTED[k % len(PLANTED)])
    b = b.astype(np.float32)
    want, sims = _reference(a, b, threshold)
    got = similar_pairs(a, b, threshold=threshold, block=block)
    _check(got, want, sims, within=False)
    if threshold == 0.6:
        assert {(0, 0), (3, 149), (150, 149), (199, 1)} <= want  # b[149] is near a[3] and so near a[150] too


def test_empty_and_degenerate_inputs():
    rng = np.random.default_rng(2)
    a = _unit(rng, 5).astype(np.float32)
    empty = np.zeros((0, DIM), dtype=np.float32)
    assert similar_pairs(empty, threshold=0.5) == []
    assert similar_pairs(a[:1], threshold=-1.0) == []  # one row: no pair i < j
    assert similar_pairs(empty, a, threshold=0.5) == []
    assert similar_pairs(a, empty, threshold=0.5) == []
    assert similar_pairs(a, threshold=1.0) == []
    twice = np.vstack([a, a])  # every row again: pairs (i, i + 5) at 1.0 (up to rounding, clamped)
    got = similar_pairs(twice, threshold=1.0, block=3)
    assert sorted((i, j) for i, j, _ in got) == [(i, i + 5) for i in range(5)]
    assert all(1.0 - 1e-6 <= s <= 1.0 for *_, s in got)
    assert all(s <= 1.0 for *_, s in similar_pairs(twice, twice, threshold=0.999))
    assert len(similar_pairs(twice, threshold=-1.0, block=4)) == 10 * 9 // 2  # every pair once
    with pytest.raises(ValueError, match="block"):
        similar_pairs(a, threshold=0.5, block=0)


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


#: copy_groups' labels of _frozen_graph(): cross-validation's folds follow their order (StratifiedGroupKFold sorts
#: the group labels), so every CV figure the docs quote depends on them. A change here moves the folds.
_FROZEN_LABELS = [0, 19, 19, 5, 23, 5, 23, 23, 36, 24, 25, 21, 5, 5, 14, 33, 16, 5, 18, 19, 25, 21, 39, 23, 24, 25,
                  23, 23, 5, 29, 21, 33, 5, 33, 36, 35, 36, 5, 38, 39]


def _frozen_graph() -> tuple[np.ndarray, list[str | None]]:
    """40 rows on the sphere in 3-D (many near pairs at 0.95) and a few same-sha256 rows, "" and None among them."""
    x = _unit_rows(np.random.default_rng(47), 40, 3)
    sha: list[str | None] = [None] * 40
    sha[3] = "03" * 32
    sha[12] = sha[5] = "12" * 32
    sha[30] = sha[21] = "30" * 32
    sha[7] = sha[8] = ""  # no digest: never the same photo
    return x, sha


def test_copy_groups_labels_are_the_frozen_ones_whatever_the_block():
    """The labels themselves (not only the groups) stay: the folds of cross-validation depend on their order."""
    from index.pairs import copy_groups

    x, sha = _frozen_graph()
    for block in (1, 7, 2048):
        assert copy_groups(x, threshold=0.95, sha256=sha, block=block).tolist() == _FROZEN_LABELS


@pytest.mark.parametrize("seed", range(20))
def test_copy_groups_are_the_connected_components_and_each_label_a_member(seed):
    """The groups equal scipy's connected components of the pairs and same-digest edges (an independent oracle);
    a group's label is one of its rows."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from index.pairs import copy_groups

    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 120))
    x = _unit_rows(rng, n, int(rng.integers(2, 5)))
    digests = [None, "", *(f"{k:064x}" for k in range(n))]  # about a third of the rows share one with another
    sha = [digests[k] for k in rng.integers(0, len(digests), n)] if seed % 2 else []
    threshold = float(rng.uniform(0.9, 0.99))
    labels = copy_groups(x, threshold=threshold, sha256=sha, block=int(rng.integers(1, 64)))
    edges = [(i, j) for i, j, _ in similar_pairs(x, threshold=threshold)]
    edges += [(i, j) for i in range(len(sha)) for j in range(i) if sha[i] and sha[i] == sha[j]]
    rows, cols = (np.array(side, dtype=np.int64) for side in zip(*edges, strict=True)) if edges else ([], [])
    _, comp = connected_components(coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)), directed=False)
    same = labels[:, None] == labels[None, :]
    assert np.array_equal(same, comp[:, None] == comp[None, :])
    assert np.array_equal(labels[labels], labels)  # the label is a row of its own group
