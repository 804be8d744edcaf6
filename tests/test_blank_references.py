"""Walk s57 (image inputs) #1-#3: a blank photo (almost one colour: a black frame, a lens cap, a fully transparent
PNG) is refused as a reference on every path (the CLI's add and build, the HTTP add), with one test of "blank"
(``retrieval.images.blank_reason``); a photo read from its first frame or page (an animation, a TIFF of several
pages) says so on the reference paths too; a 422 names every photo of a request that cannot be used."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from retrieval.images import decode_image, photo_note

BLANK = "blank photo (almost one colour): nothing to match against; send a photo that shows the animal"
FIRST_FRAME = ("an animated GIF: only its first frame was read (if another frame shows the animal better, send that "
               "frame as a still photo)")
FIRST_PAGE = ("a 2-page TIFF: only its first page was read (if another page shows the animal better, send that page "
              "as a photo of its own)")


def _bytes(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(seed: int, side: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8))


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
    for data in (_bytes(Image.new("RGB", (300, 300)), "JPEG"), _bytes(Image.new("RGB", (300, 300), "white"), "PNG"),
                 _bytes(Image.fromarray(noisy_black), "JPEG", quality=90),
                 _bytes(Image.new("LA", (80, 80), (0, 0)), "PNG")):  # fully transparent: white once on white
        assert blank_reason(decode_image(data)) == BLANK
    night = (np.asarray(_noise(5, 300), dtype=np.float32) * 0.05).astype(np.uint8)  # 0-12 levels
    for data in (_bytes(_noise(6, 300), "PNG"), _bytes(Image.fromarray(night), "JPEG", quality=95)):
        assert blank_reason(decode_image(data)) is None


def test_a_tiff_of_several_pages_is_said_to_be_read_from_its_first_page(tmp_path):
    """Walk s57 #2: a 2-page TIFF was read from its first page with no word of it (identify answered UNKNOWN from
    its black first page); it gets a note as an animated GIF does."""
    _several(tmp_path)
    assert photo_note(decode_image((tmp_path / "pages.tif").read_bytes())) == FIRST_PAGE
    assert photo_note(decode_image(_bytes(_noise(7), "TIFF"))) is None  # one page: nothing to say
