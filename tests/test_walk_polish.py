"""What the s50 operator walk found (findings 3, 4, 6, 8): a writer's time and its words as they really are."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_object_store import BUCKET, FakeS3, _fake_lease, s3_endpoint, s3_env  # noqa: F401 - moto's S3, fixtures

#: The encoder of galleries built from rows alone (8-float rows, no model).
_TINY = {"spec": "t", "fingerprint": "t#0", "dim": 8}


def _rows(n: int, seed: int = 0, species: str = "Naja haje"):
    from index.records import ReferenceRecord

    vectors = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    records = [ReferenceRecord(path=f"/p/{seed}-{i}.jpg", species=species) for i in range(n)]
    return records, [f"{seed}-{i}" for i in range(n)], vectors


def test_an_s3_write_with_no_other_writer_counts_no_wait_only_the_leases_own_round_trips(s3_env, tmp_path):  # noqa: F811
    """Walk finding 3: every add on S3 said "0.4-0.7 s waiting for another writer, not counted" with no other writer
    anywhere: the lease's own round trips (its take, the conditional-write check) were counted as a wait, and left
    out of images/s. Only a wait on another holder counts now; the lease's own time is told apart, as work."""
    from index.gallery import Gallery
    from index.lease import S3Lease
    from index.store import storage_options
    from retrieval.pipeline import BuildReport

    g = Gallery.create(tmp_path / "g", _TINY, store=f"s3://{BUCKET}/alone")
    g.add(*_rows(3))
    assert g.write_waited_s == 0.0, g.write_waited_s  # nobody else wrote: nothing waited for
    assert g.write_lease_s > 0.0  # the lease was taken (its round trips), told apart
    # another machine holds the lease; released once this writer has been refused once: that is a wait
    rival = S3Lease(g.store_uri, storage_options(None, {}))
    rival.acquire(timeout=0)
    lease, refused = g._writer.remote, threading.Event()
    real_take = lease._take

    def take() -> dict | None:
        holder = real_take()
        if holder is not None:
            refused.set()
        return holder

    lease._take = take

    def release_once_refused() -> None:
        refused.wait(60)
        rival.release()

    thread = threading.Thread(target=release_once_refused)
    thread.start()
    try:
        g.add(*_rows(2, seed=1))
    finally:
        refused.set()
        thread.join()
    assert refused.is_set() and g.write_waited_s > 0.0, g.write_waited_s
    report = BuildReport(added=10, seconds=10.0, waited_s=5.0, lease_s=3.0)
    assert report.images_per_second == pytest.approx(2.0)  # the lease's time is work: only the wait is left out
    assert "3.0 s of it taking the store's write lease; 5.0 s waiting for another writer, not counted" in \
        report.summary()


def test_the_leases_acquire_returns_only_the_time_spent_on_another_holder():
    """The lease's acquire said nothing of how long it waited: its caller timed the whole call, requests included."""
    fake = FakeS3()
    lease = _fake_lease(fake)
    assert lease.acquire(timeout=0) == 0.0  # taken at its first try: no wait, however long its requests took
    lease.release()
    body = {"host": "busy-host", "pid": 99, "since": "2025-01-01T00:00:00+00:00", "ttl_s": 30}
    fake.objects["g/_speciesid/write.lock"] = ('"h"', json.dumps(body).encode())
    waiter = _fake_lease(fake)
    real_take, tries = waiter._take, []

    def take() -> dict | None:  # the holder releases after this writer's first refused try
        tries.append(1)
        if len(tries) == 2:
            fake.objects["g/_speciesid/write.lock"] = ('"f"', json.dumps({"free": True}).encode())
        return real_take()

    waiter._take = take
    assert waiter.acquire(timeout=30) > 0.0 and len(tries) == 2


def test_a_writer_set_not_to_wait_names_the_locks_holder_and_says_it_did_not_wait(tmp_path, monkeypatch):
    """Walk finding 6: SPECIESID_WRITE_WAIT_S=0 gave "another process has been writing this gallery for over 0 s",
    naming no holder (the wait's warning did). The error names the holder (host, pid, since) and, for a wait of 0,
    says the writer did not wait."""
    from index.locks import WriteLock

    path = tmp_path / ".write.lock"
    holder = WriteLock(path, timeout=0)  # another open file: flock's locks belong to it, as another process's do
    who = f"held by host {socket.gethostname()}, pid {os.getpid()}, since 20"
    monkeypatch.setenv("SPECIESID_WRITE_WAIT_S", "0")
    with holder.hold(), pytest.raises(TimeoutError) as refused, WriteLock(path).hold():
        pass
    said = str(refused.value)
    assert said.startswith(f"another process is writing this gallery ({who}"), said
    assert (f"; lock {path}); this one was set not to wait for it (a wait of 0 s): try again when it is done "
            "(SPECIESID_WRITE_WAIT_S sets how long a writer waits)") in said, said
    assert "over 0 s" not in said
    monkeypatch.setenv("SPECIESID_WRITE_WAIT_S", "0.3")
    with holder.hold(), pytest.raises(TimeoutError) as refused, WriteLock(path).hold():
        pass
    assert who in str(refused.value) and "; this one waited 0.3 s: try again" in str(refused.value)


