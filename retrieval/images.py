"""Decode photos into clean RGB images: EXIF orientation, odd modes, corrupt files."""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from index.photos import DEFAULT_MAX_PIXELS, PHOTO_FORMAT_WORDS, PHOTO_FORMATS, PHOTO_MAX_PIXELS
from index.sources import read_source

try:  # HEIC/HEIF phone photos, when pillow-heif is installed
    from pillow_heif import register_heif_opener

    register_heif_opener()
except ImportError:  # pragma: no cover - optional
    pass

logger = logging.getLogger(__name__)
#: The module of Pillow's warnings about a photo's damaged EXIF or TIFF tags (``UserWarning``s of its TIFF tag
#: reader, which reads EXIF for every format), silenced while a photo is opened or decoded: printed, they showed a
#: site-packages path and no photo's name. :func:`decode_image` logs its own line, naming the photo, instead.
_EXIF_WARNINGS = r"PIL\.TiffImagePlugin"

#: The setting of the most pixels one photo may decode to, read by the server (``api.settings``) and by every
#: command that reads photos to embed them, finetune included (:func:`max_pixels_setting`); ``clean``'s report
#: thumbnails and the runtime check read the gallery's own photos up to :data:`DEFAULT_MAX_PIXELS`.
MAX_PIXELS_ENV = "SPECIESID_MAX_PIXELS"
# Its default and the cap: index.photos' PHOTO_MAX_PIXELS and DEFAULT_MAX_PIXELS (imported above, and so still
# importable from here), defined there so that the command line reads them without this module's Pillow plugins.
#: Pillow's own guard (a warning past it, an error past twice it) moved to ours: without this, Pillow refuses anything
#: over 179M pixels (a 200-megapixel phone photo) whatever the limit asked for; :func:`decode_image` checks that.
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS
#: Reference photos need at least this many pixels on their short side: the encoders upsample to ~224 px,
#: and a thumbnail-sized or 1-pixel "photo" carries nothing to match against.
MIN_REFERENCE_SIDE = 32
#: Longest / shortest side above this is refused: the encoders resize the short side to ~224 px, so a
#: 1 x 20,000 px strip (a few kB) would become a 224 x 4.5M px image (GBs of memory, seconds of CPU).
MAX_ASPECT = 25
#: The words of the refusal of a photo for its shape (a strip, read fine): reports count it apart from unreadable ones.
TOO_ELONGATED = "is too elongated"
#: The words of the refusal of a photo for its pixel count (the decompression-bomb guard), counted apart likewise.
OVER_PIXEL_LIMIT = "(possible decompression bomb)"


#: Mode -> (weight, words), one row a mode. Its weight: how many times a pixel of the mode counts against the pixel
#: limit, the memory it costs through :func:`decode_image` (decoded, then made 8-bit RGB) over an 8-bit colour
#: pixel's, rounded up to a quarter, so that no mode a photo can be decoded in is under-counted. Measured with 4
#: photos decoding at once, as the server's 4 decode threads do (``benchmarks/bench_decode.py --ways now --mode
#: MODE``, docs/api.md "Limits and errors"): L 1.20x, 1 1.25x, 16-bit greyscale 1.87x, CMYK 2.17x, YCbCr 2.24x, LAB
#: and RGBA 2.31x, P 2.43x, float greyscale 3.07x, 32-bit greyscale 3.19x, LA 3.56x. Modes not listed (none a
#: supported format opens in, as far as tried) count 4. Its words: the mode as the refusal of a photo over the limit
#: names it.
PIXEL_MODES: dict[str, tuple[float, str]] = {
    "RGB": (1, "8-bit colour"), "RGBX": (1, "8-bit colour (RGBX)"), "L": (1.25, "8-bit greyscale"),
    "1": (1.25, "black and white (1-bit)"), "I;16": (2, "16-bit greyscale"), "I;16B": (2, "16-bit greyscale"),
    "I;16L": (2, "16-bit greyscale"), "I;16N": (2, "16-bit greyscale"), "CMYK": (2.25, "CMYK colour"),
    "YCbCr": (2.25, "YCbCr colour"), "LAB": (2.5, "CIELAB colour"),
    "RGBA": (2.5, "colour with transparency (RGBA)"), "RGBa": (2.5, "colour with transparency (RGBa)"),
    "P": (2.5, "palette colour"), "F": (3.25, "floating-point greyscale"), "I": (3.25, "32-bit greyscale"),
    "LA": (3.75, "greyscale with transparency"), "La": (3.75, "greyscale with transparency"),
    "PA": (3.75, "palette colour with transparency")}
