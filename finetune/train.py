"""Two-stage fine-tuning of timm CNN encoders: ``global`` (big dataset, full head) -> ``local`` (local species).

One code path for both stages; the stage only changes the defaults (:data:`STAGE_DEFAULTS`):

- ``local`` (LP-FT): the cosine head starts as a linear probe on frozen features, the backbone stays frozen
  for the first epoch(s), then trains at a much smaller learning rate with layer-wise decay (earlier layers
  slower), batch-norm statistics frozen (small CPU batches), an EMA of the weights evaluated and kept.
- ``global``: the same with the backbone at the head's rate, batch-norm in train mode, no frozen epochs.

Every epoch: validation loss / temperature-fitted log-loss / top-1 / macro-F1 (the epoch kept and early
stopping by ``--select``: the fitted log-loss by default), a row in
``OUT/log.csv``, ``OUT/curves.png``, and an atomic ``OUT/checkpoint.pt`` (model, optimiser, EMA, step, best,
history, RNG states) so an interrupted run (Ctrl-C, crash) resumes where the last epoch ended. The result is
written by :func:`finetune.export.save_finetuned` (timm local-dir folder + head-as-probe).

Laid out as timm's ``train.py``: :func:`finetune` is a short runner over the parts: the options
(``finetune.config``), data (``finetune.data``), model (``finetune.model``), restore/resume
(``finetune.checkpoint``), one epoch and validation (``finetune.engine``), export (``finetune.export``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from finetune.augment import eval_transform, model_data_config
from finetune.budget import fit_to_budget, replan
from finetune.checkpoint import (
    CHECKPOINT,
    TrainState,
    cpu_state,
    load_checkpoint,
    restore_checkpoint,
    rng_state,
    save_progress,
    seed_all,
    set_rng_state,
)
from finetune.config import STAGE_DEFAULTS, STAGES, AugmentConfig, FinetuneConfig
from finetune.data import TransformView, build_data, loader, split_photos
from finetune.engine import (
    SizeChoice,
    choose_test_size,
    create_ema,
    create_mixup,
    create_optimisation,
    final_eval,
    init_head,
    size_candidates,
    staged_schedule,
    train_one_epoch,
    validate,
)
from finetune.model import create_net, resolve_init
from retrieval.encoders import resolve_device

logger = logging.getLogger(__name__)

# how the exported folder's "kept" line names the epoch it holds, per ``FinetuneConfig.select``
SELECTED_BY = {"nll": "least val log-loss, temperature fitted", "macro-f1": "best val macro-F1"}

__all__ = [
    "STAGES", "STAGE_DEFAULTS", "AugmentConfig", "FinetuneConfig", "FinetuneInterrupted", "FinetuneResult",
    "finetune",
]


class FinetuneInterrupted(Exception):
    """Raised on Ctrl-C after the last finished epoch's checkpoint is safely on disk."""

    def __init__(self, out: Path, epoch: int) -> None:
        super().__init__(f"interrupted after epoch {epoch}; checkpoint in {out / CHECKPOINT}")
        self.out = out
        self.epoch = epoch


@dataclass
class FinetuneResult:
    """What a run did."""

    out: Path
    species: list[str]
    epochs_run: int  # epochs trained in total (over resumed runs)
    best_epoch: int
    best: dict  # validation figures of the kept weights
    history: list[dict]
    seconds: float  # training wall time (over resumed runs)
    stopped: str  # "epochs", "early-stopping", "time-limit", "time-budget"
    final: dict = field(default_factory=dict)  # kNN / head / blend on the validation photos
    test_size: dict = field(default_factory=dict)  # the side galleries embed at, and what chose it


