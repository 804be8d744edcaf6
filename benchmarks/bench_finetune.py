"""Frozen vs fine-tuned MobileNetV1 on ph-snakes: kNN / probe (head) / blend, val top-1 and macro-F1.

1. Frozen: gallery = train embedded with the real MobileNetV1, logistic-regression probe, settings by 3-fold CV
   on the gallery (exactly ``benchmarks/bench_blend.py`` part 1).
2. Fine-tuned (``speciesid finetune`` code path, stage local, from the same weights, CPU): then a gallery of the
   train photos embedded with the fine-tuned encoder, its head imported as the probe (``probe import``), and
   the val photos identified with kNN alone, the head alone and the blend.

Protocols (``--protocol``):

- ``split`` (default, the honest protocol of docs/accuracy.md): a stratified 15% of train (seeded) selects the
  epoch and, as ``speciesid probe import`` does without ``--val-root`` (``OUT/heldout.csv``), the head's
  temperature and the blend settings (kNN from the other 85%); val, de-duplicated against train with the
  ``clean`` leak rule (4 near-copies out), is read once, at the end.
- ``val`` ("val selects", kept as a labelled second row: it over-states): early stopping / best epoch and the
  blend settings are chosen on val, and val (all 210 photos) is also where the figures are read.

``--set time_budget=20`` runs the shipped recipe (``speciesid finetune --time-budget 20``): the epochs fitted to
this machine's timed steps. The CPU kind and the minutes are printed.

    .venv/bin/python benchmarks/bench_finetune.py                      # ~20 min on 2 cores, runs/bench-finetune
    .venv/bin/python benchmarks/bench_finetune.py --reuse              # figures of that finished run
    .venv/bin/python benchmarks/bench_finetune.py --out runs/x --set backbone_lr=1e-4 --set train_size=176

``--out`` (default ``runs/bench-finetune``, a folder no README command uses) is checked before anything is
written, the settings first: a folder holding files is refused (exit 2) unless it is one of this benchmark's
runs (it holds ``bench_finetune.json``, written before anything else; taken away again by a run that failed before
adding anything) or ``--overwrite`` is given. Nothing is ever deleted wholesale: a run starting afresh removes only
an earlier fine-tuning run's own files (``finetune.checkpoint.clear_run``), and a folder holding other files of
those names is refused by ``finetune``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from _common import (
    MOBILENET_SPEC,
    PH_SNAKES,
    dedup,
    gallery_from_embeddings,
    require_shared,
    split_embeddings,
)
from _hardware import machine_report

#: Written into ``--out`` before the run writes anything: the folder is one of this benchmark's runs, which a later
#: run may train into again (an earlier run's own files replaced) without ``--overwrite``.
MARKER = "bench_finetune.json"
DEFAULT_OUT = "runs/bench-finetune"


def _f1(truth: list[str], pred: list[str]) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(truth, pred, labels=sorted(set(truth)), average="macro", zero_division=0))


def _methods(index: Path, val_emb: np.ndarray, truth: list[str],
             other_weight: float | None = None) -> dict[str, tuple[float, float]]:
    """Top-1 and macro-F1 of kNN, probe and blend; with ``other_weight``, also ``blend@other``: the blend at that
    weight instead of the gallery's, k/T/metric as chosen."""
    from retrieval.encoders import EncoderConfig
    from retrieval.workflows import open_identifier

    ident = open_identifier(index, EncoderConfig(precision="fp32"))
    weight = ident.blend_weight
    out = {}
    for method in ("knn", "probe", "blend") + (("blend@other",) if other_weight is not None else ()):
        ident.blend_weight = other_weight if method == "blend@other" else weight
        answers = ident.identify_embeddings(val_emb, top=1, method=method.partition("@")[0])
        pred = [a.predictions[0].species for a in answers]
        out[method] = (float(np.mean([p == t for p, t in zip(pred, truth, strict=True)])), _f1(truth, pred))
    return out


def frozen(tmp: Path, keep: np.ndarray) -> tuple[dict, object]:
    from index.datasets import load_dataset
    from retrieval.encoders import create_encoder
    from retrieval.workflows import train_gallery_probe

    enc = create_encoder(MOBILENET_SPEC, precision="fp32")
    tr_emb, _, _ = split_embeddings(MOBILENET_SPEC, "train")
    va_emb, va_lab, _ = split_embeddings(MOBILENET_SPEC, "val")
    records = load_dataset("folder", PH_SNAKES / "train").records
    gallery_from_embeddings(tmp / "frozen", enc, records, tr_emb)
    res = train_gallery_probe(tmp / "frozen", progress=False)
    return _methods(tmp / "frozen", va_emb[keep], [va_lab[i] for i in keep]), res.probe.calibration


