"""What an evaluation measured: which photos chose which settings, and which evaluated photos the gallery holds.

``speciesid evaluate`` reports it beside its figures (issue 14): accuracy is only "on unseen photos" when the
evaluated photos neither chose the settings (C, k, T, blend weight, unknown threshold), nor trained a network
fine-tuned here, nor sit in the gallery (same bytes, or a near-copy: cosine >=
``retrieval.findings.DEFAULT_DUP_THRESHOLD``, the ``speciesid clean`` leak rule). Photos are matched by content
(sha256): against the digests recorded when they chose or trained (the probe's ``Calibration.selection_sha256``, a
run's photo lists), else against a folder's photos.

Importing this module does not load the gallery's store (LanceDB): fine-tuning reads its names, and forks loader
workers, which LanceDB's runtime threads do not survive.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval.probe import LinearProbe, net_change

if TYPE_CHECKING:  # not at run time: it loads the store (see above)
    from index.gallery import Gallery
    from retrieval.encoders import Encoder

logger = logging.getLogger(__name__)

#: In a ``speciesid finetune`` output: the training photos held out to choose the epoch (path, species, sha256).
HELDOUT_FILE = "heldout.csv"
#: In a ``speciesid finetune`` output: its --val-root photos, which chose the epoch (path, species, sha256).
VAL_FILE = "validation.csv"
#: In a ``speciesid finetune`` output: the photos the network trained on (path, species, sha256).
TRAINED_FILE = "trained.csv"
#: ``Calibration.selected_on`` prefix (after "val:") of settings chosen on a fine-tuning run's held-out photos.
HELDOUT_PREFIX = "heldout:"
#: A fine-tuning run's ``val_source`` (its config.json): ``VAL_SOURCE + FOLDER`` (--val-root), or
#: ``SPLIT_SOURCE + FRACTION`` (photos held out of its training photos).
VAL_SOURCE = "val:"
SPLIT_SOURCE = "split:"


@dataclass
class Protocol:
    """How the settings were chosen and how the evaluated photos relate to the gallery."""

    settings: str  # where the blend settings come from, in words
    evaluated_chose_settings: bool  # the evaluated photos themselves chose settings (the figures over-state)
    duplicates: list[int] = field(default_factory=list)  # positions of evaluated photos the gallery holds
    duplicate_kinds: dict[str, int] = field(default_factory=dict)  # "same bytes" / "near-copy" -> count
    excluded: bool = True  # duplicates left out of the figures
    size: str | None = None  # what chose a network fine-tuned here (its epoch, its input size), in words
    trained: list[int] | None = None  # positions of evaluated photos that trained the network (None: not known)
    trained_from: str = ""  # the lists of the network's training photos, in words ("" = not fine-tuned here)
    trained_complete: bool = True  # every run of the network listed its photos (False: some cannot be told)
    embedded: str = ""  # what embedded the evaluated photos, in words (:func:`embedding_text`; "" = not said)

    @property
    def trained_counted(self) -> int:
        """Evaluated photos that trained the network and are counted in the figures."""
        if not self.trained:
            return 0
        return len(set(self.trained) - set(self.duplicates)) if self.excluded else len(self.trained)

    @property
    def unseen(self) -> bool:
        """Whether the figures are on unseen photos: none of those counted chose the settings, trained the network
        or sits in the gallery. Not when some of the network's runs did not list their photos: those cannot be
        told."""
        return not (self.evaluated_chose_settings or self.trained_counted or (self.duplicates and not self.excluded)
                    or (self.trained_from and (self.trained is None or not self.trained_complete)))

    def lines(self) -> list[str]:
        """The report's protocol lines."""
        out = [f"embedded with: {self.embedded}"] if self.embedded else []
        out += [f"settings: {self.settings}"] + ([f"network: {self.size}"] if self.size else [])
        out.append("evaluated photos used to choose settings: " + (
            "YES: these figures over-state accuracy on unseen photos" if self.evaluated_chose_settings else "no"))
        if self.trained_from:
            out.append(self._trained_line())
        dup = f"evaluated photos already in the gallery: {len(self.duplicates)} ({kinds_text(self.duplicate_kinds)})"
        if self.duplicates:
            dup += ("; left out of the figures (--keep-duplicates to count them)" if self.excluded
                    else "; counted in the figures (they over-state accuracy)")
        out.append(dup)
        return out

    def _trained_line(self) -> str:
        """How many evaluated photos trained the network fine-tuned here, and whether the figures count them."""
        if self.trained is None:
            return (f"network training photos: not recorded, {self.trained_from}; evaluated photos that trained "
                    "the network cannot be told from unseen ones")
        line = (f"network training photos: {len(self.trained)} of the evaluated photos trained the network "
                f"(matched by content: {self.trained_from})")
        if not self.trained_complete:
            line += ("; evaluated photos that trained the runs not listed cannot be told from unseen ones, so these "
                     "figures are not called unseen")
        if self.trained_counted:
            line += (f"; {self.trained_counted} counted in the figures: these figures over-state accuracy on unseen "
                     "photos")
        elif self.trained:
            line += "; all left out of the figures as gallery photos"
        return line


