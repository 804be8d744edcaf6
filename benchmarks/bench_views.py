"""Identify latency of the embedding options (--pool, --views) for MobileNetV1: the cost side of docs/accuracy.md.

One request at a time, photo file -> answer, the path ``speciesid identify PHOTO`` takes (read, decode, every
view preprocessed, forward passes, FAISS search, kNN vote): ``retrieval.pipeline.embed_sources`` +
``Identifier.identify_embeddings``. Per option: runtime ``auto`` (what the CLI picks here; ``ms`` views run on
torch) and torch fp32. The gallery is ph-snakes train (975 photos) stored from the plain embeddings under each
option's fingerprint: the search costs the same, the answers are not meaningful (accuracy: bench_protocol.py).
For today's embeddings also the blend with a linear probe, its kNN vote under the cosine metric and under the
whitened one (``retrieval.metric``: the 200 cosine neighbours re-ranked in the whitened space).
With ``--finetuned OUT`` (a ``speciesid finetune`` folder) also that network's blend (kNN cosine and whitened:
``probe import`` chooses one per gallery), embedded at the test size its run chose and at the model's own size.
Passes rotate the order of the options; medians over passes. Run it at normal priority, alone:

    flock /tmp/speciesid-timing.lock .venv/bin/python benchmarks/bench_views.py [--queries 40 --passes 3]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import (
    MOBILENET_SPEC,
    PH_SNAKES,
    CpuWatch,
    gallery_from_embeddings,
    median,
    peak_rss_mib,
    require_shared,
    split_embeddings,
)
from _hardware import machine_report

OPTIONS = [("model", "single"), ("gem3", "single"), ("model", "flip"), ("gem3", "flip"), ("model", "ms"),
           ("gem3", "flipms")]


def _probe_identifier(enc, gallery, records, emb: np.ndarray, metric: str):
    """An identifier blending a C=50 probe (trained on the gallery's embeddings) with the kNN vote under ``metric``."""
    from retrieval.identify import Identifier
    from retrieval.metric import fit_whitening
    from retrieval.probe import train_probe

    labels = [r.species for r in records]
    probe = train_probe(emb, labels, fingerprint=enc.fingerprint, C=50.0)
    probe.calibration.metric = metric
    probe.whitening = fit_whitening(emb, labels) if metric == "whitened" else None
    return Identifier(enc, gallery, probe=probe)


def _add_runner(runners: dict, name: str, ident, queries: list[str]) -> None:
    """Register one identify path: photo file -> answer (warmed up on two queries first)."""
    from retrieval.pipeline import embed_sources

    def run(p: str) -> None:
        e, err = embed_sources([p], ident.encoder)
        assert err[0] is None, err
        ident.identify_embeddings(e)

    for q in queries[:2]:
        run(q)
    runners[name] = run
    print(f"  ready: {name}", flush=True)


def _finetuned_variants(folder: Path, tmp: Path) -> list[tuple[Path, str]]:
    """The fine-tuned folder as its run left it (its chosen test size), and a copy embedding at the model's size."""
    import json

    cfg = json.loads((folder / "config.json").read_text())
    if "test_input_size" not in cfg.get("pretrained_cfg", {}):
        return [(folder, "the model's own size")]
    plain = tmp / "finetuned-model-size"
    plain.mkdir()
    for f in folder.iterdir():
        if f.is_file() and f.name != "config.json":
            (plain / f.name).symlink_to(f.resolve())
    cfg["pretrained_cfg"].pop("test_input_size")
    (plain / "config.json").write_text(json.dumps(cfg))
    return [(folder, "the test size chosen"), (plain, "the model's own size")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=40, help="val photos queried (evenly spaced; default 40)")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--runtimes", nargs="+", default=["auto", "torch"])
    ap.add_argument("--options", nargs="+", default=[f"{p}/{v}" for p, v in OPTIONS],
                    help="POOL/VIEWS pairs (default: all six; model/single is always run, the baseline)")
    ap.add_argument("--finetuned", type=Path, help="also a `speciesid finetune` output: the blend (kNN cosine and "
                    "whitened) embedded at the test size its run chose, and at the model's own size")
    args = ap.parse_args()
    require_shared()
    logging.disable(logging.WARNING)
    from index.datasets import load_dataset
    from retrieval.encoders import create_encoder
    from retrieval.identify import Identifier
    from retrieval.vote import VoteConfig

    print("bench_views: where it ran\n" + machine_report())
    watch = CpuWatch()
    train = load_dataset("folder", PH_SNAKES / "train").records
    emb, _, _ = split_embeddings(MOBILENET_SPEC, "train")
    val = sorted(load_dataset("folder", PH_SNAKES / "val").records, key=lambda r: str(r.path))
    queries = [str(val[int(i * len(val) / args.queries)].path) for i in range(min(args.queries, len(val)))]
    calib = [str(r.path) for r in train[::4]]
    runners = {}
    with tempfile.TemporaryDirectory(prefix="bench_views_") as tmp:
        wanted = [tuple(o.split("/")) for o in args.options]
        for pool, views in [("model", "single")] + [o for o in wanted if o != ("model", "single")]:
            for rt in args.runtimes:
                if views in ("ms", "flipms") and rt == "auto" and "torch" in args.runtimes:
                    continue  # the scale view runs on torch: auto would be the torch row again
                prec = "fp32" if rt == "torch" else "auto"
                enc = create_encoder(MOBILENET_SPEC, runtime=rt, precision=prec, device="cpu", photos=calib,
                                     pool=pool, views=views)
                g = gallery_from_embeddings(Path(tmp) / f"{pool}-{views}-{rt}", enc, train, emb)
                _add_runner(runners, f"pool={pool} views={views} | {rt} -> {enc.runtime} {enc.precision}",
                            Identifier(enc, g, VoteConfig()), queries)
                if (pool, views) == ("model", "single"):
                    for metric in ("cosine", "whitened"):
                        _add_runner(runners, f"pool={pool} views={views}, blend, kNN {metric} | {rt} -> "
                                    f"{enc.runtime} {enc.precision}",
                                    _probe_identifier(enc, g, train, emb, metric), queries)
        if args.finetuned:
            for folder, what in _finetuned_variants(args.finetuned, Path(tmp)):
                for rt in args.runtimes:
                    prec = "fp32" if rt == "torch" else "auto"
                    enc = create_encoder(f"timm:local-dir:{folder}", runtime=rt, precision=prec, device="cpu",
                                         photos=calib)
                    g = gallery_from_embeddings(Path(tmp) / f"ft-{what}-{rt}", enc, train, emb)
                    for metric in ("cosine", "whitened"):  # `probe import` chooses one per gallery
                        _add_runner(runners, f"fine-tuned at {enc.input_size} px ({what}), blend, kNN {metric} | "
                                    f"{rt} -> {enc.runtime} {enc.precision}",
                                    _probe_identifier(enc, g, train, emb, metric), queries)
        names = list(runners)
        per: dict[str, list[dict]] = {n: [] for n in names}
        for p in range(args.passes):
            order = names[p % len(names):] + names[: p % len(names)]
            for n in order:
                time.sleep(0.2)
                lat = []
                for q in queries:
                    t0 = time.perf_counter()
                    runners[n](q)
                    lat.append((time.perf_counter() - t0) * 1000)
                v = np.asarray(lat)
                per[n].append({"p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)),
                               "p99": float(np.percentile(v, 99))})
        references = len(g)  # counted while the galleries' folder is there (it goes at the end of the block)
    print(f"\n{len(queries)} queries one at a time, gallery {references} references ({len(train)} photos, "
          f"byte copies stored once), {args.passes} passes (medians over passes)")
    print("| options | runtime | p50 ms | p95 ms | p99 ms | p50 / today's (same runtime) |")
    print("|---|---|---:|---:|---:|---:|")
    for n in names:
        fig = {k: median([x[k] for x in per[n]]) for k in ("p50", "p95", "p99")}
        opts, rt = n.split(" | ")
        base = next(m for m in names if m.startswith("pool=model views=single |") and m.split(" | ")[1].split(" ->")[0]
                    == rt.split(" ->")[0])
        ratio = fig["p50"] / median([x["p50"] for x in per[base]])
        print(f"| {opts} | {rt} | {fig['p50']:.1f} | {fig['p95']:.1f} | {fig['p99']:.1f} | {ratio:.2f}x |")
    print(watch.report())
    print(f"peak RSS of this process: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
