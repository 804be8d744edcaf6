"""The CUDA paths on a GPU machine: the encoders (a gallery build's images/s, one-photo latency, GPU memory) beside
the naive way, this machine's CPU and the peer; then the fine-tuning recipe on CUDA (bf16 autocast).

Encoders: a random-weight ViT-B-16 (BioCLIP's exact compute, saved as an open_clip local-dir folder so the peer
loads the same weights) and MobileNetV1 (the real weights), on ph-snakes photos (train + val, 1,190):

* **build**: ``embed_sources`` (read, sha256, decode + preprocess in threads, batched forward), the path
  ``speciesid index build`` takes, per precision (fp32, bf16, fp16 on CUDA), median of ``--repeats`` passes;
* **forward**: the encoder alone on one preprocessed batch (host-to-device copy and L2 norm included): the ceiling
  the build approaches when decoding keeps up;
* **one photo**: decode + preprocess + forward of a single photo, what ``identify`` does per query: p50/p95/p99;
* **naive**: fp32, one photo at a time, one decode thread (no batching, no overlap);
* **CPU**: the same build on this machine's cores (torch, ``auto`` precision), for the GPU / CPU ratio;
* **peer**: pybioclip's ``bioclip embed --device cuda`` (``SPECIESID_PEER_BIOCLIP`` or ``bioclip`` on PATH), fresh
  processes on few photos and on ``--peer-copies`` copies of all: steady images/s and start-up, beside ours run
  the same way.

Fine-tuning (run first: its loaders fork worker processes, which must not happen once lancedb is loaded):
``speciesid finetune --time-budget 20`` (the shipped recipe) on the GPU for each ``--seeds`` seed
while ``--deadline-min`` leaves room for another (the first run's minutes are the estimate), into
``--out-root/ft-gpu-sSEED``; epochs, seconds an epoch, the whole run, the size chosen, the held-out figures and the
peak GPU memory are printed. Val is read afterwards, on any machine, with
``benchmarks/bench_finetune.py --skip-frozen --reuse --out runs/ft-gpu-sSEED`` (the product's path: index build,
probe import, identify).

Nothing here asserts: it prints. Each part runs on its own, so a failure in one is printed and the next one runs.

    python benchmarks/bench_gpu.py                               # seeds 30-32 while time is left, encoders, peer
    python benchmarks/bench_gpu.py --parts encode --repeats 5
    python benchmarks/bench_gpu.py --device cpu --quick          # smoke run without a GPU
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
from _common import MOBILENET_SPEC, PH_SNAKES, CpuWatch, median, peak_rss_mib, percentiles, require_shared
from _hardware import (
    GFLOP_PER_IMAGE,
    machine_report,
    peer_bioclip,
    process_seconds,
    random_vit_dir,
    run_peer,
    steady_and_startup,
)


def gpu_report(device: str) -> str:
    """The accelerator, the torch / CUDA versions and the host's cores."""
    import torch

    if not device.startswith("cuda"):
        return f"no GPU used (device {device}); torch {torch.__version__}"
    p = torch.cuda.get_device_properties(torch.device(device))
    return (f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, compute capability "
            f"{p.major}.{p.minor}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}; host {os.cpu_count()} cores")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def _cell(value: float | None, fmt: str = ".1f") -> str:
    """A table cell: the number, or "-" where there is none (None or NaN: no GPU memory on the CPU, no batch)."""
    return "-" if value is None or value != value else format(value, fmt)


