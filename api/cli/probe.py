"""``speciesid probe train|import|restore|publish|withdraw``: calibrate the blend of the kNN vote with a probe; bring
back the one the last train or import replaced; share it through an S3 store, or withdraw it from there."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from api.cli._common import add_quiet, add_runtime_args, at_least, emit, encoder_config, number_in, show_bars

if TYPE_CHECKING:
    from retrieval.probe_flows import ProbeResult


def register(sub: argparse._SubParsersAction) -> None:
    """Add the probe command group."""
    p_probe = sub.add_parser("probe", help="linear-probe head blended with the kNN vote")
    s_probe = p_probe.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    p = s_probe.add_parser(
        "train",
        help="train the probe on the gallery; choose k, T, blend weight, unknown threshold on validation data",
    )
    p.add_argument("--index", required=True, metavar="DIR", help="gallery directory")
    _add_selection_args(p, "labelled validation photos (default: cross-validation on the gallery)")
    p.add_argument("--checklist", help="'moroccan' or a file of binomials: photo-less species for the text prior "
                   "(needs a gallery of a CLIP-style encoder such as bioclip; refused for an image-only one)")
    p.add_argument("--text-strength", type=number_in(0), default=1.0,
                   help="text prior weight, in photos' worth of evidence: 0 or more (default 1)")
    p.add_argument("--max-photos", type=at_least(0), default=None, metavar="N",
                   help="train the final probe on at most N photos, a seeded per-species subsample above it, but "
                   "never under 2 a species (so more than N with over N/2 species; 0: every photo; default: every "
                   "photo while photos x species stays within 400 million, lbfgs's float64 arrays, 3.3 GiB peak at "
                   "200,000 x 1,994 species; above it 400 million / species photos, never under 50,000: "
                   "docs/scale.md)")
    add_runtime_args(p)
    add_quiet(p)
    p.set_defaults(func=cmd_probe_train)
    p = s_probe.add_parser(
        "import",
        help="use a fine-tuned network's head (speciesid finetune --out DIR) as the probe of a gallery built with "
        "that network; no training, only k, T, blend weight and unknown threshold are chosen",
    )
    p.add_argument("--index", required=True, metavar="DIR", help="gallery built with --encoder timm:local-dir:OUT")
    p.add_argument("--from", dest="from_dir", required=True, metavar="OUT", help="the fine-tuned model folder")
    _add_selection_args(p, "labelled photos to choose the settings on, other than those you will evaluate on "
                        "(default: the photos the fine-tuning run held out, OUT/heldout.csv, found in the gallery; "
                        "without them, cross-validation over the gallery with the head fixed, which favours the head)")
    p.add_argument("--blend-weight", default="auto", metavar="auto|choose|W",
                   help="the head's share in the blend: auto (default) fixes it at the prior 0.5 when the photos that "
                   "would choose it already chose the run's epoch and test size (its held-out photos, its own "
                   "--val-root) or trained the head (the gallery), and chooses it on fresh --val-root photos; choose "
                   "always chooses it; a number from 0 (kNN only) to 1 (head only) fixes it there")
    add_runtime_args(p)
    add_quiet(p)
    p.set_defaults(func=cmd_probe_import)
    # The subcommands that take only the gallery: (name, help, --index help, handler).
    for name, help_, index_help, func in (
        ("restore", "bring back the probe the last 'probe train' or 'probe import' replaced (kept as "
         "probe.prev.json/npz); the current one is kept in its place, so running it again swaps back",
         "gallery directory", cmd_probe_restore),
        ("publish", "share the gallery's probe through its S3 store, for every machine sharing it (after a 'probe "
         "train', 'import' or 'restore' whose publish failed)",
         "gallery directory (its store on S3)", cmd_probe_publish),
        ("withdraw", "remove the probe shared through the gallery's S3 store, so that no machine takes it any more; "
         "the machines that took it keep it (their /readyz and 'index info' say withdrawn), and so does this "
         "folder: 'probe publish' shares it again", "gallery directory (its store on S3)", cmd_probe_withdraw),
    ):
        p = s_probe.add_parser(name, help=help_)
        p.add_argument("--index", required=True, metavar="DIR", help=index_help)
        p.set_defaults(func=func)


def _selection_line(m: dict, head: str) -> str:
    if m.get("unknown_coverage"):
        threshold = (f"unknown threshold gives precision {m['unknown_precision']:.3f} at coverage "
                     f"{m['unknown_coverage']:.3f}")
    elif m.get("unknown_answered"):  # one reached 95% on too few photos (retrieval.metrics.min_answered)
        threshold = (f"the unknown threshold reaching 95% precision here answers only {m['unknown_answered']:.0f} "
                     f"photos: too few to trust (at least {m.get('unknown_min_answered', 20):.0f}), the default is "
                     "kept")
    else:
        threshold = "no unknown threshold reaches 95% precision here: the default is kept"
    return (f"selection top-1 ({int(m.get('queries', 0))} queries): kNN {m.get('knn_top1', 0):.3f}, "
            f"{head} {m.get('probe_top1', 0):.3f}, blend {m.get('blend_top1', 0):.3f}; {threshold}")


def cmd_probe_train(args: argparse.Namespace) -> int:
    """speciesid probe train: fit the gallery's linear probe and choose its settings (exit status)."""
    from retrieval.workflows import train_gallery_probe

    result = train_gallery_probe(
        args.index, val_dataset=args.val_dataset, val_root=args.val_root, val_metadata=args.val_metadata,
        checklist=args.checklist, text_strength=args.text_strength, folds=args.folds, rule=args.rule,
        encoder=encoder_config(args), progress=show_bars(args), keep_duplicates=args.keep_duplicates,
        max_photos="auto" if args.max_photos is None else (args.max_photos or None),
    )
    _emit_dropped(result)
    p = result.probe
    s = p.calibration
    left = (f" ({len(s.left_out)} other species left to the kNN vote, too few distinct photos: "
            f"{', '.join(s.left_out)})" if s.left_out else "")
    cut = (f" (trained on {s.metrics['probe_photos']:.0f} of them, at most {s.metrics['probe_cap_per_species']:.0f} "
           "a species)" if "probe_photos" in s.metrics else "")
    emit(
        f"probe: {len(p.species)} species{left}, {p.trained_on} references{cut}, "
        f"trained in {result.seconds_train:.1f} s "
        f"(settings chosen in {result.seconds_select:.1f} s on {s.selected_on}, rule {s.rule})\n"
        f"chosen: C={s.C} kNN metric={s.metric} k={s.k} T={s.temperature} blend weight={s.blend_weight} "
        f"unknown threshold={s.unknown_threshold}\n" + _selection_line(s.metrics, "probe")
    )
    if result.text_species:
        emit(f"text prior: {result.text_species} species (gallery + checklist)")
    _emit_replaced(result, args.index)
    return 0


