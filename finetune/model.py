"""The network being fine-tuned: a timm backbone (pooled penultimate features) + a cosine head.

The gallery searches L2-normalised pooled features, so the head is a *cosine* classifier with no bias:
``logits = scale * normalize(W) @ normalize(f)``. It is exported as timm's own classifier with weight
``scale * normalize(W)`` and bias 0: the timm model's head then ranks species exactly as the cosine head
(every logit of a photo is scaled by the same ``|f|``), and ``LinearProbe(weight, bias=0)`` applied to the
gallery's normalised embeddings gives exactly the training-time probabilities. See ``finetune.export``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from finetune.config import FinetuneConfig
from retrieval.encoders import local_folder, parse_spec
from retrieval.torch_encoders import seeded_init

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


@dataclass
class InitSource:
    """Where the starting weights come from, resolved from ``--init`` / ``--model`` / ``--weights``."""

    spec: str  # as given (recorded in the output's config.json)
    timm_name: str  # what timm.create_model gets: NAME, local-dir:PATH or hf-hub:ORG/REPO
    pretrained: bool
    weights_file: str | None = None  # a weights file loaded over timm:NAME
    model_args: dict = field(default_factory=dict)  # architecture arguments saved with a local-dir model
    label_names: list[str] | None = None  # species of a previous stage's head (local-dir outputs)
    head_weight: torch.Tensor | None = None  # that head's weight, (n_classes, dim), when it has one


def _read_local_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path} is not a timm folder: config.json is missing")
    return json.loads(cfg_file.read_text(encoding="utf-8"))


def _classifier_weight(path: Path, cfg: dict) -> torch.Tensor | None:
    """The saved head's weight of a local-dir model (None when it was saved without one)."""
    name = (cfg.get("pretrained_cfg") or {}).get("classifier")
    file = path / "model.safetensors"
    if not name or not isinstance(name, str) or not file.is_file() or not cfg.get("num_classes"):
        return None
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:
        key = f"{name}.weight"
        if key not in fh.keys():
            return None
        w = fh.get_tensor(key).float()
    return w.reshape(w.shape[0], -1)


@dataclass(frozen=True)
class InitArg:
    """What ``--init`` names, read from the string (and whether it is a local file or folder), nothing loaded."""

    spec: str | None  # the encoder spec (a bare folder as ``timm:local-dir:DIR``); None for a weights file
    path: Path | None  # the local folder or weights file the run starts from; None for a hub or timm name


def parse_init(init: str) -> InitArg:
    """The one reading of ``--init``: a weights file (an existing file named ``*.safetensors``, ``*.pt``, ...), a
    local folder (``timm:local-dir:DIR``, ``local-dir:DIR``, or an existing ``DIR``), else an encoder spec.
    :func:`resolve_init` loads what it names; ``finetune.checkpoint.init_paths`` keeps ``--out`` off its path."""
    if Path(init).is_file() and init.lower().endswith(WEIGHT_SUFFIXES):
        return InitArg(None, Path(init))
    if Path(init).is_dir() and not init.startswith(("timm:", "open_clip:", "local-dir:")):
        init = f"timm:local-dir:{init}"
    folder = local_folder(init)
    if folder is not None and not init.startswith("open_clip:"):  # fine-tuning starts from timm networks only
        return InitArg(init, folder)
    return InitArg(init, None)


