"""Gallery builds on a Ray cluster (``speciesid index build --engine ray``): reader -> mapper -> writer -> runner.

Per chunk of records (``chunk_rows``, streamed from any dataset loader; the driver never holds more):

1. **hash** (Ray Data tasks): read each photo's bytes, sha256; unreadable photos are reported.
2. **dedupe** (driver): a photo whose bytes are already stored (BTREE lookup) or that repeats an earlier
   photo of the run is reported as a duplicate and not embedded, exactly as the local build decides; ids
   for the rest are reserved under the gallery's write lock (``ids.json``).
3. **decode + preprocess**: :func:`retrieval.pipeline.prepare`, the local build's own function, with a
   weight-free copy of the encoder's transform. Ray Data fuses this step into the embedding actors where they
   take CPUs only (same resources: the arrays never leave the actor's process); with GPU actors it runs as
   separate CPU tasks.
4. **embed** (an actor pool, ``map_batches`` with ``ActorPoolStrategy``, never more actors than the chunk has
   batches; one GPU per actor where the cluster has GPUs): each actor holds the model once.
5. **write** (tasks): the rows (:func:`index.store.rows_table`, the one row builder) as Lance fragments
   in the gallery's store, which every worker reaches (a shared folder or an object-store URI).
6. **commit** (driver): one Append of the chunk's fragments under the write lock
   (:meth:`index.gallery.Gallery.commit_fragments`): all or nothing; a crash loses at most one chunk's work.
   The data files the writers reported are journalled until then and removed when the chunk is not committed
   (:class:`index.fragments.PendingFiles`).

After the last chunk the vector index is built (:meth:`Gallery.finish_build`), its IVF-PQ shards as Ray
tasks (:func:`ray_map`). Photos travel between stages as preprocessed float32 arrays (~600 KB at 224 px):
fine on one node, the first thing to watch on a network (docs/scale.md). Needs the ``ray`` extra.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image
from tqdm.auto import tqdm

from index.gallery import Gallery, check_gallery_encoder
from index.records import HIGHER_RANKS, ReferenceRecord
from index.sources import read_source
from index.store import rows_table, source_file, source_text
from retrieval.encoders import Encoder, EncoderConfig, create_encoder_from_config, preprocess_with
from retrieval.images import MIN_REFERENCE_SIDE, max_pixels_setting, sha256_bytes
from retrieval.pipeline import NON_FINITE, BuildReport, prepare, read_error

logger = logging.getLogger(__name__)

_TEXT = ("source", "species", "genus", "family", *HIGHER_RANKS, "common_name", "dataset", "country")


@dataclass
class RayOptions:
    """How to run a build on Ray."""

    address: str | None = None  # a running cluster ("auto", "ray://host:10001", "host:6379"); None: start a local one
    actors: int | None = None  # embedding actors; None: one per GPU, else 2 (local), or on a cluster as many as leave
    # one CPU for decoding and writing (at most 8)
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0  # CPU slots (and torch threads) of each embedding actor
    local_cpus: int | None = None  # logical CPUs of a local Ray (default: cores + actors, so decode never starves)
    chunk_rows: int = 100_000  # records per commit
    batch_size: int | None = None  # photos per embedding batch (default: the encoder's)
    write_rows: int = 1024  # rows per fragment-writer task


# ------------------------------------------------------------------------------------------- Ray setup
def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ImportError("--engine ray needs Ray Data: pip install 'speciesid[ray]'") from exc
    return ray


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Refuse (ValueError) a cluster address where nothing answers: ``ray.init`` would retry it for minutes with no
    word of ours. ``auto`` (the cluster this machine belongs to) is left to Ray."""
    if address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--ray-address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379, or ray://10.0.0.5:10001 "
                         "for Ray Client), nor 'auto'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ValueError(f"nothing answers at the Ray address {address} ({exc}): check the head node's address and "
                         "port ('ray start --head' prints them; 6379 by default, 10001 for ray://), or leave "
                         "--ray-address out to start a Ray on this machine") from exc


