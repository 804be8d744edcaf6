"""The IVF-PQ index for big galleries: sharded = one process, approximate vs exact, changes, small sizes."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from index import ivfpq
from index.gallery import Gallery
from index.records import ReferenceRecord
from index.vectors import VectorIndexConfig, exact_search

DIM = 64
ENC = {"spec": "test", "fingerprint": "test#0", "dim": DIM}


def clustered(n: int, seed: int = 0, clusters: int = 80, spread: float = 0.6) -> np.ndarray:
    """Unit vectors around ``clusters`` fixed centres (species-like); ``seed`` draws the points."""
    centres = np.random.default_rng(1234).standard_normal((clusters, DIM))
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = clustered(6000)
    ids = np.arange(10, 6010, dtype=np.int64)
    queries = clustered(200, seed=1)  # fresh vectors of the same distribution (not in the index)
    return x, ids, queries


def test_sharded_build_answers_exactly_like_a_one_process_build(data, tmp_path):
    x, ids, queries = data
    source = ivfpq.ArraySource(ids, x)
    one = ivfpq.build(source, folder=None, shard_rows=len(ids), nprobe=8)
    sharded = ivfpq.build(source, folder=tmp_path, shard_rows=700, nprobe=8)  # 9 shards, merged
    assert sharded.ntotal == one.ntotal == len(ids) and sharded.nlist == one.nlist == 64
    d1, i1 = one.search(queries, 10)
    d2, i2 = sharded.search(queries, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)


def test_approximate_search_against_exact(data, tmp_path):
    x, ids, queries = data
    index = ivfpq.build(ivfpq.ArraySource(ids, x), folder=tmp_path, shard_rows=2000)
    cal = index.calibration
    assert cal["recall_at_10"] >= ivfpq.TARGET_RECALL and cal["nprobe"] == index.nprobe < index.nlist
    _, exact = exact_search(x, ids, queries, 10)
    d, got = index.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact, strict=True)])
    # nprobe was calibrated on stored vectors; it holds for fresh queries of the same distribution
    assert recall >= 0.93, recall
    # the scores are exact (float16 vectors), not PQ estimates, and best first
    pos = np.searchsorted(ids, got)
    np.testing.assert_allclose(index.reconstruct(got[0]), x[pos[0]], atol=1e-3)  # the vectors the re-rank uses
    np.testing.assert_allclose(d, np.einsum("qkd,qd->qk", x[pos], queries), atol=2e-3)
    assert (np.diff(d, axis=1) <= 0).all()
    # codes alone (PQ estimates, no re-rank) are worse: the re-rank is what buys recall
    import faiss

    rough = index._index.search(queries, 10, params=faiss.SearchParametersIVF(nprobe=index.nprobe))[1]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rough, exact, strict=True)]) < recall


def _gallery(root, n: int, x: np.ndarray, **config) -> Gallery:
    g = Gallery.create(root, ENC, index_config=VectorIndexConfig(kind="ivfpq", **config))
    records = [ReferenceRecord(path=f"/p/{i}.jpg", species=f"Genus s{i % 40}") for i in range(n)]
    g.add(records, [f"{i:064x}" for i in range(n)], x[:n])
    g.finish_build()
    return g


def test_changes_after_a_build_survive_save_and_reload(data, tmp_path, monkeypatch):
    x, _, queries = data
    monkeypatch.setattr(ivfpq, "REWRITE_BYTES", 0)  # keep the base file: changes go to the delta file
    g = _gallery(tmp_path / "g", 5000, x)
    assert g.index.kind == "ivfpq" and g.index.ntotal == 5000
    base = g.index._base
    more = [ReferenceRecord(path=f"/q/{i}.jpg", species="Genus new") for i in range(100)]
    new_ids = g.add(more, [f"new{i}" for i in range(100)], x[5000:5100])
    g.delete([1, 2, 3, new_ids[0]])
    g.set_excluded([4, 5], True)
    g.set_excluded([5], False)
    assert g.index._base == base  # no rewrite: 99 added, 4 removed are well under 10 %
    parts = {p.name.rsplit(".", 2)[-2] if p.name.endswith(".npz") else p.suffix for p in g.layout.vectors_parts()}
    assert parts == {".ivfpq", ".f16", ".ids", "delta"}
    expect = g.index.search(queries, 10)
    again = Gallery.open(tmp_path / "g")
    assert again.index.kind == "ivfpq" and again.index._base == base
    np.testing.assert_array_equal(again.index.ids, np.setdiff1d(g.store.ids(), []))
    assert again.index.ntotal == 5000 + 99 - 3 - 1
    got = again.index.search(queries, 10)
    np.testing.assert_array_equal(got[1], expect[1])
    np.testing.assert_allclose(got[0], expect[0], atol=1e-6)
    # past 10 % of changes the base is rewritten and the delta folded into it
    g.add([ReferenceRecord(path=f"/r/{i}.jpg", species="Genus more") for i in range(600)],
          [f"more{i}" for i in range(600)], clustered(600, seed=5))
    assert g.index._base != base and not g.index._delta.size
    reopened = Gallery.open(tmp_path / "g")
    np.testing.assert_array_equal(reopened.index.ids, g.store.ids())


def test_two_writers_share_the_rerank_files(data, tmp_path, monkeypatch):
    x, _, queries = data
    monkeypatch.setattr(ivfpq, "REWRITE_BYTES", 0)
    a = _gallery(tmp_path / "g", 3000, x)
    b = Gallery.open(tmp_path / "g")
    for round_ in range(2):
        for g, tag in ((a, "a"), (b, "b")):
            lo = 3000 + 100 * (2 * round_ + (tag == "b"))
            g.add([ReferenceRecord(path=f"/{tag}/{i}.jpg", species="Genus x") for i in range(lo, lo + 100)],
                  [f"{tag}{i}" for i in range(lo, lo + 100)], x[lo : lo + 100])
    fresh = Gallery.open(tmp_path / "g")
    assert fresh.index.ntotal == fresh.store.count() == 3400
    probe = x[3000:3400]
    _, top = fresh.index.search(probe, 1)
    assert (top[:, 0] == np.sort(fresh.store.ids())[3000:]).mean() > 0.97  # every added vector finds itself
    assert fresh.index._rerank.rows <= 3400 + 200  # appended once each (plus at most one sync's re-appends)


@pytest.mark.parametrize("n", [16, 40, 300, 2000])
def test_small_galleries_work(n):
    x = clustered(n, seed=n)
    ids = np.arange(1, n + 1)
    index = ivfpq.build(ivfpq.ArraySource(ids, x))
    _, top = index.search(x[:5], 3)
    assert (top[:, 0] == ids[:5]).all()
    assert 1 <= index.nlist <= max(1, n // 39) and index.calibration["recall_at_10"] >= 0.95


def test_a_build_with_more_lists_than_vectors_is_refused_naming_the_setting():
    """Walk-tiny 6: FAISS's own RuntimeError ("Number of training points (42) should be at least as large as number
    of clusters (64)") named neither the setting nor what to do. A gallery builds flat instead (VectorIndexConfig)."""
    x = clustered(42, seed=6)
    with pytest.raises(ValueError, match=r"ivfpq_nlist is 64, more lists than the 42 vectors to train them on: lower "
                       r"it, or leave it None \(gallery.json's \"index\": null\)"):
        ivfpq.build(ivfpq.ArraySource(np.arange(42), x), nlist=64)


