"""HTTP service benchmark: latency (p50/p95/p99) and throughput of ``POST /v1/identify`` at several
concurrencies, beside the encoder called directly in-process, and the encode-batching window compared;
and the service under overload (``--load``): load shedding against the unbounded queue.

Load (``--load``, MobileNetV1): for c = 1, 8, 32, 64 clients, each sending identify requests back to back
(a client told 429 waits its Retry-After, as a polite client does) while a curator adds one reference photo
a second: accepted requests/s, p50/p95/p99 of the accepted ones, the share shed (429), 5xx count, the
server's RSS (start and peak), adds completed. Once with the default in-flight bound and once unbounded
(the naive way: every request queued). ``--sweep`` first compares in-flight bounds at c=32.

A real ``speciesid serve`` (uvicorn, one process) runs on 127.0.0.1 for each configuration; the load comes
from an ``httpx.AsyncClient`` in this process (one photo per request, val photos in turn, kept in memory),
with ``concurrency`` requests in flight at all times. Figures:

* ``direct 1-by-1``: decode + preprocess + forward of one photo at a time, in this process -- the floor
  for one request without HTTP, search and vote.
* ``direct batched``: the same photos decoded and preprocessed, forwarded ``--batch`` at a time: the
  encoder's best throughput on this machine.
* ``HTTP c=N``: ``/v1/identify`` with N requests in flight: p50/p95/p99 latency as the client sees it,
  requests/s, and the mean encoder batch (from /metrics) that the service's EncodeBatcher formed.
* batching: the same at c=8 and c=32 with ``SPECIESID_BATCH_WINDOW_MS`` = 0 / 5 (the default) / 20, and
  with batching off (``SPECIESID_MAX_BATCH=1``).

Encoders: MobileNetV1 (real weights) over all 980 ph-snakes train photos (gallery built from the cached
embeddings in runs/cache, or embedded once), and a random-weight open_clip ViT-B-16 (BioCLIP's compute,
precision auto: bf16 on CPUs with native bf16) over 100 train photos; both galleries are kept under
runs/bench_api/ and reused. This machine is shared: the CPU that other processes used during each
block is printed beside it, and a block during which they used more than 0.25 cores is measured again
(up to 3 times, after a pause). Every figure is the median over ``--passes`` passes.

    .venv/bin/python benchmarks/bench_api.py            # default (~6 min on 2 cores)
    .venv/bin/python benchmarks/bench_api.py --quick    # smoke run (~2 min)
    .venv/bin/python benchmarks/bench_api.py --passes 3 --json runs/bench_api/figures.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
from _common import (
    CACHE,
    MOBILENET_SPEC,
    PH_SNAKES,
    REPO,
    VIT_SPEC,
    evenly,
    free_port,
    percentile_values,
    require_shared,
    split_embeddings,
)
from _hardware import machine_report

RUNS = REPO / "runs" / "bench_api"
#: A block during which other processes used more CPU than this (in cores) is measured again (up to
#: RETRIES times, after a pause); the figures keep their "other_cpu" so a noisy one is visible.
MAX_OTHER_CPU = 0.25
RETRIES = 3
CONCURRENCY = (1, 8, 32)
WINDOWS = ("off", "0", "5", "20")  # "off": max_batch 1 (no batching at all)
QUICK_WINDOWS = ("0", "5")
DEFAULT_WINDOW = "5"


# ------------------------------------------------------------------------------------------- galleries
def mobilenet_gallery() -> Path:
    """All ph-snakes train photos, MobileNetV1 fp32, from the cached embeddings (embedded once if missing)."""
    from index.datasets import load_dataset
    from index.gallery import Gallery
    from retrieval.encoders import create_encoder
    from retrieval.images import sha256_bytes

    root = RUNS / "mobilenet-train"
    emb, _, paths = split_embeddings(MOBILENET_SPEC, "train", "fp32")
    if (root / "gallery.json").is_file() and len(Gallery.open(root)) > 0:
        return root
    records = {str(r.path): r for r in load_dataset("folder", PH_SNAKES / "train").records}
    enc = create_encoder(MOBILENET_SPEC, precision="fp32")
    gallery = Gallery.create(root, enc.describe())
    keep, recs, digests, seen = [], [], [], set()
    for i, p in enumerate(paths):  # identical photos are stored once, as build_gallery does
        digest = sha256_bytes(Path(p).read_bytes())
        if digest not in seen:
            seen.add(digest)
            keep.append(i)
            recs.append(records[p])
            digests.append(digest)
    gallery.add(recs, digests, emb[keep], save_index=False)
    gallery.finish_build()
    print(f"built {root}: {len(gallery)} references (from {CACHE.name}/ embeddings)")
    return root


def vit_gallery(n: int) -> Path:
    """``n`` train photos spread over the species, random-weight ViT-B-16 at precision auto."""
    from index.datasets import load_dataset
    from index.gallery import Gallery
    from retrieval.encoders import EncoderConfig
    from retrieval.workflows import build_gallery

    root = RUNS / f"vit-b-16-{n}"
    if (root / "gallery.json").is_file() and len(Gallery.open(root)) > 0:
        return root
    photos = RUNS / f"vit-b-16-{n}-photos"
    for r in evenly(sorted(load_dataset("folder", PH_SNAKES / "train").records, key=lambda r: str(r.path)), n):
        (photos / r.path.parent.name).mkdir(parents=True, exist_ok=True)
        link = photos / r.path.parent.name / r.path.name
        if not link.exists():
            os.symlink(r.path, link)
    t0 = time.perf_counter()
    res = build_gallery(root, "folder", photos, encoder=EncoderConfig(spec=VIT_SPEC, precision="auto"), progress=False)
    print(f"built {root}: {len(res.gallery)} references in {time.perf_counter() - t0:.0f} s")
    return root


# ----------------------------------------------------------------------------------------- CPU watch
class CpuBlock:
    """CPU used by other processes (not this one, not the server) during a block, in cores."""

    def __init__(self, server_pid: int | None = None) -> None:
        self.pid = server_pid
        self.t0, self.busy0, self.ours0 = time.monotonic(), self._busy(), self._ours()

    def _busy(self) -> float:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:9]]
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")

    def _ours(self) -> float:
        t = os.times()
        total = t.user + t.system
        if self.pid:
            try:
                with open(f"/proc/{self.pid}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError, ValueError):
                pass
        return total

    def other(self) -> float:
        wall = max(time.monotonic() - self.t0, 1e-9)
        return max(0.0, (self._busy() - self.busy0) - (self._ours() - self.ours0)) / wall


# ---------------------------------------------------------------------------------------------- direct
def direct_one(enc, data: list[bytes], decode_image) -> dict:
    """The encoder in this process, one photo at a time: decode + preprocess + forward."""
    for b in data[:2]:  # warm-up
        enc.encode_batch(enc.preprocess(decode_image(b))[None])
    time.sleep(0.3)
    cpu = CpuBlock()
    lat = []
    for b in data:
        t0 = time.perf_counter()
        enc.encode_batch(enc.preprocess(decode_image(b))[None])
        lat.append((time.perf_counter() - t0) * 1000)
    return {**percentile_values(lat), "rps": len(lat) / (sum(lat) / 1000), "n": len(lat), "other_cpu": cpu.other()}


def direct_batched(enc, data: list[bytes], decode_image, batch: int, torch) -> dict:
    """The same photos decoded, preprocessed and forwarded ``batch`` at a time."""
    time.sleep(0.3)
    cpu = CpuBlock()
    t0 = time.perf_counter()
    for i in range(0, len(data), batch):
        enc.encode_batch(np.stack([enc.preprocess(decode_image(b)) for b in data[i : i + batch]]))
    wall = time.perf_counter() - t0
    return {"rps": len(data) / wall, "ms_per_image": wall * 1000 / len(data), "n": len(data),
            "batch": min(batch, len(data)), "other_cpu": cpu.other()}


# ---------------------------------------------------------------------------------------------- server
class Server:
    """``python -m api.cli serve`` on 127.0.0.1 with SPECIESID_* settings; :meth:`wait` until /readyz is 200."""

    def __init__(self, index: Path, env: dict[str, str], name: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        RUNS.mkdir(parents=True, exist_ok=True)
        self.log = RUNS / f"server-{name}.log"
        self.t0 = time.monotonic()
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "api.cli", "serve", "--index", str(index), "--port", str(self.port)],
                cwd=REPO, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
            )

    def wait(self, timeout: float = 300) -> float:
        """Seconds from start to ready."""
        import httpx

        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - self.t0
            except httpx.TransportError:
                pass
            if time.monotonic() - self.t0 > timeout:
                raise RuntimeError(f"server not ready after {timeout:.0f} s: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def encoder_counts(url: str) -> tuple[float, float]:
    """(forward passes, photos encoded) so far, from /metrics."""
    import httpx

    vals = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(("speciesid_encoder_batches_total ", "speciesid_encoder_images_total ")):
            name, value = line.split()
            vals[name] = float(value)
    return vals["speciesid_encoder_batches_total"], vals["speciesid_encoder_images_total"]


async def _load(url: str, bodies: list[tuple[str, bytes]], n: int, concurrency: int) -> tuple[list[float], float]:
    import httpx

    lat: list[float] = []
    next_i = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker() -> None:
            nonlocal next_i
            while next_i < n:
                i = next_i
                next_i += 1
                name, data = bodies[i % len(bodies)]
                t0 = time.perf_counter()
                resp = await client.post("/v1/identify", files=[("images", (name, data, "image/jpeg"))],
                                         params={"k": 5})
                lat.append((time.perf_counter() - t0) * 1000)
                if resp.status_code != 200:
                    raise RuntimeError(f"{resp.status_code}: {resp.text[:300]}")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return lat, time.perf_counter() - t0


def http_load(server: Server, bodies: list[tuple[str, bytes]], n: int, concurrency: int) -> dict:
    """``n`` identify requests with ``concurrency`` in flight (after a short warm-up at that concurrency)."""
    asyncio.run(_load(server.url, bodies[-concurrency:], concurrency, concurrency))  # warm-up
    time.sleep(0.3)
    b0, i0 = encoder_counts(server.url)
    cpu = CpuBlock(server.proc.pid)
    lat, wall = asyncio.run(_load(server.url, bodies, n, concurrency))
    other = cpu.other()
    b1, i1 = encoder_counts(server.url)
    return {**percentile_values(lat), "rps": n / wall, "n": n, "concurrency": concurrency,
            "mean_batch": (i1 - i0) / max(b1 - b0, 1), "other_cpu": other}


# ------------------------------------------------------------------------------------------------ main
def quiet(measure, what: str) -> dict:
    """Run ``measure()``; again (after a pause) while other processes used over MAX_OTHER_CPU cores."""
    for attempt in range(RETRIES + 1):
        fig = measure()
        if fig["other_cpu"] <= MAX_OTHER_CPU or attempt == RETRIES:
            return {**fig, "retries": attempt}
        print(f"  ({what}: other processes used {fig['other_cpu']:.2f} cores; measuring again)", flush=True)
        time.sleep(15)
    raise AssertionError("unreachable")


def median_of(runs: list[dict]) -> dict:
    """Key-wise median of numeric figures over passes."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(statistics.median(r[key] for r in runs))
    return out


