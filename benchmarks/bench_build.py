"""Gallery-build throughput per inference runtime, against the machine's GEMM ceiling, the naive loop and the peer.

Prints, in one run: where it ran (CPU model, kind, AVX2 / AVX-512 / AVX512-BF16 / VNNI / AMX), the GEMM ceiling
measured now (fp32, bf16, int8), then for MobileNetV1 (real weights) and a random-weight ViT-B-16 (BioCLIP's
exact compute, saved as an open_clip local-dir folder so the peer loads the same weights):

* each runtime's build images/s (``Gallery.create`` + ``add_references`` + ``finish_build``: read, sha256,
  decode + preprocess in threads, batched inference, LanceDB, FAISS) and its share of the GEMM ceiling of its
  precision, with the share of time the model waited for decoding;
* the naive loop (one photo at a time: PIL open, preprocess, torch fp32 forward on a batch of 1);
* ``auto`` (what ``speciesid index build`` picks here) next to the explicit runtimes;
* the peer, pybioclip's ``bioclip embed`` (``SPECIESID_PEER_BIOCLIP=/path/to/bioclip`` or ``bioclip`` on PATH),
  and ``speciesid index build`` on the same photos, each as fresh processes on a few and on more photos:
  steady images/s, start-up, and the ratio;
* faithfulness: MobileNetV1 kNN top-1 on ph-snakes val (gallery = train) per runtime against torch fp32 (the
  bar: within 0.5 points), with the cosine to fp32 over all 1,190 photos.

Each configuration runs in its own worker process (load once, then timed builds on request; repeats alternate
the order so load drift hits all alike). Encoder loading (including a one-time export into the user cache,
``$SPECIESID_CACHE``) is outside the timed region and reported apart. Nothing here asserts: it prints.

    .venv/bin/python benchmarks/bench_build.py                 # default: 300 MobileNet / 48 ViT photos, 3 repeats
    .venv/bin/python benchmarks/bench_build.py --quick         # smoke run: naive, torch fp32, auto; no peer/faithfulness
    .venv/bin/python benchmarks/bench_build.py --runtimes onnx:int8,openvino:int8 --no-mobilenet
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import MOBILENET_SPEC, PH_SNAKES, REPO, CpuWatch, median, require_shared, status_mib
from _hardware import (
    GFLOP_PER_IMAGE,
    ceiling_for,
    gemm_ceiling,
    machine_report,
    peer_bioclip,
    random_vit_dir,
    run_peer,
    steady_and_startup,
)

MARK = "@@bench@@ "


def subset(n: int, split: str = "train") -> list:
    """n photos of a ph-snakes split, evenly spaced over the sorted list (so every species is in)."""
    from index.datasets import load_dataset

    records = sorted(load_dataset("folder", PH_SNAKES / split).records, key=lambda r: str(r.path))
    n = min(n, len(records))
    return [records[int(i * len(records) / n)] for i in range(n)]


def default_configs(model: str, kind: str, quick: bool) -> list[tuple[str, str, str]]:
    """(method, runtime, precision) per model: naive, torch fp32, auto, then each runtime this CPU can run well."""
    from retrieval.cpu import has_native_bf16, has_vnni

    out = [("naive", "torch", "fp32"), ("ours", "torch", "fp32"), ("ours", "auto", "auto")]
    if quick:
        return out
    bf16 = has_native_bf16(kind)
    extra = [("onnx", "fp32"), ("openvino", "fp32")] + ([("openvino", "bf16"), ("torch", "bf16")] if bf16 else [])
    if model == "ViT-B-16":
        extra += [("onnx", "int8"), ("torch", "int8")] + ([("openvino", "int8")] if has_vnni(kind) else [])
    return out + [("ours", rt, p) for rt, p in extra]


def parse_runtimes(text: str) -> list[tuple[str, str]]:
    """``--runtimes``' comma-separated runtime:precision as (runtime, precision) pairs; ValueError naming the ones
    not written so."""
    named = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in named if x.count(":") != 1]
    if bad:
        raise ValueError(f"--runtimes {','.join(bad)}: write each as runtime:precision, e.g. onnx:int8")
    return [(runtime, precision) for runtime, precision in (x.split(":") for x in named)]


def with_runtimes(configs: list[tuple[str, str, str]],
                  runtimes: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """``--runtimes`` (:func:`parse_runtimes`): naive, torch fp32 and auto (the first three of ``configs``), then
    each runtime:precision named, once (one the three already hold, e.g. torch:fp32, is not built twice)."""
    return list(dict.fromkeys(configs[:3] + [("ours", *x) for x in runtimes]))


class Worker:
    """One configuration in its own process: loads the encoder once, then runs timed builds on request."""

    def __init__(self, spec: str, method: str, runtime: str, precision: str, n: int, batch: int) -> None:
        self.label = f"{method} {runtime}:{precision}"
        self.stderr = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, __file__, "--worker", json.dumps([spec, method, runtime, precision, n, batch])]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        self.proc.wait()
        self.stderr.seek(0)
        return {"error": f"worker {self.label} failed (exit {self.proc.returncode}): {self.stderr.read()[-1500:]}"}

    def ready(self) -> dict:
        return self._reply()

    def run(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=120)
        self.stderr.close()


def worker_main(spec: str, method: str, runtime: str, precision: str, n: int, batch: int) -> None:
    """The worker process: load, warm up, say ready, then one timed build per 'run' line on stdin."""
    import logging

    import numpy as np
    from PIL import Image

    logging.disable(logging.WARNING)  # the random-weights warning, the one-time export notice
    from index.gallery import Gallery
    from retrieval.encoders import create_encoder
    from retrieval.pipeline import add_references

    def say(obj: dict) -> None:
        print(MARK + json.dumps(obj), flush=True)

    records = subset(n)
    t0 = time.perf_counter()
    enc = create_encoder(spec, runtime=runtime, precision=precision, batch_size=batch, device="cpu",
                         photos=[r.path for r in subset(300)])
    load_s = time.perf_counter() - t0
    with Image.open(records[0].path) as im:  # warm-up: one forward outside the timed region
        enc.encode_batch(enc.preprocess(im.convert("RGB"))[None])
    say({"load_s": load_s, "ran": f"{enc.runtime} {enc.precision}", "rss_loaded_mib": status_mib("VmRSS")})
    for line in sys.stdin:
        if line.strip() != "run":
            break
        cpu0 = time.process_time()
        wait_s = encode_s = 0.0
        with tempfile.TemporaryDirectory(prefix="bench_build_") as tmp:
            t0 = time.perf_counter()
            if method == "ours":
                gallery = Gallery.create(Path(tmp) / "gallery", enc.describe())
                report = add_references(gallery, enc, records, progress=False)
                gallery.finish_build()
                done = report.added + len(report.duplicates)
                wait_s, encode_s = report.stats.wait_s, report.stats.encode_s
            else:
                rows = []
                for rec in records:
                    x = enc.preprocess(Image.open(rec.path).convert("RGB"))
                    rows.append(enc.encode_batch(x[None]))
                done = int(np.concatenate(rows).shape[0])
            seconds = time.perf_counter() - t0
        say({"seconds": seconds, "cpu_s": time.process_time() - cpu0, "images": done, "wait_s": wait_s,
             "encode_s": encode_s, "peak_rss_mib": status_mib("VmHWM")})


def _busy_s() -> float:
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:9]]
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return float("nan")


def bench_model(name: str, spec: str, configs: list, n: int, repeats: int, batch: int, gemm: dict) -> dict:
    """Builds of one model per configuration; prints the table; returns {config: median img/s}."""
    workers = {c: Worker(spec, *c, n, batch) for c in configs}
    info, results = {}, {c: [] for c in configs}
    try:
        for c, w in workers.items():
            info[c] = w.ready()
            if "error" in info[c]:
                print(f"  {name} {c}: {info[c]['error']}")
        live = [c for c in configs if "error" not in info[c]]
        for rep in range(repeats):
            for c in live if rep % 2 == 0 else live[::-1]:
                busy0 = _busy_s()
                r = workers[c].run()
                if "error" in r:
                    print(f"  {name} {c}: {r['error']}")
                    live.remove(c)
                    continue
                r["others"] = max(0.0, _busy_s() - busy0 - r["cpu_s"]) / r["seconds"]
                results[c].append(r)
                print(f"  rep {rep + 1}: {name} {c[0]:5s} {c[1]}:{c[2]:4s} -> {info[c]['ran']:14s} {r['images']} photos "
                      f"in {r['seconds']:6.2f} s = {r['images'] / r['seconds']:6.2f} img/s; other processes used "
                      f"{r['others']:.2f} cores", flush=True)
    finally:
        for w in workers.values():
            w.close()
    ips = {c: median([r["images"] / r["seconds"] for r in results[c]]) for c in configs if results[c]}
    naive = ips.get(("naive", "torch", "fp32"))
    print(f"\n{name}, {n} photos, medians of {repeats} repeat(s); ceiling = the GEMM rate of the precision that ran")
    print("| method | asked | ran | img/s | x naive | share of GEMM ceiling | model waited | load s | peak RSS MiB |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for c in configs:
        if c not in ips:
            continue
        ran_prec = info[c]["ran"].split()[-1]
        ceiling = ceiling_for(gemm, ran_prec)
        share = ips[c] * GFLOP_PER_IMAGE[name] / ceiling if ceiling else float("nan")
        waited = median([r["wait_s"] / r["seconds"] for r in results[c]]) if c[0] == "ours" else float("nan")
        print(f"| {c[0]} | {c[1]}:{c[2]} | {info[c]['ran']} | {ips[c]:.2f} | "
              f"{ips[c] / naive if naive else float('nan'):.2f}x | {share:.0%} | "
              f"{'-' if c[0] == 'naive' else f'{waited:.0%}'} | {info[c]['load_s']:.1f} | "
              f"{max(r['peak_rss_mib'] for r in results[c]):.0f} |")
    return ips


def peer_section(model_dir: Path, small: int, large: int, repeats: int) -> None:
    """speciesid index build (auto) and bioclip embed, fresh processes on the same photos: steady rate, start-up."""
    bioclip = peer_bioclip()
    if bioclip is None:
        print("\npeer: pybioclip not found (set SPECIESID_PEER_BIOCLIP=/path/to/bioclip or put bioclip on PATH): "
              "skipped")
        return
    records = subset(large)
    times: dict[str, dict[int, list[float]]] = {"speciesid": {}, "bioclip": {}}
    with tempfile.TemporaryDirectory(prefix="bench_peer_") as tmp:
        roots = {}
        for k in (small, large):
            root = Path(tmp) / f"photos{k}"
            for r in records[:k] if k == small else records:
                (root / r.species).mkdir(parents=True, exist_ok=True)
                os.symlink(r.path, root / r.species / Path(r.path).name)
            roots[k] = root
        for _ in range(repeats):
            for k in (small, large):
                gal = Path(tmp) / f"gal{k}"
                cmd = [sys.executable, "-m", "api.cli", "index", "build", "--dataset", "folder", "--root",
                       str(roots[k]), "--encoder", f"open_clip:local-dir:{model_dir}", "--index", str(gal), "-q"]
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                times["speciesid"].setdefault(k, []).append(time.perf_counter() - t0)
                subprocess.run(["rm", "-rf", str(gal)], check=True)
                photos = sorted(str(p) for p in roots[k].rglob("*.*"))
                times["bioclip"].setdefault(k, []).append(run_peer(bioclip, model_dir, photos))
                print(f"  peer runs, {k} photos: speciesid {times['speciesid'][k][-1]:.1f} s, "
                      f"bioclip embed {times['bioclip'][k][-1]:.1f} s", flush=True)
    print(f"\nViT-B-16 end to end, fresh processes: {small} and {large} photos (min over {repeats} run(s))")
    print("| tool | s for small | s for large | steady img/s | start-up s |")
    print("|---|---:|---:|---:|---:|")
    rates = {}
    for tool, d in times.items():
        ts, tl = min(d[small]), min(d[large])
        rates[tool], start = steady_and_startup(small, ts, large, tl)
        print(f"| {tool} | {ts:.1f} | {tl:.1f} | {rates[tool]:.2f} | {start:.1f} |")
    print(f"speciesid index build (auto) = {rates['speciesid'] / rates['bioclip']:.2f}x bioclip embed, steady state; "
          f"{min(times['bioclip'][large]) / min(times['speciesid'][large]):.2f}x end to end on {large} photos")


def faithfulness_section(configs: list[tuple[str, str]]) -> None:
    """MobileNetV1 kNN top-1 on ph-snakes val (gallery = train) per runtime, against torch fp32."""
    import numpy as np

    from retrieval.calibrate import knn_matrix
    from retrieval.encoders import create_encoder
    from retrieval.pipeline import embed_sources
    from retrieval.vote import VoteConfig

    train, val = subset(10_000, "train"), subset(10_000, "val")
    paths = [str(r.path) for r in train + val]
    species = sorted({r.species for r in train})
    y_train = np.array([species.index(r.species) for r in train])
    y_val = np.array([species.index(r.species) for r in val])
    vote = VoteConfig()
    print(f"\nfaithfulness: MobileNetV1 kNN top-1 on ph-snakes val ({len(val)} photos; gallery = {len(train)} train "
          f"photos; k={vote.k}, T={vote.temperature}); one val photo = {100 / len(val):.2f} points")
    print("| runtime | ran | top-1 | delta vs torch fp32 (points) | within 0.5 | cos min | cos mean |")
    print("|---|---|---:|---:|---|---:|---:|")
    ref = None
    for rt, prec in [("torch", "fp32"), *configs]:
        try:
            enc = create_encoder(MOBILENET_SPEC, runtime=rt, precision=prec, device="cpu",
                                 photos=[r.path for r in subset(300)])
        except ValueError as exc:
            print(f"| {rt}:{prec} | refused: {exc} | | | | | |")
            continue
        emb, errors = embed_sources(paths, enc)
        assert not any(errors)
        top1 = float((knn_matrix(emb[len(train):], emb[: len(train)], y_train, len(species), vote.k,
                                 vote.temperature).argmax(1) == y_val).mean())
        if ref is None:
            ref = (emb, top1)
        cos = (emb * ref[0]).sum(1)
        delta = 100 * (top1 - ref[1])
        print(f"| {rt}:{prec} | {enc.runtime} {enc.precision} | {top1:.4f} | {delta:+.2f} | "
              f"{'yes' if abs(delta) <= 0.5 else 'NO'} | {cos.min():.4f} | {cos.mean():.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 40 / 6 photos, 1 repeat, fewer runtimes")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per configuration (default 3)")
    ap.add_argument("--mobilenet-photos", type=int, default=None, help="photos for MobileNet (default 300)")
    ap.add_argument("--vit-photos", type=int, default=None, help="photos for ViT-B-16 (default 48)")
    ap.add_argument("--runtimes", help="comma-separated runtime:precision to build with besides naive, torch:fp32 "
                    "and auto (default: every runtime this CPU kind runs well)")
    ap.add_argument("--no-vit", action="store_true", help="skip ViT-B-16 (and the peer)")
    ap.add_argument("--no-mobilenet", action="store_true", help="skip MobileNetV1 (and the faithfulness table)")
    ap.add_argument("--no-peer", action="store_true", help="skip the pybioclip comparison")
    ap.add_argument("--no-faithfulness", action="store_true", help="skip the MobileNetV1 kNN top-1 table")
    ap.add_argument("--batch-size", type=int, default=32, help="encoder batch size for 'ours' (default 32)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(*json.loads(args.worker))
        return
    runtimes: list[tuple[str, str]] = []
    if args.runtimes:
        try:
            runtimes = parse_runtimes(args.runtimes)
        except ValueError as exc:
            ap.error(str(exc))
    require_shared()
    from retrieval.cpu import cpu_kind

    repeats = args.repeats or (1 if args.quick else 3)
    kind = cpu_kind()
    print("bench_build: where it ran\n" + machine_report())
    gemm = gemm_ceiling(0.5 if args.quick else 1.5)
    print("GEMM ceiling measured now (1576x768 @ 768x3072, all cores): "
          + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in gemm.items()))
    watch, t_all = CpuWatch(), time.perf_counter()
    models = []
    if not args.no_mobilenet:
        models.append(("MobileNetV1", MOBILENET_SPEC, args.mobilenet_photos or (40 if args.quick else 300)))
    vit_dir = None
    if not args.no_vit:
        vit_dir = random_vit_dir()
        models.append(("ViT-B-16", f"open_clip:local-dir:{vit_dir}", args.vit_photos or (6 if args.quick else 48)))
    chosen: list[tuple[str, str]] = []
    for name, spec, n in models:
        configs = default_configs(name, kind, args.quick)
        if args.runtimes:
            configs = with_runtimes(configs, runtimes)
        if name == "MobileNetV1":
            chosen = [(c[1], c[2]) for c in configs if c[0] == "ours" and c[1] != "torch"]
        print(f"\n{name}: {n} photos per build, batch {args.batch_size}")
        ips = bench_model(name, spec, configs, n, repeats, args.batch_size, gemm)
        auto = ips.get(("ours", "auto", "auto"))
        naive = ips.get(("naive", "torch", "fp32"))
        if auto and naive:
            print(f"{name}: auto build = {auto / naive:.2f}x the naive one-photo loop")
    if vit_dir is not None and not args.no_peer and not args.quick:
        peer_section(vit_dir, 8, args.vit_photos or 48, 1 if args.repeats is None else args.repeats)
    if not args.no_mobilenet and not args.no_faithfulness and not args.quick:
        faithfulness_section(chosen)
    print(f"\n{watch.report()}; total wall {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
