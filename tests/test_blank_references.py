"""Walk s57 (image inputs) #1-#3: a blank photo (almost one colour: a black frame, a lens cap, a fully transparent
PNG) is refused as a reference on every path (the CLI's add and build, the HTTP add), with one test of "blank"
(``retrieval.images.blank_reason``); a photo read from its first frame or page (an animation, a TIFF of several
pages) says so on the reference paths too; a 422 names every photo of a request that cannot be used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _cli_support import ENCODER, _photo, _run, folder_gallery, image_bytes
from PIL import Image

from retrieval.images import decode_image, photo_note

COBRA = "Naja haje"
VIPER = "Vipera latastei"
BLANK = "blank photo (almost one colour): nothing to match against; send a photo that shows the animal"
FIRST_FRAME = ("an animated GIF: only its first frame was read (if another frame shows the animal better, send that "
               "frame as a still photo)")
FIRST_PAGE = ("a 2-page TIFF: only its first page was read (if another page shows the animal better, send that page "
              "as a photo of its own)")
BLANK_FRAME = ("blank photo (almost one colour) in its first frame, the only one read of an animated GIF: send the "
               "frame that shows the animal as a photo of its own")
BLANK_PAGE = ("blank photo (almost one colour) in its first page, the only one read of a 2-page TIFF: send the page "
              "that shows the animal as a photo of its own")


def _noise(seed: int, side: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8))


def _blanks(folder: Path) -> dict[str, str]:
    """Blank photos written in ``folder``: file name -> the reason its refusal gives."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (640, 480), (5, 5, 5)).save(folder / "dark.jpg", quality=90)  # a lens cap
    Image.new("RGBA", (64, 64), (200, 30, 30, 0)).save(folder / "clear.png")  # on white: all white
    Image.new("RGB", (64, 64)).save(folder / "black_first.gif", save_all=True, append_images=[_noise(1)],
                                    duration=100)
    Image.new("RGB", (64, 64)).save(folder / "black_first.tif", save_all=True, append_images=[_noise(2)])
    return {"dark.jpg": BLANK, "clear.png": BLANK, "black_first.gif": BLANK_FRAME, "black_first.tif": BLANK_PAGE}


def _several(folder: Path) -> dict[str, str]:
    """Photos of several frames or pages whose first one shows something: file name -> the note they get."""
    folder.mkdir(parents=True, exist_ok=True)
    _noise(3).save(folder / "moving.gif", save_all=True, append_images=[Image.new("RGB", (64, 64))], duration=100)
    _noise(4).save(folder / "pages.tif", save_all=True, append_images=[Image.new("RGB", (64, 64))])
    return {"moving.gif": FIRST_FRAME, "pages.tif": FIRST_PAGE}


def test_one_test_of_blank_refuses_one_colour_photos_and_keeps_dark_ones():
    """``blank_reason``: almost one colour (JPEG noise of a black or white frame, a black photo of sensor noise) is
    blank; a photo that varies, however dark (a night shot at 5 % brightness), is not."""
    from retrieval.images import blank_reason

    rng = np.random.default_rng(0)
    noisy_black = np.clip(rng.normal(8, 3, (480, 640, 3)), 0, 255).astype(np.uint8)
    for data in (image_bytes(Image.new("RGB", (300, 300)), "JPEG"),
                 image_bytes(Image.new("RGB", (300, 300), "white"), "PNG"),
                 image_bytes(Image.fromarray(noisy_black), "JPEG", quality=90),
                 image_bytes(Image.new("LA", (80, 80), (0, 0)), "PNG")):  # fully transparent: white once on white
        assert blank_reason(decode_image(data)) == BLANK
    night = (np.asarray(_noise(5, 300), dtype=np.float32) * 0.05).astype(np.uint8)  # 0-12 levels
    for data in (image_bytes(_noise(6, 300), "PNG"), image_bytes(Image.fromarray(night), "JPEG", quality=95)):
        assert blank_reason(decode_image(data)) is None


