"""What a gallery says of itself beside its answers (the new-user walk of stop 50): a build that did not finish
(``index.build_mark``: ``index info``, ``identify``, ``evaluate``, ``/readyz``, the API's answer), a re-run that
resumes it (the photos already in counted, listed at -v), a species none of whose photos is readable, a gallery too
small to tell a photo unlike every reference; the API's add note worded for an HTTP client; ``clean``'s findings.csv
paths all absolute. Tiny random ``timm:test_vit@random`` encoder and random photos, except the API tests
(MobileNetV1 on ph-snakes, skipped without the shared data)."""

from __future__ import annotations

import csv
import json
import os
import socket
from pathlib import Path

import pytest
from _cli_support import ENCODER, _photo, _run

from index.build_mark import (
    INTERRUPTED_NOTE,
    NEVER_STORED_NOTE,
    build_note,
    build_status,
    building,
    dataset_key,
    interrupted_note,
    photos_digest,
    unfinished_ids,
)
from index.layout import GalleryLayout
from retrieval.advice import one_species_note

FAR_NOTE = ("this gallery holds 1 reference photo: too few to tell a photo unlike every reference (a blank frame, "
            "another animal) from a match, so no answer is marked far or UNKNOWN for that, however unlike the photo "
            "is; add reference photos ({how}): from 2, the gallery measures that threshold")


def _interrupted_build(tmp_path: Path, capsys, monkeypatch) -> tuple[Path, Path, list]:
    """A build of 10 photos of two species cut short by Ctrl-C after 4 were kept: (gallery, photos, its command)."""
    from test_cli_interrupt import interrupted_build

    index, root, build, code, _ = interrupted_build(tmp_path, capsys, monkeypatch)
    assert code == 130
    return index, root, build


def test_an_interrupted_build_is_said_by_info_identify_and_evaluate_until_a_build_completes(tmp_path, capsys,
                                                                                          monkeypatch, caplog):
    index, root, build = _interrupted_build(tmp_path, capsys, monkeypatch)
    note = interrupted_note(dataset_key("folder", root))  # names the build to run again (stop 51's reread)
    assert note == f"a build of {root} (--dataset folder) into this gallery was interrupted: run it again to add " \
                   "the rest"
    code, out, err = _run(capsys, "index", "info", "--index", index)
    assert code == 0 and json.loads(out)["build"] == {"state": "interrupted", "note": note}, (out, err)
    query = _photo(tmp_path / "q.png", 99)
    code, out, err = _run(capsys, "identify", "--index", index, query, "-q", "--precision", "fp32")
    # the build's note, then (4 photos of Naja haje kept) that the gallery holds one species
    assert code == 0 and out.splitlines()[-2:] == [f"note: {note}", f"note: {one_species_note('Naja haje')}"], (
        out, err)
    code, out, err = _run(capsys, "identify", "--index", index, query, "-q", "--format", "json",
                          "--precision", "fp32")
    assert code == 0 and json.loads(out) and f"speciesid: note: {note}" in err, (out, err)
    evaluation = tmp_path / "eval"
    for i in range(4):
        _photo(evaluation / ("Naja haje" if i % 2 else "Natrix maura") / f"{i}.png", 200 + i)
    code, out, err = _run(capsys, "evaluate", "--index", index, "--dataset", "folder", "--root", evaluation,
                          "--report", tmp_path / "report", "-q")
    assert code == 0 and note in caplog.text, (out, err)  # a warning on stderr
    assert f"warning: {note}" in (tmp_path / "report" / "report.md").read_text(), list(
        (tmp_path / "report").iterdir())

    code, out, err = _run(capsys, *build)  # the same command: it resumes, and the gallery is whole again
    assert code == 0 and "added 6, skipped 0 unreadable, 4 already in the gallery" in out, (out, err)
    assert "resumed the interrupted build: the 4 photos already in the gallery counted above, not listed (-v lists " \
           "them)" in out and "  already in the gallery: " not in out, out
    assert not list(GalleryLayout(index).build_marks.iterdir())
    assert json.loads(_run(capsys, "index", "info", "--index", index)[1])["build"] == {"state": "complete",
                                                                                      "note": ""}
    code, out, err = _run(capsys, "identify", "--index", index, query, "-q", "--precision", "fp32")
    # the build's note is gone (the random encoder's photos lie at cosine ~0.95: a near-copy note may come)
    assert code == 0 and note not in out and note not in err and "was interrupted" not in out + err, (out, err)


def test_a_build_of_another_dataset_completing_does_not_clear_an_interrupted_builds_mark(tmp_path, capsys,
                                                                                           monkeypatch):
    """One mark per folder: any build that completed cleared it, though the interrupted build's photos were still
    missing. Now only a build of the same dataset does (run again: it takes the interrupted one up)."""
    index, root, build = _interrupted_build(tmp_path, capsys, monkeypatch)
    other = tmp_path / "other"
    _photo(other / "Vipera berus" / "0.png", 500)
    assert _run(capsys, "index", "build", "--dataset", "folder", "--root", other, "--index", index, *ENCODER,
                "-q")[0] == 0
    said = json.loads(_run(capsys, "index", "info", "--index", index)[1])["build"]
    assert said == {"state": "interrupted", "note": interrupted_note(dataset_key("folder", root))}  # A's, named
    code, out, err = _run(capsys, *build)
    assert code == 0 and "resumed the interrupted build" in out, (out, err)
    assert json.loads(_run(capsys, "index", "info", "--index", index)[1])["build"]["state"] == "complete"


