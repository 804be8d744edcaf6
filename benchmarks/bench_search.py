"""How search cost grows with gallery size: FAISS flat and HNSW (``index.vectors.VectorIndex``) vs numpy.

Synthetic gallery: L2-normalised float32 vectors of dim 512 (BioCLIP's width), clustered like a real
gallery -- 1,000 "species" centres, each vector = centre + Gaussian noise of norm ~1 (cosine ~0.7 to its
centre, ~0.5 between two photos of a species), re-normalised. Queries are fresh draws from the same
distribution (not in the gallery). Sizes 1k, 10k, 100k, 1M by default (1M = 2 GB of vectors).

For each size, k = 10:

* FAISS flat (exact): ``VectorIndex.search`` single-query latency p50/p95/p99 and batch-of-64 throughput,
  with FAISS's default OpenMP threads (= cores) and with 1 thread.
* numpy brute force: ``X @ q`` + ``argpartition`` + sort of the k best (the plain baseline), and the
  library's ``index.vectors.exact_search`` (same maths plus input validation on every call).
* HNSW (``VectorIndexConfig(kind="hnsw")``, M=32, efConstruction=80, efSearch=128): build time, latency,
  batch throughput, recall@10 against the exact answer (up to ``--hnsw-max``, 100k by default: a 1M
  graph takes far too long to build on 2 cores).
* ``VectorIndex.save`` + ``VectorIndex.load`` time (with the fsyncs save does) and file size.

Each repeat runs every method's block of queries in turn (order reversed on odd repeats, a short pause
between blocks): interleaving query by query would make numpy's OpenBLAS threads and FAISS's OpenMP
threads spin against each other on 2 cores. Every figure is the median over repeats.

    .venv/bin/python benchmarks/bench_search.py            # default: 1k..1M, 3 repeats
    .venv/bin/python benchmarks/bench_search.py --quick    # smoke run: 1k and 10k, 1 repeat
    .venv/bin/python benchmarks/bench_search.py --sizes 1000 10000 100000 --hnsw-max 100000
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import CpuWatch, median, peak_rss_mib
from _hardware import machine_report

DIM = 512
K = 10
BATCH = 64
N_CENTRES = 1000
#: Idle gap before each method's block, so the previous library's spinning threads have gone to sleep.
PAUSE_S = 0.2


def clustered(n: int, centres: np.ndarray, rng: np.random.Generator, noise: float = 1.0) -> np.ndarray:
    """n unit vectors: a random centre each + Gaussian noise of total norm ~``noise``, re-normalised."""
    dim = centres.shape[1]
    out = np.empty((n, dim), dtype=np.float32)
    sigma = np.float32(noise / np.sqrt(dim))
    for s in range(0, n, 65536):
        m = min(65536, n - s)
        x = centres[rng.integers(0, len(centres), m)]
        x += rng.standard_normal((m, dim), dtype=np.float32) * sigma
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s : s + m] = x
    return out


def numpy_topk(xb: np.ndarray, xq: np.ndarray, k: int) -> np.ndarray:
    """Plain numpy brute force: (nq, k) row positions of the k best inner products, best first."""
    scores = xq @ xb.T
    cand = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, cand, axis=1), axis=1)
    return np.take_along_axis(cand, order, axis=1)


def pct(values_ms: list[float]) -> dict[str, float]:
    v = np.asarray(values_ms)
    return {
        "p50": float(np.percentile(v, 50)),
        "p95": float(np.percentile(v, 95)),
        "p99": float(np.percentile(v, 99)),
    }


def time_it(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_size(
    n: int,
    xb: np.ndarray,
    queries: np.ndarray,
    *,
    repeats: int,
    n_single: int,
    n_batches: int,
    hnsw: bool,
    tmp: Path,
) -> dict:
    import faiss

    from index.vectors import VectorIndex, VectorIndexConfig, exact_search

    threads = faiss.omp_get_max_threads()
    ids = np.arange(n, dtype=np.int64)
    res: dict[str, object] = {"n": n}
    flat_build = []
    flat = None
    for _ in range(repeats):
        flat = None
        t0 = time.perf_counter()
        flat = VectorIndex.build(xb, ids, VectorIndexConfig(kind="flat"))
        flat_build.append(time.perf_counter() - t0)
    res["flat_build_s"] = median(flat_build)
    index_h = None
    if hnsw:
        builds = []
        n_builds = repeats if n <= 20_000 else 1  # big graphs: one build (minutes on 2 cores)
        for _ in range(n_builds):
            index_h = None
            t0 = time.perf_counter()
            index_h = VectorIndex.build(xb, ids, VectorIndexConfig(kind="hnsw"))
            builds.append(time.perf_counter() - t0)
        res["hnsw_build_s"] = median(builds)
        res["hnsw_builds"] = n_builds

    methods = {
        "faiss flat": lambda q: flat.search(q, K)[1],
        "faiss flat 1t": lambda q: flat.search(q, K)[1],  # same, with FAISS limited to 1 OpenMP thread
        "numpy": lambda q: numpy_topk(xb, q, K),
        "exact_search": lambda q: exact_search(xb, ids, q, K)[1],
    }
    if index_h is not None:
        methods["hnsw"] = lambda q: index_h.search(q, K)[1]
    names = list(methods)
    singles = queries[:n_single]
    for fn in methods.values():  # warm-up
        fn(singles[:1])
        fn(queries[:BATCH])

    per_rep: dict[str, list[dict]] = {m: [] for m in names}
    answers: dict[str, np.ndarray] = {}
    for rep in range(repeats):
        lat: dict[str, list[float]] = {m: [] for m in names}
        got: dict[str, list[np.ndarray]] = {m: [] for m in names}
        batch_s: dict[str, float] = {m: 0.0 for m in names}
        order = names if rep % 2 == 0 else names[::-1]
        for m in order:  # one method's block at a time: thread pools of different libraries never mix
            time.sleep(PAUSE_S)
            faiss.omp_set_num_threads(1 if m.endswith(" 1t") else threads)
            for i in range(len(singles)):
                q = singles[i : i + 1]
                t0 = time.perf_counter()
                got[m].append(methods[m](q))
                lat[m].append((time.perf_counter() - t0) * 1000.0)
            for b in range(n_batches):
                qb = queries[(b * BATCH) % len(queries) :][:BATCH]
                batch_s[m] += time_it(lambda m=m, qb=qb: methods[m](qb))
        faiss.omp_set_num_threads(threads)
        for m in names:
            per_rep[m].append({**pct(lat[m]), "qps_batch": n_batches * BATCH / batch_s[m]})
            answers[m] = np.concatenate(got[m])
    for m in names:
        res[m] = {key: median([r[key] for r in per_rep[m]]) for key in ("p50", "p95", "p99", "qps_batch")}
    exact = answers["faiss flat"]
    res["numpy_agrees"] = float(np.mean(answers["numpy"] == exact))
    if index_h is not None:
        hits = [len(set(a) & set(b)) for a, b in zip(answers["hnsw"], exact, strict=True)]
        res["hnsw_recall"] = float(np.mean(hits) / K)

    # save + load
    for kind, index in (("flat", flat), ("hnsw", index_h)):
        if index is None:
            continue
        saves, loads = [], []
        path = tmp / f"{kind}-{n}.faiss"
        for _ in range(repeats):
            saves.append(time_it(lambda index=index, path=path: index.save(path, {"bench": True})))
            loaded = []
            loads.append(time_it(lambda path=path, loaded=loaded: loaded.append(VectorIndex.load(path))))
            assert loaded[0][0].ntotal == n
            del loaded
        res[f"{kind}_save_s"] = median(saves)
        res[f"{kind}_load_s"] = median(loads)
        res[f"{kind}_file_mib"] = path.stat().st_size / 2**20
        path.unlink()
        Path(str(path) + ".json").unlink(missing_ok=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: sizes 1k and 10k, 1 repeat, few queries")
    ap.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="gallery sizes (default 1k 10k 100k 1M)"
    )
    ap.add_argument(
        "--hnsw-max", type=int, default=100_000, help="largest size to build HNSW for (default 100k)"
    )
    ap.add_argument("--repeats", type=int, default=None, help="repeats per figure (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(machine_report(), flush=True)
    logging.disable(logging.INFO)
    import faiss

    sizes = args.sizes or ([1_000, 10_000] if args.quick else [1_000, 10_000, 100_000, 1_000_000])
    repeats = args.repeats or (1 if args.quick else 3)
    print(
        f"bench_search: dim {DIM}, k={K}, batch {BATCH}, {os.cpu_count()} CPU cores "
        f"(faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads), {repeats} repeat(s); "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    watch = CpuWatch()
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((N_CENTRES, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    t0 = time.perf_counter()
    xb_all = clustered(max(sizes), centres, rng)
    queries = clustered(512, centres, np.random.default_rng(args.seed + 1))
    print(
        f"generated {max(sizes):,} gallery vectors ({xb_all.nbytes / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s"
    )

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_search_") as tmp:
        for n in sorted(sizes):
            if args.quick:
                n_single, n_batches = 30, 2
            else:
                n_single = 200 if n <= 10_000 else (100 if n <= 100_000 else 30)
                n_batches = 4 if n <= 100_000 else 1
            t0 = time.perf_counter()
            r = bench_size(
                n,
                np.ascontiguousarray(xb_all[:n]),
                queries,
                repeats=repeats,
                n_single=n_single,
                n_batches=n_batches,
                hnsw=n <= args.hnsw_max,
                tmp=Path(tmp),
            )
            r["n_single"], r["n_batches"] = n_single, n_batches
            rows.append(r)
            print(
                f"  size {n:>9,}: done in {time.perf_counter() - t0:.0f} s ({n_single} single queries, "
                f"{n_batches} batches of {BATCH} per repeat); peak RSS so far {peak_rss_mib():.0f} MiB",
                flush=True,
            )

    labels = {
        "faiss flat": "FAISS flat",
        "faiss flat 1t": "FAISS flat, 1 thread",
        "numpy": "numpy",
        "exact_search": "exact_search",
        "hnsw": "HNSW",
    }
    print("\nSingle-query latency, ms: p50 / p95 / p99 (medians over repeats)")
    print("| gallery | " + " | ".join(labels.values()) + " |")
    print("|---:|" + "---:|" * len(labels))
    for r in rows:
        cells = [
            f"{r[m]['p50']:.3f} / {r[m]['p95']:.3f} / {r[m]['p99']:.3f}" if m in r else "-" for m in labels
        ]
        print(f"| {r['n']:,} | " + " | ".join(cells) + " |")
    print(f"\nBatch-of-{BATCH} throughput, queries/s (medians over repeats)")
    print("| gallery | " + " | ".join(labels.values()) + " |")
    print("|---:|" + "---:|" * len(labels))
    for r in rows:
        cells = [f"{r[m]['qps_batch']:,.0f}" if m in r else "-" for m in labels]
        print(f"| {r['n']:,} | " + " | ".join(cells) + " |")
    print("\nBuild, recall, save + load")
    print(
        "| gallery | flat build s | HNSW build s | HNSW recall@10 | flat save s | flat load s | flat file MiB "
        "| HNSW save s | HNSW load s | HNSW file MiB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def f(r, key, fmt="{:.3f}"):
        return fmt.format(r[key]) if key in r else "-"

    for r in rows:
        hb = f(r, "hnsw_build_s", "{:.2f}") + (
            " (1 build)" if r.get("hnsw_builds") == 1 and repeats > 1 else ""
        )
        print(
            f"| {r['n']:,} | {f(r, 'flat_build_s')} | {hb} | {f(r, 'hnsw_recall')} | {f(r, 'flat_save_s')} "
            f"| {f(r, 'flat_load_s')} | {f(r, 'flat_file_mib', '{:.1f}')} | {f(r, 'hnsw_save_s')} "
            f"| {f(r, 'hnsw_load_s')} | {f(r, 'hnsw_file_mib', '{:.1f}')} |"
        )
    threads = faiss.omp_get_max_threads()
    print("\nRatios (speed-ups, > 1 = the first is faster)")
    for r in rows:
        fl, nu, ex = r["faiss flat"], r["numpy"], r["exact_search"]
        line = (
            f"  {r['n']:>9,}: FAISS flat vs numpy: single p50 {nu['p50'] / fl['p50']:.2f}x, batch "
            f"{fl['qps_batch'] / nu['qps_batch']:.2f}x; vs exact_search: single p50 {ex['p50'] / fl['p50']:.2f}x; "
            f"1 FAISS thread vs {threads}: single p50 {fl['p50'] / r['faiss flat 1t']['p50']:.2f}x"
        )
        if "hnsw" in r:
            h = r["hnsw"]
            line += (
                f"; HNSW vs flat: single p50 {fl['p50'] / h['p50']:.2f}x, batch "
                f"{h['qps_batch'] / fl['qps_batch']:.2f}x at recall@10 {r['hnsw_recall']:.3f}"
            )
        print(line)
        if r["numpy_agrees"] < 0.999:
            print(
                f"             (numpy top-10 ids equal FAISS's on {r['numpy_agrees']:.1%} of slots: float ties)"
            )
    print(f"\npeak RSS {peak_rss_mib():.0f} MiB; {watch.report()}")


if __name__ == "__main__":
    main()
