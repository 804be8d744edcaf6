"""What an answer costs after the encoder: search, vote, probe, blend and dressing, from embeddings.

A gallery of the ph-snakes train photos (real MobileNetV1 embeddings, cached under runs/cache), its probe trained as
``speciesid probe train`` does; then every val embedding is identified one at a time (``identify_embeddings``), in
two ways alternated pass by pass in one run:

* **now**: ``Identifier.taxa()`` (the species metadata every answer is dressed with) cached per ``Gallery.version``,
  the version of the rows the index serves;
* **as before**: the same cache checked against ``store.version``, a LanceDB call per answer.

Then the first answers on a freshly opened gallery, whose metadata cache is empty: **as before**, each answer looks
up its neighbours' metadata it has not seen (a LanceDB query); **now**, n answers read the gallery's metadata whole
first when n x ``META_LOOKUP_ROWS`` reaches its size (a single answer: galleries up to 2,000 references). And, on a synthetic gallery of ``--synthetic`` references, what a
lookup of 30 ids costs against reading the whole metadata once (``Gallery.preload_metadata``, what a server does at
start), and a batch of 200 answers with and without that scan first.

Prints p50 / p95 / p99 per way and the ratio of medians. Nothing here asserts: it prints.

    flock /tmp/speciesid-timing.lock .venv/bin/python benchmarks/bench_answer.py          # ~2 min
    .venv/bin/python benchmarks/bench_answer.py --quick

``--quick``: 1 pass, 40 queries, 5,000 synthetic references, and the probe's settings chosen in 2 cross-validation
folds, not 5 (the choice is not what is timed here). A first run on a machine also embeds both ph-snakes splits
once (cached under runs/cache), whatever the options.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from _common import (
    MOBILENET_SPEC,
    PH_SNAKES,
    CpuWatch,
    gallery_from_embeddings,
    peak_rss_mib,
    percentiles,
    require_shared,
    split_embeddings,
)
from _hardware import machine_report


def _taxa_as_before(self):
    """``Identifier.taxa()`` as it was: the cache checked against the store's version (a LanceDB call)."""
    version = self.gallery.store.version
    if version != self._taxa_version:
        taxa = dict(self.text_prior.taxa) if self.text_prior else {}
        taxa.update({s.species: s for s in self.gallery.species()})
        self._taxa, self._taxa_version = taxa, version
    return self._taxa