def start_ray(options: RayOptions) -> bool:
    """Connect to ``options.address`` (checked first: :func:`check_ray_address`) or start a local Ray; True when
    this call started it (shut it down)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    if options.address:
        check_ray_address(options.address)
    project = str(Path(__file__).resolve().parents[1])
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (project, os.environ.get("PYTHONPATH")) if p),
                        "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}}
    warnings.filterwarnings("ignore", message="lancedb fork support is experimental")
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    for name, notice in _NOTICES.items():  # Ray's notices of what we chose, on every build: not news
        logging.getLogger(name).addFilter(notice)
    if options.address:
        ray.init(address=options.address, runtime_env=env, logging_level="WARNING", log_to_driver=False)
    else:
        actors = options.actors or 2
        cpus = options.local_cpus or (os.cpu_count() or 2) + actors
        ray.init(num_cpus=cpus, include_dashboard=False, runtime_env=env, logging_level="WARNING",
                 log_to_driver=False, object_store_memory=min(2 << 30, max(256 << 20, cpus * (128 << 20))))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    logger.info("ray: %s", ray.cluster_resources())
    return True


class _DropNotice(logging.Filter):
    """Drops the records of one logger whose message starts with ``prefix``; every other record passes."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


#: logger -> the one notice of Ray's dropped there: the progress bars we turn off; the token authentication a
#: local Ray turns on by default (RAY_AUTH_MODE unset). Setting RAY_AUTH_MODE ourselves would need it before
#: Ray is imported (Ray caches its config then: a local Ray started with it set later refuses its own driver).
_NOTICES = {"ray.data._internal.progress": _DropNotice("Progress bars disabled"),
            "ray._private.authentication.authentication_token_setup":
                _DropNotice("Token authentication is enabled for this Ray cluster")}


def stop_ray() -> None:
    """Shut down the Ray this process started."""
    _ray().shutdown()


def ray_map(fn: Callable[..., Any], args: list[tuple]) -> Iterator[Any]:
    """Run ``fn(*a)`` for each ``a`` as Ray tasks (1 CPU each); results in order, fetched one at a time."""
    ray = _ray()
    remote = ray.remote(num_cpus=1)(fn)
    refs = [remote.remote(*a) for a in args]
    for ref in refs:
        yield ray.get(ref)


# ------------------------------------------------------------------------------------------- stages
def check_ray_views(views: str | None) -> None:
    """Refuse test-time views other than ``single`` (ValueError): a Ray build embeds one view of each photo. Needs
    only the option, so a build checks it before any model loads."""
    if (views or "single") != "single":
        raise ValueError(f"--engine ray builds single-view galleries; views {views!r} need --engine local")


class Preprocessor:
    """The encoder's eval transform without its weights (picklable for CPU tasks)."""

    def __init__(self, encoder: Encoder) -> None:
        check_ray_views(getattr(encoder, "views", "single"))
        self.preprocess_config = encoder.preprocess_config  # numpy preprocessing (every runtime)
        self.transform = encoder.transform if encoder.preprocess_config is None else None
        self.input_size = int(getattr(encoder, "input_size", 224))

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """One RGB image -> the model input, as the encoder's own ``preprocess`` makes it."""
        return preprocess_with(image, self.preprocess_config, self.transform)

    def preprocess_views(self, image: Image.Image) -> np.ndarray:
        """The same as :meth:`preprocess` (single-view encoders only)."""
        return self.preprocess(image)


def hash_batch(batch: pa.Table) -> pa.Table:
    """Stage 1: read + sha256 each photo (``error`` non-empty when unreadable)."""
    digests, errors = [], []
    for text in batch.column("source").to_pylist():
        try:
            digests.append(sha256_bytes(read_source(source_file(text))))
            errors.append("")
        except OSError as exc:
            digests.append("")
            errors.append(read_error(exc))
    return pa.table({"pos": batch.column("pos"), "sha256": pa.array(digests, pa.string()),
                     "error": pa.array(errors, pa.string())})


def decode_batch(batch: dict[str, np.ndarray], preprocessor: Preprocessor, min_side: int,
                 max_pixels: int | None = None) -> dict[str, np.ndarray]:
    """Stage 3: decode + preprocess with the local build's :func:`prepare` (same arrays); errors reported.
    ``max_pixels``: the driver's pixel limit (``retrieval.images.max_pixels_setting``, read where the build runs)."""
    tensors: list[np.ndarray | None] = []
    notes = [""] * len(batch["pos"])  # an animation's first frame, a TIFF's first page: said with the add
    errors = list(batch["error"]) if "error" in batch else [""] * len(batch["pos"])
    digests = list(batch["sha256"])
    for i, text in enumerate(batch["source"]):
        try:
            data = read_source(source_file(str(text)))
        except OSError as exc:
            tensors.append(None)
            errors[i] = read_error(exc)
            continue
        done = prepare(int(batch["pos"][i]), data, preprocessor,  # type: ignore[arg-type]
                       max_pixels=max_pixels, min_side=min_side,
                       blank_ok=False)  # a reference: a blank photo refused, as the local build refuses it
        tensors.append(None if done.tensor is None else np.asarray(done.tensor, dtype=np.float32))
        errors[i] = done.error or ""
        notes[i] = done.note or ""
        digests[i] = done.sha256 or digests[i]
    shape = next((t.shape for t in tensors if t is not None), (3, preprocessor.input_size, preprocessor.input_size))
    stacked = np.stack([t if t is not None else np.zeros(shape, np.float32) for t in tensors])
    return {**{k: v for k, v in batch.items() if k not in ("error", "sha256")}, "tensor": stacked,
            "sha256": np.asarray(digests, dtype=object), "error": np.asarray(errors, dtype=object),
            "note": np.asarray(notes, dtype=object)}


