"""Galleries beyond one machine: the IVF-PQ index at 100k..5M vectors, and the Ray build against the local one.

Part 1 (index): synthetic species-like 512-d embeddings (``_synth.py``: clustered, anisotropic, long-tailed,
2 % near-duplicates; calibrated on ph-snakes MobileNetV1 neighbour similarities), streamed into a float16
file under ``--data`` (default ``runs/scale-data``, reused between runs), 1,000 fresh queries and their exact
top-10 (streamed brute force). For each size a **child process** builds the index the way a gallery does
(``index.ivfpq.build``: sample -> train -> add in shards -> merge -> fast-scan -> calibrate nprobe ->
save), so its peak RSS is the build's own; then a second child loads the saved index and answers the queries
one at a time with one thread. Printed: build wall and CPU-seconds, peak RSS, index bytes a vector (codes,
lists, ids) and re-rank bytes a vector (float16 file), RSS after load, single-query p50/p99 (wall and thread
CPU time), recall@10 against exact search, and exact search (FAISS flat) for comparison up to 1M. Then an
extrapolation to 10M and 100M from the measured bytes/vector, build CPU-s/vector and the growth of the
query cost between the two largest sizes -- labelled as estimates.

Part 2 (Ray): the ph-snakes train photos (980, MobileNetV1 fp32) built by the local runner, by Ray with 1
embedding actor and with 2, side by side: images/s of the pipeline, Ray start-up, total wall, CPU-seconds of
every process, peak RSS of every process, and whether the galleries hold the same rows.

Prints only; never asserts. The machine is shared: every section prints the CPU kind and the load seen.

    .venv/bin/python benchmarks/bench_scale.py --quick             # 20k + 100k, 100 photos (a few minutes)
    .venv/bin/python benchmarks/bench_scale.py                     # 100k, 1M, 5M (+ data: ~8 GB disk, ~1 h)
    .venv/bin/python benchmarks/bench_scale.py --sizes 100000 1000000 --no-ray
    .venv/bin/python benchmarks/bench_scale.py --ray-only --photos 980
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _common import MOBILENET_SPEC, PH_SNAKES, REPO, CpuWatch, require_shared

K = 10
NQ = 1000


def cpu_kind() -> str:
    """The CPU model, core count and kind (avx2 / avx512-bf16 / amx ...), on one line."""
    from retrieval.cpu import cpu_kind as kind
    from retrieval.cpu import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} cores, kind {kind()}"


# ------------------------------------------------------------------------------------------------ data
def ensure_data(folder: Path, n: int) -> tuple[Path, Path, Path]:
    """(gallery f16 .npy, queries .npy, exact top-10 ids .npy) for ``n`` vectors, generated when missing."""
    from _synth import SpeciesSpace, iter_f32, n_species_for, write_f16

    folder.mkdir(parents=True, exist_ok=True)
    g, q, gt = folder / f"g{n}.npy", folder / f"q{n}.npy", folder / f"gt{n}.npy"
    space = SpeciesSpace(n_species_for(n), seed=1)
    if not g.is_file():
        t = time.perf_counter()
        write_f16(str(g) + ".tmp.npy", n, space)
        os.replace(str(g) + ".tmp.npy", g)
        print(f"  data: {n:,} vectors generated in {time.perf_counter() - t:.0f} s -> {g}", flush=True)
    if not gt.is_file():
        queries = space.chunk(0, NQ, stream=1)[0]
        np.save(q, queries)
        xb = np.load(g, mmap_mode="r")
        t = time.perf_counter()
        best_s = np.full((NQ, 0), -np.inf, np.float32)
        best_i = np.zeros((NQ, 0), np.int64)
        for s, x in iter_f32(xb, 65536):
            sc = np.concatenate([best_s, queries @ x.T], axis=1)
            ix = np.concatenate([best_i, np.broadcast_to(np.arange(s, s + len(x)) + 1, (NQ, len(x)))], axis=1)
            part = np.argpartition(-sc, K - 1, axis=1)[:, :K]
            best_s, best_i = np.take_along_axis(sc, part, 1), np.take_along_axis(ix, part, 1)
        order = np.argsort(-best_s, axis=1)
        np.save(gt, np.take_along_axis(best_i, order, 1))
        print(f"  data: exact top-{K} of {NQ} queries over {n:,} in {time.perf_counter() - t:.0f} s", flush=True)
    return g, q, gt


class MemmapSource:
    """A float16 .npy gallery as an ``index.ivfpq.VectorSource`` (ids 1..n)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._x = np.load(path, mmap_mode="r")
        self.dim = int(self._x.shape[1])

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def count(self) -> int:
        return int(self._x.shape[0])

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        pick = np.sort(np.random.default_rng(seed).choice(self.count(), min(n, self.count()), replace=False))
        return np.ascontiguousarray(self._x[pick], dtype=np.float32)

    def shards(self, rows: int) -> list[tuple[int, int]]:
        return [(s, min(s + rows, self.count())) for s in range(0, self.count(), rows)]

    def read(self, shard: tuple[int, int]):
        lo, hi = shard
        for s in range(lo, hi, 65536):
            e = min(s + 65536, hi)
            yield np.arange(s + 1, e + 1, dtype=np.int64), np.ascontiguousarray(self._x[s:e], dtype=np.float32)


