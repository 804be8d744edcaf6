"""Builds on a small local Ray cluster (2 embedding actors): the same gallery as a local build.

Marked slow: starts Ray (10-20 s) and embeds ph-snakes photos with the real MobileNetV1 twice.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from conftest import MOBILENET_SPEC, PH_SNAKES, needs_shared, require_module

from api.cli import main
from index.fragments import _machine_id as read_machine_id  # the real one (the fixture below may stand in)
from index.layout import JOURNAL_GLOB

if TYPE_CHECKING:
    from index.fragments import PendingFiles

require_module("ray.data")
require_module("lance")

pytestmark = pytest.mark.slow

SPECIES = ("Philippine Cobra (Naja philippinensis)", "Samar Cobra (Naja samarensis)",
           "Asian Sunbeam Snake (Xenopeltis unicolor)")
PER_SPECIES = 8


@pytest.fixture(scope="module")
def cluster():
    from retrieval.distributed import RayOptions, start_ray, stop_ray

    started = start_ray(RayOptions(actors=2, local_cpus=4))
    yield
    if started:
        stop_ray()


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory) -> Path:
    """24 ph-snakes photos, a corrupt one, a byte copy of the first and a broken link (reported, never fatal)."""
    needs_shared()
    root = tmp_path_factory.mktemp("ray_photos")
    for folder in SPECIES:
        (root / folder).mkdir()
        for p in sorted((PH_SNAKES / "train" / folder).iterdir())[:PER_SPECIES]:
            (root / folder / p.name).symlink_to(p)
    first = sorted((root / SPECIES[0]).iterdir())[0]
    shutil.copy(first.resolve(), root / SPECIES[0] / "zz-copy.jpg")
    (root / SPECIES[1] / "zz-corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (root / SPECIES[2] / "zz-gone.jpg").symlink_to(root / "unmounted.jpg")
    return root


def _content(index: Path) -> tuple[dict, dict]:
    from index.gallery import Gallery

    g = Gallery.open(index)
    ids, vectors = g.store.vectors()
    meta = g.store.metadata(ids)
    columns = ["species", "genus", "family", "common_name", "venomous", "dataset", "sha256", "encoder", "excluded"]
    rows = {m["source_path"]: tuple(m[c] for c in columns) for _, m in meta.iterrows()}
    vecs = {meta.loc[i, "source_path"]: v for i, v in zip(ids, vectors, strict=True)}
    return rows, vecs


def test_ray_build_holds_the_same_rows_as_a_local_build(cluster, photo_root, tmp_path, capsys):
    outs = {}
    for engine in ("local", "ray"):
        code = main(["index", "build", "--dataset", "folder", "--root", str(photo_root), "--index",
                     str(tmp_path / engine), "--encoder", MOBILENET_SPEC, "--precision", "fp32", "--engine", engine,
                     "--ray-actors", "2", "--batch-size", "8", "-q"])
        outs[engine] = capsys.readouterr().out
        assert code == 0, outs[engine]
    for engine, out in outs.items():
        assert "24 references, 3 species" in out, (engine, out)
        assert "skipped 1 unreadable, 1 duplicates within this run" in out and "zz-corrupt.jpg: not a photo" in out
        assert "zz-copy.jpg (same bytes as" in out
        assert (f"not read: 1 entry under {photo_root} (broken links, link loops, devices or pipes, "
                "unreadable folders: see the warning") in out
        assert "zz-gone.jpg" not in out  # named once, in the listing's warning
    local_rows, local_vecs = _content(tmp_path / "local")
    ray_rows, ray_vecs = _content(tmp_path / "ray")
    assert ray_rows == local_rows and len(ray_rows) == 24
    worst = max(float(np.abs(ray_vecs[k] - local_vecs[k]).max()) for k in local_vecs)
    assert worst < 1e-5, worst
    # ids are unique and come from ids.json; a second Ray run adds nothing (every photo is stored)
    code = main(["index", "build", "--dataset", "folder", "--root", str(photo_root), "--index", str(tmp_path / "ray"),
                 "--encoder", MOBILENET_SPEC, "--precision", "fp32", "--engine", "ray", "-q"])
    out = capsys.readouterr().out
    assert code == 0 and "added 0, skipped 1 unreadable, 25 already in the gallery" in out, out


def test_a_ray_build_says_which_photos_were_read_from_their_first_frame_or_page(cluster, tmp_path, capsys):
    """Re-read s57 core #1: ``decode_batch`` kept the tensor, digest and error of ``prepare`` but not its note, so a
    Ray build stored an animated GIF or a TIFF of several pages without a word; it says them as the local build
    does (test_blank_references: the local half)."""
    from _cli_support import ENCODER, _photo, _run
    from test_blank_references import COBRA, _several

    root = tmp_path / "photos"
    for i in range(3):
        _photo(root / COBRA / f"{i}.png", i, side=64)
    notes = _several(root / COBRA)
    code, out, _ = _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", tmp_path / "g",
                        *ENCODER, "--engine", "ray", "--ray-actors", "2", "-q")
    assert code == 0 and "added 5," in out, out
    for name, note in notes.items():
        assert f"note: {root / COBRA / name}: {note}\n" in out, out


def test_ivfpq_shards_as_ray_tasks_answer_like_one_process(cluster, tmp_path):
    from index import ivfpq
    from index.gallery import Gallery
    from index.records import ReferenceRecord
    from index.vectors import VectorIndexConfig
    from retrieval.distributed import ray_map

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((30, 32))
    x = centres[rng.integers(0, 30, 3000)] + 0.5 * rng.standard_normal((3000, 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    galleries = []
    for name, map_fn, rows in (("serial", None, 10_000), ("ray", ray_map, 700)):
        g = Gallery.create(tmp_path / name, {"spec": "t", "fingerprint": "t#0", "dim": 32},
                           index_config=VectorIndexConfig(kind="ivfpq", shard_rows=rows, ivfpq_nprobe=4))
        g.add([ReferenceRecord(path=f"/p/{i}.jpg", species=f"G s{i % 30}") for i in range(3000)],
              [f"{i:064x}" for i in range(3000)], x)
        g.finish_build(map_fn=map_fn)  # ray: 5 shards read from the store by Ray tasks, merged here
        galleries.append(g)
    serial, ray_built = galleries
    assert ray_built.index.kind == serial.index.kind == ivfpq.KIND
    queries = x[:100] + 0.05 * rng.standard_normal((100, 32)).astype(np.float32)
    d1, i1 = serial.index.search(queries, 10)
    d2, i2 = ray_built.index.search(queries, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)


def test_ray_workers_embed_a_fine_tuned_network_at_the_size_its_run_chose(cluster, photo_root, tmp_path, capsys):
    import json

    from conftest import MOBILENET as MOBILENET_DIR

    from retrieval.encoders import create_encoder

    # a folder as `speciesid finetune` writes it when its run chose 256 px (the real MobileNetV1 weights inside)
    model = tmp_path / "ft"
    model.mkdir()
    (model / "model.safetensors").symlink_to(MOBILENET_DIR / "model.safetensors")
    cfg = json.loads((MOBILENET_DIR / "config.json").read_text())
    cfg["pretrained_cfg"]["test_input_size"] = [3, 256, 256]
    cfg["speciesid"] = {"test_size": {"size": 256, "candidates": [224, 256]}}
    (model / "config.json").write_text(json.dumps(cfg))
    assert create_encoder(f"timm:local-dir:{model}", precision="fp32").input_size == 256
    for engine in ("local", "ray"):
        code = main(["index", "build", "--dataset", "folder", "--root", str(photo_root), "--index",
                     str(tmp_path / engine), "--encoder", f"timm:local-dir:{model}", "--precision", "fp32",
                     "--runtime", "torch", "--engine", engine, "--ray-actors", "2", "--batch-size", "8", "-q"])
        out = capsys.readouterr().out
        assert code == 0 and "24 references, 3 species" in out, (engine, out)
    from index.gallery import Gallery

    prints = {engine: Gallery.open(tmp_path / engine).fingerprint for engine in ("local", "ray")}
    assert prints["ray"] == prints["local"] and prints["ray"].endswith("+size=256"), prints
    _, local_vecs = _content(tmp_path / "local")
    _, ray_vecs = _content(tmp_path / "ray")
    worst = max(float(np.abs(ray_vecs[k] - local_vecs[k]).max()) for k in local_vecs)
    assert worst < 1e-5, worst


def test_ray_refusals_come_before_a_gallery_is_made(cluster, photo_root, tmp_path, capsys):
    from retrieval.distributed import RayOptions, actor_count

    code = main(["index", "build", "--dataset", "folder", "--root", str(photo_root), "--index", str(tmp_path / "rv"),
                 "--encoder", MOBILENET_SPEC, "--engine", "ray", "--views", "flip", "-q"])
    assert code == 2 and "views 'flip' need --engine local" in capsys.readouterr().err
    assert not (tmp_path / "rv").exists()  # the corrected command is not refused by a half-made gallery
    (tmp_path / "empty").mkdir()  # nothing to build: refused as the local build refuses it, no gallery made
    code = main(["index", "build", "--dataset", "folder", "--root", str(tmp_path / "empty"), "--index",
                 str(tmp_path / "re"), "--encoder", MOBILENET_SPEC, "--engine", "ray", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "no photos found under" in err and "point --root at such a folder" in err, err
    assert not (tmp_path / "re").exists()
    # actors holding every CPU of a cluster leave none for the decode and write tasks: refused, not a hang
    assert actor_count(2.0, RayOptions(address="auto")) == 1 and actor_count(40.0, RayOptions(address="auto")) == 8
    assert actor_count(3.0, RayOptions()) == 2  # a local Ray is sized for its actors
    assert actor_count(4.0, RayOptions(address="auto"), gpus=8.0, per_gpu=1.0) == 3  # a GPU each, a CPU left
    with pytest.raises(ValueError, match="leave none of this Ray cluster's 2 CPUs .* give --ray-actors 1 or fewer"):
        actor_count(2.0, RayOptions(address="auto", actors=2))
    with pytest.raises(ValueError, match="use a cluster of 2 CPUs or more"):
        actor_count(1.0, RayOptions(address="auto"))


def test_stored_paths_and_the_store_are_absolute_for_workers_elsewhere(tmp_path, monkeypatch):
    from index.store import ReferenceStore, source_text

    monkeypatch.chdir(tmp_path)
    assert source_text("photos/a.jpg") == str(tmp_path / "photos" / "a.jpg")
    assert source_text("s3://bucket/a.jpg") == "s3://bucket/a.jpg"
    assert ReferenceStore("g/store", 4).uri == f"{tmp_path}/g/store/references.lance"


def test_a_worker_marks_a_non_finite_embedding_as_an_error_before_any_fragment_is_written():
    """A Ray build commits what its writers stage: a NaN / inf row must be a failed photo by then (a gallery holding
    one could not be opened again)."""
    from retrieval.distributed import Embedder
    from retrieval.pipeline import NON_FINITE

    class _Stub:
        dim = 4

        def encode_batch(self, x):
            out = np.ones((len(x), 4), dtype=np.float32) / 2
            out[0, 1] = np.nan
            return out

    embedder = object.__new__(Embedder)  # the model is a stub: no actor, no weights
    embedder.encoder = _Stub()
    batch = {"pos": np.arange(3), "tensor": np.zeros((3, 3, 8, 8), np.float32),
             "error": np.asarray(["", "", "cannot be read"], dtype=object)}
    out = embedder(batch)
    assert list(out["error"]) == [NON_FINITE, "", "cannot be read"]
    assert np.isfinite(out["embedding"]).all() and "tensor" not in out


def test_a_ray_address_where_nothing_answers_is_refused_before_ray_is_asked(monkeypatch):
    """``ray.init`` retries an address where nothing listens for minutes, printing only Ray's own lines: the address
    is tried first, and refused with what to check."""
    import socket

    from retrieval import distributed
    from retrieval.distributed import RayOptions, check_ray_address, start_ray

    calls = []

    class FakeRay:
        @staticmethod
        def is_initialized() -> bool:
            return False

        @staticmethod
        def init(**kwargs) -> None:
            calls.append(kwargs)

    monkeypatch.setattr(distributed, "_ray", lambda: FakeRay)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(ValueError, match=f"nothing answers at the Ray address {address} .*leave --ray-address out"):
            start_ray(RayOptions(address=address))
    assert calls == []
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        check_ray_address("head-node")
    with socket.socket() as server:  # something listening: let through to Ray
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_ray_address(f"127.0.0.1:{server.getsockname()[1]}")
    check_ray_address("auto")


def test_a_ray_build_prints_its_summary_without_rays_notices(photo_root, tmp_path):
    """A successful Ray build's terminal shows the build's own lines, not Ray's notices of what the build chose:
    the progress bars it turns off, the token authentication a local Ray turns on, the pool's "fewer inputs than
    actors" warning (a chunk of fewer batches than actors: the pool is sized to the batches). Problems with
    photos are still said."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "api.cli", "index", "build", "--dataset", "folder", "--root",
                          str(photo_root), "--index", str(tmp_path / "g"), "--encoder", MOBILENET_SPEC,
                          "--precision", "fp32", "--engine", "ray", "--ray-actors", "2", "-q"],
                         cwd=repo, capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "added 24, skipped 1 unreadable, 1 duplicates within this run" in out and "zz-corrupt.jpg" in out and "zz-gone.jpg" in out
    for notice in ("Progress bars disabled", "Token authentication is enabled",
                   "The minimum number of concurrent actors", "UserWarning", "DeprecationWarning"):
        assert notice not in out, out