def _rate(value: float) -> str:
    """A rate in img/s: whole from 100 up (1024, not .3g's 1.02e+03), 3 significant digits below (0.4, not 0)."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _peak_gpu_mib(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20 if device.startswith("cuda") else float("nan")


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def build_rate(enc, photos: list[str], device: str, repeats: int, workers: int | None = None) -> float:
    """Median images/s of ``embed_sources`` over ``photos`` (after one warm-up pass on a few)."""
    from retrieval.pipeline import embed_sources

    embed_sources(photos[: 2 * enc.batch_size], enc, workers=workers)
    rates = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        _, errors = embed_sources(photos, enc, workers=workers)
        _sync(device)
        rates.append(len(photos) / (time.perf_counter() - t0))
        if any(errors):
            raise RuntimeError(f"{sum(e is not None for e in errors)} photos failed, e.g. {next(e for e in errors if e)}")
    return median(rates)


def forward_rate(enc, photos: list[str], device: str, seconds: float) -> float:
    """Images/s of ``encode_batch`` on one preprocessed batch, repeated for ``seconds``."""
    from retrieval.pipeline import prepare

    batch = np.stack([prepare(i, p, enc).tensor for i, p in enumerate(photos[: enc.batch_size])])
    for _ in range(3):
        enc.encode_batch(batch)
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        enc.encode_batch(batch)
        n += len(batch)
    _sync(device)
    return n / (time.perf_counter() - t0)


def one_photo_ms(enc, photos: list[str], device: str) -> list[float]:
    """Milliseconds of decode + preprocess + forward of one photo at a time (after 3 warm-up photos)."""
    from retrieval.pipeline import prepare

    out = []
    for i, p in enumerate(photos[:3] + photos):
        t0 = time.perf_counter()
        enc.encode_batch(prepare(i, p, enc).tensor[None])
        _sync(device)
        if i >= 3:
            out.append(1000 * (time.perf_counter() - t0))
    return out


def encode_part(args: argparse.Namespace, photos: list[str]) -> None:
    """The encoder table: per model, precision and way, images/s, one-photo latency, GPU memory."""
    from retrieval.encoders import create_encoder

    device = args.device
    vit_dir = random_vit_dir()
    models = [("ViT-B-16", f"open_clip:local-dir:{vit_dir}", args.vit_photos),
              ("MobileNetV1", MOBILENET_SPEC, args.mobilenet_photos)]
    precisions = ["fp32", "bf16", "fp16"] if device.startswith("cuda") else ["fp32"]
    print("\n| model | way | device, precision | batch | build img/s | forward img/s | one photo | peak GPU MiB |"
          "\n|---|---|---|---:|---:|---:|---|---:|", flush=True)
    rates: dict[tuple[str, str], float] = {}
    for name, spec, n in models:
        sel = photos[:n]
        lat_sel = sel[: args.latency_photos]
        for way, dev, prec, bs, workers in (
            [("ours", device, p, args.batch_size, None) for p in precisions]
            + [("naive (fp32, one photo at a time, 1 decode thread)", device, "fp32", 1, 1)]
            + ([("ours on this machine's CPU", "cpu", "auto", args.batch_size, None)] if device != "cpu" else [])
        ):
            try:
                enc = create_encoder(spec, device=dev, precision=prec, runtime="torch", batch_size=bs)
                few = sel
                if bs == 1:
                    few = sel[: args.naive_photos]
                elif dev == "cpu" and device != "cpu":
                    few = sel[: args.cpu_vit_photos if name == "ViT-B-16" else 4 * bs]
                _reset_peak(device)
                build = build_rate(enc, few, dev, 1 if few is not sel else args.repeats, workers)
                fwd = forward_rate(enc, sel, dev, args.forward_seconds) if bs > 1 else None  # naive: no batch
                lat = percentiles(one_photo_ms(enc, lat_sel, dev)) if way == "ours" or bs == 1 else "-"
                peak = _peak_gpu_mib(device) if dev != "cpu" else None
                precision = str(enc.dtype).removeprefix("torch.")
                rates[(name, f"{way} {precision}")] = build
                print(f"| {name} | {way} | {dev}, {precision} | {bs} | {build:.1f} ({len(few)} photos) | "
                      f"{_cell(fwd)} | {lat} | {_cell(peak, '.0f')} |", flush=True)
                del enc
            except Exception:  # noqa: BLE001 - print and go on: the other rows still count
                print(f"| {name} | {way} | {dev}, {prec} | {bs} | failed | | | |", flush=True)
                traceback.print_exc()
    if device.startswith("cuda"):
        gf = GFLOP_PER_IMAGE["ViT-B-16"]
        for key, r in rates.items():
            if key[0] == "ViT-B-16":
                print(f"ViT-B-16 {key[1]}: {r * gf / 1000:.1f} TFLOP/s of useful work at {r:.0f} img/s")
    best = {m: max((r for (mm, w), r in rates.items() if mm == m and w.startswith("ours ") and "CPU" not in w),
                   default=float("nan")) for m, _, _ in models}
    for m in best:
        naive = next((r for (mm, w), r in rates.items() if mm == m and w.startswith("naive")), float("nan"))
        cpu = next((r for (mm, w), r in rates.items() if mm == m and "CPU" in w), float("nan"))
        versus_cpu = f", {best[m] / cpu:.1f}x this machine's CPU on torch ({cpu:.1f} img/s)" if cpu == cpu else ""
        if best[m] != best[m]:  # no "ours" row of this model ran
            continue
        versus_naive = f" = {best[m] / naive:.1f}x the naive loop" if naive == naive else ""
        print(f"{m}: best build {_rate(best[m])} img/s{versus_naive}{versus_cpu}")


def peer_part(args: argparse.Namespace, photos: list[str]) -> None:
    """pybioclip's ``bioclip embed`` and ours (``retrieval.pipeline``) as fresh processes on few photos and on
    ``--peer-copies`` copies of all of them (distinct file names)."""
    peer = peer_bioclip()
    if not peer:
        print("peer: pybioclip's bioclip not found (SPECIESID_PEER_BIOCLIP or PATH): not compared")
        return
    vit_dir = random_vit_dir()
    photos = photos[: args.vit_photos]
    small = photos[: max(8, len(photos) // 8)]
    with tempfile.TemporaryDirectory(prefix="peer-photos-") as copies:
        if args.peer_copies > 1:
            photos = [shutil.copyfile(p, Path(copies) / f"{c}-{i}{Path(p).suffix}")
                      for c in range(args.peer_copies) for i, p in enumerate(photos)]
        _peer_runs(args, peer, vit_dir, small, photos)


def _peer_runs(args: argparse.Namespace, peer: str, vit_dir: Path, small: list[str], photos: list[str]) -> None:
    """The peer and ours, fresh processes on ``small`` and on ``photos``; steady rates and their ratio."""
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from retrieval.encoders import create_encoder; "
              "from retrieval.pipeline import embed_sources; "
              "e = create_encoder(sys.argv[2], device=sys.argv[3], precision=sys.argv[4], runtime='torch'); "
              "_, err = embed_sources(sys.argv[5:], e); assert not any(err)")
    repo = str(Path(__file__).resolve().parents[1])
    print(f"\npeer (ViT-B-16, {len(small)} and {len(photos)} photos, fresh processes, median of {args.peer_repeats}):")
    results = {}
    peer_name = f"pybioclip bioclip embed --device {args.device} (fp32)"

    def ours(precision: str):
        return lambda ph: process_seconds([sys.executable, "-c", script, repo, f"open_clip:local-dir:{vit_dir}",
                                           args.device, precision, *ph])

    ways = {peer_name: lambda ph: run_peer(peer, vit_dir, ph, device=args.device),
            "ours, bf16": ours("bf16"), "ours, fp32": ours("fp32")}
    for name, seconds in ways.items():
        try:
            ts = [seconds(small) for _ in range(args.peer_repeats)]
            tl = [seconds(photos) for _ in range(args.peer_repeats)]
            rate, startup = steady_and_startup(len(small), median(ts), len(photos), median(tl))
            results[name] = rate
            print(f"  {name}: steady {rate:.1f} img/s, start-up {startup:.1f} s "
                  f"(wall {median(ts):.1f} s / {median(tl):.1f} s)", flush=True)
        except Exception:  # noqa: BLE001
            print(f"  {name}: failed")
            traceback.print_exc()
    p = results.get(peer_name)
    for name, r in results.items():
        if p and name.startswith("ours"):
            print(f"  {name} / pybioclip: {r / p:.2f}x steady")


def _epoch_seconds(out: Path) -> list[float]:
    with open(out / "log.csv", newline="") as fh:
        return [float(r["seconds"]) for r in csv.DictReader(fh) if r["epoch"] != "0" and r["seconds"]]


def finetune_part(args: argparse.Namespace, deadline: float | None) -> None:
    """The shipped recipe per seed on ``args.device`` while the deadline (``time.monotonic()``) leaves room for
    another run."""
    from finetune.train import FinetuneConfig, finetune

    recipe = "--quick: 1 epoch, no time budget" if args.quick else "the shipped recipe (--time-budget 20)"
    print(f"\nfine-tuning MobileNetV1 on {args.device}: {recipe}, seeds {args.seeds}", flush=True)
    print("| seed | epochs run (kept), stop | s / epoch (median) | whole run | size chosen | held-out head top-1 (the "
          "kept epoch, training size) | held-out kNN / head / blend (final evaluation, size chosen) | peak GPU MiB | "
          "peak RSS MiB |\n|---|---|---:|---:|---|---:|---|---:|---:|", flush=True)
    last_min = None
    for seed in args.seeds:
        if deadline is not None and last_min is not None and time.monotonic() + 60 * 1.3 * last_min > deadline:
            print(f"| {seed} | skipped: the deadline leaves no room for another run ({last_min:.1f} min each) |")
            continue
        out = Path(args.out_root) / f"ft-gpu-s{seed}"
        extra = {"epochs": 1, "time_budget": None} if args.quick else {"time_budget": 20}
        cfg = FinetuneConfig(root=str(PH_SNAKES / "train"), out=str(out), init=MOBILENET_SPEC, device=args.device,
                             seed=seed, **extra)
        try:
            _reset_peak(args.device)
            t0 = time.perf_counter()
            res = finetune(cfg, progress=False)
            last_min = (time.perf_counter() - t0) / 60
            info = json.loads((out / "config.json").read_text())["speciesid"]
            final = res.final or {}
            trio = " / ".join(f"{final[k]:.3f}" if isinstance(final.get(k), float) else "-"
                              for k in ("knn_top1", "head_top1", "blend_top1"))
            print(f"| {seed} | {res.epochs_run} ({res.best_epoch}), {res.stopped} | "
                  f"{statistics.median(_epoch_seconds(out)):.1f} | {last_min:.1f} min "
                  f"({info.get('process_wall_seconds', 0) / 60:.1f} in the run) | {res.test_size.get('size')} | "
                  f"{_cell(res.best.get('val_top1'), '.3f')} | {trio} | {_cell(_peak_gpu_mib(args.device), '.0f')} | "
                  f"{peak_rss_mib():.0f} |", flush=True)
            print(f"  seed {seed}: final evaluation settings "
                  + json.dumps({k: v for k, v in final.items() if not isinstance(v, list)}), flush=True)
        except Exception:  # noqa: BLE001
            print(f"| {seed} | failed |", flush=True)
            traceback.print_exc()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (a smoke run; default cuda)")
    ap.add_argument("--parts", default="encode,peer,finetune",
                    help="comma-separated: encode, peer, finetune (default all three)")
    ap.add_argument("--quick", action="store_true", help="smoke run: few photos, 1 repeat, 1 fine-tuning epoch")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per configuration (default 3)")
    ap.add_argument("--batch-size", type=int, default=64, help="encoder batch size for 'ours' (default 64)")
    ap.add_argument("--vit-photos", type=int, default=1190, help="photos for ViT-B-16 (default all 1,190)")
    ap.add_argument("--mobilenet-photos", type=int, default=1190, help="photos for MobileNetV1 (default 1,190)")
    ap.add_argument("--cpu-vit-photos", type=int, default=64, help="photos for ViT-B-16 on the CPU (default 64)")
    ap.add_argument("--naive-photos", type=int, default=200, help="photos for the naive loop (default 200)")
    ap.add_argument("--latency-photos", type=int, default=100, help="photos timed one at a time (default 100)")
    ap.add_argument("--forward-seconds", type=float, default=3.0, help="seconds of forward passes (default 3)")
    ap.add_argument("--peer-repeats", type=int, default=1, help="fresh processes per size for the peer (default 1)")
    ap.add_argument("--peer-copies", type=int, default=4,
                    help="the peer's large run embeds this many copies of the photos (default 4)")
    ap.add_argument("--seeds", default="30,31,32", help="fine-tuning seeds (default 30,31,32)")
    ap.add_argument("--deadline-min", type=float, default=None,
                    help="start no further fine-tuning run unless 1.3x the last one still ends within these minutes of "
                         "the start")
    ap.add_argument("--out-root", default="runs", help="where the fine-tuned runs go (default runs/)")
    args = ap.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.quick:  # smaller defaults; an option given on the command line still wins
        quick = {"repeats": 1, "vit_photos": 32, "mobilenet_photos": 64, "cpu_vit_photos": 8, "latency_photos": 5,
                 "forward_seconds": 0.5, "naive_photos": 8, "peer_copies": 2}
        for name, value in quick.items():
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, value)
    logging.basicConfig(level=logging.WARNING)
    require_shared()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --device cpu for a smoke run, or on a machine with a GPU")
    print("bench_gpu: where it ran\n" + machine_report() + "\n" + gpu_report(args.device), flush=True)
    watch = CpuWatch()
    from index.datasets import load_dataset

    photos = [str(r.path) for s in ("train", "val") for r in load_dataset("folder", PH_SNAKES / s).records]
    rng = np.random.default_rng(0)
    photos = [photos[i] for i in rng.permutation(len(photos))]  # species mixed, as a gallery build sees them
    parts = set(args.parts.split(","))
    t0 = time.perf_counter()
    deadline = time.monotonic() + 60 * args.deadline_min if args.deadline_min else None
    if "finetune" in parts:  # first: its loaders fork worker processes, which must happen before lancedb is loaded
        finetune_part(args, deadline)  # (the encode part builds galleries)
    if "encode" in parts:
        encode_part(args, photos)
    if "peer" in parts:
        peer_part(args, photos)
    print(f"\nbench_gpu: {time.perf_counter() - t0:.0f} s; peak RSS {peak_rss_mib():.0f} MiB")
    print(watch.report())


if __name__ == "__main__":
    main()