def cmd_probe_import(args: argparse.Namespace) -> int:
    """speciesid probe import: take a fine-tuned network's head as the gallery's probe (exit status)."""
    from retrieval.workflows import import_gallery_probe

    result = import_gallery_probe(
        args.index, args.from_dir, val_dataset=args.val_dataset, val_root=args.val_root,
        val_metadata=args.val_metadata, folds=args.folds, rule=args.rule, blend_weight=args.blend_weight,
        encoder=encoder_config(args), progress=show_bars(args), keep_duplicates=args.keep_duplicates,
    )
    _emit_dropped(result)  # the species the head and the gallery do not share: warned about once, by the library
    p = result.probe
    s = p.calibration
    m = s.metrics
    emit(
        f"probe: the head of {args.from_dir} ({len(p.species)} species), no training; settings chosen in "
        f"{result.seconds_select:.1f} s on {s.selected_on}, rule {s.rule}\n"
        + (f"head probabilities calibrated on the validation photos: logits / {m['head_temperature']:.3g}\n"
           if "head_temperature" in m else "head probabilities uncalibrated (give --val-root to calibrate them)\n")
        + f"chosen: kNN metric={s.metric} k={s.k} T={s.temperature} blend weight={s.blend_weight} "
        f"unknown threshold={s.unknown_threshold}\n"
        + (f"blend weight {s.weight_fixed}\n" if s.weight_fixed else "")
        + _selection_line(m, "head")
    )
    _emit_replaced(result, args.index)
    return 0