def test_a_resumed_build_lists_the_photos_already_in_at_v_and_a_plain_rerun_lists_them_as_before(tmp_path, capsys,
                                                                                                monkeypatch):
    index, root, build = _interrupted_build(tmp_path, capsys, monkeypatch)
    code, out, err = _run(capsys, *build, "-v")
    assert code == 0 and out.count("  already in the gallery: ") == 4 and "resumed the interrupted build" not in out, (out, err)
    code, out, err = _run(capsys, *build)  # no build to resume: a re-run whose photos are all in, listed
    assert code == 0 and out.count("  already in the gallery: ") == 10 and "resumed the interrupted build" not in out, (out, err)


def _mark_files(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(GalleryLayout(root).build_marks.glob("*.json"))]


def _gone_pid() -> int:
    return 2 ** 22 + 12345  # above Linux's default pid_max (4194304 = 2**22): no such process


def test_a_build_mark_left_running_by_a_process_that_is_gone_reads_as_interrupted(tmp_path):
    root = tmp_path / "g"
    root.mkdir()
    assert build_note(root) == "" and unfinished_ids(root) == set()
    with building(root) as earlier:  # this process: running now
        assert earlier is None and [m["state"] for m in _mark_files(root)] == ["running"]
        assert build_note(root).startswith(f"a build into this gallery is running (pid {os.getpid()} on ")
        api = build_note(root, api=True)  # an HTTP client's (/readyz needs no key): no pid, no host
        assert api.startswith("a build into this gallery is running (since ") and "until it ends" in api, api
        assert str(os.getpid()) not in api and socket.gethostname() not in api, api
        assert unfinished_ids(root) == set()
    assert _mark_files(root) == []
    legacy = GalleryLayout(root).build_mark  # the layout before stop 51: one build.json, still read
    legacy.write_text(json.dumps({"state": "running", "host": socket.gethostname(), "pid": _gone_pid(),
                                  "started": "x"}))
    assert build_note(root) == INTERRUPTED_NOTE and unfinished_ids(root) == {"legacy"}
    with pytest.raises(KeyboardInterrupt), building(root) as earlier:
        assert earlier["pid"] == _gone_pid()  # a resume
        assert build_note(root).startswith("a build into this gallery is running")  # taken up now
        raise KeyboardInterrupt
    assert [m["state"] for m in _mark_files(root)] == ["interrupted"] and build_note(root) == INTERRUPTED_NOTE
    mine = _mark_files(root)[0]  # killed outright instead: running, by a pid that is gone
    (GalleryLayout(root).build_marks / f"{mine['id']}.json").write_text(json.dumps(
        mine | {"state": "running", "pid": _gone_pid()}))
    assert build_note(root) == INTERRUPTED_NOTE
    with building(root):
        pass
    assert build_note(root) == "" and not legacy.exists() and _mark_files(root) == []  # both taken up and covered


def test_a_build_interrupted_while_finishing_the_index_says_run_it_again_to_finish(tmp_path):
    from retrieval.pipeline import BuildReport, ReferencesInterrupted

    root = tmp_path / "g"
    root.mkdir()
    with pytest.raises(ReferencesInterrupted), building(root):
        raise ReferencesInterrupted(BuildReport(added=3), after="finishing the index")
    assert build_note(root) == ("the last build into this gallery was interrupted while finishing the index: run it "
                                "again to finish")


def test_a_species_whose_photos_are_all_unusable_is_named_by_the_build_with_why(tmp_path, capsys):
    root = tmp_path / "photos"
    good = _photo(root / "Foo bar" / "good.png", 1)
    (root / "Foo bar" / "trunc.jpg").write_bytes(good.read_bytes()[:60])
    (root / "Baz qux").mkdir()
    (root / "Baz qux" / "trunc.jpg").write_bytes(_photo(tmp_path / "x.jpg", 2).read_bytes()[:200])
    for i in range(2):  # readable, but thumbnails under the 32 px a reference needs: not "unreadable"
        _photo(root / "Coluber thumbs" / f"{i}.png", 10 + i, side=16)
    _photo(root / "Coluber thumbs" / "t.png", 12).write_bytes(b"")
    index = tmp_path / "g"
    line = ("species with no usable photo, not in the gallery: Baz qux (1 unreadable), "
            "Coluber thumbs (1 unreadable, 2 too small)")
    code, out, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", index, *ENCODER,
                          "-q")
    assert code == 0 and line in out.splitlines(), (out, err)
    assert "1 references, 1 species" in out
    code, out, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", index, *ENCODER,
                          "-q")  # a re-run says it again: the species is still not in the gallery
    assert code == 0 and line in out, (out, err)


