"""What ``speciesid evaluate`` says about its protocol, and what ``probe train --val-root`` selects on.

The small real MobileNetV1 gallery of the API tests (4 ph-snakes species, 10 train photos each); val photos of the
same species, symlinked or copied into tmp.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from _api_support import SPECIES, gallery_copy, photos
from conftest import MOBILENET, needs_shared

from api.cli import main
from retrieval.encoders import EncoderConfig

pytestmark = pytest.mark.slow


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return code, out


def _val(root, n: int = 3):
    """``n`` val photos of each gallery species, copied (the tests move and delete them)."""
    for folder in SPECIES:
        (root / folder).mkdir(parents=True)
        for f in photos("val", folder, n):
            shutil.copy(f, root / folder / f.name)
    return root


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _digests(root) -> list[str]:
    from index.photos import find_photos

    return [_sha256(p) for p in find_photos(root)]


def _photo_list(path, photos) -> None:
    """A fine-tuning run's photo list (path, species, sha256), as ``finetune`` writes it."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "species", "sha256"])
        writer.writerows([str(p), "x", _sha256(p)] for p in photos)


def test_the_photos_that_chose_the_settings_are_known_after_their_folder_is_gone(tmp_path_factory, tmp_path, capsys):
    """The selection photos' digests are stored with the probe: evaluating them from another folder is "YES"
    after the --val-root folder is gone (it was "no": they were matched by the folder's photos only while it
    existed); a probe from before the record says how it matched, or that it cannot tell."""
    from retrieval.probe import LinearProbe

    index = gallery_copy(tmp_path_factory, "protocol_chose")
    val = _val(tmp_path / "val")
    _run(capsys, "probe", "train", "--index", index, "--val-root", val, "-q")
    digests = _digests(val)
    moved = tmp_path / "moved"
    val.rename(moved)  # the folder that chose the settings is gone; the same photos are evaluated from elsewhere
    _, out = _run(capsys, "evaluate", "--index", index, "--dataset", "folder", "--root", moved, "--report",
                  tmp_path / "report", "-q")
    assert "protocol: evaluated photos used to choose settings: YES" in out
    assert f"chosen on the validation photos {val} (12 of the evaluated photos are among them)" in out
    recorded = LinearProbe.load(index).calibration.selection_sha256
    assert sorted(recorded) == sorted(digests) and len(recorded) == 12
    # a probe saved before the digests were recorded: matched by the folder's photos, and it says so
    meta = json.loads((index / "probe.json").read_text())
    meta["settings"].pop("selection_sha256")
    (index / "probe.json").write_text(json.dumps(meta))
    _, out = _run(capsys, "evaluate", "--index", index, "--dataset", "folder", "--root", moved, "--report",
                  tmp_path / "report", "-q")
    assert f"{val} (gone, and their digests were not recorded when they chose: whether the evaluated photos are " \
        "among them cannot be told)" in out
    moved.rename(val)
    shutil.copytree(val, tmp_path / "copy")
    _, out = _run(capsys, "evaluate", "--index", index, "--dataset", "folder", "--root", tmp_path / "copy",
                  "--report", tmp_path / "report", "-q")
    assert (f"{val} (12 of the evaluated photos are among them; matched by the photos in that folder now: their "
            "digests were not recorded when they chose)") in out


