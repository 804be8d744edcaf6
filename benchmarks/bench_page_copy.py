"""Does the web page's smaller copy of a photo change the answer? docs/api.md, "The web page on slow links".

The page (api/static/index.html, ``smallerCopy``) sends a photo over ``MAX_SIDE`` px as a JPEG copy of that long
side, drawn by the browser. This builds a gallery of ``--per-species`` ph-snakes train photos of each species
(MobileNetV1 coral_in1k, real weights, ../shared), upscales each of ``--photos`` val photos (224 px) to a
``--side`` px JPEG (q92: a phone photo's size), has headless Chromium make the page's copy of it for each
``--copies`` SIDE,QUALITY (the page's own function, on the page opened from its file), identifies the original and
each copy through the API (in process) and prints how many keep the original's top-1 species and venom advice
level, and the largest change of any candidate's score. ``resave`` is the noise floor: the original re-saved by
Pillow as a JPEG (q90) at its own size, nothing made smaller.

What it can and cannot show: ph-snakes holds 224 px photos only (its README), and no full-size originals are at
hand, so each "original" is a 224 px photo upscaled, with no detail above 224 px. The copy then loses nothing the
encoder could have seen: this measures what the page's resampling and JPEG re-encoding do to answers, not what a
copy of a real phone photo loses of its finer detail (above 224 px, below ``MAX_SIDE``). Run it on full-size photos
before claiming more.

Needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver) and selenium.
Prints where it ran (CPU model, kind, features, versions: benchmarks/_hardware.py) and the command first.

    .venv/bin/python benchmarks/bench_page_copy.py                         # 210 photos: resave, 1600 and 1024 px
    .venv/bin/python benchmarks/bench_page_copy.py --photos 30 --copies 1600,0.9
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import sys
import tempfile
from pathlib import Path

from _common import MOBILENET_SPEC, PH_SNAKES, REPO, evenly, require_shared
from _hardware import machine_report

PAGE = REPO / "api" / "static" / "index.html"
CHROMIUM = Path(os.environ.get("SPECIESID_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("SPECIESID_CHROMEDRIVER", "/usr/bin/chromedriver"))
#: The page's copy of the photo its file input holds, base64 (selenium returns strings).
COPY_JS = """const done = arguments[arguments.length - 1];
smallerCopy(document.getElementById("photos").files[0], arguments[0], arguments[1]).then(async (c) => {
  const a = new Uint8Array(await c.arrayBuffer()); let s = "";
  for (let j = 0; j < a.length; j += 32768) s += String.fromCharCode(...a.subarray(j, j + 32768));
  done(btoa(s));
});"""


def browser(profile: Path):
    """Headless Chromium through chromedriver (as tests/test_web_page.py opens it)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        sys.exit(f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def gallery(root: Path, per_species: int) -> Path:
    """A gallery of ``per_species`` train photos of each ph-snakes species, under ``root``."""
    from retrieval.encoders import EncoderConfig
    from retrieval.workflows import build_gallery

    photos = root / "photos"
    for folder in sorted((PH_SNAKES / "train").iterdir()):
        (photos / folder.name).mkdir(parents=True)
        for f in sorted(folder.iterdir())[:per_species]:
            os.symlink(f, photos / folder.name / f.name)
    build_gallery(root / "g", "folder", photos, encoder=EncoderConfig(spec=MOBILENET_SPEC, precision="fp32"),
                  progress=False)
    return root / "g"


def main(argv: list[str] | None = None) -> None:
    """Parse the options, build the gallery, compare the answers (see the module's docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=None, help="val photos, evenly spread (default: all)")
    parser.add_argument("--per-species", type=int, default=7, help="train photos per species in the gallery")
    parser.add_argument("--side", type=int, default=3024, help="the upscaled original's side, px")
    parser.add_argument("--copies", nargs="+", default=["resave", "1600,0.9", "1024,0.9"],
                        help="SIDE,QUALITY of the page's copy, or resave (the noise floor)")
    args = parser.parse_args(argv)
    require_shared()
    from fastapi.testclient import TestClient
    from PIL import Image

    from api.app import create_app
    from api.settings import Settings

    print("$ " + " ".join(["benchmarks/bench_page_copy.py", *sys.argv[1:]]))
    print(machine_report())
    val = evenly(sorted(p for p in (PH_SNAKES / "val").glob("*/*") if p.is_file()), args.photos)
    with tempfile.TemporaryDirectory() as tmp, TestClient(
            create_app(Settings(index=str(gallery(Path(tmp), args.per_species)), precision="fp32"))) as client:
        driver = browser(Path(tmp) / "profile")
        driver.get(PAGE.as_uri())

        def answer(body: bytes) -> dict:
            resp = client.post("/v1/identify?k=5", files={"images": ("photo.jpg", body, "image/jpeg")})
            resp.raise_for_status()
            return resp.json()

        stats = {mode: {"top": 0, "level": 0, "score": 0.0, "bytes": 0} for mode in args.copies}
        original_bytes = 0
        try:
            for photo in val:
                big = Path(tmp) / "big.jpg"
                Image.open(photo).convert("RGB").resize((args.side,) * 2, Image.Resampling.LANCZOS).save(big,
                                                                                                     quality=92)
                original_bytes += big.stat().st_size
                first = answer(big.read_bytes())
                driver.find_element("id", "photos").send_keys(str(big))
                for mode in args.copies:
                    if mode == "resave":
                        buf = io.BytesIO()
                        Image.open(big).save(buf, "JPEG", quality=90)
                        copy = buf.getvalue()
                    else:
                        side, quality = mode.split(",")
                        copy = base64.b64decode(driver.execute_async_script(COPY_JS, int(side), float(quality)))
                    other, s = answer(copy), stats[mode]
                    s["bytes"] += len(copy)
                    s["top"] += first["results"][0]["name"] == other["results"][0]["name"]
                    s["level"] += first["venom_advice"]["level"] == other["venom_advice"]["level"]
                    scores = [{r["name"]: r["score"] for r in a["results"]} for a in (first, other)]
                    names = set(scores[0]) | set(scores[1])
                    s["score"] = max(s["score"], *(abs(scores[0].get(n, 0) - scores[1].get(n, 0)) for n in names))
                driver.find_element("id", "photos").clear()
        finally:
            driver.quit()
    n = len(val)
    print(f"{n} ph-snakes val photos upscaled to {args.side} px (JPEG q92, mean {original_bytes / n / 1024:.0f} KB); "
          f"gallery: {args.per_species} train photos per species")
    print("(224 px photos upscaled: no detail above 224 px, so this does not measure what a copy of a full-size "
          "phone photo loses)")
    for mode, s in stats.items():
        print(f"{mode:<10} mean {s['bytes'] / n / 1024:5.0f} KB: same top-1 {s['top']}/{n}, same venom advice level "
              f"{s['level']}/{n}, largest score change {s['score']:.3f}")


if __name__ == "__main__":
    main()
