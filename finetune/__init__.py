"""Make better encoders: two-stage fine-tuning of timm CNNs (``speciesid finetune``; see docs/finetune.md).

Laid out as timm's own training script: ``finetune.config`` (the options, each field also a CLI option),
``finetune.data`` (photos, split, loaders, class balance) with ``finetune.augment`` (transforms),
``finetune.model`` (backbone + cosine head, layer groups, freezing), ``finetune.engine`` (one epoch, validation,
optimiser / schedule / mixing / EMA from timm), ``finetune.checkpoint`` (resume, log.csv, curves.png),
``finetune.export`` (the output folder: a timm local-dir encoder whose head is also the gallery's probe) and
``finetune.train`` (the runner, :func:`finetune.train.finetune`).
"""