def test_a_tiff_of_several_pages_is_said_to_be_read_from_its_first_page(tmp_path):
    """Walk s57 #2: a 2-page TIFF was read from its first page with no word of it (identify answered UNKNOWN from
    its black first page); it gets a note as an animated GIF does."""
    _several(tmp_path)
    assert photo_note(decode_image((tmp_path / "pages.tif").read_bytes())) == FIRST_PAGE
    assert photo_note(decode_image(image_bytes(_noise(7), "TIFF"))) is None  # one page: nothing to say


def test_index_build_skips_blank_photos_and_lists_them_and_says_which_were_read_from_their_first_frame(
        tmp_path, capsys):
    """Walk s57 #1, #2: ``index build`` stored blank photos (a black first frame, a transparent PNG) silently; they
    are skipped and listed with their reason, counted as "blank" (a species with no other photo named), and
    photos stored from their first frame or page are said."""
    root = tmp_path / "photos"
    for i in range(3):
        _photo(root / COBRA / f"{i}.png", i, side=64)
    reasons = _blanks(root / COBRA)
    notes = _several(root / COBRA)
    (root / VIPER).mkdir()
    Image.new("RGB", (64, 64), (90, 120, 60)).save(root / VIPER / "green.png")  # the species' only photo
    code, out, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", tmp_path / "g",
                          *ENCODER, "-q")
    assert code == 0, err
    assert "added 5, skipped 0 unreadable, 5 blank," in out, out
    for name, why in reasons.items():
        assert f"  skipped {root / COBRA / name}: {why}\n" in out, out
    assert f"  skipped {root / VIPER / 'green.png'}: {BLANK}\n" in out
    for name, note in notes.items():
        assert f"note: {root / COBRA / name}: {note}\n" in out, out
    assert f"species with no usable photo, not in the gallery: {VIPER} (1 blank)" in out, out


def test_references_add_refuses_blank_photos_and_keeps_the_others(tmp_path, capsys):
    """Walk s57 #1, #2: ``references add`` took blank photos as references; they are skipped and listed (exit 1), the
    others stored, and a photo stored from its first frame or page is said in a note."""
    index = folder_gallery(tmp_path, capsys, (COBRA, VIPER))
    reasons, notes = _blanks(tmp_path / "add"), _several(tmp_path / "add")
    _photo(tmp_path / "add" / "good.png", 40, side=64)
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", COBRA, tmp_path / "add",
                          *ENCODER, "-q")
    assert code == 1, (out, err)
    assert f"{COBRA} (existing species): added 3, skipped 0 unreadable, 4 blank," in out, out
    for name, why in reasons.items():
        assert f"  skipped {tmp_path / 'add' / name}: {why}\n" in out, out
    for name, note in notes.items():
        assert f"note: {tmp_path / 'add' / name}: {note}\n" in out, out


@pytest.fixture
def client_of(tmp_path, capsys):
    """(a test client of a two-species gallery, its folder)."""
    from test_species_names import _client

    index = folder_gallery(tmp_path, capsys, (COBRA, VIPER))
    with _client(index) as c:
        yield c, index


def _files(folder: Path, names) -> list:
    return [("images", (name, (folder / name).read_bytes(), "application/octet-stream")) for name in names]