def resolve_init(init: str | None, *, model: str | None = None, weights: str | None = None) -> InitSource:
    """Resolve the starting point: any timm encoder spec, a previous stage's folder, or a weights file.

    - ``--init timm:local-dir:DIR`` / ``local-dir:DIR`` / ``DIR`` (a folder with config.json), e.g. stage 1's output
    - ``--init timm:NAME`` (pretrained from the hub; ``@random`` for random weights), with ``--weights FILE``
    - ``--init timm:hf-hub:ORG/REPO``
    - ``--init FILE --model timm:NAME`` (a weights file for that architecture); ``--model`` alone = hub weights
    """
    import timm

    if init is None and model is None:
        raise ValueError("give --init ENCODER_SPEC (or --model timm:NAME)")
    arch = None
    if model is not None:
        arch = model.removeprefix("timm:")
        if not timm.is_model(arch):
            raise ValueError(f"--model {model!r}: timm has no model {arch!r} (similar: {timm.list_models(f'*{arch}*')[:10]})")
    arg = parse_init(init if init is not None else f"timm:{arch}")
    if arg.spec is None:  # a weights file
        if arch is None:
            raise ValueError(f"--init {init} is a weights file: name its architecture with --model timm:NAME")
        return InitSource(spec=f"timm:{arch}+{init}", timm_name=arch, pretrained=True, weights_file=init)
    init = arg.spec
    parsed = parse_spec(init)
    if parsed.library != "timm":
        raise ValueError(f"--init {init!r}: fine-tuning works on timm CNNs; {parsed.library} encoders are not supported")
    if parsed.source == "local-dir":
        path = Path(parsed.name)
        cfg = _read_local_config(path)
        if arch is not None and cfg.get("architecture") != arch:
            raise ValueError(f"--model {model} does not match {path}'s architecture {cfg.get('architecture')!r}")
        if weights:
            raise ValueError("--weights goes with --init timm:NAME; a local-dir folder carries its own weights")
        labels = cfg.get("label_names") or (cfg.get("pretrained_cfg") or {}).get("label_names")
        return InitSource(
            spec=init, timm_name=f"local-dir:{path}", pretrained=True, model_args=dict(cfg.get("model_args") or {}),
            label_names=list(labels) if labels else None, head_weight=_classifier_weight(path, cfg),
        )
    if parsed.source == "hf-hub":
        if weights:
            raise ValueError("--weights goes with --init timm:NAME; a hub model carries its own weights")
        model_args: dict = {}
        try:
            from timm.models import load_model_config_from_hf

            _, _, model_args = load_model_config_from_hf(parsed.name)
        except Exception as exc:  # noqa: BLE001 - offline or no config: timm reports it on create_model
            logger.debug("no hub config for %s: %s", parsed.name, exc)
        return InitSource(spec=init, timm_name=f"hf-hub:{parsed.name}", pretrained=True, model_args=dict(model_args or {}))
    if not timm.is_model(parsed.name):
        raise ValueError(f"--init {init!r}: timm has no model {parsed.name!r}")
    if weights and not Path(weights).is_file():
        raise ValueError(f"weights file {weights} does not exist")
    return InitSource(
        spec=init + (f"+{weights}" if weights else ""), timm_name=parsed.name,
        pretrained=bool(weights) or parsed.tag != "random", weights_file=weights,
    )


def create_backbone(source: InitSource, *, drop_rate: float = 0.0, drop_path: float = 0.0) -> nn.Module:
    """The timm model without its classifier (``num_classes=0``): forward = pooled penultimate features."""
    import timm

    kwargs: dict = {"num_classes": 0}
    if drop_rate:
        kwargs["drop_rate"] = drop_rate
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    if source.weights_file:
        kwargs["pretrained_cfg_overlay"] = {"file": str(source.weights_file)}
    with seeded_init():
        return timm.create_model(source.timm_name, pretrained=source.pretrained, **kwargs)


class CosineHead(nn.Module):
    """``logits = scale * normalize(W) @ normalize(f)``, no bias; optional learnable scale."""

    def __init__(self, dim: int, n_classes: int, scale: float = 16.0, learn_scale: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, dim) * (1.0 / math.sqrt(dim)))
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)), requires_grad=learn_scale)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Logits (N, classes) of features (N, dim)."""
        return self.scale * F.normalize(feats.float(), dim=-1) @ F.normalize(self.weight, dim=-1).T

    def export_weight(self) -> torch.Tensor:
        """scale * normalize(W): timm's classifier weight (bias 0) and the probe's weight."""
        with torch.no_grad():
            return (self.scale * F.normalize(self.weight.float(), dim=-1)).detach().cpu()


class Net(nn.Module):
    """Backbone + cosine head; returns (logits, features)."""

    def __init__(self, backbone: nn.Module, head: CosineHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the head's logits, the backbone's features) of images ``x``."""
        feats = self.backbone(x)
        return self.head(feats), feats


def feature_dim(backbone: nn.Module, size: int = 64) -> int:
    """Width of the pooled features (a forward pass: ``num_features`` is wrong for VGG-style pre-logits)."""
    was = backbone.training
    backbone.eval()
    p = next(backbone.parameters())
    with torch.no_grad():
        d = int(backbone(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype)).shape[-1])
    backbone.train(was)
    return d


