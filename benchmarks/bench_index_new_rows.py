"""What bringing the store's BTREE indexes over new rows costs (``ReferenceStore.index_new_rows``, Lance's
``optimize_indices``) and what it saves a duplicate lookup (``find_sha256`` of 20 digests), for a store of ``--bulk``
indexed rows plus ``--new`` rows added after the indexes were made (32-row adds, compacted as writes do). Why the
automatic compaction does it once a day, not at every compaction (docs/shared-gallery.md, "Store growth"). Nothing
here asserts: it prints.

    nice .venv/bin/python benchmarks/bench_index_new_rows.py                      # 100,000 + 1,000 rows, 64-d
    nice .venv/bin/python benchmarks/bench_index_new_rows.py --bulk 500000 --new 1000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import CpuWatch
from _hardware import machine_report


def main() -> None:
    """Build the store, time the lookups, the index merge, and the lookups again; print them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bulk", type=int, default=100_000, help="indexed rows (default 100000)")
    parser.add_argument("--new", type=int, default=1_000, help="rows added after the indexes (default 1000)")
    parser.add_argument("--dim", type=int, default=64, help="embedding width (default 64)")
    parser.add_argument("--reads", type=int, default=15, help="lookups timed each side (default 15)")
    args = parser.parse_args()
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
        for lo in range(args.bulk, args.bulk + args.new, 32):
            n = min(32, args.bulk + args.new - lo)
            store.add(*rows(lo, n), "e", list(range(lo + 1, lo + n + 1)))
        store.compact()
        probe = [f"{i:064x}" for i in rng.integers(0, args.bulk + args.new, 20)]

        def lookup_ms() -> float:
            took = []
            for _ in range(args.reads):
                t0 = time.perf_counter()
                store.find_sha256(probe)
                took.append(time.perf_counter() - t0)
            return float(np.median(took)) * 1e3

        before = lookup_ms()
        t0 = time.perf_counter()
        store.index_new_rows()
        merge = (time.perf_counter() - t0) * 1e3
        after = lookup_ms()
    print(f"{args.bulk} indexed + {args.new} new rows ({args.dim}-d): index_new_rows {merge:.0f} ms; "
          f"find_sha256 of 20 p50 {before:.1f} ms before, {after:.1f} ms after")
    print(watch.report())


if __name__ == "__main__":
    main()