def embedding_setup(encoder: Encoder) -> dict[str, str]:
    """What embedded an evaluation's photos (or a gallery's references: :func:`record_embedding`): runtime,
    precision, device and, on a CPU, its kind and model (the figures depend on them: docs/accuracy.md)."""
    from retrieval.cpu import cpu_kind, cpu_model

    device = str(encoder.device)
    out = {"runtime": str(encoder.runtime), "precision": str(encoder.precision), "device": device}
    if not device.startswith("cuda"):
        out.update(cpu_kind=cpu_kind(), cpu=cpu_model())
    return out


def embedding_text(setup: Mapping[str, str]) -> str:
    """:func:`embedding_setup` in words: 'openvino bf16 on the CPU (kind amx, Intel(R) Xeon(R) ...)'."""
    where = f"the CPU (kind {setup['cpu_kind']}, {setup['cpu']})" if "cpu_kind" in setup else setup["device"]
    return f"{setup['runtime']} {setup['precision']} on {where}"


#: ``gallery.json``'s record of what embedded the gallery's references (:func:`record_embedding`), and ``index
#: info``'s: one entry per setup, ``{runtime, precision, device[, cpu_kind, cpu], by, since}``.
EMBEDDED_KEY = "embedded_by"
#: Who embeds references (an entry's ``by``).
BUILD_WRITER, ADD_WRITER, API_WRITER = "index build", "references add", "API add"
#: The entry of the references a gallery held when it first recorded what embeds them (made by an earlier speciesid,
#: or built on Ray): runtime and precision unknown, with how many there were (``references``).
UNRECORDED = "unknown"
EARLIER_WRITER = "an earlier speciesid or a build on Ray"
#: How to get back the answers given before the upgrade of a gallery that records no runtime.
#: What a speciesid before runtimes (0.1.0, until 091b4a4) embedded with, its ``auto`` precision (130e2dd's
#: retrieval/encoders.py ``_pick_dtype``): bf16 on a CUDA GPU for every encoder (fp16 without bf16); on a CPU, bf16
#: for an open_clip encoder (BioCLIP, CLIP) where the CPU has native bf16, else fp32 (every timm model).
_REPRODUCE = ("to reproduce the earlier answers, query with the runtime and precision those references were "
              "embedded with (by a speciesid before runtimes: --runtime torch and the precision its auto chose: on "
              "a GPU --precision bf16 for any encoder, fp16 on a GPU without bf16; on a CPU --precision bf16 for an "
              "open_clip encoder such as BioCLIP where the CPU has native bf16, else fp32, timm models included), "
              "or embed them all again: speciesid index build into a new folder (docs/runtimes.md)")


def _same_setup(entry: Mapping[str, object], setup: Mapping[str, str]) -> bool:
    return all(entry.get(k) == v for k, v in setup.items()) and not (
        {"cpu_kind", "cpu"} & entry.keys() - setup.keys())


def _unrecorded(entry: Mapping[str, object]) -> bool:
    return entry.get("runtime") == UNRECORDED