def test_a_chunk_that_is_not_committed_takes_its_workers_files_with_it(cluster, photo_root, tmp_path, monkeypatch):
    """A chunk whose commit fails leaves none of the data files its workers wrote (they waited 7 days for Lance's
    cleanup); the files of the committed chunk before it stay, and so does the gallery."""
    import lance

    from index.gallery import Gallery

    index = tmp_path / "g"
    args = ["index", "build", "--dataset", "folder", "--root", str(photo_root), "--index", str(index),
            "--encoder", MOBILENET_SPEC, "--precision", "fp32", "--engine", "ray", "--ray-actors", "2",
            "--chunk-rows", "12", "--batch-size", "8", "-q"]
    calls = []
    real = Gallery.commit_fragments

    def second_fails(self, fragments, digests):
        calls.append(len(fragments))
        if len(calls) == 2:
            raise OSError("the store went away")
        return real(self, fragments, digests)

    monkeypatch.setattr(Gallery, "commit_fragments", second_fails)
    assert main(args) != 0 and len(calls) == 2 and calls[1] > 0
    g = Gallery.open(index)
    data = g.store.uri + "/data"
    committed = {f.path for frag in lance.dataset(g.store.uri).get_fragments()
                 for f in frag.metadata.files}
    assert committed and set(Path(data).iterdir()) == {Path(data) / name for name in committed}
    assert not list(index.glob(JOURNAL_GLOB))


