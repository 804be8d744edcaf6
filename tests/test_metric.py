"""The kNN vote's whitened metric: fit, choice by out-of-fold scores, persistence, and the identifier's re-rank."""

from __future__ import annotations

import numpy as np
import pytest

from index.gallery import Gallery
from index.records import ReferenceRecord
from retrieval.calibrate import knn_matrix, select_settings
from retrieval.identify import Identifier
from retrieval.metric import DEFAULT_SHRINK, WhiteningStats, fit_whitening
from retrieval.probe import LinearProbe, train_probe

DIM = 16
SPECIES_DIMS = 6  # species differ along these; the other 10 are nuisance shared by every species


def _nuisance(n_per: int, classes: range = range(4), seed: int = 0, nuisance: float = 1.5):
    """Species told apart by small directions of their own; photos vary far more along 10 nuisance directions
    every species shares (light, pose): the cosine neighbours follow the nuisance, the whitened ones the species."""
    rng = np.random.default_rng(seed)
    x, labels = [], []
    n_nuisance = DIM - SPECIES_DIMS
    for c in classes:
        centre = np.zeros(DIM)
        centre[c] = 1.0
        part = centre + 0.25 * rng.standard_normal((n_per, DIM)) * np.r_[np.ones(SPECIES_DIMS), np.zeros(n_nuisance)]
        part[:, SPECIES_DIMS:] += nuisance * rng.standard_normal((n_per, n_nuisance)) * np.linspace(0.3, 1.0, n_nuisance)
        x.append(part)
        labels += [f"Genus s{c}"] * n_per
    x = np.concatenate(x)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def _top1(p: np.ndarray, y: np.ndarray) -> float:
    return float((p.argmax(1) == y).mean())


def test_whitening_finds_the_species_directions_cosine_misses():
    x, labels = _nuisance(40, seed=0)
    q, q_labels = _nuisance(20, seed=1)
    y, qy = np.array([int(s[-1]) for s in labels]), np.array([int(s[-1]) for s in q_labels])
    wh = fit_whitening(x, labels)
    assert wh.shrink == DEFAULT_SHRINK and wh.matrix.shape == (DIM, DIM) and wh.dim == DIM
    np.testing.assert_allclose(wh.matrix, wh.matrix.T, atol=1e-5)  # the symmetric inverse square root
    z = wh.apply(q)
    assert z.dtype == np.float32 and z.shape == q.shape
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(wh.apply(q[0]), z[0], rtol=1e-5)  # one embedding or a batch
    cosine = _top1(knn_matrix(q, x, y, 4, 10, 0.05), qy)
    whitened = _top1(knn_matrix(q, x, y, 4, 10, 0.05, metric="whitened"), qy)
    assert cosine < 0.7 and whitened > 0.85, (cosine, whitened)  # measured: 0.575 and 0.91
    assert _top1(knn_matrix(q, x, y, 4, 10, 0.05, metric="cosine"), qy) == cosine


def test_whitening_refuses_what_it_cannot_fit():
    x, labels = _nuisance(5)
    with pytest.raises(ValueError, match="2\\+ different reference photos"):
        fit_whitening(np.repeat(x[:1], 3, axis=0), ["A a", "A a", "B b"])
    with pytest.raises(ValueError, match="shrink must be in"):
        fit_whitening(x, labels, shrink=0.0)
    with pytest.raises(ValueError, match="embeddings but"):
        fit_whitening(x, labels[:-1])
    with pytest.raises(ValueError, match="expects 16-d embeddings"):
        fit_whitening(x, labels).apply(np.ones((2, 8), np.float32))
    with pytest.raises(ValueError, match="unknown metric 'manhattan'"):
        knn_matrix(x, x, np.zeros(len(x), int), 4, 3, 0.05, metric="manhattan")


