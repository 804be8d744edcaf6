"""Helpers shared by the command modules: output, common options, encoder and vote settings."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import re
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from index.text import printable

if TYPE_CHECKING:
    from retrieval.encoders import EncoderConfig
    from retrieval.identify import Identifier
    from retrieval.pipeline import ReferencesInterrupted

logger = logging.getLogger("speciesid")

FORMATS = ("table", "json", "csv")
FORMAT_HELP = ("output: table (for people; default), json or csv, in UTF-8 (a csv sent to a new file, > out.csv, "
               "starts with a byte-order mark, for Excel)")


def emit(text: str) -> None:
    """Write one block of output (with a trailing newline) to stdout."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def to_json(value: object) -> str:
    """``--format json`` text: indented, non-ASCII written as itself (a French or Arabic name readable, as the API
    writes it), not as \\u escapes; only a lone surrogate (a Linux file name's byte that is not UTF-8, as Python
    reads it) is written as its \\u escape, so that the text is UTF-8 (``json.loads`` gives the same name back)."""
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(value, indent=2, ensure_ascii=False))


#: A lone surrogate, which UTF-8 cannot encode (:func:`to_json`).
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def emit_utf8(text: str, *, bom: bool = False) -> None:
    """Write output for programs (``--format json`` or ``csv``) as UTF-8 whatever stdout's encoding (on Windows, a
    file or a pipe takes the PC's code page, which cannot write Arabic): its bytes to stdout's binary buffer, after
    what was written as text before it (flushed first); ``bom``: :data:`CSV_BOM` first. A stream without a buffer
    (a caller's in-memory stream) gets the text. A file name's byte that is not UTF-8 is written as it is."""
    text = text if text.endswith("\n") else text + "\n"
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:
        emit(text)
        return
    sys.stdout.flush()
    buffer.write(((CSV_BOM if bom else "") + text).encode("utf-8", "surrogateescape"))
    buffer.flush()


#: Written before a CSV that goes to a new file: Excel (Windows) then reads it as UTF-8 ("Vipère", Arabic names)
#: instead of the PC's code page ("VipÃ¨re"); Python reads it with encoding="utf-8-sig", pandas and LibreOffice as is.
CSV_BOM = "\ufeff"


def _stdout_is_new_file() -> bool:
    """stdout is a regular file with nothing in it yet (``> out.csv``), not a pipe, a terminal or an appended file."""
    try:
        sys.stdout.flush()
        info = os.fstat(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # an in-memory stream (tests, a caller's redirect)
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size == 0 and getattr(sys.stdout, "buffer", None) is not None


def emit_csv(text: str) -> None:
    """Write ``--format csv`` output in UTF-8 (:func:`emit_utf8`): to a new file (``> out.csv``) after a byte-order
    mark, so that Excel reads its accents and Arabic right, whatever the PC's code page; to a pipe or a terminal
    without one (no mark in the middle of a pipeline: ``| cut``, ``| python`` read plain UTF-8)."""
    emit_utf8(text, bom=_stdout_is_new_file())


def fmt_bool(value: bool | None) -> str:
    """yes / no / ?"""
    return "?" if value is None else ("yes" if value else "no")


def fmt_opt(value: float | None) -> str:
    """A figure with 3 decimals, or n/a."""
    return "n/a" if value is None else f"{value:.3f}"


def to_csv(rows: list[dict], fields: Sequence[str]) -> str:
    """Rows as CSV text with a header; a text cell a spreadsheet would run as a formula (``=1+1``, ``@SUM(A1)``, a
    species name or file name of anyone's choosing) is written with a ``'`` in front (``index.text.csv_cell``)."""
    from index.text import csv_dict

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_dict(row) for row in rows)
    return buf.getvalue()


def parse_yes_no(value: str | None, what: str = "--venomous") -> bool | None:
    """--venomous yes|no -> bool (None when not given); ``what``: the argument named in the error."""
    if value is None:
        return None
    v = value.strip().lower()
    if v in ("yes", "y", "true", "1"):
        return True
    if v in ("no", "n", "false", "0"):
        return False
    raise ValueError(f"{what} takes yes or no, not {value!r}")


def photo_args(paths: Sequence[str], *, report: bool = True, progress: bool = False
               ) -> tuple[list[Path], list[tuple[str, str]], list[tuple[str, str]]]:
    """Photos named on the command line (folders expanded, see index.photos); the (argument, reason) of each bad
    argument (missing, or a folder holding no photo); the (entry, reason) of each entry inside a folder argument that
    could not be read (a broken link, a sub-folder that cannot be listed, a file that cannot be read to tell whether
    it is a photo). Both are skipped, and reported on stderr unless ``report`` is False (the caller shows them in its
    output). No photo at all is an error. ``progress``: a bar while many files without an extension are read."""
    from index.photos import expand_photo_args

    got = expand_photo_args(paths, progress=progress)
    if not got.photos:  # the error names every bad argument: said once, not also as "skipped"
        raise ValueError("no photos to read: " + "; ".join(f"{printable(a)}: {printable(r)}"
                                                           for a, r in got.problems))
    for arg, reason in got.problems if report else ():
        sys.stderr.write(f"speciesid: skipped {printable(arg)}: {printable(reason)}\n")
    return got.photos, got.bad_args, got.skipped


