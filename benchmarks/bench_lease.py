"""The S3 write lease's cost: ``Gallery.add`` of one photo on a store on S3 (moto's S3 server on 127.0.0.1,
started here), with the store's lease and without it (the lock's lease dropped, as before the lease existed; the
id mark is then found by reading the store's whole id column), side by side in one run.

Each run: a fresh gallery on the store per side, ``--warmup`` adds, then ``--adds`` timed adds of one 8-float row;
the sides alternate run by run. Prints the machine, each run's median, then p50/p95/p99 over all timed adds per
side, the ratio of the medians and the peak RSS of this process. Needs the ``s3`` extra and ``moto[server]`` (the
``dev`` extra).

    .venv/bin/python benchmarks/bench_lease.py                 # both sides, 3 runs each (docs/shared-gallery.md)
    .venv/bin/python benchmarks/bench_lease.py --side lease    # one side only
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import CpuWatch, peak_rss_mib
from _hardware import machine_report

logger = logging.getLogger("bench_lease")
BUCKET = "bench"


def _moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server, with the bucket made; (the process, its endpoint)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from moto_s3 import start_moto_s3

    proc, endpoint, _ = start_moto_s3(BUCKET)
    return proc, endpoint


def one_run(run: int, *, adds: int, warmup: int, lease: bool) -> list[float]:
    """Seconds of each timed add of one run."""
    from index.gallery import Gallery
    from index.records import ReferenceRecord

    with tempfile.TemporaryDirectory(prefix="bench_lease_") as folder:  # the gallery folder goes with the run
        g = Gallery.create(Path(folder) / "g", {"spec": "t", "fingerprint": "t#0", "dim": 8},
                           store=f"s3://{BUCKET}/run{run}-{'lease' if lease else 'none'}")
        if not lease:
            g._writer.remote = None  # as before the lease: the flock alone
        rng = np.random.default_rng(run)
        times = []
        for i in range(warmup + adds):
            row = rng.standard_normal((1, 8)).astype(np.float32)
            start = time.perf_counter()
            g.add([ReferenceRecord(path=f"/{i}.jpg", species="Naja naja")], [f"{run:08x}{i:056x}"], row)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        del g
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per side (default 3)")
    parser.add_argument("--adds", type=int, default=20, help="timed adds per run (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed adds before them (default 5)")
    parser.add_argument("--side", choices=("both", "lease", "none"), default="both",
                        help="with the lease, without it (none: as before it existed) or both (default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(machine_report(), flush=True)
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    watch = CpuWatch()
    sides = [True, False] if args.side == "both" else [args.side == "lease"]
    proc, endpoint = _moto()
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    every: dict[bool, list[float]] = {side: [] for side in sides}
    try:
        for run in range(args.runs):
            for lease in sides:
                ms = [t * 1000 for t in one_run(run, adds=args.adds, warmup=args.warmup, lease=lease)]
                every[lease] += ms
                print(f"run {run + 1}, {'lease' if lease else 'no lease'}: median {statistics.median(ms):.0f} ms "
                      f"({len(ms)} adds)", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print("\n| side | adds | p50 ms | p95 ms | p99 ms |\n|---|---:|---:|---:|---:|")
    for lease, ms in every.items():
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        print(f"| {'lease' if lease else 'no lease'} | {len(ms)} | {p50:.0f} | {p95:.0f} | {p99:.0f} |")
    if len(every) == 2:
        ratio = statistics.median(every[True]) / statistics.median(every[False])
        print(f"\nlease / no lease, medians: {ratio:.2f}x "
              f"(+{statistics.median(every[True]) - statistics.median(every[False]):.0f} ms an add)")
    print(f"peak RSS of this process {peak_rss_mib():.0f} MiB (moto's server not counted); {watch.report()}")


if __name__ == "__main__":
    main()