def test_a_one_reference_gallery_says_it_cannot_tell_a_photo_unlike_every_reference(tmp_path, capsys):
    root = tmp_path / "photos"
    _photo(root / "Foo bar" / "good.png", 1)
    index = tmp_path / "g"
    assert _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", index, *ENCODER,
                "-q")[0] == 0
    from PIL import Image

    blank = tmp_path / "white.png"
    Image.new("RGB", (64, 48), "white").save(blank)
    code, out, err = _run(capsys, "identify", "--index", index, blank, "-q", "--precision", "fp32")
    assert code == 0 and out.splitlines()[-2:] == ["note: " + FAR_NOTE.format(how="speciesid references add"),
                                                   f"note: {one_species_note('Foo bar')}"], (out, err)
    _photo(root / "Foo bar" / "second.png", 2)  # two references: a far threshold, no note of it (one species still)
    assert _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", index, *ENCODER,
                "-q")[0] == 0
    code, out, err = _run(capsys, "identify", "--index", index, blank, "-q", "--precision", "fp32")
    assert code == 0 and [line for line in out.splitlines() if line.startswith("note:")] == [
        f"note: {one_species_note('Foo bar')}"], (out, err)


def test_clean_findings_csv_writes_every_path_absolute(tmp_path, capsys, monkeypatch):
    """The gallery side was absolute (as stored) and the --against side as typed (relative): one spelling now."""
    from _cli_support import two_species_gallery

    _, root = two_species_gallery(tmp_path, capsys)  # tmp_path / "g", of the photos under tmp_path / "photos"
    against = tmp_path / "val"
    against.mkdir()
    (against / "leak.png").write_bytes((root / "Natrix maura" / "0.png").read_bytes())
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, "clean", "--index", "g", "--against", "val", "--report", "r", "-q")
    assert code == 0, (out, err)
    with open(tmp_path / "r" / "findings.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["kind"] == "leak"]
    assert [(r["path"], r["paired_path"]) for r in rows] == [
        (str(root / "Natrix maura" / "0.png"), str(against / "leak.png"))], rows


# ------------------------------------------------------------------------------------------------ the HTTP API
def _app(index: Path):
    from _api_support import API_KEY

    from api.app import create_app
    from api.settings import Settings

    return create_app(Settings(index=str(index), api_keys=API_KEY, precision="fp32"))


def test_the_api_says_an_interrupted_build_in_readyz_and_beside_each_answer(tmp_path_factory):
    from conftest import needs_shared

    needs_shared()
    from _api_support import COBRA, gallery_copy
    from fastapi.testclient import TestClient

    index = gallery_copy(tmp_path_factory, "api_interrupted")
    with pytest.raises(KeyboardInterrupt), building(index):
        raise KeyboardInterrupt
    files = [("images", (COBRA.name, COBRA.read_bytes(), "application/octet-stream"))]
    with TestClient(_app(index)) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
        assert ready.json()["build"] == {"state": "interrupted", "note": INTERRUPTED_NOTE}
        answer = c.post("/v1/identify", files=files)
        assert answer.status_code == 200 and answer.json()["notes"] == [INTERRUPTED_NOTE], answer.text
        with building(index):  # a build that completes clears it: said at once, no restart
            running = c.get("/readyz").json()["build"]  # running now: said without pid or host (no key needed)
            assert running["state"] == "running" and running["note"].startswith("a build into this gallery is "
                                                                                "running (since "), running
            assert socket.gethostname() not in c.post("/v1/identify", files=files).json()["notes"][0]
        assert c.get("/readyz").json()["build"] == {"state": "complete", "note": ""}
        assert c.post("/v1/identify", files=files).json()["notes"] == []


def test_the_api_says_a_one_reference_gallery_cannot_tell_unlike_every_reference(tmp_path_factory):
    from conftest import needs_shared

    needs_shared()
    from _api_support import COBRA, gallery_copy
    from fastapi.testclient import TestClient

    from index.gallery import Gallery
    from retrieval.workflows import delete_references

    index = gallery_copy(tmp_path_factory, "api_one")
    delete_references(index, Gallery.open(index).index.ids.tolist()[1:])
    with TestClient(_app(index)) as c:
        answer = c.post("/v1/identify", files=[("images", (COBRA.name, COBRA.read_bytes(), "image/jpeg"))])
    assert answer.status_code == 200 and answer.json()["notes"] == [
        FAR_NOTE.format(how="POST /v1/species/{name}/references"),
        one_species_note("Xenopeltis unicolor", api=True)], answer.text


def test_the_add_note_of_a_species_the_probe_does_not_know_is_worded_for_the_api(tmp_path, monkeypatch):
    """POST /v1/identify has no method parameter: the API's note names no --method; the CLI keeps its wording."""
    import retrieval.probe_flows as flows

    class Probe:
        def added_since(self, counts):
            return ["Testus novus"]

    monkeypatch.setattr(flows, "has_probe", lambda root: True)
    monkeypatch.setattr(flows.LinearProbe, "load", staticmethod(lambda *a, **k: Probe()))

    class Gallery:
        root = tmp_path / "g"

        def species(self):
            return []

    api = flows.probe_cannot_name(Gallery(), api=True)
    assert api == ("the gallery's probe does not know 1 species added since it was made (Testus novus): identify "
                   "answers them by the kNN vote alone, and the probe cannot name them until it is retrained on the "
                   "server's machine ('speciesid probe train --index' with the server's gallery folder; the server "
                   "takes the new probe up without a restart)")
    assert str(Gallery.root) not in api  # no server path in an answer
    assert "--method" not in api and "--method probe cannot name them" in flows.probe_cannot_name(Gallery())


def test_a_build_completing_keeps_another_live_builds_mark(tmp_path, caplog):
    caplog.set_level("INFO", logger="index.build_mark")
    root = tmp_path / "g"
    root.mkdir()
    legacy = GalleryLayout(root).build_mark
    other = {"state": "running", "host": "another-host", "pid": 7, "started": "2026-01-01T00:00:00+00:00"}
    legacy.write_text(json.dumps(other))  # a build on another host (of the old layout): taken as running
    with building(root) as earlier:
        assert earlier is None and [m["pid"] for m in _mark_files(root)] == [os.getpid()]
    assert json.loads(legacy.read_text()) == other and _mark_files(root) == []  # its mark is left as it was
    assert build_note(root).startswith("a build into this gallery is running (pid 7 on another-host")
    assert "another build into" in caplog.text and "its mark is kept" in caplog.text
    with pytest.raises(KeyboardInterrupt), building(root):
        raise KeyboardInterrupt  # this build's rest is missing: said even while the other runs
    assert build_note(root) == INTERRUPTED_NOTE


# ------------------------------------------------------------------ two builds into one folder, interleaved
def _started(root: Path, key: dict, photos: str | None):
    """A build entered (its ``building`` block open): the context manager, to end with :func:`_end`."""
    cm = building(root, key=key, photos=photos)
    cm.__enter__()
    return cm


def _end(cm, *, interrupt: bool = False) -> None:
    if interrupt:  # the block raised KeyboardInterrupt: passed on (not swallowed)
        assert cm.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None) is False
    else:
        cm.__exit__(None, None, None)


