"""``speciesid clean`` on CPU: zero-shot cost, the leak pass's speed and accuracy, pair-search growth, a peer.

Parts (``--parts``, default all; the CPU kind is printed first; medians over ``--repeats`` runs):

* zeroshot: s per 1,000 photos with BioCLIP's compute (a random ViT-B-16) on N ph-snakes train photos (default 64,
  round-robin over the species), ``retrieval.workflows.clean`` as the CLI calls it (shipped snake prompts,
  duplicates, report). Split: embedding (read, sha256, decode, preprocess, forward), prompts (once per run), rest
  (scoring, pair search, report; random weights flag at random, so "rest" is if anything high). x 1000/N.
* leaks: MobileNetV1 (real weights, image-only) over ph-snakes train (980) against val (210), as
  ``speciesid clean --dataset folder --root TRAIN --against VAL`` runs it, one subprocess per precision: photos/s
  (embedding phase; end to end), per-photo latency p50/p95/p99 of ``prepare`` (read + sha256 + decode + preprocess,
  worker threads) and ``encode_batch`` (batch time / batch size), peak RSS, and accuracy: known val->train leaks
  found (of 4), other val photos flagged, lowest leak cosine, highest cosine of any other val photo to train.
* growth: pair search over synthetic 512-d unit vectors (a near-copy per 50 rows, cosine 0.96-0.999) at 1k, 5k, 20k
  (``--large``: + 100k, slow): ``index.pairs.similar_pairs`` (blocked numpy tiles) beside the "before" (FAISS
  ``range_search`` + a Python loop, the implementation it replaced, kept here) and the naive full matrix (``a @ a.T``
  at once, up to ``--naive-max``), plus the finding pass ``find_issues`` (duplicates in n, leaks from n/5 others).
  One subprocess per method and size: seconds, extra peak RSS, pairs found, ratios, fitted exponent (s ~ n^k).
* self: cleaning a gallery against itself, the checks ``clean --index G`` runs after reading the stored vectors
  (``find_issues``: duplicates + suspect labels, k=3) on ``benchmarks/_synth.py`` species-like 512-d vectors (n/100
  species, 2% near-copies) at ``--self-sizes`` (default 20000,40000; ``--quick`` 2000,4000): now (one pass over
  every pair: ``index.pairs.neighbours_and_pairs``) beside "before" (``--old-src DIR``: a copy of the code before
  it, e.g. ``git archive 0a97e72 index retrieval | tar -x -C DIR``: similar_pairs, copy_groups' second pass and the
  exact_search of the neighbours), one subprocess each: seconds, extra peak RSS, findings the same, fitted exponent.
* knn: the one pass beside FAISS exact search on the same ``--self-sizes`` species-like vectors, one subprocess
  per size, the two alternating ``--repeats`` times: ``neighbours_and_pairs`` (12 nearest + pairs at cosine >=
  0.95, what ``clean --index`` asks) and ``faiss.knn`` of the 13 nearest alone (self included; BLAS + heaps over all
  n² products, no pairs): wall and CPU seconds (all threads), medians.
* peer: ``imagehash`` pHash (``SPECIESID_PEER_PHASH`` = the python of a venv with imagehash) on the same photos:
  photos/s, latency, peak RSS, leaks found / others flagged at Hamming distance <= 10 of 64 bits (the usual pHash
  rule, imagededup's default; ``--phash-max-distance``), and the ratio speciesid / peer.

The photos are read once up front, so every side finds them in the page cache.

    .venv/bin/python benchmarks/bench_clean.py                      # everything, 3 repeats
    .venv/bin/python benchmarks/bench_clean.py --quick              # smoke run: every part small, 1 repeat
    .venv/bin/python benchmarks/bench_clean.py --parts self --self-sizes 20000,40000,100000 --old-src /tmp/old
    .venv/bin/python benchmarks/bench_clean.py --parts knn --self-sizes 20000,40000
    SPECIESID_PEER_PHASH=/path/to/venv/bin/python .venv/bin/python benchmarks/bench_clean.py --parts leaks,peer
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from _common import (
    MOBILENET_SPEC,
    PH_SNAKES,
    VIT_SPEC,
    CpuWatch,
    median,
    peak_rss_mib,
    percentiles,
    require_shared,
    status_mib,
)
from _hardware import machine_report, peer_phash

MARK = "@@bench_clean "
PARTS = ("zeroshot", "leaks", "growth", "self", "knn", "peer")
#: The val photos that are train photos (same bytes, or re-encoded / re-cropped; checked by eye): val -> train twin.
_RAT = "philippine_rat_snake__coelognathus_erythrurus__"
_VIPER = "south_philippine_temple_pit_viper__tropidolaemus_philippensis__"
KNOWN_LEAKS = {_RAT + "val_0001.jpg": _RAT + "train_0068.jpg", _VIPER + "val_0004.jpg": _VIPER + "train_0066.jpg",
               _RAT + "val_0010.jpeg": _RAT + "train_0045.jpeg", _RAT + "val_0003.jpeg": _RAT + "train_0011.jpeg"}
#: --quick: only these species folders (all 4 leaks sit in them).
LEAK_SPECIES = ("Philippine Rat Snake (Coelognathus erythrurus)",
                "South Philippine Temple Pit Viper (Tropidolaemus philippensis)")

PHASH_SCRIPT = r"""
import json, sys, time
import imagehash, numpy as np
from PIL import Image
lists, maxd, repeats = json.load(sys.stdin), int(sys.argv[1]), int(sys.argv[2])
runs = []
for _ in range(repeats):
    lat, bits, t0 = [], {}, time.perf_counter()
    for split in ("train", "val"):
        rows = []
        for p in lists[split]:
            t = time.perf_counter()
            with Image.open(p) as im:
                rows.append(imagehash.phash(im).hash.flatten())
            lat.append((time.perf_counter() - t) * 1000)
        bits[split] = np.array(rows)
    dist = (bits["val"][:, None, :] != bits["train"][None, :, :]).sum(-1)
    runs.append({"seconds": time.perf_counter() - t0, "latency_ms": lat})