def test_probe_train_leaves_out_val_photos_the_gallery_holds(tmp_path_factory, tmp_path, capsys):
    """A --val-root photo that is a copy (same bytes) or a near-copy (same pixels, other bytes) of a gallery photo
    finds itself among the references: it is left out of the selection, said, and kept with --keep-duplicates."""
    from PIL import Image

    from retrieval.probe import LinearProbe

    index = gallery_copy(tmp_path_factory, "protocol_dedup")
    val = _val(tmp_path / "val")
    twin = photos("train", SPECIES[0], 1)[0]
    copy = shutil.copy(twin, val / SPECIES[0] / "copy_of_a_gallery_photo.jpg")
    near = val / SPECIES[1] / "near_copy.png"
    with Image.open(photos("train", SPECIES[1], 1)[0]) as img:
        img.convert("RGB").save(near)
    _, out = _run(capsys, "probe", "train", "--index", index, "--val-root", val, "-q")
    assert ("validation photos left out, the gallery holds them: 2 (1 same bytes, 1 near-copy; --keep-duplicates "
            "to keep them; -v lists them all):") in out
    assert str(copy) in out and str(near) in out
    assert "selection top-1 (12 queries)" in out
    recorded = LinearProbe.load(index).calibration.selection_sha256
    assert len(recorded) == 12 and _sha256(copy) not in recorded and _sha256(near) not in recorded
    _, out = _run(capsys, "probe", "train", "--index", index, "--val-root", val, "--keep-duplicates", "-q")
    assert "selection top-1 (14 queries)" in out and "left out" not in out
    # only copies of gallery photos: nothing left to choose on, said plainly
    only = tmp_path / "only"
    (only / SPECIES[0]).mkdir(parents=True)
    shutil.copy(twin, only / SPECIES[0])
    assert main(["probe", "train", "--index", str(index), "--val-root", str(only), "-q"]) == 2
    assert "are already in the gallery (same bytes or near-copies)" in capsys.readouterr().err


def test_the_photos_left_out_are_named_a_few_and_counted(capsys):
    """Every dropped --val-root path went on one line (thousands, for a val folder copied from the gallery)."""
    from types import SimpleNamespace

    from api.cli.probe import _emit_dropped

    dropped = [f"/val/{i}.jpg" for i in range(8)]
    _emit_dropped(SimpleNamespace(dropped=dropped, dropped_kinds={"same bytes": 8}))
    out = capsys.readouterr().out
    assert out.strip().endswith("/val/0.jpg, /val/1.jpg, /val/2.jpg, /val/3.jpg, /val/4.jpg, ... (3 more)")
    assert "/val/5.jpg" not in out and "-v lists them all" in out


@pytest.fixture(scope="module")
def finetuned_gallery(tmp_path_factory):
    """A gallery of a network 'fine-tuned here': the MobileNetV1 weights in a run folder whose config.json has the
    run's ``speciesid`` record (its held-out photos chose the epoch), built from the small gallery's photos."""
    needs_shared()
    from retrieval.encoders import EncoderConfig
    from retrieval.workflows import build_gallery

    run = tmp_path_factory.mktemp("protocol_run") / "ft"
    run.mkdir()
    os.symlink(MOBILENET / "model.safetensors", run / "model.safetensors")
    cfg = json.loads((MOBILENET / "config.json").read_text())
    cfg["speciesid"] = {"val_source": "split:0.2", "best_epoch": 3, "init": f"timm:local-dir:{MOBILENET}"}
    (run / "config.json").write_text(json.dumps(cfg))
    root = tmp_path_factory.mktemp("protocol_train")
    for folder in SPECIES:
        (root / folder).mkdir()
        for f in photos("train", folder, 4):
            os.symlink(f, root / folder / f.name)
    index = tmp_path_factory.mktemp("protocol_ft_gallery") / "g"
    build_gallery(index, "folder", root, encoder=EncoderConfig(spec=f"timm:local-dir:{run}", precision="fp32"),
                  progress=False)
    return index, run


