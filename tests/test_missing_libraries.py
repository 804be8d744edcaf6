"""A dependency that is not installed (a broken or partial install): the command that needs it stops with one line
saying what to install, and the others, ``--help`` first, still work. The library is hidden by an import hook that
raises ModuleNotFoundError, as a missing distribution does."""

from __future__ import annotations

import importlib.abc
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from _cli_support import DIM, ENC, ENCODER, FakeEncoder, _photo, _run, folder_gallery, venom_flags

import index.vectors
from index.gallery import Gallery
from index.records import ReferenceRecord
from index.store import LANCE_BROKEN, LANCE_MISSING, import_lance
from index.vectors import FAISS_BROKEN, FAISS_MISSING
from retrieval.identify import Identifier

#: What an installed library that cannot load raises on import (here: a shared library it needs is missing).
LIBGOMP = ImportError("libgomp.so.1: cannot open shared object file: No such file or directory")


class _Hide(importlib.abc.MetaPathFinder):
    """Imports of ``name`` (and its submodules) fail as for a distribution that is not installed."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN201
        if fullname == self.name or fullname.startswith(self.name + "."):
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


class _Fail(importlib.abc.MetaPathFinder):
    """The import of ``name`` raises ``error``: an installed library that fails to load."""

    def __init__(self, name: str, error: ImportError) -> None:
        self.name = name
        self.error = error

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN201
        if fullname == self.name:
            raise self.error
        return None


def _hide(monkeypatch: pytest.MonkeyPatch, name: str, finder: importlib.abc.MetaPathFinder | None = None) -> None:
    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, loaded)
    monkeypatch.setattr(sys, "meta_path", [finder or _Hide(name), *sys.meta_path])


def _fresh_vectors(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN202 - a fresh index.vectors module
    """A fresh copy of ``index.vectors`` (its ``import faiss`` run again), the loaded one left as it is."""
    spec = importlib.util.spec_from_file_location("_fresh_vectors", index.vectors.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "_fresh_vectors", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_a_faiss_that_is_not_installed_says_to_install_faiss_cpu(monkeypatch):
    _hide(monkeypatch, "faiss")
    with pytest.raises(ImportError) as raised:
        _fresh_vectors(monkeypatch).faiss.IndexFlatIP(4)
    assert str(raised.value) == FAISS_MISSING
    assert isinstance(raised.value.__cause__, ModuleNotFoundError) and raised.value.__cause__.name == "faiss"


@pytest.mark.parametrize("error", [LIBGOMP, ModuleNotFoundError("No module named 'faiss._swigfaiss'",
                                                                name="faiss._swigfaiss")])
def test_a_faiss_that_fails_to_load_says_so_with_its_error_not_to_install_it(monkeypatch, error):
    """An installed faiss whose import fails (a library it needs, a part of it, missing) is not "not installed":
    ``pip install faiss-cpu`` would only answer "Requirement already satisfied". The message keeps its error, and
    the ImportError is chained to it (``-vv`` shows the traceback)."""
    _hide(monkeypatch, "faiss", _Fail("faiss", error))
    with pytest.raises(ImportError) as raised:
        _fresh_vectors(monkeypatch).faiss.IndexFlatIP(4)
    assert str(raised.value) == FAISS_BROKEN.format(error)
    assert str(raised.value).startswith("the vector index needs faiss, which is installed but failed to load (")
    assert "not installed" not in str(raised.value) and "pip install" not in str(raised.value)
    assert raised.value.__cause__ is error


def test_a_lance_that_fails_to_load_says_so_with_its_error_not_to_install_it(monkeypatch):
    _hide(monkeypatch, "lance", _Fail("lance", LIBGOMP))
    with pytest.raises(ImportError) as raised:
        import_lance()
    assert str(raised.value) == LANCE_BROKEN.format(LIBGOMP)
    assert "failed to load (libgomp.so.1: cannot open shared object file" in str(raised.value)
    assert "not installed" not in str(raised.value) and raised.value.__cause__ is LIBGOMP
    _hide(monkeypatch, "lance")
    with pytest.raises(ImportError, match="which is not installed: pip install pylance$"):
        import_lance()


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


def test_without_lance_identify_answers_and_set_venom_sets_the_flags_with_a_warning(tmp_path, capsys, monkeypatch,
                                                                                    caplog):
    """Answers and set-venom need no lance (the edit mark it records in the manifest does): identify answers, and
    set-venom sets the flags, exits 0 and warns that the edit is not recorded (before: both stopped with
    LANCE_MISSING, set-venom after the flags had changed; re-read 3 of 0fc5d4a)."""
    index = folder_gallery(tmp_path, capsys, ("Natrix maura", "Naja haje"))
    _hide(monkeypatch, "lance")
    code, out, err = _run(capsys, "identify", "--index", index, tmp_path / "photos" / "Naja haje" / "1.png", "-q")
    assert code == 0, err
    assert "Naja haje" in out or "Natrix maura" in out
    code, out, err = _run(capsys, "species", "set-venom", "--index", index, "Natrix maura", "yes")
    assert code == 0, err
    assert out.startswith("Natrix maura: venomous no -> yes (2 references)")
    assert f"the edit is not recorded in the store's manifest ({LANCE_MISSING}): other processes" in caplog.text
    assert venom_flags(capsys, index)["Natrix maura"] is True


def test_a_failed_commit_of_the_edit_mark_is_a_warning_after_the_flags_are_set_not_a_failure(tmp_path, capsys,
                                                                                             monkeypatch, caplog):
    """Final read s55 #1: the mark's commit failing (a store error) after the flags' own commit stopped set-venom
    with the store's "run the command again", which changes nothing (the flags are set) and records nothing. Now
    it exits 0, the flags set, and warns with the store's error and what to do (restart the other processes)."""
    import lance

    index = folder_gallery(tmp_path, capsys, ("Natrix maura", "Naja haje"))

    def refuse(self, values):  # noqa: ANN001, ANN202 - LanceDataset.update_config, as a full disk fails it
        raise OSError("LanceError(IO): No space left on device")

    monkeypatch.setattr(lance.LanceDataset, "update_config", refuse)
    code, out, err = _run(capsys, "species", "set-venom", "--index", index, "Natrix maura", "yes")
    assert code == 0, err
    assert out.startswith("Natrix maura: venomous no -> yes (2 references)")
    assert ("venomous flags of Natrix maura set, but the edit is not recorded in the store's manifest "
            "(LanceError(IO): No space left on device): other processes see it by the venom counts only, which a "
            "later add of the species can hide: restart them if they name its old flags (running set-venom again "
            "changes nothing)") in caplog.text
    assert venom_flags(capsys, index)["Natrix maura"] is True


