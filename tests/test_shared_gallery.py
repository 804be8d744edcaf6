"""A gallery many processes write at once: ids for ever unique, every photo once, kills never lose a commit,
bad names and paths reported without aborting a batch, uploads removed with their last reference."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from _api_support import API_KEY, SPECIES, binomial, gallery_copy, photos
from conftest import REPO, needs_shared

from api.cli import main
from retrieval.encoders import EncoderConfig

CHAOS = REPO / "scripts" / "chaos_gallery.py"


def _cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "api.cli", *map(str, argv)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_two_writer_processes_over_several_rounds_store_every_photo_once(tmp_path_factory):
    from index.gallery import Gallery

    index = gallery_copy(tmp_path_factory, "two_writers")
    before = Gallery.open(index)
    start_rows, start_ids = len(before), set(before.store.ids().tolist())
    pool = photos("train", SPECIES[1], 50)[10:]  # 40 new photos of one species (a photo of another species sent
    # under this name would be refused as already that species' reference, with exit status 1)

    def rounds(w: int) -> list[int]:
        codes = []
        for r in range(3):  # each round re-sends half of the other writer's photos too
            part = pool[(w * 20 + r * 7) % 40:][:14] + pool[((1 - w) * 20 + r * 5) % 40:][:6]
            codes.append(_cli("references", "add", "--index", index, "--species", binomial(SPECIES[1]), *part,
                              "-q").returncode)
        return codes

    with ThreadPoolExecutor(2) as ex:
        codes = [c for w in ex.map(rounds, (0, 1)) for c in w]
    assert codes == [0] * 6
    g = Gallery.open(index)
    meta = g.store.metadata()
    sent = {p.name for w in (0, 1) for r in range(3)
            for p in (pool[(w * 20 + r * 7) % 40:][:14] + pool[((1 - w) * 20 + r * 5) % 40:][:6])}
    stored_new = meta[~meta["id"].isin(start_ids)]
    assert len(stored_new) == len(sent) and meta["sha256"].is_unique and meta["id"].is_unique
    assert len(g) == start_rows + len(sent)
    assert g.index.ids.tolist() == sorted(g.store.ids().tolist())  # the derived index follows the store


def test_chaos_writers_killed_at_random_lose_nothing():
    needs_shared()
    out = subprocess.run([sys.executable, str(CHAOS), "--trials", "1", "--writers", "3", "--kill", "1", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["trials"] == 1 and summary["survived"] == 1 and summary["lost"] == 0, summary


def test_ids_are_never_reused_after_deleting_the_highest(tmp_path_factory, capsys):
    from index.gallery import Gallery

    index = gallery_copy(tmp_path_factory, "ids")
    new = photos("val", SPECIES[0], 2)
    assert main(["references", "add", "--index", str(index), "--species", binomial(SPECIES[0]), str(new[0]), "-q"]) == 0
    top = int(Gallery.open(index).store.ids().max())
    capsys.readouterr()
    assert main(["references", "delete", str(top), "987654", str(top), "--index", str(index)]) == 1
    assert capsys.readouterr().out.strip() == "deleted 1 of 2 references; no reference with id 987654"
    assert main(["references", "add", "--index", str(index), "--species", binomial(SPECIES[0]), str(new[1]), "-q"]) == 0
    out = capsys.readouterr().out
    again = int(out.split("ids: ")[1])
    assert again > top, (again, top)
    # the same photo as the deleted one comes back under a new id too
    assert main(["references", "add", "--index", str(index), "--species", binomial(SPECIES[0]), str(new[0]), "-q"]) == 0
    assert int(capsys.readouterr().out.split("ids: ")[1]) > again


def test_bad_file_names_and_tiny_photos_do_not_abort_a_batch(tmp_path_factory, tmp_path, capsys):
    from index.gallery import Gallery
    from index.store import source_file

    index = gallery_copy(tmp_path_factory, "bad_names")
    src = photos("val", SPECIES[2], 3)
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9-latin1.jpg"))  # not valid UTF-8 on disk
    odd.write_bytes(src[0].read_bytes())
    from PIL import Image

    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1)).save(tiny)
    code = main(["references", "add", "--index", str(index), "--species", binomial(SPECIES[2]), str(odd), str(tiny),
                 str(src[1]), str(tmp_path / "missing.jpg"), "-q"])
    out, err = capsys.readouterr()
    assert code == 1  # some inputs failed ...
    assert "added 2" in out and "too small for a reference photo" in out and "missing.jpg: does not exist" in err
    g = Gallery.open(index)  # ... the rest is stored, the odd name included, and can be read back
    paths = [str(p) for p in g.store.metadata()["source_path"]]
    stored = [p for p in paths if p.startswith("file://")]
    assert len(stored) == 1 and source_file(stored[0]) == odd and source_file(stored[0]).read_bytes()
    assert main(["species", "list", "--index", str(index)]) == 0 and main(["identify", "--index", str(index),
                                                                           str(src[2]), "-q"]) == 0
    # a photo that is already another species' reference: not added, said, exit status 1; the other photo is added
    capsys.readouterr()
    code = main(["references", "add", "--index", str(index), "--species", "Testus novus", str(src[1]), str(src[2]),
                 "-q"])
    out = capsys.readouterr().out
    assert code == 1 and "added 1" in out, out
    assert f"not added: {src[1]} is already reference" in out and f"of {binomial(SPECIES[2])}" in out, out


@pytest.mark.parametrize("name", ["Naja\x00haje", "Naja \u202ehaje", "Naja\x07haje", "x" * 121, "   ", "-"])
def test_bad_species_names_are_refused(tmp_path_factory, capsys, name):
    index = gallery_copy(tmp_path_factory, "names")
    code = main(["references", "add", "--index", str(index), "--species", name, str(photos("val", SPECIES[0], 1)[0])])
    err = capsys.readouterr().err
    assert code == 2 and any(why in err for why in ("contains", "characters long", "is empty", "no letters")), err


def test_api_names_min_side_delete_removes_the_upload(tmp_path_factory):
    needs_shared()
    from fastapi.testclient import TestClient
    from PIL import Image

    from api.app import create_app
    from api.settings import Settings

    index = gallery_copy(tmp_path_factory, "api_shared")
    keys = {"X-API-Key": API_KEY}
    with TestClient(create_app(Settings(index=str(index), api_keys=API_KEY, precision="fp32"))) as client:
        photo = photos("val", SPECIES[1], 1)[0]
        files = [("images", (photo.name, photo.read_bytes(), "image/jpeg"))]
        for bad in ("Naja\u202esamarensis", "Naja%00samarensis", "x" * 121):
            resp = client.post(f"/v1/species/{bad}/references", files=files, headers=keys)
            assert resp.status_code == 422 and ("contains" in resp.json()["detail"] or "long" in resp.json()["detail"])
        buf = io.BytesIO()
        Image.new("RGB", (1, 1)).save(buf, "PNG")
        resp = client.post("/v1/species/Naja samarensis/references", headers=keys,
                           files=[("images", ("dot.png", buf.getvalue(), "image/png"))])
        assert resp.status_code == 422 and "too small for a reference photo" in resp.json()["detail"]
        added = client.post("/v1/species/Naja samarensis/references", files=files, headers=keys)
        assert added.status_code == 201, added.text
        uploads = list((index / "uploads").iterdir())
        assert len(uploads) == 1
        ref = added.json()["ids"][0]
        assert client.delete(f"/v1/references/{ref}", headers=keys).status_code == 204
        assert not uploads[0].exists()  # no other reference used it
        # the same bytes again, under this species and under another: stored once, the file kept for that reference
        a = client.post("/v1/species/Naja samarensis/references", files=files, headers=keys).json()["ids"][0]
        assert client.post("/v1/species/Naja samarensis/references", files=files, headers=keys).json()["ids"] == []
        other = client.post("/v1/species/Naja philippinensis/references", files=files, headers=keys).json()
        assert other["ids"] == [] and other["duplicates"][0]["species"] == "Naja samarensis"
        kept = list((index / "uploads").iterdir())
        assert len(kept) == 1 and client.get(f"/v1/references/{a}/image").status_code == 200
        assert client.delete(f"/v1/references/{a}", headers=keys).status_code == 204 and not kept[0].exists()


def test_a_long_running_reader_sees_other_processes_writes(tmp_path_factory):
    from retrieval.workflows import identify, open_identifier

    index = gallery_copy(tmp_path_factory, "reader")
    ident = open_identifier(index, EncoderConfig(precision="fp32"), refresh_s=0.2)
    new = photos("train", "Common Wolf Snake (Lycodon capucinus)", 5)
    assert _cli("references", "add", "--index", index, "--species", "Lycodon capucinus", *new[:4], "-q").returncode == 0
    import time

    time.sleep(0.3)
    answer = identify(ident, [new[0]])[0]  # one of the photos the other process added: its own nearest
    best = answer.identification.neighbours[0]
    assert best.species == "Lycodon capucinus" and best.similarity > 0.999
    assert "Lycodon capucinus" in {s.species for s in ident.gallery.species()}
    assert np.isin(ident.gallery.store.ids(), ident.gallery.index.ids).all()


def test_cli_mistakes_get_one_clear_line_and_nothing_half_made(tmp_path_factory, tmp_path, capsys):
    """Bad values, a report path that is a file, a gallery with nothing searchable: a one-line error (exit 2),
    before any embedding work; an index build that adds nothing fails; the CSV keeps the candidates' order."""
    index = gallery_copy(tmp_path_factory, "cli_errors")
    val = photos("val", SPECIES[0], 2)

    def run(*argv) -> tuple[int, str, str]:
        code = main([str(a) for a in argv])
        got = capsys.readouterr()
        return code, got.out, got.err

    with pytest.raises(SystemExit) as exc:
        main(["identify", "--index", str(index), str(val[0]), "--k", "0"])
    assert exc.value.code == 2 and "'0' is not a whole number of at least 1" in capsys.readouterr().err
    code, _, err = run("search", "--index", index, val[0].parent)
    assert code == 2 and "search takes one photo" in err
    (tmp_path / "a-file").write_text("")
    code, _, err = run("evaluate", "--index", index, "--dataset", "folder", "--root", val[0].parent.parent,
                       "--report", tmp_path / "a-file", "-q")
    assert code == 2 and "is a file; give a folder" in err
    code, _, err = run("evaluate", "--index", index, "--dataset", "folder", "--root", val[0].parent.parent,
                       "--method", "probe", "-q")
    assert code == 2 and "has no probe for method probe: train one with 'speciesid probe train" in err
    (tmp_path / "no-photos" / "Naja haje").mkdir(parents=True)  # a species folder with no photo in it
    code, _, err = run("evaluate", "--index", index, "--dataset", "folder", "--root", tmp_path / "no-photos", "-q")
    assert code == 2 and "no photos found under" in err and "which expects ROOT/<species>/<photos>" in err, err
    for argv in (["probe", "train", "--index", str(index), "--folds", "1"],
                 ["references", "delete", "--index", str(index), str(2**70)],  # was a DataFusion error
                 ["index", "build", "--dataset", "folder", "--root", str(tmp_path), "--index", str(tmp_path / "g"),
                  "--batch-size", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and "is not a whole number " in capsys.readouterr().err
    code, _, err = run("identify", "--index", index, val[0], "--device", "gpu")
    assert code == 2 and "unknown device 'gpu'" in err
    code, out, _ = run("identify", "--index", index, val[0], "--rank", "genus", "--k", "2", "--format", "csv", "-q")
    rows = out.strip().splitlines()[1:]
    assert code == 0 and [r.split(",")[1:3] for r in rows] == [["1", "genus"], ["2", "genus"]], out
    header = out.splitlines()[0].split(",")  # the answer's own fields ride on every row
    assert {"far", "nearest_similarity", "venomous_score", "venom_unknown_score"} <= set(header)
    # the table lists the evidence photos at species rank too (--neighbours did nothing there)
    code, out, _ = run("identify", "--index", index, val[0], "--neighbours", "2", "-q")
    lines = out.splitlines()
    at = lines.index("  evidence, by cosine similarity:")
    rows = [x for x in lines[at + 1:at + 4] if x.startswith("    #")]
    assert code == 0 and len(rows) == 2 and all("." in x.split()[-1] for x in rows), out  # ends with its file

    bad = tmp_path / "photos" / "Naja haje"
    bad.mkdir(parents=True)
    (bad / "not-a-photo.jpg").write_text("text")
    empty = tmp_path / "empty"
    code, _, err = run("index", "build", "--dataset", "folder", "--root", bad.parent, "--index", empty,
                       "--encoder", json.loads((index / "gallery.json").read_text())["encoder"]["spec"], "-q")
    assert code == 1 and "has no searchable references: no photo could be added" in err
    code, _, err = run("identify", "--index", empty, val[0])
    assert code == 2 and "has no searchable references" in err


def test_a_store_that_cannot_be_opened_leaves_no_gallery_behind(tmp_path, monkeypatch):
    import index.gallery as gallery_module

    def unreachable(*args, **kwargs):
        raise RuntimeError("lance error: Generic S3 error: Failed to resolve region\nmore detail")

    monkeypatch.setattr(gallery_module, "ReferenceStore", unreachable)
    root = tmp_path / "new" / "g"
    encoder = {"spec": "timm:x", "fingerprint": "timm:x#0123456789abcdef", "dim": 4}
    with pytest.raises(ValueError, match=r"cannot open the store s3://bucket/x at the endpoint .*; check the URI .*"
                       r"\(the store's error: lance error: .*region\)$"):
        gallery_module.Gallery.create(root, encoder, store="s3://bucket/x")
    # nothing half-made is left: the folder it made goes with its lock file (a creator waiting on that lock takes
    # the path's own once it gets it: index.locks)
    assert not root.exists()
    monkeypatch.undo()
    assert len(gallery_module.Gallery.create(root, encoder)) == 0  # the same folder is taken as empty


_CREATE_AND_ADD = """
import sys, time
import numpy as np
from index.gallery import Gallery
from index.records import ReferenceRecord
root, n, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))  # every process creates at the same instant
g = Gallery.create(root, {"spec": "t", "fingerprint": "t#0", "dim": 4})
v = np.random.default_rng(n).standard_normal((1, 4)).astype(np.float32)
g.add([ReferenceRecord(path=f"/p/{n}.jpg", species="Naja naja")], [f"{n:064d}"], v / np.linalg.norm(v))
"""


def test_processes_creating_one_gallery_at_once_all_succeed(tmp_path):
    """One makes the gallery, the others open it (before: 'exists and is not a speciesid gallery' for them, and a
    creator that failed afterwards cleaned up what the winner had committed)."""
    import time

    from index.gallery import Gallery

    root = tmp_path / "g"
    start = time.time() + 3.0
    procs = [subprocess.Popen([sys.executable, "-c", _CREATE_AND_ADD, str(root), str(n), str(start)], cwd=REPO,
                              stderr=subprocess.PIPE, text=True) for n in range(3)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    g = Gallery.open(root)
    assert len(g) == 3 and sorted(g.store.ids().tolist()) == [1, 2, 3]


_HOLD_LOCK = """
import sys, time
from pathlib import Path
from index.locks import WriteLock
lock, ready, release = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
with WriteLock(lock).hold():
    ready.touch()
    deadline = time.time() + 60
    while not release.exists() and time.time() < deadline:
        time.sleep(0.02)
"""


@contextlib.contextmanager
def _lock_held_elsewhere(gallery, tmp_path: Path):
    """Another process holds the gallery's write lock for the block (yields that process)."""
    import time

    ready, release = tmp_path / "ready", tmp_path / "release"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(gallery.layout.write_lock), str(ready),
                               str(release)], cwd=REPO)
    try:
        deadline = time.time() + 60
        while not ready.exists():
            assert holder.poll() is None and time.time() < deadline
            time.sleep(0.02)
        yield holder
    finally:
        release.touch()
        holder.wait(60)


def test_a_write_waiting_for_another_process_never_stalls_this_processs_searches(tmp_path):
    """The server shares one gallery between searches and uploads: an upload waiting for another process's writer
    must not hold the lock searches sync under (before: every search waited as long as the upload did)."""
    import threading
    import time

    from index.gallery import Gallery
    from index.records import ReferenceRecord

    g = Gallery.create(tmp_path / "g", {"spec": "t", "fingerprint": "t#0", "dim": 4})
    g.add([ReferenceRecord(path="/p/0.jpg", species="Naja naja")], ["0" * 64], np.eye(4, dtype=np.float32)[:1])
    with _lock_held_elsewhere(g, tmp_path) as holder:
        adding = threading.Thread(target=g.add, args=([ReferenceRecord(path="/p/1.jpg", species="Naja naja")],
                                                      ["1" * 64], np.eye(4, dtype=np.float32)[1:2]))
        adding.start()
        time.sleep(0.5)  # the add is now waiting for the other process
        assert adding.is_alive()
        g.refresh(force=True)  # takes the thread lock a search syncs under
        hits = g.search(np.eye(4, dtype=np.float32)[:1], 1)[0]
        assert adding.is_alive() and holder.poll() is None  # answered while the add still waits
        assert hits[0].id == 1
    adding.join(60)
    assert len(g) == 2


def test_a_reader_never_waits_on_a_writer_to_repair_the_index(tmp_path):
    """A vectors.faiss caught between its save and its manifest's, or missing, is repaired by the reader in memory
    (synced by id, or built from the store) while another process holds the write lock: before, the open waited
    for that writer (up to the lock's 600 s) to rebuild it under the lock."""
    import shutil

    from index.gallery import Gallery
    from index.records import ReferenceRecord

    g = Gallery.create(tmp_path / "g", {"spec": "t", "fingerprint": "t#0", "dim": 4})
    eye = np.eye(4, dtype=np.float32)
    g.add([ReferenceRecord(path="/p/0.jpg", species="Naja naja")], ["0" * 64], eye[:1])
    old_manifest = (g.root / "vectors.faiss.json").read_bytes()
    g.add([ReferenceRecord(path="/p/1.jpg", species="Naja naja")], ["1" * 64], eye[1:2])
    with _lock_held_elsewhere(g, tmp_path) as holder:
        (g.root / "vectors.faiss.json").write_bytes(old_manifest)  # the new file, the old manifest
        mid_save = Gallery.open(g.root)
        assert sorted(mid_save.index.ids.tolist()) == [1, 2] and holder.poll() is None  # the writer still holds it
        shutil.move(g.root / "vectors.faiss", tmp_path / "moved.faiss")  # missing altogether
        missing = Gallery.open(g.root)
        assert missing.search(eye[1:2], 1)[0][0].id == 2 and holder.poll() is None


def _race_the_first_read(monkeypatch, index: Path, species: str, photos: list[Path]) -> list:
    """Make the next add of ``species`` lose a race: once it has read the gallery's species (before its write
    lock), another writer (a second Gallery object of the folder) stores ``photos`` under the same name."""
    from retrieval import workflows

    real, other = workflows.new_species_references, []

    def racing(*args, **kwargs):
        out = real(*args, **kwargs)
        if not other:  # the first read done, the lock not taken yet
            other.append(None)
            gallery, enc = workflows.open_gallery(index)
            other[0] = workflows.add_photos(gallery, enc, species, photos, progress=False)
        return out

    monkeypatch.setattr(workflows, "new_species_references", racing)
    return other


def test_an_add_whose_photos_another_writer_stored_meanwhile_says_the_species_is_there(tmp_path, capsys,
                                                                                        monkeypatch):
    """Walk chaos #1: two adds of the same new species at once; the one that stored nothing (every photo a
    duplicate of the other's) said the species was not created and 'is not in the gallery', from what it read
    before the lock, though the other had just made it. It now reads the store again when it commits nothing."""
    from _cli_support import ENCODER, _photo, _run, two_species_gallery

    index, _ = two_species_gallery(tmp_path, capsys)
    new = [_photo(tmp_path / "new" / f"{i}.png", 300 + i) for i in range(3)]
    other = _race_the_first_read(monkeypatch, index, "Ptyas carinata", new)
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Ptyas carinata", *new,
                          *ENCODER, "-q")
    assert other[0].created and len(other[0].report.ids) == 3, other
    assert code == 0 and out.startswith("Ptyas carinata (existing species): added 0, "), (out, err)
    assert "is not in the gallery" not in out + err, (out, err)


