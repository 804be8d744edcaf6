"""The sorted id-set helpers the indexes use instead of NumPy's hash-based ``np.unique`` / ``np.union1d``
(index/vectors.py): on random ids, repeats, negatives and empty arrays they give what the NumPy calls give."""

from __future__ import annotations

import numpy as np
import pytest

from index.vectors import _check_unique, has_repeats, in_sorted, sorted_unique, union_sorted


def _cases(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        np.zeros(0, dtype=np.int64),
        np.asarray([7], dtype=np.int64),
        rng.integers(0, 50, size=int(rng.integers(1, 80))).astype(np.int64),  # many repeats
        rng.integers(-(2**62), 2**62, size=int(rng.integers(1, 300))).astype(np.int64),  # wide, negatives
        np.arange(int(rng.integers(1, 200)), dtype=np.int64) * 3,  # sorted, distinct
        rng.permutation(np.arange(100, dtype=np.int64)),
    ]


@pytest.mark.parametrize("seed", range(20))
def test_sorted_unique_and_has_repeats_match_numpy(seed):
    for ids in _cases(seed):
        got = sorted_unique(ids)
        np.testing.assert_array_equal(got, np.unique(ids))
        assert got.dtype == np.unique(ids).dtype
        assert has_repeats(np.sort(ids)) == (np.unique(ids).size != ids.size)


@pytest.mark.parametrize("seed", range(20))
def test_union_and_membership_match_numpy(seed):
    rng = np.random.default_rng(1000 + seed)
    for held in _cases(seed):
        held = np.unique(held)  # the indexes' arrays: sorted, distinct
        above = held[-1:] + np.arange(1, 4) if held.size else held  # new ids above the max (reserved ids)
        for ids in [*_cases(seed + 1), held[:3], above, rng.choice(held, size=min(5, held.size)) if held.size else held,
                    np.concatenate([above, held[:2], above])]:
            ids = np.asarray(ids, dtype=np.int64)
            union = union_sorted(held, ids)
            np.testing.assert_array_equal(union, np.union1d(held, ids))
            assert union.dtype == np.int64
            np.testing.assert_array_equal(in_sorted(ids, held), np.isin(ids, held))


def test_duplicate_input_ids_are_named_as_before():
    _check_unique(np.asarray([5, 3, 9], dtype=np.int64))
    with pytest.raises(ValueError, match=r"duplicate ids in input: \[3, 9\]$"):
        _check_unique(np.asarray([9, 3, 5, 3, 9, 9], dtype=np.int64))
    many = np.repeat(np.arange(12, dtype=np.int64), 2)
    with pytest.raises(ValueError, match=r"\[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\] \.\.\.$"):
        _check_unique(many)
