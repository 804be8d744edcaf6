"""A gallery whose store lives on S3 (moto's S3 server on 127.0.0.1): build, identify, worker fragments."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _api_support import free_port
from conftest import PH_SNAKES, needs_shared

from api.cli import main

pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")

BUCKET = "galleries"


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server in a subprocess on a free port, with a bucket; its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
    deadline = time.monotonic() + 60
    while True:
        try:
            client.create_bucket(Bucket=BUCKET)
            break
        except Exception:  # noqa: BLE001 - not up yet
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("moto's S3 server did not start")
            time.sleep(0.2)
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
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="g1/")["Contents"]]
    assert any(k.startswith("g1/references.lance/data/") for k in keys)
    cobra = sorted((PH_SNAKES / "val" / "Samar Cobra (Naja samarensis)").iterdir())[0]
    code = main(["identify", "--index", str(index), str(cobra), "--format", "json", "-q"])
    (answer,) = json.loads(capsys.readouterr().out)
    assert code == 0 and answer["predictions"] and len(answer["neighbours"]) == 5  # the default k, read from S3


def test_workers_write_fragments_to_s3_and_the_driver_commits_once(s3_env, tmp_path):
    from index.fragments import write_fragments
    from index.gallery import Gallery
    from index.records import ReferenceRecord
    from index.store import rows_table

    dim = 8
    g = Gallery.create(tmp_path / "g", {"spec": "t", "fingerprint": "t#0", "dim": dim}, store=f"s3://{BUCKET}/g2")
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

    dim, rng = 8, np.random.default_rng(1)
    encoder = {"spec": "t", "fingerprint": "t#0", "dim": dim}
    g = Gallery.create(tmp_path / "a", encoder, store=f"s3://{BUCKET}/g3")
    g.add([ReferenceRecord(path="/a.jpg", species="Naja naja")] * 2, ["a" * 64, "b" * 64], rng.standard_normal((2, dim)))
    # a second folder on the same store would keep its own ids.json: refused, and nothing is left of it
    with pytest.raises(ValueError, match=rf"the store s3://{BUCKET}/g3 already holds a gallery's references"):
        Gallery.create(tmp_path / "b", encoder, store=f"s3://{BUCKET}/g3")
    assert [p.name for p in (tmp_path / "b").iterdir()] == [".write.lock"]  # nothing else: it can be used again
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
    with pytest.raises(ValueError, match=rf"cannot open the store s3://{BUCKET}/g3 \(.*\); check the URI and the AWS_"):
        Gallery.open(tmp_path / "a")


def test_a_store_error_puts_the_cause_first():
    from index.gallery import store_error

    lance = ("lance error: Invalid input, Failed to connect to namespace: IO { source: Generic { store: \"S3\", "
             + "x" * 300 + " } }\nresponse: <Code>NoSuchBucket</Code><Message>The specified bucket does not exist")
    msg = str(store_error("s3://b/g", RuntimeError(lance)))
    assert msg.startswith("cannot open the store s3://b/g (NoSuchBucket: lance error: Invalid input") and "AWS_" in msg