pairs = [[int(v), int(t), int(dist[v, t])] for v, t in zip(*np.nonzero(dist <= maxd))]
hwm = next(int(x.split()[1]) / 1024 for x in open("/proc/self/status") if x.startswith("VmHWM:"))
print(json.dumps({"runs": runs, "pairs": pairs, "nearest": dist.min(1).tolist(), "peak_rss_mib": hwm,
                  "version": imagehash.__version__}))
"""


def _child(*args) -> dict:
    """Run ``child_main(*args)`` in a fresh process; its reply (or {'error': ...})."""
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True)
    lines = [x for x in p.stdout.splitlines() if x.startswith(MARK)]
    return json.loads(lines[-1][len(MARK):]) if p.returncode == 0 and lines else {"error": p.stderr[-1500:]}


def _timed_children(part: str, methods: Sequence[str], sizes: list[int], repeats: int, *extra,
                    skip: Callable[[str, int], bool] = lambda m, n: False) -> dict[str, dict[int, dict]]:
    """{method: {n: reply}}: ``_child(part, method, n, repeats (1 above 20k), *extra)`` for each size and method
    (but those ``skip`` names), each reply given its median seconds and printed as it comes."""
    res: dict[str, dict[int, dict]] = {m: {} for m in methods}
    for n in sizes:
        for m in methods:
            if skip(m, n):
                continue
            res[m][n] = r = _child(part, m, n, repeats if n <= 20000 else 1, *extra)
            if "error" not in r:
                r["median"] = median(r["seconds"])
            cpu = f" ({median(r['cpu_seconds']):.1f} CPU s)" if "cpu_seconds" in r else ""
            print(f"  n={n} {m}: {r.get('median', float('nan')):.3f} s{cpu} {r.get('error', '')}", flush=True)
    return res


def _sample(n: int, folder: Path) -> Path:
    """Symlink n train photos, round-robin over the species folders, into folder/<species>/."""
    species = sorted(d for d in (PH_SNAKES / "train").iterdir() if d.is_dir())
    files = {d: sorted(d.iterdir()) for d in species}
    for i in range(n):
        d = species[i % len(species)]
        f = files[d][i // len(species)]
        (folder / d.name).mkdir(parents=True, exist_ok=True)
        os.symlink(f, folder / d.name / f.name)
    return folder


# ----------------------------------------------------------------------------- zeroshot: random ViT-B-16
def _other_cpu() -> tuple[float, float]:
    """(monotonic time, CPU seconds used so far by the whole machine minus this process)."""
    import resource

    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:9]]
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.monotonic(), (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK") - r.ru_utime - r.ru_stime


def zeroshot_part(n: int, repeats: int, precisions: list[str], tmp: Path) -> None:
    from retrieval.encoders import create_encoder
    from retrieval.findings import CleanConfig
    from retrieval.workflows import clean

    root, warm = _sample(n, tmp / "photos"), _sample(8, tmp / "warm")
    rows, config = [], CleanConfig(prompts="snakes")
    for precision in precisions:
        enc = create_encoder(VIT_SPEC, precision=precision)
        clean(dataset="folder", root=warm, encoder=enc, config=config, report_dir=tmp / "r-warm", progress=False)
        emb, text, rest, total = [], [], [], []
        t_other, busy0 = _other_cpu()
        for r in range(repeats):
            t0 = time.perf_counter()
            res = clean(dataset="folder", root=root, encoder=enc, config=config, report_dir=tmp / f"r{r}",
                        progress=False)
            total.append(time.perf_counter() - t0)
            emb.append(res.seconds_embed)
            text.append(res.zero_shot.seconds_text)
            rest.append(res.seconds_rest - res.zero_shot.seconds_text + res.seconds_report)
        t1, busy1 = _other_cpu()
        rows.append((precision, f"{enc.runtime} {enc.precision}", median(emb) * 1000 / n,
                     median(rest) * 1000 / n, median(text), median(total), (busy1 - busy0) / (t1 - t_other)))
    print(f"\n## zeroshot: random ViT-B-16, {n} photos, {repeats} repeats (medians); per 1k photos = x {1000 / n:.1f}")
    print("| precision | ran | embedding s / 1k photos | rest s / 1k photos | prompts s (once) | total s for the "
          "sample | cores used by other processes |\n| --- | --- | --- | --- | --- | --- | --- |")
    for p, d, e, r, t, tot, busy in rows:
        print(f"| {p} | {d} | {e:.0f} | {r:.1f} | {t:.1f} | {tot:.1f} | {busy:.2f} |")
    print(f"findings in the last run: {res.counts()}; peak RSS of this process so far: {peak_rss_mib():.0f} MiB")


# ----------------------------------------------------------------------------- leaks: MobileNetV1 train vs val
def leaks_child(precision: str, train: str, val: str, warm: str, repeats: int) -> dict:
    """One precision: load, warm up, then ``repeats`` timed clean runs of train against val."""
    import logging

    logging.disable(logging.WARNING)
    import retrieval.pipeline as pipeline
    from retrieval.encoders import create_encoder
    from retrieval.findings import CleanConfig
    from retrieval.workflows import clean

    t0 = time.perf_counter()
    enc = create_encoder(MOBILENET_SPEC, precision=precision, device="cpu")
    load_s = time.perf_counter() - t0
    encode_ms, prepare_ms = [], []
    encode_batch, prepare = enc.encode_batch, pipeline.prepare

    def timed_encode(batch):
        t = time.perf_counter()
        out = encode_batch(batch)
        encode_ms.append((time.perf_counter() - t) * 1000 / len(batch[0] if isinstance(batch, tuple) else batch))
        return out

    def timed_prepare(*a, **k):
        t = time.perf_counter()
        out = prepare(*a, **k)
        prepare_ms.append((time.perf_counter() - t) * 1000)
        return out

    enc.encode_batch, pipeline.prepare = timed_encode, timed_prepare
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_clean_") as tmp:
        clean(dataset="folder", root=warm, encoder=enc, report_dir=Path(tmp) / "warm", progress=False)
        rss_ready = status_mib("VmRSS")
        encode_ms.clear()
        prepare_ms.clear()
        for r in range(repeats):
            t0 = time.perf_counter()
            res = clean(dataset="folder", root=train, against=val, encoder=enc, config=CleanConfig(),
                        report_dir=Path(tmp) / f"r{r}", progress=False)
            runs.append({"wall": time.perf_counter() - t0, "embed": res.seconds_embed, "search": res.seconds_rest,
                         "report": res.seconds_report})
    flagged: dict[str, list[tuple[str, float]]] = {}
    for f in res.findings:
        if f.kind in ("leak", "near-leak"):
            flagged.setdefault(Path(f.paired_path).name, []).append((Path(f.path).name, f.score))
    best = (res.against.embeddings @ res.photos.embeddings.T).max(axis=1)  # each val photo's nearest train cosine
    val_names = [Path(p).name for p in res.against.paths]
    return {"ran": f"{enc.runtime} {enc.precision}", "load_s": load_s, "runs": runs, "encode_ms": encode_ms,
            "prepare_ms": prepare_ms, "photos": len(res.photos) + len(res.against), "flagged": flagged,
            "counts": res.counts(), "rss_ready_mib": rss_ready, "peak_rss_mib": status_mib("VmHWM"),
            "best": dict(zip(val_names, best.tolist(), strict=True))}


def _accuracy(flagged: dict[str, list[str]]) -> tuple[int, int]:
    """(known leaks found, with their twin; other val photos flagged)."""
    found = sum(KNOWN_LEAKS[v] in t for v, t in flagged.items() if v in KNOWN_LEAKS)
    return found, sum(v not in KNOWN_LEAKS for v in flagged)


def leaks_part(precisions: list[str], train: Path, val: Path, warm: Path, repeats: int) -> dict[str, tuple]:
    """Prints the table; returns {precision: (end-to-end photos/s, leaks found, other val photos flagged)}."""
    print(f"\n## leaks: MobileNetV1, {train} against {val}, image-only, cosine >= 0.95; {repeats} repeats (medians), "
          "one subprocess per precision")
    print("| precision | ran | photos | embedding photos/s | end-to-end photos/s | prepare ms/photo | encode ms/photo "
          "(per batch) | pair search + report s | peak RSS MiB (after load) | leaks found / 4 | other val flagged | "
          "lowest leak cos | highest other cos |\n" + "| --- " * 13 + "|")
    rates = {}
    for p in precisions:
        r = _child("leaks", p, str(train), str(val), str(warm), repeats)
        if "error" in r:
            print(f"| {p} | failed: {r['error'][-300:]!r} |")
            continue
        found, other = _accuracy({v: [t for t, _ in ts] for v, ts in r["flagged"].items()})
        n, runs = r["photos"], r["runs"]
        rates[p] = (n / median([x["wall"] for x in runs]), found, other)
        leak_cos = [s for v, ts in r["flagged"].items() if v in KNOWN_LEAKS for _, s in ts]
        other_cos = max(s for v, s in r["best"].items() if v not in KNOWN_LEAKS)
        print(f"| {p} | {r['ran']} | {n} | {n / median([x['embed'] for x in runs]):.0f} | {rates[p][0]:.0f} | "
              f"{percentiles(r['prepare_ms'])} | {percentiles(r['encode_ms'])} | "
              f"{median([x['search'] + x['report'] for x in runs]):.2f} | {r['peak_rss_mib']:.0f} "
              f"({r['rss_ready_mib']:.0f}) | {found} | {other} | {min(leak_cos, default=float('nan')):.4f} | "
              f"{other_cos:.4f} |")
    print("(prepare runs in worker threads beside the forward pass, so its latency includes waiting for a core)")
    return rates


# ----------------------------------------------------------------------------- growth: synthetic pair search
def faiss_range_pairs(a: np.ndarray, *, threshold: float) -> list[tuple[int, int, float]]:
    """The "before": ``similar_pairs`` as it was (FAISS range search, Python loop over the hits), within one set."""
    import faiss

    index = faiss.IndexFlatIP(a.shape[1])
    index.add(a)
    out = []
    for start in range(0, len(a), 4096):
        lims, sims, ids = index.range_search(a[start : start + 4096], float(threshold) - 1e-5)
        for q in range(len(lims) - 1):
            for j, s in zip(ids[lims[q] : lims[q + 1]], sims[lims[q] : lims[q + 1]], strict=True):
                if int(j) > start + q and s >= threshold - 1e-6:
                    out.append((start + q, int(j), min(float(s), 1.0)))
    out.sort(key=lambda t: (-t[2], t[0], t[1]))
    return out


def naive_pairs(a: np.ndarray, *, threshold: float) -> list[tuple[int, int, float]]:
    """The naive way: the whole n x n similarity matrix at once (n^2 floats of memory)."""
    sims = a @ a.T
    i, j = np.nonzero(np.triu(sims >= threshold - 1e-6, k=1))
    return sorted(zip(i.tolist(), j.tolist(), np.minimum(sims[i, j], 1.0).tolist(), strict=True),
                  key=lambda t: (-t[2], t[0], t[1]))


def synthetic(n: int, dim: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n unit vectors with row k+1 a near-copy of row k for every 50th k; n/5 others, every 25th near a photo."""
    rng = np.random.default_rng(seed)

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def near(src, cos):
        w = unit(rng.standard_normal(src.shape))
        w = unit(w - (w * src).sum(1, keepdims=True) * src)
        return unit(cos[:, None] * src + np.sqrt(1 - cos[:, None] ** 2) * w)

    a = unit(rng.standard_normal((n, dim)))
    k = np.arange(0, n - 1, 50)
    a[k + 1] = near(a[k], rng.uniform(0.96, 0.999, len(k)))
    b = unit(rng.standard_normal((n // 5, dim)))
    m = np.arange(0, len(b), 25)
    b[m] = near(a[rng.integers(0, n, len(m))], rng.uniform(0.96, 0.999, len(m)))
    return a, b


def _runner(method: str, a: np.ndarray, b: np.ndarray):
    """A no-argument call of ``method`` on the data: a pair search within ``a``, or find_issues of a against b."""
    from index.pairs import similar_pairs
    from retrieval.findings import PhotoSet, find_issues

    if method != "find_issues":
        fn = {"ours": similar_pairs, "before": faiss_range_pairs, "naive": naive_pairs}[method]
        return lambda: fn(a, threshold=0.95)
    photos, others = (PhotoSet([f"{tag}{i}" for i in range(len(x))], [f"{tag}{i}" for i in range(len(x))], x,
                               [None] * len(x), [None] * len(x)) for tag, x in (("p", a), ("v", b)))
    return lambda: find_issues(photos, against=others)


def pairs_child(method: str, n: int, repeats: int) -> dict:
    """One method at one size: seconds per run, pairs found, a digest of them, extra peak RSS over the data."""
    _runner(method, *synthetic(500, seed=1))()  # warm-up: imports, BLAS / OpenMP threads
    a, b = synthetic(n)
    run = _runner(method, a, b)
    rss0, seconds = status_mib("VmRSS"), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = run()
        seconds.append(time.perf_counter() - t0)
    keys = sorted((f.kind, f.path, f.paired_path or "") for f in out) if method == "find_issues" else sorted(
        (i, j) for i, j, _ in out)
    return {"seconds": seconds, "pairs": len(out), "digest": hashlib.sha1(repr(keys).encode()).hexdigest()[:12],
            "extra_mib": status_mib("VmHWM") - rss0}


def growth_part(sizes: list[int], repeats: int, naive_max: int) -> None:
    methods = ("ours", "before", "naive", "find_issues")
    res = _timed_children("pairs", methods, sizes, repeats, skip=lambda m, n: m == "naive" and n > naive_max)
    print(f"\n## growth: pair search over n synthetic 512-d vectors (n/50 planted near-copies), cosine >= 0.95; "
          f"medians of {repeats} runs (1 run above 20k); extra peak RSS = peak minus RSS with the data loaded")
    print("| n | similar_pairs s | before: FAISS range_search s | before / ours | naive full matrix s | naive / ours | "
          "pairs (planted) | same pairs | extra MiB ours / before / naive | find_issues s (n + n/5 others) |\n"
          + "| --- " * 10 + "|")

    def cell(m, n, key="median", fmt="{:.3f}"):
        r = res[m].get(n)
        return fmt.format(r[key]) if r and key in r else "-"

    def ratio(x, o):
        return f"{x['median'] / o['median']:.1f}x" if "median" in x and "median" in o else "-"

    for n in sizes:
        o, b, v = (res[m].get(n, {}) for m in ("ours", "before", "naive"))
        same = all(x.get("digest") == o.get("digest") for x in (b, v) if "digest" in x)
        print(f"| {n:,} | {cell('ours', n)} | {cell('before', n)} | {ratio(b, o)} | {cell('naive', n)} | "
              f"{ratio(v, o)} | {o.get('pairs', '-')} ({len(range(0, n - 1, 50))}) | {'yes' if same else 'NO'} | "
              f"{' / '.join(cell(m, n, 'extra_mib', '{:.0f}') for m in ('ours', 'before', 'naive'))} | "
              f"{cell('find_issues', n)} |")
    print_exponents(res, methods, sizes)


def print_exponents(res: dict[str, dict[int, dict]], methods: Sequence[str], sizes: list[int]) -> None:
    """Print each method's fitted growth exponent (seconds ~ n^k, log-log least squares over its timed sizes)."""
    for m in methods:
        ns = [n for n in sizes if "median" in res[m].get(n, {})]
        if len(ns) >= 2:
            k = np.polyfit(np.log(ns), np.log([res[m][n]["median"] for n in ns]), 1)[0]
            print(f"fitted exponent {m}: seconds ~ n^{k:.2f} over n = {', '.join(f'{n:,}' for n in ns)}")


# ----------------------------------------------------------------------------- self: a gallery cleaned against itself
def self_child(method: str, n: int, repeats: int, old_src: str | None) -> dict:
    """``find_issues`` (duplicates + suspect labels) over n species-like vectors with the code of ``method``."""
    if method == "before":
        sys.path.insert(0, old_src)
    from _synth import SpeciesSpace

    import index.pairs
    from retrieval.findings import PhotoSet, find_issues

    if method == "before" and not index.pairs.__file__.startswith(old_src):
        raise RuntimeError(f"--old-src {old_src} did not take: index.pairs is {index.pairs.__file__}")
    x, sp = SpeciesSpace(max(1, n // 100), dim=512).chunk(0, n)
    photos = PhotoSet([f"p{i}" for i in range(n)], [f"d{i}" for i in range(n)], x, [None] * n, list(range(n)),
                      [f"s{int(s)}" for s in sp])
    find_issues(PhotoSet(photos.paths[:300], photos.sha256[:300], x[:300], [None] * 300, list(range(300)),
                         photos.species[:300]), suspect_k=3)  # warm-up: imports, BLAS threads
    rss0, seconds, cpu = status_mib("VmRSS"), [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = find_issues(photos, suspect_k=3)
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    keys = sorted((f.kind, f.path, f.paired_path or "", f.suggested_species or "") for f in out)
    kinds = {k: sum(f.kind == k for f in out) for k in {f.kind for f in out}}
    return {"seconds": seconds, "cpu_seconds": cpu, "findings": kinds,
            "digest": hashlib.sha1(repr(keys).encode()).hexdigest()[:12], "extra_mib": status_mib("VmHWM") - rss0}


def self_part(sizes: list[int], repeats: int, old_src: str | None) -> None:
    methods = ("now", "before") if old_src else ("now",)
    res = _timed_children("self", methods, sizes, repeats, old_src)
    print(f"\n## self: a gallery cleaned against itself (find_issues: duplicates + suspect labels k=3), n species-like "
          f"512-d vectors; medians of {repeats} runs (1 run above 20k); extra peak RSS = peak minus RSS with the data")
    print("| n | now s | before s | before / now | CPU s now / before (all threads) | findings (now) | same findings "
          "| extra MiB now / before |\n" + "| --- " * 8 + "|")
    for n in sizes:
        o, b = res["now"].get(n, {}), res.get("before", {}).get(n, {})
        ratio = f"{b['median'] / o['median']:.1f}x" if "median" in o and "median" in b else "-"
        same = ("yes" if o.get("digest") == b.get("digest") else "NO") if "digest" in b else "-"
        cpu = " / ".join(f"{median(r['cpu_seconds']):.1f}" if "cpu_seconds" in r else "-" for r in (o, b))
        print(f"| {n:,} | {o.get('median', float('nan')):.2f} | {b.get('median', float('nan')):.2f} | {ratio} | "
              f"{cpu} | {o.get('findings', '-')} | {same} | {o.get('extra_mib', float('nan')):.0f} / "
              f"{b.get('extra_mib', float('nan')):.0f} |")
    print_exponents(res, methods, sizes)


# ----------------------------------------------------------------------------- knn: the one pass beside FAISS
def knn_child(n: int, repeats: int) -> dict:
    """``neighbours_and_pairs`` and ``faiss.knn`` alternating on n species-like vectors: wall and CPU s of each."""
    import faiss
    from _synth import SpeciesSpace

    from index.pairs import neighbours_and_pairs

    x, _ = SpeciesSpace(max(1, n // 100), dim=512).chunk(0, n)
    x = np.ascontiguousarray(x, dtype=np.float32)
    runs = {"ours": lambda a: neighbours_and_pairs(a, 12, threshold=0.95),
            "faiss": lambda a: faiss.knn(a, a, 13, metric=faiss.METRIC_INNER_PRODUCT)}
    out: dict = {m: {"seconds": [], "cpu_seconds": []} for m in runs}
    for fn in runs.values():
        fn(x[:1000])  # warm-up: imports, BLAS / OpenMP threads
    for _ in range(repeats):
        for m, fn in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn(x)
            out[m]["seconds"].append(time.perf_counter() - t0)
            out[m]["cpu_seconds"].append(time.process_time() - c0)
    out["faiss_version"] = faiss.__version__
    return out


def knn_part(sizes: list[int], repeats: int) -> None:
    print(f"\n## knn: the one pass (12 nearest + pairs) beside faiss.knn (13 nearest alone), n species-like 512-d "
          f"vectors, alternating, medians of {repeats} runs")
    print("| n | one pass s (CPU s) | faiss.knn s (CPU s) | faiss CPU / ours CPU |\n" + "| --- " * 4 + "|")
    for n in sizes:
        r = _child("knn", n, repeats)
        if "error" in r:
            print(f"| {n:,} | failed: {r['error'][-300:]!r} |")
            continue
        o, f = ({k: median(v) for k, v in r[m].items()} for m in ("ours", "faiss"))
        print(f"| {n:,} | {o['seconds']:.2f} ({o['cpu_seconds']:.2f}) | {f['seconds']:.2f} ({f['cpu_seconds']:.2f}) "
              f"| {f['cpu_seconds'] / o['cpu_seconds']:.2f}x |", flush=True)
    print(f"faiss {r.get('faiss_version', '?')}")


# ----------------------------------------------------------------------------- peer: imagehash pHash
def peer_part(python: str | None, lists: dict[str, list[str]], max_distance: int, repeats: int,
              ours: dict[str, tuple]) -> None:
    print(f"\n## peer: imagehash pHash (64 bits), same photos, Hamming distance <= {max_distance}; {repeats} repeats")
    if python is None:
        print("skipped: set SPECIESID_PEER_PHASH=/path/to/venv/bin/python (a venv with `pip install imagehash`)")
        return
    p = subprocess.run([python, "-c", PHASH_SCRIPT, str(max_distance), str(repeats)], input=json.dumps(lists),
                       capture_output=True, text=True)
    if p.returncode:
        print(f"peer failed: {p.stderr[-800:]}")
        return
    r = json.loads(p.stdout)
    n = len(lists["train"]) + len(lists["val"])
    rate = n / median([x["seconds"] for x in r["runs"]])
    names = {k: [Path(x).name for x in v] for k, v in lists.items()}
    flagged: dict[str, list[str]] = {}
    for v, t, _ in r["pairs"]:
        flagged.setdefault(names["val"][v], []).append(names["train"][t])
    found, other = _accuracy(flagged)
    nearest = dict(zip(names["val"], r["nearest"], strict=True))
    print("| method | photos/s | latency per photo | peak RSS MiB | leaks found / 4 | other val flagged | "
          "highest leak distance | lowest other distance |\n" + "| --- " * 8 + "|")
    lat = [ms for run in r["runs"] for ms in run["latency_ms"]]
    print(f"| imagehash {r['version']} pHash | {rate:.0f} | {percentiles(lat)} | "
          f"{r['peak_rss_mib']:.0f} | {found} | {other} | {max(nearest[v] for v in KNOWN_LEAKS if v in nearest)} | "
          f"{min(d for v, d in nearest.items() if v not in KNOWN_LEAKS)} |")
    for precision, (ours_rate, ours_found, ours_other) in ours.items():
        print(f"ratio speciesid {precision} / pHash, end-to-end photos/s: {ours_rate:.0f} / {rate:.0f} = "
              f"{ours_rate / rate:.2f}x; leaks found {ours_found}/4 vs {found}/4, other val flagged {ours_other} vs "
              f"{other} (pHash runs on one core, speciesid on all {os.cpu_count()})")


# ----------------------------------------------------------------------------- main
def child_main(spec: str) -> None:
    kind, *args = json.loads(spec)
    children = {"leaks": leaks_child, "self": self_child, "knn": knn_child}
    out = children.get(kind, pairs_child)(*args)
    print(MARK + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)} (default all)")
    ap.add_argument("--quick", action="store_true", help="smoke run, every part small: zeroshot 16 photos (auto "
                    "only), leaks and peer on the two leak species only (auto only), growth at 1k and 5k, self and "
                    "knn at 2k and 4k, 1 repeat")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per configuration (default 3; quick 1)")
    ap.add_argument("--n", type=int, default=None, help="zeroshot: photos in the sample (default 64; quick 16)")
    ap.add_argument("--precisions", default=None, help="zeroshot: comma-separated (default auto,fp32; quick auto)")
    ap.add_argument("--leak-precisions", default=None, help="leaks: comma-separated (default auto,fp32; quick auto)")
    ap.add_argument("--sizes", default=None, help="growth: comma-separated n (default 1000,5000,20000; quick "
                    "1000,5000)")
    ap.add_argument("--large", action="store_true", help="growth: add n = 100,000 (minutes per method)")
    ap.add_argument("--naive-max", type=int, default=5000, help="growth: largest n for the full matrix (default 5000)")
    ap.add_argument("--self-sizes", default=None,
                    help="self, knn: comma-separated n (default 20000,40000; quick 2000,4000)")
    ap.add_argument("--old-src", default=None, help="self: a folder holding the code before (index/, retrieval/) to "
                    "time beside it; default: now only")
    ap.add_argument("--phash-max-distance", type=int, default=10, help="peer: Hamming threshold (default 10 of 64)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args.child)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if bad := [p for p in parts if p not in PARTS]:
        ap.error(f"unknown part(s) {bad}; choose from {PARTS}")
    q = args.quick
    repeats = args.repeats or (1 if q else 3)
    print(machine_report(), flush=True)
    require_shared()
    watch = CpuWatch()
    import torch

    from index.datasets import load_dataset
    from index.photos import find_photos
    from retrieval.torch_encoders import cpu_has_fast_bf16

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"native CPU bf16: {cpu_has_fast_bf16()}")
    with tempfile.TemporaryDirectory(prefix="bench_clean_") as tmp:
        tmp = Path(tmp)
        if "zeroshot" in parts:
            zeroshot_part(args.n or (16 if q else 64), repeats, (args.precisions or ("auto" if q else "auto,fp32"))
                          .split(","), tmp / "zs")
        train, val = PH_SNAKES / "train", PH_SNAKES / "val"
        if q:  # the two species folders that hold the leaks, linked
            for split in ("train", "val"):
                for name in LEAK_SPECIES:
                    (tmp / split).mkdir(exist_ok=True)
                    os.symlink(PH_SNAKES / split / name, tmp / split / name)
            train, val = tmp / "train", tmp / "val"
        lists = {"train": [str(r.path) for r in load_dataset("folder", train).records],
                 "val": [str(p) for p in find_photos(val)]}
        for p in lists["train"] + lists["val"]:
            Path(p).read_bytes()  # into the page cache: both sides read warm files
        ours = {}
        if "leaks" in parts:
            ours = leaks_part((args.leak_precisions or ("auto" if q else "auto,fp32")).split(","), train, val,
                              _sample(8, tmp / "warm"), repeats)
        if "growth" in parts:
            sizes = [int(s) for s in (args.sizes or ("1000,5000" if q else "1000,5000,20000")).split(",")]
            growth_part(sizes + ([100000] if args.large else []), repeats, args.naive_max)
        self_sizes = [int(x) for x in (args.self_sizes or ("2000,4000" if q else "20000,40000")).split(",")]
        if "self" in parts:
            self_part(self_sizes, repeats, args.old_src)
        if "knn" in parts:
            knn_part(self_sizes, repeats)
        if "peer" in parts:
            peer_part(peer_phash(), lists, args.phash_max_distance, repeats, ours)
    print(watch.report())


if __name__ == "__main__":
    main()