def test_evaluated_photos_that_trained_the_network_are_not_unseen(finetuned_gallery, tmp_path, capsys):
    """Photos that trained a network fine-tuned here but are not in the gallery were counted as unseen: the run
    lists them (trained.csv) and evaluate says how many of the evaluated photos trained the network."""
    from index.photos import find_photos
    from retrieval.workflows import evaluate_dataset, open_identifier

    index, run = finetuned_gallery
    val = _val(tmp_path / "val")
    evaluated = sorted(find_photos(val))
    ident = open_identifier(index, EncoderConfig(precision="fp32"))

    def evaluate():
        return evaluate_dataset(ident, "folder", val, report_dir=tmp_path / "report", progress=False)

    _photo_list(run / "trained.csv", evaluated[:5])  # 5 of the evaluated photos trained the network
    _photo_list(run / "heldout.csv", evaluated[5:7])  # 2 chose its epoch
    done = evaluate()
    assert (f"network training photos: 5 of the evaluated photos trained the network (matched by content: "
            f"{run / 'trained.csv'}); 5 counted in the figures: these figures over-state accuracy on unseen "
            "photos") in done.protocol
    assert not done.unseen
    network = next(line for line in done.protocol if line.startswith("network: "))
    assert f"held out of its training photos (2 of the evaluated photos are among them, {run / 'heldout.csv'})" \
        in network
    assert "evaluated photos used to choose settings: YES: these figures over-state accuracy on unseen photos" \
        in done.protocol
    # none of them trained it nor chose its epoch: the figures are on unseen photos
    _photo_list(run / "trained.csv", [])
    _photo_list(run / "heldout.csv", [])
    done = evaluate()
    assert "network training photos: 0 of the evaluated photos trained the network (matched by content: " \
        f"{run / 'trained.csv'})" in done.protocol and done.unseen
    # a run from before the lists: it cannot tell, and does not call the figures unseen
    (run / "trained.csv").unlink()
    done = evaluate()
    assert any(line.startswith(f"network training photos: not recorded, the run in {run} listed none")
               for line in done.protocol) and not done.unseen


def _run_folder(folder: Path, init: str, digest: str, lineage: dict | None = None) -> None:
    """A fine-tuning run's folder as evaluate reads it: config.json (its init, and the lineage record of a run that
    carried its init's photos) and trained.csv."""
    folder.mkdir(parents=True)
    record = {"init": init, **({"trained_lineage": lineage} if lineage is not None else {})}
    (folder / "config.json").write_text(json.dumps({"architecture": "x", "speciesid": record}))
    (folder / "trained.csv").write_text(f"path,species,sha256\np.jpg,A a,{digest}\n")


def test_a_stage_1_folder_moved_away_is_said_and_the_figures_are_not_called_unseen(tmp_path):
    """Stage 2 started from stage 1, whose folder was then moved: its training photos dropped out of the count
    without a word, and photos that trained stage 1 were called unseen. A run that carried stage 1's photos into
    its own trained.csv (what finetune writes now) needs no stage-1 folder."""
    from retrieval.protocol import Protocol, network_trained

    s1, s2 = tmp_path / "stage1", tmp_path / "stage2"
    _run_folder(s1, "timm:hf-hub:x", "a" * 64)
    _run_folder(s2, f"timm:local-dir:{s1}", "b" * 64)
    evaluated = ["a" * 64, "b" * 64]
    trained, where, complete = network_trained(f"timm:local-dir:{s2}", evaluated, [0, 1])
    assert (trained, where, complete) == ([0, 1], f"{s2 / 'trained.csv'}, {s1 / 'trained.csv'}", True)
    shutil.move(s1, tmp_path / "stage1-archived")
    trained, where, complete = network_trained(f"timm:local-dir:{s2}", evaluated[:1], [0])  # a stage-1 photo
    assert trained == [] and not complete
    assert where == (f"{s2 / 'trained.csv'}; the run {s2} started from, timm:local-dir:{s1}, cannot be read (moved "
                     "or deleted), so the photos that trained it are not known")
    protocol = Protocol("s", False, trained=trained, trained_from=where, trained_complete=complete)
    assert not protocol.unseen
    assert any("cannot be told from unseen ones, so these figures are not called unseen" in line
               for line in protocol.lines())
    # stage 2 carried stage 1's photos (the run column) when it trained: stage 1's folder is not needed
    s3 = tmp_path / "stage3"
    _run_folder(s3, f"timm:local-dir:{s1}", "b" * 64, lineage={"carried": [str(s1)], "unlisted": []})
    with (s3 / "trained.csv").open("w") as fh:
        fh.write(f"path,species,sha256,run\nq.jpg,A a,{'b' * 64},\np.jpg,A a,{'a' * 64},{s1}\n")
    assert network_trained(f"timm:local-dir:{s3}", evaluated, [0, 1]) == ([0, 1], str(s3 / "trained.csv"), True)


