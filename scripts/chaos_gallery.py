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

``--s3``: the gallery's store is on S3 (moto's server on 127.0.0.1, started once per run) and EACH writer has its
own copy of the gallery folder, as separate machines would: only the store's write lease (:mod:`index.lease`, a
TTL of ``--lease-ttl`` seconds for the writers, so a killed holder blocks the others only briefly) keeps them
apart. The checks read the store through the first folder (its vector index synced from the store at open); the
ids' high-water mark checked is the store's shared one (``_speciesid/ids.json``); a killed writer is re-run on its
own folder.

    .venv/bin/python scripts/chaos_gallery.py --s3 --trials 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PH_SNAKES = Path(os.environ.get("SPECIESID_SHARED") or REPO.parent / "shared") / "data" / "ph-snakes"
ENCODER = "timm:test_vit@random"  # tiny: the processes spend their time writing, not embedding
BUCKET = "chaos"
#: Set by ``--s3``: the environment of every writer process (AWS_* of moto's server, the lease's TTL).
WRITER_ENV: dict[str, str] | None = None


def _photos(n: int, seed: int) -> list[Path]:
    files = sorted(p for p in (PH_SNAKES / "train").rglob("*.jpg"))
    return random.Random(seed).sample(files, n)


def writer(index: str, species: str, paths: list[str], chunk: int, lock: bool) -> None:
    """One writer process: add the photos in small commits (so a kill can land between two)."""
    from retrieval.encoders import EncoderConfig
    from retrieval.pipeline import add_references
    from retrieval.workflows import open_gallery

    gallery, enc = open_gallery(index, EncoderConfig(precision="fp32"))
    if not lock:  # the broken baseline: every process believes it is alone
        import contextlib

        gallery._writer.hold = contextlib.nullcontext  # type: ignore[method-assign]
    from index.taxonomy import new_species_references

    _, records, _ = new_species_references(species, gallery.species(), paths, dataset="chaos",
                                              new_species=True)  # each writer its own species, by design
    add_references(gallery, enc, records, chunk=chunk, progress=False)


def _committed(index: Path) -> dict[int, str]:
    """id -> sha256 of every row committed now (read by another process, as any reader would)."""
    from index.store import ReferenceStore, storage_options

    where = json.loads((index / "gallery.json").read_text()).get("store") or {}
    if where.get("uri"):  # the store on S3: read it there, as another machine would
        store = ReferenceStore(where["uri"], _dim(index), refresh_s=0, options=storage_options(where.get("options")),
                               create=False)
    else:
        store = ReferenceStore(index / "store", _dim(index), refresh_s=0)
    meta = store.metadata()
    return {int(i): str(s) for i, s in zip(meta["id"], meta["sha256"], strict=True)}


def _dim(index: Path) -> int:
    return int(json.loads((index / "gallery.json").read_text())["dim"])


def check(index: Path, seen: dict[int, str], expected_photos: int | None = None) -> list[str]:
    """Problems found in the gallery (empty list = consistent)."""
    import numpy as np

    from index.gallery import Gallery
    from index.store import is_uri
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
    if is_uri(str(g.store_uri)):  # writers on other folders: the mark they share is the store's own
        nxt, where = _shared_next(str(g.store_uri)), "the store's _speciesid/ids.json"
    else:
        nxt = json.loads(g.layout.ids.read_text())["next"] if g.layout.ids.is_file() else None
        where = "ids.json"
    if ids and (nxt is None or nxt <= max(ids)):
        problems.append(f"{where} next={nxt} is not above the largest id {max(ids)}")
    if expected_photos is not None and len(set(shas)) != expected_photos:
        problems.append(f"{len(set(shas))} photos stored, {expected_photos} expected")
    return problems


def _shared_next(uri: str) -> int | None:
    """The ``next`` of the store's shared id mark (``<uri>/_speciesid/ids.json``), None when there is none."""
    import boto3

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    key = f"{prefix.rstrip('/')}/_speciesid/ids.json" if prefix else "_speciesid/ids.json"
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    try:
        return int(json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())["next"])
    except client.exceptions.NoSuchKey:
        return None


def _spawn(index: Path, species: str, paths: list[Path], chunk: int, lock: bool) -> subprocess.Popen:
    args = [sys.executable, __file__, "_writer", str(index), species, str(chunk), "1" if lock else "0",
            *map(str, paths)]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=WRITER_ENV)


def start_s3(lease_ttl: float) -> subprocess.Popen:
    """moto's S3 server on 127.0.0.1 with a bucket; sets the AWS_* environment (this process and the writers')."""
    from moto_s3 import start_moto_s3

    global WRITER_ENV
    try:
        proc, endpoint, _ = start_moto_s3(BUCKET)
    except RuntimeError as exc:
        sys.exit(str(exc))
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    WRITER_ENV = {**os.environ, "SPECIESID_LEASE_TTL_S": str(lease_ttl)}
    return proc


