"""What the CLI says and returns for inputs a new user gets wrong: a build that adds nothing, names the API could
not address, options named in errors, an encoder a gallery refuses before it loads, near-duplicate species names.

Galleries here use the tiny random ``timm:test_vit@random`` encoder on random photos: fast, no shared assets.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _cli_support import ENCODER, _photo, _run, two_species_gallery
from PIL import Image


@pytest.fixture
def built(tmp_path, capsys) -> tuple[Path, Path]:
    """(gallery, its photo folder): 6 random photos of two species."""
    return two_species_gallery(tmp_path, capsys)


def test_a_build_into_a_gallery_that_adds_nothing_but_skips_photos_fails(built, tmp_path, capsys):
    """README: exit status 1 when an index build could add nothing; a re-run finding every photo stored is 0."""
    index, root = built
    bad = tmp_path / "bad" / "Naja haje"
    bad.mkdir(parents=True)
    (bad / "fake.jpg").write_text("not a photo")
    (bad / "empty.jpg").write_bytes(b"")
    _photo(bad / "tiny.png", 7, side=8)  # read, but refused: counted as what it is (walkthrough s48 #8)
    code, out, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", bad.parent, "--index", index,
                          *ENCODER, "-q")
    assert code == 1 and "added 0, skipped 2 unreadable, 1 too small" in out, (out, err)
    assert (f"nothing was added to gallery {index} from {bad.parent}: 3 photo(s) skipped (2 unreadable, 1 too small)"
            in err), err
    # a re-run whose photos are all stored already had nothing to add, nothing failed: 0, with or without an
    # unreadable photo beside them (reported again; a dataset's one bad file must not fail every later re-run)
    for broken in (False, True):
        if broken:
            (root / "Natrix maura" / "broken.jpg").write_text("not a photo")
        code, out, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", index,
                              *ENCODER, "-q")
        # walkthrough s48 #13: photos stored by the earlier run are "already in the gallery", not "duplicates" (the
        # word for two copies within one run)
        assert code == 0 and f"added 0, skipped {int(broken)} unreadable, 6 already in the gallery, in " in out, out
        assert "duplicate" not in out and "already in the gallery: " in out, out
        assert "error" not in err, err


def test_photos_read_but_refused_are_counted_under_their_reason_not_as_unreadable(built, tmp_path, capsys, caplog):
    """Walkthrough s48 #8: a strip of 20x600 pixels was read fine but counted as "unreadable" by references add and
    as "could not be read" by identify; each refusal is counted under its reason."""
    import logging

    index, _ = built
    good, tiny = _photo(tmp_path / "good.png", 40), _photo(tmp_path / "tiny.png", 41, side=20)
    strip = tmp_path / "strip.png"
    Image.new("RGB", (20, 600), (90, 90, 90)).save(strip)
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a photo")
    code, out, _ = _run(capsys, "references", "add", "--index", index, "--species", "Natrix maura", good, tiny, strip,
                        notes, *ENCODER)
    assert code == 1 and "added 1, skipped 1 unreadable, 1 too small, 1 too elongated, 0 duplicates, in " in out, out
    assert f"skipped {notes}: not a photo: its content is not JPEG, PNG, WebP" in out, out  # #9: no "send a"
    caplog.set_level(logging.WARNING, logger="speciesid")
    code, out, _ = _run(capsys, "identify", "--index", index, strip, notes, good, tmp_path / "gone.jpg", *ENCODER)
    said = [r.getMessage() for r in caplog.records if r.name == "speciesid"]
    assert code == 1 and said == ["3 of 4 photos not answered: 1 unreadable, 1 too elongated, 1 not found or holding "
                                  "no photo"], said


def test_entries_skipped_inside_a_folder_argument_are_not_read_not_missing_arguments(built, tmp_path, capsys, caplog):
    """Review s48 #9: a broken link inside a folder argument is not an argument "not found or holding no photo",
    nor one of the photos: identify and references add count it apart, as an entry not read."""
    import logging

    index, _ = built
    folder = tmp_path / "shots"
    good = _photo(folder / "good.png", 40)
    (folder / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")  # a broken link inside the folder
    caplog.set_level(logging.WARNING, logger="speciesid")
    code, out, _ = _run(capsys, "identify", "--index", index, folder, tmp_path / "missing.jpg", *ENCODER)
    said = [r.getMessage() for r in caplog.records if r.name == "speciesid"]
    assert code == 1 and said == ["1 of 2 photos not answered: 1 not found or holding no photo; 1 entry inside the "
                                  "folders given not read (a broken link, a sub-folder that cannot be listed, or a "
                                  "file that cannot be read)"], said
    assert str(good) in out and str(folder / "gone.jpg") in out, out  # every input is in the output
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Natrix maura", folder,
                          tmp_path / "missing.jpg", *ENCODER, "-q")
    assert code == 1 and "; 1 argument(s) not found or holding no photo (named above); 1 entry inside the folders " \
        "not read (named above)" in out, (out, err)


def test_a_build_reports_photos_already_in_the_gallery_apart_from_repeats_within_the_run():
    """Walkthrough s48 #13: a duplicate of a stored photo ("id N") is "already in the gallery"; only a repeat within
    the run (its first copy's path) is a "duplicate"; refusals are counted by reason (#8)."""
    from retrieval.pipeline import BuildReport

    report = BuildReport(added=2, seconds=1.0, skipped=[
        ("a.jpg", "the image is truncated or corrupt (broken data stream)"),
        ("b.png", "20x20 pixels is too small for a reference photo (at least 32 px on the short side)"),
        ("c.png", "20x600 pixels is too elongated (over 25:1) to be a photo"),
        ("d.png", "20000x20000 pixels is over the limit of 256,000,000 (possible decompression bomb)"),
    ], duplicates=[("x/1.jpg", "id 7"), ("x/2.jpg", "x/1b.jpg"), ("x/3.jpg", "id 12")], duplicate_ids=[7, 3, 12])
    lines = report.summary().split("\n")
    assert lines[0].startswith("added 2, skipped 1 unreadable, 1 too small, 1 too elongated, 1 over the pixel limit, "
                               "1 duplicates within this run, 2 already in the gallery, in 1.0 s"), lines[0]
    assert lines[-3:] == ["  duplicate x/2.jpg (same bytes as x/1b.jpg)",
                          "  already in the gallery: x/1.jpg (same bytes as reference 7)",
                          "  already in the gallery: x/3.jpg (same bytes as reference 12)"], lines
    assert report.already_stored == [("x/1.jpg", "id 7"), ("x/3.jpg", "id 12")]
    assert report.repeats == [("x/2.jpg", "x/1b.jpg")] and len(report.duplicates) == 3  # the field as it was
    assert BuildReport(added=3).summary().startswith("added 3, skipped 0 unreadable, 0 duplicates, in ")

@pytest.mark.parametrize(("what", "example"), [("species name", "'Naja haje'"), ("genus", "'Naja'"),
                                               ("family", "'Elapidae'"), ("common name", "'Egyptian cobra'")])
def test_an_empty_name_gets_an_example_of_its_own_kind(what, example):
    from index.taxonomy import InvalidNameError, check_name

    for bad, why in (("", "is empty"), (" - ", "has no letters or digits")):
        with pytest.raises(InvalidNameError) as exc:
            check_name(bad, what)
        assert why in str(exc.value) and str(exc.value).endswith(f"give e.g. {example}"), exc.value


def test_references_add_with_an_empty_common_name_suggests_a_common_name(built, tmp_path, capsys):
    index, _ = built
    photo = _photo(tmp_path / "new.png", 99)
    for option, example in (("--common-name", "'Egyptian cobra'"), ("--genus", "'Naja'"),
                            ("--family", "'Elapidae'")):
        code, _, err = _run(capsys, "references", "add", "--index", index, "--species", "Naja haje", option, " ",
                            photo, *ENCODER)
        assert code == 2 and f"is empty; give e.g. {example}" in err, err


def test_a_species_name_the_api_could_not_address_is_refused_by_the_cli_with_the_apis_message(built, tmp_path,
                                                                                             capsys):
    """One naming rule (index.taxonomy.check_name): the CLI no longer creates 'Naja/haje', which the API's
    /v1/species/{name} could neither show nor add to; the API's 422 is the same rule's message."""
    from index.gallery import Gallery
    from index.taxonomy import InvalidNameError, check_name

    index, _ = built
    photo = _photo(tmp_path / "new.png", 99)
    code, _, err = _run(capsys, "references", "add", "--index", index, "--species", "Naja/haje", photo, *ENCODER)
    message = "the species name 'Naja/haje' cannot contain '/' (the HTTP API could not address it); give e.g. 'Naja haje'"
    assert code == 2 and message in err, err
    assert "Naja/haje" not in {s.species for s in Gallery.open(index).species()}
    for what in ("genus", "family"):
        with pytest.raises(InvalidNameError, match="cannot contain '/'"):
            check_name("Naja/Boaedon", what)
    assert check_name("Cobra / asp", "common name") == "Cobra / asp"  # a common name is never a URL part

    from api.routers.species import _slashed

    assert _slashed("Naja/haje").status_code == 422 and _slashed("Naja/haje").detail == message


def test_the_readme_references_add_example_takes_photos_of_every_format(tmp_path):
    """README's example, run as a shell would (its glob expanded), adds .jpeg and .png photos too, not only .jpg."""
    import glob
    import shlex

    from conftest import REPO

    from index.photos import expand_photo_args

    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    (command,) = [line for line in text.splitlines() if " references add " in line and "new_photos" in line]
    words = shlex.split(command, comments=True)
    photos_arg = next(w for w in words if "new_photos" in w)
    for i, ext in enumerate(("jpg", "jpeg", "png", "JPG")):
        _photo(tmp_path / "new_photos" / f"{i}.{ext}", i)
    expanded = sorted(glob.glob(str(tmp_path / photos_arg))) or [str(tmp_path / photos_arg)]
    assert len(expand_photo_args(expanded).photos) == 4, (photos_arg, expanded)


def test_a_bad_val_root_is_named_as_the_option_given(built, tmp_path, capsys):
    """probe train has no --root: its --val-root errors name --val-root (and finetune's too)."""
    from finetune.config import FinetuneConfig
    from finetune.data import split_photos

    index, root = built
    code, _, err = _run(capsys, "probe", "train", "--index", index, "--val-root", tmp_path / "nowhere", *ENCODER[2:])
    assert code == 2 and "does not exist (set the image folder with --val-root)" in err, err
    split = tmp_path / "splits"
    _photo(split / "train" / "Naja haje" / "a.png", 1)
    code, _, err = _run(capsys, "probe", "train", "--index", index, "--val-root", split)
    assert code == 2 and f"give one split as the root, e.g. --val-dataset folder --val-root {split / 'train'}" in err
    assert " --root" not in err and " --dataset" not in err, err
    with pytest.raises(ValueError, match=r"is not a folder \(set the image folder with --val-root\)"):
        split_photos(FinetuneConfig(root=str(root), out=str(tmp_path / "out"), val_root=str(split / "train" /
                                                                                              "Naja haje" / "a.png")))
    # a command whose option is --root still says --root
    code, _, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", split, "--index", index, *ENCODER)
    assert code == 2 and "e.g. --dataset folder --root" in err, err


def test_another_encoder_is_refused_before_it_is_loaded(built, tmp_path, capsys, monkeypatch):
    """README: a gallery queried with another encoder is refused naming the right one; build_encoder: an encoder the
    gallery would refuse costs no download. Spec, pool, views and weights are compared before any loading."""
    import retrieval.runtimes.select as select

    index, root = built
    photo = _photo(tmp_path / "q.png", 7)
    loaded = []
    real_open = select.open_encoder
    monkeypatch.setattr(select, "open_encoder", lambda config, **kw: loaded.append(config) or real_open(config, **kw))
    fix = "use --encoder timm:test_vit@random or build a new index in another directory"
    for argv in (["identify", "--index", index, photo, "--encoder", "bioclip"],
                 ["search", "--index", index, photo, "--encoder", "timm:test_vit"],  # pretrained, not @random
                 ["references", "add", "--index", index, "--species", "Naja haje", photo, "--encoder", "bioclip-2"],
                 ["index", "build", "--dataset", "folder", "--root", root, "--index", index, "--encoder", "bioclip"]):
        code, _, err = _run(capsys, *argv)
        assert code == 2 and f"gallery {index} was built with encoder 'timm:test_vit@random', not with the encoder " \
            f"given ({argv[-1]}); {fix}" in err, err
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")  # never read: the gallery was built without weights
    code, _, err = _run(capsys, "identify", "--index", index, photo, "--encoder", "timm:test_vit@random",
                        "--weights", weights)
    assert code == 2 and f"not with the encoder given (timm:test_vit@random with weights {weights})" in err, err
    for argv in (["identify", "--index", index, photo, "--pool", "gem3"],
                 ["index", "build", "--dataset", "folder", "--root", root, "--index", index, "--views", "flip"]):
        code, _, err = _run(capsys, *argv)
        assert code == 2 and "not with the options given" in err and "--pool model --views single" in err, err
    assert loaded == []
    code, out, err = _run(capsys, "identify", "--index", index, photo, "-q")  # its own encoder: loads and answers
    assert code == 0 and len(loaded) == 1, err


def test_a_copy_of_the_gallerys_model_folder_is_still_accepted(tiny_clip_dir, tmp_path, capsys):
    """The same weights in another folder (a gallery moved to another machine) are not refused by the spec check:
    the fingerprint decides after loading (nothing to download)."""
    import shutil

    root = tmp_path / "photos"
    for i in range(4):
        _photo(root / ("Naja haje" if i % 2 else "Natrix maura") / f"{i}.png", i)
    index = tmp_path / "g"
    spec = f"open_clip:local-dir:{tiny_clip_dir}"
    assert _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", index, "--encoder", spec,
                "--precision", "fp32", "-q")[0] == 0
    copy = shutil.copytree(tiny_clip_dir, tmp_path / "moved")
    code, _, err = _run(capsys, "identify", "--index", index, root / "Naja haje" / "1.png", "--encoder",
                        f"local-dir:{copy}", "--precision", "fp32", "-q")
    assert code == 0, err


