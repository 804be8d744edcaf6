"""The store's shared probe laid out by digest (moto's server on 127.0.0.1; the two-folder gallery of
test_s3_uploads): the weights go under ``probe-<sha256>.npz`` and ``probe.json`` names them, so a publish whose lease
is lost between its two puts leaves the store's pair whole (a new folder still takes it); the weights objects no
``probe.json`` names are removed by the next publish or withdraw; a store an earlier version wrote (weights at
``probe.npz``) is still read."""

from __future__ import annotations

import hashlib
import logging
import shutil

import numpy as np
from conftest import s3_keys
from test_object_store import BUCKET, s3_endpoint, s3_env  # noqa: F401 - the fixtures, reused
from test_s3_uploads import two_machines  # noqa: F401 - the fixture, reused

from api.cli import main


def _probe_names(client, prefix: str) -> list[str]:
    """The names of the objects in the store's probe folder."""
    folder = f"{prefix}/_speciesid/probe/"
    return [key[len(folder):] for key in s3_keys(client, BUCKET, folder)]


def _digest_name(folder) -> str:
    return f"probe-{hashlib.sha256((folder / 'probe.npz').read_bytes()).hexdigest()}.npz"


def _save_other_weights(folder, scale: float):
    """Save the folder's probe again with other weights (another digest); the probe saved."""
    from retrieval.probe import LinearProbe

    probe = LinearProbe.load(folder)
    probe.weight = (probe.weight * np.float32(scale)).astype(np.float32)
    probe.trained_on += 1
    probe.save(folder)
    return probe


def _lose_the_lease_after_the_weights(monkeypatch, client, prefix, folder):
    """Make the next put of a weights object lose ``folder``'s lease to a rival (as after a stall past its TTL);
    the rival lease, to release."""
    from index.gallery import Gallery
    from index.lease import LEASE_DIR, LEASE_OBJECT, S3Lease
    from index.locks import write_lock
    from index.objects import StoreObjects

    rival = S3Lease(f"s3://{BUCKET}/{prefix}", Gallery.open(folder).storage_options)
    real_put = StoreObjects.put

    def put_then_lose_the_lease(self, uri, data, **kwargs):
        etag = real_put(self, uri, data, **kwargs)
        if uri.endswith(".npz"):
            client.put_object(Bucket=BUCKET, Key=f"{prefix}/{LEASE_DIR}/{LEASE_OBJECT}", Body=b'{"free": true}')
            rival.acquire(timeout=0)
            held = write_lock(folder / ".write.lock").remote
            held._renewed -= held.ttl  # its next check renews (and is refused)
            monkeypatch.setattr(StoreObjects, "put", real_put)  # once
        return etag

    monkeypatch.setattr(StoreObjects, "put", put_then_lose_the_lease)
    return rival


