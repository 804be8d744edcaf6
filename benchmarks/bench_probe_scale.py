"""``probe train`` at scale, its two parts apart: the choice of the settings (``retrieval.calibrate.select_settings``:
the near-copy grouping, the cross-validated kNN votes and probes) and the final probe's training
(``retrieval.probe.train_probe``), on a synthetic gallery of ``--refs`` references (``_synth.SpeciesSpace``: clustered,
anisotropic, long-tailed species, 2 % near-copies; ``--dim`` wide, ``--refs / 100`` species unless ``--species``).

One part a run (``--part select`` or ``train``), so that the peak memory printed (VmHWM: this process's) is that
part's. ``train`` also prints the probe's top-1 on 5,000 fresh photos of the same species (another stream of the
space) and the photos it trained on. The code measured is the checkout ``--repo`` names (the code before a change),
else this one. Prints the machine first (``_hardware.machine_report``).

    .venv/bin/python benchmarks/bench_probe_scale.py --refs 200000 --part train           # docs/scale.md
    .venv/bin/python benchmarks/bench_probe_scale.py --refs 200000 --part select --repo ../main
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np


def gallery(refs: int, species: int, dim: int, stream: int = 0) -> tuple[np.ndarray, list[str]]:
    """(vectors (refs, dim) float32 unit rows, species names) drawn from the seeded space."""
    from _synth import SpeciesSpace

    space = SpeciesSpace(species, seed=0, dim=dim)
    xs, ys = [], []
    for c, s in enumerate(range(0, refs, 20_000)):
        x, sp = space.chunk(c, min(20_000, refs - s), stream=stream)
        xs.append(x)
        ys.append(sp)
    return np.concatenate(xs), [f"sp{int(k)}" for k in np.concatenate(ys)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--refs", type=int, default=200_000, help="references in the synthetic gallery (200000)")
    ap.add_argument("--species", type=int, default=None, help="species (default: refs / 100, at least 50)")
    ap.add_argument("--dim", type=int, default=64, help="embedding width (64: the scale walk's galleries)")
    ap.add_argument("--part", choices=("select", "train"), required=True,
                    help="select: choose the settings (select_settings); train: train the final probe (train_probe)")
    ap.add_argument("--C", type=float, default=50.0, help="the probe's C for --part train (50: what g20k chose)")
    ap.add_argument("--max-photos", type=int, default=None,
                    help="--part train: the probe's bound (train_probe's max_photos; 0: none); default: the code's own")
    ap.add_argument("--repo", type=Path, default=None, help="import retrieval/ and index/ from this checkout")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import CpuWatch, status_mib  # puts this checkout first on sys.path
    from _hardware import machine_report
    from _synth import n_species_for

    if args.repo is not None:  # before it: the other checkout's packages
        sys.path.insert(0, str(args.repo.resolve()))
    import retrieval

    print(machine_report(), flush=True)
    print(f"code: {Path(retrieval.__file__).resolve().parents[1]}", flush=True)
    watch = CpuWatch()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    species = args.species or n_species_for(args.refs)
    x, y = gallery(args.refs, species, args.dim)
    print(f"gallery: {len(x)} references, {len(set(y))} species (of {species} drawn), {args.dim}-d; "
          f"VmRSS {status_mib('VmRSS'):.0f} MiB", flush=True)
    t0, cpu0 = time.perf_counter(), time.process_time()
    if args.part == "select":
        from retrieval.calibrate import select_settings

        cal = select_settings(x, y, fingerprint="bench", progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        print(f"select: {wall:.1f} s wall, {cpu:.1f} s CPU, peak {status_mib('VmHWM'):.0f} MiB; C={cal.C:g} "
              f"k={cal.k} T={cal.temperature:g} w={cal.blend_weight:g} metric={cal.metric} "
              f"threshold={cal.unknown_threshold:.3f}; on {cal.selected_on}", flush=True)
        print("metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in cal.metrics.items()), flush=True)
    else:
        from retrieval.probe import train_probe

        bound = {} if args.max_photos is None else {"max_photos": args.max_photos or None}
        probe = train_probe(x, y, fingerprint="bench", C=args.C, **bound)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        del x
        xt, yt = gallery(5_000, species, args.dim, stream=1)
        col = {s: i for i, s in enumerate(probe.species)}
        keep = [i for i, s in enumerate(yt) if s in col]
        top1 = float((probe.logits(xt[keep]).argmax(1) == np.array([col[yt[i]] for i in keep])).mean())
        used = probe.calibration.metrics.get("probe_photos", probe.trained_on)
        print(f"train: {wall:.1f} s wall, {cpu:.1f} s CPU, peak {status_mib('VmHWM'):.0f} MiB; trained on "
              f"{used:.0f} photos, {len(probe.species)} species; fresh top-1 {top1:.4f} ({len(keep)} photos)",
              flush=True)
    print(watch.report())


if __name__ == "__main__":
    main()
