"""Two-stage fine-tuning of timm CNN encoders: ``global`` (big dataset, full head) -> ``local`` (local species).

One code path for both stages; the stage only changes the defaults (:data:`STAGE_DEFAULTS`):

- ``local`` (LP-FT): the cosine head starts as a linear probe on frozen features, the backbone stays frozen
  for the first epoch(s), then trains at a much smaller learning rate with layer-wise decay (earlier layers
  slower), batch-norm statistics frozen (small CPU batches), an EMA of the weights evaluated and kept.
- ``global``: the same with the backbone at the head's rate, batch-norm in train mode, no frozen epochs.

Every epoch: validation loss / top-1 / macro-F1 (early stopping on macro-F1, best weights kept), a row in
``OUT/log.csv``, ``OUT/curves.png``, and an atomic ``OUT/checkpoint.pt`` (model, optimiser, EMA, step, best,
history, RNG states) so an interrupted run (Ctrl-C, crash) resumes where the last epoch ended. The result is
written by :func:`finetune.export.save_finetuned` (timm local-dir folder + head-as-probe).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from finetune.augment import AugmentConfig, eval_transform, model_data_config, train_transform
from finetune.data import (
    BALANCE_MODES,
    PhotoDataset,
    TransformView,
    balanced_sampler,
    class_weights,
    load_photos,
    stratified_split,
)
from finetune.model import (
    EMA,
    CosineHead,
    Net,
    create_backbone,
    feature_dim,
    freeze_layers,
    param_groups,
    resolve_init,
    set_bn_eval,
)
from retrieval.encoders import cpu_has_fast_bf16, resolve_device

logger = logging.getLogger(__name__)

STAGES = ("global", "local")
CHECKPOINT = "checkpoint.pt"
LOG = "log.csv"
CURVES = "curves.png"

#: Stage defaults for the settings left as None in :class:`FinetuneConfig`.
STAGE_DEFAULTS: dict[str, dict] = {
    "local": {
        "epochs": 30, "lr": 1e-3, "backbone_lr": 3e-4, "layer_decay": 0.8, "freeze_epochs": 1, "freeze_layers": 4,
        "bn": "eval", "ema": 0.99, "patience": 6, "min_epochs": 15, "head_init": "probe", "balance": "weights",
        "mixup": 0.2, "cutmix": 1.0, "mix_prob": 0.5,
    },
    "global": {
        "epochs": 30, "lr": 1e-3, "backbone_lr": 1e-3, "layer_decay": 1.0, "freeze_epochs": 0, "freeze_layers": 0,
        "bn": "train", "ema": 0.999, "patience": 5, "min_epochs": 10, "head_init": "probe", "balance": "sampler",
        "mixup": 0.0, "cutmix": 0.0, "mix_prob": 1.0,
    },
}


class FinetuneInterrupted(Exception):
    """Raised on Ctrl-C after the last finished epoch's checkpoint is safely on disk."""

    def __init__(self, out: Path, epoch: int) -> None:
        super().__init__(f"interrupted after epoch {epoch}; checkpoint in {out / CHECKPOINT}")
        self.out = out
        self.epoch = epoch


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs (None = the stage's default)."""

    root: str  # training photos
    out: str  # output folder (timm local-dir + probe + log + checkpoint)
    init: str | None = None  # starting encoder spec (timm:..., local-dir folder of a previous stage, weights file)
    model: str | None = None  # timm:NAME, the architecture when --init is a weights file
    weights: str | None = None  # weights file for --init timm:NAME
    dataset: str = "folder"
    metadata: str | None = None
    val_root: str | None = None  # validation photos (default: a stratified split of the training set)
    val_dataset: str | None = None  # layout of val_root (default: dataset)
    val_metadata: str | None = None
    val_split: float = 0.15  # fraction of each species held out when there is no val_root
    stage: str = "local"
    epochs: int | None = None
    batch_size: int = 32
    lr: float | None = None  # head learning rate (AdamW)
    backbone_lr: float | None = None  # last backbone layer's learning rate
    layer_decay: float | None = None  # each earlier layer group: x this
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0  # linear warmup of each group's rate (the backbone's starts when it unfreezes)
    freeze_epochs: int | None = None  # epochs with the backbone frozen (head only)
    freeze_layers: int | None = None  # first N layer groups (stem, blocks) never train: a cheaper backward pass
    bn: str | None = None  # "eval" (statistics frozen) or "train"
    label_smoothing: float = 0.1
    balance: str | None = None  # "weights" (class-weighted loss), "sampler" (class-balanced draws) or "none"
    head_init: str | None = None  # "probe" (linear probe on frozen features), "keep" (init's head), "random"
    head_scale: float = 24.0  # cosine head logit scale
    margin: float = 0.0  # CosFace additive margin on the true class's cosine during training (tighter clusters)
    learn_scale: bool = False
    ema: float | None = None  # EMA decay of the weights; 0 = off
    patience: int | None = None  # early stopping: epochs without a better val macro-F1
    min_epochs: int | None = None  # no early stopping before this epoch (the warmup and mixing first lower val)
    train_size: int | None = None  # training resolution (default: the model's input size)
    tta: bool = False  # validation with horizontal-flip test-time augmentation
    drop_rate: float = 0.0  # dropout on the pooled features
    drop_path: float = 0.0  # stochastic depth rate (timm models with drop_path_rate)
    mixup: float | None = None  # mixup Beta(alpha, alpha); 0 = off
    cutmix: float | None = None  # cutmix Beta(alpha, alpha); 0 = off (with mixup too: one of the two per batch)
    mix_prob: float | None = None  # share of batches mixed
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    device: str = "auto"
    workers: int | None = None  # loader processes (default: 1 on CPU, 4 on CUDA)
    threads: int | None = None  # torch CPU threads (default: torch's)
    amp: bool = True  # mixed precision: CUDA (bf16/fp16); CPU training steps in bf16 where the CPU has native bf16
    time_limit: float | None = None  # minutes: stop (like early stopping) before an epoch would overrun
    resume: str = "auto"  # "auto": continue a checkpoint of the same settings; "no": start afresh
    final_eval: bool = True  # after training: kNN / head / blend on the validation photos (gallery = train)
    save_last: bool = False  # also export the last epoch's weights to OUT/last (a fixed-epoch-count model)

    def resolved(self) -> FinetuneConfig:
        """A copy with the stage defaults filled in."""
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; choose one of {', '.join(STAGES)}")
        out = FinetuneConfig(**{**asdict(self), "augment": AugmentConfig(**asdict(self.augment))})
        for key, value in STAGE_DEFAULTS[self.stage].items():
            if getattr(out, key) is None:
                setattr(out, key, value)
        if out.balance not in BALANCE_MODES:
            raise ValueError(f"unknown --balance {out.balance!r}; choose one of {', '.join(BALANCE_MODES)}")
        if out.bn not in ("eval", "train"):
            raise ValueError(f"--bn must be eval or train, got {out.bn!r}")
        if out.head_init not in ("probe", "keep", "random"):
            raise ValueError(f"--head-init must be probe, keep or random, got {out.head_init!r}")
        return out

    def training_key(self) -> str:
        """Digest of the settings that shape the training trajectory (a checkpoint resumes only under them)."""
        skip = {"out", "device", "workers", "threads", "time_limit", "resume", "final_eval"}
        d = {k: v for k, v in asdict(self).items() if k not in skip}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    stopped: str  # "epochs", "early-stopping", "time-limit"
    final: dict = field(default_factory=dict)  # kNN / head / blend on the validation photos


# ------------------------------------------------------------------------------------------------ helpers
def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _atomic_torch_save(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _macro_f1(y: np.ndarray, pred: np.ndarray, n: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, pred, labels=list(range(n)), average="macro", zero_division=0))


def _loader(ds, batch_size: int, *, shuffle: bool = False, sampler=None, workers: int = 0,
            generator: torch.Generator | None = None, device: torch.device) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle if sampler is None else False, sampler=sampler,
        num_workers=workers, generator=generator, pin_memory=device.type == "cuda", drop_last=False,
        persistent_workers=False,
    )