def _kill(root: Path, pid: int) -> None:
    """Every running mark of process ``pid`` made to name a process that is gone, as a build killed outright."""
    for path in GalleryLayout(root).build_marks.glob("*.json"):
        mark = json.loads(path.read_text())
        if mark["state"] == "running" and mark["pid"] == pid:
            path.write_text(json.dumps(mark | {"pid": _gone_pid()}))


ONE = dataset_key("folder", "/data/one")
TWO = dataset_key("folder", "/data/two")


@pytest.mark.parametrize("how", ["ctrl-c", "killed"])
def test_an_earlier_build_cut_short_while_a_later_one_runs_is_still_said_when_the_later_completes(tmp_path, how):
    """Stop 50's left-over: one mark per folder, so build B completing after build A was cut short cleared A's mark
    (or A's "interrupted" was overwritten by B): the gallery read as complete without A's photos."""
    root = tmp_path / "g"
    root.mkdir()
    a = _started(root, ONE, photos_digest(["/data/one/a.png"]))
    b = _started(root, TWO, photos_digest(["/data/two/b.png"]))
    if how == "killed":
        _kill(root, os.getpid())  # both look killed now; B's own block still removes its own mark below
    else:
        _end(a, interrupt=True)
    both = f"{interrupted_note(ONE)}; {interrupted_note(TWO)}"  # killed: B looks cut short too while it runs
    assert build_note(root) == (both if how == "killed" else interrupted_note(ONE))
    _end(b)  # another dataset completes: A's photos are still missing
    assert build_status(root) == {"state": "interrupted", "note": interrupted_note(ONE)}
    assert [m["key"] for m in _mark_files(root)] == [ONE]
    with building(root, key=TWO, photos=photos_digest(["/data/two/b.png"])) as earlier:
        assert earlier is None  # not a resume of A
    assert build_note(root) == interrupted_note(ONE)
    with building(root, key=ONE, photos=photos_digest(["/data/one/a.png", "/data/one/new.png"])) as earlier:
        assert earlier["key"] == ONE  # the same dataset, run again after A ended: takes it up, even grown
    assert build_status(root) == {"state": "complete", "note": ""} and _mark_files(root) == []


def test_a_later_build_of_the_same_photos_completing_clears_an_earlier_one_cut_short_meanwhile(tmp_path):
    root = tmp_path / "g"
    root.mkdir()
    photos = photos_digest(["/data/one/a.png", "/data/one/b.png"])
    a = _started(root, ONE, photos)
    b = _started(root, ONE, photos_digest(["/data/one/b.png", "/data/one/a.png", "/data/one/a.png"]))  # the same
    _end(a, interrupt=True)
    _end(b)  # B's scan held exactly A's photos: it covered them
    assert build_note(root) == "" and _mark_files(root) == []


