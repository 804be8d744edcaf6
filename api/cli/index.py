"""``speciesid index build|info|venom-advice|compact|sweep-uploads`` and ``speciesid species list|set-venom``."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from api.cli._common import (
    FORMAT_HELP,
    FORMATS,
    add_encoder_args,
    add_quiet,
    at_least,
    emit,
    emit_csv,
    emit_utf8,
    encoder_config,
    fmt_bool,
    interrupted_add,
    number_in,
    parse_yes_no,
    show_bars,
    to_csv,
    to_json,
)
from api.cli._finish import finished, held_summary, said_finished
from index.compaction import AUTO_PRUNE_AGE, UNVERIFIED_GRACE
from index.taxonomy import DISTINCT_OPTION, HARMLESS_RULE_HELP
from index.text import printable

if TYPE_CHECKING:
    from index.objects import StoredObject
    from index.store import CompactReport
    from retrieval.workflows import BuildResult


def register(sub: argparse._SubParsersAction) -> None:
    """Add the index and species command groups."""
    from index.datasets import DATASETS
    from index.vectors import KINDS

    p_index = sub.add_parser("index", help="build and inspect galleries")
    s_index = p_index.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    p = s_index.add_parser("build", help="embed a dataset into a gallery (LanceDB store + FAISS index)")
    p.add_argument("--dataset", required=True, choices=DATASETS, help="dataset layout of --root")
    p.add_argument("--root", required=True,
                   help="folder holding the photos (manifest: the image root, or the table itself; webdataset: "
                   "a shard, a folder of shards or a glob)")
    p.add_argument("--metadata", help="metadata CSV (required for snakeclef2021; rare-species: metadata.csv; "
                   "manifest: the CSV or parquet table: path, species [, genus, family, kingdom, phylum, class, "
                   "order, common_name, venomous, country])")
    p.add_argument("--index", required=True, metavar="DIR", help="gallery directory (created if new)")
    p.add_argument("--store", metavar="URI",
                   help="keep a new gallery's LanceDB table at an object-store URI (s3://bucket/path) that every "
                   "worker reaches; credentials and endpoint from AWS_* variables (AWS_ENDPOINT_URL for "
                   "S3-compatible servers)")
    p.add_argument("--new-store", action="store_true",
                   help="the gallery's store lost its table (the error of any command on it says so): start a new, "
                   "empty table there and add the photos; ids go on past the ones the folder knows were given. "
                   "Restoring the store from a backup instead keeps its references")
    p.add_argument("--engine", default="local", choices=("local", "ray"),
                   help="embed in this process (default) or on a Ray cluster (pip install 'speciesid[ray]')")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="with --engine ray: a running cluster (auto, HOST:6379, ray://HOST:10001); default: start "
                   "a local Ray")
    p.add_argument("--ray-actors", type=at_least(1), metavar="N",
                   help="with --engine ray: embedding actors (default: one per GPU, else 2 on a local Ray, or as "
                   "many as leave one CPU of the cluster free, at most 8)")
    p.add_argument("--ray-gpus-per-actor", type=number_in(0), metavar="G",
                   help="with --engine ray: GPUs per embedding actor, 0 or more (default 1 when the cluster has "
                   "GPUs)")
    p.add_argument("--chunk-rows", type=at_least(1), default=100_000, metavar="N",
                   help="with --engine ray: photos per commit (a crash loses at most one chunk; default 100000)")
    add_encoder_args(p, default_spec=None, builds=True)
    p.add_argument("--batch-size", type=at_least(1), default=32, help="images per forward pass (default 32)")
    p.add_argument("--workers", type=at_least(1), default=None,
                   help="decode threads (default: half the cores, at most 8)")
    p.add_argument("--index-kind", default=None, choices=KINDS,
                   help="FAISS index: exact flat, or approximate (auto: flat up to 50k references, IVF-PQ with an "
                   "exact re-rank above; see docs/scale.md). Default: a gallery's own kind, auto for a new one. The "
                   "index's other settings (lists, nprobe, candidates) are the \"index\" keys of DIR/gallery.json, "
                   "edited by hand and applied by the next 'index build' (docs/scale.md, Index settings)")
    p.add_argument("--clean", action="store_true",
                   help="after building, run the zero-shot filter (text-capable encoders) and exclude off-target "
                   "references (reversible: 'speciesid clean --restore'); report in DIR/clean-report")
    p.add_argument("--prompts", metavar="FILE", help="with --clean: prompt file or group (snakes, animals); "
                   "default from the dataset's taxon group")
    p.add_argument("--clean-threshold", type=number_in(0, 1, "(]"), default=0.5, metavar="P",
                   help="with --clean: off-target probability, in (0, 1], at which a reference is excluded "
                   "(default 0.5; an off-target class must also be more likely than every target class)")
    p.add_argument("--no-venom-advice", dest="venom_advice", action="store_const", const=False, default=None,
                   help="record in DIR/gallery.json that answers give no snakebite advice (a gallery of birds, "
                   "plants: not of snakes); without it a new gallery gives it (treat as venomous when unsure) and an "
                   "existing one keeps what it records ('speciesid index venom-advice' changes it); refused while "
                   "the dataset or gallery holds a species recorded medically important venomous")
    add_quiet(p)
    p.set_defaults(func=cmd_index_build)
    p = s_index.add_parser("info", help="print, as JSON, what a gallery holds (references, species, excluded "
                           "ones, index kind), which encoder built it, and its store (uri; leftover Ray build "
                           "journals; on S3 the write lease's holder and the shared id mark; store.fragments: how "
                           "many, how many small, the versions kept: 'speciesid index compact' merges them); build: "
                           "whether the last build into it completed, or was interrupted (run it again); "
                           "venom_advice: whether answers give snakebite advice ('index venom-advice'), with a note "
                           "when it may not be meant")
    p.add_argument("--index", required=True, metavar="DIR", help="gallery directory")
    p.set_defaults(func=cmd_index_info)
    p = s_index.add_parser(
        "venom-advice", help="turn a gallery's snakebite advice on or off (gallery.json), or print it",
        description="Whether answers advise on a bite (treat as venomous when the photo cannot be identified, or "
        "when a venomous species or one of unrecorded venom status is likely): on for every gallery unless "
        "recorded off, never guessed from species names. Turn it off for a gallery that is not of snakes (birds, "
        "plants); refused while a species is recorded medically important venomous. A running server follows the "
        "change at its next look at the gallery (docs/identification.md, 'Venom advice').")
    p.add_argument("state", nargs="?", choices=("on", "off"), metavar="on|off",
                   help="on or off; left out: print what the gallery records")
    p.add_argument("--index", required=True, metavar="DIR", help="gallery directory")
    p.set_defaults(func=cmd_index_venom_advice)
    register_sweep_uploads(s_index)
    register_compact(s_index)

    p_sp = sub.add_parser("species", help="species in a gallery")
    s_sp = p_sp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    p = s_sp.add_parser("list", help="print the gallery's species with their reference counts, common name, "
                        "family and venomous flag")
    p.add_argument("--index", required=True, metavar="DIR", help="gallery directory")
    p.add_argument("--format", default="table", choices=FORMATS, help=FORMAT_HELP)
    p.set_defaults(func=cmd_species_list)
    p = s_sp.add_parser("set-venom", help="set a gallery species' medically important venomous flag (no photo)",
                        description="Set whether a species the gallery holds is medically important venomous, on "
                        "every one of its references, with no photo to add: how a species of a folder build gets a "
                        "venom status. 'no' is refused for a species the shipped snake taxonomy records as venomous, "
                        f"and, unless {DISTINCT_OPTION}, for a name that may be one. "
                        "A species of no venom status counts as possibly venomous, whatever its name: record the "
                        "harmless ones of a mixed gallery (a toad beside a cobra) 'no' (docs/identification.md, "
                        "'Venom advice').")
    p.add_argument("species", metavar="SPECIES", help='a gallery species, e.g. "Bufo bufo" (any case; _ or - for '
                   "the space)")
    p.add_argument("venomous", metavar="yes|no", help="medically important venomous: yes or no")
    p.add_argument("--index", required=True, metavar="DIR", help="gallery directory")
    p.add_argument(DISTINCT_OPTION, action="store_true",
                   help=f"confirm 'no' for {HARMLESS_RULE_HELP}, which is refused without this")
    p.set_defaults(func=cmd_species_set_venom)


def cmd_index_build(args: argparse.Namespace) -> int:
    """speciesid index build: embed a dataset into a new or existing gallery (exit status)."""
    from retrieval.distributed import RayOptions
    from retrieval.workflows import CleanConfig, ReferencesInterrupted, build_gallery

    clean = CleanConfig(prompts=args.prompts, threshold=args.clean_threshold, duplicates=False) if args.clean else None
    ray = RayOptions(address=args.ray_address, actors=args.ray_actors, gpus_per_actor=args.ray_gpus_per_actor,
                     chunk_rows=args.chunk_rows, batch_size=args.batch_size)
    try:
        result = build_gallery(
            args.index, args.dataset, args.root, metadata=args.metadata, encoder=encoder_config(args),
            index_kind=args.index_kind, workers=args.workers,
            progress=show_bars(args), clean=clean, engine=args.engine, ray=ray, store=args.store,
            new_store=args.new_store, venom_advice=args.venom_advice,
        )
    except ReferencesInterrupted as exc:  # what was embedded is committed
        return interrupted_add(exc, args.index)
    # the build is done: a Ctrl-C does not cut its summary short (it reads the gallery: maybe a remote store)
    status, came = held_summary("build", lambda: _build_summary(args, result),
                                cut=" ('speciesid index info --index DIR' shows the gallery)")
    if status is None:  # a second Ctrl-C: its summary cut short
        return finished(130)
    if result.unread_species is None:  # a second Ctrl-C as the build's result was read
        said_finished("build", "; the summary above does not name the species none of whose photos could be used "
                      "(the second Ctrl-C stopped that look: the skipped photos' lines name them)")
    elif result.interrupted_after or came:
        said_finished("build")
    return finished(status)  # a Ctrl-C as the model and gallery are torn down keeps it


def _build_summary(args: argparse.Namespace, result: BuildResult) -> int:
    """Print what ``index build`` did (``result``); its exit status."""
    g = result.gallery
    # a resumed build's photos already in: expected, counted (listed at -v)
    quiet_stored = result.resumed and not getattr(args, "verbose", 0)
    conflicts = result.label_conflicts
    emit(
        f"gallery {g.root}: {len(g)} references, {len(g.species())} species, "
        f"encoder {g.encoder_spec}, {g.index.kind} index\n"
        f"{result.report.summary(list_stored=not quiet_stored, said_apart={c.photo for c in conflicts})}"
    )
    for c in conflicts[:10]:  # the same bytes under two species: not a plain duplicate
        emit(f"label conflict: {printable(c.line())}")
    if len(conflicts) > 10:
        emit(f"... and {len(conflicts) - 10} more label conflicts")
    if result.conflict_species:
        emit("species left with no photos, each of theirs stored under another species (the label conflicts "
             f"above): {printable(', '.join(result.conflict_species))}")
    for line in result.report.note_lines():  # photos stored from their first frame or page: said as an add says
        emit(f"note: {line}")
    if quiet_stored and (stored := len(result.report.already_stored)):
        emit(f"resumed the interrupted build: the {stored} photo{'s' * (stored != 1)} already in the gallery "
             "counted above, not listed (-v lists them)")
    if result.unread_species:
        emit("species with no usable photo, not in the gallery: " + ", ".join(
            f"{s} ({', '.join(f'{n} {kind}' for kind, n in kinds.items())})"
            for s, kinds in result.unread_species.items()))
    # the dataset's warnings (rows skipped, files missing) were logged on stderr as the scan found them: not twice
    if skipped := result.scan.skipped:  # named, with what to do, in the listing's one warning (stderr)
        emit(f"not read: {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} under {args.root} (broken links, "
             "link loops, devices or pipes, unreadable folders: see the warning above), besides the skipped photos "
             "counted above")
    if result.clean is not None:
        emit(result.clean.summary())
    from retrieval.workflows import venom_advice_note

    if note := venom_advice_note(g):  # a hint from the snake taxonomy: never turns anything off itself
        emit(f"note: {note}")
    if not len(g):  # nothing searchable: say so, and fail, rather than leave an empty gallery looking built
        sys.stderr.write(f"speciesid: error: gallery {g.root} has no searchable references: no photo could be "
                         "added" + (" or the cleaning excluded them all" if result.clean is not None else "")
                         + "; see the list above\n")
        return 1
    report, scan = result.report, result.scan
    if not report.added and not report.duplicates:
        # into a gallery that holds other photos: no photo of this build is in it, every one was unreadable. A re-run
        # whose photos are stored already (an unreadable one beside them or not) had nothing to add: that is 0
        from retrieval.workflows import skip_counts

        counts = skip_counts(reason for _, reason in report.skipped)  # read but refused (too small...) said so
        why = [f"{len(report.skipped)} photo(s) skipped (" + ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
               + ")"]
        if scan.skipped:
            why.append(f"{len(scan.skipped)} entr{'y' if len(scan.skipped) == 1 else 'ies'} could not be listed")
        sys.stderr.write(f"speciesid: error: nothing was added to gallery {g.root} from {args.root}: "
                         f"{', '.join(why)}; see the list above\n")
        return 1
    return 0


def cmd_index_info(args: argparse.Namespace) -> int:
    """speciesid index info: what a gallery holds and how it was built (exit status); 1 when its store could not
    be opened, after printing what the folder knows and the store's error."""
    from retrieval.workflows import gallery_info

    info = gallery_info(args.index)
    emit_utf8(to_json(info))
    error = (info.get("store") or {}).get("error")
    if error:  # the folder's facts are printed; the exit status says the store could not be read
        sys.stderr.write(f"speciesid: error: {error}\n")
        return 1
    return 0


