"""One epoch of training and one validation pass, as free functions (the layout of timm's ``train.py``), with
the pieces they use: the optimiser and its learning-rate schedule, mixing, the loss, mixed precision.

timm does the standard parts: ``create_optimizer_v2`` (AdamW over :func:`finetune.model.param_groups`, timm's
layer-wise decay groups), ``CosineLRScheduler`` (linear warmup, then cosine to 0, set every step),
``Mixup`` (mixup / CutMix and label smoothing as soft targets) and ``ModelEmaV3`` (the EMA of the weights).
What is ours: the backbone's schedule starting when it unfreezes (:class:`StagedCosineLR`), the frozen-backbone
epochs, the CosFace margin, and class weights in the soft-target loss.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from finetune.config import FinetuneConfig
from finetune.model import InitSource, Net, fit_cosine_head, param_groups, set_bn_eval
from retrieval.metrics import macro_f1
from retrieval.torch_encoders import cpu_has_fast_bf16

if TYPE_CHECKING:
    from timm.data import Mixup
    from timm.utils import ModelEmaV3
    from torch.utils.data import DataLoader

    from retrieval.probe import LinearProbe

logger = logging.getLogger(__name__)


def _fitted_nll(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean log-loss of ``logits`` at the softmax temperature fitted to them (``retrieval.probe.fit_temperature``)."""
    from retrieval.probe import fit_temperature

    return fit_temperature(logits, y)[1]