@pytest.fixture(autouse=True)
def _machine_id(monkeypatch):
    """Journals are swept only on the machine that wrote them, told by its machine id: a machine without one
    (a bare container) stands in with a fixed id, so these tests run the same there."""
    from index import fragments

    if fragments._machine_id() is None:
        monkeypatch.setattr(fragments, "_machine_id", lambda: "0" * 32)


def _killed(pending) -> None:
    """What a SIGKILL of its driver leaves of a journal: the lock goes with the process, the file stays (this
    process stands for the dead one: it no longer holds the journal)."""
    import os

    from index import fragments

    os.close(pending._fd)
    pending._fd = None
    fragments._LIVE.discard(pending.path.name)


def _table(tmp_path: Path):
    import lance
    import pyarrow as pa

    uri = str(tmp_path / "t.lance")
    table = pa.table({"a": pa.array([1, 2, 3], pa.int64())})
    lance.write_dataset(table, uri)
    return uri, table


def _data_files(uri: str) -> set[str]:
    return {p.name for p in Path(uri, "data").iterdir()}


def _rewrite_head(journal: Path, **changes) -> None:
    """Change fields of a journal's first line (its writer's record)."""
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join([json.dumps({**json.loads(lines[0]), **changes}), *lines[1:]]) + "\n")