def run_encoder(label: str, spec: str, precision: str, index: Path, queries: list[Path], plan: dict,
                passes: int) -> dict:
    """Every pass: the encoder direct, then each server's concurrency levels (server order rotated per pass).

    One server per batch window, all started up front, so the configurations alternate through the run
    and a burst of load from other processes spreads over all of them instead of spoiling one.
    """
    import torch

    from retrieval.encoders import create_encoder
    from retrieval.images import decode_image

    bodies = [(p.name, p.read_bytes()) for p in queries]
    res: dict = {"encoder": spec, "precision": precision, "gallery": str(index), "http": {}, "windows": {}}
    print(f"\n## {label}", flush=True)
    windows = [DEFAULT_WINDOW, *[w for w in plan["windows"] if w != DEFAULT_WINDOW]]
    servers = {}
    for window in windows:
        # every request let in: the service's own costs and its batching (the default in-flight bound, one per two
        # cores, answers the rest 429 at once: --load measures that)
        env = {"SPECIESID_API_KEYS": "", "SPECIESID_PRECISION": precision, "SPECIESID_BATCH_WINDOW_MS": window,
               "SPECIESID_MAX_IDENTIFY_IN_FLIGHT": "100000"}
        if window == "off":
            env.update(SPECIESID_BATCH_WINDOW_MS="0", SPECIESID_MAX_BATCH="1")
        servers[window] = Server(index, env, f"{label.split()[0]}-{window}")
    try:
        for window, server in servers.items():
            print(f"server (batch window {window}) ready in {server.wait():.1f} s", flush=True)
        enc = create_encoder(spec, precision=precision)
        res["dtype"] = str(enc.dtype).removeprefix("torch.")
        direct_data = [b for _, b in bodies[: plan["direct_n"]]]
        runs: dict[tuple[str, int], list[dict]] = {}
        ones, batched = [], []
        for p in range(passes):
            ones.append(quiet(partial(direct_one, enc, direct_data, decode_image), "direct"))
            batched.append(quiet(partial(direct_batched, enc, direct_data, decode_image, plan["batch"], torch),
                                 "direct batched"))
            print(f"pass {p + 1}: direct 1-by-1 p50 {ones[-1]['p50']:.1f} ms, {ones[-1]['rps']:.2f} photos/s; "
                  f"batched {batched[-1]['rps']:.2f} photos/s (others used {ones[-1]['other_cpu']:.2f} cores)",
                  flush=True)
            order = windows[p % len(windows):] + windows[: p % len(windows)]
            for window in order:
                levels = plan["concurrency"] if window == DEFAULT_WINDOW else plan["window_concurrency"]
                for c in levels:
                    n = plan["n_c1"] if c == 1 else int(max(plan["n_per_slot"] * c, plan["n_min"]))
                    fig = quiet(partial(http_load, servers[window], bodies, n, c), f"window {window} c={c}")
                    runs.setdefault((window, c), []).append(fig)
                    print(f"  window {window:>3} c={c:<3} n={n:<4} p50 {fig['p50']:8.1f} ms  p95 {fig['p95']:8.1f}  "
                          f"p99 {fig['p99']:8.1f}  {fig['rps']:6.2f} req/s  mean batch {fig['mean_batch']:4.1f}  "
                          f"(others used {fig['other_cpu']:.2f} cores)", flush=True)
        enc = None
        gc.collect()
        res["server_peak_rss_mb"] = {w: _rss_mb(server.proc.pid, "VmHWM") for w, server in servers.items()}
        print("servers' peak RSS: " + ", ".join(f"window {w} {mb:.0f} MB" for w, mb in
                                                res["server_peak_rss_mb"].items()), flush=True)
    finally:
        for server in servers.values():
            server.stop()
    res["passes"] = {"direct_one": ones, "direct_batched": batched,
                     "http": {f"window {w} c={c}": figs for (w, c), figs in runs.items()}}
    res["direct_one"] = median_of(ones)
    res["direct_batched"] = median_of(batched)
    for (window, c), figs in runs.items():
        fig = median_of(figs)
        if window == DEFAULT_WINDOW:
            res["http"][c] = fig
        if c in plan["window_concurrency"]:
            res["windows"].setdefault(window, {})[c] = fig
    return res


