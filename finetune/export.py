"""A fine-tuned network as a timm ``local-dir`` folder whose head is also the gallery's probe.

``OUT/`` holds:

- ``model.safetensors`` + ``config.json``: timm's own format (``architecture``, ``num_classes``,
  ``num_features``, ``global_pool``, ``model_args``, ``pretrained_cfg``), plus ``label_names`` (the species, in
  head order) and a ``speciesid`` block (stage, init spec, epochs, best epoch, validation figures). So
  ``--encoder timm:local-dir:OUT`` works (timm drops the head for ``num_classes=0``: pooled penultimate
  features), and ``timm.create_model("local-dir:OUT", pretrained=True)`` is the classifier.
- ``probe.npz`` + ``probe.json``: the same head as a :class:`~retrieval.probe.LinearProbe` (weight =
  ``scale * normalize(W)``, bias 0) recorded with the fingerprint of ``timm:local-dir:OUT``. On the gallery's
  L2-normalised embeddings it gives exactly the cosine head's training-time probabilities.
- ``log.csv``, ``curves.png``: the training history.
- ``trained.csv``, and ``validation.csv`` (with --val-root) or ``heldout.csv`` (without): the photos the network
  trained on and those that chose its epoch (path, species, sha256), read by ``speciesid evaluate``;
  ``trained.csv`` also lists the photos that trained the runs it started from (``--init`` a run of ours, and
  so on), with the run's folder in its ``run`` column.

``speciesid probe import`` copies the probe beside a gallery built with this encoder and chooses only the
blend settings (k, T, blend weight, unknown threshold): no probe training.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from finetune.model import CosineHead, InitSource
from index.atomic import atomic_write
from index.formats import jsonable
from retrieval.encoders import FINETUNE_RECORD
from retrieval.probe import Calibration, LinearProbe
from retrieval.torch_encoders import seeded_init

logger = logging.getLogger(__name__)

SPECIESID_KEY = FINETUNE_RECORD  # the block of config.json that retrieval reads back
_DROP_CFG_KEYS = ("file", "source", "url", "hf_hub_id", "hf_hub_filename", "state_dict", "label_names")


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
    test_size: int | None = None,
) -> LinearProbe:
    """Write ``model.safetensors`` + ``config.json`` (timm local-dir) and the head as ``probe.npz/json``.

    ``test_size``: the side galleries embed at, recorded as timm's ``pretrained_cfg.test_input_size`` when it is
    not the model's own input size (``retrieval.encoders.finetuned_test_size`` reads it back)."""
    from safetensors.torch import save_file

    from retrieval.encoders import create_encoder

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    backbone = backbone.to("cpu")
    model, clf_name = full_model(backbone, head, source.model_args)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}

    def write_weights(tmp: Path) -> None:
        """safetensors creates its file owner-only: given the mode any new file gets here, as the other files."""
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # the umask applies, nothing is changed
        try:
            mode = os.fstat(fd).st_mode & 0o777
        finally:
            os.close(fd)
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, mode)

    atomic_write(out / "model.safetensors", write_weights)
    pcfg = {k: v for k, v in dict(backbone.pretrained_cfg).items() if k not in _DROP_CFG_KEYS}
    pcfg["architecture"] = model.pretrained_cfg.get("architecture") or pcfg.get("architecture")
    pcfg["num_classes"] = len(species)
    pcfg["classifier"] = clf_name
    pcfg.pop("test_input_size", None)  # the init's own (a hub model's) says nothing about this network
    if test_size and [3, test_size, test_size] != list(pcfg.get("input_size") or []):
        pcfg["test_input_size"] = [3, int(test_size), int(test_size)]
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
    text = json.dumps(jsonable(config), indent=2, allow_nan=False)  # NaN/inf as null (as the API writes them)
    atomic_write(out / "config.json", text)
    enc = create_encoder(f"timm:local-dir:{out}", device="cpu", precision="fp32", runtime="torch")  # its fingerprint
    weight = head.export_weight().numpy().astype(np.float32)
    probe = LinearProbe(
        species=list(species),
        weight=weight,
        bias=np.zeros(len(species), dtype=np.float32),
        fingerprint=enc.fingerprint,
        calibration=Calibration(C=0.0, selected_on="default", metrics={
            k: float(v) for k, v in (info.get("val") or {}).items() if isinstance(v, (int, float))}),
        trained_on=trained_on,
        source=f"finetune:{out}",
    )
    probe.save(out)
    return probe


def record_wall_seconds(folder: str | Path, seconds: float) -> None:
    """Add the whole run's wall seconds (known only once every folder is exported) to ``config.json``."""
    folder = Path(folder)
    cfg = read_finetuned(folder)
    cfg[SPECIESID_KEY]["process_wall_seconds"] = round(float(seconds), 1)
    atomic_write(folder / "config.json", json.dumps(jsonable(cfg), indent=2, allow_nan=False))  # an older NaN: null


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


def write_photo_list(out: str | Path, name: str, paths: Sequence[Path], labels: Sequence[str],
                     digests: Sequence[str | None] | None = None, *,
                     inherited: Sequence[Sequence[str]] | None = None) -> None:
    """``OUT/<name>``: photos of the run (path, species, sha256; the digest "" where unreadable), so that
    ``speciesid evaluate`` can tell evaluated photos that trained the network or chose its epoch
    (``retrieval.protocol``: ``TRAINED_FILE``, ``VAL_FILE``, ``HELDOUT_FILE``). ``digests``: already computed
    (else read now: ``retrieval.images.sha256_file``). ``inherited``: rows (path, species, sha256, run folder) of
    the photos that trained the runs this one started from (``retrieval.protocol.inherited_training``), written
    after this run's own under a fourth column ``run`` ("" on this run's rows), so that the list needs none of
    those folders later."""
    import csv
    import io

    from retrieval.images import sha256_file

    if digests is None:
        digests = [sha256_file(path) for path in paths]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "species", "sha256"] + (["run"] if inherited is not None else []))
    for path, label, digest in zip(paths, labels, digests, strict=True):
        writer.writerow([str(path), label, digest or ""] + ([""] if inherited is not None else []))
    for row in inherited or ():
        writer.writerow(list(row))
    atomic_write(Path(out) / name, buf.getvalue())
