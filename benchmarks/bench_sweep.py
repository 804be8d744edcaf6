"""How long ``speciesid index sweep-uploads`` holds the store's write lease (the time every writer of the store
waits for it): a gallery of ``--rows`` rows on a store on S3 (moto's S3 server on 127.0.0.1, started here), whose
rows name ``--uploads`` uploads among them, and as many orphan uploads put beside them before each sweep.

Each run puts the orphans again and sweeps them (``--older-than 0``: every unused upload goes), timing the sweep
and the hold of the lease (from taken to given back: :meth:`index.gallery.Gallery.writing`); ``--meanwhile`` adds a
row between the sweep's first read and its lease (another machine's add), so the hold includes reading what was
committed since. A sweep is a one-shot job (no latency distribution to take percentiles of): it runs
``--repeats`` times, and the script prints the machine, each run, the median and spread (min-max) of the sweep and
of the lease hold, and the peak RSS of this process (moto's server runs in a process of its own). The code measured
is this checkout's ``index``, or the one of the checkout ``--repo`` names (the code before a change). Needs the
``s3`` extra and ``moto[server]`` (the ``dev`` extra).

    nice .venv/bin/python benchmarks/bench_sweep.py --rows 20000      # docs/shared-gallery.md
    nice .venv/bin/python benchmarks/bench_sweep.py --rows 20000 --meanwhile
    nice .venv/bin/python benchmarks/bench_sweep.py --rows 20000 --repo ../main      # the code before a change
    nice .venv/bin/python benchmarks/bench_sweep.py --rows 200 --repeats 2      # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from _common import CpuWatch, median, min_max, peak_rss_mib
from _hardware import machine_report

BUCKET = "bench"
DIM = 8


def _moto():
    """moto's S3 server, with the bucket made: (the process, its endpoint, a boto3 client)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from moto_s3 import start_moto_s3

    return start_moto_s3(BUCKET)


def _fill(g, rows: int, uploads: int, batch: int) -> list[str]:
    """Add ``rows`` rows to gallery ``g``, ``batch`` a commit; the first ``uploads`` name an upload put in the
    store. Returns the upload URIs the rows use."""
    from index.objects import upload_uri
    from index.records import ReferenceRecord

    used = []
    for i in range(uploads):
        data = f"used {i}".encode()
        uri = upload_uri(g.objects.uri, f"{hashlib.sha256(data).hexdigest()}.jpg")
        g.objects.put_if_absent(uri, data)
        used.append(uri)
    rng = np.random.default_rng(0)
    for start in range(0, rows, batch):
        n = min(batch, rows - start)
        paths = [used[i] if i < uploads else f"/photos/species_{i % 500}/{i:07d}.jpg" for i in range(start, start + n)]
        digests = [hashlib.sha256(p.encode()).hexdigest() for p in paths]
        records = [ReferenceRecord(path=p, species=f"Species {i % 500}") for i, p in zip(range(start, start + n),
                                                                                          paths, strict=True)]
        g.add(records, digests, rng.standard_normal((n, DIM)).astype(np.float32), save_index=False)
    g.save_index()
    g.store.ensure_scalar_indexes()  # as a build's finish leaves a gallery: point reads by id use them
    return used


def _orphans(g, run: int, n: int) -> None:
    """Put ``n`` uploads no row uses (this run's)."""
    from index.objects import upload_uri

    for i in range(n):
        data = f"orphan {run} {i}".encode()
        g.objects.put_if_absent(upload_uri(g.objects.uri, f"{hashlib.sha256(data).hexdigest()}.jpg"), data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000, help="rows of the gallery (default 20000)")
    parser.add_argument("--uploads", type=int, default=100, help="uploads its rows use (default 100)")
    parser.add_argument("--orphans", type=int, default=100, help="orphan uploads put before each sweep (default 100)")
    parser.add_argument("--batch", type=int, default=2000, help="rows per commit when filling it (default 2000)")
    parser.add_argument("--repeats", "--runs", dest="runs", type=int, default=5, metavar="N",
                        help="sweeps timed; median and min-max (default 5)")
    parser.add_argument("--meanwhile", action="store_true",
                        help="add a row between each sweep's first read and its lease (another machine's add)")
    parser.add_argument("--repo", type=Path, help="import index/ from this checkout (the code before a change)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--repeats must be 1 or more")
    if args.repo is not None:  # ahead of this checkout, which _common put first on sys.path
        if not (args.repo / "index" / "__init__.py").is_file():
            parser.error(f"--repo {args.repo}: no index/__init__.py there; name the root of a speciesid checkout")
        sys.path.insert(0, str(args.repo.resolve()))
    logging.basicConfig(level=logging.WARNING)
    import index
    from index.gallery import Gallery
    from index.objects import sweep_uploads
    from index.records import ReferenceRecord

    print(machine_report(), flush=True)
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    print(f"index imported from {Path(index.__file__).parent}", flush=True)
    watch = CpuWatch()
    proc, endpoint, _ = _moto()
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    holds: list[float] = []
    writing = Gallery.writing
    added = [0]

    @contextlib.contextmanager
    def timed(self, **kw) -> Iterator[None]:
        if args.meanwhile:  # another machine's add, between the sweep's first read and its lease
            added[0] += 1
            digest = hashlib.sha256(f"meanwhile {added[0]}".encode()).hexdigest()
            self.add([ReferenceRecord(path=f"/photos/late/{added[0]}.jpg", species="Species 0")], [digest],
                     np.zeros((1, DIM), np.float32), save_index=False)
        with writing(self, **kw):
            start = time.perf_counter()
            try:
                yield
            finally:
                holds.append(time.perf_counter() - start)

    try:
        with tempfile.TemporaryDirectory(prefix="bench_sweep_") as folder:
            g = Gallery.create(Path(folder) / "g", {"spec": "t", "fingerprint": "t#0", "dim": DIM},
                               store=f"s3://{BUCKET}/sweep")
            t0 = time.perf_counter()
            _fill(g, args.rows, args.uploads, args.batch)
            print(f"filled {g.store.count(include_excluded=True)} rows in {time.perf_counter() - t0:.1f} s",
                  flush=True)
            Gallery.writing = timed
            sweeps, lease = [], []
            for run in range(args.runs):
                _orphans(g, run, args.orphans)
                holds.clear()
                start = time.perf_counter()
                report = sweep_uploads(g, older_than_s=0)
                sweeps.append((time.perf_counter() - start) * 1000)
                lease.append(sum(holds) * 1000)
                print(f"run {run + 1}: removed {len(report.orphans)}, kept {report.referenced} in use; sweep "
                      f"{sweeps[-1]:.0f} ms, lease held {lease[-1]:.0f} ms", flush=True)
            Gallery.writing = writing
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(f"\nmedian (min-max) of {args.runs} sweeps of {args.rows} rows ({args.orphans} orphans each"
          f"{', a row added meanwhile' if args.meanwhile else ''}): sweep {median(sweeps):.0f} ms "
          f"({min_max(sweeps)}), lease held {median(lease):.0f} ms ({min_max(lease)})")
    print(f"peak RSS of this process {peak_rss_mib():.0f} MiB (moto's server not counted); {watch.report()}")


if __name__ == "__main__":
    main()