def test_a_later_build_of_other_photos_of_the_same_dataset_keeps_an_earlier_one_cut_short_meanwhile(tmp_path):
    """Covering is not guessed: B scanned the dataset before A (a photo added between the scans is A's only)."""
    root = tmp_path / "g"
    root.mkdir()
    b = _started(root, ONE, photos_digest(["/data/one/a.png"]))
    a = _started(root, ONE, photos_digest(["/data/one/a.png", "/data/one/late.png"]))
    _end(a, interrupt=True)
    _end(b)
    assert build_note(root) == interrupted_note(ONE) and [m["state"] for m in _mark_files(root)] == ["interrupted"]
    b = _started(root, ONE, None)  # a Ray build (photos streamed, none listed) concurrent with the next cut: kept too
    a = _started(root, ONE, photos_digest(["/data/one/a.png"]))
    _end(a, interrupt=True)
    assert build_note(root) == interrupted_note(ONE)  # the first cut is taken up by B, the second said while B runs
    _end(b)  # covers the one it took up, not the one cut while it ran
    assert build_note(root) == interrupted_note(ONE) and len(_mark_files(root)) == 1


def test_an_interrupted_add_mark_is_cleared_only_by_the_same_add(tmp_path):
    from index.build_mark import add_note, clear_covered, mark_interrupted

    root = tmp_path / "g"
    root.mkdir()
    photos = photos_digest(["/p/1.png", "/p/2.png"])
    assert mark_interrupted(root, {"add": "Naja haje"}, photos, kind="add", species="Naja haje", added=1)
    assert build_status(root) == {"state": "interrupted", "note": add_note("Naja haje")}
    with building(root, key=ONE):  # a build completing leaves an add's mark
        pass
    assert clear_covered(root, {"add": "Naja nivea"}, photos) == 0  # another species
    assert clear_covered(root, {"add": "Naja haje"}, photos_digest(["/p/1.png"])) == 0  # other photos
    assert build_note(root) == add_note("Naja haje")
    assert clear_covered(root, {"add": "Naja haje"}, photos) == 1 and build_note(root) == ""


def test_an_interrupted_builds_note_names_the_build_to_run_again(tmp_path):
    """Stop 51's reread: with one mark per build, "the last build into this gallery was interrupted: run it again"
    was said after another dataset's build had completed since, and did not say which command to run again."""
    from retrieval.pipeline import BuildReport, ReferencesInterrupted

    root = tmp_path / "g"
    root.mkdir()
    meta = dataset_key("inat", "/data/inat", "/data/inat/train.json")
    with pytest.raises(KeyboardInterrupt), building(root, key=ONE):
        raise KeyboardInterrupt
    with pytest.raises(ReferencesInterrupted), building(root, key=meta):
        raise ReferencesInterrupted(BuildReport(added=3), after="finishing the index")
    with building(root, key=TWO):  # another dataset's build completes: both cut ones still said, each by its name
        pass
    assert sorted(build_note(root).split("; ")) == [  # in the order the marks were written (ids: by the second)
        "a build of /data/inat (--dataset inat --metadata /data/inat/train.json) into this gallery was interrupted "
        "while finishing the index: run it again to finish",
        "a build of /data/one (--dataset folder) into this gallery was interrupted: run it again to add the rest"]
    api = build_note(root, api=True)  # an HTTP client's: no server path
    assert sorted(api.split("; ")) == [
        "a build of a folder dataset into this gallery was interrupted: run it again to add the rest",
        "a build of a inat dataset into this gallery was interrupted while finishing the index: run it again to "
        "finish"] and "/data" not in api
    assert interrupted_note(None) == INTERRUPTED_NOTE  # a mark that names no build (the old layout's): as before


def test_a_build_takes_up_only_the_marks_cut_short_before_its_scan(tmp_path):
    """Stop 51's reread: a build took up (and cleared on completing) every mark of its dataset unfinished when it
    was marked, though its scan was older: a build cut short between the two may hold a photo the scan missed."""
    root = tmp_path / "g"
    root.mkdir()
    with pytest.raises(KeyboardInterrupt), building(root, key=ONE, photos=photos_digest(["/data/one/a.png"])):
        raise KeyboardInterrupt  # A: cut short before B's scan
    early = unfinished_ids(root)
    before = unfinished_ids(root)  # B reads the marks, then scans the dataset
    with pytest.raises(KeyboardInterrupt), building(root, key=ONE,
                                                    photos=photos_digest(["/data/one/a.png", "/data/one/late.png"])):
        raise KeyboardInterrupt  # C: scanned after B (a photo added meanwhile), cut short before B is marked
    late = unfinished_ids(root) - early
    with building(root, key=ONE, photos=photos_digest(["/data/one/a.png"]), before=before) as earlier:
        assert earlier["id"] in early  # A taken up, not C
        assert [m["id"] for m in _mark_files(root) if m["state"] == "running"] != []
    assert {m["id"] for m in _mark_files(root)} == late  # C's photo may be missing: still said
    assert build_note(root) == interrupted_note(ONE)