def record_embedding(gallery: Gallery, encoder: Encoder, writer: str) -> None:
    """Record in the gallery's ``gallery.json`` (:data:`EMBEDDED_KEY`) that ``writer`` (:data:`BUILD_WRITER`,
    :data:`ADD_WRITER`, :data:`API_WRITER`) embeds references with ``encoder``'s setup (:func:`embedding_setup`):
    one entry per setup, with the writers that used it and when it was first recorded. The first entry of a gallery
    that holds references already (made by an earlier speciesid, or built on Ray) comes with an :data:`UNRECORDED`
    one for those: the new setup is not claimed for them. Called before a writer commits its rows; nothing is
    written when the record as last read names that writer for that setup already (a server's adds cost no file
    write after its first), and a failure is logged, never raised (a record must not fail a write)."""
    setup = embedding_setup(encoder)

    def named(entries: object) -> bool:
        return isinstance(entries, list) and any(
            isinstance(e, dict) and _same_setup(e, setup) and writer in (e.get("by") or ()) for e in entries)

    def update(entries: object) -> list[dict]:
        kept = [dict(e) for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
        for entry in kept:
            if _same_setup(entry, setup):
                by = entry.get("by")
                entry["by"] = sorted({*(by if isinstance(by, list) else []), writer})
                return kept
        since = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        if not kept and held != 0:  # references embedded before anything was recorded: theirs is unknown
            kept = [{"runtime": UNRECORDED, "precision": UNRECORDED, "device": UNRECORDED, "references": held,
                     "by": [EARLIER_WRITER], "since": since}]
        return [*kept, {**setup, "by": [writer], "since": since}]

    if named(gallery.info.get(EMBEDDED_KEY)):
        return
    held: int | None = 0
    if not recorded_embedding(gallery.info):
        try:
            held = len(gallery)  # before this writer's rows
        except Exception as exc:  # noqa: BLE001 - a store that cannot count: some, how many unknown
            logger.debug("gallery %s: references not counted (%s)", gallery.root, exc)
            held = None
    try:
        gallery.update_info(EMBEDDED_KEY, update)
    except (OSError, ValueError, TimeoutError) as exc:
        logger.warning("gallery %s: what embedded its references was not recorded in gallery.json: %s", gallery.root,
                       exc)


def recorded_embedding(info: Mapping[str, object]) -> list[dict]:
    """The entries of ``gallery.json`` (``info``) on what embedded its references (:func:`record_embedding`); []
    for a gallery that records none (made before it was recorded, or built on Ray only)."""
    entries = info.get(EMBEDDED_KEY)
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def unrecorded_note(info: Mapping[str, object], references: int | None = None) -> str:
    """The note of a gallery (``gallery.json``: ``info``) holding references (``references``; None: not known,
    taken as some) that records nothing on what embedded them (:func:`record_embedding`), "" otherwise: what
    ``index info`` says beside its empty ``embedded_by``."""
    if EMBEDDED_KEY in info or references == 0:  # recorded since the gallery was made ([]: nothing yet, or Ray)
        return ""
    return _not_recorded("")


def _not_recorded(queries: str) -> str:
    """The note of a gallery made before it recorded what embeds its references, ``queries``: what embeds the
    photos asked about, in words ("" for none)."""
    return (f"the gallery does not record the runtime and precision that embedded its references (it was made by an "
            f"earlier speciesid, which did not record them){queries}: similarities differ slightly between runtimes "
            "and precisions, so answers may differ slightly from the ones given before speciesid was upgraded; "
            + _REPRODUCE)


def embedding_info(info: Mapping[str, object], references: int | None = None) -> dict[str, object]:
    """``index info``'s ``embedded_by`` (:func:`recorded_embedding`), with ``embedded_note`` when nothing is
    recorded for the references the gallery holds (:func:`unrecorded_note`)."""
    note = unrecorded_note(info, references)
    return {EMBEDDED_KEY: recorded_embedding(info), **({"embedded_note": note} if note else {})}


def _setup_words(entry: Mapping[str, object]) -> str:
    if _unrecorded(entry):
        return f"a runtime and precision not recorded ({entry.get('references') or '?'} references, {EARLIER_WRITER})"
    device = str(entry.get("device", ""))
    return f"{entry.get('runtime')} {entry.get('precision')}" + (f" on {device}" if device.startswith("cuda") else "")


def embedding_note(info: Mapping[str, object], encoder: Encoder, *, queries: str = "these photos",
                   references: int | None = None) -> str:
    """The note of photos (``queries``, in words) embedded with ``encoder``'s runtime or precision where it is not
    the gallery's references', as ``gallery.json`` (``info``) records them (:func:`record_embedding`); "" when they
    agree. References whose setup is not recorded (a gallery made by an earlier speciesid: none recorded, or an
    :data:`UNRECORDED` entry) are never taken to agree, and the note says how to get the earlier answers back;
    ``references``: how many the gallery holds (0: no note for a gallery that records nothing; None: not known)."""
    entries = recorded_embedding(info)
    setup = embedding_setup(encoder)
    mine = (setup["runtime"], setup["precision"])
    if not entries:
        return "" if references == 0 or EMBEDDED_KEY in info else _not_recorded(
            f", {queries} are embedded with {_setup_words(setup)}")
    if all((e.get("runtime"), e.get("precision")) == mine and not _unrecorded(e) for e in entries):
        return ""
    refs = " and ".join(dict.fromkeys(_setup_words(e) + ("" if _unrecorded(e) else
                                                         f" ({', '.join(map(str, e.get('by') or ['?']))})")
                                      for e in entries))
    return (f"the gallery's references were embedded with {refs}, {queries} with {_setup_words(setup)}: "
            "similarities differ slightly between runtimes and precisions, so an answer near a threshold may differ "
            "from one for photos embedded like the references"
            + (f"; {_REPRODUCE}" if any(map(_unrecorded, entries)) else " (docs/runtimes.md)"))


def kinds_text(kinds: dict[str, int]) -> str:
    """"1 same bytes, 3 near-copy" (or "none"): how photos the gallery holds are held (:func:`find_duplicates`)."""
    return ", ".join(f"{n} {k}" for k, n in kinds.items() if n) or "none"


def same_folder(a: str | Path | None, b: str | Path | None) -> bool:
    """Whether ``a`` and ``b`` name one folder (``index.sources.absolute_path``; False when either is None or
    cannot be resolved)."""
    from index.sources import absolute_path

    if a is None or b is None:
        return False
    try:
        return absolute_path(a) == absolute_path(b)
    except OSError:
        return False


def evaluated_among(folder: str | Path, evaluated: Sequence[str | None]) -> int:
    """How many of the evaluated photos (their sha256) are among the photos under ``folder``, by content: a copy,
    a subset or a parent of the folder, reached by any path, counts (0 when the folder is gone)."""
    wanted = [d for d in evaluated if d]
    if not wanted or not Path(folder).is_dir():
        return 0
    there = _digests_under(str(Path(folder).resolve()), Path(folder).stat().st_mtime_ns)
    return sum(d in there for d in wanted)


@functools.lru_cache(maxsize=8)
def _digests_under(folder: str, mtime_ns: int) -> frozenset[str]:
    """The sha256 of every photo under ``folder``, read once per state of the folder (``mtime_ns``: the settings'
    and the network's origins are often the same --val-root folder)."""
    from index.photos import find_photos
    from retrieval.images import sha256_file

    return frozenset(d for d in map(sha256_file, find_photos(folder)) if d)


def _photos_at(folder: str, root: str | Path, evaluated: Sequence[str | None] = (),
               recorded: frozenset[str] | None = None) -> tuple[str, bool]:
    """("FOLDER (N of the evaluated photos are among them)", "FOLDER (not the evaluated photos)" or "FOLDER = the
    evaluated photos", whether the evaluated photos are among them): by the digests ``recorded`` when the photos
    chose; for a record from before those, by the folder's path, then by the photos in it now (which says so)."""
    if recorded is not None:
        n = sum(d in recorded for d in evaluated if d)
        return (f"{folder} ({n} of the evaluated photos are among them)", True) if n else (
            folder + " (not the evaluated photos)", False)
    if same_folder(folder, root):
        return folder + " = the evaluated photos", True
    if not Path(folder).is_dir():
        return (f"{folder} (gone, and their digests were not recorded when they chose: whether the evaluated photos "
                "are among them cannot be told)"), False
    n = evaluated_among(folder, evaluated)
    now = "; matched by the photos in that folder now: their digests were not recorded when they chose"
    if n:
        return f"{folder} ({n} of the evaluated photos are among them{now})", True
    return f"{folder} (not the evaluated photos{now})", False


def settings_origin(probe: LinearProbe | None, root: str | Path, overridden: bool = False,
                    evaluated: Sequence[str | None] = (), gallery_size: int | None = None,
                    gallery_species: Mapping[str, int] | None = None) -> tuple[str, bool]:
    """(where the settings come from, whether the evaluated photos at ``root`` (``evaluated``: their sha256) chose
    them). ``gallery_size``: the gallery's references now, to say when a probe trained here was trained on others;
    ``gallery_species`` (species -> references now), to say how the gallery moved on since (it replaces the size)."""
    if probe is None:
        if overridden:
            return "kNN only: k, T and the unknown threshold set on the command line (nothing was chosen)", False
        return "kNN only: k, T and the unknown threshold are defaults (nothing was chosen)", False
    cal = probe.calibration
    rule = f", rule {cal.rule}" if cal.rule else ""
    trained = "" if probe.source else f"C={cal.C:g} "  # a fine-tuned head has no C of ours
    chosen = f"{trained}kNN metric={cal.metric} k={cal.k} T={cal.temperature:g} blend weight={cal.blend_weight:g}"
    rule += (f" (blend weight {cal.weight_fixed})" if cal.weight_fixed else "")
    head = f"the fine-tuned head of {probe.source.removeprefix('finetune:')}; " if probe.source else ""
    extra = "; k/T/threshold overridden on the command line" if overridden else ""
    if gallery_species is not None:
        moved = probe.out_of_date(gallery_species)
        extra += f"; {moved}" if moved else ""
    elif gallery_size is not None and (moved := net_change(probe, gallery_size)) is not None and moved.stale:
        extra += f"; {moved.moved()} (retrain: speciesid probe train)"
    where = cal.selected_on
    if where.startswith("val:" + HELDOUT_PREFIX):
        return (f"{head}{chosen}, chosen on the photos the fine-tuning run held out of its training photos "
                f"({where.removeprefix('val:' + HELDOUT_PREFIX)}; the head never trained on them, not the evaluated "
                f"photos){rule}{extra}"), False
    if where.startswith("cv:"):
        folds, _, note = where[3:].partition(" (")  # "5-fold (head fixed; ...)": the note after the phrase
        note = f" ({note}" if note else ""
        return f"{head}{chosen}, chosen by {folds} cross-validation inside the gallery{note}{rule}{extra}", False
    if where.startswith("val:"):
        recorded = frozenset(cal.selection_sha256) if cal.selection_sha256 else None  # None: an older probe
        photos, same = _photos_at(where[4:], root, evaluated, recorded)
        return f"{head}{chosen}, chosen on the validation photos {photos}{rule}{extra}", same
    return f"{head}{chosen}, defaults (nothing was chosen){extra}", False


def run_record(spec: str) -> dict:
    """What a network fine-tuned here recorded of its run (``speciesid`` in its config.json; {} for other specs)."""
    from retrieval.encoders import FINETUNE_RECORD, local_timm_config, parse_spec

    return (local_timm_config(parse_spec(spec)) or {}).get(FINETUNE_RECORD) or {}


#: In a fine-tuning run's config.json ``speciesid`` block: its ``TRAINED_FILE`` carries the photos that trained
#: the runs it started from (``carried``: their folders) and names those whose photos could not be listed
#: (``unlisted``, in words), so that nothing older need be read.
LINEAGE_KEY = "trained_lineage"


@dataclass
class RunChain:
    """A network fine-tuned here and the runs it started from (its ``init``, and so on), newest first."""

    runs: list[tuple[Path, dict]] = field(default_factory=list)  # (folder, its config.json ``speciesid`` block)
    lost: str | None = None  # the ``init`` the oldest run read recorded, whose folder cannot be read now

    @property
    def folders(self) -> list[Path]:
        return [folder for folder, _ in self.runs]


def _names_folder(spec: str) -> bool:
    """Whether ``spec`` names a folder a run fine-tuned here could be in: a ``local-dir:`` one, but not an open_clip
    one (``speciesid finetune`` trains timm networks only)."""
    from retrieval.encoders import local_folder

    return local_folder(spec) is not None and not spec.startswith("open_clip:")


def run_chain(spec: str) -> RunChain:
    """The runs a network fine-tuned here comes from, followed through each run's recorded ``init`` while it is a
    run of ours; a recorded ``init`` folder that cannot be read any more (moved, deleted) is ``lost``: the photos
    that trained it cannot be known from it. Empty for every other encoder."""
    from retrieval.encoders import local_timm_config, parse_spec

    chain = RunChain()
    seen: set[str] = set()
    while spec and spec not in seen:
        seen.add(spec)
        try:
            parsed = parse_spec(spec)
        except ValueError:  # "local-dir:DIR" of a folder without config.json
            if chain.runs and _names_folder(spec):
                chain.lost = spec
            break
        run = run_record(spec)
        if not run:
            if chain.runs and parsed.source == "local-dir" and local_timm_config(parsed) is None:
                chain.lost = spec
            break
        chain.runs.append((Path(parsed.name), run))
        spec = str(run.get("init") or "")
    return chain


def read_photo_list(folder: str | Path, name: str) -> list[dict[str, str]] | None:
    """The rows of a photo list a fine-tuning run wrote into ``folder`` (``TRAINED_FILE``, ``VAL_FILE``,
    ``HELDOUT_FILE``); None when the run wrote no such file."""
    import csv

    path = Path(folder) / name
    if not path.is_file():
        return None
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def listed_digests(folder: str | Path, name: str) -> frozenset[str] | None:
    """The sha256 column of a photo list a fine-tuning run wrote into ``folder`` (:func:`read_photo_list`); None
    when the run wrote no such file."""
    rows = read_photo_list(folder, name)
    return None if rows is None else frozenset(row["sha256"] for row in rows if row.get("sha256"))


def _unlisted(folder: Path) -> str:
    return f"the run in {folder} listed none (fine-tuned before {TRAINED_FILE} was written)"


def _lost(chain: RunChain) -> list[str]:
    if chain.lost is None:
        return []
    return [f"the run {chain.folders[-1]} started from, {chain.lost}, cannot be read (moved or deleted), so the "
            "photos that trained it are not known"]


def _chain_lists(chain: RunChain) -> tuple[list[tuple[Path, list[dict[str, str]]]], list[str]]:
    """The ``TRAINED_FILE`` rows of each run in ``chain`` that wrote one, newest first, and, in words, the runs
    whose photos could not be listed. A list that carried its own chain (:data:`LINEAGE_KEY`) ends the reading:
    nothing older is read."""
    listed: list[tuple[Path, list[dict[str, str]]]] = []
    unlisted: list[str] = []
    for folder, run in chain.runs:
        rows = read_photo_list(folder, TRAINED_FILE)
        if rows is None:
            unlisted.append(_unlisted(folder))
        else:
            listed.append((folder, rows))
        if LINEAGE_KEY in run:
            return listed, unlisted + list(run[LINEAGE_KEY].get("unlisted") or [])
    return listed, unlisted + _lost(chain)


def inherited_training(init: str) -> tuple[list[list[str]], list[str]]:
    """What a new run starting from ``init`` records of the photos that trained the runs ``init`` comes from (a
    run of ours, its own ``init``, and so on): rows (path, species, sha256, run folder) of their
    ``TRAINED_FILE``, and, in words, the runs whose photos could not be listed (:func:`_chain_lists`)."""
    listed, unlisted = _chain_lists(run_chain(init))
    rows = [[row.get("path", ""), row.get("species", ""), row.get("sha256", ""), row.get("run") or str(folder)]
            for folder, found in listed for row in found]
    return rows, unlisted


def network_trained(spec: str, sha256: Sequence[str | None],
                    positions: Sequence[int]) -> tuple[list[int] | None, str, bool]:
    """(the evaluated photos (``positions`` into ``sha256``) that trained a network fine-tuned here, or the runs it
    started from, matched by content against their ``TRAINED_FILE``; None when no run listed them; where they
    were listed, in words: "" for every other encoder; whether every run's photos were listed: False when a run
    listed none, or a run it started from cannot be read any more, and evaluated photos that trained that one
    cannot be told from unseen ones)."""
    chain = run_chain(spec)
    if not chain.runs:
        return None, "", True
    listed, unlisted = _chain_lists(chain)
    missing = "; ".join(unlisted)
    if not listed:
        return None, missing, False
    trained = {row["sha256"] for _, rows in listed for row in rows if row.get("sha256")}
    where = ", ".join(str(folder / TRAINED_FILE) for folder, _ in listed) + (f"; {missing}" if missing else "")
    return [i for i in positions if sha256[i] in trained], where, not unlisted


def run_val_root(run: dict) -> str | None:
    """The --val-root folder a fine-tuning run chose its epoch and test size on (None: its own held-out photos)."""
    source = str(run.get("val_source", ""))
    return source.removeprefix(VAL_SOURCE) if source.startswith(VAL_SOURCE) else None


def size_origin(encoder: Encoder, root: str | Path, evaluated: Sequence[str | None] = ()) -> tuple[str | None, bool]:
    """(what chose a network fine-tuned here, whether the evaluated photos at ``root`` did): its run chose the epoch
    kept and, when it embeds at another side, the test size (``finetune.engine.choose_test_size``) on its --val-root
    photos or on photos it held out of its training photos; (None, False) for every other encoder."""
    from retrieval.encoders import parse_spec

    run = run_record(encoder.spec)
    if not run.get("val_source"):
        return None, False
    size = getattr(encoder, "test_size", None)
    what = f"the epoch kept and the input size ({size} px)" if size else "the epoch kept"
    photos = (run.get("test_size") or {}).get("photos")
    count = f"{photos} " if photos else ""
    folder = Path(parse_spec(encoder.spec).name)  # the run's own folder (run_record found it there)
    val_root = run_val_root(run)
    if val_root is not None:
        where, same = _photos_at(val_root, root, evaluated, listed_digests(folder, VAL_FILE))
        return f"{what}, chosen by the fine-tuning run on the {count}validation photos {where}", same
    held = listed_digests(folder, HELDOUT_FILE) or frozenset()
    n = sum(d in held for d in evaluated if d)
    if n:
        return (f"{what}, chosen by the fine-tuning run on the {count}photos it held out of its training photos "
                f"({n} of the evaluated photos are among them, {folder / HELDOUT_FILE})"), True
    return (f"{what}, chosen by the fine-tuning run on the {count}photos it held out of its training photos (not "
            "the evaluated photos)"), False


def without_copies(positions: Sequence[int], dups: Sequence[int], refusal: str) -> list[int]:
    """``positions`` less the gallery's copies ``dups`` (:func:`find_duplicates`); ValueError(``refusal``) when
    none is left."""
    held = set(dups)
    kept = [i for i in positions if i not in held]
    if not kept:
        raise ValueError(refusal)
    return kept


def find_duplicates(gallery: Gallery, sha256: Sequence[str | None], embeddings: np.ndarray,
                    positions: Sequence[int]) -> tuple[list[int], dict[str, int]]:
    """Evaluated photos (``positions`` into ``sha256``; ``embeddings`` row per position) that the gallery holds."""
    from retrieval.findings import DEFAULT_DUP_THRESHOLD  # the clean leak rule (here: it loads the store)

    found = gallery.store.find_sha256([sha256[i] for i in positions if sha256[i]])
    same = [i for i in positions if sha256[i] in found]
    near: list[int] = []
    rest = [j for j, i in enumerate(positions) if sha256[i] not in found]
    if rest and len(gallery):
        for j, hits in zip(rest, gallery.search(embeddings[rest], 1), strict=True):
            if hits and hits[0].similarity >= DEFAULT_DUP_THRESHOLD:
                near.append(positions[j])
    return sorted(same + near), {"same bytes": len(same), "near-copy": len(near)}


def heldout_positions(gallery: Gallery, ids: np.ndarray, from_dir: str | Path) -> np.ndarray | None:
    """Positions in ``ids`` (gallery rows) of the photos a fine-tuning run held out (its ``heldout.csv``), matched
    by content (sha256); None when the run wrote no such file (it had a --val-root) or the gallery holds none."""
    digests = listed_digests(from_dir, HELDOUT_FILE)
    if digests is None:
        return None
    found = set(gallery.store.find_sha256(digests).values())
    pos = np.flatnonzero(np.isin(ids, sorted(found)))
    return pos if len(pos) else None