def _killed_journal(tmp_path: Path) -> tuple[str, PendingFiles]:
    """A table at ``tmp_path`` with one fragment written for a build whose driver was killed before its commit:
    (the table's URI, the build's journal, left behind)."""
    from index.fragments import PendingFiles, write_fragments

    uri, table = _table(tmp_path)
    pending = PendingFiles(tmp_path, uri, 1)
    pending.add(write_fragments(table, uri))
    _killed(pending)
    return uri, pending


def test_the_journal_of_a_killed_build_removes_only_its_own_uncommitted_files(tmp_path):
    """A driver killed before its commit leaves its journal: the next build removes the files named there that
    no later version references, and nothing else (not another build's files, nor those of a journal still held
    by a running build, nor committed ones)."""
    import lance

    from index.fragments import PendingFiles, commit_fragments, fragment_files, sweep_pending, write_fragments

    uri, table = _table(tmp_path)
    base = _data_files(uri)
    killed = PendingFiles(tmp_path, uri, 1)
    lost = write_fragments(table, uri)
    killed.add(lost)
    _killed(killed)
    running = PendingFiles(tmp_path, uri, 1)  # a build still at work holds its journal
    busy = write_fragments(table, uri)
    running.add(busy)
    stranger = write_fragments(table, uri)  # another writer's files, in no journal
    done = PendingFiles(tmp_path, uri, 1)  # committed, then killed before the journal went
    kept = write_fragments(table, uri)
    done.add(kept)
    commit_fragments(uri, kept, 1)
    _killed(done)
    before = _data_files(uri)
    assert sweep_pending(tmp_path, uri) == 1
    gone = before - _data_files(uri)
    assert gone == {name.split("/", 1)[1] for name in fragment_files(lost)}
    assert base <= _data_files(uri) and len(list(tmp_path.glob(JOURNAL_GLOB))) == 1  # the running build's
    assert lance.dataset(uri).count_rows() == 6
    running.committed()
    assert not list(tmp_path.glob(JOURNAL_GLOB)) and stranger


