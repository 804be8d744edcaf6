"""``speciesid species set-venom`` (retrieval.workflows.set_species_venomous): the venom flag of a species already in
a gallery, with no photo (walk s52 #2c: a folder build could not record one, and re-adding its photos with
``--venomous`` added nothing)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from _cli_support import (
    DIM,
    ENC,
    ENCODER,
    FakeEncoder,
    _photo,
    _run,
    folder_gallery,
    two_species_gallery,
    venom_flags,
)

from index.gallery import Gallery
from index.records import ReferenceRecord
from retrieval.identify import Identifier
from retrieval.workflows import set_species_venomous


def _add_rows(g: Gallery, rng: np.random.Generator, centre: np.ndarray, species: str, tag: str, n: int,
              venomous: bool | None = None) -> None:
    """Add ``n`` rows of ``species`` near ``centre`` (unit vectors), named ``/p/{tag}{i}.jpg``, ids ``{tag}-{i}``."""
    x = centre + 0.05 * rng.standard_normal((n, DIM))
    g.add([ReferenceRecord(path=f"/p/{tag}{i}.jpg", species=species, venomous=venomous) for i in range(n)],
          [f"{tag}-{i}" for i in range(n)], (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))

def test_set_venom_sets_a_folder_species_flag_and_refuses_what_it_must(tmp_path, capsys, caplog):
    index = folder_gallery(tmp_path, capsys, ("Rana temporaria", "Bufo bufo"), 6)
    assert venom_flags(capsys, index) == {"Bufo bufo": None, "Rana temporaria": None}  # a folder records none
    code, out, err = _run(capsys, "species", "set-venom", "--index", index, "bufo_bufo", "no")
    assert code == 0 and out.strip() == "Bufo bufo: venomous ? -> no (3 references)", (out, err)
    assert venom_flags(capsys, index) == {"Bufo bufo": False, "Rana temporaria": None}
    code, out, err = _run(capsys, "species", "set-venom", "--index", index, "Rana temporaria", "yes")
    assert code == 0 and out.strip() == "Rana temporaria: venomous ? -> yes (3 references)", (out, err)
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Rana temporaria",
                          "--venomous", "no", *ENCODER, _photo(tmp_path / "new.png", 99))
    assert code != 0 and (f"if that flag is wrong, set it first with 'speciesid species set-venom --index {index} "
                          '"Rana temporaria" no\'') in err, err  # not "delete the references that flag it"
    caplog.set_level(logging.WARNING, logger="retrieval.workflows")
    code, out, err = _run(capsys, "species", "set-venom", "--index", index, "Rana temporaria", "no")
    assert code == 0 and "venomous yes -> no" in out, (out, err)  # the gallery's own flag can be mended, said loud:
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 1 and said[0].startswith(
        "'Rana temporaria' was recorded medically important venomous by its references and is now recorded harmless "
        "(venomous yes -> no)"), said
    caplog.clear()
    code, out, err = _run(capsys, "species", "set-venom", "--index", index, "Bufo bufo", "no")
    assert code == 0 and out.strip() == "Bufo bufo: venomous already no (3 references): nothing changed", out
    assert not caplog.records, caplog.records  # no change
    assert venom_flags(capsys, index) == {"Bufo bufo": False, "Rana temporaria": False}
    code, out, err = _run(capsys, "species", "set-venom", "--index", index, "Bufo buffo", "no")
    assert code != 0 and f"no species 'Bufo buffo' in gallery {index}; did you mean 'Bufo bufo'?" in err, err
    code, out, err = _run(capsys, "species", "set-venom", "--index", index, "Bufo bufo", "maybe")
    assert code != 0 and "the venomous flag takes yes or no, not 'maybe'" in err, err


def test_set_venom_to_the_flag_it_has_writes_nothing(tmp_path, capsys):
    """A species already flagged so: "already no: nothing changed", and no store version is committed (walk-docs
    stop 54, finding 13: it said "no -> no" and wrote every row again); one row saying otherwise (a reference of no
    status beside flagged ones) is set, and only it, and the CLI says so (final read #2: it still said "no -> no")."""
    import shutil

    rng = np.random.default_rng(3)
    g = Gallery.create(tmp_path / "g", ENC)
    x = rng.standard_normal((4, DIM))
    g.add([ReferenceRecord(path=f"/p/{i}.jpg", species="Bufo bufo", venomous=False if i < 3 else None)
           for i in range(4)], [f"b-{i}" for i in range(4)],
          (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    cli = shutil.copytree(g.root, tmp_path / "cli")  # the same gallery, for the CLI's words
    code, out, err = _run(capsys, "species", "set-venom", "--index", cli, "Bufo bufo", "no")
    said = "Bufo bufo: venomous no (1 of 4 references set; the others were already no)"
    assert (code, out.strip()) == (0, said), err
    done = set_species_venomous(g, "Bufo bufo", False)
    assert (done.was, done.now, done.references, done.changed) == (False, False, 4, 1)  # the unflagged one
    version = Gallery.open(g.root).store.version
    again = set_species_venomous(g, "bufo bufo", False)
    assert (again.species, again.was, again.now, again.references, again.changed) == ("Bufo bufo", False, False, 4, 0)
    assert Gallery.open(g.root).store.version == version  # nothing committed
    assert list(Gallery.open(g.root).store.metadata()["venomous"]) == [False] * 4


def test_set_venom_and_venom_advice_say_when_nothing_changed(tmp_path, capsys):
    """The CLI's words for a setting already in place (exit 0): set-venom and index venom-advice alike."""
    index = folder_gallery(tmp_path, capsys, ("Rana temporaria", "Bufo bufo"), 4)
    assert _run(capsys, "species", "set-venom", "--index", index, "Bufo bufo", "yes")[0] == 0
    code, out, err = _run(capsys, "species", "set-venom", "--index", index, "Bufo bufo", "yes")
    assert (code, out.strip()) == (0, "Bufo bufo: venomous already yes (2 references): nothing changed"), err
    code, out, err = _run(capsys, "index", "venom-advice", "--index", index, "on")
    assert (code, out.splitlines()[0]) == (0, f"gallery {index}: venom advice already on: nothing changed"), err


def test_venom_advice_on_where_gallery_json_records_nothing_writes_nothing(tmp_path):
    """Re-read stop 54 #5: "venom advice already on: nothing changed" rewrote gallery.json (the key added, written_by
    stamped, its mtime moved: a running server read it again). Now the file is left as it is; off, then on, write."""
    from retrieval.advice import VENOM_ADVICE_KEY
    from retrieval.workflows import set_venom_advice

    g = Gallery.create(tmp_path / "g", ENC)
    info = g.root / "gallery.json"
    assert VENOM_ADVICE_KEY not in json.loads(info.read_text())
    before, stamp = info.read_bytes(), info.stat().st_mtime_ns
    done = set_venom_advice(g, True)
    assert (done.was, done.now) == (True, True)
    assert info.read_bytes() == before and info.stat().st_mtime_ns == stamp
    assert set_venom_advice(g, False).now is False and json.loads(info.read_text())[VENOM_ADVICE_KEY] is False
    assert set_venom_advice(g, True).now is True and json.loads(info.read_text())[VENOM_ADVICE_KEY] is True


def test_set_venom_refuses_no_for_a_venomous_snake_of_the_taxonomy(tmp_path, capsys):
    index, _ = two_species_gallery(tmp_path, capsys)
    assert venom_flags(capsys, index)["Naja samarensis"] is True
    code, out, err = _run(capsys, "species", "set-venom", "--index", index, "Naja samarensis", "no")
    assert code != 0 and ("'Naja samarensis' is medically important venomous in the shipped taxonomy (SnakeCLEF's "
                          "list): its flag stays as it is (recorded venomous); a harmless") in err, err
    assert venom_flags(capsys, index)["Naja samarensis"] is True


def test_an_identifier_answers_with_the_flag_set(tmp_path):
    """The flag set through a gallery that answered before: its answers (species and evidence) carry the new flag at
    once: a toad of no status beside a cobra warns as unrecorded, flagged 'no' it is 'unlikely'."""
    rng = np.random.default_rng(7)
    g = Gallery.create(tmp_path / "g", ENC)
    centres = {}
    for name, flag in (("Bufo bufo", None), ("Naja haje", True)):
        centres[name] = rng.standard_normal(DIM)
        x = centres[name] + 0.05 * rng.standard_normal((6, DIM))
        g.add([ReferenceRecord(path=f"/p/{name}/{i}.jpg", species=name, venomous=flag) for i in range(6)],
              [f"{name}-{i}" for i in range(6)], (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    ident = Identifier(FakeEncoder(), g)
    q = (centres["Bufo bufo"] / np.linalg.norm(centres["Bufo bufo"]))[None].astype(np.float32)
    (before,) = ident.identify_embeddings(q)
    assert before.predictions[0].species == "Bufo bufo" and before.predictions[0].venomous is None
    assert before.venom_advice.level == "possibly_venomous"  # its status unrecorded, whatever its name
    done = set_species_venomous(g, "Bufo bufo", False)
    assert (done.species, done.was, done.now, done.references) == ("Bufo bufo", None, False, 6)
    (after,) = ident.identify_embeddings(q)
    assert after.predictions[0].venomous is False and after.neighbours[0].venomous is False
    assert after.venom_advice.level == "unlikely"  # recorded harmless: nothing on venomous or unrecorded species
    assert len(g) == 12 and {s.species: s.venomous for s in Gallery.open(g.root).species()}["Bufo bufo"] is False


def test_the_flag_set_then_an_add_of_that_species_still_answers_with_the_new_flag(tmp_path):
    """set_venomous drops this process's cached rows of the species itself: the venom counts cannot always tell an
    edit later (a yes set on unrecorded rows, then as many unrecorded photos added: no count went down between the
    versions the cache saw), and the evidence named the old rows unrecorded (walk s55, M23)."""
    rng = np.random.default_rng(10)
    g = Gallery.create(tmp_path / "g", ENC)
    centre = rng.standard_normal(DIM)

    def add(tag: str, n: int) -> None:
        _add_rows(g, rng, centre, "Lycodon capucinus", tag, n)

    add("a", 4)
    ident = Identifier(FakeEncoder(), g)
    q = (centre / np.linalg.norm(centre))[None].astype(np.float32)
    for _ in range(2):  # the second answer keeps the venom counts of the version its rows were cached at
        assert [n.venomous for n in ident.identify_embeddings(q)[0].neighbours] == [None] * 4
    assert g.set_venomous("Lycodon capucinus", True) == (4, 4, 0)
    add("b", 4)  # unrecorded, as a folder's photos are: the counts (4 yes, 0 no, 4 unrecorded) lower none of
    # (0, 0, 4)
    flags = {Path(n.path).name: n.venomous for n in ident.identify_embeddings(q)[0].neighbours}
    assert {name: f for name, f in flags.items() if name.startswith("a")} == {f"a{i}.jpg": True for i in range(4)}


@pytest.mark.parametrize("answers_before", [1, 2])
def test_another_process_evidence_follows_a_flag_set_then_an_add_of_that_species(tmp_path, answers_before):
    """Another process's evidence list names the new flag of the rows set-venom edited when an add of the species
    followed it before that process's refresh: a yes set on 4 unrecorded rows, then 4 unrecorded photos added, lower
    none of the counts (0, 0, 4) -> (4, 0, 4), so the server kept the rows' old flag; it reads the edit the store
    records (ReferenceStore.venom_edit). Rows of another species stay cached (walk s55, M23)."""
    rng = np.random.default_rng(11)
    g = Gallery.create(tmp_path / "g", ENC)
    centres = {name: rng.standard_normal(DIM) * 3 for name in ("Lycodon capucinus", "Bufo bufo")}

    def add(name: str, tag: str, n: int) -> None:
        _add_rows(g, rng, centres[name], name, tag, n)

    add("Lycodon capucinus", "a", 4)
    add("Bufo bufo", "bufo", 4)
    server = Identifier(FakeEncoder(), Gallery.open(g.root))

    def evidence(name: str) -> dict[str, bool | None]:
        q = (centres[name] / np.linalg.norm(centres[name]))[None].astype(np.float32)
        return {Path(n.path).name: n.venomous for n in server.identify_embeddings(q)[0].neighbours
                if n.species == name}

    for _ in range(answers_before):  # two: the counts of the version the rows were cached at are read
        assert evidence("Lycodon capucinus") == {f"a{i}.jpg": None for i in range(4)}
        assert evidence("Bufo bufo") == {f"bufo{i}.jpg": None for i in range(4)}
    assert g.set_venomous("Lycodon capucinus", True) == (4, 4, 0)
    add("Lycodon capucinus", "b", 4)
    server.gallery.refresh(force=True)
    server.gallery._drop_edited_rows()
    if answers_before == 2:  # the counts of the version before were read: only the edited species' rows went
        assert {n.species for n in server.gallery._meta_cache.values()} == {"Bufo bufo"}
    assert evidence("Lycodon capucinus") == {**{f"a{i}.jpg": True for i in range(4)},
                                             **{f"b{i}.jpg": None for i in range(4)}}
    assert evidence("Bufo bufo") == {f"bufo{i}.jpg": None for i in range(4)}


def test_another_process_evidence_follows_an_edit_after_a_lance_restore_gave_its_mark_back(tmp_path):
    """A Lance restore() of an older version brings back its older edit mark, so the next set-venom recorded the same
    (generation, species) the server had seen, and with an add hiding it from the counts the server kept the rows'
    old flag; the mark records the update's version, which a restore does not give back (re-read 3 of 0fc5d4a)."""
    import lance

    rng = np.random.default_rng(12)
    g = Gallery.create(tmp_path / "g", ENC)
    centre = rng.standard_normal(DIM) * 3

    def add(tag: str, venomous: bool | None) -> None:
        _add_rows(g, rng, centre, "Lycodon capucinus", tag, 4, venomous)

    add("a", None)
    v0 = g.store.version
    assert g.set_venomous("Lycodon capucinus", True) == (4, 4, 0)
    server = Identifier(FakeEncoder(), Gallery.open(g.root))
    q = (centre / np.linalg.norm(centre))[None].astype(np.float32)

    def evidence() -> dict[str, bool | None]:
        return {Path(n.path).name: n.venomous for n in server.identify_embeddings(q)[0].neighbours}

    for _ in range(2):  # the counts {L: (4, 0, 0)} and the mark (1, L) seen
        assert evidence() == {f"a{i}.jpg": True for i in range(4)}
    lance.dataset(g.store.uri, version=v0).restore()
    g.store._table.checkout_latest()
    assert g.store.venom_edit()[:2] == (0, "")
    assert g.set_venomous("Lycodon capucinus", False) == (4, 4, 0)  # the restore gave the rows back unrecorded
    add("b", True)  # the counts (4 yes, 4 no, 0 unrecorded) lower none of (4, 0, 0)
    server.gallery.refresh(force=True)
    assert evidence() == {**{f"a{i}.jpg": False for i in range(4)}, **{f"b{i}.jpg": True for i in range(4)}}


def test_another_process_gallery_answers_with_the_flag_once_it_reads_the_new_version(tmp_path):
    """A server's gallery (another Gallery of the same folder): its answers name the species' new flag once it has
    read the store's new version (docs/identification.md, 'Setting a species' venom status')."""
    rng = np.random.default_rng(8)
    g = Gallery.create(tmp_path / "g", ENC)
    centre = rng.standard_normal(DIM)
    x = centre + 0.05 * rng.standard_normal((6, DIM))
    g.add([ReferenceRecord(path=f"/p/{i}.jpg", species="Lycodon capucinus") for i in range(6)],
          [f"l-{i}" for i in range(6)], (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    server = Identifier(FakeEncoder(), Gallery.open(g.root))
    q = (centre / np.linalg.norm(centre))[None].astype(np.float32)
    assert server.identify_embeddings(q)[0].predictions[0].venomous is None
    set_species_venomous(g.root, "Lycodon capucinus", True)
    server.gallery.refresh(force=True)
    (answer,) = server.identify_embeddings(q)
    assert answer.predictions[0].venomous is True and answer.venomous_score > 0.9


@pytest.mark.parametrize("stale_reads", [False, True], ids=["gallery", "server's gallery"])
@pytest.mark.parametrize("answers_before", [1, 2])
def test_another_process_evidence_names_the_new_flag_of_every_row(tmp_path, stale_reads, answers_before):
    """The evidence list (each reference's own flag) of another process's answers follows set-venom at the version
    it reads (before: its metadata cache kept each row's old flag until a restart, as no id changed), a species whose
    flag summary stays yes included (one reference yes, the others unrecorded); rows of other species stay cached."""
    rng = np.random.default_rng(9)
    g = Gallery.create(tmp_path / "g", ENC)
    centres = {}
    for name, flags in (("Lycodon capucinus", [None] * 4), ("Naja haje", [True, None, None, None]),
                        ("Bufo bufo", [None] * 4)):
        centres[name] = rng.standard_normal(DIM) * 3
        x = centres[name] + 0.05 * rng.standard_normal((4, DIM))
        g.add([ReferenceRecord(path=f"/p/{name}/{i}.jpg", species=name, venomous=f) for i, f in enumerate(flags)],
              [f"{name}-{i}" for i in range(4)], (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    server = Identifier(FakeEncoder(), Gallery.open(g.root))
    server.gallery.stale_reads = stale_reads

    def evidence(name: str) -> list:
        q = (centres[name] / np.linalg.norm(centres[name]))[None].astype(np.float32)
        (answer,) = server.identify_embeddings(q)
        return [n.venomous for n in answer.neighbours if n.species == name]

    for _ in range(answers_before):
        assert evidence("Lycodon capucinus") == [None] * 4 and sorted(evidence("Naja haje"), key=str) == [
            None, None, None, True]
        assert evidence("Bufo bufo") == [None] * 4
    set_species_venomous(g.root, "Lycodon capucinus", True)
    set_species_venomous(g.root, "Naja haje", True)
    server.gallery.refresh(force=True)
    assert evidence("Lycodon capucinus") == [True] * 4
    assert evidence("Naja haje") == [True] * 4
    assert evidence("Bufo bufo") == [None] * 4
    if answers_before == 2:  # the counts of the version before were read: only the edited species' rows went
        assert any(n.species == "Bufo bufo" for n in server.gallery._meta_cache.values())


def test_set_venom_leaves_the_saved_index_and_the_next_open_catches_up(tmp_path):
    """A flag edit changes no vector: the saved index is not written again (before: the whole file was, with its
    manifest); a gallery opened after it is at the store's version, with the new flag and every reference."""
    rng = np.random.default_rng(10)
    g = Gallery.create(tmp_path / "g", ENC)
    x = rng.standard_normal((6, DIM))
    g.add([ReferenceRecord(path=f"/p/{i}.jpg", species="Bufo bufo") for i in range(6)], [f"b-{i}" for i in range(6)],
          (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    saved = {p: p.read_bytes() for p in (g.layout.vectors, g.layout.vectors.with_name("vectors.faiss.json"))}
    assert set_species_venomous(g, "Bufo bufo", False).references == 6
    assert {p: p.read_bytes() for p in saved} == saved
    again = Gallery.open(g.root)
    assert again.version == g.version == g.store.version and len(again) == 6
    assert {s.species: s.venomous for s in again.species()} == {"Bufo bufo": False}


def test_a_no_that_turns_an_excluded_yes_harmless_is_said_and_warned(tmp_path, capsys, caplog):
    """w3 re-read #2: the flag before came from the searchable references only, while the change sets excluded ones
    too: flags no / no / yes with the yes excluded, `set-venom no` said "1 of 3 references set; the others were
    already no" and warned nothing, though the one it set was a recorded yes (harmless once restored). It now says
    so and warns, as for any yes turned no."""
    import shutil

    rng = np.random.default_rng(5)
    g = Gallery.create(tmp_path / "g", ENC)
    x = rng.standard_normal((3, DIM))
    g.add([ReferenceRecord(path=f"/p/{i}.jpg", species="Bufo bufo", venomous=i == 2) for i in range(3)],
          [f"b-{i}" for i in range(3)], (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    yes = [int(i) for i in g.index.ids if i == max(g.index.ids)]
    assert g.set_excluded(yes) == 1
    cli = shutil.copytree(g.root, tmp_path / "cli")  # the same gallery, for the CLI's words
    caplog.set_level(logging.WARNING, logger="retrieval.workflows")
    code, out, err = _run(capsys, "species", "set-venom", "--index", cli, "Bufo bufo", "no",
                          "--distinct-from-venomous")
    said = ("Bufo bufo: venomous no (1 of 3 references set, 1 of them recorded yes before: excluded references, "
            "harmless now once restored)")
    assert (code, out.strip()) == (0, said), err
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith(
        "'Bufo bufo' was recorded medically important venomous by 1 of its references (excluded ones: answers use "
        "them once restored) and is now recorded harmless (venomous yes -> no)"), warned
    done = set_species_venomous(g, "Bufo bufo", False, distinct_from_venomous=True)
    assert (done.was, done.now, done.references, done.changed, done.turned_off) == (False, False, 3, 1, 1)