def cmd_index_venom_advice(args: argparse.Namespace) -> int:
    """speciesid index venom-advice: record (or print) whether the gallery's answers give venom advice (exit
    status)."""
    from retrieval.workflows import set_venom_advice

    done = set_venom_advice(args.index, None if args.state is None else args.state == "on")
    state = "on" if done.now else "off"
    if args.state is None:
        emit(f"gallery {args.index}: venom advice {state}")
    elif done.was == done.now:
        emit(f"gallery {args.index}: venom advice already {state}: nothing changed")
    else:
        emit(f"gallery {args.index}: venom advice {'on' if done.was else 'off'} -> {state}")
    if done.note:
        emit(f"note: {done.note}")
    return 0


#: The units of --older-than and --prune-older-than (seconds each).
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _age(text: str) -> float:
    """An argparse ``type``: an age as ``NUMBER[s|m|h|d|w]`` (seconds when no unit), in seconds, 0 or more."""
    raw = text.strip().lower()
    unit = raw[-1] if raw[-1:] in _UNITS else "s"
    try:
        value = float(raw[:-1] if raw[-1:] in _UNITS else raw) * _UNITS[unit]
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not an age: give a number of seconds, or one with a unit "
                                         "(90s, 30m, 12h, 1d, 2w)")
    return value


