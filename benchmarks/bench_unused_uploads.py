"""What a count of the unused uploads costs (:func:`index.objects.unused_uploads`: ``index info``, and ``serve`` at
start and hourly): a local gallery of N rows, every one an upload under ``INDEX/uploads/`` (plus one unused).

A count is a one-shot job (no latency distribution to take percentiles of): it runs once untimed, then
``--repeats`` times, and the script prints the median and the spread (min-max) of its CPU seconds (this process) and
wall seconds, and the peak RSS of the process. The gallery is built in a temporary folder that is removed at the end,
on an error or Ctrl-C too; ``--keep DIR`` builds it in DIR and keeps it, ``--gallery DIR`` reuses one built before.

    nice .venv/bin/python benchmarks/bench_unused_uploads.py --rows 50000       # docs/api.md
    nice .venv/bin/python benchmarks/bench_unused_uploads.py --rows 1000 --repeats 3   # a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import CpuWatch, median, min_max, peak_rss_mib
from _hardware import machine_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build(root: Path, n: int) -> None:
    """A gallery of ``n`` upload rows (random 16-d vectors of 50 species) and one upload no row uses."""
    from _cli_support import DIM, ENC

    from index.gallery import Gallery
    from index.records import ReferenceRecord

    g = Gallery.create(root, ENC)
    uploads = g.layout.uploads
    uploads.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    names = [hashlib.sha256(str(i).encode()).hexdigest() + ".jpg" for i in range(n)]
    for name in names:
        (uploads / name).write_bytes(b"x")
    for start in range(0, n, 20_000):
        part = names[start:start + 20_000]
        x = rng.standard_normal((len(part), DIM)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        g.add([ReferenceRecord(path=str(uploads / name), species=f"Sp{i % 50} x") for i, name in enumerate(part)],
              [name[:64] for name in part], x)
    (uploads / (hashlib.sha256(b"unused").hexdigest() + ".jpg")).write_bytes(b"y")


def count(root: Path, repeats: int) -> None:
    """Open the gallery at ``root``, count once untimed, then time ``repeats`` counts and print them."""
    from index.gallery import Gallery
    from index.objects import unused_uploads

    g = Gallery.open(root)
    unused_uploads(g)  # warm: the store opened, the files' metadata cached
    cpu_s, wall_s = [], []
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        counted = unused_uploads(g)
        cpu_s.append(time.process_time() - cpu)
        wall_s.append(time.perf_counter() - wall)
    print(f"{len(g)} rows, {counted['unused']} unused ({root}); count, median of {repeats} (min-max): "
          f"{median(cpu_s):.2f} s CPU ({min_max(cpu_s, '.2f')}), "
          f"{median(wall_s):.2f} s wall ({min_max(wall_s, '.2f')})")


def main(argv: list[str] | None = None) -> None:
    """Build (or open) the gallery and time its count."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000, help="upload rows of the gallery built (default 50000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed counts; median and min-max (default 5)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--gallery", type=Path, help="a gallery this script built before (skips the build)")
    where.add_argument("--keep", type=Path, help="build the gallery in this new folder and keep it")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be 1 or more")
    print(machine_report(), flush=True)
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    watch = CpuWatch()
    if args.gallery is not None:
        count(args.gallery, args.repeats)
    elif args.keep is not None:
        build(args.keep, args.rows)
        count(args.keep, args.repeats)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_unused_uploads_") as tmp:  # removed on errors and Ctrl-C too
            build(Path(tmp) / "g", args.rows)
            count(Path(tmp) / "g", args.repeats)
        print("(the temporary gallery is removed; --keep DIR keeps one)")
    print(f"peak RSS of this process {peak_rss_mib():.0f} MiB; {watch.report()}")


if __name__ == "__main__":
    main()
