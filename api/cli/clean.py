"""``speciesid clean``: zero-shot filter, duplicates and leakage, suspect labels; reversible exclusions."""

from __future__ import annotations

import argparse
import sys

from api.cli._common import (
    WEIGHTS_HELP,
    add_quiet,
    add_runtime_args,
    at_least,
    emit,
    encoder_config,
    number_in,
    show_bars,
    spec_help,
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the clean command."""
    from index.datasets import DATASETS as datasets
    from retrieval.findings import (
        APPLY_KINDS,
        DEFAULT_DUP_THRESHOLD,
        DEFAULT_SUSPECT_K,
        DEFAULT_THRESHOLD,
        MIN_DUP_THRESHOLD,
    )
    from retrieval.prompts import PROMPT_GROUPS

    p = sub.add_parser(
        "clean",
        help="find off-target photos (zero-shot text prompts), duplicates and leakage; exclude them reversibly",
        description="Zero-shot data cleaning. Scores every photo against target and off-target text prompts "
        "(text-capable encoders such as bioclip; skipped with a notice for image-only ones), finds exact and "
        "near duplicates in the set and against --against (leakage), reports photos whose nearest neighbours all "
        "carry another species (suspect labels, for a person to check), and writes findings.csv + "
        "contact_sheet.html to --report. --apply excludes flagged references from a gallery (--index); "
        "--restore brings them back. Nothing is ever deleted.",
    )
    p.add_argument("--dataset", choices=datasets, help="dataset layout of --root (with --root)")
    p.add_argument("--root", help="folder holding the photos to clean (with --dataset)")
    p.add_argument("--metadata", help="metadata CSV (snakeclef2021; rare-species: default ROOT/metadata.csv)")
    p.add_argument(
        "--index", metavar="DIR",
        help="gallery: without --dataset/--root its references are cleaned (stored embeddings reused); findings "
        "map to its references by sha256; required by --apply and --restore",
    )
    p.add_argument("--against", metavar="DIR",
                   help="another folder of photos (e.g. the evaluation set, any layout): report its photos that "
                   "also sit in the cleaned set (leakage)")
    p.add_argument("--encoder", default=None, metavar="SPEC",
                   help=spec_help(": the gallery's with --index, else bioclip"))
    p.add_argument("--weights", metavar="FILE", help=WEIGHTS_HELP)
    add_runtime_args(p)
    p.add_argument("--batch-size", type=at_least(1), default=32, help="images per forward pass (default 32)")
    p.add_argument("--workers", type=at_least(1), default=None,
                   help="decode threads (default: half the cores, at most 8)")
    p.add_argument("--prompts", metavar="FILE",
                   help="prompt file ([target] / [off-target: NAME] sections, see docs/cleaning.md) or a shipped "
                   f"group ({', '.join(PROMPT_GROUPS)}); default: from the dataset's taxon group")
    p.add_argument("--threshold", type=number_in(0, 1, "(]"), default=DEFAULT_THRESHOLD, metavar="P",
                   help=f"flag a photo when its off-target probability is >= P, in (0, 1] (default "
                   f"{DEFAULT_THRESHOLD}) and "
                   "an off-target class is more likely than every target class")
    p.add_argument("--dup-threshold", type=number_in(MIN_DUP_THRESHOLD, 1),
                   default=DEFAULT_DUP_THRESHOLD, metavar="COS",
                   help="near-duplicate / near-leak when the embeddings' cosine similarity is >= COS, from "
                   f"{MIN_DUP_THRESHOLD} to 1 (default {DEFAULT_DUP_THRESHOLD}, chosen on real photo pairs with "
                   "MobileNetV1)")
    p.add_argument("--suspect-k", type=at_least(1), default=DEFAULT_SUSPECT_K, metavar="K",
                   help="suspect label: a photo whose K nearest other photos of the set (cosine; its copies left "
                   "out) all carry one species other than its own, when its own species has at least K other photos "
                   f"(default {DEFAULT_SUSPECT_K}, chosen by injected label noise on real photos with MobileNetV1). "
                   "Report only: --apply never excludes it")
    p.add_argument("--no-zero-shot", action="store_true", help="skip the zero-shot filter")
    p.add_argument("--no-duplicates", action="store_true", help="skip duplicate and leakage detection")
    p.add_argument("--no-suspect-labels", action="store_true", help="skip the suspect-label check")
    p.add_argument("--report", metavar="DIR", help="where to write findings.csv, contact_sheet.html, summary.json "
                   "and zero_shot_scores.csv (required unless --restore). Finding kinds: label-conflict, "
                   "suspect-label, off-target, leak, near-leak, duplicate, near-duplicate, unreadable "
                   "(docs/cleaning.md)")
    p.add_argument("--apply", action="store_true",
                   help="exclude the flagged references from the --index gallery's search and probe training "
                   "(reversible with --restore; nothing is deleted)")
    p.add_argument("--apply-to", default=None, metavar="KINDS",
                   help="comma-separated finding kinds --apply excludes (" + ", ".join(APPLY_KINDS) + "; default "
                   "off-target). A duplicate goes when it copies a reference kept (oldest first); leaks exclude the "
                   "gallery's copy; label conflicts and suspect labels are never acted on; a species always keeps one "
                   "reference")
    p.add_argument("--restore", nargs="?", const="last", choices=("last", "all"),
                   help="bring excluded references of --index back: 'last' (default) undoes the last --apply run, "
                   "'all' clears every exclusion of the gallery")
    add_quiet(p)
    p.set_defaults(func=cmd_clean)


def cmd_clean(args: argparse.Namespace) -> int:
    """speciesid clean: find duplicates, leaks and suspect labels; exclude or restore them (exit status)."""
    from retrieval.workflows import CleanConfig, CleanInterrupted, clean, restore_exclusions

    if args.restore:
        if not args.index:
            raise ValueError("--restore needs --index DIR: the gallery whose exclusions to undo")
        if args.apply:
            raise ValueError("--apply and --restore undo each other; give one of them")
        gallery, found = restore_exclusions(args.index, args.restore)
        emit(f"restored {found} references ({args.restore}); gallery {gallery.root} now has {len(gallery)} "
              "searchable references")
        return 0
    if not args.report:
        raise ValueError("--report DIR is required: where findings.csv and contact_sheet.html are written")
    if args.apply_to is not None and not args.apply:
        raise ValueError("--apply-to says what --apply excludes; add --apply (or leave --apply-to out to only report)")
    kinds = [k.strip() for k in (args.apply_to or "off-target").split(",") if k.strip()]
    try:
        result = clean(
            dataset=args.dataset,
            root=args.root,
            metadata=args.metadata,
            index=args.index,
            against=args.against,
            encoder=encoder_config(args),
            config=CleanConfig(prompts=args.prompts, threshold=args.threshold, dup_threshold=args.dup_threshold,
                               zero_shot=not args.no_zero_shot, duplicates=not args.no_duplicates,
                               suspect_labels=not args.no_suspect_labels, suspect_k=args.suspect_k),
            report_dir=args.report,
            apply=args.apply,
            apply_kinds=kinds,
            workers=args.workers,
            progress=show_bars(args),
        )
    except CleanInterrupted as exc:  # the exclusion is saved: what it did, and how to undo it
        emit("\n".join(exc.result.applied_lines()))
        sys.stderr.write(f"speciesid: interrupted once the exclusion was applied (above): the report in {exc.report} "
                         "is incomplete; the same command writes it again (what it excluded stays excluded)\n")
        return 130
    emit(result.summary())
    return 0
