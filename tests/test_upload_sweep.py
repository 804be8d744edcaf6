"""The uploads kept for the API (index/objects.py): ``speciesid index sweep-uploads`` removes those no row uses and
older than the grace age (on S3 under moto, and a folder's ``uploads/``); an upload's delete after its last reference
checks the store's lease first; one spelling of a store's URIs (``s3a://``, trailing slashes); and one reading of
botocore's errors for the lease and the objects (a TLS failure, a reply cut off)."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import time

import numpy as np
import pytest
from _cli_support import _run
from conftest import s3_keys
from test_object_store import _TINY, BUCKET, FakeS3, _fake_lease, s3_endpoint, s3_env  # noqa: F401 - fixtures

DAY = 86400.0


@pytest.fixture
def client(request):
    """A boto3 client of test_object_store's moto server, its AWS_* environment set for the gallery."""
    return request.getfixturevalue("s3_env")[1]


class _Aged:
    """A boto3 client whose listings date the keys in ``ages`` (key -> seconds) that long before now, as if put
    then: moto dates every object at its put."""

    def __init__(self, client, ages: dict[str, float]) -> None:
        self._client, self._ages = client, ages

    def __getattr__(self, name: str):
        return getattr(self._client, name)

    def get_paginator(self, op: str):
        real, ages = self._client.get_paginator(op), self._ages

        class Pages:
            def paginate(self, **kw):
                for page in real.paginate(**kw):
                    for o in page.get("Contents", []):
                        if o["Key"] in ages:
                            o["LastModified"] -= dt.timedelta(seconds=ages[o["Key"]])
                    yield page

        return Pages()


def _put(g, name: bytes) -> tuple[str, str, int]:
    """Put the bytes ``name`` as an upload of gallery ``g``'s store: (its URI, its key, its size)."""
    from index.objects import upload_uri

    digest = hashlib.sha256(name).hexdigest()
    uri = upload_uri(g.objects.uri, f"{digest}.jpg")
    assert g.objects.put_if_absent(uri, name)
    return uri, uri.split("/", 3)[3], len(name)


def _rows(g, paths: list[str]) -> list[int]:
    from index.records import ReferenceRecord

    digests = [hashlib.sha256(p.encode()).hexdigest() for p in paths]
    vectors = np.random.default_rng(0).standard_normal((len(paths), _TINY["dim"])).astype(np.float32)
    return g.add([ReferenceRecord(path=p, species="Naja naja") for p in paths], digests, vectors)


def _keys(client, prefix: str) -> list[str]:
    return s3_keys(client, BUCKET, f"{prefix}/_speciesid/uploads/")


def test_sweep_removes_old_unused_uploads_from_the_store_and_keeps_used_and_young_ones(client, tmp_path, monkeypatch,
                                                                                          capsys):
    """An orphan older than the grace age goes; one a row uses (an excluded row too, a row spelling the store
    s3a://) stays, and so does a young orphan (an add between its put and its commit); --dry-run removes nothing."""
    import index.objects
    from index.gallery import Gallery

    prefix = f"sweep-{tmp_path.name}"
    g = Gallery.create(tmp_path / "g", _TINY, store=f"s3://{BUCKET}/{prefix}")
    used, used_key, _ = _put(g, b"used")
    excluded, excluded_key, _ = _put(g, b"excluded")
    spelled, spelled_key, _ = _put(g, b"spelled s3a")
    old, old_key, old_size = _put(g, b"an orphan of a crashed add")
    young, young_key, _ = _put(g, b"an add in flight")
    ids = _rows(g, [used, excluded, spelled.replace("s3://", "s3a://", 1)])
    g.set_excluded(ids[1:2])
    ages = {k: 2 * DAY for k in (used_key, excluded_key, spelled_key, old_key)} | {young_key: 60.0}
    real = index.objects.s3_client
    monkeypatch.setattr(index.objects, "s3_client", lambda options, **kw: _Aged(real(options, **kw), ages))
    before = _keys(client, prefix)
    assert len(before) == 5

    code, out, err = _run(capsys, "index", "sweep-uploads", "--index", tmp_path / "g", "--dry-run", "-q")
    assert code == 0, err
    assert f"would remove {old} ({old_size} bytes, 48.0 h old)" in out, out
    assert f"would remove 1 unused upload ({old_size} bytes) from s3://{BUCKET}/{prefix}/_speciesid/uploads/" in out
    assert "kept 3 in use and 1 unused younger than 1d" in out, out
    assert _keys(client, prefix) == before  # a dry run removes nothing

    from index.locks import write_lock
    from index.objects import StoreObjects

    held, delete = [], StoreObjects.delete_many
    monkeypatch.setattr(StoreObjects, "delete_many", lambda self, uris, **kw: held.append(
        write_lock(g.layout.write_lock).held_lease is not None) or delete(self, uris, **kw))
    code, out, err = _run(capsys, "index", "sweep-uploads", "--index", tmp_path / "g", "-q")
    assert code == 0, err
    assert held == [True]  # removed under the store's lease
    assert f"removed {old} (" in out and f"removed 1 unused upload ({old_size} bytes)" in out, out
    assert _keys(client, prefix) == sorted(set(before) - {old_key})
    # a shorter grace age takes the young orphan too, never one in use
    code, out, _ = _run(capsys, "index", "sweep-uploads", "--index", tmp_path / "g", "--older-than", "30s", "-q")
    assert code == 0 and f"removed {young} (" in out and "kept 3 in use and 0 unused younger than 30s" in out, out
    assert _keys(client, prefix) == sorted({used_key, excluded_key, spelled_key})