def test_a_copied_folder_never_sweeps_a_running_builds_files(tmp_path, caplog):
    """A gallery folder copied while a Ray build runs carries its journal, unlocked. Before, the copy's next build
    deleted the files the running build was about to commit (on S3 both name the same store)."""
    import shutil

    from index.fragments import PendingFiles, sweep_pending, write_fragments

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    uri, table = _table(tmp_path)
    running = PendingFiles(a, uri, 1)
    running.add(write_fragments(table, uri))
    shutil.copytree(a, b)  # on this host: the build's pid is alive (here: this process, which holds it)
    files = _data_files(uri)
    assert sweep_pending(b, uri) == 0 and _data_files(uri) == files and list(b.glob(JOURNAL_GLOB))
    # a journal written on another host is left alone, saying how to remove it by hand
    journal = next(b.glob(JOURNAL_GLOB))
    _rewrite_head(journal, host="build-host", pid=1)
    caplog.set_level("INFO", logger="index.fragments")
    assert sweep_pending(b, uri) == 0 and _data_files(uri) == files and journal.exists()
    assert "written by a build on host build-host" in caplog.text and f"rm '{journal}'" in caplog.text
    running.committed()


def test_a_journal_of_another_machine_with_this_hostname_is_never_swept(tmp_path, caplog):
    """Hostnames repeat (cloned VMs, containers given one hostname): a journal naming this hostname, another boot
    and a pid that is not running was read as 'this machine restarted, its writer is gone', and a build possibly
    still running on the other machine lost its files (review 2, A). Only this machine's id, on an earlier boot,
    means gone."""
    import uuid

    from index import fragments
    from index.fragments import sweep_pending

    uri, pending = _killed_journal(tmp_path)
    files = _data_files(uri)
    caplog.set_level("INFO", logger="index.fragments")
    pid = 2 ** 22 + 7  # over Linux's pid_max: no such process here
    for other in ({"machine": "f" * 32}, {"machine": None}):  # another machine; one that recorded no machine id
        _rewrite_head(pending.path, boot=str(uuid.uuid4()), pid=pid, **other)
        assert sweep_pending(tmp_path, uri) == 0 and _data_files(uri) == files and pending.path.exists()
        assert "on another machine or container" in caplog.text and f"rm '{pending.path}'" in caplog.text
        caplog.clear()
    # this machine, the same boot, another pid namespace (another container on this kernel): not ours to judge
    _rewrite_head(pending.path, machine=fragments._machine_id(), boot=fragments._boot_id(), pidns="pid:[1]")
    assert sweep_pending(tmp_path, uri) == 0 and pending.path.exists()
    # this machine, written on an earlier boot (last written before this one began): its writer is gone
    _rewrite_head(pending.path, pidns=fragments._pid_namespace(), boot=str(uuid.uuid4()))
    _before_this_boot(pending.path)
    assert sweep_pending(tmp_path, uri) == 1 and _data_files(uri) != files and not pending.path.exists()