# ------------------------------------------------------------------------------------------- children
def child_build(args: argparse.Namespace) -> dict:
    """Build + save the index of one size (run in its own process: its peak RSS is the build's)."""
    from index import ivfpq

    source = MemmapSource(args.gallery)
    out = Path(args.out)
    t0, c0 = time.perf_counter(), time.process_time()
    index = ivfpq.build(source, folder=out, shard_rows=args.shard_rows)
    t_build, c_build = time.perf_counter() - t0, time.process_time() - c0
    t1 = time.perf_counter()
    index.save(out / "vectors.faiss", {"bench": True})
    meta = json.loads((out / "vectors.faiss.json").read_text())
    base = out / f"vectors-{meta['base']}.ivfpq"
    rerank = out / f"vectors-{meta['rerank']}.f16"
    n = source.count()
    return {"n": n, "build_s": t_build, "build_cpu_s": c_build, "save_s": time.perf_counter() - t1,
            "peak_rss_mib": _peak_rss_mib(),
            "index_bytes_per_vector": base.stat().st_size / n, "rerank_bytes_per_vector": rerank.stat().st_size / n,
            "nlist": index.nlist, "m": meta["m"], "nprobe": index.nprobe, "calibration": index.calibration}


def child_query(args: argparse.Namespace) -> dict:
    """Load the saved index and answer the queries one by one with 1 thread; recall@10 vs exact."""
    import faiss

    from index.vectors import load_index

    faiss.omp_set_num_threads(1)
    rss0 = _rss_mib()
    t0 = time.perf_counter()
    index, _ = load_index(Path(args.out) / "vectors.faiss")
    load_s = time.perf_counter() - t0
    queries, truth = np.load(args.queries), np.load(args.truth)[:, :K]
    out: dict = {"load_s": load_s, "rss_after_load_mib": _rss_mib() - rss0}
    above = sorted(p for p in args.nprobe if p > index.nlist)  # more lists than there are: measured as every list
    out["nprobe_above_nlist"] = above
    out["nprobe_below_1"] = sorted(p for p in args.nprobe if p < 1)  # 0: the calibrated one; negative: 1
    measured = {index.nprobe if p == 0 else max(1, min(p, index.nlist)) for p in args.nprobe}  # as the index does
    for nprobe in sorted({index.nprobe, *measured}):
        wall, cpu, got = [], [], []
        index.search(queries[:5], K, nprobe=nprobe)  # warm the page cache of the re-rank file a little
        for q in queries:
            t, c = time.perf_counter(), time.thread_time()
            got.append(index.search(q[None], K, nprobe=nprobe)[1][0])
            cpu.append(time.thread_time() - c)
            wall.append(time.perf_counter() - t)
        recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(got, truth, strict=True)]))
        out[f"nprobe={nprobe}"] = {"recall_at_10": recall, "wall_ms": _pct(wall), "cpu_ms": _pct(cpu),
                                   "calibrated": nprobe == index.nprobe}
    if args.exact:
        x = np.ascontiguousarray(np.load(args.gallery, mmap_mode="r"), dtype=np.float32)
        flat = faiss.IndexFlatIP(x.shape[1])
        flat.add(x)
        del x
        wall, cpu = [], []
        for q in queries[:200]:
            t, c = time.perf_counter(), time.thread_time()
            flat.search(q[None], K)
            cpu.append(time.thread_time() - c)
            wall.append(time.perf_counter() - t)
        out["exact_flat"] = {"wall_ms": _pct(wall), "cpu_ms": _pct(cpu)}
    return out


