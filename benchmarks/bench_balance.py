"""Class imbalance: class-weighted loss vs class-balanced sampling vs neither, on a long-tailed ph-snakes.

ph-snakes itself is balanced (70 training photos a species), so the `--balance` choice cannot be measured
on it. This script keeps a long tail of the training photos (species i keeps 70 * tail ** (i / 13) photos,
the most for the alphabetically first species; seeded choice), fine-tunes the real MobileNetV1 with the
stage-local recipe once per mode, and reads the balanced val set: macro-F1 and top-1 of the head, kNN
(gallery = the long-tailed training photos) and blend, plus the mean recall of the 7 rarest species.

    .venv/bin/python benchmarks/bench_balance.py                  # ~15 min on 2 cores (3 runs)
    .venv/bin/python benchmarks/bench_balance.py --modes none weights --tail 0.2
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import MOBILENET_SPEC, PH_SNAKES, require_shared
from _hardware import machine_report


def long_tail(root: Path, tail: float, seed: int = 0) -> dict[str, int]:
    """Symlink a long-tailed subset of ph-snakes/train under ``root``; {folder: photos kept}."""
    rng = random.Random(seed)
    folders = sorted(p for p in (PH_SNAKES / "train").iterdir() if p.is_dir())
    kept = {}
    for i, folder in enumerate(folders):
        photos = sorted(folder.iterdir())
        n = max(2, round(len(photos) * tail ** (i / max(len(folders) - 1, 1))))
        (root / folder.name).mkdir(parents=True)
        for f in rng.sample(photos, n):
            os.symlink(f, root / folder.name / f.name)
        kept[folder.name] = n
    return kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tail", type=float, default=0.1, help="rarest / commonest photo count (default 0.1)")
    ap.add_argument("--modes", nargs="+", default=["none", "weights", "sampler"], choices=["none", "weights", "sampler"])
    ap.add_argument("--epochs", type=int, help="override the stage default")
    args = ap.parse_args()
    print(machine_report(), flush=True)
    require_shared()
    logging.basicConfig(level=logging.WARNING)
    from finetune.train import FinetuneConfig, finetune

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train"
        kept = long_tail(data, args.tail)
        counts = sorted(kept.values())
        print(f"long-tailed train: {sum(counts)} photos, {len(counts)} species, {counts[0]}..{counts[-1]} a species")
        for mode in args.modes:
            t0 = time.perf_counter()
            r = finetune(FinetuneConfig(root=str(data), out=str(Path(tmp) / f"out-{mode}"), init=MOBILENET_SPEC,
                                        val_root=str(PH_SNAKES / "val"), balance=mode, device="cpu",
                                        epochs=args.epochs), progress=False)
            f = r.final
            rows.append((mode, r, f, (time.perf_counter() - t0) / 60))
            print(f"{mode}: {r.epochs_run} epochs (best {r.best_epoch}), {rows[-1][3]:.1f} min; head {f['head_top1']:.3f}, "
                  f"kNN {f['knn_top1']:.3f}, blend {f['blend_top1']:.3f}", flush=True)
    from index.datasets import parse_folder_name

    rare = {parse_folder_name(name)[0] for name, _ in sorted(kept.items(), key=lambda kv: kv[1])[:7]}
    print(f"\nph-snakes val (210 photos, balanced); training photos long-tailed {counts[0]}..{counts[-1]} a species")
    print("| --balance | head top-1 | head macro-F1 | kNN top-1 | blend top-1 | blend macro-F1 | rarest-7 recall (blend) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode, r, f, _ in rows:
        rare_recall = [f["blend_recall"][i] for i, s in enumerate(r.species) if s in rare]
        print(f"| {mode} | {f['head_top1']:.3f} | {f['head_macro_f1']:.3f} | {f['knn_top1']:.3f} | {f['blend_top1']:.3f} | "
              f"{f['blend_macro_f1']:.3f} | {np.mean(rare_recall):.3f} |")


if __name__ == "__main__":
    main()