def register_sweep_uploads(s_index: argparse._SubParsersAction) -> None:
    """Add ``speciesid index sweep-uploads``."""
    p = s_index.add_parser(
        "sweep-uploads",
        help="remove the photos kept for API uploads that no reference uses (an add cut off between keeping its "
        "photos and storing their rows, a removal that failed): on S3 the store's _speciesid/uploads/, and the "
        "folder's uploads/; only those older than --older-than, under the store's write lease. Only the names the "
        "API gives its uploads (<sha256><ext>) are taken: any other file there is left, and named")
    p.add_argument("--index", required=True, metavar="DIR", help="gallery directory")
    p.add_argument("--older-than", type=_age, default=86400.0, metavar="AGE",
                   help="only uploads at least this old (90s, 30m, 12h, 1d, 2w; default 1d): an add in progress "
                   "keeps its photos moments to minutes before it stores their rows, and they must not be taken "
                   "for orphans")
    p.add_argument("--dry-run", action="store_true", help="remove nothing: list what would be removed")
    add_quiet(p)
    p.set_defaults(func=cmd_index_sweep_uploads)


def cmd_index_sweep_uploads(args: argparse.Namespace) -> int:
    """speciesid index sweep-uploads: remove (or with --dry-run list) the unused uploads (exit status: 1 when some
    could not be removed, each printed with the reason)."""
    from index.photos import first_few
    from retrieval.workflows import sweep_uploads

    report = sweep_uploads(args.index, older_than_s=args.older_than, dry_run=args.dry_run, progress=show_bars(args))
    verb = "would remove" if report.dry_run else "removed"
    for o in report.orphans:
        emit(f"{verb} {o.uri} ({o.size} bytes, {o.age_s / 3600:.1f} h old)")
    if len(report.places) == 1:  # a store in the folder: the API keeps its uploads in the folder's uploads/
        emit(f"gallery {args.index} keeps its store in its folder: its uploads are files of {report.places[0]}, "
             "swept alone")
    n = len(report.orphans)
    emit(f"{verb} {n} unused upload{'s' * (n != 1)} ({report.bytes} bytes) from {', '.join(report.places)}; kept "
         f"{report.referenced} in use and {report.young} unused younger than {_age_text(report.older_than_s)}")
    if report.others:  # a stray file (notes.txt): not a name the API gives an upload, never removed
        emit(f"left {_not_uploads(report.others)} (an upload is named <sha256><ext>): "
             f"{first_few([printable(o.uri) for o in report.others])}")
    for o, why in report.failed:
        sys.stderr.write(f"speciesid: could not remove {printable(o.uri)}: {printable(why)}\n")
    if report.failed:
        n = len(report.failed)
        sys.stderr.write(f"speciesid: error: {n} unused upload{'s' * (n != 1)} not removed (above); they stay, "
                         f"harmless: fix what the lines above say, then run 'speciesid index sweep-uploads --index "
                         f"{args.index}' again\n")
        return 1
    return 0


