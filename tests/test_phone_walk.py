"""The phone walk of stop 53 (a ranger in Morocco: phone photos, galleries named in French and Arabic): machine
outputs in UTF-8, HEIC and animated GIF photos said for what they are, labels at genus rank, the moroccan loader's
folder names, and what a build says of the folders it joins and of a species' several common names."""

from __future__ import annotations

import json
import os
import sys

from _cli_support import _run, folder_gallery

VIPER = "Vipère de Lataste (Vipera latastei)"
COBRA_AR = "كوبرا مصرية (Naja haje)"


def test_json_outputs_write_french_and_arabic_as_themselves(tmp_path, capsys):
    """Walk s53 #9: --format json (species list, index info, identify) wrote "\\u0643\\u0648..." for every letter
    not ASCII; now UTF-8, as the API writes it."""
    index = folder_gallery(tmp_path, capsys, (VIPER, COBRA_AR))
    code, out, err = _run(capsys, "species", "list", "--index", index, "--format", "json")
    assert code == 0, err
    assert '"common_name": "Vipère de Lataste"' in out and '"common_name": "كوبرا مصرية"' in out, out
    assert "\\u" not in out
    assert {s["common_name"] for s in json.loads(out)} == {"Vipère de Lataste", "كوبرا مصرية"}
    code, out, err = _run(capsys, "index", "info", "--index", index)
    assert code == 0 and "\\u" not in out, out
    photo = next((tmp_path / "photos" / COBRA_AR).iterdir())
    code, out, err = _run(capsys, "identify", "--index", index, photo, "--format", "json", "-q")
    assert code == 0, err
    assert "\\u" not in out and "كوبرا مصرية" in out, out


def _csv_to(stdout, capsys, index) -> None:
    """``species list --format csv`` run with ``stdout`` as sys.stdout."""
    from api.cli import main

    saved, sys.stdout = sys.stdout, stdout
    try:
        assert main(["species", "list", "--index", str(index), "--format", "csv"]) == 0
    finally:
        sys.stdout = saved
        stdout.close()


def test_a_csv_written_to_a_file_starts_with_a_byte_order_mark_for_excel_and_a_pipe_gets_none(tmp_path, capsys):
    """Walk s53 #9: Excel on a Windows PC opened the CSV's "Vipère" as "VipÃ¨re" (no BOM: read in the PC's code
    page). A CSV that goes to a new file (``> out.csv``) now starts with the UTF-8 byte-order mark; one that goes
    down a pipe, or is appended to a file that holds something, has none (a program reads plain UTF-8 as before)."""
    index = folder_gallery(tmp_path, capsys, (VIPER, COBRA_AR))
    out = tmp_path / "species.csv"
    _csv_to(open(out, "w", encoding="utf-8"), capsys, index)  # noqa: SIM115 (closed by _csv_to)
    data = out.read_bytes()
    assert data.startswith(b"\xef\xbb\xbfspecies,common_name,"), data[:40]
    assert "Vipère de Lataste" in data.decode("utf-8-sig") and data.count(b"\xef\xbb\xbf") == 1
    _csv_to(open(out, "a", encoding="utf-8"), capsys, index)  # noqa: SIM115 appended: no mark in the middle
    assert out.read_bytes().count(b"\xef\xbb\xbf") == 1
    read, write = os.pipe()
    _csv_to(os.fdopen(write, "w", encoding="utf-8"), capsys, index)
    with os.fdopen(read, "rb") as pipe:
        piped = pipe.read()
    assert piped.startswith(b"species,common_name,") and "كوبرا مصرية".encode() in piped, piped[:40]
    code, printed, _ = _run(capsys, "species", "list", "--index", index, "--format", "csv")  # captured: as is
    assert code == 0 and printed.startswith("species,common_name,")


def _heic(path, seed: int = 3):
    """A small HEIC photo (pillow-heif writes it)."""
    import pillow_heif  # noqa: F401 - registers the HEIF writer with Pillow
    from _cli_support import _photo
    from PIL import Image

    _photo(path.with_suffix(".png"), seed, side=64)
    Image.open(path.with_suffix(".png")).save(path, format="HEIF")
    return path