def test_the_api_answers_exists_for_a_species_another_writer_made_meanwhile(tmp_path, capsys, monkeypatch):
    """Walk chaos #1, the API: the losing upload answered "exists": false and a note that the species is not in
    the gallery, beside duplicates of that species' references."""
    from _cli_support import _photo, two_species_gallery
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import Settings

    index, _ = two_species_gallery(tmp_path, capsys)
    new = [_photo(tmp_path / "new" / f"{i}.png", 310 + i, side=256) for i in range(2)]
    other = _race_the_first_read(monkeypatch, index, "Ptyas carinata", new)
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in new]
    with TestClient(create_app(Settings(index=str(index), api_keys="secret", precision="fp32"))) as client:
        done = client.post("/v1/species/Ptyas carinata/references", files=files, headers={"X-API-Key": "secret"})
    body = done.json()
    assert other[0].created and done.status_code == 200, body
    assert body["exists"] is True and body["created"] is False and body["added"] == 0, body
    assert [d["species"] for d in body["duplicates"]] == ["Ptyas carinata"] * 2, body
    assert not any("is not in the gallery" in n for n in body["notes"]), body


def test_index_info_names_a_live_write_lock_holder_and_a_released_lock_keeps_no_record(tmp_path, capsys):
    """Walk chaos #6: 'index info' named no holder of a local write lock (a stuck writer), and '.write.lock' kept
    the last holder's host and pid after it let go. info now says whether the lock is held and by whom; a hold
    clears its record when it ends (a killed holder's stays, read as not held: the flock is what counts)."""
    from _cli_support import _run, folder_gallery

    from index.gallery import Gallery

    index = folder_gallery(tmp_path, capsys, ("Natrix maura",))
    gallery = Gallery.open(index)
    with _lock_held_elsewhere(gallery, tmp_path) as holder:
        code, out, err = _run(capsys, "index", "info", "--index", index)
        lock = json.loads(out)["store"]["write_lock"]
        assert code == 0 and lock["held"] is True and lock["holder"]["pid"] == holder.pid, (lock, err)
        assert lock["file"] == str(gallery.layout.write_lock) and lock["holder"]["since"], lock
    assert gallery.layout.write_lock.read_text() == ""  # released: no record of a process that is gone
    lock = json.loads(_run(capsys, "index", "info", "--index", index)[1])["store"]["write_lock"]
    assert lock == {"file": str(gallery.layout.write_lock), "held": False, "holder": None}, lock
    gallery.layout.write_lock.write_text('{"host": "h", "pid": 4242, "since": "then"}')  # a killed holder's
    lock = json.loads(_run(capsys, "index", "info", "--index", index)[1])["store"]["write_lock"]
    assert lock["held"] is False and lock["holder"] is None, lock


