"""Store growth: each write is one commit and one small fragment; a write compacts them at a threshold, merging small
fragments only (a big bulk one is never rewritten), answers and ids unchanged; ``speciesid index compact``."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import pickle
import re
import time
from pathlib import Path

import numpy as np
import pytest

from api.cli import main
from index.gallery import Gallery
from index.records import ReferenceRecord
from index.store import SMALL_FRAGMENT_ROWS, ReferenceStore
from index.vectors import manifest_path

DIM = 8
ENC = {"spec": "test:synthetic", "fingerprint": "test:synthetic#abc", "dim": DIM}


def _rows(start: int, n: int, rng: np.random.Generator) -> tuple[list[ReferenceRecord], list[str], np.ndarray]:
    records = [ReferenceRecord(path=f"/photos/{i}.jpg", species=f"Genus s{i % 3}") for i in range(start, start + n)]
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return records, [f"{i:064x}" for i in range(start, start + n)], x / np.linalg.norm(x, axis=1, keepdims=True)


def _fragments(store: ReferenceStore) -> list[tuple[int, int, str]]:
    """(fragment id, rows, data file) of the store's latest version."""
    store.refresh()
    return [(f.fragment_id, f.metadata.physical_rows, f.metadata.files[0].path)
            for f in store._dataset().get_fragments()]


def _gallery(tmp_path, threshold: int, name: str = "g") -> Gallery:
    g = Gallery.create(tmp_path / name, ENC, refresh_s=0.0)
    g.compact_fragments = threshold
    return g


def _add_one_by_one(g: Gallery, start: int, n: int, rng: np.random.Generator) -> list[int]:
    ids = []
    for i in range(start, start + n):
        records, digests, x = _rows(i, 1, rng)
        ids += g.add(records, digests, x)
    return ids


def test_compact_merges_the_small_fragments_and_never_rewrites_a_big_one(tmp_path):
    """Lance's default target (1M rows) would rewrite a bulk fragment followed by small ones at every compaction:
    only fragments under SMALL_FRAGMENT_ROWS rows are merged; rows, ids and the scalar indexes stay as they were."""
    rng = np.random.default_rng(0)
    store = ReferenceStore(tmp_path / "s", DIM, refresh_s=None)
    bulk = SMALL_FRAGMENT_ROWS + 100
    store.add(*_rows(0, bulk, rng)[:3], "e", list(range(1, bulk + 1)))
    store.ensure_scalar_indexes()
    for i in range(bulk, bulk + 12):
        records, digests, x = _rows(i, 1, rng)
        store.add(records, digests, x, "e", [i + 1])
    store.set_excluded([3, bulk + 2], True)  # an update: a deletion in the big one, one small fragment gone, one more
    big_before = _fragments(store)[0]
    assert big_before[1] == bulk
    stats = store.fragment_stats(versions=True)
    assert stats.small == 12 and stats.fragments == 13 and stats.versions == store.version
    ids, meta = store.ids(include_excluded=True), store.metadata()
    vec_ids, vectors = store.vectors(include_excluded=True)

    report = store.compact()

    assert _fragments(store)[0] == big_before  # the same fragment, the same data file: not rewritten
    after = store.fragment_stats()
    assert report.small_before == 12 and report.small_after == after.small < 12
    assert report.fragments_after == after.fragments and report.fragments_rewritten >= 11
    assert report.version_after > report.version_before and report.versions_removed == 0
    assert np.array_equal(store.ids(include_excluded=True), ids)
    assert store.ids().tolist() == [i for i in ids.tolist() if i not in (3, bulk + 2)]
    assert store.metadata().sort_index().equals(meta.sort_index())
    got_ids, got = store.vectors(include_excluded=True)
    order, was = np.argsort(got_ids), np.argsort(vec_ids)
    assert np.array_equal(got_ids[order], vec_ids[was]) and np.array_equal(got[order], vectors[was])
    assert {tuple(i.columns) for i in store._table.list_indices()} == {("id",), ("sha256",)}
    plan = store._table.search().where(f"id IN (5, {bulk + 5})").select(["id"]).explain_plan()
    assert "ScalarIndexQuery" in plan  # the id index still answers point lookups
    assert store.find_sha256([f"{5:064x}", f"{bulk + 5:064x}"]) == {f"{5:064x}": 6, f"{bulk + 5:064x}": bulk + 6}


def test_compact_prunes_the_versions_older_than_asked(tmp_path):
    rng = np.random.default_rng(1)
    store = ReferenceStore(tmp_path / "s", DIM, refresh_s=None)
    for i in range(5):
        records, digests, x = _rows(i, 1, rng)
        store.add(records, digests, x, "e", [i + 1])
    kept = store.fragment_stats(versions=True).versions
    assert store.compact(prune_older_than=dt.timedelta(days=7)).versions_removed == 0  # none that old
    old = store.version - 1
    report = store.compact(prune_older_than=dt.timedelta(0))
    assert report.versions_removed >= kept and report.bytes_removed > 0
    assert store.fragment_stats(versions=True).versions == 1
    with pytest.raises(ValueError, match="no longer keeps version"):
        store.at_version(old)  # what retrieval.whitening_sync falls back on
    assert store.count() == 5


