"""A gallery whose store lives on S3 (moto's S3 server on 127.0.0.1): build, identify, worker fragments."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from _api_support import free_port
from conftest import PH_SNAKES, needs_shared, require_module, s3_keys

from api.cli import main
from index.locks import WriterBusy

if TYPE_CHECKING:
    from index.gallery import Gallery

require_module("moto")
boto3 = require_module("boto3")

BUCKET = "galleries"
#: The encoder of the tests' galleries (8-float rows, no model).
_TINY = {"spec": "t", "fingerprint": "t#0", "dim": 8}


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server in a subprocess on a port it bound itself, with a bucket; its endpoint URL."""
    from scripts.moto_s3 import start_moto_s3

    try:
        proc, endpoint, client = start_moto_s3(BUCKET)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield endpoint, client
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    endpoint, client = s3_endpoint
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "secret-never-written",
                       "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    return endpoint, client


def _photo_root(tmp_path: Path) -> Path:
    needs_shared()
    root = tmp_path / "photos"
    for folder in ("Samar Cobra (Naja samarensis)", "Asian Sunbeam Snake (Xenopeltis unicolor)"):
        (root / folder).mkdir(parents=True)
        for p in sorted((PH_SNAKES / "train" / folder).iterdir())[:3]:
            (root / folder / p.name).symlink_to(p)
    return root


def test_build_and_identify_with_the_store_on_s3(s3_env, tmp_path, tiny_clip_dir, capsys):
    endpoint, client = s3_env
    root = _photo_root(tmp_path)
    index = tmp_path / "g"
    spec = f"open_clip:local-dir:{tiny_clip_dir}"
    code = main(["index", "build", "--dataset", "folder", "--root", str(root), "--index", str(index), "--encoder", spec,
                 "--precision", "fp32", "--store", f"s3://{BUCKET}/g1", "-q"])
    out = capsys.readouterr().out
    assert code == 0 and "6 references, 2 species" in out, out
    info = json.loads((index / "gallery.json").read_text())
    assert info["store"] == {"uri": f"s3://{BUCKET}/g1", "options": {"allow_http": "true", "aws_endpoint": endpoint,
                                                                      "region": "us-east-1"}}
    assert "secret-never-written" not in (index / "gallery.json").read_text()
    assert not (index / "store").exists()  # the table is in the bucket, not in the folder
    assert any(k.startswith("g1/references.lance/data/") for k in s3_keys(client, BUCKET, "g1/"))
    cobra = sorted((PH_SNAKES / "val" / "Samar Cobra (Naja samarensis)").iterdir())[0]
    code = main(["identify", "--index", str(index), str(cobra), "--format", "json", "-q"])
    (answer,) = json.loads(capsys.readouterr().out)
    assert code == 0 and answer["predictions"] and len(answer["neighbours"]) == 5  # the default k, read from S3


def test_an_s3_gallery_checks_its_export_on_its_own_photos_and_makes_no_local_store(s3_env, tmp_path, tiny_clip_dir,
                                                                                      monkeypatch):
    """The photos an exported encoder is checked and int8-calibrated on come from the gallery's own store (here on
    S3), not from a table opened by path in the folder (which made an empty ``<index>/store`` and gave none)."""
    import retrieval.galleries
    from index.gallery import Gallery
    from index.store import source_file
    from retrieval.encoders import EncoderConfig
    from retrieval.workflows import build_gallery, open_gallery

    root = _photo_root(tmp_path)
    index = tmp_path / "g"
    build_gallery(index, "folder", root, encoder=EncoderConfig(spec=f"open_clip:local-dir:{tiny_clip_dir}",
                                                               precision="fp32"),
                  store=f"s3://{BUCKET}/g-photos", progress=False)
    stored = sorted(source_file(t) for t in Gallery.open(index).store.metadata()["source_path"])
    offered: list = []
    real = retrieval.galleries.create_encoder_from_config

    def offering(config, *, photos=None):
        offered.extend(photos() if callable(photos) else photos or [])  # what an export would be checked on
        return real(config, photos=photos)

    monkeypatch.setattr(retrieval.galleries, "create_encoder_from_config", offering)
    gallery, _ = open_gallery(index, EncoderConfig(precision="fp32"))
    assert len(gallery) == 6 and sorted(map(Path, offered)) == stored and len(stored) == 6
    assert all(p.is_file() for p in offered)
    assert not (index / "store").exists()  # nothing made in the folder: the table is in the bucket


def test_workers_write_fragments_to_s3_and_the_driver_commits_once(s3_env, tmp_path):
    from index.fragments import write_fragments
    from index.gallery import Gallery
    from index.records import ReferenceRecord
    from index.store import rows_table

    dim = _TINY["dim"]
    g = Gallery.create(tmp_path / "g", _TINY, store=f"s3://{BUCKET}/g2")
    rng = np.random.default_rng(0)
    first = g.reserve_ids(2)
    g.add([ReferenceRecord(path="/a.jpg", species="Naja naja")], ["a" * 64], rng.standard_normal((1, dim)))
    ids = g.reserve_ids(4)
    assert not set(ids) & set(first) and ids[0] > first[-1]  # ids.json: never given twice
    digests = ["b" * 64, "c" * 64, "a" * 64, "d" * 64]  # "a" was stored meanwhile by another writer
    records = [ReferenceRecord(path=f"/{d[0]}.jpg", species="Naja samarensis") for d in digests]
    frags = []
    for part in ((0, 2), (2, 4)):  # two workers, two fragment sets, nothing visible yet
        lo, hi = part
        table = rows_table(records[lo:hi], digests[lo:hi], rng.standard_normal((2, dim)).astype(np.float32),
                           g.fingerprint, ids[lo:hi], dim)
        frags += write_fragments(table, g.store.uri, g.storage_options)
    assert g.store.count() == 1
    repeats = g.commit_fragments(frags, dict(zip(ids, digests, strict=True)))
    assert repeats == {ids[2]: g.store.find_sha256(["a" * 64])["a" * 64]}
    g.store.refresh()
    assert g.store.count() == 4 and sorted(g.store.metadata()["sha256"]) == sorted({*digests})
    g.finish_build()
    again = Gallery.open(tmp_path / "g")
    assert again.index.ntotal == 4 and len(again.search(rng.standard_normal((1, dim)), 4)[0]) == 4
    # the whitened vote's statistics follow an S3 store by difference too: a deleted row is read back at the
    # version the statistics were saved at (Lance keeps it in the bucket)
    from index.store import ReferenceStore
    from retrieval.whitening_sync import gallery_stats, scan_stats

    saved = gallery_stats(again, save=True)
    again.delete([ids[0]])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ReferenceStore, "iter_vectors", lambda *a, **k: pytest.fail("streamed the whole store"))
        synced = gallery_stats(again)
    assert saved.stats.count == 4 and synced.stats.count == 3
    np.testing.assert_array_equal(synced.ids, scan_stats(again).ids)
    np.testing.assert_allclose(synced.stats.scatter, scan_stats(again).stats.scatter, atol=1e-9)


def test_one_store_one_gallery_and_a_copied_folder_steps_over_the_stores_ids(s3_env, tmp_path, monkeypatch):
    import shutil

    from index.gallery import Gallery
    from index.records import ReferenceRecord

    dim, rng = _TINY["dim"], np.random.default_rng(1)
    encoder = _TINY
    g = Gallery.create(tmp_path / "a", encoder, store=f"s3://{BUCKET}/g3")
    g.add([ReferenceRecord(path="/a.jpg", species="Naja naja")] * 2, ["a" * 64, "b" * 64], rng.standard_normal((2, dim)))
    # a second folder on the same store would keep its own ids.json: refused, and nothing is left of it
    with pytest.raises(ValueError, match=rf"the store s3://{BUCKET}/g3 already holds a gallery's references"):
        Gallery.create(tmp_path / "b", encoder, store=f"s3://{BUCKET}/g3")
    assert not (tmp_path / "b").exists()  # nothing: the folder this create made goes (it can be used again)
    # a copy of the folder (a second server) whose ids.json fell behind: its next id is past the store's
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    g.add([ReferenceRecord(path="/c.jpg", species="Naja naja")], ["c" * 64], rng.standard_normal((1, dim)))
    copy = Gallery.open(tmp_path / "copy")
    (new,) = copy.add([ReferenceRecord(path="/d.jpg", species="Naja naja")], ["d" * 64], rng.standard_normal((1, dim)))
    copy.store.refresh()
    assert new == 4 and sorted(copy.store.ids(include_excluded=True).tolist()) == [1, 2, 3, 4]
    # the same when the store's highest id is excluded (not in the vector index): it is stepped over too
    g.refresh(force=True)
    g.set_excluded([4])
    shutil.rmtree(tmp_path / "copy2", ignore_errors=True)
    shutil.copytree(tmp_path / "a", tmp_path / "copy2")
    (tmp_path / "copy2" / "ids.json").write_text('{"next": 4}')  # fell behind
    (again,) = Gallery.open(tmp_path / "copy2").add([ReferenceRecord(path="/e.jpg", species="Naja naja")],
                                                    ["e" * 64], rng.standard_normal((1, dim)))
    assert again == 5
    # a store that cannot be reached, for a gallery that exists: one line that says what to check
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ValueError, match=rf"cannot open the store s3://{BUCKET}/g3: it did not answer \(.*\); check the "
                       "network and that the endpoint http://127.0.0.1:"):
        Gallery.open(tmp_path / "a")


