"""A run's state on disk: ``OUT/checkpoint.pt`` (save, load, restore), ``OUT/log.csv`` and ``OUT/curves.png``.

The checkpoint is written atomically after every epoch (``index.atomic.atomic_write``): model, optimiser,
gradient scaler, EMA, step, best weights so far, history, the RNG states, the time budget's plan and the time
spent, and the digest of what the photos were (:func:`finetune.data.photo_inventory`; the list itself is written
once beside it, :data:`PHOTOS_FILE`), so an interrupted run resumes where the last finished epoch ended, and only
under the settings that wrote it (:meth:`FinetuneConfig.training_key`) and on the same photos
(:func:`check_photos`). :func:`check_out` refuses an ``--out`` the run must not write into (a gallery, the
``--init`` folder, files that are not an earlier run's of ours), and :func:`clear_run` removes an earlier run's
files when a run starts afresh.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import pickle
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from finetune.config import FinetuneConfig
from finetune.model import parse_init
from index.atomic import atomic_write
from retrieval.encoders import FINETUNE_RECORD

if TYPE_CHECKING:
    from timm.utils import ModelEmaV3

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
LOG = "log.csv"
CURVES = "curves.png"
#: Version of the checkpoint's contents (4: the photos' digest, the list in PHOTOS_FILE; 3: the photos inline, the
#: budget's plan and the time spent; 2: timm's ModelEmaV3 state; 1, unnumbered: the hand-written EMA).
FORMAT = 4
#: Formats still resumed (2: its photos were not recorded, so they cannot be checked: a warning says so).
RESUMABLE = (2, 3, 4)
#: Beside the checkpoint while a run is unfinished: the photos it trains on (:func:`save_photo_list`).
PHOTOS_FILE = "checkpoint-photos.json.gz"
#: The files a run writes into its output folder (and into OUT/last), removed when a run starts afresh there.
RUN_FILES = ("model.safetensors", "config.json", "probe.npz", "probe.json", "heldout.csv", "trained.csv",
             "validation.csv", LOG, CURVES)
#: What an unfinished run adds (OUT only).
PROGRESS_FILES = (CHECKPOINT, PHOTOS_FILE)
#: The folder of the last epoch's export (``save_last``).
LAST_DIR = "last"
#: How many example paths a refused resume names per kind of change.
_EXAMPLES = 3

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
#: What a checkpoint of ours holds beyond tensors and plain Python values: the uint32 array of the numpy RNG state
#: (:func:`rng_state`; ``_reconstruct`` under numpy 2's name and numpy 1's). A checkpoint is read with
#: ``weights_only=True`` and these alone allowed: a pickle asking for anything else (code to run) is refused before
#: any of it runs.
_SAFE_GLOBALS: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
    (_reconstruct, "numpy._core.multiarray._reconstruct"), (_reconstruct, "numpy.core.multiarray._reconstruct"),
    np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _load(path: Path, *, mmap: bool = False) -> Any:
    """``torch.load`` of ``path`` on the CPU, safely: tensors, plain Python values and :data:`_SAFE_GLOBALS` only
    (pickle.UnpicklingError for a file that asks for more)."""
    with torch.serialization.safe_globals(_SAFE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The Python, numpy and torch (CPU) random states, for a checkpoint (:func:`set_rng_state` restores them)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    """Restore the random states :func:`rng_state` saved."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def cpu_state(module: torch.nn.Module) -> dict:
    """A detached CPU copy of a module's state."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


@dataclass
class TrainState:
    """Where a run stands: epochs and optimiser steps done, training time, the history and the best epoch."""

    epoch: int = 0  # epochs finished (0: only the head's start and epoch 0's evaluation)
    step: int = 0  # optimiser steps taken, over every epoch (the schedule's position)
    seconds: float = 0.0  # training wall time, summed over resumed runs
    best_metric: float = float("-inf")  # the best epoch's validation score, higher is better (see ``score``)
    best_epoch: int = 0  # the epoch that score belongs to
    best_state: dict | None = None  # the weights kept (EMA ones with an EMA), on CPU
    best_row: dict = field(default_factory=dict)  # that epoch's row of log.csv
    history: list[dict] = field(default_factory=list)  # every epoch's row of log.csv, epoch 0 first
    # under --select nll: the network before fine-tuning (epoch 0), weighed against the best fine-tuned epoch at
    # the end, each at the size it would be embedded at (``finetune.train``), not among the epochs at 224 px
    start_state: dict | None = None  # its weights, on CPU
    start_row: dict = field(default_factory=dict)  # its row of log.csv

    @staticmethod
    def score(row: dict, select: str) -> float:
        """An epoch's validation score under ``select`` (``FinetuneConfig.select``), higher is better: minus the
        temperature-fitted log-loss, or macro-F1."""
        return -row["val_nll"] if select == "nll" else row["val_macro_f1"]

    def record(self, row: dict, model: torch.nn.Module, select: str = "nll") -> bool:
        """Add an epoch's row; keep ``model``'s weights when its validation score (``select``) is the best so far
        (True then). Ties keep the earlier epoch. Under ``nll`` epoch 0 (before fine-tuning) is set aside as
        ``start_state`` instead: at the training size the untrained network, whose head was fitted there, is
        favoured over fine-tuned epochs that gain most at larger sizes."""
        self.history.append(row)
        if select == "nll" and row["epoch"] == 0:
            self.start_state, self.start_row = cpu_state(model), dict(row)
            return False
        score = self.score(row, select)
        if score > self.best_metric + 1e-9:
            self.best_metric, self.best_epoch, self.best_row = score, row["epoch"], dict(row)
            self.best_state = cpu_state(model)
            return True
        return False

    def out_of_patience(self, cfg: FinetuneConfig) -> bool:
        """Early stopping: ``patience`` epochs without a better validation score, and not before ``min_epochs``."""
        return self.epoch - self.best_epoch >= cfg.patience and self.epoch >= max(cfg.min_epochs, 1)


def check_out(out: Path, cfg: FinetuneConfig) -> list[Path]:
    """Refuse (ValueError), before anything is written, an ``--out`` the run would damage: a file, a gallery
    folder, a folder holding a probe that is not a fine-tuning run's head, the ``--init`` folder (or one inside
    it, or holding it), and a folder holding files of the names a run writes (:data:`RUN_FILES`) that are not an
    earlier speciesid run's (:func:`earlier_run`): they would be overwritten, or removed when the run starts
    afresh. Returns the earlier run's files (the folder's one scan), which :func:`clear_run` removes when the
    run starts afresh."""
    from index.layout import GALLERY_FILE, PROBE_META

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder (it is created if missing)")
    if (out / GALLERY_FILE).is_file():
        raise ValueError(f"--out {out} is a gallery folder (it holds {GALLERY_FILE}): the run would overwrite its probe "
                         "and write model files into it; give the fine-tuning run its own --out folder (the gallery "
                         "is built from it afterwards: speciesid index build --encoder timm:local-dir:OUT --index DIR)")
    _check_init(out, cfg)
    meta = out / PROBE_META
    if meta.is_file():
        try:
            source = json.loads(meta.read_text(encoding="utf-8")).get("source") or ""
        except (OSError, ValueError, AttributeError):
            source = ""
        if not str(source).startswith("finetune:"):
            raise ValueError(f"--out {out} holds a probe that is not a fine-tuning run's head ({meta}): the run would "
                             "overwrite it; give another --out")
    run, foreign = earlier_run(out, cfg)
    if foreign:
        names = ", ".join(str(p.relative_to(out)) for p in foreign)
        raise ValueError(
            f"--out {out} holds {names}, not written by a speciesid fine-tuning run (no config.json with a "
            f"'{FINETUNE_RECORD}' block, or checkpoint.pt of one): the run writes files of those names, and removes "
            "an earlier run's when it starts afresh; give another --out (a new or empty folder)")
    return run


def init_paths(cfg: FinetuneConfig) -> list[Path]:
    """The folders and files the run starts from: a local ``--init`` folder (``timm:local-dir:DIR``,
    ``local-dir:DIR`` or ``DIR``), an ``--init`` weights file (as ``finetune.model.parse_init`` reads ``--init``),
    a ``--weights`` file."""
    paths = []
    start = parse_init(cfg.init).path if cfg.init else None
    if start is not None:
        paths.append(start)
    if cfg.weights:
        paths.append(Path(cfg.weights))
    return paths


def _check_init(out: Path, cfg: FinetuneConfig) -> None:
    """Refuse an ``--out`` that is the ``--init`` folder, lies inside it, or holds it (or a weights file it
    starts from): the run would write over the starting model, and remove its files when it starts afresh."""
    here = out.expanduser().resolve()
    for path in init_paths(cfg):
        start = path.expanduser().resolve()
        what = "--weights" if cfg.weights and path == Path(cfg.weights) else "--init"
        if here == start:
            where = f"is the {what} folder"
        elif start in here.parents:
            where = f"is inside the {what} folder {path}"
        elif here in start.parents:
            where = f"holds the {what} {'folder' if start.is_dir() else 'file'} {path}"
        else:
            continue
        raise ValueError(f"--out {out} {where}: the run would write its model over the one it starts from (and "
                         "remove that one's files when it starts afresh); give the run its own --out folder, "
                         "outside the starting model's")


def _ours(folder: Path) -> bool | None:
    """Whether ``folder``'s config.json is a speciesid fine-tuning run's (None: it holds no config.json)."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        return FINETUNE_RECORD in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def _our_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a checkpoint a speciesid fine-tuning run wrote (read memory-mapped: the weights are
    not loaded; safely: a pickle asking to run code is not ours, and nothing of it runs)."""
    try:
        checkpoint = _load(path, mmap=True)
    except Exception:  # noqa: BLE001 - not a torch file, cut short, another pickle
        return False
    return isinstance(checkpoint, dict) and "format" in checkpoint and "key" in checkpoint


def earlier_run(out: Path, cfg: FinetuneConfig) -> tuple[list[Path], list[Path]]:
    """(an earlier speciesid run's files in ``out`` and ``out/last``, which a fresh start removes; files of those
    names that are not a run's, which the run must not touch). ``out``'s files are a run's when its config.json
    carries the ``speciesid`` block (``retrieval.encoders.FINETUNE_RECORD``) or, without a config.json (a run
    that never finished), when its checkpoint.pt is a run's (with ``resume`` auto, :func:`load_checkpoint` reads
    and checks it); ``out/last``'s when its own config.json carries the block, or, without one, when ``out``'s
    files are a run's. :data:`PHOTOS_FILE` is a run's when its contents are a run's photo list (a run killed
    while it wrote its first checkpoint can leave it alone)."""
    found = {folder: [folder / n for n in names if (folder / n).is_file()]
             for folder, names in ((out, (*RUN_FILES, *PROGRESS_FILES)), (out / LAST_DIR, RUN_FILES))}
    if not any(found.values()):
        return [], []
    ours_out = _ours(out)
    if ours_out is None:
        checkpoint = out / CHECKPOINT
        ours_out = checkpoint.is_file() and (cfg.resume != "no" or _our_checkpoint(checkpoint))
    ours_last = _ours(out / LAST_DIR)
    ours_last = ours_out if ours_last is None else ours_last
    run, foreign = [], []
    for folder, ours in ((out, ours_out), (out / LAST_DIR, ours_last)):
        for path in found[folder]:  # the photo list tells itself: a run killed as it wrote its first checkpoint
            (run if ours or (path.name == PHOTOS_FILE and _our_photo_list(path)) else foreign).append(path)
    return run, foreign


def _our_photo_list(path: Path) -> bool:
    """Whether ``path`` is a photo list a speciesid fine-tuning run wrote (:func:`save_photo_list`)."""
    data = _photo_list_json(path)
    return isinstance(data, dict) and set(data) == {"sha256", "photos"} and isinstance(data["photos"], dict)


def _first_line(exc: BaseException, empty: str) -> str:
    """The first line of ``exc``'s message (``empty`` when it has none): what a one-line message quotes of it."""
    return str(exc).splitlines()[0] if str(exc) else empty


