"""Where a benchmark ran and what the machine can do: CPU features, the GEMM ceiling measured now, the peer.

- :func:`machine_report`: CPU model, cores, kind (retrieval.cpu), AVX2 / AVX-512 / AVX512-BF16 / VNNI / AMX,
  library versions, load average.
- :func:`gemm_ceiling`: sustained GEMM GFLOP/s in this run (ViT-MLP shape 1576x768 @ 768x3072) for fp32 and
  bf16 (torch), int8 (torch ``_int_mm``, and ONNX Runtime ``MatMulInteger`` u8s8 when installed): the speed
  limit a runtime's images/s is compared with.
- :func:`random_vit_dir`: a random-weight ViT-B-16 saved as an open_clip local-dir folder (BioCLIP's exact
  compute), so speciesid and pybioclip load the same weights.
- :func:`peer_bioclip` / :func:`run_peer`: pybioclip's ``bioclip embed`` (``SPECIESID_PEER_BIOCLIP`` or PATH).
- :func:`peer_phash`: the python of a venv with ``imagehash`` (``SPECIESID_PEER_PHASH``), bench_clean's peer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _common import CACHE

#: GFLOP per image of each benchmarked model (multiply-adds x 2), at 224 px.
GFLOP_PER_IMAGE = {"ViT-B-16": 35.2, "MobileNetV1": 1.15}
_M, _K, _N = 1576, 768, 3072


def _cpu_model_fallback() -> str:
    """The CPU's model name by this checkout's ``retrieval/cpu.py`` (loaded by path), for a ``--repo`` checkout
    whose retrieval.cpu predates ``cpu_model``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_speciesid_cpu_here",
                                                  Path(__file__).resolve().parents[1] / "retrieval" / "cpu.py")
    here = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(here)
    return here.cpu_model()


def machine_report() -> str:
    """Several lines: CPU, kind, features, versions, load. Works with the retrieval/ of an older checkout
    (``--repo``) too: its ``retrieval.cpu`` may lack ``cpu_model`` (before b72407a)."""
    from retrieval import cpu
    from retrieval.runtimes.cache import package_version

    cpu_features, cpu_kind = cpu.cpu_features, cpu.cpu_kind
    cpu_model = getattr(cpu, "cpu_model", _cpu_model_fallback)

    f = cpu_features()
    yes = lambda k: "yes" if f.get(k) else "no"  # noqa: E731
    versions = ", ".join(f"{p} {package_version(p)}" for p in ("torch", "onnxruntime", "openvino", "nncf")
                         if package_version(p))
    caps = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "SPECIESID_CPU_KIND") if os.environ.get(k)}
    return (
        f"CPU: {cpu_model()}, {os.cpu_count()} cores; kind {cpu_kind()}{' (' + str(caps) + ')' if caps else ''}\n"
        f"features: AVX2 {yes('avx2')}, AVX-512 {yes('avx512f')}, AVX512-VNNI {yes('avx512_vnni')}, "
        f"AVX-VNNI {yes('avx_vnni')}, AVX512-BF16 {yes('avx512_bf16')}, AMX {yes('amx_bf16')}\n"
        f"{versions}; load average {os.getloadavg()[0]:.2f}"
    )


def _rate(fn, seconds: float) -> float:
    for _ in range(2):
        fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return 2 * _M * _K * _N * n / (time.perf_counter() - t0) / 1e9


def gemm_ceiling(seconds: float = 1.5) -> dict[str, float]:
    """GFLOP/s (GOP/s for int8) measured now: fp32, bf16, int8 (the best int8 kernel found)."""
    import numpy as np
    import torch

    out: dict[str, float] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(_M, _K, dtype=dtype), torch.randn(_K, _N, dtype=dtype)
        out[name] = _rate(lambda a=a, b=b: a @ b, seconds)
    ai = torch.randint(-128, 127, (_M, _K), dtype=torch.int8)
    bi = torch.randint(-128, 127, (_K, _N), dtype=torch.int8)
    try:
        out["int8 (torch _int_mm)"] = _rate(lambda: torch._int_mm(ai, bi), seconds)
    except RuntimeError:
        pass
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "mm",
            [helper.make_tensor_value_info("a", TensorProto.UINT8, [_M, _K]),
             helper.make_tensor_value_info("b", TensorProto.INT8, [_K, _N])],
            [helper.make_tensor_value_info("y", TensorProto.INT32, [_M, _N])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        au = np.random.randint(0, 255, (_M, _K), dtype=np.uint8)
        bs = np.random.randint(-128, 127, (_K, _N), dtype=np.int8)
        out["int8 (ORT u8s8)"] = _rate(lambda: sess.run(None, {"a": au, "b": bs}), seconds)
    except ImportError:
        pass
    int8 = [v for k, v in out.items() if k.startswith("int8")]
    if int8:
        out["int8"] = max(int8)
    return out


def ceiling_for(gemm: dict[str, float], precision: str) -> float | None:
    """The GEMM rate a configuration of ``precision`` is limited by (fp16 and auto: fp32's)."""
    return gemm.get(precision) or gemm.get("fp32")


def random_vit_dir() -> Path:
    """A random ViT-B-16 CLIP (seed 0) as an open_clip local-dir folder under runs/cache (made once, ~600 MB)."""
    folder = CACHE / "vit-b-16-random"
    if (folder / "open_clip_model.safetensors").is_file():
        return folder
    import open_clip
    import torch
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(prefix=".vit-", dir=CACHE.parent if CACHE.parent.exists() else None))
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "open_clip_model.safetensors")
    cfg = {"model_cfg": open_clip.get_model_config("ViT-B-16"),
           "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}}
    (tmp / "open_clip_config.json").write_text(json.dumps(cfg, indent=1))
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def peer_bioclip() -> str | None:
    """The pybioclip ``bioclip`` command: ``$SPECIESID_PEER_BIOCLIP``, else ``bioclip`` on PATH."""
    cmd = os.environ.get("SPECIESID_PEER_BIOCLIP") or shutil.which("bioclip")
    return cmd if cmd and Path(cmd).exists() else None


def peer_phash() -> str | None:
    """The python of a venv with ``imagehash`` (the pHash peer of bench_clean): ``$SPECIESID_PEER_PHASH``, else None."""
    python = os.environ.get("SPECIESID_PEER_PHASH")
    return python if python and Path(python).exists() else None


def process_seconds(cmd: list[str]) -> float:
    """Wall seconds of one fresh process running ``cmd`` offline (``HF_HUB_OFFLINE=1``; raises if it fails)."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def run_peer(bioclip: str, model_dir: Path, photos: list[str], *, device: str | None = None) -> float:
    """Wall seconds of one fresh ``bioclip embed --model local-dir:DIR`` process over ``photos`` (offline);
    ``device``: its ``--device`` (its default: cpu)."""
    with tempfile.TemporaryDirectory(prefix="peer-") as tmp:
        out = Path(tmp) / "out.json"
        seconds = process_seconds([bioclip, "embed", *(["--device", device] if device else []), "--model",
                                   f"local-dir:{model_dir}", "--output", str(out), *photos])
        got = len(json.loads(out.read_text())["embeddings"])
    if got != len(photos):
        raise RuntimeError(f"bioclip embed returned {got} embeddings for {len(photos)} photos")
    return seconds


def steady_and_startup(small: int, t_small: float, large: int, t_large: float) -> tuple[float, float]:
    """(steady images/s, start-up seconds) from two fresh runs of ``small`` and ``large`` photos."""
    rate = (large - small) / max(t_large - t_small, 1e-9)
    return rate, max(t_small - small / rate, 0.0)