def _peak_rss_mib() -> float:
    """VmHWM: this process's own peak RSS (ru_maxrss would include the parent's at fork)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return float("nan")


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def _pct(seconds: list[float]) -> dict:
    v = np.asarray(seconds) * 1e3
    return {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}


def _run_child(mode: str, **kw) -> dict:
    argv = [sys.executable, __file__, f"--child-{mode}"] + [a for k, v in kw.items() for a in _flag(k, v)]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    line = next((x for x in done.stdout.splitlines()[::-1] if x.startswith("RESULT ")), None)
    if done.returncode or line is None:
        raise RuntimeError(f"{mode} child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def _flag(key: str, value) -> list[str]:
    name = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return [name] if value else []
    if isinstance(value, (list, tuple)):
        return [name, *map(str, value)]
    return [name, str(value)]


# ------------------------------------------------------------------------------------------- part 1
def bench_index(sizes: list[int], data: Path, exact_max: int, nprobes: list[int]) -> None:
    print(f"\n== IVF-PQ index (index.ivfpq) -- CPU: {cpu_kind()}", flush=True)
    watch = CpuWatch()
    rows = []
    for n in sizes:
        g, q, gt = ensure_data(data, n)
        work = Path(tempfile.mkdtemp(prefix=f"scale{n}-", dir=data))
        try:
            b = _run_child("build", gallery=g, out=work, shard_rows=_shard_rows(n))
            s = _run_child("query", gallery=g, out=work, queries=q, truth=gt, nprobe=nprobes, exact=n <= exact_max)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        rows.append((n, b, s))
        _print_size(n, b, s)
    print(f"  {watch.report()}")
    if len(rows) >= 2:
        _extrapolate(rows)


def _shard_rows(n: int) -> int:
    """Rows per add shard for a gallery of ``n``: four shards, 65,536 to 1,000,000 rows each."""
    return min(1_000_000, max(65536, n // 4))


def _print_size(n: int, b: dict, s: dict) -> None:
    print(f"\n  n = {n:,}: IVF{b['nlist']},PQ{b['m']}x4fs + exact re-rank of 200 (float16 file)")
    shards = math.ceil(n / _shard_rows(n))
    print(f"    build {b['build_s']:.1f} s wall, {b['build_cpu_s']:.1f} CPU-s (train + {shards} shard(s) "
          f"+ merge + calibration), save {b['save_s']:.1f} s, peak RSS {b['peak_rss_mib']:.0f} MiB")
    print(f"    index {b['index_bytes_per_vector']:.1f} B/vector in RAM (+ {b['rerank_bytes_per_vector']:.0f} B/vector "
          f"float16 on disk, mapped); RSS after load {s['rss_after_load_mib']:.0f} MiB, load {s['load_s']:.1f} s")
    cal = b["calibration"]
    print(f"    nprobe calibrated at build: {cal.get('nprobe')} of {b['nlist']} (recall@10 {cal.get('recall_at_10')} "
          f"on {cal.get('queries')} stored vectors, {cal.get('seconds')} s)")
    for key, v in s.items():
        if key.startswith("nprobe="):
            mark = "  <- calibrated" if v["calibrated"] else ""
            print(f"    {key:<11} recall@10 {v['recall_at_10']:.3f}  1 query, 1 thread: p50 {v['wall_ms']['p50']:.2f} ms / "
                  f"p99 {v['wall_ms']['p99']:.2f} ms wall, thread CPU p50 {v['cpu_ms']['p50']:.2f} / "
                  f"p99 {v['cpu_ms']['p99']:.2f} ms{mark}")
    if s.get("nprobe_above_nlist"):
        print(f"    nprobe {', '.join(map(str, s['nprobe_above_nlist']))} asked: more than the {b['nlist']} lists, "
              f"so measured as nprobe={b['nlist']} (every list)")
    if s.get("nprobe_below_1"):
        print(f"    nprobe {', '.join(map(str, s['nprobe_below_1']))} asked: 0 is measured as the calibrated nprobe "
              f"({b['nprobe']}), a negative one as nprobe=1 (as the index takes them)")
    if "exact_flat" in s:
        e = s["exact_flat"]
        print(f"    exact (FAISS flat, 1 thread): p50 {e['wall_ms']['p50']:.1f} ms / p99 {e['wall_ms']['p99']:.1f} ms wall, "
              f"thread CPU p50 {e['cpu_ms']['p50']:.1f} ms")


def _extrapolate(rows: list[tuple[int, dict, dict]]) -> None:
    (n1, _, s1), (n2, b2, s2) = rows[-2], rows[-1]

    def cal(s: dict) -> dict:
        return next(v for k, v in s.items() if k.startswith("nprobe=") and v["calibrated"])

    c1, c2 = cal(s1)["cpu_ms"]["p50"], cal(s2)["cpu_ms"]["p50"]
    slope = math.log(max(c2, 1e-6) / max(c1, 1e-6)) / math.log(n2 / n1)
    per_vec_cpu = b2["build_cpu_s"] / n2
    print(f"\n  Extrapolation (ESTIMATES from {n1:,} and {n2:,}: bytes/vector as measured at {n2:,}, build CPU-s/vector "
          f"x n (assignment grows with the lists, so this is a lower bound), query cost x n^{slope:.2f})")
    for n in (10_000_000, 100_000_000):
        est_q = c2 * (n / n2) ** slope
        print(f"    {n:>11,}: index {b2['index_bytes_per_vector'] * n / 2**30:.2f} GiB RAM + re-rank "
              f"{b2['rerank_bytes_per_vector'] * n / 2**30:.0f} GiB disk; build >= {per_vec_cpu * n / 3600:.1f} CPU-h "
              f"(in shards: divide by the workers); 1 query ~{est_q:.1f} ms thread CPU at the calibrated recall")


# ------------------------------------------------------------------------------------------- part 2
class _Mem(threading.Thread):
    """Peak summed RSS and CPU time of this process and every descendant (Ray's workers included)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.cpu, self.stop = 0, {}, False

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop:
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                    t = p.cpu_times()
                    self.cpu[p.pid] = t.user + t.system
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.2)


