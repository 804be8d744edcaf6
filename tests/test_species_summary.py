"""The store's species summary: Arrow group-by tallies equal the row-by-row rule, and this store's own adds and
compactions carry the cached summary forward instead of reading the table again."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from index.records import ReferenceRecord
from index.store import ReferenceStore, SpeciesSummary, _SpeciesTally

DIM = 4


def _by_rows(rows: list[dict]) -> list[SpeciesSummary]:
    """The summary rule spelled out row by row (the loop the store ran before its group-by)."""
    counts: Counter[str] = Counter()
    first: dict[str, tuple] = {}
    commons: dict[str, Counter] = {}
    venoms: dict[str, Counter] = {}
    for r in rows:
        if r.get("excluded"):
            continue
        sp = r["species"]
        counts[sp] += 1
        g0, f0 = first.get(sp, (None, None))
        first[sp] = (g0 or r["genus"], f0 or r["family"])
        if r["common_name"] is not None:
            commons.setdefault(sp, Counter())[r["common_name"]] += 1
        if r["venomous"] is not None:
            venoms.setdefault(sp, Counter())[bool(r["venomous"])] += 1

    def mode(c):
        return None if not c else min(v for v, n in c.items() if n == max(c.values()))

    return [SpeciesSummary(sp, first[sp][0], first[sp][1], mode(commons.get(sp)),
                           None if not venoms.get(sp) else bool(venoms[sp].get(True)), counts[sp])
            for sp in sorted(counts)]


def _rows(rng: np.random.Generator, n: int) -> list[dict]:
    species = ["Naja haje", "Natrix maura", "Vipera aspis", "Bitis arietans"]
    return [{"species": species[int(rng.integers(len(species)))],
             "genus": [None, "", "Naja", "Natrix"][int(rng.integers(4))],
             "family": [None, "", "Elapidae"][int(rng.integers(3))],
             "common_name": [None, "cobra", "asp", "viper"][int(rng.integers(4))],
             "venomous": [None, True, False][int(rng.integers(3))]} for _ in range(n)]


def _stream(store: ReferenceStore) -> list[dict]:
    """The rows in the order the store streams them (an update moves rows: the first genus follows that order)."""
    return store._table.search().select(["species", "genus", "family", "common_name", "venomous",
                                         "excluded"]).limit(None).to_arrow().to_pylist()


def _records(rows: list[dict]) -> list[ReferenceRecord]:
    return [ReferenceRecord(path=f"/p/{i}.jpg", **r) for i, r in enumerate(rows)]


def _add(store: ReferenceStore, rows: list[dict], first_id: int) -> list[int]:
    ids = list(range(first_id, first_id + len(rows)))
    return store.add(_records(rows), [f"{i:064x}" for i in ids], np.ones((len(rows), DIM), np.float32), "enc", ids)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_by_tally_equals_the_row_rule_across_batches(seed):
    rows = _rows(np.random.default_rng(seed), 300)
    tally = _SpeciesTally()
    for start in range(0, len(rows), 70):  # batches, as the store streams them: first and last span them
        part = rows[start:start + 70]
        tally.add(pa.table({c: [r[c] for r in part] for c in ("species", "genus", "family", "common_name",
                                                              "venomous")}))
    assert tally.summaries() == _by_rows(rows)


def test_store_summary_and_own_writes_carry_the_cache(tmp_path):
    rng = np.random.default_rng(5)
    store = ReferenceStore(tmp_path / "s", DIM)
    rows = _rows(rng, 40)
    _add(store, rows, 1)
    store.set_excluded([1, 2, 3], True)
    rows = _stream(store)
    assert sum(bool(r["excluded"]) for r in rows) == 3
    assert store.species() == _by_rows(rows)
    more = _rows(rng, 5) + [{"species": "Echis carinatus", "genus": "Echis", "family": None, "common_name": None,
                              "venomous": True}]
    _add(store, more, 100)  # this store's add: the cache follows it to the version committed
    assert store.cached_species() == (store.version, _by_rows(_stream(store)))
    assert len(_stream(store)) == len(rows) + len(more)
    fresh = ReferenceStore(tmp_path / "s", DIM)
    assert fresh.species() == _by_rows(_stream(store)) == store.species()


def test_another_writers_commit_between_is_read_from_the_table(tmp_path):
    rng = np.random.default_rng(6)
    store = ReferenceStore(tmp_path / "s", DIM, refresh_s=None)
    rows = _rows(rng, 20)
    _add(store, rows, 1)
    before = store.species()
    other = ReferenceStore(tmp_path / "s", DIM)
    theirs = _rows(rng, 4)
    _add(other, theirs, 50)
    mine = _rows(rng, 3)
    _add(store, mine, 80)  # committed on top of the other writer's: the cache is not carried
    assert store.cached_species()[1] == before
    assert len(_stream(store)) == len(rows) + len(theirs) + len(mine)
    assert store.species() == _by_rows(_stream(store)) and store.cached_species()[0] == store.version


def test_a_compaction_carries_the_cache(tmp_path):
    rng = np.random.default_rng(7)
    store = ReferenceStore(tmp_path / "s", DIM)
    rows = []
    for k in range(3):
        part = _rows(rng, 4)
        _add(store, part, 10 * k + 1)
        rows += part
    summary = store.species()
    report = store.compact()
    assert report.version_after > report.version_before  # something was merged
    assert store.cached_species() == (store.version, summary) and summary == _by_rows(_stream(store))
    assert len(_stream(store)) == len(rows)
