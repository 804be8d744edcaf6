"""Photos added through the HTTP API to a gallery whose store is on S3 (moto's server on 127.0.0.1) are kept in the
store (``<store>/_speciesid/uploads/<sha256><ext>``): a second machine (another gallery folder on the same store)
shows them, a duplicate leaves no object behind, and the delete of the last reference removes it, from any machine.
A gallery in its folder keeps its ``uploads/`` folder as before (tests/test_api.py)."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from pathlib import Path

import pytest
from _api_support import API_KEY, SPECIES, binomial, photos
from conftest import MOBILENET_SPEC, needs_shared, s3_keys
from test_object_store import BUCKET, s3_endpoint, s3_env  # noqa: F401 - the fixtures, reused

KEYS = {"X-API-Key": API_KEY}
#: Build photos (paths on each machine) of the gallery; the API adds photos of another species.
BUILT = SPECIES[:2]
ADDED = SPECIES[2]


def _files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


@contextlib.contextmanager
def _server(index: Path):
    """A TestClient of the API on the gallery folder ``index`` (one machine)."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import Settings

    app = create_app(Settings(index=str(index), api_keys=API_KEY, precision="fp32", refresh_s=0.0))
    with TestClient(app) as client:
        yield client


def _upload_keys(client, prefix: str) -> list[str]:
    return s3_keys(client, BUCKET, f"{prefix}/_speciesid/uploads/")


@pytest.fixture
def two_machines(request, tmp_path):
    """A small MobileNet gallery on an S3 store, built in folder ``a`` and copied to folder ``b`` (a second machine):
    (folder a, folder b, the store's prefix in the bucket, the boto3 client)."""
    needs_shared()
    from retrieval.encoders import EncoderConfig
    from retrieval.workflows import build_gallery

    _, client = request.getfixturevalue("s3_env")  # test_object_store's moto server and AWS_* environment
    root = tmp_path / "photos"
    for folder in BUILT:
        (root / folder).mkdir(parents=True)
        for p in photos("train", folder, 3):
            (root / folder / p.name).symlink_to(p)
    prefix = f"up-{tmp_path.name}"
    build_gallery(tmp_path / "a", "folder", root, encoder=EncoderConfig(spec=MOBILENET_SPEC, precision="fp32"),
                  store=f"s3://{BUCKET}/{prefix}", progress=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b", symlinks=True)
    return tmp_path / "a", tmp_path / "b", prefix, client


def test_an_upload_on_one_machine_is_shown_by_another_and_its_delete_removes_it_from_the_store(two_machines):
    a, b, prefix, client = two_machines
    new = photos("train", ADDED, 2)
    with _server(a) as on_a, _server(b) as on_b:
        added = on_a.post(f"/v1/species/{binomial(ADDED)}/references", files=_files(new), headers=KEYS)
        assert added.status_code == 201, added.text[:300]
        ids = added.json()["ids"]
        assert len(ids) == 2
        digests = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in new)
        keys = _upload_keys(client, prefix)
        assert keys == [f"{prefix}/_speciesid/uploads/{d}.jpg" for d in digests]
        stored = on_a.app.state.service.gallery.source_path(ids[0])
        assert stored.startswith(f"s3://{BUCKET}/{prefix}/_speciesid/uploads/"), stored
        assert not (a / "uploads").exists() or not any((a / "uploads").iterdir())  # nothing kept in the folder
        from index.gallery import Gallery

        assert Gallery.open(b).read_photo(stored) == new[0].read_bytes()  # what clean and evidence read too
        for ref in ids:  # machine b shows the photos machine a received: no copy of any folder
            shown = on_b.get(f"/v1/references/{ref}/image")
            assert shown.status_code == 200 and shown.headers["content-type"] == "image/jpeg", shown.text[:300]
            assert shown.content[:2] == b"\xff\xd8"
        # deleted on machine b: its object goes with its last reference, for every machine
        assert on_b.delete(f"/v1/references/{ids[0]}", headers=KEYS).status_code == 204
        left = _upload_keys(client, prefix)
        assert len(left) == 1 and left[0] in keys and stored.rsplit("/", 1)[1] not in left[0]
        assert on_a.get(f"/v1/references/{ids[0]}/image").status_code == 404
        assert on_a.get(f"/v1/references/{ids[1]}/image").status_code == 200
        # the photo deleted can be added again (its object put again), and shown on the other machine
        again = on_b.post(f"/v1/species/{binomial(ADDED)}/references", files=_files(new[:1]), headers=KEYS)
        assert again.status_code == 201 and len(again.json()["ids"]) == 1, again.text[:300]
        assert _upload_keys(client, prefix) == keys
        assert on_a.get(f"/v1/references/{again.json()['ids'][0]}/image").status_code == 200