def trial(seed: int, writers: int, kill: int, photos: int, chunk: int, lock: bool, tmp: Path,
          s3: bool = False) -> dict:
    """One trial; returns {"ok": bool, "lost": n, "problems": [...], ...}. ``s3``: the store on S3 (moto's server,
    started by :func:`start_s3`), each writer on its own copy of the gallery folder (a machine of its own)."""
    from retrieval.encoders import EncoderConfig
    from retrieval.workflows import build_gallery

    rng = random.Random(seed)
    index = tmp / f"g{seed}"
    pool = _photos(photos, seed)
    base = tmp / f"base{seed}" / "Naja philippinensis"
    base.mkdir(parents=True)
    os.symlink(pool[0], base / pool[0].name)
    build_gallery(index, "folder", base.parent, encoder=EncoderConfig(spec=ENCODER, precision="fp32"), progress=False,
                  store=f"s3://{BUCKET}/g{seed}-{os.getpid()}" if s3 else None)
    plans = []
    for w in range(writers):  # overlapping halves: every photo goes to at least two writers
        start = (w * len(pool)) // writers
        plans.append([pool[(start + k) % len(pool)] for k in range(len(pool) // 2 + 2)])
    covered = {p for plan in plans for p in plan} | {pool[0]}
    folders = [index] * writers
    if s3:  # each writer a machine of its own: its own copy of the folder (no shared flock), one store
        folders = [tmp / f"g{seed}-machine{w}" for w in range(writers)]
        for folder in folders:
            shutil.copytree(index, folder)
    procs = [_spawn(folders[w], f"Species w{w}", plan, chunk, lock) for w, plan in enumerate(plans)]
    victims = rng.sample(range(writers), kill)
    target = 1 + rng.randrange(len(covered))  # kill once this many rows are committed (a random moment)
    seen = _committed(index)
    while len(seen) < target and any(procs[v].poll() is None for v in victims):
        time.sleep(rng.uniform(0.0, 0.1))
        seen = _committed(index)
    killed = 0
    for v in victims:  # a victim that finished before the moment came (and was reaped by poll) is not killed
        if procs[v].poll() is None:
            procs[v].send_signal(signal.SIGKILL)
            killed += 1
    errors = []
    for w, p in enumerate(procs):
        _, err = p.communicate(timeout=600)
        if w not in victims and p.returncode != 0:
            errors.append(f"writer {w} exited {p.returncode}: {err.decode()[-500:]}")
    problems = errors + check(index, seen)
    lost = sum(1 for pr in problems if pr.startswith("lost"))
    for v in victims:  # the same command again completes the gallery
        p = _spawn(folders[v], f"Species w{v}", plans[v], chunk, lock)
        _, err = p.communicate(timeout=600)
        if p.returncode != 0:
            problems.append(f"re-run of writer {v} exited {p.returncode}: {err.decode()[-500:]}")
    final = check(index, seen, expected_photos=len(covered))
    problems += [f"after re-runs: {x}" for x in final]
    return {"seed": seed, "ok": not problems, "lost": lost, "seen_before_kill": len(seen), "killed": killed,
            "problems": problems}


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
    ap.add_argument("--s3", action="store_true",
                    help="store on S3 (moto's server on 127.0.0.1), each writer on its own copy of the folder")
    ap.add_argument("--lease-ttl", type=float, default=3.0,
                    help="with --s3: the writers' SPECIESID_LEASE_TTL_S (default 3 s)")
    args = ap.parse_args()
    if not PH_SNAKES.is_dir():
        sys.exit(f"needs the shared photos at {PH_SNAKES}")
    results = []
    server = start_s3(args.lease_ttl) if args.s3 else None
    try:
        with tempfile.TemporaryDirectory(prefix="speciesid-chaos-") as tmp:
            _trials(args, Path(tmp), results)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
    summary = {"trials": len(results), "survived": sum(r["ok"] for r in results),
               "lost": sum(r["lost"] for r in results),
               "killed": sum(r["killed"] for r in results), "writers": args.writers, "killed_per_trial": args.kill,
               "lock": not args.no_lock, "s3": args.s3, "failures": [r for r in results if not r["ok"]][:5]}
    if args.json:
        print(json.dumps(summary))
    else:
        lock = "on" if summary["lock"] else "OFF"
        print(f"trials {summary['trials']}  survived {summary['survived']}  lost {summary['lost']}  "
              f"killed {summary['killed']}  ({args.writers} writers, {args.kill} killed per trial, lock {lock}"
              f"{', store on S3, a folder per writer' if args.s3 else ''})")


def _trials(args: argparse.Namespace, tmp: Path, results: list[dict]) -> None:
    for t in range(args.trials):
        r = trial(args.seed + t, args.writers, args.kill, args.photos, args.chunk, not args.no_lock, tmp, s3=args.s3)
        results.append(r)
        if not args.json:
            status = "ok" if r["ok"] else "FAILED: " + "; ".join(r["problems"])
            print(f"trial {t + 1}/{args.trials} (seed {r['seed']}, {r['seen_before_kill']} rows committed "
                  f"before the kill, {r['killed']} killed): {status}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_writer":
        _, _, index, species, chunk, lock, *paths = sys.argv
        writer(index, species, paths, int(chunk), lock == "1")
    else:
        main()
