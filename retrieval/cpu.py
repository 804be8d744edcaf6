"""What kind of CPU this is, for choosing an inference runtime (numpy and the standard library only).

Kinds, best first (see docs/runtimes.md for what each one gets):

- ``amx``: Intel AMX (Sapphire Rapids and later): native bf16 and int8 tiles;
- ``avx512-bf16``: AVX512_BF16 (Cooper Lake, Zen 4 and later): native bf16 dot products (and VNNI);
- ``vnni``: int8 dot products (AVX512_VNNI or AVX-VNNI), no native bf16;
- ``avx2``: AVX2 + FMA, no VNNI: most laptops and desktops before ~2021;
- ``baseline``: older x86 CPUs;
- ``arm``: aarch64 / arm64 (Apple silicon, Graviton, ...).

Linux reads ``/proc/cpuinfo``; elsewhere numpy's own CPU feature table is used (it knows no AMX or AVX-VNNI).
``SPECIESID_CPU_KIND`` forces a kind (tests, benchmarks); ``ONEDNN_MAX_CPU_ISA`` (oneDNN's cap, which torch and
OpenVINO obey) lowers it, so a capped process never picks kernels the cap forbids.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path

logger = logging.getLogger(__name__)

CPU_KINDS: tuple[str, ...] = ("amx", "avx512-bf16", "vnni", "avx2", "baseline", "arm")
#: The features benchmarks print, in this order.
FEATURES: tuple[str, ...] = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")

#: ONEDNN_MAX_CPU_ISA value (prefix, upper case) -> the best kind it allows.
_ONEDNN_CAPS: tuple[tuple[str, str], ...] = (
    ("AVX10_", "amx"),
    ("AVX512_CORE_AMX", "amx"),
    ("AVX512_CORE_FP16", "avx512-bf16"),
    ("AVX512_CORE_BF16", "avx512-bf16"),
    ("AVX512_CORE_VNNI", "vnni"),
    ("AVX2_VNNI", "vnni"),
    ("AVX512", "avx2"),  # AVX-512 without VNNI: no int8 or bf16 dot products, like AVX2
    ("AVX2", "avx2"),
    ("AVX", "baseline"),
    ("SSE", "baseline"),
    ("ALL", "amx"),
    ("DEFAULT", "amx"),
)


def _cpuinfo(*keys: str) -> str | None:
    """The value of the first ``/proc/cpuinfo`` line that starts with one of ``keys`` (Linux; the one reader of that
    file); None when there is none, or no such file."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(keys):
            return line.split(":", 1)[1].strip()
    return None


def _proc_flags() -> set[str] | None:
    value = _cpuinfo("flags", "Features")  # x86, arm
    return set(value.split()) if value is not None else None


def _numpy_flags() -> set[str]:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats
    except ImportError:  # pragma: no cover - numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as feats
    names = {"AVX2": "avx2", "FMA3": "fma", "AVX512F": "avx512f", "AVX512VNNI": "avx512_vnni",
             "AVX512BF16": "avx512_bf16"}
    return {ours for theirs, ours in names.items() if feats.get(theirs)}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (lower case, /proc/cpuinfo spelling)."""
    flags = _proc_flags()
    return frozenset(flags if flags is not None else _numpy_flags())


def cpu_features() -> dict[str, bool]:
    """The features that matter for inference speed: avx2, avx512f, avx512_vnni, avx512_bf16, amx..."""
    flags = cpu_flags()
    return {name: name in flags for name in FEATURES}


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else the platform's processor string; read once per process
    (every build chunk and API add records it: ``retrieval.protocol.embedding_setup``)."""
    model = _cpuinfo("model name")
    return model if model is not None else platform.processor() or platform.machine()


def is_arm() -> bool:
    """True on aarch64 / arm64."""
    return platform.machine().lower() in ("aarch64", "arm64", "armv8l", "armv7l")


def _detected_kind() -> str:
    if is_arm():
        return "arm"
    f = cpu_flags()
    if {"amx_bf16", "amx_int8"} & f:
        return "amx"
    if "avx512_bf16" in f:
        return "avx512-bf16"
    if {"avx512_vnni", "avx_vnni"} & f:
        return "vnni"
    if "avx2" in f and "fma" in f:
        return "avx2"
    return "baseline"


def _onednn_cap() -> str | None:
    value = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    if not value:
        return None
    value = value.strip().upper()
    for prefix, kind in _ONEDNN_CAPS:
        if value.startswith(prefix):
            return kind
    return None


def cpu_kind() -> str:
    """This CPU's kind (one of :data:`CPU_KINDS`), after ``SPECIESID_CPU_KIND`` and ``ONEDNN_MAX_CPU_ISA``."""
    forced = os.environ.get("SPECIESID_CPU_KIND", "").strip().lower()
    if forced:
        if forced not in CPU_KINDS:
            raise ValueError(f"SPECIESID_CPU_KIND={forced!r} is not one of {', '.join(CPU_KINDS)}")
        return forced
    kind = _detected_kind()
    cap = _onednn_cap()
    if cap is not None and kind != "arm" and CPU_KINDS.index(cap) > CPU_KINDS.index(kind):
        logger.info("ONEDNN_MAX_CPU_ISA caps the CPU kind at %s (detected %s)", cap, kind)
        return cap
    return kind


def has_native_bf16(kind: str | None = None) -> bool:
    """True for CPU kinds with native bf16 arithmetic (amx, avx512-bf16)."""
    return (kind or cpu_kind()) in ("amx", "avx512-bf16")


def has_vnni(kind: str | None = None) -> bool:
    """True for CPU kinds with int8 dot-product instructions (amx, avx512-bf16, vnni)."""
    return (kind or cpu_kind()) in ("amx", "avx512-bf16", "vnni")


def cuda_driver_present() -> bool:
    """True when an NVIDIA driver is visible (only then is torch asked whether CUDA works)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir():
        try:
            return any(gpus.iterdir())
        except OSError:
            return False
    if platform.system() == "Linux":
        return False
    import shutil

    return shutil.which("nvidia-smi") is not None
