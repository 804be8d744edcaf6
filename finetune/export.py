"""A fine-tuned network as a timm ``local-dir`` folder whose head is also the gallery's probe.

``OUT/`` holds:

- ``model.safetensors`` + ``config.json``: timm's own format (``architecture``, ``num_classes``,
  ``num_features``, ``global_pool``, ``model_args``, ``pretrained_cfg``), plus ``label_names`` (the species, in
  head order) and a ``speciesid`` block (stage, init spec, epochs, best epoch, validation figures). So
  ``--encoder timm:local-dir:OUT`` works (timm drops the head for ``num_classes=0``: pooled penultimate
  features), and ``timm.create_model("local-dir:OUT", pretrained=True)`` is the classifier.
- ``probe.npz`` + ``probe.json``: the same head as a :class:`~finetune.probe.LinearProbe` (weight =
  ``scale * normalize(W)``, bias 0) recorded with the fingerprint of ``timm:local-dir:OUT``. On the gallery's
  L2-normalised embeddings it gives exactly the cosine head's training-time probabilities.
- ``log.csv``, ``curves.png``: the training history.

``speciesid probe import`` copies the probe beside a gallery built with this encoder and chooses only the
blend settings (k, T, blend weight, unknown threshold): no probe training.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from finetune.model import CosineHead, InitSource
from finetune.probe import LinearProbe, ProbeSettings
from retrieval.calibrate import SelectionGrid, select_settings
from retrieval.encoders import seeded_init

logger = logging.getLogger(__name__)

SPECIESID_KEY = "speciesid"
_DROP_CFG_KEYS = ("file", "source", "url", "hf_hub_id", "hf_hub_filename", "state_dict", "label_names")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def _atomic_bytes(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def classifier_name(model: nn.Module) -> str:
    """Dotted name of a timm model's classifier module."""
    clf = model.get_classifier()
    for name, mod in model.named_modules():
        if mod is clf and name:
            return name
    raise ValueError(f"cannot find the classifier module of {type(model).__name__}")


def full_model(backbone: nn.Module, head: CosineHead, model_args: dict) -> tuple[nn.Module, str]:
    """The timm architecture with ``num_classes = len(head)``: backbone weights + the head as its classifier."""
    import timm

    arch = backbone.pretrained_cfg.get("architecture") or backbone.default_cfg.get("architecture")
    weight = head.export_weight()
    n_classes = weight.shape[0]
    with seeded_init():
        model = timm.create_model(arch, pretrained=False, num_classes=n_classes, **model_args)
    missing, unexpected = model.load_state_dict(backbone.state_dict(), strict=False)
    name = classifier_name(model)
    bad = [k for k in missing if not k.startswith(name + ".")]
    if bad or unexpected:
        raise RuntimeError(f"{arch}: backbone and classifier model differ beyond the head ({bad[:5]}, {unexpected[:5]})")
    clf = model.get_classifier()
    with torch.no_grad():
        clf.weight.copy_(weight.reshape(clf.weight.shape).to(clf.weight.dtype))
        if getattr(clf, "bias", None) is not None:
            clf.bias.zero_()
    return model.eval(), name