def _before_this_boot(journal: Path) -> None:
    """Date a journal's last write to before this machine booted (as one written on an earlier boot is)."""
    import os

    from index import fragments

    booted = fragments._boot_time()
    if booted is None:
        pytest.skip("no boot time here (/proc/stat): a journal of another boot is never swept")
    os.utime(journal, (booted - 3600, booted - 3600))


def test_a_journal_of_another_boot_written_since_this_boot_is_another_machines(tmp_path, caplog):
    """Machine ids are copied (cloned VMs, images that bake one in): a journal naming this hostname, this machine id
    and another boot was read as 'this machine restarted' and swept, though a build on a clone may still run. It is
    judged gone only when last written before this machine booted."""
    import uuid

    from index import fragments
    from index.fragments import sweep_pending

    uri, pending = _killed_journal(tmp_path)
    files = _data_files(uri)
    _rewrite_head(pending.path, boot=str(uuid.uuid4()), pid=2 ** 22 + 7)  # written just now, on another boot
    caplog.set_level("INFO", logger="index.fragments")
    assert sweep_pending(tmp_path, uri) == 0 and _data_files(uri) == files and pending.path.exists()
    assert "on another machine or container" in caplog.text
    head = json.loads(pending.path.read_text().splitlines()[0])
    assert fragments._writer_state(head, pending.path.name) == "another"  # when it was written is not known
    _before_this_boot(pending.path)
    assert sweep_pending(tmp_path, uri) == 1 and _data_files(uri) != files and not pending.path.exists()


def test_a_placeholder_machine_id_is_no_machine_id(tmp_path, monkeypatch):
    """systemd's literal ``uninitialized`` (an image not booted yet), shared by every machine made from that image,
    was taken for this machine's id; so were blank and non-hex text."""
    from index import fragments

    etc, dbus = tmp_path / "machine-id", tmp_path / "dbus-machine-id"
    monkeypatch.setattr(fragments, "MACHINE_ID_FILES", (str(etc), str(dbus)))
    for text in ("uninitialized\n", "  \n", "not a machine id\n", ""):
        etc.write_text(text)
        assert read_machine_id() is None, text
    dbus.write_text("3D1219C7C4C5404AAA1F6D2A48ADFDA4\n")  # D-Bus's, when systemd's is a placeholder
    assert read_machine_id() == "3D1219C7C4C5404AAA1F6D2A48ADFDA4"
    etc.write_text("0123456789abcdef0123456789abcdef\n")
    assert read_machine_id() == "0123456789abcdef0123456789abcdef"


def test_a_machine_without_a_machine_id_sweeps_no_journal(tmp_path, monkeypatch, caplog):
    from index import fragments
    from index.fragments import sweep_pending

    uri, pending = _killed_journal(tmp_path)
    _rewrite_head(pending.path, pid=2 ** 22 + 7)  # a writer gone
    monkeypatch.setattr(fragments, "_machine_id", lambda: None)
    caplog.set_level("INFO", logger="index.fragments")
    assert sweep_pending(tmp_path, uri) == 0 and pending.path.exists()
    assert "without a machine id, /etc/machine-id or /var/lib/dbus/machine-id" in caplog.text


