"""A gallery of one reference photo: could a fixed cosine floor stand in for its missing far threshold?

``retrieval.identify.far_threshold`` needs 2 references (each one's similarity to its nearest other one); a gallery
started with one photo has none, so nothing it answers is ``far``. This measures, with MobileNetV1 (real weights,
fp32) on ph-snakes, how the photos a one-reference gallery meets lie against that lone reference: each of 10 train
photos per species taken as the lone reference, against the de-duplicated val photos of its own species (the
answers a floor must keep), of the other species, and the junk images of ``bench_far.py`` (blank frames, noise, a
gradient, a val photo shrunk to 1-64 px). A floor would have to sit between the first and the rest, for this
encoder; the figures say whether one does.

    .venv/bin/python benchmarks/bench_lone_reference.py
"""

from __future__ import annotations

import argparse
import io

import numpy as np
from _common import MOBILENET_SPEC, frozen_splits, require_shared
from _hardware import machine_report
from bench_far import junk_images

#: Lone references drawn per species by default (evenly through its sorted train photos; `--per-species`).
PER_SPECIES = 10


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def main() -> None:
    """Print the quantiles of each kind of photo's similarity to a lone reference."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-species", type=int, default=PER_SPECIES,
                    help=f"lone references drawn per species (default {PER_SPECIES})")
    per_species = ap.parse_args().per_species
    from retrieval.encoders import create_encoder
    from retrieval.pipeline import embed_photos

    require_shared()
    print(machine_report())
    d = frozen_splits()
    enc = create_encoder(MOBILENET_SPEC, precision="fp32", runtime="torch", device="cpu")
    junk = junk_images(d.val_paths[0])
    junk_emb = embed_photos([_png(im) for im in junk.values()], enc, progress=False).embeddings
    same, other, odd = [], [], []
    for s in range(len(d.species)):
        refs = np.flatnonzero(d.y == s)
        for r in refs[np.linspace(0, len(refs) - 1, per_species).astype(int)]:
            sims = d.val @ d.train[r]
            same.append(sims[d.yv == s])
            other.append(sims[d.yv != s])
            odd.append(junk_emb @ d.train[r])
    same_a, other_a, odd_a = np.concatenate(same), np.concatenate(other), np.stack(odd)
    qs = (0.0, 0.001, 0.01, 0.05, 0.5, 1.0)
    print(f"\n{len(odd)} lone references ({per_species} per species, {len(d.species)} species); "
          f"{len(d.val)} de-duplicated val photos")
    print("| against the lone reference | pairs | " + " | ".join(f"q{q:g}" for q in qs) + " |")
    print("|---|---:|" + "---:|" * len(qs))
    for name, a in (("val photo of its species", same_a), ("val photo of another species", other_a)):
        print(f"| {name} | {len(a)} | " + " | ".join(f"{np.quantile(a, q):.2f}" for q in qs) + " |")
    for j, name in enumerate(junk):
        a = odd_a[:, j]
        print(f"| {name} | {len(a)} | " + " | ".join(f"{np.quantile(a, q):.2f}" for q in qs) + " |")
    # the 32 and 64 px photos are left out: a full gallery does not mark them far either (bench_far.py)
    unreadable = [j for j, name in enumerate(junk) if not name.endswith(("32 x 32 px", "64 x 64 px"))]
    blank = [j for j, name in enumerate(junk) if name.endswith("frame")]
    for what, cols in (("blank frame", blank), ("junk image (frames, noise, gradient, 1-16 px)", unreadable)):
        top = float(odd_a[:, cols].max())
        print(f"\na floor over every {what} (highest similarity {top:.2f}) would mark far "
              f"{np.mean(same_a <= top):.1%} of the val photos of the lone reference's own species")


if __name__ == "__main__":
    main()