class _RoundBF16(torch.autograd.Function):
    """Round to bf16 precision and back (fp32 kept), and the gradient likewise: what a cast to bf16 and back does
    to a value and its gradient, without bf16 arithmetic."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.bfloat16).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.to(torch.bfloat16).to(grad.dtype)


def _round_bf16(x: object) -> object:
    return _RoundBF16.apply(x) if isinstance(x, torch.Tensor) and x.dtype == torch.float32 else x


class BF16Rounding(torch.overrides.TorchFunctionMode):
    """fp32 arithmetic with CPU bf16 autocast's rounding imitated: the inputs (weights included) and outputs of
    convolutions, linear layers and matrix products are rounded to bf16 precision, their gradients too, and so
    are the outputs of batch norm and pooling (autocast leaves those in bf16; a loss's mean stays fp32). For CPUs
    without native bf16, where real bf16 steps are emulated and slow; the rounding is elementwise."""

    _ROUND_ARGS = frozenset({F.conv2d, F.linear, torch.matmul, torch.Tensor.__matmul__, torch.mm, torch.addmm,
                             torch.bmm})
    _ROUND_OUT = frozenset({F.batch_norm, torch.batch_norm, F.adaptive_avg_pool2d, F.avg_pool2d})
    _MEANS = frozenset({torch.Tensor.mean, torch.mean})  # rounded when they pool a feature map (>= 3 dims)

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in self._ROUND_ARGS:
            args = tuple(_round_bf16(a) for a in args)
            kwargs = {k: _round_bf16(v) for k, v in kwargs.items()}
            return _round_bf16(func(*args, **kwargs))
        out = func(*args, **kwargs)
        pools = func in self._ROUND_OUT or (func in self._MEANS and bool(args) and args[0].dim() >= 3)
        return _round_bf16(out) if pools else out


def autocast(device: torch.device, amp: bool, *, train: bool = False,
             emulate_bf16: bool = False) -> contextlib.AbstractContextManager:
    """CUDA: bf16 (fp16 without bf16) autocast. CPU: bf16 autocast for training steps only, on CPUs with
    native bf16 (AVX512-BF16/AMX; ~2x faster MobileNetV1 steps here); evaluation stays fp32 like the gallery.
    ``emulate_bf16``: CPU training steps that would run in fp32 imitate bf16's rounding (:class:`BF16Rounding`)."""
    if device.type == "cuda" and amp:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if device.type == "cpu" and amp and train and cpu_has_fast_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if device.type == "cpu" and train and emulate_bf16:
        return BF16Rounding()
    return torch.autocast("cpu", enabled=False)


# ------------------------------------------------------------------------------------------ optimiser, schedule
class _Groups:
    """Some of an optimiser's parameter groups: a timm scheduler reads and writes only ``param_groups``."""

    def __init__(self, groups: list[dict]) -> None:
        self.param_groups = groups


@contextlib.contextmanager
def _quiet_restart_warning() -> Iterator[None]:
    """timm warns that a cosine of one step "will have no effect" (it is about restarts, which this schedule never
    uses; a short schedule, e.g. 2 epochs with 1 frozen, has such a part): not shown to the user."""
    log = logging.getLogger("timm.scheduler.cosine_lr")

    def drop(record: logging.LogRecord) -> bool:
        return "will have no effect" not in record.getMessage()

    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


class StagedCosineLR:
    """timm's ``CosineLRScheduler`` per step, the head's groups from step 0 and the backbone's from the step it
    unfreezes (rate 0 before): each part warms up linearly over ``warmup`` steps, then decays to 0 at ``total``.

    Step ``s`` of a part runs at timm's rate for ``t = s + 1`` (the warmup's first step at 1/warmup of the rate,
    its last at the full rate); resumable, as the rate depends on the step only.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, total: int, warmup: int, unfreeze: int) -> None:
        from timm.scheduler import CosineLRScheduler

        head = [g for g in optimizer.param_groups if g["name"].startswith("head")]
        backbone = [g for g in optimizer.param_groups if not g["name"].startswith("head")]
        self.optimizer, self.parts = optimizer, []
        for start, groups in ((0, head), (unfreeze, backbone)):
            sched = None
            if groups and start < total:
                with _quiet_restart_warning():
                    sched = CosineLRScheduler(_Groups(groups), t_initial=max(1, total - start - warmup), lr_min=0.0,
                                              warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=True,
                                              t_in_epochs=False)
            self.parts.append((start, groups, sched))
        self.head_groups = head

    def step(self, step: int) -> float:
        """Set every group's rate for (0-based) optimiser step ``step``; returns the head's."""
        if not any(g is self.optimizer.param_groups[0] for _, groups, _ in self.parts for g in groups):
            raise RuntimeError("the optimiser's parameter groups were replaced (load_state_dict) after its schedule "
                               "was made: make the schedule again")
        for start, groups, sched in self.parts:
            if sched is None or step < start:
                for g in groups:
                    g["lr"] = 0.0
            else:
                sched.step_update(step - start + 1)
        return float(self.head_groups[0]["lr"]) if self.head_groups else 0.0


@dataclass
class Optimisation:
    """Optimiser, its schedule, the fp16 gradient scaler (CUDA without bf16 only) and the steps of one epoch."""

    optimizer: torch.optim.Optimizer
    schedule: StagedCosineLR
    scaler: torch.amp.GradScaler
    steps_per_epoch: int


def create_optimisation(net: Net, cfg: FinetuneConfig, steps_per_epoch: int, device: torch.device) -> Optimisation:
    """AdamW (timm's ``create_optimizer_v2``) over the layer-wise groups, with :class:`StagedCosineLR` (``cfg``
    resolved: :meth:`FinetuneConfig.resolved`)."""
    from timm.optim import create_optimizer_v2

    groups = param_groups(net, lr=cfg.lr, backbone_lr=cfg.backbone_lr, layer_decay=cfg.layer_decay,
                          weight_decay=cfg.weight_decay)
    opt = create_optimizer_v2(groups, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_scaler = device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported()
    return Optimisation(opt, staged_schedule(opt, cfg, steps_per_epoch),
                        torch.amp.GradScaler("cuda", enabled=use_scaler), steps_per_epoch)


def staged_schedule(opt: torch.optim.Optimizer, cfg: FinetuneConfig, steps_per_epoch: int) -> StagedCosineLR:
    """The run's :class:`StagedCosineLR` over ``cfg.epochs`` (``cfg`` resolved; made again when a time budget
    re-plans them: the rate depends on the step and the total only, so the run goes on from the step it is at)."""
    return StagedCosineLR(opt, total=cfg.epochs * steps_per_epoch,
                          warmup=int(round(cfg.warmup_epochs * steps_per_epoch)),
                          unfreeze=cfg.freeze_epochs * steps_per_epoch)


def create_ema(net: Net, decay: float) -> ModelEmaV3 | None:
    """timm's ``ModelEmaV3`` of every float in the state (batch-norm statistics too), or None for ``decay`` 0.

    Warm-up: decay ``min(decay, n / (9 + n))`` at the n-th update (timm's warm-up with inverse gamma 9 and
    power 1; it starts from the weights as they are, and passes 0.9 after 81 updates, 0.99 after 891).
    """
    if not decay:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(net, decay=decay, use_warmup=True, warmup_gamma=9.0, warmup_power=1.0)


# ---------------------------------------------------------------------------------------------- mixing, loss
def create_mixup(cfg: FinetuneConfig, n_classes: int) -> Mixup | None:
    """timm's ``Mixup`` (per batch: mixup or CutMix, one of the two at random when both are on; the box's
    area corrects lambda), None when both are off."""
    if not (cfg.mixup or cfg.cutmix):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob, switch_prob=0.5, mode="batch",
                 label_smoothing=cfg.label_smoothing, num_classes=n_classes)


def mix(mixup: Mixup | None, x: torch.Tensor, y: torch.Tensor, n_classes: int,
        smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(photos, soft targets): mixed by ``mixup`` (None: as they are), targets label-smoothed.

    timm mixes photo i with photo n-1-i and wants an even batch: an odd (last) batch keeps its last photo unmixed.
    """
    from timm.data.mixup import mixup_target

    if mixup is None or len(y) < 2:
        return x, mixup_target(y, n_classes, 1.0, smoothing)
    if len(y) % 2:
        xm, tm = mixup(x[:-1], y[:-1])
        return torch.cat([xm, x[-1:]]), torch.cat([tm, mixup_target(y[-1:], n_classes, 1.0, smoothing)])
    return mixup(x, y)


