"""Frozen vs fine-tuned MobileNetV1 on ph-snakes: kNN / probe (head) / blend, val top-1 and macro-F1.

1. Frozen: gallery = train embedded with the real MobileNetV1, logistic-regression probe, settings by 3-fold CV
   on the gallery (exactly ``benchmarks/bench_blend.py`` part 1).
2. Fine-tuned (``speciesid finetune`` code path, stage local, from the same weights, CPU): then a gallery of the
   train photos embedded with the fine-tuned encoder, its head imported as the probe (``probe import``), and
   the val photos identified with kNN alone, the head alone and the blend.

Protocols (``--protocol``):

- ``val`` (the issue's: "train to fine-tune, val to select"): early stopping / best epoch and the blend settings
  are chosen on val, and val is also where the figures are read: selection on val, an optimistic reading.
- ``split``: a stratified 15% of train (seeded) selects the epoch and the blend settings (kNN from the other
  85%); val is never looked at until the final figures.

    .venv/bin/python benchmarks/bench_finetune.py --out runs/ft-ph           # ~20 min on 2 cores
    .venv/bin/python benchmarks/bench_finetune.py --out runs/ft-ph --reuse   # figures of a finished run
    .venv/bin/python benchmarks/bench_finetune.py --out runs/x --set backbone_lr=1e-4 --set train_size=176
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import MOBILENET_SPEC, PH_SNAKES, gallery_from_embeddings, require_shared, split_embeddings


def _f1(truth: list[str], pred: list[str]) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(truth, pred, labels=sorted(set(truth)), average="macro", zero_division=0))


def _methods(index: Path, val_emb: np.ndarray, truth: list[str]) -> dict[str, tuple[float, float]]:
    from retrieval.workflows import open_identifier

    ident = open_identifier(index, precision="fp32")
    out = {}
    for method in ("knn", "probe", "blend"):
        answers = ident.identify_embeddings(val_emb, top=1, method=method)
        pred = [a.predictions[0].species for a in answers]
        out[method] = (float(np.mean([p == t for p, t in zip(pred, truth, strict=True)])), _f1(truth, pred))
    return out


def frozen(tmp: Path) -> tuple[dict, object]:
    from index.datasets import load_dataset
    from retrieval.encoders import create_encoder
    from retrieval.workflows import train_gallery_probe

    enc = create_encoder(MOBILENET_SPEC, precision="fp32")
    tr_emb, _, _ = split_embeddings(MOBILENET_SPEC, "train")
    va_emb, va_lab, _ = split_embeddings(MOBILENET_SPEC, "val")
    records = load_dataset("folder", PH_SNAKES / "train").records
    gallery_from_embeddings(tmp / "frozen", enc, records, tr_emb)
    res = train_gallery_probe(tmp / "frozen", progress=False)
    return _methods(tmp / "frozen", va_emb, va_lab), res.probe.calibration


def finetuned(out: Path, tmp: Path, protocol: str) -> tuple[dict, object, dict]:
    from index.datasets import load_dataset
    from retrieval.calibrate import select_settings
    from retrieval.encoders import create_encoder
    from retrieval.pipeline import embed_sources
    from retrieval.probe import LinearProbe
    from retrieval.workflows import import_gallery_probe

    cfg = json.loads((out / "config.json").read_text())
    enc = create_encoder(f"timm:local-dir:{out}", precision="fp32")
    records = load_dataset("folder", PH_SNAKES / "train").records
    tr_emb, errors = embed_sources([r.path for r in records], enc, progress=True, desc="embed train (fine-tuned)")
    assert not any(errors)
    val = load_dataset("folder", PH_SNAKES / "val").records
    va_emb, errors = embed_sources([r.path for r in val], enc, progress=True, desc="embed val (fine-tuned)")
    assert not any(errors)
    index = tmp / "finetuned"
    gallery_from_embeddings(index, enc, records, tr_emb)
    if protocol == "val":
        import_gallery_probe(index, out, val_root=PH_SNAKES / "val", progress=False)
    else:
        from finetune.data import stratified_split

        labels = [r.species for r in records]
        split = cfg["speciesid"]["settings"]
        tr_idx, va_idx = stratified_split(labels, split["val_split"], split["seed"])
        probe = LinearProbe.load(out)
        settings = select_settings(tr_emb[tr_idx], [labels[i] for i in tr_idx], fingerprint=probe.fingerprint,
                                   probe=probe, val_embeddings=tr_emb[va_idx], val_labels=[labels[i] for i in va_idx],
                                         val_name=f"split:{split['val_split']}")
        import_gallery_probe(index, out, progress=False)  # copies the head; settings replaced just below
        stored = LinearProbe.load(index)
        stored.calibration = settings
        stored.save(index)
    settings = LinearProbe.load(index).calibration
    return _methods(index, va_emb, [r.species for r in val]), settings, cfg["speciesid"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/ft-ph", help="fine-tuning output folder (default runs/ft-ph)")
    ap.add_argument("--protocol", default="val", choices=("val", "split"))
    ap.add_argument("--reuse", action="store_true", help="take the finished model in --out, do not train")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a FinetuneConfig field (python literal), e.g. --set epochs=10")
    ap.add_argument("--skip-frozen", action="store_true")
    args = ap.parse_args()
    require_shared()
    from finetune.train import FinetuneConfig, finetune

    out = Path(args.out)
    overrides = {}
    for item in args.set:
        k, _, v = item.partition("=")
        try:
            overrides[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            overrides[k] = v
    aug = {k.removeprefix("augment."): overrides.pop(k) for k in list(overrides) if k.startswith("augment.")}
    minutes = None
    if not args.reuse:
        if out.exists() and not (out / "checkpoint.pt").exists():
            shutil.rmtree(out)
        config = FinetuneConfig(
            root=str(PH_SNAKES / "train"), out=str(out), init=MOBILENET_SPEC, device="cpu",
            val_root=str(PH_SNAKES / "val") if args.protocol == "val" else None, **overrides,
        )
        if aug:
            config.augment = dataclasses.replace(config.augment, **aug)
        t0 = time.perf_counter()
        result = finetune(config, progress=True)
        minutes = (time.perf_counter() - t0) / 60
        print(f"fine-tuning: {result.epochs_run} epochs, best {result.best_epoch} ({result.stopped}), "
              f"{minutes:.1f} min wall (training loop {result.seconds / 60:.1f} min)")
    folders = [out] + ([out / "last"] if (out / "last" / "config.json").is_file() else [])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, folder in enumerate(folders):
            results.append(finetuned(folder, Path(tmp) / str(i), args.protocol))
        fz, fz_settings = (None, None) if args.skip_frozen else frozen(Path(tmp))
    info = results[0][2]
    print(f"\nph-snakes val (210 photos), gallery = train (980), MobileNetV1 fp32, protocol {args.protocol}")
    print(f"fine-tuning: stage {info['stage']}, {info['epochs']} epochs, best epoch {info['best_epoch']} "
          f"({info['stopped']}), training loop {info['train_seconds'] / 60:.1f} min"
          + (f", {minutes:.1f} min wall" if minutes else ""))
    for folder, (_, st, inf) in zip(folders, results, strict=True):
        print(f"{folder} ({inf.get('kept', 'best')}): blend settings ({st.selected_on}): k={st.k} "
              f"T={st.temperature} w={st.blend_weight}")
    if fz_settings is not None:
        print(f"frozen settings ({fz_settings.selected_on}): C={fz_settings.C} k={fz_settings.k} "
              f"T={fz_settings.temperature} w={fz_settings.blend_weight}")
    print("| encoder | kNN top-1 | probe/head top-1 | blend top-1 | kNN F1 | probe/head F1 | blend F1 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = ([("frozen (probe = logistic regression)", fz)] if fz else [])
    rows += [(f"fine-tuned, {inf.get('kept', 'best')} (probe = its head)", r) for r, _, inf in results]
    ft = results[0][0]
    for name, r in rows:
        print(f"| {name} | {r['knn'][0]:.3f} | {r['probe'][0]:.3f} | {r['blend'][0]:.3f} | {r['knn'][1]:.3f} | "
              f"{r['probe'][1]:.3f} | {r['blend'][1]:.3f} |")
    if fz:
        print(f"blend gain: {100 * (ft['blend'][0] - fz['blend'][0]):+.1f} points top-1; fine-tuned blend - head "
              f"{100 * (ft['blend'][0] - ft['probe'][0]):+.1f} points")


if __name__ == "__main__":
    main()
