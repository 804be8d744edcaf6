"""torch image tower -> ONNX / OpenVINO IR (fp32, bf16 hint, int8), each checked against torch fp32.

- ONNX: ``torch.onnx.export`` (the TorchScript exporter: seconds where the dynamo one takes minutes on a
  ViT-B-16; the dynamo one is the fallback), opset 17, dynamic batch.
- ONNX Runtime int8: ``onnxruntime.quantization.quantize_dynamic`` of the MatMul/Gemm weights (per channel for
  CNNs; 7-bit weights, ``reduce_range``, on CPUs without VNNI).
- OpenVINO: ``openvino.convert_model`` of that ONNX file, saved with fp32 weights (``compress_to_fp16=False``);
  bf16 is an inference hint on the same IR; int8 is NNCF post-training quantisation (``model_type=TRANSFORMER``
  for ViTs; ``overflow_fix`` on CPUs without VNNI) calibrated on gallery photos, never evaluation photos.

Every export is compared with torch fp32 on real photos; figures go to the entry's export.json.

The converters' usage telemetry (OpenVINO's ``convert_model`` and NNCF post events through
``openvino_telemetry``, which forks a process per event on Linux, unsafe beside LanceDB's runtime) is switched
off for these calls (:func:`retrieval.runtimes.exported.no_telemetry`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval.metric import l2_normalize
from retrieval.runtimes import MIN_COSINE

if TYPE_CHECKING:  # imported where a model is exported: the warm path never loads torch
    import torch
from retrieval.runtimes.exported import Runner, no_telemetry, onnx_runner, openvino_runner

logger = logging.getLogger(__name__)

OPSET = 17


def export_onnx(module: torch.nn.Module, example: np.ndarray, path: Path) -> None:
    """Write ``module`` (float32 in, features out) as ONNX with a dynamic batch axis."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(example[:2], dtype=np.float32))
    module = module.float().eval()
    try:
        # grad enabled: otherwise nn.MultiheadAttention takes its fused fast path, which has no ONNX form
        with warnings.catch_warnings(), torch.inference_mode(False), torch.enable_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (x,), str(path), dynamo=False, input_names=["x"], output_names=["features"],
                              dynamic_axes={"x": {0: "batch"}, "features": {0: "batch"}}, opset_version=OPSET)
    except Exception as exc:  # noqa: BLE001 - the TorchScript exporter may be gone in a future torch
        logger.info("TorchScript ONNX export failed (%s); trying the dynamo exporter", exc)
        batch = torch.export.Dim("batch", min=1, max=4096)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # dynamic_shapes by position: the forward's argument may have any name ("input" in nn.Sequential)
            program = torch.onnx.export(module, (x,), dynamo=True, dynamic_shapes=({0: batch},),
                                        opset_version=max(OPSET, 18), input_names=["x"], output_names=["features"])
            program.save(str(path), external_data=False)


def quantize_onnx_dynamic(src: Path, dst: Path, *, family: str, vnni: bool, progress: bool = True) -> None:
    """ONNX Runtime dynamic int8 (weights int8, activations quantised per batch at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ops = ["MatMul", "Gemm"] if family == "transformer" else ["MatMul", "Gemm", "Conv"]
    with _quiet_loggers(progress), _without_root_record(_ORT_PREPROCESS_ADVICE):
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=family != "transformer",
                         reduce_range=not vnni, op_types_to_quantize=ops)


def convert_openvino(onnx_path: Path, xml: Path) -> None:
    """ONNX -> OpenVINO IR with fp32 weights."""
    with no_telemetry():
        import openvino as ov

        model = ov.convert_model(str(onnx_path))
    ov.save_model(model, str(xml), compress_to_fp16=False)


def quantize_openvino(onnx_path: Path, xml: Path, calibration: np.ndarray, *, family: str, vnni: bool,
                      progress: bool = True) -> None:
    """NNCF post-training int8 of the OpenVINO model, calibrated on ``calibration`` (preprocessed photos);
    ``progress``: NNCF's progress bars on stderr (False: none, the command line's -q)."""
    with no_telemetry():
        import nncf  # reads NNCF_CI once, at import
        import openvino as ov
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        model = ov.convert_model(str(onnx_path))
    data = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    kwargs: dict = {"subset_size": len(calibration)}
    if family == "transformer":
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    if not vnni:  # pre-VNNI int8 sums pairs in 16 bits: keep the first layer's and all weights' range in 7 bits
        kwargs["advanced_parameters"] = AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE)
    with _quiet_loggers(progress), no_telemetry():
        quantized = nncf.quantize(model, data, **kwargs)
    ov.save_model(quantized, str(xml), compress_to_fp16=False)


#: ONNX Runtime's advice, logged on the root logger at WARNING by every ``quantize_dynamic``: its shape-inference
#: pre-processing does not change what is checked here (the export's cosine to torch), so it only confuses.
_ORT_PREPROCESS_ADVICE = "pre-processing before quantization"


class _DropRootRecord(logging.Filter):
    """Drops records logged on the root logger itself whose message holds ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        """False (drop) for the root logger's own records holding the text."""
        return not (record.name == "root" and self.text in record.getMessage())