#: The weight of a mode :data:`PIXEL_MODES` does not list.
UNLISTED_MODE_WEIGHT = 4


def mode_weight(mode: str) -> float:
    """How many times a pixel of ``mode`` counts against the pixel limit (:data:`PIXEL_MODES`; 4 when unlisted)."""
    return PIXEL_MODES[mode][0] if mode in PIXEL_MODES else UNLISTED_MODE_WEIGHT


def mode_words(mode: str) -> str:
    """``mode`` in words, as a refusal for the pixel limit says it (:data:`PIXEL_MODES`; "mode X" when unlisted)."""
    return PIXEL_MODES[mode][1] if mode in PIXEL_MODES else f"mode {mode}"


#: ``image.info`` key of the photo's size as stored (before any reduction at decode).
PHOTO_SIZE = "speciesid_photo_size"
#: ``image.info`` key of what an answer is to say of the photo as decoded (:func:`photo_note`).
PHOTO_NOTE = "speciesid_photo_note"


def parse_max_pixels(raw: str | int) -> int:
    """:data:`MAX_PIXELS_ENV`'s value: a whole number of pixels from 1 to :data:`DEFAULT_MAX_PIXELS` (no photo is
    taken over it as stored, so a larger limit would mean nothing). A ValueError names the variable and what to
    set."""
    try:
        value = int(str(raw).strip().replace("_", ""))
    except ValueError:
        value = 0
    if not 1 <= value <= DEFAULT_MAX_PIXELS:
        shown = raw.strip() if isinstance(raw, str) else raw
        raise ValueError(f"{MAX_PIXELS_ENV}={shown} is not a whole number of pixels from 1 to "
                         f"{DEFAULT_MAX_PIXELS:,}: set the most pixels one photo may decode to (default "
                         f"{PHOTO_MAX_PIXELS}), or unset it")
    return value


def max_pixels_setting() -> int:
    """The most pixels one photo may decode to: :data:`MAX_PIXELS_ENV` when set (:func:`parse_max_pixels`), else
    :data:`PHOTO_MAX_PIXELS`: what ``retrieval.pipeline`` reads photos with unless told otherwise."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    return parse_max_pixels(raw) if raw else PHOTO_MAX_PIXELS


class ImageLoadError(ValueError):
    """A photo could not be decoded; the message says why."""


class PixelLimitError(ImageLoadError):
    """A photo with more pixels than the limit asked for (the decompression-bomb guard). ``what``: the refusal;
    ``long_side``: the most pixels its long side may have to be read; ``needed``: the limit that would take it as
    it is (None when no limit up to :data:`DEFAULT_MAX_PIXELS` would). ``str()``: :meth:`advise`'s default."""

    def __init__(self, what: str, long_side: int, needed: int | None = None) -> None:
        self.what, self.long_side, self.needed = what, max(1, long_side), needed
        super().__init__(self.advise())

    def __reduce__(self) -> tuple:
        """Pickles as its three fields (``args`` holds only the text), so it crosses a process or Ray task whole."""
        return (type(self), (self.what, self.long_side, self.needed))

    def advise(self, verb: str = "save", setting: str = "") -> str:
        """The refusal in one line, saying what to do: ``verb`` the photo at most :attr:`long_side` px on its long
        side; ``setting``: how to raise the limit (``{needed}`` in it: :attr:`needed`), said when that would take
        the photo."""
        text = f"{self.what}: {verb} it at most {self.long_side} px on its long side"
        if setting and self.needed:
            text += ", or " + setting.format(needed=self.needed)
        return text


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of raw bytes."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str | None:
    """Hex sha256 of a photo's bytes (its content identity), read as ``index build`` and fine-tuning read them
    (``index.sources.read_source``: a file, or a webdataset ``SHARD#MEMBER``); None when it cannot be read."""
    try:
        return sha256_bytes(read_source(path))
    except OSError:
        return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB the way a person would see the photo.

    Transparency is composited on white; 16/32-bit and float grayscale are rescaled to 8 bits
    (a plain ``convert("RGB")`` would clip them to white); CMYK and palette go through PIL.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        lo, hi = float(arr.min()), float(arr.max())
        if mode.startswith("I;16") and hi <= 65535 and lo >= 0:
            lo, hi = 0.0, 65535.0 if hi > 255 else 255.0
        scale = (hi - lo) or 1.0
        arr8 = np.empty(arr.shape, dtype=np.uint8)
        rows = max(1, _STRIP_PIXELS // max(arr.shape[1], 1))
        for top in range(0, arr.shape[0], rows):  # in strips: float64 temporaries of a strip, not of the photo
            strip = arr[top:top + rows].astype(np.float64)
            arr8[top:top + rows] = np.clip((strip - lo) * (255.0 / scale), 0, 255).astype(np.uint8)
        del arr
        return Image.fromarray(arr8).convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, (0, 0), rgba)  # alpha_composite on white, to the byte, without two more full-size copies
        return out
    return img.convert("RGB")