def test_a_publish_cut_off_between_its_puts_leaves_the_stores_probe_whole_and_the_next_publish_removes_its_weights(
        two_machines, monkeypatch, capsys):  # noqa: F811
    """The old code put the weights over the store's probe.npz: after a lease lost between the two puts, the
    store's probe.json named weights no longer there, and a new folder (or one without a probe) could take no probe
    until someone ran 'probe publish'. Now the weights go under their digest's name: the store's pair stays."""
    from retrieval.probe import LinearProbe
    from retrieval.workflows import open_identifier, train_gallery_probe

    a, b, prefix, client = two_machines
    c = b.parent / "c"
    shutil.copytree(b, c, symlinks=True)  # a machine opened after the cut-off publish, without a probe
    train_gallery_probe(a, progress=False)  # P0, shared
    p0 = LinearProbe.load(a)
    w0 = _digest_name(a)
    assert _probe_names(client, prefix) == sorted(["probe.json", w0])

    _save_other_weights(a, 2.0)  # P1, to publish
    w1 = _digest_name(a)
    rival = _lose_the_lease_after_the_weights(monkeypatch, client, prefix, a)
    try:
        assert main(["probe", "publish", "--index", str(a)]) == 2
    finally:
        rival.release()
    err = capsys.readouterr().err
    assert "probe.json was not put, so the store's probe is the one it was" in err
    assert f"Run 'speciesid probe publish --index {a}' to share the probe" in err
    assert _probe_names(client, prefix) == sorted(["probe.json", w0, w1])  # P1's weights beside P0's pair

    taken = open_identifier(c).probe  # a new folder takes the store's probe: P0, whole
    assert taken is not None and taken.weights_sha256 == p0.weights_sha256 and taken.trained_on == p0.trained_on

    p2 = _save_other_weights(a, 3.0)  # the next publish: P2; P0's weights kept (the copy it replaces), P1's removed
    w2 = _digest_name(a)
    assert main(["probe", "publish", "--index", str(a)]) == 0
    assert _probe_names(client, prefix) == sorted(["probe.json", w0, w2])
    from index.gallery import Gallery
    from retrieval.probe_share import probe_follower

    assert probe_follower(Gallery.open(c)).check()
    assert LinearProbe.load(c).weights_sha256 == p2.weights_sha256

    _save_other_weights(a, 4.0)  # and the one after keeps P2's weights only
    w3 = _digest_name(a)
    assert main(["probe", "publish", "--index", str(a)]) == 0
    assert _probe_names(client, prefix) == sorted(["probe.json", w2, w3])

    _save_other_weights(a, 5.0)  # cut off again: withdraw removes the pair and the weights no probe.json names
    rival = _lose_the_lease_after_the_weights(monkeypatch, client, prefix, a)
    try:
        assert main(["probe", "publish", "--index", str(a)]) == 2
    finally:
        rival.release()
    assert len(_probe_names(client, prefix)) == 4
    capsys.readouterr()
    assert main(["probe", "withdraw", "--index", str(a)]) == 0
    assert capsys.readouterr().out.startswith("withdrew the shared probe from the gallery's store (")
    assert _probe_names(client, prefix) == []


def test_a_store_an_earlier_version_wrote_is_read_and_its_probe_npz_goes_at_the_second_publish(
        two_machines):  # noqa: F811
    """An earlier version put the weights at probe.npz and a probe.json naming only their ETag: a folder without a
    probe still takes that pair; a publish keeps probe.npz (the copy it replaces), the publish after removes it."""
    from index.gallery import Gallery
    from retrieval.probe import LinearProbe
    from retrieval.probe_share import WEIGHTS_ETAG
    from retrieval.workflows import open_identifier, train_gallery_probe

    a, b, prefix, client = two_machines
    train_gallery_probe(a, progress=False)  # P0 (shared: its objects replaced by the old layout's below)
    p0 = LinearProbe.load(a)
    store = f"s3://{BUCKET}/{prefix}/_speciesid/probe"
    objects = Gallery.open(a).objects
    for name in _probe_names(client, prefix):
        objects.delete(f"{store}/{name}")
    etag = objects.put(f"{store}/probe.npz", (a / "probe.npz").read_bytes())  # as the earlier publish_probe did
    objects.put(f"{store}/probe.json", (a / "probe.json").read_bytes(), metadata={WEIGHTS_ETAG: etag})
    (a / "probe_origin.json").unlink()  # a's probe now records no copy: it keeps it, and b takes the store's
    assert not (b / "probe.json").exists()

    taken = open_identifier(b).probe
    assert taken is not None and taken.weights_sha256 == p0.weights_sha256

    _save_other_weights(a, 2.0)
    assert main(["probe", "publish", "--index", str(a)]) == 0
    assert _probe_names(client, prefix) == sorted(["probe.json", "probe.npz", _digest_name(a)])
    _save_other_weights(a, 3.0)
    assert main(["probe", "publish", "--index", str(a)]) == 0
    assert "probe.npz" not in _probe_names(client, prefix) and len(_probe_names(client, prefix)) == 3