def test_a_store_error_puts_the_cause_first():
    from index.gallery import store_error

    lance = ("lance error: Invalid input, Failed to connect to namespace: IO { source: Generic { store: \"S3\", "
             + "x" * 300 + " } }\nresponse: <Code>NoSuchBucket</Code><Message>The specified bucket does not exist")
    msg = str(store_error("s3://b/g", RuntimeError(lance)))
    assert msg.startswith("cannot open the store s3://b/g (NoSuchBucket) at the endpoint (AWS_ENDPOINT_URL, or AWS's "
                          "own); check the URI and the AWS_* settings"), msg
    assert msg.index("AWS_") < msg.index("(the store's error: lance error: Invalid input")  # the advice first


# ------------------------------------------------------------------ writers on several machines: the S3 lease
_MACHINE = """
import sys, time
import numpy as np
from index.gallery import Gallery
from index.records import ReferenceRecord
root, me, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
g = Gallery.open(root)
time.sleep(max(0.0, start - time.time()))  # both machines write at the same instant
rng = np.random.default_rng(me)
shared = [f"{i:064x}" for i in range(24)]  # both machines add these, in the same order: the worst case
own = [f"{1000 * (me + 1) + i:064x}" for i in range(6)]
for k in range(0, 24, 2):
    digests = shared[k:k + 2] + own[k // 4:k // 4 + 1] * (k % 4 == 0)
    v = rng.standard_normal((len(digests), 8)).astype(np.float32)
    g.add([ReferenceRecord(path=f"/{d[-4:]}.jpg", species="Naja naja") for d in digests], digests, v)
"""


def test_two_machines_writing_one_s3_store_store_every_photo_once_and_give_every_id_once(s3_env, tmp_path):
    """Two gallery folders (two machines: no shared file, so no shared flock) on one S3 store, adding overlapping
    photos at once. Before the store's lease: photos stored twice and ids given twice."""

    from conftest import REPO

    from index.gallery import Gallery

    endpoint, client = s3_env
    _two_machines(tmp_path, f"s3://{BUCKET}/machines")
    start = time.time() + 4.0
    procs = [subprocess.Popen([sys.executable, "-c", _MACHINE, str(tmp_path / name), str(me), str(start)], cwd=REPO,
                              stderr=subprocess.PIPE, text=True) for me, name in enumerate("ab")]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    meta = Gallery.open(tmp_path / "a").store.metadata()
    assert len(meta) == 1 + 24 + 2 * 6
    assert meta["sha256"].is_unique, meta["sha256"].value_counts().head(3)
    assert meta["id"].is_unique, meta["id"].value_counts().head(3)
    # the shared high-water mark is past every id given; the lease is left free
    mark = _object_json(client, "machines/_speciesid/ids.json")
    assert mark["next"] > int(meta["id"].max())
    assert s3_keys(client, BUCKET, "machines/_speciesid/") == ["machines/_speciesid/ids.json",
                                                              "machines/_speciesid/write.lock"]
    assert _object_json(client, "machines/_speciesid/write.lock")["free"] is True


def _two_machines(tmp_path: Path, store: str) -> tuple[Gallery, int]:
    """A gallery folder ``a`` on ``store`` with one photo added, copied to ``b`` (a second machine): (the gallery
    of ``a``, the photo's id)."""
    import shutil

    from index.gallery import Gallery
    from index.records import ReferenceRecord

    a = Gallery.create(tmp_path / "a", _TINY, store=store)
    (first,) = a.add([ReferenceRecord(path="/first.jpg", species="Naja naja")], ["f" * 64],
                     np.ones((1, _TINY["dim"]), np.float32))
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the folder copied to a second machine
    return a, first


def _object_json(client: Any, key: str) -> dict:
    """The JSON body of an object in the bucket (the lease is never deleted: released, its body says it is free)."""
    return json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())