def set_bn_eval(module: nn.Module) -> None:
    """Put every batch-norm layer in eval mode (running statistics frozen; affine weights still train)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def layer_ids(backbone: nn.Module) -> tuple[dict[str, int], int]:
    """Parameter name -> layer group (0 = stem ... n-1 = last block): the map timm's layer-wise decay uses.

    timm's ``group_matcher(coarse=False)`` (every timm model has one; the CNN families checked: MobileNet,
    EfficientNet, ConvNeXt, ResNet, VGG), else timm's ``auto_group_layers``. ``freeze_layers`` and
    :func:`param_groups` (``timm.optim.param_groups_layer_decay``) agree on it.
    """
    from timm.models import group_parameters
    from timm.optim import auto_group_layers

    if hasattr(backbone, "group_matcher"):
        ids = group_parameters(backbone, backbone.group_matcher(coarse=False), reverse=True)
    else:
        ids = auto_group_layers(backbone)
    last = max(ids.values())
    ids = {n: int(ids.get(n, last)) for n, _ in backbone.named_parameters()}
    return ids, max(ids.values()) + 1


def freeze_layers(backbone: nn.Module, n_layers: int) -> int:
    """Freeze the first ``n_layers`` layer groups (stem first): no gradients, a cheaper backward pass."""
    if n_layers <= 0:
        return 0
    ids, _ = layer_ids(backbone)
    frozen = 0
    for name, p in backbone.named_parameters():
        if ids[name] < n_layers:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def param_groups(
    net: Net, *, lr: float, backbone_lr: float, layer_decay: float, weight_decay: float
) -> list[dict]:
    """AdamW groups: the head at ``lr``; backbone layer i at ``backbone_lr * layer_decay ** (last - i)``.

    The backbone's groups are timm's (``param_groups_layer_decay``: no weight decay on biases and norms, frozen
    parameters left out), with the rate written out (``lr``) rather than as timm's ``lr_scale``; the head has
    no weight decay (a cosine head's norm carries nothing) and neither has its scale.
    """
    from timm.optim import param_groups_layer_decay

    out = []
    for g in param_groups_layer_decay(net.backbone, weight_decay=weight_decay, layer_decay=layer_decay):
        scale = g.pop("lr_scale")
        g.update(lr=backbone_lr * scale, name=f"layer-x{scale:.3g}{'' if g['weight_decay'] else '-nd'}")
        out.append(g)
    out.append({"params": [net.head.weight], "lr": lr, "weight_decay": 0.0, "name": "head"})
    if net.head.log_scale.requires_grad:
        out.append({"params": [net.head.log_scale], "lr": lr, "weight_decay": 0.0, "name": "head-scale"})
    return out


def fit_cosine_head(head: CosineHead, feats: torch.Tensor, y: torch.Tensor, *, label_smoothing: float,
                    weight: torch.Tensor | None, steps: int = 300, lr: float = 0.05) -> None:
    """Linear probe for the cosine head on frozen features: class means, then full-batch Adam."""
    n_classes = head.weight.shape[0]
    f = F.normalize(feats.float(), dim=-1)
    with torch.no_grad():
        means = torch.zeros(n_classes, f.shape[1])
        means.index_add_(0, y, f)
        head.weight.copy_(F.normalize(means + 1e-6 * torch.randn_like(means), dim=-1))
    w = torch.nn.Parameter(head.weight.detach().clone())
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        logits = head.scale.detach() * f @ F.normalize(w, dim=-1).T
        F.cross_entropy(logits, y, weight=weight, label_smoothing=label_smoothing).backward()
        opt.step()
    with torch.no_grad():
        head.weight.copy_(F.normalize(w, dim=-1))


def create_net(source: InitSource, n_classes: int, cfg: FinetuneConfig) -> tuple[Net, int]:
    """Backbone (``cfg.freeze_layers`` first layer groups frozen) + a new cosine head; and the frozen parameter count."""
    backbone = create_backbone(source, drop_rate=cfg.drop_rate, drop_path=cfg.drop_path)
    head = CosineHead(feature_dim(backbone), n_classes, scale=cfg.head_scale, learn_scale=cfg.learn_scale)
    frozen = freeze_layers(backbone, cfg.freeze_layers)
    return Net(backbone, head), frozen