def finetuned(out: Path, tmp: Path, protocol: str, keep: np.ndarray) -> tuple[dict, object, dict]:
    from index.datasets import load_dataset
    from retrieval.encoders import create_encoder
    from retrieval.pipeline import embed_sources
    from retrieval.probe import LinearProbe
    from retrieval.protocol import HELDOUT_FILE
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
    val_root = PH_SNAKES / "val" if protocol == "val" else None
    if protocol != "val":
        # what `speciesid probe import` does without --val-root: k, T, w (and the head's temperature) chosen on
        # the photos the run held out of train (OUT/heldout.csv), kNN from the other train photos
        if not (out / HELDOUT_FILE).is_file():  # a run from before heldout.csv: the same split, rebuilt
            from finetune.data import stratified_split
            from finetune.export import write_photo_list

            labels = [r.species for r in records]
            split = cfg["speciesid"]["settings"]
            _, va_idx = stratified_split(labels, split["val_split"], split["seed"])
            write_photo_list(out, HELDOUT_FILE, [records[i].path for i in va_idx], [labels[i] for i in va_idx])
    # the weight `probe import --blend-weight choose` picks, read beside the shipped default (auto: the prior where
    # the selection photos also chose the run's epoch)
    import_gallery_probe(index, out, val_root=val_root, blend_weight="choose", progress=False)
    chosen = LinearProbe.load(index).calibration.blend_weight
    import_gallery_probe(index, out, val_root=val_root, progress=False)
    settings = LinearProbe.load(index).calibration
    info = {**cfg["speciesid"], "embedded_at": enc.input_size}  # what the encoder does (a config may be edited)
    return _methods(index, va_emb[keep], [val[i].species for i in keep], chosen), settings, info


def parse_overrides(items: list[str]) -> tuple[dict, dict]:
    """``--set KEY=VALUE`` items as (FinetuneConfig fields, ``augment.`` fields), each value a python literal (else
    the text as given)."""
    overrides: dict = {}
    for item in items:
        k, _, v = item.partition("=")
        try:
            overrides[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            overrides[k] = v
    aug = {k.removeprefix("augment."): overrides.pop(k) for k in list(overrides) if k.startswith("augment.")}
    return overrides, aug


def build_config(out: Path, protocol: str, items: list[str]):
    """The run's FinetuneConfig from ``--set`` items, checked (ValueError, naming what to change) before anything is
    written: an unknown field, a value ``FinetuneConfig.resolved`` refuses. Without a checkpoint in ``out`` (nothing
    to resume) the run starts afresh (``resume`` no: an earlier run's own files are removed, nothing else)."""
    from finetune.checkpoint import CHECKPOINT
    from finetune.config import FinetuneConfig

    overrides, aug = parse_overrides(items)
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"--set {', '.join(unknown)}: not a FinetuneConfig field (the fields are those of "
                         "finetune/config.py, e.g. --set epochs=10, --set augment.hflip=0)")
    if "resume" not in overrides and not (out / CHECKPOINT).is_file():
        overrides["resume"] = "no"
    config = FinetuneConfig(
        root=str(PH_SNAKES / "train"), out=str(out), init=MOBILENET_SPEC, device="cpu",
        val_root=str(PH_SNAKES / "val") if protocol == "val" else None, **overrides,
    )
    if aug:
        try:
            config.augment = dataclasses.replace(config.augment, **aug)
        except TypeError as exc:
            raise ValueError(f"--set augment.*: {exc} (the fields are those of finetune/config.py's "
                             "AugmentConfig)") from exc
    config.resolved()  # the values: refused now (ValueError) rather than after the data are read
    return config


