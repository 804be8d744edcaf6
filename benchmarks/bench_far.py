"""Photos unlike every reference (``far``): real val photos against blank, noisy and shrunken images.

An answer is ``far`` (and ``unknown``) when the cosine of the photo's nearest reference is under the gallery's
``retrieval.identify.far_threshold`` (the 0.1% quantile of the references' similarity to their nearest other one).
This prints, for the ph-snakes train gallery (MobileNetV1, real weights, fp32), the threshold, how many of the
de-duplicated val photos it marks far (they are snakes of the gallery's species: ideally none), and each junk
image's nearest similarity, whether it is far and the species the scores alone would have named; the same for real
photos of no snake (scikit-learn's two sample photos, and ``--others DIR``: e.g. scikit-image's sample photos);
with ``--open-world N``, how photos of species the gallery lacks are answered (N random draws of species).
With ``--finetuned OUT...`` (``speciesid finetune`` folders) the same for each network's gallery and val photos.

    .venv/bin/python benchmarks/bench_far.py [--others DIR] [--open-world 10] [--finetuned runs/ft-amx-s42 ...]
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


def open_world(d, tmp: Path, splits: int, kept: int) -> None:
    """Species the gallery lacks: ``splits`` random draws of ``kept`` species into a train gallery (kNN vote, the
    defaults); the val photos of the other species are snakes no answer can name rightly."""
    from index.datasets import load_dataset
    from retrieval.encoders import create_encoder
    from retrieval.identify import Identifier

    enc = create_encoder(MOBILENET_SPEC, precision="fp32", runtime="torch", device="cpu")
    records = load_dataset("folder", PH_SNAKES / "train").records
    by_path = {str(r.path): r for r in records}
    venomous = {r.species: r.venomous for r in records}
    rows = {"seen": [], "unseen": []}
    for split in range(splits):
        inside = set(np.random.default_rng(split).choice(len(d.species), kept, replace=False).tolist())
        pick = [i for i, y in enumerate(d.y) if y in inside]
        gallery = gallery_from_embeddings(tmp / f"open-{split}", enc, [by_path[d.train_paths[i]] for i in pick],
                                          d.train[pick])
        answers = Identifier(enc, gallery).identify_embeddings(d.val)
        for a, y in zip(answers, d.yv, strict=True):
            truth = d.species[y]
            answered = not a.unknown
            rows["seen" if y in inside else "unseen"].append(
                (a.far, a.unknown, answered and a.predictions[0].species == truth,
                 answered and bool(venomous.get(truth)) and not a.predictions[0].venomous))
    print(f"\n## open world: {splits} draws of {kept} of the {len(d.species)} species into the gallery (frozen "
          "MobileNetV1, kNN vote with its defaults), the val photos of the species in it and of the others")
    print("| val photos of | photos | far | unknown | answered | answered rightly | venomous answered harmless |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, got in rows.items():
        far, unknown, right, harmless = (np.mean([g[i] for g in got]) for i in range(4))
        print(f"| species {'in' if name == 'seen' else 'not in'} the gallery | {len(got)} | {far:.1%} | "
              f"{unknown:.1%} | {1 - unknown:.1%} | {right:.1%} | {harmless:.1%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--finetuned", nargs="*", default=[], metavar="OUT", help="speciesid finetune folders")
    ap.add_argument("--others", metavar="DIR", help="a folder of real photos of no snake, beside scikit-learn's two")
    ap.add_argument("--open-world", type=int, default=0, metavar="N",
                    help="also N draws of species left out of the gallery (their photos can only be named wrongly)")
    ap.add_argument("--kept", type=int, default=8, help="with --open-world: species in each draw's gallery")
    args = ap.parse_args()
    require_shared()
    print(machine_report())
    d = frozen_splits()
    with tempfile.TemporaryDirectory() as tmp:
        if args.open_world:
            open_world(d, Path(tmp), args.open_world, args.kept)
        others = other_photos(args.others)
        report("frozen MobileNetV1", MOBILENET_SPEC, d.train, d.val, d.val_paths, Path(tmp), others)
        for folder in args.finetuned:
            spec = f"timm:local-dir:{Path(folder).resolve()}"
            report(Path(folder).name, spec, finetuned_embeddings(folder, d.train_paths),
                   finetuned_embeddings(folder, d.val_paths), d.val_paths, Path(tmp), others)


if __name__ == "__main__":
    main()