def test_a_source_with_negative_ids_is_refused():
    """As every index kind refuses them (walk-tiny 7): a search reads a negative id as "no result"."""
    x = clustered(40, seed=7)
    with pytest.raises(ValueError, match=r"ids must be >= 0 \(FAISS marks missing results with negative ids\), "
                       r"got \[-3\]"):
        ivfpq.build(ivfpq.ArraySource(np.r_[-3, np.arange(1, 40)], x))


def test_too_few_vectors_fall_back_to_flat_and_growth_retrains(tmp_path):
    x = clustered(700, seed=3)
    g = _gallery(tmp_path / "g", 10, x)
    assert g.index.kind == "flat"  # ivfpq asked, 10 vectors: flat, said in the log
    g2 = _gallery(tmp_path / "g2", 100, x)
    assert g2.index.kind == "ivfpq" and g2.index.nlist == 2
    g2.add([ReferenceRecord(path=f"/n/{i}.jpg", species="Genus y") for i in range(500)],
           [f"n{i}" for i in range(500)], x[100:600])
    assert g2.index.needs_retrain
    g2.save_index()  # 6x the training size: rebuilt with more lists
    assert not g2.index.needs_retrain and g2.index.nlist == ivfpq.plan(600, DIM)[0] == 15 and g2.index.ntotal == 600