def test_a_sweep_that_loses_the_lease_stops_before_it_deletes(client, tmp_path, monkeypatch):
    """The lease is checked before each delete: taken over by another machine after the sweep read the rows (that
    machine may commit a row using the object), the sweep stops, LeaseLostError saying to run it again."""
    import json

    import index.objects
    from index.gallery import Gallery
    from index.lease import LeaseLostError
    from index.locks import write_lock
    from index.store import ReferenceStore
    from retrieval.workflows import sweep_uploads

    prefix = f"sweep-lost-{tmp_path.name}"
    g = Gallery.create(tmp_path / "g", _TINY, store=f"s3://{BUCKET}/{prefix}")
    _, key, _ = _put(g, b"an orphan")
    real = index.objects.s3_client
    monkeypatch.setattr(index.objects, "s3_client", lambda options, **kw: _Aged(real(options, **kw), {key: DAY}))
    refresh = ReferenceStore.refresh

    def taken_over_meanwhile(self, *args, **kwargs):
        lease = write_lock(g.layout.write_lock).held_lease
        if lease is not None:  # the look under the lease for rows committed since the unlocked read
            client.put_object(Bucket=BUCKET, Key=lease.key, Body=json.dumps({"host": "other", "pid": 1}).encode())
            lease._renewed = -1e9  # due for a renewal: the check renews, and finds it taken
        return refresh(self, *args, **kwargs)

    monkeypatch.setattr(ReferenceStore, "refresh", taken_over_meanwhile)
    with pytest.raises(LeaseLostError, match="run the command again"):
        sweep_uploads(tmp_path / "g", progress=False)
    assert _keys(client, prefix) == [key]


def test_sweep_of_a_gallery_whose_store_is_in_its_folder_sweeps_its_uploads_folder(tmp_path, capsys):
    """A store in the folder: the API keeps its uploads as files of uploads/ (written before the commit too, so a
    crash leaves orphans there as well); the sweep says it sweeps that folder alone, by the files' age."""
    from index.gallery import Gallery

    g = Gallery.create(tmp_path / "g", _TINY)
    uploads = g.layout.uploads
    uploads.mkdir(parents=True)
    files = {name: uploads / f"{hashlib.sha256(name.encode()).hexdigest()}.jpg" for name in ("used", "orphan", "young")}
    for name, path in files.items():
        path.write_bytes(name.encode())
    past = time.time() - 2 * DAY
    for name in ("used", "orphan"):
        os.utime(files[name], (past, past))
    _rows(g, [str(files["used"])])

    code, out, err = _run(capsys, "index", "sweep-uploads", "--index", tmp_path / "g", "--dry-run")
    assert code == 0, err
    assert "keeps its store in its folder: its uploads are files of" in out, out
    assert f"would remove {files['orphan']} (6 bytes" in out and "kept 1 in use and 1 unused younger than 1d" in out, out
    assert all(p.exists() for p in files.values())
    code, out, err = _run(capsys, "index", "sweep-uploads", "--index", tmp_path / "g", "--older-than", "1d")
    assert code == 0 and "removed 1 unused upload (6 bytes)" in out, out
    assert not files["orphan"].exists() and files["used"].exists() and files["young"].exists()