def _not_uploads(others: Sequence[StoredObject]) -> str:
    """``1 file that is not an upload``, ``2 objects that are not uploads`` (``entries``: files and objects)."""
    n, on_s3 = len(others), sum(o.uri.startswith("s3://") for o in others)
    kind = "object" if on_s3 == n else "file" if not on_s3 else "entry"
    return f"1 {kind} that is not an upload" if n == 1 else \
        f"{n} {'entries' if kind == 'entry' else kind + 's'} that are not uploads"


def _age_text(seconds: float) -> str:
    """An age in the largest unit up to days that gives a whole number (7d, 1h; 0 s for none)."""
    if not seconds:
        return "0 s"
    for unit, size in sorted(((u, n) for u, n in _UNITS.items() if u != "w"), key=lambda u: -u[1]):  # 7d
        if seconds and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def cmd_species_set_venom(args: argparse.Namespace) -> int:
    """speciesid species set-venom: set a species' venomous flag on all its references (exit status)."""
    from retrieval.workflows import set_species_venomous

    done = set_species_venomous(args.index, args.species, parse_yes_no(args.venomous, "the venomous flag"),
                                distinct_from_venomous=args.distinct_from_venomous)
    references, now = f"{done.references} reference{'s' * (done.references != 1)}", fmt_bool(done.now)
    if not done.changed:
        emit(f"{done.species}: venomous already {now} ({references}): nothing changed")
    elif done.turned_off and done.was is not True:  # only excluded rows said yes: not "the others were already"
        emit(f"{done.species}: venomous {now} ({done.changed} of {references} set, {done.turned_off} of them "
             "recorded yes before: excluded references, harmless now once restored)")
    elif done.was == done.now:  # some rows said otherwise (no status, most often): not "no -> no"
        emit(f"{done.species}: venomous {now} ({done.changed} of {references} set; the others were already {now})")
    else:
        emit(f"{done.species}: venomous {fmt_bool(done.was)} -> {now} ({references})")
    return 0


