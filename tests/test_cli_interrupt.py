"""Ctrl-C during ``index build`` / ``references add`` keeps what was embedded and says so; a gallery that holds no
reference, refusing another encoder, says to delete it. Tiny random ``timm:test_vit@random`` encoder, random photos."""

from __future__ import annotations

from pathlib import Path

import pytest
from _cli_support import ENCODER, _photo, _run, folder_gallery


def _interrupt_on_batch(monkeypatch, n: int, *, module: str = "retrieval.workflows", again: bool = False,
                        batch: int = 2) -> None:
    """Encoders that ``module`` makes embed ``batch`` photos a batch and raise KeyboardInterrupt at batch ``n``;
    ``again``: a second Ctrl-C comes while the rows embedded before it are committed."""
    import importlib

    from index.gallery import Gallery

    made_by = importlib.import_module(module)
    real_create = made_by.create_encoder_from_config

    def create(config, **kw):
        enc = real_create(config, **kw)
        enc.batch_size = batch
        real, calls = enc.encode_batch, []

        def encode_batch(batch):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real(batch)

        enc.encode_batch = encode_batch
        return enc

    monkeypatch.setattr(made_by, "create_encoder_from_config", create)
    if again:
        def add_unique(self, *args, **kw):
            raise KeyboardInterrupt

        monkeypatch.setattr(Gallery, "add_unique", add_unique)


def interrupted_build(tmp_path: Path, capsys, monkeypatch) -> tuple[Path, Path, list, int, str]:
    """A build of 10 photos of two species cut short by Ctrl-C after 4 were kept (two batches of 2 photos embedded,
    below the 1,024 rows of a commit): (gallery, photos, its command, its exit status, its stderr)."""
    root = tmp_path / "photos"
    for i in range(10):
        _photo(root / ("Naja haje" if i % 2 else "Natrix maura") / f"{i}.png", i)
    index = tmp_path / "g"
    build = ["index", "build", "--dataset", "folder", "--root", root, "--index", index, *ENCODER, "-q"]
    with monkeypatch.context() as m:
        _interrupt_on_batch(m, 3)
        code, _, err = _run(capsys, *build)
    return index, root, build, code, err


def test_an_interrupted_build_keeps_what_was_embedded_and_the_same_command_adds_the_rest(tmp_path, capsys,
                                                                                        monkeypatch):
    index, _, build, code, err = interrupted_build(tmp_path, capsys, monkeypatch)
    assert code == 130
    assert err.strip().endswith(f"speciesid: interrupted: 4 references kept in {index}; run the same command again "
                                "to add the rest"), err
    code, out, err = _run(capsys, "index", "info", "--index", index)
    assert code == 0 and '"references": 4' in out, (out, err)
    code, out, err = _run(capsys, *build)
    assert code == 0 and "added 6, skipped 0 unreadable, 4 already in the gallery" in out, (out, err)


def test_a_second_ctrl_c_stops_the_commit_and_says_at_least(tmp_path, capsys, monkeypatch):
    root = tmp_path / "photos"
    for i in range(6):
        _photo(root / "Natrix maura" / f"{i}.png", i)
    index = tmp_path / "g"
    with monkeypatch.context() as m:
        _interrupt_on_batch(m, 2, again=True)
        code, _, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", index,
                            *ENCODER, "-q")
    assert code == 130 and f"interrupted: at least 0 references kept in {index}" in err, err


def test_an_interrupted_references_add_keeps_what_was_embedded(tmp_path, capsys, monkeypatch):
    index = folder_gallery(tmp_path, capsys, ("Natrix maura", "Naja haje"))
    new = [_photo(tmp_path / "new" / f"{i}.png", 100 + i) for i in range(5)]
    with monkeypatch.context() as m:
        _interrupt_on_batch(m, 2, module="retrieval.galleries")
        code, _, err = _run(capsys, "references", "add", "--index", index, "--species", "Naja haje", *new)
    assert code == 130 and f"interrupted: 2 references kept in {index}; run the same command again" in err, err
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Naja haje", *new)
    assert code == 0 and "added 3, skipped 0 unreadable, 2 already in the gallery" in out, (out, err)


