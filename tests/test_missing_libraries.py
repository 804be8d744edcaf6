"""A dependency that is not installed (a broken or partial install): the command that needs it stops with one line
saying what to install, and the others, ``--help`` first, still work. The library is hidden by an import hook that
raises ModuleNotFoundError, as a missing distribution does."""

from __future__ import annotations

import importlib.abc
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _cli_support import ENCODER, _photo, _run, folder_gallery

from index.store import LANCE_MISSING
from index.vectors import FAISS_MISSING


class _Hide(importlib.abc.MetaPathFinder):
    """Imports of ``name`` (and its submodules) fail as for a distribution that is not installed."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN201
        if fullname == self.name or fullname.startswith(self.name + "."):
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


def _hide(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, loaded)
    monkeypatch.setattr(sys, "meta_path", [_Hide(name), *sys.meta_path])


def test_without_lance_index_info_and_compact_say_to_install_pylance(tmp_path, capsys, monkeypatch):
    index = folder_gallery(tmp_path, capsys, ("Natrix maura", "Naja haje"))
    _hide(monkeypatch, "lance")
    for command in ("info", "compact"):
        code, _, err = _run(capsys, "index", command, "--index", index)
        assert code == 2
        assert err.startswith(f"speciesid: error: ImportError: {LANCE_MISSING} (run with -vv")
        assert len(err.splitlines()) == 1
    assert LANCE_MISSING.endswith("pip install pylance")


def test_without_lance_a_writes_compaction_warns_what_to_install(tmp_path, capsys, monkeypatch, caplog):
    """The automatic compaction after a write (SPECIESID_COMPACT_FRAGMENTS small fragments) needs lance too: the
    write is stored and the warning says what to install."""
    index = folder_gallery(tmp_path, capsys, ("Natrix maura", "Naja haje"))
    monkeypatch.setenv("SPECIESID_COMPACT_FRAGMENTS", "2")
    _hide(monkeypatch, "lance")
    for i in range(3):
        code, _, err = _run(capsys, "references", "add", "--index", index, "--species", "Naja haje",
                            _photo(tmp_path / "new" / f"{i}.png", 100 + i))
        assert code == 0, err
    assert f"compacting its store after a write failed ({LANCE_MISSING}); the write itself is stored" in caplog.text


def test_without_faiss_help_works_and_a_build_says_to_install_faiss_cpu(tmp_path):
    """In a fresh interpreter, faiss hidden before anything imports it: ``--help`` exits 0, and ``index build``
    stops with FAISS_MISSING in one line."""
    photos = tmp_path / "photos"
    for i in range(4):
        _photo(photos / ("Natrix maura", "Naja haje")[i % 2] / f"{i}.png", i)
    script = textwrap.dedent(f"""
        import importlib.abc, sys

        class Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, fullname, path=None, target=None):
                if fullname.split(".")[0] == "faiss":
                    raise ModuleNotFoundError(f"No module named {{fullname!r}}", name=fullname)

        sys.meta_path.insert(0, Hide())
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from api.cli import main
        try:
            main(["--help"])
        except SystemExit as exc:
            print("help exit", exc.code)
        sys.exit(main(["index", "build", "--dataset", "folder", "--root", {str(photos)!r},
                       "--index", {str(tmp_path / "g")!r}, *{ENCODER!r}, "-q"]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "usage: speciesid" in done.stdout and "help exit 0" in done.stdout, done.stderr
    assert done.returncode == 2, done.stderr
    assert f"speciesid: error: ImportError: {FAISS_MISSING} (run with -vv" in done.stderr
    assert "Traceback" not in done.stderr
    assert "pip install faiss-cpu" in FAISS_MISSING