def test_build_gallery_reads_the_marks_it_may_take_up_before_its_scan(tmp_path, monkeypatch):
    """``build_gallery`` scans, loads its encoder and opens the gallery before it is marked: a build of the same
    dataset cut short during its scan is not taken up, nor cleared when it completes."""
    from index import build_mark
    from retrieval import workflows
    from retrieval.encoders import EncoderConfig

    photos = tmp_path / "photos"
    for i in range(2):
        _photo(photos / "Naja haje" / f"{i}.png", i)
    index = tmp_path / "g"
    key = dataset_key("folder", photos)
    spec = ENCODER[ENCODER.index("--encoder") + 1]
    config = EncoderConfig(spec=spec, precision="fp32")
    assert workflows.build_gallery(index, "folder", photos, encoder=config, progress=False).report.added == 2
    _photo(photos / "Naja haje" / "2.png", 2)
    real = workflows.load_dataset

    def scan_while_another_is_cut(*args, **kwargs):
        scan = real(*args, **kwargs)
        build_mark.mark_interrupted(index, key, photos_digest(["/elsewhere.png"]))  # cut short during the scan
        return scan

    monkeypatch.setattr(workflows, "load_dataset", scan_while_another_is_cut)
    result = workflows.build_gallery(index, "folder", photos, encoder=config, progress=False)
    assert result.resumed is False and result.report.added == 1
    assert build_note(index) == interrupted_note(key)  # its mark kept: its photos may not be in


def test_a_build_marks_temporary_file_is_no_mark_and_a_left_one_is_removed(tmp_path):
    """Stop 51's reread: ``build-marks/`` was listed by ``.json``, so a mark's write in progress (``atomic_write``'s
    ``.NAME.<hex>.tmp.json``) read as a mark, and one left by a killed write stayed for good."""
    root = tmp_path / "g"
    marks_dir = GalleryLayout(root).build_marks
    marks_dir.mkdir(parents=True)
    mark = {"id": "x", "state": "interrupted", "key": ONE, "host": socket.gethostname(), "pid": _gone_pid()}
    fresh = marks_dir / f".x.json.{'a' * 32}.tmp.json"  # a write in progress
    left = marks_dir / f".y.json.{'b' * 32}.tmp.json"  # a write killed long ago
    for path in (fresh, left):
        path.write_text(json.dumps(mark))
    os.utime(left, (1.0, 1.0))
    assert build_note(root) == "" and unfinished_ids(root) == set()
    with building(root, key=TWO):
        pass
    assert fresh.exists() and not left.exists()  # a write in progress is never removed: it may be another's


