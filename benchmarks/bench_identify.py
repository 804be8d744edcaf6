"""Per-photo identify latency (p50/p95/p99, ms) per inference runtime, against a naive path; and start-up end to end.

One request at a time, from the photo file to the answer: decode -> encode -> search -> vote.

* ours: ``retrieval.pipeline.embed_sources([path], encoder)`` + ``Identifier.identify_embeddings`` -- the path
  ``speciesid identify PHOTO`` takes for one photo (FAISS search, neighbour metadata from LanceDB, kNN vote,
  roll-up, venomous score) -- once per runtime: torch fp32, ``auto`` (what the CLI picks here), and each
  exported runtime this CPU runs well (every runtime has the same fingerprint, so one gallery serves all).
* naive: ``PIL.Image.open(p).convert("RGB")`` + ``encoder.preprocess`` + torch fp32 forward on 1 image + numpy
  brute force ``gallery_matrix @ q`` + full ``argsort`` + a Python dict vote (same k and temperature).
* start-up: ``speciesid identify --index GALLERY PHOTO`` as a fresh process on the ViT-B-16 gallery, warm cache
  (the exported model made by an earlier run), per runtime: wall seconds, and whether torch was imported.

Galleries: MobileNetV1 (real weights) over all 980 ph-snakes train photos, queried with the 210 val photos;
a random-weight ViT-B-16 (BioCLIP's compute, an open_clip local-dir folder) over 100 train photos, 20 queries.
Each pass runs every method over all queries in blocks (order reversed every pass); medians over passes.

    .venv/bin/python benchmarks/bench_identify.py           # default: 3 passes
    .venv/bin/python benchmarks/bench_identify.py --quick   # smoke run: small galleries, few queries, 1 pass

``--quick`` also skips what costs minutes of CPU and measures nothing a smoke run needs: the ViT-B-16 is
given no calibration photos, so ``auto`` does not int8-quantise it (NNCF calibration) and takes the next
candidate of this CPU kind (an int8 export already in the runtime cache is still used); the start-up part
runs ``--runtime torch`` only (``auto`` there would calibrate an int8 export on the small gallery's photos).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from _common import MOBILENET_SPEC, PH_SNAKES, REPO, CpuWatch, evenly, median, peak_rss_mib, require_shared
from _hardware import machine_report, random_vit_dir


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
        votes: dict[str, float] = defaultdict(float)
        for j in order:
            votes[self.labels[j]] += math.exp((sims[j] - sims[order[0]]) / self.t)
        return max(votes, key=votes.get)


def ours_identify(identifier, path: str) -> str:
    from retrieval.pipeline import embed_sources

    emb, errors = embed_sources([path], identifier.encoder)
    if errors[0] is not None:
        raise RuntimeError(f"{path}: {errors[0]}")
    return identifier.identify_embeddings(emb)[0].predictions[0].species


def naive_from_gallery(gallery, encoder, vote) -> NaiveIdentifier:
    """The naive side gets the same reference vectors and labels, as a plain matrix and list."""
    ids, matrix = gallery.store.vectors()
    labels = gallery.store.species_of(list(map(int, ids)))
    return NaiveIdentifier(encoder, matrix, labels, vote.k, vote.temperature)


def runtime_configs(kind: str, transformer: bool, quick: bool) -> list[tuple[str, str]]:
    """torch fp32, auto, then the exported runtimes this CPU kind runs well."""
    from retrieval.cpu import has_native_bf16, has_vnni

    out = [("torch", "fp32"), ("auto", "auto")]
    if quick:
        return out
    out += [("onnx", "fp32"), ("openvino", "fp32")]
    if has_native_bf16(kind):
        out += [("openvino", "bf16"), ("torch", "bf16")]
    if transformer:
        out += [("onnx", "int8"), ("torch", "int8")] + ([("openvino", "int8")] if has_vnni(kind) else [])
    return out


def bench(name: str, runners: dict, queries: list[str], truth: list[str], passes: int) -> dict:
    """Each runner over the queries in blocks; per pass latency percentiles and img/s; medians over passes."""
    names = list(runners)
    for fn in runners.values():  # warm-up: two queries outside the timed region
        for q in queries[:2]:
            fn(q)
    per_pass: dict[str, list[dict]] = {n: [] for n in names}
    answers: dict[str, list[str]] = {}
    for p in range(passes):
        for n in names if p % 2 == 0 else names[::-1]:
            time.sleep(0.2)  # let the previous block's spinning BLAS/OpenMP threads go idle
            lat, got = [], []
            for q in queries:
                t0 = time.perf_counter()
                got.append(runners[n](q))
                lat.append((time.perf_counter() - t0) * 1000.0)
            v = np.asarray(lat)
            per_pass[n].append({"p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)),
                                "p99": float(np.percentile(v, 99)), "ips": len(v) / (v.sum() / 1000.0)})
            answers[n] = got
    out = {}
    print(f"\n{name}: {len(queries)} queries, one at a time, {passes} pass(es); medians over passes")
    print("| method | p50 ms | p95 ms | p99 ms | images/s | top-1 vs truth | same answer as torch fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    ref = next(n for n in names if "torch fp32" in n and not n.startswith("naive"))
    for n in names:
        fig = {key: median([pp[key] for pp in per_pass[n]]) for key in ("p50", "p95", "p99", "ips")}
        fig["top1"] = float(np.mean([a == t for a, t in zip(answers[n], truth, strict=True)]))
        same = float(np.mean([a == b for a, b in zip(answers[n], answers[ref], strict=True)]))
        out[n] = fig
        print(f"| {n} | {fig['p50']:.1f} | {fig['p95']:.1f} | {fig['p99']:.1f} | {fig['ips']:.1f} | "
              f"{fig['top1']:.3f} | {same:.0%} |")
    naive = next(n for n in names if n.startswith("naive"))
    for n in names:
        if n != naive:
            print(f"{n}: {out[naive]['p50'] / out[n]['p50']:.2f}x the naive path by median latency")
    return out


def identifiers(spec: str, gallery, vote, configs, photos) -> dict:
    """{label: identify function} per runtime (labels say what actually ran)."""
    from retrieval.encoders import create_encoder
    from retrieval.identify import Identifier

    out = {}
    for rt, prec in configs:
        try:
            t0 = time.perf_counter()
            enc = create_encoder(spec, runtime=rt, precision=prec, device="cpu", photos=photos)
        except ValueError as exc:
            print(f"  {rt}:{prec}: not run ({exc})")
            continue
        label = f"ours {rt}:{prec} -> {enc.runtime} {enc.precision}"
        print(f"  loaded {label} in {time.perf_counter() - t0:.1f} s", flush=True)
        ident = Identifier(enc, gallery, vote)
        out[label] = lambda p, ident=ident: ours_identify(ident, p)
    return out


def startup_section(index: Path, photo: str, configs: list[tuple[str, str]], runs: int) -> None:
    """Fresh ``speciesid identify`` processes on a warm cache: wall seconds, and whether torch was imported."""
    probe = ("import sys, time; t0 = time.perf_counter(); from api.cli import main; "
             "rc = main(sys.argv[1:]); "
             "print('@@', rc, time.perf_counter() - t0, 'torch' in sys.modules, file=sys.stderr)")
    print(f"\nstart-up: `speciesid identify --index GALLERY PHOTO` on the ViT-B-16 gallery, fresh process, warm cache "
          f"({runs} runs; the first run of a runtime may still fill OpenVINO's compiled-model cache)")
    print("| runtime | wall s (median) | min | max | in-process s (median) | torch imported |")
    print("|---|---:|---:|---:|---:|---|")
    for rt, prec in configs:
        walls, inner, torch_in = [], [], set()
        for _ in range(runs):
            cmd = [sys.executable, "-c", probe, "identify", "--index", str(index), photo, "--runtime", rt,
                   "--precision", prec, "-q"]
            t0 = time.perf_counter()
            run = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                                 text=True)
            walls.append(time.perf_counter() - t0)
            tail = [ln for ln in run.stderr.splitlines() if ln.startswith("@@")]
            if run.returncode != 0 or not tail:
                print(f"| {rt}:{prec} | failed: {run.stderr[-300:]!r} | | | | |")
                break
            _, rc, secs, imported = tail[-1].split()
            inner.append(float(secs))
            torch_in.add(imported)
        else:
            print(f"| {rt}:{prec} | {median(walls):.2f} | {min(walls):.2f} | {max(walls):.2f} | {median(inner):.2f} | "
                  f"{'/'.join(sorted(torch_in))} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 200/16 gallery photos, 20/3 queries, 1 pass; skips the ViT-B-16 int8 export "
                         "(no calibration photos) and start-up's auto runtime (see above); 1-2 min of CPU, warm to "
                         "cold cache (docs/benchmarks.md)")
    ap.add_argument("--passes", type=int, default=None, help="passes over the queries (default 3)")
    ap.add_argument("--startup-runs", type=int, default=None, help="fresh identify processes per runtime (default 5)")
    ap.add_argument("--no-vit", action="store_true", help="skip the ViT-B-16 part (and start-up)")
    ap.add_argument("--no-mobilenet", action="store_true", help="skip the MobileNetV1 part")
    args = ap.parse_args()
    require_shared()
    logging.disable(logging.WARNING)  # random-weights warning, one-time export notices
    from index.datasets import load_dataset
    from index.gallery import Gallery
    from retrieval.cpu import cpu_kind
    from retrieval.encoders import create_encoder
    from retrieval.pipeline import add_references
    from retrieval.vote import VoteConfig

    passes = args.passes or (1 if args.quick else 3)
    vote = VoteConfig()
    kind = cpu_kind()
    train = sorted(load_dataset("folder", PH_SNAKES / "train").records, key=lambda r: str(r.path))
    val = sorted(load_dataset("folder", PH_SNAKES / "val").records, key=lambda r: str(r.path))
    print("bench_identify: where it ran\n" + machine_report() + f"\nvote: k={vote.k}, T={vote.temperature}")
    watch = CpuWatch()
    calib = [r.path for r in evenly(train, 300)]
    with tempfile.TemporaryDirectory(prefix="bench_identify_") as tmp:
        parts = []
        if not args.no_mobilenet:
            parts.append(("MobileNetV1 (real weights)", MOBILENET_SPEC, evenly(train, 200 if args.quick else None),
                          evenly(val, 20 if args.quick else None), False))
        vit_index = None
        if not args.no_vit:
            spec = f"open_clip:local-dir:{random_vit_dir()}"
            parts.append(("ViT-B-16 (random weights)", spec, evenly(train, 16 if args.quick else 100),
                          evenly(val, 3 if args.quick else 20), True))
        for name, spec, refs, queries, transformer in parts:
            t0 = time.perf_counter()
            photos = None if args.quick and transformer else calib  # --quick: no int8 calibration of the ViT
            builder = create_encoder(spec, device="cpu", photos=photos)  # auto: the fastest faithful here
            gallery = Gallery.create(Path(tmp) / name.split()[0], builder.describe())
            report = add_references(gallery, builder, refs, progress=False)
            gallery.finish_build()
            print(f"\n{name}: gallery of {len(gallery)} photos built with {builder.runtime} {builder.precision} in "
                  f"{time.perf_counter() - t0:.1f} s (model waited for decoding "
                  f"{report.stats.wait_share(report.seconds):.0%} of the time)")
            runners = identifiers(spec, gallery, vote, runtime_configs(kind, transformer, args.quick), photos)
            naive = naive_from_gallery(gallery, create_encoder(spec, runtime="torch", precision="fp32", device="cpu"),
                                       vote)
            runners["naive torch fp32"] = naive.identify
            bench(f"{name}, gallery {len(gallery)} photos", runners, [str(r.path) for r in queries],
                  [r.species for r in queries], passes)
            if transformer:
                vit_index = (gallery.root, str(queries[0].path))
            del runners, naive, builder
        if vit_index is not None:
            # --quick: not auto, which would int8-calibrate on the small gallery's photos (minutes of CPU)
            configs = [("torch", "auto")] if args.quick else [("auto", "auto"), ("torch", "auto"), ("onnx", "fp32")]
            startup_section(vit_index[0], vit_index[1], configs, args.startup_runs or (2 if args.quick else 5))
    print(f"\n{watch.report()}")
    print(f"peak RSS of this process: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
