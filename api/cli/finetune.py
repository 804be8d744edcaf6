"""``speciesid finetune``: the parser and the handler, both built from :class:`finetune.config.FinetuneConfig`.

Every option is a config field whose ``metadata`` holds its help (``finetune.config.option``): the flag is the
field's name (``--batch-size``), its type, default and ``required`` come from the field, the stage defaults are
appended to the help. So a new setting is one field in ``finetune/config.py``; nothing here changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from api.cli._common import at_least, emit, number_in, show_bars

if typing.TYPE_CHECKING:
    from finetune.config import FinetuneConfig

DESCRIPTION = (
    "Fine-tune a timm CNN on class-per-folder (or other --dataset) photos. Stage 'global' trains on a big dataset "
    "with a full head; stage 'local' (LP-FT) starts the head as a linear probe on frozen features, keeps the "
    "backbone frozen for the first epoch(s), then trains it at a smaller, layer-wise decayed learning rate with "
    "batch-norm statistics frozen and an EMA of the weights. Early stopping keeps the epoch with the least "
    "validation log-loss at a fitted temperature (--select; macro-F1 before); --time-budget fits the epochs to "
    "this machine's timed steps. Every epoch writes OUT/log.csv, OUT/curves.png and OUT/checkpoint.pt: after "
    "Ctrl-C or a crash, the same command resumes after the last finished epoch."
)
HELP = (
    "fine-tune a timm CNN encoder on labelled photos (stage global or local); the output folder is an encoder "
    "(--encoder timm:local-dir:OUT) whose head is the gallery's probe (speciesid probe import)"
)


@dataclasses.dataclass
class _Option:
    path: tuple[str, ...]  # ("batch_size",) or ("augment", "scale")
    field: dataclasses.Field
    hint: Any  # the field's resolved type

    @property
    def spec(self) -> dict:
        return self.field.metadata["cli"]

    @property
    def dest(self) -> str:
        return ".".join(self.path)


def _options(cls: type | None = None, prefix: tuple[str, ...] = ()) -> Iterator[_Option]:
    """The CLI options of the config's fields (nested dataclass fields, e.g. ``augment``, included)."""
    from finetune.config import FinetuneConfig

    cls = cls or FinetuneConfig
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _options(hints[f.name], (*prefix, f.name))
        elif "cli" in f.metadata:
            yield _Option((*prefix, f.name), f, hints[f.name])


def _scalar(hint: Any) -> Any:
    """``int | None`` -> int; other hints as they are."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if isinstance(hint, types.UnionType) and len(args) == 1 else hint


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _argument(opt: _Option, datasets: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """(flag, ``add_argument`` keywords) of one option: the field's type and default unless its metadata says."""
    from finetune.config import stage_default_help

    spec = dict(opt.spec)
    name = opt.path[-1]
    help_text, flag = spec.pop("help"), spec.pop("flag", None)
    default = spec.pop("default", _field_default(opt.field))
    spec.pop("convert", None)
    if spec.pop("layouts", False):
        spec["choices"] = list(datasets)
    kwargs: dict[str, Any] = {"dest": opt.dest, **spec}
    kind = _scalar(opt.hint)
    if kind is bool and "action" not in kwargs:
        kwargs["action"] = "store_false" if default else "store_true"
        flag = flag or ("--no-" if default else "--") + name.replace("_", "-")
    flag = flag or "--" + name.replace("_", "-")
    if "action" not in kwargs:
        kwargs["type"] = _checked(opt.dest) or kwargs.get("type") or (kind if kind in (int, float) else str)
        if "choices" not in kwargs:  # as argparse would name it after the flag (the dest may be augment.NAME)
            kwargs.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
    if default is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = default
    stage = stage_default_help(name) if len(opt.path) == 1 else None
    kwargs["help"] = (f"{help_text} ({stage})" if help_text else stage) if stage else help_text
    return flag, kwargs


def _checked(dest: str) -> Any:
    """The argparse ``type`` that refuses a value of setting ``dest`` out of its range (``finetune.config``'s
    COUNT_MINIMUMS and RANGES, which ``FinetuneConfig.resolved`` checks for library callers), so the command line
    names the option and its ``--help`` as every command does; None for a setting with no range."""
    from finetune.config import COUNT_MINIMUMS, RANGES

    if dest in COUNT_MINIMUMS:
        return at_least(COUNT_MINIMUMS[dest])
    if dest in RANGES:
        return number_in(*RANGES[dest])
    return None


