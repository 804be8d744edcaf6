"""An encoder whose image tower is a cached export (OpenVINO IR or ONNX): numpy in, numpy out, no torch.

Text (CLIP prompts) still goes through the torch model, loaded on first use only: prompts are encoded once
per gallery and cached (:mod:`retrieval.zeroshot`), so queries never need it.

``import openvino`` posts a usage event (openvino_telemetry forks a process for it and may hold the exit for
up to 3 s); speciesid imports it with that telemetry switched off (:func:`no_telemetry`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from retrieval.encoders import Encoder, EncoderConfig, make_fingerprint, parse_spec
from retrieval.preprocess import PreprocessConfig

logger = logging.getLogger(__name__)

Runner = Callable[[np.ndarray], np.ndarray]


@contextlib.contextmanager
def no_telemetry() -> Iterator[None]:
    """Within: OpenVINO (its import, its converter) and NNCF send no usage telemetry. Their own switches are
    the ``CI`` and ``NNCF_CI`` variables, read when the telemetry objects are made; both are restored after."""
    saved = {k: os.environ.get(k) for k in ("CI", "NNCF_CI")}
    os.environ["CI"] = os.environ["NNCF_CI"] = "true"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def openvino_runner(xml: Path, hint: str, cache_dir: Path | None, *, threads: int = 0) -> Runner:
    """A compiled OpenVINO model (``hint``: the inference precision, "f32" or "bf16"); thread-safe. ``threads``:
    its compute threads (0: OpenVINO's own default)."""
    with no_telemetry():
        import openvino as ov

    config: dict[str, object] = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if cache_dir is not None:
        config["CACHE_DIR"] = str(cache_dir)
    compiled = ov.Core().compile_model(str(xml), "CPU", config)
    request = compiled.create_infer_request()
    lock = threading.Lock()

    def run(batch: np.ndarray) -> np.ndarray:
        with lock:
            request.infer({0: batch})
            return np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)

    return run


def onnx_runner(path: Path, *, threads: int = 0) -> Runner:
    """An ONNX Runtime CPU session (``run`` is thread-safe). ``threads``: its compute threads, one operator at a
    time (0: ONNX Runtime's own default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {name: batch})[0], dtype=np.float32)

    return run


def load_runner(folder: Path, info: dict) -> Runner:
    """The runner of a cache entry (its export.json is ``info``)."""
    if info["runtime"] == "openvino":
        return openvino_runner(folder / info["files"][0], info.get("hint", "f32"), folder / "blobs")
    if info["runtime"] == "onnx":
        return onnx_runner(folder / info["files"][0])
    raise ValueError(f"unknown exported runtime {info['runtime']!r}")


class ExportedEncoder(Encoder):
    """The image tower from the user cache, run by OpenVINO or ONNX Runtime on the CPU."""

    def __init__(self, folder: Path, info: dict, config: EncoderConfig, *, text_encoder: Encoder | None = None,
                 runner: Runner | None = None) -> None:
        self.spec = config.spec
        self.pool, self.views = config.pool, config.views
        self.test_size = info.get("test_size")
        self.fingerprint = make_fingerprint(config.spec, info.get("weights_digest", info["digest"]), self.pool,
                                            self.views, self.test_size)
        self.dim = int(info["dim"])
        self.input_size = int(info["input_size"])
        self.preprocess_config = PreprocessConfig.from_dict(info["preprocess"])
        self.runtime = info["runtime"]
        self.precision = info["precision"]
        self.family = info.get("family", "transformer")
        self.supports_text = bool(info.get("supports_text"))
        self.logit_scale = float(info.get("logit_scale", 100.0))
        self.device = "cpu"
        self.dtype = f"{self.runtime}-{self.precision}"
        self.batch_size = config.batch_size
        self.folder = folder
        self.info = info
        self._config = config
        self._text = text_encoder if text_encoder is not None and text_encoder.supports_text else None
        self._run = runner or load_runner(folder, info)

    def _forward_array(self, batch: np.ndarray) -> np.ndarray:
        return self._run(batch)

    def _text_encoder(self) -> Encoder:
        if self._text is None:
            from retrieval.torch_encoders import create_torch_encoder

            logger.info("loading the torch text tower of %s", self.spec)
            cfg = replace(self._config, device="cpu", precision="fp32", runtime="torch")
            text = create_torch_encoder(parse_spec(cfg.spec), cfg.spec, cfg, "fp32")
            if text.fingerprint.rsplit("#", 1)[-1] != self.fingerprint.rsplit("#", 1)[-1]:
                raise RuntimeError(f"the weights of {self.spec} changed since they were exported; run again")
            self._text = text
        return self._text

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (N, dim) float32, L2-normalised, through the torch text tower (fp32)."""
        if not self.supports_text:
            return super().encode_text(texts)
        return self._text_encoder().encode_text(texts)

    @property
    def text_dtype(self) -> str:
        """The text tower runs torch fp32 (the zero-shot cache key)."""
        if self._text is not None:
            return self._text.text_dtype
        return "torch.float32"

    def describe(self) -> dict[str, object]:
        """What to record next to anything derived from this encoder."""
        out = super().describe()
        faith = self.info.get("faithfulness") or {}
        out["faithfulness_min_cosine"] = faith.get("min_cosine")
        return out