def save_finetuned(
    out: str | Path,
    backbone: nn.Module,
    head: CosineHead,
    species: Sequence[str],
    source: InitSource,
    info: dict,
    *,
    trained_on: int = 0,
) -> LinearProbe:
    """Write ``model.safetensors`` + ``config.json`` (timm local-dir) and the head as ``probe.npz/json``."""
    from safetensors.torch import save_file

    from retrieval.encoders import create_encoder

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    backbone = backbone.to("cpu")
    model, clf_name = full_model(backbone, head, source.model_args)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    _atomic_bytes(out / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    pcfg = {k: v for k, v in dict(backbone.pretrained_cfg).items() if k not in _DROP_CFG_KEYS}
    pcfg["architecture"] = model.pretrained_cfg.get("architecture") or pcfg.get("architecture")
    pcfg["num_classes"] = len(species)
    pcfg["classifier"] = clf_name
    pool = getattr(model, "global_pool", None)
    pool_type = getattr(pool, "pool_type", pool if isinstance(pool, str) else "avg") or "avg"
    config = {
        "architecture": pcfg["architecture"],
        "num_classes": len(species),
        "num_features": int(getattr(model, "num_features", 0)),
        "global_pool": pool_type,
        "model_args": source.model_args,
        "pretrained_cfg": pcfg,
        "label_names": list(species),
        SPECIESID_KEY: info,
    }
    text = json.dumps(_jsonable(config), indent=2)
    _atomic_bytes(out / "config.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    enc = create_encoder(f"timm:local-dir:{out}", device="cpu", precision="fp32")
    weight = head.export_weight().numpy().astype(np.float32)
    probe = LinearProbe(
        species=list(species),
        weight=weight,
        bias=np.zeros(len(species), dtype=np.float32),
        fingerprint=enc.fingerprint,
        settings=ProbeSettings(C=0.0, selected_on="default", metrics={
            k: float(v) for k, v in (info.get("val") or {}).items() if isinstance(v, (int, float))}),
        trained_on=trained_on,
        source=f"finetune:{out}",
    )
    probe.save(out)
    return probe


def read_finetuned(folder: str | Path) -> dict:
    """``config.json`` of a fine-tuned folder (raises when it is not one)."""
    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{folder} is not a fine-tuned model folder (no config.json)")
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    if SPECIESID_KEY not in cfg:
        raise ValueError(f"{folder} is a timm folder but not the output of 'speciesid finetune'")
    return cfg


def digest_of(fingerprint: str) -> str:
    """The weights part of an encoder fingerprint (``spec#digest`` -> ``digest``)."""
    return fingerprint.rsplit("#", 1)[-1]


def fit_head_temperature(
    probe: LinearProbe, embeddings: np.ndarray, labels: Sequence[str], grid: Sequence[float] | None = None
) -> float:
    """The softmax temperature of a fixed head that minimises log-loss on held-out photos.

    A fine-tuned head trained with label smoothing and mixup is under-confident (on ph-snakes val: ECE 0.20,
    0.05 after scaling); dividing its logits by the temperature changes no ranking, only the probabilities.
    Fit it on photos the head did not train on (the gallery's would make it over-confident).
    """
    cols = {s: i for i, s in enumerate(probe.species)}
    keep = [i for i, s in enumerate(labels) if s in cols]
    if not keep:
        raise ValueError("none of the held-out photos is of a species the head knows: cannot fit its temperature")
    z = probe.logits(np.asarray(embeddings, dtype=np.float32)[keep]).astype(np.float64)
    y = np.array([cols[labels[i]] for i in keep])
    grid = np.geomspace(0.1, 10.0, 81) if grid is None else np.asarray(grid, dtype=np.float64)

    def nll(t: float) -> float:
        zt = z / t
        zt -= zt.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(zt).sum(axis=1)) - zt[np.arange(len(y)), y]))

    return float(min(grid, key=nll))


def scaled_probe(probe: LinearProbe, temperature: float) -> LinearProbe:
    """A copy of ``probe`` whose logits are divided by ``temperature`` (same ranking)."""
    from dataclasses import replace

    return replace(probe, weight=(probe.weight / temperature).astype(np.float32),
                   bias=(probe.bias / temperature).astype(np.float32))


def select_blend_settings(
    embeddings: np.ndarray,
    labels: Sequence[str],
    probe: LinearProbe,
    *,
    val_embeddings: np.ndarray | None = None,
    val_labels: Sequence[str] | None = None,
    val_name: str = "val",
    folds: int = 3,
    grid: SelectionGrid | None = None,
    target_precision: float = 0.95,
    seed: int = 0,
) -> ProbeSettings:
    """Choose k, T, blend weight (best blended top-1) and the unknown threshold for a *fixed* probe.

    With validation photos: the whole gallery votes for them. Without: out-of-fold over the gallery (each
    fold's kNN votes from the other folds), the probe unchanged -- note the fine-tuned head saw these photos
    in training, so this favours the head; validation photos are the better choice.
    """
    return select_settings(
        embeddings, labels, fingerprint=probe.fingerprint, val_embeddings=val_embeddings, val_labels=val_labels,
        val_name=val_name, folds=folds, grid=grid, target_precision=target_precision, seed=seed, probe=probe,
    )
