"""``speciesid identify`` and ``speciesid search``."""

from __future__ import annotations

import argparse
import sys
from pathlib import PurePosixPath

from api.cli._common import (
    FORMAT_HELP,
    FORMATS,
    add_encoder_args,
    add_quiet,
    add_vote_args,
    at_least,
    emit,
    emit_csv,
    emit_utf8,
    logger,
    open_identifier,
    photo_args,
    show_bars,
    to_csv,
    to_json,
)
from index.text import printable

RANKS = ("species", "genus", "family")
#: The answer's own fields, repeated on each of its CSV rows.
ANSWER_FIELDS = ("unknown", "far", "nearest_similarity", "venomous_score", "venom_unknown_score", "venom_applies")
#: The venom advice's fields, flattened onto each CSV row (retrieval.advice).
ADVICE_FIELDS = ("venom_advice_level", "venom_advice")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the identify and search commands."""
    p = sub.add_parser(
        "identify", help="identify the species in photos",
        description="Identify each photo (or, with --observation, all photos as one animal) against a gallery: "
        "kNN vote blended with the gallery's probe and text prior, optionally weighted by --country, reported "
        "as species or rolled up to --rank genus/family with the evidence photos.",
    )
    p.add_argument("images", nargs="+", metavar="IMG", help="photo files or folders of photos")
    p.add_argument("--index", required=True, metavar="DIR", help="gallery directory")
    p.add_argument("--k", type=at_least(1), default=5, help="candidates to report per answer (default 5)")
    p.add_argument("--neighbours", type=at_least(0), default=5, help="evidence photos to report (default 5)")
    p.add_argument("--rank", default="species", choices=RANKS,
                   help="report species (default), or scores rolled up to genus or family")
    p.add_argument("--observation", action="store_true",
                   help="the photos show one animal: one answer from all of them (neighbours vote together)")
    p.add_argument("--format", default="table", choices=FORMATS, help=FORMAT_HELP)
    add_vote_args(p)
    add_encoder_args(p, default_spec=None)
    add_quiet(p)
    p.set_defaults(func=cmd_identify)

    p = sub.add_parser("search", help="raw nearest reference photos of one photo",
                       description="The nearest reference photos of one photo by cosine similarity, with their "
                       "ids and species: no vote, no probe (see identify for those).")
    p.add_argument("image", metavar="IMG", help="one photo file")
    p.extra_words_hint = ("search takes one photo: run it once per photo, or give them all to 'speciesid identify'")
    p.add_argument("--index", required=True, metavar="DIR", help="gallery directory")
    p.add_argument("--k", type=at_least(1), default=10, help="neighbours (default 10)")
    p.add_argument("--format", default="table", choices=FORMATS, help=FORMAT_HELP)
    add_encoder_args(p, default_spec=None)
    p.set_defaults(func=cmd_search)


def cmd_identify(args: argparse.Namespace) -> int:
    """speciesid identify: the candidate species of each photo, or of one observation (exit status)."""
    from retrieval.workflows import answer_notes, identify

    bars = show_bars(args)
    paths, bad_args, not_read = photo_args(args.images, report=False, progress=bars)
    ident = open_identifier(args)
    answers = identify(ident, paths, observation=args.observation, top=args.k, method=args.method,
                       rank=args.rank, country=args.country, progress=bars and len(paths) > 20)
    skipped = bad_args + not_read
    results = [{"image": arg, "error": reason} for arg, reason in skipped]  # every input is in the output
    for a in answers:
        if a.error is not None:
            results.append({"image": a.source, "error": a.error})
            continue
        r = {"image": a.source, **a.identification.to_dict(neighbours=args.neighbours), "notes": a.notes}
        if args.rank != "species":
            r["rank"] = args.rank
            r["results"] = [
                {**res.to_dict(neighbours=False), "evidence": [n.id for n in res.neighbours[: args.neighbours]]}
                for res in a.results
            ]
        results.append(r)
    # a partial gallery (a build interrupted), one too small to tell "unlike every"
    notes = answer_notes(ident, rank=args.rank)
    if args.format == "json":
        emit_utf8(to_json(results))
    elif args.format == "csv":
        emit_csv(_identify_csv(results, args.rank))
    else:
        limit = ident.far_threshold() if any(r.get("far") for r in results) else None
        given = [str(p) for p in paths]  # an observation's set_aside: positions among them
        for r in results:
            emit(_identify_table(r, args.rank, args.neighbours, far_threshold=limit, photos=given))
    for note in notes:  # beside a table; on stderr beside JSON or CSV, which stay what they are for a program
        if args.format == "table":
            emit(f"note: {note}")
        else:
            sys.stderr.write(f"speciesid: note: {note}\n")
    failed = sum("error" in r for r in results)
    if failed:
        from retrieval.workflows import skip_counts  # unreadable, or read but refused (too elongated, ...)

        kinds = {**skip_counts(r["error"] for r in results[len(skipped):] if "error" in r),
                 "not found or holding no photo": len(bad_args)}  # results start with the skipped arguments
        said = []
        if failed > len(not_read):
            said.append(f"{failed - len(not_read)} of {len(paths) + len(bad_args)} photos not answered: "
                        + ", ".join(f"{n} {kind}" for kind, n in kinds.items() if n))
        if not_read:  # not photos: entries of a folder argument (a broken link, a folder that cannot be listed)
            said.append(f"{len(not_read)} entr{'y' if len(not_read) == 1 else 'ies'} inside the folders given not "
                        "read (a broken link, a sub-folder that cannot be listed, or a file that cannot be read)")
        logger.warning("%s", "; ".join(said))
    return 1 if failed else 0


def _identify_csv(results: list[dict], rank: str) -> str:
    rows = []
    for r in results:
        if "error" in r:
            rows.append({"image": r["image"], "error": r["error"]})
            continue
        ranked = r.get("results") if rank != "species" else r.get("predictions", [])
        advice = r.get("venom_advice") or {}
        answer = {**{k: r[k] for k in ANSWER_FIELDS}, "set_aside": " ".join(map(str, r.get("set_aside", []))),
                  "notes": "; ".join(r.get("notes", [])),
                  **dict(zip(ADVICE_FIELDS, (advice.get("level"), advice.get("text")), strict=True))}
        for i, p in enumerate(ranked or [], 1):
            name = p.get("name", p.get("species"))
            rows.append({"image": r["image"], **p, "rank": i, "level": rank, "name": name, **answer})
        if not ranked:  # no candidate (a probe naming none of the held species): the answer and its advice still
            rows.append({"image": r["image"], "level": rank, **answer})
    fields = ["image", "rank", "level", "name", "species", "score", "common_name", "genus", "family", "venomous",
              *ANSWER_FIELDS, "set_aside", "notes", *ADVICE_FIELDS, "error"]
    return to_csv(rows, fields)


def _identify_table(r: dict, rank: str, neighbours: int = 0, *, far_threshold: float | None = None,
                    photos: list[str] | None = None) -> str:
    """One answer as lines for people; ``far_threshold``: the gallery's, said beside a far answer's nearest
    similarity (which is under it); ``photos``: those given, which an observation's ``set_aside`` counts in."""
    from retrieval.advice import NOT_MEANINGFUL

    lines = [printable(r["image"])]  # a file's name cannot hide or fake the lines below (newline, ESC)
    if "error" in r:
        return "\n".join([*lines, f"  error: {printable(r['error'])}"])
    if r.get("far"):
        nearest, limit = _apart(r["nearest_similarity"], far_threshold)
        under = f", under this gallery's far threshold {limit}" if limit else ""
        lines.append(f"  UNKNOWN: unlike every reference photo (nearest similarity {nearest}{under}): nothing like "
                     "the gallery's photos, or too small or blank to tell")
    elif r["unknown"]:
        lines.append("  UNKNOWN: no species is supported strongly enough (best candidates below)")
    advice = r.get("venom_advice")  # the library's one rule (retrieval.advice), as the API and the page say it
    if advice and advice["treat_as_venomous"]:  # first, as the page shows it
        lines.append(f"  {advice['text']}")
    if aside := r.get("set_aside"):
        names = [printable(photos[i]) if photos and i < len(photos) else f"photo #{i + 1}" for i in aside]
        lines.append(f"  set aside (unlike every reference, so not counted): {', '.join(names)}")
    if r.get("far"):
        lines.append(f"  closest {'species' if rank == 'species' else rank} ({NOT_MEANINGFUL}):")
    if rank == "species":
        for i, p in enumerate(r["predictions"], 1):
            name = p["species"] + (f" ({p['common_name']})" if p["common_name"] else "")
            venom = "  VENOMOUS" if p["venomous"] else ""
            lines.append(f"  {i}. {p['score']:6.1%}  {name}  [{p['family'] or '?'}]{venom}")
    else:
        for i, p in enumerate(r["results"], 1):
            venom = "  VENOMOUS (some member)" if p["venomous"] else ""
            family = f"  [{p['family']}]" if rank == "genus" and p["family"] else ""
            evidence = f"  evidence #{', #'.join(map(str, p['evidence']))}" if p["evidence"] else ""
            name = f"{p['name']} (a label: no genus)" if p.get("species") else f"{rank} {p['name']}"
            lines.append(f"  {i}. {p['score']:6.1%}  {name}{family}{venom}{evidence}")
    if rank == "species" and neighbours and r["neighbours"]:
        lines += _evidence_lines(r["neighbours"])
    if note := r.get("country_note"):  # why --country changed nothing (retrieval.identify)
        lines.append(f"  ({note})")
    lines += [f"  note: {printable(note)}" for note in r.get("notes", [])]  # of a photo as read: its name escaped
    if advice and not advice["treat_as_venomous"]:  # "unlikely": last, as the page shows it
        lines.append(f"  {advice['text']}")
    return "\n".join(lines)