def loss_fn(logits: torch.Tensor, target: torch.Tensor, y: torch.Tensor, *, scale: torch.Tensor, margin: float,
            class_weight: torch.Tensor | None) -> torch.Tensor:
    """Soft-target cross-entropy (class-weighted: ``-sum_c w_c t_c log p_c``, averaged over the batch), with
    the CosFace ``margin`` taken off the true class's cosine (``y``: the unmixed labels)."""
    z = logits.float()
    if margin:
        z = z - scale.detach() * margin * F.one_hot(y, z.shape[1])
    return F.cross_entropy(z, target, weight=class_weight)


# ------------------------------------------------------------------------------------------ train, validate
def set_train_mode(net: Net, cfg: FinetuneConfig, frozen: bool) -> None:
    """Training mode, with batch-norm statistics frozen (``cfg.bn == "eval"``) and the whole backbone in eval mode
    while it is ``frozen``."""
    net.train()
    if cfg.bn == "eval" or frozen:
        set_bn_eval(net)
    if frozen:
        net.backbone.eval()


def train_step(net: Net, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               cfg: FinetuneConfig, *, n_classes: int, device: torch.device, class_weight: torch.Tensor | None,
               mixup: Mixup | None, frozen: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on a batch (mixed, the run's precision; the backbone forward-only when ``frozen``):
    (loss, logits)."""
    x = x.to(device, non_blocking=True)
    y = y.to(device, non_blocking=True)
    x, target = mix(mixup, x, y, n_classes, cfg.label_smoothing)
    x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, cfg.amp, train=True, emulate_bf16=cfg.emulate_bf16):
        if frozen:
            with torch.no_grad():
                feats = net.backbone(x)
            logits = net.head(feats.float())
        else:
            logits, _ = net(x)
        loss = loss_fn(logits, target, y, scale=net.head.scale, margin=cfg.margin, class_weight=class_weight)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss, logits


def train_one_epoch(
    epoch: int,
    net: Net,
    loader: torch.utils.data.DataLoader,
    optim: Optimisation,
    step: int,
    cfg: FinetuneConfig,
    *,
    n_classes: int,
    device: torch.device,
    class_weight: torch.Tensor | None = None,
    mixup: Mixup | None = None,
    ema: ModelEmaV3 | None = None,
    progress: bool = False,
) -> tuple[dict, int]:
    """One pass over ``loader`` from optimiser step ``step``: ({train_loss, train_top1, lr}, the next step).

    ``cfg`` resolved (:meth:`FinetuneConfig.resolved`). During the first ``cfg.freeze_epochs`` epochs the backbone
    only runs forward (eval mode, no gradients);
    with ``cfg.bn == "eval"`` batch-norm statistics stay frozen. The EMA follows every step.
    """
    from tqdm.auto import tqdm

    frozen = epoch <= cfg.freeze_epochs
    set_train_mode(net, cfg, frozen)
    opt, scaler = optim.optimizer, optim.scaler
    total_loss, seen, correct, lr_now = 0.0, 0, 0, 0.0
    bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}" + (" (backbone frozen)" if frozen else ""),
               unit="batch", disable=not progress, leave=True)
    for batch in bar:
        if batch is None:  # every photo of the batch unreadable (warned about): nothing to train on
            continue
        x, y = batch
        lr_now = optim.schedule.step(step)
        y = y.to(device, non_blocking=True)
        loss, logits = train_step(net, x, y, opt, scaler, cfg, n_classes=n_classes, device=device,
                                  class_weight=class_weight, mixup=mixup, frozen=frozen)
        step += 1
        if ema is not None:
            ema.update(net, step=step)
        total_loss += float(loss.detach()) * len(y)
        seen += len(y)
        correct += int((logits.argmax(1) == y).sum())
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", lr=f"{lr_now:.2e}")
    bar.close()
    return {"train_loss": total_loss / max(seen, 1), "train_top1": correct / max(seen, 1), "lr": lr_now}, step


@torch.no_grad()
def predict(net: Net, loader: DataLoader, device: torch.device, *, tta: bool = False, amp: bool = True,
            progress: bool = False, desc: str = "validating") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, L2-normalised features, targets) of a loader; ``tta`` averages with the flipped photo."""
    from tqdm.auto import tqdm

    net.eval()
    logits, feats, ys = [], [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch"):
        if batch is None:  # every photo of the batch unreadable (warned about, left out)
            continue
        x, y = batch
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            f = net.backbone(x).float()
            if tta:
                f = F.normalize(f, dim=-1) + F.normalize(net.backbone(torch.flip(x, dims=[3])).float(), dim=-1)
        logits.append(net.head(f).float().cpu())
        feats.append(F.normalize(f, dim=-1).cpu())
        ys.append(y)
    if not ys:
        raise ValueError(f"{desc}: none of the photos could be read (see the warnings above)")
    return torch.cat(logits).numpy(), torch.cat(feats).numpy(), torch.cat(ys).numpy()


def validate(net: Net, loader: DataLoader, device: torch.device, *, tta: bool = False, amp: bool = True) -> dict:
    """{val_loss (plain cross-entropy), val_nll (log-loss at the softmax temperature fitted to these photos: how
    well the head ranks and separates them, whatever its confidence), val_top1, val_macro_f1 (over the species that
    have validation photos: :func:`present_macro_f1`)}."""
    logits, _, y = predict(net, loader, device, tta=tta, amp=amp)
    pred = logits.argmax(1)
    return {
        "val_loss": float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y).long())),
        "val_nll": _fitted_nll(logits, y),
        "val_top1": float((pred == y).mean()),
        "val_macro_f1": present_macro_f1(y, pred),
    }


