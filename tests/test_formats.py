"""Galleries across speciesid versions (index/formats.py, docs/shared-gallery.md "Versions"): a key a newer
speciesid added to a gallery folder's JSON records is ignored, a higher format is refused before anything is done,
every write of gallery.json and probe.json records ``written_by``, and a gallery made before ``embedded_by`` says
that the runtime of its references is not recorded. The compat test: a field added to a folder's JSON record gets
its reader checked here (CONTRIBUTING.md, "Gallery formats"). Tiny random encoder, random photos: no shared assets."""

from __future__ import annotations

import json
import logging
import re

import pytest
from _cli_support import ENCODER, _photo, _run, folder_gallery

from index import layout as layout_module
from index.formats import speciesid_version
from index.gallery import Gallery
from index.layout import GalleryLayout

SPECIES = ("Natrix maura", "Naja samarensis", "Ptyas carinata")
#: The records inside a folder's JSON files that a reader makes objects of, beside each file's top level.
NESTED = {"gallery.json": ("index", "encoder"), "probe.json": ("settings", "whitening")}


def _gallery(tmp_path, capsys):
    """A gallery of 12 random photos of 3 species, its probe trained and one photo identified (far_threshold.json)."""
    index = folder_gallery(tmp_path, capsys, SPECIES, 12)
    code, _, err = _run(capsys, "probe", "train", "--index", index, "-q")
    assert code == 0, err
    code, _, err = _run(capsys, "identify", "--index", index, *ENCODER, tmp_path / "photos" / SPECIES[0] / "0.png")
    assert code == 0, err
    return index


def _add_key(index, key: str) -> list[str]:
    """Add ``key`` to every JSON record the gallery folder holds (each file's top level, its nested records, and
    each entry of gallery.json's embedded_by): the files changed."""
    changed = []
    for path in sorted(p for p in index.rglob("*.json") if "store" not in p.relative_to(index).parts):
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            continue
        data[key] = {"any": "value"}
        for name in NESTED.get(path.name, ()):
            if isinstance(data.get(name), dict):
                data[name][key] = 1
        for entry in data.get("embedded_by") or ():
            entry[key] = 1
        path.write_text(json.dumps(data))
        changed.append(path.name)
    return changed


def test_keys_a_newer_speciesid_added_to_every_json_record_of_a_gallery_are_ignored(tmp_path, capsys, caplog):
    """Walk (upgrade) #1-#3: every version before 0.2.0 crashed on probe.json settings it did not know (TypeError:
    Calibration.__init__() got an unexpected keyword argument 'left_out') and refused a gallery.json "index" key it
    did not know; a newer speciesid could not add a field without locking older ones out. Now a reader keeps the
    keys it knows (index.formats.known_fields) and says once which it left out."""
    index = _gallery(tmp_path, capsys)
    key = "zz_added_by_speciesid_9"
    changed = _add_key(index, key)
    assert {"gallery.json", "probe.json", "far_threshold.json", "ids.json"} <= set(changed), changed
    caplog.set_level(logging.INFO, logger="index.formats")
    query = tmp_path / "photos" / SPECIES[1] / "1.png"
    code, out, err = _run(capsys, "identify", "--index", index, *ENCODER, query, "--format", "json")
    assert code == 0 and json.loads(out)[0]["predictions"], err
    ignored = [r.getMessage() for r in caplog.records if key in r.getMessage()]
    assert any(m.startswith(f"{GalleryLayout(index).probe_meta} settings: ignored the key(s) this speciesid")
               for m in ignored), ignored
    assert len([m for m in ignored if "probe.json settings" in m]) == 1, ignored  # once, however often it is read
    code, out, err = _run(capsys, "index", "info", "--index", index)
    assert code == 0 and json.loads(out)["probe"]["loaded"] is True, err
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Naja haje", *ENCODER, "-q",
                          _photo(tmp_path / "new" / "0.png", 500))
    assert code == 0, err
    code, out, err = _run(capsys, "probe", "train", "--index", index, "-q")
    assert code == 0, err
    assert json.loads((index / "gallery.json").read_text())[key] == {"any": "value"}  # kept by this version's writes


