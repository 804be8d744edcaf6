"""What an operator sees (the s47 walkthrough's findings): a writer that waits says for whom, and for how long."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import require_module
from PIL import Image
from test_object_store import BUCKET, s3_endpoint, s3_env  # noqa: F401 - moto's S3 server, as fixtures


def test_a_waiting_writer_warns_naming_the_locks_holder_and_how_long_it_waits(tmp_path, monkeypatch, caplog):
    """A writer waiting on another's lock logged at INFO only: the command line (WARNING and above) was silent for
    up to 600 s, and nothing could shorten that. SPECIESID_WRITE_WAIT_S now sets the wait of every writer, and the
    first "waiting" line is a warning naming the holder (host, pid) and the wait."""
    from index.locks import WriteLock

    path = tmp_path / ".write.lock"
    monkeypatch.setenv("SPECIESID_WRITE_WAIT_S", "4")
    waiter = WriteLock(path)
    assert waiter.timeout == 4
    holder = WriteLock(path, timeout=0)  # another open file: flock's locks belong to it, as another process's do
    caplog.set_level(logging.WARNING, logger="index.locks")
    with holder.hold(), pytest.raises(TimeoutError, match="this one waited 4 s"), waiter.hold():  # its 4 s, not 600
        pass
    assert f"pid {os.getpid()}" in caplog.text and "waiting up to 4 s in all" in caplog.text, caplog.text
    assert "SPECIESID_WRITE_WAIT_S" in caplog.text
    monkeypatch.setenv("SPECIESID_WRITE_WAIT_S", "soon")
    with pytest.raises(ValueError, match="SPECIESID_WRITE_WAIT_S=soon is not a number of seconds"):
        WriteLock(path).hold().__enter__()
    monkeypatch.delenv("SPECIESID_WRITE_WAIT_S")
    assert WriteLock(path).timeout == 600


def test_a_writer_waiting_for_the_s3_lease_warns_naming_its_holder_and_ttl(s3_env, caplog):  # noqa: F811
    """The lease's "waiting for another writer" was INFO, and named neither the TTL nor how long this one waits."""
    from index.lease import LEASE_DIR, S3Lease
    from index.store import storage_options

    endpoint, client = s3_env
    uri, key = f"s3://{BUCKET}/waiting", f"waiting/{LEASE_DIR}/write.lock"
    held = {"host": "otherclinic", "pid": 77, "since": "2025-01-01T00:00:00+00:00", "ttl_s": 300}
    client.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(held).encode())
    caplog.set_level(logging.WARNING, logger="index.lease")
    lease = S3Lease(uri, storage_options(None, {"aws_endpoint": endpoint}), ttl=30)
    with pytest.raises(TimeoutError, match="held by host otherclinic"):
        lease.acquire(timeout=5.0)  # past the 2 s after which it warns, with room on a busy machine
    assert "waiting up to 5 s in all for another writer of the store s3://galleries/waiting (held by host " \
           "otherclinic, pid 77" in caplog.text, caplog.text
    assert "lapses 300 s after its last renewal" in caplog.text