@contextlib.contextmanager
def _without_root_record(text: str) -> Iterator[None]:
    """While the block runs, records logged on the root logger (``logging.warning(...)``) holding ``text`` are
    dropped; a filter on the root logger sees only its own records, never those propagated from named loggers,
    and it is removed afterwards."""
    root = logging.getLogger()
    drop = _DropRootRecord(text)
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


@contextlib.contextmanager
def _quiet_loggers(progress: bool = True):
    """NNCF and ORT quantisation log INFO lines: keep them at WARNING. NNCF's progress bars (rich, printed to
    ``sys.stdout``) go to stderr, so stdout carries only the command's output (``--format json > file``); without
    ``progress`` (the command line's -q) they go nowhere."""
    names = ("nncf", "onnxruntime", "root")
    levels = {n: logging.getLogger(n if n != "root" else None).level for n in names}
    for n in names:
        logging.getLogger(n if n != "root" else None).setLevel(max(levels[n], logging.WARNING))
    try:
        with contextlib.ExitStack() as stack:
            out = sys.stderr if progress else stack.enter_context(open(os.devnull, "w"))
            stack.enter_context(contextlib.redirect_stdout(out))
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n if n != "root" else None).setLevel(level)


def embed_with(run: Runner, x: np.ndarray, batch: int = 16) -> np.ndarray:
    """L2-normalised embeddings of preprocessed photos through a runner."""
    out = [np.asarray(run(np.ascontiguousarray(x[i : i + batch])), dtype=np.float32) for i in range(0, len(x), batch)]
    return l2_normalize(np.concatenate(out))


def faithfulness(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Cosine of each photo's embedding to its reference: min, mean, and whether it passes."""
    cos = np.sum(reference * candidate, axis=1)
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "n_photos": int(len(cos)),
            "threshold": MIN_COSINE, "passed": bool(cos.min() >= MIN_COSINE)}


def openvino_hint(precision: str, kind: str | None = None) -> str:
    """OpenVINO's inference precision hint for an export of ``precision`` on a CPU of ``kind`` (None: this one):
    "bf16" for a bf16 export, and for an int8 one where the CPU has native bf16 (its layers left unquantised run
    in bf16 there); "f32" otherwise."""
    from retrieval.cpu import has_native_bf16

    return "bf16" if precision == "bf16" or (precision == "int8" and has_native_bf16(kind)) else "f32"


def build_files(runtime: str, precision: str, folder: Path, onnx_fp32: Path, *, family: str, kind: str,
                calibration: np.ndarray | None, progress: bool = True) -> tuple[list[str], str]:
    """Write the model files of one (runtime, precision) into ``folder``; returns (files, OpenVINO hint).
    ``progress``: the quantisers' progress bars on stderr (False: none)."""
    from retrieval.cpu import has_vnni

    vnni = has_vnni(kind)
    t0 = time.perf_counter()
    if runtime == "onnx":
        target = folder / "model.onnx"
        if precision == "fp32":
            target.write_bytes(onnx_fp32.read_bytes())
        elif precision == "int8":
            quantize_onnx_dynamic(onnx_fp32, target, family=family, vnni=vnni, progress=progress)
        else:
            raise ValueError(f"ONNX Runtime runs fp32 or int8 here, not {precision}")
        files, hint = ["model.onnx"], ""
    elif runtime == "openvino":
        xml = folder / "model.xml"
        if precision == "int8":
            if calibration is None or not len(calibration):
                raise ValueError("OpenVINO int8 needs calibration photos (gallery photos, never evaluation ones)")
            quantize_openvino(onnx_fp32, xml, calibration, family=family, vnni=vnni, progress=progress)
        elif precision in ("fp32", "bf16"):
            convert_openvino(onnx_fp32, xml)
        else:
            raise ValueError(f"OpenVINO runs fp32, bf16 or int8 here, not {precision}")
        files = ["model.xml", "model.bin"]
        hint = openvino_hint(precision, kind)
    else:
        raise ValueError(f"unknown runtime {runtime!r}")
    logger.info("exported %s %s in %.1f s", runtime, precision, time.perf_counter() - t0)
    return files, hint


def runner_for(runtime: str, folder: Path, files: list[str], hint: str) -> Runner:
    """Load what :func:`build_files` wrote (no compiled-model cache: the folder is about to move)."""
    if runtime == "openvino":
        return openvino_runner(folder / files[0], hint, None)
    return onnx_runner(folder / files[0])
