"""probe train at scale: the kNN vote over blocks of queries equals the dense Q x R one bit for bit, the settings
are chosen on the votes of a subsample of queries above SELECTION_MAX_PHOTOS, each voting over the whole gallery (said
in the calibration), the species read in one pass."""

from __future__ import annotations

import numpy as np
import pytest

import retrieval.calibrate as calibrate
from index.gallery import Gallery
from index.records import ReferenceRecord
from retrieval.calibrate import (
    SelectionGrid,
    Votes,
    dense_vote,
    knn_matrix,
    knn_top,
    select_settings,
    selection_sample,
    vote_weights,
)
from retrieval.probe import train_probe
from retrieval.probe_flows import _selection_data


def _dense_knn(queries, refs, ref_labels, n_classes, k, temperature, *, exclude_self=False):
    """The vote as it was: one dense Q x R similarity matrix."""
    sims = queries @ refs.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    k = min(k, refs.shape[0])
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    top_sims = np.take_along_axis(sims, top, axis=1)
    w = np.exp((top_sims - top_sims.max(axis=1, keepdims=True)) / temperature)
    out = np.zeros((len(queries), n_classes), dtype=np.float64)
    rows = np.repeat(np.arange(len(queries)), k)
    np.add.at(out, (rows, ref_labels[top].reshape(-1)), w.reshape(-1))
    return out / out.sum(axis=1, keepdims=True)


def _data(seed: int, n_q: int, n_r: int, dim: int, ties: bool):
    rng = np.random.default_rng(seed)
    if ties:  # few distinct vectors: many equal similarities around every k-th neighbour
        base = rng.normal(size=(4, dim)).astype(np.float32)
        q, r = base[rng.integers(0, 4, n_q)], base[rng.integers(0, 4, n_r)]
    else:
        q, r = rng.normal(size=(n_q, dim)).astype(np.float32), rng.normal(size=(n_r, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    return q, r, rng.integers(0, 7, n_r)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("block_floats", [1, 97 * 2, 97 * 5, 97 * 101, 10**9])  # 203 = 2 * 101 + 1: a lone last row
def test_blockwise_vote_equals_dense(ties, block_floats):
    q, r, labels = _data(1, 203, 97, 16, ties)
    tops = knn_top(q, r, [3, 10, 30, 200], block_floats=block_floats)
    for k in (3, 10, 30, 200):
        top, top_sims = tops[k]
        assert top.shape == (203, min(k, 97))
        for t in (0.02, 0.05):
            got = dense_vote(labels[top], vote_weights(top_sims, t), 7)
            assert np.array_equal(got, _dense_knn(q, r, labels, 7, k, t))


@pytest.mark.parametrize("ties", [False, True])
def test_knn_matrix_equals_dense_with_self_excluded(ties):
    x, _, _ = _data(2, 150, 1, 8, ties)
    labels = np.random.default_rng(3).integers(0, 5, 150)
    for k in (1, 10):
        dense = _dense_knn(x, x, labels, 5, k, 0.03, exclude_self=True)
        assert np.array_equal(knn_matrix(x, x, labels, 5, k, 0.03, exclude_self=True), dense)
        top, _ = knn_top(x, x, [k], exclude_self=True, block_floats=150 * 7)[k]
        assert not (top == np.arange(150)[:, None]).any()  # no photo is its own neighbour, in any block


def test_votes_keep_top_k_and_concatenate_folds_as_dense():
    q, r, labels = _data(4, 60, 40, 8, False)
    votes = Votes(7)
    for fold in (q[:25], q[25:]):
        top, sims = knn_top(fold, r, [10])[10]
        votes.add((10, 0.03, "cosine"), labels[top], vote_weights(sims, 0.03))
    assert list(votes) == [(10, 0.03, "cosine")] and len(votes) == 1
    dense = np.concatenate([_dense_knn(f, r, labels, 7, 10, 0.03) for f in (q[:25], q[25:])])
    assert np.array_equal(votes[10, 0.03, "cosine"], dense)


def test_block_floats_must_be_positive():
    q, r, _ = _data(5, 4, 4, 4, False)
    with pytest.raises(ValueError, match="block_floats must be at least 1"):
        knn_top(q, r, [2], block_floats=0)


def test_selection_sample_keeps_all_up_to_the_limit_and_caps_the_big_species_above_it():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 3
    assert selection_sample(labels, max_photos=83) == (None, 0)  # a ph-snakes-size gallery: every photo
    sample, cap = selection_sample(labels, max_photos=40, seed=7)
    kept = [labels[i] for i in sample]
    assert cap == 18 and len(sample) == 39  # 18 + 18 + 3 <= 40 < 19 + 19 + 3
    assert (kept.count("a"), kept.count("b"), kept.count("c")) == (18, 18, 3)
    assert np.array_equal(sample, np.sort(sample)) and len(set(sample.tolist())) == 39
    assert np.array_equal(selection_sample(labels, max_photos=40, seed=7)[0], sample)  # seeded
    assert not np.array_equal(selection_sample(labels, max_photos=40, seed=8)[0], sample)
    assert selection_sample(labels, max_photos=3)[1] == 2  # never under 2 a species (cross-validation's minimum)


def test_settings_are_chosen_on_a_subsample_above_the_limit_and_it_is_said(monkeypatch):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 32))
    x = np.concatenate([c + rng.normal(size=(40, 32)) for c in centres]).astype(np.float32)  # no near-copies
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = [s for s in "abc" for _ in range(40)]
    grid = SelectionGrid(Cs=(1.0,), ks=(5,), temperatures=(0.05,), weights=(0.5,), metrics=("cosine",))
    full = select_settings(x, y, fingerprint="f", grid=grid, folds=3)
    assert "subsample" not in full.selected_on and full.metrics["queries"] == 120
    monkeypatch.setattr(calibrate, "SELECTION_MAX_PHOTOS", 60)
    cut = select_settings(x, y, fingerprint="f", grid=grid, folds=3)
    assert cut.selected_on == ("cv:3-fold (queries: 60 of 120 photos, at most 20 a species, seed 0, voting over all "
                               "the others)")
    assert cut.metrics["queries"] == 60 and cut.metrics["gallery_photos"] == 120