def test_an_add_cut_by_ctrl_c_before_its_commit_does_no_store_io_in_the_interrupts_handling(tmp_path, capsys,
                                                                                              monkeypatch):
    """Re-read chaos #5: an add cut by Ctrl-C before any commit read the store again (whether its species exists)
    inside the interrupt's handling, where a second Ctrl-C (or a slow store) lost the interrupt's notes. It answers
    from what it read before; the read again, when nothing was committed, goes through the gallery's own look."""
    from _cli_support import _photo, two_species_gallery

    from index.gallery import Gallery
    from index.store import ReferenceStore
    from retrieval import workflows
    from retrieval.pipeline import BuildReport, ReferencesInterrupted

    index, _ = two_species_gallery(tmp_path, capsys)
    new = [_photo(tmp_path / "new" / f"{i}.png", 400 + i) for i in range(2)]
    gallery, enc = workflows.open_gallery(index)

    class SecondCtrlC(BaseException):  # as a second Ctrl-C while the store is read (pytest stops on a real one)
        pass

    def second_ctrl_c(*args, **kwargs):
        raise SecondCtrlC

    def cut(*args, **kwargs):
        raise ReferencesInterrupted(BuildReport())  # Ctrl-C before the first commit

    with monkeypatch.context() as patch:
        patch.setattr(workflows, "add_references", cut)
        patch.setattr(ReferenceStore, "refresh", second_ctrl_c)
        patch.setattr(ReferenceStore, "has_species", second_ctrl_c)
        with pytest.raises(ReferencesInterrupted) as caught:
            workflows.add_photos(gallery, enc, "Ptyas carinata", new, progress=False)
    assert caught.value.species == "Ptyas carinata" and caught.value.existed is False
    looks: list[bool] = []
    real = Gallery.refresh

    def looked(self, **kwargs):
        looks.append(kwargs.get("force", False))
        return real(self, **kwargs)

    monkeypatch.setattr(Gallery, "refresh", looked)
    monkeypatch.setattr(workflows, "add_references", lambda *a, **k: BuildReport())  # nothing committed
    workflows.add_photos(gallery, enc, "Ptyas carinata", new, progress=False)
    assert True in looks, looks  # the read again: after the gallery's own look, under its lock