def test_a_duplicate_upload_leaves_no_object_in_the_store(two_machines):
    a, b, prefix, client = two_machines
    new = photos("train", ADDED, 1)
    built = photos("train", BUILT[0], 1)  # a build photo: stored under its path on each machine
    name = hashlib.sha256(new[0].read_bytes()).hexdigest() + ".jpg"
    with _server(a) as on_a, _server(b) as on_b:
        (ref,) = on_a.post(f"/v1/species/{binomial(ADDED)}/references", files=_files(new), headers=KEYS).json()["ids"]
        # the same bytes through machine b: a duplicate of machine a's reference, whose object stays, once
        resp = on_b.post(f"/v1/species/{binomial(ADDED)}/references", files=_files(new), headers=KEYS)
        assert resp.status_code == 200 and resp.json()["ids"] == [], resp.text[:300]
        assert [d["id"] for d in resp.json()["duplicates"]] == [ref]
        assert _upload_keys(client, prefix) == [f"{prefix}/_speciesid/uploads/{name}"]
        assert on_b.get(f"/v1/references/{ref}/image").status_code == 200
        # a build photo's bytes uploaded: stored under its path already; the object put for it is removed again
        resp = on_b.post(f"/v1/species/{binomial(BUILT[0])}/references", files=_files(built), headers=KEYS)
        assert resp.status_code == 200 and resp.json()["ids"] == [] and len(resp.json()["duplicates"]) == 1
        assert _upload_keys(client, prefix) == [f"{prefix}/_speciesid/uploads/{name}"]
    for folder in (a, b):  # nothing kept in either folder
        assert not (folder / "uploads").exists() or not any((folder / "uploads").iterdir())


def test_a_probe_trained_on_one_machine_is_used_by_another_without_a_copy(two_machines):
    from retrieval.workflows import open_identifier, train_gallery_probe

    a, b, prefix, client = two_machines
    shutil.copytree(b, b.parent / "c", symlinks=True)  # a third machine, opened after the probe is trained
    following = open_identifier(b, follow_probe=True, refresh_s=0.0)  # a server's identifier on machine b
    assert following.probe is None
    train_gallery_probe(a, progress=False)
    listed = s3_keys(client, BUCKET, f"{prefix}/_speciesid/probe/")
    weights = f"probe-{hashlib.sha256((a / 'probe.npz').read_bytes()).hexdigest()}.npz"  # named by its digest
    assert sorted(listed) == sorted([f"{prefix}/_speciesid/probe/probe.json",
                                                                    f"{prefix}/_speciesid/probe/{weights}"])
    species = sorted(binomial(f) for f in BUILT)
    assert following.refresh_probe(force=True)  # what each answer does first, at most once per refresh_s
    assert following.probe is not None and following.probe.species == species
    assert (b / "probe.json").read_bytes() == (a / "probe.json").read_bytes()
    assert not following.refresh_probe(force=True)  # the same copy: one HEAD, nothing taken again
    opened = open_identifier(b.parent / "c")  # a folder without a probe takes the store's at open
    assert opened.probe is not None and opened.probe.species == species
    # a probe.json naming weights that are not there (a publish caught between its two puts) is not taken
    store = f"s3://{BUCKET}/{prefix}/_speciesid/probe"
    from index.gallery import Gallery
    from retrieval.probe_share import WEIGHTS_ETAG, publish_probe

    objects = Gallery.open(a).objects
    before = (b / "probe.json").read_bytes()
    objects.put(f"{store}/probe.npz", (b / "probe.npz").read_bytes() + b"\0")  # not the weights the json names
    objects.put(f"{store}/probe.json", before + b"\n", metadata={WEIGHTS_ETAG: '"0"'})
    assert not following.refresh_probe(force=True)
    assert (b / "probe.json").read_bytes() == before
    from retrieval.probe import LinearProbe

    retrained = LinearProbe.load(a)
    retrained.trained_on += 1
    retrained.save(a)
    publish_probe(Gallery.open(a))  # the next publish is taken
    assert following.refresh_probe(force=True) and following.probe.trained_on == retrained.trained_on