def test_the_selection_reads_species_in_one_pass_not_by_id(tmp_path, monkeypatch):
    dim, rng = 8, np.random.default_rng(1)
    g = Gallery.create(tmp_path / "g", {"spec": "test:synthetic", "fingerprint": "test:synthetic#abc", "dim": dim})
    for sp in ("Naja haje", "Natrix maura", "Vipera latastei"):
        x = rng.normal(size=(5, dim)).astype(np.float32)
        g.add([ReferenceRecord(path=f"/p/{sp}/{i}.jpg", species=sp) for i in range(5)], [f"{sp}{i}" for i in range(5)],
              x / np.linalg.norm(x, axis=1, keepdims=True))
    g.set_excluded([int(g.store.ids()[0])])
    expected_ids, _ = g.store.vectors()
    expected = g.store.species_of(expected_ids.tolist())
    asked: list[int] = []
    real = type(g.store).species_of
    monkeypatch.setattr(type(g.store), "species_of", lambda self, ids: asked.append(len(ids)) or real(self, ids))
    ids, vectors, labels, _ = _selection_data(g, None, None, None, None, progress=False)
    assert np.array_equal(ids, expected_ids) and labels == expected and len(labels) == 14
    assert asked == []  # no `id IN (every id)` filter: one read of two columns
    all_ids, species = g.store.id_species(include_excluded=True)
    assert len(all_ids) == 15 and np.array_equal(all_ids, np.sort(all_ids)) and species.count("Naja haje") == 5