def answer_ms(ident, queries: np.ndarray) -> list[float]:
    """Milliseconds of each answer, the embeddings identified one at a time."""
    out = []
    for q in queries:
        t0 = time.perf_counter()
        ident.identify_embeddings(q[None])
        out.append(1000 * (time.perf_counter() - t0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passes", type=int, default=5, help="passes over the val embeddings per way (default 5)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 pass, 40 queries, 5,000 synthetic references, probe settings chosen in 2 "
                         "folds (not 5); 1-2 min of CPU (docs/benchmarks.md)")
    ap.add_argument("--synthetic", type=int, default=100_000,
                    help="synthetic references for the lookup-against-scan figure (0: skip; default 100,000)")
    args = ap.parse_args()
    require_shared()
    print("bench_answer: where it ran\n" + machine_report(), flush=True)
    from index.datasets import load_dataset
    from retrieval.encoders import EncoderConfig, create_encoder
    from retrieval.identify import Identifier
    from retrieval.workflows import open_identifier, train_gallery_probe

    enc = create_encoder(MOBILENET_SPEC, precision="fp32")
    train, _, _ = split_embeddings(MOBILENET_SPEC, "train")
    queries, _, _ = split_embeddings(MOBILENET_SPEC, "val")
    passes = 1 if args.quick else args.passes
    if args.quick:
        args.synthetic = min(args.synthetic, 5_000)
    queries = queries[:40] if args.quick else queries
    now = Identifier.taxa
    ways = {"now (Gallery.version)": now, "as before (store.version per answer)": _taxa_as_before}
    times: dict[str, list[float]] = {name: [] for name in ways}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "g"
        gallery_from_embeddings(root, enc, load_dataset("folder", PH_SNAKES / "train").records, train)
        train_gallery_probe(root, folds=2 if args.quick else 5, progress=False)
        ident = open_identifier(root, EncoderConfig(precision="fp32"))
        for q in queries:  # one untimed pass: the whitened vote caches each reference's whitened vector
            ident.identify_embeddings(q[None])
        watch = CpuWatch()
        try:
            for p in range(passes):
                for name in list(ways)[:: 1 if p % 2 == 0 else -1]:  # alternate the order: drift hits both alike
                    Identifier.taxa = ways[name]
                    times[name] += answer_ms(ident, queries)
        finally:
            Identifier.taxa = now
        cal = ident.probe.calibration
        print(f"\n{len(queries)} val embeddings one at a time, gallery {len(ident.gallery)} references, {passes} "
              "passes per way; "
              f"blend w={cal.blend_weight} k={cal.k} kNN metric {cal.metric}")
        for name, v in times.items():
            print(f"  {name}: {percentiles(v)}")
        a, b = (float(np.median(times[n])) for n in ways)
        print(f"  p50 as before / now: {b / a:.2f}x")
        first_pass(root, queries, passes)
    if args.synthetic:
        synthetic(args.synthetic)
    print(watch.report())
    print(f"peak RSS of this process: {peak_rss_mib():.0f} MiB (the synthetic gallery's metadata read whole included)")


@contextmanager
def metadata_rule(now: bool) -> Iterator[None]:
    """Answers read the gallery's metadata as now (whole, when a batch's lookups would cost more) or as before
    (``META_LOOKUP_ROWS`` 0: each answer looks up what it has not seen)."""
    import index.gallery as gallery_module

    lookup_rows = gallery_module.META_LOOKUP_ROWS
    gallery_module.META_LOOKUP_ROWS = lookup_rows if now else 0
    try:
        yield
    finally:
        gallery_module.META_LOOKUP_ROWS = lookup_rows


def warm_index_cold_metadata(ident, query: np.ndarray) -> None:
    """One untimed answer loads the index (and fits the whitening); then its metadata cache is emptied, so what
    is timed next starts cold."""
    ident.voting_neighbours(query[None])
    ident.gallery._meta_cache.clear()
    ident.gallery._meta_scanned = False


def first_pass(root: Path, queries: np.ndarray, passes: int) -> None:
    """The first pass of answers on a freshly opened gallery: per-answer lookups (as before) against one scan."""
    from retrieval.encoders import EncoderConfig
    from retrieval.workflows import open_identifier

    times: dict[str, list[float]] = {"now (read whole at the first answer)": [],
                                     "as before (each answer looks up what it has not seen)": []}
    for p in range(passes):
        for name in list(times)[:: 1 if p % 2 == 0 else -1]:
            with metadata_rule(now=name.startswith("now")):
                ident = open_identifier(root, EncoderConfig(precision="fp32"))
                warm_index_cold_metadata(ident, queries[0])
                times[name] += answer_ms(ident, queries)
    print(f"\nfirst pass of {len(queries)} answers on a freshly opened gallery ({passes} openings per way)")
    for name, v in times.items():
        print(f"  {name}: {percentiles(v)}, {sum(v) / passes:.0f} ms a pass")


def synthetic(n: int) -> None:
    """A lookup of 30 ids against reading the whole metadata once, on ``n`` synthetic references."""
    from index.gallery import Gallery
    from index.records import ReferenceRecord
    from retrieval.identify import Identifier

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "g"
        g = Gallery.create(root, {"spec": "synthetic", "fingerprint": "synthetic#0", "dim": 64})
        for start in range(0, n, 20_000):
            m = min(20_000, n - start)
            x = rng.standard_normal((m, 64)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            g.add([ReferenceRecord(path=f"/data/photos/{start + i}.jpg", species=f"Genus{(start + i) % 300} "
                                   f"species{(start + i) % 1000}", family="Colubridae", common_name="a common name")
                   for i in range(m)], [f"{start + i:064x}" for i in range(m)], x, save_index=False)
        g.finish_build()
        g = Gallery.open(root)
        ids = g.store.ids()
        lookups = []
        for _ in range(50):
            some = rng.choice(ids, 30, replace=False).tolist()
            t0 = time.perf_counter()
            g.store.metadata(some)
            lookups.append(1000 * (time.perf_counter() - t0))
        t0 = time.perf_counter()
        rows = g.preload_metadata(max_rows=n)
        seconds = time.perf_counter() - t0
        batch = rng.standard_normal((200, 64)).astype(np.float32)
        batch_s = {}
        for way, now in (("as before (a lookup an answer)", False), ("now (one scan first)", True)):
            with metadata_rule(now):
                ident = Identifier(_SyntheticEncoder(), Gallery.open(root))
                warm_index_cold_metadata(ident, batch[0])
                t0 = time.perf_counter()
                ident.identify_embeddings(batch)
                batch_s[way] = time.perf_counter() - t0
    print(f"\nsynthetic gallery of {n:,} references: a lookup of 30 ids {percentiles(lookups)}; reading all "
          f"{rows:,} once {seconds:.2f} s (= {1000 * seconds / np.median(lookups):.0f} lookups' p50)")
    print("  a batch of 200 answers (as `speciesid evaluate` / identify of many photos): "
          + ", ".join(f"{way} {s:.2f} s" for way, s in batch_s.items()))


class _SyntheticEncoder:
    """The encoder an Identifier over the synthetic gallery records (embeddings are given, never computed)."""

    spec = "synthetic"
    fingerprint = "synthetic#0"
    dim = 64


if __name__ == "__main__":
    main()
