"""Walk s53 interrupt: Ctrl-C at every step of a long command says what it did. The last commit of a build or an
add is kept and counted (#1), a gallery an interrupted build left empty says to run the build again (#2), startup
(#3), an evaluation report replaced whole (#4), ``clean --apply`` says what it excluded (#5), nothing embedded
says nothing was added (#6), a Ctrl-C once a build is done stops nothing (#7). Each interrupt is raised at a
chosen point (a KeyboardInterrupt, or a real SIGINT to this process where a step holds Ctrl-C back): no timing."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _cli_support import ENCODER, _photo, _run, folder_gallery

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _ctrl_c_raises():
    """A real SIGINT raises KeyboardInterrupt here even when the suite was started with SIGINT ignored."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _ctrl_c() -> None:
    """A real Ctrl-C to this process, now (its handler runs before the next line of Python)."""
    os.kill(os.getpid(), signal.SIGINT)


def _cut_commit_once(monkeypatch, when: str) -> None:
    """The next commit of rows (``Gallery.add_unique``) is cut by Ctrl-C once: ``before`` it commits, or ``after``
    (the rows committed, the call not returned); ``save``: the index's save after the last commit."""
    from index.gallery import Gallery

    real_add, real_save, done = Gallery.add_unique, Gallery.save_index, []

    def add_unique(self, *args, **kw):
        if when == "before" and not done:
            done.append(1)
            raise KeyboardInterrupt
        result = real_add(self, *args, **kw)
        if when == "after" and not done:
            done.append(1)
            raise KeyboardInterrupt
        return result

    def save_index(self):
        if when == "save" and not done:
            done.append(1)
            raise KeyboardInterrupt
        return real_save(self)

    monkeypatch.setattr(Gallery, "add_unique", add_unique)
    monkeypatch.setattr(Gallery, "save_index", save_index)


def _build(tmp_path: Path, n: int = 5) -> tuple[Path, list]:
    root = tmp_path / "photos"
    for i in range(n):
        _photo(root / ("Naja haje" if i % 2 else "Natrix maura") / f"{i}.png", i)
    index = tmp_path / "g"
    return index, ["index", "build", "--dataset", "folder", "--root", root, "--index", index, *ENCODER, "-q"]


# ---------------------------------------------------------------------------------------------- #1 the last commit
@pytest.mark.parametrize("when", ["before", "after", "save"])
def test_a_ctrl_c_at_the_last_commit_of_a_build_keeps_and_counts_every_photo(tmp_path, capsys, monkeypatch, when):
    """#1: a build under 1,024 photos commits once, after the last photo: a Ctrl-C there (before the rows are
    committed, once they are, or as the index is saved) lost every photo and said only 'interrupted'. Now the commit
    is made (or counted when it was), the line says all are kept, and the same command finishes."""
    index, build = _build(tmp_path)
    with monkeypatch.context() as m:
        _cut_commit_once(m, when)
        code, _, err = _run(capsys, *build)
    assert code == 130
    assert err.strip().splitlines()[-1] == (f"speciesid: interrupted while committing the last photos: the 5 "
                                           f"references added are all kept in {index}; run the same command again "
                                           "to finish"), err
    info = json.loads(_run(capsys, "index", "info", "--index", index)[1])
    assert info["references"] == 5
    assert info["build"]["state"] == "interrupted" and info["build"]["note"].endswith(
        "into this gallery was interrupted while committing the last photos: run it again to finish"), info["build"]
    code, out, err = _run(capsys, *build)
    assert code == 0 and "added 0, skipped 0 unreadable, 5 already in the gallery" in out, (out, err)
    assert json.loads(_run(capsys, "index", "info", "--index", index)[1])["build"]["state"] == "complete"


