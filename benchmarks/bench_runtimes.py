"""Images per CPU-second and per wall-second of each runtime x precision, model only: the runtimes.md table.

Reproduces docs/runtimes.md's "img per CPU-s" table (the basis of the ``auto`` order), which was first measured
with one-off scripts. For each model the table lists (MobileNetV1, real weights; ViT-B-16, random weights: the
same compute as BioCLIP's, and speed does not depend on the weights) and each runtime x precision row it lists:

* the image tower is exported once here (ONNX, ONNX Runtime dynamic int8, OpenVINO IR, NNCF int8 calibrated on
  ph-snakes train photos) into a temporary folder: **not** through the user cache and its faithfulness check, so
  a row ``auto`` refuses (MobileNetV1 int8) is still timed;
* every row then runs in its own process with ``--threads`` compute threads (default 1, as in the table), on
  preprocessed ph-snakes val photos (no decoding: model only), after one untimed warm-up batch;
* it prints images per CPU-second (``time.process_time()`` of that process: every thread it runs, the runtimes'
  idle spinning included; a proxy that a loaded, shared machine changes less than the wall clock), images per
  wall-second, the ratio to torch fp32 of the same model, and the cosine to torch fp32 (min over the photos).

Prints where it ran (CPU model, kind, features, versions; benchmarks/_hardware.py) and the command first. Rows
that need what this CPU lacks (bf16 without native bf16) are skipped with the reason.

    .venv/bin/python benchmarks/bench_runtimes.py                                # 32 ViT / 256 MobileNet photos
    .venv/bin/python benchmarks/bench_runtimes.py --vit-photos 16 --mobilenet-photos 96 --calibration 16
    .venv/bin/python benchmarks/bench_runtimes.py --no-vit --threads 0           # 0: each runtime's own default
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

import numpy as np
from _common import MOBILENET_SPEC, PH_SNAKES, VIT_SPEC, CpuWatch, evenly, require_shared
from _hardware import machine_report

#: (label, runtime, precision, OpenVINO hint) per model, in the table's order. A hint of None: the one
#: speciesid gives that precision on this CPU (int8: bf16 where bf16 is native, else f32).
ROWS = {
    "ViT-B-16": [("openvino int8 + bf16 hint", "openvino", "int8", "bf16"),
                 ("openvino int8 + f32 hint", "openvino", "int8", "f32"),
                 ("onnx int8 (dynamic)", "onnx", "int8", None),
                 ("openvino bf16", "openvino", "bf16", "bf16"),
                 ("torch bf16", "torch", "bf16", None),
                 ("torch int8 (dynamic)", "torch", "int8", None),
                 ("openvino fp32", "openvino", "fp32", "f32"),
                 ("onnx fp32", "onnx", "fp32", None),
                 ("torch fp32", "torch", "fp32", None)],
    "MobileNetV1": [("openvino int8 (NNCF)", "openvino", "int8", None),
                    ("openvino bf16", "openvino", "bf16", "bf16"),
                    ("onnx fp32", "onnx", "fp32", None),
                    ("openvino fp32", "openvino", "fp32", "f32"),
                    ("torch bf16", "torch", "bf16", None),
                    ("torch fp32", "torch", "fp32", None)],
}
SPECS = {"ViT-B-16": VIT_SPEC, "MobileNetV1": MOBILENET_SPEC}
BATCH = {"ViT-B-16": 8, "MobileNetV1": 32}  # as in the table


def _photos(split: str, n: int) -> list[Path]:
    """n photos of a ph-snakes split, evenly spaced over the sorted list (every species is in)."""
    return evenly(sorted(p for p in (PH_SNAKES / split).glob("*/*") if p.is_file()), n)


def _preprocessed(enc: object, paths: list[Path]) -> np.ndarray:
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(enc.preprocess(im.convert("RGB")))
    return np.stack(out).astype(np.float32)


def export_all(model: str, folder: Path, photos: int, calibration: int, rows: list) -> dict:
    """Preprocess the photos and export every exported row's model file into ``folder``; what the rows need."""
    from retrieval.cpu import cpu_kind
    from retrieval.encoders import create_encoder
    from retrieval.runtimes.export import (
        convert_openvino,
        export_onnx,
        quantize_onnx_dynamic,
        quantize_openvino,
    )

    kind = cpu_kind()
    ref = create_encoder(SPECS[model], runtime="torch", precision="fp32", device="cpu")
    x = _preprocessed(ref, _photos("val", photos))
    np.save(folder / "x.npy", x)
    onnx = folder / "fp32.onnx"
    files: dict[str, str] = {}
    needs = {(rt, prec) for _, rt, prec, _ in rows if rt != "torch"}
    t0 = time.perf_counter()
    if needs:
        export_onnx(ref.image_module(), x[:2], onnx)
        files["onnx fp32"] = str(onnx)
    if ("onnx", "int8") in needs:
        from retrieval.cpu import has_vnni

        quantize_onnx_dynamic(onnx, folder / "int8.onnx", family=ref.family, vnni=has_vnni(kind), progress=False)
        files["onnx int8"] = str(folder / "int8.onnx")
    if ("openvino", "fp32") in needs or ("openvino", "bf16") in needs:
        convert_openvino(onnx, folder / "fp32.xml")
        files["openvino fp32"] = files["openvino bf16"] = str(folder / "fp32.xml")
    if ("openvino", "int8") in needs:
        from retrieval.cpu import has_vnni

        calib = _preprocessed(ref, _photos("train", calibration))
        quantize_openvino(onnx, folder / "int8.xml", calib, family=ref.family, vnni=has_vnni(kind), progress=False)
        files["openvino int8"] = str(folder / "int8.xml")
    print(f"{model}: {len(x)} photos preprocessed; exports made in {time.perf_counter() - t0:.0f} s "
          f"(calibration: {calibration} train photos)", flush=True)
    return files


