"""Per-write id bookkeeping at 200k and 1M references: NumPy's hash ``np.unique`` against the sorted id-set helpers.

Part 1 (arrays, synthetic ids): what an index's add, remove and load do to its id arrays, before (the
``np.union1d`` / ``np.unique`` code the indexes had) and now (``index.vectors.union_sorted`` / ``sorted_unique`` /
``has_repeats``), and a gallery's sync by difference (``_store_difference``'s unique + set differences of the id
column). Best of ``--repeat`` runs, in ms.

Part 2 (``--gallery N``): a real IVF-PQ gallery of N 64-d rows (``_synth.SpeciesSpace``, N / 100 species, added in
chunks of 20,000 rows, then ``finish_build``), built once under ``--data`` and reused: ``load_index`` of its
saved index, ``Gallery.open``, then one ``Gallery.add`` of one row, its ``set_excluded`` (True, then False) and one
``Gallery.delete`` of it, 3 times each (wall ms), and an IVF-PQ save's count of the re-rank file's dead rows
(exact, and the bound asked first: best of 5 ms); ``--preload``: the resident memory
``Gallery.preload_metadata`` (a server's start) adds for its N rows.
``--repo /work/main`` runs Part 2 with another checkout's ``index`` package (the code before a change),
on the same gallery, for a before/after on one machine.

Prints its timings and asserts no figure; the timed steps assert only their own results (the id arrays
they build: sizes, no repeats), as the code they stand for does. The machine is shared: the CPU kind and the
load average are printed.

    .venv/bin/python benchmarks/bench_ids.py                              # Part 1 at 200k and 1M
    .venv/bin/python benchmarks/bench_ids.py --gallery 1000000 --data runs/ids-data
    .venv/bin/python benchmarks/bench_ids.py --gallery 1000000 --data runs/ids-data --repo ../main
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
from _common import REPO, CpuWatch


def _best_ms(fn, repeat: int) -> float:
    """Best of ``repeat`` timed calls of ``fn``, ms, after one untimed call (a first call's imports and caches)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _old_add(ids: np.ndarray, delta: np.ndarray, tomb: np.ndarray, new: np.ndarray) -> None:
    got = np.union1d(ids, new)
    back = np.isin(new, tomb)
    np.setdiff1d(tomb, new[back], assume_unique=True)
    np.union1d(delta, new[~back])
    assert got.size == ids.size + new.size


def _new_add(ids: np.ndarray, delta: np.ndarray, tomb: np.ndarray, new: np.ndarray) -> None:
    from index.vectors import in_sorted, union_sorted

    got = union_sorted(ids, new)
    back = in_sorted(new, tomb)
    np.setdiff1d(tomb, new[back], assume_unique=True)
    union_sorted(delta, new[~back])
    assert got.size == ids.size + new.size


def _old_remove(ids: np.ndarray, delta: np.ndarray, tomb: np.ndarray, gone: np.ndarray) -> None:
    held = np.unique(gone)
    held = held[np.isin(held, ids, assume_unique=True)]
    np.setdiff1d(ids, held, assume_unique=True)
    fresh = np.isin(held, delta)
    np.setdiff1d(delta, held[fresh], assume_unique=True)
    np.union1d(tomb, held[~fresh])


def _new_remove(ids: np.ndarray, delta: np.ndarray, tomb: np.ndarray, gone: np.ndarray) -> None:
    from index.vectors import held_ids, in_sorted, union_sorted

    held = held_ids(gone, ids)
    np.setdiff1d(ids, held, assume_unique=True)
    fresh = in_sorted(held, delta)
    np.setdiff1d(delta, held[fresh], assume_unique=True)
    union_sorted(tomb, held[~fresh])


def _old_difference(stored: np.ndarray, have: np.ndarray) -> None:
    stored = np.unique(stored)
    np.setdiff1d(stored, have, assume_unique=True)
    np.setdiff1d(have, stored, assume_unique=True)


def _new_difference(stored: np.ndarray, have: np.ndarray) -> None:
    from index.vectors import sorted_unique

    stored = sorted_unique(stored)
    np.setdiff1d(stored, have, assume_unique=True)
    np.setdiff1d(have, stored, assume_unique=True)


def _old_load(raw: np.ndarray) -> None:
    ids = np.sort(raw)
    assert np.unique(ids).size == ids.size


def _new_load(raw: np.ndarray) -> None:
    from index.vectors import has_repeats

    ids = np.sort(raw)
    assert not has_repeats(ids)


def arrays(sizes: list[int], repeat: int) -> None:
    """Part 1: the id-array work of one add, one remove, one load and one sync, before and now."""
    print(f"\nPart 1: id arrays (best of {repeat} after a warm-up call, ms; numpy {np.__version__})")
    print(f"{'n':>9} | {'step':<34} | {'before':>9} | {'now':>9} | {'x':>6}")
    rng = np.random.default_rng(0)
    for n in sizes:
        ids = np.sort(rng.choice(np.arange(3 * n, dtype=np.int64), size=n, replace=False))  # gaps: deletes
        delta, tomb = ids[-1000:], np.setdiff1d(np.arange(3 * n - 2000, 3 * n, dtype=np.int64), ids)[:500]
        new = np.asarray([3 * n + 5], dtype=np.int64)  # a reserved id: above every held one
        raw = rng.permutation(ids)  # invlist order
        stored = np.sort(np.concatenate([ids[: n - 1], new]))  # one delete, one add by another process
        one = ids[n // 2:n // 2 + 1]
        rows = [
            ("add 1 id (ids, delta, tomb)", _old_add, _new_add, (ids, delta, tomb, new)),
            ("remove 1 id (ids, delta, tomb)", _old_remove, _new_remove, (ids, delta, tomb, one)),
            ("load: sort + duplicate check", _old_load, _new_load, (raw,)),
            ("sync: unique + differences", _old_difference, _new_difference, (stored, ids)),
        ]
        for name, old, now, inputs in rows:
            before, after = _best_ms(partial(old, *inputs), repeat), _best_ms(partial(now, *inputs), repeat)
            print(f"{n:>9,} | {name:<34} | {before:>9.2f} | {after:>9.3f} | {before / max(after, 1e-6):>6.1f}")


def _build(root: Path, n: int) -> None:
    from _synth import SpeciesSpace

    from index.gallery import Gallery
    from index.records import ReferenceRecord
    from index.vectors import VectorIndexConfig

    enc = {"spec": "bench:ids", "fingerprint": "bench:ids#64", "dim": 64}
    space = SpeciesSpace(max(50, n // 100), seed=0, dim=64)
    t0 = time.perf_counter()
    g = Gallery.create(root, enc, index_config=VectorIndexConfig(kind="ivfpq"))
    chunk = 20_000
    for c, s in enumerate(range(0, n, chunk)):
        m = min(chunk, n - s)
        x, sp = space.chunk(c, m)
        recs = [ReferenceRecord(path=f"/photos/s{int(k)}/{s + i}.jpg", species=f"Genus{int(k) // 8} sp{int(k)}")
                for i, k in enumerate(sp)]
        g.add(recs, [f"{s + i:064x}" for i in range(m)], x, save_index=False)
    g.finish_build()
    print(f"built {len(g):,} rows in {time.perf_counter() - t0:.0f} s under {root}")


def gallery(n: int, data: Path, preload: bool) -> None:
    """Part 2: load, open, add one, delete one on a real IVF-PQ gallery of ``n`` rows (built once); ``preload``:
    then the resident memory a server's ``preload_metadata`` adds for all ``n`` rows (its cap lifted)."""
    import index
    from index.gallery import Gallery
    from index.records import ReferenceRecord
    from index.vectors import load_index

    root = data / f"g{n}"
    if not (root / "gallery.json").exists():
        _build(root, n)
    print(f"\nPart 2: gallery of {n:,} 64-d rows ({root}); index package {Path(index.__file__).parent}")
    loads = []
    for _ in range(3):
        t0 = time.perf_counter()
        load_index(root / "vectors.faiss")
        loads.append((time.perf_counter() - t0) * 1e3)
    t0 = time.perf_counter()
    g = Gallery.open(root)
    opened = (time.perf_counter() - t0) * 1e3
    adds, deletes, excludes = [], [], []
    for i in range(3):
        x = np.random.default_rng(100 + i).standard_normal((1, g.dim)).astype(np.float32)
        x /= np.linalg.norm(x)
        t0 = time.perf_counter()
        ids = g.add([ReferenceRecord(path="/photos/new.jpg", species="Genus0 sp0")], [f"{i:x}".rjust(64, "f")], x)
        adds.append((time.perf_counter() - t0) * 1e3)
        for excluded in (True, False):  # left out of search, then brought back
            t0 = time.perf_counter()
            g.set_excluded(ids, excluded)
            excludes.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        g.delete(ids)
        deletes.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"n": n, "load_index_ms": [round(t) for t in loads], "open_ms": round(opened),
                      "add_1_ms": [round(t) for t in adds], "delete_1_ms": [round(t) for t in deletes],
                      "set_excluded_1_ms": [round(t) for t in excludes]}))
    rerank = getattr(g.index, "_rerank", None)  # an IVF-PQ save's question: too many dead re-rank rows?
    if rerank is not None:
        live = g.index.ids
        timed = {"dead_rows_ms": lambda: rerank.dead_rows(live)}
        if hasattr(rerank, "dead_rows_at_most"):  # the bound a save asks first (stop 51)
            timed["dead_rows_at_most_ms"] = lambda: rerank.dead_rows_at_most(live)
        out = {name: round(_best_ms(call, 5), 3) for name, call in timed.items()}
        print(json.dumps({"rerank_rows": rerank.rows, **out, "best_of": 5}))
    if preload:  # what a server's start adds: the metadata of every reference, cached as Neighbour rows
        before = _rss_mib()
        t0 = time.perf_counter()
        rows = g.preload_metadata(max_rows=n)
        took = time.perf_counter() - t0
        print(json.dumps({"preload_rows": rows, "preload_s": round(took, 1),
                          "rss_mib_before": round(before), "rss_mib_after": round(_rss_mib()),
                          "bytes_a_row": round((_rss_mib() - before) * 2**20 / max(rows, 1)),
                          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))


def _rss_mib() -> float:
    """This process's resident memory now (Linux /proc), MiB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[200_000, 1_000_000], help="Part 1's id counts")
    ap.add_argument("--repeat", type=int, default=5, help="Part 1: best of this many runs")
    ap.add_argument("--no-arrays", action="store_true", help="skip Part 1")
    ap.add_argument("--gallery", type=int, default=None, metavar="N", help="Part 2 on an N-row gallery")
    ap.add_argument("--data", type=Path, default=REPO / "runs" / "ids-data", help="where Part 2's gallery is kept")
    ap.add_argument("--preload", action="store_true", help="Part 2: also measure the metadata preload's RSS")
    ap.add_argument("--repo", type=Path, default=None, help="import index/ from this checkout (a before run; Part 2 only)")
    args = ap.parse_args()
    if args.repo is not None:  # before run: the other checkout's index/ (it lacks the helpers Part 1 times)
        sys.path.insert(0, str(args.repo.resolve()))
        args.no_arrays = True
    from _hardware import machine_report

    print(machine_report())
    watch = CpuWatch()
    if not args.no_arrays:
        arrays(args.sizes, args.repeat)
    if args.gallery:
        gallery(args.gallery, args.data.resolve(), args.preload)
    print(watch.report())


if __name__ == "__main__":
    main()