def test_a_folder_reached_by_another_path_keeps_the_uploads_its_rows_name(tmp_path, capsys):
    """The rows name their uploads by the path their writer used; the same folder reached by another one (moved,
    another mount, a container's bind mount) still has them in use: an upload is named by its file name (its
    digest) in an uploads/ folder, not only when the row's path is the same file (the old sweep removed them all)."""
    import shutil

    from index.gallery import Gallery

    g = Gallery.create(tmp_path / "srv" / "g", _TINY)
    g.layout.uploads.mkdir(parents=True)
    used, orphan = (g.layout.uploads / f"{hashlib.sha256(b).hexdigest()}.jpg" for b in (b"used", b"orphan"))
    for f in (used, orphan):
        f.write_bytes(f.name.encode())
        os.utime(f, (time.time() - 2 * DAY,) * 2)
    _rows(g, [str(used)])
    (tmp_path / "mnt").mkdir()
    shutil.move(tmp_path / "srv" / "g", tmp_path / "mnt" / "g")  # the rows still name srv/g/uploads/<digest>.jpg

    code, out, err = _run(capsys, "index", "sweep-uploads", "--index", tmp_path / "mnt" / "g", "-q")
    assert code == 0, err
    assert "removed 1 unused upload (" in out and "kept 1 in use and 0 unused younger than 1d" in out, out
    moved = tmp_path / "mnt" / "g" / "uploads"
    assert (moved / used.name).exists() and not (moved / orphan.name).exists()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_the_sweep_counts_the_uploads_in_use_of_every_age_and_leaves_files_not_named_as_uploads(tmp_path, capsys):
    """Every upload is checked against the rows, the young ones too: the summary says how many are in use, how many
    are unused but too young, and removes the unused old ones (the old sweep said 'kept 1 in use and 4 younger' of
    4 in use). Only the names the API writes are uploads (<sha256><ext>, and the temporary file of one a killed
    write left): a stray notes.txt, an upper-case digest, a digest without an extension stay, named in one line."""
    import uuid

    from index.gallery import Gallery

    g = Gallery.create(tmp_path / "g", _TINY)
    g.layout.uploads.mkdir(parents=True)

    def keep(name: str, data: bytes, age_s: float):
        path = g.layout.uploads / name
        path.write_bytes(data)
        os.utime(path, (time.time() - age_s,) * 2)
        return path

    young_used = [keep(f"{_digest(b)}.jpg", b, 60.0) for b in (b"young 1", b"young 2", b"young 3")]
    old_used = keep(f"{_digest(b'old used')}.png", b"old used", 2 * DAY)
    young_unused = keep(f"{_digest(b'young unused')}.jpg", b"young unused", 60.0)
    old_unused = keep(f"{_digest(b'old unused')}.jpg", b"old unused", 2 * DAY)  # 10 bytes
    killed = keep(f".{_digest(b'killed')}.jpg.{uuid.uuid4().hex}.tmp.jpg", b"half", 2 * DAY)  # 4 bytes
    strays = [keep("notes.txt", b"notes", 2 * DAY), keep(f"{_digest(b'x').upper()}.jpg", b"x", 2 * DAY),
              keep(_digest(b"y"), b"y", 2 * DAY)]
    _rows(g, [str(p) for p in [*young_used, old_used]])

    code, out, err = _run(capsys, "index", "sweep-uploads", "--index", tmp_path / "g", "--dry-run", "-q")
    assert code == 0, err
    assert "would remove 2 unused uploads (14 bytes)" in out, out
    assert "kept 4 in use and 1 unused younger than 1d" in out, out
    assert f"would remove {old_unused} (" in out and f"would remove {killed} (" in out, out
    line = next(x for x in out.splitlines() if x.startswith("left "))
    assert line.startswith("left 3 files that are not uploads (an upload is named <sha256><ext>): "), out
    assert all(str(p) in line for p in strays), line
    code, out, err = _run(capsys, "index", "sweep-uploads", "--index", tmp_path / "g", "-q")
    assert code == 0 and "removed 2 unused uploads (14 bytes)" in out, (out, err)
    assert not old_unused.exists() and not killed.exists()
    assert all(p.exists() for p in [*young_used, old_used, young_unused, *strays])
    # a young upload's count does not need the old ones: all young, they are still checked and counted
    code, out, _ = _run(capsys, "index", "sweep-uploads", "--index", tmp_path / "g", "--older-than", "1w", "-q")
    assert code == 0 and "kept 4 in use and 1 unused younger than 7d" in out, out


def test_on_s3_only_keys_named_as_uploads_are_swept_and_the_young_ones_in_use_are_counted(client, tmp_path,
                                                                                          monkeypatch, capsys):
    """On S3 alike: a key under _speciesid/uploads/ that is not <sha256><ext> (a stray notes.txt, a key in a deeper
    folder) is left and named, however old; a young upload a row uses counts as in use."""
    import index.objects
    from index.gallery import Gallery

    prefix = f"sweep-names-{tmp_path.name}"
    g = Gallery.create(tmp_path / "g", _TINY, store=f"s3://{BUCKET}/{prefix}")
    used, used_key, _ = _put(g, b"used, young")
    orphan, orphan_key, orphan_size = _put(g, b"an old orphan")
    base = f"{prefix}/_speciesid/uploads"
    strays = [f"{base}/notes.txt", f"{base}/sub/{_digest(b'deeper')}.jpg"]
    for key in strays:
        client.put_object(Bucket=BUCKET, Key=key, Body=b"not an upload")
    _rows(g, [used])
    ages = {key: 2 * DAY for key in [orphan_key, *strays]}
    real = index.objects.s3_client
    monkeypatch.setattr(index.objects, "s3_client", lambda options, **kw: _Aged(real(options, **kw), ages))

    code, out, err = _run(capsys, "index", "sweep-uploads", "--index", tmp_path / "g", "--dry-run", "-q")
    assert code == 0, err
    assert f"would remove 1 unused upload ({orphan_size} bytes)" in out, out
    assert "kept 1 in use and 0 unused younger than 1d" in out, out
    line = next(x for x in out.splitlines() if x.startswith("left "))
    assert line.startswith("left 2 objects that are not uploads (an upload is named <sha256><ext>): "), out
    assert all(f"s3://{BUCKET}/{key}" in line for key in strays), line
    code, out, err = _run(capsys, "index", "sweep-uploads", "--index", tmp_path / "g", "-q")
    assert code == 0 and f"removed {orphan} (" in out, (out, err)
    assert _keys(client, prefix) == sorted([used_key, *strays])