def load_checkpoint(out: Path, cfg: FinetuneConfig) -> dict | None:
    """The checkpoint in ``out`` to resume, or None to start afresh.

    Refused (ValueError): a checkpoint that cannot be read, or not safely (a pickle asking to run code: none of it
    runs), of a format no longer resumed or of other settings, and a finished model in ``out`` (all unless
    ``cfg.resume == "no"``, which starts afresh: :func:`clear_run`). Whether its photos are the run's is checked once
    they are listed (:func:`check_photos`).
    """
    path = out / CHECKPOINT
    if cfg.resume == "no":
        return None
    if path.is_file():
        try:
            checkpoint = _load(path)
        except pickle.UnpicklingError as exc:  # torch's weights-only refusal: what it asked for, when it says
            asked = re.search(r"GLOBAL (\S+)", str(exc))
            raise ValueError(
                f"{path} is not a speciesid fine-tuning checkpoint, or not one that can be loaded safely (it asks "
                f"for {asked[1] if asked else 'what a checkpoint of ours never holds'}; nothing of it was run): "
                "delete it to start afresh, or give another --out") from exc
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, pickle errors, EOFError ...
            raise ValueError(f"{path} cannot be read ({type(exc).__name__}: {_first_line(exc, '')}"
                             "): it may be cut short (a full disk, a copy interrupted); delete it to start afresh, or "
                             "give another --out") from exc
        if not isinstance(checkpoint, dict) or "key" not in checkpoint:
            raise ValueError(f"{path} is not a speciesid fine-tuning checkpoint; give another --out")
        if checkpoint.get("format") not in RESUMABLE:
            raise ValueError(f"{path} was written by another version of speciesid (checkpoint format "
                             f"{checkpoint.get('format')}, this one resumes {', '.join(map(str, RESUMABLE))}); pass "
                             "--no-resume to start afresh (it is replaced), or give another --out")
        keys = (cfg.training_key(), cfg.training_key(absolute=False)) if checkpoint["format"] == 2 else (
            cfg.training_key(),)  # format 2 compared the folders as given
        if checkpoint.get("key") not in keys:
            then = checkpoint.get("settings") or {}
            changed = [f"{k} {_shown(then[k])} (now {_shown(v)})" for k, v in cfg.training_settings().items()
                       if k in then and _shown(then[k]) != _shown(v)]
            raise ValueError(
                f"{path} was written by a run with other settings: {'; '.join(changed) or 'an older set of them'}; "
                "rerun with those settings to resume it, or pass --no-resume to start afresh (the checkpoint is "
                "replaced)"
            )
        logger.info("resuming %s after epoch %d", path, checkpoint["epoch"])
        return checkpoint
    if _ours(out) and (out / "model.safetensors").is_file():
        raise ValueError(f"{out} already holds a finished fine-tuning run (config.json + model.safetensors of "
                         "speciesid finetune); give another --out, or pass --no-resume to start afresh there (that "
                         "run's files are removed when the new one starts)")
    return None