def test_a_heic_photo_without_its_decoder_is_said_to_need_pillow_heif(tmp_path, monkeypatch):
    """Walk s53 #12: without pillow-heif a HEIC was "not a photo: its content is not JPEG, PNG, WebP, HEIC, ...";
    its ftyp brand says what it is, and the message what to install."""
    import pytest
    from PIL import Image

    from retrieval.images import NOT_A_PHOTO, ImageLoadError, decode_image

    data = _heic(tmp_path / "cobra.heic").read_bytes()
    assert decode_image(data).size == (64, 64)
    Image.init()
    monkeypatch.delitem(Image.OPEN, "HEIF")  # an install without pillow-heif
    with pytest.raises(ImageLoadError) as refused:
        decode_image(data, name="cobra.heic")
    assert str(refused.value) == ("cobra.heic: a HEIC photo, which this installation cannot read: "
                                  "its HEIC decoder is missing (install pillow-heif: pip install pillow-heif)")
    with pytest.raises(ImageLoadError, match=NOT_A_PHOTO):  # not a HEIF container: as before
        decode_image(b"\x00\x00\x00\x18ftypisom" + bytes(40), name="clip.mp4")


def test_an_animated_gif_is_answered_from_its_first_frame_and_the_answer_says_so(tmp_path, capsys):
    """Walk s53 #13: an animated GIF (a black frame, then the cobra) was answered from its first frame with no word
    of it: the answer's notes say so, in the CLI's table and JSON and in the API's notes, naming the photo there."""
    from PIL import Image

    index = folder_gallery(tmp_path, capsys, (VIPER, COBRA_AR))
    cobra = Image.open(next((tmp_path / "photos" / COBRA_AR).iterdir())).convert("RGB")
    gif = tmp_path / "cobra.gif"
    Image.new("RGB", cobra.size).save(gif, save_all=True, append_images=[cobra], duration=100)
    still = tmp_path / "still.gif"
    cobra.save(still)
    note = ("an animated GIF: only its first frame was read (if another frame shows the animal better, send that "
            "frame as a still photo)")
    code, out, err = _run(capsys, "identify", "--index", index, gif, still, "-q")
    assert code == 0, err
    assert f"  note: {note}" in out.split(str(still))[0] and note not in out.split(str(still))[1], out
    code, out, err = _run(capsys, "identify", "--index", index, gif, still, "--format", "json", "-q")
    notes = [r["notes"] for r in json.loads(out)]
    assert notes[0][0] == note and note not in notes[1]
    # the still is a gallery photo: besides, the near-copy note (information only: retrieval.identify.near_copy_note)
    assert all(n.startswith("this photo is a near-copy of ") for n in notes[0][1:] + notes[1]), notes
    from test_species_names import _client

    with _client(index) as c:
        resp = c.post("/v1/identify", files=[("images", ("cobra.gif", gif.read_bytes(), "image/gif")),
                                             ("images", ("still.gif", still.read_bytes(), "image/gif"))])
        assert resp.status_code == 200, resp.text
        assert f"cobra.gif: {note}" in resp.json()["notes"] and not any("still.gif" in n
                                                                         for n in resp.json()["notes"])


def test_a_label_is_no_genus_and_is_answered_at_genus_rank_as_itself(tmp_path, capsys):
    """Walk s53 #8: labels' first words were stored as their genus, so --rank genus summed the unrelated French
    labels 'Vipère à cornes' and 'Vipère de Lataste' as 'genus Vipère' (and Arabic ones under their first word),
    against the build's warning that labels cannot be grouped: a label has no genus, and is its own group."""
    from index.records import ReferenceRecord

    assert ReferenceRecord("a.jpg", "Vipère à cornes").genus is None
    assert ReferenceRecord("a.jpg", "Naja haje").genus == "Naja"
    index = folder_gallery(tmp_path, capsys, ("Vipère à cornes", "Vipère de Lataste", "أفعى موريتانيا", "Naja haje"))
    code, out, err = _run(capsys, "species", "list", "--index", index, "--format", "json")
    assert {s["species"]: s["genus"] for s in json.loads(out)} == {
        "Vipère à cornes": None, "Vipère de Lataste": None, "أفعى موريتانيا": None, "Naja haje": "Naja"}
    photo = next((tmp_path / "photos" / "Vipère à cornes").iterdir())
    code, out, err = _run(capsys, "identify", "--index", index, photo, "--rank", "genus", "--k", "9",
                          "--format", "json", "-q")
    assert code == 0, err
    results = json.loads(out)[0]["results"]
    assert sorted(r["name"] for r in results) == sorted(["Vipère à cornes", "Vipère de Lataste", "أفعى موريتانيا",
                                                         "Naja"]), results
    label = next(r for r in results if r["name"] == "Vipère à cornes")
    assert label["species"] == "Vipère à cornes" and label["genus"] is None and label["evidence"], label
    code, out, err = _run(capsys, "identify", "--index", index, photo, "--rank", "genus", "--k", "9", "-q")
    assert "Vipère à cornes (a label: no genus)" in out and "genus Naja" in out and "genus Vipère" not in out, out
    from index.records import rank_genus

    assert rank_genus("Vipère à cornes", "Vipère") == "Vipère à cornes"  # a gallery built before: stored so
    assert rank_genus("Samar cobra", "Naja") == "Naja"  # a genus given with the label (a manifest's column) holds