def check_out(out: Path, config, *, overwrite: bool) -> None:
    """Refuse (ValueError, saying what to do) an ``--out`` this benchmark must not train into: one holding files
    that is not one of its runs (no :data:`MARKER`) unless ``overwrite``, and what ``speciesid finetune`` itself
    refuses (a file, a gallery, files of a run's names not written by a run: ``finetune.checkpoint.check_out``).
    Writes nothing and deletes nothing."""
    from finetune.checkpoint import check_out as finetune_check_out

    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not overwrite:
        raise ValueError(f"--out {out} holds files and is not a bench_finetune run (no {MARKER} in it): it may be "
                         "a 'speciesid finetune' model or other work of yours; give a new or empty --out (default "
                         f"{DEFAULT_OUT}), or pass --overwrite to train into it all the same (an earlier fine-tuning "
                         "run's own files there are replaced; nothing else is removed)")
    finetune_check_out(out, config.resolved())


class Mark(NamedTuple):
    """What :func:`mark_out` did: whether it made ``out`` and wrote the marker, and the names ``out`` held before."""

    made: bool
    wrote: bool
    before: frozenset[str]


def mark_out(out: Path) -> Mark:
    """Make ``out`` (when missing) and write :data:`MARKER` into it (when missing), before the run writes
    anything."""
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    before = frozenset(p.name for p in out.iterdir())
    wrote = MARKER not in before
    if wrote:
        (out / MARKER).write_text(json.dumps({"written_by": "benchmarks/bench_finetune.py", "argv": sys.argv[1:],
                                              "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
    return Mark(made, wrote, before)


def unmark_out(out: Path, mark: Mark) -> None:
    """Undo :func:`mark_out` when the run added nothing to ``out``: the marker removed when this run wrote it (a
    folder of other work marked for an ``--overwrite`` run that failed at once is not left looking like one of this
    benchmark's runs), and ``out`` too when made here and empty then. Anything else in ``out`` stays."""
    if not mark.wrote or {p.name for p in out.iterdir()} != mark.before | {MARKER}:
        return
    (out / MARKER).unlink()
    if mark.made and not any(out.iterdir()):
        out.rmdir()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help=f"fine-tuning output folder (default {DEFAULT_OUT}); one holding files that is not a "
                         "bench_finetune run is refused unless --overwrite")
    ap.add_argument("--overwrite", action="store_true",
                    help="train into an --out that holds files and is not a bench_finetune run (an earlier "
                         "fine-tuning run's own files there are replaced; nothing else is removed)")
    ap.add_argument("--protocol", default="split", choices=("split", "val"),
                    help="split: honest (default); val: 'val selects', over-states")
    ap.add_argument("--reuse", action="store_true", help="take the finished model in --out, do not train")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a FinetuneConfig field (python literal), e.g. --set epochs=10")
    ap.add_argument("--skip-frozen", action="store_true", help="skip the frozen encoder's row (part 1)")
    args = ap.parse_args()
    out = Path(args.out)
    config = None
    if not args.reuse:  # settings, then --out: refused before anything is written (or read at length)
        try:
            config = build_config(out, args.protocol, args.set)
            check_out(out, config, overwrite=args.overwrite)
        except (TypeError, ValueError) as exc:
            ap.error(str(exc))
    require_shared()
    print("bench_finetune: where it ran\n" + machine_report(), flush=True)
    minutes = None
    if config is not None:
        from finetune.train import finetune

        mark = mark_out(out)
        t0 = time.perf_counter()
        try:
            result = finetune(config, progress=True, report=print)
        except ValueError as exc:  # a setting this machine cannot run (a budget that fits no epoch): as the CLI
            unmark_out(out, mark)
            sys.exit(f"bench_finetune: {exc}")
        except BaseException:
            unmark_out(out, mark)
            raise
        minutes = (time.perf_counter() - t0) / 60
        print(f"fine-tuning: {result.epochs_run} epochs, best {result.best_epoch} ({result.stopped}), "
              f"{minutes:.1f} min wall (training loop {result.seconds / 60:.1f} min)")
    # the leak check after training: it loads the gallery store (lancedb), which must not be loaded when the
    # training loaders fork their worker processes
    tr_frozen, _, tr_paths = split_embeddings(MOBILENET_SPEC, "train")
    va_frozen, _, va_paths = split_embeddings(MOBILENET_SPEC, "val")
    if args.protocol == "split":
        leaks = dedup(tr_frozen, tr_paths, va_frozen, va_paths)
        keep = leaks["val"]
        print(f"val: {len(va_paths)} photos, {len(leaks['leaks'])} left out as leaks of train photos "
              f"({', '.join(Path(va_paths[j]).name for j in leaks['leaks'])})")
    else:
        keep = np.arange(len(va_paths))

    folders = [out] + ([out / "last"] if (out / "last" / "config.json").is_file() else [])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, folder in enumerate(folders):
            results.append(finetuned(folder, Path(tmp) / str(i), args.protocol, keep))
        fz, fz_settings = (None, None) if args.skip_frozen else frozen(Path(tmp), keep)
    info = results[0][2]
    print(f"\nph-snakes val ({len(keep)} photos), gallery = train (980 photos, byte-identical copies stored once), "
          f"MobileNetV1 fp32, protocol {args.protocol}")
    print(f"fine-tuning: stage {info['stage']}, {info['epochs']} epochs, best epoch {info['best_epoch']} "
          f"({info['stopped']}), training loop {info['train_seconds'] / 60:.1f} min"
          + (f", {minutes:.1f} min wall" if minutes else ""))
    if info.get("time_budget"):
        plan = info["time_budget"]
        print(f"time budget {plan['budget_s'] / 60:.0f} min: epoch ~{plan['epoch_s']:.0f} s (timed steps "
              f"{plan['step_s']:.2f} s), head init + final ~{plan['init_s'] + plan['final_s']:.0f} s -> "
              f"{plan['epochs']} epochs planned" + (
                  f", re-planned from epoch {re['after_epoch']} ({re['epoch_s']:.0f} s, final ~{re['final_s']:.0f} s) "
                  f"-> {re['epochs']}" if (re := plan.get("replanned")) else "")
              + f"; whole run {info.get('process_wall_seconds', 0) / 60:.1f} min (final evaluation from "
              f"{info.get('seconds_before_final', 0) / 60:.1f} min)")
    for folder, (_, st, inf) in zip(folders, results, strict=True):
        ts = inf.get("test_size") or {"size": "none (a run from before --test-size)"}
        nll = ", ".join(f"{s} px {v:.3f}" for s, v in (ts.get("head_nll") or {}).items())
        print(f"{folder} ({inf.get('kept', 'best')}): embedded at {inf['embedded_at']} px; the run chose "
              f"{ts['size']}" + (f" (head log-loss on the {ts['photos']} held-out photos: {nll})" if nll else ""))
        if vs := inf.get("against_untrained"):
            print(f"{folder}: kept epoch {vs['kept_epoch']}; head log-loss at its best side: fine-tuned epoch "
                  f"{vs['fine_tuned_epoch']} {vs['fine_tuned_nll']}, the network before fine-tuning {vs['untrained_nll']}")
        print(f"{folder} ({inf.get('kept', 'best')}): blend settings ({st.selected_on}): k={st.k} "
              f"T={st.temperature} w={st.blend_weight} kNN metric {st.metric}")
    if fz_settings is not None:
        print(f"frozen settings ({fz_settings.selected_on}): C={fz_settings.C} k={fz_settings.k} "
              f"T={fz_settings.temperature} w={fz_settings.blend_weight} kNN metric {fz_settings.metric}")
    print("| encoder | kNN top-1 | probe/head top-1 | blend top-1 | kNN F1 | probe/head F1 | blend F1 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = ([("frozen (probe = logistic regression)", fz)] if fz else [])
    rows += [(f"fine-tuned, {inf.get('kept', 'best')} (probe = its head)", r) for r, _, inf in results]
    ft = results[0][0]
    for name, r in rows:
        print(f"| {name} | {r['knn'][0]:.3f} | {r['probe'][0]:.3f} | {r['blend'][0]:.3f} | {r['knn'][1]:.3f} | "
              f"{r['probe'][1]:.3f} | {r['blend'][1]:.3f} |")
    for r, st, inf in results:
        if "blend@other" in r:
            print(f"fine-tuned, {inf.get('kept', 'best')}: blend weight {st.blend_weight:g} "
                  f"({st.weight_fixed or 'chosen'}); with the weight --blend-weight choose picks instead: top-1 "
                  f"{r['blend@other'][0]:.3f}, F1 {r['blend@other'][1]:.3f}")
    if fz:
        print(f"blend gain: {100 * (ft['blend'][0] - fz['blend'][0]):+.1f} points top-1; fine-tuned blend - head "
              f"{100 * (ft['blend'][0] - ft['probe'][0]):+.1f} points")


if __name__ == "__main__":
    main()
