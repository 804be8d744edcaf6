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

Laid out as timm's ``train.py``: :func:`finetune` is a short runner over its steps (prepare, restore or start,
train, weigh the untrained network, export) and the parts they call: the options
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
from typing import Any

import numpy as np
import torch

from finetune.augment import model_data_config
from finetune.budget import BudgetPlan, fit_to_budget, machine_load, replan
from finetune.checkpoint import (
    CHECKPOINT,
    PHOTOS_FILE,
    TrainState,
    check_out,
    check_photos,
    clear_run,
    cpu_state,
    load_checkpoint,
    photos_digest,
    restore_checkpoint,
    rng_state,
    save_checkpoint,
    save_photo_list,
    save_progress,
    seed_all,
    set_rng_state,
)
from finetune.config import STAGE_DEFAULTS, STAGES, AugmentConfig, FinetuneConfig
from finetune.data import FinetuneData, PhotoDataset, Split, build_data, split_photos
from finetune.engine import (
    Optimisation,
    SizeChoice,
    choose_test_size,
    create_ema,
    create_mixup,
    create_optimisation,
    final_eval,
    init_head,
    size_candidates,
    sizes_measured,
    staged_schedule,
    train_one_epoch,
    validate,
)
from finetune.model import InitSource, Net, create_net, resolve_init
from retrieval.preprocess import timm_input_side
from retrieval.torch_encoders import resolve_device

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
    epochs_planned: int = 0  # the epochs the run was to train (--epochs, or what --time-budget fitted of them)
    max_epochs: int = 0  # --epochs
    backbone_trained: bool = True  # whether the kept weights' backbone trained (False: the starting network's)


def weigh_untrained(state: TrainState, measured: Callable[[dict], SizeChoice | None]) -> tuple:
    """The weights to export: (epoch, weights, its validation row, its size choice or None, the comparison or None).

    Under ``--select nll`` the network before fine-tuning (``state.start_state``) is weighed against the best
    fine-tuned epoch, each by the head's log-loss at the side it would be embedded at (``measured``: the size
    choice of some weights, None at the model's own side alone, where the epoch's own ``val_nll`` is that figure);
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


@dataclass
class _Run:
    """What the parts of one run share (see :func:`finetune`)."""

    cfg: FinetuneConfig  # resolved settings; ``epochs`` may be refitted by the time budget
    out: Path  # the output folder
    t_start: float  # when the run began (perf_counter)
    device: torch.device  # where the network trains
    workers: int  # DataLoader workers
    species: list[str]  # the head's classes, in order
    split: Split  # the train / val photos
    source: InitSource  # the initial weights
    net: Net  # backbone + cosine head
    frozen_params: int  # parameters never trained (freeze_layers)
    data: FinetuneData  # datasets and loaders
    sizes: list[int]  # the sides a gallery may embed at afterwards
    mixup: Any  # timm's Mixup, or None
    optim: Optimisation  # optimiser, schedule, scaler
    evaluate: Callable[[torch.nn.Module], dict]  # validation figures of some weights
    plan: BudgetPlan | None = None  # the time budget's plan (restored on resume); None without a budget
    max_epochs: int = 0  # --epochs (a budget fits at most these)
    elapsed_before: float = 0.0  # process wall seconds of the earlier runs this one resumes, up to their checkpoint
    stopped_before: str | None = None  # why the resumed run's epochs had stopped ("time-budget"), else None
    progress: bool = True  # progress bars
    report: Callable[[str], None] = logger.info  # where status lines go
    state: TrainState = field(default_factory=TrainState)  # epochs so far, best, history (checkpointed)
    ema: Any = None  # timm's ModelEmaV3, or None
    checkpoint: dict | None = None  # the checkpoint to resume from, until restored
    photos_sha256: str = ""  # the digest of the photos' inventory (the checkpoint's; the list: PHOTOS_FILE)
    earlier: list[Path] = field(default_factory=list)  # an earlier run's files in out (check_out's scan)


def finetune(
    config: FinetuneConfig,
    *,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    report: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``config.init`` on ``config.root``; write the model folder to ``config.out``.

    Resumes from ``OUT/checkpoint.pt`` when it was written under the same settings (``resume="auto"``).
    Ctrl-C raises :class:`FinetuneInterrupted` once the last finished epoch is safely checkpointed.
    ``report`` receives the run's status lines (the budget's plan, a resume, each epoch, the epoch kept): the
    log by default; the CLI prints them between its progress bars.
    """
    made = _missing_folders(Path(config.out))  # removed again when the run stops before it writes in them
    try:
        run = _prepare(config, progress=progress, report=report or logger.info)
        _restore_or_start(run)
    except BaseException:
        _remove_empty(made)
        raise
    stopped = _train(run, on_epoch_end)
    epoch, weights, row, choice, versus = weigh_untrained(run.state, partial(_measured, run))
    if versus is not None:
        run.report(f"kept epoch {epoch}: head log-loss (temperature fitted, at its best side) of the best "
                   f"fine-tuned epoch {versus['fine_tuned_nll']}, of the network before fine-tuning "
                   f"{versus['untrained_nll']}")
    return _export(run, stopped, epoch, weights, row, choice, versus)