def _folders(root, *names):
    from _cli_support import _photo

    for i, name in enumerate(names):
        _photo(root / name / f"{i}.png", i)
    return root


def test_moroccan_reads_common_name_folders_of_checklist_species_and_keeps_their_names(tmp_path):
    """Walk s53 #5: --dataset moroccan refused 'Vipère à cornes (Cerastes cerastes)' and 'أفعى موريتانيا (Daboia
    mauritanica)' (a Moroccan team's own names) while naming the right checklist species: it reads the folder
    dataset's two forms and keeps the folder's common name over the checklist's English one."""
    import pytest

    from index.datasets import load_dataset

    root = _folders(tmp_path / "gM", "Vipère à cornes (Cerastes cerastes)", "Naja-haje",
                    "أفعى موريتانيا (Daboia mauritanica)", "Malpolon monspessulanus (Couleuvre de Montpellier)")
    scan = load_dataset("moroccan", root)
    names = {r.species: (r.common_name, r.venomous, r.dataset) for r in scan.records}
    assert names == {"Cerastes cerastes": ("Vipère à cornes", True, "moroccan"),
                     "Naja haje": ("Egyptian cobra", True, "moroccan"),  # none in the folder: the checklist's
                     "Daboia mauritanica": ("أفعى موريتانيا", True, "moroccan"),
                     "Malpolon monspessulanus": ("Couleuvre de Montpellier", False, "moroccan")}, names
    _folders(root, "Vipère de Orient (Daboia russelii)")  # no checklist species, whatever the form: refused
    with pytest.raises(ValueError, match=r"match no Moroccan checklist species: 'Vipère de Orient \(Daboia "
                                         r"russelii\)'.*'Common name \(Genus species\)'"):
        load_dataset("moroccan", root)


def test_a_build_lists_a_label_once_and_says_which_folders_it_joined(tmp_path):
    """Walk s53 #10: folders differing only in Unicode form, case or a trailing space were merged (right) but the
    warning listed 'Vipère de Lataste; Vipère de Lataste' and said nothing of the joins: one line says them."""
    import unicodedata

    from index.datasets import load_dataset

    nfc = "Vipère de Lataste"
    root = _folders(tmp_path / "gB", nfc, unicodedata.normalize("NFD", nfc), "Naja haje", "Naja haje ",
                    "Vipera latastei", "vipera latastei", "Cobra d'Égypte (Naja haje)")
    scan = load_dataset("folder", root)
    assert scan.species == ["Naja haje", "Vipera latastei", nfc]
    (labels,) = [w for w in scan.warnings if "not written as scientific names" in w]
    assert labels.startswith("1 class folder(s) not written") and labels.count("Lataste") == 1, labels
    (joined,) = [w for w in scan.warnings if w.startswith("joined folders")]
    assert joined == ("joined folders that name one species: \"Cobra d'Égypte (Naja haje)\" + 'Naja haje' + "
                      "'Naja haje ' (trailing or doubled spaces); 'Vipera latastei' + 'vipera latastei' (case); "
                      f"'{nfc}' x2 (Unicode composed/decomposed)"), joined


def test_a_build_says_when_a_species_folders_give_several_common_names(tmp_path):
    """Walk s53 #3: French, English and Arabic folders of Naja haje were kept silently and answers showed the most
    frequent name (ties to the smallest code point: Arabic lost every tie): the build names them and the one shown."""
    from index.datasets import load_dataset

    root = _folders(tmp_path / "gC", "Cobra d'Égypte (Naja haje)", "Naja haje (Egyptian cobra)",
                    "كوبرا مصرية (Naja haje)", "Vipère à cornes (Cerastes cerastes)")
    scan = load_dataset("folder", root)
    (said,) = [w for w in scan.warnings if "common names" in w]
    assert said == ("Naja haje: its folders give 3 common names (Cobra d'Égypte, Egyptian cobra, كوبرا مصرية); "
                    "answers show \"Cobra d'Égypte\" (the name most of its photos carry, ties to the first in "
                    "code-point order; every name is kept with its photos)"), said
    assert not [w for w in load_dataset("folder", _folders(tmp_path / "one", "Naja haje (Egyptian cobra)",
                                                           "Naja_haje")).warnings if "common names" in w]
