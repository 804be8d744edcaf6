"""Make better encoders and probes.

- ``finetune.probe``: the linear probe (logistic regression on gallery embeddings; save/load).
- ``finetune.train``: two-stage fine-tuning of timm CNNs (``speciesid finetune``; see docs/finetune.md), with
  ``finetune.augment`` (transforms), ``finetune.data`` (photos, splits, class balance), ``finetune.model``
  (backbone + cosine head, layer-wise learning rates, EMA) and ``finetune.export`` (the output folder: a timm
  local-dir encoder whose head is also the gallery's probe; ``probe import`` settings for a fixed probe).
"""