def test_a_new_species_that_looks_like_a_gallery_species_needs_confirming(built, tmp_path, capsys):
    """A one-letter typo of a gallery species, or its common name typed as the species, is refused naming that
    species and its reference count (not only a taxonomy warning); --new-species confirms a new one, which gets
    its family from its genus. Missing and too-small photos are counted apart from unreadable ones."""
    from index.gallery import Gallery

    index, _ = built
    photo = _photo(tmp_path / "new.png", 99)
    before = {s.species: s.count for s in Gallery.open(index).species()}
    code, _, err = _run(capsys, "references", "add", "--index", index, "--species", "Naja samarensiss", photo,
                        *ENCODER)
    assert code == 2 and ("'Naja samarensiss' is not in the gallery, but 'Naja samarensis' (3 references) is: give "
                          "--species 'Naja samarensis' to add to it, or give --new-species if 'Naja samarensiss' is a "
                          "new species\n") in err and "new_species=true" not in err, err
    code, _, err = _run(capsys, "references", "add", "--index", index, "--species", "samar cobra", photo, *ENCODER)
    assert code == 2 and "'samar cobra' is the common name of 'Naja samarensis' (3 references)" in err, err
    assert {s.species: s.count for s in Gallery.open(index).species()} == before  # nothing added
    tiny = _photo(tmp_path / "tiny.png", 5, side=20)
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Naja samarensiss",
                          "--new-species", photo, tiny, tmp_path / "missing.jpg", *ENCODER)
    assert code == 1 and "Naja samarensiss (new species): added 1, skipped 0 unreadable, 1 too small, " \
        "0 duplicates" in out and "; 1 argument(s) not found or holding no photo (named above)" in out, out
    (new,) = [s for s in Gallery.open(index).species() if s.species == "Naja samarensiss"]
    assert (new.genus, new.family, new.count) == ("Naja", "Elapidae", 1)
    # a species the taxonomy knows is added as before (only names it does not know are checked for a lookalike)
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Natrix natrix",
                          _photo(tmp_path / "n.png", 103), *ENCODER)
    assert code == 0 and "Natrix natrix (new species)" in out, (out, err)