def ray_child(args: argparse.Namespace) -> dict:
    """One build of the photo subset (local, or Ray with N actors) in a fresh process."""
    import logging

    from index.gallery import Gallery
    from retrieval.distributed import RayOptions, start_ray, stop_ray
    from retrieval.encoders import EncoderConfig
    from retrieval.workflows import build_gallery

    logging.basicConfig(level=logging.WARNING)
    mem = _Mem()
    mem.start()
    config = EncoderConfig(spec=MOBILENET_SPEC, precision="fp32", batch_size=32)
    t0 = time.perf_counter()
    started_s = 0.0
    if args.engine == "ray":
        start_ray(RayOptions(actors=args.actors))
        started_s = time.perf_counter() - t0
    result = build_gallery(args.out, "folder", args.photos_root, encoder=config, engine=args.engine,
                           ray=RayOptions(actors=args.actors), progress=False)
    total = time.perf_counter() - t0
    if args.engine == "ray":
        stop_ray()
    mem.stop = True
    time.sleep(0.3)
    rep = result.report
    handled = rep.added + len(rep.skipped) + len(rep.duplicates)
    g = Gallery.open(args.out)
    meta = g.store.metadata()
    return {"engine": args.engine, "actors": args.actors, "images": handled, "pipeline_s": rep.seconds,
            "images_per_s": handled / rep.seconds, "ray_init_s": started_s, "total_s": total,
            "cpu_s_all": sum(mem.cpu.values()), "peak_rss_all_mib": mem.peak / 2**20, "rows": len(meta),
            "content": sorted(zip(meta["source_path"], meta["sha256"], strict=True))}