def test_a_probe_json_naming_no_weights_object_is_not_taken(two_machines, caplog):  # noqa: F811
    """A probe.json whose metadata names something else than a weights object of the probe folder (a hand-made
    object, another tool's) is never followed there: not taken, a warning says to publish again."""
    from index.gallery import Gallery
    from retrieval.probe_share import WEIGHTS_ETAG, WEIGHTS_KEY, probe_follower
    from retrieval.workflows import train_gallery_probe

    a, b, prefix, client = two_machines
    train_gallery_probe(a, progress=False)
    store = f"s3://{BUCKET}/{prefix}/_speciesid/probe"
    objects = Gallery.open(a).objects
    head = objects.head(f"{store}/probe.json")
    objects.put(f"{store}/probe.json", (a / "probe.json").read_bytes(),
                metadata={WEIGHTS_ETAG: head["Metadata"][WEIGHTS_ETAG], WEIGHTS_KEY: "../uploads/x.npz"})
    with caplog.at_level(logging.WARNING, logger="retrieval.probe_share"):
        assert not probe_follower(Gallery.open(b)).check()
    assert not (b / "probe.json").exists()
    assert "names '../uploads/x.npz', not a weights object" in caplog.text and "not taken" in caplog.text


def _publish_as(a, client, prefix, meta: bytes) -> None:
    """Put ``meta`` as the store's probe.json, its metadata naming the published weights (as publish_probe does)."""
    from index.gallery import Gallery

    store = f"s3://{BUCKET}/{prefix}/_speciesid/probe"
    objects = Gallery.open(a).objects
    head = objects.head(f"{store}/probe.json")
    objects.put(f"{store}/probe.json", meta, metadata=head["Metadata"])


def _gets_of_probe_json(monkeypatch) -> list[str]:
    """The store reads of a probe.json from now on (a follower's look that takes or refuses it downloads it)."""
    from index.objects import StoreObjects

    gets: list[str] = []
    real_get = StoreObjects.get

    def counted(self, uri, **kwargs):
        if uri.endswith("/probe.json"):
            gets.append(uri)
        return real_get(self, uri, **kwargs)

    monkeypatch.setattr(StoreObjects, "get", counted)
    return gets


def test_a_shared_probe_a_newer_speciesid_published_is_not_taken_and_said_once(
        two_machines, caplog, monkeypatch):  # noqa: F811
    """Re-read w2 #11: the take's refusal of a newer probe.json (a higher format) had no test. It is not taken,
    the warning names the upgrade, and the next look neither downloads it again nor says it again."""
    import json

    from index.gallery import Gallery
    from retrieval.probe_share import probe_follower
    from retrieval.workflows import train_gallery_probe

    a, b, prefix, client = two_machines
    train_gallery_probe(a, progress=False)
    _publish_as(a, client, prefix, json.dumps({**json.loads((a / "probe.json").read_text()), "format": 2}).encode())
    gets = _gets_of_probe_json(monkeypatch)
    follower = probe_follower(Gallery.open(b))
    with caplog.at_level(logging.WARNING, logger="retrieval.probe_share"):
        assert not follower.check()
        assert not follower.check()
    assert not (b / "probe.json").exists() and len(gets) == 1
    said = "was written by a newer speciesid (format 2): upgrade speciesid"
    assert caplog.text.count(said) == 1 and "not taken" in caplog.text, caplog.text


def test_a_shared_probe_json_that_is_not_an_object_is_refused_once(two_machines, caplog, monkeypatch):  # noqa: F811
    """Re-read w2 #10: a store's probe.json holding a JSON list raised AttributeError past the take's refusal: not
    marked as seen, it was downloaded again (with its weights) at every look. Now it is refused like a probe of
    another encoder: said once, not taken, not read again."""
    from index.gallery import Gallery
    from retrieval.probe_share import probe_follower
    from retrieval.workflows import train_gallery_probe

    a, b, prefix, client = two_machines
    train_gallery_probe(a, progress=False)
    _publish_as(a, client, prefix, b"[1, 2]")
    gets = _gets_of_probe_json(monkeypatch)
    follower = probe_follower(Gallery.open(b))
    with caplog.at_level(logging.WARNING, logger="retrieval.probe_share"):
        assert not follower.check()
        assert not follower.check()
    assert not (b / "probe.json").exists() and len(gets) == 1, gets
    assert "is a JSON list, not a probe's record (an object)" in caplog.text and "not taken" in caplog.text
