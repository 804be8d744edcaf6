"""What bringing the store's BTREE indexes over new rows costs (``ReferenceStore.index_new_rows``, Lance's
``optimize_indices``) and what it saves a duplicate lookup (``find_sha256`` of 20 digests), for a store of ``--bulk``
indexed rows plus ``--new`` rows added after the indexes were made (32-row adds, compacted as writes do). Why the
automatic compaction does it once a day, not at every compaction (docs/shared-gallery.md, "Store growth"). Nothing
here asserts: it prints.

The merge is a one-shot job: it runs ``--repeats`` times, each time over ``--new`` more rows added after the last
merge (so the indexed part grows by ``--new`` a repeat), and the script prints its median and spread (min-max).
The lookups are timed ``--reads`` times before and after each merge; it prints their p50 / p95 / p99 over all
repeats, the ratio of the p50s, the machine and the peak RSS of the process.

    nice .venv/bin/python benchmarks/bench_index_new_rows.py                      # 100,000 + 1,000 rows, 64-d
    nice .venv/bin/python benchmarks/bench_index_new_rows.py --bulk 500000 --new 1000
    nice .venv/bin/python benchmarks/bench_index_new_rows.py --bulk 2000 --new 100 --reads 5 --repeats 2   # smoke
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import CpuWatch, median, min_max, peak_rss_mib, percentile_values, percentiles
from _hardware import machine_report


def main() -> None:
    """Build the store, time the lookups, the index merge, and the lookups again; print them."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bulk", type=int, default=100_000, help="indexed rows (default 100000)")
    parser.add_argument("--new", type=int, default=1_000, help="rows added after the indexes (default 1000)")
    parser.add_argument("--dim", type=int, default=64, help="embedding width (default 64)")
    parser.add_argument("--reads", type=int, default=15, help="lookups timed each side of a merge (default 15)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="merges timed, each over --new more rows; median and min-max (default 3)")
    args = parser.parse_args()
    if min(args.bulk, args.new, args.reads, args.repeats) < 1:
        parser.error("--bulk, --new, --reads and --repeats must be 1 or more")
    print(machine_report(), flush=True)
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    watch = CpuWatch()

    from index.records import ReferenceRecord
    from index.store import ReferenceStore

    rng = np.random.default_rng(0)

    def rows(start: int, n: int) -> tuple[list[ReferenceRecord], list[str], np.ndarray]:
        records = [ReferenceRecord(path=f"/p/{i}.jpg", species=f"Genus s{i % 50}") for i in range(start, start + n)]
        return records, [f"{i:064x}" for i in range(start, start + n)], \
            rng.standard_normal((n, args.dim)).astype(np.float32)

    with tempfile.TemporaryDirectory() as tmp:
        store = ReferenceStore(Path(tmp) / "s", args.dim, refresh_s=None)
        for lo in range(0, args.bulk, 100_000):
            n = min(100_000, args.bulk - lo)
            store.add(*rows(lo, n), "e", list(range(lo + 1, lo + n + 1)))
        store.ensure_scalar_indexes()
        merges: list[float] = []
        before: list[float] = []
        after: list[float] = []

        def lookups_ms(probe: list[str]) -> list[float]:
            took = []
            for _ in range(args.reads):
                t0 = time.perf_counter()
                store.find_sha256(probe)
                took.append((time.perf_counter() - t0) * 1e3)
            return took

        for r in range(args.repeats):
            first, end = args.bulk + r * args.new, args.bulk + (r + 1) * args.new
            for lo in range(first, end, 32):
                n = min(32, end - lo)
                store.add(*rows(lo, n), "e", list(range(lo + 1, lo + n + 1)))
            store.compact()
            probe = [f"{i:064x}" for i in rng.integers(0, end, 20)]
            before.extend(lookups_ms(probe))
            t0 = time.perf_counter()
            store.index_new_rows()
            merges.append((time.perf_counter() - t0) * 1e3)
            after.extend(lookups_ms(probe))
            print(f"repeat {r + 1}: {first} indexed + {args.new} new rows: index_new_rows {merges[-1]:.0f} ms",
                  flush=True)
    ratio = percentile_values(before)["p50"] / max(percentile_values(after)["p50"], 1e-9)
    print(f"\n{args.bulk} indexed + {args.new} new rows a repeat ({args.dim}-d), {args.repeats} repeats:\n"
          f"index_new_rows median {median(merges):.0f} ms (min-max {min_max(merges)})\n"
          f"find_sha256 of 20, {len(before)} lookups a side: before the merge {percentiles(before)}; "
          f"after {percentiles(after)}\n"
          f"after / before the merge: {ratio:.2f}x as fast by p50")
    print(f"peak RSS of this process {peak_rss_mib():.0f} MiB; {watch.report()}")


if __name__ == "__main__":
    main()