def weigh_untrained(state: TrainState, measured: Callable[[dict], SizeChoice | None]) -> tuple:
    """The weights to export: (epoch, weights, its validation row, its size choice or None, the comparison or None).

    Under ``--select nll`` the network before fine-tuning (``state.start_state``) is weighed against the best
    fine-tuned epoch, each by the head's log-loss at the side it would be embedded at (``measured``: the size
    choice of some weights, None with one candidate side, when the epoch's own ``val_nll`` is that figure);
    a tie keeps the fine-tuned epoch. Otherwise the best epoch, as recorded."""
    if state.start_state is None:
        return state.best_epoch, state.best_state, state.best_row, None, None

    def side_nll(weights: dict, row: dict) -> tuple[float, SizeChoice | None]:
        choice = measured(weights)
        return (choice.head_nll[choice.size] if choice else row["val_nll"]), choice

    start_nll, start_choice = side_nll(state.start_state, state.start_row)
    tuned_nll, tuned_choice = (None, None) if state.best_state is None else side_nll(state.best_state,
                                                                                       state.best_row)
    untrained = tuned_nll is None or round(start_nll, 4) < round(tuned_nll, 4)
    versus = {"fine_tuned_epoch": None if state.best_state is None else state.best_epoch,
              "fine_tuned_nll": None if tuned_nll is None else round(tuned_nll, 4),
              "untrained_nll": round(start_nll, 4), "kept_epoch": 0 if untrained else state.best_epoch,
              "rule": "least head log-loss on the validation photos, each at the side it would be embedded at"}
    if untrained:
        return 0, state.start_state, state.start_row, start_choice, versus
    return state.best_epoch, state.best_state, state.best_row, tuned_choice, versus