# ------------------------------------------------------------------------------------------------ load
def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory now (``VmHWM``: its peak so far), MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    """One photo as a multipart/form-data body (field ``images``) and its content type."""
    boundary = "speciesid-bench-boundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def _overload(url: str, bodies: list[tuple[str, bytes]], adds: list[Path], concurrency: int, seconds: float,
                    pid: int) -> dict:
    """``concurrency`` clients for ``seconds``, plus one add a second; figures of the accepted requests."""
    import httpx

    lat: list[float] = []
    codes: dict[int, int] = {}
    add_ok, add_lat, rss = 0, [], [_rss_mb(pid)]
    # multipart bodies encoded once: the load generator shares the server's cores, so it should cost little
    encoded = [_multipart(name, data) for name, data in bodies]
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def reader(k: int) -> None:
            i = k
            while time.perf_counter() < stop:
                content, ctype = encoded[i % len(encoded)]
                i += concurrency
                t0 = time.perf_counter()
                resp = await client.post("/v1/identify", content=content, headers={"content-type": ctype})
                codes[resp.status_code] = codes.get(resp.status_code, 0) + 1
                if resp.status_code == 200:
                    lat.append((time.perf_counter() - t0) * 1000)
                elif resp.status_code == 429:
                    await asyncio.sleep(float(resp.headers.get("retry-after", "1")))

        async def curator() -> None:
            nonlocal add_ok
            for photo in adds:
                if time.perf_counter() >= stop:
                    break
                t0 = time.perf_counter()
                resp = await client.post("/v1/species/Lycodon capucinus/references", headers={"X-API-Key": "bench"},
                                         files=[("images", (photo.name, photo.read_bytes(), "image/jpeg"))])
                add_lat.append(time.perf_counter() - t0)
                add_ok += resp.status_code == 201
                await asyncio.sleep(max(0.0, 1.0 - (time.perf_counter() - t0)))

        async def watch() -> None:
            while time.perf_counter() < stop:
                rss.append(_rss_mb(pid))
                await asyncio.sleep(0.5)

        t0 = time.perf_counter()
        await asyncio.gather(*(reader(k) for k in range(concurrency)), curator(), watch())
        wall = time.perf_counter() - t0
    total = sum(codes.values())
    return {**(percentile_values(lat) if lat else {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}),
            "accepted_rps": len(lat) / wall, "shed": codes.get(429, 0) / max(total, 1),
            "errors_5xx": sum(n for c, n in codes.items() if c >= 500), "requests": total,
            "adds_sent": len(add_lat), "adds_ok": add_ok, "add_p50_s": float(np.median(add_lat)) if add_lat else 0.0,
            "rss_start_mb": rss[0], "rss_peak_mb": max(rss), "rss_end_mb": rss[-1], "concurrency": concurrency}