def bench_ray(n_photos: int, data: Path) -> None:
    require_shared()
    print(f"\n== Ray build vs local build (MobileNetV1 fp32, ph-snakes train) -- CPU: {cpu_kind()}", flush=True)
    root = data / f"photos{n_photos}"
    if not root.is_dir():
        from index.datasets import load_dataset

        recs = load_dataset("folder", PH_SNAKES / "train").records
        step = max(1, len(recs) // n_photos)
        for r in recs[::step][:n_photos]:
            (root / r.path.parent.name).mkdir(parents=True, exist_ok=True)
            os.symlink(r.path, root / r.path.parent.name / r.path.name)
    watch = CpuWatch()
    results = []
    for engine, actors in (("local", 0), ("ray", 1), ("ray", 2)):
        out = Path(tempfile.mkdtemp(prefix=f"ray-{engine}{actors}-", dir=data))
        try:
            results.append(_run_child("ray", engine=engine, actors=actors, out=out / "g", photos_root=root))
        finally:
            shutil.rmtree(out, ignore_errors=True)
    base = results[0]
    print(f"  {'runner':<14} {'images/s':>9} {'vs local':>8} {'ray start':>9} {'total s':>8} {'CPU ms/img':>10} "
          f"{'peak RSS (all)':>15} {'rows':>5} {'same rows':>9}")
    for r in results:
        name = "local" if r["engine"] == "local" else f"ray x{r['actors']} actors"
        print(f"  {name:<14} {r['images_per_s']:9.1f} {r['images_per_s'] / base['images_per_s']:7.2f}x "
              f"{r['ray_init_s']:8.1f}s {r['total_s']:8.1f} {1e3 * r['cpu_s_all'] / r['images']:10.0f} "
              f"{r['peak_rss_all_mib']:12.0f} MiB {r['rows']:5d} {str(r['content'] == base['content']):>9}")
    print(f"  {watch.report()}")


# ------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20k and 100k vectors, 100 photos")
    ap.add_argument("--sizes", type=int, nargs="+", help="gallery sizes (default 100000 1000000 5000000)")
    ap.add_argument("--data", type=Path, default=REPO / "runs" / "scale-data", help="where data and builds go")
    ap.add_argument("--exact-max", type=int, default=1_000_000, help="largest size with an exact-search baseline")
    ap.add_argument("--nprobe", type=int, nargs="*", default=[],
                    help="extra nprobe values to measure (one above the index's lists: every list)")
    ap.add_argument("--photos", type=int, default=None, help="ph-snakes photos for the Ray part (default all 980)")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray part")
    ap.add_argument("--ray-only", action="store_true", help="only the Ray part")
    for mode in ("build", "query", "ray"):
        ap.add_argument(f"--child-{mode}", action="store_true", help=argparse.SUPPRESS)
    for name in ("gallery", "out", "queries", "truth", "engine", "photos-root"):
        ap.add_argument(f"--{name}", help=argparse.SUPPRESS)
    ap.add_argument("--shard-rows", type=int, default=262_144, help=argparse.SUPPRESS)
    ap.add_argument("--exact", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--actors", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    for mode, fn in (("build", child_build), ("query", child_query), ("ray", ray_child)):
        if getattr(args, f"child_{mode}"):
            print("RESULT " + json.dumps(fn(args)), flush=True)
            return
    sizes = args.sizes or ([20_000, 100_000] if args.quick else [100_000, 1_000_000, 5_000_000])
    nprobes = args.nprobe or ([] if args.quick else [64, 128, 256])
    print(f"bench_scale: {cpu_kind()}, load average {os.getloadavg()[0]:.2f}; data in {args.data}")
    if not args.ray_only:
        bench_index(sizes, args.data, args.exact_max, nprobes)
    if not args.no_ray:
        bench_ray(args.photos or (100 if args.quick else 980), args.data)


if __name__ == "__main__":
    main()