def test_readyz_and_index_info_say_which_probe_a_machine_uses_and_whether_it_is_the_stores(two_machines, caplog):
    """An operator can tell which probe a server answers with, and whether it is the store's current copy: /readyz
    (without a request to the store) and index info (one HEAD) carry a probe block; a server logs the probe it
    loads (walkthrough s3 #5: nothing said which probe a server used)."""
    import json
    import logging

    from index.gallery import Gallery
    from retrieval.probe import LinearProbe
    from retrieval.probe_share import publish_probe
    from retrieval.workflows import gallery_info, train_gallery_probe

    a, b, prefix, client = two_machines
    with _server(b) as server:
        ready = server.get("/readyz").json()["probe"]
        assert ready["loaded"] is False and ready["shared"]["copy"] is None
        assert ready["shared"]["object"] == f"s3://{BUCKET}/{prefix}/_speciesid/probe/probe.json"
        train_gallery_probe(a, progress=False)
        meta = json.loads((a / "probe.json").read_text())
        service = server.app.state.service
        heads = []
        real = service.gallery.objects.head
        service.gallery.objects.head = lambda uri: heads.append(uri) or real(uri)
        with caplog.at_level(logging.INFO, logger="retrieval.identify"):
            assert service.identifier.refresh_probe(force=True)  # what an identify does first
        assert "probe of" in caplog.text and f"weights sha256 {meta['weights_sha256'][:12]}" in caplog.text
        assert "'probe train' trained on" in caplog.text
        looked = len(heads)
        assert looked >= 1  # the follower looked (through the patched head)
        ready = server.get("/readyz").json()["probe"]
        assert len(heads) == looked  # /readyz never asks the store
        assert ready["loaded"] is True and ready["kind"] == "trained" and ready["made_at"] == meta["made_at"]
        assert ready["weights_sha256"] == meta["weights_sha256"][:12]
        assert ready["species"] == len(meta["species"]) and ready["settings"]["C"] == meta["settings"]["C"]
        assert ready["settings"]["selected_on"] == meta["settings"]["selected_on"]
        shared = ready["shared"]
        assert shared["copy"] == json.loads((b / "probe_origin.json").read_text())["copy"]
        assert shared["store_copy"] == shared["copy"] and shared["matches"] is True and shared["looked_at"]
    info = gallery_info(b)["probe"]
    assert info["loaded"] is True and info["weights_sha256"] == meta["weights_sha256"][:12]
    assert info["shared"]["matches"] is True
    retrained = LinearProbe.load(a)
    retrained.trained_on += 1
    retrained.save(a)
    publish_probe(Gallery.open(a))  # another copy in the store, not taken into b yet
    info = gallery_info(b)["probe"]
    assert info["shared"]["matches"] is False and info["shared"]["store_copy"] != info["shared"]["copy"]
    assert info["weights_sha256"] == meta["weights_sha256"][:12]  # b's folder still holds the first


def _store_fails(*_args, **_kwargs):
    from index.objects import StoreObjectError

    raise StoreObjectError("the gallery's store is busy (SlowDown) now; try again shortly", transient=True)


