"""The text prior travels with the store's shared probe (moto's server on 127.0.0.1): ``probe train`` with a
text-capable encoder (the tests' tiny CLIP) publishes its ``text_prior.json`` beside the weights
(``text-prior-<sha256>.json``, named by ``probe.json``'s metadata), a second folder takes it with the probe and
answers as the first does, and a probe published without a text prior removes the one a folder took before. A
``probe.json`` an earlier version published (no word of a text prior) leaves a folder's text prior as it is."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from conftest import s3_keys
from PIL import Image
from test_object_store import BUCKET, _photo_root, s3_endpoint, s3_env  # noqa: F401 - the fixtures, reused
from test_s3_uploads import two_machines  # noqa: F401 - the fixture, reused


@pytest.fixture
def clip_machines(s3_env, tmp_path, tiny_clip_dir, monkeypatch):  # noqa: F811
    """A tiny-CLIP gallery (text-capable) on an S3 store, built in folder ``a`` and copied to folder ``b`` (a second
    machine): (folder a, folder b, the store's prefix, the boto3 client, a photo to identify). The random tiny CLIP
    sees a species' photos as near-copies, which cross-validation refuses: ``probe train`` takes fixed settings."""
    import retrieval.calibrate
    from retrieval.encoders import EncoderConfig
    from retrieval.probe import Calibration
    from retrieval.workflows import build_gallery

    monkeypatch.setattr(retrieval.calibrate, "select_settings", lambda *a, **k: Calibration(C=1.0))

    _, client = s3_env
    root = _photo_root(tmp_path)
    prefix = f"tp-{tmp_path.name}"
    build_gallery(tmp_path / "a", "folder", root, encoder=EncoderConfig(spec=f"open_clip:local-dir:{tiny_clip_dir}",
                                                                        precision="fp32"),
                  store=f"s3://{BUCKET}/{prefix}", progress=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b", symlinks=True)
    photo = next(p for p in sorted(root.rglob("*")) if p.is_file())
    return tmp_path / "a", tmp_path / "b", prefix, client, photo


def _answer(ident, photo) -> dict[str, float]:
    """The species scores ``ident`` gives the photo (rounded: two processes' floats may differ in the last bits)."""
    with Image.open(photo) as img:
        found = ident.identify_images([img.convert("RGB")])[0]
    return {species: round(score, 5) for species, score in found.scores.items()}


def _probe_names(client, prefix: str) -> list[str]:
    folder = f"{prefix}/_speciesid/probe/"
    return [key[len(folder):] for key in s3_keys(client, BUCKET, folder)]


def test_the_text_prior_travels_with_the_shared_probe_and_a_probe_without_one_removes_it(clip_machines):
    """The old code shared only probe.json and the weights: machine b took the probe without its text prior, so
    its answers were not machine a's (it blended no prior), and a later probe without one left b's prior beside it."""
    from index.gallery import Gallery
    from retrieval.probe import LinearProbe
    from retrieval.probe_share import publish_probe
    from retrieval.workflows import open_identifier, train_gallery_probe

    a, b, prefix, client, photo = clip_machines
    shutil.copytree(b, b.parent / "c", symlinks=True)  # a third machine, opened after the probe is trained
    following = open_identifier(b, follow_probe=True, refresh_s=0.0)  # a server's identifier on machine b
    assert following.probe is None and following.text_prior is None
    result = train_gallery_probe(a, progress=False)
    assert result.text_species == 2 and (a / "text_prior.json").is_file()
    prior_object = f"text-prior-{hashlib.sha256((a / 'text_prior.json').read_bytes()).hexdigest()}.json"
    assert prior_object in _probe_names(client, prefix)
    meta = client.head_object(Bucket=BUCKET, Key=f"{prefix}/_speciesid/probe/probe.json")["Metadata"]
    assert meta["text-prior-key"] == prior_object and meta["text-prior-etag"]

    assert following.refresh_probe(force=True)  # the server on b takes the probe and its text prior
    assert (b / "text_prior.json").read_bytes() == (a / "text_prior.json").read_bytes()
    assert following.text_prior is not None and following.text_prior.species == result.probe.species
    on_a = open_identifier(a)
    assert on_a.text_prior is not None
    assert _answer(following, photo) == _answer(on_a, photo)  # b answers as a does
    opened = open_identifier(b.parent / "c")  # a folder without a probe takes the store's, prior included, at open
    assert opened.text_prior is not None and opened.text_prior.species == result.probe.species
    assert _answer(opened, photo) == _answer(on_a, photo)

    # a probe published from a folder without a text prior (trained without one): b drops the prior it took
    (a / "text_prior.json").unlink()
    probe = LinearProbe.load(a)
    probe.trained_on += 1
    probe.save(a)
    publish_probe(Gallery.open(a))
    meta = client.head_object(Bucket=BUCKET, Key=f"{prefix}/_speciesid/probe/probe.json")["Metadata"]
    assert meta["text-prior-key"] == "none" and "text-prior-etag" not in meta
    assert following.refresh_probe(force=True)
    assert following.probe.trained_on == probe.trained_on
    assert not (b / "text_prior.json").exists() and following.text_prior is None
    assert _answer(following, photo) == _answer(open_identifier(a), photo)
    assert prior_object in _probe_names(client, prefix)  # the replaced copy's prior is kept (a reader between GETs)
    publish_probe(Gallery.open(a))  # the next publish removes it: no probe.json names it
    assert not [n for n in _probe_names(client, prefix) if n.startswith("text-prior-")]


def test_a_probe_an_earlier_version_published_leaves_the_folders_text_prior_and_withdraw_removes_the_prior(
        clip_machines):
    """A probe.json without a word of a text prior (an earlier version's publish, which never shared it): the
    folder taking it keeps its own text_prior.json, as it did then; a withdraw removes the store's text prior too."""
    from index.gallery import Gallery
    from index.objects import StoreObjects
    from retrieval.probe_share import WEIGHTS_ETAG, WEIGHTS_KEY, probe_follower, weights_name
    from retrieval.workflows import train_gallery_probe, withdraw_gallery_probe

    a, b, prefix, client, _ = clip_machines
    train_gallery_probe(a, progress=False)
    follower = probe_follower(Gallery.open(b))
    assert follower.check()
    own = (b / "text_prior.json").read_bytes()
    store = f"s3://{BUCKET}/{prefix}/_speciesid/probe"
    objects = StoreObjects(f"s3://{BUCKET}/{prefix}", Gallery.open(a).storage_options)
    weights = (a / "probe.npz").read_bytes()
    etag = objects.put(f"{store}/{weights_name(weights)}", weights)
    meta = json.loads((a / "probe.json").read_text())
    meta["trained_on"] += 1
    objects.put(f"{store}/probe.json", json.dumps(meta).encode(),
                metadata={WEIGHTS_ETAG: etag, WEIGHTS_KEY: weights_name(weights)})
    assert follower.check()  # taken, and b's text prior stays
    assert json.loads((b / "probe.json").read_text())["trained_on"] == meta["trained_on"]
    assert (b / "text_prior.json").read_bytes() == own

    train_gallery_probe(a, progress=False)  # a new publish, with its prior; then withdrawn: nothing of it stays
    assert [n for n in _probe_names(client, prefix) if n.startswith("text-prior-")]
    withdraw_gallery_probe(a)
    assert _probe_names(client, prefix) == []


def test_probe_train_without_a_text_prior_removes_the_folders_stale_one_and_shares_that(two_machines):  # noqa: F811
    """An image-only encoder's probe (MobileNet) replaces a folder's text_prior.json (left by an older probe): the
    old code left it there, and a machine reading the store could not tell whether the probe had one."""
    from retrieval.workflows import train_gallery_probe

    a, b, prefix, client = two_machines
    (a / "text_prior.json").write_text(json.dumps({"fingerprint": "x", "strength": 1.0, "species": []}))
    (b / "text_prior.json").write_text((a / "text_prior.json").read_text())
    assert train_gallery_probe(a, progress=False).text_species == 0
    assert not (a / "text_prior.json").exists()
    meta = client.head_object(Bucket=BUCKET, Key=f"{prefix}/_speciesid/probe/probe.json")["Metadata"]
    assert meta["text-prior-key"] == "none"
    from index.gallery import Gallery
    from retrieval.probe_share import probe_follower

    assert probe_follower(Gallery.open(b)).check()
    assert not (b / "text_prior.json").exists()