def _apart(value: float, other: float | None) -> tuple[str, str]:
    """``value`` and ``other`` with 2 decimals, or up to 4 where 2 would print them alike ('' for no ``other``)."""
    if other is None:
        return f"{value:.2f}", ""
    digits = next((d for d in (2, 3) if f"{value:.{d}f}" != f"{other:.{d}f}"), 4)
    return f"{value:.{digits}f}", f"{other:.{digits}f}"


def _evidence_lines(neighbours: list[dict]) -> list[str]:
    """The evidence photos, nearest first, one a line: id, the similarity they are ordered by, species and file name
    (``search`` gives the whole path). That similarity is the vote's own, with the plain cosine beside it in brackets
    when the vote runs on the whitened metric (the two orders then differ)."""
    whitened = any(abs(n["vote_similarity"] - n["similarity"]) > 1e-6 for n in neighbours)
    ids = max(len(str(n["id"])) for n in neighbours) + 1
    width = max(len(n["species"]) for n in neighbours)
    head = ("  evidence, by the vote's similarity (whitened metric; cosine in brackets):" if whitened
            else "  evidence, by cosine similarity:")
    return [head] + [
        f"    {'#' + str(n['id']):<{ids}}  {n['vote_similarity']:.2f}"
        + (f" ({n['similarity']:.2f})" if whitened else "") + f"  {n['species']:<{width}}  {_file_name(n['path'])}"
        for n in neighbours]


def _file_name(path: str) -> str:
    """The file name of a stored reference path (a local path or an object-store URI), printable (control
    characters escaped: :func:`printable`)."""
    return printable(PurePosixPath(str(path)).name or str(path))


def cmd_search(args: argparse.Namespace) -> int:
    """speciesid search: the gallery's nearest references of one photo (exit status)."""
    from retrieval.workflows import search

    paths, _, _ = photo_args([args.image])
    if len(paths) != 1:
        raise ValueError(f"search takes one photo; {args.image} holds {len(paths)} (use identify for several)")
    ident = open_identifier(args)
    neighbours = [n.to_dict() for n in search(ident, paths[0], k=args.k)]
    if args.format == "json":
        emit_utf8(to_json({"image": str(paths[0]), "neighbours": neighbours}))
    elif args.format == "csv":
        emit_csv(to_csv(neighbours, ["id", "similarity", "species", "common_name", "genus", "family", "venomous",
                                     "path"]))
    else:
        for rank, n in enumerate(neighbours, 1):
            emit(f"{rank:3d}. {n['similarity']:.4f}  #{n['id']}  {n['species']}  {printable(n['path'])}")
    return 0
