"""``speciesid finetune`` (the coordinator's interim copy: the refactor-finetune branch replaces this module)."""

from __future__ import annotations

import argparse
import sys

from api.cli._common import emit


def register(sub: argparse._SubParsersAction) -> None:
    """Add the finetune command."""
    from finetune.data import BALANCE_MODES
    from finetune.train import STAGE_DEFAULTS, STAGES
    from index.datasets import DATASETS as datasets

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
    emit(
        f"fine-tuned {len(r.species)} species: {r.epochs_run} epochs in {r.seconds / 60:.1f} min ({r.stopped}); "
        f"best epoch {r.best_epoch}: val top-1 {b.get('val_top1', 0):.3f}, macro-F1 {b.get('val_macro_f1', 0):.3f}"
    )
    if r.final:
        f = r.final
        emit(
            f"validation with the kept weights (gallery = training photos): head {f['head_top1']:.3f}, "
            f"kNN {f['knn_top1']:.3f}, blend {f['blend_top1']:.3f} (k={f['k']} T={f['temperature']} "
            f"w={f['blend_weight']})"
        )
    emit(
        f"model: {r.out} (use --encoder timm:local-dir:{r.out}; log {r.out}/log.csv, curves {r.out}/curves.png)\n"
        f"its head as the gallery's probe: speciesid probe import --index DIR --from {r.out} [--val-root DIR]"
    )
    return 0