def present_macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    """Macro-F1 over the species present among the true labels ``y`` (``retrieval.metrics.macro_f1``, as
    ``retrieval.metrics.evaluate`` counts it): a training species with no validation photo adds no F1 of 0."""
    return macro_f1(y, pred, sorted(set(np.asarray(y).tolist())))


def init_head(net: Net, source: InitSource, species: list[str], cfg: FinetuneConfig, train_eval_loader: DataLoader,
              device: torch.device, *, class_weight: torch.Tensor | None = None, progress: bool = False) -> str:
    """Start the head as ``cfg.head_init`` says (the LP of LP-FT); returns how it started.

    ``keep``: the init's head when its species are these; else (and for ``probe``) a linear probe on the frozen
    features of the training photos (``train_eval_loader``: as a gallery embeds them, ``FinetuneData.eval_loader``).
    ``random``: as created.
    """
    head = net.head
    if cfg.head_init == "keep" and source.label_names == species and source.head_weight is not None \
            and source.head_weight.shape == head.weight.shape:
        with torch.no_grad():
            head.weight.copy_(F.normalize(source.head_weight.to(head.weight.device), dim=-1))
        return "kept the init's head (same species)"
    if cfg.head_init in ("probe", "keep"):
        _, feats, y = predict(net, train_eval_loader, device, amp=cfg.amp, progress=progress,
                              desc="linear probe: features")
        head.to("cpu")
        fit_cosine_head(head, torch.from_numpy(feats), torch.from_numpy(y).long(), label_smoothing=cfg.label_smoothing,
                        weight=class_weight.cpu() if class_weight is not None else None)
        head.to(device)
        return "linear probe on frozen features"
    return "random"