#: The id runs ``references add`` prints before it counts the rest.
ID_RUNS_SHOWN = 20


def id_runs(ids: Sequence[int]) -> str:
    """Reference ids as runs of consecutive ones (``1668-2227`` for 560 ids, ``3, 7-9``): one short line however
    many, the first :data:`ID_RUNS_SHOWN` runs and then how many more ids."""
    runs: list[list[int]] = []
    for i in sorted(set(int(i) for i in ids)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    shown = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:ID_RUNS_SHOWN])
    rest = sum(b - a + 1 for a, b in runs[ID_RUNS_SHOWN:])
    return shown + (f", ... ({rest} more)" if rest else "")


def interrupted_add(exc: ReferencesInterrupted, index: str | Path,
                    rest: str = "run the same command again to finish") -> int:
    """Say on stderr what a Ctrl-C'd ``index build`` / ``references add`` kept and how to add the rest; exit 130.
    ``rest``: what to do when every photo was committed (``exc.after``)."""
    n = exc.report.added
    if exc.after:  # once every photo was committed (the index being finished)
        added = f"the {n} reference added is" if n == 1 else f"the {n} references added are all"
        kept = f"{added} kept in {index}" if n else f"this run added no reference to {index}"
        sys.stderr.write(f"speciesid: interrupted while {exc.after}: {kept}; {rest}\n")
        return 130
    if exc.saved and not n:
        sys.stderr.write(f"speciesid: interrupted before any photo was added: nothing was added to {index}; run the "
                         "same command again to add them\n")
        return 130
    kept = f"{n} reference{'' if n == 1 else 's'}" if exc.saved else f"at least {n} references"  # a second Ctrl-C
    sys.stderr.write(f"speciesid: interrupted: {kept} kept in {index}; run the same command again to add the rest\n")
    return 130


def add_quiet(p: argparse.ArgumentParser) -> None:
    """-q / --quiet: no progress bar."""
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar (none either when stderr is not a terminal: a log file, a CI job)")


def show_bars(args: argparse.Namespace) -> bool:
    """Whether the command draws progress bars: not with -q, nor when stderr is not a terminal (a log file, a CI
    job, a journal would keep every redraw of a bar)."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


WEIGHTS_HELP = "weights file for 'open_clip:ARCH' or 'timm:NAME' specs"


def spec_help(default: str) -> str:
    """--encoder's help: the spec forms, then ``default`` (what an unset --encoder means)."""
    from retrieval.encoders import SPEC_FORMS

    return "encoder spec (" + ", ".join(SPEC_FORMS) + "); default" + default


def add_encoder_args(p: argparse.ArgumentParser, *, default_spec: str | None, builds: bool = False) -> None:
    """--encoder, --weights, --device, --pool, --views, --runtime, --precision. ``builds``: the command builds into
    --index (the gallery's own encoder when it holds one, else a new gallery's defaults)."""
    from retrieval.encoders import (
        DEFAULT_ENCODER,
        DEFAULT_POOL,
        DEFAULT_VIEWS,
        POOLS,
        SCALE_VIEW,
        VIEWS,
    )

    own = "the one that built the index"
    if builds:
        own = "the one that built --index when it holds a gallery, else {}"
    help_spec = spec_help(f" {default_spec}" if default_spec else ": " + own.format(DEFAULT_ENCODER))
    p.add_argument("--encoder", default=default_spec, metavar="SPEC", help=help_spec)
    p.add_argument("--weights", metavar="FILE", help=WEIGHTS_HELP)
    p.add_argument("--pool", default=None, choices=POOLS,
                   help="feature pooling: model (the model's own, average for CNNs), gem3 (generalised mean, p=3; "
                   "timm CNNs) or auto (gem3 for timm CNNs, else model); default " + own.format(DEFAULT_POOL))
    p.add_argument("--views", default=None, choices=VIEWS,
                   help="test-time views of every photo (references and queries), embeddings averaged: single, "
                   f"flip (+ mirror image, 2 passes), ms (+ whole photo at {SCALE_VIEW} px, torch only), flipms "
                   "(all four); default " + own.format(DEFAULT_VIEWS).replace("the one that", "the ones that"))
    add_runtime_args(p)


def add_runtime_args(p: argparse.ArgumentParser, *, precision: bool = True) -> None:
    """--device, --runtime and (unless the command has its own) --precision; each unset one is read from the variable
    the server reads too (``retrieval.encoders.run_options``), else auto."""
    from retrieval.encoders import DEVICE_ENV, PRECISION_ENV, PRECISIONS, RUNTIME_ENV, RUNTIMES

    p.add_argument("--device", default=None,
                   help=f"auto (CUDA when present), cpu, cuda, cuda:N (default {DEVICE_ENV} or auto)")
    p.add_argument("--runtime", default=None, choices=RUNTIMES,
                   help=f"inference runtime (default {RUNTIME_ENV} or auto: the fastest faithful one for this CPU, "
                   "see docs/runtimes.md)")
    if precision:
        p.add_argument("--precision", default=None, choices=PRECISIONS,
                       help=f"fp32, bf16, int8 (fp16: CUDA); default {PRECISION_ENV} or auto: the fastest faithful "
                       "one")


