"""The timing benchmarks print what docs/benchmarks.md asks of every one (s57 findings 1 and 4, walk-bench 7 and
13): p50 / p95 / p99 of what is timed per call, median and min-max of a one-shot job's ``--repeats``, the ratio
named, the peak RSS and the CPU kind; and they leave nothing in the temporary folder. Smallest sizes, no timing
asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(tmp_path: Path, script: str, *args: str) -> str:
    """stdout + stderr of ``script`` run to the end (exit 0), its temporary folders under ``tmp_path/tmp``."""
    (tmp_path / "tmp").mkdir()
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          env={**os.environ, "TMPDIR": str(tmp_path / "tmp")}, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def _left(tmp_path: Path) -> list[str]:
    """What the script left in the temporary folder (torch's own compile cache aside)."""
    return [p.name for p in (tmp_path / "tmp").iterdir() if not p.name.startswith("torchinductor")]


def test_index_new_rows_prints_percentiles_spread_ratio_and_memory(tmp_path: Path) -> None:
    out = _run(tmp_path, "bench_index_new_rows.py", "--bulk", "300", "--new", "40", "--reads", "3", "--repeats", "2")
    assert "; kind " in out and "repeat 2: 340 indexed + 40 new rows" in out
    assert "index_new_rows median " in out and "(min-max " in out
    assert "6 lookups a side: before the merge p50 " in out and ", p95 " in out and ", p99 " in out
    assert "after / before the merge: " in out and "peak RSS of this process " in out
    assert _left(tmp_path) == []


def test_species_cache_prints_percentiles_spread_ratios_and_memory(tmp_path: Path) -> None:
    """Also: no folder-name warning about its own photos (they are in a scientific name's folder), nothing left."""
    out = _run(tmp_path, "bench_species_cache.py", "--rows", "300", "--repeats", "3", "--job-repeats", "2")
    assert "; kind " in out and "species() uncached, 3 calls: p50 " in out and ", p99 " in out
    assert "uncached / after an add: " in out and "first / later: " in out
    assert "first, estimated: median " in out and "runs 2)" in out
    assert "clean --dataset (6 photos, 2 stored) --index: median " in out and "peak RSS of this process " in out
    assert "not written as scientific names" not in out
    assert _left(tmp_path) == []


def test_sweep_prints_spread_and_memory(tmp_path: Path) -> None:
    """A sweep is one-shot: median and min-max of --repeats sweeps, the peak RSS (moto's S3 server, the dev extra)."""
    pytest.importorskip("moto")
    out = _run(tmp_path, "bench_sweep.py", "--rows", "40", "--uploads", "4", "--orphans", "3", "--batch", "20",
               "--repeats", "2")
    assert "; kind " in out and "run 2: removed 3, kept 4 in use" in out
    assert "median (min-max) of 2 sweeps of 40 rows (3 orphans each): sweep " in out and "lease held " in out
    assert "peak RSS of this process " in out and "(moto's server not counted)" in out
    assert _left(tmp_path) == []


def test_lease_prints_percentiles_ratio_and_memory(tmp_path: Path) -> None:
    pytest.importorskip("moto")
    out = _run(tmp_path, "bench_lease.py", "--runs", "1", "--adds", "3", "--warmup", "1")
    assert "; kind " in out and "| lease | 3 |" in out and "| no lease | 3 |" in out
    assert "lease / no lease, medians: " in out and "peak RSS of this process " in out


@pytest.mark.parametrize("script", ["bench_index_new_rows.py", "bench_sweep.py", "bench_unused_uploads.py",
                                    "bench_species_cache.py"])
def test_the_smoke_command_is_in_the_help(script: str) -> None:
    """s57 re-read #4: docs/benchmarks.md says these four scripts' smoke sizes are in their ``--help``; the help cut
    the docstring off before its commands. ``--help`` shows the whole docstring, the smoke command among them."""
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                          timeout=120, check=True)
    smoke = [line.strip() for line in done.stdout.splitlines() if "smoke" in line]
    assert len(smoke) == 1 and smoke[0].startswith(f"nice .venv/bin/python benchmarks/{script} --"), done.stdout