def test_evaluate_says_how_many_photos_it_could_not_read(tmp_path_factory, tmp_path, capsys):
    """The unreadable photos of the evaluated set are said beside the figures (they were only in the report's
    notes); none unreadable, nothing is said."""
    index = gallery_copy(tmp_path_factory, "protocol_unreadable")
    val = _val(tmp_path / "val", n=2)
    _, out = _run(capsys, "evaluate", "--index", index, "--dataset", "folder", "--root", val, "--report",
                  tmp_path / "report", "-q")
    assert "unreadable" not in out
    for name in ("broken.jpg", "empty.png"):  # 2 photos that cannot be decoded, beside the 8 that can
        (val / SPECIES[0] / name).write_bytes(b"not a photo" if name == "broken.jpg" else b"")
    _, out = _run(capsys, "evaluate", "--index", index, "--dataset", "folder", "--root", val, "--report",
                  tmp_path / "report", "-q")
    assert "photos: 8 evaluated, 2 unreadable, skipped" in out, out


def test_evaluate_says_what_embedded_the_photos(tmp_path_factory, tmp_path, capsys):
    """The figures depend on the runtime, precision and CPU kind that embedded the photos (docs/accuracy.md): the
    printed protocol lines, report.json and report.md say them."""
    from retrieval.cpu import cpu_kind, cpu_model

    index = gallery_copy(tmp_path_factory, "protocol_embedded")
    val = _val(tmp_path / "val", n=1)
    report = tmp_path / "report"
    _, out = _run(capsys, "evaluate", "--index", index, "--dataset", "folder", "--root", val, "--report", report,
                  "--runtime", "torch", "--precision", "fp32", "-q")
    line = f"embedded with: torch fp32 on the CPU (kind {cpu_kind()}, {cpu_model()})"
    assert f"protocol: {line}" in out, out
    data = json.loads((report / "report.json").read_text())
    assert data["embedding"] == {"runtime": "torch", "precision": "fp32", "device": "cpu", "cpu_kind": cpu_kind(),
                                 "cpu": cpu_model()}
    assert f"protocol: {line}" in data["notes"]
    assert f"- protocol: {line}" in (report / "report.md").read_text()


def test_the_embedding_line_names_a_gpu_by_its_device():
    """On CUDA the line names the device, not a CPU kind: from embedding_setup of an encoder whose device is a
    torch.device or a 'cuda...' string (a stub: no GPU needed), and from a recorded setup."""
    from types import SimpleNamespace

    import torch

    from retrieval.protocol import embedding_setup, embedding_text

    assert embedding_text({"runtime": "torch", "precision": "fp16", "device": "cuda:0"}) == "torch fp16 on cuda:0"
    for device, name in ((torch.device("cuda", 0), "cuda:0"), ("cuda", "cuda"), ("cuda:1", "cuda:1")):
        setup = embedding_setup(SimpleNamespace(runtime="torch", precision="fp16", device=device))
        assert setup == {"runtime": "torch", "precision": "fp16", "device": name}  # no cpu_kind, no cpu
        assert embedding_text(setup) == f"torch fp16 on {name}"
    cpu = embedding_setup(SimpleNamespace(runtime="torch", precision="fp32", device=torch.device("cpu")))
    assert "cpu_kind" in cpu and embedding_text(cpu).startswith("torch fp32 on the CPU (kind ")


def test_the_cpu_model_is_read_once_per_process(monkeypatch):
    """embedding_setup runs for every build chunk and every API add: the CPU's model name is read from
    /proc/cpuinfo once (``retrieval.cpu.cpu_model`` cached, as ``cpu_flags`` is), not on every call."""
    from types import SimpleNamespace

    import retrieval.cpu
    from retrieval.protocol import embedding_setup

    getattr(retrieval.cpu.cpu_model, "cache_clear", lambda: None)()  # (the old uncached function has none)
    reads = []
    real = retrieval.cpu._cpuinfo
    monkeypatch.setattr(retrieval.cpu, "_cpuinfo", lambda *keys: reads.append(keys) or real(*keys))
    retrieval.cpu.cpu_flags()  # cached already, or read now: not the reads counted
    reads.clear()
    setups = [embedding_setup(SimpleNamespace(runtime="torch", precision="fp32", device="cpu")) for _ in range(5)]
    assert reads == [("model name",)] and len({s["cpu"] for s in setups}) == 1