def photos_digest(inventory: dict[str, list[list]]) -> str:
    """The sha256 of a run's photo inventory (:func:`finetune.data.photo_inventory` per folder), as the checkpoint
    records it."""
    return hashlib.sha256(json.dumps(inventory, sort_keys=True, default=str).encode()).hexdigest()


def save_photo_list(out: Path, inventory: dict[str, list[list]], digest: str) -> None:
    """``OUT/PHOTOS_FILE``: the run's photo inventory, written once (kept while it matches ``digest``), so that each
    epoch's checkpoint holds only its digest and a refused resume can still name what changed."""
    path = out / PHOTOS_FILE
    if _read_photo_list(path, digest) is not None:
        return
    atomic_write(path, gzip.compress(json.dumps({"sha256": digest, "photos": inventory}).encode(), mtime=0))


def _photo_list_json(path: Path) -> Any:
    """The decoded JSON of a photo list file (gzip), None when it is missing or unreadable."""
    try:
        return json.loads(gzip.decompress(path.read_bytes()))
    except (OSError, ValueError, EOFError):
        return None


def _read_photo_list(path: Path, digest: str | None) -> dict | None:
    """The inventory in ``path`` when it is there, readable and of ``digest`` (any, with None); else None."""
    data = _photo_list_json(path)
    if not isinstance(data, dict) or (digest is not None and data.get("sha256") != digest):
        return None
    return data.get("photos") or {}