def cmd_species_list(args: argparse.Namespace) -> int:
    """speciesid species list: the gallery's species with their reference counts (exit status)."""
    from retrieval.workflows import list_species

    fields = ["species", "common_name", "genus", "family", "venomous", "count"]
    species = [{f: getattr(s, f) for f in fields} for s in list_species(args.index)]
    if args.format == "json":
        emit_utf8(to_json(species))
    elif args.format == "csv":
        emit_csv(to_csv(species, fields))
    else:
        for s in species:
            common = f" ({s['common_name']})" if s["common_name"] else ""
            emit(f"{s['count']:6d}  {s['species']}{common}  [{s['family'] or '?'}]  "
                 f"venomous: {fmt_bool(s['venomous'])}")
        emit(f"{len(species)} species, {sum(s['count'] for s in species)} references")
        from retrieval.advice import species_notes

        for note in species_notes({s["species"]: s["count"] for s in species}):  # one species, or very uneven
            emit(f"note: {printable(note)}")
    return 0


def register_compact(s_index: argparse._SubParsersAction) -> None:
    """Add ``index compact`` (its --help ends with the writers' wait note: api.cli.WRITERS)."""
    p = s_index.add_parser(
        "compact", help="merge the small fragments of a gallery's store (each write makes one; reads slow down "
        "as they pile up) and delete its old versions; prints the store before and after",
        description="Merge the small fragments of the gallery's store (fewer than 8192 rows; bigger ones are never "
        "rewritten) and delete the store's versions superseded longer ago than --prune-older-than (never the "
        "latest), and bring its id / sha256 indexes over the rows added since (one more store version). A write "
        "does the merge itself when SPECIESID_COMPACT_FRAGMENTS small fragments pile up (default 32; 'index info' "
        "shows them).")
    p.add_argument("--index", required=True, metavar="DIR", help="gallery directory")
    p.add_argument("--prune-older-than", type=_age, default=DEFAULT_PRUNE_S, metavar="AGE",
                   help="delete the store's versions that stopped being the latest longer ago than this (the version "
                   "after them is that old), and the files only they use: 30s, 10m, 1h, 7d, or 0 for every version "
                   "but the latest (default 7d, as a write's own compaction); 0 on a local store with no build or "
                   "add running or journalled also deletes the files no version uses (a killed writer's), when none "
                   "was written in the last hour (else it keeps them all and says so). A "
                   "server or a copy of the folder elsewhere still reading a pruned version fails its next read of "
                   "it: prune closer than a few minutes only with every other reader and writer stopped")
    p.set_defaults(func=cmd_index_compact)