def _missing_folders(out: Path) -> list[Path]:
    """``out`` and those of its parents that do not exist yet, the deepest first: what ``out.mkdir(parents=True)``
    makes."""
    missing = []
    for folder in (out, *out.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (the deepest first) while they are empty: a run refused or failed before it wrote anything
    leaves no empty --out it made (one that existed before stays)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): it and its parents stay
            return


def _prepare(config: FinetuneConfig, *, progress: bool, report: Callable[[str], None]) -> _Run:
    """Data and model, the time budget's plan, the optimiser: everything before the first epoch."""
    t_start = time.perf_counter()
    load = machine_load()  # before this run's own work loads the machine
    cfg = config.resolved()
    out = Path(cfg.out)
    # a file, a gallery, the --init folder, files not of a run: refused before anything is written
    earlier = check_out(out, cfg)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = load_checkpoint(out, cfg)  # refused now, before the data are read, when it cannot be resumed
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    workers = cfg.workers if cfg.workers is not None else (4 if device.type == "cuda" else 1)
    seed_all(cfg.seed)

    split = split_photos(cfg)
    photos_sha256 = photos_digest(split.inventory)
    if checkpoint is not None:  # the photos listed (not yet decoded): refused now when they are not the same
        check_photos(out, checkpoint, split.species, split.inventory)
    source = resolve_init(cfg.init, model=cfg.model, weights=cfg.weights)
    net, frozen_params = create_net(source, len(split.species), cfg)
    data_cfg = model_data_config(net.backbone)
    net = net.to(device, memory_format=torch.channels_last)
    model_size = timm_input_side(data_cfg)
    train_size = cfg.train_size or model_size
    data = build_data(split, data_cfg, cfg, train_size=train_size, device=device, progress=progress)
    val_loader = data.eval_loader(data.val, cfg, device=device, workers=workers)
    sizes = size_candidates(cfg.test_size, train_size, model_size)
    mixup = create_mixup(cfg, len(split.species))
    plan, max_epochs = None, cfg.epochs
    if cfg.time_budget and checkpoint is not None:
        cfg.epochs = int(checkpoint["settings"]["epochs"])  # the epochs fitted when the run began (or re-planned)
        plan = BudgetPlan.from_saved(checkpoint.get("plan"), str(out / CHECKPOINT))  # its deadline goes on
        max_epochs = plan.max_epochs if plan is not None else max_epochs
    elif cfg.time_budget:
        rng = rng_state()  # the timed steps draw augmentations: the run goes on as if they had not happened
        plan = fit_to_budget(net, data, cfg, device=device, workers=workers, mixup=mixup,
                             spent_s=time.perf_counter() - t_start, test_sizes=sizes, eval_size=model_size,
                             load=load)
        set_rng_state(rng)
        cfg.epochs = plan.epochs
        report(f"time budget {cfg.time_budget:g} min: an epoch takes ~{plan.epoch_s:.0f} s here, head init "
               f"and final evaluation ~{plan.init_s + plan.final_s:.0f} s -> {plan.epochs} epochs")
    optim = create_optimisation(net, cfg, math.ceil(len(data.train) / cfg.batch_size), device)
    evaluate = partial(validate, loader=val_loader, device=device, tta=cfg.tta, amp=cfg.amp)
    return _Run(cfg=cfg, out=out, t_start=t_start, device=device, workers=workers, species=split.species,
                split=split, source=source, net=net, frozen_params=frozen_params, data=data,
                sizes=sizes, mixup=mixup, optim=optim, evaluate=evaluate, plan=plan, max_epochs=max_epochs,
                progress=progress, report=report, checkpoint=checkpoint, photos_sha256=photos_sha256,
                earlier=earlier)


