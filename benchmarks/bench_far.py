"""Photos unlike every reference (``far``): real val photos against blank, noisy and shrunken images.

An answer is ``far`` (and ``unknown``) when the cosine of the photo's nearest reference is under the gallery's
``retrieval.identify.far_threshold`` (the 0.1% quantile of the references' similarity to their nearest other one).
This prints, for the ph-snakes train gallery (MobileNetV1, real weights, fp32), the threshold, how many of the
de-duplicated val photos it marks far (they are snakes of the gallery's species: ideally none), and each junk
image's nearest similarity, whether it is far and the species the scores alone would have named; the same for real
photos of no snake (scikit-learn's two sample photos, and ``--others DIR``: e.g. scikit-image's sample photos).
With ``--finetuned OUT...`` (``speciesid finetune`` folders) the same for each network's gallery and val photos.

    .venv/bin/python benchmarks/bench_far.py [--others DIR] [--finetuned runs/ft-amx-s42 ...]  # ~1 min, more a network
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from _common import (
    MOBILENET_SPEC,
    PH_SNAKES,
    finetuned_embeddings,
    frozen_splits,
    gallery_from_embeddings,
    require_shared,
)
from _hardware import machine_report
from PIL import Image


def junk_images(photo: str) -> dict[str, Image.Image]:
    """Blank frames, noise, a gradient, and a real photo shrunk to sizes nobody can identify."""
    rng = np.random.default_rng(0)
    real = Image.open(photo).convert("RGB")
    out = {f"{name} frame": Image.new("RGB", (300, 300), rgb) for name, rgb in
           (("black", (0, 0, 0)), ("white", (255, 255, 255)), ("grey", (128, 128, 128)), ("green", (30, 140, 40)))}
    out["noise"] = Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8))
    out["gradient"] = Image.fromarray(np.tile(np.linspace(0, 255, 300, dtype=np.uint8)[None, :, None], (300, 1, 3)))
    out.update({f"val photo at {s} x {s} px": real.resize((s, s)) for s in (1, 5, 16, 32, 64)})
    return out


def other_photos(folder: str | None) -> dict[str, Image.Image]:
    """Real photos of no snake: scikit-learn's two sample photos (a temple, a flower), and ``folder``'s photos."""
    from sklearn.datasets import load_sample_images

    from index.photos import find_photos

    samples = load_sample_images()
    out = {Path(f).name: Image.fromarray(im) for f, im in zip(samples.filenames, samples.images, strict=True)}
    out.update({p.name: Image.open(p).convert("RGB") for p in (find_photos(folder) if folder else [])})
    return out


def report(name: str, spec: str, train: np.ndarray, val: np.ndarray, val_paths: list[str], tmp: Path,
           others: dict[str, Image.Image]) -> None:
    """One gallery's figures."""
    from index.datasets import load_dataset
    from retrieval.encoders import create_encoder
    from retrieval.identify import Identifier, far_threshold

    enc = create_encoder(spec, precision="fp32", runtime="torch", device="cpu")
    records = load_dataset("folder", PH_SNAKES / "train").records
    gallery = gallery_from_embeddings(tmp / name.replace(" ", "-"), enc, records, train)
    ident = Identifier(enc, gallery)
    answers = ident.identify_embeddings(val)
    near = np.array([a.nearest for a in answers])
    print(f"\n## {name}: gallery {len(gallery)} references, far threshold {far_threshold(gallery):.3f}")
    print(f"val photos ({len(val)}, de-duplicated): far {sum(a.far for a in answers)}; nearest similarity min "
          f"{near.min():.3f}, 1% {np.quantile(near, 0.01):.3f}, median {np.median(near):.3f}")
    for title, images in (("made-up image", junk_images(val_paths[0])), ("real photo of no snake", others)):
        answers = ident.identify_images(list(images.values()))
        print(f"\n{title.replace('photo', 'photos').replace('image', 'images')}: far {sum(a.far for a in answers)} "
              f"of {len(answers)}")
        print(f"| {title} | nearest similarity | far | unknown | the scores' best species |\n|---|---:|---|---|---|")
        for label, a in zip(images, answers, strict=True):
            best, yes = a.predictions[0], {True: "yes", False: "no"}
            print(f"| {label} | {a.nearest:.3f} | {yes[a.far]} | {yes[a.unknown]} | {best.species} {best.score:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--finetuned", nargs="*", default=[], metavar="OUT", help="speciesid finetune folders")
    ap.add_argument("--others", metavar="DIR", help="a folder of real photos of no snake, beside scikit-learn's two")
    args = ap.parse_args()
    require_shared()
    print(machine_report())
    d = frozen_splits()
    with tempfile.TemporaryDirectory() as tmp:
        others = other_photos(args.others)
        report("frozen MobileNetV1", MOBILENET_SPEC, d.train, d.val, d.val_paths, Path(tmp), others)
        for folder in args.finetuned:
            spec = f"timm:local-dir:{Path(folder).resolve()}"
            report(Path(folder).name, spec, finetuned_embeddings(folder, d.train_paths),
                   finetuned_embeddings(folder, d.val_paths), d.val_paths, Path(tmp), others)


if __name__ == "__main__":
    main()