def register(subparsers: Any, datasets: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """Add the ``finetune`` subcommand (one option per config field) to ``subparsers``."""
    if datasets is None:
        from index.datasets import DATASETS as datasets
    p = subparsers.add_parser("finetune", help=HELP, description=DESCRIPTION)
    for opt in _options():
        flag, kwargs = _argument(opt, datasets)
        p.add_argument(flag, **kwargs)
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars and no line per epoch (the summary at the end stays)")
    p.set_defaults(func=cmd_finetune)
    return p


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The :class:`FinetuneConfig` of parsed ``finetune`` arguments (nested fields built too)."""
    from finetune.config import FinetuneConfig

    values: dict[str, Any] = {}
    for opt in _options():
        value = getattr(args, opt.dest)
        convert = opt.spec.get("convert")
        node = values
        for key in opt.path[:-1]:
            node = node.setdefault(key, {})
        node[opt.path[-1]] = convert(value) if convert else value
    hints = typing.get_type_hints(FinetuneConfig)
    for key, sub in list(values.items()):
        if isinstance(sub, dict):
            values[key] = hints[key](**sub)
    return FinetuneConfig(**values)


#: A run needs a starting network: said before anything loads (the libraries take seconds to import).
NO_START = ("give --init SPEC (a timm spec, a previous stage's output folder, or a weights file with --model "
            "timm:NAME) or --model timm:NAME alone (its hub weights); see 'speciesid finetune --help'")


def check_start(args: argparse.Namespace) -> None:
    """Refuse a run with neither ``--init`` nor ``--model`` (:data:`NO_START`) before torch and timm are imported.
    Not an argparse group: both may be given (a weights file and its architecture)."""
    if args.init is None and args.model is None:
        raise ValueError(NO_START)


#: Why a run stopped, in words.
STOPPED = {"epochs": "every epoch run", "early-stopping": "stopped early: --patience epochs without a better one",
           "time-limit": "stopped at --time-limit", "time-budget": "stopped to fit --time-budget"}


def cmd_finetune(args: argparse.Namespace) -> int:
    """Run ``speciesid finetune``; 130 (with how to resume) on Ctrl-C."""
    check_start(args)
    from finetune import train

    config = config_from_args(args)
    # how to resume: a command with --no-resume would start over, throwing the finished epochs away
    again = ("run the command again without --no-resume to resume (with it, the run starts over)"
             if config.resume == "no" else "run the same command again to resume")
    try:
        from tqdm.auto import tqdm

        r = train.finetune(config, progress=show_bars(args), report=None if args.quiet else tqdm.write)
    except train.FinetuneInterrupted as exc:
        sys.stderr.write(
            f"speciesid: fine-tuning interrupted after epoch {exc.epoch}; the checkpoint {exc.out}/checkpoint.pt "
            f"is kept: {again}\n"
        )
        return 130
    except KeyboardInterrupt:  # before the first epoch, or during the final evaluation and export
        checkpoint = Path(config.out) / train.CHECKPOINT
        sys.stderr.write("speciesid: fine-tuning interrupted; " + (
            f"the checkpoint {checkpoint} is kept: {again}\n" if checkpoint.is_file()
            else "it had written no checkpoint yet: run the command again to start over\n"))
        return 130
    b = r.best
    stopped = STOPPED.get(r.stopped, r.stopped)
    if r.stopped == "epochs" and r.max_epochs and r.epochs_planned < r.max_epochs:
        stopped = f"every epoch --time-budget allowed: {r.epochs_planned} of --epochs {r.max_epochs}"
    emit(
        f"fine-tuned {len(r.species)} species: {r.epochs_run} epochs in {r.seconds / 60:.1f} min ({stopped}); "
        f"best epoch {r.best_epoch}: val top-1 {b.get('val_top1', 0):.3f}, macro-F1 {b.get('val_macro_f1', 0):.3f}"
    )
    if not r.backbone_trained:
        emit(f"note: the kept weights (epoch {r.best_epoch}) are from before the backbone trained (epoch 0, or a "
             "frozen epoch): the encoder embeds as the starting network does, only its head is new (config.json: "
             "backbone_trained false)")
    if r.final:
        f = r.final
        emit(
            f"validation with the kept weights (gallery = training photos): head {f['head_top1']:.3f}, "
            f"kNN {f['knn_top1']:.3f}, blend {f['blend_top1']:.3f} (kNN metric {f.get('metric', 'cosine')} "
            f"k={f['k']} T={f['temperature']} w={f['blend_weight']})"
        )
    ts = r.test_size
    if ts.get("head_nll"):
        emit(f"galleries embed at {ts['size']} px, the side with the least head log-loss on the {ts['photos']} "
             "validation photos: " + ", ".join(f"{s} px {v:.3f}" for s, v in ts["head_nll"].items()))
    elif ts:
        emit(f"galleries embed at {ts['size']} px (--test-size {ts.get('setting')})")
    emit(
        f"model: {r.out} (use --encoder timm:local-dir:{r.out}; log {r.out}/log.csv, curves {r.out}/curves.png)\n"
        f"its head as the gallery's probe: speciesid probe import --index DIR --from {r.out} [--val-root DIR]"
    )
    return 0
