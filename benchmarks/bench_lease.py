"""The S3 write lease's cost: ``Gallery.add`` of one photo on a store on S3 (moto's S3 server on 127.0.0.1,
started here), with the store's lease and without it (``--no-lease``: the lock's lease dropped, as before the
lease existed; the id mark is then found by reading the store's whole id column).

Each run: a fresh gallery on the store, ``--warmup`` adds, then ``--adds`` timed adds of one 8-float row; the
median and p90 in ms. Needs the ``s3`` extra and ``moto[server]`` (the ``dev`` extra).

    .venv/bin/python benchmarks/bench_lease.py                 # with the lease, 3 runs
    .venv/bin/python benchmarks/bench_lease.py --no-lease      # without it
    for i in 1 2 3; do .venv/bin/python benchmarks/bench_lease.py --runs 1
        .venv/bin/python benchmarks/bench_lease.py --runs 1 --no-lease; done   # in pairs (docs/shared-gallery.md)
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("bench_lease")
BUCKET = "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free port, with the bucket made; (the process, its endpoint)."""
    import boto3

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    deadline = time.monotonic() + 60
    while True:
        try:
            client.create_bucket(Bucket=BUCKET)
            return proc, endpoint
        except Exception:  # noqa: BLE001 - not up yet
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.2)


def one_run(run: int, *, adds: int, warmup: int, lease: bool) -> list[float]:
    """Seconds of each timed add of one run."""
    from index.gallery import Gallery
    from index.records import ReferenceRecord

    folder = Path(tempfile.mkdtemp(prefix="bench_lease_"))
    g = Gallery.create(folder / "g", {"spec": "t", "fingerprint": "t#0", "dim": 8},
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
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--adds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-lease", action="store_true", help="drop the store's lease (as before it existed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    proc, endpoint = _moto()
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    try:
        for run in range(args.runs):
            times = one_run(run, adds=args.adds, warmup=args.warmup, lease=not args.no_lease)
            ms = sorted(t * 1000 for t in times)
            print(f"run {run + 1}: {'lease' if not args.no_lease else 'no lease'}, {len(ms)} adds: median "
                  f"{statistics.median(ms):.0f} ms, p90 {ms[int(0.9 * (len(ms) - 1))]:.0f} ms", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