def test_an_add_stores_its_uploads_from_the_bytes_it_holds_without_reading_them_back(two_machines, monkeypatch):
    """Review s3 #1: the add served its uploads from memory; a failing GET used to drop the photo (200, no id)."""
    from index.objects import StoreObjects

    a, _, prefix, client = two_machines
    new = photos("train", ADDED, 1)
    with _server(a) as on_a:
        monkeypatch.setattr(StoreObjects, "get", _store_fails)  # every read of the store fails: none is needed
        added = on_a.post(f"/v1/species/{binomial(ADDED)}/references", files=_files(new), headers=KEYS)
        assert added.status_code == 201 and len(added.json()["ids"]) == 1, added.text[:300]
        name = hashlib.sha256(new[0].read_bytes()).hexdigest() + ".jpg"
        assert _upload_keys(client, prefix) == [f"{prefix}/_speciesid/uploads/{name}"]


def test_a_store_read_failure_during_an_add_fails_it_instead_of_skipping_the_photo(two_machines, monkeypatch):
    """Review s3 #1: a photo the gallery's own store could not serve during an add is a 503 with Retry-After (the
    store failed, not the photo), never a 200 'nothing stored' that silently drops it."""
    import retrieval.workflows as workflows
    from index.objects import StoreObjects

    a, _, prefix, _ = two_machines
    new = photos("train", ADDED, 1)
    with _server(a) as on_a:
        monkeypatch.setattr(workflows, "_upload_reader", lambda gallery, uploads: gallery.read_photo)  # read back
        monkeypatch.setattr(StoreObjects, "get", _store_fails)
        added = on_a.post(f"/v1/species/{binomial(ADDED)}/references", files=_files(new), headers=KEYS)
        assert added.status_code == 503 and added.headers["Retry-After"], added.text[:300]
        assert "could not be read from the gallery's store, so this add stopped" in added.json()["detail"]
        assert binomial(ADDED) not in {s["species"] for s in on_a.get("/v1/species").json()}


def test_a_store_failure_after_the_commit_does_not_fail_a_write_that_happened(two_machines, monkeypatch, caplog):
    """Review s3 #5: the removal of an unused upload after a delete's or an add's commit is best effort (a warning
    naming the object; the write is answered as done), and a failed post-commit re-put (tried twice) is an error
    saying the rows were committed, not a plain 'retry'."""
    from index.objects import StoreObjects

    a, _, prefix, client = two_machines
    new = photos("train", ADDED, 2)
    built = photos("train", BUILT[0], 1)  # stored under its path: its upload is removed again after the commit
    with _server(a) as on_a:
        ids = on_a.post(f"/v1/species/{binomial(ADDED)}/references", files=_files(new), headers=KEYS).json()["ids"]
        keys = _upload_keys(client, prefix)
        monkeypatch.setattr(StoreObjects, "delete", _store_fails)
        with caplog.at_level("WARNING", logger="retrieval.workflows"):
            assert on_a.delete(f"/v1/references/{ids[0]}", headers=KEYS).status_code == 204
            assert on_a.get(f"/v1/references/{ids[0]}/image").status_code == 404  # gone, as answered
            resp = on_a.post(f"/v1/species/{binomial(BUILT[0])}/references", files=_files(built), headers=KEYS)
            assert resp.status_code == 200 and len(resp.json()["duplicates"]) == 1, resp.text[:300]
        assert len(_upload_keys(client, prefix)) == 3 and set(keys) < set(_upload_keys(client, prefix))  # left
        left = [r.getMessage() for r in caplog.records if "could not remove" in r.getMessage()]
        assert len(left) == 2 and all(f"/{prefix}/_speciesid/uploads/" in m for m in left), left
        heads = []
        monkeypatch.setattr(StoreObjects, "exists", lambda self, uri: heads.append(uri) or _store_fails())
        again = photos("train", ADDED, 3)[2:]
        resp = on_a.post(f"/v1/species/{binomial(ADDED)}/references", files=_files(again), headers=KEYS)
        assert resp.status_code == 503 and resp.headers["Retry-After"], resp.text[:300]
        detail = resp.json()["detail"]
        assert detail.startswith("the photos were stored (references ") and "send the same photos again" in detail
        assert len(heads) == 2  # tried once more
        stored = int(detail.split("references ")[1].split(")")[0])
        assert on_a.get(f"/v1/references/{stored}/image").status_code == 200