# ------------------------------------------------------------------ an add killed outright (stop 52)
_ADD_KILLED_AFTER_FIRST_COMMIT = """
import os, signal, sys
from index.gallery import Gallery
from dataclasses import replace
from api.cli import references
from retrieval import workflows
workflows.ADD_CHUNK = 2  # 5 photos embedded 2 at a time: three commits
config = references.encoder_config
references.encoder_config = lambda args: replace(config(args), batch_size=2)
real = Gallery.add_unique

def commit_then_die(self, *args, **kwargs):  # SIGKILL (power loss) once the first 2 photos are committed
    out = real(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

Gallery.add_unique = commit_then_die
from api.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_add_killed_outright_midway_is_named_by_index_info_until_the_same_add_completes(tmp_path, capsys):
    """Stop 51's left-over: only a Ctrl-C'd ``references add`` left a mark; one SIGKILLed between two commits left
    a gallery holding part of its photos that read as complete. Now an add of more photos than one commit takes is
    marked before its first commit, and cleared when it completes."""
    import signal
    import subprocess
    import sys

    from _cli_support import two_species_gallery

    from index.build_mark import add_note

    index, _ = two_species_gallery(tmp_path, capsys)
    new = [_photo(tmp_path / "new" / f"{i}.png", 300 + i) for i in range(5)]
    add = ["references", "add", *new, "--index", index, "--species", "Naja haje", "-q", "--precision", "fp32"]
    repo = Path(__file__).resolve().parents[1]
    killed = subprocess.run([sys.executable, "-c", _ADD_KILLED_AFTER_FIRST_COMMIT, *map(str, add)], cwd=repo,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(repo)}, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    from index.gallery import Gallery

    assert sorted(s.species for s in Gallery.open(index).species() if s.count) == [
        "Naja haje", "Naja samarensis", "Natrix maura"]  # part of the add is in
    assert [(m["kind"], m["state"], m["species"]) for m in _mark_files(index)] == [("add", "running", "Naja haje")]
    said = {"state": "interrupted", "note": add_note("Naja haje")}  # its process is gone: read as interrupted
    code, out, err = _run(capsys, "index", "info", "--index", index)
    assert code == 0 and json.loads(out)["build"] == said, (out, err)
    code, out, err = _run(capsys, "identify", "--index", index, new[0], "-q", "--precision", "fp32")
    assert code == 0 and out.splitlines()[-1] == f"note: {add_note('Naja haje')}", (out, err)
    code, out, err = _run(capsys, *add)  # the same add again: the rest added, the mark cleared
    assert code == 0 and "added 3" in out, (out, err)
    assert _mark_files(index) == [] and json.loads(_run(capsys, "index", "info", "--index", index)[1])["build"] == {
        "state": "complete", "note": ""}


def test_an_add_of_several_commits_says_it_runs_and_leaves_no_mark_once_complete(tmp_path, capsys, monkeypatch):
    from dataclasses import replace

    from _cli_support import two_species_gallery

    from api.cli import references
    from index.gallery import Gallery
    from retrieval import workflows

    index, _ = two_species_gallery(tmp_path, capsys)
    monkeypatch.setattr(workflows, "ADD_CHUNK", 2)  # 5 photos embedded 2 at a time: three commits
    config = references.encoder_config
    monkeypatch.setattr(references, "encoder_config", lambda args: replace(config(args), batch_size=2))
    real, seen = Gallery.add_unique, []

    def commit(self, *args, **kwargs):  # what readers say at each commit of the add
        seen.append(build_status(index))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Gallery, "add_unique", commit)
    new = [_photo(tmp_path / "new" / f"{i}.png", 300 + i) for i in range(5)]
    code, out, err = _run(capsys, "references", "add", *new, "--index", index, "--species", "Naja haje", "-q")
    assert code == 0 and "added 5" in out, (out, err)
    assert [s["state"] for s in seen] == ["complete", "running", "running"]  # marked in the first commit's turn
    assert seen[1]["note"].startswith(f"an add of photos of Naja haje to this gallery is running (pid {os.getpid()} "
                                      "on ") and seen[1]["note"].endswith(
        "until it ends, some of its photos may not be in the gallery yet"), seen[1]
    assert _mark_files(index) == [] and build_note(index) == ""
    seen.clear()
    more = [_photo(tmp_path / "more" / f"{i}.png", 400 + i) for i in range(2)]  # one commit: no mark needed
    assert _run(capsys, "references", "add", *more, "--index", index, "--species", "Naja haje", "-q")[0] == 0
    assert [s["state"] for s in seen] == ["complete"] and _mark_files(index) == []


def test_an_api_add_is_one_commit_and_writes_no_mark(tmp_path, capsys, monkeypatch):
    """An API add (its photos embedded before, all in memory) commits all of them at once, however many: it is all
    there or not at all, so it needs no mark (and a server writes no mark file per upload)."""
    from _cli_support import two_species_gallery

    from index.gallery import Gallery
    from retrieval import workflows
    from retrieval.encoders import EncoderConfig

    index, _ = two_species_gallery(tmp_path, capsys)
    monkeypatch.setattr(workflows, "ADD_CHUNK", 2)
    real, commits = Gallery.add_unique, []

    def commit(self, records, *args, **kwargs):
        commits.append((len(records), [m["state"] for m in _mark_files(index)]))
        return real(self, records, *args, **kwargs)

    monkeypatch.setattr(Gallery, "add_unique", commit)
    gallery, enc = workflows.open_gallery(index, EncoderConfig(precision="fp32", batch_size=2))  # 2 at a time
    photos = [_photo(tmp_path / "up" / f"{i}.png", 500 + i) for i in range(5)]
    uploads = [(p.name, p.read_bytes()) for p in photos]
    embeddings = workflows.embed_photos(photos, enc).embeddings
    result = workflows.add_photos(gallery, enc, "Naja haje", uploads, embeddings=embeddings, api=True)
    assert len(result.report.ids) == 5 and commits == [(5, [])] and _mark_files(index) == []


def test_a_build_killed_after_it_made_the_table_before_its_mark_reads_as_interrupted(tmp_path, capsys, monkeypatch):
    """Walk chaos #2: a build killed once the table existed, before it marked the folder, left a gallery of no rows
    and no mark that ``index info`` called a complete build. A gallery no row was ever committed to now reads as
    interrupted, saying to run the build again; one whose references were all deleted stays complete."""
    from retrieval import workflows

    for i in range(2):
        _photo(tmp_path / "photos" / "Natrix maura" / f"{i}.png", i)
    index = tmp_path / "g"

    def killed(*args, **kwargs):
        raise SystemExit(137)  # as a kill -9 leaves it: the table made, no mark written

    with monkeypatch.context() as patch:
        patch.setattr(workflows, "building", killed)
        with pytest.raises(SystemExit):
            workflows.build_gallery(index, "folder", tmp_path / "photos",
                                    encoder=workflows.EncoderConfig(spec="timm:test_vit@random", precision="fp32"),
                                    progress=False)
    assert not GalleryLayout(index).build_marks.exists() and GalleryLayout(index).info.is_file()
    code, out, err = _run(capsys, "index", "info", "--index", index)
    assert code == 0, err
    assert json.loads(out)["build"] == {"state": "interrupted", "note": NEVER_STORED_NOTE}, out
    code, out, err = _run(capsys, "identify", "--index", index, tmp_path / "photos" / "Natrix maura" / "0.png")
    assert code == 2 and NEVER_STORED_NOTE in err, err
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import Settings

    with TestClient(create_app(Settings(index=str(index), precision="fp32"))) as c:  # re-read chaos #6: "complete"
        assert c.get("/readyz").json()["build"] == {"state": "interrupted", "note": NEVER_STORED_NOTE}
    code, out, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", tmp_path / "photos", "--index",
                          index, *ENCODER, "-q")  # run again: complete
    assert code == 0, err
    assert json.loads(_run(capsys, "index", "info", "--index", index)[1])["build"]["state"] == "complete"
    assert _run(capsys, "references", "delete", "1", "2", "--index", index)[0] == 0  # emptied: still complete
    info = json.loads(_run(capsys, "index", "info", "--index", index)[1])
    assert info["references"] == 0 and info["build"] == {"state": "complete", "note": ""}, info


def test_an_emptied_ray_built_gallery_and_a_build_of_no_usable_photo_read_as_complete(tmp_path, capsys):
    """Re-read chaos #2: a gallery of no row whose gallery.json records no embedding read as a build interrupted
    before its first photo ("run it again") when a Ray build made it (Ray records no embedding) and its references
    were all deleted or excluded, or when its build could use none of its photos (running it again cannot help).
    Both marked the folder once (build-marks/ stays): complete."""
    from index.gallery import Gallery

    for i in range(2):
        _photo(tmp_path / "photos" / "Natrix maura" / f"{i}.png", i)
    index = tmp_path / "g"
    code, _, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", tmp_path / "photos", "--index",
                        index, *ENCODER, "-q")
    assert code == 0, err
    info_file = GalleryLayout(index).info
    info_file.write_text(json.dumps(json.loads(info_file.read_text()) | {"embedded_by": []}))  # as Ray leaves it
    Gallery.open(index).set_excluded([1, 2])  # clean --apply's exclusion: none searchable, both stored
    info = json.loads(_run(capsys, "index", "info", "--index", index)[1])
    assert info["references"] == 0 and info["build"] == {"state": "complete", "note": ""}, info
    assert _run(capsys, "references", "delete", "1", "2", "--index", index)[0] == 0  # emptied
    info = json.loads(_run(capsys, "index", "info", "--index", index)[1])
    assert info["references"] == 0 and info["build"] == {"state": "complete", "note": ""}, info

    for i in range(2):  # photos the build cannot read
        (tmp_path / "bad" / "Natrix maura").mkdir(parents=True, exist_ok=True)
        (tmp_path / "bad" / "Natrix maura" / f"{i}.png").write_bytes(b"not a photo")
    bad = tmp_path / "gbad"
    code, _, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", tmp_path / "bad", "--index", bad,
                        *ENCODER, "-q")
    assert code == 1, err  # completed: a species with no usable photo
    info = json.loads(_run(capsys, "index", "info", "--index", bad)[1])
    assert info["references"] == 0 and info["build"] == {"state": "complete", "note": ""}, info


def _ivfpq_settings_rebuilt(tmp_path: Path, capsys, **settings: object) -> tuple[Path, int, str]:
    """A flat gallery of 20 random photos, its gallery.json "index" set to ivfpq with ``settings`` by hand (as
    docs/scale.md says), then built again: (gallery, exit code, stderr of the second build)."""
    from _cli_support import folder_gallery

    index = folder_gallery(tmp_path, capsys, ("Natrix maura", "Naja haje"), 20)
    info = json.loads((index / "gallery.json").read_text())
    info["index"] |= {"kind": "ivfpq", **settings}
    (index / "gallery.json").write_text(json.dumps(info))
    code, _, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", tmp_path / "photos", "--index",
                        index, *ENCODER, "-q")
    return index, code, err


def test_an_ivfpq_nlist_above_the_reference_count_builds_flat_with_a_warning_and_leaves_no_mark(tmp_path, capsys,
                                                                                               caplog):
    """Walk-tiny 6: FAISS's RuntimeError ("Number of training points (42) should be at least as large as number of
    clusters (64)") and a gallery left "interrupted: run it again", which failed the same way. Now as IVF does: flat,
    with a warning naming the setting and the count."""
    index, code, err = _ivfpq_settings_rebuilt(tmp_path, capsys, ivfpq_nlist=64)
    assert code == 0, err
    assert ("ivfpq index not built: ivfpq_nlist is 64, more lists than the 20 vectors to train them on (lower "
            "ivfpq_nlist in gallery.json's \"index\", or set it to null); a flat index is built instead"
            ) in caplog.text
    assert build_status(index) == {"state": "complete", "note": ""}
    assert json.loads((index / "vectors.faiss.json").read_text())["kind"] == "flat"


def test_an_ivfpq_m_that_does_not_divide_the_width_is_refused_before_the_build_marks_the_gallery(tmp_path, capsys):
    """The other ivfpq setting FAISS cannot build with: refused when the gallery opens, naming the setting and the
    width, not mid-build (which left the gallery "interrupted: run it again", failing the same way again)."""
    index, code, err = _ivfpq_settings_rebuilt(tmp_path, capsys, ivfpq_m=7)
    dim = json.loads((index / "gallery.json").read_text())["dim"]
    assert code != 0 and dim % 7
    assert (f'gallery.json "index": ivfpq_m is 7; it takes a divisor of the embedding width {dim}, or null '
            "(docs/scale.md)") in err
    assert build_status(index) == {"state": "complete", "note": ""}
    # a reader still opens it: its saved index is flat and needs no ivfpq_m (s57: every open was refused)
    code, out, err = _run(capsys, "index", "info", "--index", index)
    assert code == 0 and json.loads(out)["references"] == 20, err
    photo = next((tmp_path / "photos").rglob("*.png"))
    code, out, err = _run(capsys, "identify", "--index", index, photo, *ENCODER)
    assert code == 0, err