def test_settings_choose_whitened_only_where_it_measures_better():
    x, labels = _nuisance(25)
    cal = select_settings(x, labels, fingerprint="t#1", folds=3)
    assert cal.metric == "whitened" and cal.metrics["knn_top1"] > 0.85
    # well-separated round clusters: whitening cannot beat cosine by its standard error -> the prior, cosine
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, DIM))
    round_x = np.concatenate([c + 0.3 * rng.standard_normal((25, DIM)) for c in centres])
    round_x = (round_x / np.linalg.norm(round_x, axis=1, keepdims=True)).astype(np.float32)
    assert select_settings(round_x, labels, fingerprint="t#1", folds=3).metric == "cosine"


def test_probe_keeps_its_whitening_on_disk(tmp_path):
    x, labels = _nuisance(20)
    probe = train_probe(x, labels, fingerprint="t#1", C=10.0)
    probe.calibration.metric = "whitened"
    probe.whitening = fit_whitening(x, labels, shrink=0.4)
    probe.save(tmp_path / "with")
    back = LinearProbe.load(tmp_path / "with")
    assert back.calibration.metric == "whitened" and back.whitening.shrink == pytest.approx(0.4)
    np.testing.assert_array_equal(back.whitening.matrix, probe.whitening.matrix)
    np.testing.assert_array_equal(back.whitening.mean, probe.whitening.mean)
    plain = train_probe(x, labels, fingerprint="t#1", C=10.0)
    plain.save(tmp_path / "plain")
    loaded = LinearProbe.load(tmp_path / "plain")
    assert loaded.whitening is None and loaded.calibration.metric == "cosine"


class _Enc:
    spec = "test:synthetic"
    fingerprint = "test:synthetic#abc"
    dim = DIM


def test_identifier_votes_with_the_whitened_neighbours_and_keeps_new_species(tmp_path):
    x, labels = _nuisance(30)
    gallery = Gallery.create(tmp_path / "g", {"spec": _Enc.spec, "fingerprint": _Enc.fingerprint, "dim": DIM})
    gallery.add([ReferenceRecord(path=f"/p/{i}.jpg", species=s) for i, s in enumerate(labels)],
                [f"d{i}" for i in range(len(labels))], x)
    probe = train_probe(x, labels, fingerprint=_Enc.fingerprint, C=10.0)
    probe.calibration.metric, probe.calibration.k, probe.calibration.temperature = "whitened", 7, 0.05
    probe.whitening = fit_whitening(x, labels)
    ident = Identifier(_Enc(), gallery, probe=probe)
    q, _ = _nuisance(3, seed=2)
    ids, _ = gallery.store.vectors()
    got = ident.voting_neighbours(q)
    zr = probe.whitening.apply(x)
    for row, ns in zip(probe.whitening.apply(q), got, strict=True):
        sims = zr @ row
        assert [n.id for n in ns] == [int(ids[j]) for j in np.argsort(-sims)[:7]]  # exact: every photo a candidate
        np.testing.assert_allclose([n.similarity for n in ns], np.sort(sims)[::-1][:7], rtol=1e-4, atol=1e-5)
    assert [n.similarity for n in ident.search(q, 3)[0]] != [n.similarity for n in got[0][:3]]  # search: cosine
    # a species added after the probe (and its whitening) was fitted is found by the vote and kept by the blend
    new, _ = _nuisance(20, classes=range(5, 6), seed=3)  # its own direction, the shared nuisance
    gallery.add([ReferenceRecord(path=f"/n/{i}.jpg", species="Novus n") for i in range(10)],
                [f"n{i}" for i in range(10)], new[:10])
    assert ident.whitening() is not probe.whitening  # a species came: fitted again, on the gallery as it is now
    assert "Novus n" in ident.whitening().species and ident.whitening().photos == len(labels) + 10
    refit = fit_whitening(np.concatenate([x, new[:10]]), labels + ["Novus n"] * 10)
    np.testing.assert_allclose(ident.whitening().matrix, refit.matrix, rtol=1e-3, atol=1e-3)
    answers = ident.identify_embeddings(new[10:20], top=1)
    assert sum(a.predictions[0].species == "Novus n" for a in answers) >= 8
    # what an answer shows is the plain cosine, as search gives it; the vote's whitened one beside it
    cos = {n.id: n.similarity for n in gallery.search(new[10:11], 100)[0]}
    shown = [n.to_dict() for n in answers[0].neighbours]
    assert all(d["similarity"] == pytest.approx(cos[d["id"]], abs=1e-5) for d in shown)
    assert any(abs(d["vote_similarity"] - d["similarity"]) > 0.01 for d in shown)