#: Pixels of a strip :func:`to_rgb` rescales a high-bit-depth photo by (its float64 temporaries: 8 MB each).
_STRIP_PIXELS = 1 << 20


#: The formats photos come in; only these decoders ever see the bytes (which come from anyone who can upload a photo):
#: Pillow's other plugins (PostScript through Ghostscript, Windows metafiles, PSD, FITS, FLI, ...) are never tried.
ACCEPTED_FORMATS = tuple(PHOTO_FORMATS)  # Pillow opens MPO (phones' JPEG) through its JPEG plugin
#: The refusal of bytes that are none of :data:`ACCEPTED_FORMATS` (after the file's name): worded for the CLI and the
#: API alike, saying which formats a photo may be in.
NOT_A_PHOTO = f"not a photo: its content is not {PHOTO_FORMAT_WORDS}"


#: ISO base media (``ftyp``) brands of HEIF photos (HEIC: iPhones, many Android phones) and of AVIF ones.
HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1",
                         b"mif2", b"miaf"})
AVIF_BRANDS = frozenset({b"avif", b"avis"})


def heif_kind(data: bytes) -> str | None:
    """"AVIF" or "HEIC" when ``data`` starts as a HEIF container (``....ftyp`` and a HEIF or AVIF brand, major or
    compatible), read from its first bytes only; None otherwise."""
    if len(data) < 16 or data[4:8] != b"ftyp":
        return None
    size = int.from_bytes(data[:4], "big")
    box = data[8:min(max(size, 16), 256)]  # the major brand, the minor version, the compatible brands
    brands = {box[i:i + 4] for i in range(0, len(box) - 3, 4)} - {box[4:8]}
    if brands & AVIF_BRANDS:
        return "AVIF"
    return "HEIC" if brands & HEIF_BRANDS else None


def unreadable_heif(data: bytes) -> str | None:
    """Why a HEIC or AVIF photo cannot be read by this installation (its decoder is missing: pillow-heif for HEIC, a
    Pillow built with AVIF support for AVIF), worded to say what to install; None when ``data`` is not one, or is one
    this installation reads (then any failure is the photo's own)."""
    kind = heif_kind(data)
    if kind is None or ("HEIF" if kind == "HEIC" else "AVIF") in _openers():
        return None
    how = ("install pillow-heif: pip install pillow-heif" if kind == "HEIC"
           else "install a Pillow built with AVIF support")
    return (f"{'an' if kind == 'AVIF' else 'a'} {kind} photo, which this installation cannot read: "
            f"its {kind} decoder is missing ({how})")


#: What an answer says of an animated photo (a GIF, an animated WebP or PNG): the decode reads its first frame.
ANIMATED_NOTE = ("an animated {format}: only its first frame was read (if another frame shows the animal better, "
                 "send that frame as a still photo)")
#: What an answer says of a TIFF of several pages: the decode reads its first page, as it reads an animation's frame.
PAGES_NOTE = ("a {pages}-page TIFF: only its first page was read (if another page shows the animal better, send "
              "that page as a photo of its own)")
_ANIMATED_NAMES = {"GIF": "GIF", "PNG": "PNG (APNG)", "WEBP": "WebP", "TIFF": "TIFF"}
#: ``image.info`` key of a photo of several frames or pages: (what it is, "frame" or "page"), e.g. ("an animated
#: GIF", "frame"), ("a 2-page TIFF", "page"): the words of its blank refusal (:func:`blank_reason`).
PHOTO_FRAMES = "speciesid_photo_frames"