def _restore_or_start(run: _Run) -> None:
    """The checkpoint's state when the run resumes; else the head, then epoch 0 (before fine-tuning)."""
    cfg, net = run.cfg, run.net
    checkpoint, run.checkpoint = run.checkpoint, None  # read once; not kept for the rest of the run
    if checkpoint is not None:
        run.report(f"resuming {run.out / CHECKPOINT}: after epoch {checkpoint['epoch']} of {cfg.epochs}")
        net.load_state_dict(checkpoint["net"])
        run.ema = create_ema(net, cfg.ema)
        run.state = restore_checkpoint(checkpoint, run.optim.optimizer, run.optim.scaler, run.ema)
        run.elapsed_before = float(checkpoint.get("elapsed_s") or 0.0)
        run.stopped_before = checkpoint.get("stopped")
        # loading the optimiser's state replaces its group dicts: the schedule must set the rates of the new ones
        run.optim.schedule = staged_schedule(run.optim.optimizer, cfg, run.optim.steps_per_epoch)
        save_photo_list(run.out, run.split.inventory, run.photos_sha256)  # a checkpoint from before the list
        return
    removed = clear_run(run.out, run.earlier)  # an earlier run's files: none of them may pass for this run's
    if removed:
        run.report(f"starting afresh in {run.out}: removed the earlier fine-tuning run's "
                   + ", ".join(str(p.relative_to(run.out)) for p in removed))
    t0 = time.perf_counter()
    how = init_head(net, run.source, run.species, cfg, _at(run, run.data.train, run.data.model_side), run.device,
                    class_weight=run.data.class_weight, progress=run.progress)
    run.ema = create_ema(net, cfg.ema)
    row = {"epoch": 0, "train_loss": None, "train_top1": None, **run.evaluate(net), "lr": 0.0,
           "seconds": time.perf_counter() - t0}
    run.state.seconds += row["seconds"]
    run.state.record(row, net, cfg.select)
    logger.info("head init: %s; epoch 0 (before fine-tuning): %s", how, row)
    # the photo list only now, beside the first checkpoint: a Ctrl-C during the head's start leaves --out as it was
    save_photo_list(run.out, run.split.inventory, run.photos_sha256)
    _save(run)


def _elapsed(run: _Run) -> float:
    """Process wall seconds of the whole run so far: this process and the earlier ones it resumes."""
    return run.elapsed_before + time.perf_counter() - run.t_start


def _save(run: _Run, stopped: str | None = None, *, progress: bool = True) -> None:
    """The checkpoint (with ``progress``: log.csv and curves.png too), with what a resume needs beyond the training
    state: the photos' digest (their list: PHOTOS_FILE), the budget's plan, the time spent, and why the epochs
    stopped (``stopped``)."""
    extra = {"photos_sha256": run.photos_sha256, "plan": asdict(run.plan) if run.plan is not None else None,
             "elapsed_s": _elapsed(run), "stopped": stopped}
    save = save_progress if progress else save_checkpoint
    save(run.out, run.cfg, run.species, run.state, run.net, run.optim.optimizer, run.optim.scaler, run.ema,
         extra=extra)


def _train(run: _Run, on_epoch_end: Callable[[int, dict], None] | None) -> str:
    """The epochs, each checkpointed; returns why they stopped ("epochs", "early-stopping", "time-budget",
    "time-limit"). Ctrl-C: :class:`FinetuneInterrupted` once the last finished epoch is on disk."""
    cfg, net, state, optim, ema = run.cfg, run.net, run.state, run.optim, run.ema
    stopped = "early-stopping" if state.out_of_patience(cfg) else "epochs"  # a resumed run may already be done
    if stopped == "epochs" and state.epoch > 0:  # resumed: its budget had run out, or its deadline or limit is near
        epoch_s = _epoch_estimate(run)
        stopped = run.stopped_before or (_stop_reason(run, epoch_s) if epoch_s is not None else "epochs")
        if stopped != "epochs":
            run.report(f"resumed after epoch {state.epoch}: no epoch more ({stopped})")
    try:
        while state.epoch < cfg.epochs and stopped == "epochs":
            t_epoch = time.perf_counter()
            ep = state.epoch + 1
            seed_all(cfg.seed * 1000 + ep)
            train_loader = run.data.train_loader(cfg, ep, device=run.device, workers=run.workers)
            train_row, state.step = train_one_epoch(
                ep, net, train_loader, optim, state.step, cfg, n_classes=len(run.species), device=run.device,
                class_weight=run.data.class_weight, mixup=run.mixup, ema=ema, progress=run.progress)
            model = ema.module if ema is not None else net
            t_val = time.perf_counter()
            metrics = run.evaluate(model)
            if ema is not None:  # the raw weights too, to measure what the EMA brings
                metrics.update({f"{k}_raw": v for k, v in run.evaluate(net).items()})
            t_val = time.perf_counter() - t_val
            state.epoch = ep
            state.seconds += time.perf_counter() - t_epoch
            row = {"epoch": ep, "train_loss": train_row["train_loss"], "train_top1": train_row["train_top1"],
                   **metrics, "lr": train_row["lr"], "seconds": time.perf_counter() - t_epoch}
            state.record(row, model, cfg.select)
            replanned = _replan(run, ep, row["seconds"], t_val)
            _save(run)
            run.report(f"epoch {ep}: train loss {row['train_loss']:.3f}, val loss {metrics['val_loss']:.3f}, "
                       f"val log-loss (temperature fitted) {metrics['val_nll']:.3f}, "
                       f"val top-1 {metrics['val_top1']:.3f}, val macro-F1 {metrics['val_macro_f1']:.3f}"
                       f"{' (best)' if state.best_epoch == ep else ''}, {row['seconds']:.0f} s")
            if replanned:
                run.report(replanned)
            if on_epoch_end is not None:
                on_epoch_end(ep, row)
            stopped = _stop_reason(run, row["seconds"])
            if stopped == "time-budget":  # kept, so that a resume (a Ctrl-C in the export) trains no epoch more
                _save(run, stopped, progress=False)
    except KeyboardInterrupt:
        raise FinetuneInterrupted(run.out, state.epoch) from None
    return stopped