def finetune(
    config: FinetuneConfig,
    *,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``config.init`` on ``config.root``; write the model folder to ``config.out``.

    Resumes from ``OUT/checkpoint.pt`` when it was written under the same settings (``resume="auto"``).
    Ctrl-C raises :class:`FinetuneInterrupted` once the last finished epoch is safely checkpointed.
    """
    from tqdm.auto import tqdm

    from finetune.export import record_wall_seconds, save_finetuned, write_heldout

    t_start = time.perf_counter()
    cfg = config.resolved()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = load_checkpoint(out, cfg)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    workers = cfg.workers if cfg.workers is not None else (4 if device.type == "cuda" else 1)
    seed_all(cfg.seed)

    # ---- data and model
    split = split_photos(cfg)
    species, n_classes = split.species, len(split.species)
    source = resolve_init(cfg.init, model=cfg.model, weights=cfg.weights)
    net, frozen_params = create_net(source, n_classes, cfg)
    data_cfg = model_data_config(net.backbone)
    net = net.to(device, memory_format=torch.channels_last)
    model_size = int(max(data_cfg["input_size"][1:]))
    train_size = cfg.train_size or model_size
    data = build_data(split, data_cfg, cfg, train_size=train_size, device=device, progress=progress)
    val_loader = loader(data.val, 2 * cfg.batch_size, workers=workers, device=device)
    sizes = size_candidates(cfg.test_size, train_size, model_size)  # what galleries may embed at afterwards
    mixup = create_mixup(cfg, n_classes)
    plan = None
    if cfg.time_budget and checkpoint is not None:
        cfg.epochs = int(checkpoint["settings"]["epochs"])  # the epochs fitted when the run began
    elif cfg.time_budget:
        rng = rng_state()  # the timed steps draw augmentations: the run goes on as if they had not happened
        plan = fit_to_budget(net, data, cfg, device=device, workers=workers, mixup=mixup,
                             spent_s=time.perf_counter() - t_start, test_sizes=sizes, eval_size=model_size)
        set_rng_state(rng)
        cfg.epochs = plan.epochs
        if progress:
            tqdm.write(f"time budget {cfg.time_budget:g} min: an epoch takes ~{plan.epoch_s:.0f} s here, head init "
                       f"and final evaluation ~{plan.init_s + plan.final_s:.0f} s -> {plan.epochs} epochs")
    optim = create_optimisation(net, cfg, math.ceil(len(data.train) / cfg.batch_size), device)

    evaluate = partial(validate, loader=val_loader, device=device, n_classes=n_classes, tta=cfg.tta, amp=cfg.amp)

    # ---- restore, or start: the head, then epoch 0 (before fine-tuning)
    if checkpoint is not None:
        if progress:
            tqdm.write(f"resuming {out / CHECKPOINT}: after epoch {checkpoint['epoch']} of {cfg.epochs}")
        net.load_state_dict(checkpoint["net"])
        ema = create_ema(net, cfg.ema)
        state = restore_checkpoint(checkpoint, optim.optimizer, optim.scaler, ema)
        # loading the optimiser's state replaces its group dicts: the schedule must set the rates of the new ones
        optim.schedule = staged_schedule(optim.optimizer, cfg, optim.steps_per_epoch)
    else:
        t0 = time.perf_counter()
        how = init_head(net, source, species, cfg, loader(data.train_eval, 2 * cfg.batch_size, workers=workers,
                        device=device), device, class_weight=data.class_weight, progress=progress)
        ema = create_ema(net, cfg.ema)
        state = TrainState()
        row = {"epoch": 0, "train_loss": None, "train_top1": None, **evaluate(net), "lr": 0.0,
               "seconds": time.perf_counter() - t0}
        state.seconds += row["seconds"]
        state.record(row, net, cfg.select)
        logger.info("head init: %s; epoch 0 (before fine-tuning): %s", how, row)
        save_progress(out, cfg, species, state, net, optim.optimizer, optim.scaler, ema)

    # ---- epochs
    stopped = "early-stopping" if state.out_of_patience(cfg) else "epochs"  # a resumed run may already be done
    try:
        while state.epoch < cfg.epochs and stopped == "epochs":
            t_epoch = time.perf_counter()
            ep = state.epoch + 1
            seed_all(cfg.seed * 1000 + ep)
            train_loader = data.train_loader(cfg, ep, device=device, workers=workers)
            train_row, state.step = train_one_epoch(
                ep, net, train_loader, optim, state.step, cfg, n_classes=n_classes, device=device,
                class_weight=data.class_weight, mixup=mixup, ema=ema, progress=progress)
            model = ema.module if ema is not None else net
            t_val = time.perf_counter()
            metrics = evaluate(model)
            if ema is not None:  # the raw weights too, to measure what the EMA brings
                metrics.update({f"{k}_raw": v for k, v in evaluate(net).items()})
            t_val = time.perf_counter() - t_val
            state.epoch = ep
            state.seconds += time.perf_counter() - t_epoch
            row = {"epoch": ep, "train_loss": train_row["train_loss"], "train_top1": train_row["train_top1"],
                   **metrics, "lr": train_row["lr"], "seconds": time.perf_counter() - t_epoch}
            state.record(row, model, cfg.select)
            replanned = ""
            if plan is not None and plan.replanned is None and ep > cfg.freeze_epochs:  # once, from a real epoch
                epochs = replan(plan, after_epoch=ep, elapsed_s=time.perf_counter() - t_start,
                                epoch_s=row["seconds"], val_s=t_val)
                if epochs != cfg.epochs:
                    replanned = (f"time budget: epoch {ep} took {row['seconds']:.0f} s (~{plan.epoch_s:.0f} s "
                                 f"timed before training) -> {epochs} epochs instead of {cfg.epochs}")
                    cfg.epochs = epochs
                    optim.schedule = staged_schedule(optim.optimizer, cfg, optim.steps_per_epoch)
            save_progress(out, cfg, species, state, net, optim.optimizer, optim.scaler, ema)
            if progress:
                tqdm.write(
                    f"epoch {ep}: train loss {row['train_loss']:.3f}, val loss {metrics['val_loss']:.3f}, "
                    f"val log-loss (temperature fitted) {metrics['val_nll']:.3f}, "
                    f"val top-1 {metrics['val_top1']:.3f}, val macro-F1 {metrics['val_macro_f1']:.3f}"
                    f"{' (best)' if state.best_epoch == ep else ''}, {row['seconds']:.0f} s"
                )
                if replanned:
                    tqdm.write(replanned)
            if on_epoch_end is not None:
                on_epoch_end(ep, row)
            if state.out_of_patience(cfg):
                stopped = "early-stopping"
            elif plan is not None and state.epoch < cfg.epochs and (
                    time.perf_counter() - t_start + row["seconds"] + plan.final_s > plan.budget_s):
                stopped = "time-budget"
            elif cfg.time_limit and state.epoch < cfg.epochs:
                per_epoch = np.median([r["seconds"] for r in state.history if r["epoch"] > cfg.freeze_epochs] or
                                      [row["seconds"]])
                if state.seconds + per_epoch > cfg.time_limit * 60:
                    stopped = "time-limit"
    except KeyboardInterrupt:
        raise FinetuneInterrupted(out, state.epoch) from None

    def at(dataset, size: int):  # the photos under the evaluation transform at another side
        return loader(TransformView(dataset, eval_transform(data_cfg, size)), 2 * cfg.batch_size,
                      workers=cfg.workers or 0, device=device)

    def measured(weights: dict):  # the side these weights would be embedded at, and the head's log-loss there
        net.load_state_dict(weights)
        if len(sizes) < 2:
            return None
        return choose_test_size(net, {s: at(data.val, s) for s in sizes}, device, amp=cfg.amp, progress=progress)

    # ---- the epoch kept; under --select nll, against the network before fine-tuning, each at its own side
    kept_epoch, kept_state, kept_row, kept_choice, versus = weigh_untrained(state, measured)
    if versus is not None and progress:
        tqdm.write(f"kept epoch {kept_epoch}: head log-loss (temperature fitted, at its best side) of the best "
                   f"fine-tuned epoch {versus['fine_tuned_nll']}, of the network before fine-tuning "
                   f"{versus['untrained_nll']}")

    # ---- export the kept weights (and, with save_last, the last epoch's to OUT/last)
    info = {
        "stage": cfg.stage, "init": source.spec, "epochs": state.epoch, "best_epoch": kept_epoch,
        "stopped": stopped, "train_seconds": round(state.seconds, 1), "train_photos": len(data.train),
        "val_source": split.val_source,
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("out", "root", "val_root", "metadata")},
        "frozen_parameters": frozen_params,
        "time_budget": plan.to_dict() if plan is not None else None,
        "against_untrained": versus,
        "seconds_before_final": round(time.perf_counter() - t_start, 1),  # this process, until the final evaluation
    }
    exports = [(out, kept_state, f"{SELECTED_BY[cfg.select]} (epoch {kept_epoch})", kept_row, kept_choice)]
    if cfg.save_last:
        exports.insert(0, (out / "last", cpu_state(ema.module if ema is not None else net),
                           f"last epoch ({state.epoch})", state.history[-1], None))
    final: dict = {}
    size_info: dict = {}

    for folder, weights, kept, row, choice in exports:
        if choice is None:
            choice = measured(weights)  # loads the weights
        else:
            net.load_state_dict(weights)
        test_size = choice.size if choice is not None else sizes[0]
        final = {}
        if cfg.final_eval:
            held = choice.features.get(test_size) if choice is not None else None  # embedded by the choice
            final = final_eval(net, at(data.train, test_size), None if held else at(data.val, test_size), n_classes,
                               device, amp=cfg.amp, progress=progress, val_features=held)
        size_info = choice.to_dict() if choice is not None else {"size": test_size, "setting": cfg.test_size}
        save_finetuned(folder, net.backbone, net.head, species, source, {
            **info, "kept": kept, "val": {k: v for k, v in row.items() if k.startswith("val_")}, "final": final,
            "test_size": size_info,
        }, trained_on=len(data.train), test_size=test_size)
        if split.val_source.startswith("split:"):
            write_heldout(folder, data.val.paths, [species[t] for t in data.val.targets])  # the readable ones
        net.to(device)
    (out / CHECKPOINT).unlink(missing_ok=True)
    for folder, *_ in exports:  # the whole run, final evaluation and export included (this process, not resumed ones)
        record_wall_seconds(folder, time.perf_counter() - t_start)
    return FinetuneResult(out=out, species=species, epochs_run=state.epoch, best_epoch=kept_epoch,
                          best={k: v for k, v in kept_row.items() if k.startswith("val_")},
                          history=state.history, seconds=state.seconds, stopped=stopped, final=final,
                          test_size=size_info)