def head_probe(net: Net) -> LinearProbe:
    """The network's head as a ``retrieval.probe.LinearProbe`` over L2-normalised features, its species named by
    class index ("0", "1", ...)."""
    from retrieval.probe import LinearProbe

    w = net.head.export_weight().numpy()
    return LinearProbe(species=[str(i) for i in range(len(w))], weight=w, bias=np.zeros(len(w), np.float32),
                       fingerprint="")


# Candidate test sizes, x the training size. A network trained on RandomResizedCrop sees its subjects larger
# than a whole photo at the same size shows them ("FixRes", Touvron et al. 2019): it is often better embedded at a
# larger size. Rounded to multiples of 16 (224 -> 224, 256, 288, 320).
TEST_SIZE_FACTORS = (1.0, 8 / 7, 9 / 7, 10 / 7)


def sizes_measured(sizes: list[int], model_size: int) -> bool:
    """Whether the head is measured at the test sides ``sizes`` (a choice among them, or one side other than the
    model's own); else each epoch's ``val_nll`` at the model's own side is that figure."""
    return len(sizes) > 1 or sizes[0] != model_size


def size_candidates(setting: str, train_size: int, model_size: int) -> list[int]:
    """The sizes ``--test-size`` lets the run choose from: ``auto`` the training size x TEST_SIZE_FACTORS and the
    model's own input size, ``train`` the model's own input size (what every run embedded at before), or PX."""
    if setting == "train":
        return [model_size]
    if setting != "auto":
        return [int(setting)]
    return sorted({int(round(train_size * f / 16)) * 16 for f in TEST_SIZE_FACTORS} | {model_size})


@dataclass
class SizeChoice:
    """The input size the kept network is embedded at, and what chose it."""

    size: int  # the chosen side, pixels
    candidates: list[int]  # the sides measured
    head_nll: dict[int, float]  # per side: the head's log-loss on the validation photos, its temperature fitted
    head_top1: dict[int, float]  # per side: the head's top-1 on the same photos
    photos: int  # validation photos measured on
    # the validation photos' (embeddings, labels) at the chosen side: the final evaluation reuses them (not saved)
    features: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {"size": self.size, "candidates": self.candidates, "photos": self.photos,
                "head_nll": {str(k): round(v, 4) for k, v in self.head_nll.items()},
                "head_top1": {str(k): round(v, 4) for k, v in self.head_top1.items()},
                "rule": "least head log-loss on the validation photos (temperature fitted at each size)"}


