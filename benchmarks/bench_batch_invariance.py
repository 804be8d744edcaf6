"""Does a photo's embedding depend on what it is batched with? docs/runtimes.md, "The command line and the server".

The server batches concurrent requests (``SPECIESID_BATCH_WINDOW_MS``), the command line the photos it is given:
if a photo's embedding changed with its batch, the same photo would get different figures in the terminal and on
the page. For each runtime x precision asked (default: those docs/runtimes.md names) this opens MobileNetV1
(coral_in1k, real weights, ../shared) on the CPU as a gallery would (``create_encoder``: an export from the user
cache, made and checked the first time), embeds ``--photos`` ph-snakes val photos one call each
(``retrieval.pipeline.embed_photos`` of one photo) and all in one call (one batch, while they are no more than the
printed batch size), and prints the largest absolute difference of any embedding value between the two, and
whether they are bit for bit the same. A pair the CPU cannot run (bf16 without native bf16) or whose runtime is
not installed is skipped with the reason; the runtime and precision the encoder actually runs are printed (an
export found unfaithful runs torch instead).

Prints where it ran (CPU model, kind, features, versions: benchmarks/_hardware.py) and the command first.

    .venv/bin/python benchmarks/bench_batch_invariance.py                     # 6 photos, the five pairs
    .venv/bin/python benchmarks/bench_batch_invariance.py --photos 12 --pairs torch:fp32 onnx:fp32
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from _common import MOBILENET_SPEC, PH_SNAKES, evenly, require_shared
from _hardware import machine_report

#: The (runtime, precision) pairs docs/runtimes.md reports.
PAIRS = ("openvino:bf16", "openvino:fp32", "onnx:fp32", "torch:fp32", "torch:bf16")


def _pair(text: str) -> tuple[str, str]:
    runtime, sep, precision = text.partition(":")
    if not sep or not runtime or not precision:
        raise argparse.ArgumentTypeError(f"{text!r}: write RUNTIME:PRECISION, e.g. openvino:bf16")
    return runtime, precision


def skip_reason(runtime: str, precision: str) -> str | None:
    """Why this CPU / install cannot run the pair, or None."""
    from retrieval.cpu import cpu_flags
    from retrieval.runtimes.select import runtime_installed

    if runtime != "torch" and not runtime_installed(runtime):
        return f"{runtime} not installed"
    if precision == "bf16" and "avx512_bf16" not in cpu_flags() and "amx_bf16" not in cpu_flags():
        return "no native bf16 on this CPU"
    return None


def compare(runtime: str, precision: str, photos: list[str]) -> str:
    """One line: what ran, and the largest difference between each photo embedded alone and in one batch."""
    from retrieval.encoders import create_encoder
    from retrieval.pipeline import embed_photos

    enc = create_encoder(MOBILENET_SPEC, runtime=runtime, precision=precision, device="cpu", photos=photos)
    together = embed_photos(photos, enc)
    alone = [embed_photos([photo], enc) for photo in photos]
    errors = [e for run in (together, *alone) for e in run.errors if e]
    if errors:
        raise RuntimeError(f"photos not embedded: {errors[:3]}")
    single = np.concatenate([run.embeddings for run in alone])
    largest = float(np.max(np.abs(single - together.embeddings)))
    same = "identical" if np.array_equal(single, together.embeddings) else "not identical"
    return (f"{runtime + ':' + precision:<14} ran {enc.runtime} {enc.precision} (batch size {enc.batch_size}): "
            f"largest |alone - batched| {largest:g}, {same}")


def main(argv: list[str] | None = None) -> int:
    """Print the comparison of each pair (exit status)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--photos", type=int, default=6, help="ph-snakes val photos, evenly spaced (default 6)")
    p.add_argument("--pairs", nargs="+", type=_pair, default=[_pair(t) for t in PAIRS], metavar="RUNTIME:PRECISION",
                   help=f"what to compare (default {' '.join(PAIRS)})")
    args = p.parse_args(argv)
    require_shared()
    from index.datasets import load_dataset

    photos = evenly([str(r.path) for r in load_dataset("folder", PH_SNAKES / "val").records], args.photos)
    print("$ " + " ".join(["benchmarks/bench_batch_invariance.py", *sys.argv[1:]]))
    print(machine_report())
    print(f"MobileNetV1 coral_in1k, {len(photos)} ph-snakes val photos, each embedded alone and all in one call")
    for runtime, precision in args.pairs:
        reason = skip_reason(runtime, precision)
        print(f"{runtime + ':' + precision:<14} skipped: {reason}" if reason else compare(runtime, precision, photos))
    return 0


if __name__ == "__main__":
    sys.exit(main())
