"""What decoding uploads costs the server: peak memory and time, the way the API decodes them now and before.

A request of 5 large photos (default 7000 x 7000 PNGs, 49 MP each: under the 50 MP per-photo limit), decoded on
the service's 4 decode threads, each photo kept until the request is encoded:

* now: ``api.service.SpeciesService.decode``'s way: ``decode_image(..., draft=2 x model input)`` (JPEG decoded at
  reduced scale, any other format box-reduced at once), then the model input, the photo itself not kept;
* before (the naive way, as the API decoded until 2026-12-06): the photo decoded at full size, EXIF applied on a
  full-size copy, the full-size photo kept for the request.

Each side runs in a fresh process (peak RSS = that process's high-water mark); medians over ``--repeats``.

    .venv/bin/python benchmarks/bench_decode.py                  # 5 x 49 MP PNG
    .venv/bin/python benchmarks/bench_decode.py --format JPEG --side 6000
    .venv/bin/python benchmarks/bench_decode.py --photo IMG_0001.HEIC   # a phone's own photo, 5 copies of it
    .venv/bin/python benchmarks/bench_decode.py --mode "I;16" --side 5000 --ways now   # 16-bit greyscale PNG
    .venv/bin/python benchmarks/bench_decode.py --mode YCbCr --format TIFF --side 5000 --ways now

A HEIC (HEVC) photo has no reduced-scale decode (libheif decodes every tile), so ``now`` saves memory there, not time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import REPO, CpuWatch, median
from _hardware import machine_report

_CHILD = """
import json, resource, sys, time
from concurrent.futures import ThreadPoolExecutor
from retrieval.images import decode_image
from retrieval.preprocess import PreprocessConfig, preprocess_image
path, photos, way = sys.argv[1], int(sys.argv[2]), sys.argv[3]
data = open(path, "rb").read()
cfg = PreprocessConfig(size=(224, 224), resize=(224,))

def now(d):  # the model input only
    return preprocess_image(decode_image(d, max_pixels=50_000_000, draft=2 * 224), cfg)

def before(d):  # the photo at full size, kept: decode_image as it was (a full-size copy to apply EXIF, always)
    import io
    from PIL import Image, ImageOps
    from retrieval.images import to_rgb
    img = Image.open(io.BytesIO(d))
    img.load()
    return to_rgb(ImageOps.exif_transpose(img))

t = time.perf_counter()
with ThreadPoolExecutor(4) as pool:
    kept = list(pool.map(now if way == "now" else before, [data] * photos))
print(json.dumps({"s": time.perf_counter() - t,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

#: The made photo's colour in each --mode it can be made in.
_COLOURS = {"RGB": (90, 120, 60), "L": 90, "1": 1, "P": 5, "RGBA": (90, 120, 60, 128), "I;16": 30_000,
            "YCbCr": (90, 120, 60), "LAB": (50, 120, 130), "CMYK": (10, 20, 30, 40), "LA": (90, 128),
            "I": 30_000, "F": 0.5}


def megapixels(width: int, height: int) -> str:
    """A photo's megapixels to 3 significant digits (a 500 x 500 photo is 0.25 MP, not 0)."""
    return f"{width * height / 1e6:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=7000, help="photo side in pixels (default 7000: 49 MP)")
    ap.add_argument("--format", default="PNG", choices=("PNG", "JPEG", "WEBP", "HEIF", "TIFF"),
                    help="photo format (default PNG; HEIF: a HEIC, written by pillow-heif; TIFF, uncompressed: the "
                    "format of --mode YCbCr, LAB and CMYK)")
    ap.add_argument("--mode", default="RGB", choices=tuple(_COLOURS),
                    help="pixel mode of the made photo (default RGB: 8-bit colour; I;16: 16-bit greyscale, which "
                    "counts twice against the pixel limit, as RGBA does: retrieval.images.PIXEL_MODES)")
    ap.add_argument("--ways", default="before,now", help="the ways to run, comma-separated (default before,now)")
    ap.add_argument("--photo", type=Path, help="decode this photo (a phone's HEIC, JPEG...) instead of a made one: "
                    "--side and --format are then ignored")
    ap.add_argument("--photos", type=int, default=5, help="photos in the request (default 5, the identify limit)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per side (default 3)")
    args = ap.parse_args()
    print(machine_report(), flush=True)
    watch = CpuWatch()
    from PIL import Image

    import retrieval.images  # noqa: F401 - registers pillow-heif's HEIF writer and reader

    with tempfile.TemporaryDirectory() as tmp:
        photo = args.photo or Path(tmp) / f"big.{args.format.lower()}"
        if args.photo is None:
            Image.new(args.mode, (args.side, args.side), _COLOURS[args.mode]).save(photo, args.format)
        with Image.open(photo) as img:
            (width, height), kind, mode = img.size, img.format, img.mode
        rows = {}
        for way in args.ways.split(","):
            runs = [json.loads(subprocess.run([sys.executable, "-c", _CHILD, str(photo), str(args.photos), way],
                                              cwd=REPO, check=True, capture_output=True, text=True).stdout)
                    for _ in range(args.repeats)]
            rows[way] = (median([r["s"] for r in runs]), median([r["peak_mib"] for r in runs]))
    print(f"\n{args.photos} x {width}x{height} {kind} {mode} ({megapixels(width, height)} MP each), "
          f"4 decode threads; medians of {args.repeats}")
    print("| way | seconds | peak RSS MiB |\n| --- | ---: | ---: |")
    for way, (s, mib) in rows.items():
        print(f"| {way} | {s:.2f} | {mib:.0f} |")
    if {"before", "now"} <= set(rows):
        print(f"peak memory before / now: {rows['before'][1] / rows['now'][1]:.2f}x; "
              f"time before / now: {rows['before'][0] / rows['now'][0]:.2f}x")
    print(watch.report())


if __name__ == "__main__":
    main()