def test_an_interrupted_references_add_of_a_new_species_prints_the_notes_of_what_it_kept(tmp_path, capsys,
                                                                                         monkeypatch):
    """Stop 48's note: the interrupt path did not print the notes add_photos gives on the normal path (the probe does
    not know the new species; too few photos for 'probe train'). They are printed for the photos it kept."""
    import retrieval.workflows

    index = folder_gallery(tmp_path, capsys, ("Natrix maura", "Naja haje"))
    new = [_photo(tmp_path / "new" / f"{i}.png", 100 + i) for i in range(3)]
    told: list[int] = []  # the gallery's references when the probe note was asked for

    def probe_note(gallery, *, api=False):
        told.append(len(gallery))
        return f"the probe of {gallery.root} does not know 1 species added since it was made (Vipera berus)"

    monkeypatch.setattr(retrieval.workflows, "probe_cannot_name", probe_note)  # no probe trained here: its note
    with monkeypatch.context() as m:
        _interrupt_on_batch(m, 2, module="retrieval.galleries", batch=1)
        code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Vipera berus", *new)
    assert code == 130 and f"interrupted: 1 reference kept in {index}; run the same command again" in err, err
    assert told == [5]  # asked once the kept photo was committed
    assert out.splitlines() == [
        "Vipera berus (new species): added 1 before the interrupt", "ids: 5",
        f"note: the probe of {index} does not know 1 species added since it was made (Vipera berus)",
        "note: Vipera berus has 1 reference photo; 'speciesid probe train' needs 2 that are not near-copies of each "
        "other, and leaves it out until then (the kNN vote alone answers it): add another photo of it"], out
    with monkeypatch.context() as m:  # nothing kept: nothing to note, and said so (walk s53 interrupt #6)
        _interrupt_on_batch(m, 1, module="retrieval.galleries", batch=1)
        code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Vipera aspis", *new)
    assert code == 130 and out == "", (out, err)
    assert err.splitlines() == [f"speciesid: interrupted before any photo was added: nothing was added to {index}; "
                                "run the same command again to add them"], err


def test_an_interrupted_references_add_prints_the_taxon_note_and_leaves_a_mark_until_run_again(tmp_path, capsys,
                                                                                               monkeypatch):
    """Stop 50's left-over: an add cut by Ctrl-C said no taxon note (a new name like a shipped taxon's) and left no
    mark: the gallery then held part of the add and said nothing. Now ``index info`` and identify say it until the
    same add completes; an add of other photos does not clear it."""
    import json

    from index.build_mark import add_note

    index = folder_gallery(tmp_path, capsys, ("Natrix maura", "Naja haje"))
    new = [_photo(tmp_path / "new" / f"{i}.png", 100 + i) for i in range(3)]
    add = ["references", "add", "--index", index, "--species", "Naja nivae", "--new-species", *new, "--precision",
           "fp32"]  # as the gallery was built: identify's notes below are the mark's alone
    with monkeypatch.context() as m:
        _interrupt_on_batch(m, 2, module="retrieval.galleries", batch=1)
        code, out, err = _run(capsys, *add)
    assert code == 130 and f"interrupted: 1 reference kept in {index}" in err, err
    lines = out.splitlines()
    assert lines[:2] == ["Naja nivae (new species): added 1 before the interrupt", "ids: 5"], out
    assert lines[2].startswith("note: 'Naja nivae' is not in the shipped snake taxonomy, which has ") \
        and "Naja nivea" in lines[2], out
    note = add_note("Naja nivae")
    assert json.loads(_run(capsys, "index", "info", "--index", index)[1])["build"] == {"state": "interrupted",
                                                                                       "note": note}
    query = _photo(tmp_path / "q.png", 99)
    code, out, err = _run(capsys, "identify", "--index", index, query, "-q", "--precision", "fp32")  # as it was built
    assert code == 0 and out.splitlines()[-1] == f"note: {note}", (out, err)
    other = _photo(tmp_path / "other.png", 300)
    assert _run(capsys, "references", "add", "--index", index, "--species", "Naja nivae", other)[0] == 0
    assert json.loads(_run(capsys, "index", "info", "--index", index)[1])["build"]["note"] == note  # not covered
    code, out, err = _run(capsys, *add)  # the same add again: it completes, and the mark goes
    assert code == 0 and "added 2, skipped 0 unreadable, 1 already in the gallery" in out, (out, err)
    assert json.loads(_run(capsys, "index", "info", "--index", index)[1])["build"] == {"state": "complete",
                                                                                       "note": ""}