def _replan(run: _Run, ep: int, epoch_s: float, val_s: float) -> str:
    """Once, after the first epoch that trained the backbone: refit the epochs to the budget; the line to report
    when that changed them (else "")."""
    cfg, plan = run.cfg, run.plan
    if plan is None or plan.replanned is not None or ep <= cfg.freeze_epochs:
        return ""
    epochs = replan(plan, after_epoch=ep, elapsed_s=_elapsed(run), epoch_s=epoch_s, val_s=val_s)
    if epochs == cfg.epochs:
        return ""
    line = (f"time budget: epoch {ep} took {epoch_s:.0f} s (~{plan.epoch_s:.0f} s timed before training) -> "
            f"{epochs} epochs instead of {cfg.epochs}")
    cfg.epochs = epochs
    run.optim.schedule = staged_schedule(run.optim.optimizer, cfg, run.optim.steps_per_epoch)
    return line


def _stop_reason(run: _Run, epoch_s: float) -> str:
    """"epochs" to go on, else why the epochs stop now."""
    cfg, state, plan = run.cfg, run.state, run.plan
    if state.out_of_patience(cfg):
        return "early-stopping"
    if plan is not None and state.epoch < cfg.epochs and _elapsed(run) + epoch_s + plan.final_s > plan.budget_s:
        return "time-budget"
    if cfg.time_limit and state.epoch < cfg.epochs:
        per_epoch = np.median([r["seconds"] for r in state.history if r["epoch"] > cfg.freeze_epochs] or [epoch_s])
        if state.seconds + per_epoch > cfg.time_limit * 60:
            return "time-limit"
    return "epochs"


def _epoch_estimate(run: _Run) -> float | None:
    """Seconds of the next epoch, for a resumed run's first stop check: the last epoch's, else the plan's."""
    rows = [r for r in run.state.history if r["epoch"] >= 1]
    if rows:
        return float(rows[-1]["seconds"])
    return run.plan.epoch_s if run.plan is not None else None


def _at(run: _Run, dataset: PhotoDataset, size: int) -> torch.utils.data.DataLoader:
    """:meth:`FinetuneData.eval_loader` of ``dataset`` at side ``size`` with the run's batch size and loader
    processes (as the budget timed them)."""
    return run.data.eval_loader(dataset, run.cfg, side=size, device=run.device, workers=run.workers)


def _measured(run: _Run, weights: dict) -> SizeChoice | None:
    """Load ``weights``; the side they would be embedded at and the head's log-loss there (None: the model's own
    side alone, where each epoch's ``val_nll`` is that figure)."""
    run.net.load_state_dict(weights)
    if not sizes_measured(run.sizes, run.data.model_side):
        return None
    return choose_test_size(run.net, {s: _at(run, run.data.val, s) for s in run.sizes}, run.device,
                            amp=run.cfg.amp, progress=run.progress)


