"""What a write costs the kNN vote's whitening as the gallery grows: refit by difference vs streaming the store.

When a write adds or removes a species (or moves the photo count by > 10%), the writer refits the vote's whitening
(``retrieval.probe_flows.refresh_gallery_metric``). Before, the refit streamed every searchable row of the store
to sum its statistics: O(gallery). Now the statistics are saved with the gallery and brought up to date by the
rows that came and went (``retrieval.whitening_sync``): O(changed rows) + one eigendecomposition.

For each gallery size (synthetic 512-d species-like embeddings, ``_synth.py``; the gallery built once, its probe
voting on the whitened metric), each repeat adds a **new species of 20 photos** through the gallery's write path and
times the writer's refit, both ways on the same gallery:

* ``stream`` (the way before): the statistics file removed first, so the refit streams the whole store;
* ``difference`` (now): the statistics saved by the previous refit, brought up to date by the 20 new rows.

Printed per size: median and spread of each (seconds), the ratio, the peak RSS of the process, and the parts of
the difference (id column read, new rows read, eigendecomposition: timed in an extra pass before the last repeat's
refit, not a split of the timed refit). Prints only; never asserts.

    .venv/bin/python benchmarks/bench_whitening.py                    # 10k, 50k, 200k photos, 3 repeats
    .venv/bin/python benchmarks/bench_whitening.py --sizes 10000 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import REPO, CpuWatch, median, peak_rss_mib
from _hardware import machine_report
from _synth import CHUNK, SpeciesSpace, n_species_for

NEW_PHOTOS = 20


def build(root: Path, n: int, seed: int = 0):
    """A gallery of ``n`` synthetic photos whose probe votes on the whitened metric; (gallery, space)."""
    from index.gallery import Gallery
    from index.records import ReferenceRecord
    from retrieval.probe import Calibration, LinearProbe
    from retrieval.whitening_sync import scan_stats

    space = SpeciesSpace(n_species_for(n), seed=seed)
    gallery = Gallery.create(root, {"spec": "bench:synthetic", "fingerprint": "bench:synthetic#1", "dim": space.dim})
    for i, start in enumerate(range(0, n, CHUNK)):
        x, sp = space.chunk(i, min(CHUNK, n - start))
        ids = gallery.reserve_ids(len(x))
        records = [ReferenceRecord(path=f"/bench/{start + j}.jpg", species=f"Genus{space.genus_of[s]} s{s}")
                   for j, s in enumerate(sp.tolist())]
        gallery.store.add(records, [f"{start + j:064x}" for j in range(len(x))], x, gallery.fingerprint, ids)
    gallery.finish_build()
    stats = scan_stats(gallery)
    species = sorted(stats.stats.species_count)
    probe = LinearProbe(species=species, weight=np.zeros((len(species), space.dim), np.float32),
                        bias=np.zeros(len(species), np.float32), fingerprint=gallery.fingerprint,
                        calibration=Calibration(metric="whitened"), whitening=stats.stats.fit())
    probe.save(root)
    return gallery, space


def add_species(gallery, space, tag: str) -> None:
    """A new species of NEW_PHOTOS photos, through the gallery's own write path."""
    from index.records import ReferenceRecord

    rng = np.random.default_rng(abs(hash(tag)) % 2**32)
    centre = rng.standard_normal(space.dim).astype(np.float32)
    x = centre / np.linalg.norm(centre) + 0.3 * rng.standard_normal((NEW_PHOTOS, space.dim)).astype(np.float32) / np.sqrt(space.dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    gallery.add([ReferenceRecord(path=f"/new/{tag}/{j}.jpg", species=f"Novus {tag}") for j in range(NEW_PHOTOS)],
                [f"{tag}{j:060x}"[-64:] for j in range(NEW_PHOTOS)], x)


def timed_refit(gallery) -> float:
    from retrieval.probe_flows import refresh_gallery_metric

    t0 = time.perf_counter()
    if not refresh_gallery_metric(gallery):
        raise RuntimeError("the write did not refit the whitening")
    return time.perf_counter() - t0


def parts(gallery) -> str:
    """Where the difference's time goes: the id column, the new rows, the fit."""
    from retrieval.whitening_sync import load_stats, synced_stats

    saved = load_stats(gallery)
    t0 = time.perf_counter()
    gallery.store.ids()
    t1 = time.perf_counter()
    current, added, _ = synced_stats(gallery, saved)
    t2 = time.perf_counter()
    current.stats.fit()
    t3 = time.perf_counter()
    return f"id column {t1 - t0:.3f} s, difference in all {t2 - t1:.3f} s ({added} rows), eigendecomposition {t3 - t2:.3f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000], help="gallery sizes")
    ap.add_argument("--repeats", type=int, default=3, help="new species added (and refits timed) per way and size")
    ap.add_argument("--work", type=Path, default=None, help="folder for the galleries (default: a temporary one)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(machine_report())
    watch = CpuWatch()
    with tempfile.TemporaryDirectory(dir=args.work or REPO / "runs") as tmp:
        rows = []
        for n in args.sizes:
            t0 = time.perf_counter()
            gallery, space = build(Path(tmp) / f"g{n}", n)
            print(f"\n{n:,} photos: built in {time.perf_counter() - t0:.0f} s "
                  f"({len(gallery.species())} species, {gallery.dim}-d)")
            stream, diff = [], []
            for r in range(args.repeats):
                add_species(gallery, space, f"s{n}r{r}")
                gallery.layout.whitening_stats.unlink(missing_ok=True)  # the way before: no saved statistics
                stream.append(timed_refit(gallery))
                add_species(gallery, space, f"d{n}r{r}")  # now: the statistics the refit above saved
                where = parts(gallery) if r == args.repeats - 1 else ""  # reads only; the refit below does it again
                diff.append(timed_refit(gallery))
                print(f"  repeat {r}: stream {stream[-1]:.3f} s, difference {diff[-1]:.3f} s")
            print(f"  the difference, in parts (an extra pass of its reads and fit before the last repeat's timed "
                  f"refit, not a split of that refit: the parts need not add up to it): {where}")
            rows.append((n, median(stream), min(stream), max(stream), median(diff), min(diff), max(diff)))
        print("\nwriter's refit after adding a new species of 20 photos (median of repeats; min-max)")
        print(f"{'photos':>9} | {'stream (before) s':>22} | {'difference (now) s':>22} | ratio")
        for n, s, s0, s1, d, d0, d1 in rows:
            print(f"{n:>9,} | {s:8.3f} ({s0:.3f}-{s1:.3f}) | {d:8.3f} ({d0:.3f}-{d1:.3f}) | {s / d:5.1f}x")
        if len(rows) > 1:
            (n0, s0, *_, d0), (n1, s1, *_, d1) = rows[0][:5], rows[-1][:5]
            print(f"growth {n0:,} -> {n1:,} photos ({n1 / n0:.0f}x): stream {s1 / s0:.1f}x, difference {d1 / d0:.1f}x")
    print(f"peak RSS {peak_rss_mib():.0f} MiB; {watch.report()}")


if __name__ == "__main__":
    main()
