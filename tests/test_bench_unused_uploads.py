"""benchmarks/bench_unused_uploads.py leaves no gallery behind in the temporary folder (walk-bench stop 56, s57
finding 3): removed after a run and on an error or Ctrl-C; ``--keep DIR`` keeps the one it builds."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
from conftest import BENCHMARKS, bench_script

SCRIPT = BENCHMARKS / "bench_unused_uploads.py"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The script imported as a module (benchmarks/ on the path), its temporary folders under ``tmp_path/tmp``."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return bench_script(monkeypatch, "bench_unused_uploads")


def _main(bench, monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--rows", "20", *args])
    bench.main()


def test_the_temporary_gallery_is_removed(bench, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A run counts 20 rows, 1 unused, prints median and spread, and leaves the temporary folder empty."""
    _main(bench, monkeypatch, "--repeats", "2")
    out = capsys.readouterr().out
    assert "20 rows, 1 unused" in out and "median of 2 (min-max)" in out and "peak RSS of this process" in out
    assert list((tmp_path / "tmp").iterdir()) == []


def test_the_temporary_gallery_is_removed_on_ctrl_c(bench, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A Ctrl-C during the count (after the build) still removes the gallery."""
    import index.objects

    def interrupted(g) -> dict:  # noqa: ANN001 - a Gallery
        raise KeyboardInterrupt

    monkeypatch.setattr(index.objects, "unused_uploads", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _main(bench, monkeypatch)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_keep_keeps_the_gallery(bench, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--keep DIR builds the gallery in DIR and leaves it there (and nothing in the temporary folder)."""
    _main(bench, monkeypatch, "--repeats", "1", "--keep", str(tmp_path / "kept"))
    assert (tmp_path / "kept" / "uploads").is_dir()
    assert list((tmp_path / "tmp").iterdir()) == []