def test_upload_names_are_the_apis_own():
    """<sha256><ext> in lower-case hex, and atomic_write's temporary file of one; nothing else."""
    from index.objects import is_upload_name

    d = _digest(b"photo")
    for name in (f"{d}.jpg", f"{d}.img", f".{d}.jpg.{'a' * 32}.tmp.jpg"):
        assert is_upload_name(name), name
    for name in ("notes.txt", d, f"{d.upper()}.jpg", f"{d[:-1]}.jpg", f"{d}.jpg.bak", f"sub/{d}.jpg", f".{d}.jpg",
                 f"{d}.jpg.{'a' * 32}.tmp"):
        assert not is_upload_name(name), name


def test_a_row_naming_an_uploads_file_name_elsewhere_counts_only_when_it_is_the_same_file_or_cannot_be_compared(
        tmp_path):
    """Outside an uploads/ folder the name alone is not proof: the same file (samefile) is in use, another file of
    that name is not, and one that cannot be compared (gone) counts as in use: an error never makes it unused."""
    from index.objects import _names_upload

    upload = tmp_path / "g" / "uploads" / "d.jpg"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"x")
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "d.jpg").symlink_to(upload)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "d.jpg").write_bytes(b"x")
    for row, used in ((tmp_path / "elsewhere" / "uploads" / "d.jpg", True), (tmp_path / "link" / "d.jpg", True),
                      (tmp_path / "other" / "d.jpg", False), (tmp_path / "gone" / "d.jpg", True)):
        assert _names_upload({"d.jpg": [row]}, str(upload)) is used, row
    assert not _names_upload({}, str(upload))


class _Deletes:
    """A boto3 client that records each DeleteObjects request (its keys, whether the lease was checked just before
    it) and has the store refuse the keys in ``refuse`` in the request's reply, deleting the others."""

    def __init__(self, client, events: list, refuse: set[str]) -> None:
        self._client, self.events, self.refuse = client, events, refuse

    def __getattr__(self, name: str):
        return getattr(self._client, name)

    def delete_object(self, **kw):
        raise AssertionError(f"one DeleteObject request for {kw['Key']}: the sweep deletes in batches")

    def delete_objects(self, *, Bucket, Delete):  # noqa: N803 - boto3's names
        keys = [o["Key"] for o in Delete["Objects"]]
        self.events.append(("delete", keys))
        kept = [{"Key": k} for k in keys if k not in self.refuse]
        reply = self._client.delete_objects(Bucket=Bucket, Delete={**Delete, "Objects": kept})
        errors = [{"Key": k, "Code": "AccessDenied", "Message": "Access Denied"} for k in keys if k in self.refuse]
        return {**reply, "Errors": list(reply.get("Errors") or ()) + errors}


def test_the_sweep_deletes_in_batches_one_lease_check_each_and_reports_the_keys_a_reply_refused(
        client, tmp_path, monkeypatch, capsys):
    """Orphans go DELETE_BATCH at a time (one DeleteObjects request, no DeleteObject per key), the lease checked
    before each batch; a key the reply refuses is reported (stderr, exit 1, saying what to do) and stays, the others
    of its batch go."""
    import index.objects
    from index.gallery import Gallery
    from index.locks import WriteLock

    prefix = f"batches-{tmp_path.name}"
    g = Gallery.create(tmp_path / "g", _TINY, store=f"s3://{BUCKET}/{prefix}")
    puts = [_put(g, f"orphan {i}".encode()) for i in range(5)]
    used, used_key, _ = _put(g, b"used")
    _rows(g, [used])
    refused_uri, refused_key, _ = puts[3]
    events: list = []
    real = index.objects.s3_client
    monkeypatch.setattr(index.objects, "s3_client", lambda options, **kw: _Deletes(
        _Aged(real(options, **kw), {k: 2 * DAY for _, k, _ in [*puts, (used, used_key, 0)]}), events, {refused_key}))
    monkeypatch.setattr(index.objects, "DELETE_BATCH", 2)
    check = WriteLock.check
    monkeypatch.setattr(WriteLock, "check", lambda self: events.append(
        ("check", self.held_lease is not None)) or check(self))

    code, out, err = _run(capsys, "index", "sweep-uploads", "--index", tmp_path / "g", "-q")
    assert code == 1, (out, err)
    deletes = [i for i, e in enumerate(events) if e[0] == "delete"]
    assert [len(events[i][1]) for i in deletes] == [2, 2, 1]  # 5 orphans, 2 a request
    assert all(events[i - 1] == ("check", True) for i in deletes), events  # the lease checked before each batch
    assert sorted(k for i in deletes for k in events[i][1]) == sorted(k for _, k, _ in puts)
    assert "removed 4 unused uploads (" in out and "kept 1 in use" in out, out
    assert f"speciesid: could not remove {refused_uri}: deleting {refused_uri} was refused (AccessDenied: " in err
    assert f"the credentials need s3:DeleteObject on s3://{BUCKET}/{prefix}/_speciesid/*" in err, err
    assert "speciesid: error: 1 unused upload not removed (above); they stay, harmless: fix what the lines above " \
        f"say, then run 'speciesid index sweep-uploads --index {tmp_path / 'g'}' again" in err, err
    assert _keys(client, prefix) == sorted([refused_key, used_key])