def test_whitening_is_kept_while_it_fits_the_gallery():
    x, labels = _nuisance(10)
    wh = fit_whitening(x, labels)
    counts = {s: labels.count(s) for s in set(labels)}
    assert wh.fits(counts) and wh.photos == 40 and wh.species == tuple(sorted(counts))
    assert wh.fits({**counts, "Genus s0": 13})  # 3 photos more: within 10%
    assert not wh.fits({**counts, "Genus s0": 15})  # 5 more: fitted again
    assert not wh.fits({**counts, "Novus n": 1})  # a new species: fitted again
    batches = WhiteningStats(dim=DIM)  # streamed: the sums added batch by batch, as a gallery is read
    for part in (slice(0, 15), slice(15, None)):
        batches.add(x[part], labels[part])
    streamed = batches.fit()
    np.testing.assert_allclose(streamed.matrix, wh.matrix, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(streamed.mean, wh.mean, rtol=1e-5, atol=1e-6)


def test_reference_vectors_come_from_the_index_or_the_store(tmp_path, monkeypatch):
    x, labels = _nuisance(5)
    gallery = Gallery.create(tmp_path / "g", {"spec": _Enc.spec, "fingerprint": _Enc.fingerprint, "dim": DIM})
    gallery.add([ReferenceRecord(path=f"/p/{i}.jpg", species=s) for i, s in enumerate(labels)],
                [f"d{i}" for i in range(len(labels))], x)
    ids, stored = gallery.store.vectors()
    want = [int(ids[3]), int(ids[0]), int(ids[3])]
    expected = stored[[3, 0, 3]]
    np.testing.assert_array_equal(gallery.reference_vectors(want), expected)  # flat index: reconstructed
    monkeypatch.setattr(type(gallery.index), "reconstruct", lambda self, ids: None)  # an index that keeps none
    np.testing.assert_array_equal(gallery.reference_vectors(want), expected)  # from the store, cached
    assert set(gallery._vector_cache) == {int(ids[3]), int(ids[0])}
    assert gallery.reference_vectors([]).shape == (0, DIM)


def test_galleries_too_small_to_whiten_vote_on_cosine(tmp_path, caplog):
    x, labels = _nuisance(2)  # 2 photos a species: each 2-fold training part holds one -> no within-species spread
    assert select_settings(x, labels, fingerprint="t#1").metric == "cosine"
    big, big_labels = _nuisance(10)
    gallery = Gallery.create(tmp_path / "g", {"spec": _Enc.spec, "fingerprint": _Enc.fingerprint, "dim": DIM})
    gallery.add([ReferenceRecord(path=f"/p/{i}.jpg", species=s) for i, s in enumerate(big_labels)],
                [f"d{i}" for i in range(len(big_labels))], big)
    probe = train_probe(big, big_labels, fingerprint=_Enc.fingerprint, C=10.0)
    probe.calibration.metric, probe.calibration.k = "whitened", 3
    probe.whitening = fit_whitening(big, big_labels)
    ident = Identifier(_Enc(), gallery, probe=probe)
    assert ident.whitening() is probe.whitening
    ids, _ = gallery.store.vectors()
    keep = {int(ids[i]) for i in range(0, len(ids), 10)}  # one photo of each species left
    gallery.delete([int(i) for i in ids if int(i) not in keep])
    with caplog.at_level("WARNING"):
        assert ident.whitening() is None
    assert "cannot fit the whitening" in caplog.text
    answer = ident.identify_embeddings(big[:1], top=1)[0]  # still answers, on cosine
    assert [n.similarity for n in answer.neighbours] == [n.similarity for n in ident.search(big[:1], 3)[0]]


def test_a_write_saves_the_refitted_whitening_for_every_later_reader(tmp_path, monkeypatch):
    from retrieval import identify
    from retrieval.probe_flows import refresh_gallery_metric

    x, labels = _nuisance(20)
    gallery = Gallery.create(tmp_path / "g", {"spec": _Enc.spec, "fingerprint": _Enc.fingerprint, "dim": DIM})
    gallery.add([ReferenceRecord(path=f"/p/{i}.jpg", species=s) for i, s in enumerate(labels)],
                [f"d{i}" for i in range(len(labels))], x)
    assert not refresh_gallery_metric(gallery)  # no probe: nothing to do
    probe = train_probe(x, labels, fingerprint=_Enc.fingerprint, C=10.0)
    probe.calibration.metric = "whitened"
    probe.whitening = fit_whitening(x, labels)
    probe.save(gallery.root)
    assert not refresh_gallery_metric(gallery)  # it still fits
    new, _ = _nuisance(10, classes=range(5, 6), seed=3)
    gallery.add([ReferenceRecord(path=f"/n/{i}.jpg", species="Novus n") for i in range(10)],
                [f"n{i}" for i in range(10)], new)
    assert refresh_gallery_metric(gallery)  # what `references add` / the API's add do after their write
    saved = LinearProbe.load(gallery.root).whitening
    assert "Novus n" in saved.species and saved.photos == len(labels) + 10
    # a reader whose probe predates the write takes the saved whitening instead of streaming the gallery again
    monkeypatch.setattr(identify, "gallery_whitening", lambda *a, **k: pytest.fail("refitted instead of reading"))
    ident = Identifier(_Enc(), gallery, probe=probe)
    np.testing.assert_array_equal(ident.whitening().matrix, saved.matrix)


def _gallery_of(root, x, labels, prefix="p"):
    gallery = Gallery.create(root, {"spec": _Enc.spec, "fingerprint": _Enc.fingerprint, "dim": DIM})
    _add(gallery, x, labels, prefix)
    return gallery


def _add(gallery, x, labels, prefix):
    return gallery.add([ReferenceRecord(path=f"/{prefix}/{i}.jpg", species=s) for i, s in enumerate(labels)],
                       [f"{prefix}{i}" for i in range(len(labels))], x)


def _whitened_gallery(root):
    """A gallery of 80 photos whose probe votes on the whitened metric, trained as `probe train` does (which saves
    the whitening's statistics); (gallery, ids, vectors, species)."""
    from retrieval.probe import Calibration
    from retrieval.probe_flows import _metric_for

    x, labels = _nuisance(20)
    gallery = _gallery_of(root, x, labels)
    ids, vectors = gallery.store.vectors()
    labels = [str(s) for s in gallery.store.metadata(ids)["species"]]
    probe = train_probe(vectors, labels, fingerprint=_Enc.fingerprint, C=10.0)
    probe.calibration = Calibration(metric="whitened")
    probe.whitening = _metric_for(probe.calibration, gallery, ids, vectors, labels)
    probe.save(gallery.root)
    return gallery, ids, vectors, labels


def test_whitening_sums_remove_what_was_added():
    x, labels = _nuisance(10)
    new, _ = _nuisance(6, classes=range(4, 5), seed=2)
    stats = WhiteningStats(dim=DIM)
    stats.add(x, labels)
    stats.add(new, ["Novus n"] * 6)
    stats.remove(new, ["Novus n"] * 6)
    stats.remove(x[:3], labels[:3])
    assert "Novus n" not in stats.species_count and stats.count == len(x) - 3  # a species left empty is dropped
    again = WhiteningStats.from_arrays(stats.to_arrays())  # what the gallery saves
    want = fit_whitening(x[3:], labels[3:])
    for got in (stats.fit(), again.fit()):
        np.testing.assert_allclose(got.matrix, want.matrix, atol=1e-4)
        np.testing.assert_allclose(got.mean, want.mean, atol=1e-6)
        assert got.species == want.species and got.photos == want.photos
    with pytest.raises(ValueError, match="never added"):
        stats.remove(new[:1], ["Novus n"])


def test_a_refit_reads_only_the_rows_that_came_and_went(tmp_path, monkeypatch):
    from index.store import ReferenceStore
    from retrieval import whitening_sync
    from retrieval.whitening_sync import gallery_stats, load_stats

    x, labels = _nuisance(15)
    gallery = _gallery_of(tmp_path / "g", x, labels)
    first = gallery_stats(gallery, save=True)  # no saved sums yet: the store is streamed once
    assert first.stats.count == len(x) and gallery.layout.whitening_stats.is_file()
    # then: a new species, a deleted photo, an excluded photo, without streaming the store again
    new, _ = _nuisance(8, classes=range(4, 5), seed=4)
    _add(gallery, new, ["Novus n"] * 8, "n")
    ids, _ = gallery.store.vectors()
    gallery.delete([int(ids[0])])
    gallery.set_excluded([int(ids[20])])
    read = []
    real_vectors = ReferenceStore.vectors
    monkeypatch.setattr(ReferenceStore, "iter_vectors", lambda *a, **k: pytest.fail("streamed the whole store"))
    monkeypatch.setattr(ReferenceStore, "vectors",
                        lambda self, **k: read.append(len(k.get("ids") or [])) or real_vectors(self, **k))
    synced = gallery_stats(gallery, save=True)
    assert sorted(read) == [2, 8]  # the deleted and the excluded row (at the old version), then the 8 new rows
    monkeypatch.undo()
    scanned = whitening_sync.scan_stats(gallery)
    np.testing.assert_array_equal(synced.ids, scanned.ids)
    want, got = scanned.stats.fit(), synced.stats.fit()
    np.testing.assert_allclose(got.matrix, want.matrix, atol=1e-4)
    assert got.species == want.species and got.photos == len(x) + 8 - 2
    assert load_stats(gallery).stats.count == got.photos  # saved for the next refit


def test_a_refit_streams_the_store_when_no_difference_can_be_made(tmp_path, monkeypatch, caplog):
    from index.store import ReferenceStore
    from retrieval.whitening_sync import gallery_stats, load_stats, save_stats, scan_stats

    x, labels = _nuisance(12)
    gallery = _gallery_of(tmp_path / "g", x, labels)
    saved = gallery_stats(gallery, save=True)
    ids, _ = gallery.store.vectors()
    gallery.delete([int(ids[0])])
    # the version the sums were read at is cleaned up and the row went for good: only a full stream can tell
    monkeypatch.setattr(ReferenceStore, "at_version", lambda self, v: (_ for _ in ()).throw(ValueError("cleaned")))
    with caplog.at_level("INFO"):
        current = gallery_stats(gallery)
    assert "not brought up to date by difference" in caplog.text and current.stats.count == len(x) - 1
    np.testing.assert_allclose(current.stats.fit().matrix, scan_stats(gallery).stats.fit().matrix, atol=1e-5)
    # sums another encoder made, or an unreadable file, are not used
    saved.fingerprint = "other#1"
    save_stats(gallery, saved)
    assert load_stats(gallery) is None
    gallery.layout.whitening_stats.write_bytes(b"not an npz")
    assert load_stats(gallery) is None and gallery_stats(gallery).stats.count == len(x) - 1


def test_probe_training_saves_the_sums_the_next_write_starts_from(tmp_path, monkeypatch):
    from index.store import ReferenceStore
    from retrieval.probe_flows import refresh_gallery_metric

    gallery, ids, vectors, labels = _whitened_gallery(tmp_path / "g")
    assert gallery.layout.whitening_stats.is_file()  # saved by the probe's training
    new, _ = _nuisance(10, classes=range(5, 6), seed=3)
    _add(gallery, new, ["Novus n"] * 10, "n")
    monkeypatch.setattr(ReferenceStore, "iter_vectors", lambda *a, **k: pytest.fail("streamed the whole store"))
    assert refresh_gallery_metric(gallery)  # a new species: refitted from the saved sums + the 10 new rows
    saved = LinearProbe.load(gallery.root).whitening
    want = fit_whitening(np.concatenate([vectors, new]), labels + ["Novus n"] * 10)
    np.testing.assert_allclose(saved.matrix, want.matrix, atol=1e-4)
    assert saved.photos == len(ids) + 10


def test_exclusions_and_their_restore_refit_the_saved_whitening(tmp_path):
    from retrieval import workflows
    from retrieval.clean import apply_exclusions
    from retrieval.findings import Finding

    gallery, ids, vectors, labels = _whitened_gallery(tmp_path / "g")
    gone = [int(i) for i in ids[::4]]  # a quarter of the photos: more than the 10% a whitening tolerates
    # what `clean --apply` does with off-target findings of those photos (its checks are tested in test_clean.py)
    apply_exclusions(gallery, [Finding("off-target", 0.9, f"/p/{i}.jpg", reference_id=i) for i in gone])
    assert LinearProbe.load(gallery.root).whitening.photos == len(ids) - len(gone)  # refitted after the exclusions
    _, restored = workflows.restore_exclusions(gallery.root)
    assert restored == len(gone)
    saved = LinearProbe.load(gallery.root).whitening
    assert saved.photos == len(ids)  # refitted by the restore, from the saved sums + the rows that came back
    np.testing.assert_allclose(saved.matrix, fit_whitening(vectors, labels).matrix, atol=1e-4)


def test_the_whitened_vote_follows_other_writers_without_asking_the_store_on_every_query(tmp_path, monkeypatch):
    """The vote's whitening is checked against the rows the index serves (``Gallery.version``), which a search
    refreshes at most every ``refresh_s``: no store round trip per query, and another process's new species is
    still voted on whitened after the refresh."""
    from index.store import ReferenceStore

    gallery, _, _, _ = _whitened_gallery(tmp_path / "g")
    reader = Gallery.open(tmp_path / "g", refresh_s=3600.0)
    ident = Identifier(_Enc(), reader, probe=LinearProbe.load(reader.root))
    x, _ = _nuisance(3, seed=5)
    ident.voting_neighbours(x)  # the first search checks the store and fits (or keeps) the whitening
    first = ident.whitening()
    calls = []
    version = ReferenceStore.version
    monkeypatch.setattr(ReferenceStore, "version", property(lambda self: calls.append(1) or version.fget(self)))
    for _ in range(5):
        ident.voting_neighbours(x)
    assert calls == []  # within refresh_s: the index's own version, no LanceDB call
    # another process (its own Gallery object) adds a species; the reader's next refresh sees it and refits
    new, _ = _nuisance(10, classes=range(5, 6), seed=3)
    _add(gallery, new, ["Novus n"] * 10, "n")
    assert ident.whitening() is first  # not refreshed yet: the rows it serves are unchanged
    reader.refresh(force=True)
    assert "Novus n" in ident.whitening().species
    assert ident.whitening().photos == first.photos + 10
    assert calls  # the refresh asked the store


def test_the_species_metadata_follow_the_served_rows_without_asking_the_store_on_every_answer(tmp_path, monkeypatch):
    """``Identifier.taxa()`` is cached per ``Gallery.version``: answers within ``refresh_s`` make no store round
    trip; this process's own add shows at once, another process's after the refresh that brings its rows."""
    from index.store import ReferenceStore

    gallery, _, _, _ = _whitened_gallery(tmp_path / "g")
    reader = Gallery.open(tmp_path / "g", refresh_s=3600.0)
    ident = Identifier(_Enc(), reader, probe=LinearProbe.load(reader.root))
    x, _ = _nuisance(3, seed=5)
    ident.identify_embeddings(x)  # the first answers read the species once
    before = set(ident.taxa())
    calls = []
    version = ReferenceStore.version
    monkeypatch.setattr(ReferenceStore, "version", property(lambda self: calls.append(1) or version.fget(self)))
    for _ in range(3):
        ident.identify_embeddings(x)
    assert calls == []  # within refresh_s: no LanceDB call per answer
    # another process (its own Gallery object) adds a species: not served yet, so not listed yet
    new, _ = _nuisance(10, classes=range(5, 6), seed=3)
    _add(gallery, new, ["Novus n"] * 10, "n")
    assert set(ident.taxa()) == before
    reader.refresh(force=True)
    assert set(ident.taxa()) == before | {"Novus n"}
    assert ident.taxa()["Novus n"].count == 10
    # this process's own write shows at once (the add moves the index's version itself)
    mine, _ = _nuisance(5, classes=range(6, 7), seed=4)
    _add(reader, mine, ["Mea m"] * 5, "m")
    assert "Mea m" in ident.taxa()


@pytest.mark.parametrize("metric", ["cosine", "whitened"])
def test_served_vote_matches_the_vote_settings_are_chosen_for(tmp_path, metric):
    """``knn_matrix`` (what calibration scores k, T and the metric with) and the identifier's vote (what is served)
    give the same species probabilities for the same gallery, settings and queries."""
    from retrieval.identify import Method

    x, labels = _nuisance(25)
    gallery = Gallery.create(tmp_path / "g", {"spec": _Enc.spec, "fingerprint": _Enc.fingerprint, "dim": DIM})
    gallery.add([ReferenceRecord(path=f"/p/{i}.jpg", species=s) for i, s in enumerate(labels)],
                [f"d{i}" for i in range(len(labels))], x)
    probe = train_probe(x, labels, fingerprint=_Enc.fingerprint, C=10.0)
    probe.calibration.metric, probe.calibration.k, probe.calibration.temperature = metric, 9, 0.04
    probe.whitening = fit_whitening(x, labels) if metric == "whitened" else None
    ident = Identifier(_Enc(), gallery, probe=probe)
    species = sorted(set(labels))
    col = {s: i for i, s in enumerate(species)}
    q, _ = _nuisance(4, seed=5)
    want = knn_matrix(q, x, np.array([col[s] for s in labels]), len(species), 9, 0.04, metric=metric)
    for row, ns, emb in zip(want, ident.voting_neighbours(q), q, strict=True):
        served = ident.species_scores(ns, emb, method=Method.KNN)
        got = np.array([served.get(s, 0.0) for s in species])
        np.testing.assert_allclose(got, row, rtol=1e-4, atol=1e-5)


def test_an_answer_begun_before_a_probe_reload_does_not_leave_its_whitening_to_the_next(tmp_path):
    """A server loads the probe again while an answer is still voting with the old one: that answer whitens with the
    old probe's whitening, and every later answer with the new probe's (it was cached for the gallery's version,
    whichever probe asked first)."""
    from retrieval.probe_flows import _metric_for

    gallery, ids, vectors, labels = _whitened_gallery(tmp_path / "g")
    ident = Identifier(_Enc(), gallery, probe=LinearProbe.load(gallery.root))
    ident.follow_probe([gallery.root / "probe.json", gallery.root / "probe.npz"],
                       lambda: (LinearProbe.load(gallery.root), None), refresh_s=3600.0)
    old = ident.whitening()
    assert old is not None
    new_probe = LinearProbe.load(gallery.root)
    new_probe.whitening = _metric_for(new_probe.calibration, gallery, ids, vectors, labels)
    new_probe.whitening.shrink = 0.9  # told apart from the old one, and it still fits the gallery
    with ident._pinned():  # an answer in progress, on the old probe
        new_probe.save(gallery.root)
        assert ident.refresh_probe(force=True)  # another thread's answer loaded the new files
        assert ident.whitening().shrink == old.shrink  # this answer keeps its probe's whitening
    after = ident.whitening()
    assert after.shrink == pytest.approx(0.9)  # the new probe's, not the one the older answer fitted meanwhile


@pytest.mark.parametrize("scale", [1e-200, 1.0, 1e200])
def test_tiny_and_huge_query_vectors_keep_their_direction(scale):
    """A query of tiny or huge numbers is the same query as ``[1, 1, 1, 1]``: scaled before its norm is taken, not
    inf (1e-200: the norm underflows to 0) nor zeros (1e200: it overflows) (walk s55, M05)."""
    from retrieval.metric import unit_queries

    q = unit_queries(np.array([[scale, scale, scale, scale], [scale, -2 * scale, 0.0, 2 * scale]]), 4)
    np.testing.assert_allclose(q, [[0.5, 0.5, 0.5, 0.5], [1 / 3, -2 / 3, 0.0, 2 / 3]], rtol=1e-6)