class _Proxy:
    """An S3 client that passes every call on to ``client`` (subclasses change some)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class _Dropping(_Proxy):
    """An S3-compatible server that drops the conditional ``headers`` (If-None-Match, If-Match) of a PutObject."""

    def __init__(self, client: Any, *headers: str) -> None:
        super().__init__(client)
        self._headers = headers

    def put_object(self, **kw: Any) -> dict:
        return self._client.put_object(**{k: v for k, v in kw.items() if k not in self._headers})


def _lease(endpoint: str, uri: str, ttl: float):
    from index.lease import S3Lease
    from index.store import storage_options

    return S3Lease(uri, storage_options(None, {"aws_endpoint": endpoint}), ttl=ttl)


def test_the_moto_launcher_serves_from_its_own_process_when_another_takes_the_port_it_would_pick(s3_endpoint,
                                                                                               monkeypatch):
    """Review s46 (minor): start_moto_s3 found a free port, then started moto on it. When another process (another
    session's server) took that port meanwhile, the create_bucket was answered by that server, and the tests used
    it, while the launched process exited ('Address already in use') a moment later. The server process now binds
    a port of its own before it tells it: whatever another process holds, the endpoint is the process returned."""
    from botocore.config import Config

    import scripts.moto_s3 as moto_s3

    other = s3_endpoint[0]
    # the race lost: the port found free is another server's by the time moto binds it (no such step any more)
    monkeypatch.setattr(moto_s3, "free_port", lambda: int(other.rsplit(":", 1)[1]), raising=False)
    proc, endpoint, client = moto_s3.start_moto_s3("own-bucket", timeout=60)
    try:
        assert endpoint != other and proc.poll() is None
        assert "own-bucket" in [b["Name"] for b in client.list_buckets()["Buckets"]]
    finally:
        proc.terminate()
        proc.wait(10)
    once = boto3.client("s3", endpoint_url=endpoint, config=Config(retries={"total_max_attempts": 1}),
                        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
    with pytest.raises(Exception, match="Could not connect"):
        once.list_buckets()  # the process returned was the one serving that endpoint


def test_a_held_lease_is_renewed_waits_its_rival_out_naming_the_holder_and_is_released(s3_env):
    from index.lease import LEASE_DIR

    endpoint, client = s3_env
    uri, key = f"s3://{BUCKET}/lease1", f"lease1/{LEASE_DIR}/write.lock"
    holder, rival = _lease(endpoint, uri, 1.5), _lease(endpoint, uri, 1.5)
    holder.acquire(timeout=0)
    first = client.head_object(Bucket=BUCKET, Key=key)["ETag"]
    time.sleep(2.5)  # past its TTL: only the heartbeat keeps it
    assert client.head_object(Bucket=BUCKET, Key=key)["ETag"] != first
    with pytest.raises(TimeoutError, match=r"another writer holds the store s3://galleries/lease1 \(held by host .+, "
                                           r"pid \d+, since 20.+, for \d+ s; lease .+write.lock, renewed [01] s "
                                           r"ago\); this one waited 1 s: try again.*lapses 2 s after") as refused:
        rival.acquire(timeout=1.0)
    assert isinstance(refused.value, WriterBusy) and refused.value.held == "the gallery store's write lease"
    held = int(re.search(r", for (\d+) s;", str(refused.value)).group(1))
    assert held >= 3  # the holder's real age: 2.5 s slept + the rival's 1 s wait (a loaded machine only adds to it)
    holder.check()  # still ours
    holder.release()
    assert _object_json(client, key)["free"] is True  # released: free, never deleted
    rival.acquire(timeout=0)
    assert rival.held and _object_json(client, key)["pid"] == os.getpid()
    rival.release()
    holder.acquire(timeout=0)  # again on the free body it released (no read first)
    holder.release()
    assert _object_json(client, key)["free"] is True


def test_a_stale_lease_is_broken_by_the_servers_clock_and_a_lost_one_stops_its_holder(s3_env, monkeypatch, caplog):
    import datetime as dt
    import types

    import index.lease as lease_module
    from index.lease import LEASE_DIR, LeaseLostError

    endpoint, client = s3_env
    uri, key = f"s3://{BUCKET}/lease2", f"lease2/{LEASE_DIR}/write.lock"
    dead = {"host": "gone-host", "pid": 4242, "since": "2025-01-01T00:00:00+00:00", "ttl_s": 1}
    client.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(dead).encode())  # a holder killed: never renewed

    class Later(dt.datetime):  # this machine's clock an hour ahead: a fresh lease must not look stale
        @classmethod
        def now(cls, tz=None):
            return dt.datetime.now(tz) + dt.timedelta(hours=1)

    monkeypatch.setattr(lease_module, "dt", types.SimpleNamespace(datetime=Later, timezone=dt.timezone))
    waiter = _lease(endpoint, uri, 30)
    with pytest.raises(TimeoutError, match="held by host gone-host, pid 4242, since 2025-01-01"):
        waiter.acquire(timeout=0)  # 0-1 s old on the server's clock: not stale, whatever this clock says
    time.sleep(2.2)  # now over its 1 s TTL on the server's clock (whole seconds)
    waiter.acquire(timeout=5)
    assert "broke the stale write lease" in caplog.text and "gone-host" in caplog.text
    # the waiter's lease is taken over in turn (as if it stalled past its TTL): it notices and commits nothing more
    client.put_object(Bucket=BUCKET, Key=key, Body=json.dumps({"free": True}).encode())
    other = _lease(endpoint, uri, 30)
    other.acquire(timeout=0)
    with pytest.raises(LeaseLostError, match="was taken over by another"):
        waiter.renew()
    with pytest.raises(LeaseLostError):
        waiter.check()
    waiter.release()  # never frees the other's lease
    assert _object_json(client, key).get("free") is None
    other.release()


def test_a_store_that_ignores_conditional_writes_is_refused(s3_env):
    from index.lease import ConditionalWritesUnsupported, S3Lease

    endpoint, client = s3_env
    lease = S3Lease(f"s3://{BUCKET}/lease3", client=_Dropping(client, "IfNoneMatch", "IfMatch"))
    with pytest.raises(ConditionalWritesUnsupported, match="does not honour conditional writes") as caught:
        lease.acquire(timeout=0)
    assert not lease.held and _object_json(client, "lease3/_speciesid/write.lock")["free"] is True
    assert "MinIO" not in str(caught.value) and "R2" not in str(caught.value)


def test_a_half_created_table_on_s3_is_removed_under_the_lease_and_one_with_data_is_kept(s3_env, tmp_path, caplog):
    from index.gallery import Gallery
    from index.records import ReferenceRecord
    from index.store import HalfCreatedStoreError

    endpoint, client = s3_env
    encoder = _TINY
    table = "half/references.lance/"

    def half_create(*extra: str) -> None:  # what a create killed inside Lance leaves: no committed version
        for key in s3_keys(client, BUCKET, table):
            client.delete_object(Bucket=BUCKET, Key=key)
        for rel in ("_transactions/0-unfinished.txn", *extra):
            client.put_object(Bucket=BUCKET, Key=table + rel, Body=b"x")

    Gallery.create(tmp_path / "g", encoder, store=f"s3://{BUCKET}/half")
    for name in ("vectors.faiss", "vectors.faiss.json", "ids.json"):  # as a create killed in Lance leaves the folder
        (tmp_path / "g" / name).unlink(missing_ok=True)  # (no version committed: no saved index, no id mark)
    half_create("data/rows.lance")
    with pytest.raises(HalfCreatedStoreError, match=r"it holds 1 data file\(s\) \(data/rows.lance\).*Nothing was "):
        Gallery.open(tmp_path / "g", make_table=True)  # a writer's open lists the objects under the lease
    assert client.head_object(Bucket=BUCKET, Key=table + "data/rows.lance")  # never deleted
    half_create()
    with pytest.raises(HalfCreatedStoreError, match="nothing was committed: delete it"):
        Gallery.open(tmp_path / "g")  # a reader removes nothing (and needs no lease)
    assert client.list_objects_v2(Bucket=BUCKET, Prefix=table)["KeyCount"] == 1
    g = Gallery.open(tmp_path / "g", make_table=True)  # a writer's open
    assert len(g) == 0 and "left half-created by an interrupted create" in caplog.text
    (new,) = g.add([ReferenceRecord(path="/a.jpg", species="Naja naja")], ["a" * 64], np.ones((1, 8), np.float32))
    assert Gallery.open(tmp_path / "g").store.ids().tolist() == [new]


# ------------------------------------------------------------------ the lease against a fake store (review s45)
def _client_error(code: str, status: int, op: str = "PutObject", message: str = "") -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       op)


class FakeS3:
    """An S3 that honours If-None-Match / If-Match, counts requests, and raises the errors queued in ``fail``
    ((operation, exception) pairs, each raised once, at the next matching request)."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[str, bytes]] = {}
        self.calls: list[tuple[str, dict]] = []
        self.fail: list[tuple[str, Exception]] = []
        self.lost: list[str] = []  # conditions ("IfMatch", "IfNoneMatch") of puts applied, then answered 412
        self._n = 0

    def _queued(self, op: str) -> None:
        for i, (which, exc) in enumerate(self.fail):
            if which == op:
                del self.fail[i]
                raise exc

    def put_object(self, *, Key, Body, IfNoneMatch=None, IfMatch=None, **_):  # noqa: N803 - boto3's names
        self.calls.append(("put", {"Key": Key, "IfNoneMatch": IfNoneMatch, "IfMatch": IfMatch}))
        self._queued("put")
        have = self.objects.get(Key)
        if (IfNoneMatch == "*" and have) or (IfMatch and (not have or have[0] != IfMatch)):
            raise _client_error("PreconditionFailed", 412)
        self._n += 1
        self.objects[Key] = (f'"{self._n}"', Body)
        condition = "IfMatch" if IfMatch else "IfNoneMatch" if IfNoneMatch else None
        if condition in self.lost:  # the write went through, its response was lost; botocore's retry got 412
            self.lost.remove(condition)
            raise _client_error("PreconditionFailed", 412)
        return {"ETag": f'"{self._n}"'}

    def get_object(self, *, Key, **_):  # noqa: N803
        import datetime as dt
        import io

        self.calls.append(("get", {"Key": Key}))
        self._queued("get")
        if Key not in self.objects:
            raise _client_error("NoSuchKey", 404, "GetObject")
        etag, body = self.objects[Key]
        now = dt.datetime.now(dt.timezone.utc)
        return {"Body": io.BytesIO(body), "ETag": etag, "LastModified": now, "ResponseMetadata": {}}

    def delete_object(self, *, Key, IfMatch=None, **_):  # noqa: N803
        self.calls.append(("delete", {"Key": Key, "IfMatch": IfMatch}))
        self._queued("delete")
        have = self.objects.get(Key)
        if IfMatch and (not have or have[0] != IfMatch):
            raise _client_error("PreconditionFailed", 412, "DeleteObject")
        self.objects.pop(Key, None)
        return {}


def _fake_lease(client, ttl: float = 30.0):
    from index.lease import S3Lease

    return S3Lease("s3://b/g", client=client, ttl=ttl)


def test_acquire_pauses_and_honours_its_timeout_when_the_holder_cannot_be_read():
    """S3 answers 409 to the create and the holder is gone by the GET (a holder taking and releasing the lease
    between short writes): before, acquire looped at once, for ever, ignoring its timeout."""
    fake = FakeS3()

    class Racing(FakeS3):
        def put_object(self, **kw):
            if len(fake.calls) > 200:
                raise AssertionError("acquire spins: over 200 requests")
            fake.calls.append(("put", kw))
            raise _client_error("ConditionalRequestConflict", 409)

        def get_object(self, **kw):
            fake.calls.append(("get", kw))
            raise _client_error("NoSuchKey", 404, "GetObject")

    lease = _fake_lease(Racing())
    with pytest.raises(TimeoutError, match="other writers kept taking its write lease"):
        lease.acquire(timeout=0.5)
    assert len(fake.calls) < 50, len(fake.calls)  # paused between tries (a spin makes thousands in 0.5 s)
    assert not lease.held


def test_a_409_conflict_is_retried_not_taken_for_a_lost_lease_and_release_still_frees_it():
    """AWS answers 409 ConditionalRequestConflict to a write racing another on the key, and says to retry: the
    holder renews, writes the id mark and releases as usual. Before: 'lease lost', and its object was left."""
    fake = FakeS3()
    lease = _fake_lease(fake)
    lease.acquire(timeout=0)
    fake.fail.append(("put", _client_error("ConditionalRequestConflict", 409)))
    lease.renew()  # retried after a pause, not lost
    lease.check()
    fake.fail.append(("put", _client_error("ConditionalRequestConflict", 409)))
    lease.write_next_id(7, None)
    assert json.loads(fake.objects["g/_speciesid/ids.json"][1])["next"] == 7
    held = fake.objects["g/_speciesid/write.lock"][0]
    fake.fail.append(("put", _client_error("ConditionalRequestConflict", 409)))
    lease.release()
    assert json.loads(fake.objects["g/_speciesid/write.lock"][1])["free"] is True
    puts = [c for op, c in fake.calls if op == "put" and c["Key"].endswith("write.lock")]
    assert puts[-1]["IfMatch"] == held  # its own etag, never another's
    assert not [c for op, c in fake.calls if op == "delete"]  # never a DELETE
    # a 412 is still a lease lost: the holder stops and never deletes the new holder's lease
    lease.acquire(timeout=0)
    fake.objects["g/_speciesid/write.lock"] = ('"other"', b"{}")
    from index.lease import LeaseLostError

    with pytest.raises(LeaseLostError):
        lease.renew()
    lease.release()
    assert fake.objects["g/_speciesid/write.lock"][0] == '"other"'


def test_a_lease_put_then_failing_or_interrupted_is_freed_again(monkeypatch):
    """A network error in the store check, or an interrupt before the heartbeat starts, after the lease object was
    put: it is freed again (before, others waited a TTL out), and the lease is not held."""
    from botocore.exceptions import EndpointConnectionError

    from index.lease import LeaseStoreError, S3Lease

    fake = FakeS3()
    lease = _fake_lease(fake)
    calls = {"n": 0}

    def failing_put(**kw):  # the first put (the lease) goes through; the second (the store check) fails
        calls["n"] += 1
        if calls["n"] == 2:
            raise EndpointConnectionError(endpoint_url="http://s3")
        return FakeS3.put_object(fake, **kw)

    fake.put_object = failing_put  # type: ignore[method-assign]
    with pytest.raises(LeaseStoreError, match="got no answer") as caught:  # the network error, where the lease gives up
        lease.acquire(timeout=0)
    assert caught.value.transient and isinstance(caught.value.__cause__, EndpointConnectionError)
    assert not lease.held and json.loads(fake.objects["g/_speciesid/write.lock"][1])["free"] is True
    # an interrupt (Ctrl-C) between the put and the heartbeat
    fake.put_object = lambda **kw: FakeS3.put_object(fake, **kw)  # type: ignore[method-assign]

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(S3Lease, "_start_heartbeat", interrupted)
    again = _fake_lease(fake)
    with pytest.raises(KeyboardInterrupt):
        again.acquire(timeout=0)
    assert not again.held and json.loads(fake.objects["g/_speciesid/write.lock"][1])["free"] is True


def test_a_conditional_put_whose_response_was_lost_is_not_taken_for_a_lost_lease():
    """botocore retries a PUT whose response was lost; when the first try had gone through, the retry gets 412
    (review 2, C). The body's nonce, read back, tells it from a lease taken by another: taking, renewing, the id
    mark and releasing carry on. Before: the renewal was 'lost' (and the release skipped), the create waited on
    its own lease."""
    fake = FakeS3()
    lease = _fake_lease(fake)
    fake.lost.append("IfNoneMatch")
    lease.acquire(timeout=0)  # its own create: taken at the one try, not waited out
    assert lease.held
    key = "g/_speciesid/write.lock"
    fake.lost.append("IfMatch")
    lease.renew()
    assert lease._etag == fake.objects[key][0]  # the etag of what it put
    lease.check()
    fake.lost.append("IfNoneMatch")
    lease.write_next_id(5, None)
    fake.lost.append("IfMatch")
    lease.release()
    assert json.loads(fake.objects[key][1])["free"] is True
    fake.lost.append("IfMatch")  # the free body it released, taken again without a read: that put's reply lost
    lease.acquire(timeout=0)
    assert lease.held and lease._etag == fake.objects[key][0]
    lease.release()


def _applied_then(fake: FakeS3, exc: BaseException) -> None:
    """The next put on ``fake`` goes through, then fails with ``exc`` (every retry failed too: its reply is lost)."""
    real, once = fake.put_object, [exc]

    def put_object(**kw: Any) -> dict:
        out = real(**kw)
        if once:
            raise once.pop()
        return out

    fake.put_object = put_object  # type: ignore[method-assign]


@pytest.mark.parametrize("then", ["renew", "release", "read back fails"])
def test_a_renewal_that_went_through_with_its_reply_lost_is_not_taken_for_a_lost_lease(then):
    """Review s46, 2A: a renewal went through, then botocore gave up (a read timeout); the next renewal, on the etag
    before it, gets 412. The object holds that earlier renewal (its nonce): the lease is this writer's, and the next
    renewal or the release is put over it. Before: 'taken over by another', and the lease left held for a TTL. A
    412 whose read-back fails is not a loss either (only a body not this writer's is). The network errors reach
    the caller as transient LeaseStoreErrors (wrapped where the lease gives up: its nonce logic sees the raw one)."""
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    from index.lease import LeaseStoreError

    fake = FakeS3()
    lease = _fake_lease(fake)
    lease.acquire(timeout=0)
    lease._stop.set()  # renewals driven by hand
    key = "g/_speciesid/write.lock"
    _applied_then(fake, ReadTimeoutError(endpoint_url="http://s3"))
    with pytest.raises(LeaseStoreError, match="renewing it .*got no answer") as caught:
        lease.renew()  # the heartbeat logs this and tries again at the next beat
    assert caught.value.transient and isinstance(caught.value.__cause__, ReadTimeoutError)
    unanswered = json.loads(fake.objects[key][1])
    if then == "read back fails":
        fake.fail.append(("get", EndpointConnectionError(endpoint_url="http://s3")))
        with pytest.raises(LeaseStoreError, match="reading who holds it") as caught:
            lease.renew()  # refused, and who holds it could not be read: not known to be lost
        assert lease._lost is None and isinstance(caught.value.__cause__, EndpointConnectionError)
    if then != "release":
        lease.renew()
        now = json.loads(fake.objects[key][1])
        assert now["pid"] == os.getpid() and now["nonce"] != unanswered["nonce"] and lease._etag == fake.objects[key][0]
        lease.check()
        lease.write_next_id(3, None)
        assert json.loads(fake.objects["g/_speciesid/ids.json"][1])["next"] == 3
    lease.release()
    assert json.loads(fake.objects[key][1])["free"] is True  # freed: nobody waits a TTL out


@pytest.mark.parametrize("failure", ["network error", "interrupt"])
def test_a_take_that_went_through_with_its_reply_lost_is_freed_again(failure):
    """Review s46, 2B: the put that takes the lease went through, then failed (botocore gave up on its reply) or a
    Ctrl-C came while it was in flight. Before, the lease was left naming this writer for a TTL; now the object is
    read, holds this take's nonce, and is freed (If-Match on its etag). A put that failed before it went through
    leaves another writer's object as it is."""
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    from index.lease import LeaseStoreError

    error = ReadTimeoutError(endpoint_url="http://s3") if failure == "network error" else KeyboardInterrupt()
    fake = FakeS3()
    lease = _fake_lease(fake)
    key = "g/_speciesid/write.lock"
    _applied_then(fake, error)
    with pytest.raises(LeaseStoreError if failure == "network error" else KeyboardInterrupt) as caught:
        lease.acquire(timeout=5)
    assert failure != "network error" or caught.value.__cause__ is error
    left = json.loads(fake.objects[key][1])
    assert not lease.held and left["free"] is True and left["pid"] == os.getpid()
    # another writer's free lease, and a take whose put fails before it gets there: nothing of it is touched
    theirs = ('"theirs"', json.dumps({"free": True, "by": "other-host", "nonce": "theirs"}).encode())
    fake.objects[key] = theirs
    fake.fail.append(("put", EndpointConnectionError(endpoint_url="http://s3")))
    with pytest.raises(LeaseStoreError, match="taking it"):
        _fake_lease(fake).acquire(timeout=5)
    assert fake.objects[key] == theirs


class _LateReply(FakeS3):
    """A FakeS3 whose next ``slow`` request ("put" or "get") on the lease object, once ``armed``, is answered
    ``delay`` s late. S3 dated a put when it arrived, so the lease went stale on the server's clock meanwhile, and
    another writer took it over: its holder body is over the lease when the late reply comes."""

    def __init__(self, slow: str, delay: float) -> None:
        super().__init__()
        self.slow, self.delay, self.armed = slow, delay, False

    def _late(self, op: str, key: str) -> None:
        if self.armed and op == self.slow and key.endswith("write.lock"):
            self.armed = False
            time.sleep(self.delay)
            self.objects[key] = ('"rival"', json.dumps({"host": "rival", "pid": 1, "nonce": "theirs"}).encode())

    def put_object(self, **kw: Any) -> dict:
        out = super().put_object(**kw)
        self._late("put", kw["Key"])
        return out

    def get_object(self, **kw: Any) -> dict:
        out = super().get_object(**kw)
        self._late("get", kw["Key"])
        return out


@pytest.mark.parametrize("how", ["take answered late", "renewal answered late", "renewal adopted by its nonce late"])
def test_a_lease_is_timed_from_when_its_put_was_sent_not_from_its_late_reply(how, monkeypatch):
    """Review s46, 1: a put's reply 0.7 s late (a slow link; botocore's retries after a read timeout; a read-back of
    a put refused on botocore's retry) while the TTL is 1 s. Before, the lease was timed from the reply, so check()
    vouched for it without asking the store for half a TTL more, while a rival held it: the holder wrote ids.json
    under the rival's lease. Timed from the send, check() renews, is refused and stops the holder."""
    from index.lease import LeaseLostError, S3Lease

    monkeypatch.setattr(S3Lease, "_start_heartbeat", lambda self: None)  # renewals driven by hand
    fake = _LateReply("get" if "nonce" in how else "put", delay=0.7)
    lease = _fake_lease(fake, ttl=1.0)
    if how.startswith("take"):
        fake.armed = True
        lease.acquire(timeout=5)
    else:
        lease.acquire(timeout=0)
        fake.armed = True
        if "nonce" in how:
            fake.lost.append("IfMatch")  # the renewal went through, botocore's retry got 412, the read-back is late
        lease.renew()
    assert not fake.armed and lease.held
    with pytest.raises(LeaseLostError, match="taken over by another"):
        lease.check()
    with pytest.raises(LeaseLostError):
        lease.write_next_id(9, None)
    assert "g/_speciesid/ids.json" not in fake.objects
    lease.release()
    assert fake.objects["g/_speciesid/write.lock"][0] == '"rival"'  # never freed


def test_a_lease_request_that_hangs_gives_up_well_within_the_ttl():
    """Review s46, 1: the lease's client had 30 s reads and 4 tries against a 30 s TTL, so one renewal could outlast
    the lease. Its timeouts are a sixth of the TTL now (1 s to 10 s), with 2 tries: against a server that never
    answers (a socket on 127.0.0.1 that accepts and stays silent), a 6 s lease gives up on a request in about 2 s."""
    import socket
    import threading

    from index.lease import S3Lease

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    options = {"aws_endpoint": f"http://127.0.0.1:{silent.getsockname()[1]}", "region": "us-east-1",
               "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    lease = S3Lease("s3://b/g", options, ttl=6.0)
    config = lease.client.meta.config
    assert config.connect_timeout == config.read_timeout == 1.0 and config.retries["total_max_attempts"] == 2
    assert S3Lease("s3://b/g", options, ttl=30).client.meta.config.read_timeout == 5.0
    failed: list[BaseException] = []

    def read() -> None:
        try:
            lease.read_next_id()
        except Exception as exc:  # noqa: BLE001
            failed.append(exc)

    start = time.monotonic()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(lease.ttl)
    spent = time.monotonic() - start
    silent.close()  # a request still waiting gets its connection closed, and ends
    reader.join(10)
    assert spent < lease.ttl and failed and "timeout" in str(failed[0]).lower(), (spent, failed)


def test_an_unreadable_id_mark_is_deleted_only_when_no_writer_or_build_runs_anywhere():
    """Review s46, 6: the shared id mark is the only record of the ids a running (Ray) build reserved and has not
    committed. The error said 'delete it' outright: deleted meanwhile, the next writer steps over the store's ids
    only, and gives those reserved ids again. It says to wait until no writer or build runs on any machine."""
    fake = FakeS3()
    fake.objects["g/_speciesid/ids.json"] = ('"1"', b"{not json")
    lease = _fake_lease(fake)
    with pytest.raises(ValueError, match=r"s3://b/g/_speciesid/ids.json is unreadable .*reserved and has not "
                                         r"committed.*wait until no writer or build runs on any machine that writes "
                                         r"s3://b/g, then delete it .*could be given twice"):
        lease.read_next_id()
    assert fake.objects["g/_speciesid/ids.json"][1] == b"{not json"  # never rewritten by a guess


@pytest.mark.parametrize("body", [b"{not json", b'{"next": "many"}', b"[]"])
def test_an_unreadable_id_mark_is_a_500_whose_log_has_the_whole_message(body, caplog):
    """Review s46 (lease, 2nd pass), 3: an unreadable shared id mark raised a plain ValueError, which the API answered
    400 (the request's fault, it said). It is a LeaseStoreError, not transient: a 500 saying the server's store is
    misconfigured or damaged (no bucket named), its whole message, what to do, in the server's log."""
    import logging

    from fastapi import HTTPException

    from api.routers._edge import edge
    from index.lease import LeaseStoreError

    fake = FakeS3()
    fake.objects["g/_speciesid/ids.json"] = ('"1"', body)
    lease = _fake_lease(fake)
    with pytest.raises(LeaseStoreError) as raised:
        lease.read_next_id()
    assert not raised.value.transient
    with caplog.at_level(logging.ERROR, logger="api.routers._edge"), pytest.raises(HTTPException) as caught:
        edge(lease.read_next_id)
    got = caught.value
    assert got.status_code == 500 and "misconfigured or damaged" in got.detail and not got.headers
    assert "s3://" not in got.detail and "ids.json" not in got.detail
    assert "s3://b/g/_speciesid/ids.json is unreadable" in caplog.text, caplog.text
    assert "wait until no writer or build runs on any machine that writes s3://b/g, then delete it" in caplog.text


def test_a_heartbeat_left_from_an_earlier_hold_stops(monkeypatch):
    """release() waits a TTL for the heartbeat; one stuck longer in a renewal went on beating beside the next hold's
    (its stop event was cleared by the next acquire). Each hold now has its own stop event."""
    import threading

    fake = FakeS3()
    lease = _fake_lease(fake, ttl=0.3)
    lease.acquire(timeout=0)
    entered, go = threading.Event(), threading.Event()
    real = lease.renew

    def slow() -> None:
        if not entered.is_set():  # the first renewal hangs (a slow store)
            entered.set()
            go.wait(10)
        real()

    monkeypatch.setattr(lease, "renew", slow)
    assert entered.wait(5)
    old = lease._beat
    lease.release()  # its join times out
    lease.acquire(timeout=0)
    go.set()
    old.join(2)
    assert not old.is_alive()
    lease.release()


def test_the_timeout_message_gives_the_wait_and_the_holders_own_ttl():
    fake = FakeS3()
    body = {"host": "busy-host", "pid": 99, "since": "2025-01-01T00:00:00+00:00", "ttl_s": 7}
    fake.objects["g/_speciesid/write.lock"] = ('"h"', json.dumps(body).encode())
    lease = _fake_lease(fake, ttl=30)
    with pytest.raises(TimeoutError) as caught:
        lease.acquire(timeout=0.2, waited=100)
    msg = str(caught.value)
    assert "this one waited 100 s" in msg and "lapses 7 s after its last renewal" in msg, msg
    assert "held by host busy-host, pid 99" in msg and "for " in msg and "renewed 0 s ago" in msg, msg


def test_refusals_of_the_lease_name_it_and_say_what_to_do():
    """AccessDenied names the lease object and the permissions; an InvalidArgument that is not about conditional
    headers (a bucket policy wanting SSE headers) is not reported as 'no conditional writes'."""
    from index.lease import ConditionalWritesUnsupported, LeaseStoreError

    fake = FakeS3()
    fake.fail.append(("put", _client_error("AccessDenied", 403, message="Access Denied")))
    with pytest.raises(LeaseStoreError, match=r"s3://b/g/_speciesid/write.lock: taking it .* was refused "
                                              r"\(AccessDenied.*s3:GetObject and s3:PutObject on "
                                              r"s3://b/g/_speciesid/\*"):
        _fake_lease(fake).acquire(timeout=0)
    fake.fail.append(("put", _client_error("InvalidArgument", 400, message="Requests specifying Server Side "
                                           "Encryption with AWS KMS managed keys require AWS Signature Version 4.")))
    with pytest.raises(LeaseStoreError, match="InvalidArgument") as caught:
        _fake_lease(fake).acquire(timeout=0)
    assert not isinstance(caught.value, ConditionalWritesUnsupported)
    fake.fail.append(("put", _client_error("NotImplemented", 501, message="A header you provided implies "
                                           "functionality that is not implemented (If-None-Match)")))
    with pytest.raises(ConditionalWritesUnsupported):
        _fake_lease(fake).acquire(timeout=0)
    assert not fake.objects and not [c for op, c in fake.calls if op == "delete"]


def test_a_refused_lookup_says_that_s3_refuses_a_missing_key_without_list_bucket():
    """Without s3:ListBucket, S3 answers a HEAD or GET of a key that is not there with 403 (a probe never published,
    an older store's id mark): the error says so and names ListBucket; before, it told the operator to grant
    s3:GetObject, already granted (walkthrough s3 #4). A refused PUT still names the permission to write."""
    from index.lease import LeaseStoreError
    from index.objects import StoreObjectError, StoreObjects, probe_uri

    class Refusing:
        def head_object(self, **_):
            raise _client_error("403", 403, op="HeadObject", message="Forbidden")

        def get_object(self, **_):
            raise _client_error("AccessDenied", 403, op="GetObject", message="Access Denied")

        def put_object(self, **_):
            raise _client_error("AccessDenied", 403, op="PutObject", message="Access Denied")

    objects = StoreObjects("s3://gbk/p", client=Refusing())
    for look in (lambda: objects.head(probe_uri(objects.uri, "probe.json")),
                 lambda: objects.get("s3://gbk/p/_speciesid/uploads/gone.jpg")):
        with pytest.raises(StoreObjectError) as caught:
            look()
        msg = str(caught.value)
        assert "S3 answers 403, not 404, for a key that is not there when the credentials lack s3:ListBucket" in msg
        assert "grant s3:ListBucket on the bucket gbk" in msg and "may simply be missing" in msg, msg
        assert "if it is there, the credentials need s3:GetObject on s3://gbk/p/_speciesid/*" in msg, msg
    with pytest.raises(StoreObjectError, match=r"the credentials need s3:PutObject on") as caught:
        objects.put("s3://gbk/p/_speciesid/probe/probe.json", b"{}")
    assert "ListBucket" not in str(caught.value)
    fake = FakeS3()
    fake.fail.append(("get", _client_error("AccessDenied", 403, op="GetObject", message="Access Denied")))
    with pytest.raises(LeaseStoreError, match=r"reading the shared id mark ids.json was refused \(AccessDenied.*"
                                              r"grant s3:ListBucket on the bucket b"):
        _fake_lease(fake).read_next_id()


def test_a_store_whose_listing_is_refused_names_s3_list_bucket():
    """Lance lists the table's versions at every open: a refused listing (no s3:ListBucket) names that permission,
    not only 'check the URI and the AWS_* settings' (walkthrough s3 #4; the text is Lance's, from moto with IAM)."""
    from index.gallery import store_error

    lance = ('Invalid input, Failed to connect to namespace: IO { source: Generic { store: "S3", source: ListRequest '
             '{ source: RetryError(RetryErrorImpl { method: GET, uri: Some(http://127.0.0.1:1/gbk?list-type=2&prefix='
             'p%2F__manifest%2F_versions%2F), inner: Status { status: 403, body: Some("<Error><Code>AccessDenied'
             '</Code><Message>Access Denied</Message></Error>") } }) } }')
    msg = str(store_error("s3://gbk/p", ValueError(lance)))
    assert msg.startswith("cannot open the store s3://gbk/p (AccessDenied): listing it was refused"), msg
    assert "the credentials need s3:ListBucket on its bucket" in msg and "docs/shared-gallery.md" in msg, msg
    other = str(store_error("s3://gbk/p", ValueError("AccessDenied: GetObject refused")))
    assert "ListBucket" not in other and "check the URI and the AWS_* settings" in other


def test_the_api_answers_the_leases_own_refusals_503_to_retry_or_500_misconfigured(monkeypatch):
    """The errors the lease really raises (their S3 cause chained) reach an API client as 503 + Retry-After (racing
    writes, a wait past the timeout) or 500 (credentials refused, no conditional writes): before, each was a 400."""
    from fastapi import HTTPException

    from api.routers._edge import edge

    def answer(fake: FakeS3, timeout: float = 0, step=None) -> HTTPException:
        with pytest.raises(HTTPException) as caught:
            edge(step or (lambda: _fake_lease(fake).acquire(timeout=timeout)))
        return caught.value

    monkeypatch.setattr("index.lease.CONFLICT_PAUSE_S", 0.0)
    fake = FakeS3()
    holder = _fake_lease(fake)
    holder.acquire(timeout=0)
    fake.fail += [("put", _client_error("ConditionalRequestConflict", 409))] * 5  # a renewal meeting racing writes
    got = answer(fake, step=holder.renew)
    assert got.status_code == 503 and "racing writes" in got.detail and got.headers["Retry-After"]
    assert "conflicting writes" in str(got.__cause__)  # the lease's message: in the server's log (walk logs #2)
    got = answer(fake, timeout=0.2)  # another writer holds it: a waiter's TimeoutError
    assert got.status_code == 503 and "waited" in got.detail and "retry in 5 s" in got.detail
    holder.release()
    fake.fail.append(("put", _client_error("AccessDenied", 403, message="Access Denied")))
    got = answer(fake)
    assert got.status_code == 500 and "misconfigured" in got.detail and "s3:" not in got.detail
    fake.fail.append(("put", _client_error("NotImplemented", 501, message="If-None-Match is not implemented")))
    assert answer(fake).status_code == 500


@pytest.mark.parametrize(("code", "status"), [("SlowDown", 503), ("BadGateway", 502), ("TooManyRequests", 429)])
def test_a_lease_error_says_itself_whether_a_retry_may_help_and_the_api_answers_by_it(code, status):
    """Review s46 (lease, 2nd pass), 1: the API read an S3 code off a lease error's __cause__, from a short list: a
    busy store answering 502 or 429 was a 500 'misconfigured', as was a transient error raised without ``from``.
    Each lease error now carries ``transient``, set where it is raised (kept when pickled, as a Ray task's is)."""
    import pickle

    from fastapi import HTTPException

    from api.routers._edge import edge
    from index.lease import LeaseStoreError

    fake = FakeS3()
    fake.fail.append(("get", _client_error(code, status, "GetObject", "please slow down")))
    with pytest.raises(LeaseStoreError) as caught:
        _fake_lease(fake).acquire(timeout=0)
    error = caught.value
    assert error.transient and "try again" in str(error) and code in str(error)
    error.__cause__ = None  # its kind is its own, not read off the S3 error it came from
    copy = pickle.loads(pickle.dumps(error))
    assert copy.transient and str(copy) == str(error)
    for exc in (error, copy):
        def fail(exc: Exception = exc) -> None:
            raise exc

        with pytest.raises(HTTPException) as answer:
            edge(fail)
        assert answer.value.status_code == 503 and answer.value.headers["Retry-After"], answer.value.detail


@pytest.mark.parametrize("error", ["EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                                   "ConnectionClosedError"])
def test_a_lease_request_that_gets_no_answer_is_a_503_naming_the_store_and_the_network(error, monkeypatch):
    """Review s46 (lease, 2nd pass), 2: botocore's network errors went through the lease as they were, and reached an
    API client as a plain-text 500. Where the lease gives up on one, it is a transient LeaseStoreError naming the
    lease object and the endpoint and saying to check the network and try again (the error kept as its cause): a
    503 with Retry-After. A renewal that went through with its reply lost is still told apart: the next one is put
    over it, and the release frees the lease."""
    import botocore.exceptions
    from fastapi import HTTPException

    from api.routers._edge import edge
    from index.lease import LeaseStoreError, S3Lease

    monkeypatch.setattr(S3Lease, "_start_heartbeat", lambda self: None)  # renewals driven by hand
    kind = getattr(botocore.exceptions, error)
    url = "http://s3.example:9000/b/g/_speciesid/write.lock"

    def answer(step) -> str:
        """The lease's message (for the server's log) of the 503 ``step`` is answered."""
        with pytest.raises(HTTPException) as caught:
            edge(step)
        got = caught.value
        assert got.status_code == 503 and got.headers["Retry-After"], got.detail
        said = str(got.__cause__)
        assert "s3://b/g/_speciesid/write.lock" in said and "http://s3.example:9000" in said
        assert "check the network between this machine and the store, then try again" in said
        assert "store busy or not answering" in got.detail  # naming neither (walk logs #2)
        assert "s3://" not in got.detail and "s3.example" not in got.detail, got.detail
        assert isinstance(got.__cause__, LeaseStoreError) and isinstance(got.__cause__.__cause__, kind)
        return said

    fake = FakeS3()
    fake.fail.append(("get", kind(endpoint_url=url)))  # taking it: who holds it could not be read
    assert "reading who holds it" in answer(lambda: _fake_lease(fake).acquire(timeout=0))
    lease = _fake_lease(fake)
    lease.acquire(timeout=0)
    _applied_then(fake, kind(endpoint_url=url))  # a commit's check renews: the put goes through, its reply is lost
    lease._renewed = -1e9
    assert "renewing it" in answer(lease.check)
    lease.check()  # the next renewal (412 on the etag before) finds that put's nonce: put over it, not 'lost'
    lease.write_next_id(4, None)
    fake.fail.append(("put", kind(endpoint_url=url)))
    assert "writing the shared id mark" in answer(lambda: lease.write_next_id(5, fake.objects[lease.ids_key][0]))
    lease.release()
    assert json.loads(fake.objects[lease.key][1])["free"] is True


def test_a_tls_failure_of_the_lease_says_to_check_the_certificate_and_is_no_503():
    """A TLS handshake refused (botocore's SSLError, a ConnectionError too) is no passing network failure: a later
    try meets the same certificate. It is a LeaseStoreError naming the endpoint and the certificate, not transient."""
    from botocore.exceptions import SSLError

    from api.routers._edge import lease_answer
    from index.lease import LeaseStoreError

    fake = FakeS3()
    fake.fail.append(("get", SSLError(endpoint_url="https://s3.example/b/g", error="CERTIFICATE_VERIFY_FAILED")))
    with pytest.raises(LeaseStoreError, match=r"no TLS connection to https://s3.example .*CERTIFICATE_VERIFY_FAILED"
                                              r".*certificate") as caught:
        _fake_lease(fake).acquire(timeout=0)
    assert not caught.value.transient and lease_answer(caught.value).status_code == 500


class _Listing(FakeS3):
    """A FakeS3 that lists its objects (ListObjectsV2 through a paginator), raising ``list_error`` when set."""

    list_error: Exception | None = None

    def get_paginator(self, op: str):
        fake = self

        class Pages:
            def paginate(self, *, Prefix, **_):  # noqa: N803 - boto3's names
                if fake.list_error is not None:
                    raise fake.list_error
                yield {"Contents": [{"Key": k} for k in sorted(fake.objects) if k.startswith(Prefix)]}

        return Pages()


@pytest.mark.parametrize(("error", "transient", "said"), [
    ("SlowDown", True, "the store is busy or failing for now; try again shortly"),
    ("AccessDenied", False, "the credentials need s3:ListBucket on s3://b"),
    ("EndpointConnectionError", True, "check the network between this machine and the store, then try again"),
])
def test_listing_and_deleting_a_half_created_tables_objects_fail_as_lease_store_errors(error, transient, said):
    """list_keys and delete_keys (the removal of a table left half-created on S3) let botocore's errors through as
    they were: a busy store or a network error reached an API client as a 500 'misconfigured' (or a plain-text one),
    not a 503 to retry. They are LeaseStoreErrors as the lease's other requests' are, ``transient`` by the same rule,
    naming the objects and, for a refusal, the permission to grant."""
    import botocore.exceptions

    from api.routers._edge import lease_answer
    from index.lease import LeaseStoreError

    def failure() -> Exception:
        if error == "EndpointConnectionError":
            return botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3.example:9000/b")
        return _client_error(error, 503 if error == "SlowDown" else 403, "ListObjectsV2", "no")

    fake = _Listing()
    fake.objects["g/t.lance/_versions/1.manifest-tmp"] = ('"x"', b"")
    lease = _fake_lease(fake)
    assert lease.list_keys("g/t.lance/") == ["g/t.lance/_versions/1.manifest-tmp"]
    fake.list_error = failure()
    with pytest.raises(LeaseStoreError, match=r"listing the objects under s3://b/g/t.lance/") as caught:
        lease.list_keys("g/t.lance/")
    assert caught.value.transient is transient and said in str(caught.value), str(caught.value)
    assert lease_answer(caught.value).status_code == (503 if transient else 500)
    lease.acquire(timeout=0)
    try:
        fake.fail.append(("delete", failure()))
        with pytest.raises(LeaseStoreError, match=r"deleting s3://b/g/t.lance/_versions/1.manifest-tmp") as caught:
            lease.delete_keys(["g/t.lance/_versions/1.manifest-tmp"])
        assert caught.value.transient is transient, str(caught.value)
        if error == "AccessDenied":
            assert "s3:DeleteObject on s3://b/g/t.lance/_versions/1.manifest-tmp" in str(caught.value)
    finally:
        lease.release()


@pytest.mark.parametrize("options", [{}, {"aws_access_key_id": "only-the-key-id"}],
                         ids=["NoCredentialsError", "PartialCredentialsError"])
def test_credentials_not_found_are_a_500_whose_log_says_which_variables_to_set(options, monkeypatch, tmp_path,
                                                                                  caplog):
    """botocore's NoCredentialsError (none found) and PartialCredentialsError (an access key id without its secret)
    went through the lease as they were: an API client got a plain-text 500 and the log named no variable. They are
    LeaseStoreErrors, not transient (a retry meets the same setup): a 500 saying the server's store is misconfigured,
    the whole message, the variables to set, in the server's log. A real boto3 client: nothing is sent."""
    import logging

    from fastapi import HTTPException

    from api.routers._edge import edge
    from index.lease import LeaseStoreError, S3Lease

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_DEFAULT_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    options = {"aws_endpoint": "http://127.0.0.1:9", "region": "us-east-1", **options}

    def lease() -> S3Lease:
        return S3Lease("s3://b/g", options, ttl=30)

    for step in (lambda: lease().acquire(timeout=0), lambda: lease().list_keys("g/")):
        with pytest.raises(LeaseStoreError, match="found no credentials for the store") as caught:
            step()
        assert not caught.value.transient
        assert "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in str(caught.value) and "AWS_PROFILE" in str(
            caught.value)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="api.routers._edge"), pytest.raises(HTTPException) as answer:
        edge(lambda: lease().acquire(timeout=0))
    got = answer.value
    assert got.status_code == 500 and "misconfigured or damaged" in got.detail and not got.headers
    assert "AWS_" not in got.detail and "s3://" not in got.detail
    assert "s3://b/g/_speciesid/write.lock: reading who holds it (a GET) found no credentials" in caplog.text
    assert "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in caplog.text, caplog.text


def test_the_installed_boto3_sends_every_conditional_parameter_and_an_older_one_is_told_to_upgrade():
    import types

    from index.lease import NEEDED_PARAMS, LeaseStoreError, check_client, s3_client

    client = s3_client({"aws_endpoint": "http://127.0.0.1:9", "region": "us-east-1"})  # no request is sent
    model = client.meta.service_model
    for op, names in NEEDED_PARAMS.items():
        assert set(names) <= set(model.operation_model(op).input_shape.members), op

    class OldShape:
        members = {"Bucket": None, "Key": None, "Body": None}

    old = types.SimpleNamespace(meta=types.SimpleNamespace(service_model=types.SimpleNamespace(
        operation_model=lambda op: types.SimpleNamespace(input_shape=OldShape))))
    with pytest.raises(LeaseStoreError, match=r"too old .*PutObject IfNoneMatch.*upgrade boto3 to 1.35.69 or later: "
                                              r"pip install 'speciesid\[s3\]'$"):
        check_client(old)  # no -U: pip keeps the installed speciesid and only upgrades boto3 (reread1 #7: -U would
        # ask the package index for a "speciesid", which is not published there)


def test_a_store_that_honours_if_none_match_but_ignores_if_match_is_refused(s3_env):
    """If-Match is what stops a stalled holder renewing over a new holder's lease, and a release freeing another's:
    a store ignoring it on PUT must be refused too."""
    from index.lease import ConditionalWritesUnsupported, S3Lease

    endpoint, client = s3_env
    lease = S3Lease(f"s3://{BUCKET}/lease4", client=_Dropping(client, "IfMatch"))
    with pytest.raises(ConditionalWritesUnsupported, match="If-Match"):
        lease.acquire(timeout=0)
    assert not lease.held and _object_json(client, "lease4/_speciesid/write.lock")["free"] is True


def test_the_lease_needs_no_conditional_delete(s3_env, caplog):
    """A store that honours If-None-Match and If-Match on PUT but ignores If-Match on DELETE (review 2, B: the store
    check refused such stores, so every write failed there). The lease works on it: taken, renewed, released,
    taken over once stale, one holder at a time; it never sends a DELETE."""
    from index.lease import LEASE_DIR, LeaseLostError, S3Lease

    endpoint, client = s3_env
    key = f"lease5/{LEASE_DIR}/write.lock"
    deletes: list[dict] = []

    class NoConditionalDelete(_Proxy):
        def delete_object(self, **kw):
            deletes.append(kw)
            return client.delete_object(**{k: v for k, v in kw.items() if k != "IfMatch"})

    def lease(ttl: float) -> S3Lease:
        return S3Lease(f"s3://{BUCKET}/lease5", client=NoConditionalDelete(client), ttl=ttl)

    first, second = lease(30), lease(30)
    first.acquire(timeout=0)
    first.renew()
    with pytest.raises(TimeoutError, match="another writer holds"):
        second.acquire(timeout=0)  # one holder at a time
    first.release()
    assert _object_json(client, key)["free"] is True
    second.acquire(timeout=0)
    assert second.held and _object_json(client, key).get("free") is None
    second.release()
    stalled, waiter = lease(1), lease(1)
    stalled.acquire(timeout=0)
    stalled._stop.set()  # its heartbeat stops: the lease goes stale
    time.sleep(2.2)  # past its 1 s TTL on the server's clock (whole seconds)
    caplog.set_level("WARNING", logger="index.lease")
    waiter.acquire(timeout=0)
    assert "broke the stale write lease" in caplog.text
    with pytest.raises(LeaseLostError):
        stalled.check()
    stalled.release()  # never frees the waiter's lease
    assert _object_json(client, key).get("free") is None
    waiter.release()
    assert _object_json(client, key)["free"] is True and deletes == []


def test_lease_errors_of_a_gallery_create_keep_their_advice(s3_env, tmp_path, monkeypatch):
    """Gallery.create on S3 takes the lease: its errors come out whole (before: cut to 200 characters, and told to
    'check the AWS_* settings')."""
    import index.lease as lease_module
    from index.gallery import Gallery

    endpoint, client = s3_env
    real = lease_module.s3_client
    monkeypatch.setattr(lease_module, "s3_client", lambda options, **kw: _Dropping(client, "IfNoneMatch", "IfMatch"))
    encoder = _TINY
    with pytest.raises(ValueError, match=r"Use a store that honours them .*or keep the gallery's store in its "
                                         r"folder \(no --store\)") as caught:
        Gallery.create(tmp_path / "c", encoder, store=f"s3://{BUCKET}/careless")
    assert "check the URI and the AWS_" not in str(caught.value)

    class Denied(_Proxy):
        def put_object(self, **kw):
            if "_speciesid/" in kw["Key"]:
                raise _client_error("AccessDenied", 403, message="Access Denied")
            return client.put_object(**kw)

    monkeypatch.setattr(lease_module, "s3_client", lambda options, **kw: Denied(client))
    with pytest.raises(ValueError, match=r"the write lease s3://galleries/denied/_speciesid/write.lock: .*refused "
                                         r"\(AccessDenied.*s3:PutObject"):
        Gallery.create(tmp_path / "d", encoder, store=f"s3://{BUCKET}/denied")
    monkeypatch.setattr(lease_module, "s3_client", real)


def test_steps_that_write_only_the_folder_do_not_take_the_stores_lease(s3_env, tmp_path, monkeypatch):
    """Saving or rebuilding the vector index and removing kept uploads write the folder alone: no lease (4 requests
    and a wait on other machines' writers each). Store writes still take it, once."""
    from index.gallery import Gallery
    from index.lease import S3Lease
    from index.records import ReferenceRecord
    from retrieval.workflows import delete_references

    endpoint, client = s3_env
    g = Gallery.create(tmp_path / "g", _TINY, store=f"s3://{BUCKET}/local")
    g.layout.uploads.mkdir()
    paths = [g.layout.uploads / f"{i}.jpg" for i in range(3)]
    for p in paths:
        p.write_bytes(b"x")
    ids = g.add([ReferenceRecord(path=str(p), species="Naja naja") for p in paths], [f"{i:064x}" for i in range(3)],
                np.eye(3, 8, dtype=np.float32))
    taken = []
    real = S3Lease.acquire

    def counting(self, timeout, **kw):
        taken.append(timeout)
        return real(self, timeout, **kw)

    monkeypatch.setattr(S3Lease, "acquire", counting)
    g.save_index()
    g.rebuild_index()
    assert taken == []
    assert sorted(delete_references(g, ids)) == sorted(ids)
    assert len(taken) == 1 and not any(p.exists() for p in paths)  # the delete itself; not once per upload


def test_the_end_of_a_build_holds_the_stores_lease_for_its_store_steps_only(s3_env, tmp_path, monkeypatch):
    """finish_build compacts and indexes the store under its lease (checked first), then rebuilds the vector index
    holding the folder's lock alone: another machine's writer does not wait for the rebuild, and its row is in the
    index (added by difference when the rebuild read the store before it)."""
    from index.gallery import Gallery
    from index.lease import LeaseLostError, S3Lease
    from index.records import ReferenceRecord
    from index.store import ReferenceStore

    a, first = _two_machines(tmp_path, f"s3://{BUCKET}/finish")
    b = Gallery.open(tmp_path / "b")
    b._writer.timeout = 1.0  # a writer on the other machine that waits no longer than that for the lease
    held, added = {}, []
    real_optimize, real_rebuild = ReferenceStore.optimize, Gallery.rebuild_index

    def optimize(store, **kw):
        held["optimize"] = a._writer.held_lease is not None
        return real_optimize(store, **kw)

    def rebuild_index(self, **kw):
        if self is a:
            held["rebuild"] = a._writer.held_lease is not None
            added.extend(b.add([ReferenceRecord(path="/b.jpg", species="Naja naja")], ["b" * 64],
                               np.full((1, _TINY["dim"]), 2, np.float32)))  # the other machine commits meanwhile
        return real_rebuild(self, **kw)

    monkeypatch.setattr(ReferenceStore, "optimize", optimize)
    monkeypatch.setattr(Gallery, "rebuild_index", rebuild_index)
    a.finish_build()
    assert held == {"optimize": True, "rebuild": False} and len(added) == 1
    assert sorted(a.index.ids.tolist()) == sorted([first, *added])
    c = b.add([ReferenceRecord(path="/c.jpg", species="Naja naja")], ["c" * 64], np.full((1, _TINY["dim"]), 3,
                                                                                        np.float32))
    assert sorted(Gallery.open(tmp_path / "a").index.ids.tolist()) == sorted([first, *added, *c])  # by difference
    # a lease lost before the store steps: nothing is compacted
    held.clear()

    def lost(self):
        raise LeaseLostError("the write lease was taken over by another")

    monkeypatch.setattr(S3Lease, "check", lost)
    with pytest.raises(LeaseLostError):
        a.finish_build()
    assert held == {}


_KILLED_HOLDER = """
import os, signal, sys
import numpy as np
import index.store
from index.gallery import Gallery
from index.records import ReferenceRecord

def killed(*args, **kwargs):  # the ids are reserved (the shared mark written), the lease held: killed mid-write
    print("holding", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

index.store.ReferenceStore.add = killed
g = Gallery.open(sys.argv[1])
g.add([ReferenceRecord(path="/killed.jpg", species="Naja naja")], ["e" * 64], np.ones((1, 8), np.float32))
"""


#: Reads of a lease a writer makes waiting out a 2 s TTL, at most: about 10 (pauses of 0.05 s growing to 1 s), and
#: 20 s of waiting would be about 25.
_LOOKS_PAST_TTL = 25


def test_a_writer_killed_while_holding_the_lease_blocks_others_only_for_its_ttl(s3_env, tmp_path, caplog,
                                                                                monkeypatch):
    """A real process takes the lease (a 2 s TTL) during a write and is SIGKILLed holding it. A writer on another
    folder (another machine) of the same store waits its TTL out, breaks it and writes: no row lost, ids once."""
    import os
    import signal

    from conftest import REPO

    from index.gallery import Gallery
    from index.lease import S3Lease
    from index.records import ReferenceRecord

    endpoint, client = s3_env
    _, first = _two_machines(tmp_path, f"s3://{BUCKET}/killed")
    env = {**os.environ, "SPECIESID_LEASE_TTL_S": "2"}
    run = subprocess.run([sys.executable, "-c", _KILLED_HOLDER, str(tmp_path / "a")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == -signal.SIGKILL and "holding" in run.stdout, run.stderr[-2000:]
    lock = _object_json(client, "killed/_speciesid/write.lock")
    assert lock["ttl_s"] == 2.0 and lock["pid"] != os.getpid()  # left behind by the killed holder
    killed_mark = _object_json(client, "killed/_speciesid/ids.json")
    looks = []  # reads of the lease by the waiting writer: its pauses grow to 1 s, so a count stands for a wait
    look = S3Lease._look

    def counted(self):
        looks.append(self.key)
        if len(looks) > _LOOKS_PAST_TTL:  # fails at once, not after the lock's 600 s
            raise AssertionError(f"{len(looks)} reads of the lease and still waiting: its holder's TTL is 2 s")
        return look(self)

    monkeypatch.setattr(S3Lease, "_look", counted)
    b = Gallery.open(tmp_path / "b")
    new = b.add([ReferenceRecord(path=f"/{i}.jpg", species="Naja naja") for i in range(3)],
                [f"{i:064x}" for i in range(3)], np.eye(3, 8, dtype=np.float32))
    assert "broke the stale write lease" in caplog.text and f"pid {lock['pid']}" in caplog.text
    assert min(new) >= killed_mark["next"]  # the killed writer's reserved id is never given again
    meta = Gallery.open(tmp_path / "a").store.metadata()
    assert sorted(meta["id"].tolist()) == sorted([first, *new]) and meta["id"].is_unique
    assert "e" * 64 not in set(meta["sha256"])  # the killed write committed nothing
    assert _object_json(client, "killed/_speciesid/write.lock")["free"] is True  # taken over, then released


def test_a_gallery_named_again_with_s3a_or_a_trailing_slash_is_the_same_store(s3_env, tmp_path):
    from index.gallery import Gallery

    Gallery.create(tmp_path / "g", _TINY, store=f"s3://{BUCKET}/same")
    again = Gallery.create(tmp_path / "g", _TINY, store=f"s3a://{BUCKET}/same/")  # Hadoop's spelling of one store
    assert str(again.store_uri) == f"s3://{BUCKET}/same"
    with pytest.raises(ValueError, match=f"keeps its store at s3://{BUCKET}/same, not s3://{BUCKET}/other"):
        Gallery.create(tmp_path / "g", _TINY, store=f"s3://{BUCKET}/other")


def test_a_lease_wait_is_given_up_when_asked_and_takes_nothing():
    """A server stopping (stop 54's re-read, finding 7): a write waiting for the lease another machine holds stops
    waiting at its next try (index.locks.WaitGivenUp), not after its timeout, and holds nothing."""
    from index.locks import WaitGivenUp

    fake = FakeS3()
    holder = _fake_lease(fake)
    holder.acquire(timeout=0)
    waiting = _fake_lease(fake)
    tries: list[int] = []

    def give_up() -> bool:
        tries.append(1)
        return len(tries) >= 2  # the server began to stop during the wait

    with pytest.raises(WaitGivenUp, match="was given up"):
        waiting.acquire(timeout=600, give_up=give_up)
    assert len(tries) == 2 and not waiting.held and holder.held


def test_a_flag_set_then_an_add_on_one_machine_reaches_the_evidence_of_another(s3_env, tmp_path):
    """Two machines on one S3 store (no shared folder): set-venom on one, then an add of that species, reach the
    other's evidence list at its next refresh, by the edit the store's manifest records (ReferenceStore.venom_edit):
    the venom counts (0, 0, 4) -> (4, 0, 4) lower none, and the other kept the rows' old flag (walk s55, M23)."""
    import shutil

    from _cli_support import DIM, ENC, FakeEncoder

    from index.gallery import Gallery
    from index.records import ReferenceRecord
    from retrieval.identify import Identifier

    rng = np.random.default_rng(12)
    centre = rng.standard_normal(DIM)
    a = Gallery.create(tmp_path / "a", ENC, store=f"s3://{BUCKET}/venom-edit")

    def add(tag: str) -> None:
        x = centre + 0.05 * rng.standard_normal((4, DIM))
        a.add([ReferenceRecord(path=f"/p/{tag}{i}.jpg", species="Lycodon capucinus") for i in range(4)],
              [f"{tag}{i}".ljust(64, "0") for i in range(4)],
              (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))

    add("a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the folder copied to a second machine
    server = Identifier(FakeEncoder(), Gallery.open(tmp_path / "b"))
    q = (centre / np.linalg.norm(centre))[None].astype(np.float32)

    def evidence() -> dict[str, bool | None]:
        return {Path(n.path).name: n.venomous for n in server.identify_embeddings(q)[0].neighbours}

    for _ in range(2):  # the second answer keeps the venom counts of the version its rows were cached at
        assert evidence() == {f"a{i}.jpg": None for i in range(4)}
    assert a.set_venomous("Lycodon capucinus", True) == (4, 4, 0)
    add("b")
    server.gallery.refresh(force=True)
    assert evidence() == {**{f"a{i}.jpg": True for i in range(4)}, **{f"b{i}.jpg": None for i in range(4)}}