def test_a_refused_listing_names_its_permission_once_on_the_bucket():
    """ListBucket is granted on the bucket, not on keys: the refusal says so once (it said 's3:ListBucket on s3://b
    on s3://b/store/_speciesid/*')."""
    from botocore.exceptions import ClientError

    from index.objects import StoreObjectError, StoreObjects

    class Refusing:
        def get_paginator(self, op):
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "denied"}}, "ListObjectsV2")

    with pytest.raises(StoreObjectError) as refused:
        list(StoreObjects("s3a://b/store/", client=Refusing()).listing("s3://b/store/_speciesid/uploads"))
    said = str(refused.value)
    assert said.startswith("listing the objects under s3://b/store/_speciesid/uploads/ was refused (AccessDenied: ")
    assert said.endswith("the credentials need s3:ListBucket on the bucket b"), said
    assert said.count("ListBucket") == 1 and not refused.value.transient


def test_sweep_uploads_has_help_and_refuses_an_age_it_cannot_read(capsys):
    from api.cli import main

    with pytest.raises(SystemExit) as done:
        main(["index", "sweep-uploads", "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "--older-than AGE" in out and "--dry-run" in out and "default 1d" in out, out
    with pytest.raises(SystemExit) as done:
        main(["index", "sweep-uploads", "--index", "g", "--older-than", "soon"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "'soon' is not an age: give a number of seconds, or one with a unit" in err, err


def test_an_uploads_delete_after_a_lost_lease_leaves_it_for_the_sweep(client, tmp_path, monkeypatch, caplog):
    """The delete of an upload after its last reference went: when the lease was lost meanwhile (another machine
    took it over, and may have committed a row using the same object), the object is not deleted; the warning says
    the sweep removes it once unused."""
    import json

    from index.gallery import Gallery
    from index.locks import write_lock
    from index.store import ReferenceStore
    from retrieval.workflows import delete_references

    prefix = f"lost-{tmp_path.name}"
    g = Gallery.create(tmp_path / "g", _TINY, store=f"s3://{BUCKET}/{prefix}")
    uri, key, _ = _put(g, b"the last reference's photo")
    (ref,) = _rows(g, [uri])
    real = ReferenceStore.uses_source

    def taken_over_meanwhile(self, text: str) -> bool:  # another machine takes the lease over during the read
        lease = write_lock(g.layout.write_lock).held_lease
        if lease is not None:
            client.put_object(Bucket=BUCKET, Key=lease.key, Body=json.dumps({"host": "other", "pid": 1}).encode())
            lease._renewed = -1e9  # due for a renewal: the next check renews, and finds it taken
        return real(self, text)

    monkeypatch.setattr(ReferenceStore, "uses_source", taken_over_meanwhile)
    with caplog.at_level(logging.WARNING, logger="retrieval.workflows"):
        assert delete_references(g, [ref]) == [ref]
    assert _keys(client, prefix) == [key]  # not deleted: the sweep removes it once it is unused and old
    assert "did not remove" in caplog.text and "lost the store's lease" in caplog.text, caplog.text
    assert f"speciesid index sweep-uploads --index {g.root}" in caplog.text


def test_one_spelling_of_a_stores_uris_gives_one_upload_identity(client, tmp_path):
    """s3a:// and s3://, with or without trailing slashes, name one store: the same upload URIs; a row written
    through the s3a:// name has its object removed with it by a machine naming the store s3://."""
    from index.gallery import Gallery
    from index.objects import StoreObjects, probe_uri, upload_uri, uploads_uri
    from retrieval.workflows import delete_references

    for store in ("s3a://b/p", "s3a://b/p/", "s3://b/p//", "s3://b/p"):
        assert StoreObjects(store).uri == "s3://b/p"
        assert upload_uri(store, "x.jpg") == "s3://b/p/_speciesid/uploads/x.jpg"
        assert uploads_uri(store) == "s3://b/p/_speciesid/uploads"
        assert probe_uri(store, "probe.json") == "s3://b/p/_speciesid/probe/probe.json"
    prefix = f"spelled-{tmp_path.name}"
    g = Gallery.create(tmp_path / "g", _TINY, store=f"s3://{BUCKET}/{prefix}")
    uri, _, _ = _put(g, b"added on a machine naming the store s3a://")
    (ref,) = _rows(g, [uri.replace("s3://", "s3a://", 1)])
    assert delete_references(g, [ref]) == [ref]
    assert _keys(client, prefix) == []  # its object went with its last reference


def _ssl_error():
    from botocore.exceptions import SSLError

    return SSLError(endpoint_url="https://s3.example/b/g", error="CERTIFICATE_VERIFY_FAILED")


def _cut_read():
    from botocore.exceptions import IncompleteReadError

    return IncompleteReadError(actual_bytes=10, expected_bytes=100)


def _cut_stream():
    from botocore.exceptions import ResponseStreamingError

    return ResponseStreamingError(error="Connection broken: IncompleteRead(10 bytes read, 90 more expected)")


class _CutBody:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def read(self) -> bytes:
        raise self.exc


class _Failing:
    """A client whose GET answers a body whose read fails with ``exc`` (or whose request fails with it, for a TLS
    error: no connection)."""

    def __init__(self, exc: Exception, *, at_read: bool) -> None:
        self.exc, self.at_read = exc, at_read

    def get_object(self, **_):
        if not self.at_read:
            raise self.exc
        return {"Body": _CutBody(self.exc), "ETag": '"1"'}


@pytest.mark.parametrize(("make", "transient", "said"), [
    (_ssl_error, False, "failed: no TLS connection to https://s3.example (SSLError: "),
    (_cut_read, True, "was cut off while the store's S3 endpoint answered (IncompleteReadError: "),
    (_cut_stream, True, "was cut off while the store's S3 endpoint answered (ResponseStreamingError: "),
], ids=["ssl", "cut-read", "cut-stream"])
def test_a_tls_failure_and_a_cut_read_are_read_alike_by_the_lease_and_the_stores_objects(make, transient, said):
    """One reading of botocore's errors: a TLS failure is not transient (a certificate to fix) and a reply cut off
    while read is (the objects called a TLS failure a passing network error; the lease let a cut read through
    raw, the objects called it a lasting failure). Both paths: the same words, the same ``transient``, the same
    answer of the API (503 with Retry-After, or 500)."""
    from api.routers._edge import lease_answer
    from index.lease import LeaseStoreError
    from index.objects import StoreObjectError, StoreObjects

    at_read = make is not _ssl_error
    objects = StoreObjects("s3://b/g", client=_Failing(make(), at_read=at_read))
    with pytest.raises(StoreObjectError) as by_objects:
        objects.get("s3://b/g/_speciesid/uploads/x.jpg")
    fake = FakeS3()
    fake.fail.append(("get", make()))
    with pytest.raises(LeaseStoreError) as by_lease:
        _fake_lease(fake).acquire(timeout=0)
    for caught, what in ((by_objects, "reading s3://b/g/_speciesid/uploads/x.jpg"),
                         (by_lease, "the write lease s3://b/g/_speciesid/write.lock: reading who holds it (a GET)")):
        assert str(caught.value).startswith(f"{what} {said}"), str(caught.value)
        assert caught.value.transient is transient
        assert lease_answer(caught.value).status_code == (503 if transient else 500)
    if make is _ssl_error:
        assert "AWS_CA_BUNDLE" in str(by_objects.value) and "AWS_CA_BUNDLE" in str(by_lease.value)
    else:
        assert "check the network between this machine and the store" in str(by_objects.value)


def test_a_refusal_and_no_answer_keep_their_words_on_both_paths():
    """The shared reading keeps what each path said: a refused GET may be a missing key (ListBucket), the network
    error names the endpoint; both transient as before."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    from index.lease import s3_failure

    down = s3_failure(EndpointConnectionError(endpoint_url="http://s3.example:9000/b"), "reading x", needs="n")
    assert down is not None and down.transient
    assert down.message.startswith("reading x got no answer from http://s3.example:9000 (EndpointConnectionError")
    assert s3_failure(RuntimeError("a bug"), "reading x", needs="n") is None
    refused = ClientError({"Error": {"Code": "AccessDenied", "Message": "no"},
                           "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject")
    got = s3_failure(refused, "reading x", needs="s3:GetObject on s3://b/p/*", lookup="s3://b/p/k")
    assert got is not None and not got.transient
    assert "grant s3:ListBucket on the bucket b" in got.message and "s3://b/p/k may simply be missing" in got.message
    assert got.message.endswith("or, if it is there, the credentials need s3:GetObject on s3://b/p/*"), got.message


def test_a_store_that_refuses_delete_objects_as_such_has_the_objects_deleted_one_by_one():
    """Some S3-compatible servers refuse DeleteObjects without the Content-MD5 newer boto3 no longer sends: the sweep
    then deletes key by key (one refused key reported, the others deleted), not nothing at all."""
    from botocore.exceptions import ClientError

    from index.objects import StoreObjects

    class Client:
        def __init__(self) -> None:
            self.deleted: list[str] = []

        def delete_objects(self, **kw):
            raise ClientError({"Error": {"Code": "MissingContentMD5", "Message": "Missing required header"}},
                              "DeleteObjects")

        def delete_object(self, Bucket: str, Key: str) -> None:  # noqa: N803 - boto3's names
            if Key.endswith("locked.jpg"):
                raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "DeleteObject")
            self.deleted.append(Key)

    client = Client()
    objects = StoreObjects("s3://b/store", client=client)
    uris = [f"s3://b/store/_speciesid/uploads/{name}" for name in ("a.jpg", "locked.jpg", "c.jpg")]
    failed = objects.delete_many(uris)
    assert client.deleted == ["store/_speciesid/uploads/a.jpg", "store/_speciesid/uploads/c.jpg"]
    assert list(failed) == [uris[1]] and "s3:DeleteObject" in failed[uris[1]], failed


def test_one_by_one_deletes_stop_at_a_failure_that_may_pass_check_the_lease_and_skip_the_refused_request(
        monkeypatch):
    """Re-read: the one-by-one fallback went on through 1,000 keys failing to connect (each after its timeouts,
    under the lease), checked the lease once per 1,000 and asked DeleteObjects again at every batch."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    import index.objects
    from index.objects import StoreObjectError, StoreObjects

    class Client:
        def __init__(self) -> None:
            self.batches = self.singles = 0
            self.down = False

        def delete_objects(self, **kw):
            self.batches += 1
            raise ClientError({"Error": {"Code": "MissingContentMD5", "Message": "Missing header"}}, "DeleteObjects")

        def delete_object(self, Bucket: str, Key: str) -> None:  # noqa: N803 - boto3's names
            self.singles += 1
            if self.down:
                raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")

    monkeypatch.setattr(index.objects, "EACH_CHECK", 3)
    client, checks = Client(), []
    objects = StoreObjects("s3://b/store", client=client)
    uris = [f"s3://b/store/_speciesid/uploads/{i:064x}.jpg" for i in range(7)]
    assert objects.delete_many(uris, check=lambda: checks.append(1)) == {}
    assert client.singles == 7 and len(checks) == 2  # before the 4th and the 7th
    assert objects.delete_many(uris[:2]) == {} and client.batches == 1  # refused once: not asked again
    client.down, client.singles = True, 0
    with pytest.raises(StoreObjectError) as stopped:
        objects.delete_many(uris)
    assert stopped.value.transient and client.singles == 1  # stopped at the first: the rest would fail alike


def _aged(monkeypatch, root, puts):
    """The gallery at ``root`` opened again, its listings dating the uploads ``puts`` (from :func:`_put`) two days
    back."""
    import index.objects
    from index.gallery import Gallery

    real = index.objects.s3_client
    monkeypatch.setattr(index.objects, "s3_client", lambda options, **kw: _Aged(real(options, **kw),
                                                                                 {k: 2 * DAY for _, k, _ in puts}))
    return Gallery.open(root)


def test_a_row_committed_between_the_unlocked_read_and_the_lease_keeps_its_upload(client, tmp_path, monkeypatch):
    """The rows are read before the lease is taken; a row committed in between (another machine's add naming an
    old upload already in the store) is read again under the lease, so its upload stays; a row deleted in between
    still counts (its upload is left to a later sweep), and the true orphan goes."""
    from index.gallery import Gallery
    from index.objects import sweep_uploads

    prefix = f"sweep-between-{tmp_path.name}"
    g = Gallery.create(tmp_path / "g", _TINY, store=f"s3://{BUCKET}/{prefix}")
    late, late_key, _ = _put(g, b"named by a row committed while the sweep read")
    gone, gone_key, _ = _put(g, b"its row deleted while the sweep read")
    orphan, orphan_key, _ = _put(g, b"an orphan")
    deleted = _rows(g, [gone])
    g = _aged(monkeypatch, tmp_path / "g", [(late, late_key, 0), (gone, gone_key, 0), (orphan, orphan_key, 0)])
    writing, injected = Gallery.writing, []

    def meanwhile(self, **kw):  # right before the sweep takes the lease: after its unlocked read
        if not injected:
            injected.extend(_rows(self, [late]))
            self.delete(deleted)
        return writing(self, **kw)

    monkeypatch.setattr(Gallery, "writing", meanwhile)
    report = sweep_uploads(g)
    assert injected  # the row was committed between the read and the lease
    assert [o.uri for o in report.orphans] == [orphan] and report.referenced == 2, report
    assert _keys(client, prefix) == sorted([late_key, gone_key])


def test_the_sweep_reads_every_row_outside_the_lease_and_only_new_rows_under_it(client, tmp_path, monkeypatch):
    """The read of every row's source path is made holding nothing; under the lease the store is read again only
    when its version moved, and then the new rows alone (by id)."""
    from index.gallery import Gallery
    from index.locks import write_lock
    from index.objects import sweep_uploads
    from index.store import ReferenceStore

    prefix = f"sweep-spy-{tmp_path.name}"
    g = Gallery.create(tmp_path / "g", _TINY, store=f"s3://{BUCKET}/{prefix}")
    used, used_key, _ = _put(g, b"used")
    orphan, orphan_key, _ = _put(g, b"an orphan")
    _rows(g, [used, "/photos/a.jpg", "/photos/b.jpg"])
    g = _aged(monkeypatch, tmp_path / "g", [(used, used_key, 0), (orphan, orphan_key, 0)])
    reads: list[tuple[str, bool]] = []
    metadata, ids, paths = ReferenceStore.metadata, ReferenceStore.ids, ReferenceStore.source_paths

    def held() -> bool:
        return write_lock(g.layout.write_lock).held_lease is not None

    def metadata_spy(self, which=None, **kw):
        reads.append(("every row" if which is None else f"{len(which)} row(s)", held()))
        return metadata(self, which, **kw)

    def paths_spy(self):
        reads.append(("every row", held()))  # two columns of every row
        return paths(self)

    def ids_spy(self, **kw):
        reads.append(("ids", held()))
        return ids(self, **kw)

    monkeypatch.setattr(ReferenceStore, "metadata", metadata_spy)
    monkeypatch.setattr(ReferenceStore, "ids", ids_spy)
    monkeypatch.setattr(ReferenceStore, "source_paths", paths_spy)
    report = sweep_uploads(g)
    assert [o.uri for o in report.orphans] == [orphan] and report.referenced == 1
    assert reads == [("every row", False)]  # nothing committed meanwhile: nothing read under the lease

    reads.clear()
    late, late_key, _ = _put(g, b"late")
    g = _aged(monkeypatch, tmp_path / "g", [(used, used_key, 0), (late, late_key, 0)])
    writing, lease = Gallery.writing, ("the lease taken", False)
    monkeypatch.setattr(Gallery, "writing", lambda self, **kw: (_rows(self, [late]), reads.append(lease),
                                                                writing(self, **kw))[-1])
    report = sweep_uploads(g)
    assert report.orphans == [] and report.referenced == 2  # the row committed meanwhile keeps its upload
    assert reads[0] == ("every row", False), reads
    assert reads[reads.index(lease) + 1:] == [("ids", True), ("1 row(s)", True)]  # the id column, the new row


def test_the_sweeps_removals_move_a_bar_of_their_count(tmp_path):
    """``removing`` is given how many orphans go and is updated as they go (the CLI's bar)."""
    from index.gallery import Gallery
    from index.objects import sweep_uploads

    g = Gallery.create(tmp_path / "g", _TINY)
    g.layout.uploads.mkdir(parents=True)
    past = time.time() - 2 * DAY
    for i in range(3):
        path = g.layout.uploads / f"{hashlib.sha256(str(i).encode()).hexdigest()}.jpg"
        path.write_bytes(b"orphan")
        os.utime(path, (past, past))
    bars: list[list[int]] = []

    class Bar:
        def __init__(self, total: int) -> None:
            bars.append([total])

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            bars[-1].append(-1)  # closed

        def update(self, n: int) -> None:
            bars[-1].append(n)

    report = sweep_uploads(g, removing=Bar)
    assert len(report.orphans) == 3
    assert bars == [[3, 1, 1, 1, -1]]


def test_the_sweep_reads_two_columns_of_the_rows_not_every_metadata_column(tmp_path, monkeypatch):
    """``_rows_read`` (the sweep's read of what the rows name) reads the id and source path columns only, never
    :meth:`index.store.ReferenceStore.metadata` (every column of every row); excluded rows count too."""
    from index import objects
    from index.gallery import Gallery
    from index.store import ReferenceStore

    g = Gallery.create(tmp_path / "g", _TINY)
    ids = _rows(g, [f"/up/{i}.jpg" for i in range(5)])
    g.set_excluded(ids[:1])
    monkeypatch.setattr(ReferenceStore, "metadata", lambda *a, **k: pytest.fail("the whole metadata was read"))
    read = objects._rows_read(g.store)
    assert read.ids.tolist() == sorted(ids) and sorted(read.texts) == [f"/up/{i}.jpg" for i in range(5)]
    assert read.version == g.store.version


def test_an_uploads_delete_keeps_it_when_a_servers_look_at_the_store_did_not_answer(client, tmp_path, monkeypatch,
                                                                                   caplog):
    """Re-read 4 #2: a server's forced refresh waits at most STORE_CHECK_WAIT_S for its look and then returns without
    the store re-read, so the "is it used" check could miss another machine's commit naming the object and delete
    it. Now a look not answered keeps the object (said at INFO), for the sweep."""
    from index.gallery import Gallery
    from retrieval.workflows import delete_references

    prefix = f"late-{tmp_path.name}"
    g = Gallery.create(tmp_path / "g", _TINY, store=f"s3://{BUCKET}/{prefix}")
    uri, key, _ = _put(g, b"a photo another machine may use")
    (ref,) = _rows(g, [uri])
    g.stale_reads = True

    def late(self, *, force: bool = False, wait: float | None = None) -> bool:  # what _overdue leaves
        self._went_stale("has not answered within 2 s")
        return False

    monkeypatch.setattr(Gallery, "refresh", late)
    with caplog.at_level(logging.INFO, logger="retrieval.workflows"):
        assert delete_references(g, [ref]) == [ref]
    assert _keys(client, prefix) == [key]  # kept: the sweep removes it once unused and old
    assert f"did not remove {uri} now: the store did not answer in time" in caplog.text, caplog.text
    assert f"speciesid index sweep-uploads --index {g.root}" in caplog.text
