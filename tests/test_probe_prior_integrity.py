"""The text prior and the probe stay one pair (moto's server on 127.0.0.1, the tests' tiny CLIP): ``probe train``
writes the prior first and records its digest in ``probe.json`` (a loader ignores a prior of another digest); a
follower computes a taken prior's class embeddings on its own thread, before the files change; and a take of a copy
the folder already holds (a copy recorded in an earlier version's spelling) sets nothing aside as probe.prev.*."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import threading

import pytest
from test_object_store import BUCKET, _photo_root, s3_endpoint, s3_env  # noqa: F401 - the fixtures, reused
from test_probe_share_text_prior import _answer, clip_machines  # noqa: F401 - the fixture, reused


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_taken_text_prior_is_embedded_on_the_look_thread_before_the_swap(clip_machines, monkeypatch):  # noqa: F811
    """The old code took the prior's files and left its prompts to the next answer: the first identify after a
    take embedded every prompt of the checklist (minutes for a big one) on the answering thread."""
    import retrieval.zeroshot
    from retrieval.workflows import open_identifier, train_gallery_probe

    a, b, _, _, photo = clip_machines
    following = open_identifier(b, follow_probe=True, refresh_s=0.0)
    train_gallery_probe(a, progress=False)
    calls: list[tuple[str, bool]] = []
    real = retrieval.zeroshot.class_embeddings

    def spy(*args, **kwargs):
        calls.append((threading.current_thread().name, (b / "text_prior.json").exists()))
        return real(*args, **kwargs)

    monkeypatch.setattr(retrieval.zeroshot, "class_embeddings", spy)
    following.probe_follower.look_soon()  # a server's look before an answer: on a thread of its own
    following.probe_follower.wait_for_look()
    assert (b / "text_prior.json").is_file()
    assert calls and all(name.startswith("probe look ") for name, _ in calls)  # not an answer's thread
    assert not any(prior_there for _, prior_there in calls)  # before text_prior.json was written into b
    taken = len(calls)
    _answer(following, photo)  # loads the taken files: the embeddings come from the cache
    assert len(calls) == taken
    assert following.text_prior is not None


def test_a_failed_prior_write_leaves_the_probe_and_prior_as_they_were(clip_machines, monkeypatch):  # noqa: F811
    """The old code saved the new probe (setting the old one aside) and then failed at the prior: the folder
    kept a new probe with the old prior, and a later publish shared that pair."""
    import retrieval.probe_flows
    from retrieval.workflows import train_gallery_probe

    a, _, _, _, _ = clip_machines
    train_gallery_probe(a, progress=False)
    probe_json, prior = (a / "probe.json").read_bytes(), (a / "text_prior.json").read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(retrieval.probe_flows, "save_text_prior", full)
    with pytest.raises(OSError, match="could not be written") as raised:
        train_gallery_probe(a, progress=False, text_strength=3.0)
    assert "the gallery's probe and text prior are as they were" in str(raised.value)
    assert f"run 'speciesid probe train --index {a}' again" in str(raised.value)
    assert (a / "probe.json").read_bytes() == probe_json
    assert (a / "text_prior.json").read_bytes() == prior
    assert not (a / "probe.prev.json").exists()  # nothing set aside: the save never began


def test_a_prior_the_probe_was_not_trained_with_is_ignored(clip_machines, monkeypatch, caplog):  # noqa: F811
    """A save failing after the new prior was written leaves the old probe beside it: that probe names its own
    prior's digest, so the loader answers without the other one (and says what to run) instead of mixing them."""
    from retrieval.probe import LinearProbe
    from retrieval.workflows import open_identifier, train_gallery_probe

    a, _, _, _, _ = clip_machines
    train_gallery_probe(a, progress=False)
    recorded = json.loads((a / "probe.json").read_text())["text_prior_sha256"]
    assert recorded == _sha(a / "text_prior.json")
    assert LinearProbe.load(a).text_prior_sha256 == recorded
    assert open_identifier(a).text_prior is not None

    def full(self, folder):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch, pytest.raises(OSError, match="No space left"):
        patch.setattr(LinearProbe, "save", full)
        train_gallery_probe(a, progress=False, text_strength=3.0)
    assert json.loads((a / "text_prior.json").read_text())["strength"] == 3.0  # the new prior, the old probe
    assert LinearProbe.load(a).text_prior_sha256 == recorded != _sha(a / "text_prior.json")
    with caplog.at_level(logging.WARNING, logger="retrieval.textprior"):
        assert open_identifier(a).text_prior is None
    assert "is not the one its probe was trained with" in caplog.text
    assert f"run 'speciesid probe train --index {a}'" in caplog.text


def test_a_copy_the_folder_holds_in_another_spelling_is_not_taken_again(clip_machines):  # noqa: F811
    """An earlier version records a copy without its text prior's ETag ("etag wetag"): the old code took that copy
    again at every look of a new process, setting the probe aside as probe.prev.* each time (a duplicate of the
    probe, the real previous one lost). The folder's files are compared instead: nothing to write, nothing set
    aside; a copy whose prior alone is new writes the prior and sets nothing aside."""
    from index.gallery import Gallery
    from retrieval.probe_share import probe_follower
    from retrieval.workflows import train_gallery_probe

    a, b, _, _, _ = clip_machines
    train_gallery_probe(a, progress=False)
    assert probe_follower(Gallery.open(b)).check()
    assert not (b / "probe.prev.json").exists()
    copy = json.loads((b / "probe_origin.json").read_text())["copy"]
    assert len(copy.split()) == 3
    old_spelling = " ".join(copy.split()[:2])
    (b / "probe_origin.json").write_text(json.dumps({"copy": old_spelling}))

    assert not probe_follower(Gallery.open(b)).check()  # the same probe and prior: not taken again
    assert not (b / "probe.prev.json").exists()
    assert json.loads((b / "probe_origin.json").read_text())["copy"] == copy

    prior = (b / "text_prior.json").read_bytes()
    (b / "text_prior.json").unlink()  # an earlier version took the probe, not its prior
    (b / "probe_origin.json").write_text(json.dumps({"copy": old_spelling}))
    assert probe_follower(Gallery.open(b)).check()
    assert (b / "text_prior.json").read_bytes() == prior
    assert not (b / "probe.prev.json").exists()  # the probe is the one it held: not set aside


def test_a_restored_probe_blends_only_the_prior_it_was_trained_with(clip_machines, caplog):  # noqa: F811
    """`probe restore` brings the earlier probe back beside the folder's prior of now: the same prior (a retrain
    with the same species and strength writes the same bytes) is blended; another one is not
    (docs/shared-gallery.md)."""
    from retrieval.workflows import open_identifier, restore_gallery_probe, train_gallery_probe

    a, _, _, _, _ = clip_machines
    train_gallery_probe(a, progress=False)
    train_gallery_probe(a, progress=False)  # the same prior, byte for byte
    restore_gallery_probe(a)
    assert open_identifier(a).text_prior is not None
    train_gallery_probe(a, progress=False, text_strength=3.0)  # another prior
    restore_gallery_probe(a)
    with caplog.at_level(logging.WARNING, logger="retrieval.textprior"):
        assert open_identifier(a).text_prior is None
    assert "is not the one its probe was trained with" in caplog.text
