"""Chaos test of the shared gallery: many writer processes at once, some killed (SIGKILL) at random moments.

Each trial builds a small gallery, starts ``--writers`` processes that add overlapping sets of real
ph-snakes photos (every photo is sent by at least two writers), kills ``--kill`` of them at a random
moment, and records every row a reader saw committed before the kills. Then it checks:

- the gallery opens and answers a search (nothing unopenable);
- no committed photo was lost (every row seen before a kill is still there, same id, same photo);
- every photo is stored once (sha256 unique) and every id once, and ids only grow (``ids.json``);
- the vector index holds exactly the store's searchable ids (saved file and the opened gallery);
- re-running the killed writers completes the gallery: every photo once.

    .venv/bin/python scripts/chaos_gallery.py --trials 20            # prints trials / survived / lost
    .venv/bin/python scripts/chaos_gallery.py --trials 3 --json       # one JSON line (the tests use it)

``--no-lock`` shows why the write lock exists: with `--writers 6 --chunk 1` photos get stored twice.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PH_SNAKES = REPO.parent / "shared" / "data" / "ph-snakes"
ENCODER = "timm:test_vit@random"  # tiny: the processes spend their time writing, not embedding


def _photos(n: int, seed: int) -> list[Path]:
    files = sorted(p for p in (PH_SNAKES / "train").rglob("*.jpg"))
    return random.Random(seed).sample(files, n)


def writer(index: str, species: str, paths: list[str], chunk: int, lock: bool) -> None:
    """One writer process: add the photos in small commits (so a kill can land between two)."""
    from retrieval.pipeline import add_references
    from retrieval.workflows import open_gallery

    gallery, enc = open_gallery(index, precision="fp32")
    if not lock:  # the broken baseline: every process believes it is alone
        import contextlib

        gallery._writer.hold = contextlib.nullcontext  # type: ignore[method-assign]
    from index.taxonomy import new_species_references

    _, records, _ = new_species_references(species, gallery.species(), paths, dataset="chaos")
    add_references(gallery, enc, records, chunk=chunk, progress=False)


def _committed(index: Path) -> dict[int, str]:
    """id -> sha256 of every row committed now (read by another process, as any reader would)."""
    from index.store import ReferenceStore

    store = ReferenceStore(index / "store", _dim(index), refresh_s=0)
    meta = store.metadata()
    return {int(i): str(s) for i, s in zip(meta["id"], meta["sha256"], strict=True)}


def _dim(index: Path) -> int:
    return int(json.loads((index / "gallery.json").read_text())["dim"])


def check(index: Path, seen: dict[int, str], expected_photos: int | None = None) -> list[str]:
    """Problems found in the gallery (empty list = consistent)."""
    import numpy as np

    from index.gallery import Gallery
    from index.vectors import VectorIndex

    problems = []
    try:
        g = Gallery.open(index, refresh_s=0)
        g.search(np.ones((1, g.dim), np.float32) / np.sqrt(g.dim), 3)
    except Exception as exc:  # noqa: BLE001 - any failure to open is the finding
        return [f"gallery does not open: {exc!r}"]
    meta = g.store.metadata()
    ids = [int(i) for i in meta["id"]]
    shas = list(meta["sha256"])
    if len(set(ids)) != len(ids):
        problems.append(f"duplicate ids: {len(ids) - len(set(ids))}")
    if len(set(shas)) != len(shas):
        problems.append(f"photos stored twice: {len(shas) - len(set(shas))}")
    now = dict(zip(ids, map(str, shas), strict=True))
    lost = {i for i, s in seen.items() if now.get(i) != s}
    if lost:
        problems.append(f"lost committed rows: {sorted(lost)[:10]}")
    if g.index.ids.tolist() != sorted(g.store.ids().tolist()):
        problems.append("opened index differs from the store")
    saved, manifest = VectorIndex.load(g.layout.vectors)
    if sorted(saved.ids.tolist()) != sorted(g.store.ids().tolist()):
        problems.append(f"saved index differs from the store (manifest {manifest})")
    nxt = json.loads(g.layout.ids.read_text())["next"] if g.layout.ids.is_file() else None
    if ids and (nxt is None or nxt <= max(ids)):
        problems.append(f"ids.json next={nxt} is not above the largest id {max(ids)}")
    if expected_photos is not None and len(set(shas)) != expected_photos:
        problems.append(f"{len(set(shas))} photos stored, {expected_photos} expected")
    return problems


def _spawn(index: Path, species: str, paths: list[Path], chunk: int, lock: bool) -> subprocess.Popen:
    args = [sys.executable, __file__, "_writer", str(index), species, str(chunk), "1" if lock else "0",
            *map(str, paths)]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def trial(seed: int, writers: int, kill: int, photos: int, chunk: int, lock: bool, tmp: Path) -> dict:
    """One trial; returns {"ok": bool, "lost": n, "problems": [...], ...}."""
    from retrieval.encoders import EncoderConfig
    from retrieval.workflows import build_gallery

    rng = random.Random(seed)
    index = tmp / f"g{seed}"
    pool = _photos(photos, seed)
    base = tmp / f"base{seed}" / "Naja philippinensis"
    base.mkdir(parents=True)
    os.symlink(pool[0], base / pool[0].name)
    build_gallery(index, "folder", base.parent, encoder=EncoderConfig(spec=ENCODER, precision="fp32"), progress=False)
    plans = []
    for w in range(writers):  # overlapping halves: every photo goes to at least two writers
        start = (w * len(pool)) // writers
        plans.append([pool[(start + k) % len(pool)] for k in range(len(pool) // 2 + 2)])
    covered = {p for plan in plans for p in plan} | {pool[0]}
    procs = [_spawn(index, f"Species w{w}", plan, chunk, lock) for w, plan in enumerate(plans)]
    victims = rng.sample(range(writers), kill)
    target = 1 + rng.randrange(len(covered))  # kill once this many rows are committed (a random moment)
    seen = _committed(index)
    while len(seen) < target and any(procs[v].poll() is None for v in victims):
        time.sleep(rng.uniform(0.0, 0.1))
        seen = _committed(index)
    for v in victims:
        os.kill(procs[v].pid, signal.SIGKILL)
    errors = []
    for w, p in enumerate(procs):
        _, err = p.communicate(timeout=600)
        if w not in victims and p.returncode != 0:
            errors.append(f"writer {w} exited {p.returncode}: {err.decode()[-500:]}")
    problems = errors + check(index, seen)
    lost = sum(1 for pr in problems if pr.startswith("lost"))
    for v in victims:  # the same command again completes the gallery
        p = _spawn(index, f"Species w{v}", plans[v], chunk, lock)
        _, err = p.communicate(timeout=600)
        if p.returncode != 0:
            problems.append(f"re-run of writer {v} exited {p.returncode}: {err.decode()[-500:]}")
    final = check(index, seen, expected_photos=len(covered))
    problems += [f"after re-runs: {x}" for x in final]
    return {"seed": seed, "ok": not problems, "lost": lost, "seen_before_kill": len(seen), "problems": problems}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--writers", type=int, default=3, help="writer processes per trial (default 3)")
    ap.add_argument("--kill", type=int, default=1, help="writers SIGKILLed per trial (default 1)")
    ap.add_argument("--photos", type=int, default=24, help="distinct photos per trial (default 24)")
    ap.add_argument("--chunk", type=int, default=2, help="photos per commit (default 2: many commits to land between)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-lock", action="store_true", help="writers skip the write lock (shows what breaks)")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = ap.parse_args()
    if not PH_SNAKES.is_dir():
        sys.exit(f"needs the shared photos at {PH_SNAKES}")
    results = []
    with tempfile.TemporaryDirectory(prefix="speciesid-chaos-") as tmp:
        for t in range(args.trials):
            r = trial(args.seed + t, args.writers, args.kill, args.photos, args.chunk, not args.no_lock, Path(tmp))
            results.append(r)
            if not args.json:
                status = "ok" if r["ok"] else "FAILED: " + "; ".join(r["problems"])
                print(f"trial {t + 1}/{args.trials} (seed {r['seed']}, {r['seen_before_kill']} rows committed "
                      f"before the kill): {status}", flush=True)
    summary = {"trials": len(results), "survived": sum(r["ok"] for r in results),
               "lost": sum(r["lost"] for r in results), "writers": args.writers, "killed_per_trial": args.kill,
               "lock": not args.no_lock, "failures": [r for r in results if not r["ok"]][:5]}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"trials {summary['trials']}  survived {summary['survived']}  lost {summary['lost']}  "
              f"({args.writers} writers, {args.kill} killed per trial, lock {'on' if summary['lock'] else 'OFF'})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_writer":
        _, _, index, species, chunk, lock, *paths = sys.argv
        writer(index, species, paths, int(chunk), lock == "1")
    else:
        main()