def worker(job: dict) -> None:
    """One row in its own process: load, warm up, time ``repeats`` passes over the photos; print a JSON line."""
    import logging

    logging.disable(logging.WARNING)  # the random-weights warning
    threads = job["threads"]
    x = np.load(job["x"])
    batch = job["batch"]
    rt, prec = job["runtime"], job["precision"]
    if rt == "torch":
        import torch

        if threads:
            torch.set_num_threads(threads)
        from retrieval.encoders import create_encoder

        enc = create_encoder(job["spec"], runtime="torch", precision=prec, device="cpu")
        run = enc.encode_batch
    elif rt == "onnx":
        from retrieval.runtimes.exported import onnx_runner

        run = onnx_runner(Path(job["file"]), threads=threads)
    else:
        from retrieval.runtimes.exported import openvino_runner

        run = openvino_runner(Path(job["file"]), job["hint"], None, threads=threads)

    run(np.ascontiguousarray(x[:batch]))  # warm-up: outside the timed region
    chunks = [np.ascontiguousarray(x[i : i + batch]) for i in range(0, len(x), batch)]
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(job["repeats"]):
        out = [run(c) for c in chunks]
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - t0
    emb = np.concatenate(out).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    np.save(job["out"], emb)
    print(json.dumps({"images": len(x) * job["repeats"], "cpu_s": cpu_s, "wall_s": wall_s}), flush=True)


def _hint_for(prec: str, hint: str | None) -> str:
    from retrieval.runtimes.export import openvino_hint

    return hint if hint is not None else openvino_hint(prec)


