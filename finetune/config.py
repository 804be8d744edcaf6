"""The fine-tuning options, written once: each field of :class:`FinetuneConfig` (and of :class:`AugmentConfig`)
carries its ``speciesid finetune`` option in ``metadata`` (see :func:`option`); ``api/cli/finetune.py`` builds
the parser and the config from these fields, so a new setting is one field here.

Imports nothing heavy (no torch): the CLI builds its parser from this module.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from index.sources import absolute_path

STAGES = ("global", "local")
BALANCE_MODES = ("weights", "sampler", "none")
BN_MODES = ("eval", "train")
HEAD_INITS = ("probe", "keep", "random")
#: The smallest value each count setting takes (after the stage defaults).
COUNT_MINIMUMS = {"epochs": 0, "batch_size": 1, "patience": 0, "min_epochs": 0, "freeze_epochs": 0, "freeze_layers": 0,
                  "train_size": 32, "workers": 0, "threads": 1, "seed": 0}
#: The range of each real-valued setting (after the stage defaults; None = not set, not checked), as
#: (low, high, bounds): ``bounds`` in interval notation ("[)": low included, high excluded); high None = no upper
#: bound. ``augment.X`` is an :class:`AugmentConfig` field (``augment.scale``: its smallest area, ``--crop-scale``).
RANGES: dict[str, tuple[float, float | None, str]] = {
    "val_split": (0, 1, "()"), "lr": (0, None, "()"), "backbone_lr": (0, None, "[)"), "layer_decay": (0, 1, "(]"),
    "weight_decay": (0, None, "[)"), "warmup_epochs": (0, None, "[)"), "label_smoothing": (0, 1, "[)"),
    "head_scale": (0, None, "()"), "ema": (0, 1, "[)"), "drop_rate": (0, 1, "[)"), "mixup": (0, None, "[)"),
    "cutmix": (0, None, "[)"), "mix_prob": (0, 1, "[]"), "time_limit": (0, None, "()"),
    "time_budget": (0, None, "()"),
    "augment.scale": (0, 1, "(]"), "augment.vflip": (0, 1, "[]"), "augment.color_jitter": (0, None, "[)"),
}
# what chooses the kept epoch (and stops early), on the validation photos: the head's log-loss at a fitted
# temperature (smooth in the epochs), or macro-F1 (steps of one photo; the rule before)
SELECT_RULES = ("nll", "macro-f1")

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


def option(help: str | None, **cli: Any) -> dict[str, Any]:
    """Field metadata making the field a ``speciesid finetune`` option.

    The flag is ``--field-name`` and its type, default and ``required`` come from the field, unless ``cli``
    says otherwise: ``flag``, ``metavar``, ``choices``, ``type``, ``default`` (the CLI's own, when the field
    holds another form), ``action``/``const``, ``layouts=True`` (choices: the dataset layouts) and ``convert``
    (CLI value -> field value). A bool field defaulting to True becomes ``--no-NAME``. Fields with a stage
    default get "(stage default: ...)" appended to their help.
    """
    return {"cli": {"help": help, **cli}}


def _off_if_none(policy: str | None) -> str | None:
    return None if policy in (None, "", "none") else policy


@dataclass
class AugmentConfig:
    """Training augmentation (``finetune.augment``)."""

    # RandomResizedCrop area range
    scale: tuple[float, float] = field(default=(0.35, 1.0), metadata=option(
        "RandomResizedCrop smallest area (default 0.35)", flag="--crop-scale", type=float, default=0.35,
        convert=lambda v: (v, 1.0)))
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect range
    hflip: float = 0.5  # horizontal flip probability
    # vertical flip probability
    vflip: float = field(default=0.0, metadata=option("vertical flip probability (default 0)"))
    # brightness / contrast / saturation strength
    color_jitter: float = field(default=0.3, metadata=option("colour jitter strength (default 0.3; 0 = off)"))
    hue: float = 0.0  # hue jitter (0: colour is a species trait)
    # timm RandAugment policy string; None or "" = off
    auto_augment: str | None = field(default="rand-m9-mstd0.5", metadata=option(
        "timm RandAugment policy (default rand-m9-mstd0.5; 'none' = off)", flag="--rand-augment",
        metavar="POLICY", convert=_off_if_none))
    ra_ops: str = "field"  # RandAugment operations: "field" (colour-preserving FIELD_OPS) or "all" (timm's set)
    re_prob: float = 0.0  # random erasing probability


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs (None = the stage's default)."""

    # training photos
    root: str = field(metadata=option("training photos", metavar="DIR"))
    # output folder (timm local-dir + probe + log + checkpoint)
    out: str = field(metadata=option("output folder (timm local-dir + probe + log)", metavar="DIR"))
    # starting encoder spec (timm:..., local-dir folder of a previous stage, weights file)
    init: str | None = field(default=None, metadata=option(
        "starting encoder, required unless --model: any timm spec (timm:local-dir:DIR, timm:NAME [--weights FILE], "
        "timm:hf-hub:ORG/REPO), a previous stage's output folder, or a weights file with --model", metavar="SPEC"))
    # timm:NAME, the architecture when --init is a weights file
    model: str | None = field(default=None, metadata=option(
        "architecture for a weights-file --init (alone, without --init: its hub weights)", metavar="timm:NAME"))
    # weights file for --init timm:NAME
    weights: str | None = field(default=None, metadata=option("weights file for --init timm:NAME", metavar="FILE"))
    # dataset layout of root (index.datasets)
    dataset: str = field(default="folder", metadata=option("dataset layout of --root (default folder)", layouts=True))
    # metadata CSV of root
    metadata: str | None = field(default=None, metadata=option(
        "metadata CSV (snakeclef2021; rare-species: default ROOT/metadata.csv)"))
    # validation photos (default: a stratified split of the training set)
    val_root: str | None = field(default=None, metadata=option(
        "validation photos (early stopping, best epoch)", metavar="DIR"))
    # layout of val_root (default: dataset)
    val_dataset: str | None = field(default=None, metadata=option(
        "layout of --val-root (default --dataset)", layouts=True))
    # metadata CSV of val_root
    val_metadata: str | None = field(default=None, metadata=option("metadata CSV of the validation set"))
    # fraction of each species held out when there is no val_root
    val_split: float = field(default=0.15, metadata=option(
        "without --val-root: hold out this fraction of each species (stratified, seeded; default 0.15)",
        metavar="F"))
    # "global" or "local": which STAGE_DEFAULTS fill the settings left as None
    stage: str = field(default="local", metadata=option("global or local (default local)", choices=STAGES))
    # epochs in all (frozen ones included)
    epochs: int | None = field(default=None, metadata=option(
        "epochs in all, the frozen ones included (with --time-budget: the most it may fit)"))
    # photos per step
    batch_size: int = field(default=32, metadata=option("photos per step (default 32)"))
    # head learning rate (AdamW)
    lr: float | None = field(default=None, metadata=option("head learning rate, AdamW"))
    # last backbone layer's learning rate
    backbone_lr: float | None = field(default=None, metadata=option("last backbone layer's learning rate"))
    # each earlier layer group: x this
    layer_decay: float | None = field(default=None, metadata=option(
        "learning-rate factor per earlier layer group"))
    # AdamW weight decay (not on biases and norms)
    weight_decay: float = field(default=0.05, metadata=option("AdamW weight decay (default 0.05)"))
    # linear warmup of each group's rate (the backbone's starts when it unfreezes)
    warmup_epochs: float = field(default=1.0, metadata=option("linear warmup, then cosine decay (default 1)"))
    # epochs with the backbone frozen (head only)
    freeze_epochs: int | None = field(default=None, metadata=option("first epochs with the backbone frozen"))
    # first N layer groups (stem, blocks) never train: a cheaper backward pass
    freeze_layers: int | None = field(default=None, metadata=option(
        "the first N layer groups (stem, blocks) never train: cheaper backward", metavar="N"))
    # "eval" (statistics frozen) or "train"
    bn: str | None = field(default=None, metadata=option(
        "batch-norm statistics frozen or updated", choices=BN_MODES))
    # label smoothing of the (mixed) targets
    label_smoothing: float = field(default=0.1, metadata=option(
        "label smoothing of the (mixed) training targets (default 0.1)"))
    # "weights" (class-weighted loss), "sampler" (class-balanced draws) or "none"
    balance: str | None = field(default=None, metadata=option(
        "class imbalance: class-weighted loss, class-balanced sampling, or none", choices=BALANCE_MODES))
    # "probe" (linear probe on frozen features), "keep" (init's head), "random"
    head_init: str | None = field(default=None, metadata=option(
        "probe = linear probe on frozen features; keep = the init's head when its species match",
        choices=HEAD_INITS))
    # cosine head logit scale
    head_scale: float = field(default=24.0, metadata=option("cosine head logit scale (default 24)"))
    margin: float = 0.0  # CosFace additive margin on the true class's cosine during training (tighter clusters)
    learn_scale: bool = False  # the head's logit scale trains too
    # EMA decay of the weights; 0 = off
    ema: float | None = field(default=None, metadata=option("EMA decay of the weights, 0 = off"))
    # what chooses the epoch kept and stops early, on the validation photos: "nll" = the head's log-loss at the
    # softmax temperature fitted to them (least wins), "macro-f1" = their macro-F1 (most wins)
    select: str = field(default="nll", metadata=option(
        "what chooses the epoch kept and stops early, on the validation photos: nll = the head's log-loss at a "
        "fitted temperature (default; smooth), macro-f1 = their macro-F1", choices=SELECT_RULES))
    # early stopping: epochs without a better validation score (``select``)
    patience: int | None = field(default=None, metadata=option(
        "early stopping: epochs without a better validation score (--select)"))
    # no early stopping before this epoch (the warmup and mixing first lower val)
    min_epochs: int | None = field(default=None, metadata=option("no early stopping before this epoch"))
    # training resolution (default: the model's input size)
    train_size: int | None = field(default=None, metadata=option(
        "training resolution (default: the model's own)", metavar="PX"))
    # the side the exported network is embedded at: "auto" (chosen after training on the validation photos, by the
    # head's log-loss, among the training size x 1, 8/7, 9/7, 10/7 and the model's own), "train" (the model's own
    # input size), or a number of pixels
    test_size: str = field(default="auto", metadata=option(
        "the size galleries embed photos at afterwards: auto (the one of the training size x 1, 8/7, 9/7, 10/7 and "
        "the model's own whose head log-loss on the validation photos is least; recorded as the model's "
        "test_input_size; default), train (the model's own input size), or PX", metavar="auto|train|PX"))
    # validation with horizontal-flip test-time augmentation
    tta: bool = field(default=False, metadata=option("validate with horizontal-flip test-time augmentation"))
    # dropout on the pooled features
    drop_rate: float = field(default=0.0, metadata=option("dropout on the pooled features (default 0)"))
    drop_path: float = 0.0  # stochastic depth rate (timm models with drop_path_rate)
    # mixup Beta(alpha, alpha); 0 = off
    mixup: float | None = field(default=None, metadata=option("mixup Beta(alpha, alpha), 0 = off", metavar="ALPHA"))
    # cutmix Beta(alpha, alpha); 0 = off (with mixup too: one of the two per batch)
    cutmix: float | None = field(default=None, metadata=option(
        "CutMix Beta(alpha, alpha), 0 = off; with mixup, one of the two per mixed batch", metavar="ALPHA"))
    # share of batches mixed
    mix_prob: float | None = field(default=None, metadata=option("share of batches mixed", metavar="P"))
    # training augmentation (its CLI options are AugmentConfig's fields)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # seed of the split, the head init, the batches and the augmentation
    seed: int = field(default=0, metadata=option(
        "seed of the split, the head init, the batches and the augmentation (default 0)"))
    # auto (CUDA when present), cpu, cuda, cuda:N
    device: str = field(default="auto", metadata=option("auto (CUDA when present; default), cpu, cuda, cuda:N"))
    # loader processes (default: 1 on CPU, 4 on CUDA)
    workers: int | None = field(default=None, metadata=option("loader processes (default 1 on CPU, 4 on CUDA)"))
    # torch CPU threads (default: torch's)
    threads: int | None = field(default=None, metadata=option("torch CPU threads (default: torch's choice)"))
    # mixed precision: CUDA (bf16/fp16); CPU training steps in bf16 where the CPU has native bf16
    amp: bool = field(default=True, metadata=option(
        "no mixed precision: fp32 on CUDA, and fp32 training steps on CPUs with native bf16 (slower there)"))
    # CPU training steps that run in fp32 (no native bf16, or --no-amp) imitate bf16 autocast's rounding: on
    # 3 paired runs it gave fp32 training the bf16 runs' stronger kNN side and blend (docs/accuracy.md)
    emulate_bf16: bool = field(default=True, metadata=option(
        "plain fp32 CPU training steps (no bf16 rounding imitated; by default, on CPUs without native bf16, "
        "steps round like bf16 autocast: a stronger kNN side and blend, 1.25-1.9x slower steps)"))
    # minutes: stop (like early stopping) before an epoch would overrun
    time_limit: float | None = field(default=None, metadata=option(
        "stop before an epoch would run past MIN minutes", metavar="MIN"))
    # minutes for the whole run: training steps timed first, the epoch count (at most `epochs`) fitted to them
    time_budget: float | None = field(default=None, metadata=option(
        "fit the whole run (head init, epochs, final evaluation) in MIN minutes on this machine: a few training "
        "steps are timed first and the epoch count (at most --epochs) is set so the run, its cosine schedule "
        "complete, ends in time; an epoch that would overrun is not started", metavar="MIN"))
    # "auto": continue a checkpoint of the same settings; "no": start afresh
    resume: str = field(default="auto", metadata=option(
        "start afresh even if OUT holds a checkpoint or a finished run. Whenever a run starts afresh (this, or no "
        "checkpoint in OUT) the earlier speciesid run's files in OUT (checkpoint, model, probe, photo lists, log, "
        "curves, last/) are removed before its first epoch; files of those names that are not a speciesid run's, "
        "and an OUT that is the --init folder, are refused before anything is written",
        flag="--no-resume", action="store_const", const="no"))
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
        if out.bn not in BN_MODES:
            raise ValueError(f"--bn must be eval or train, got {out.bn!r}")
        for name, low in COUNT_MINIMUMS.items():
            value = getattr(out, name)
            if value is not None and value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be {low} or more, got {value}")
        for name, (low, high, bounds) in RANGES.items():
            _check_range(name, _setting(out, name), low, high, bounds)
        from retrieval.encoders import read_option

        out.device = read_option("device", out.device)  # identify's and serve's reading: ' CPU ' is cpu
        if out.device != "auto":  # a CUDA device on a machine without one: refused before OUT is made
            from retrieval.torch_encoders import resolve_device

            resolve_device(out.device)
        if out.augment.auto_augment:  # timm's parser asserts: a bare AssertionError after the photos were decoded
            from finetune.augment import rand_augment

            rand_augment(out.augment.auto_augment, ops=out.augment.ra_ops)
        if out.test_size not in ("auto", "train") and not (str(out.test_size).isdigit() and int(out.test_size) >= 32):
            raise ValueError(f"--test-size must be auto, train or a number of pixels (32 or more), got "
                             f"{out.test_size!r}")
        out.test_size = str(out.test_size)
        if out.select not in SELECT_RULES:
            raise ValueError(f"--select must be {' or '.join(SELECT_RULES)}, got {out.select!r}")
        if out.head_init not in HEAD_INITS:
            raise ValueError(f"--head-init must be probe, keep or random, got {out.head_init!r}")
        return out

    def training_settings(self, *, absolute: bool = True) -> dict:
        """The settings that shape the training trajectory (a checkpoint resumes only under them); the folders and
        files as absolute paths, so that ``--root photos/`` and ``--root ./photos`` name one run (``absolute``
        False: as given, how checkpoints of format 2 recorded them)."""
        skip = {"out", "device", "workers", "threads", "time_limit", "resume", "final_eval", "test_size"}
        if self.time_budget:  # the epochs were fitted to the machine's speed: the budget names the run
            skip.add("epochs")
        settings = {k: v for k, v in asdict(self).items() if k not in skip}
        if absolute:
            for key in PATH_SETTINGS:
                settings[key] = absolute_path(settings[key])
        return settings

    def training_key(self, *, absolute: bool = True) -> str:
        """Digest of :meth:`training_settings`."""
        settings = self.training_settings(absolute=absolute)
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _setting(cfg: FinetuneConfig, name: str) -> Any:
    """The value of setting ``name`` (``augment.scale``: the crop's smallest area, what --crop-scale sets)."""
    if name.startswith("augment."):
        value = getattr(cfg.augment, name.removeprefix("augment."))
        return value[0] if name == "augment.scale" else value
    return getattr(cfg, name)