def run_load(index: Path, queries: list[Path], levels: tuple[int, ...], seconds: float, bounds: list[str]) -> dict:
    """Each in-flight bound (a server each; "none" = unbounded) at each concurrency level."""
    import shutil

    from index.datasets import load_dataset

    adds = [r.path for r in load_dataset("folder", PH_SNAKES / "train").records
            if "Lycodon" in str(r.path)] + [r.path for r in load_dataset("folder", PH_SNAKES / "val").records]
    bodies = [(p.name, p.read_bytes()) for p in queries]
    out: dict = {}
    for bound in bounds:
        work = RUNS / f"load-{bound}"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(index, work)  # the adds write to a copy
        env = {"SPECIESID_API_KEYS": "bench", "SPECIESID_PRECISION": "fp32",
               "SPECIESID_MAX_IDENTIFY_IN_FLIGHT": bound if bound != "none" else "100000"}
        server = Server(work, env, f"load-{bound}")
        try:
            server.wait()
            asyncio.run(_overload(server.url, bodies, [], 2, 3.0, server.proc.pid))  # warm-up
            for c in levels:
                fig = asyncio.run(_overload(server.url, bodies, adds, c, seconds, server.proc.pid))
                out.setdefault(bound, {})[c] = fig
                print(f"  in-flight bound {bound:>4}  c={c:<3} accepted {fig['accepted_rps']:6.2f} req/s  p50 "
                      f"{fig['p50']:7.0f}  p95 {fig['p95']:7.0f}  p99 {fig['p99']:7.0f} ms  shed {fig['shed']:5.1%}  "
                      f"5xx {fig['errors_5xx']}  RSS {fig['rss_start_mb']:.0f}->{fig['rss_peak_mb']:.0f} MB  adds "
                      f"{fig['adds_ok']}/{fig['adds_sent']} (p50 {fig['add_p50_s']:.2f} s)", flush=True)
                adds = adds[fig["adds_sent"]:]
        finally:
            server.stop()
    return out