def test_the_api_refuses_a_lookalike_new_species_in_its_own_words_unless_confirmed(built, tmp_path):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import Settings

    index, _ = built
    data = _photo(tmp_path / "new.png", 99).read_bytes()
    keys = {"X-API-Key": "k"}
    with TestClient(create_app(Settings(index=str(index), api_keys="k", precision="fp32", runtime="torch"))) as c:
        url = "/v1/species/Naja samarensiss/references"
        resp = c.post(url, files=[("images", ("a.png", data, "image/png"))], headers=keys)
        assert resp.status_code == 409 and resp.json()["detail"] == (
            "'Naja samarensiss' is not in the gallery, but 'Naja samarensis' (3 references) is: send the photos to "
            "POST /v1/species/Naja_samarensis/references to add them to 'Naja samarensis', or send the form field "
            "new_species=true to create 'Naja samarensiss' as a new species"), resp.text  # no CLI option named
        assert not list((index / "uploads").glob("*"))  # the refused upload is not kept
        resp = c.post(url, files=[("images", ("a.png", data, "image/png"))], data={"new_species": "true"},
                      headers=keys)
        assert resp.status_code == 201 and resp.json()["created"] is True, resp.text
        assert c.get("/v1/species/Naja samarensiss").json()["family"] == "Elapidae"