def check_photos(out: Path, checkpoint: dict, species: list[str], inventory: dict[str, list[list]]) -> None:
    """Refuse (ValueError, naming what changed) to resume ``checkpoint`` on photos other than those it trained on:
    photos added, removed, relabelled or changed (size, time) under --root or --val-root, or other species (head
    order). Resuming then would move photos the network trained on into the held-out ones, or export head rows
    under the wrong species. A checkpoint of format 2 recorded no photos: a warning says they cannot be checked."""
    changes: list[str] = []
    then_species = list(checkpoint.get("species") or [])
    if then_species != list(species):
        gone, new = sorted(set(then_species) - set(species)), sorted(set(species) - set(then_species))
        changes.append("species " + (", ".join(
            [f"gone: {', '.join(gone)}"] * bool(gone) + [f"new: {', '.join(new)}"] * bool(new)) or "in another order"))
    if checkpoint.get("photos") is not None:  # format 3: the inventory itself
        changes += _photo_changes(checkpoint["photos"], inventory)
    elif checkpoint.get("photos_sha256") is not None:
        if checkpoint["photos_sha256"] != photos_digest(inventory):
            then = _read_photo_list(out / PHOTOS_FILE, checkpoint["photos_sha256"])
            changes += (_photo_changes(then, inventory) if then is not None else []) or [
                f"the photos under --root or --val-root differ from those it trained on ({out / PHOTOS_FILE}, the "
                "list of those, is missing or of other photos: what changed cannot be named)"]
    else:
        logger.warning("%s was written by an earlier speciesid (checkpoint format %s), which did not record the "
                       "photos: whether the photos under --root and --val-root are still those it trained on cannot "
                       "be checked; resuming (pass --no-resume to start afresh if they changed)", out / CHECKPOINT,
                       checkpoint.get("format"))
    if changes:
        raise ValueError(
            f"{out / CHECKPOINT} was written for other photos: {'; '.join(changes)}. Resuming would train on other "
            "photos (photos trained on could become held-out ones, and the head's rows could name the wrong "
            "species): restore the photos as they were to resume, or pass --no-resume to start afresh (the "
            "checkpoint is replaced), or give a new --out"
        )


