"""How long ``speciesid clean`` takes per 1,000 photos with BioCLIP's compute (a random ViT-B-16) on CPU.

Sample: N ph-snakes train photos (default 64, spread over the 14 species; 224x224 JPEG/PNG), symlinked
into a temp folder. Each run is ``retrieval.workflows.clean`` as the CLI calls it: zero-shot filter with the
shipped snake prompts (the encoder reads text), exact and near duplicates, the report (CSV, contact sheet
with thumbnails of what was flagged, summary). A random-weight model flags photos at random, so the
contact sheet holds more thumbnails than a real run would: the "rest" figure is, if anything, high.

Split:
* embedding: read + sha256 + decode + preprocess (worker threads) + the image forward pass;
* prompts: encoding the prompt ensemble (10 classes x ~5 phrases x 8 templates), once per run, not per photo;
* rest: zero-shot scoring, duplicate search, writing the report.

Per-1,000 figures are the N-photo times scaled by 1000/N (embedding and scoring are linear in N; the
exact pair search is quadratic but takes milliseconds at these sizes). The encoder is loaded and warmed
up (one 8-photo run) outside the timed region; figures are medians over repeats.

    .venv/bin/python benchmarks/bench_clean.py                  # 64 photos, auto (bf16 here) and fp32, 3 repeats
    .venv/bin/python benchmarks/bench_clean.py --n 32 --repeats 1 --precisions fp32
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import PH_SNAKES, VIT_SPEC, median, peak_rss_mib, require_shared
from _hardware import machine_report


def _other_cpu() -> tuple[float, float]:
    """(monotonic time, CPU seconds used so far by the whole machine minus this process)."""
    import resource

    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:9]]
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.monotonic(), (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK") - r.ru_utime - r.ru_stime


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="photos in the sample (default 64)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per precision (default 3)")
    ap.add_argument("--precisions", default="auto,fp32", help="comma-separated (default auto,fp32)")
    args = ap.parse_args()
    print(machine_report(), flush=True)
    require_shared()

    import torch

    from retrieval.encoders import EncoderConfig, cpu_has_fast_bf16, create_encoder_from_config
    from retrieval.findings import CleanConfig
    from retrieval.workflows import clean

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"native CPU bf16: {cpu_has_fast_bf16()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = _sample(args.n, tmp / "photos")
        warm = _sample(8, tmp / "warm")
        rows = []
        for precision in args.precisions.split(","):
            cfg = EncoderConfig(spec=VIT_SPEC, precision=precision)
            enc = create_encoder_from_config(cfg)
            dtype = str(enc.dtype).removeprefix("torch.")
            config = CleanConfig(prompts="snakes")
            clean(dataset="folder", root=warm, encoder=enc, config=config, report_dir=tmp / "r-warm",
                  progress=False)
            emb, text, rest, total = [], [], [], []
            t_other, busy0 = _other_cpu()
            for r in range(args.repeats):
                t0 = time.perf_counter()
                res = clean(dataset="folder", root=root, encoder=enc, config=config, report_dir=tmp / f"r{r}",
                            progress=False)
                total.append(time.perf_counter() - t0)
                emb.append(res.seconds_embed)
                text.append(res.zero_shot.seconds_text)
                rest.append(res.seconds_rest - res.zero_shot.seconds_text + res.seconds_report)
            t1, busy1 = _other_cpu()
            scale = 1000.0 / args.n
            rows.append((precision, dtype, median(emb) * scale, median(rest) * scale, median(text),
                         median(total), (busy1 - busy0) / (t1 - t_other), res.counts()))
        print(f"\n{args.n} photos, {args.repeats} repeats (medians); per 1,000 photos = x {1000 / args.n:.1f}")
        print("| precision | dtype | embedding s / 1k photos | rest s / 1k photos | prompts s (once) | "
              "total s for the sample | cores used by other processes |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for p, d, e, r, t, tot, busy, _ in rows:
            print(f"| {p} | {d} | {e:.0f} | {r:.1f} | {t:.1f} | {tot:.1f} | {busy:.2f} |")
        print("\nfindings in the last run:", rows[-1][-1])
        print(f"peak RSS of this process: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
