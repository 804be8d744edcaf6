"""What the near-copy note (cosine >= the ``speciesid clean`` leak rule, 0.95) catches: ph-snakes train photos
against copies of themselves re-saved as PNG, mirrored, and resized to 3/4 and 1/2 and saved as JPEG quality 80,
embedded with the real MobileNetV1 weights. Prints, per kind of copy, the cosine to the original (min / median /
max) and how many copies reach the rule (``references add`` notes them)."""

from __future__ import annotations

import argparse
import io

import numpy as np
from _common import MOBILENET_SPEC, PH_SNAKES, require_shared
from _hardware import machine_report
from PIL import Image, ImageOps


def _bytes(im: Image.Image, fmt: str, **kw: object) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kw)
    return out.getvalue()


def copies(im: Image.Image) -> dict[str, bytes]:
    """The copies of one photo, by kind."""
    w, h = im.size
    return {"PNG re-save": _bytes(im, "PNG"), "mirrored (PNG)": _bytes(ImageOps.mirror(im), "PNG"),
            "3/4 size, JPEG q80": _bytes(im.resize((w * 3 // 4, h * 3 // 4)), "JPEG", quality=80),
            "1/2 size, JPEG q80": _bytes(im.resize((w // 2, h // 2)), "JPEG", quality=80)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--photos", type=int, default=20, help="train photos, evenly spread over the split (default 20)")
    args = ap.parse_args()
    require_shared()
    from retrieval.encoders import create_encoder
    from retrieval.findings import DEFAULT_DUP_THRESHOLD
    from retrieval.pipeline import embed_photos

    print(machine_report())
    encoder = create_encoder(MOBILENET_SPEC)
    paths = sorted(p for p in (PH_SNAKES / "train").glob("*/*") if p.is_file())
    paths = paths[:: max(len(paths) // args.photos, 1)][: args.photos]
    cosines: dict[str, list[float]] = {}
    for path in paths:
        made = copies(Image.open(path).convert("RGB"))
        emb = embed_photos([path, *made.values()], encoder).embeddings
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        for kind, vector in zip(made, emb[1:], strict=True):
            cosines.setdefault(kind, []).append(float(emb[0] @ vector))
    print(f"{len(paths)} ph-snakes train photos, MobileNetV1 (real weights); rule: cosine >= {DEFAULT_DUP_THRESHOLD}")
    print(f"| copy | min | median | max | noted (>= {DEFAULT_DUP_THRESHOLD}) |")
    print("|---|---:|---:|---:|---:|")
    for kind, values in cosines.items():
        noted = sum(v >= DEFAULT_DUP_THRESHOLD for v in values)
        print(f"| {kind} | {min(values):.3f} | {np.median(values):.3f} | {max(values):.3f} | {noted} of {len(values)} |")


if __name__ == "__main__":
    main()
