"""``speciesid references add|delete``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from api.cli._common import (
    WEIGHTS_HELP,
    add_quiet,
    add_runtime_args,
    at_least,
    emit,
    encoder_config,
    id_runs,
    interrupted_add,
    parse_yes_no,
    photo_args,
    show_bars,
    spec_help,
)
from api.cli._finish import finished, held_summary, said_finished
from index.text import printable

if TYPE_CHECKING:
    from retrieval.workflows import AddResult


def register(sub: argparse._SubParsersAction) -> None:
    """Add the references command group."""
    from index.taxonomy import DISTINCT_OPTION, HARMLESS_RULE_HELP
    from retrieval.findings import DEFAULT_DUP_THRESHOLD  # the copy rule of speciesid clean

    p_ref = sub.add_parser("references", help="add or delete reference photos")
    s_ref = p_ref.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    p = s_ref.add_parser("add", help="add reference photos of a species (created if new); no retraining",
                         description="Add reference photos of a species (created if new); no retraining. Photos "
                         "already stored are not stored again; a photo that nearly copies a reference held (the "
                         f"same photo re-encoded or re-cropped, cosine >= {DEFAULT_DUP_THRESHOLD:g}) is added, with a "
                         "note naming that "
                         "reference. Exit status 1 when a photo was unreadable or is already a reference of another "
                         "species (the other photos are added).")
    p.add_argument("images", nargs="+", metavar="IMG", help="photo files or folders")
    p.add_argument("--index", required=True, metavar="DIR", help="gallery directory")
    p.add_argument("--species", required=True, help='binomial, e.g. "Naja haje" or "Parus major"')
    p.add_argument("--common-name", help="English common name")
    p.add_argument("--venomous", help="yes or no: medically important venomous (default: the gallery species' flag, "
                   "else the taxonomy's). A species is venomous while any of its references says so, until "
                   "'speciesid species set-venom' sets them all")
    p.add_argument("--genus", help="genus (default: first word of --species)")
    p.add_argument("--family", help="family (default: from the snake taxonomy when known, or from the genus)")
    p.add_argument("--new-species", action="store_true",
                   help="confirm that --species is a new species although it looks like a gallery species (a "
                   "near-spelling of one, or its common name) or a species of the shipped snake taxonomy (a "
                   "near-spelling of one: 'Naja nivae' for 'Naja nivea'), or is not written as a scientific name "
                   "('Genus species': a label such as 'cats'), which is refused without this")
    p.add_argument(DISTINCT_OPTION, action="store_true",
                   help=f"confirm --venomous no for {HARMLESS_RULE_HELP}, which is refused without this")
    p.add_argument("--encoder", default=None, metavar="SPEC", help=spec_help(": the gallery's encoder"))
    p.add_argument("--weights", default=None, metavar="FILE", help=WEIGHTS_HELP + "; default: the gallery's weights")
    add_runtime_args(p)
    add_quiet(p)
    p.set_defaults(func=cmd_references_add)
    p = s_ref.add_parser("delete", help="delete reference photos by id",
                         description="Delete references for good (to leave one out reversibly, use 'speciesid clean "
                         "--apply'). Ids are those 'references add', 'search' and 'identify --format json' print. "
                         "An uploaded photo kept by the server goes with its last reference. Exit status 1 when an "
                         "id is not in the gallery.")
    p.add_argument("ids", nargs="+", type=at_least(0, 2**62), metavar="ID", help="reference ids")
    p.add_argument("--index", required=True, metavar="DIR", help="gallery directory")
    p.set_defaults(func=cmd_references_delete)


def cmd_references_add(args: argparse.Namespace) -> int:
    """speciesid references add: store photos as references of one species (exit status)."""
    from index.taxonomy import SpeciesNameConflictError
    from retrieval.workflows import ReferencesInterrupted, add_photos, open_gallery

    bars = show_bars(args)
    # named on stderr now, counted in the summary below
    paths, bad_args, not_read = photo_args(args.images, progress=bars)
    gallery, enc = open_gallery(args.index, encoder_config(args), make_table=True)  # a writer: may make the table
    try:
        result = add_photos(gallery, enc, args.species, paths, common_name=args.common_name,
                            venomous=parse_yes_no(args.venomous), genus=args.genus, family=args.family,
                            new_species=args.new_species, distinct_from_venomous=args.distinct_from_venomous,
                            progress=bars and len(paths) > 20)
    except SpeciesNameConflictError as exc:  # worded for this command's options
        raise ValueError(exc.advice(use=f"give --species {exc.meant!r} to add to it",
                                    confirm=f"give --new-species if {exc.name!r} is a new species")) from exc
    except ReferencesInterrupted as exc:  # what was embedded is committed: its notes said as the normal path says them
        status = interrupted_add(exc, args.index, rest="nothing is left to add")  # rest: every photo was committed
        if exc.report.ids:  # what was added before the cut, as the normal path says it
            emit(f"{exc.species} ({'existing' if exc.existed else 'new'} species): added {len(exc.report.ids)} before "
                 "the interrupt")
            emit(f"ids: {id_runs(exc.report.ids)}")
        for note in exc.notes:
            emit(f"note: {note}")
        return status
    status, came = held_summary("add", lambda: _add_summary(args, result, bad_args, not_read))  # the add is done
    if status is None:  # a second Ctrl-C: its summary cut short
        return finished(130)
    if came:
        said_finished("add")
    return finished(status)  # a Ctrl-C as the model and gallery are torn down keeps it


def _add_summary(args: argparse.Namespace, result: AddResult, bad_args: list, not_read: list) -> int:
    """Print what ``references add`` did (``result``; ``bad_args`` and ``not_read``: the arguments and entries
    :func:`photo_args` could not use); its exit status."""
    report = result.report
    status = ("existing species" if result.existed else "new species" if result.created
              else "not created: no photo added")  # a new name none of whose photos was stored
    elsewhere = [(f, i, sp) for f, i, sp in result.duplicates if sp is not None and sp != result.species]
    hidden = [(f, i) for f, i, _ in result.duplicates if i in result.excluded]
    # each photo listed once: one of another species, or excluded, under that reason below, not also as a duplicate
    lines = report.summary(said_apart={str(f) for f, *_ in elsewhere + hidden}).split("\n")
    if bad_args:  # a missing file or a folder without photos: counted beside the photos that were read
        lines[0] += f"; {len(bad_args)} argument(s) not found or holding no photo (named above)"
    if not_read:  # a broken link, a sub-folder that cannot be listed, a file that cannot be read, inside a folder
        lines[0] += (f"; {len(not_read)} entr{'y' if len(not_read) == 1 else 'ies'} inside the folders not read "
                     "(named above)")
    emit(f"{result.species} ({status}): " + "\n".join(lines))
    if report.ids:
        emit(f"ids: {id_runs(report.ids)}")
    for note in result.notes:
        emit(f"note: {printable(note)}")  # a photo's name among them: shown as the skipped lines show it
    for f, i, sp in elsewhere:
        emit(f"not added: {printable(f)} is already reference {i} of {sp} (delete that reference first if it is "
             "mislabelled)")
    for f, i in hidden:
        emit(f"not searchable: {printable(f)} is already reference {i}, excluded by a clean run (see "
             f"{args.index}/clean_log.json; 'speciesid clean --restore --index {args.index}' undoes the last run, "
             "'--restore all' every one)")
    return 1 if report.skipped or bad_args or not_read or elsewhere or hidden else 0


def cmd_references_delete(args: argparse.Namespace) -> int:
    """speciesid references delete: delete references by id (exit status)."""
    from retrieval.workflows import delete_references

    wanted = list(dict.fromkeys(args.ids))  # a repeated id counts once
    gone = set(delete_references(args.index, wanted))
    missing = [i for i in wanted if i not in gone]
    emit(f"deleted {len(gone)} of {len(wanted)} references"
         + (f"; no reference with id {', '.join(map(str, missing))}" if missing else ""))
    return 1 if missing else 0