def test_a_text_prior_species_with_a_key_a_newer_speciesid_added_is_read(tmp_path):
    """text_prior.json's species became SpeciesSummary(**entry): an added key made the prior read as none ([])."""
    from retrieval.textprior import text_prior_taxa

    (tmp_path / "text_prior.json").write_text(json.dumps({"fingerprint": "x#y", "strength": 1.0, "species": [
        {"species": "Naja haje", "genus": "Naja", "family": "Elapidae", "common_name": "Egyptian cobra",
         "venomous": True, "zz_added": "later"}]}))
    taxa = text_prior_taxa(tmp_path)
    assert [(t.species, t.venomous, t.count) for t in taxa] == [("Naja haje", True, 0)]


def test_a_misspelt_index_setting_is_named_in_a_warning_and_the_gallery_opens(tmp_path, caplog):
    """The "index" keys of gallery.json are edited by hand (docs/scale.md): a misspelt one still gets named, with
    the key it is closest to, but no longer refuses the open (a newer speciesid's key would refuse it too)."""
    from _cli_support import ENC

    g = Gallery.create(tmp_path / "g", ENC)
    info = json.loads(g.layout.info.read_text())
    info["index"]["ivfpq_nprob"] = 4
    g.layout.info.write_text(json.dumps(info))
    with caplog.at_level(logging.WARNING, logger="index.formats"):
        opened = Gallery.open(g.root)
    assert opened.index_config.ivfpq_nprobe is None
    assert f'{g.layout.info} "index": ignored the key(s) this speciesid ({speciesid_version()}) does not know: ' \
           "'ivfpq_nprob' (did you mean 'ivfpq_nprobe'?)" in caplog.text


def _newer(path, fmt: int = 2) -> None:
    data = json.loads(path.read_text())
    data["format"] = fmt
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("record", ["gallery.json", "probe.json"])
def test_a_higher_format_is_refused_before_anything_is_done(tmp_path, capsys, record):
    """A format is bumped only for a change an older reader would misread: such a file is refused, naming the
    upgrade, by every command before it writes (the walk's old add committed its rows, then crashed)."""
    index = _gallery(tmp_path, capsys)
    rows = len(Gallery.open(index))
    _newer(index / record)
    for argv in (("index", "info"), ("identify", *ENCODER, tmp_path / "photos" / SPECIES[0] / "0.png"),
                 ("references", "add", "--species", "Naja haje", *ENCODER, _photo(tmp_path / "n" / "0.png", 501)),
                 ("probe", "train")):
        code, out, err = _run(capsys, *argv, "--index", index)
        said = rf"{re.escape(str(index / record))} was written by a newer speciesid \(format 2\): upgrade speciesid "
        assert code != 0 and re.search(said + r"\(this is .*, which reads format 1\)", err), (argv, out, err)
    _newer(index / record, 1)
    assert len(Gallery.open(index)) == rows == 12  # the add wrote nothing