def test_an_empty_gallery_refusing_another_encoder_says_to_delete_it(tmp_path, capsys, monkeypatch):
    """A first build interrupted before any photo was kept leaves a gallery with no reference: another encoder is
    refused, saying that it is empty and what to do (a gallery holding references keeps the usual advice)."""
    root = tmp_path / "photos"
    for i in range(4):
        _photo(root / "Natrix maura" / f"{i}.png", i)
    index = tmp_path / "g"
    with monkeypatch.context() as m:
        _interrupt_on_batch(m, 1)
        assert _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", index, *ENCODER,
                    "-q")[0] == 130
    code, _, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", index,
                        "--encoder", "bioclip", "-q")
    assert code == 2 and f"gallery {index} was built with encoder 'timm:test_vit@random', not with the encoder given " \
        f"(bioclip); it holds no references: delete {index} (or choose another --index) to start over with this " \
        "encoder" in err, err
    assert "use --encoder" not in err, err
    assert _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", index, *ENCODER,
                "-q")[0] == 0
    code, _, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", index,
                        "--encoder", "bioclip", "-q")
    assert code == 2 and "use --encoder timm:test_vit@random or build a new index" in err, err
    assert "holds no references" not in err, err


@pytest.mark.parametrize("given", [False, True])
def test_add_references_commits_what_it_embedded_on_ctrl_c(tmp_path, given):
    """The pipeline itself: on Ctrl-C one commit of the rows embedded, then ReferencesInterrupted (a
    KeyboardInterrupt) with what this call kept; embeddings given by a caller alike."""
    from index.gallery import Gallery
    from index.records import ReferenceRecord
    from retrieval.encoders import create_encoder
    from retrieval.pipeline import ReferencesInterrupted, add_references, embed_sources

    enc = create_encoder("timm:test_vit@random", precision="fp32", runtime="torch")
    enc.batch_size = 2
    paths = [_photo(tmp_path / f"{i}.png", i) for i in range(7)]
    g = Gallery.create(tmp_path / "g", enc.describe())
    records = [ReferenceRecord(path=p, species="Naja haje") for p in paths]
    seen = []

    def stop(done, total):
        seen.append(done)
        if done >= 4:
            raise KeyboardInterrupt

    embeddings = embed_sources(paths, enc)[0] if given else None
    with pytest.raises(ReferencesInterrupted) as caught:
        add_references(g, enc, records, progress=False, workers=1, on_progress=stop, embeddings=embeddings)
    assert isinstance(caught.value, KeyboardInterrupt) and caught.value.saved
    assert caught.value.report.added == 4 and len(caught.value.report.ids) == 4
    assert len(Gallery.open(g.root)) == 4


def _slow_gallery(tmp_path, monkeypatch, *, fast: int = 4, n: int = 6):
    """A gallery, its encoder (2 photos a batch) and ``n`` records whose photos from the ``fast``-th on are read
    slowly (until the returned event is set, at most 20 s): a Ctrl-C then finds the model thread waiting on the
    decoders, the usual case."""
    import threading

    from index.gallery import Gallery
    from index.records import ReferenceRecord
    from retrieval.encoders import create_encoder

    enc = create_encoder("timm:test_vit@random", precision="fp32", runtime="torch")
    enc.batch_size = 2
    paths = [_photo(tmp_path / f"{i}.png", i) for i in range(n)]
    g = Gallery.create(tmp_path / "g", enc.describe())
    release = threading.Event()

    def read(path):
        if int(Path(path).stem) >= fast:
            release.wait(20)
        return Path(path).read_bytes()

    monkeypatch.setattr(g, "read_photo", read)
    return g, enc, [ReferenceRecord(path=p, species="Naja haje") for p in paths], release


@pytest.fixture(autouse=True)
def _ctrl_c_raises():
    """A real SIGINT raises KeyboardInterrupt in these tests even when the suite was started with SIGINT ignored
    (a background job of a shell without job control inherits that), as it does for a user's command."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _ctrl_c_after(done_at: int, *delays: float):
    """An ``on_progress`` that, once ``done_at`` photos are handled, sends this process a real SIGINT ``delays``
    seconds later (each), and the timers to cancel."""
    import os
    import signal
    import threading

    timers = [threading.Timer(d, os.kill, (os.getpid(), signal.SIGINT)) for d in delays]
    started: list[bool] = []

    def on_progress(done, total):
        if done >= done_at and not started:
            started.append(True)
            for t in timers:
                t.start()

    return on_progress, timers


def _holding_the_lock(g):
    """Another thread of this process holds the gallery's write lock until the returned event is set."""
    import threading

    held, free = threading.Event(), threading.Event()

    def hold():
        with g.writing(wait=5):
            held.set()
            free.wait(30)

    threading.Thread(target=hold, daemon=True).start()
    assert held.wait(10)
    return free