#: ``index compact``'s default --prune-older-than, seconds (the automatic compaction's age).
DEFAULT_PRUNE_S = AUTO_PRUNE_AGE.total_seconds()


def cmd_index_compact(args: argparse.Namespace) -> int:
    """speciesid index compact: merge the store's small fragments, prune old versions, say what changed (exit
    status)."""
    from retrieval.workflows import compact_gallery

    result = compact_gallery(args.index, prune_older_than=dt.timedelta(seconds=args.prune_older_than))
    before, after, report = result.before, result.after, result.report
    emit(f"gallery {result.gallery.root}: store {result.gallery.store_uri}\n"
         f"  fragments: {before.fragments} -> {after.fragments} (small: {before.small} -> {after.small}; "
         f"{report.fragments_rewritten} merged)\n"
         f"  versions: {_kept(before.versions, after.versions)}{report.version_after - report.version_before} "
         f"made by this compaction, {report.versions_removed} superseded over {_age_text(args.prune_older_than)} "
         f"ago pruned, {report.bytes_removed / 1e6:.1f} MB deleted)\n"
         f"  store version: {report.version_before} -> {report.version_after}")
    unused = _unused_line(report) if args.prune_older_than == 0 else ""
    if unused:
        emit(unused)
    return 0


def _unused_line(report: CompactReport) -> str:
    """The line of a zero-age prune on the files no version uses (a killed writer's): deleted, or why kept."""
    if report.unused_kept_because:
        return f"  unused files of killed writers (if any): kept: {report.unused_kept_because}"
    if report.unused_kept:
        return (f"  {report.unused_kept} unused file(s) kept, one written in the last "
                f"{_age_text(UNVERIFIED_GRACE.total_seconds())}: a writer may still commit them; run again later")
    if report.unused_deleted:
        return f"  unused files of killed writers: {report.unused_deleted} deleted"
    return ""


def _kept(before: int | None, after: int | None) -> str:
    """'N -> M (' of the versions kept, or '(not counted on an object store; ' where they were not counted."""
    return "(not counted on an object store; " if before is None or after is None else f"{before} -> {after} ("