def test_a_running_server_refuses_writes_once_gallery_json_is_rewritten_at_a_higher_format(tmp_path, capsys):
    """Re-read w2 #3: a server that met a newer gallery.json on its look only logged it and kept adding (201, 6 -> 7
    rows) while the CLI refused. Now its writes answer 409 naming the upgrade, identify answers on, and /readyz is
    degraded saying so; a gallery.json that reads again (format 1) lifts it."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import Settings

    index = folder_gallery(tmp_path, capsys, SPECIES[:2], 6)
    app = create_app(Settings(index=str(index), api_keys="k", precision="fp32", refresh_s=0))
    photo = _photo(tmp_path / "n" / "0.png", 77, 64).read_bytes()
    add = {"headers": {"X-API-Key": "k"}, "files": [("images", ("a.png", photo, "image/png"))]}
    with TestClient(app) as client:
        _newer(index / "gallery.json")
        ident = client.post("/v1/identify", files=[("images", ("q.png", photo, "image/png"))])
        assert ident.status_code == 200, ident.text
        answer = client.post("/v1/species/Natrix maura/references", **add)
        said = "gallery.json was written by a newer speciesid (format 2): upgrade speciesid"
        assert answer.status_code == 409 and said in answer.json()["detail"], answer.text
        assert "nothing was written" in answer.json()["detail"]
        ready = client.get("/readyz").json()
        assert ready["status"] == "degraded" and said in ready["warning"] and "409" in ready["warning"], ready
        _newer(index / "gallery.json", 1)
        assert client.get("/readyz").json()["status"] == "ready"
        answer = client.post("/v1/species/Natrix maura/references", **add)
        assert answer.status_code == 201, answer.text
    assert len(Gallery.open(index)) == 7  # the refused add wrote nothing; the one after it, its photo


def test_a_newer_probe_kept_for_restore_or_shared_is_not_taken(tmp_path, capsys):
    """``probe restore`` of a probe.prev.json a newer speciesid wrote would lock this version out of the folder:
    refused, naming the upgrade. The shared probe's take: test_probe_share_layout (moto's S3)."""
    index = _gallery(tmp_path, capsys)
    code, _, err = _run(capsys, "probe", "train", "--index", index, "-q")  # the first probe kept as probe.prev.*
    assert code == 0, err
    _newer(index / "probe.prev.json")
    code, out, err = _run(capsys, "probe", "restore", "--index", index)
    assert code != 0 and "probe.prev.json was written by a newer speciesid (format 2): upgrade speciesid" in err, (
        out, err)
    assert json.loads((index / "probe.json").read_text())["format"] == 1


def test_gallery_json_and_probe_json_record_the_version_that_wrote_them(tmp_path, capsys):
    """Walk (upgrade) #6: nothing recorded which version wrote a folder's files."""
    index = _gallery(tmp_path, capsys)
    version = speciesid_version()
    assert json.loads((index / "gallery.json").read_text())["written_by"] == version
    assert json.loads((index / "probe.json").read_text())["written_by"] == version
    code, out, err = _run(capsys, "index", "info", "--index", index)
    info = json.loads(out)
    assert code == 0 and info["written_by"] == version and info["probe"]["written_by"] == version, err
    data = json.loads((index / "gallery.json").read_text())
    data["written_by"] = "0.0.1"
    (index / "gallery.json").write_text(json.dumps(data))
    Gallery.open(index).update_info("checklist", lambda _: "moroccan")  # a write of gallery.json (index build's)
    assert json.loads((index / "gallery.json").read_text())["written_by"] == version


def test_the_version_is_the_codes_own_and_the_one_pyproject_toml_gives(monkeypatch):
    """Re-read w2 #5: the version came from the installed package's metadata, so the project's editable .venv,
    installed at 0.1.0, wrote "written_by": "0.1.0" from the 0.2.0 code. Now the code holds its version and
    pyproject.toml reads it from there: what was installed does not change it."""
    import importlib
    import importlib.metadata
    from pathlib import Path

    import tomllib

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.1.0")  # an install made at an older version
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    module, _, name = project["tool"]["setuptools"]["dynamic"]["version"]["attr"].rpartition(".")
    given = getattr(importlib.import_module(module), name)
    assert re.fullmatch(r"\d+\.\d+\.\d+", given) and speciesid_version() == given != "0.1.0"


def _drop_embedded_by(index) -> None:
    """The gallery.json of a speciesid before embedded_by (the walk's 130e2dd gallery)."""
    data = json.loads((index / "gallery.json").read_text())
    del data["embedded_by"]
    (index / "gallery.json").write_text(json.dumps(data))


