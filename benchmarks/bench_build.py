"""Gallery-build throughput (images/s) and peak memory: our pipeline against a naive one-at-a-time loop.

Photos: ph-snakes train (224x224 JPEGs). Encoders: the real MobileNetV1 at fp32 and at ``auto``, and a
random-weight open_clip ViT-B-16 (BioCLIP's exact compute) at fp32 and bf16.

* ours:  ``Gallery.create`` + ``retrieval.pipeline.add_references`` + ``Gallery.finish_build`` into a fresh
  temp dir -- what ``build_gallery`` does after the encoder is loaded: read, sha256, decode and preprocess
  in worker threads, batched inference, LanceDB write, FAISS index build and save.
* naive: a plain loop, one photo at a time: ``PIL.Image.open(p).convert("RGB")``, ``encoder.preprocess``,
  fp32 forward on a batch of 1 (``encode_batch(x[None])``: inference mode + L2-normalise), rows collected
  into a numpy array. Nothing is written to disk.

Each configuration runs in its own worker process (its peak RSS, VmHWM, is its own), which loads the
encoder once and then runs one timed build per request; repeats interleave across the configurations of
a model (order reversed every repeat) so drifting machine load hits them alike. Encoder loading and a
one-photo warm-up are outside the timed region. Throughputs are medians over repeats. Peak RSS is given
for the first build of the fresh process (what one ``speciesid index build`` sees) and over all repeats
(it creeps up between builds in one process: glibc keeps freed memory, see docs/benchmarks.md). Each
line also says how many cores other processes used meanwhile: this machine is shared.

    .venv/bin/python benchmarks/bench_build.py            # default: 300 MobileNet / 48 ViT photos, 3 repeats
    .venv/bin/python benchmarks/bench_build.py --quick    # smoke run: 40 / 6 photos, 1 repeat
    .venv/bin/python benchmarks/bench_build.py --no-vit --batch-size 8   # MobileNet only, encoder batch 8
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

from _common import MOBILENET_SPEC, PH_SNAKES, VIT_SPEC, CpuWatch, median, require_shared

#: ViT-B-16 image tower, 224 px: ~17.6 GMAC = ~35 GFLOP per image.
VIT_GFLOP_PER_IMAGE = 35.0
#: Measured once on this machine (2 cores): sustained GEMM speed.
GIVEN_GFLOPS = {"fp32": 173.0, "bf16": 742.0}


def _status_mib(field: str) -> float:
    """A VmXXX line of /proc/self/status, MiB (NaN where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _busy_s() -> float:
    """CPU-seconds all processes have been busy since boot (/proc/stat)."""
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:9]]
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return float("nan")


def _subset(n: int):
    """n photos of ph-snakes train, evenly spaced over the sorted list (so every species is in)."""
    from index.datasets import load_dataset

    records = sorted(load_dataset("folder", PH_SNAKES / "train").records, key=lambda r: str(r.path))
    n = min(n, len(records))
    step = len(records) / n
    return [records[int(i * step)] for i in range(n)]


class Worker:
    """One configuration in its own process: loads the encoder once, then runs timed builds on request.

    A process per configuration keeps its peak RSS (VmHWM) its own; keeping the processes alive between
    repeats lets the repeats interleave across configurations without paying the model load each time.
    """

    def __init__(self, spec: str, precision: str, method: str, n: int, batch_size: int) -> None:
        self.label = f"{method} {spec} {precision}"
        self.stderr = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, __file__, "--worker", json.dumps([spec, precision, method, n, batch_size])]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True
        )

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        self.proc.wait()
        self.stderr.seek(0)
        sys.exit(f"worker {self.label} failed (exit {self.proc.returncode}):\n{self.stderr.read()[-3000:]}")

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
            self.proc.wait(timeout=60)
        self.stderr.close()


MARK = "@@bench@@ "