def _export(run: _Run, stopped: str, kept_epoch: int, kept_state: dict, kept_row: dict,
            kept_choice: SizeChoice | None, versus: dict | None) -> FinetuneResult:
    """Write the kept weights (and, with ``save_last``, the last epoch's to OUT/last) as timm local-dir folders."""
    from finetune.export import record_wall_seconds, save_finetuned, write_photo_list
    from retrieval.protocol import (
        HELDOUT_FILE,
        LINEAGE_KEY,
        SPLIT_SOURCE,
        TRAINED_FILE,
        VAL_FILE,
        inherited_training,
    )

    cfg, state, net, ema, out = run.cfg, run.state, run.net, run.ema, run.out
    # the photos that trained the network and those that chose its epoch, by content, for `speciesid evaluate`;
    # the training photos of the runs it started from too, so that no older folder is needed to know them
    inherited, unlisted = inherited_training(run.source.spec)  # none but for a local --init run of ours
    info = {
        "stage": cfg.stage, "init": run.source.spec, "epochs": state.epoch, "best_epoch": kept_epoch,
        "stopped": stopped, "train_seconds": round(state.seconds, 1), "train_photos": len(run.data.train),
        "val_source": run.split.val_source,
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("out", "root", "val_root", "metadata")},
        "frozen_parameters": run.frozen_params,
        "time_budget": run.plan.to_dict() if run.plan is not None else None,
        "epochs_planned": cfg.epochs, "max_epochs": run.max_epochs,
        # False: the kept weights' backbone is the starting network's (kept before it trained, or it never did)
        "backbone_trained": kept_epoch > cfg.freeze_epochs,
        "against_untrained": versus,
        "seconds_before_final": round(time.perf_counter() - run.t_start, 1),  # this process, until the final eval
        LINEAGE_KEY: {"carried": sorted({row[3] for row in inherited}), "unlisted": unlisted},
    }
    exports = [(out, kept_state, f"{SELECTED_BY[cfg.select]} (epoch {kept_epoch})", kept_row, kept_choice)]
    if cfg.save_last:
        exports.insert(0, (out / "last", cpu_state(ema.module if ema is not None else net),
                           f"last epoch ({state.epoch})", state.history[-1], None))
    val_list = HELDOUT_FILE if run.split.val_source.startswith(SPLIT_SOURCE) else VAL_FILE
    unhashed = len(run.data.train.unhashed()) + len(run.data.val.unhashed())
    if unhashed:  # a set too large to decode up front: read once more (counted in the budget's final part)
        run.report(f"reading {unhashed} photos for their sha256 ({TRAINED_FILE}, {val_list})")
    photo_lists = [(name, ds.paths, [run.species[t] for t in ds.targets], ds.sha256(run.progress), more)
                   for name, ds, more in ((TRAINED_FILE, run.data.train, inherited), (val_list, run.data.val, None))]
    final: dict = {}
    size_info: dict = {}
    for folder, weights, kept, row, choice in exports:
        if choice is None:
            choice = _measured(run, weights)  # loads the weights
        else:
            net.load_state_dict(weights)
        test_size = choice.size if choice is not None else run.sizes[0]
        final = {}
        if cfg.final_eval:
            held = choice.features.get(test_size) if choice is not None else None  # embedded by the choice
            final = final_eval(net, _at(run, run.data.train, test_size),
                               None if held else _at(run, run.data.val, test_size), len(run.species), run.device,
                               amp=cfg.amp, progress=run.progress, val_features=held)
        size_info = {"size": test_size, "setting": cfg.test_size}  # one side: fixed, nothing chosen
        if choice is not None and len(run.sizes) > 1:
            size_info = choice.to_dict()
        save_finetuned(folder, net.backbone, net.head, run.species, run.source, {
            **info, "kept": kept, "val": {k: v for k, v in row.items() if k.startswith("val_")}, "final": final,
            "test_size": size_info,
        }, trained_on=len(run.data.train), test_size=test_size)
        for name, paths, labels, digests, more in photo_lists:
            write_photo_list(folder, name, paths, labels, digests, inherited=more)
        net.to(run.device)
    (out / CHECKPOINT).unlink(missing_ok=True)
    (out / PHOTOS_FILE).unlink(missing_ok=True)
    for folder, *_ in exports:  # the whole run, final evaluation and export included (this process, not resumed ones)
        record_wall_seconds(folder, time.perf_counter() - run.t_start)
    return FinetuneResult(out=out, species=run.species, epochs_run=state.epoch, best_epoch=kept_epoch,
                          best={k: v for k, v in kept_row.items() if k.startswith("val_")},
                          history=state.history, seconds=state.seconds, stopped=stopped, final=final,
                          test_size=size_info, epochs_planned=cfg.epochs, max_epochs=run.max_epochs,
                          backbone_trained=info["backbone_trained"])
