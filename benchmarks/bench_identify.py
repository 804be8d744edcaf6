"""Per-photo identify latency (p50/p95/p99, ms) and throughput: our path against a naive one.

One request at a time, from the photo file to the answer: decode -> encode -> search -> vote.

* ours:  ``retrieval.pipeline.embed_sources([path], encoder)`` + ``Identifier.identify_embeddings`` -- the
  path ``speciesid identify PHOTO`` takes for one photo (FAISS search, neighbour metadata from LanceDB
  (cached after first use), kNN vote, genus/family roll-up, venomous score).
* naive: ``PIL.Image.open(p).convert("RGB")`` + ``encoder.preprocess`` + fp32 forward on 1 image (separate
  fp32 encoder object) + numpy brute force ``gallery_matrix @ q`` + full ``argsort`` + a Python dict vote
  (same k and temperature as ours, so the answers can be compared).

Galleries: MobileNetV1 (real weights) over all 980 ph-snakes train photos, queried with the 210 val photos;
and a random-weight open_clip ViT-B-16 (BioCLIP's compute) over 100 train photos (kept small because a
ViT build runs at only a few photos/s here), queried with 20 val photos. Both galleries are built once per
run in a temp dir with ``build_gallery`` / ``add_references``. ViT "ours" runs at precision ``auto`` (what
the CLI uses: bf16 on CPUs with native bf16) and, to separate the precision from the pipeline, at fp32.

Each pass runs every method over all queries, one method's block after the other (order reversed every
pass, a short pause between blocks: alternating query by query would make numpy's OpenBLAS threads and
torch's/FAISS's OpenMP threads spin against each other on 2 cores). Passes are repeated; the medians of
the per-pass figures are reported.

    .venv/bin/python benchmarks/bench_identify.py           # default: 3 passes
    .venv/bin/python benchmarks/bench_identify.py --quick   # smoke run: small galleries, few queries, 1 pass
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from _common import MOBILENET_SPEC, PH_SNAKES, VIT_SPEC, CpuWatch, median, require_shared


def evenly(items: list, n: int | None) -> list:
    """n items evenly spaced over the list (all when n is None or >= len)."""
    if n is None or n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


class NaiveIdentifier:
    """The naive path: PIL + preprocess + fp32 forward on 1 image + numpy brute force + dict vote."""

    def __init__(self, encoder, matrix: np.ndarray, labels: list[str], k: int, temperature: float) -> None:
        self.encoder, self.matrix, self.labels, self.k, self.t = encoder, matrix, labels, k, temperature

    def identify(self, path: str) -> str:
        from PIL import Image

        x = self.encoder.preprocess(Image.open(path).convert("RGB"))
        q = self.encoder.encode_batch(x[None])[0]
        sims = self.matrix @ q
        order = np.argsort(-sims)[: self.k]
        top = sims[order[0]]
        votes: dict[str, float] = defaultdict(float)
        for j in order:
            votes[self.labels[j]] += math.exp((sims[j] - top) / self.t)
        return max(votes, key=votes.get)


def ours_identify(identifier, path: str) -> str:
    from retrieval.pipeline import embed_sources

    emb, errors = embed_sources([path], identifier.encoder)
    if errors[0] is not None:
        raise RuntimeError(f"{path}: {errors[0]}")
    answer = identifier.identify_embeddings(emb)[0]
    return answer.predictions[0].species


def naive_from_gallery(gallery, encoder, vote) -> NaiveIdentifier:
    """The naive side gets the same reference vectors and labels, as a plain matrix and list."""
    ids, matrix = gallery.store.vectors()
    meta = gallery.store.metadata(list(map(int, ids)))
    labels = [str(meta.loc[int(i), "species"]) for i in ids]
    return NaiveIdentifier(encoder, matrix, labels, vote.k, vote.temperature)


def bench(name: str, runners: dict, queries: list[str], truth: list[str], passes: int) -> dict:
    """Run each runner over the queries in blocks; per pass: latency percentiles and img/s; medians over passes."""
    names = list(runners)
    for fn in runners.values():  # warm-up: two queries outside the timed region
        for q in queries[:2]:
            fn(q)
    per_pass: dict[str, list[dict]] = {n: [] for n in names}
    answers: dict[str, list[str]] = {}
    for p in range(passes):
        lat: dict[str, list[float]] = {n: [] for n in names}
        got: dict[str, list[str]] = {n: [] for n in names}
        order = names if p % 2 == 0 else names[::-1]
        for n in order:  # one method's block at a time, order reversed every pass
            time.sleep(0.2)  # let the previous block's spinning BLAS/OpenMP threads go idle
            for q in queries:
                t0 = time.perf_counter()
                got[n].append(runners[n](q))
                lat[n].append((time.perf_counter() - t0) * 1000.0)
        for n in names:
            v = np.asarray(lat[n])
            per_pass[n].append(
                {
                    "p50": float(np.percentile(v, 50)),
                    "p95": float(np.percentile(v, 95)),
                    "p99": float(np.percentile(v, 99)),
                    "ips": len(v) / (v.sum() / 1000.0),
                }
            )
            answers[n] = got[n]
    out = {}
    print(f"\n{name}: {len(queries)} queries, one at a time, {passes} pass(es); medians over passes")
    print("| method | p50 ms | p95 ms | p99 ms | images/s | top-1 vs truth |")
    print("|---|---:|---:|---:|---:|---:|")
    for n in names:
        fig = {key: median([pp[key] for pp in per_pass[n]]) for key in ("p50", "p95", "p99", "ips")}
        acc = float(np.mean([a == t for a, t in zip(answers[n], truth, strict=True)]))
        fig["top1"] = acc
        out[n] = fig
        print(
            f"| {n} | {fig['p50']:.1f} | {fig['p95']:.1f} | {fig['p99']:.1f} | {fig['ips']:.1f} | {acc:.3f} |"
        )
    naive = [n for n in names if n.startswith("naive")][0]
    for n in names:
        if n == naive:
            continue
        agree = float(np.mean([a == b for a, b in zip(answers[n], answers[naive], strict=True)]))
        print(
            f"{n}: {out[naive]['p50'] / out[n]['p50']:.2f}x the speed of {naive} by median latency "
            f"(naive p50 / ours p50), throughput {out[n]['ips'] / out[naive]['ips']:.2f}x; "
            f"same top-1 species as naive on {agree:.0%} of queries"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 200/16 gallery photos, 20/3 queries, 1 pass"
    )
    ap.add_argument("--passes", type=int, default=None, help="passes over the queries (default 3)")
    ap.add_argument("--no-vit", action="store_true", help="skip the ViT-B-16 part")
    args = ap.parse_args()
    require_shared()
    logging.disable(logging.WARNING)  # random-weights warning
    from index.datasets import load_dataset
    from index.gallery import Gallery
    from retrieval.encoders import EncoderConfig, create_encoder
    from retrieval.identify import Identifier
    from retrieval.pipeline import add_references
    from retrieval.vote import VoteConfig
    from retrieval.workflows import build_gallery

    passes = args.passes or (1 if args.quick else 3)
    vote = VoteConfig()
    train = sorted(load_dataset("folder", PH_SNAKES / "train").records, key=lambda r: str(r.path))
    val = sorted(load_dataset("folder", PH_SNAKES / "val").records, key=lambda r: str(r.path))
    print(f"bench_identify: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f}")
    print(f"vote: k={vote.k}, T={vote.temperature}")
    watch = CpuWatch()

    with tempfile.TemporaryDirectory(prefix="bench_identify_") as tmp:
        # ---------------------------------------------------------------- MobileNetV1
        q_mob = evenly(val, 20 if args.quick else None)
        if args.quick:
            gal_dir = Path(tmp) / "mobilenet"
            enc = create_encoder(MOBILENET_SPEC, precision="fp32")
            gallery = Gallery.create(gal_dir, enc.describe())
            add_references(gallery, enc, evenly(train, 200), progress=False)
            gallery.finish_build()
        else:
            t0 = time.perf_counter()
            res = build_gallery(
                Path(tmp) / "mobilenet",
                "folder",
                PH_SNAKES / "train",
                encoder=EncoderConfig(spec=MOBILENET_SPEC, precision="fp32"),
                progress=False,
            )
            print(
                f"MobileNetV1 gallery: build_gallery of {len(res.gallery)} photos in {time.perf_counter() - t0:.1f} s"
            )
            gallery = res.gallery
            enc = create_encoder(MOBILENET_SPEC, precision="fp32")
        ident = Identifier(enc, gallery, vote)
        naive = naive_from_gallery(gallery, create_encoder(MOBILENET_SPEC, precision="fp32"), vote)
        print(f"MobileNetV1 gallery: {len(gallery)} photos, {gallery.index.kind} index")
        bench(
            f"MobileNetV1 (real weights, fp32), gallery {len(gallery)} photos",
            {"ours": lambda p: ours_identify(ident, p), "naive": naive.identify},
            [str(r.path) for r in q_mob],
            [r.species for r in q_mob],
            passes,
        )

        # ---------------------------------------------------------------- ViT-B-16
        if not args.no_vit:
            n_gal, n_q = (16, 3) if args.quick else (100, 20)
            enc_auto = create_encoder(VIT_SPEC, precision="auto")
            enc_fp32 = create_encoder(VIT_SPEC, precision="fp32")
            gallery = Gallery.create(Path(tmp) / "vit", enc_auto.describe())
            t0 = time.perf_counter()
            add_references(gallery, enc_auto, evenly(train, n_gal), progress=False)
            gallery.finish_build()
            dt = str(enc_auto.dtype).removeprefix("torch.")
            print(
                f"\nViT-B-16 gallery: {len(gallery)} train photos embedded at {dt} in "
                f"{time.perf_counter() - t0:.1f} s"
            )
            naive = naive_from_gallery(gallery, create_encoder(VIT_SPEC, precision="fp32"), vote)
            ident_auto = Identifier(enc_auto, gallery, vote)
            ident_fp32 = Identifier(enc_fp32, gallery, vote)
            q_vit = evenly(val, n_q)
            bench(
                f"ViT-B-16 (random weights), gallery {len(gallery)} photos",
                {
                    f"ours auto ({dt})": lambda p: ours_identify(ident_auto, p),
                    "ours fp32": lambda p: ours_identify(ident_fp32, p),
                    "naive fp32": naive.identify,
                },
                [str(r.path) for r in q_vit],
                [r.species for r in q_vit],
                passes,
            )
    print(f"\n{watch.report()}")


if __name__ == "__main__":
    main()
