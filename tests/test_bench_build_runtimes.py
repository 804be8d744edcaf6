"""benchmarks/bench_build.py's ``--runtimes`` builds each configuration once (walk-bench finding 10: ``torch:fp32``
was built twice, and the table showed the two runs' merged median twice)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import BENCHMARKS, bench_script

SCRIPT = BENCHMARKS / "bench_build.py"
BASE = [("naive", "torch", "fp32"), ("ours", "torch", "fp32"), ("ours", "auto", "auto"), ("ours", "onnx", "fp32")]


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    """The script imported as a module (benchmarks/ on the path)."""
    return bench_script(monkeypatch, "bench_build")


def test_runtimes_already_built_are_not_added_again(bench) -> None:
    got = bench.with_runtimes(BASE, bench.parse_runtimes("torch:fp32, onnx:int8,onnx:int8,auto:auto"))
    assert got == [*BASE[:3], ("ours", "onnx", "int8")]


def test_a_runtime_without_precision_is_refused_before_anything_runs() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--runtimes", "torch:fp32,onnx"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert "--runtimes onnx: write each as runtime:precision, e.g. onnx:int8" in done.stderr
