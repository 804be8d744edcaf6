"""Inference runtimes per CPU: which (runtime, precision) ``--runtime auto`` tries, best first.

The order comes from measurements (docs/runtimes.md): images per CPU-second
of ViT-B-16 and MobileNetV1 on each CPU kind. Each candidate is used only when its runtime is installed and its
export passes the faithfulness check (cosine >= :data:`MIN_COSINE` to torch fp32 on real photos); otherwise
the next one is tried. torch fp32 closes every list. CUDA always runs torch.

- ``openvino``: OpenVINO IR (``pip install 'speciesid[openvino]'``); int8 is NNCF post-training quantisation
  calibrated on gallery photos, run with a bf16 inference hint where bf16 is native;
- ``onnx``: ONNX Runtime (``pip install 'speciesid[onnx]'``); int8 is dynamic quantisation of the MatMuls
  (7-bit weights on CPUs without VNNI, whose int8 instructions saturate);
- ``torch``: PyTorch eager (bf16 only where native; int8 = dynamic quantisation of the Linear layers).
"""

from __future__ import annotations

#: Cosine to torch fp32 every photo of the check must reach for an export to be used.
MIN_COSINE = 0.995
#: Real photos the check uses, and the most int8 calibration uses.
CHECK_PHOTOS = 32
CALIBRATION_PHOTOS = 128

#: pip extra that brings each optional runtime.
EXTRAS = {"onnx": "onnx", "openvino": "openvino"}
#: Python packages each runtime needs (for running; exporting also needs torch).
PACKAGES = {"onnx": ("onnxruntime", "onnx"), "openvino": ("openvino",)}

_NATIVE_BF16_VIT = [("openvino", "int8"), ("openvino", "bf16"), ("torch", "bf16"), ("openvino", "fp32"),
                    ("onnx", "fp32"), ("torch", "fp32")]
_NATIVE_BF16_CNN = [("openvino", "bf16"), ("openvino", "fp32"), ("onnx", "fp32"), ("torch", "fp32")]
_PLAIN_CNN = [("openvino", "fp32"), ("onnx", "fp32"), ("torch", "fp32")]
_PORTABLE = [("onnx", "fp32"), ("torch", "fp32")]

#: (CPU kind, model family) -> candidates, best first.
AUTO_ORDER: dict[tuple[str, str], list[tuple[str, str]]] = {
    ("amx", "transformer"): _NATIVE_BF16_VIT,
    ("amx", "cnn"): _NATIVE_BF16_CNN,
    ("avx512-bf16", "transformer"): _NATIVE_BF16_VIT,
    ("avx512-bf16", "cnn"): _NATIVE_BF16_CNN,
    ("vnni", "transformer"): [("openvino", "int8"), ("onnx", "int8"), ("openvino", "fp32"), ("onnx", "fp32"),
                              ("torch", "fp32")],
    ("vnni", "cnn"): _PLAIN_CNN,
    # no VNNI: OpenVINO int8 gains nothing (measured 1.02x), bf16 is emulated (5x slower than fp32)
    ("avx2", "transformer"): [("onnx", "int8"), ("torch", "int8"), ("openvino", "fp32"), ("onnx", "fp32"),
                              ("torch", "fp32")],
    ("avx2", "cnn"): _PLAIN_CNN,
    ("baseline", "transformer"): _PORTABLE,
    ("baseline", "cnn"): _PORTABLE,
    ("arm", "transformer"): _PORTABLE,
    ("arm", "cnn"): _PORTABLE,
}

#: What each runtime can run (torch's fp16 is for CUDA).
RUNTIME_PRECISIONS = {"torch": ("fp32", "bf16", "int8", "fp16"), "onnx": ("fp32", "int8"),
                      "openvino": ("fp32", "bf16", "int8")}


def candidates(kind: str, family: str, runtime: str = "auto", precision: str = "auto") -> list[tuple[str, str]]:
    """The (runtime, precision) pairs to try, best first, for a CPU kind, a model family and a request."""
    order = list(AUTO_ORDER[(kind, "transformer" if family == "transformer" else "cnn")])
    if runtime != "auto":
        if precision != "auto":
            return [(runtime, precision)]
        order = [c for c in order if c[0] == runtime]
        return order if (runtime, "fp32") in order else [*order, (runtime, "fp32")]
    if precision != "auto":
        order = [c for c in order if c[1] == precision]
        return order if ("torch", precision) in order else [*order, ("torch", precision)]
    return order
