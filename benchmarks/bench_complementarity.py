"""How much room the blend has: how often the kNN vote and the probe (or fine-tuned head) disagree, and what a
linear blend of the two could add at best, for the frozen encoder and for fine-tuned networks.

MobileNetV1 (real weights) on ph-snakes; val de-duplicated against train with the ``clean`` leak rule. Prints, never
asserts. The blend can only gain where exactly one side is right, so per pipeline it prints:

- kNN, probe (head), and blend - max(kNN, probe) at the shipped weight (the issue's "+2 points" figure);
- **best weight** - max: the blend at the weight that is best *on val itself* (a ceiling for any weight rule, not a
  figure a user gets: val chooses it);
- **either right** - max: the photos at least one side gets right (a ceiling for any way of combining the two);
- one side right: the share of photos exactly one side gets right; phi: the correlation of the two sides' hits.

Frozen row: C, metric, k, T and the weight chosen inside train (``select_settings``, the default rule), probe trained
on train. Fine-tuned rows (``speciesid finetune`` folders): embedded at the run's test size, the run's own k, T and
metric (config.json ``final``), its head imported with the temperature fitted on the run's held-out photos (as
``probe import`` does) and the shipped weight 0.5. With ``--train-val`` each fine-tuned row is read again with a
train + val gallery: val split in 5 stratified folds (2 repeats), each fold's queries voting over train + the other
4 folds (the head unchanged: it was trained on train).

    nice -n 19 .venv/bin/python benchmarks/bench_complementarity.py --train-val runs/ft-avx2real-s16 runs/ft-avx2real-s17
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
from _common import FrozenSplits, finetuned_embeddings, frozen_splits, require_shared
from _hardware import machine_report

WEIGHTS = np.round(np.linspace(0.0, 1.0, 21), 2)  # blend weights the val-chosen ceiling searches
FT_WEIGHT = 0.5  # the weight shipped for an imported fine-tuned head (``probe import --blend-weight auto``)


def room(knn: np.ndarray, probe: np.ndarray, known: np.ndarray, y: np.ndarray, weight: float) -> dict:
    """The figures of one pipeline from its two sides' probabilities (N, n_classes) on the queries ``y`` (``known``:
    the species the probe knows, as ``probe_matrix`` returns them)."""
    from retrieval.calibrate import blend_matrix

    hit_k, hit_p = knn.argmax(1) == y, probe.argmax(1) == y
    best = max(float(hit_k.mean()), float(hit_p.mean()))
    curve = np.array([float((blend_matrix(knn, probe, known, w).argmax(1) == y).mean()) for w in WEIGHTS])
    shipped = float((blend_matrix(knn, probe, known, weight).argmax(1) == y).mean())
    phi = float(np.corrcoef(hit_k, hit_p)[0, 1]) if hit_k.std() and hit_p.std() else float("nan")
    return {"knn": float(hit_k.mean()), "probe": float(hit_p.mean()), "blend": shipped, "gain": shipped - best,
            "best_w": float(WEIGHTS[curve.argmax()]), "best_gain": float(curve.max()) - best,
            "either": float((hit_k | hit_p).mean()) - best, "one_side": float((hit_k != hit_p).mean()), "phi": phi}


def print_row(name: str, r: dict, note: str = "") -> None:
    at = "" if np.isnan(r["best_w"]) else f" (w={r['best_w']:g})"
    print(f"| {name} | {r['knn']:.3f} | {r['probe']:.3f} | {r['blend']:.3f} | {100 * r['gain']:+.1f} | "
          f"{100 * r['best_gain']:+.1f}{at} | {100 * r['either']:+.1f} | {100 * r['one_side']:.1f}% | {r['phi']:.2f} | "
          f"{note} |", flush=True)


def frozen_row(d: FrozenSplits, folds: int = 5) -> dict:
    """The frozen pipeline, every setting chosen inside train (in ``folds`` cross-validation folds)."""
    from retrieval.calibrate import knn_matrix, probe_matrix, select_settings
    from retrieval.probe import train_probe

    x, y, xv, yv, n = d.train, d.y, d.val, d.yv, len(d.species)
    cal = select_settings(x, [str(v) for v in y], fingerprint="bench", folds=folds)
    probe = train_probe(x, [str(v) for v in y], fingerprint="bench", C=cal.C)
    pp, known = probe_matrix(probe, xv, {str(i): i for i in range(n)}, n)
    kn = knn_matrix(xv, x, y, n, cal.k, cal.temperature, metric=cal.metric)
    r = room(kn, pp, known, yv, cal.blend_weight)
    r["settings"] = f"C={cal.C:g} {cal.metric} k={cal.k} T={cal.temperature:g} w={cal.blend_weight:g}"
    return r


def finetuned_rows(folder: Path, d: FrozenSplits, train_val: bool) -> tuple[dict, dict | None]:
    """(train gallery, train + val gallery or None) figures of one fine-tuned run."""
    from sklearn.model_selection import StratifiedKFold

    from retrieval.calibrate import knn_matrix, probe_matrix
    from retrieval.probe import LinearProbe, fit_head_temperature
    from retrieval.protocol import HELDOUT_FILE

    final = json.loads((folder / "config.json").read_text())["speciesid"]["final"]
    k, t, metric = final["k"], final["temperature"], final["metric"]
    y, yv, species, n = d.y, d.yv, d.species, len(d.species)
    x, xv = finetuned_embeddings(folder, d.train_paths), finetuned_embeddings(folder, d.val_paths)
    # a run's held-out photos by species folder and file name: the run may have read them through another path
    pos = {Path(p).parts[-2:]: i for i, p in enumerate(d.train_paths)}
    with open(folder / HELDOUT_FILE, newline="") as f:
        held = np.array(sorted(pos[Path(r["path"]).parts[-2:]] for r in csv.DictReader(f)))
    head = LinearProbe.load(folder)
    head = head.scaled(fit_head_temperature(head, x[held], [species[i] for i in y[held]]))
    ph, known = probe_matrix(head, xv, {s: i for i, s in enumerate(species)}, n)
    r = room(knn_matrix(xv, x, y, n, k, t, metric=metric), ph, known, yv, FT_WEIGHT)
    r["settings"] = f"{metric} k={k} T={t:g} w={FT_WEIGHT:g}"
    if not train_val:
        return r, None
    reads = []
    for seed in (0, 1):
        kn = np.zeros((len(yv), n))
        for g, q in StratifiedKFold(5, shuffle=True, random_state=seed).split(xv, yv):
            kn[q] = knn_matrix(xv[q], np.vstack([x, xv[g]]), np.concatenate([y, yv[g]]), n, k, t, metric=metric)
        reads.append(room(kn, ph, known, yv, FT_WEIGHT))
    rv = {key: float(np.mean([d[key] for d in reads])) for key in reads[0]}
    rv["settings"] = r["settings"]
    return r, rv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("finetuned", nargs="*", type=Path, help="speciesid finetune output folders (timm local-dir)")
    ap.add_argument("--train-val", action="store_true",
                    help="also read each fine-tuned run with a train + val gallery (5-fold over val, 2 repeats)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: the frozen row's settings chosen in 2 folds, not 5 (figures not to quote)")
    args = ap.parse_args()
    require_shared()
    print("bench_complementarity: where it ran\n" + machine_report(), flush=True)
    d = frozen_splits()
    print(f"val: {d.val_total} photos, {len(d.yv)} kept after de-duplication against train")
    print("| pipeline | kNN | probe / head | blend | blend - max | best weight - max (val chooses: a ceiling) | "
          "either right - max | one side right | phi | settings |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    t0 = time.perf_counter()
    r = frozen_row(d, 2 if args.quick else 5)
    print_row("frozen, train gallery", r, r["settings"])
    rows: dict[str, list[dict]] = {}
    for folder in args.finetuned:
        a, b = finetuned_rows(folder, d, args.train_val)
        print_row(f"{folder.name}, train gallery", a, a["settings"])
        rows.setdefault("train gallery", []).append(a)
        if b is not None:
            print_row(f"{folder.name}, train + val gallery", b, "5-fold over val, 2 repeats")
            rows.setdefault("train + val gallery", []).append(b)
    for name, rs in rows.items():
        mean = {key: float(np.mean([d[key] for d in rs])) for key in rs[0] if key != "settings"}
        mean["best_w"] = float("nan")
        print_row(f"**fine-tuned, mean of {len(rs)}, {name}**", mean,
                  f"blend - max sd {100 * np.std([d['gain'] for d in rs], ddof=1):.1f}" if len(rs) > 1 else "")
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