def test_a_writer_set_not_to_wait_for_the_s3_lease_says_so_not_waited_0_s():
    """Walk finding 6, the store's lease: a wait of 0 read "this one waited 0 s"."""
    fake = FakeS3()
    body = {"host": "busy-host", "pid": 99, "since": "2025-01-01T00:00:00+00:00", "ttl_s": 30}
    fake.objects["g/_speciesid/write.lock"] = ('"h"', json.dumps(body).encode())
    with pytest.raises(TimeoutError) as refused:
        _fake_lease(fake).acquire(timeout=0)
    said = str(refused.value)
    assert "held by host busy-host, pid 99" in said and "waited 0 s" not in said, said
    assert "this one was set not to wait for it (a wait of 0 s; SPECIESID_WRITE_WAIT_S sets how long a writer " \
           "waits): try again when it is done" in said, said


def _png(path: Path, seed: int) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(path)
    return path


def test_an_add_whose_species_another_add_committed_meanwhile_is_no_new_species(tmp_path, mobilenet_encoder):
    """Walk finding 4: two adds of one new species at once both said "(new species)": each read the gallery's
    species before waiting for the write lock. Whether the species is new is now read under the lock, just before
    the add's rows commit."""
    from index.gallery import Gallery
    from retrieval.workflows import add_photos

    g = Gallery.create(tmp_path / "g", mobilenet_encoder.describe())
    other = Gallery.open(g.root)  # another writer of the folder (another process, as far as the store knows)
    dim = g.dim

    def unit(n: int, seed: int) -> np.ndarray:
        v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    first = add_photos(g, mobilenet_encoder, "Naja haje", [_png(tmp_path / "a.png", 1)], embeddings=unit(1, 1))
    assert first.created and not first.existed  # new, and no one else added it: new species
    real_add_unique = g.add_unique

    def after_another_add(*args, **kw):  # the other writer commits the same new name while this add waits
        from index.records import ReferenceRecord

        other.add([ReferenceRecord(path=str(tmp_path / "b.png"), species="Naja samarensis")], ["b" * 64],
                  unit(1, 2))
        return real_add_unique(*args, **kw)

    g.add_unique = after_another_add
    second = add_photos(g, mobilenet_encoder, "Naja samarensis", [_png(tmp_path / "c.png", 3)],
                        embeddings=unit(1, 3))
    assert second.report.ids and second.existed and not second.created, second


def test_the_busy_answer_counts_identifications_in_the_singular_and_the_plural():
    """Walk finding 8: the 429 said "busy: 1 identifications in progress"."""
    from api.guard import EdgeGuard
    from api.settings import Settings

    async def answer(in_flight: int) -> str:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        async def app(scope, receive, send) -> None:  # never reached: the guard answers first
            raise AssertionError("the request was not shed")

        guard = EdgeGuard(app, Settings(_env_file=None, max_identify_in_flight=in_flight, retry_after_s=2,
                                        retry_jitter_s=0))
        guard._in_flight = in_flight  # all its places taken
        scope = {"type": "http", "method": "POST", "path": "/v1/identify", "headers": []}
        await guard(scope, None, send)
        assert sent[0]["status"] == 429
        return json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["detail"]

    assert asyncio.run(answer(1)) == "busy: 1 identification in progress; retry in 2 s"
    assert asyncio.run(answer(3)) == "busy: 3 identifications in progress; retry in 2 s"


def test_a_galleryjsons_index_settings_misspelt_or_mistyped_are_named_with_what_they_take(tmp_path):
    """Walk finding 5: the "index" keys of gallery.json are set by hand (no flag); a misspelt one failed the open
    with Python's "unexpected keyword argument", and a number given as text was taken as it was."""
    from dataclasses import asdict

    from index.gallery import Gallery
    from index.vectors import VectorIndexConfig

    g = Gallery.create(tmp_path / "g", _TINY)
    where = 'gallery.json "index"'
    assert VectorIndexConfig.from_json(asdict(VectorIndexConfig()), where) == VectorIndexConfig()
    assert VectorIndexConfig.from_json({"ivfpq_nprobe": 4}, where).ivfpq_nprobe == 4  # the rest: defaults
    info = json.loads(g.layout.info.read_text())
    info["index"]["ivfpq_nprob"] = 4
    g.layout.info.write_text(json.dumps(info))
    # a key not known opens with a warning naming it (tests/test_formats.py): a newer speciesid may have written it
    assert Gallery.open(g.root).index_config.ivfpq_nprobe is None
    bad = {"ivfpq_nprobe": ("4", "a whole number or null"), "hnsw_m": (True, "a whole number"),
           "ivf_nprobe": (None, "a whole number"), "use_gpu": ("yes", "true, false or null"),
           "kind": (3, "one of auto, flat, hnsw, ivf, ivfpq")}
    for key, (value, takes) in bad.items():
        with pytest.raises(ValueError) as refused:
            VectorIndexConfig.from_json({key: value}, where)
        assert str(refused.value) == f"{where}: {key} is {json.dumps(value)}; it takes {takes} (docs/scale.md)"
    with pytest.raises(ValueError, match=r"^gallery.json \"index\": ivfpq_candidates and shard_rows must be >= 1 "
                                         r"\(docs/scale.md says what each setting takes\)$"):
        VectorIndexConfig.from_json({"ivfpq_candidates": 0}, where)
