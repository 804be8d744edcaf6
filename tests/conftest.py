"""Shared fixtures: paths to ../shared, a tiny local open_clip model, galleries."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PH_SNAKES = SHARED / "data" / "ph-snakes"
MOBILENET = SHARED / "models" / "mobilenetv1_100.coral_in1k"
MOBILENET_SPEC = f"timm:local-dir:{MOBILENET}"

#: A CLIP small enough to build in a second, in open_clip's own config format.
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session", autouse=True)
def _isolated_user_cache(tmp_path_factory: pytest.TempPathFactory):
    """Exports and digests go to a temporary user cache; encoders run on torch unless a test asks otherwise
    (run the suite with SPECIESID_RUNTIME=auto to put every test through the runtime choice)."""
    names = ("SPECIESID_CACHE", "SPECIESID_RUNTIME")
    old = {n: os.environ.get(n) for n in names}
    os.environ["SPECIESID_CACHE"] = str(tmp_path_factory.mktemp("user-cache"))
    os.environ.setdefault("SPECIESID_RUNTIME", "torch")
    yield
    for n, v in old.items():
        if v is None:
            os.environ.pop(n, None)
        else:
            os.environ[n] = v


def needs_shared() -> None:
    """Skip when the shared assets are not beside the repo (CI always has them)."""
    if not PH_SNAKES.is_dir() or not MOBILENET.is_dir():
        pytest.skip(f"shared assets not found at {SHARED}")


def save_tiny_open_clip(folder: Path, seed: int = 0) -> Path:
    """Save a random tiny CLIP in open_clip's local-dir format (open_clip_config.json + safetensors)."""
    import torch
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = CLIP(**TINY_CLIP_CFG)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    config = {
        "model_cfg": TINY_CLIP_CFG,
        "preprocess_cfg": {"mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28], "interpolation": "bicubic"},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny open_clip model folder (usable as ``open_clip:local-dir:PATH``)."""
    return save_tiny_open_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def mobilenet_encoder():
    """The real MobileNetV1 encoder (fp32, so accuracy figures are reproducible)."""
    needs_shared()
    from retrieval.encoders import create_encoder

    return create_encoder(MOBILENET_SPEC, precision="fp32")