def test_store_reads_stay_small(tmp_path):
    x = clustered(300, seed=4)
    g = _gallery(tmp_path / "g", 300, x)
    names = {i.name for i in g.store._table.list_indices()}
    assert {"id_idx", "sha256_idx"} <= names  # BTREE indexes made when the build finished
    species = g.store.species()
    assert len(species) == 40 and sum(s.count for s in species) == 300
    assert g.store.species() == species and g.store._species_cache[0] == g.store.version
    g.set_excluded([1], True)
    assert sum(s.count for s in g.store.species()) == 299  # a new version: recomputed
    batches = list(g.store.iter_vectors(batch_rows=64))
    assert sum(len(i) for i, _ in batches) == 299 and max(len(i) for i, _ in batches) <= 64
    assert g.store.find_sha256([f"{5:064x}", "f" * 64]) == {f"{5:064x}": 6}


def test_a_store_holding_ids_twice_rebuilds_an_ivfpq_index_with_one_row_per_id(data, tmp_path, caplog):
    """Two machines writing one S3 store can give an id twice. The IVF-PQ build (in shards, into files) keeps the
    first row of each id, as the flat / HNSW builds do (before: the rebuild failed on the duplicate ids)."""
    from index.vectors import VectorIndex, manifest_path

    x, _, queries = data
    n = 600
    g = _gallery(tmp_path / "g", n, x)
    ids = np.sort(g.store.ids())
    twice = ids[[7, n - 1]]  # one inside a shard, the highest id
    others = clustered(2, seed=9)  # the other writer's rows: other vectors under the same ids
    g.store.add([ReferenceRecord(path=f"/other/{i}.jpg", species="Genus other") for i in twice],
                ["d" * 64, "e" * 64], others, g.fingerprint, twice.tolist())
    assert g.store.count() == n + 2
    manifest_path(g.layout.vectors).unlink()  # the index is built again from the store when the gallery opens
    with caplog.at_level("WARNING"):
        again = Gallery.open(g.root, index_config=VectorIndexConfig(kind="ivfpq", shard_rows=128))  # 5 shards
    assert "the store holds 2 ids more than once" in caplog.text
    index = again.index
    assert index.kind == "ivfpq" and index.ntotal == n
    np.testing.assert_array_equal(index.ids, ids)
    # the row kept is each id's first, the one the flat / HNSW builds keep
    np.testing.assert_allclose(index.reconstruct(twice), x[[7, n - 1]], atol=1e-3)
    flat = VectorIndex.build(x[:n], ids, VectorIndexConfig(kind="flat"))
    probe = np.vstack([queries, others, x[[7, n - 1]]])  # fresh vectors, the rows left out, the rows kept
    d, got = index.search(probe, 10)
    assert all(len(set(row.tolist())) == 10 for row in got)  # each id once
    exact_d, exact = flat.search(probe, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact, strict=True)])
    assert recall >= 0.9, recall  # 600 vectors, nprobe calibrated for recall@10 0.95 on stored vectors
    assert (got[-2:, 0] == twice).all()  # a kept row finds its own id first
    kept = x[np.searchsorted(ids, got)]  # scores are the kept rows', re-ranked exactly (float16)
    np.testing.assert_allclose(d, np.einsum("qkd,qd->qk", kept, probe), atol=2e-3)
    assert (d[:, 0] <= exact_d[:, 0] + 2e-3).all()  # never above the flat index's best
    # saved: the next open loads it as it is
    assert Gallery.open(g.root).index.ntotal == n