def _photo_changes(then: dict[str, list[list]], inventory: dict[str, list[list]]) -> list[str]:
    """What changed between two photo inventories, per folder, a few paths of each kind named."""
    changes = []
    for key, flag in (("root", "--root"), ("val_root", "--val-root")):
        before = {row[0]: tuple(row[1:]) for row in then.get(key) or []}
        now = {row[0]: tuple(row[1:]) for row in inventory.get(key) or []}
        kinds = {
            "added": sorted(now.keys() - before.keys()),
            "removed": sorted(before.keys() - now.keys()),
            "of another species": sorted(p for p in now.keys() & before.keys() if now[p][0] != before[p][0]),
            "changed (size or time)": sorted(p for p in now.keys() & before.keys()
                                             if now[p][0] == before[p][0] and now[p][1:] != before[p][1:]),
        }
        said = [f"{len(paths)} {kind} ({', '.join(paths[:_EXAMPLES])}{', ...' if len(paths) > _EXAMPLES else ''})"
                for kind, paths in kinds.items() if paths]
        if said:
            changes.append(f"photos under {flag}: " + "; ".join(said))
    return changes


def clear_run(out: Path, files: Sequence[Path]) -> list[Path]:
    """Remove an earlier speciesid run's files from ``out`` (and ``out/last``) before a run starts afresh there
    (``--no-resume``, or no checkpoint to resume), so that none of them (a ``heldout.csv``, a model) is read as the
    new run's. ``files``: what :func:`check_out` found of a run's (:func:`earlier_run`; it refused the others before
    anything was written). Returns what was removed."""
    removed = []
    for path in files:
        try:
            path.unlink()
        except FileNotFoundError:  # gone since the scan
            continue
        removed.append(path)
    last = out / LAST_DIR
    if removed and last.is_dir() and not any(last.iterdir()):
        last.rmdir()
    return removed


def _shown(value: Any) -> str:
    """A setting as the refusal shows it (and compares it: a tuple read back from a checkpoint is a list)."""
    return json.dumps(value, sort_keys=True, default=str)


