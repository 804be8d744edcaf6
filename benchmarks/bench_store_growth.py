"""Store growth under single-row writes: ``Gallery.add`` of one photo at a time (the API's path: one upload, one
commit, one small LanceDB fragment), with the automatic compaction off (every release before it: fragments pile up)
and on (``SPECIESID_COMPACT_FRAGMENTS``, default 32), side by side in one run.

Each side runs in its own process (peak memory is its own): a gallery built from ``--bulk`` rows (one add, then
``finish_build``: compacted, id and sha256 indexed, as ``speciesid index build`` leaves it), then ``--adds`` timed
adds of one random ``--dim``-d row (precomputed embeddings: no encoder). At each checkpoint (after 0, 200, 400, 600
adds by default) it times what a request pays: an identify's nearest + its neighbours' metadata read from the store
(:meth:`ReferenceStore.metadata`, as for any neighbour not cached yet), and ``ids()`` (each sync with other processes'
writes), ``--reads`` times each; and counts the store's files, MB on disk and fragments. Prints the machine, a table
per side, its peak memory (VmHWM of its own process, and the part the imports held before the gallery), and the
on / off ratios. Nothing here asserts: it prints.

    nice .venv/bin/python benchmarks/bench_store_growth.py          # 600 adds, 1000 bulk rows, 512-d (1.5 min)
    nice .venv/bin/python benchmarks/bench_store_growth.py --adds 1000 --checkpoints 0 250 500 1000   # docs' table
    nice .venv/bin/python benchmarks/bench_store_growth.py --adds 100 --checkpoints 0 50 100          # a quick look
    nice .venv/bin/python benchmarks/bench_store_growth.py --reader   # + identifies from a thread during the adds
    nice .venv/bin/python benchmarks/bench_store_growth.py --side on --cache both --adds 600 --bulk 60 --dim 1024
        # the store's LanceDB caches: LanceDB's own caps (1 GiB + 6 GiB) against speciesid's (index.store_cache)

Each checkpoint also records the process's anonymous memory (RssAnon) and the size of the stores' shared LanceDB
session (:func:`index.store.store_session`); ``--cache`` picks its caps: ``capped`` (speciesid's,
SPECIESID_STORE_METADATA_CACHE_MB / _INDEX_CACHE_MB), ``lance`` (LanceDB's own, as every release before them), or
``both``, side by side.

The 'off' side slows down with every add (each read opens every fragment): 1000 adds took it ~3.5 min (Intel Xeon,
AMX kind, 2 cores, other processes using 1.2-1.3 of them; the default run above: 1 min 26 s wall, others
using 0.17).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _common import CpuWatch, percentile_values, status_mib
from _hardware import machine_report

MARK = "@@bench@@ "
#: LanceDB's own cache caps, MiB (metadata, index): what every store had before index.store_cache.
LANCE_CAPS_MB = (1024, 6144)


def _disk(folder: Path) -> tuple[int, float]:
    """(files, MB) under a folder."""
    files, size = 0, 0
    for root, _, names in os.walk(folder):
        for name in names:
            files += 1
            size += os.path.getsize(os.path.join(root, name))
    return files, size / 1e6


def _pcts(values_ms: list[float]) -> dict[str, float]:
    """p50 / p95 / p99 (:func:`_common.percentile_values`) and the max of a list of milliseconds."""
    return {**percentile_values(values_ms), "max": float(max(values_ms))}


def child(args: argparse.Namespace) -> dict:
    """One side: the gallery, the timed adds and the checkpoints' reads; a dict of figures."""
    from index.gallery import Gallery
    from index.records import ReferenceRecord
    from index.store import store_session
    from index.store_cache import set_cache_mb

    if args.cache == "lance":
        set_cache_mb(metadata=LANCE_CAPS_MB[0], index=LANCE_CAPS_MB[1])

    rng = np.random.default_rng(0)
    dim = args.dim

    def rows(start: int, n: int) -> tuple[list[ReferenceRecord], list[str], np.ndarray]:
        x = rng.standard_normal((n, dim)).astype(np.float32)
        return ([ReferenceRecord(path=f"/photos/{i}.jpg", species=f"Genus s{i % 50}", family="Fam")
                 for i in range(start, start + n)], [f"{i:064x}" for i in range(start, start + n)],
                x / np.linalg.norm(x, axis=1, keepdims=True))

    start_mib = status_mib("VmRSS")  # the imports' share of the peak, the same on both sides
    with tempfile.TemporaryDirectory(prefix="bench_store_growth_") as folder:
        g = Gallery.create(Path(folder) / "g", {"spec": "bench", "fingerprint": "bench#0", "dim": dim})
        g.compact_fragments = args.threshold if args.side == "on" else 0
        g.add(*rows(0, args.bulk), save_index=False)
        g.finish_build()
        queries = rng.standard_normal((args.reads, dim)).astype(np.float32)
        checkpoints, adds_ms, window = [], [], []
        done = 0

        def checkpoint() -> None:
            identify, ids = [], []
            for q in queries:
                t = time.perf_counter()
                sims, found = g.nearest(q[None], 10)
                g.store.metadata([int(i) for i in found[0] if i >= 0])  # the neighbours' metadata, from the store
                identify.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                g.store.ids()
                ids.append((time.perf_counter() - t) * 1000)
            files, mb = _disk(Path(folder) / "g" / "store")
            stats = g.store.fragment_stats()
            session = store_session()
            checkpoints.append({"adds": done, "add": _pcts(window) if window else None, "identify": _pcts(identify),
                                "ids": _pcts(ids), "files": files, "mb": mb, "fragments": stats.fragments,
                                "small": stats.small, "version": g.store.version, "anon_mib": status_mib("RssAnon"),
                                "session_mib": session.size_bytes / 2**20 if session is not None else float("nan")})
            print(f"  {args.label}: {done} adds, fragments {stats.fragments}, identify p50 "
                  f"{checkpoints[-1]['identify']['p50']:.1f} ms", file=sys.stderr, flush=True)

        wanted = sorted(set(args.checkpoints))
        if 0 in wanted:
            checkpoint()
        during: list[float] = []  # --reader: identifies timed while the adds run (a server's requests)
        stop, adding = threading.Event(), threading.Event()  # adding: cleared while a checkpoint reads

        def reader() -> None:
            q = np.random.default_rng(1).standard_normal((1, dim)).astype(np.float32)  # its own generator
            while not stop.is_set():
                if not adding.wait(0.05):
                    continue
                t = time.perf_counter()
                _, found = g.nearest(q, 10)
                g.store.metadata([int(i) for i in found[0] if i >= 0])
                during.append((time.perf_counter() - t) * 1000)
                time.sleep(0.005)  # a request every few ms, not a spin

        thread = threading.Thread(target=reader, daemon=True) if args.reader else None
        adding.set()
        if thread:
            thread.start()
        while done < args.adds:
            records, digests, x = rows(args.bulk + done, 1)
            t = time.perf_counter()
            g.add(records, digests, x)
            ms = (time.perf_counter() - t) * 1000
            adds_ms.append(ms)
            window.append(ms)
            done += 1
            if done in wanted:
                adding.clear()  # the checkpoint's reads alone (a search begun just before may still finish)
                checkpoint()
                adding.set()
                window = []
        if thread:
            stop.set()
            thread.join()
        if args.adds not in wanted:
            checkpoint()
    return {"side": args.label, "add": _pcts(adds_ms), "add_mean": float(np.mean(adds_ms)),
            "checkpoints": checkpoints, "peak_mib": status_mib("VmHWM"), "start_mib": start_mib,
            "during": {**_pcts(during), "n": len(during)} if during else None}