def cmd_probe_restore(args: argparse.Namespace) -> int:
    """speciesid probe restore: swap the gallery's probe with the one the last train or import replaced."""
    from retrieval.workflows import restore_gallery_probe

    restored, replaced, shared = restore_gallery_probe(args.index)
    emit(f"restored {restored}" + (
        f"; {replaced} is kept in its place: 'speciesid probe restore --index {args.index}' again swaps back"
        if replaced else ""))
    _emit_shared(shared)
    return 0


def cmd_probe_publish(args: argparse.Namespace) -> int:
    """speciesid probe publish: share the gallery's probe through its S3 store."""
    from retrieval.workflows import publish_gallery_probe

    published = publish_gallery_probe(args.index)
    emit(f"shared {published} through the gallery's store: every machine sharing it takes it (a server within "
         "SPECIESID_REFRESH_S)")
    return 0


def cmd_probe_withdraw(args: argparse.Namespace) -> int:
    """speciesid probe withdraw: remove the probe shared through the gallery's S3 store."""
    from retrieval.workflows import withdraw_gallery_probe

    removed = withdraw_gallery_probe(args.index)
    if not removed:
        emit(f"the store of {args.index} holds no shared probe: nothing to withdraw")
        return 0
    emit(f"withdrew the shared probe from the gallery's store ({', '.join(removed)}): no machine takes it any more. "
         "The machines that took it keep it (their /readyz and 'speciesid index info' say \"withdrawn\": true), and "
         f"so does {args.index}: 'speciesid probe publish --index {args.index}' shares it again")
    return 0


def _emit_replaced(result: ProbeResult, index: str) -> None:
    """One line: which probe the new one replaced, and how to get it back (and one more where the store shares it)."""
    if result.replaced:
        emit(f"replaced {result.replaced}; it is kept as probe.prev.json/npz: 'speciesid probe restore --index "
             f"{index}' brings it back")
    _emit_shared(result.shared)


def _emit_shared(where: str) -> None:
    """One line, on an S3 store: where the probe is shared, as ``probe publish`` says it."""
    if where:
        emit(f"shared through {where}: every machine sharing the store takes it (a server within "
             "SPECIESID_REFRESH_S)")


def _emit_dropped(result: ProbeResult) -> None:
    """Say how many --val-root photos were left out of the selection because the gallery holds them, naming the
    first few (-v logs them all)."""
    from index.photos import first_few
    from retrieval.protocol import kinds_text

    if result.dropped:
        emit(f"validation photos left out, the gallery holds them: {len(result.dropped)} "
             f"({kinds_text(result.dropped_kinds)}; --keep-duplicates to keep them; -v lists them all): "
             + first_few(result.dropped))


def _add_selection_args(p: argparse.ArgumentParser, val_root_help: str) -> None:
    """The options of what chooses the settings (validation photos or folds, and the rule), as train and import
    both take them."""
    from index.datasets import DATASETS
    from retrieval.calibrate import RULES

    p.add_argument("--val-dataset", default="folder", choices=DATASETS, help="layout of --val-root (default folder)")
    p.add_argument("--val-root", help=val_root_help)
    p.add_argument("--val-metadata", help="metadata CSV of the validation set (snakeclef2021, rare-species)")
    p.add_argument("--keep-duplicates", action="store_true",
                   help="keep --val-root photos the gallery holds (same bytes, or near-copies: cosine >= 0.95, the "
                   "'speciesid clean' leak rule) among those that choose the settings; by default they are left out, "
                   "since each finds itself among the references")
    p.add_argument("--folds", type=at_least(2), default=5,
                   help="cross-validation folds without --val-root (default 5); at most the distinct photos of the "
                   "species with the fewest, with a warning when that is fewer")
    p.add_argument("--rule", default="seq-nll", choices=RULES,
                   help="how settings are chosen: seq-nll (default: one at a time by out-of-fold log-loss, the "
                   "value nearest the defaults within one standard error) or argmax (the old joint best top-1, "
                   "over-fits small folds)")
