"""benchmarks/bench_sweep.py measures the ``index`` of the checkout ``--repo`` names (its old ``PYTHONPATH`` advice
was overridden: benchmarks/_common.py puts this checkout first on sys.path; s57 finding 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sweep.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=dict(os.environ),
                          timeout=300, check=False)


def test_repo_names_the_index_imported(tmp_path: Path) -> None:
    """The ``index`` package imported is the --repo checkout's (a stand-in that stops the script when imported)."""
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "__init__.py").write_text("raise SystemExit('the --repo index was imported')\n")
    done = _run("--rows", "10", "--repo", str(tmp_path))
    assert done.returncode == 1 and "the --repo index was imported" in done.stderr, done.stderr


def test_repo_without_index_is_refused(tmp_path: Path) -> None:
    """A --repo folder that is no checkout is refused at once, with what to name instead."""
    done = _run("--repo", str(tmp_path))
    assert done.returncode == 2, done.stderr
    assert f"--repo {tmp_path}: no index/__init__.py there; name the root of a speciesid checkout" in done.stderr
