"""benchmarks/_hardware.machine_report with the retrieval/ of an older checkout (a benchmark's ``--repo``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_machine_report_runs_when_retrieval_cpu_has_no_cpu_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkout from before retrieval.cpu.cpu_model (0a97e72) still gets the CPU line, from the local fallback."""
    import retrieval.cpu

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.delitem(sys.modules, "_hardware", raising=False)
    import _hardware

    expected = retrieval.cpu.cpu_model()
    monkeypatch.delattr(retrieval.cpu, "cpu_model")
    report = _hardware.machine_report()
    assert report.startswith(f"CPU: {expected}, ")
    assert _hardware._cpu_model_fallback() == expected
