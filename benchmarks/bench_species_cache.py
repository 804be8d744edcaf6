"""What a gallery's size costs the species summary, an add's species reads, the far threshold and a dataset's clean.

Builds a synthetic ``--rows`` gallery (64-d rows of ``_synth.SpeciesSpace``, one species per 100 rows, IVF-PQ, as
``speciesid index build`` leaves it), with the identity of the tiny random encoder ``timm:test_vit@random`` (no
download), then times:

* ``store.species()`` uncached (the whole summary read from the table), median of ``--repeats``;
* ``store.species()`` right after one ``Gallery.add`` by the same process (since this change carried over: a cached
  copy; before it, the whole summary read again);
* the far threshold of a new ``Identifier`` (a new process: each CLI ``identify``): the first one estimates it
  (``FAR_SAMPLE`` searches), a later one reads the one kept in the folder (before this change: estimated each time);
* ``clean --dataset folder --index G`` of 6 photos (2 of them stored in the gallery), without ``--apply``.

Nothing asserts: it prints. ``--keep DIR`` leaves the gallery there (e.g. for ``speciesid identify --index DIR``).

    nice .venv/bin/python benchmarks/bench_species_cache.py --rows 20000
    nice .venv/bin/python benchmarks/bench_species_cache.py --rows 200000
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import CpuWatch
from _hardware import machine_report
from _synth import SpeciesSpace
from PIL import Image

from index.gallery import Gallery
from index.records import ReferenceRecord
from index.vectors import VectorIndexConfig
from retrieval.encoders import create_encoder

SPEC = "timm:test_vit@random"


def _ms(f, repeats: int) -> tuple[float, float]:
    xs = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        xs.append((time.perf_counter() - t) * 1000)
    return statistics.median(xs), min(xs)


def build(root: Path, rows: int, photos: list[Path], encoder) -> Gallery:  # noqa: ANN001 - an Encoder
    """The synthetic gallery, plus ``photos`` stored as references (their real embeddings and digests)."""
    from retrieval.images import sha256_file
    from retrieval.pipeline import embed_photos

    ident = {"spec": encoder.spec, "fingerprint": encoder.fingerprint, "dim": encoder.dim}
    space = SpeciesSpace(max(50, rows // 100), seed=0, dim=encoder.dim)
    g = Gallery.create(root, ident, index_config=VectorIndexConfig(kind="ivfpq"))
    for c, start in enumerate(range(0, rows, 20_000)):
        m = min(20_000, rows - start)
        x, sp = space.chunk(c, m)
        recs = [ReferenceRecord(path=f"/photos/s{int(k)}/{start + i}.jpg", species=f"Genus{int(k) // 8} sp{int(k)}",
                                family=f"Fam{int(k) // 80}") for i, k in enumerate(sp)]
        g.add(recs, [f"{start + i:064x}" for i in range(m)], x, save_index=False)
    done = embed_photos(photos, encoder)
    g.add([ReferenceRecord(path=p, species="Genus0 sp0") for p in photos], [sha256_file(p) for p in photos],
          done.embeddings, save_index=False)
    g.finish_build()
    return g


def main() -> None:
    """Build, time, print."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=20_000, help="synthetic references (default 20000)")
    ap.add_argument("--repeats", type=int, default=5, help="timings per figure (default 5)")
    ap.add_argument("--keep", type=Path, help="build the gallery here and keep it (default: a temporary folder)")
    args = ap.parse_args()
    import index

    print(machine_report())
    print("code:", Path(index.__file__).parent.parent)
    watch = CpuWatch()
    work = Path(tempfile.mkdtemp(prefix="bench_species_"))
    root = args.keep or work / "g"
    rng = np.random.default_rng(0)
    photos_dir = work / "photos" / "Genus0 sp0"
    photos_dir.mkdir(parents=True)
    paths = []
    for i in range(6):
        paths.append(photos_dir / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(paths[-1])
    encoder = create_encoder(SPEC)
    t = time.perf_counter()
    g = build(root, args.rows, paths[:2], encoder)
    print(f"built {len(g)} references, {len(g.species())} species in {time.perf_counter() - t:.1f} s")

    def uncached():
        g.store._species_cache = None
        g.store.species()

    med, low = _ms(uncached, args.repeats)
    print(f"species() uncached: median {med:.1f} ms (min {low:.1f})")
    x = np.random.default_rng(1).standard_normal((args.repeats, g.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    after = []
    for i in range(args.repeats):
        g.species()
        g.add([ReferenceRecord(path=f"/photos/new/{i}.jpg", species="Genus0 sp0")], [f"{10**9 + i:064x}"], x[i:i + 1])
        after.append(_ms(g.species, 1)[0])
    print(f"species() after one add by this process: median {statistics.median(after):.1f} ms (min {min(after):.1f})")

    from retrieval.identify import Identifier
    (root / "far_threshold.json").unlink(missing_ok=True)
    first = _ms(lambda: Identifier(encoder, Gallery.open(root)).far_threshold(), 1)[0]
    later = _ms(lambda: Identifier(encoder, Gallery.open(root)).far_threshold(), args.repeats)
    print(f"far threshold of a new Identifier: first {first:.0f} ms, later median {later[0]:.1f} ms (incl. its "
          "Gallery.open)")
    from retrieval.clean import run_clean
    took = _ms(lambda: run_clean(dataset="folder", root=work / "photos", index=root, encoder=encoder, progress=False),
               1)[0]
    print(f"clean --dataset (6 photos, 2 stored) --index: {took / 1000:.2f} s")
    print(watch.report())
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        shutil.rmtree(work / "photos", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