def test_the_summarys_images_per_second_leaves_out_the_wait_for_another_writer(tmp_path, mobilenet_encoder):
    """An add that waited 20 s for another writer reported "0.0 images/s": the wait counted as embedding time."""
    from index.gallery import Gallery
    from index.locks import WARN_AFTER_S, WriteLock
    from index.records import ReferenceRecord
    from retrieval.pipeline import BuildReport, add_references

    assert BuildReport(added=10, seconds=10.0, waited_s=8.0).images_per_second == pytest.approx(5.0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(paths[-1])
    g = Gallery.create(tmp_path / "g", mobilenet_encoder.describe())
    other, taken, waiting = WriteLock(g.layout.write_lock), threading.Event(), threading.Event()

    class _SeesTheWait(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting up to" in record.getMessage():  # the add's warning: it has waited WARN_AFTER_S already
                waiting.set()

    def hold_until_the_add_waits() -> None:
        with other.hold():
            taken.set()
            waiting.wait(120)  # no race with the embedding: released only once the add is waiting for it

    seer, locks_logger = _SeesTheWait(logging.WARNING), logging.getLogger("index.locks")
    locks_logger.addHandler(seer)
    level = locks_logger.level
    locks_logger.setLevel(logging.WARNING)  # whatever else set it, the warning is emitted
    thread = threading.Thread(target=hold_until_the_add_waits)
    thread.start()
    try:
        assert taken.wait(30)
        report = add_references(g, mobilenet_encoder, [ReferenceRecord(path=Path(p), species="Naja haje")
                                                       for p in paths], progress=False, workers=1)
        waited = waiting.is_set()
    finally:
        waiting.set()  # an add that never waited (or failed) lets the holder go at once
        thread.join()
        locks_logger.removeHandler(seer)
        locks_logger.setLevel(level)
    assert waited, "the add never waited for the other writer's lock"
    assert report.added == 3 and report.waited_s >= WARN_AFTER_S, report
    assert report.images_per_second == pytest.approx(3 / (report.seconds - report.waited_s))
    assert "waiting for another writer, not counted" in report.summary()


def _photos(tmp_path: Path, per_species: int = 3) -> Path:
    """``per_species`` ph-snakes photos of two species (links), as a folder dataset."""
    from conftest import PH_SNAKES, needs_shared

    needs_shared()
    root = tmp_path / "photos"
    for folder in ("Samar Cobra (Naja samarensis)", "Asian Sunbeam Snake (Xenopeltis unicolor)"):
        (root / folder).mkdir(parents=True)
        for p in sorted((PH_SNAKES / "train" / folder).iterdir())[:per_species]:
            (root / folder / p.name).symlink_to(p)
    return root


@pytest.mark.slow
def test_a_ray_build_shows_its_progress_per_chunk_unless_quiet(tmp_path, capsys, monkeypatch):
    """A Ray build printed nothing between its chunks without -v (a default 100k-photo chunk: about 45 min of
    silence on 2 cores). It now moves a bar on stderr at each committed chunk, as the local build does; -q hides it."""
    require_module("ray.data")
    from conftest import MOBILENET_SPEC, stderr_a_terminal

    from api.cli import main
    from retrieval.distributed import RayOptions, start_ray, stop_ray

    stderr_a_terminal(monkeypatch)  # bars only on a terminal

    root = _photos(tmp_path)
    started = start_ray(RayOptions(actors=1, local_cpus=2))
    try:
        args = ["index", "build", "--dataset", "folder", "--root", str(root), "--encoder", MOBILENET_SPEC,
                "--precision", "fp32", "--engine", "ray", "--ray-actors", "1", "--chunk-rows", "4"]
        code = main([*args, "--index", str(tmp_path / "g")])
        err = capsys.readouterr().err
        assert code == 0, err
        assert "building on ray" in err and "6/6" in err and "chunk 2 committed; 6 stored" in err, err
        code = main([*args, "--index", str(tmp_path / "q"), "-q"])
        err = capsys.readouterr().err
        assert code == 0 and "building on ray" not in err, err
    finally:
        if started:
            stop_ray()


#: The encoder of galleries built from rows alone (8-float rows, no model).
_TINY = {"spec": "t", "fingerprint": "t#0", "dim": 8}


def _rows(n: int, seed: int = 0):
    from index.records import ReferenceRecord

    vectors = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    records = [ReferenceRecord(path=f"/p/{seed}-{i}.jpg", species="Naja haje") for i in range(n)]
    return records, [f"{seed}-{i}" for i in range(n)], vectors


def _info(index: Path, capsys) -> dict:
    from api.cli import main

    assert main(["index", "info", "--index", str(index)]) == 0
    return json.loads(capsys.readouterr().out)


def test_index_info_shows_a_local_gallerys_store_and_its_leftover_build_journals(tmp_path, capsys):
    """`index info` named no store: where it is, nor the journals a killed Ray build left (with host and pid)."""
    from index.gallery import Gallery

    g = Gallery.create(tmp_path / "g", _TINY)
    g.add(*_rows(3))
    journal = {"uri": str(g.store_uri), "since": 1, "host": "buildhost", "machine": "m", "boot": "b", "pidns": "p",
               "pid": 4242, "started": "1"}
    (g.root / ".uncommitted-abc.json").write_text(json.dumps(journal) + "\n" + json.dumps({"files": ["d/1.lance"]})
                                                 + "\n")
    store = _info(g.root, capsys)["store"]
    assert store["uri"] == str(g.root / "store") and "lease" not in store
    (left,) = store["journals"]
    assert left["file"] == ".uncommitted-abc.json" and left["host"] == "buildhost" and left["pid"] == 4242
    assert left["files"] == 1 and left["driver"] == "another machine"  # another host: never swept by a build here


def test_index_info_shows_an_s3_stores_lease_holder_and_shared_id_mark(s3_env, tmp_path, capsys):  # noqa: F811
    """On S3 the operator had to use boto3 by hand to see the lease's holder and the shared id mark."""
    from index.gallery import Gallery
    from index.lease import LEASE_DIR

    endpoint, client = s3_env
    g = Gallery.create(tmp_path / "g", _TINY, store=f"s3://{BUCKET}/info")
    g.add(*_rows(3))
    store = _info(g.root, capsys)["store"]
    assert store["uri"] == f"s3://{BUCKET}/info" and store["journals"] == []
    assert store["lease"]["state"] == "free"  # released after the add
    assert store["ids"] == {"next": 4, "object": f"s3://{BUCKET}/info/{LEASE_DIR}/ids.json"}
    held = {"host": "otherclinic", "pid": 77, "since": "2025-01-01T00:00:00+00:00", "ttl_s": 300}
    client.put_object(Bucket=BUCKET, Key=f"info/{LEASE_DIR}/write.lock", Body=json.dumps(held).encode())
    lease = _info(g.root, capsys)["store"]["lease"]
    assert lease["state"] == "held" and lease["host"] == "otherclinic" and lease["pid"] == 77
    assert lease["ttl_s"] == 300 and 0 <= lease["renewed_s_ago"] < 60
    client.put_object(Bucket=BUCKET, Key=f"info/{LEASE_DIR}/ids.json", Body=b"garbage")
    ids = _info(g.root, capsys)["store"]["ids"]
    assert "is unreadable" in ids["error"], ids  # told as that part's error; the rest of the block still shows


def test_skipped_manifest_rows_are_named_with_their_line_and_reason_and_said_once(tmp_path, capsys, caplog):
    """A manifest's skipped rows were only counted ("2 row(s) ... skipped"), and the warning came twice: logged,
    then again in the summary. The first few are now named (line, reason: check_name's message), once."""
    from conftest import MOBILENET_SPEC, PH_SNAKES, needs_shared

    from api.cli import main

    needs_shared()
    folder = PH_SNAKES / "train" / "Samar Cobra (Naja samarensis)"
    photos = sorted(folder.iterdir())[:2]
    manifest = tmp_path / "m.csv"
    lines = ["path,species"] + [f"{p},Naja samarensis" for p in photos]
    lines += [f"{photos[0]},", f"{photos[1]},Naja\u200bsamar", ",Naja samarensis"]
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code = main(["index", "build", "--dataset", "manifest", "--root", str(tmp_path), "--metadata", str(manifest),
                 "--index", str(tmp_path / "g"), "--encoder", MOBILENET_SPEC, "--precision", "fp32", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    said = out + err + caplog.text
    assert said.count("3 row(s) of") == 1, said
    assert f"data row 3 (path {photos[0]}): no species" in said and "data row 5: no path" in said, said
    assert f"data row 4 (path {photos[1]}): the species name" in said, said
    assert "ZERO WIDTH SPACE (U+200B)" in said, said


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_a_skipped_manifest_row_is_named_by_data_row_and_path_after_blank_lines_and_multiline_fields(tmp_path,
                                                                                                     kind):
    """Review s47, 5: a skipped row was named "line N" from its data row number, wrong after a blank line (the CSV
    reader skips it) or a quoted field spanning lines: b.jpg, on line 4, was called line 3. Rows are named by data
    row and by their path, in a CSV and a parquet manifest alike."""
    from index.streamed import iter_manifest

    rows = [("a.jpg", "Naja naja"), ("b.jpg", None), ("c.jpg", "Naja\nhaje"), ("d.jpg", None), (None, "Naja naja")]
    if kind == "csv":
        manifest = tmp_path / "m.csv"
        manifest.write_text('path,species\na.jpg,Naja naja\n\nb.jpg,\nc.jpg,"Naja\nhaje"\nd.jpg,\n,Naja naja\n')
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        manifest = tmp_path / "m.parquet"
        pq.write_table(pa.table({"path": [r[0] for r in rows], "species": [r[1] for r in rows]}), manifest)
    warnings: list[str] = []
    records = list(iter_manifest(manifest, tmp_path, warnings))
    assert [r.path.name for r in records] == ["a.jpg", "c.jpg"]  # "Naja\nhaje": whitespace, one space
    assert warnings == [f"3 row(s) of {manifest} without a path or a valid species skipped: data row 2 (path b.jpg): "
                        "no species; data row 4 (path d.jpg): no species; data row 5: no path"], warnings


def test_a_ray_only_refusal_of_views_comes_before_any_model_loads(tmp_path, monkeypatch):
    """`--engine ray --views flip` loaded the model (13 s; without --encoder it tried to download bioclip first) before
    saying Ray builds single-view galleries. It is now refused with the other option checks."""
    import retrieval.workflows as workflows
    from retrieval.encoders import EncoderConfig

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the views were checked")

    monkeypatch.setattr(workflows, "create_encoder_from_config", no_model)
    (tmp_path / "photos" / "Naja haje").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(tmp_path / "photos" / "Naja haje" / "a.jpg")
    with pytest.raises(ValueError, match="views 'flip' need --engine local"):
        workflows.build_gallery(tmp_path / "g", "folder", tmp_path / "photos", engine="ray",
                                encoder=EncoderConfig(spec="timm:local-dir:/nowhere", views="flip"))
    assert not (tmp_path / "g").exists()


def test_a_store_that_cannot_be_made_leaves_no_folder_holding_only_the_lock(s3_env, tmp_path):  # noqa: F811
    """`index build --store s3://missing-bucket/x` left DIR holding only .write.lock, which `serve` then called "not a
    speciesid gallery". The folder the failed create made is removed; a folder that was there before stays."""
    from index.gallery import Gallery

    with pytest.raises(ValueError, match="cannot open the store"):
        Gallery.create(tmp_path / "new" / "g", _TINY, store="s3://missing-bucket/x")
    assert not (tmp_path / "new" / "g").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(ValueError, match="cannot open the store"):
        Gallery.create(tmp_path / "mine", _TINY, store="s3://missing-bucket/x")
    assert (tmp_path / "mine").is_dir()  # the operator's own folder: not this command's to remove
    g = Gallery.create(tmp_path / "new" / "g", _TINY, store=f"s3://{BUCKET}/remade")  # the corrected command
    assert len(g) == 0


def test_a_writer_waiting_on_a_lock_file_its_holder_removed_takes_the_paths_own(tmp_path):
    """A failed create now removes the folder it made, lock file included: a creator that waited on that lock must
    not hold a lock on the removed file (another creator would lock the new one: two holders at once)."""
    import os

    from index.locks import WriteLock

    path = tmp_path / "g" / ".write.lock"
    holder, waiter = WriteLock(path, timeout=0), WriteLock(path, timeout=10)
    got = threading.Event()

    def wait_for_it() -> None:
        with waiter.hold():
            got.set()
            time.sleep(0.5)

    with holder.hold():
        thread = threading.Thread(target=wait_for_it)
        thread.start()
        time.sleep(0.3)
        path.unlink()
        path.parent.rmdir()
    assert got.wait(10)
    assert os.path.samestat(os.fstat(waiter._fd), os.stat(path))  # the lock at the path, which others would take
    thread.join()


def test_a_store_outage_mid_build_or_add_says_what_was_kept_and_to_run_again(tmp_path, monkeypatch, capsys):
    """Lance's RuntimeError for an unreachable S3 store, mid-command, was printed as the generic
    ``speciesid: error: RuntimeError: lance error ... (run with -vv for the traceback)``. It is now one line naming the
    store, what was kept and what to do, exit 2; and what it says holds: the same command run again adds the rest."""
    import functools

    from test_api_store_outage import LANCE_S3_DOWN

    from api.cli import main
    from index.store import ReferenceStore
    from retrieval import pipeline, workflows

    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for species, n in (("Naja haje", 3), ("Naja naja", 3)):
        (root / species).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / species / f"{i}.png")
    index = str(tmp_path / "g")
    encoder = ["--encoder", "timm:test_vit@random", "--precision", "fp32", "--runtime", "torch", "-q"]
    build = ["index", "build", "--dataset", "folder", "--root", str(root), "--index", index, "--batch-size", "2",
             *encoder]
    monkeypatch.setattr(workflows, "add_references", functools.partial(pipeline.add_references, chunk=2))
    real_add, calls = ReferenceStore.add, []

    def add_until_the_store_goes(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second commit of two photos: the first two are stored
            raise RuntimeError(LANCE_S3_DOWN)
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(ReferenceStore, "add", add_until_the_store_goes)
    assert main(build) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("speciesid: error: the gallery's S3 store could not be reached (lance "
                                               "error: LanceError(IO): Generic S3 error"), err
    assert "the references committed before it stay in the gallery, and running the same command again adds the " \
           "rest" in err[0] and err[0].endswith("check the network and the endpoint (AWS_ENDPOINT_URL), then run the "
                                                "command again"), err
    assert "RuntimeError" not in err[0] and "-vv" not in err[0]

    monkeypatch.setattr(ReferenceStore, "add", real_add)  # the store is back: the re-run adds the rest
    assert main(build) == 0
    out = capsys.readouterr().out
    assert "6 references" in out and "added 4" in out, out

    photo = tmp_path / "new.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photo)

    def store_down(self, *args, **kwargs):
        raise RuntimeError(LANCE_S3_DOWN)

    monkeypatch.setattr(ReferenceStore, "find_sha256", store_down)
    add = ["references", "add", "--index", index, "--species", "Naja haje", str(photo), "-q"]
    assert main(add) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "S3 store could not be reached" in err[0] and "adds the rest" in err[0], err