def test_a_gallery_made_before_embedded_by_says_its_runtime_is_not_recorded(tmp_path, capsys):
    """Walk (upgrade) #5: answers on the first commit's gallery moved by up to 0.0126 after the upgrade (OpenVINO
    bf16 against its PyTorch fp32) and nothing said so: the gallery records no embedded_by, shown as []."""
    index = folder_gallery(tmp_path, capsys, SPECIES[:2], 4)
    _drop_embedded_by(index)
    code, out, err = _run(capsys, "index", "info", "--index", index)
    info = json.loads(out)
    assert code == 0 and info["embedded_by"] == [], err
    assert info["embedded_note"].startswith(
        "the gallery does not record the runtime and precision that embedded its references (it was made by an "
        "earlier speciesid, which did not record them): similarities differ slightly")
    # what a speciesid before runtimes chose (re-read w2 #6: the note said fp32 unless a transformer, but on a GPU
    # its auto chose bf16 for every encoder, CNNs included)
    assert ("--runtime torch and the precision its auto chose: on a GPU --precision bf16 for any encoder, fp16 on a "
            "GPU without bf16; on a CPU --precision bf16 for an open_clip encoder such as BioCLIP where the CPU has "
            "native bf16, else fp32, timm models included") in info["embedded_note"], info["embedded_note"]
    code, out, err = _run(capsys, "identify", "--index", index, *ENCODER, tmp_path / "photos" / SPECIES[0] / "0.png")
    assert code == 0 and (out + err).count("the gallery does not record the runtime and precision") == 1, (out, err)
    assert "these photos are embedded with torch fp32" in out + err


def test_an_add_to_a_gallery_made_before_embedded_by_does_not_claim_its_runtime_for_the_earlier_references(
        tmp_path, capsys):
    """Walk (upgrade) #7: after an add of 4 photos to the 130e2dd gallery, embedded_by named only the add's
    OpenVINO bf16, although 30 of its 34 references were embedded with PyTorch fp32."""
    index = folder_gallery(tmp_path, capsys, SPECIES[:2], 4)
    _drop_embedded_by(index)
    code, _, err = _run(capsys, "references", "add", "--index", index, "--species", "Naja haje", *ENCODER, "-q",
                        _photo(tmp_path / "new" / "0.png", 500))
    assert code == 0, err
    entries = json.loads((index / "gallery.json").read_text())["embedded_by"]
    assert [(e["runtime"], e["precision"], e.get("references"), e["by"]) for e in entries] == [
        ("unknown", "unknown", 4, ["an earlier speciesid or a build on Ray"]),
        ("torch", "fp32", None, ["references add"])], entries
    code, out, err = _run(capsys, "identify", "--index", index, *ENCODER, tmp_path / "photos" / SPECIES[0] / "0.png")
    assert code == 0, err
    assert ("the gallery's references were embedded with a runtime and precision not recorded (4 references, an "
            "earlier speciesid or a build on Ray) and torch fp32 (references add), these photos with torch fp32"
            in out + err), (out, err)
    code, out, _ = _run(capsys, "index", "info", "--index", index)
    assert "embedded_note" not in json.loads(out)  # the entries say it


def test_a_new_gallery_says_nothing_of_an_unrecorded_runtime(tmp_path, capsys):
    """A gallery made now records embedded_by from the start ([] until its first write): no note."""
    from _cli_support import ENC

    Gallery.create(tmp_path / "empty", ENC)
    assert json.loads((tmp_path / "empty" / "gallery.json").read_text())["embedded_by"] == []
    index = folder_gallery(tmp_path, capsys, SPECIES[:2], 4)
    code, out, err = _run(capsys, "identify", "--index", index, *ENCODER, tmp_path / "photos" / SPECIES[0] / "0.png")
    assert code == 0 and "not recorded" not in out + err and "does not record" not in out + err, (out, err)


def test_a_built_gallery_folder_holds_no_file_layout_py_does_not_name(tmp_path, capsys):
    """Walk (upgrade) #9: far_threshold.json was in every gallery folder, but index/layout.py, which says it names
    every file of it, did not name it."""
    index = _gallery(tmp_path, capsys)
    names = {v for k, v in vars(layout_module).items() if k.isupper() and isinstance(v, str)}
    doc = layout_module.__doc__

    def named(name: str) -> bool:
        if name in names or name.removesuffix(".json") == layout_module.VECTORS_FILE:  # vectors.faiss(.json)
            return True
        if name.startswith(layout_module.JOURNAL_PREFIX) and name.endswith(layout_module.JOURNAL_SUFFIX):
            return True
        return name.startswith("vectors-") and name.partition(".")[2] in layout_module.VECTORS_PARTS

    found = sorted(p.name for p in index.iterdir())
    assert "far_threshold.json" in found, found
    assert [n for n in found if not named(n)] == [], found
    assert [n for n in found if n in names and n not in doc] == []  # and its docstring lists each