def _row(side: str, c: dict) -> str:
    add = c["add"]
    adds = (f"{add['p50']:.1f} / {add['p95']:.1f} / {add['p99']:.1f} / {add['max']:.0f}" if add else "-")
    ident, ids = c["identify"], c["ids"]
    return (f"| {side} | {c['adds']} | {adds} | {ident['p50']:.1f} / {ident['p95']:.1f} / {ident['p99']:.1f} | "
            f"{ids['p50']:.1f} / {ids['p95']:.1f} / {ids['p99']:.1f} | {c['fragments']} ({c['small']} small) | "
            f"{c['files']} | {c['mb']:.1f} | {c['anon_mib']:.1f} | {c['session_mib']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adds", type=int, default=600, help="timed single-row adds per side (default 600)")
    parser.add_argument("--bulk", type=int, default=1000, help="rows of the built gallery first (default 1000)")
    parser.add_argument("--dim", type=int, default=512, help="embedding width (default 512)")
    parser.add_argument("--reads", type=int, default=20, help="timed reads of each kind per checkpoint (default 20)")
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[0, 200, 400, 600],
                        help="adds after which the reads are timed (default 0 200 400 600)")
    parser.add_argument("--threshold", type=int, default=None,
                        help="the 'on' side's SPECIESID_COMPACT_FRAGMENTS (default: the gallery's default, 32)")
    parser.add_argument("--side", choices=("both", "off", "on"), default="both", help="which side(s) to run")
    parser.add_argument("--reader", action="store_true",
                        help="also time identifies (nearest + neighbours' metadata) from a thread while the adds run, "
                        "as a server's requests beside its uploads (the checkpoints' reads are made with the adds "
                        "paused)")
    parser.add_argument("--cache", choices=("capped", "lance", "both"), default="capped",
                        help="the store's LanceDB cache caps: speciesid's (capped, the default), LanceDB's own "
                        "1 GiB + 6 GiB (lance), or each side run with both")
    parser.add_argument("--label", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threshold is None:
        from index.compaction import COMPACT_FRAGMENTS

        args.threshold = COMPACT_FRAGMENTS
    if args.label is None:
        args.label = args.side
    if args.child:
        print(MARK + json.dumps(child(args)), flush=True)
        return
    from index.store_cache import INDEX_ENV, METADATA_ENV, cache_mb

    print(machine_report(), flush=True)
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    watch = CpuWatch()
    results = {}
    caches = ("lance", "capped") if args.cache == "both" else (args.cache,)
    for side in (("off", "on") if args.side == "both" else (args.side,)):
        for cache in caches:
            label = f"{side}, {cache}" if len(caches) > 1 else side
            cmd = [sys.executable, __file__, "--child", "--side", side, "--adds", str(args.adds), "--bulk",
                   str(args.bulk), "--dim", str(args.dim), "--reads", str(args.reads), "--threshold",
                   str(args.threshold), "--checkpoints", *map(str, args.checkpoints), "--cache", cache, "--label",
                   label, *(["--reader"] if args.reader else [])]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
            results[label] = json.loads(next(line for line in out.splitlines() if line.startswith(MARK))[len(MARK):])
    print(f"\n{args.bulk} bulk rows (built: compacted, indexed), then {args.adds} adds of one {args.dim}-d row through "
          f"Gallery.add; 'on' compacts at {args.threshold} small fragments. Times in ms: add = p50 / p95 / p99 / max "
          f"of the adds since the last checkpoint; identify = nearest (k=10) + the neighbours' metadata from the "
          f"store, and ids() = a sync's read, p50 / p95 / p99 of {args.reads} each; anon = RssAnon MiB, session = "
          f"the stores' LanceDB session MiB (caps: capped {cache_mb(METADATA_ENV)} + {cache_mb(INDEX_ENV)} MiB, "
          f"lance {LANCE_CAPS_MB[0]} + {LANCE_CAPS_MB[1]} MiB).\n")
    print("| compaction | adds | add ms | identify ms | ids() ms | fragments | files | MB | anon | session |")
    print("|---|---:|---|---|---|---|---:|---:|---:|---:|")
    for side, r in results.items():
        for c in r["checkpoints"]:
            print(_row(side, c))
    print()
    for side, r in results.items():
        a = r["add"]
        print(f"{side}: all {args.adds} adds p50 {a['p50']:.1f} / p95 {a['p95']:.1f} / p99 {a['p99']:.1f} / max "
              f"{a['max']:.0f} ms (mean {r['add_mean']:.1f}); peak memory {r['peak_mib']:.0f} MiB (its own process; "
              f"{r['start_mib']:.0f} MiB of it before the gallery: the imports)")
        if r.get("during"):
            d = r["during"]
            print(f"{side}: {d['n']} identifies while the adds ran: p50 {d['p50']:.1f} / p95 {d['p95']:.1f} / p99 "
                  f"{d['p99']:.1f} / max {d['max']:.0f} ms")
    for cache in caches:  # one ratio line per cache (--side both --cache both: two)
        named = f", {cache}" if len(caches) > 1 else ""
        if f"off{named}" not in results or f"on{named}" not in results:
            continue
        off, on = results[f"off{named}"], results[f"on{named}"]
        last_off, last_on = off["checkpoints"][-1], on["checkpoints"][-1]
        identify = last_on["identify"]["p50"] / last_off["identify"]["p50"]
        print(f"\non / off{named} after {last_on['adds']} adds: identify p50 {identify:.2f}x, "
              f"ids() p50 {last_on['ids']['p50'] / last_off['ids']['p50']:.2f}x, add p50 "
              f"{on['add']['p50'] / off['add']['p50']:.2f}x, add mean {on['add_mean'] / off['add_mean']:.2f}x, "
              f"files {last_on['files'] / last_off['files']:.2f}x, MB {last_on['mb'] / last_off['mb']:.2f}x")
    print(watch.report())


if __name__ == "__main__":
    main()
