"""The test suite's own rule for what may be missing: skipped locally, a failure under $SPECIESID_REQUIRE_ALL (CI)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import conftest
import pytest
from conftest import REPO, needs_shared, require_module

_MISSING_MODULE = "speciesid_no_such_module"


def test_missing_shared_assets_skip_locally_and_fail_when_all_are_required(monkeypatch, tmp_path):
    monkeypatch.setattr(conftest, "PH_SNAKES", tmp_path / "hidden" / "ph-snakes")  # ../shared hidden
    monkeypatch.delenv("SPECIESID_REQUIRE_ALL", raising=False)
    with pytest.raises(pytest.skip.Exception, match="shared assets not found") as skipped:
        needs_shared()
    assert "set SPECIESID_SHARED to the folder that holds data/ph-snakes and models/" in str(skipped.value)
    monkeypatch.setenv("SPECIESID_REQUIRE_ALL", "1")
    with pytest.raises(pytest.fail.Exception, match="SPECIESID_REQUIRE_ALL is set"):
        needs_shared()
    with pytest.raises(pytest.fail.Exception):
        needs_shared(tmp_path / "missing.csv")  # an asset a test names itself
    monkeypatch.setenv("SPECIESID_REQUIRE_ALL", "0")
    with pytest.raises(pytest.skip.Exception):
        needs_shared()


def test_a_missing_extra_skips_locally_and_fails_when_all_are_required(monkeypatch):
    monkeypatch.delenv("SPECIESID_REQUIRE_ALL", raising=False)
    assert require_module("json") is sys.modules["json"]
    with pytest.raises(pytest.skip.Exception, match=_MISSING_MODULE):
        require_module(_MISSING_MODULE)
    monkeypatch.setenv("SPECIESID_REQUIRE_ALL", "1")
    with pytest.raises(pytest.fail.Exception, match=f"could not import '{_MISSING_MODULE}'"):
        require_module(_MISSING_MODULE)


_MODULE_LEVEL = f"""
from conftest import require_module

require_module({_MISSING_MODULE!r})


def test_never_run():
    pass
"""


@pytest.mark.parametrize(("require_all", "outcome"), [("", "1 skipped"), ("1", "1 error")])
def test_a_test_file_whose_extra_is_missing_is_skipped_or_an_error(tmp_path, require_all, outcome):
    """At module level (collection), as tests/test_object_store.py and tests/test_distributed.py use it."""
    (tmp_path / "test_extra.py").write_text(_MODULE_LEVEL)
    env = {**os.environ, "SPECIESID_REQUIRE_ALL": require_all, "PYTHONPATH": str(REPO / "tests")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "test_extra.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert outcome in run.stdout, run.stdout[-2000:]
    assert (run.returncode in (0, 5)) == (not require_all), run.stdout[-2000:]  # 5: nothing collected, all skipped
    assert "SPECIESID_REQUIRE_ALL is set" in run.stdout if require_all else "could not import" in run.stdout


def test_benchmarks_find_the_shared_assets_where_the_tests_do(monkeypatch, tmp_path):
    """The benchmarks looked only beside the repo: a clone elsewhere could not run `make bench-quick` even with
    $SPECIESID_SHARED set, as the tests can. They take it too, and say so when the assets are missing."""
    monkeypatch.setenv("SPECIESID_SHARED", str(tmp_path))
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    monkeypatch.delitem(sys.modules, "_common", raising=False)
    import _common

    monkeypatch.delitem(sys.modules, "_common")  # the next importer reads its own environment
    assert _common.SHARED == tmp_path
    assert _common.PH_SNAKES == tmp_path / "data" / "ph-snakes"
    assert _common.MOBILENET_SPEC == f"timm:local-dir:{tmp_path / 'models' / 'mobilenetv1_100.coral_in1k'}"
    with pytest.raises(SystemExit) as stop:
        _common.require_shared()
    assert f"benchmarks need {tmp_path / 'data' / 'ph-snakes'}" in str(stop.value.code)
    assert "set SPECIESID_SHARED to the folder that holds data/ph-snakes and models/" in str(stop.value.code)


def test_make_lint_installs_ruff_alone(tmp_path):
    """`make lint` went through `make setup`: torch, torchvision and four extras installed to run ruff."""
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"  # no ruff there: what lint would run to get it
    run = subprocess.run(["make", "-n", "lint", f"VENV={venv}"], cwd=REPO, capture_output=True, text=True,
                         check=True)
    assert "pip install --quiet 'ruff>=0.5'" in run.stdout
    assert f"{venv}/bin/ruff check ." in run.stdout
    assert "torch" not in run.stdout and "[dev" not in run.stdout