def save_checkpoint(out: Path, cfg: FinetuneConfig, species: list[str], state: TrainState, net: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, ema: ModelEmaV3 | None = None, *,
                    extra: dict | None = None) -> None:
    """Write ``OUT/checkpoint.pt`` atomically (after epoch ``state.epoch``); ``extra``: more of the run's state
    (the photos' inventory, the budget's plan, the time spent, why the epochs stopped). A failed write (a full
    disk) raises OSError naming the file and the checkpoint that is kept."""
    payload = {
        "format": FORMAT, "key": cfg.training_key(),
        "settings": {**{k: v for k, v in asdict(cfg).items() if k != "out"}, **cfg.training_settings()},
        "species": species, "epoch": state.epoch, "step": state.step, "seconds": state.seconds,
        "net": net.state_dict(), "opt": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "best_metric": state.best_metric, "best_epoch": state.best_epoch, "best_state": state.best_state,
        "best_row": state.best_row, "history": state.history, "rng": rng_state(),
        "start_state": state.start_state, "start_row": state.start_row, **(extra or {}),
    }
    path = out / CHECKPOINT
    kept = path.is_file()
    try:
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
    except (OSError, RuntimeError) as exc:
        first = _first_line(exc, type(exc).__name__)
        raise OSError(
            f"could not write {path} after epoch {state.epoch} ({first}; is the disk full?): "
            + ("the checkpoint of the epoch before is kept: free some space and run the same command again to resume"
               if kept else "no checkpoint was kept: free some space and run the command again")
        ) from exc


def save_progress(out: Path, cfg: FinetuneConfig, species: list[str], state: TrainState, net: torch.nn.Module,
                  optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, ema: ModelEmaV3 | None = None, *,
                  extra: dict | None = None) -> None:
    """After an epoch: the checkpoint, ``log.csv`` and ``curves.png`` (a plotting problem only warns)."""
    save_checkpoint(out, cfg, species, state, net, optimizer, scaler, ema, extra=extra)
    write_log(out, state.history)
    try:
        plot_curves(out, state.history)
    except Exception as exc:  # noqa: BLE001 - a plotting problem must not stop training
        logger.warning("could not draw the curves in %s: %s", out, exc)


def restore_checkpoint(checkpoint: dict, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                       ema: ModelEmaV3 | None = None) -> TrainState:
    """Optimiser, scaler, EMA and RNG states from ``checkpoint`` (the net's weights are loaded before the EMA is
    made: ``checkpoint["net"]``); returns where the run stood."""
    if checkpoint.get("opt") is not None:
        optimizer.load_state_dict(checkpoint["opt"])
    if checkpoint.get("scaler") is not None:
        scaler.load_state_dict(checkpoint["scaler"])
    if ema is not None and checkpoint.get("ema") is not None:
        ema.load_state_dict(checkpoint["ema"])
    set_rng_state(checkpoint["rng"])
    return TrainState(
        epoch=checkpoint["epoch"], step=checkpoint["step"], seconds=checkpoint["seconds"],
        best_metric=checkpoint["best_metric"], best_epoch=checkpoint["best_epoch"],
        best_state=checkpoint["best_state"], best_row=checkpoint["best_row"], history=checkpoint["history"],
        start_state=checkpoint.get("start_state"), start_row=checkpoint.get("start_row") or {},
    )


def write_log(out: Path, history: list[dict]) -> None:
    """``OUT/log.csv``: one row an epoch (the union of the rows' columns, first row's order first)."""
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
    atomic_write(out / LOG, buf.getvalue())


def plot_curves(out: Path, history: list[dict]) -> None:
    """``OUT/curves.png``: train / val loss and val top-1 / macro-F1 by epoch."""
    from matplotlib.figure import Figure

    ep = [r["epoch"] for r in history]
    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    tr = [(r["epoch"], r["train_loss"]) for r in history if r.get("train_loss") not in (None, "")]
    if tr:
        ax1.plot(*zip(*tr, strict=True), marker="o", label="train loss")
    ax1.plot(ep, [r["val_loss"] for r in history], marker="o", label="val loss")
    nll = [(r["epoch"], r["val_nll"]) for r in history if r.get("val_nll") not in (None, "")]
    if nll:
        ax1.plot(*zip(*nll, strict=True), marker="o", label="val log-loss, temperature fitted")
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
    atomic_write(out / CURVES, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