def test_a_journal_written_without_proc_says_to_remove_it_by_hand(tmp_path, caplog):
    """Without /proc at write time (no boot id, no start time) a pid that runs may be another process: the journal
    was held as 'a build still running on this host' for ever; now it says that it cannot be told, and what to do."""
    import os

    from index.fragments import sweep_pending

    uri, pending = _killed_journal(tmp_path)
    _rewrite_head(pending.path, boot=None, started=None, pid=os.getppid())  # a live pid: perhaps not that build
    caplog.set_level("INFO", logger="index.fragments")
    assert sweep_pending(tmp_path, uri) == 0 and pending.path.exists()
    assert "whether that build still runs cannot be told" in caplog.text
    assert f"once no build runs into this gallery, delete it by hand (rm '{pending.path}')" in caplog.text.lower()
    assert "still running on this host" not in caplog.text


_KILLED_DRIVER = """
import os, signal, sys
import lance, pyarrow as pa
from index.fragments import PendingFiles, write_fragments
folder, uri = sys.argv[1], sys.argv[2]
pending = PendingFiles(folder, uri, 1)
pending.add(write_fragments(pa.table({"a": pa.array([7], pa.int64())}), uri))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_journal_of_a_driver_really_killed_on_this_host_is_swept(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    from index.fragments import sweep_pending

    if read_machine_id() is None:
        pytest.skip("this machine has no machine id: journals are never swept here (they are another machine's)")
    uri, _ = _table(tmp_path)
    base = _data_files(uri)
    run = subprocess.run([sys.executable, "-c", _KILLED_DRIVER, str(tmp_path), uri], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == -9, run.stderr[-2000:]
    (journal,) = tmp_path.glob(JOURNAL_GLOB)
    assert json.loads(journal.read_text().splitlines()[0])["pid"] != __import__("os").getpid()
    assert len(_data_files(uri) - base) == 1
    assert sweep_pending(tmp_path, uri) == 1 and _data_files(uri) == base and not journal.exists()


def test_an_abandon_that_cannot_remove_the_files_keeps_the_journal_for_the_next_build(tmp_path, monkeypatch):
    """Before, the journal went even when removing the files failed (the store unreachable): they stayed for Lance's
    7-day cleanup, and the warning named a journal that was gone."""
    import index.fragments as fragments
    from index.fragments import PendingFiles, sweep_pending, write_fragments

    uri, table = _table(tmp_path)
    base = _data_files(uri)
    pending = PendingFiles(tmp_path, uri, 1)
    pending.add(write_fragments(table, uri))
    real = fragments.remove_uncommitted

    def unreachable(*args, **kwargs):
        raise OSError("the store went away")

    monkeypatch.setattr(fragments, "remove_uncommitted", unreachable)
    with pytest.raises(OSError, match="went away"):
        pending.abandon()
    assert pending.path.exists() and _data_files(uri) != base
    monkeypatch.setattr(fragments, "remove_uncommitted", real)
    assert sweep_pending(tmp_path, uri) == 1 and _data_files(uri) == base and not pending.path.exists()


def test_a_journal_that_cannot_be_locked_or_written_is_not_left_behind(tmp_path, monkeypatch):
    """Before, a flock or first write that failed leaked the journal's descriptor and left an empty, unlocked journal
    that every later sweep warned about ('names another store (None)')."""
    import os
    import types

    from index import fragments
    from index.fragments import PendingFiles

    def refused(*args, **kwargs):
        raise OSError("no locks on this filesystem")

    for patch in (("fcntl", types.SimpleNamespace(flock=refused, LOCK_EX=2)), ("_owner", refused)):
        open_fds = len(os.listdir("/proc/self/fd"))
        with monkeypatch.context() as m:
            m.setattr(fragments, *patch)
            with pytest.raises(OSError, match="no locks"):
                PendingFiles(tmp_path, str(tmp_path / "t.lance"), 1)
        assert not list(tmp_path.glob(JOURNAL_GLOB)) and not fragments._LIVE, patch[0]
        assert len(os.listdir("/proc/self/fd")) == open_fds, patch[0]


def test_a_sweep_that_fails_is_a_warning_and_the_build_goes_on(tmp_path, monkeypatch, caplog):
    """A journal whose store cannot be opened now: a warning, the journal kept for later; before, every Ray build
    failed before it started, for as long as the journal stayed."""
    import types

    import index.fragments as fragments
    from index.fragments import PendingFiles, sweep_pending
    from retrieval.distributed import sweep_quietly

    uri = str(tmp_path / "gone.lance")  # no dataset there
    pending = PendingFiles(tmp_path, uri, 1)
    pending._append({"files": ["data/x.lance"]})
    _killed(pending)
    caplog.set_level("WARNING")
    assert sweep_pending(tmp_path, uri) == 0
    assert "left " in caplog.text and pending.path.exists()

    def broken(*args, **kwargs):
        raise RuntimeError("pylance broke")

    monkeypatch.setattr(fragments, "sweep_pending", broken)
    gallery = types.SimpleNamespace(root=tmp_path, store=types.SimpleNamespace(uri=uri), storage_options={})
    assert sweep_quietly(gallery) == 0 and "this build goes on" in caplog.text


def test_the_check_of_uncommitted_files_reads_few_versions(tmp_path, monkeypatch):
    """Files committed in the latest version: one version read. Files in no version, many versions since: at most
    ``limit`` read, and the files are kept for Lance's cleanup (never deleted unchecked)."""
    import lance

    from index.fragments import commit_fragments, fragment_files, remove_uncommitted, write_fragments

    uri, table = _table(tmp_path)
    for _ in range(6):
        lance.write_dataset(table, uri, mode="append")
    since = lance.dataset(uri).version
    read = []
    real = lance.LanceDataset.checkout_version

    def counting(self, version):
        read.append(version)
        return real(self, version)

    monkeypatch.setattr(lance.LanceDataset, "checkout_version", counting)
    done = write_fragments(table, uri)
    commit_fragments(uri, done, since)
    names = fragment_files(done)
    assert remove_uncommitted(uri, names, 1) == 0 and read == []  # found in the latest version, opened anyway
    lost = write_fragments(table, uri)
    lost_names = fragment_files(lost)
    assert remove_uncommitted(uri, lost_names, 1, limit=3) == 0 and len(read) == 2  # the latest + 2 checked out
    assert {n.split("/", 1)[1] for n in lost_names} <= _data_files(uri)
    assert remove_uncommitted(uri, lost_names, since) == 1 and not {n.split("/", 1)[1] for n in lost_names} & \
        _data_files(uri)