def worker_main(spec: str, precision: str, method: str, n: int, batch_size: int) -> None:
    """The worker process: load, warm up, say ready, then one timed build per 'run' line on stdin."""
    import logging

    import numpy as np
    import torch
    from PIL import Image

    logging.disable(logging.WARNING)  # the random-weights warning
    from index.gallery import Gallery
    from retrieval.encoders import create_encoder
    from retrieval.pipeline import add_references

    def say(obj: dict) -> None:
        print(MARK + json.dumps(obj), flush=True)

    records = _subset(n)
    t0 = time.perf_counter()
    enc = create_encoder(spec, precision=precision, batch_size=batch_size)
    load_s = time.perf_counter() - t0
    with Image.open(records[0].path) as im:  # warm-up: one forward outside the timed region
        enc.encode_batch(enc.preprocess(im.convert("RGB"))[None])
    say(
        {
            "load_s": load_s,
            "dtype": str(enc.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "rss_loaded_mib": _status_mib("VmRSS"),
        }
    )
    for line in sys.stdin:
        if line.strip() != "run":
            break
        rss_before = _status_mib("VmRSS")
        cpu0 = time.process_time()
        with tempfile.TemporaryDirectory(prefix="bench_build_") as tmp:
            t0 = time.perf_counter()
            if method == "ours":
                gallery = Gallery.create(Path(tmp) / "gallery", enc.describe())
                report = add_references(gallery, enc, records, progress=False)
                gallery.finish_build()
                done, skipped = report.added + len(report.duplicates), len(report.skipped)
            else:
                rows = []
                with torch.no_grad():
                    for rec in records:
                        x = enc.preprocess(Image.open(rec.path).convert("RGB"))
                        rows.append(enc.encode_batch(x[None]))
                emb = np.concatenate(rows)
                done, skipped = emb.shape[0], 0
            seconds = time.perf_counter() - t0
            cpu_s = time.process_time() - cpu0
        say(
            {
                "seconds": seconds,
                "cpu_s": cpu_s,
                "images": done,
                "skipped": skipped,
                "rss_before_mib": rss_before,
                "peak_rss_mib": _status_mib("VmHWM"),
            }
        )


def gemm_gflops(dtype_name: str, seconds: float = 1.0) -> float:
    """Sustained GEMM GFLOP/s of this machine now (ViT-MLP-like shape: 1576x768 @ 768x3072)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(1576, 768, dtype=dtype)
    b = torch.randn(768, 3072, dtype=dtype)
    for _ in range(3):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 1576 * 768 * 3072 * n / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 40 MobileNet / 6 ViT photos, 1 repeat")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per configuration (default 3)")
    ap.add_argument("--mobilenet-photos", type=int, default=None, help="photos for MobileNet (default 300)")
    ap.add_argument("--vit-photos", type=int, default=None, help="photos for ViT-B-16 (default 48)")
    ap.add_argument("--no-vit", action="store_true", help="skip the ViT-B-16 configurations")
    ap.add_argument(
        "--batch-size", type=int, default=32, help="encoder batch size for 'ours' (default 32, the library's)"
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(*json.loads(args.worker))
        return
    require_shared()
    repeats = args.repeats or (1 if args.quick else 3)
    n_mob = args.mobilenet_photos or (40 if args.quick else 300)
    n_vit = args.vit_photos or (6 if args.quick else 48)

    configs = [
        ("MobileNetV1", MOBILENET_SPEC, "fp32", "ours", n_mob),
        ("MobileNetV1", MOBILENET_SPEC, "auto", "ours", n_mob),
        ("MobileNetV1", MOBILENET_SPEC, "fp32", "naive", n_mob),
    ]
    if not args.no_vit:
        configs += [
            ("ViT-B-16 (random)", VIT_SPEC, "fp32", "ours", n_vit),
            ("ViT-B-16 (random)", VIT_SPEC, "bf16", "ours", n_vit),
            ("ViT-B-16 (random)", VIT_SPEC, "fp32", "naive", n_vit),
        ]
    print(
        f"bench_build: ph-snakes train, {os.cpu_count()} CPU cores, {repeats} repeat(s) per configuration, "
        f"encoder batch size {args.batch_size} for ours"
    )
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    watch = CpuWatch()
    results: dict[int, list[dict]] = {i: [] for i in range(len(configs))}
    info: dict[int, dict] = {}
    t_all = time.perf_counter()
    families = [
        [i for i, c in enumerate(configs) if c[1] == spec] for spec in dict.fromkeys(c[1] for c in configs)
    ]
    for family in families:  # one model family at a time: its workers live together, the next family after
        workers = {i: Worker(*configs[i][1:], args.batch_size) for i in family}
        try:
            for i, w in workers.items():
                info[i] = w.ready()
            for rep in range(repeats):
                order = family if rep % 2 == 0 else family[::-1]  # alternate so load drift favours no one
                for i in order:
                    name, spec, prec, method, n = configs[i]
                    busy0 = _busy_s()
                    r = workers[i].run()
                    r["others"] = max(0.0, _busy_s() - busy0 - r["cpu_s"]) / r["seconds"]
                    results[i].append(r)
                    print(
                        f"  rep {rep + 1}: {name:18s} {prec:4s} ({info[i]['dtype']:8s}) {method:5s} {r['images']:4d} "
                        f"photos in {r['seconds']:6.2f} s = {r['images'] / r['seconds']:6.2f} img/s, "
                        f"peak RSS {r['peak_rss_mib']:.0f} MiB; other processes used {r['others']:.2f} cores",
                        flush=True,
                    )
        finally:
            for w in workers.values():
                w.close()

    def ips(i: int) -> float:
        return median([r["images"] / r["seconds"] for r in results[i]])

    print()
    print(
        "| encoder | precision (dtype) | method | photos | img/s (median) | min-max | ours/naive | "
        "RSS after load MiB | peak RSS MiB, 1st build | peak RSS MiB, all repeats |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    naive_of = {configs[i][1]: i for i in range(len(configs)) if configs[i][3] == "naive"}
    for i, (name, spec, prec, method, _n) in enumerate(configs):
        vals = [r["images"] / r["seconds"] for r in results[i]]
        ratio = ips(i) / ips(naive_of[spec]) if method == "ours" else 1.0
        r0 = results[i][0]
        print(
            f"| {name} | {prec} ({info[i]['dtype']}) | {method} | {r0['images']} | {ips(i):.2f} | "
            f"{min(vals):.2f}-{max(vals):.2f} | {ratio:.2f}x | {info[i]['rss_loaded_mib']:.0f} | "
            f"{results[i][0]['peak_rss_mib']:.0f} | {max(r['peak_rss_mib'] for r in results[i]):.0f} |"
        )
    print()
    for i, (name, spec, prec, method, _) in enumerate(configs):
        if method == "ours":
            print(f"{name} {prec}: ours {ips(i) / ips(naive_of[spec]):.2f}x the naive loop")
    if not args.no_vit:
        measured = {p: gemm_gflops(p) for p in ("fp32", "bf16")}
        print()
        print(f"ViT-B-16 limit at ~{VIT_GFLOP_PER_IMAGE:.0f} GFLOP/image (GEMM speed -> img/s):")
        for i, (_name, spec, prec, method, _) in enumerate(configs):
            if spec != VIT_SPEC:
                continue
            dt = info[i]["dtype"]
            key = "bf16" if dt == "bfloat16" else "fp32"
            lim = GIVEN_GFLOPS[key] / VIT_GFLOP_PER_IMAGE
            lim_now = measured[key] / VIT_GFLOP_PER_IMAGE
            print(
                f"  {method:5s} {prec:4s}: measured {ips(i):5.2f} img/s; limit {lim:5.2f} img/s at the given "
                f"{GIVEN_GFLOPS[key]:.0f} GFLOP/s ({ips(i) / lim:.0%} of it); GEMM measured now "
                f"{measured[key]:.0f} GFLOP/s -> {lim_now:.2f} img/s ({ips(i) / lim_now:.0%})"
            )
    print(f"\n{watch.report()}; total wall {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