def _with_bursts(monkeypatch):
    """3 species of 40 distinct photos, and 2 of 12 whose subsampled photos (cap 10) are near-copies of one: 'd' is
    12 near-copies, 'e' has 2 more photos outside the subsample that are not."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 32))
    x = np.concatenate([c + rng.normal(size=(40, 32)) for c in centres]
                       + [np.zeros((24, 32))]).astype(np.float32)
    y = [s for s in "abc" for _ in range(40)] + ["d"] * 12 + ["e"] * 12
    monkeypatch.setattr(calibrate, "SELECTION_MAX_PHOTOS", 50)
    sample, cap = selection_sample(y, max_photos=50, seed=0)
    assert cap == 10
    for s in "de":
        rows = [i for i, label in enumerate(y) if label == s]
        burst = rng.normal(size=32)
        for i in rows:
            x[i] = burst + 0.01 * rng.normal(size=32)  # cosine ~0.9999: one photo
        if s == "e":
            for i in sorted(set(rows) - set(sample.tolist())):  # the photos the subsample left out
                x[i] = rng.normal(size=32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, y


def test_a_species_the_subsample_cut_is_left_out_when_all_its_photos_are_near_copies(monkeypatch, caplog):
    x, y = _with_bursts(monkeypatch)
    grid = SelectionGrid(Cs=(1.0,), ks=(5,), temperatures=(0.05,), weights=(0.5,), metrics=("cosine",))
    with caplog.at_level("INFO", logger="retrieval.calibrate"):
        cal = select_settings(x, y, fingerprint="f", grid=grid, folds=3)
    assert cal.left_out == {"d": 12}  # as under 20k: not trained; 'e' has distinct photos outside the subsample
    assert "1 species left out of the choice of the settings only" in caplog.text
    assert "the probe still learns them" in caplog.text


def test_a_fixed_head_above_the_limit_is_not_said_to_train(monkeypatch, caplog):
    x, y = _with_bursts(monkeypatch)
    grid = SelectionGrid(Cs=(1.0,), ks=(5,), temperatures=(0.05,), weights=(0.5,), metrics=("cosine",))
    head = train_probe(x, y, fingerprint="f", C=1.0)
    with caplog.at_level("INFO", logger="retrieval.calibrate"):
        select_settings(x, y, fingerprint="f", grid=grid, folds=3, probe=head)
    assert "the head is fixed (nothing is trained)" in caplog.text
    assert "the fixed head is used as it is" in caplog.text
    assert "still trains" not in caplog.text and "still learns" not in caplog.text


@pytest.mark.parametrize(("n_q", "n_r", "dim", "block_floats"), [
    (43, 200, 32, 200 * 20),  # a 3-row tail: 600 similarities, OpenBLAS's small-matrix kernel
    (43, 200, 32, 1),  # one row a block
    (31, 500, 64, 500 * 29),  # a 2-row tail
    (203, 97, 32, 97 * 10),  # a 3-row tail
    (200, 200, 32, 200 * 33),  # self excluded below: a 2-row tail
])
def test_short_blocks_give_the_dense_matrix_bit_for_bit(n_q, n_r, dim, block_floats):
    q, r, _ = _data(6, n_q, n_r, dim, False)
    exclude_self = n_q == n_r
    if exclude_self:
        r = q
    dense = q @ r.T
    if exclude_self:
        np.fill_diagonal(dense, -np.inf)
    top, sims = knn_top(q, r, [10], exclude_self=exclude_self, block_floats=block_floats)[10]
    want = np.argpartition(-dense, 9, axis=1)[:, :10]
    assert np.array_equal(top, want)
    assert np.array_equal(sims, np.take_along_axis(dense, want, axis=1))


def _dense_species(noise: float = 0.6, seed: int = 0):
    """4 species of 100 photos (16-d) whose clusters overlap: a vote over 30 neighbours beats one over 3 where the
    gallery is dense (100 a species), not where it is thinned to 6 a species."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, 16))
    x = np.concatenate([c + noise * rng.normal(size=(100, 16)) for c in centres]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, [s for s in "abcd" for _ in range(100)]


def test_held_out_votes_are_over_the_whole_gallery_not_the_subsample(monkeypatch):
    x, y = _dense_species()
    monkeypatch.setattr(calibrate, "SELECTION_MAX_PHOTOS", 24)
    sample, _ = selection_sample(y, max_photos=24, seed=0)
    calls = []
    real = calibrate.knn_top

    def spy(queries, refs, ks, **kw):
        out = real(queries, refs, ks, **kw)
        calls.append((len(queries), refs.shape[0], out[max(ks)][0]))
        return out

    monkeypatch.setattr(calibrate, "knn_top", spy)
    grid = SelectionGrid(Cs=(1.0,), ks=(3, 30), temperatures=(1.0,), weights=(0.0,), metrics=("cosine",))
    cal = select_settings(x, y, fingerprint="f", grid=grid, folds=2)
    assert cal.metrics["queries"] == 24 and sum(q for q, _, _ in calls) == 24  # only the sample's votes are scored
    for n_q, n_refs, top in calls:  # each fold's queries vote over every photo but that fold's
        assert n_refs == 400 - n_q
        assert top.max() >= 24  # neighbours from outside the 24 sampled photos (the old code had at most 12 refs)


def test_k_is_tuned_at_the_whole_gallery_density(monkeypatch):
    x, y = _dense_species()
    grid = SelectionGrid(Cs=(1.0,), ks=(3, 30), temperatures=(1.0,), weights=(0.0,), metrics=("cosine",))
    monkeypatch.setattr(calibrate, "SELECTION_MAX_PHOTOS", 24)  # 6 a species: a vote over them alone chose k=3
    queries = select_settings(x, y, fingerprint="f", grid=grid, folds=2)
    assert "queries: 24 of 400" in queries.selected_on
    assert queries.k == 30  # over ~95 photos a species: 30 neighbours of the true species outvote the overlap


def test_a_held_out_photo_never_votes_for_its_near_copy_outside_the_sample(monkeypatch):
    x, y = _dense_species()
    sample, _ = selection_sample(y, max_photos=24, seed=0)
    outside = np.setdiff1d(np.arange(400), sample)
    twins = outside[:24]
    x[twins] = x[sample] + 1e-4  # a near-copy of every query, outside the sample (cosine ~1)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    monkeypatch.setattr(calibrate, "SELECTION_MAX_PHOTOS", 24)
    seen = []
    real = calibrate.knn_top

    def spy(queries, refs, ks, **kw):
        out = real(queries, refs, ks, **kw)
        seen.append((refs, out[max(ks)][1]))
        return out

    monkeypatch.setattr(calibrate, "knn_top", spy)
    grid = SelectionGrid(Cs=(1.0,), ks=(3,), temperatures=(1.0,), weights=(0.0,), metrics=("cosine",))
    select_settings(x, y, fingerprint="f", grid=grid, folds=2)
    assert seen and all(float(sims.max()) < 0.95 for _, sims in seen)  # the twins (cosine ~1) are no neighbours


def test_knn_top_leaves_out_the_pairs_it_is_given():
    q, r, _ = _data(7, 30, 50, 8, False)
    r[5] = q[2]  # query 2's copy
    plain, _ = knn_top(q, r, [1])[1]
    assert plain[2, 0] == 5
    rows, cols = np.array([2, 2, 9]), np.array([5, 0, 3])
    top, sims = knn_top(q, r, [1, 50], exclude=(rows, cols), block_floats=50 * 7)[50]
    dense = q @ r.T
    dense[rows, cols] = -np.inf
    assert np.array_equal(np.sort(sims, axis=1), np.sort(dense, axis=1))
    assert knn_top(q, r, [1], exclude=(rows, cols))[1][0][2, 0] != 5


def _three_species(n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 16))
    x = np.concatenate([c + rng.normal(size=(n, 16)) for c in centres]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, [s for s in "abc" for _ in range(n)]


def test_the_final_probe_trains_on_a_per_species_subsample_above_its_bound_and_says_so(caplog, capsys):
    x, y = _three_species()
    x, y = np.concatenate([x, x[:5] + 0.5]), y + ["d"] * 5  # a small species keeps all its photos
    with caplog.at_level("WARNING", logger="retrieval.probe"):
        probe = train_probe(x, y, fingerprint="f", C=1.0, max_photos=65, progress=True)
    assert probe.calibration.metrics == {"probe_photos": 65.0, "probe_cap_per_species": 20.0}
    assert probe.trained_on == 125 and probe.species == ["a", "b", "c", "d"]
    assert "the probe trains on 65 of the 125 photos (at most 20 a species, seed 0; every species kept)" in caplog.text
    assert "training the probe (65 photos, 4 species)" in capsys.readouterr().err
    sample, cap = calibrate.per_species_sample(y, 65, 0)
    alone = train_probe(x[sample], [y[i] for i in sample], fingerprint="f", C=1.0, max_photos=None)
    assert np.array_equal(probe.weight, alone.weight) and np.array_equal(probe.bias, alone.bias)


def test_the_final_probe_under_its_bound_is_the_unbounded_one(caplog):
    x, y = _three_species()
    with caplog.at_level("WARNING", logger="retrieval.probe"):
        bounded = train_probe(x, y, fingerprint="f", C=1.0)  # 120 photos: far under the bound
    free = train_probe(x, y, fingerprint="f", C=1.0, max_photos=None)
    assert np.array_equal(bounded.weight, free.weight) and np.array_equal(bounded.bias, free.bias)
    assert bounded.calibration.metrics == {} and bounded.trained_on == 120 and "trains on" not in caplog.text


def test_the_final_probes_default_bound_is_a_memory_bound_by_species(monkeypatch):
    """"auto": photos x species within PROBE_MAX_CELLS (200,000 photos of 1,994 species train on all of them), never
    under PROBE_MIN_BOUND photos; a smaller product bound subsamples as an explicit max_photos would."""
    from retrieval import probe as probe_module

    assert probe_module.probe_photo_bound(14) == 400_000_000 // 14
    assert probe_module.probe_photo_bound(1_994) >= 200_000  # the synthetic 200k gallery of docs/scale.md: every photo
    assert probe_module.probe_photo_bound(20_000) == probe_module.PROBE_MIN_BOUND
    x, y = _three_species()
    monkeypatch.setattr(probe_module, "PROBE_MAX_CELLS", 3 * 60)  # 3 species: at most 60 photos
    monkeypatch.setattr(probe_module, "PROBE_MIN_BOUND", 10)
    auto = train_probe(x, y, fingerprint="f", C=1.0)
    explicit = train_probe(x, y, fingerprint="f", C=1.0, max_photos=60)
    assert auto.calibration.metrics == {"probe_photos": 60.0, "probe_cap_per_species": 20.0}
    assert np.array_equal(auto.weight, explicit.weight) and np.array_equal(auto.bias, explicit.bias)


def test_probe_train_max_photos_bounds_the_final_probe_and_the_output_says_so(tmp_path, monkeypatch, capsys):
    """--max-photos N: the probe trains on a per-species subsample of N and the command's line says how many;
    0 and the default (far under the memory bound here): every photo, no such words."""
    from test_blend_probe import _noise_gallery

    from api.cli import main
    from retrieval.probe import Calibration, LinearProbe

    index = _noise_gallery(tmp_path, "timm:test_vit@random")  # 2 species, 3 photos each
    monkeypatch.setattr(calibrate, "select_settings", lambda *a, **k: Calibration(C=1.0))
    assert main(["probe", "train", "--index", str(index), "--precision", "fp32", "-q", "--max-photos", "4"]) == 0
    out = capsys.readouterr().out
    assert "6 references (trained on 4 of them, at most 2 a species)" in out, out
    metrics = LinearProbe.load(index).calibration.metrics
    assert (metrics["probe_photos"], metrics["probe_cap_per_species"]) == (4, 2)
    for extra in (["--max-photos", "0"], []):
        assert main(["probe", "train", "--index", str(index), "--precision", "fp32", "-q", *extra]) == 0
        out = capsys.readouterr().out
        assert "6 references, trained in" in out and "(trained on" not in out, (extra, out)
