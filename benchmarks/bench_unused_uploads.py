"""What a count of the unused uploads costs (:func:`index.objects.unused_uploads`: ``index info``, and ``serve`` at
start and hourly): a local gallery of N rows, every one an upload under ``INDEX/uploads/`` (plus one unused), its
count timed best of 3 (CPU seconds of this process, and wall). ``--gallery DIR`` reuses one built before."""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import CpuWatch
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


def main() -> None:
    """Build (or open) the gallery and time its count."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=50_000, help="upload rows of the gallery built (default 50000)")
    parser.add_argument("--gallery", type=Path, help="a gallery this script built before (skips the build)")
    args = parser.parse_args()
    watch = CpuWatch()
    from index.gallery import Gallery
    from index.objects import unused_uploads

    root = args.gallery
    if root is None:
        root = Path(tempfile.mkdtemp()) / "g"
        build(root, args.rows)
    g = Gallery.open(root)
    unused_uploads(g)  # warm: the store opened, the files' metadata cached
    runs = []
    for _ in range(3):
        cpu, wall = time.process_time(), time.perf_counter()
        counted = unused_uploads(g)
        runs.append((time.process_time() - cpu, time.perf_counter() - wall))
    print(machine_report())
    print(f"{len(g)} rows, {counted['unused']} unused: count best of 3 {min(r[0] for r in runs):.2f} s CPU, "
          f"{min(r[1] for r in runs):.2f} s wall ({root})")
    print(watch.report())


if __name__ == "__main__":
    main()
