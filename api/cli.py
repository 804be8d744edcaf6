"""``speciesid`` command line: build galleries, identify photos, manage references."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger("speciesid")

FORMATS = ("table", "json", "csv")


# ----------------------------------------------------------------------------- helpers
def _expand_images(paths: Sequence[str]) -> list[Path]:
    """Files as given; folders expanded to the photos inside them (recursively, sorted)."""
    from index.datasets import IMAGE_EXTENSIONS

    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not found:
                raise ValueError(f"folder {p} holds no photos ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise ValueError(f"{p} does not exist")
    return out


def _fmt_bool(value: bool | None) -> str:
    return "?" if value is None else ("yes" if value else "no")


def _emit(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _csv(rows: list[dict], fields: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _encoder_args(p: argparse.ArgumentParser, *, default_spec: str | None) -> None:
    from retrieval.encoders import PRECISIONS, SPEC_FORMS

    help_spec = "encoder spec (" + ", ".join(SPEC_FORMS) + ")"
    if default_spec:
        help_spec += f"; default {default_spec}"
    else:
        help_spec += "; default: the one that built the index"
    p.add_argument("--encoder", default=default_spec, metavar="SPEC", help=help_spec)
    p.add_argument("--weights", metavar="FILE", help="weights file for 'open_clip:ARCH' or 'timm:NAME' specs")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="weight precision (default auto)")


def _vote_args(p: argparse.ArgumentParser) -> None:
    from retrieval.vote import DEFAULT_K, DEFAULT_TEMPERATURE, DEFAULT_UNKNOWN_THRESHOLD

    p.add_argument(
        "--knn", type=int, default=None,
        help=f"neighbours that vote (default: the probe's chosen value, else {DEFAULT_K})",
    )
    p.add_argument(
        "--temperature", type=float, default=None,
        help=f"vote weight exp(similarity/T) (default: the probe's, else {DEFAULT_TEMPERATURE})",
    )
    p.add_argument(
        "--unknown-threshold", type=float, default=None,
        help=f"best score under this means 'unknown' (default: the probe's calibrated one, else "
        f"{DEFAULT_UNKNOWN_THRESHOLD})",
    )
    p.add_argument(
        "--method", default="blend", choices=("blend", "knn", "probe"),
        help="blend (kNN + probe + text prior, whatever exists; default), knn only, or probe only",
    )
    p.add_argument("--country", help="ISO code or name (e.g. MA): favour species recorded in that country")


# ---------------------------------------------------------------------------- commands
def _encoder_config(args: argparse.Namespace):
    """The encoder options of ``index build`` and ``clean`` as an EncoderConfig."""
    from retrieval.encoders import EncoderConfig

    return EncoderConfig(spec=args.encoder, weights=args.weights, device=args.device, precision=args.precision,
                         batch_size=args.batch_size)


def cmd_index_build(args: argparse.Namespace) -> int:
    from index.vectors import VectorIndexConfig
    from retrieval.session import build_gallery

    result = build_gallery(
        args.index,
        args.dataset,
        args.root,
        metadata=args.metadata,
        encoder=_encoder_config(args),
        index_config=VectorIndexConfig(kind=args.index_kind),
        workers=args.workers,
        progress=not args.quiet,
        clean=_build_clean_config(args),
    )
    g = result.gallery
    _emit(
        f"gallery {g.root}: {len(g)} references, {len(g.species())} species, "
        f"encoder {g.encoder_spec}, {g.index.kind} index\n"
        f"{result.report.summary()}"
    )
    for warning in result.scan.warnings:
        _emit(f"warning: {warning}")
    if result.clean is not None:
        _emit(result.clean.summary())
    return 0


def _build_clean_config(args: argparse.Namespace):
    if not args.clean:
        return None
    from retrieval.clean import CleanConfig

    return CleanConfig(prompts=args.prompts, threshold=args.clean_threshold, duplicates=False)


def cmd_clean(args: argparse.Namespace) -> int:
    from index.gallery import Gallery
    from retrieval.clean import CleanConfig, clean, restore_exclusions

    if args.restore:
        if not args.index:
            raise ValueError("--restore needs --index DIR: the gallery whose exclusions to undo")
        if args.apply:
            raise ValueError("--apply and --restore undo each other; give one of them")
        gallery = Gallery.open(args.index)
        found = restore_exclusions(gallery, args.restore)
        _emit(f"restored {found} references ({args.restore}); gallery {gallery.root} now has {len(gallery)} "
              "searchable references")
        return 0
    if not args.report:
        raise ValueError("--report DIR is required: where findings.csv and contact_sheet.html are written")
    kinds = [k.strip() for k in args.apply_to.split(",") if k.strip()]
    result = clean(
        dataset=args.dataset,
        root=args.root,
        metadata=args.metadata,
        index=args.index,
        against=args.against,
        encoder=_encoder_config(args),
        config=CleanConfig(prompts=args.prompts, threshold=args.threshold, dup_threshold=args.dup_threshold,
                           zero_shot=not args.no_zero_shot, duplicates=not args.no_duplicates),
        report_dir=args.report,
        apply=args.apply,
        apply_kinds=kinds,
        workers=args.workers,
        progress=not args.quiet,
    )
    _emit(result.summary())
    if result.applied is not None and result.applied.excluded:
        from retrieval.probe import has_probe

        if has_probe(args.index):
            _emit(f"note: the probe of {args.index} was trained with the excluded references; retrain it with "
                  f"'speciesid probe train --index {args.index}'")
    return 0


def cmd_index_info(args: argparse.Namespace) -> int:
    from index.gallery import Gallery

    g = Gallery.open(args.index)
    info = {
        "index": str(g.root),
        "encoder": g.info["encoder"],
        "references": len(g),
        "species": len(g.species()),
        "index_kind": g.index.kind,
        "store_version": g.store.version,
    }
    _emit(json.dumps(info, indent=2))
    return 0


def _open_identifier(args: argparse.Namespace):
    from retrieval.session import open_identifier
    from retrieval.vote import VoteConfig

    ident = open_identifier(
        args.index,
        encoder=args.encoder,
        weights=args.weights,
        device=args.device,
        precision=args.precision,
        use_probe=args.method != "knn",
    )
    if args.knn is not None or args.temperature is not None or args.unknown_threshold is not None:
        c = ident.config
        ident.config = VoteConfig(
            k=args.knn if args.knn is not None else c.k,
            temperature=args.temperature if args.temperature is not None else c.temperature,
            unknown_threshold=args.unknown_threshold if args.unknown_threshold is not None else c.unknown_threshold,
        )
    return ident


def _presence(country: str | None) -> dict[str, bool] | None:
    if not country:
        return None
    from index.geography import country_presence, resolve_country

    return country_presence(resolve_country(country))


def cmd_identify(args: argparse.Namespace) -> int:
    from retrieval.pipeline import embed_sources

    paths = _expand_images(args.images)
    ident = _open_identifier(args)
    emb, errors = embed_sources(paths, ident.encoder, progress=not args.quiet and len(paths) > 20)
    ok = [i for i, e in enumerate(errors) if e is None]
    presence = _presence(args.country)
    answers = (
        dict(zip(ok, ident.identify_embeddings(emb[ok], top=args.k, method=args.method, presence=presence),
                 strict=True))
        if ok
        else {}
    )
    results = []
    for i, path in enumerate(paths):
        if errors[i] is not None:
            results.append({"image": str(path), "error": errors[i]})
        else:
            results.append({"image": str(path), **answers[i].to_dict(neighbours=args.neighbours)})
    if args.format == "json":
        _emit(json.dumps(results, indent=2))
    elif args.format == "csv":
        rows = []
        for r in results:
            for rank, p in enumerate(r.get("predictions", []), 1):
                rows.append({"image": r["image"], "rank": rank, **p, "unknown": r["unknown"]})
            if "error" in r:
                rows.append({"image": r["image"], "error": r["error"]})
        fields = ["image", "rank", "species", "score", "common_name", "genus", "family", "venomous", "unknown"]
        _emit(_csv(rows, [*fields, "error"]))
    else:
        for r in results:
            _emit(f"{r['image']}")
            if "error" in r:
                _emit(f"  error: {r['error']}")
                continue
            if r["unknown"]:
                _emit("  UNKNOWN: no species is supported strongly enough (best candidates below)")
            for rank, p in enumerate(r["predictions"], 1):
                name = f"{p['species']}" + (f" ({p['common_name']})" if p["common_name"] else "")
                venom = "  VENOMOUS" if p["venomous"] else ""
                _emit(f"  {rank}. {p['score']:6.1%}  {name}  [{p['family'] or '?'}]{venom}")
            if r.get("venomous_score") is not None:
                _emit(f"  probability medically important venomous: {r['venomous_score']:.1%}")
    failed = sum(e is not None for e in errors)
    if failed:
        logger.warning("%d of %d photos could not be read", failed, len(paths))
    return 1 if failed else 0


def cmd_search(args: argparse.Namespace) -> int:
    from retrieval.pipeline import embed_sources

    paths = _expand_images([args.image])
    ident = _open_identifier(args)
    emb, errors = embed_sources(paths[:1], ident.encoder)
    if errors[0] is not None:
        raise ValueError(f"{paths[0]}: {errors[0]}")
    neighbours = [n.to_dict() for n in ident.search(emb, args.k)[0]]
    if args.format == "json":
        _emit(json.dumps({"image": str(paths[0]), "neighbours": neighbours}, indent=2))
    elif args.format == "csv":
        fields = ["id", "similarity", "species", "common_name", "genus", "family", "venomous", "path"]
        _emit(_csv(neighbours, fields))
    else:
        for rank, n in enumerate(neighbours, 1):
            _emit(f"{rank:3d}. {n['similarity']:.4f}  #{n['id']}  {n['species']}  {n['path']}")
    return 0


def _parse_yes_no(value: str | None) -> bool | None:
    if value is None:
        return None
    v = value.strip().lower()
    if v in ("yes", "y", "true", "1"):
        return True
    if v in ("no", "n", "false", "0"):
        return False
    raise ValueError(f"--venomous takes yes or no, not {value!r}")


def cmd_references_add(args: argparse.Namespace) -> int:
    from index.datasets import new_species_references
    from retrieval.pipeline import add_references
    from retrieval.session import open_gallery

    paths = _expand_images(args.images)
    gallery, enc = open_gallery(args.index, encoder=args.encoder, weights=args.weights, device=args.device)
    species, records, prior = new_species_references(
        args.species, gallery.species(), paths, dataset="added", common_name=args.common_name,
        venomous=_parse_yes_no(args.venomous), genus=args.genus, family=args.family,
    )
    report = add_references(gallery, enc, records, progress=not args.quiet and len(paths) > 20)
    status = "existing" if prior else "new"
    _emit(f"{species} ({status} species): {report.summary()}")
    if report.ids:
        _emit(f"ids: {', '.join(map(str, report.ids))}")
    return 0 if report.added or not report.skipped else 1


def cmd_references_delete(args: argparse.Namespace) -> int:
    from index.gallery import Gallery

    gallery = Gallery.open(args.index)
    found = gallery.delete(args.ids)
    _emit(f"deleted {found} of {len(args.ids)} references")
    return 0 if found == len(args.ids) else 1


def cmd_probe_train(args: argparse.Namespace) -> int:
    from retrieval.session import train_gallery_probe

    result = train_gallery_probe(
        args.index,
        val_dataset=args.val_dataset,
        val_root=args.val_root,
        val_metadata=args.val_metadata,
        checklist=args.checklist,
        text_strength=args.text_strength,
        folds=args.folds,
        device=args.device,
        progress=not args.quiet,
    )
    p = result.probe
    s = p.calibration
    m = s.metrics
    _emit(
        f"probe: {len(p.species)} species, {p.trained_on} references, trained in {result.seconds_train:.1f} s "
        f"(settings chosen in {result.seconds_select:.1f} s on {s.selected_on})\n"
        f"chosen: C={s.C} k={s.k} T={s.temperature} blend weight={s.blend_weight} "
        f"unknown threshold={s.unknown_threshold}\n"
        f"selection top-1 ({int(m.get('queries', 0))} queries): kNN {m.get('knn_top1', 0):.3f}, "
        f"probe {m.get('probe_top1', 0):.3f}, blend {m.get('blend_top1', 0):.3f}; unknown threshold gives "
        f"precision {m.get('unknown_precision', float('nan')):.3f} at coverage {m.get('unknown_coverage', 0):.3f}"
    )
    if result.text_species:
        _emit(f"text prior: {result.text_species} species (gallery + checklist)")
    return 0


def cmd_probe_import(args: argparse.Namespace) -> int:
    from retrieval.session import import_gallery_probe

    result = import_gallery_probe(
        args.index, args.from_dir, val_dataset=args.val_dataset, val_root=args.val_root,
        val_metadata=args.val_metadata, folds=args.folds, device=args.device, progress=not args.quiet,
    )
    p = result.probe
    s = p.calibration
    m = s.metrics
    _emit(
        f"probe: the head of {args.from_dir} ({len(p.species)} species), no training; settings chosen in "
        f"{result.seconds_select:.1f} s on {s.selected_on}\n"
        + (f"head probabilities calibrated on the validation photos: logits / {m['head_temperature']:.3g}\n"
           if "head_temperature" in m else "head probabilities uncalibrated (give --val-root to calibrate them)\n")
        + f"chosen: k={s.k} T={s.temperature} blend weight={s.blend_weight} unknown threshold={s.unknown_threshold}\n"
        f"selection top-1 ({int(m.get('queries', 0))} queries): kNN {m.get('knn_top1', 0):.3f}, "
        f"head {m.get('probe_top1', 0):.3f}, blend {m.get('blend_top1', 0):.3f}; unknown threshold gives "
        f"precision {m.get('unknown_precision', float('nan')):.3f} at coverage {m.get('unknown_coverage', 0):.3f}"
    )
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from finetune.augment import AugmentConfig
    from finetune.train import FinetuneConfig, FinetuneInterrupted, finetune

    config = FinetuneConfig(
        root=args.root, out=args.out, init=args.init, model=args.model, weights=args.weights,
        dataset=args.dataset, metadata=args.metadata, val_root=args.val_root, val_dataset=args.val_dataset,
        val_metadata=args.val_metadata, val_split=args.val_split, stage=args.stage, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, backbone_lr=args.backbone_lr, layer_decay=args.layer_decay,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, freeze_epochs=args.freeze_epochs,
        freeze_layers=args.freeze_layers, bn=args.bn, label_smoothing=args.label_smoothing, balance=args.balance,
        head_init=args.head_init, head_scale=args.head_scale, ema=args.ema, patience=args.patience,
        min_epochs=args.min_epochs,
        train_size=args.train_size, tta=args.tta, drop_rate=args.drop_rate, mixup=args.mixup, cutmix=args.cutmix,
        mix_prob=args.mix_prob, seed=args.seed, device=args.device,
        workers=args.workers, threads=args.threads, amp=not args.no_amp, time_limit=args.time_limit,
        resume="no" if args.no_resume else "auto",
        augment=AugmentConfig(
            scale=(args.crop_scale, 1.0), vflip=args.vflip, color_jitter=args.color_jitter,
            auto_augment=None if args.rand_augment in ("", "none") else args.rand_augment,
        ),
    )
    try:
        r = finetune(config, progress=not args.quiet)
    except FinetuneInterrupted as exc:
        sys.stderr.write(
            f"speciesid: fine-tuning interrupted after epoch {exc.epoch}; the checkpoint {exc.out}/checkpoint.pt "
            "is kept: run the same command again to resume\n"
        )
        return 130
    b = r.best
    _emit(
        f"fine-tuned {len(r.species)} species: {r.epochs_run} epochs in {r.seconds / 60:.1f} min ({r.stopped}); "
        f"best epoch {r.best_epoch}: val top-1 {b.get('val_top1', 0):.3f}, macro-F1 {b.get('val_macro_f1', 0):.3f}"
    )
    if r.final:
        f = r.final
        _emit(
            f"validation with the kept weights (gallery = training photos): head {f['head_top1']:.3f}, "
            f"kNN {f['knn_top1']:.3f}, blend {f['blend_top1']:.3f} (k={f['k']} T={f['temperature']} "
            f"w={f['blend_weight']})"
        )
    _emit(
        f"model: {r.out} (use --encoder timm:local-dir:{r.out}; log {r.out}/log.csv, curves {r.out}/curves.png)\n"
        f"its head as the gallery's probe: speciesid probe import --index DIR --from {r.out} [--val-root DIR]"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from index.datasets import load_dataset, lookup_taxon
    from retrieval.metrics import EvalItem, evaluate, write_report
    from retrieval.pipeline import embed_sources

    scan = load_dataset(args.dataset, args.root, metadata=args.metadata)
    ident = _open_identifier(args)
    emb, errors = embed_sources([r.path for r in scan.records], ident.encoder, progress=not args.quiet,
                                desc="evaluating")
    ok = [i for i, e in enumerate(errors) if e is None]
    presence = _presence(args.country)
    methods = ["knn", "probe", "blend"] if ident.probe is not None else ["knn"]
    taxa = ident.taxa()
    venomous = {s: t.venomous for s, t in taxa.items()}
    for r in scan.records:
        if venomous.get(r.species) is None:
            info = lookup_taxon(r.species)
            venomous[r.species] = r.venomous if r.venomous is not None else (info.venomous if info else None)
    results = {}
    for method in methods:
        answers = ident.identify_embeddings(emb[ok], top=len(taxa) or 5, method=method, presence=presence)
        items = [
            EvalItem(
                truth=scan.records[i].species,
                scores=a.scores,
                unknown=a.unknown,
                country=scan.records[i].country,
                image=str(scan.records[i].path),
            )
            for i, a in zip(ok, answers, strict=True)
        ]
        results[method] = evaluate(items, venomous=venomous)
    notes = [
        f"gallery {ident.gallery.root} ({len(ident.gallery)} references, encoder {ident.gallery.encoder_spec})",
        f"queries: dataset {args.dataset} at {args.root}: {len(ok)} photos"
        + (f", {len(errors) - len(ok)} unreadable and skipped" if len(ok) < len(errors) else ""),
        f"kNN k={ident.config.k}, T={ident.config.temperature}, unknown threshold {ident.config.unknown_threshold}"
        + (f"; blend weight {ident.blend_weight}" if ident.probe is not None else "; no probe (kNN only)"),
    ]
    if args.country:
        notes.append(f"country prior: {args.country}")
    files = write_report(args.report, results, title=f"speciesid evaluation: {args.dataset}", notes=notes)
    for method, r in results.items():
        _emit(
            f"{method:6s} top-1 {r['top1']:.3f}  top-5 {r['top5']:.3f}  macro-F1 {r['macro_f1']:.3f}  "
            f"venomous recall {_fmt_opt(r['venomous_recall'])}  coverage {r['coverage']:.3f}  "
            f"accuracy answered {_fmt_opt(r['accuracy_answered'])}"
        )
    _emit("report: " + ", ".join(str(p) for p in files.values()))
    return 0


def _fmt_opt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app
    from api.settings import Settings
    from index.gallery import read_gallery_info

    read_gallery_info(args.index)  # fail fast, with the clear message, before uvicorn starts
    overrides = {"index": args.index}
    if args.device:
        overrides["device"] = args.device
    settings = Settings(**overrides)
    if not settings.key_list():
        logger.warning("no SPECIESID_API_KEYS set: writes (adding/deleting references) are disabled")
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0


def cmd_species_list(args: argparse.Namespace) -> int:
    from index.gallery import Gallery

    species = [
        {
            "species": s.species,
            "common_name": s.common_name,
            "genus": s.genus,
            "family": s.family,
            "venomous": s.venomous,
            "count": s.count,
        }
        for s in Gallery.open(args.index).species()
    ]
    if args.format == "json":
        _emit(json.dumps(species, indent=2))
    elif args.format == "csv":
        _emit(_csv(species, ["species", "common_name", "genus", "family", "venomous", "count"]))
    else:
        for s in species:
            common = f" ({s['common_name']})" if s["common_name"] else ""
            _emit(
                f"{s['count']:6d}  {s['species']}{common}  [{s['family'] or '?'}]  "
                f"venomous: {_fmt_bool(s['venomous'])}"
            )
        _emit(f"{len(species)} species, {sum(s['count'] for s in species)} references")
    return 0


def cmd_encoders_list(args: argparse.Namespace) -> int:
    from retrieval.encoders import ALIASES, list_encoders

    for form in list_encoders():
        _emit(f"{form}" + (f"  = {ALIASES[form]}" if form in ALIASES else ""))
    return 0


# ------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for tests and docs)."""
    from index.datasets import DATASETS

    parser = argparse.ArgumentParser(
        prog="speciesid",
        description="Identify animal species from photos by embedding retrieval.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # index
    p_index = sub.add_parser("index", help="build and inspect galleries")
    s_index = p_index.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    p = s_index.add_parser("build", help="embed a dataset into a gallery (LanceDB store + FAISS index)")
    p.add_argument("--dataset", required=True, choices=DATASETS, help="dataset layout of --root")
    p.add_argument("--root", required=True, help="folder holding the photos")
    p.add_argument("--metadata", help="metadata CSV (required for snakeclef2021; rare-species: metadata.csv)")
    p.add_argument("--index", required=True, metavar="DIR", help="gallery directory (created if new)")
    _encoder_args(p, default_spec="bioclip")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--workers", type=int, default=None, help="decode threads (default: half the cores)")
    p.add_argument(
        "--index-kind",
        default="auto",
        choices=("auto", "flat", "hnsw", "ivf"),
        help="FAISS index: exact flat, or approximate (auto: flat below 50k references, HNSW above)",
    )
    p.add_argument(
        "--clean", action="store_true",
        help="after building, run the zero-shot filter (text-capable encoders) and exclude off-target "
        "references (reversible: 'speciesid clean --restore'); report in DIR/clean-report",
    )
    p.add_argument("--prompts", metavar="FILE", help="with --clean: prompt file or group (snakes, animals); "
                   "default from the dataset's taxon group")
    p.add_argument("--clean-threshold", type=float, default=0.5, metavar="P",
                   help="with --clean: off-target probability at which a reference is excluded (default 0.5)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_index_build)
    p = s_index.add_parser("info", help="show what a gallery holds and which encoder built it")
    p.add_argument("--index", required=True, metavar="DIR")
    p.set_defaults(func=cmd_index_info)

    # identify
    p = sub.add_parser("identify", help="identify the species in photos")
    p.add_argument("images", nargs="+", metavar="IMG", help="photo files or folders of photos")
    p.add_argument("--index", required=True, metavar="DIR", help="gallery directory")
    p.add_argument("--k", type=int, default=5, help="species to report per photo (default 5)")
    p.add_argument("--neighbours", type=int, default=5, help="evidence photos to report (default 5)")
    p.add_argument("--format", default="table", choices=FORMATS)
    _vote_args(p)
    _encoder_args(p, default_spec=None)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_identify)

    # search
    p = sub.add_parser("search", help="raw nearest reference photos of one photo")
    p.add_argument("image", metavar="IMG")
    p.add_argument("--index", required=True, metavar="DIR")
    p.add_argument("--k", type=int, default=10, help="neighbours (default 10)")
    p.add_argument("--format", default="table", choices=FORMATS)
    _vote_args(p)
    _encoder_args(p, default_spec=None)
    p.set_defaults(func=cmd_search)

    # references
    p_ref = sub.add_parser("references", help="add or delete reference photos")
    s_ref = p_ref.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    p = s_ref.add_parser("add", help="add reference photos of a species (created if new); no retraining")
    p.add_argument("images", nargs="+", metavar="IMG", help="photo files or folders")
    p.add_argument("--index", required=True, metavar="DIR")
    p.add_argument("--species", required=True, help='binomial, e.g. "Naja haje"')
    p.add_argument("--common-name", help="English common name")
    p.add_argument("--venomous", help="yes or no: medically important venomous (default: from taxonomy)")
    p.add_argument("--genus", help="genus (default: first word of --species)")
    p.add_argument("--family", help="family (default: from the snake taxonomy when known)")
    p.add_argument("--encoder", default=None, help="(default: the gallery's encoder)")
    p.add_argument("--weights", default=None, help="(default: the gallery's weights)")
    p.add_argument("--device", default="auto")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_references_add)
    p = s_ref.add_parser("delete", help="delete reference photos by id")
    p.add_argument("ids", nargs="+", type=int, metavar="ID")
    p.add_argument("--index", required=True, metavar="DIR")
    p.set_defaults(func=cmd_references_delete)

    # probe
    p_probe = sub.add_parser("probe", help="linear-probe head blended with the kNN vote")
    s_probe = p_probe.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    p = s_probe.add_parser(
        "train",
        help="train the probe on the gallery; choose k, T, blend weight, unknown threshold on validation data",
    )
    p.add_argument("--index", required=True, metavar="DIR")
    p.add_argument("--val-dataset", default="folder", choices=DATASETS, help="layout of --val-root")
    p.add_argument("--val-root", help="labelled validation photos (default: cross-validation on the gallery)")
    p.add_argument("--val-metadata", help="metadata CSV of the validation set (snakeclef2021, rare-species)")
    p.add_argument("--folds", type=int, default=3, help="cross-validation folds without --val-root (default 3)")
    p.add_argument("--checklist", help="'moroccan' or a file of binomials: photo-less species for the text prior")
    p.add_argument("--text-strength", type=float, default=1.0,
                   help="text prior weight, in photos' worth of evidence (default 1)")
    p.add_argument("--device", default="auto")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_probe_train)
    p = s_probe.add_parser(
        "import",
        help="use a fine-tuned network's head (speciesid finetune --out DIR) as the probe of a gallery built with "
        "that network; no training, only k, T, blend weight and unknown threshold are chosen",
    )
    p.add_argument("--index", required=True, metavar="DIR", help="gallery built with --encoder timm:local-dir:OUT")
    p.add_argument("--from", dest="from_dir", required=True, metavar="OUT", help="the fine-tuned model folder")
    p.add_argument("--val-dataset", default="folder", choices=DATASETS, help="layout of --val-root")
    p.add_argument("--val-root", help="labelled validation photos to choose the settings on (recommended; default: "
                   "cross-validation over the gallery with the head fixed, which favours the head since it was "
                   "trained on those photos)")
    p.add_argument("--val-metadata", help="metadata CSV of the validation set (snakeclef2021, rare-species)")
    p.add_argument("--folds", type=int, default=3, help="cross-validation folds without --val-root (default 3)")
    p.add_argument("--device", default="auto")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_probe_import)

    # finetune
    from api.cli_finetune import register as register_finetune  # the options are FinetuneConfig's fields
    register_finetune(sub, DATASETS)

    # evaluate
    p = sub.add_parser("evaluate", help="identify a labelled set and write a JSON + Markdown report with plots")
    p.add_argument("--index", required=True, metavar="DIR")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--root", required=True)
    p.add_argument("--metadata")
    p.add_argument("--report", default="report", metavar="DIR", help="where to write the report (default report/)")
    _vote_args(p)
    _encoder_args(p, default_spec=None)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)

    # clean
    _clean_parser(sub, DATASETS)

    # species
    p_sp = sub.add_parser("species", help="species in a gallery")
    s_sp = p_sp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    p = s_sp.add_parser("list", help="species with reference counts, family and venomous flag")
    p.add_argument("--index", required=True, metavar="DIR")
    p.add_argument("--format", default="table", choices=FORMATS)
    p.set_defaults(func=cmd_species_list)

    # serve
    p = sub.add_parser(
        "serve",
        help="run the HTTP API and web page (settings from SPECIESID_* environment variables or .env)",
    )
    p.add_argument("--index", required=True, metavar="DIR", help="gallery directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--device", default=None, help="encoder device (default SPECIESID_DEVICE or auto)")
    p.set_defaults(func=cmd_serve)

    # encoders
    p_enc = sub.add_parser("encoders", help="encoder specs")
    s_enc = p_enc.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    p = s_enc.add_parser("list", help="the accepted encoder spec forms")
    p.set_defaults(func=cmd_encoders_list)
    return parser


