"""benchmarks/bench_api.py keeps an explicit ``--windows`` under ``--quick`` (walk-bench finding 15: ``--quick``
replaced it with 0 and 5)."""

from __future__ import annotations

import sys

import pytest
from conftest import BENCHMARKS, bench_script


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    """The script imported as a module (benchmarks/ on the path)."""
    return bench_script(monkeypatch, "bench_api")


def test_quick_keeps_explicit_windows(bench) -> None:
    assert bench.chosen_windows("0", quick=True) == ["0"]
    assert bench.chosen_windows(" off, 20 ,", quick=True) == ["off", "20"]


def test_defaults_with_and_without_quick(bench) -> None:
    assert bench.chosen_windows(None, quick=True) == ["0", "5"]
    assert bench.chosen_windows(None, quick=False) == ["off", "0", "5", "20"]


def test_the_quick_help_says_explicit_windows_are_kept() -> None:
    """s57 re-read #6: ``--quick``'s help still said "windows 0 and 5 only", against ``--windows``' own help."""
    import subprocess

    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_api.py"), "--help"], capture_output=True,
                          text=True, timeout=120, check=True, env={"COLUMNS": "200", "PATH": ""})
    quick = next(line for line in done.stdout.splitlines() if line.strip().startswith("--quick "))
    said = quick.split(None, 1)[1].strip()
    assert said == "smoke run: fewer requests; windows 0 and 5 unless --windows names others", quick