def test_the_command_line_reads_photos_under_the_servers_pixel_limit(built, tmp_path, capsys, monkeypatch):
    """Walk s57 #4: the command line decoded up to 256 MP a photo (~1 GB a decode thread, from a file of a few
    hundred KB) with no knob. It reads SPECIESID_MAX_PIXELS, the server's setting, with its default (50,000,000): a
    photo over it is skipped with the reason and what to do, the others go on; a bad value stops it at once."""
    from _api_support import png_bomb

    index, _ = built
    folder = tmp_path / "new"
    _photo(folder / "small.png", 21)  # 48 x 48: 2,304 pixels
    _photo(folder / "big.png", 22, side=100)  # 10,000 pixels
    (folder / "bomb.png").write_bytes(png_bomb(7_000, 7_000))  # 61 MP counted (greyscale 1.25x): over the default
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Natrix maura", folder,
                          *ENCODER, "-q")
    assert code == 1 and "): added 2, skipped 0 unreadable, 1 over the pixel limit, " in out, (out, err)
    assert (f"  skipped {folder / 'bomb.png'}: 7000x7000 pixels of 8-bit greyscale, which cost 1.25x the memory of "
            "8-bit colour ones to decode, is over the limit of 40,000,000 for such a photo (possible decompression "
            "bomb): save it at most 6324 px on its long side, or set SPECIESID_MAX_PIXELS=61250000 (or more) to "
            "read it as it is") in out.splitlines(), out
    monkeypatch.setenv("SPECIESID_MAX_PIXELS", "5000")
    (folder / "bomb.png").unlink()
    _photo(folder / "other.png", 23)
    code, out, err = _run(capsys, "identify", "--index", index, folder / "big.png", folder / "other.png",
                          "--format", "json", "-q")
    answers = {Path(a["image"]).name: a for a in json.loads(out)}
    assert code == 1 and answers["other.png"]["predictions"], (out, err)  # the other photo is answered
    assert answers["big.png"]["error"] == (
        "100x100 pixels is over the limit of 5,000 (possible decompression bomb): save it at most 70 px on its long "
        "side, or set SPECIESID_MAX_PIXELS=10000 (or more) to read it as it is"), out
    monkeypatch.setenv("SPECIESID_MAX_PIXELS", "lots")
    code, out, err = _run(capsys, "identify", "--index", index, folder / "other.png", "-q")
    assert code == 2 and err == ("speciesid: error: SPECIESID_MAX_PIXELS=lots is not a whole number of pixels from 1 "
                                 "to 256,000,000: set the most pixels one photo may decode to (default 50000000), or "
                                 "unset it\n"), (code, err)


def test_a_link_and_its_file_in_one_folder_store_the_file_and_call_the_link_a_link(built, tmp_path, capsys):
    """Walk s57 #11: 'link.jpg -> upright.jpg' in one folder stored the link (first by name) and called the real
    file the duplicate: removing the link later lost the reference's photo. The file is stored; the link is the
    duplicate, said to be a link to it."""
    from index.gallery import Gallery

    index, _ = built
    folder = tmp_path / "linked"
    real = _photo(folder / "upright.png", 31)
    (folder / "a_link.png").symlink_to(real.name)  # sorts before its target
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Natrix maura", folder,
                          *ENCODER, "-q")
    assert code == 0 and f"  duplicate {folder / 'a_link.png'} (a link to {real})" in out.splitlines(), (out, err)
    ids = [int(n) for n in out.split("ids: ")[1].split("\n")[0].split("-")]
    assert len(ids) == 1 and Gallery.open(index).source_path(ids[0]) == str(real), out
