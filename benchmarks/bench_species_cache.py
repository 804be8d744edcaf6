"""What a gallery's size costs the species summary, an add's species reads, the far threshold and a dataset's clean.

Builds a synthetic ``--rows`` gallery (64-d rows of ``_synth.SpeciesSpace``, one species per 100 rows, IVF-PQ, as
``speciesid index build`` leaves it), with the identity of the tiny random encoder ``timm:test_vit@random`` (no
download), then times:

* ``store.species()`` uncached (the whole summary read from the table), ``--repeats`` calls;
* ``store.species()`` right after one ``Gallery.add`` by the same process (since this change carried over: a cached
  copy; before it, the whole summary read again), ``--repeats`` adds;
* the far threshold of a new ``Identifier`` (a new process: each CLI ``identify``): the first one estimates it
  (``FAR_SAMPLE`` searches), a later one reads the one kept in the folder (before this change: estimated each time);
* ``clean --dataset folder --index G`` of 6 photos (2 of them stored in the gallery), without ``--apply``.

Per call (``--repeats`` each: species uncached, after an add, the kept far threshold read): p50 / p95 / p99, and
the ratios of the p50s. The first far-threshold estimate and the clean are one-shot jobs: ``--job-repeats`` each,
median and spread (min-max). Then the machine's other load and the peak RSS of the process. Nothing asserts: it
prints. The photos and the gallery are in a temporary folder removed at the end (on an error or Ctrl-C too);
``--keep DIR`` builds the gallery in DIR and leaves it there (e.g. for ``speciesid identify --index DIR``).

    nice .venv/bin/python benchmarks/bench_species_cache.py --rows 20000
    nice .venv/bin/python benchmarks/bench_species_cache.py --rows 200000
    nice .venv/bin/python benchmarks/bench_species_cache.py --rows 1000 --repeats 5 --job-repeats 1   # a smoke run
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
from _synth import SpeciesSpace
from PIL import Image

from index.gallery import Gallery
from index.records import ReferenceRecord
from index.vectors import VectorIndexConfig
from retrieval.encoders import create_encoder

SPEC = "timm:test_vit@random"
SPECIES = "Testgenus testspecies"  # the photos' folder and their references: a scientific name (no name warning)


def _ms(f, repeats: int) -> list[float]:
    """Milliseconds of ``repeats`` calls of ``f``."""
    xs = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        xs.append((time.perf_counter() - t) * 1000)
    return xs


def _spread(xs: list[float], unit: str = "ms", scale: float = 1.0) -> str:
    """'median M unit (min-max A-B, runs N)' of a one-shot job's repeats."""
    v, digits = [x * scale for x in xs], 1 if unit == "ms" else 2
    return f"median {median(v):.{digits}f} {unit} (min-max {min_max(v, f'.{digits}f')}, runs {len(v)})"


def _p50(xs: list[float]) -> float:
    return percentile_values(xs)["p50"]


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
    g.add([ReferenceRecord(path=p, species=SPECIES) for p in photos], [sha256_file(p) for p in photos],
          done.embeddings, save_index=False)
    g.finish_build()
    return g


def main() -> None:
    """Build, time, print."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000, help="synthetic references (default 20000)")
    ap.add_argument("--repeats", type=int, default=20, help="calls timed per per-call figure (default 20)")
    ap.add_argument("--job-repeats", type=int, default=3,
                    help="runs of each one-shot job (first far estimate, clean); median and min-max (default 3)")
    ap.add_argument("--keep", type=Path, help="build the gallery here and keep it (default: a temporary folder)")
    args = ap.parse_args()
    if min(args.rows, args.repeats, args.job_repeats) < 1:
        ap.error("--rows, --repeats and --job-repeats must be 1 or more")
    import index

    print(machine_report())
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    print("code:", Path(index.__file__).parent.parent)
    watch = CpuWatch()
    with tempfile.TemporaryDirectory(prefix="bench_species_") as tmp:  # removed on errors and Ctrl-C too
        measure(args, Path(tmp), watch)


def measure(args: argparse.Namespace, work: Path, watch: CpuWatch) -> None:
    """Build the gallery (``--keep``, else under ``work``), time each figure, print them."""
    root = args.keep or work / "g"
    rng = np.random.default_rng(0)
    photos_dir = work / "photos" / SPECIES
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

    cold = _ms(uncached, args.repeats)
    print(f"species() uncached, {args.repeats} calls: {percentiles(cold)}")
    x = np.random.default_rng(1).standard_normal((args.repeats, g.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    after = []
    for i in range(args.repeats):
        g.species()
        g.add([ReferenceRecord(path=f"/photos/new/{i}.jpg", species="Genus0 sp0")], [f"{10**9 + i:064x}"], x[i:i + 1])
        after.extend(_ms(g.species, 1))
    print(f"species() after one add by this process, {args.repeats} adds: {percentiles(after)}; "
          f"uncached / after an add: {_p50(cold) / max(_p50(after), 1e-9):.1f}x as long by p50")

    from retrieval.identify import Identifier

    def first_estimate() -> None:
        (root / "far_threshold.json").unlink(missing_ok=True)
        Identifier(encoder, Gallery.open(root)).far_threshold()

    first = _ms(first_estimate, args.job_repeats)
    later = _ms(lambda: Identifier(encoder, Gallery.open(root)).far_threshold(), args.repeats)
    print(f"far threshold of a new Identifier (incl. its Gallery.open): first, estimated: {_spread(first)}; "
          f"later, read from the folder, {args.repeats} calls: {percentiles(later)}; "
          f"first / later: {median(first) / max(_p50(later), 1e-9):.1f}x as long (median / p50)")
    from retrieval.clean import run_clean
    took = _ms(lambda: run_clean(dataset="folder", root=work / "photos", index=root, encoder=encoder, progress=False),
               args.job_repeats)
    print(f"clean --dataset (6 photos, 2 stored) --index: {_spread(took, 's', 1e-3)}")
    print(f"peak RSS of this process {peak_rss_mib():.0f} MiB; {watch.report()}")


if __name__ == "__main__":
    sys.exit(main())
