"""``speciesid clean`` at scale: one pass over every pair (``index.pairs.neighbours_and_pairs``) gives the exact
all-pairs answer and the exact leave-one-out neighbours, also for a burst of copies larger than the neighbours kept,
and a dataset photo is read once (hashed and decoded from the same bytes).

Synthetic unit vectors (48-d: unrelated rows stay far below cosine 0.9), near-copies planted at distinct cosines
(no two similarities tie, so neighbour order is well posed), across tile edges; a group of 20 copies of one photo
against 5 neighbours kept. Ties (exact copies, dot products exact in float32) against a brute force: by the lower
column.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index.pairs import copy_groups, neighbours_and_pairs, similar_pairs
from retrieval.findings import PhotoSet, find_issues, other_neighbours

DIM = 48


def _planted(n: int = 400, seed: int = 0, burst: int = 20) -> np.ndarray:
    """``n`` unit rows: pairs of near-copies every 37 rows (cosine 0.951-0.999) and one burst: rows 100.. are
    ``burst`` copies of row 99 (cosines 0.99-0.9995, distinct: copies of each other too)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)

    def near(u: np.ndarray, cos: float) -> np.ndarray:
        w = rng.standard_normal(DIM)
        w -= (w @ u) * u
        w /= np.linalg.norm(w)
        return cos * u + np.sqrt(1 - cos * cos) * w

    for i, cos in zip(range(0, n - 1, 37), np.linspace(0.951, 0.999, len(range(0, n - 1, 37))), strict=True):
        if not 99 <= i < 100 + burst and not 99 <= i + 1 < 100 + burst:
            x[i + 1] = near(x[i], cos)
    for m, cos in enumerate(np.linspace(0.99, 0.9995, burst)):
        x[100 + m] = near(x[99], cos)
    return x.astype(np.float32)