def _add_until_ctrl_c(g, enc, records, on_progress, timers, *waiting):
    """``add_references`` until the Ctrl-C ``timers`` send stops it; then the slow reads and the lock holder
    (``waiting``) are let go and the timers cancelled, whatever happened. Returns the ReferencesInterrupted."""
    from retrieval.pipeline import ReferencesInterrupted, add_references

    try:
        with pytest.raises(ReferencesInterrupted) as caught:
            add_references(g, enc, records, progress=False, workers=2, on_progress=on_progress)
    finally:
        for event in waiting:
            event.set()
        for t in timers:
            t.cancel()
    return caught.value


def test_a_real_ctrl_c_while_the_decoders_read_says_so_and_commits_without_waiting_for_them(tmp_path, monkeypatch,
                                                                                           caplog):
    """Review s48 #1/#13: a SIGINT while the model thread waits on a slow read says at once what it commits, does
    not wait for the photos being read, and commits the 4 embedded."""
    import logging
    import time

    from index.gallery import Gallery
    from retrieval.pipeline import ReferencesInterrupted, add_references

    g, enc, records, release = _slow_gallery(tmp_path, monkeypatch)
    on_progress, timers = _ctrl_c_after(4, 0.3)
    caplog.set_level(logging.WARNING, logger="retrieval.pipeline")
    start = time.monotonic()
    try:
        with pytest.raises(ReferencesInterrupted) as caught:
            add_references(g, enc, records, progress=False, workers=2, on_progress=on_progress)
        elapsed = time.monotonic() - start
    finally:
        release.set()
        for t in timers:
            t.cancel()
    assert elapsed < 15, elapsed  # the slow reads take 20 s: they are not waited for
    assert caught.value.saved and caught.value.report.added == 4
    assert [r.getMessage() for r in caplog.records if r.name == "retrieval.pipeline"] == [
        "interrupted: committing the 4 photos embedded so far (Ctrl-C again to stop now)"]
    assert len(Gallery.open(g.root)) == 4


def test_a_second_real_ctrl_c_while_the_first_commits_stops_at_once(tmp_path, monkeypatch):
    """Review s48 #1: a second SIGINT soon after the first (the decoders still reading, the commit waiting for
    another writer) stops at once, saying 'at least', instead of being taken as the first."""
    g, enc, records, release = _slow_gallery(tmp_path, monkeypatch)
    g.write_wait_s = 20  # what the commit after a Ctrl-C waits is bounded below it
    free = _holding_the_lock(g)
    on_progress, timers = _ctrl_c_after(4, 0.3, 1.0)
    caught = _add_until_ctrl_c(g, enc, records, on_progress, timers, release, free)
    assert not caught.saved and caught.report.added == 0


def test_a_ctrl_c_whose_commit_finds_the_gallery_held_stops_without_committing(tmp_path, monkeypatch, caplog):
    """Review s48 #1: the commit after a Ctrl-C waits for another writer a bounded time, then says that the photos
    embedded are not committed and stops (not a TimeoutError, not the gallery's whole write wait)."""
    import logging

    from index.gallery import Gallery

    g, enc, records, release = _slow_gallery(tmp_path, monkeypatch)
    g.write_wait_s = 1
    free = _holding_the_lock(g)
    on_progress, timers = _ctrl_c_after(4, 0.3)
    caplog.set_level(logging.WARNING, logger="retrieval.pipeline")
    caught = _add_until_ctrl_c(g, enc, records, on_progress, timers, release, free)
    assert caught.saved and caught.report.added == 0
    warned = [r.getMessage() for r in caplog.records if r.name == "retrieval.pipeline"]
    assert warned[0] == "interrupted: committing the 4 photos embedded so far (Ctrl-C again to stop now)"
    assert warned[1].startswith("not committed: the 4 photos embedded since the last commit are not in the gallery, "
                                "whose writes waited 1 s for another writer (another thread of this process is "
                                "writing this gallery"), warned
    assert len(Gallery.open(g.root)) == 0