def test_a_pruning_compaction_opens_the_dataset_once(tmp_path, monkeypatch):
    """The merge moves the dataset it opened to the version it commits: the prune and the report's counts use that
    one (each open reads the manifest: one request on S3), whether the merge ran or not."""
    rng = np.random.default_rng(11)
    store = ReferenceStore(tmp_path / "s", DIM, refresh_s=None)
    for i in range(5):
        records, digests, x = _rows(i, 1, rng)
        store.add(records, digests, x, "e", [i + 1])
    opened = []
    real = ReferenceStore._dataset

    def counting(self):
        opened.append(self.version)
        return real(self)

    monkeypatch.setattr(ReferenceStore, "_dataset", counting)
    merged = store.compact(prune_older_than=dt.timedelta(0))
    assert len(opened) == 1 and merged.fragments_rewritten == 5 and merged.versions_removed >= 5
    assert merged.fragments_after == 1 and merged.version_after == store.version
    store.add(*_rows(5, 1, rng)[:3], "e", [6])
    store.compact()  # no prune: the version the next one prunes
    opened.clear()
    pruned = store.compact(prune_older_than=dt.timedelta(0))  # one fragment: nothing to merge
    assert len(opened) == 1 and pruned.fragments_rewritten == 0 and pruned.versions_removed >= 1
    monkeypatch.undo()
    assert store.fragment_stats(versions=True).versions == 1 and store.count() == 6


def test_a_write_compacts_at_the_threshold_and_answers_stay_the_same_for_every_process(tmp_path):
    rng = np.random.default_rng(2)
    g = _gallery(tmp_path, threshold=6)
    records, digests, x = _rows(0, 40, rng)
    g.add(records, digests, x)  # a bulk add: one fragment
    other = Gallery.open(tmp_path / "g", refresh_s=0.0)  # another process's view, opened before the compaction
    queries = x[:5] + 0.05
    _add_one_by_one(g, 40, 4, rng)
    assert g.store.fragment_stats().small == 5  # one per commit, nothing merged yet
    before = g.search(queries, 8)
    other.refresh(force=True)
    assert other.search(queries, 8) == before
    meta, stored = g.store.metadata(), g.store.ids()
    version = g.store.version

    g.set_excluded([1], False)  # brings back a bulk row that was not excluded: rows unchanged, one more fragment

    assert g.store.fragment_stats().small == 1  # the sixth small fragment: this write compacted them
    assert g.store.version > version + 1  # the write, then the compaction's commit(s)
    assert g.version == g.store.version  # the index reflects the compacted version: nothing to sync
    assert json.loads(manifest_path(g.layout.vectors).read_text())["store_version"] == g.version
    assert np.array_equal(g.store.ids(), stored) and g.store.metadata().sort_index().equals(meta.sort_index())
    assert g.search(queries, 8) == before
    assert other.refresh(force=True) is False  # the version jumped past one write; the ids it reads are the same
    assert other.version == g.version and np.array_equal(np.sort(other.index.ids), np.sort(g.index.ids))
    assert other.search(queries, 8) == before
    reopened = Gallery.open(tmp_path / "g")  # the saved index names the compacted version: nothing to repair
    assert reopened.version == g.version and reopened.search(queries, 8) == before


def test_a_search_goes_on_while_a_writes_compaction_runs_and_the_saved_index_names_the_compacted_version(
        tmp_path, monkeypatch):
    """Stop 49's left-over: a write's compaction ran inside the gallery's thread lock, so this process's searches
    (a server's) waited for it. Now it runs in the write's hold, outside that lock: a search answers while the
    compaction is held (events, no timing), and the write's save waits for it (the manifest names its version)."""
    import threading

    rng = np.random.default_rng(7)
    g = _gallery(tmp_path, threshold=3)
    records, digests, x = _rows(0, 20, rng)
    g.add(records, digests, x)
    _add_one_by_one(g, 20, 1, rng)
    queries = x[:3] + 0.05
    before = g.search(queries, 5)
    started, release = threading.Event(), threading.Event()
    real = ReferenceStore.compact

    def held(self, **kw):
        started.set()
        assert release.wait(60), "the test never let the compaction go"
        return real(self, **kw)

    monkeypatch.setattr(ReferenceStore, "compact", held)
    failed: list[BaseException] = []

    def write():
        try:
            _add_one_by_one(g, 21, 1, rng)  # the third small fragment: its compaction is due
        except BaseException as exc:  # noqa: BLE001 - raised in the test's thread below
            failed.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert started.wait(60), failed
        answered: list = []
        searcher = threading.Thread(target=lambda: answered.append(g.search(queries, 5)), daemon=True)
        searcher.start()
        searcher.join(60)  # a guard against a hang on the old code (the search waits on the lock): not a timing
        assert answered == [before], "a search waited for the write's compaction"
        assert g.compactions.runs == 0  # still running
    finally:
        release.set()
        writer.join(60)
    assert not failed and g.compactions.runs == 1 and g.store.fragment_stats().small == 1
    assert g.version == g.store.version
    assert json.loads(manifest_path(g.layout.vectors).read_text())["store_version"] == g.version