class Embedder:
    """Stage 4: an actor holding the model; embeds the rows without an error."""

    def __init__(self, config: EncoderConfig, fingerprint: str, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, threads)))  # ONNX Runtime / OpenVINO threads
        device = "cuda" if torch.cuda.is_available() and config.device in ("auto", "cuda") else config.device
        self.encoder = create_encoder_from_config(replace(config, device=device if device != "auto" else "cpu"))
        if self.encoder.fingerprint.rsplit("#", 1)[-1] != fingerprint.rsplit("#", 1)[-1]:
            raise ValueError(f"this worker's encoder {self.encoder.fingerprint} is not the gallery's {fingerprint}: "
                             "install the same weights on every node")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray([not e for e in batch["error"]], dtype=bool)
        emb = np.zeros((len(ok), self.encoder.dim), dtype=np.float32)
        if ok.any():
            emb[ok] = self.encoder.encode_batch(np.ascontiguousarray(batch["tensor"][ok]))
        errors = np.asarray(batch["error"], dtype=object).copy()
        for i in np.flatnonzero(ok & ~np.isfinite(emb).all(axis=1)):  # never committed: the gallery would not open
            errors[i], emb[i] = NON_FINITE, 0.0
        return {**{k: v for k, v in batch.items() if k not in ("tensor", "error")}, "error": errors, "embedding": emb}


def write_batch(batch: dict[str, np.ndarray], uri: str, dim: int, fingerprint: str,
                options: dict[str, str]) -> dict[str, np.ndarray]:
    """Stage 5: the batch's good rows as Lance fragments (not committed); one summary row per batch."""
    from index.fragments import write_fragments

    ok = [i for i, e in enumerate(batch["error"]) if not e]
    fragments: list[str] = []
    if ok:
        records = [_record(batch, i) for i in ok]
        table = rows_table(records, [str(batch["sha256"][i]) for i in ok], np.asarray(batch["embedding"])[ok],
                           fingerprint, [int(batch["id"][i]) for i in ok], dim)
        fragments = write_fragments(table, uri, options)
    written = {int(batch["id"][i]): str(batch["sha256"][i]) for i in ok}
    failed = [(int(batch["pos"][i]), str(e)) for i, e in enumerate(batch["error"]) if e]
    notes = [(int(batch["pos"][i]), str(batch["note"][i])) for i in ok if "note" in batch and batch["note"][i]]
    return {"fragments": np.asarray([json.dumps(fragments)], dtype=object),
            "written": np.asarray([json.dumps(written)], dtype=object),
            "failed": np.asarray([json.dumps(failed)], dtype=object),
            "notes": np.asarray([json.dumps(notes)], dtype=object)}


def _record(batch: dict[str, np.ndarray], i: int) -> ReferenceRecord:
    def text(name: str) -> str | None:
        value = str(batch[name][i])
        return value or None

    venom = int(batch["venomous"][i])
    return ReferenceRecord(path=source_file(str(batch["source"][i])), species=str(batch["species"][i]),
                           genus=text("genus"), family=text("family"), common_name=text("common_name"),
                           venomous=None if venom < 0 else bool(venom), dataset=str(batch["dataset"][i]),
                           ranks={r: v for r in HIGHER_RANKS if (v := text(r))}, country=text("country"))


def _records_table(records: list[ReferenceRecord], start: int) -> pa.Table:
    cols: dict[str, list] = {name: [] for name in _TEXT}
    for r in records:
        cols["source"].append(source_text(r.path))
        for name in ("species", "genus", "family", "common_name", "dataset", "country"):
            cols[name].append(getattr(r, name) or "")
        for rank in HIGHER_RANKS:
            cols[rank].append(r.ranks.get(rank) or "")
    table = {name: pa.array(values, pa.string()) for name, values in cols.items()}
    table["pos"] = pa.array(range(start, start + len(records)), pa.int64())
    table["venomous"] = pa.array([-1 if r.venomous is None else int(r.venomous) for r in records], pa.int8())
    return pa.table(table)