def test_a_thumbnail_from_the_store_says_when_to_retry_and_a_missing_object_is_worded_by_its_locator(
        two_machines, monkeypatch):
    """Review s3 #9: the thumbnail's 503 (the store could not serve the photo now) carries Retry-After; an upload
    missing from the store is a 404 saying so, not 'sync the machines' uploads folders'."""
    from index.objects import StoreObjects

    a, _, prefix, client = two_machines
    new = photos("train", ADDED, 1)
    with _server(a) as on_a:
        (ref,) = on_a.post(f"/v1/species/{binomial(ADDED)}/references", files=_files(new), headers=KEYS).json()["ids"]
        with monkeypatch.context() as patched:
            patched.setattr(StoreObjects, "get", _store_fails)
            shown = on_a.get(f"/v1/references/{ref}/image")
        assert shown.status_code == 503 and shown.headers["Retry-After"].isdigit(), shown.text[:300]
        (key,) = _upload_keys(client, prefix)
        client.delete_object(Bucket=BUCKET, Key=key)  # removed from the store behind the gallery's back
        shown = on_a.get(f"/v1/references/{ref}/image")
        assert shown.status_code == 404, shown.text[:300]
        assert "no longer in the gallery's store" in shown.json()["detail"] and "sync" not in shown.json()["detail"]


def test_probe_restore_on_a_following_machine_brings_back_the_probe_the_store_copy_replaced(two_machines):
    """Review s3 #2: the follower keeps the folder's probe as probe.prev.* before taking the store's copy, so
    'probe restore' on machine b restores the probe machine a's last publish replaced there (and shares it), not a
    stale probe b itself trained long before."""
    from index.gallery import Gallery
    from retrieval.probe import LinearProbe
    from retrieval.probe_flows import restore_gallery_probe
    from retrieval.probe_share import probe_follower, publish_probe
    from retrieval.workflows import train_gallery_probe

    a, b, _, _ = two_machines
    train_gallery_probe(b, progress=False)  # P0, trained on b long ago (and shared)
    p0 = LinearProbe.load(b).trained_on
    follower_a, follower_b = probe_follower(Gallery.open(a)), probe_follower(Gallery.open(b))
    assert follower_a.check()
    for n in (1, 2):  # a publishes P1 then P2; b's server takes each
        probe = LinearProbe.load(a)
        probe.trained_on = p0 + n
        probe.save(a)
        publish_probe(Gallery.open(a))
        assert follower_b.check() and LinearProbe.load(b).trained_on == p0 + n
    restore_gallery_probe(b)
    assert LinearProbe.load(b).trained_on == p0 + 1  # P1, the probe P2 replaced: not b's own P0
    assert follower_a.check() and LinearProbe.load(a).trained_on == p0 + 1  # shared to every machine