def print_load(load: dict) -> None:
    print("\n### overload (MobileNetV1): identify clients + 1 add a second")
    print("| in-flight bound | clients | accepted req/s | p50 ms | p95 ms | p99 ms | shed (429) | 5xx | RSS start -> "
          "peak MB | adds completed |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for bound, levels in load.items():
        for c, f in levels.items():
            print(f"| {bound} | {c} | {f['accepted_rps']:.2f} | {f['p50']:.0f} | {f['p95']:.0f} | {f['p99']:.0f} | "
                  f"{f['shed']:.1%} | {f['errors_5xx']} | {f['rss_start_mb']:.0f} -> {f['rss_peak_mb']:.0f} | "
                  f"{f['adds_ok']}/{f['adds_sent']} |")
        if 1 in levels and 64 in levels:
            print(f"| {bound}: p99 at 64 clients / p99 at 1 | {levels[64]['p99'] / levels[1]['p99']:.1f}x |")


def print_tables(results: dict) -> None:
    for label, r in results.items():
        print(f"\n### {label} ({r['dtype']}), gallery {Path(r['gallery']).name}")
        print("| path | requests | p50 ms | p95 ms | p99 ms | throughput req/s | mean encoder batch |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        d = r["direct_one"]
        print(f"| encoder direct, 1 photo at a time | {d['n']:.0f} | {d['p50']:.1f} | {d['p95']:.1f} | "
              f"{d['p99']:.1f} | {d['rps']:.2f} | 1 |")
        b = r["direct_batched"]
        print(f"| encoder direct, batches of {b['batch']:.0f} | {b['n']:.0f} | - | - | - | {b['rps']:.2f} | "
              f"{b['batch']:.0f} |")
        for c, f in r["http"].items():
            print(f"| HTTP /v1/identify, concurrency {c} | {f['n']:.0f} | {f['p50']:.1f} | {f['p95']:.1f} | "
                  f"{f['p99']:.1f} | {f['rps']:.2f} | {f['mean_batch']:.1f} |")
        print(f"(no in-flight bound; the server's peak RSS over the run: "
              f"{r['server_peak_rss_mb'][DEFAULT_WINDOW]:.0f} MB)")
        if r["windows"]:
            levels = sorted({c for w in r["windows"].values() for c in w})
            print(f"\nbatching ({label}): throughput req/s (p50 / p99 ms, mean batch)")
            print("| batch window | " + " | ".join(f"concurrency {c}" for c in levels) + " |")
            print("|---|" + "---:|" * len(levels))
            for window, figs in r["windows"].items():
                name = "off (max_batch 1)" if window == "off" else f"{window} ms" + (
                    " (default)" if window == DEFAULT_WINDOW else "")
                cells = [f"{figs[c]['rps']:.2f} ({figs[c]['p50']:.0f} / {figs[c]['p99']:.0f}, "
                         f"{figs[c]['mean_batch']:.1f})" if c in figs else "-" for c in levels]
                print(f"| {name} | " + " | ".join(cells) + " |")


def chosen_windows(windows: str | None, *, quick: bool) -> list[str]:
    """The batch windows to compare: ``--windows`` as given (``--quick`` too), else the default list or the quick
    one."""
    if windows is None:
        return list(QUICK_WINDOWS if quick else WINDOWS)
    return [w.strip() for w in windows.split(",") if w.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: fewer requests; windows 0 and 5 unless --windows names others")
    ap.add_argument("--passes", type=int, default=None, help="passes over every measurement; medians reported "
                    "(default 3, --quick 1)")
    ap.add_argument("--no-vit", action="store_true", help="skip the ViT-B-16 part")
    ap.add_argument("--no-mobilenet", action="store_true", help="skip the MobileNetV1 part")
    ap.add_argument("--vit-windows", action="store_true", help="also compare batch windows with ViT-B-16 (slow)")
    ap.add_argument("--windows", help=f"batch windows to compare (default {','.join(WINDOWS)}; --quick: "
                    f"{','.join(QUICK_WINDOWS)}; window {DEFAULT_WINDOW}, the server's default, is always measured)")
    ap.add_argument("--json", type=Path, help="also write the figures as JSON here")
    ap.add_argument("--load", action="store_true", help="only the overload part (load shedding vs unbounded)")
    ap.add_argument("--sweep", action="store_true", help="with --load: compare in-flight bounds (--bounds) at "
                    "--sweep-clients clients")
    ap.add_argument("--bounds", default="1,2,4,8", help="with --sweep: in-flight bounds to compare (default 1,2,4,8)")
    ap.add_argument("--sweep-clients", type=int, default=32, help="with --sweep: concurrency (default 32)")
    ap.add_argument("--seconds", type=float, default=40.0, help="with --load: seconds per level (default 40)")
    args = ap.parse_args()
    require_shared()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the servers are stopped too
    logging.disable(logging.WARNING)  # random-weights warning
    from index.datasets import load_dataset

    passes = args.passes or (1 if args.quick else 3)
    windows = chosen_windows(args.windows, quick=args.quick)
    val = [r.path for r in sorted(load_dataset("folder", PH_SNAKES / "val").records, key=lambda r: str(r.path))]
    started = dt.datetime.now()
    print(f"bench_api {started:%Y-%m-%d %H:%M}, passes {passes}\n{machine_report()}", flush=True)
    t0 = time.perf_counter()
    results = {}
    if args.load:
        from api.settings import Settings

        default = str(Settings().max_identify_in_flight)
        load = {}
        if args.sweep:
            print(f"\n## in-flight bounds at {args.sweep_clients} clients", flush=True)
            load.update(run_load(mobilenet_gallery(), val, (args.sweep_clients,), args.seconds,
                                 [b.strip() for b in args.bounds.split(",") if b.strip()]))
        print(f"\n## overload: default bound {default} vs unbounded", flush=True)
        load.update({f"{k} (default)" if k == default else k: v for k, v in
                     run_load(mobilenet_gallery(), val, (1, 8, 32, 64), args.seconds, [default, "none"]).items()})
        print_load(load)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"date": started.isoformat(timespec="minutes"), "load": load}, indent=2))
        return
    mob_plan = {"direct_n": 24 if args.quick else 48, "batch": 32, "concurrency": CONCURRENCY,
                "window_concurrency": (8, 32), "windows": windows,
                "n_c1": 16 if args.quick else 40, "n_per_slot": 2 if args.quick else 4, "n_min": 32}
    if not args.no_mobilenet:
        results["MobileNetV1"] = run_encoder("MobileNetV1 (real weights)", MOBILENET_SPEC, "fp32", mobilenet_gallery(),
                                             val, mob_plan, passes)
    if not args.no_vit:
        vit_plan = {"direct_n": 6 if args.quick else 12, "batch": 32, "concurrency": CONCURRENCY,
                    "window_concurrency": (8, 32) if args.vit_windows else (),
                    "windows": windows if args.vit_windows else [DEFAULT_WINDOW],
                    "n_c1": 6 if args.quick else 12, "n_per_slot": 1 if args.quick else 1.5, "n_min": 16}
        results["ViT-B-16"] = run_encoder("ViT-B-16 (random weights)", VIT_SPEC, "auto", vit_gallery(100),
                                          evenly(val, 64), vit_plan, passes)
    print_tables(results)
    print(f"\nbench_api: {time.perf_counter() - t0:.0f} s in all; load average now {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"date": started.isoformat(timespec="minutes"), "cores": os.cpu_count(),
                                         "argv": sys.argv[1:], "results": results}, indent=2))


if __name__ == "__main__":
    main()