#: The CLI flags of the settings whose flag is not ``--NAME``.
_FLAGS = {"augment.scale": "--crop-scale"}


def _check_range(name: str, value: float | None, low: float, high: float | None, bounds: str) -> None:
    """Refuse a value of setting ``name`` outside its range, naming its flag and the range (NaN and inf too)."""
    if value is None:
        return
    above = value >= low if bounds[0] == "[" else value > low
    below = high is None or (value <= high if bounds[1] == "]" else value < high)
    if math.isfinite(value) and above and below:
        return
    flag = _FLAGS.get(name, "--" + name.removeprefix("augment.").replace("_", "-"))
    if high is None:
        allowed = f"{low} or more" if bounds[0] == "[" else f"more than {low}"
    else:
        allowed = f"in {bounds[0]}{low}, {high}{bounds[1]}"
    raise ValueError(f"{flag} must be {allowed}, got {value}")


#: The settings that name folders or files (compared as absolute paths).
PATH_SETTINGS = ("root", "val_root", "metadata", "val_metadata")


def stage_default_help(name: str) -> str | None:
    """'stage default: global X, local Y' for a setting the stage fills in, else None."""
    if name not in STAGE_DEFAULTS[STAGES[0]]:
        return None
    return "stage default: " + ", ".join(f"{s} {STAGE_DEFAULTS[s][name]}" for s in STAGES)