# ------------------------------------------------------------------------------------------- runner
def _blocks(n: int, per: int) -> int:
    return max(1, min(200, -(-n // max(per, 1))))


def actor_count(cpus: float, opts: RayOptions, gpus: float = 0.0, per_gpu: float = 0.0) -> int:
    """Embedding actors for a cluster of ``cpus`` CPUs: ``opts.actors``, else one per GPU (as many as leave a CPU
    free), else 2 on a local Ray (sized to fit them) and on a cluster as many as leave a CPU free (at most 8). The
    decode and write tasks need that CPU: actors holding every one wait for them for ever, so such a count is
    refused."""
    each = opts.cpus_per_actor
    fit = int((cpus - 1) // each) if each > 0 else 8
    if opts.actors:
        actors = opts.actors
    elif per_gpu:
        actors = max(1, min(int(gpus // per_gpu), fit))
    else:
        actors = 2 if opts.address is None else max(1, min(fit, 8))
    if cpus - actors * each < 1:
        raise ValueError(f"{actors} embedding actor(s) of {each:g} CPU leave none of this Ray cluster's {cpus:g} CPUs "
                         "for decoding and writing, so the build would wait for ever: "
                         + (f"give --ray-actors {fit} or fewer" if fit >= 1 else "use a cluster of 2 CPUs or more"))
    return actors


def plan_cluster(encoder: Encoder, opts: RayOptions) -> tuple[Preprocessor, int, float]:
    """(the transform workers run, embedding actors, GPUs per actor) on the started Ray; ValueError for a build it
    cannot run (embedding views; actors that would leave no CPU), before anything is written."""
    resources = _ray().cluster_resources()
    gpus = float(resources.get("GPU", 0))
    per_gpu = opts.gpus_per_actor if opts.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    return Preprocessor(encoder), actor_count(float(resources.get("CPU", 0)), opts, gpus, per_gpu), per_gpu


def sweep_quietly(gallery: Gallery) -> int:
    """Remove the uncommitted files of builds killed earlier (:func:`index.fragments.sweep_pending`); a failure is
    a warning, never the reason this build does not run. Returns how many files were removed."""
    from index.fragments import sweep_pending

    try:
        return sweep_pending(gallery.root, gallery.store.uri, gallery.storage_options)
    except Exception as exc:  # noqa: BLE001 - best-effort cleanup of an earlier build
        logger.warning("could not look for the uncommitted files of earlier builds (%s); this build goes on", exc)
        return 0


def ray_add_references(
    gallery: Gallery,
    config: EncoderConfig,
    records: Iterable[ReferenceRecord],
    *,
    encoder: Encoder,
    options: RayOptions | None = None,
    min_side: int = MIN_REFERENCE_SIDE,
    progress: bool = True,
    total: int | None = None,
) -> BuildReport:
    """Embed ``records`` on Ray into the gallery (see the module docstring); Ray must be started.

    ``encoder``: the driver's copy (its fingerprint and transform; it embeds nothing). ``progress``: a bar on
    stderr, as the local build's, moved as each chunk is committed (records handled, stored so far, the rate; the
    time left when ``total``, the number of records, is known).
    """
    ray = _ray()
    opts = options or RayOptions()
    check_gallery_encoder(gallery.root, gallery.info, encoder.fingerprint)
    pre, actors, per_gpu = plan_cluster(encoder, opts)
    sweep_quietly(gallery)  # files of a killed build's chunk
    batch_size = opts.batch_size or encoder.batch_size
    report = BuildReport()
    start = time.perf_counter()
    it = iter(records)
    done = 0
    first_path: dict[str, str] = {}  # digest -> first path of this run (kept per run, as the local build does)
    with tqdm(total=total, desc="building on ray", unit="img", disable=not progress, mininterval=0) as bar:
        # closed however the build ends: main()'s one-line error must not land on the bar's line
        number = 0
        while chunk := list(itertools.islice(it, opts.chunk_rows)):
            number += 1
            bar.set_postfix_str(f"chunk {number}: {len(chunk)} records, embedding; {report.added} stored")
            table = _records_table(chunk, done)
            hashed = (ray.data.from_arrow(table.select(["pos", "source"]))
                      .repartition(_blocks(len(chunk), 256))
                      .map_batches(hash_batch, batch_format="pyarrow", batch_size=256, num_cpus=1)
                      .to_arrow_refs())
            hashed = pa.concat_tables(ray.get(hashed)).sort_by("pos")
            digests = hashed.column("sha256").to_pylist()
            errors = hashed.column("error").to_pylist()
            stored = gallery.store.find_sha256(d for d in digests if d)
            keep: list[int] = []
            for i, (rec, sha, err) in enumerate(zip(chunk, digests, errors, strict=True)):
                if err:
                    report.skipped.append((str(rec.path), err))
                elif sha in stored:
                    report.add_duplicate(str(rec.path), stored_id=stored[sha])
                elif sha in first_path:
                    report.add_duplicate(str(rec.path), first=first_path[sha])
                else:
                    first_path[sha] = str(rec.path)
                    keep.append(i)
            if keep:
                _embed_and_commit(gallery, config, encoder, chunk, table, keep, digests, report, pre=pre, actors=actors,
                                  per_gpu=per_gpu, cpus=opts.cpus_per_actor, batch_size=batch_size,
                                  write_rows=opts.write_rows, min_side=min_side)
            done += len(chunk)
            bar.set_postfix_str(f"chunk {number} committed; {report.added} stored", refresh=False)
            bar.update(len(chunk))
            logger.info("ray build: %d records handled, %d stored so far", done, report.added)
    report.seconds = time.perf_counter() - start
    for path, reason in report.skipped:
        logger.warning("skipped %s: %s", path, reason)
    return report


def _embed_and_commit(gallery: Gallery, config: EncoderConfig, encoder: Encoder, chunk: list[ReferenceRecord],
                      table: pa.Table, keep: list[int], digests: list[str], report: BuildReport, *,
                      pre: Preprocessor, actors: int, per_gpu: float, cpus: float, batch_size: int,
                      write_rows: int, min_side: int) -> None:
    from index.fragments import PendingFiles

    ray = _ray()
    ids = gallery.reserve_ids(len(keep))
    sub = table.take(pa.array(keep)).append_column("id", pa.array(ids, pa.int64())).append_column(
        "sha256", pa.array([digests[i] for i in keep], pa.string()))
    blocks = _blocks(len(keep), batch_size)
    limits = {"preprocessor": pre, "min_side": min_side, "max_pixels": max_pixels_setting()}  # the driver's setting
    ds = (ray.data.from_arrow(sub).repartition(blocks)
          .map_batches(decode_batch, fn_kwargs=limits, batch_format="numpy",
                       batch_size=max(8, batch_size), num_cpus=1)
          .map_batches(Embedder, fn_constructor_kwargs={"config": config, "fingerprint": encoder.fingerprint,
                                                         "threads": int(max(1, cpus))},
                       compute=ray.data.ActorPoolStrategy(size=min(actors, blocks)), batch_format="numpy",
                       batch_size=batch_size, num_cpus=cpus, **({"num_gpus": per_gpu} if per_gpu else {}))
          .map_batches(write_batch, fn_kwargs={"uri": gallery.store.uri, "dim": gallery.dim,
                                               "fingerprint": gallery.fingerprint,
                                               "options": gallery.storage_options},
                       batch_format="numpy", batch_size=write_rows, num_cpus=1))
    fragments: list[str] = []
    written: dict[int, str] = {}
    failed: dict[int, str] = {}
    notes: dict[int, str] = {}  # chunk position -> the first-frame/page note of a photo written
    pending = PendingFiles(gallery.root, gallery.store.uri, gallery.store.version, gallery.storage_options)
    try:
        for row in ds.iter_rows():
            done = json.loads(row["fragments"])
            pending.add(done)
            fragments += done
            written.update({int(k): v for k, v in json.loads(row["written"]).items()})
            failed.update({int(p): e for p, e in json.loads(row["failed"])})
            notes.update({int(p): n for p, n in json.loads(row["notes"])})
        repeats = gallery.commit_fragments(fragments, written)
    except BaseException:  # a failed or interrupted chunk: its workers' files go now, not in Lance's 7 days
        try:
            pending.abandon()
        except Exception as exc:  # noqa: BLE001 - the chunk's own error is the one to raise
            logger.warning("the uncommitted files of this chunk stay (journal %s): %s; the next Ray build into this "
                           "gallery removes them", pending.path, exc)
        raise
    pending.committed()
    pos_of = dict(zip(ids, (chunk_pos for chunk_pos in keep), strict=True))
    base = int(table.column("pos")[0].as_py())
    for rid in ids:
        i = pos_of[rid]
        rec = chunk[i]
        if (base + i) in failed:
            report.skipped.append((str(rec.path), failed[base + i]))
        elif rid in repeats:
            report.add_duplicate(str(rec.path), stored_id=repeats[rid])
        elif rid in written:
            report.ids.append(rid)
            report.added += 1
            if (base + i) in notes:  # as the local build says it (retrieval.pipeline.build_gallery)
                report.notes.append((str(rec.path), notes[base + i]))
