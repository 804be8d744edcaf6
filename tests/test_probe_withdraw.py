"""A probe shared through an S3 store (moto's server on 127.0.0.1; the two-folder gallery of test_s3_uploads):
``speciesid probe withdraw`` removes the store's copy, the folders that took it keep it and say so; a publish whose
lease is taken over between its two puts puts no probe.json and says to run ``speciesid probe publish``; a server's
look at the store's copy runs off the request thread."""

from __future__ import annotations

import logging
import shutil
import types

import pytest
from conftest import s3_keys
from test_object_store import BUCKET, s3_endpoint, s3_env  # noqa: F401 - the fixtures, reused
from test_s3_uploads import _server, two_machines  # noqa: F401 - the fixture, reused

from api.cli import main


def _probe_keys(client, prefix: str) -> list[str]:
    return s3_keys(client, BUCKET, f"{prefix}/_speciesid/probe/")


def test_withdraw_removes_the_stores_probe_and_the_folders_that_took_it_keep_it_and_say_withdrawn(
        two_machines, capsys, caplog):  # noqa: F811
    from retrieval.probe import LinearProbe
    from retrieval.workflows import gallery_info, open_identifier, train_gallery_probe

    a, b, prefix, client = two_machines
    c = b.parent / "c"
    shutil.copytree(b, c, symlinks=True)  # a third machine, opened after the withdrawal, without a probe
    train_gallery_probe(a, progress=False)  # shared
    following = open_identifier(b, follow_probe=True, refresh_s=0.0)  # b's server took it at open
    trained_on = LinearProbe.load(a).trained_on
    assert following.probe is not None and following.probe.trained_on == trained_on
    capsys.readouterr()

    assert main(["probe", "withdraw", "--index", str(a)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("withdrew the shared probe from the gallery's store (") and "no machine takes it" in out
    assert f"'speciesid probe publish --index {a}' shares it again" in out
    assert _probe_keys(client, prefix) == []
    assert (a / "probe.json").is_file() and (a / "probe_origin.json").is_file()  # the folder keeps its probe

    with caplog.at_level(logging.INFO, logger="retrieval.probe_share"):
        assert not following.refresh_probe(force=True)
    assert following.probe is not None and following.probe.trained_on == trained_on  # kept, answering with it
    withdrawn = [r for r in caplog.records if "is not in the store any more (withdrawn)" in r.getMessage()]
    assert len(withdrawn) == 1 and withdrawn[0].levelno == logging.WARNING  # seen, then gone: the operator hears
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="retrieval.probe_share"):
        assert not following.refresh_probe(force=True)
    assert "withdrawn" not in caplog.text  # said once, not at every look
    shared = gallery_info(b)["probe"]["shared"]
    assert shared["withdrawn"] is True and shared["store_copy"] is None and shared["matches"] is None
    assert gallery_info(b)["probe"]["loaded"] is True
    with _server(b) as server:
        ready = server.get("/readyz").json()["probe"]
    assert ready["loaded"] is True and ready["shared"]["withdrawn"] is True
    assert open_identifier(c).probe is None  # no machine takes it any more

    assert main(["probe", "withdraw", "--index", str(a)]) == 0
    assert capsys.readouterr().out == f"the store of {a} holds no shared probe: nothing to withdraw\n"
    assert main(["probe", "publish", "--index", str(a)]) == 0  # shared again: taken by a folder without one
    assert open_identifier(c).probe.trained_on == trained_on
    assert gallery_info(b)["probe"]["shared"]["withdrawn"] is False


def test_withdraw_on_a_store_not_on_s3_says_there_is_nothing_shared(tmp_path):
    from retrieval.probe_share import withdraw_probe

    with pytest.raises(ValueError, match="is not on S3: its probe is not shared through the store .*nothing to "
                                         "withdraw"):
        withdraw_probe(types.SimpleNamespace(objects=None, root=tmp_path))


@pytest.mark.parametrize("command", ["publish", "restore"])
def test_a_publish_whose_lease_is_taken_between_its_two_puts_puts_no_probe_json_and_says_to_publish_again(
        command, two_machines, monkeypatch, capsys):  # noqa: F811
    """The weights are put, then the lease is taken over (this writer stalled past its TTL; another machine took
    it): the old code put probe.json anyway, under another writer's hold. Now the lease is checked between the two
    puts: probe.json is not put, and the error says what happened and to run 'speciesid probe publish' (a restore,
    which publishes as it saves, says so too, and not to run the restore again)."""
    from index.gallery import Gallery
    from index.lease import LEASE_DIR, LEASE_OBJECT, S3Lease
    from index.locks import write_lock
    from index.objects import StoreObjects
    from retrieval.probe import LinearProbe
    from retrieval.probe_flows import save_replacing
    from retrieval.probe_share import probe_follower
    from retrieval.workflows import train_gallery_probe

    a, b, prefix, client = two_machines
    train_gallery_probe(a, progress=False)  # P0, shared
    p0 = LinearProbe.load(a).trained_on
    probe = LinearProbe.load(a)
    probe.trained_on = p0 + 1
    save_replacing(Gallery.open(a), probe)  # P1, shared; P0 kept as probe.prev.*
    follower_b = probe_follower(Gallery.open(b))
    assert follower_b.check()
    if command == "publish":
        probe.trained_on = p0 + 2
        probe.save(a)  # P2, to publish
    wanted = p0 + 2 if command == "publish" else p0
    meta_key = f"{prefix}/_speciesid/probe/probe.json"
    before = client.head_object(Bucket=BUCKET, Key=meta_key)["ETag"]
    rival = S3Lease(f"s3://{BUCKET}/{prefix}", Gallery.open(a).storage_options)
    real_put = StoreObjects.put

    def put_then_lose_the_lease(self, uri, data, **kwargs):
        etag = real_put(self, uri, data, **kwargs)
        if uri.endswith(".npz"):  # between the two puts: this writer's lease lapses, another takes it
            client.put_object(Bucket=BUCKET, Key=f"{prefix}/{LEASE_DIR}/{LEASE_OBJECT}", Body=b'{"free": true}')
            rival.acquire(timeout=0)
            held = write_lock(a / ".write.lock").remote
            held._renewed -= held.ttl  # its next check renews (and is refused), as after a stall past the TTL
        return etag

    monkeypatch.setattr(StoreObjects, "put", put_then_lose_the_lease)
    try:
        code = main(["probe", command, "--index", str(a)])
    finally:
        rival.release()
    err = capsys.readouterr().err
    assert code == 2
    assert "was taken over by another writer after this probe's weights were put" in err
    assert "probe.json was not put" in err and f"Run 'speciesid probe publish --index {a}' to share the probe" in err
    if command == "restore":
        assert f"the earlier probe is restored in {a}, but not shared" in err and "not this command again" in err
    assert client.head_object(Bucket=BUCKET, Key=meta_key)["ETag"] == before  # not put under the rival's hold
    assert LinearProbe.load(a).trained_on == wanted
    assert not follower_b.check()  # nothing new taken
    monkeypatch.setattr(StoreObjects, "put", real_put)
    assert main(["probe", "publish", "--index", str(a)]) == 0  # as the error says
    assert follower_b.check() and LinearProbe.load(b).trained_on == wanted
    if command == "restore":  # a restore that can publish says where it shared the probe, as publish does
        capsys.readouterr()
        assert main(["probe", "restore", "--index", str(a)]) == 0
        assert (f"\nshared through s3://{BUCKET}/{prefix}/_speciesid/probe/: every machine sharing the store takes "
                "it") in capsys.readouterr().out


def test_the_look_before_an_answer_asks_the_store_on_a_thread_of_its_own(two_machines, monkeypatch):  # noqa: F811
    """Stop 48's note: the probe follower's HEAD (and a take: two GETs, the folder's writes) ran on the request
    thread of one identify per SPECIESID_REFRESH_S even with the store healthy. Now that look runs on a thread of its
    own; the copy it takes is loaded at the next look at the folder's files. A forced look stays in the caller."""
    import threading

    from retrieval.probe import LinearProbe
    from retrieval.workflows import open_identifier, train_gallery_probe

    a, b, _, _ = two_machines
    following = open_identifier(b, follow_probe=True, refresh_s=0.0)  # a server's, on folder b
    train_gallery_probe(a, progress=False)  # shared
    follower = following.probe_follower
    asked_from = []
    real_head = follower.objects.head
    answered = threading.Event()  # the look thread's HEAD is held until the identify has answered

    def head(uri):
        asked_from.append(threading.current_thread())
        if threading.current_thread() is not threading.main_thread():
            answered.wait(60)
        return real_head(uri)

    monkeypatch.setattr(follower.objects, "head", head)
    assert not following.refresh_probe()  # what an identify does first: it does not wait for the look (held)
    answered.set()
    follower.wait_for_look()
    assert asked_from and threading.current_thread() not in asked_from
    assert (b / "probe.json").is_file() and following.probe is None  # taken into the folder, not loaded yet
    assert following.refresh_probe()  # the next look loads it
    assert following.probe is not None and following.probe.species == LinearProbe.load(a).species
    follower.wait_for_look()  # the look that one started, done before the forced one below is watched
    asked_from.clear()
    assert not following.refresh_probe(force=True)  # forced: looked at here, nothing new
    assert asked_from == [threading.current_thread()]


def test_a_request_does_not_read_the_probe_files_while_the_servers_own_take_writes_them(  # noqa: F811
        two_machines, monkeypatch, caplog):  # noqa: F811
    """Re-read finding: the look thread's take raced the requests' reads of the folder's files: a request between
    its probe.npz and probe.json writes read half a take and warned "cannot be loaded ... train it again" on a
    healthy server. Now it leaves the files to its next look while the take writes them."""
    import threading

    import retrieval.probe_share as probe_share
    from retrieval.probe import LinearProbe
    from retrieval.workflows import open_identifier, train_gallery_probe

    a, b, _, _ = two_machines
    train_gallery_probe(a, progress=False)  # shared
    following = open_identifier(b, follow_probe=True, refresh_s=0.0)  # took it at open
    first = following.probe
    assert first is not None
    train_gallery_probe(a, progress=False, keep_duplicates=True, folds=2)  # another probe shared
    assert LinearProbe.load(a).weights_sha256 != first.weights_sha256
    half, go = threading.Event(), threading.Event()
    real_write = probe_share.atomic_write

    def held_after_the_weights(path, data):  # the take paused between its probe.npz and probe.json writes
        real_write(path, data)
        if path.name == "probe.npz" and threading.current_thread() is not threading.main_thread():
            half.set()
            go.wait(60)

    monkeypatch.setattr(probe_share, "atomic_write", held_after_the_weights)
    caplog.set_level(logging.INFO)
    following.refresh_probe()  # a request: starts the look, which takes the new probe
    assert half.wait(60)
    assert not following.refresh_probe()  # the next request, while the take is half done: the files left alone
    assert following.probe is first
    go.set()
    following.probe_follower.wait_for_look()
    assert following.refresh_probe()  # the one after loads the take whole
    assert following.probe.weights_sha256 == LinearProbe.load(a).weights_sha256
    following.probe_follower.wait_for_look()
    assert not [r for r in caplog.records if "cannot be loaded" in r.getMessage()]