def test_the_http_add_refuses_blank_photos_naming_every_one_and_stores_nothing(client_of, tmp_path):
    """Walk s57 #1, #3: the HTTP add stored blank photos (201, no note); a 422 now names each, with the other bad
    photos of the request (unreadable, too small), every one, and nothing is stored (all or nothing)."""
    c, _ = client_of
    url, keys = f"/v1/species/{COBRA}/references", {"X-API-Key": "k"}
    reasons = _blanks(tmp_path / "add")
    _photo(tmp_path / "add" / "good.png", 40, side=64)
    before = c.get(f"/v1/species/{COBRA}").json()["count"]
    resp = c.post(url, files=_files(tmp_path / "add", ["good.png", "dark.jpg"]), headers=keys)
    assert resp.status_code == 422 and resp.json()["detail"] == f"dark.jpg: {BLANK}", resp.text
    resp = c.post(url, files=_files(tmp_path / "add", ["good.png", *reasons]), headers=keys)
    assert resp.status_code == 422, resp.text
    named = "; ".join(f"[{i}] {name}: {why}" for i, (name, why) in enumerate(reasons.items(), 1))
    assert resp.json()["detail"] == ("4 of the 5 photos cannot be used, so none of this request was taken (send it "
                                     f"again without them, or with them fixed): {named}"), resp.text
    (tmp_path / "add" / "text.jpg").write_text("not a photo")
    (tmp_path / "add" / "empty.jpg").write_bytes(b"")
    _photo(tmp_path / "add" / "tiny.png", 41, side=8)
    resp = c.post(url, files=_files(tmp_path / "add", ["good.png", "text.jpg", "dark.jpg", "empty.jpg", "tiny.png"]),
                  headers=keys)
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert detail.startswith("4 of the 5 photos cannot be used, so none of this request was taken"), detail
    assert "[1] text.jpg: not a photo: " in detail, detail  # in the order sent
    assert detail.endswith(f"; [2] dark.jpg: {BLANK}; [3] empty.jpg: the file is empty; [4] tiny.png: 8x8 pixels is "
                           "too small for a reference photo (at least 32 px on the short side)"), detail
    assert c.get(f"/v1/species/{COBRA}").json()["count"] == before


def test_the_http_add_notes_a_photo_read_from_its_first_frame_or_page(client_of, tmp_path):
    """Walk s57 #2: the HTTP add of an animated GIF or a 2-page TIFF answered ``"notes": []``; each is named in a
    note, as identify names it."""
    c, _ = client_of
    notes = _several(tmp_path / "add")
    resp = c.post(f"/v1/species/{COBRA}/references", files=_files(tmp_path / "add", notes),
                  headers={"X-API-Key": "k"})
    assert resp.status_code == 201, resp.text
    for name, note in notes.items():
        assert f"{name}: {note}" in resp.json()["notes"], resp.json()
    resp = c.post("/v1/identify", files=_files(tmp_path / "add", ["pages.tif"]))
    assert resp.status_code == 200 and f"pages.tif: {FIRST_PAGE}" in resp.json()["notes"], resp.text


def test_an_identify_of_several_unreadable_photos_names_every_one(client_of, tmp_path):
    """Walk s57 #3: a 422 named the first bad photo only; every one is named."""
    c, _ = client_of
    (tmp_path / "a.jpg").write_text("not a photo")
    (tmp_path / "b.jpg").write_bytes(b"")
    _photo(tmp_path / "c.png", 42, side=64)
    resp = c.post("/v1/identify", files=_files(tmp_path, ["a.jpg", "c.png", "b.jpg"]))
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"].startswith("2 of the 3 photos cannot be used, so none of this request was taken")
    assert "[1] a.jpg: not a photo: " in resp.json()["detail"]
    assert resp.json()["detail"].endswith("; [2] b.jpg: the file is empty"), resp.text


def test_a_query_runs_no_blank_test_and_a_given_photo_opens_its_header_once(tmp_path, monkeypatch):
    """Re-read s57 core #7: ``model_input`` ran the blank test on every decode (identify, search, evaluate), where
    nothing used it, and ``prepare(given=True)`` opened the header twice (size, then note)."""
    import retrieval.images
    import retrieval.pipeline
    from retrieval.encoders import create_encoder
    from retrieval.pipeline import prepare

    enc = create_encoder("timm:test_vit@random", precision="fp32", runtime="torch")
    black = image_bytes(Image.new("RGB", (64, 64)), "PNG")
    tested: list[int] = []
    real_blank = retrieval.pipeline.blank_reason
    monkeypatch.setattr(retrieval.pipeline, "blank_reason", lambda im: tested.append(1) or real_blank(im))
    assert prepare(0, black, enc).error is None and tested == []  # a query: not asked
    assert prepare(0, black, enc, blank_ok=False).error == BLANK and tested == [1]  # a reference: asked
    opened: list[int] = []
    real_header = retrieval.images._header
    monkeypatch.setattr(retrieval.images, "_header", lambda data: opened.append(1) or real_header(data))
    _several(tmp_path)
    done = prepare(0, (tmp_path / "moving.gif").read_bytes(), enc, given=True)
    assert (done.note, opened) == (FIRST_FRAME, [1])