def bench_model(model: str, args: argparse.Namespace, folder: Path) -> list[dict]:
    """Every row of one model: exports, then one process per row."""
    from retrieval.cpu import cpu_kind, has_native_bf16

    kind = cpu_kind()
    rows = [r for r in ROWS[model] if not args.rows or r[0] in args.rows]
    skipped = [r for r in rows if "bf16" in r[0] and not has_native_bf16(kind)]
    for label, *_ in skipped:
        print(f"{model} {label}: skipped (no native bf16 on kind {kind}: emulated, never chosen)", flush=True)
    rows = [r for r in rows if r not in skipped]
    sub = folder / model
    sub.mkdir()
    files = export_all(model, sub, args.vit_photos if model == "ViT-B-16" else args.mobilenet_photos,
                       args.calibration, rows)
    results = []
    for i, (label, rt, prec, hint) in enumerate(rows):
        job = {"spec": SPECS[model], "runtime": rt, "precision": prec, "hint": _hint_for(prec, hint),
               "file": files.get(f"{rt} {prec}"), "x": str(sub / "x.npy"), "batch": BATCH[model],
               "threads": args.threads, "repeats": args.repeats, "out": str(sub / f"emb{i}.npy")}
        env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                              text=True, env=env)
        if proc.returncode:
            print(f"{model} {label}: failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}", flush=True)
            continue
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        got.update(label=label, runtime=rt, precision=prec, emb=job["out"])
        print(f"{model} {label}: {got['images'] / got['cpu_s']:.2f} img per CPU-s, "
              f"{got['images'] / got['wall_s']:.2f} img per wall-s ({got['images']} images)", flush=True)
        results.append(got)
    return results


def table(model: str, results: list[dict], kind: str) -> None:
    """The markdown table of one model."""
    ref = next((r for r in results if (r["runtime"], r["precision"]) == ("torch", "fp32")), None)
    ref_rate = ref["images"] / ref["cpu_s"] if ref else float("nan")
    ref_emb = np.load(ref["emb"]) if ref else None
    for r in results:
        rate = r["images"] / r["cpu_s"]
        cos = float((np.load(r["emb"]) * ref_emb).sum(1).min()) if ref_emb is not None else float("nan")
        print(f"| {kind} | {model} | {r['label']} | {rate:.2f} | {r['images'] / r['wall_s']:.2f} | "
              f"{rate / ref_rate:.2f} | {cos:.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vit-photos", type=int, default=32, help="ph-snakes val photos timed for ViT-B-16 (default 32)")
    ap.add_argument("--mobilenet-photos", type=int, default=256,
                    help="ph-snakes val photos timed for MobileNetV1 (default 256)")
    ap.add_argument("--calibration", type=int, default=64,
                    help="ph-snakes train photos NNCF int8 calibrates on (default 64; speciesid uses up to 128)")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes over the photos per row (default 1)")
    ap.add_argument("--threads", type=int, default=1,
                    help="compute threads per row (default 1, as in the table; 0: each runtime's default)")
    ap.add_argument("--no-vit", action="store_true", help="skip ViT-B-16")
    ap.add_argument("--no-mobilenet", action="store_true", help="skip MobileNetV1")
    ap.add_argument("--rows", help="comma-separated row labels to run (default: all the table lists)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    args.rows = set(args.rows.split(",")) if args.rows else None
    require_shared()
    from retrieval.cpu import cpu_kind

    print(machine_report(), flush=True)
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    print(f"date: {time.strftime('%Y-%m-%d')}; threads per row: {args.threads or 'runtime default'}", flush=True)
    watch, t0 = CpuWatch(), time.perf_counter()
    models = [m for m in ROWS if not (m == "ViT-B-16" and args.no_vit) and not (m == "MobileNetV1" and args.no_mobilenet)]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_runtimes_") as tmp:
        for model in models:
            results[model] = bench_model(model, args, Path(tmp))
        kind = cpu_kind()
        print("\n| CPU kind | model | runtime, precision | img per CPU-s | img per wall-s | x torch fp32 (CPU-s) | "
              "cos min |\n|---|---|---|---:|---:|---:|---:|")
        for model in models:
            table(model, results[model], kind)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; {watch.report()}")


if __name__ == "__main__":
    main()