@pytest.mark.parametrize("step", ["finishing the index", "cleaning the gallery"])
def test_a_ctrl_c_once_every_photo_is_committed_says_all_were_kept(tmp_path, capsys, monkeypatch, step):
    """Review s48 #3: a Ctrl-C in a build's last steps (the index finished, the --clean filter) said only
    'interrupted'; every photo is committed then: it says so, and the same command finishes."""
    from index.gallery import Gallery

    root = tmp_path / "photos"
    for i in range(5):
        _photo(root / "Natrix maura" / f"{i}.png", i)
    index = tmp_path / "g"

    def stop(*args, **kw):
        raise KeyboardInterrupt

    build = ["index", "build", "--dataset", "folder", "--root", root, "--index", index, *ENCODER, "-q"]
    with monkeypatch.context() as m:
        if step == "finishing the index":
            m.setattr(Gallery, "finish_build", stop)
        else:
            m.setattr("retrieval.workflows.clean_built_gallery", stop)
            build.append("--clean")
        code, _, err = _run(capsys, *build)
    assert code == 130
    assert err.strip().endswith(f"speciesid: interrupted while {step}: the 5 references added are all kept in "
                                f"{index}; run the same command again to finish"), err
    code, out, err = _run(capsys, "index", "info", "--index", index)
    assert code == 0 and '"references": 5' in out, (out, err)


def test_a_ctrl_c_just_after_a_periodic_commit_counts_its_rows_once_and_the_index_is_saved(tmp_path, monkeypatch):
    """Review s48 #4: a Ctrl-C that lands in a periodic commit once the rows are committed made the interrupt's
    commit store them again, counted as 'already in the gallery' (added too low); the interrupt path saves the
    index and times the call too, as a call that ends does."""
    from index.gallery import Gallery
    from index.vectors import load_index
    from retrieval.pipeline import ReferencesInterrupted, add_references

    g, enc, records, release = _slow_gallery(tmp_path, monkeypatch, fast=6)
    real = g.add_unique

    class Trap(dict):
        armed = True

        def __contains__(self, key):
            if Trap.armed:  # the first look at what the commit dropped: right after it returned
                Trap.armed = False
                raise KeyboardInterrupt
            return super().__contains__(key)

    def add_unique(*args, **kw):
        ids, dropped = real(*args, **kw)
        return ids, Trap(dropped)

    monkeypatch.setattr(g, "add_unique", add_unique)
    with pytest.raises(ReferencesInterrupted) as caught:
        add_references(g, enc, records, progress=False, workers=1, chunk=4)
    report = caught.value.report
    assert caught.value.saved and report.added == 4 and report.duplicates == [], report.duplicates
    assert report.seconds > 0
    assert load_index(g.layout.vectors)[1]["count"] == 4  # saved, as at the end of a call
    assert len(Gallery.open(g.root)) == 4


def test_a_repeat_whose_first_copy_is_named_like_an_id_is_a_repeat(tmp_path, monkeypatch):
    """Review s48 #10: already-stored and repeated photos were told apart by whether the second field read "id N";
    a run's first copy named ``id 12`` (a file without an extension) made its repeat "already in the gallery". The
    kind is recorded as each duplicate is."""
    import shutil

    from index.gallery import Gallery
    from index.records import ReferenceRecord
    from retrieval.encoders import create_encoder
    from retrieval.pipeline import add_references

    monkeypatch.chdir(tmp_path)
    enc = create_encoder("timm:test_vit@random", precision="fp32", runtime="torch")
    g = Gallery.create(tmp_path / "g", enc.describe())
    first = _photo(tmp_path / "first.png", 1)
    shutil.copy(first, tmp_path / "id 12")
    shutil.copy(first, tmp_path / "copy.png")
    records = [ReferenceRecord(path=Path(p), species="Naja haje") for p in ("id 12", "copy.png")]
    report = add_references(g, enc, records, progress=False, workers=1)
    assert report.added == 1 and report.repeats == [("copy.png", "id 12")] and report.already_stored == []
    assert report.duplicate_ids == report.ids and report.duplicate_stored == [False]
    again = add_references(g, enc, records[1:], progress=False, workers=1)
    assert again.already_stored == [("copy.png", f"id {report.ids[0]}")] and again.repeats == []
    assert "1 already in the gallery" in again.summary()