def _finetune_parser(sub, datasets: Sequence[str]) -> None:
    from finetune.data import BALANCE_MODES
    from finetune.train import STAGE_DEFAULTS, STAGES

    def dflt(key: str) -> str:
        return "stage default: " + ", ".join(f"{s} {STAGE_DEFAULTS[s][key]}" for s in STAGES)

    p = sub.add_parser(
        "finetune",
        help="fine-tune a timm CNN encoder on labelled photos (stage global or local); the output folder is an "
        "encoder (--encoder timm:local-dir:OUT) whose head is the gallery's probe (speciesid probe import)",
        description="Fine-tune a timm CNN on class-per-folder (or other --dataset) photos. Stage 'global' trains "
        "on a big dataset with a full head; stage 'local' (LP-FT) starts the head as a linear probe on frozen "
        "features, keeps the backbone frozen for the first epoch(s), then trains it at a smaller, layer-wise "
        "decayed learning rate with batch-norm statistics frozen and an EMA of the weights. Early stopping on "
        "validation macro-F1 keeps the best weights. Every epoch writes OUT/log.csv, OUT/curves.png and "
        "OUT/checkpoint.pt: after Ctrl-C or a crash, the same command resumes after the last finished epoch.",
    )
    p.add_argument("--dataset", default="folder", choices=datasets, help="dataset layout of --root (default folder)")
    p.add_argument("--root", required=True, metavar="DIR", help="training photos")
    p.add_argument("--metadata", help="metadata CSV (snakeclef2021; rare-species: default ROOT/metadata.csv)")
    p.add_argument("--val-root", metavar="DIR", help="validation photos (early stopping, best epoch)")
    p.add_argument("--val-dataset", default=None, choices=datasets, help="layout of --val-root (default --dataset)")
    p.add_argument("--val-metadata", help="metadata CSV of the validation set")
    p.add_argument("--val-split", type=float, default=0.15, metavar="F",
                   help="without --val-root: hold out this fraction of each species (stratified, seeded; default 0.15)")
    p.add_argument("--init", metavar="SPEC",
                   help="starting encoder: any timm spec (timm:local-dir:DIR, timm:NAME [--weights FILE], "
                   "timm:hf-hub:ORG/REPO), a previous stage's output folder, or a weights file with --model")
    p.add_argument("--model", metavar="timm:NAME", help="architecture for a weights-file --init (alone: hub weights)")
    p.add_argument("--weights", metavar="FILE", help="weights file for --init timm:NAME")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (timm local-dir + probe + log)")
    p.add_argument("--stage", default="local", choices=STAGES, help="global or local (default local)")
    p.add_argument("--epochs", type=int, help=dflt("epochs"))
    p.add_argument("--batch-size", type=int, default=32, help="photos per step (default 32)")
    p.add_argument("--lr", type=float, help="head learning rate, AdamW (" + dflt("lr") + ")")
    p.add_argument("--backbone-lr", type=float, help="last backbone layer's learning rate (" + dflt("backbone_lr") + ")")
    p.add_argument("--layer-decay", type=float, help="learning-rate factor per earlier layer group ("
                   + dflt("layer_decay") + ")")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warmup, then cosine decay (default 1)")
    p.add_argument("--freeze-epochs", type=int, help="first epochs with the backbone frozen (" + dflt("freeze_epochs") + ")")
    p.add_argument("--freeze-layers", type=int, metavar="N",
                   help="the first N layer groups (stem, blocks) never train: cheaper backward ("
                   + dflt("freeze_layers") + ")")
    p.add_argument("--bn", choices=("eval", "train"), help="batch-norm statistics frozen or updated (" + dflt("bn") + ")")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="default 0.1")
    p.add_argument("--balance", choices=BALANCE_MODES, help="class imbalance: class-weighted loss, class-balanced "
                   "sampling, or none (" + dflt("balance") + ")")
    p.add_argument("--head-init", choices=("probe", "keep", "random"),
                   help="probe = linear probe on frozen features; keep = the init's head when its species match ("
                   + dflt("head_init") + ")")
    p.add_argument("--head-scale", type=float, default=24.0, help="cosine head logit scale (default 24)")
    p.add_argument("--ema", type=float, help="EMA decay of the weights, 0 = off (" + dflt("ema") + ")")
    p.add_argument("--patience", type=int, help="early stopping: epochs without a better val macro-F1 ("
                   + dflt("patience") + ")")
    p.add_argument("--min-epochs", type=int, help="no early stopping before this epoch (" + dflt("min_epochs") + ")")
    p.add_argument("--train-size", type=int, metavar="PX", help="training resolution (default: the model's own)")
    p.add_argument("--crop-scale", type=float, default=0.35, help="RandomResizedCrop smallest area (default 0.35)")
    p.add_argument("--color-jitter", type=float, default=0.3, help="colour jitter strength (default 0.3; 0 = off)")
    p.add_argument("--rand-augment", default="rand-m9-mstd0.5", metavar="POLICY",
                   help="timm RandAugment policy (default rand-m9-mstd0.5; 'none' = off)")
    p.add_argument("--vflip", type=float, default=0.0, help="vertical flip probability (default 0)")
    p.add_argument("--drop-rate", type=float, default=0.0, help="dropout on the pooled features (default 0)")
    p.add_argument("--mixup", type=float, metavar="ALPHA", help="mixup Beta(alpha, alpha), 0 = off (" + dflt("mixup") + ")")
    p.add_argument("--cutmix", type=float, metavar="ALPHA", help="CutMix Beta(alpha, alpha), 0 = off; with mixup, one "
                   "of the two per mixed batch (" + dflt("cutmix") + ")")
    p.add_argument("--mix-prob", type=float, metavar="P", help="share of batches mixed (" + dflt("mix_prob") + ")")
    p.add_argument("--tta", action="store_true", help="validate with horizontal-flip test-time augmentation")
    p.add_argument("--time-limit", type=float, metavar="MIN", help="stop before an epoch would run past MIN minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    p.add_argument("--workers", type=int, help="loader processes (default 1 on CPU, 4 on CUDA)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-resume", action="store_true",
                   help="start afresh even if OUT holds a checkpoint or a model (they are replaced)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_finetune)


def _clean_parser(sub, datasets: Sequence[str]) -> None:
    from retrieval.clean import APPLY_KINDS, DEFAULT_DUP_THRESHOLD, DEFAULT_THRESHOLD, PROMPT_GROUPS
    from retrieval.encoders import PRECISIONS, SPEC_FORMS

    p = sub.add_parser(
        "clean",
        help="find off-target photos (zero-shot text prompts), duplicates and leakage; exclude them reversibly",
        description="Zero-shot data cleaning. Scores every photo against target and off-target text prompts "
        "(text-capable encoders such as bioclip; skipped with a notice for image-only ones), finds exact and "
        "near duplicates in the set and against --against (leakage), and writes findings.csv + "
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
                   help="encoder spec (" + ", ".join(SPEC_FORMS) + "); default: the gallery's with --index, "
                   "else bioclip")
    p.add_argument("--weights", metavar="FILE", help="weights file for 'open_clip:ARCH' or 'timm:NAME' specs")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="weight precision (default auto)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--workers", type=int, default=None, help="decode threads (default: half the cores)")
    p.add_argument("--prompts", metavar="FILE",
                   help="prompt file ([target] / [off-target: NAME] sections, see docs/cleaning.md) or a shipped "
                   f"group ({', '.join(PROMPT_GROUPS)}); default: from the dataset's taxon group")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, metavar="P",
                   help=f"flag a photo when its off-target probability is >= P (default {DEFAULT_THRESHOLD})")
    p.add_argument("--dup-threshold", type=float, default=DEFAULT_DUP_THRESHOLD, metavar="COS",
                   help="near-duplicate / near-leak when the embeddings' cosine similarity is >= COS "
                   f"(default {DEFAULT_DUP_THRESHOLD}, chosen on real photo pairs with MobileNetV1)")
    p.add_argument("--no-zero-shot", action="store_true", help="skip the zero-shot filter")
    p.add_argument("--no-duplicates", action="store_true", help="skip duplicate and leakage detection")
    p.add_argument("--report", metavar="DIR", help="where to write findings.csv, contact_sheet.html, summary.json "
                   "(required unless --restore)")
    p.add_argument("--apply", action="store_true",
                   help="exclude the flagged references from the --index gallery's search and probe training "
                   "(reversible with --restore; nothing is deleted)")
    p.add_argument("--apply-to", default="off-target", metavar="KINDS",
                   help="comma-separated finding kinds --apply excludes (" + ", ".join(APPLY_KINDS) + "; default "
                   "off-target). Duplicate groups keep their oldest reference; leaks exclude the gallery's copy")
    p.add_argument("--restore", nargs="?", const="last", choices=("last", "all"),
                   help="bring excluded references of --index back: 'last' (default) undoes the last --apply run, "
                   "'all' clears every exclusion of the gallery")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_clean)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 1 some inputs failed, 2 error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"speciesid: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("speciesid: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