class _SmallBatches(ivfpq.ArraySource):
    """Reads a shard in batches of 50 rows (a store reads 65,536), so an id's rows can come in two batches."""

    def read(self, shard: tuple[int, int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for s in range(shard[0], shard[1], 50):
            e = min(s + 50, shard[1])
            yield self.ids[s:e], np.ascontiguousarray(self.vectors[s:e])


def test_an_id_repeated_in_a_later_batch_of_its_shard_is_indexed_once(caplog):
    x = clustered(300, seed=6)
    ids = np.arange(1, 301, dtype=np.int64)
    ids[[60, 61, 120]] = ids[10], ids[11], ids[10]  # repeats in the 2nd and 3rd batches of the one shard
    with caplog.at_level("WARNING"):
        index = ivfpq.build(_SmallBatches(ids, x), shard_rows=len(ids))
    assert "the store holds 2 ids more than once ([11, 12]" in caplog.text
    assert index.ntotal == 297 and index.ids.tolist() == np.unique(ids).tolist()
    np.testing.assert_allclose(index.reconstruct([11, 12]), x[[10, 11]], atol=1e-3)  # the first rows


def test_a_count_mismatch_says_it_is_an_internal_error_and_what_to_do(monkeypatch):
    """The error said only "indexed N vectors of M": neither the cause nor a next step."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    monkeypatch.setattr(ivfpq.IvfPqIndex, "ntotal", property(lambda self: int(self._ids.size) - 1))
    with pytest.raises(RuntimeError, match=r"indexed 299 vectors of the 300 rows it read \(one per id\): an internal "
                       r"error, please report it .*--index-kind flat \(or hnsw\)"):
        ivfpq.build(ivfpq.ArraySource(np.arange(300, dtype=np.int64), x))


def test_a_calibration_that_never_reaches_its_target_says_so(data, caplog):
    """The ladder's last rung (every list) kept without reaching the recall target: a warning naming the recall
    reached and the target, and ``target_reached`` false in the calibration the manifest records."""
    x, ids, _ = data
    index = ivfpq.build(ivfpq.ArraySource(ids[:2000], x[:2000]), nprobe=4)
    with caplog.at_level("WARNING", logger="index.ivfpq"):
        cal = index.calibrate(target=1.01)  # recall is at most 1.0: never reached
    assert cal["target_reached"] is False and cal["nprobe"] == index.nlist
    assert f"recall@10 reached only {cal['recall_at_10']:.3f} of the 1.01 target" in caplog.text
    said = caplog.text  # the cheaper settings first, with their values now, then the other kinds
    assert ("first raise ivfpq_candidates (now 200 per query) or ivfpq_m (now 16 sub-quantizers for 64 dims; a "
            'divisor of the width) in the "index" object of the gallery\'s gallery.json') in said, said
    assert said.index("ivfpq_candidates") < said.index("--index-kind hnsw or flat"), said
    caplog.clear()
    with caplog.at_level("WARNING", logger="index.ivfpq"):
        assert index.calibrate()["target_reached"] is True
    assert "reached only" not in caplog.text


def test_index_info_says_the_calibration_and_whether_it_reached_its_target(data, tmp_path):
    """index info shows an IVF-PQ gallery's nprobe, the recall it gave and whether the target was reached (a missed
    target was only in vectors.faiss.json and a log line)."""
    from retrieval.workflows import gallery_info

    x, _, _ = data
    g = _gallery(tmp_path / "g", 2000, x)
    info = gallery_info(g)
    cal = info["index_calibration"]
    assert cal == {k: g.index.calibration[k] for k in ("nprobe", "recall_at_10", "target", "target_reached")}
    assert cal["target_reached"] is (cal["recall_at_10"] >= cal["target"])
    flat = Gallery.create(tmp_path / "flat", ENC)
    flat.add([ReferenceRecord(path="/p/a.jpg", species="Genus s")], ["a" * 64], x[:1])
    assert "index_calibration" not in gallery_info(flat)


def test_a_save_counts_the_rerank_files_dead_rows_only_when_the_cheap_bound_does_not_rule_a_rewrite_out(
        data, tmp_path, monkeypatch):
    """Stop 50's left-over: each save searched every re-rank file id among the live ids (~45 ms at 1M references)
    to decide whether to write a new generation. Now a bound from the counts decides first (no id read); the exact
    count runs, and the generation is rewritten, only once enough rows went."""
    from index import rerank

    x, ids, _ = data
    monkeypatch.setattr(rerank, "CHUNK_ROWS", 100)  # the files count as big from 100 rows
    folder = tmp_path / "g"
    folder.mkdir()
    index = ivfpq.build(ivfpq.ArraySource(ids, x), folder=folder, shard_rows=3000)
    path = folder / "vectors.faiss"
    index.save(path, {})
    store = index._rerank
    exact = []
    real = rerank.RerankStore.dead_rows
    monkeypatch.setattr(rerank.RerankStore, "dead_rows", lambda self, live: exact.append(1) or real(self, live))
    token = store.token
    index.remove(ids[:10])
    index.add(x[:3] * 0.5 + 0.5 * x[3:6], np.asarray([90001, 90002, 90003]))  # pending rows
    assert store.dead_rows_at_most(index._ids) >= real(store, index._ids) == 10
    index.save(path, {})
    assert exact == [] and store.token == token  # ruled out by the bound: no id read, the files appended to
    index.remove(ids[10:3100])  # more than half of the file's 6,003 rows gone now
    assert store.dead_rows_at_most(index._ids) >= real(store, index._ids) == 3100
    index.save(path, {})
    assert exact == [1] and store.token != token and store.rows == index.ntotal == len(ids) - 3100 + 3
    from index.vectors import load_index

    assert load_index(path)[0].ntotal == index.ntotal


def test_a_search_nprobe_above_nlist_visits_every_list(data, caplog):
    """search(nprobe=N > nlist) is clamped to nlist, as the constructor clamps its own: FAISS took it unclamped and
    returned wrong neighbours (recall@10 1.0 -> 0.016 in bench_scale)."""
    x, ids, queries = data
    index = ivfpq.build(ivfpq.ArraySource(ids[:2000], x[:2000]), nprobe=4)
    nlist = index.nlist
    _, every = index.search(queries[:20], 10, nprobe=nlist)
    with caplog.at_level("INFO", logger="index.ivfpq"):
        for nprobe in (nlist + 1, 2 * nlist):
            np.testing.assert_array_equal(index.search(queries[:20], 10, nprobe=nprobe)[1], every)
    assert caplog.text.count(f"nprobe {nlist + 1} asked, {nlist} used (the index has {nlist} lists)") == 1
    assert "asked" not in caplog.text.replace(f"nprobe {nlist + 1} asked", "")  # said once, not per search
    # every list visited: the exact top-10 (200 re-ranked candidates out of 2000)
    _, exact = exact_search(x[:2000], ids[:2000], queries[:20], 10)
    assert [set(row) for row in every] == [set(row) for row in exact]
    np.testing.assert_array_equal(index.search(queries[:20], 10, nprobe=-3)[1], index.search(queries[:20], 10,
                                                                                            nprobe=1)[1])