def _frames(img: Image.Image | None) -> tuple[str, str, str] | None:
    """(:data:`ANIMATED_NOTE` or :data:`PAGES_NOTE`, what the photo is, "frame" or "page") for the opened, not yet
    loaded photo ``img`` when it is a GIF, WebP, PNG or TIFF of more than one frame (page), else None (looking for
    its second frame leaves it at its first)."""
    if img is None or img.format not in _ANIMATED_NAMES:
        return None
    try:
        animated = bool(getattr(img, "is_animated", False))
        pages = int(getattr(img, "n_frames", 1)) if animated and img.format == "TIFF" else 0
    except Exception:  # noqa: BLE001 - a frame after the first that cannot be read: the first one is what counts
        return None
    if not animated:
        return None
    if img.format == "TIFF":
        return PAGES_NOTE.format(pages=pages), f"a {pages}-page TIFF", "page"
    return ANIMATED_NOTE.format(format=_ANIMATED_NAMES[img.format]), f"an animated {_ANIMATED_NAMES[img.format]}", \
        "frame"


def _animated_note(img: Image.Image | None) -> str | None:
    """:data:`ANIMATED_NOTE` (:data:`PAGES_NOTE` for a TIFF) for the opened, not yet loaded photo ``img`` when it has
    more than one frame (page), else None."""
    frames = _frames(img)
    return frames[0] if frames else None


def header_facts(data: bytes) -> tuple[tuple[int, int], str | None] | None:
    """:func:`header_size` of ``data`` and what an answer is to say of it as :func:`decode_image` reads it
    (:func:`photo_note`'s note: only the first frame of an animation, the first page of a TIFF; None when nothing),
    from one open of its header; None when it is not an accepted image."""
    img = _header(data)
    return None if img is None else (img.size, _animated_note(img))


def _openers() -> list[str]:
    """The accepted formats this Pillow can open (HEIF needs pillow-heif, AVIF a recent Pillow)."""
    Image.init()
    return [f for f in ACCEPTED_FORMATS if f in Image.OPEN]


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image", draft: int | None = None
) -> Image.Image:
    """Decode bytes into an RGB image, or raise :class:`ImageLoadError` saying what is wrong.

    ``draft``: keep both sides at least this many pixels but no more than needed: a JPEG is decoded at reduced
    scale (by 1/2, 1/4, 1/8: much faster for large phone photos that are resized to ~224 px anyway), any other
    photo is box-reduced by a whole factor as soon as it is decoded, so a large PNG is not held at full size.
    The photo's own size, as stored, is in ``image.info[PHOTO_SIZE]`` (:func:`photo_size`); an animated photo's
    :data:`ANIMATED_NOTE` in ``image.info[PHOTO_NOTE]`` (:func:`photo_note`).

    ``max_pixels`` bounds the pixels decoded, read from the header before any is (:class:`PixelLimitError`): for
    a JPEG decoded at reduced scale, the reduced size; and no photo is taken over :data:`DEFAULT_MAX_PIXELS` as
    stored, whatever its decode would cost (a larger ``max_pixels`` counts as that). A pixel of a mode that costs
    more memory to decode than an 8-bit colour one (16-bit greyscale, transparency, palette: :func:`mode_weight`)
    counts more than once against both, so that the limit bounds a decode's memory whatever the photo's bit depth.
    A photo whose EXIF cannot be read is decoded as stored, its orientation ignored (one warning logged, naming it).
    """
    if not data:
        raise ImageLoadError(f"{name}: the file is empty")
    cap = DEFAULT_MAX_PIXELS
    max_pixels = min(max_pixels, cap)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is max_pixels, checked below
        warnings.filterwarnings("ignore", category=UserWarning, module=_EXIF_WARNINGS)  # said below, naming it
        try:
            img = Image.open(io.BytesIO(data), formats=_openers())
            w, h = img.size
            if max(w, h) > MAX_ASPECT * max(min(w, h), 1):
                raise ImageLoadError(f"{name}: {w}x{h} pixels {TOO_ELONGATED} (over {MAX_ASPECT}:1) to be a photo")
            if draft and img.format == "JPEG":
                img.draft("RGB", (draft, draft))  # only sets the scale: the size below is what will be decoded
            dw, dh = img.size
            weight = mode_weight(img.mode)  # a 16-bit or transparent pixel costs more memory to decode: counts more
            if w * h * weight > cap or dw * dh * weight > max_pixels:
                raise _over_limit(name, img.mode, (w, h), (dw, dh), max_pixels)
            frames = _frames(img)  # before the load: the header is open already, the first frame not decoded
            img.load()
            if not _exif_readable(img):
                logger.warning("%s: its EXIF data is damaged, so its orientation is ignored (if it shows sideways, "
                               "save it upright)", name)
            else:
                ImageOps.exif_transpose(img, in_place=True)  # no full-size copy when the photo is upright
            img = to_rgb(img)
            factor = min(img.size) // draft if draft else 1
            if factor >= 2:
                img = img.reduce(factor)
            img.info[PHOTO_SIZE] = (w, h)  # as stored (before draft and reduce), for checks on the photo's size
            if frames:
                img.info[PHOTO_NOTE], img.info[PHOTO_FRAMES] = frames[0], frames[1:]
            return img
        except ImageLoadError:
            raise
        except Image.DecompressionBombError as exc:  # over twice Pillow's guard (so over the cap), refused at open
            raise PixelLimitError(f"{name}: more pixels than the limit of {max_pixels:,} {OVER_PIXEL_LIMIT}",
                                  math.isqrt(max_pixels)) from exc
        except UnidentifiedImageError as exc:  # a HEIC of an install without pillow-heif is no less a photo
            raise ImageLoadError(f"{name}: {unreadable_heif(data) or NOT_A_PHOTO}") from exc
        except (OSError, SyntaxError, ValueError, TypeError) as exc:
            raise ImageLoadError(damaged_text(name, exc)) from exc