def test_probe_restore_saves_and_publishes_in_one_hold_and_a_failed_publish_says_to_run_probe_publish(
        two_machines, monkeypatch):
    """Review s3 #3/#4: on an S3 store the restore (as train and import) keeps, saves and publishes under one hold,
    so a server following the probe on the same folder cannot write the store's older copy between the save and
    the publish; a publish that fails says the folder has the probe but the store not yet, and 'speciesid probe
    publish' shares it."""
    import threading

    import retrieval.probe_flows as probe_flows
    from api.cli import main
    from index.gallery import Gallery
    from index.objects import StoreObjects
    from retrieval.probe import LinearProbe
    from retrieval.probe_share import probe_follower, publish_probe
    from retrieval.workflows import train_gallery_probe

    a, b, _, _ = two_machines
    train_gallery_probe(a, progress=False)  # P0
    p0 = LinearProbe.load(a).trained_on
    follower_b = probe_follower(Gallery.open(b))  # a server's, on folder b
    assert follower_b.check()

    def publish_on_a(n: int) -> None:
        probe = LinearProbe.load(a)
        probe.trained_on = p0 + n
        probe.save(a)
        publish_probe(Gallery.open(a))

    publish_on_a(1)
    assert follower_b.check() and LinearProbe.load(b).trained_on == p0 + 1  # P0 kept as b's probe.prev.*
    publish_on_a(2)  # P2 in the store; b's server has not looked yet
    real_publish, took = probe_flows.publish_probe, []

    def follower_first(gallery):  # b's server looks at the store between restore's save and its publish
        look = threading.Thread(target=lambda: took.append(follower_b.check()))
        look.start()
        look.join()
        return real_publish(gallery)

    monkeypatch.setattr(probe_flows, "publish_probe", follower_first)
    probe_flows.restore_gallery_probe(b)
    assert took == [False]  # the folder was held: P2 not written over the probe just restored
    assert LinearProbe.load(b).trained_on == p0  # restored, and shared
    follower_a = probe_follower(Gallery.open(a))
    assert follower_a.check() and LinearProbe.load(a).trained_on == p0
    monkeypatch.setattr(probe_flows, "publish_probe", real_publish)

    with monkeypatch.context() as patched:  # the store refuses the publish: the folder swapped, the store not yet
        patched.setattr(StoreObjects, "put", _store_fails)
        with pytest.raises(probe_flows.ProbeNotSharedError, match="not shared through the gallery's store yet") as err:
            probe_flows.restore_gallery_probe(b)
    assert f"speciesid probe publish --index {b}" in str(err.value) and "not this command again" in str(err.value)
    assert LinearProbe.load(b).trained_on == p0 + 1
    assert not follower_a.check()  # the store still holds P0
    assert main(["probe", "publish", "--index", str(b)]) == 0
    assert follower_a.check() and LinearProbe.load(a).trained_on == p0 + 1


def test_a_follower_does_not_take_back_its_own_folders_publish_and_an_open_waits_briefly_for_the_folder(
        two_machines, monkeypatch):
    """Review s3 #10: a follower whose 'seen' is older than the folder's probe_origin.json (a probe train on the
    same machine published since) does not take the same copy back. #16: an open of a folder without a probe waits
    AT_OPEN_WAIT_S for the folder's lock, not the write wait; the next look takes the probe."""
    import threading

    import retrieval.probe_share as probe_share
    from index.gallery import Gallery
    from retrieval.probe import LinearProbe
    from retrieval.probe_flows import save_replacing
    from retrieval.probe_share import probe_follower
    from retrieval.workflows import train_gallery_probe

    a, b, _, _ = two_machines
    shutil.copytree(b, b.parent / "c", symlinks=True)  # a third machine, without a probe
    c = b.parent / "c"
    train_gallery_probe(a, progress=False)
    following = probe_follower(Gallery.open(b))  # b's server
    assert following.check()
    probe = LinearProbe.load(b)
    probe.trained_on += 1
    save_replacing(Gallery.open(b), probe)  # 'probe train' on b: saved and published from b's folder
    before = (b / "probe.prev.json").read_bytes()
    assert not following.check()  # the folder records that copy: not taken again (nor set aside again)
    assert (b / "probe.prev.json").read_bytes() == before

    waits = []
    real_take = probe_share.ProbeFollower._take
    monkeypatch.setattr(probe_share.ProbeFollower, "_take", lambda self, wait: waits.append(wait) or real_take(
        self, wait))
    monkeypatch.setattr(probe_share, "AT_OPEN_WAIT_S", 0.0)
    holder, opened = Gallery.open(c), Gallery.open(c)
    opened.write_wait_s = 3.0  # the old code waited this long (600 s from the CLI), then looked no further
    follower_c = probe_follower(opened)
    held, done = threading.Event(), threading.Event()

    def writer() -> None:  # a writer of folder c (a rebuild) holds its lock
        with holder.writing(local=True):
            held.set()
            done.wait()

    thread = threading.Thread(target=writer)
    thread.start()
    held.wait()
    try:
        follower_c.at_open()
    finally:
        done.set()
        thread.join()
    assert waits == [0.0] and not (c / "probe.json").exists()  # answered without the probe meanwhile
    assert follower_c.check() and LinearProbe.load(c).trained_on == probe.trained_on
