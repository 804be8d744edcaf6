"""``speciesid evaluate``: identify a labelled set and write a report."""

from __future__ import annotations

import argparse

from api.cli._common import (
    add_encoder_args,
    add_quiet,
    add_vote_args,
    emit,
    fmt_opt,
    open_identifier,
    show_bars,
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the evaluate command."""
    from index.datasets import DATASETS

    p = sub.add_parser("evaluate", help="identify a labelled set and write a JSON + Markdown report with plots",
                       description="Identify every photo of a labelled set with each method the gallery has (kNN, "
                       "probe, blend) and write a JSON + Markdown report with plots; the report says which photos "
                       "chose the settings or trained a network fine-tuned here, and leaves out evaluated photos the "
                       "gallery already holds.")
    p.add_argument("--index", required=True, metavar="DIR", help="gallery directory")
    p.add_argument("--dataset", required=True, choices=DATASETS, help="how the labelled set is laid out")
    p.add_argument("--root", required=True, metavar="DIR", help="folder holding the labelled photos")
    p.add_argument("--metadata", metavar="FILE", help="metadata CSV (snakeclef2021; rare-species: default "
                   "ROOT/metadata.csv)")
    p.add_argument("--report", default="report", metavar="DIR",
                   help="where to write the report (default report/): moved in once all of it is written, replacing "
                   "an earlier report's files (a run cut short leaves the earlier report as it was)")
    p.add_argument("--keep-duplicates", action="store_true",
                   help="count evaluated photos the gallery already holds (same bytes or near-copies, cosine >= 0.95);"
                   " by default they are left out, and counted in the report")
    p.add_argument("--open-set", action="store_true",
                   help="evaluate a set of species the gallery may hold none of, to measure how unknown species are "
                   "answered (coverage: how often it abstains; venomous called harmless). Without it such a set is "
                   "refused, before the model loads, as a mistyped or renamed folder set")
    add_vote_args(p, rows=True)
    add_encoder_args(p, default_spec=None)
    add_quiet(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """speciesid evaluate: identify a labelled set, print the figures and write the report (exit status)."""
    from retrieval.workflows import check_evaluation_set, evaluate_dataset

    scan = check_evaluation_set(args.index, args.dataset, args.root, metadata=args.metadata,
                                open_set=args.open_set)  # before the model loads
    ident = open_identifier(args)
    overridden = any(v is not None for v in (args.knn, args.temperature, args.unknown_threshold))
    run = evaluate_dataset(ident, args.dataset, args.root, metadata=args.metadata, country=args.country,
                           report_dir=args.report, progress=show_bars(args), keep_duplicates=args.keep_duplicates,
                           settings_overridden=overridden, methods=None if args.method == "all" else [args.method],
                           open_set=args.open_set, scan=scan)
    if run.unreadable:
        emit(f"photos: {run.queries} evaluated, {run.unreadable} unreadable, skipped")
    for line in run.protocol:
        emit(f"protocol: {line}")
    for method, r in run.results.items():
        emit(
            f"{method:6s} top-1 {r['top1']:.3f}  top-5 {r['top5']:.3f}  macro-F1 {r['macro_f1']:.3f}  "
            f"venomous recall {fmt_opt(r['venomous_recall'])}  venomous called harmless "
            f"{fmt_opt(r['venomous_called_harmless'])}  coverage {r['coverage']:.3f}  "
            f"accuracy answered {fmt_opt(r['accuracy_answered'])}"
        )
    emit("report: " + ", ".join(str(p) for p in run.files.values()))
    return 0