def _over_limit(name: str, mode: str, stored: tuple[int, int], decoded: tuple[int, int],
                max_pixels: int) -> PixelLimitError:
    """The refusal of a photo of ``mode`` over the pixel limit: its ``stored`` size over :data:`DEFAULT_MAX_PIXELS`,
    or the size it would be ``decoded`` at over ``max_pixels``; the long side it may have to be read, and the
    limit that would take it when one up to :data:`DEFAULT_MAX_PIXELS` would."""
    (w, h), (dw, dh), weight = stored, decoded, mode_weight(mode)
    over_decoded = dw * dh * weight > max_pixels
    limit, (lw, lh) = (max_pixels, decoded) if over_decoded else (DEFAULT_MAX_PIXELS, stored)
    long_side = math.floor(max(lw, lh) * math.sqrt(limit / (lw * lh * weight)))
    needed = math.ceil(dw * dh * weight) if over_decoded and w * h * weight <= DEFAULT_MAX_PIXELS else None
    scaled = f" ({dw}x{dh} decoded at reduced scale)" if over_decoded and (dw, dh) != (w, h) else ""
    if weight == 1:
        return PixelLimitError(f"{name}: {w}x{h} pixels{scaled} is over the limit of {limit:,} {OVER_PIXEL_LIMIT}",
                               long_side, needed)
    return PixelLimitError(f"{name}: {w}x{h} pixels{scaled} of {mode_words(mode)}, which cost {weight:g}x the memory "
                           f"of 8-bit colour ones to decode, is over the limit of {int(limit / weight):,} for such a "
                           f"photo {OVER_PIXEL_LIMIT}", long_side, needed)


def damaged_text(name: str, exc: BaseException) -> str:
    """What a photo whose decoder failed with ``exc`` is said to be, and what to do: cut short (a copy or an upload
    that did not finish), or damaged (the decoder's words, without their brackets)."""
    words = str(exc)
    if "truncated" in words.lower():
        return (f"{name}: the photo is cut short (the copy or upload did not finish): copy or send it again from "
                "the camera or phone")
    words = re.sub(r"\s*\([^()]*\)", "", words).strip() or type(exc).__name__
    return (f"{name}: the photo is damaged and cannot be decoded ({words}): copy or send it again from the camera "
            "or phone")