def choose_test_size(net: Net, loaders: dict[int, object], device: torch.device, *, amp: bool = True,
                     progress: bool = False) -> SizeChoice:
    """The side (a key of ``loaders``: the validation photos at that size) whose head log-loss is least.

    The head's softmax temperature is fitted at each size first (the epochs' ``val_nll``; as ``speciesid probe
    import`` fits the head's), so the sizes are compared on how well the head ranks and separates, not on how confident it happens to be. The
    log-loss is smooth in the size (measured: it falls from 224 to 288 and rises after on MobileNetV1 runs), so
    the least of a handful of sides is not a lucky pick; ties go to the smaller side (cheaper to embed).
    """
    sizes = sorted(loaders)
    nll, top1, photos, features = {}, {}, 0, {}
    for size in sizes:
        logits, feats, y = predict(net, loaders[size], device, amp=amp, progress=progress, desc=f"test size {size}")
        features[size] = (feats, y)
        nll[size], top1[size], photos = _fitted_nll(logits, y), float((logits.argmax(1) == y).mean()), len(y)
    best = min(sizes, key=lambda s: (round(nll[s], 4), s))
    logger.info("test size %d: head log-loss on %d validation photos %s", best, photos,
                ", ".join(f"{s} px {nll[s]:.3f}" for s in sizes))
    return SizeChoice(size=best, candidates=sizes, head_nll=nll, head_top1=top1, photos=photos,
                      features={best: features[best]})


def final_eval(net: Net, train_loader: DataLoader, val_loader: DataLoader, n_classes: int, device: torch.device, *,
               amp: bool = True, progress: bool = False,
               val_features: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Head / kNN / blend on the validation photos with the kept weights (gallery = the training photos).

    The blend uses the k, T and weight that ``speciesid probe import`` would give on these photos: k and T chosen on
    them, the weight fixed at the prior (``retrieval.calibrate.PRIOR``), since these photos chose the epoch.
    ``val_features``: the validation photos' (embeddings, labels) already made by these weights at this size
    (:attr:`SizeChoice.features`); ``val_loader`` is then not read.
    """
    from retrieval.calibrate import PRIOR, blend_matrix, knn_matrix, select_settings

    _, ref, ref_y = predict(net, train_loader, device, amp=amp, progress=progress, desc="final: train features")
    if val_features is None:
        _, q, qy = predict(net, val_loader, device, amp=amp, progress=progress, desc="final: val features")
    else:
        q, qy = val_features
    probe = head_probe(net)
    names = probe.species
    s = select_settings(ref, [names[i] for i in ref_y], fingerprint="", probe=probe, val_embeddings=q,
                        val_labels=[names[i] for i in qy], blend_weight=PRIOR["weight"])
    p = probe.predict_proba(q)
    kn = knn_matrix(q, ref, ref_y, n_classes, s.k, s.temperature, metric=s.metric)
    b = blend_matrix(kn, p, np.ones(n_classes, bool), s.blend_weight)
    out = {}
    for name, m in (("head", p), ("knn", kn), ("blend", b)):
        pred = m.argmax(1)
        out[f"{name}_top1"] = float((pred == qy).mean())
        out[f"{name}_macro_f1"] = present_macro_f1(qy, pred)
        out[f"{name}_recall"] = [float((pred[qy == c] == c).mean()) if (qy == c).any() else None
                                 for c in range(n_classes)]  # per species, head order
    out.update({"k": s.k, "temperature": s.temperature, "blend_weight": s.blend_weight, "metric": s.metric})
    return out