def test_a_failed_ray_build_closes_its_progress_bar(monkeypatch):
    """A chunk that fails (a store outage, a Ray task error) left the bar's line open, and main()'s
    ``speciesid: error: ...`` was printed onto it: the bar is closed however the build ends."""
    from types import SimpleNamespace

    import retrieval.distributed as distributed
    from index.records import ReferenceRecord

    bars = []

    class Bar:
        def __init__(self, *args, **kwargs):
            self.closed = False
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

        def set_postfix_str(self, *args, **kwargs):
            pass

        def close(self):
            self.closed = True

    def chunk_fails(*args, **kwargs):
        raise RuntimeError("a Ray task failed")

    monkeypatch.setattr(distributed, "tqdm", Bar)
    monkeypatch.setattr(distributed, "_ray", lambda: None)
    monkeypatch.setattr(distributed, "check_gallery_encoder", lambda *a: None)
    monkeypatch.setattr(distributed, "plan_cluster", lambda *a: (None, 1, 0.0))
    monkeypatch.setattr(distributed, "sweep_quietly", lambda *a: 0)
    monkeypatch.setattr(distributed, "_records_table", chunk_fails)
    gallery = SimpleNamespace(root=Path("g"), info={}, store=None)
    encoder = SimpleNamespace(fingerprint="f", batch_size=2)
    records = [ReferenceRecord(path=Path("a.jpg"), species="Naja haje")]
    with pytest.raises(RuntimeError, match="a Ray task failed"):
        distributed.ray_add_references(gallery, None, records, encoder=encoder, total=1)
    assert len(bars) == 1 and bars[0].closed