def test_without_lance_another_gallery_drops_its_cached_rows_at_a_new_version(tmp_path, monkeypatch):
    """Without lance no edit mark is read: another process's cached metadata all goes at its next synced version,
    so its evidence names the new flag after a set-venom that an add of the species hid from the counts."""
    _hide(monkeypatch, "lance")
    rng = np.random.default_rng(11)
    g = Gallery.create(tmp_path / "g", ENC)
    centre = rng.standard_normal(DIM) * 3

    def add(tag: str, n: int) -> None:
        x = centre + 0.05 * rng.standard_normal((n, DIM))
        g.add([ReferenceRecord(path=f"/p/{tag}{i}.jpg", species="Lycodon capucinus") for i in range(n)],
              [f"{tag}-{i}" for i in range(n)], (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))

    add("a", 4)
    server = Identifier(FakeEncoder(), Gallery.open(g.root))
    q = (centre / np.linalg.norm(centre))[None].astype(np.float32)

    def evidence() -> dict[str, bool | None]:
        return {Path(n.path).name: n.venomous for n in server.identify_embeddings(q)[0].neighbours}

    for _ in range(2):
        assert evidence() == {f"a{i}.jpg": None for i in range(4)}
    assert g.set_venomous("Lycodon capucinus", True) == (4, 4, 0)
    add("b", 4)  # the counts (4 yes, 0 no, 4 unrecorded) lower none of (0, 0, 4)
    server.gallery.refresh(force=True)
    assert evidence() == {**{f"a{i}.jpg": True for i in range(4)}, **{f"b{i}.jpg": None for i in range(4)}}


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
