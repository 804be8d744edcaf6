"""Shared fixtures: paths to ../shared, a tiny local open_clip model, galleries."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
#: The shared assets (real photos and weights): ``../shared`` beside the repo, or $SPECIESID_SHARED.
SHARED = Path(os.environ.get("SPECIESID_SHARED") or REPO.parent / "shared")
#: Set (CI: .ci/run): a missing ../shared or a missing extra that `make test` installs fails instead of skipping.
REQUIRE_ALL = "SPECIESID_REQUIRE_ALL"
PH_SNAKES = SHARED / "data" / "ph-snakes"
MOBILENET = SHARED / "models" / "mobilenetv1_100.coral_in1k"
MOBILENET_SPEC = f"timm:local-dir:{MOBILENET}"
#: The benchmark scripts (imported as modules by :func:`bench_script`).
BENCHMARKS = REPO / "benchmarks"

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


def require_all() -> bool:
    """Whether a missing asset or extra fails the test ($SPECIESID_REQUIRE_ALL set, as in CI) rather than skips it."""
    return os.environ.get(REQUIRE_ALL, "").strip().lower() not in ("", "0", "false", "no", "off")


def _missing(reason: str) -> None:
    """Skip the test for ``reason``, or fail it when :func:`require_all`."""
    if require_all():
        pytest.fail(f"{reason} ({REQUIRE_ALL} is set: nothing `make test` provides may be missing)", pytrace=False)
    pytest.skip(reason)


def needs_shared(*paths: Path) -> None:
    """Skip when the shared assets (ph-snakes, MobileNet, and ``paths`` when given) are not beside the repo; fail
    instead under $SPECIESID_REQUIRE_ALL (CI always has them)."""
    wanted = paths or (PH_SNAKES, MOBILENET)
    if not all(p.exists() for p in wanted):
        _missing(f"shared assets not found at {SHARED} (the folder beside the repo, or set SPECIESID_SHARED to the "
                 "folder that holds data/ph-snakes and models/)")


def require_module(name: str) -> Any:
    """``pytest.importorskip(name)``, failing instead under $SPECIESID_REQUIRE_ALL (a module of an extra that
    `make test` installs: dev, onnx, openvino, ray). Usable at module level."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if require_all():
            pytest.fail(f"could not import {name!r} ({exc}); {REQUIRE_ALL} is set: install the extras "
                        "`make test` installs", pytrace=False)
        pytest.skip(f"could not import {name!r}: {exc}", allow_module_level=True)


def bench_script(monkeypatch: pytest.MonkeyPatch, name: str) -> Any:
    """The benchmark script ``name`` (``bench_api``) imported afresh as a module, benchmarks/ on the path (its
    ``_common`` and ``_hardware`` imported afresh too)."""
    import importlib

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    for module in ("_common", "_hardware", name):
        monkeypatch.delitem(sys.modules, module, raising=False)
    return importlib.import_module(name)


def s3_keys(client: Any, bucket: str, prefix: str) -> list[str]:
    """The keys under ``prefix`` in ``bucket`` of the test S3 (moto), sorted, every page of the listing; [] when
    there are none."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def until(cond: Callable[[], bool], what: str, limit: float = 120.0) -> None:
    """Wait (polling) until ``cond()`` holds, for something done on another thread or process; fails naming
    ``what`` after ``limit`` seconds (a generous bound, not a timing assertion)."""
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, f"{what}: not within {limit:g} s"
        time.sleep(0.05)


def stderr_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the (captured) stderr say it is a terminal, so that commands draw their progress bars
    (``api.cli._common.show_bars``: bars only on a terminal) for a test that reads them. Call it in the test's body,
    once capsys / capfd has replaced ``sys.stderr``."""
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)


@pytest.fixture
def count_opens(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], list[str]]:
    """``count_opens(name)``: a list that, from then on in the test, holds the path of every open of a file called
    ``name`` by any means Python code opens one (``open``, ``io.open``, and through it ``Path.open``,
    ``read_bytes`` and ``read_text``): a "read once" test asserts its length."""
    import builtins
    import io

    def start(name: str) -> list[str]:
        opens: list[str] = []
        real = io.open

        def counting(file: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(file, (str, bytes, os.PathLike)) and Path(os.fsdecode(file)).name == name:
                opens.append(os.fsdecode(file))
            return real(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", counting)
        monkeypatch.setattr(io, "open", counting)
        return opens

    return start


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


#: (encoder class, fingerprint, pool, dtype, device, input dtype, input digest) -> its embedding row:
#: :func:`memo_real_forward`.
_REAL_FORWARD_MEMO: dict[tuple, Any] = {}


@pytest.fixture
def memo_real_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real MobileNetV1's forward of model input it already embedded in this session (the same encoder
    fingerprint, pool, dtype, device and pixels) is read back instead of run again. The forward is a pure function
    of that input, so every embedding is still the one the real weights give the photo; the slow end-to-end tests
    that embed the same ph-snakes photos many times (clean's real leakage check, the CLI's build, identify and
    evaluate, the runtime bar's fp32 reference) run the network once per photo. Preprocessing, batching and
    everything after the forward run as ever (the batch's results agree to float rounding)."""
    import hashlib

    import numpy as np

    from retrieval.torch_encoders import TorchEncoder

    real = TorchEncoder._encode_plain

    def memo(self, batch):  # noqa: ANN001, ANN202 - the patched method's own signature
        if self.spec != MOBILENET_SPEC or not isinstance(batch, np.ndarray) or batch.ndim != 4:
            return real(self, batch)
        arr = np.ascontiguousarray(batch)
        head = (type(self).__name__, self.fingerprint, self.pool, str(self.dtype), str(self.device), str(arr.dtype))
        keys = [(*head, hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest()) for row in arr]
        todo = [i for i, k in enumerate(keys) if k not in _REAL_FORWARD_MEMO]
        if todo:
            for i, row in zip(todo, real(self, arr[todo]), strict=True):
                _REAL_FORWARD_MEMO[keys[i]] = row.copy()
        return np.stack([_REAL_FORWARD_MEMO[k] for k in keys]).astype(np.float32, copy=False)

    monkeypatch.setattr(TorchEncoder, "_encode_plain", memo)
