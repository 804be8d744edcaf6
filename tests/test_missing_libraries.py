"""A dependency that is not installed (a broken or partial install): the command that needs it stops with one line
saying what to install, and the others, ``--help`` first, still work. The library is hidden by an import hook that
raises ModuleNotFoundError, as a missing distribution does."""

from __future__ import annotations

import importlib.abc
import sys

import pytest
from _cli_support import _run, folder_gallery

from index.store import LANCE_MISSING


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