def test_exclusions_and_deletes_compact_too(tmp_path):
    rng = np.random.default_rng(3)
    g = _gallery(tmp_path, threshold=4)
    g.add(*_rows(0, 10, rng))  # one bulk fragment (ids 1..10)
    singles = _add_one_by_one(g, 10, 2, rng)  # 3 small fragments
    g.set_excluded([2])  # an update writes the row again: a fourth small fragment, compacted at once
    assert g.store.fragment_stats().small == 1
    g.compact_fragments = 0  # off: fragments pile up
    more = _add_one_by_one(g, 12, 4, rng)
    assert g.store.fragment_stats().small == 5
    g.compact_fragments = 4
    assert g.delete([3]) == 1  # a delete makes no fragment, but compacts the ones due
    assert g.store.fragment_stats().small == 1
    searchable = sorted(set(range(1, 11)) - {2, 3} | set(singles) | set(more))
    assert g.store.ids().tolist() == searchable and sorted(g.index.ids.tolist()) == searchable


def test_threshold_zero_never_compacts_and_the_variable_sets_it(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    monkeypatch.setenv("SPECIESID_COMPACT_FRAGMENTS", "0")
    g = Gallery.create(tmp_path / "g", ENC)
    assert g.compact_fragments == 0
    _add_one_by_one(g, 0, 40, rng)
    assert g.store.fragment_stats().small == 40
    monkeypatch.setenv("SPECIESID_COMPACT_FRAGMENTS", "many")
    with pytest.raises(ValueError, match="SPECIESID_COMPACT_FRAGMENTS=many is not a whole number"):
        Gallery.open(tmp_path / "g")


def test_a_failing_compaction_never_fails_the_write(tmp_path, monkeypatch, caplog):
    rng = np.random.default_rng(5)
    g = _gallery(tmp_path, threshold=3)
    _add_one_by_one(g, 0, 2, rng)

    tries = []

    def broken(self, **kw):
        tries.append(1)
        raise RuntimeError("LanceError(IO): disk on fire")

    monkeypatch.setattr(ReferenceStore, "compact", broken)
    with caplog.at_level(logging.WARNING, logger="index.gallery"):
        ids = _add_one_by_one(g, 2, 1, rng)  # the third small fragment: the compaction is tried, and fails
    assert len(ids) == 1 and g.store.ids().tolist()[-1] == ids[0]
    assert g.search(_rows(2, 1, np.random.default_rng(5))[2], 1)[0]  # searchable
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "compacting its store after a write failed (LanceError(IO): disk on fire)" in said
    assert "the write itself is stored" in said and "speciesid index compact --index" in said
    assert g.store.fragment_stats().small == 3 and len(tries) == 1  # nothing merged
    _add_one_by_one(g, 3, 2, rng)
    assert len(tries) == 1  # not tried again at every write: once 3 more have piled up
    monkeypatch.undo()
    _add_one_by_one(g, 5, 1, rng)
    assert g.store.fragment_stats().small == 1 and len(g.store.ids()) == 6


def test_cli_compact_prints_before_and_after_and_prunes(tmp_path, capsys):
    rng = np.random.default_rng(6)
    g = _gallery(tmp_path, threshold=0)
    _add_one_by_one(g, 0, 10, rng)
    ids = g.store.ids()
    assert main(["index", "info", "--index", str(tmp_path / "g")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["store"]["fragments"] == {"fragments": 10, "small": 10, "versions": g.store.version,
                                          "compact_every": 32}

    versions = g.store.version
    assert main(["index", "compact", "--index", str(tmp_path / "g"), "--prune-older-than", "0"]) == 0
    out = capsys.readouterr().out
    assert "fragments: 10 -> 1 (small: 10 -> 1; 10 merged)" in out
    assert f"versions: {versions} -> 1 (" in out and "superseded over 0 s ago pruned" in out and "MB deleted" in out
    # walk chaos #8: the counts add up (before + made - pruned = after): the compaction's own commits are counted
    kept, left, made, pruned = map(int, re.search(r"versions: (\d+) -> (\d+) \((\d+) made by this compaction, "
                                                  r"(\d+) superseded over 0 s ago pruned", out).groups())
    assert made >= 1 and kept + made - pruned == left == 1, out
    reopened = Gallery.open(tmp_path / "g")
    assert np.array_equal(reopened.store.ids(), ids) and reopened.store.fragment_stats(versions=True).versions == 1

    assert main(["index", "compact", "--index", str(tmp_path / "g")]) == 0  # nothing small left: no commit
    out = capsys.readouterr().out
    assert "fragments: 1 -> 1 (small: 1 -> 1; 0 merged)" in out and "superseded over 7d ago pruned" in out


def test_cli_compact_refuses_a_duration_it_cannot_read(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["index", "compact", "--index", str(tmp_path), "--prune-older-than", "7 weeks"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'7 weeks' is not an age: give a number of seconds, or one with a unit (90s, 30m, 12h, 1d, 2w)" in err


def test_the_servers_setting_reads_the_same_variable_and_refuses_a_bad_value(monkeypatch):
    from api.settings import Settings, SettingsError

    monkeypatch.setenv("SPECIESID_COMPACT_FRAGMENTS", "0")
    assert Settings.load().compact_fragments == 0
    monkeypatch.setenv("SPECIESID_COMPACT_FRAGMENTS", "-3")
    with pytest.raises(SettingsError, match="SPECIESID_COMPACT_FRAGMENTS=-3 is not a whole number"):
        Settings.load()
    monkeypatch.delenv("SPECIESID_COMPACT_FRAGMENTS")
    assert Settings.load().compact_fragments == 32


def test_versions_go_by_when_they_were_superseded_never_the_latest():
    """superseded_versions: a version goes once the one after it is older than the age; the latest never."""
    from index.store import superseded_versions

    day = 86400.0
    times = [(3, 0.0), (1, -30 * day), (2, -20 * day)]  # version 3 created now, 2 twenty days ago, 1 thirty
    assert superseded_versions(times, dt.timedelta(days=7), now=0.0) == [1]  # 2 was the latest until now
    assert superseded_versions(times, dt.timedelta(days=25), now=0.0) == []
    assert superseded_versions(times, dt.timedelta(days=7), now=8 * day) == [1, 2]  # 3 stays, however old
    assert superseded_versions(times, dt.timedelta(0), now=-day) == [1, 2]  # 0: all but the latest
    assert superseded_versions([(5, -100 * day)], dt.timedelta(0), now=0.0) == []


def test_a_version_created_long_ago_and_superseded_just_now_is_kept_for_its_readers(tmp_path, monkeypatch):
    """Lance prunes by creation time: after a week without writes, the first compacting write would delete the
    version every reader is pinned to (an IVF-PQ shard's StoreVectors, a server's species(), at_version). The age
    counts from when the version stopped being the latest."""
    import index.store as store_module
    from index.store import StoreVectors

    rng = np.random.default_rng(7)
    store = ReferenceStore(tmp_path / "s", DIM, refresh_s=None)
    for i in range(4):
        store.add(*_rows(i, 1, rng), "e", [i + 1])
    pinned = store.version  # the latest for "30 days": every reader is at it
    view = store.at_version(pinned)
    shard = StoreVectors(str(tmp_path / "s"), DIM, version=pinned)
    assert shard.count() == 4
    store.add(*_rows(4, 1, rng), "e", [5])  # the write that supersedes it, now
    real = store_module.version_times
    month = 30 * 86400.0

    def aged(dataset):  # every version up to the pinned one was made a month ago
        return [(v, t - month if v <= pinned else t) for v, t in real(dataset)]

    monkeypatch.setattr(store_module, "version_times", aged)
    for i in range(5, 8):
        store.add(*_rows(i, 1, rng), "e", [i + 1])
    report = store.compact(prune_older_than=dt.timedelta(days=7))

    assert report.versions_removed == pinned - 1  # those superseded a month ago; the pinned one stays
    assert store.at_version(pinned).count() == 4
    assert view.ids().tolist() == [1, 2, 3, 4] and view.count() == 4  # the pinned reader keeps reading
    task = pickle.loads(pickle.dumps(shard))  # an IVF-PQ shard task reopens the store at the pinned version
    assert sum(len(ids) for part in task.shards(10) for ids, _ in task.read(part)) == 4
    with pytest.raises(ValueError, match="no longer keeps version"):
        store.at_version(pinned - 1)
    assert store.compact(prune_older_than=dt.timedelta(0)).versions_removed > 0  # 0: all but the latest
    assert store.fragment_stats(versions=True).versions == 1 and store.count() == 8


def test_a_writes_compaction_lists_the_versions_at_most_once_a_day_per_folder(tmp_path, monkeypatch):
    """Listing the versions reads every kept manifest (one GET each on S3) inside the write hold: a write's
    compaction prunes at most once per AUTO_PRUNE_EVERY, remembered in the folder (short CLI processes too), and
    then brings the scalar indexes over the rows added since (an index merge: O(all rows))."""
    import lance

    listed = []

    def counting(name: str):
        real = getattr(lance.LanceDataset, name)

        def counted(self, *a, **kw):
            listed.append(name)
            return real(self, *a, **kw)
        return counted

    for name in ("versions", "cleanup_old_versions"):
        monkeypatch.setattr(lance.LanceDataset, name, counting(name))
    rng = np.random.default_rng(8)
    g = _gallery(tmp_path, threshold=0)
    g.add(*_rows(100, 20, rng))
    g.store.ensure_scalar_indexes()
    g.compact_fragments = 2
    compactions = []
    real_compact = ReferenceStore.compact

    def compact(self, **kw):
        compactions.append(kw.get("prune_older_than"))
        return real_compact(self, **kw)

    monkeypatch.setattr(ReferenceStore, "compact", compact)
    _add_one_by_one(g, 0, 6, rng)
    other = Gallery.open(tmp_path / "g", refresh_s=0.0)
    other.compact_fragments = 2
    _add_one_by_one(other, 6, 4, rng)  # another process (a CLI run) of the same folder

    assert len(compactions) >= 4 and compactions[0] is not None and set(compactions[1:]) == {None}
    assert listed.count("versions") == 1 and listed.count("cleanup_old_versions") <= 1
    index = g.store._table.list_indices()[0].name
    assert g.store._table.index_stats(index).num_unindexed_rows > 0  # not at every compaction
    from index.compaction import AUTO_PRUNE_EVERY

    marked = json.loads(g.layout.store_pruned.read_text())
    marked["pruned_at"] -= AUTO_PRUNE_EVERY.total_seconds() + 60  # a day later
    g.layout.store_pruned.write_text(json.dumps(marked))
    _add_one_by_one(g, 10, 2, rng)
    assert compactions[-1] is not None and listed.count("versions") == 2
    g.store.refresh()
    stats = g.store._table.index_stats(index)  # with the day's prune: every row but a write after it
    assert stats.num_indexed_rows >= 31 and stats.num_unindexed_rows <= 1


def test_medium_fragments_do_not_make_every_write_read_the_manifest(tmp_path, monkeypatch):
    """LanceDB's cheap count includes fragments of 8,192-100,000 rows (compactions make them): the write keeps the
    difference, so that single-row adds do not read the manifest each time; a compaction still comes when due."""
    rng = np.random.default_rng(9)
    g = _gallery(tmp_path, threshold=4)
    g.compact_fragments = 0
    rows = SMALL_FRAGMENT_ROWS + 10
    for k in range(5):
        g.add(*_rows(k * rows, rows, rng))  # medium fragments: not small for us, small for LanceDB
    g.compact_fragments = 4
    counted = []
    real = ReferenceStore.fragment_stats
    monkeypatch.setattr(ReferenceStore, "fragment_stats",
                        lambda self, **kw: (counted.append(1), real(self, **kw))[1])
    _add_one_by_one(g, 5 * rows, 3, rng)
    assert len(counted) <= 1  # the first learns how many are medium; the next two decide from the cheap bound
    _add_one_by_one(g, 5 * rows + 3, 1, rng)  # the fourth small fragment: due
    monkeypatch.undo()
    assert g.store.fragment_stats().small == 1 and g.store.fragment_stats().fragments == 6


def test_the_end_of_a_build_merges_small_fragments_only_and_prunes_by_the_same_rule(tmp_path, monkeypatch):
    """finish_build compacts by the write's rule (fragments of 8,192 rows or more are never rewritten), merging the
    build's small fragments into bigger ones, and prunes only versions superseded long ago; ids/sha256 indexed."""
    import index.store as store_module

    rng = np.random.default_rng(10)
    g = _gallery(tmp_path, threshold=0)
    big = SMALL_FRAGMENT_ROWS + 50
    g.add(*_rows(0, big, rng))  # a fragment made earlier (by a 'references add')
    kept = _fragments(g.store)[0]
    pinned = g.store.version
    view = g.store.at_version(pinned)
    for k in range(6):
        g.add(*_rows(big + k * 3000, 3000, rng))  # a build into the existing gallery: chunks of 3,000 rows
    real = getattr(store_module, "version_times", None)

    def aged(dataset):
        return [(v, t - 30 * 86400.0 if v <= pinned else t) for v, t in real(dataset)]

    monkeypatch.setattr(store_module, "version_times", aged, raising=False)
    g.layout.store_pruned.unlink(missing_ok=True)  # a prune is due
    g.finish_build()

    frags = _fragments(g.store)
    assert frags[0] == kept  # not rewritten
    assert [rows for _, rows, _ in frags] == [big, 18000]  # the six chunks merged into one
    assert view.count() == big and g.store.at_version(pinned).count() == big  # superseded just now: kept
    with pytest.raises(ValueError, match="no longer keeps version"):
        g.store.at_version(pinned - 1)
    indexes = g.store._table.list_indices()
    assert {tuple(i.columns) for i in indexes} == {("id",), ("sha256",)}
    assert len(g.index.ids) == big + 18000 and g.layout.store_pruned.is_file()
    g.add(*_rows(big + 18000, 3000, rng))  # a second build: its rows are indexed too
    g.finish_build()
    for index in indexes:
        stats = g.store._table.index_stats(index.name)
        assert stats.num_indexed_rows == big + 21000 and stats.num_unindexed_rows == 0


def test_index_info_help_names_the_store_fragments_block(capsys):
    from api.cli import main

    with pytest.raises(SystemExit) as done:
        main(["index", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0 and "store.fragments: how many, how many small, the versions kept" in out, out


def test_cli_compact_prints_the_store_version_after_its_index_update(tmp_path, capsys):
    """The compaction's index update (id / sha256 over the rows added since) is a commit of its own: the version
    printed 'after' is the store's, not the one before that commit."""
    import re

    rng = np.random.default_rng(9)
    g = _gallery(tmp_path, threshold=0)
    g.add(*_rows(0, 20, rng))
    g.store.ensure_scalar_indexes()  # as a build leaves them
    _add_one_by_one(g, 20, 4, rng)  # rows the indexes do not cover yet
    assert main(["index", "compact", "--index", str(tmp_path / "g")]) == 0
    before, after = map(int, re.search(r"store version: (\d+) -> (\d+)", capsys.readouterr().out).groups())
    assert after == Gallery.open(tmp_path / "g").store.version and after > before + 1  # merged, then indexed


def test_cli_compact_prune_zero_keeps_only_the_latest_version_with_indexes_to_update(tmp_path, capsys):
    """Re-read: the index update committed after the prune, so '--prune-older-than 0' left two versions."""
    rng = np.random.default_rng(10)
    g = _gallery(tmp_path, threshold=0)
    g.add(*_rows(0, 20, rng))
    g.store.ensure_scalar_indexes()
    _add_one_by_one(g, 20, 4, rng)
    assert main(["index", "compact", "--index", str(tmp_path / "g"), "--prune-older-than", "0"]) == 0
    assert " -> 1 (" in capsys.readouterr().out
    assert Gallery.open(tmp_path / "g").store.fragment_stats(versions=True).versions == 1


def test_a_failing_check_is_no_failed_compaction_in_the_counts(tmp_path, monkeypatch):
    """/metrics' compaction failures count compactions that failed, not a failed look at the fragments."""
    rng = np.random.default_rng(11)
    g = _gallery(tmp_path, threshold=2)
    with monkeypatch.context() as broken:
        broken.setattr(ReferenceStore, "small_fragments_at_most", lambda self: 1 / 0)
        _add_one_by_one(g, 0, 3, rng)
    assert g.compactions.failures == 0 and g.compactions.runs == 0
    with monkeypatch.context() as broken:
        broken.setattr(ReferenceStore, "compact", lambda self, **kw: 1 / 0)
        _add_one_by_one(g, 3, 1, rng)
    assert g.compactions.failures == 1 and g.compactions.runs == 0
    _add_one_by_one(g, 4, 2, rng)
    assert g.compactions.runs == 1 and g.compactions.seconds > 0


@pytest.mark.parametrize("server", [True, False])
def test_a_look_at_the_store_during_this_processs_own_compaction_reads_no_id_column(tmp_path, monkeypatch, server):
    """Stop 51's reread: the compaction runs outside the thread lock, so a server's look (or a refresh on another
    thread) saw its commits as another writer's and read the whole id column. It leaves them to the compaction,
    which moves the index to its version itself (events, no timing)."""
    import threading

    rng = np.random.default_rng(7)
    g = _gallery(tmp_path, threshold=3)
    records, digests, x = _rows(0, 20, rng)
    g.add(records, digests, x)
    _add_one_by_one(g, 20, 1, rng)
    g.stale_reads = server
    queries = x[:3] + 0.05
    before = g.search(queries, 5)
    committed, release = threading.Event(), threading.Event()
    real = ReferenceStore.compact

    def held(self, **kw):
        report = real(self, **kw)  # committed: the store's version moved
        committed.set()
        assert release.wait(60), "the test never let the compaction go"
        return report

    monkeypatch.setattr(ReferenceStore, "compact", held)
    reads: list[str] = []
    real_ids = ReferenceStore.ids
    monkeypatch.setattr(ReferenceStore, "ids", lambda self, **kw: reads.append("ids") or real_ids(self, **kw))
    writer = threading.Thread(target=lambda: _add_one_by_one(g, 21, 1, rng))
    writer.start()
    try:
        assert committed.wait(60)
        looks = g.store_checks
        assert g.refresh(force=True) is False  # the look (a server's: in its thread) while the compaction runs
        assert g.store_checks == looks + server  # it did look
        assert reads == [], "a look read the id column during this process's own compaction"
    finally:
        release.set()
        writer.join(60)
    assert g.compactions.runs == 1 and g.version == g.store.version  # the compaction moved the index itself
    assert g.refresh(force=True) is False and reads == [] and g.search(queries, 5) == before


def test_a_look_that_read_a_version_before_this_processs_write_reads_no_id_column(tmp_path, monkeypatch):
    """A server's look that read the store's version, then found the index past it (a write or a compaction of
    this process committed meanwhile: versions only grow), leaves it: the write synced the index itself."""
    from index.gallery import _StoreCheck

    rng = np.random.default_rng(8)
    g = _gallery(tmp_path, threshold=0)
    g.add(*_rows(0, 5, rng))
    _add_one_by_one(g, 5, 2, rng)
    g.stale_reads = True
    reads: list[str] = []
    real_ids = ReferenceStore.ids
    monkeypatch.setattr(ReferenceStore, "ids", lambda self, **kw: reads.append("ids") or real_ids(self, **kw))
    synced = g.version
    g._lock.acquire()  # as _run_check enters _sync_behind
    g._sync_behind(_StoreCheck(0.0), synced - 1)
    assert reads == [] and g.version == synced  # never moved back to the older version


def test_two_store_writes_in_one_write_keep_the_first_ones_save_of_the_index(tmp_path):
    """A store write whose compaction was due with a save, then another in the same outer write due without one:
    the second overwrote the first's pending (small, save), so the index was not saved after the compaction and the
    manifest named an older version."""
    rng = np.random.default_rng(9)
    g = _gallery(tmp_path, threshold=3)
    g.add(*_rows(0, 10, rng))
    _add_one_by_one(g, 10, 1, rng)
    saved = json.loads(manifest_path(g.layout.vectors).read_text())["store_version"]
    with g._write():
        _add_one_by_one(g, 11, 1, rng)  # the third small fragment: due, with the index saved after
        records, digests, x = _rows(12, 1, rng)
        g.add(records, digests, x, save_index=False)  # due again (not compacted yet), no save of its own
        assert g.compactions.runs == 0
    assert g.compactions.runs == 1 and g.version == g.store.version
    assert json.loads(manifest_path(g.layout.vectors).read_text())["store_version"] == g.version != saved


def test_a_prune_of_every_old_version_deletes_a_killed_writers_unused_file_when_no_writer_can_run(tmp_path, capsys):
    """Walk chaos #3: a writer killed after it wrote a data file, before its commit, left the file, which no
    version uses, and 'index compact --prune-older-than 0' kept it (Lance keeps such files 7 days: a writer's in
    progress looks the same). A zero-age prune of a local store, with no Ray build journalled and no build running,
    now passes Lance's delete_unverified; otherwise the file stays."""
    from index.build_mark import building

    rng = np.random.default_rng(8)
    g = _gallery(tmp_path, threshold=0)
    _add_one_by_one(g, 0, 3, rng)
    data = Path(g.store.uri) / "data"
    orphan = data / ("0" * 40 + ".lance")
    orphan.write_bytes(next(data.glob("*.lance")).read_bytes())  # a data file no version names
    two_hours_ago = time.time() - 2 * 3600
    os.utime(orphan, (two_hours_ago, two_hours_ago))  # older than UNVERIFIED_GRACE: no writer's in progress
    assert main(["index", "compact", "--index", str(tmp_path / "g"), "--prune-older-than", "1s"]) == 0
    assert orphan.exists()  # not a zero age: kept
    with building(tmp_path / "g", key={"dataset": "folder"}):  # a build runs: kept
        capsys.readouterr()
        assert main(["index", "compact", "--index", str(tmp_path / "g"), "--prune-older-than", "0"]) == 0
    assert orphan.exists()
    assert "  unused files of killed writers (if any): kept: a build or add is running\n" in capsys.readouterr().out
    assert main(["index", "compact", "--index", str(tmp_path / "g"), "--prune-older-than", "0"]) == 0
    out = capsys.readouterr().out
    assert not orphan.exists(), out
    assert "  unused files of killed writers: 1 deleted\n" in out
    reopened = Gallery.open(tmp_path / "g")
    assert len(reopened) == 3 and sorted(reopened.store.ids().tolist()) == [1, 2, 3]


def test_a_prune_of_every_old_version_keeps_unused_files_while_one_is_young(tmp_path, capsys):
    """Re-read chaos #1: a writer this folder's lock cannot see (an older speciesid's Ray build, a folder whose flock
    is not shared) may be between its file writes and its commit: its files are seconds old. A zero-age prune keeps
    every unused file while one is younger than UNVERIFIED_GRACE, and says so; an old one alone is deleted."""
    rng = np.random.default_rng(8)
    g = _gallery(tmp_path, threshold=0)
    _add_one_by_one(g, 0, 3, rng)
    data = Path(g.store.uri) / "data"
    old, young = data / ("0" * 40 + ".lance"), data / ("1" * 40 + ".lance")
    for orphan in (old, young):
        orphan.write_bytes(next(data.glob("*.lance")).read_bytes())  # data files no version names
    two_hours_ago = time.time() - 2 * 3600
    os.utime(old, (two_hours_ago, two_hours_ago))
    capsys.readouterr()
    assert main(["index", "compact", "--index", str(tmp_path / "g"), "--prune-older-than", "0"]) == 0
    assert old.exists() and young.exists()  # one is young: both kept
    assert ("  2 unused file(s) kept, one written in the last 1h: a writer may still commit them; run again later\n"
            in capsys.readouterr().out)
    os.utime(young, (two_hours_ago, two_hours_ago))  # an hour on, nothing committed them: a killed writer's
    assert main(["index", "compact", "--index", str(tmp_path / "g"), "--prune-older-than", "0"]) == 0
    assert not old.exists() and not young.exists()
    assert "  unused files of killed writers: 2 deleted\n" in capsys.readouterr().out
    assert sorted(Gallery.open(tmp_path / "g").store.ids().tolist()) == [1, 2, 3]


def test_a_prune_of_every_old_version_keeps_unused_files_while_a_ray_journal_is_held(tmp_path, capsys):
    """Re-read chaos #9: a live Ray chunk's journal alone (no build mark) keeps a killed writer's old unused file,
    and compact says why; once the journal goes, the file is deleted."""
    from index.fragments import PendingFiles

    rng = np.random.default_rng(8)
    g = _gallery(tmp_path, threshold=0)
    _add_one_by_one(g, 0, 3, rng)
    data = Path(g.store.uri) / "data"
    orphan = data / ("0" * 40 + ".lance")
    orphan.write_bytes(next(data.glob("*.lance")).read_bytes())
    two_hours_ago = time.time() - 2 * 3600
    os.utime(orphan, (two_hours_ago, two_hours_ago))
    pending = PendingFiles(tmp_path / "g", g.store.uri, g.store.version)  # a chunk's driver, still at work
    try:
        capsys.readouterr()
        assert main(["index", "compact", "--index", str(tmp_path / "g"), "--prune-older-than", "0"]) == 0
        out = capsys.readouterr().out
        assert orphan.exists()
        assert (f"  unused files of killed writers (if any): kept: a Ray build's journal {pending.path.name} (driver "
                f"pid {os.getpid()} on host ") in out, out
    finally:
        pending.committed()
    assert main(["index", "compact", "--index", str(tmp_path / "g"), "--prune-older-than", "0"]) == 0
    assert not orphan.exists()


def test_a_zero_age_prune_after_a_delete_counts_no_live_deletion_file_as_unused(tmp_path, capsys):
    """Re-read 4 #5: the deletion file's path got ``_deletions/`` twice, so the live version's deletion file
    counted as unused: after any recent delete a zero-age prune said "1 unused file(s) kept, ... run again later"
    and kept a killed writer's old file, and later said "N deleted" of files it never deleted. Now the deletion
    file of the live version is no unused file: the old orphan is deleted, the deletion file kept, and the count
    is of what was deleted."""
    rng = np.random.default_rng(9)
    g = _gallery(tmp_path, threshold=0)
    records, digests, x = _rows(0, 4, rng)
    ids = g.add(records, digests, x)
    g.delete(ids[1:2])
    root = Path(g.store.uri)
    deletions = sorted((root / "_deletions").glob("*"))
    assert deletions  # the delete wrote a deletion file, which the latest version names
    data = root / "data"
    orphan = data / ("0" * 40 + ".lance")
    orphan.write_bytes(next(data.glob("*.lance")).read_bytes())  # a data file no version names
    two_hours_ago = time.time() - 2 * 3600
    os.utime(orphan, (two_hours_ago, two_hours_ago))
    capsys.readouterr()
    assert main(["index", "compact", "--index", str(tmp_path / "g"), "--prune-older-than", "0"]) == 0
    out = capsys.readouterr().out
    assert not orphan.exists(), out
    assert "  unused files of killed writers: 1 deleted\n" in out, out
    assert sorted(Gallery.open(tmp_path / "g").store.ids().tolist()) == sorted(i for i in ids if i != ids[1])
