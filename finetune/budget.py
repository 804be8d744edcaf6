"""Fit a fine-tuning run into a time budget (``speciesid finetune --time-budget MIN``).

Machines differ by 5x and more (an AVX2 laptop in fp32 against an AVX-512-BF16 server), so a fixed epoch count
is 8 minutes on one and 40 on another. Before training, a few real training steps (augmented batches from the
run's own loader, the run's precision) and evaluation batches are timed on a throw-away copy of the network;
the epoch count is then the largest (at most ``--epochs``) for which head init + epochs + final evaluation (and
the export's reading of the photos not read up front, for their sha256) fit 95% of the budget, and the cosine
schedule runs over exactly those epochs. A few timed steps are a rough guess on 2 cores (they were 1.2-1.5x the
real steps' time on a machine whose photos were not yet in the page cache, leaving up to half the budget unused),
so the plan is made again once, from the first epoch measured with the backbone training (its real seconds, its
validation's seconds for the final evaluation), and the schedule stretched or shrunk to the new count
(:func:`replan`). During training the budget itself is the deadline: an epoch that would
overrun it is not started. A budget that fits no epoch is refused, naming the smallest one that would by these
timings (:func:`smallest_budget_min`) and, when the machine was busy as the run began (:func:`machine_load`), that
they were taken under that load.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from finetune.config import FinetuneConfig
from finetune.engine import autocast, set_train_mode, sizes_measured, train_step
from index.formats import from_dict

if TYPE_CHECKING:
    from timm.data import Mixup

    from finetune.data import FinetuneData

#: Batches as a loader yields them: (photos, labels), None for a batch none of whose photos could be read.
Batches = Iterable[tuple[torch.Tensor, torch.Tensor] | None]

logger = logging.getLogger(__name__)

#: Kept free of the estimate: timing noise, checkpoint writes, the export.
MARGIN = 0.05
#: Seconds added per epoch for its checkpoint, log and curves.
EPOCH_OVERHEAD_S = 1.0
#: A 1-minute load average of at least this many per core counts as a busy machine in a refusal's words.
BUSY_LOAD_PER_CORE = 0.5


@dataclass
class BudgetPlan:
    """How a budget was spent before the first epoch (all times in seconds)."""

    budget_s: float  # the whole run's budget
    spent_s: float  # already gone when the plan was made (decoding the photos, building the model, timing steps)
    step_s: float  # one training step with the backbone training (loader wait included)
    frozen_step_s: float  # one step with the backbone frozen (forward only through it)
    eval_batch_s: float  # one evaluation batch (twice the training batch)
    epoch_s: float  # one epoch with the backbone training: its steps, validation, checkpoint
    frozen_epoch_s: float  # one epoch with the backbone frozen
    init_s: float  # the head's initialisation (the training photos embedded once, the probe fitted)
    final_s: float  # the final evaluation of the kept weights and the export (re-scaled by the re-plan)
    epochs: int  # the epochs that fit (at most --epochs)
    hash_s: float = 0.0  # of final_s: reading the photos not read yet for the photo lists' sha256 (not re-scaled)
    val_s: float = 0.0  # one epoch's validation (the raw weights too with an EMA)
    max_epochs: int = 0  # --epochs: the most a re-plan may give
    replanned: dict | None = None  # the re-plan: after which epoch, its measured seconds, the epochs it gave

    def to_dict(self) -> dict:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in asdict(self).items()}

    @classmethod
    def from_saved(cls, data: Mapping[str, Any] | None, where: str) -> BudgetPlan | None:
        """The plan a checkpoint saved (``where``: its file, for the log); None when it saved none. A key this
        version does not know (a newer one's) is ignored and logged once (:func:`index.formats.from_dict`)."""
        return from_dict(cls, data, where) if data else None


def plan_epochs(budget_s: float, fixed_s: float, epoch_s: float, frozen_epoch_s: float, *, freeze_epochs: int,
                max_epochs: int) -> int:
    """The most epochs (<= ``max_epochs``) whose cost, plus ``fixed_s``, stays within ``(1 - MARGIN) * budget_s``;
    the first ``freeze_epochs`` cost ``frozen_epoch_s``, the others ``epoch_s``. 0 when not even one fits."""
    room = (1.0 - MARGIN) * budget_s - fixed_s
    epochs, used = 0, 0.0
    while epochs < max_epochs:
        cost = frozen_epoch_s if epochs < freeze_epochs else epoch_s
        if used + cost > room:
            break
        used += cost
        epochs += 1
    return epochs


def smallest_budget_min(fixed_s: float, epoch_s: float, frozen_epoch_s: float, *, freeze_epochs: int,
                        epochs: int) -> int:
    """The smallest whole number of minutes in which :func:`plan_epochs` fits ``epochs`` epochs (the first
    ``freeze_epochs`` of them frozen) after ``fixed_s`` seconds, by these timings."""
    cost = sum(frozen_epoch_s if i < freeze_epochs else epoch_s for i in range(epochs))
    minutes = max(1, math.ceil((fixed_s + cost) / (1.0 - MARGIN) / 60.0))
    while plan_epochs(minutes * 60.0, fixed_s, epoch_s, frozen_epoch_s, freeze_epochs=freeze_epochs,
                      max_epochs=epochs) < epochs:  # a float's rounding at a whole minute
        minutes += 1
    return minutes


def machine_load() -> tuple[float, int] | None:
    """(the 1-minute load average, the machine's cores), None where the system does not say (Windows)."""
    try:
        return os.getloadavg()[0], os.cpu_count() or 1
    except (AttributeError, OSError):
        return None


def _busy_note(load: tuple[float, int] | None) -> str:
    """A sentence saying the timings were taken on a busy machine (``load``: :func:`machine_load` as the run
    began), "" when it was not busy or the load is unknown."""
    if load is None or load[0] < BUSY_LOAD_PER_CORE * load[1]:
        return ""
    return (f" These timings were taken with the machine busy (1-minute load average {load[0]:.1f} on {load[1]} "
            "cores as the run began): on a quieter machine they are shorter.")


def _median_seconds(batches: Batches, run: Callable[..., object], *, device: torch.device,
                    steps: int) -> float | None:
    """Median seconds of ``run(x, y)`` over the first ``steps`` + 1 batches, the loader's wait included; the first
    is a warm-up. None when there is no batch."""
    times = []
    it = iter(batches)
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        if batch is None:  # every photo of the batch unreadable: nothing to time
            continue
        run(*batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    times = times[1:] or times
    return sorted(times)[len(times) // 2] if times else None


def _time_hashing(paths: Sequence, sample: int = 8) -> float:
    """Seconds to read and hash ``paths`` for the run's photo lists (``finetune.data.PhotoDataset.sha256``),
    estimated from the first ``sample`` of them."""
    from retrieval.images import sha256_file

    if not paths:
        return 0.0
    t0 = time.perf_counter()
    for path in paths[:sample]:
        sha256_file(path)
    return (time.perf_counter() - t0) / min(sample, len(paths)) * len(paths)


def _time_train_steps(net: torch.nn.Module, batches: Batches, cfg: FinetuneConfig, *, n_classes: int,
                      device: torch.device, mixup: Mixup | None, class_weight: torch.Tensor | None, frozen: bool,
                      steps: int) -> float:
    """Median seconds of a training step on a copy of ``net`` (its weights change, ``net``'s do not)."""
    work = copy.deepcopy(net)
    set_train_mode(work, cfg, frozen)
    opt = torch.optim.AdamW([p for p in work.parameters() if p.requires_grad], lr=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=False)

    def run(x: torch.Tensor, y: torch.Tensor) -> None:
        train_step(work, x, y, opt, scaler, cfg, n_classes=n_classes, device=device, class_weight=class_weight,
                   mixup=mixup, frozen=frozen)

    seconds = _median_seconds(batches, run, device=device, steps=steps)
    if seconds is None:
        raise ValueError("no training batch to time: the training set is empty")
    return seconds


def _time_eval_batches(net: torch.nn.Module, batches: Batches, *, device: torch.device, amp: bool,
                       steps: int) -> float:
    """Median seconds of an evaluation batch (forward only, evaluation precision)."""
    net.eval()

    @torch.no_grad()
    def run(x: torch.Tensor, _y: torch.Tensor) -> None:
        with autocast(device, amp):
            net(x.to(device).contiguous(memory_format=torch.channels_last))

    return _median_seconds(batches, run, device=device, steps=steps) or 0.0


def fit_to_budget(net: torch.nn.Module, data: FinetuneData, cfg: FinetuneConfig, *, device: torch.device,
                  workers: int, mixup: Mixup | None,
                  spent_s: float, steps: int = 4, test_sizes: Sequence[int] = (), eval_size: int = 0,
                  load: tuple[float, int] | None = None) -> BudgetPlan:
    """Time a few steps of this run on this machine and plan its epochs within ``cfg.time_budget`` minutes (``cfg``
    resolved: :meth:`FinetuneConfig.resolved`).

    ``test_sizes``: the sides the final evaluation measures the head at (``finetune.engine.choose_test_size``),
    ``eval_size`` the side the timed evaluation batches have; an evaluation costs as the pixels do.
    Raises ValueError (saying what to change: the smallest budget that fits an epoch that trains the backbone, by
    these timings) when not even one fits; ``load`` (:func:`machine_load` as the run began) says whether the timings
    were taken on a busy machine. ``net`` itself is not trained.
    """
    budget_s = float(cfg.time_budget) * 60.0
    t0 = time.perf_counter()
    n_train, n_val, bs = len(data.train), len(data.val), cfg.batch_size
    steps_per_epoch = math.ceil(n_train / bs)
    train_batches = data.train_loader(cfg, 0, device=device, workers=workers)
    step_s = _time_train_steps(net, train_batches, cfg, n_classes=data.n_classes, device=device, mixup=mixup,
                               class_weight=data.class_weight, frozen=False, steps=steps)
    frozen_step_s = step_s
    if cfg.freeze_epochs:
        frozen_step_s = _time_train_steps(net, data.train_loader(cfg, 0, device=device, workers=workers), cfg,
                                          n_classes=data.n_classes, device=device, mixup=mixup,
                                          class_weight=data.class_weight, frozen=True, steps=max(2, steps // 2))
    eval_bs = 2 * bs
    eval_batch_s = _time_eval_batches(copy.deepcopy(net),
                                      data.eval_loader(data.train, cfg, device=device, workers=workers),
                                      device=device, amp=cfg.amp, steps=max(2, steps // 2))
    # an EMA: the raw weights are evaluated too; --tta: each photo twice (flipped)
    val_s = math.ceil(n_val / eval_bs) * eval_batch_s * (2 if cfg.ema else 1) * (2 if cfg.tta else 1)
    train_eval_s = math.ceil(n_train / eval_bs) * eval_batch_s
    epoch_s = steps_per_epoch * step_s + val_s + EPOCH_OVERHEAD_S
    frozen_epoch_s = steps_per_epoch * frozen_step_s + val_s + EPOCH_OVERHEAD_S
    init_s = (train_eval_s if cfg.head_init == "probe" else 0.0) + val_s
    area = [(s / eval_size) ** 2 for s in test_sizes] if eval_size and test_sizes else [1.0]
    val_once_s = math.ceil(n_val / eval_bs) * eval_batch_s
    # the head on the val photos at each side (one side other than the model's own is measured too), for the epoch
    # kept and (--select nll) the network before training
    measured = bool(eval_size and test_sizes) and sizes_measured(list(test_sizes), eval_size)
    choose_s = val_once_s * sum(area) * (2 if cfg.select == "nll" else 1) if measured else 0.0
    # the final evaluation embeds the training photos at the chosen side (the largest, to be safe) and reuses the
    # validation photos the choice embedded there; at the model's own side alone it embeds them itself
    final_s = (((train_eval_s + (0.0 if measured else val_once_s)) * max(area) if cfg.final_eval else 0.0)
               + choose_s)
    # the photos a large set did not read up front are read once more for their sha256 (trained.csv ...)
    hash_s = _time_hashing(data.train.unhashed() + data.val.unhashed())
    final_s = final_s * (2 if cfg.save_last else 1) + EPOCH_OVERHEAD_S + hash_s
    spent_s += time.perf_counter() - t0  # the timing itself
    epochs = plan_epochs(budget_s, spent_s + init_s + final_s, epoch_s, frozen_epoch_s,
                         freeze_epochs=cfg.freeze_epochs, max_epochs=cfg.epochs)
    plan = BudgetPlan(budget_s=budget_s, spent_s=spent_s, step_s=step_s, frozen_step_s=frozen_step_s,
                      eval_batch_s=eval_batch_s, epoch_s=epoch_s, frozen_epoch_s=frozen_epoch_s, init_s=init_s,
                      final_s=final_s, epochs=epochs, val_s=val_s, max_epochs=cfg.epochs, hash_s=hash_s)
    wanted = min(cfg.freeze_epochs + 1, cfg.epochs)  # an epoch that trains the backbone, when --epochs has one
    smallest = smallest_budget_min(spent_s + init_s + final_s, epoch_s, frozen_epoch_s,
                                   freeze_epochs=cfg.freeze_epochs, epochs=wanted)
    fits = "one epoch" if wanted == 1 else (f"{wanted} epochs ({min(cfg.freeze_epochs, wanted)} of them with the "
                                            "backbone frozen)")
    if epochs < 1:
        raise ValueError(
            f"--time-budget {cfg.time_budget:g} min fits no epoch on this machine: one epoch takes ~{epoch_s:.0f} s "
            f"and the head init + final evaluation ~{init_s + final_s:.0f} s (already spent {spent_s:.0f} s); give "
            f"a bigger --time-budget (--time-budget {smallest} fits {fits} by these timings), a smaller --train-size, "
            f"more --freeze-layers or fewer photos.{_busy_note(load)}"
        )
    if epochs <= cfg.freeze_epochs and epochs == cfg.epochs:  # --epochs is the cap, not the budget: as without one
        logger.warning("--epochs %d with --freeze-epochs %d leaves no epoch that trains the backbone (the time budget "
                       "is not what stops it): only the head is fitted; raise --epochs or lower --freeze-epochs to "
                       "fine-tune the backbone", cfg.epochs, cfg.freeze_epochs)
    elif epochs <= cfg.freeze_epochs:  # the exported backbone would be the starting one, called fine-tuned
        raise ValueError(
            f"--time-budget {cfg.time_budget:g} min fits only {epochs} epoch(s) on this machine, all with the backbone "
            f"frozen (--freeze-epochs {cfg.freeze_epochs}): the backbone would not train. An epoch that trains it "
            f"takes ~{epoch_s:.0f} s, a frozen one ~{frozen_epoch_s:.0f} s, the head init + final evaluation "
            f"~{init_s + final_s:.0f} s (already spent {spent_s:.0f} s); give a bigger --time-budget (--time-budget "
            f"{smallest} fits {fits} by these timings), fewer --freeze-epochs, a smaller --train-size, more "
            f"--freeze-layers or fewer photos.{_busy_note(load)}"
        )
    logger.info("time budget %.1f min: an epoch ~%.0f s (frozen %.0f s), head init ~%.0f s, final ~%.0f s -> "
                "%d epochs", cfg.time_budget, epoch_s, frozen_epoch_s, init_s, final_s, epochs)
    return plan


def replan(plan: BudgetPlan, *, after_epoch: int, elapsed_s: float, epoch_s: float, val_s: float) -> int:
    """The run's epoch count planned again from a measured epoch: ``epoch_s`` the real seconds of epoch
    ``after_epoch`` (the first with the backbone training; its validation included), ``val_s`` its validation's,
    ``elapsed_s`` the run's seconds so far. The final evaluation's estimate is scaled by the measured validation
    against the timed one (``plan.final_s`` updated). Records the re-plan in ``plan.replanned``; at most
    ``plan.max_epochs``, and never fewer than the epochs already run."""
    if plan.val_s > 0 and val_s > 0:  # the photos' hashing does not scale with the validation
        fixed = EPOCH_OVERHEAD_S + plan.hash_s
        plan.final_s = (plan.final_s - fixed) * (val_s / plan.val_s) + fixed
    cost = epoch_s + EPOCH_OVERHEAD_S
    epochs = after_epoch + plan_epochs(plan.budget_s, elapsed_s + plan.final_s, cost, cost, freeze_epochs=0,
                                       max_epochs=max(plan.max_epochs - after_epoch, 0))
    plan.replanned = {"after_epoch": after_epoch, "epoch_s": round(epoch_s, 2), "val_s": round(val_s, 2),
                      "final_s": round(plan.final_s, 2), "epochs": epochs}
    logger.info("time budget re-planned from epoch %d (%.0f s, of which validation %.0f s): %d -> %d epochs",
                after_epoch, epoch_s, val_s, plan.epochs, epochs)
    return epochs