def _autocast(device: torch.device, amp: bool, *, train: bool = False):
    """CUDA: bf16 (fp16 without bf16) autocast. CPU: bf16 autocast for training steps only, on CPUs with
    native bf16 (AVX512-BF16/AMX; ~2x faster MobileNetV1 steps here); evaluation stays fp32 like the gallery."""
    if device.type == "cuda" and amp:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if device.type == "cpu" and amp and train and cpu_has_fast_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def predict(net: Net, loader, device: torch.device, *, tta: bool = False, amp: bool = True,
            progress: bool = False, desc: str = "validating") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, L2-normalised features, targets) of a loader; ``tta`` averages with the flipped photo."""
    from tqdm.auto import tqdm

    net.eval()
    logits, feats, ys = [], [], []
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch"):
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            f = net.backbone(x).float()
            if tta:
                f = F.normalize(f, dim=-1) + F.normalize(net.backbone(torch.flip(x, dims=[3])).float(), dim=-1)
        logits.append(net.head(f).float().cpu())
        feats.append(F.normalize(f, dim=-1).cpu())
        ys.append(y)
    return torch.cat(logits).numpy(), torch.cat(feats).numpy(), torch.cat(ys).numpy()


def fit_cosine_head(head: CosineHead, feats: torch.Tensor, y: torch.Tensor, *, label_smoothing: float,
                    weight: torch.Tensor | None, steps: int = 300, lr: float = 0.05) -> None:
    """Linear probe for the cosine head on frozen features: class means, then full-batch Adam."""
    n_classes = head.weight.shape[0]
    f = F.normalize(feats.float(), dim=-1)
    with torch.no_grad():
        means = torch.zeros(n_classes, f.shape[1])
        means.index_add_(0, y, f)
        head.weight.copy_(F.normalize(means + 1e-6 * torch.randn_like(means), dim=-1))
    w = torch.nn.Parameter(head.weight.detach().clone())
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        logits = head.scale.detach() * f @ F.normalize(w, dim=-1).T
        F.cross_entropy(logits, y, weight=weight, label_smoothing=label_smoothing).backward()
        opt.step()
    with torch.no_grad():
        head.weight.copy_(F.normalize(w, dim=-1))


def _write_log(out: Path, history: list[dict]) -> None:
    if not history:
        return
    fields = list(history[0].keys())
    for row in history:
        fields += [k for k in row if k not in fields]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    tmp = out / f".{LOG}.tmp"
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    os.replace(tmp, out / LOG)


def _plot_curves(out: Path, history: list[dict]) -> None:
    from matplotlib.figure import Figure

    ep = [r["epoch"] for r in history]
    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    tr = [(r["epoch"], r["train_loss"]) for r in history if r.get("train_loss") not in (None, "")]
    if tr:
        ax1.plot(*zip(*tr, strict=True), marker="o", label="train loss")
    ax1.plot(ep, [r["val_loss"] for r in history], marker="o", label="val loss")
    ax1.set_xlabel("epoch")
    ax1.set_title("loss")
    ax1.legend()
    ax2.plot(ep, [r["val_top1"] for r in history], marker="o", label="val top-1")
    ax2.plot(ep, [r["val_macro_f1"] for r in history], marker="o", label="val macro-F1")
    ax2.set_xlabel("epoch")
    ax2.set_title("validation")
    ax2.set_ylim(0, 1)
    ax2.legend()
    fig.tight_layout()
    tmp = out / f".{CURVES}.tmp"
    fig.savefig(tmp, format="png", dpi=90)
    os.replace(tmp, out / CURVES)


def _mix(x: torch.Tensor, y: torch.Tensor, cfg: FinetuneConfig, rng: np.random.Generator):
    """Mixup or CutMix of a batch: (mixed x, partner labels, lam); lam = 1 when the batch is left alone."""
    if not (cfg.mixup or cfg.cutmix) or len(y) < 2 or rng.random() >= cfg.mix_prob:
        return x, y, 1.0
    perm = torch.from_numpy(rng.permutation(len(y))).to(y.device)
    use_cutmix = cfg.cutmix > 0 and (cfg.mixup <= 0 or rng.random() < 0.5)
    if use_cutmix:
        lam = float(rng.beta(cfg.cutmix, cfg.cutmix))
        h, w = x.shape[-2:]
        ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        lam = float(rng.beta(cfg.mixup, cfg.mixup))
        x = lam * x + (1 - lam) * x[perm]
    return x, y[perm], lam


def _lr_factor(step: int, start: int, total: int, warmup: int) -> float:
    """0 before ``start``, linear warmup over ``warmup`` steps, then cosine to 0 at ``total``."""
    if step < start:
        return 0.0
    s = step - start
    if warmup > 0 and s < warmup:
        return (s + 1) / warmup
    span = max(1, total - start - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - warmup) / span)))


# ------------------------------------------------------------------------------------------------ main entry
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

    from finetune.export import save_finetuned

    cfg = config.resolved()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT
    key = cfg.training_key()
    checkpoint = None
    if ckpt_path.is_file() and cfg.resume != "no":
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if checkpoint.get("key") != key:
            raise ValueError(
                f"{ckpt_path} was written by a run with other settings ({checkpoint.get('settings')}); rerun with "
                "those settings to resume it, or pass --no-resume to start afresh (the checkpoint is replaced)"
            )
        logger.info("resuming %s after epoch %d", ckpt_path, checkpoint["epoch"])
    elif (out / "config.json").is_file() and (out / "model.safetensors").is_file() and cfg.resume != "no":
        raise ValueError(f"{out} already holds a fine-tuned model; choose another --out, or --no-resume to overwrite it")

    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    workers = cfg.workers if cfg.workers is not None else (4 if device.type == "cuda" else 1)
    _seed_all(cfg.seed)

    # ---- data
    photos = load_photos(cfg.dataset, cfg.root, cfg.metadata)
    if cfg.val_root:
        train_photos = photos
        val_photos = load_photos(cfg.val_dataset or cfg.dataset, cfg.val_root, cfg.val_metadata)
        val_desc = f"val:{cfg.val_root}"
    else:
        tr_idx, va_idx = stratified_split(photos.labels, cfg.val_split, cfg.seed)
        train_photos, val_photos = photos.subset(tr_idx), photos.subset(va_idx)
        val_desc = f"split:{cfg.val_split}"
    species = train_photos.species
    if len(species) < 2:
        raise ValueError(f"fine-tuning needs at least 2 species, found {len(species)} under {cfg.root}")
    class_index = {s: i for i, s in enumerate(species)}
    extra = sorted(set(val_photos.labels) - set(species))
    if extra:
        logger.warning("validation species with no training photos are ignored: %s", extra)
        keep = [i for i, s in enumerate(val_photos.labels) if s in class_index]
        val_photos = val_photos.subset(keep)
    if not len(val_photos):
        raise ValueError("no validation photos (give --val-root, or a --val-split with 2+ photos a species)")
    n_classes = len(species)

    # ---- model
    source = resolve_init(cfg.init, model=cfg.model, weights=cfg.weights)
    backbone = create_backbone(source, drop_rate=cfg.drop_rate, drop_path=cfg.drop_path)
    data_cfg = model_data_config(backbone)
    native = int(max(data_cfg["input_size"][1:]))
    train_size = cfg.train_size or native
    dim = feature_dim(backbone)
    head = CosineHead(dim, n_classes, scale=cfg.head_scale, learn_scale=cfg.learn_scale)
    net = Net(backbone, head)
    frozen_params = freeze_layers(backbone, cfg.freeze_layers)
    net = net.to(device, memory_format=torch.channels_last)

    train_ds = PhotoDataset(train_photos, class_index, train_transform(data_cfg, train_size, cfg.augment))
    val_ds = PhotoDataset(val_photos, class_index, eval_transform(data_cfg))
    for bad in train_ds.preload(progress) + val_ds.preload(progress):
        logger.warning("unreadable photo: %s", bad)
    train_eval = TransformView(train_ds, eval_transform(data_cfg))
    val_loader = _loader(val_ds, 2 * cfg.batch_size, workers=workers, device=device)
    y_train = torch.tensor(train_ds.targets)
    cw = class_weights(train_ds.targets, n_classes).to(device) if cfg.balance == "weights" else None

    steps_per_epoch = math.ceil(len(train_ds) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    unfreeze_step = cfg.freeze_epochs * steps_per_epoch
    groups = param_groups(net, lr=cfg.lr, backbone_lr=cfg.backbone_lr, layer_decay=cfg.layer_decay,
                          weight_decay=cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_scaler = device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    def set_lr(step: int) -> float:
        for g in opt.param_groups:
            start = 0 if g["name"].startswith("head") else unfreeze_step
            g["lr"] = g["base_lr"] * _lr_factor(step, start, total_steps, warmup)
        return next(g["lr"] for g in opt.param_groups if g["name"] == "head")

    def evaluate(model: Net) -> dict:
        logits, _, y = predict(model, val_loader, device, tta=cfg.tta, amp=cfg.amp)
        pred = logits.argmax(1)
        return {
            "val_loss": float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y).long())),
            "val_top1": float((pred == y).mean()),
            "val_macro_f1": _macro_f1(y, pred, n_classes),
        }

    # ---- state: fresh or resumed
    history: list[dict] = []
    epoch = 0
    step = 0
    seconds = 0.0
    best_metric = -1.0
    best_epoch = 0
    best_state = None
    best_row: dict = {}
    ema = None
    if checkpoint is not None:
        net.load_state_dict(checkpoint["net"])
        if checkpoint.get("opt") is not None:
            opt.load_state_dict(checkpoint["opt"])
        if checkpoint.get("scaler") is not None:
            scaler.load_state_dict(checkpoint["scaler"])
        if cfg.ema:
            ema = EMA(net, cfg.ema)
            if checkpoint.get("ema") is not None:
                ema.load_state_dict(checkpoint["ema"])
        epoch, step, seconds = checkpoint["epoch"], checkpoint["step"], checkpoint["seconds"]
        best_metric, best_epoch = checkpoint["best_metric"], checkpoint["best_epoch"]
        best_state, best_row, history = checkpoint["best_state"], checkpoint["best_row"], checkpoint["history"]
        _set_rng_state(checkpoint["rng"])
    else:
        t0 = time.perf_counter()
        if cfg.head_init == "keep" and source.label_names == species and source.head_weight is not None \
                and source.head_weight.shape == head.weight.shape:
            with torch.no_grad():
                head.weight.copy_(F.normalize(source.head_weight, dim=-1))
            how = "kept the init's head (same species)"
        elif cfg.head_init in ("probe", "keep"):
            loader = _loader(train_eval, 2 * cfg.batch_size, workers=workers, device=device)
            _, feats, _ = predict(net, loader, device, amp=cfg.amp, progress=progress, desc="linear probe: features")
            fit_cosine_head(net.head, torch.from_numpy(feats), y_train, label_smoothing=cfg.label_smoothing,
                            weight=cw.cpu() if cw is not None else None)
            how = "linear probe on frozen features"
        else:
            how = "random"
        net.head.to(device)
        if cfg.ema:
            ema = EMA(net, cfg.ema)
        row = {"epoch": 0, "train_loss": None, "train_top1": None, **evaluate(net), "lr": 0.0,
               "seconds": time.perf_counter() - t0}
        seconds += row["seconds"]
        history.append(row)
        best_metric, best_epoch, best_row = row["val_macro_f1"], 0, dict(row)
        best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        logger.info("head init: %s; epoch 0 (before fine-tuning): %s", how, row)

    def save_checkpoint(done_epoch: int) -> None:
        _atomic_torch_save({
            "key": key, "settings": {k: v for k, v in asdict(cfg).items() if k not in ("out",)},
            "species": species, "epoch": done_epoch, "step": step, "seconds": seconds,
            "net": net.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "best_metric": best_metric, "best_epoch": best_epoch, "best_state": best_state, "best_row": best_row,
            "history": history, "rng": _rng_state(),
        }, ckpt_path)

    if checkpoint is None:
        save_checkpoint(0)
        _write_log(out, history)
    def out_of_patience(ep: int) -> bool:
        return ep - best_epoch >= cfg.patience and ep >= max(cfg.min_epochs, 1)

    stopped = "early-stopping" if out_of_patience(epoch) else "epochs"  # a resumed run may already be done
    try:
        while epoch < cfg.epochs and stopped == "epochs":
            t_epoch = time.perf_counter()
            ep = epoch + 1
            _seed_all(cfg.seed * 1000 + ep)
            gen = torch.Generator().manual_seed(cfg.seed * 1000 + ep)
            sampler = balanced_sampler(train_ds.targets, n_classes, gen) if cfg.balance == "sampler" else None
            loader = _loader(train_ds, cfg.batch_size, shuffle=True, sampler=sampler, workers=workers,
                             generator=gen, device=device)
            frozen = ep <= cfg.freeze_epochs
            mix_rng = np.random.default_rng(cfg.seed * 1000 + ep)
            net.train()
            if cfg.bn == "eval" or frozen:
                set_bn_eval(net)
            if frozen:
                net.backbone.eval()
            total_loss, seen, correct = 0.0, 0, 0
            bar = tqdm(loader, desc=f"epoch {ep}/{cfg.epochs}" + (" (backbone frozen)" if frozen else ""),
                       unit="batch", disable=not progress, leave=True)
            lr_now = 0.0
            for x, y in bar:
                lr_now = set_lr(step)
                x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                y = y.to(device, non_blocking=True)
                x, y2, lam = _mix(x, y, cfg, mix_rng)
                with _autocast(device, cfg.amp, train=True):
                    if frozen:
                        with torch.no_grad():
                            feats = net.backbone(x)
                        logits = net.head(feats.float())
                    else:
                        logits, _ = net(x)
                    z = logits.float()
                    if cfg.margin:
                        z = z - net.head.scale.detach() * cfg.margin * F.one_hot(y, n_classes)
                    loss = F.cross_entropy(z, y, weight=cw, label_smoothing=cfg.label_smoothing)
                    if lam < 1.0:
                        loss = lam * loss + (1 - lam) * F.cross_entropy(
                            z, y2, weight=cw, label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                if ema is not None:
                    ema.update(net)
                step += 1
                total_loss += float(loss.detach()) * len(y)
                seen += len(y)
                correct += int((logits.argmax(1) == y).sum())
                bar.set_postfix(loss=f"{total_loss / seen:.3f}", lr=f"{lr_now:.2e}")
            bar.close()
            model = ema.module if ema is not None else net
            metrics = evaluate(model)
            if ema is not None:  # the raw weights too, to measure what the EMA brings
                metrics.update({f"{k}_raw": v for k, v in evaluate(net).items()})
            epoch = ep
            seconds += time.perf_counter() - t_epoch
            row = {"epoch": ep, "train_loss": total_loss / max(seen, 1), "train_top1": correct / max(seen, 1),
                   **metrics, "lr": lr_now, "seconds": time.perf_counter() - t_epoch}
            history.append(row)
            if metrics["val_macro_f1"] > best_metric + 1e-9:
                best_metric, best_epoch, best_row = metrics["val_macro_f1"], ep, dict(row)
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            save_checkpoint(ep)
            _write_log(out, history)
            try:
                _plot_curves(out, history)
            except Exception as exc:  # noqa: BLE001 - a plotting problem must not stop training
                logger.warning("could not draw %s: %s", out / CURVES, exc)
            if progress:
                tqdm.write(
                    f"epoch {ep}: train loss {row['train_loss']:.3f}, val loss {metrics['val_loss']:.3f}, "
                    f"val top-1 {metrics['val_top1']:.3f}, val macro-F1 {metrics['val_macro_f1']:.3f}"
                    f"{' (best)' if best_epoch == ep else ''}, {row['seconds']:.0f} s"
                )
            if on_epoch_end is not None:
                on_epoch_end(ep, row)
            if out_of_patience(ep):
                stopped = "early-stopping"
            elif cfg.time_limit and epoch < cfg.epochs:
                per_epoch = np.median([r["seconds"] for r in history if r["epoch"] > cfg.freeze_epochs] or
                                      [row["seconds"]])
                if seconds + per_epoch > cfg.time_limit * 60:
                    stopped = "time-limit"
    except KeyboardInterrupt:
        raise FinetuneInterrupted(out, epoch) from None

    # ---- export the best weights (and, with save_last, the last epoch's to OUT/last)
    last_state = {k: v.detach().cpu().clone() for k, v in (ema.module if ema is not None else net).state_dict().items()}

    def export(state: dict, folder: Path, kept: str, row: dict) -> dict:
        net.load_state_dict(state)
        final = _final_eval(net, train_eval, val_ds, n_classes, device, cfg, progress) if cfg.final_eval else {}
        info = {
            "stage": cfg.stage,
            "init": source.spec,
            "epochs": epoch,
            "best_epoch": best_epoch,
            "kept": kept,
            "stopped": stopped,
            "train_seconds": round(seconds, 1),
            "train_photos": len(train_ds),
            "val": {k: v for k, v in row.items() if k.startswith("val_")},
            "val_source": val_desc,
            "final": final,
            "settings": {k: v for k, v in asdict(cfg).items() if k not in ("out", "root", "val_root", "metadata")},
            "frozen_parameters": frozen_params,
        }
        save_finetuned(folder, net.backbone, net.head, species, source, info, trained_on=len(train_ds))
        net.to(device)
        return final

    if cfg.save_last:
        export(last_state, out / "last", f"last epoch ({epoch})", history[-1])
    final = export(best_state, out, f"best val macro-F1 (epoch {best_epoch})", best_row)
    ckpt_path.unlink(missing_ok=True)
    return FinetuneResult(out=out, species=species, epochs_run=epoch, best_epoch=best_epoch,
                          best={k: v for k, v in best_row.items() if k.startswith("val_")},
                          history=history, seconds=seconds, stopped=stopped, final=final)


def _final_eval(net: Net, train_eval, val_ds, n_classes: int, device, cfg: FinetuneConfig, progress: bool) -> dict:
    """Head / kNN / blend on the validation photos with the kept weights (gallery = the training photos).

    The blend uses the k, T and weight that ``speciesid probe import`` would choose on these photos.
    """
    from retrieval.calibrate import blend_matrix, knn_matrix, select_settings
    from retrieval.probe import LinearProbe

    loader = _loader(train_eval, 2 * cfg.batch_size, workers=cfg.workers or 0, device=device)
    _, ref, ref_y = predict(net, loader, device, amp=cfg.amp, progress=progress, desc="final: train features")
    vloader = _loader(val_ds, 2 * cfg.batch_size, workers=cfg.workers or 0, device=device)
    _, q, qy = predict(net, vloader, device, amp=cfg.amp, progress=progress, desc="final: val features")
    names = [str(i) for i in range(n_classes)]
    w = net.head.export_weight().numpy()
    probe = LinearProbe(species=names, weight=w, bias=np.zeros(n_classes, np.float32), fingerprint="")
    s = select_settings(ref, [names[i] for i in ref_y], fingerprint="", probe=probe, val_embeddings=q,
                        val_labels=[names[i] for i in qy])
    p = probe.predict_proba(q)
    kn = knn_matrix(q, ref, ref_y, n_classes, s.k, s.temperature)
    b = blend_matrix(kn, p, np.ones(n_classes, bool), s.blend_weight)
    out = {}
    for name, m in (("head", p), ("knn", kn), ("blend", b)):
        pred = m.argmax(1)
        out[f"{name}_top1"] = float((pred == qy).mean())
        out[f"{name}_macro_f1"] = _macro_f1(qy, pred, n_classes)
        out[f"{name}_recall"] = [float((pred[qy == c] == c).mean()) if (qy == c).any() else None
                                 for c in range(n_classes)]  # per species, head order
    out.update({"k": s.k, "temperature": s.temperature, "blend_weight": s.blend_weight})
    return out