def _brute_neighbours(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = x.astype(np.float64) @ x.astype(np.float64).T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


@pytest.mark.parametrize("block", [7, 64, 2048])
@pytest.mark.parametrize("k", [1, 5, 12])
def test_one_pass_equals_all_pairs_and_brute_force_neighbours(block, k):
    x = _planted()
    got = neighbours_and_pairs(x, k, threshold=0.95, block=block)
    assert got.pairs == similar_pairs(x, threshold=0.95, block=block)  # the exact all-pairs answer, bit for bit
    burst = set(range(99, 120))
    # the burst of 21 copies: every one of its 210 pairs is found, though each row keeps only k neighbours
    assert {(i, j) for i, j, _ in got.pairs if i in burst and j in burst} == {
        (i, j) for i in burst for j in burst if i < j}
    want_pos, want_sims = _brute_neighbours(x, k)
    assert (got.positions == want_pos).all()
    assert np.allclose(got.sims, want_sims, atol=1e-5)


@pytest.mark.parametrize("block", [1, 3, 7, 64])
@pytest.mark.parametrize("k", [1, 4, 9])
def test_one_pass_ties_go_to_the_lower_column_as_brute_force(block, k):
    """Stop 51's reread: the planted data avoids ties, so ``_merge_top``'s tie rule (ties by the lower column, and
    its branch where more entries tie at a tile's edge than fit) was never run. Exact copies of a few rows, entries
    in {-1/8, 0, 1/8}: every dot product is exact in float32 whatever the tile, so ties are ties bit for bit."""
    rng = np.random.default_rng(block * 100 + k)
    base = (rng.integers(-1, 2, (6, DIM)) / 8).astype(np.float32)
    x = base[rng.integers(0, len(base), 50)]  # ~8 exact copies of each
    got = neighbours_and_pairs(x, k, threshold=0.3, block=block)
    assert got.pairs == similar_pairs(x, threshold=0.3, block=block)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    cols = np.arange(len(x))
    want = np.stack([np.lexsort((cols, -row))[:k] for row in sims])  # best first, ties by the lower column
    assert (got.positions == want).all()
    assert (got.sims == np.take_along_axis(sims, want, axis=1)).all()


def test_tiles_put_the_diagonal_first_each_tile_once():
    """``neighbours_and_pairs`` walks the diagonal tiles first (each row's k nearest in its own block: the bound
    that keeps the later tiles' candidates few), then every other tile on and above the diagonal, once."""
    from index.pairs import _tiles

    plain = list(_tiles(10, 10, 3, True, False, ""))
    first = list(_tiles(10, 10, 3, True, False, "", diagonal_first=True))
    assert first[:4] == [(0, 0), (3, 3), (6, 6), (9, 9)]
    assert sorted(first) == sorted(plain) and len(set(first)) == len(plain) == 10
    assert first[4:] == [st for st in plain if st[0] != st[1]]  # the others in the plain order


@pytest.mark.parametrize("block", [16, 64])
def test_one_pass_ties_across_many_tiles_as_brute_force(block):
    """Exact ties spread over many tiles (300 rows, ~12 exact copies of each of 25 rows, in no order), 12 kept:
    the diagonal tile's bound, the later tiles' candidates at or above a row's 12th best (ties included) and the
    merge by value then lower column give the brute force's neighbours and the all-pairs answer."""
    rng = np.random.default_rng(block)
    base = (rng.integers(-1, 2, (25, DIM)) / 8).astype(np.float32)
    x = base[rng.integers(0, len(base), 300)]
    got = neighbours_and_pairs(x, 12, threshold=0.3, block=block)
    assert got.pairs == similar_pairs(x, threshold=0.3, block=block)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    cols = np.arange(len(x))
    want = np.stack([np.lexsort((cols, -row))[:12] for row in sims])
    assert (got.positions == want).all()
    assert (got.sims == np.take_along_axis(sims, want, axis=1)).all()


def test_one_pass_small_sets_pad_and_refuse_bad_arguments():
    x = _planted(6, burst=0)
    got = neighbours_and_pairs(x, 8, threshold=0.95, block=4)  # 5 other rows for 8 places
    assert (got.positions[:, 5:] == -1).all() and np.isneginf(got.sims[:, 5:]).all()
    assert (got.positions[:, :5] == _brute_neighbours(x, 5)[0]).all()
    empty = neighbours_and_pairs(np.zeros((0, DIM), np.float32), 3, threshold=0.95)
    assert empty.pairs == [] and empty.positions.shape == (0, 3)
    with pytest.raises(ValueError, match="k must be at least 1"):
        neighbours_and_pairs(x, 0, threshold=0.95)
    with pytest.raises(ValueError, match="block must be at least 1"):
        neighbours_and_pairs(x, 3, threshold=0.95, block=0)


def test_neighbours_of_a_burst_larger_than_searched_are_searched_again():
    """Rows of the 21-copy burst have only their own copies among their 12 nearest: other_neighbours searches them
    again, wider, and answers as a search from scratch does."""
    x = _planted()
    groups = copy_groups(x, threshold=0.95)
    near = neighbours_and_pairs(x, 12, threshold=0.95, block=64)
    assert len(set(groups[99:120].tolist())) == 1  # one group
    assert (near.positions[99] >= 99).all() and (near.positions[99] < 120).all()  # its 12 nearest: its copies
    want = other_neighbours(x, 3, groups=groups)
    got = other_neighbours(x, 3, groups=groups, first=(near.positions, near.sims))
    assert (got[0] == want[0]).all() and np.allclose(got[1], want[1], atol=1e-6)
    assert not set(got[0][99].tolist()) & set(range(99, 120))  # found beyond the burst


def _photos(x: np.ndarray) -> PhotoSet:
    n = len(x)
    species = [f"S{i % 7}" for i in range(n)]
    return PhotoSet([f"/p/{i}.jpg" for i in range(n)], [f"d{i}" for i in range(n)], x, [None] * n,
                    list(range(n)), species)


def test_find_issues_compares_every_pair_once(monkeypatch):
    """With suspect labels on, duplicates, copy groups and neighbours come from one pass: the separate all-pairs
    search (similar_pairs) is not run again, and the findings are those of the separate searches."""
    import retrieval.findings as findings

    x = _planted()
    want = find_issues(_photos(x), suspect_k=3)

    def refuse(*args, **kwargs):
        raise AssertionError("a second pass over every pair")

    monkeypatch.setattr(findings, "similar_pairs", refuse)
    monkeypatch.setattr("index.pairs.similar_pairs", refuse)
    got = find_issues(_photos(x), suspect_k=3)
    assert [f.row() for f in got] == [f.row() for f in want]
    kinds = {f.kind for f in got}
    assert {"near-duplicate", "label-conflict"} <= kinds
    assert sum(f.kind in ("near-duplicate", "label-conflict") for f in got) == len(
        neighbours_and_pairs(x, 3, threshold=0.95).pairs)  # every pair, the burst's 210 among them


def test_clean_of_a_dataset_against_a_gallery_reads_each_photo_once(tmp_path, capsys, monkeypatch):
    """``clean --dataset D --index G --against V`` reads each photo's file once: its bytes are hashed, looked up in
    the store and decoded from the same read (it read them twice: once to hash, once to embed). The findings and
    the reuse of stored vectors are unchanged."""
    from collections import Counter

    from test_clean import IMAGE_ONLY, _noise, _photos, _read_csv, _run

    import retrieval.clean as clean
    from index.gallery import Gallery

    paths = _photos(tmp_path / "photos", per_species=3)
    index = tmp_path / "g"
    code, _, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", tmp_path / "photos", "--index",
                        index, "--encoder", IMAGE_ONLY, "--precision", "fp32", "-q")
    assert code == 0, err
    ds, val = tmp_path / "ds", tmp_path / "val"
    (ds / "Naja haje").mkdir(parents=True)
    (ds / "Naja haje" / "stored.png").write_bytes(paths[0].read_bytes())  # in the gallery: its vector is reused
    (ds / "Naja haje" / "copy.png").write_bytes(paths[0].read_bytes())
    _noise(ds / "Naja haje" / "new.png", seed=777)
    (ds / "Naja haje" / "broken.png").write_bytes(b"not a photo")
    val.mkdir()
    (val / "leak.png").write_bytes(paths[0].read_bytes())
    _noise(val / "other.png", seed=778)
    reads: Counter[str] = Counter()
    read_photo = Gallery.read_photo
    monkeypatch.setattr(Gallery, "read_photo", lambda self, p: reads.update([str(p)]) or read_photo(self, p))
    before_report: Counter[str] = Counter()  # the contact sheet reads the flagged photos again, for thumbnails
    write_report = clean.write_report
    monkeypatch.setattr(clean, "write_report", lambda *a, **kw: before_report.update(reads) or write_report(*a, **kw))
    code, out, err = _run(capsys, "clean", "--dataset", "folder", "--root", ds, "--index", index, "--against", val,
                          "--encoder", IMAGE_ONLY, "--precision", "fp32", "--report", tmp_path / "r", "-q")
    assert code == 0, err
    photos = sorted(str(p) for p in [*ds.rglob("*.png"), *val.glob("*.png")])
    assert {p: before_report[p] for p in photos} == dict.fromkeys(photos, 1), before_report
    assert "2 photos through the encoder, 3 read from the gallery's store" in out, out
    found = {(r["kind"], Path(r["path"]).name, r["paired_path"] and Path(r["paired_path"]).name, r["reference_id"])
             for r in _read_csv(tmp_path / "r" / "findings.csv")}
    assert {("duplicate", "stored.png", "copy.png", "1"), ("leak", "copy.png", "leak.png", "1"),
            ("leak", "stored.png", "leak.png", "1"), ("unreadable", "broken.png", "", "")} <= found, found


@pytest.mark.parametrize("labelled", [True, False])
def test_find_issues_without_duplicates_makes_one_pass(monkeypatch, labelled):
    """duplicates=False: the all-pairs pass is made once, by whichever uses it (find_issues' when every readable
    photo is labelled and suspect_labels reuses it; suspect_labels' own over the labelled photos otherwise), and
    the findings are the same."""
    import retrieval.findings as findings

    x = _planted(120)
    photos = _photos(x)
    if not labelled:
        photos.species[5] = None  # one readable photo without a label: suspect_labels judges the others only
    want = find_issues(photos, suspect_k=3, duplicates=False)
    calls = []

    def counted(*args, **kwargs):
        calls.append(len(args[0]))
        return neighbours_and_pairs(*args, **kwargs)

    monkeypatch.setattr(findings, "neighbours_and_pairs", counted)
    got = find_issues(photos, suspect_k=3, duplicates=False)
    assert [f.row() for f in got] == [f.row() for f in want]
    assert calls == [len(x) if labelled else len(x) - 1]