def _exif_readable(img: Image.Image) -> bool:
    """False when ``img`` carries an EXIF block that Pillow fails on or warns about (those warnings are not shown:
    :data:`_EXIF_WARNINGS`), True otherwise: none, or one that reads, empty included (a valid block of no tags)."""
    raw = img.info.get("exif")
    if not raw:
        return True
    with warnings.catch_warnings(record=True) as said:
        warnings.filterwarnings("always", category=UserWarning, module=_EXIF_WARNINGS)
        try:
            Image.Exif().load(raw)  # read afresh: the one Pillow read at open is kept, its warnings long gone
        except Exception:  # noqa: BLE001 - an EXIF Pillow cannot parse at all: the photo is read as stored
            return False
    return not any(issubclass(w.category, UserWarning) for w in said)


def model_image(data: bytes, input_size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                name: str = "image") -> Image.Image:
    """A photo's bytes decoded as every path decodes them for a model input of ``input_size`` px: at reduced scale
    down to twice the model input (:func:`decode_image`'s draft: big phone photos decode ~4x faster). What
    ``retrieval.pipeline.model_input`` gives the encoder's transform, what the runtime check embeds, and what
    fine-tuning evaluates on (``finetune.data.EvalView``). :class:`ImageLoadError` when it cannot be decoded."""
    return decode_image(data, max_pixels=max_pixels, name=name, draft=2 * int(input_size))


def photo_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the photo as stored, whatever :func:`decode_image` reduced it to (EXIF rotation aside)."""
    width, height = image.info.get(PHOTO_SIZE, image.size)  # decode_image's (w, h), else the image's own
    return width, height


def photo_note(image: Image.Image) -> str | None:
    """What an answer is to say of the photo :func:`decode_image` gave (:data:`ANIMATED_NOTE` for an animated one:
    only its first frame was read), None when nothing."""
    return image.info.get(PHOTO_NOTE)


#: A photo is blank (almost one colour: a lens cap, a black first frame, a fully transparent PNG on white) when no
#: colour channel of it varies by this many 8-bit levels (standard deviation over up to 128 x 128 of its pixels).
#: The 542 ph-snakes photos vary by 22-84; one of them darkened to 5 % of its brightness by 2.4 (not blank), to 2 %
#: by 0.9; a black photo of sensor noise (8 +- 3 levels, JPEG) by 1.6.
BLANK_LEVELS = 2.0
#: The words of the refusal of a blank photo as a reference (counted apart from unreadable ones: "blank").
BLANK_PHOTO = "blank photo (almost one colour)"


def blank_reason(image: Image.Image) -> str | None:
    """Why the photo :func:`decode_image` gave cannot be a reference because it is blank (every colour channel
    varies by less than :data:`BLANK_LEVELS`): nothing to match against, and a blank reference would draw every dark
    or blank query to its species; None when it is not blank. The one test of "blank" of every reference path (the
    CLI's add and build, the HTTP add). A photo of several frames (pages) says its first one was the one read."""
    small = image.resize((min(image.width, 128), min(image.height, 128)), Image.Resampling.NEAREST)
    pixels = np.asarray(small, dtype=np.float32).reshape(small.width * small.height, -1)
    if not len(pixels) or float(pixels.std(axis=0).max()) >= BLANK_LEVELS:
        return None
    frames = image.info.get(PHOTO_FRAMES)
    if frames:
        what, unit = frames
        return (f"{BLANK_PHOTO} in its first {unit}, the only one read of {what}: send the {unit} that shows the "
                f"animal as a photo of its own")
    return f"{BLANK_PHOTO}: nothing to match against; send a photo that shows the animal"


def _header(data: bytes) -> Image.Image | None:
    """The photo opened lazily (Pillow reads its header, not its pixels), None when not an accepted image."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # only the header: nothing is decoded
        warnings.filterwarnings("ignore", category=UserWarning, module=_EXIF_WARNINGS)  # decode_image says it
        try:
            return Image.open(io.BytesIO(data), formats=_openers())
        except Exception:  # noqa: BLE001 - anything PIL cannot open is "not an image"
            return None


def image_format(data: bytes) -> str | None:
    """PIL's name of the image format of ``data`` (JPEG, PNG, WEBP, HEIF, ...), None when not an image."""
    img = _header(data)
    return img.format if img is not None else None


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of the photo as stored, read from its header without decoding any pixel (None when it is
    not an accepted image: :func:`decode_image` says why)."""
    img = _header(data)
    return img.size if img is not None else None