@pytest.mark.parametrize("when", ["before", "after"])
def test_add_references_cut_at_its_last_commit_counts_the_rows_as_its_own(tmp_path, monkeypatch, when):
    """#1, the pipeline: rows a cut commit made are this call's (added, with their ids), not 'already stored'."""
    from index.gallery import Gallery
    from index.records import ReferenceRecord
    from retrieval.encoders import create_encoder
    from retrieval.pipeline import LAST_COMMIT, ReferencesInterrupted, add_references

    enc = create_encoder("timm:test_vit@random", precision="fp32", runtime="torch")
    g = Gallery.create(tmp_path / "g", enc.describe())
    records = [ReferenceRecord(path=_photo(tmp_path / f"{i}.png", i), species="Naja haje") for i in range(4)]
    _cut_commit_once(monkeypatch, when)
    with pytest.raises(ReferencesInterrupted) as caught:
        add_references(g, enc, records, progress=False, workers=1)
    report = caught.value.report
    assert caught.value.saved and caught.value.after == LAST_COMMIT
    assert report.added == 4 and len(set(report.ids)) == 4 and report.duplicates == [], report
    stored = Gallery.open(g.root)
    assert sorted(int(i) for i in stored.store.metadata().index) == sorted(report.ids)


def test_a_ctrl_c_at_the_last_commit_of_an_add_says_what_it_added(tmp_path, capsys, monkeypatch):
    """#1, ``references add``: the same moment said only 'interrupted' (the photos committed or not); now the photos
    added and their ids, that nothing is left to add, and no mark (the add is complete)."""
    index = folder_gallery(tmp_path, capsys, ("Natrix maura", "Naja haje"))
    new = [_photo(tmp_path / "new" / f"{i}.png", 100 + i) for i in range(3)]
    with monkeypatch.context() as m:
        _cut_commit_once(m, "before")
        code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Naja haje", *new)
    assert code == 130
    assert out.splitlines()[:2] == ["Naja haje (existing species): added 3 before the interrupt", "ids: 5-7"], out
    assert err.strip().splitlines()[-1] == (f"speciesid: interrupted while committing the last photos: the 3 "
                                           f"references added are all kept in {index}; nothing is left to add"), err
    info = json.loads(_run(capsys, "index", "info", "--index", index)[1])
    assert info["references"] == 7 and info["build"] == {"state": "complete", "note": ""}