#: EncoderConfig field -> the command-line option (argparse dest) that sets it.
_ENCODER_OPTIONS = {"spec": "encoder", "weights": "weights", "device": "device", "precision": "precision",
                    "batch_size": "batch_size", "runtime": "runtime", "pool": "pool", "views": "views"}


def encoder_config(args: argparse.Namespace) -> EncoderConfig:
    """The command's encoder options (+ --batch-size) as an EncoderConfig, the one way every command reads them: an
    option the command lacks or that is not given stays unset (the gallery's own, else a new gallery's default), but
    --device, --runtime and --precision, which are read as the server reads them (``run_options``: the variable,
    else auto); -q also silences a first use's export progress bars."""
    from retrieval.encoders import EncoderConfig, run_options

    given = {field: getattr(args, dest) for field, dest in _ENCODER_OPTIONS.items()
             if getattr(args, dest, None) is not None}
    run = run_options(getattr(args, "device", None), getattr(args, "runtime", None), getattr(args, "precision", None))
    return EncoderConfig(**{**given, **run}, progress=show_bars(args))


def at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an int >= ``low`` (and <= ``high``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low or (high is not None and value > high):
            within = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number {within}")
        return value

    return parse


def number_in(low: float, high: float | None = None, bounds: str = "[]") -> Callable[[str], float]:
    """An argparse ``type``: a finite float from ``low`` to ``high`` (None: no upper bound); ``bounds`` in interval
    notation says whether each end is allowed ("(]": above ``low``, up to ``high``), so that a value out of range
    is refused by the parser (``argument --X: ...; see 'speciesid CMD --help'``), not deeper under another name."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        above = value >= low if bounds[0] == "[" else value > low
        below = high is None or (value <= high if bounds[1] == "]" else value < high)
        if math.isfinite(value) and above and below:
            return value
        if high is None:
            within = f"of at least {low:g}" if bounds[0] == "[" else f"above {low:g}"
        else:
            within = f"in {bounds[0]}{low:g}, {high:g}{bounds[1]}"
        raise argparse.ArgumentTypeError(f"{text!r} is not a number {within}")

    return parse


def add_vote_args(p: argparse.ArgumentParser, *, rows: bool = False) -> None:
    """--knn, --temperature, --unknown-threshold, --method, --country (``rows``: --method picks report rows)."""
    from retrieval.vote import DEFAULT_K, DEFAULT_TEMPERATURE, DEFAULT_UNKNOWN_THRESHOLD

    p.add_argument("--knn", type=at_least(1), default=None,
                   help=f"neighbours that vote (default: the probe's chosen value, else {DEFAULT_K})")
    p.add_argument("--temperature", type=number_in(0, None, "()"), default=None,
                   help=f"vote weight exp(similarity/T), T above 0 (default: the probe's, else "
                   f"{DEFAULT_TEMPERATURE})")
    p.add_argument("--unknown-threshold", type=number_in(0, 1), default=None,
                   help="best score under this, from 0 to 1, means 'unknown' (default: the probe's calibrated "
                   f"one, else {DEFAULT_UNKNOWN_THRESHOLD})")
    if rows:
        p.add_argument("--method", default="all", choices=("all", "blend", "knn", "probe"),
                       help="the rows to report: every method the gallery has (default), or one of them")
    else:
        p.add_argument("--method", default="blend", choices=("blend", "knn", "probe"),
                       help="blend (kNN + probe + text prior, whatever exists; default), knn only (with the probe's "
                       "chosen k, T and metric when there is one), or probe only")
    p.add_argument("--country", help="ISO code or name (e.g. MA, England; Maroc, المغرب: French and Arabic names of "
                   "the Maghreb and the Sahel too): favour species recorded in that country: "
                   "in the shipped table (SnakeCLEF 2021: snakes only) or by the gallery's own photos (a manifest's "
                   "country column); species neither records keep their scores")


def open_identifier(args: argparse.Namespace) -> Identifier:
    """The gallery's Identifier, with the command line's vote overrides."""
    from retrieval.vote import VoteConfig
    from retrieval.workflows import open_identifier as open_ident

    # commands without the vote's options (search) need no probe; --method knn still votes with its chosen settings
    ident = open_ident(args.index, encoder_config(args), use_probe=hasattr(args, "method"))
    if not len(ident.gallery):
        from retrieval.workflows import no_references_error

        raise ValueError(no_references_error(ident.gallery, args.index))  # an interrupted build, clean, or none
    if not hasattr(args, "knn"):
        return ident
    if args.knn is not None or args.temperature is not None or args.unknown_threshold is not None:
        c = ident.config
        ident.config = VoteConfig(
            k=args.knn if args.knn is not None else c.k,
            temperature=args.temperature if args.temperature is not None else c.temperature,
            unknown_threshold=args.unknown_threshold if args.unknown_threshold is not None else c.unknown_threshold,
        )
    return ident
