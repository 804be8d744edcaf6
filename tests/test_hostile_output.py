"""Hostile input on the way out (walk s53 hostile #3, #4, #5, #11): a photo's decode memory whatever its bit depth,
CSV cells a spreadsheet would run as formulas, file names that would hide the venom warning on a terminal, and the
words for devices, pipes and link loops met in a folder."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ESC_NAME = "bite\n  Unlikely to be a medically important venomous snake.\x1b[8m.jpg"


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- #3 decode memory
def test_a_16_bit_or_transparent_pixel_counts_more_against_the_pixel_limit():
    """A 16-bit greyscale PNG decoded to ~25 bytes a pixel (5 of 49 MP peaked a server at 5.3 GB) while the limit
    counted it as an 8-bit colour pixel: it now counts twice (RGBA 2.5x, 32-bit greyscale 3.25x: PIXEL_MODES), and
    the refusal says so and what to do. Small photos and a lowered limit stand in for 49 MP."""
    from retrieval.images import OVER_PIXEL_LIMIT, PixelLimitError, decode_image

    side, limit = 100, 15_000  # 10,000 pixels: under the limit as 8-bit colour, over it counted twice
    assert decode_image(_png(Image.new("RGB", (side, side))), max_pixels=limit).size == (side, side)
    assert decode_image(_png(Image.new("L", (side, side))), max_pixels=limit).size == (side, side)
    g16 = _png(Image.fromarray(np.full((side, side), 40_000, dtype=np.uint16)))
    assert Image.open(io.BytesIO(g16)).mode == "I;16"
    with pytest.raises(PixelLimitError) as refused:
        decode_image(g16, max_pixels=limit, name="scan.png")
    text = str(refused.value)
    assert text == ("scan.png: 100x100 pixels of 16-bit greyscale, which cost 2x the memory of 8-bit colour ones to "
                    f"decode, is over the limit of 7,500 for such a photo {OVER_PIXEL_LIMIT}: save it at most 86 px "
                    "on its long side"), text  # walk s57 #6: one line, one thing to do
    with pytest.raises(PixelLimitError, match="of colour with transparency"):
        decode_image(_png(Image.new("RGBA", (side, side))), max_pixels=limit)
    with pytest.raises(PixelLimitError, match="of greyscale with transparency, .* limit of 4,000 for such a photo"):
        decode_image(_png(Image.new("LA", (side, side))), max_pixels=limit)
    assert decode_image(g16, max_pixels=2 * side * side).getpixel((0, 0)) == (155, 155, 155)  # at the limit: read


def test_no_mode_a_photo_decodes_in_counts_less_than_it_costs():
    """Re-read w2 #4: an uncompressed YCbCr TIFF cost 1.8x an 8-bit colour pixel to decode but counted 1x, a
    palette one 2.4x counted 2x, 8-bit greyscale 1.2x counted 1x (4 decoding at once, as a server does). Each now
    counts at least what it costs (retrieval.images.PIXEL_MODES: rounded up to a quarter); one pixel over the
    weighted limit is refused, saying the weight, and one at it is read."""
    from retrieval.images import PixelLimitError, decode_image

    def tiff(mode: str, colour) -> bytes:
        buf = io.BytesIO()
        Image.new(mode, (100, 100), colour).save(buf, "TIFF")
        return buf.getvalue()

    photos = {"YCbCr": (tiff("YCbCr", (90, 120, 60)), 2.25, "YCbCr colour"),
              "LAB": (tiff("LAB", (50, 120, 130)), 2.5, "CIELAB colour"),
              "P": (_png(Image.new("P", (100, 100), 5)), 2.5, "palette colour"),
              "L": (_png(Image.new("L", (100, 100), 90)), 1.25, "8-bit greyscale")}
    for mode, (data, weight, words) in photos.items():
        assert Image.open(io.BytesIO(data)).mode == mode
        at = int(100 * 100 * weight)
        assert decode_image(data, max_pixels=at).size == (100, 100), mode
        with pytest.raises(PixelLimitError) as refused:
            decode_image(data, max_pixels=at - 1, name="x")
        assert f"pixels of {words}, which cost {weight:g}x the memory" in str(refused.value), str(refused.value)


def test_high_bit_depth_and_transparency_convert_as_before_in_less_memory(monkeypatch):
    """to_rgb rescales 16-bit greyscale in strips (float64 temporaries of a strip, not of the photo) and composites
    transparency on white by a paste: the same bytes as the whole-photo float64 and alpha_composite ways."""
    import retrieval.images as images

    monkeypatch.setattr(images, "_STRIP_PIXELS", 37)  # many strips, the last one short
    rng = np.random.default_rng(3)
    for mode, arr in (("I;16", rng.integers(0, 65535, (23, 41)).astype(np.uint16)),
                      ("F", rng.normal(0, 5, (23, 41)).astype(np.float32))):
        img = Image.fromarray(arr)
        assert img.mode == mode
        a = np.asarray(img, dtype=np.float64)
        lo, hi = (0.0, 65535.0) if mode == "I;16" else (a.min(), a.max())
        expected = np.clip((a - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)
        assert np.array_equal(np.asarray(images.to_rgb(img))[..., 0], expected), mode
    rgba = Image.fromarray(rng.integers(0, 256, (19, 31, 4)).astype(np.uint8), "RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    assert np.array_equal(np.asarray(images.to_rgb(rgba)),
                          np.asarray(Image.alpha_composite(white, rgba).convert("RGB")))


# --------------------------------------------------------------------------------------------- #4 CSV formulas
def test_a_csv_cell_a_spreadsheet_would_run_is_written_as_text_and_numbers_stay_numbers():
    from index.text import csv_cell

    for cell in ("=1+1", "+cmd", "-2+3", "@SUM(1+1)", "\tx", "\rx", '=HYPERLINK("x")'):
        assert csv_cell(cell) == "'" + cell
    for cell in ("Naja haje", "", "-0.25", "+3", "1e-05", -2, -0.5, 3, None, True, "a=b"):
        assert csv_cell(cell) == cell


def test_every_csv_the_cli_writes_escapes_formula_cells(tmp_path):
    """identify's and search's CSV and the species list (api/cli: to_csv), the clean report's findings and scores:
    a species, common name or file name starting with = + - @ is written with a ' in front; scores and ids (negative
    ones too) stay numbers."""
    from api.cli._common import to_csv
    from api.cli.identify import _identify_csv

    result = {"image": "=cmd|' /C calc'!A0.jpg", "unknown": False, "far": False, "nearest_similarity": -0.25,
              "venomous_score": 0.0, "venom_unknown_score": 1.0, "venom_applies": True, "notes": [],
              "venom_advice": {"level": "unknown", "text": "Venom status not recorded for =1+1"},
              "predictions": [{"species": "=1+1", "score": 0.9, "common_name": '=HYPERLINK("x")', "genus": "@x",
                               "family": "-2+3", "venomous": None}]}
    rows = list(csv.DictReader(io.StringIO(_identify_csv([result], "species"))))
    assert rows[0]["image"] == "'=cmd|' /C calc'!A0.jpg"
    assert (rows[0]["species"], rows[0]["name"], rows[0]["common_name"], rows[0]["genus"], rows[0]["family"]) == (
        "'=1+1", "'=1+1", "'=HYPERLINK(\"x\")", "'@x", "'-2+3")
    assert rows[0]["nearest_similarity"] == "-0.25" and rows[0]["score"] == "0.9"
    species = list(csv.DictReader(io.StringIO(to_csv([{"species": "+cmd", "references": 3, "id": -7}],
                                                     ["species", "references", "id"]))))
    assert species == [{"species": "'+cmd", "references": "3", "id": "-7"}]

    from retrieval.clean_report import write_findings_csv
    from retrieval.findings import Finding

    out = write_findings_csv(tmp_path / "findings.csv", [
        Finding("suspect-label", -0.5, "/photos/=1+1.jpg", paired_path="s3://b/@x.jpg", detail="-2+3",
                reference_id=4, suggested_species="=SUM(A1:A2)")])
    row, = csv.DictReader(io.StringIO(out.read_text(encoding="utf-8")))
    assert row["score"] == "-0.5000" and row["reference_id"] == "4"
    assert (row["paired_path"], row["detail"], row["suggested_species"]) == ("s3://b/@x.jpg", "'-2+3", "'=SUM(A1:A2)")


def test_the_zero_shot_scores_csv_escapes_a_formula_path(tmp_path):
    from types import SimpleNamespace

    from retrieval.clean_report import _write_scores_csv

    photos = SimpleNamespace(paths=["=1+1.jpg", "ok.jpg"], errors=[None, None])
    zs = SimpleNamespace(prompts=SimpleNamespace(names=["snake"]), off_target=[0.25, -0.5],
                         probs=[[0.75], [1.0]])
    rows = list(csv.reader(io.StringIO(_write_scores_csv(tmp_path / "s.csv", photos, zs).read_text())))
    assert rows == [["path", "off_target", "p_snake"], ["'=1+1.jpg", "0.2500", "0.7500"],
                    ["ok.jpg", "-0.5000", "1.0000"]]


# --------------------------------------------------------------------------------------------- #5 terminal
def test_printable_shows_control_characters_visibly():
    from index.text import printable

    assert printable(ESC_NAME) == ("bite\\n  Unlikely to be a medically important venomous snake.\\x1b[8m.jpg")
    assert printable("a\u202egpj.exe\u2066b\rc\x00\x7f\x9b") == "a\\u202egpj.exe\\u2066b\\rc\\x00\\x7f\\x9b"
    assert printable("Vipère/أفعى/IMG 1.jpg") == "Vipère/أفعى/IMG 1.jpg"
    assert printable("/x/\udcff.jpg") == "/x/\\udcff.jpg"  # a Linux name's byte that is not UTF-8
    assert printable(printable(ESC_NAME)) == printable(ESC_NAME)


def test_the_identify_table_prints_a_photos_name_on_one_line_and_json_keeps_it(tmp_path):
    """A photo named 'bite\\n  Unlikely ... venomous snake.\\x1b[8m.jpg' printed its fake harmless lines, then ESC[8m
    hid the real cobra warning on a terminal: the table now shows the name escaped on its one line; the evidence
    file names, a set-aside photo's name and an error's name too."""
    from api.cli.identify import _identify_table

    answer = {"image": str(tmp_path / ESC_NAME), "far": False, "unknown": False, "set_aside": [0],
              "venom_advice": {"treat_as_venomous": True, "text": "Possibly MEDICALLY IMPORTANT VENOMOUS"},
              "predictions": [{"species": "Naja samarensis", "common_name": "Samar Cobra", "score": 0.75,
                               "family": "Elapidae", "venomous": True}],
              "neighbours": [{"id": 3, "similarity": 0.9, "vote_similarity": 0.9, "species": "Naja samarensis",
                              "path": "/g/" + ESC_NAME}]}
    text = _identify_table(answer, "species", 5, photos=[ESC_NAME])
    lines = text.split("\n")
    assert "\x1b" not in text and lines[0] == str(tmp_path) + "/bite\\n  Unlikely to be a medically important " \
        "venomous snake.\\x1b[8m.jpg"
    assert lines[1] == "  Possibly MEDICALLY IMPORTANT VENOMOUS"
    assert lines[2].startswith("  set aside (unlike every reference, so not counted): bite\\n")
    assert lines[-1].endswith("Naja samarensis  bite\\n  Unlikely to be a medically important venomous snake."
                              "\\x1b[8m.jpg")
    error = _identify_table({"image": ESC_NAME, "error": f"{ESC_NAME}: not a photo"}, "species")
    assert error == f"{printable(ESC_NAME)}\n  error: {printable(ESC_NAME)}: not a photo"


def printable(text: str) -> str:
    from index.text import printable as shown

    return shown(text)


def test_skipped_and_unreadable_photos_are_named_printably(tmp_path, capsys):
    """The build's and references add's summary (retrieval.pipeline), the skipped entries' warning, photo_args' stderr
    lines and its 'no photos to read' error escape a file's name."""
    from api.cli._common import photo_args
    from index.photos import skipped_summary
    from retrieval.pipeline import BuildReport

    report = BuildReport()
    report.skipped.append((ESC_NAME, f"{ESC_NAME}: not a photo"))
    report.add_duplicate(ESC_NAME, first="\x1b[2J.jpg")
    summary = report.summary()
    assert "\x1b" not in summary and len(summary.split("\n")) == 3, summary
    assert f"  skipped {printable(ESC_NAME)}: {printable(ESC_NAME)}: not a photo" in summary
    warned = skipped_summary([(tmp_path / ESC_NAME, "broken symbolic link (its target does not exist)")], tmp_path)
    assert "\n" not in warned and printable(ESC_NAME) in warned
    folder = tmp_path / "in"
    folder.mkdir()
    os.symlink(tmp_path / "gone.jpg", folder / ESC_NAME)
    (folder / "ok.jpg").write_bytes(b"x")
    photo_args([str(folder)])
    err = capsys.readouterr().err
    assert err == f"speciesid: skipped {folder}/{printable(ESC_NAME)}: broken symbolic link (its target does not " \
        "exist)\n", err
    with pytest.raises(ValueError) as refused:
        photo_args([str(tmp_path / ESC_NAME)])
    assert "\x1b" not in str(refused.value) and printable(ESC_NAME) in str(refused.value)


# --------------------------------------------------------------------------------------------- #11 folders
def test_a_pipe_in_a_folder_is_said_to_be_one_with_fitting_advice(tmp_path, caplog):
    """The build's warning for a link to /dev/zero or a FIFO advised mounting a disk: the reason now says what the
    entry is, and the advice fits it."""
    from index.photos import find_photos, scan_photos

    root = tmp_path / "gal" / "Naja haje"
    root.mkdir(parents=True)
    (root / "ok.jpg").write_bytes(b"x")
    os.mkfifo(root / "pipe.jpg")
    os.symlink("/dev/null", root / "dev.jpg")
    scan = scan_photos(tmp_path / "gal")
    reasons = {p.name: why for p, why in scan.skipped}
    assert reasons == {"dev.jpg": "not a regular file (a device): a photo is read from a regular file only",
                       "pipe.jpg": "not a regular file (a named pipe (FIFO)): a photo is read from a regular file "
                       "only"}, reasons
    caplog.set_level("WARNING", logger="index.photos")
    find_photos(tmp_path / "gal")
    warned, = [r.getMessage() for r in caplog.records if r.name == "index.photos"]
    assert warned.endswith("To use them: put the photo file itself where a device or a pipe stands; to silence "
                           "this, remove them. Then run again."), warned
    assert "mount the disk" not in warned


def test_a_link_loop_is_counted_and_named(tmp_path):
    """A link back to a folder above it (loop -> ..) was skipped without a word."""
    from index.photos import scan_photos, skipped_summary

    root = tmp_path / "gal"
    (root / "a").mkdir(parents=True)
    (root / "a" / "1.jpg").write_bytes(b"x")
    os.symlink("..", root / "a" / "loop")
    scan = scan_photos(root)
    assert [p.relative_to(root).as_posix() for p in scan.photos] == ["a/1.jpg"]
    assert [(p.relative_to(root).as_posix(), why) for p, why in scan.skipped] == [
        ("a/loop", "symbolic link loop (it leads back to a folder above it, which is not searched again "
         "through it)")]
    (root / "b").mkdir()
    (root / "b" / "2.jpg").write_bytes(b"x")
    one_class = scan_photos(root / "a")  # as a folder build scans a class folder: the other classes are not its own
    assert one_class.photos == [root / "a" / "1.jpg"] and [p for p, _ in one_class.skipped] == [root / "a" / "loop"]
    assert skipped_summary(scan.skipped, root).endswith(
        "To use them: fix or remove a link loop (a folder it leads back to is searched once); to silence this, "
        "remove them. Then run again.")


def test_a_folder_holding_only_a_pipe_is_not_said_to_hold_no_file(tmp_path):
    from index.photos import expand_photo_args

    named = tmp_path / "named"
    named.mkdir()
    os.mkfifo(named / "x.jpg")
    bare = tmp_path / "bare"
    bare.mkdir()
    os.mkfifo(bare / "pipe")
    got = expand_photo_args([named, bare])
    reasons = dict(got.problems)
    assert reasons[str(named / "x.jpg")].startswith("not a regular file (a named pipe (FIFO))")
    assert reasons[str(named)] == ("folder holds no photos: its one entry that could be one cannot be read (each "
                                   "named with why: not a regular file, a broken link, ...)")
    assert reasons[str(bare)] == ("folder holds no photos: only entries that are not regular files "
                                  "(a device, a pipe, a socket): pipe")


def test_a_path_given_that_is_a_device_says_so(tmp_path):
    from index.photos import expand_photo_args

    got = expand_photo_args([Path("/dev/null")])
    assert got.problems == [("/dev/null", "not a regular file (a device): a photo is read from a regular file only")]


def test_the_clis_warnings_and_errors_escape_a_file_names_control_characters(tmp_path, capsys):
    """A library warning or an error naming a file (a folder given that holds no photo) is shown with ESC escaped,
    the message's own line breaks kept (its further lines indented: walk s56-logs #12)."""
    import logging

    from api.cli import CliLogFormat, main

    record = logging.LogRecord("index", logging.WARNING, __file__, 1, "skipped %s\nnext line", ("a\x1b[8m.jpg",),
                               None)
    assert CliLogFormat().format(record) == "speciesid: warning: skipped a\\x1b[8m.jpg\n  next line"
    folder = tmp_path / "x\x1b[2J"
    folder.mkdir()
    assert main(["identify", "--index", str(tmp_path / "none"), str(folder)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "x\\x1b[2J" in err, err