def test_a_ctrl_c_in_the_checks_after_an_add_committed_says_what_it_added(tmp_path, capsys, monkeypatch):
    """#1, ``references add`` once every photo is committed (its near-copy check, its notes): what it added."""
    index = folder_gallery(tmp_path, capsys, ("Natrix maura", "Naja haje"))
    new = [_photo(tmp_path / "new" / f"{i}.png", 100 + i) for i in range(2)]

    def stop(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr("retrieval.workflows.find_near_copies", stop)
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Naja haje", *new)
    assert code == 130
    assert out.splitlines()[:2] == ["Naja haje (existing species): added 2 before the interrupt", "ids: 5-6"], out
    assert err.strip().splitlines()[-1] == (f"speciesid: interrupted while checking the photos added: the 2 "
                                           f"references added are all kept in {index}; nothing is left to add"), err


@pytest.mark.parametrize("where", ["_still_there", "_sign"])
def test_a_ctrl_c_as_the_write_lock_is_taken_does_not_keep_it(tmp_path, monkeypatch, where):
    """#1 seen again: a Ctrl-C just as the write lock's flock was taken (the last commit's, or the index save's)
    left the flock held by a file no one closed, so the commit made after the Ctrl-C waited 10 s for this process
    itself and was not made. Now the flock goes with the interrupted hold."""
    import index.locks
    from index.locks import WriteLock

    lock = WriteLock(tmp_path / ".write.lock")
    owner = index.locks if where == "_still_there" else WriteLock
    real, done = getattr(owner, where), []

    def once(*args):
        if not done:
            done.append(1)
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(owner, where, staticmethod(once) if owner is WriteLock else once)
    with pytest.raises(KeyboardInterrupt), lock.hold(0):
        pass
    with lock.hold(0):  # taken again at once: not "another process is writing this gallery"
        other = WriteLock(tmp_path / ".write.lock")  # a second file description: the flock is this hold's
        with pytest.raises(TimeoutError), other.hold(0):
            pass


# ------------------------------------------------------------------------------- #2 the empty gallery's advice
def _interrupted_first_build(tmp_path: Path, monkeypatch, capsys) -> tuple[Path, Path]:
    """A first build cut by Ctrl-C before any photo was kept: (gallery, photo folder)."""
    import retrieval.workflows

    index, build = _build(tmp_path, 4)
    real = retrieval.workflows.create_encoder_from_config

    def create(config, **kw):
        enc = real(config, **kw)

        def encode_batch(batch):
            raise KeyboardInterrupt

        enc.encode_batch = encode_batch
        return enc

    with monkeypatch.context() as m:
        m.setattr(retrieval.workflows, "create_encoder_from_config", create)
        code, out, err = _run(capsys, *build)
    assert code == 130, err
    assert err.strip().splitlines()[-1] == (f"speciesid: interrupted before any photo was added: nothing was added "
                                           f"to {index}; run the same command again to add them"), err  # #6
    return index, tmp_path / "photos"


def test_a_gallery_an_interrupted_build_left_empty_says_to_run_the_build_again(tmp_path, capsys, monkeypatch):
    """#2: identify (and probe train) on it blamed 'clean --apply' and sent the user to 'clean --restore'."""
    index, root = _interrupted_first_build(tmp_path, monkeypatch, capsys)
    query = _photo(tmp_path / "q.png", 99)
    code, _, err = _run(capsys, "identify", "--index", index, query, "-q")
    assert code == 2
    assert err.strip().splitlines()[-1] == (f"speciesid: error: gallery {index} has no searchable references: a "
                                           f"build of {root} (--dataset folder) into this gallery was interrupted: "
                                           "run it again to add the rest"), err
    code, _, err = _run(capsys, "probe", "train", "--index", index, "-q")
    assert code == 2 and "was interrupted: run it again to add the rest; then train the probe" in err, err
    assert "clean --restore" not in err, err


def test_a_gallery_whose_references_are_all_excluded_keeps_the_restore_advice(tmp_path, capsys):
    """#2: references all excluded by a clean run: 'clean --restore' is the way back, and said."""
    from index.exclusions import exclude
    from index.gallery import Gallery

    index = folder_gallery(tmp_path, capsys, ("Natrix maura",), photos=2)
    g = Gallery.open(index)
    exclude(g, [int(i) for i in g.store.metadata().index], kinds=["near-duplicate"])
    code, _, err = _run(capsys, "identify", "--index", index, _photo(tmp_path / "q.png", 99), "-q")
    assert code == 2 and err.strip() == (f"speciesid: error: gallery {index} has no searchable references: its 2 "
                                         "references are all excluded by 'speciesid clean --apply': 'speciesid clean "
                                         "--restore' brings them back"), err


# ------------------------------------------------------------------------------------------------ #3 startup
def test_a_ctrl_c_while_the_command_loads_is_one_line(monkeypatch, capsys):
    """#3: Ctrl-C while the command's modules load (parser_for) printed a 47-line traceback."""
    import api.cli

    def loading(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(api.cli, "parser_for", loading)
    try:
        code = api.cli.main(["references", "add", "--help"])
    except KeyboardInterrupt:  # the code before: out of main, a traceback
        pytest.fail("main let the Ctrl-C out")
    assert code == 130
    assert capsys.readouterr().err == "speciesid: interrupted\n"


_STOP_AT_SERVE = ("import sys\n"
                  "class Stop:\n"
                  "    def find_spec(self, name, path=None, target=None):\n"
                  "        if name == 'api.cli.serve':\n"
                  "            raise KeyboardInterrupt\n"
                  "sys.meta_path.insert(0, Stop())\n")  # a Ctrl-C as api.cli imports its command modules


@pytest.mark.parametrize("entry", ["from api.console import main; sys.exit(main())",  # the speciesid script's
                                   "import runpy; runpy.run_module('api.console', run_name='__main__')"])
def test_a_ctrl_c_while_the_command_line_imports_is_one_line(entry):
    """#3: Ctrl-C while ``api.cli`` itself imports (numpy), before main runs: one line, status 130 (said by the
    console entry point, which pyproject's ``speciesid`` script runs)."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["speciesid"] == "api.console:main"
    done = subprocess.run([sys.executable, "-c", _STOP_AT_SERVE + entry + "\n"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 130 and done.stderr == "speciesid: interrupted\n", (done.returncode, done.stderr)


def test_importing_the_command_line_says_nothing_of_a_ctrl_c():
    """Re-read w3 #7: a Ctrl-C as anything imported ``api.cli`` (a test, a program embedding it) became a line on
    stderr and SystemExit(130) from the import itself. Now the importer gets Python's KeyboardInterrupt."""
    code = (_STOP_AT_SERVE + "try:\n    import api.cli\n"
            "except KeyboardInterrupt:\n    print('the importer has it')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, "the importer has it\n", ""), done


def test_a_ctrl_c_stops_an_exit_handler_that_hangs():
    """Re-read w3 #1: once a command returned, Ctrl-C was ignored through Python's exit handlers (multiprocessing
    joining its children, Ray's shutdown): one that hung could not be stopped, however often Ctrl-C was pressed.
    Now a Ctrl-C there ends the program at once, with the command's own exit status."""
    code = ("import atexit, sys, time\n"
            "def teardown():\n"
            "    sys.stderr.write('tearing down\\n'); sys.stderr.flush()\n"
            "    time.sleep(600)\n"  # a library's teardown that hangs
            "atexit.register(teardown)\n"
            "from api.cli import _exit_on_ctrl_c\n"
            "_exit_on_ctrl_c(3)\n")  # as main does once the command returned 3
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert child.stderr.readline() == "tearing down\n"  # in the exit handler
        child.send_signal(signal.SIGINT)
        try:
            assert child.wait(timeout=120) == 3
        except subprocess.TimeoutExpired:
            pytest.fail("the Ctrl-C did not stop the exit handler")
    finally:
        child.kill()
        child.wait()
        child.stderr.close()


def test_a_ctrl_c_once_the_command_returned_keeps_its_exit_status(tmp_path):
    """#7: a Ctrl-C as Python tears down after the command (its output all written) made it a silent 130."""
    code = ("import os, signal, sys\n"
            f"sys.argv = ['speciesid', 'index', 'info', '--index', {str(tmp_path / 'none')!r}]\n"
            "from api.cli import main\n"
            "status = main()\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "sys.exit(99)\n")  # not reached: the command's own status
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.startswith("speciesid: error: ") and len(done.stderr.splitlines()) == 1, done.stderr


# ----------------------------------------------------------------------------------------- #4 evaluate's report
def _results():
    from retrieval.metrics import EvalItem, evaluate

    items = [EvalItem("A", {"A": 0.8, "B": 0.2}), EvalItem("B", {"A": 0.6, "B": 0.4}), EvalItem("B", {"B": 1.0})]
    return evaluate(items, venomous={"A": True, "B": False})


def _old_report(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True)
    old = {"report.json": b'{"title": "old", "results": {"blend": {"confusion": {"A": {"A": 1}}}, "knn": {}}}\n',
           "report.md": b"old\n", "confusion_blend.png": b"old plot", "reliability.png": b"old plot",
           "mine.txt": b"the user's own file"}  # its knn had no confusion matrix: it wrote no confusion_knn.png
    for name, data in old.items():
        (folder / name).write_bytes(data)
    return old


def test_an_evaluation_report_cut_short_leaves_the_earlier_one_as_it_was(tmp_path, monkeypatch):
    """#4: Ctrl-C while the report was written left new report.json/report.md beside the earlier run's plots."""
    import retrieval.metrics
    from retrieval.metrics import write_report

    out = tmp_path / "R"
    old = _old_report(out)
    real, made = retrieval.metrics._save_figure, []

    def save_figure(fig, path):
        if made:  # the second plot
            raise KeyboardInterrupt
        made.append(path)
        real(fig, path)

    monkeypatch.setattr(retrieval.metrics, "_save_figure", save_figure)
    with pytest.raises(KeyboardInterrupt):
        write_report(out, {"knn": _results(), "probe": _results()}, title="t")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old  # no staging folder left either


def test_an_evaluation_report_replaces_the_earlier_one_whole(tmp_path, monkeypatch):
    """#4: a report written whole into a folder holding an earlier one: no plot of the earlier one's other methods
    is left beside it (the user's own files are); a Ctrl-C during the moves waits for them, then is raised."""
    import retrieval.metrics
    from retrieval.metrics import write_report

    out = tmp_path / "R"
    _old_report(out)
    real = os.replace
    moves = []

    def replace(src, dst):
        if Path(dst).parent == out:  # a move into the report folder (not a staged file's own atomic write)
            if not moves:
                _ctrl_c()  # held: every file is moved first
            moves.append(Path(dst).name)
        real(src, dst)

    monkeypatch.setattr(retrieval.metrics.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        write_report(out, {"knn": _results()}, title="t")
    assert moves[-1] == "report.json"  # last: its presence says the report is whole
    assert sorted(p.name for p in out.iterdir()) == ["confusion_knn.png", "mine.txt", "reliability.png",
                                                     "report.json", "report.md"]
    assert json.loads((out / "report.json").read_text())["title"] == "t"


def test_an_evaluation_report_leaves_the_users_own_plots(tmp_path):
    """Re-read w3 #2: every confusion_*.png the new report did not write was deleted, a user's own figure
    (confusion_matrix_thesis_fig3.png) with them; only the plots the earlier report.json lists are its own."""
    from retrieval.metrics import write_report

    out = tmp_path / "R"
    _old_report(out)
    for name in ("confusion_matrix_thesis_fig3.png", "confusion_probe.png"):  # the earlier report ran no probe
        (out / name).write_bytes(b"the user's own figure")
    write_report(out, {"knn": _results()}, title="t")
    assert sorted(p.name for p in out.iterdir()) == [
        "confusion_knn.png", "confusion_matrix_thesis_fig3.png", "confusion_probe.png", "mine.txt",
        "reliability.png", "report.json", "report.md"]  # the earlier report's confusion_blend.png went
    assert (out / "confusion_matrix_thesis_fig3.png").read_bytes() == b"the user's own figure"
    # final re-read #2: a method of the earlier report that wrote no plot (no confusion matrix) names none either
    (out / "report.json").write_text('{"title": "old", "results": {"knn": {}}}')
    (out / "confusion_knn.png").write_bytes(b"the user's own figure")
    write_report(out, {"probe": _results()}, title="t")
    assert (out / "confusion_knn.png").read_bytes() == b"the user's own figure"
    (out / "report.json").write_text("not JSON")  # a report.json that cannot be read names nothing
    write_report(out, {"probe": _results()}, title="t")
    assert (out / "confusion_knn.png").exists() and (out / "confusion_matrix_thesis_fig3.png").exists()


# --------------------------------------------------------------------------------------------- #5 clean --apply
def _clean(tmp_path: Path, capsys) -> tuple[Path, list]:
    index = folder_gallery(tmp_path, capsys, ("Natrix maura", "Naja haje"), photos=6)
    return index, ["clean", "--index", index, "--no-zero-shot", "--no-suspect-labels", "--report", tmp_path / "R",
                   "--apply", "--apply-to", "near-duplicate", "--quiet"]


def test_a_ctrl_c_after_clean_applied_says_what_it_excluded(tmp_path, capsys, monkeypatch):
    """#5: Ctrl-C while the report was written, once the exclusion was saved, said only 'interrupted'."""
    index, command = _clean(tmp_path, capsys)

    def stop(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr("retrieval.clean.write_report", stop)
    code, out, err = _run(capsys, *command)
    assert code == 130
    excluded = json.loads(_run(capsys, "index", "info", "--index", index)[1])["excluded"]
    assert excluded > 0
    assert out.splitlines()[0].startswith(f"applied: {excluded} references excluded (0 already excluded"), out
    assert out.splitlines()[0].endswith(f"; undo with 'speciesid clean --restore --index {index}'"), out
    assert err.strip().splitlines()[-1] == (f"speciesid: interrupted once the exclusion was applied (above): the "
                                           f"report in {tmp_path / 'R'} is incomplete; the same command writes it "
                                           "again (what it excluded stays excluded)"), err


def test_a_ctrl_c_while_clean_excludes_waits_for_the_exclusion_and_its_log(tmp_path, capsys, monkeypatch):
    """#5: a Ctrl-C as the exclusion is written is held until it and its log entry are saved (else 'clean
    --restore' would not find the run), then said with what was excluded; the probe note too."""
    import retrieval.clean

    index, command = _clean(tmp_path, capsys)
    real = retrieval.clean.exclude

    def exclude(*args, **kw):
        _ctrl_c()
        return real(*args, **kw)

    monkeypatch.setattr(retrieval.clean, "exclude", exclude)
    monkeypatch.setattr(retrieval.clean, "has_probe", lambda index: True)
    code, out, err = _run(capsys, *command)
    assert code == 130
    lines = out.splitlines()
    assert lines[0].startswith("applied: ") and " references excluded (0 already excluded" in lines[0], out
    assert lines[-1] == (f"note: the probe of {index} was trained with the excluded references; retrain it with "
                         f"'speciesid probe train --index {index}'"), out
    assert "interrupted once the exclusion was applied" in err, err
    code, out, _ = _run(capsys, "clean", "--restore", "--index", index)
    assert code == 0 and f"restored {lines[0].split()[1]} references" in out, out


# -------------------------------------------------------------------------------------- #7 once a build is done
@pytest.mark.parametrize("where", ["the mark", "the summary"])
def test_a_ctrl_c_once_a_build_is_done_stops_nothing(tmp_path, capsys, monkeypatch, where):
    """#7: a Ctrl-C as the build's mark was removed (left 'running': read as interrupted) or as its summary was
    read exited 130 with a bare 'interrupted' for a build that had completed. Now the summary, status 0."""
    import index.build_mark as marks
    import retrieval.workflows

    index, build = _build(tmp_path)
    module, name = (marks, "clear_covered") if where == "the mark" else (retrieval.workflows,
                                                                                    "_species_unread")
    real = getattr(module, name)

    def ctrl_c_then(*args, **kw):
        _ctrl_c()
        return real(*args, **kw)

    monkeypatch.setattr(module, name, ctrl_c_then)
    code, out, err = _run(capsys, *build)
    assert code == 0, err
    assert out.startswith(f"gallery {index}: 5 references, 2 species"), out
    assert err.strip() == ("speciesid: the build had finished when the interrupt came (Ctrl-C): nothing was lost, "
                           "the lines above are its whole summary"), err
    info = json.loads(_run(capsys, "index", "info", "--index", index)[1])
    assert info["build"] == {"state": "complete", "note": ""}


def test_a_ctrl_c_as_a_finished_add_prints_its_summary_stops_nothing(tmp_path, capsys, monkeypatch):
    """#7, ``references add``: a Ctrl-C once the add returned, as its summary was printed, exited 130 with a bare
    'interrupted' after half of it. Now the whole summary, its own status."""
    import api.cli.references

    index = folder_gallery(tmp_path, capsys, ("Natrix maura", "Naja haje"))
    new = [_photo(tmp_path / "new" / f"{i}.png", 100 + i) for i in range(2)]
    real = api.cli.references.id_runs

    def ctrl_c_then(ids):
        _ctrl_c()
        return real(ids)

    monkeypatch.setattr(api.cli.references, "id_runs", ctrl_c_then)
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Naja haje", *new)
    assert code == 0, err
    assert out.splitlines()[:2] == ["Naja haje (existing species): added 2, skipped 0 unreadable, 0 duplicates, in "
                                    + out.split(" in ", 1)[1].split("\n")[0], "ids: 5-6"], out
    assert err.strip() == ("speciesid: the add had finished when the interrupt came (Ctrl-C): nothing was lost, the "
                           "lines above are its whole summary"), err


@pytest.mark.parametrize("command", ["build", "add"])
def test_a_ctrl_c_as_a_finished_command_returns_keeps_its_status(tmp_path, capsys, monkeypatch, command):
    """#7: a Ctrl-C once the build's or add's summary is printed, as the command returns (its model and gallery torn
    down: OpenVINO's, Lance's), exited 130 with a bare 'interrupted' after the whole summary."""
    import api.cli.index
    import api.cli.references

    if command == "build":
        index, argv = _build(tmp_path)
        module = api.cli.index
    else:
        index = folder_gallery(tmp_path, capsys, ("Natrix maura", "Naja haje"))
        argv = ["references", "add", "--index", index, "--species", "Naja haje",
                _photo(tmp_path / "new" / "1.png", 100)]
        module = api.cli.references
    real = module.finished

    def finished_then_ctrl_c(status):
        real(status)
        raise KeyboardInterrupt  # as the command's objects are torn down, after it returned its status

    monkeypatch.setattr(module, "finished", finished_then_ctrl_c)
    code, out, err = _run(capsys, *argv)
    assert code == 0 and "added " in out, (out, err)
    assert err.strip() == ("speciesid: the command had finished when the interrupt came (Ctrl-C): nothing was lost, "
                           "the lines above are its whole output"), err


def test_a_held_ctrl_c_then_a_second_stops_at_once():
    """The hold itself: a first Ctrl-C waits for the block, a second one stops it at once."""
    from index.interrupts import held_interrupt

    reached = []
    with pytest.raises(KeyboardInterrupt), held_interrupt():
        _ctrl_c()
        reached.append("after the first")
        _ctrl_c()
        reached.append("after the second")
    assert reached == ["after the first"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_held_ctrl_c_says_so_at_once(caplog):
    """Re-read w3 #5: a hold with no note of its own held a first Ctrl-C silently: nothing happened for the user
    (the build's gallery read: maybe a remote store's retries). Now a line at once, saying how to stop now."""
    from index.interrupts import held_interrupt

    with caplog.at_level(logging.WARNING, logger="index.interrupts"), held_interrupt(reraise=False) as held:
        _ctrl_c()
        assert [r.getMessage() for r in caplog.records] == [
            "interrupted: finishing the step in progress (Ctrl-C again to stop now)"]
    assert held.came


@pytest.mark.parametrize("where", ["the build's result", "the summary"])
def test_a_second_ctrl_c_once_a_build_is_done_says_the_build_is_whole(tmp_path, capsys, monkeypatch, caplog, where):
    """Re-read w3 #5: two Ctrl-C as the built gallery's species were read (or its summary printed) ended in a bare
    'interrupted' (130) with no summary, for a build that had completed. Now the build's summary (or what of it
    was printed), and a line saying nothing was lost."""
    import api.cli.index
    import retrieval.workflows

    index, build = _build(tmp_path)
    module, name = ((retrieval.workflows, "_species_unread") if where == "the build's result"
                    else (api.cli.index, "_build_summary"))
    real = getattr(module, name)

    def two_ctrl_c(*args, **kw):
        _ctrl_c()
        _ctrl_c()
        return real(*args, **kw)  # not reached

    monkeypatch.setattr(module, name, two_ctrl_c)
    with caplog.at_level(logging.WARNING):
        code, out, err = _run(capsys, *build)
    assert any(r.getMessage().endswith("(Ctrl-C again to stop now)") for r in caplog.records), caplog.records
    if where == "the build's result":
        assert code == 0, err
        assert out.startswith(f"gallery {index}: 5 references, 2 species"), out
        assert err.strip().endswith("nothing was lost; the summary above does not name the species none of whose "
                                    "photos could be used (the second Ctrl-C stopped that look: the skipped photos' "
                                    "lines name them)"), err
    else:
        assert code == 130 and out == "", (out, err)
        assert err.strip() == ("speciesid: the build had finished when the interrupt came (Ctrl-C): nothing was "
                               "lost; its summary above was cut short ('speciesid index info --index DIR' shows "
                               "the gallery)"), err
    info = json.loads(_run(capsys, "index", "info", "--index", index)[1])
    assert info["build"] == {"state": "complete", "note": ""}


def test_a_second_ctrl_c_in_a_finished_adds_summary_says_the_add_is_whole(tmp_path, capsys, monkeypatch):
    """Re-read w3 #5, ``references add``: two Ctrl-C as its summary was printed ended in a bare 'interrupted'. Now
    the summary printed so far and a line saying the add had finished."""
    import api.cli.references

    index = folder_gallery(tmp_path, capsys, ("Natrix maura", "Naja haje"))
    new = [_photo(tmp_path / "new" / f"{i}.png", 100 + i) for i in range(2)]

    def two_ctrl_c(ids):
        _ctrl_c()
        _ctrl_c()

    monkeypatch.setattr(api.cli.references, "id_runs", two_ctrl_c)
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Naja haje", *new)
    assert code == 130 and out.startswith("Naja haje (existing species): added 2"), (out, err)
    assert err.strip() == ("speciesid: the add had finished when the interrupt came (Ctrl-C): nothing was lost; its "
                           "summary above was cut short"), err
