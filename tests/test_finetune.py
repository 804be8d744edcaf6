"""Fine-tuning: the loss falls, the output folder is an encoder and a probe, runs resume, stage 2 from stage 1.

A few photos of 3 ph-snakes species and the real MobileNetV1 trained at 64 px for 2-3 epochs (mechanics, not
accuracy: the accuracy figures are in docs/finetune.md, from benchmarks/bench_finetune.py).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MOBILENET_SPEC, PH_SNAKES, needs_shared, require_module


def _subset(root: Path, species: list[str], n: int, split: str = "train") -> Path:
    for d in species:
        src = PH_SNAKES / split / d
        (root / d).mkdir(parents=True, exist_ok=True)
        for f in sorted(src.iterdir())[:n]:
            os.symlink(f, root / d / f.name)
    return root


def _species_dirs() -> list[str]:
    return sorted(p.name for p in (PH_SNAKES / "train").iterdir())


def _config(root: Path, out: Path, **kw):
    from finetune.config import AugmentConfig, FinetuneConfig

    # mild augmentation and modest rates: 6 steps on 12 photos must make the training loss fall for any seed
    # (RandAugment, lr 0.02/1e-3 and 64-px batch-norm statistics made it rise for some seeds)
    base = dict(root=str(root), out=str(out), init=MOBILENET_SPEC, epochs=3, batch_size=8, train_size=64,
                val_split=0.34, workers=0, freeze_epochs=0, ema=0.0, head_init="random", lr=0.01,
                backbone_lr=1e-4, patience=10, final_eval=False,
                augment=AugmentConfig(scale=(0.7, 1.0), auto_augment=None, color_jitter=0.0))
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    needs_shared()
    return _subset(tmp_path_factory.mktemp("ft_data"), _species_dirs()[:3], 6)


@pytest.fixture(scope="module")
def stage1(tiny_set, tmp_path_factory):
    from finetune.train import finetune

    out = tmp_path_factory.mktemp("ft") / "stage1"
    # stage "global" mechanics (full head, class-balanced sampling) on a tiny set; batch-norm statistics stay
    # frozen here because 64-px batches of 8 would overwrite the 224-px statistics the evaluation uses
    result = finetune(_config(tiny_set, out, stage="global", bn="eval", final_eval=True), progress=False)
    return out, result


def test_loss_falls_and_logs(stage1):
    out, r = stage1
    losses = [h["train_loss"] for h in r.history if h["epoch"] > 0]
    assert len(losses) == 3
    assert losses[-1] < losses[0], losses
    with (out / "log.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2, 3]
    assert {"train_loss", "val_loss", "val_top1", "val_macro_f1", "lr", "seconds"} <= set(rows[0])
    assert (out / "curves.png").stat().st_size > 1000
    assert not (out / "checkpoint.pt").exists()  # removed once the model is written
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["label_names"] == r.species and cfg["num_classes"] == 3
    assert cfg["speciesid"]["stage"] == "global" and cfg["speciesid"]["best_epoch"] == r.best_epoch
    assert cfg["speciesid"]["settings"]["bn"] == "eval" and cfg["speciesid"]["settings"]["balance"] == "sampler"
    assert set(r.final) >= {"head_top1", "knn_top1", "blend_top1"}
    assert r.final["blend_weight"] == 0.5  # its val photos chose the epoch: the weight is the prior, not chosen


def test_output_is_an_encoder_and_a_probe(stage1, tiny_set):
    import timm
    from PIL import Image

    from retrieval.encoders import create_encoder
    from retrieval.probe import LinearProbe

    out, r = stage1
    enc = create_encoder(f"timm:local-dir:{out}", device="cpu", precision="fp32")
    assert enc.dim == 1024
    photos = sorted(p for p in tiny_set.rglob("*.jpg"))[:9]
    images = [Image.open(p).convert("RGB") for p in photos]
    emb = enc.encode_images(images)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    probe = LinearProbe.load(out, expected_fingerprint=enc.fingerprint)
    assert probe.species == r.species and probe.source == f"finetune:{out}"
    assert np.all(probe.bias == 0)
    # timm's own classifier (num_classes from config.json) ranks exactly as the probe on normalised features
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert model.num_classes == 3 and model.pretrained_cfg["label_names"] == r.species
    with torch.no_grad():
        x = torch.from_numpy(np.stack([enc.preprocess(im) for im in images]))
        logits = model(x).numpy()
        feats = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
    assert (logits.argmax(1) == probe.predict_proba(emb).argmax(1)).all()
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    assert np.allclose(logits / norms, probe.logits(emb), atol=1e-3)
    # a different class count drops the saved head cleanly (how stage 2 starts)
    assert timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=5).num_classes == 5


def test_interrupted_run_resumes(tiny_set, tmp_path, capsys):
    from finetune.train import FinetuneInterrupted, finetune

    out = tmp_path / "run"
    cfg = _config(tiny_set, out, epochs=2, ema=0.9)

    def stop_after_first(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(FinetuneInterrupted) as exc:
        finetune(cfg, progress=False, on_epoch_end=stop_after_first)
    assert exc.value.epoch == 1
    assert (out / "checkpoint.pt").is_file() and not (out / "model.safetensors").exists()
    with (out / "log.csv").open() as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [0, 1]
    with pytest.raises(ValueError, match=r"other settings: epochs 2 \(now 3\); ema 0.9 \(now 0.5\); rerun"):
        finetune(_config(tiny_set, out, epochs=3, ema=0.5), progress=False)
    seen, lines = [], []
    capsys.readouterr()
    r = finetune(cfg, progress=True, on_epoch_end=lambda e, row: seen.append(e), report=lines.append)
    assert seen == [2] and r.epochs_run == 2
    # status lines go where the caller says (the CLI prints them between its bars), never straight to stdout
    assert lines[0].startswith(f"resuming {out / 'checkpoint.pt'}: after epoch 1 of 2")
    assert lines[1].startswith("epoch 2: train loss") and "epoch 2:" not in capsys.readouterr().out
    assert [h["epoch"] for h in r.history] == [0, 1, 2]
    # the resumed epoch trains as in a run never stopped (its rates were the stale groups' once: nothing trained)
    whole = finetune(_config(tiny_set, tmp_path / "whole", epochs=2, ema=0.9), progress=False)
    for key in ("lr", "train_loss", "val_loss"):
        assert r.history[2][key] == pytest.approx(whole.history[2][key], rel=1e-4), key
    assert r.history[2]["val_loss"] != pytest.approx(r.history[1]["val_loss"], rel=1e-6)
    with (out / "log.csv").open() as fh:
        assert [int(row["epoch"]) for row in csv.DictReader(fh)] == [0, 1, 2]
    with pytest.raises(ValueError, match="already holds"):
        finetune(cfg, progress=False)


def test_unreadable_photos_are_left_out_and_a_species_with_none_readable_is_named(tmp_path, caplog):
    from finetune.data import PhotoDataset, load_photos
    from finetune.train import finetune

    root = _subset(tmp_path / "photos", _species_dirs()[:3], 4)
    first = sorted(root.iterdir())[0]
    (first / "empty.jpg").write_bytes(b"")
    (first / "notes.jpg").write_text("not a photo")
    r = finetune(_config(root, tmp_path / "run", epochs=1, val_split=0.5), progress=False)
    assert r.epochs_run == 1
    warned = [m for m in caplog.messages if m.startswith("unreadable photo, left out")]
    assert len(warned) == 2 and all("jpg" in m for m in warned)
    with (tmp_path / "run" / "heldout.csv").open() as fh:
        held = [row["path"] for row in csv.DictReader(fh)]
    assert held and not any(p.endswith(("empty.jpg", "notes.jpg")) for p in held)
    # a set too large to decode up front reads photos in the loader: an unreadable one stands in for another
    photos = load_photos("folder", root)
    ds = PhotoDataset(photos, {s: i for i, s in enumerate(photos.species)}, lambda im: im.tobytes(), cache=False)
    bad = photos.paths.index(first / "empty.jpg")
    stand_in = next(j for j in [*range(bad + 1, len(ds)), *range(bad)]  # the next readable photo of its species
                    if ds.targets[j] == ds.targets[bad] and photos.paths[j].name not in ("empty.jpg", "notes.jpg"))
    assert ds[bad] == (ds.image(stand_in).tobytes(), ds.targets[bad])
    assert f"{photos.paths[stand_in]} used in its place" in caplog.messages[-1]
    # a species whose every photo is unreadable is named (it was a DataLoader worker's traceback)
    for f in sorted(p for p in first.iterdir() if p.is_symlink()):
        f.unlink()
        f.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"no training photo of {first.name.split('(')[1][:-1]} could be read"):
        finetune(_config(root, tmp_path / "run2", epochs=1, val_split=0.5), progress=False)


def test_a_photo_over_speciesid_max_pixels_is_left_out_as_unreadable(tmp_path, monkeypatch):
    """Re-read s57 core #2: finetune decoded up to 256 MP whatever SPECIESID_MAX_PIXELS said, so a photo that
    index build skips was trained on. It is read once per dataset and a photo over it is left out, saying why."""
    from PIL import Image

    from finetune.data import LabelledPhotos, PhotoDataset

    (tmp_path / "Naja haje").mkdir()
    small, big = tmp_path / "Naja haje" / "small.png", tmp_path / "Naja haje" / "big.png"
    Image.new("RGB", (300, 300), (90, 120, 60)).save(small)
    Image.new("RGB", (600, 600), (90, 120, 60)).save(big)
    monkeypatch.setenv("SPECIESID_MAX_PIXELS", "200000")
    photos = LabelledPhotos([small, big], ["Naja haje"] * 2)
    ds = PhotoDataset(photos, {"Naja haje": 0}, lambda im: im.size, cache=True)
    monkeypatch.delenv("SPECIESID_MAX_PIXELS")  # read when the dataset was made: not again
    assert ds.preload() == [f"{big}: 600x600 pixels is over the limit of 200,000 (possible decompression bomb): "
                            "save it at most 447 px on its long side"]
    assert ds.paths == [small]
    view = PhotoDataset(photos, {"Naja haje": 0}, lambda im: im.size, cache=False, stand_in=False, max_pixels=200000)
    assert view[0] == ((300, 300), 0) and view[1] is None  # read on its turn: left out as well


def test_stage2_from_stage1_with_other_species(stage1, tiny_set, tmp_path):
    import timm

    from finetune.train import finetune

    out1, r1 = stage1
    local = _subset(tmp_path / "local", _species_dirs()[3:5], 6)
    out2 = tmp_path / "stage2"
    r2 = finetune(_config(local, out2, init=str(out1), epochs=1, head_init="probe", freeze_epochs=1),
                  progress=False)
    assert r2.species != r1.species and len(r2.species) == 2
    cfg = json.loads((out2 / "config.json").read_text())
    assert cfg["label_names"] == r2.species and cfg["speciesid"]["init"] == f"timm:local-dir:{out1}"
    assert timm.create_model(f"local-dir:{out2}", pretrained=True, num_classes=0).num_classes == 0
    # the frozen first epoch leaves the backbone exactly as stage 1 left it
    from retrieval.encoders import create_encoder

    e1 = create_encoder(f"timm:local-dir:{out1}", device="cpu", precision="fp32")
    e2 = create_encoder(f"timm:local-dir:{out2}", device="cpu", precision="fp32")
    assert e1.fingerprint.split("#")[1] == e2.fingerprint.split("#")[1]
    # the photos that trained stage 1 trained stage 2's network too: evaluate counts them for both
    from index.photos import find_photos
    from retrieval.images import sha256_file
    from retrieval.protocol import network_trained

    digests = [sha256_file(p) for p in find_photos(tiny_set)]
    trained, where, complete = network_trained(f"timm:local-dir:{out2}", digests, range(len(digests)))
    assert trained is not None and len(trained) == 12 and complete  # stage 1 held out 6 of the 18 (--val-split 0.34)
    # stage 2's own list carries them (run column): stage 1's folder is no longer needed to know them
    assert where == str(out2 / "trained.csv")
    with (out2 / "trained.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    with (out1 / "trained.csv").open(newline="") as fh:
        stage1_rows = list(csv.DictReader(fh))
    assert [r for r in rows if r["run"] == str(out1)] == [{**r, "run": str(out1)} for r in stage1_rows]
    assert len([r for r in rows if r["run"] == ""]) == cfg["speciesid"]["train_photos"] > 0
    assert cfg["speciesid"]["trained_lineage"] == {"carried": [str(out1)], "unlisted": []}


def test_a_run_lists_the_photos_that_trained_it_and_chose_its_epoch(stage1, tiny_set, tmp_path):
    """``trained.csv``, and ``heldout.csv`` or (with --val-root) ``validation.csv``: what ``speciesid evaluate``
    matches the evaluated photos against by content, wherever they are by then (the --val-root photos were matched
    by their folder only while it existed, and the training photos not at all)."""
    import shutil

    from finetune.train import finetune
    from index.photos import find_photos
    from retrieval.encoders import create_encoder
    from retrieval.images import sha256_file
    from retrieval.protocol import size_origin

    def listed(path: Path) -> list[dict]:
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))

    out, _ = stage1
    trained, held = listed(out / "trained.csv"), listed(out / "heldout.csv")
    assert len(trained) == 12 and len(held) == 6 and all(len(row["sha256"]) == 64 for row in trained + held)
    assert {row["path"] for row in trained}.isdisjoint(row["path"] for row in held)
    assert {row["sha256"] for row in trained + held} == {sha256_file(p) for p in find_photos(tiny_set)}
    val = _subset(tmp_path / "val", _species_dirs()[:3], 2, split="val")
    run = tmp_path / "run"
    finetune(_config(tiny_set, run, epochs=1, val_root=str(val), test_size="train"), progress=False)
    assert len(listed(run / "trained.csv")) == 18 and not (run / "heldout.csv").exists()
    assert {row["sha256"] for row in listed(run / "validation.csv")} == {sha256_file(p) for p in find_photos(val)}
    copy = tmp_path / "copy"
    shutil.copytree(val, copy)
    shutil.rmtree(val)  # the folder that chose the epoch is gone; the same photos are evaluated from a copy
    enc = create_encoder(f"timm:local-dir:{run}", device="cpu", precision="fp32")
    text, chose = size_origin(enc, copy, [sha256_file(p) for p in find_photos(copy)])
    assert chose and text == (f"the epoch kept, chosen by the fine-tuning run on the validation photos {val} (6 of "
                              "the evaluated photos are among them)")


def test_probe_import_into_gallery(stage1, tiny_set, tmp_path):
    from PIL import Image

    from api.cli import main
    from index.layout import EncoderMismatchError
    from retrieval.encoders import EncoderConfig
    from retrieval.protocol import settings_origin
    from retrieval.workflows import build_gallery, import_gallery_probe, open_identifier

    out, r = stage1
    index = tmp_path / "gallery"
    build_gallery(index, "folder", tiny_set, encoder=EncoderConfig(spec=f"timm:local-dir:{out}", precision="fp32"),
                  progress=False)
    val = _subset(tmp_path / "val", _species_dirs()[:3], 3, split="val")
    assert main(["probe", "import", "--index", str(index), "--from", str(out), "--val-root", str(val), "-q"]) == 0
    ident = open_identifier(index, EncoderConfig(precision="fp32"))
    assert ident.probe is not None and ident.probe.source == f"finetune:{out}"
    assert ident.probe.calibration.selected_on.startswith("val:")
    assert 0 < ident.probe.calibration.metrics["head_temperature"] < 10  # calibrated on the val photos
    assert ident.probe.calibration.weight_fixed == ""  # fresh photos (the run chose on its held-out ones): chosen
    answers = ident.identify_images([Image.open(next(val.rglob("*.jpg"))).convert("RGB")])
    assert answers[0].predictions[0].species in r.species
    # without --val-root: the photos the run held out of its training photos (heldout.csv), found in the gallery
    with (out / "heldout.csv").open() as fh:
        held = list(csv.DictReader(fh))
    assert len(held) == 6 and all(len(row["sha256"]) == 64 for row in held)  # --val-split 0.34 of 6 photos: 2 each
    assert {row["species"] for row in held} == set(r.species)
    assert main(["probe", "import", "--index", str(index), "--from", str(out), "-q"]) == 0
    cal = open_identifier(index, EncoderConfig(precision="fp32")).probe.calibration
    assert cal.selected_on == f"val:heldout:6 photos listed in {out / 'heldout.csv'}"
    assert 0 < cal.metrics["head_temperature"] < 10
    # those photos also chose the run's epoch by the head's log-loss: the blend weight stays at the prior
    why = "fixed at the prior 0.5: the photos the run held out also chose its epoch and test size"
    assert cal.blend_weight == 0.5 and cal.weight_fixed == why
    probe = open_identifier(index, EncoderConfig(precision="fp32")).probe
    assert f"rule seq-nll (blend weight {why})" in settings_origin(probe, val)[0]
    assert main(["probe", "import", "--index", str(index), "--from", str(out), "--blend-weight", "choose", "-q"]) == 0
    cal = open_identifier(index, EncoderConfig(precision="fp32")).probe.calibration
    assert cal.weight_fixed == "" and cal.selected_on.startswith("val:heldout:")
    assert main(["probe", "import", "--index", str(index), "--from", str(out), "--blend-weight", "0.3", "-q"]) == 0
    cal = open_identifier(index, EncoderConfig(precision="fp32")).probe.calibration
    assert cal.blend_weight == 0.3 and cal.weight_fixed == "fixed at 0.3 by the caller"
    with pytest.raises(ValueError, match=r"blend weight: give auto, choose or a number from 0 \(kNN only\) to 1 "
                       r"\(head only\), not 1.5"):
        import_gallery_probe(index, out, blend_weight=1.5, progress=False, encoder=EncoderConfig(precision="fp32"))
    assert main(["probe", "import", "--index", str(index), "--from", str(out), "--blend-weight", "half", "-q"]) == 2
    assert open_identifier(index, EncoderConfig(precision="fp32")).probe.calibration.blend_weight == 0.3  # as it was
    # test-time views average the head's input: a --views flip gallery of the same network takes the head
    flip = tmp_path / "flip"
    build_gallery(flip, "folder", tiny_set, encoder=EncoderConfig(spec=f"timm:local-dir:{out}", precision="fp32",
                  views="flip"), progress=False)
    assert main(["probe", "import", "--index", str(flip), "--from", str(out), "-q"]) == 0
    assert open_identifier(flip, EncoderConfig(precision="fp32")).probe.fingerprint.endswith("+views=flip")
    # another pooling is another embedding: refused, saying what to do
    gem = tmp_path / "gem"
    build_gallery(gem, "folder", tiny_set, encoder=EncoderConfig(spec=f"timm:local-dir:{out}", precision="fp32",
                  pool="gem3"), progress=False)
    with pytest.raises(EncoderMismatchError, match="build the gallery without --pool"):
        import_gallery_probe(gem, out, progress=False, encoder=EncoderConfig(precision="fp32"))
    # a gallery built with another encoder is refused
    other = tmp_path / "other"
    build_gallery(other, "folder", tiny_set, encoder=EncoderConfig(spec="timm:test_efficientnet@random",
                  precision="fp32"), progress=False)
    assert main(["probe", "import", "--index", str(other), "--from", str(out), "-q"]) == 2


def test_probe_import_over_a_trained_probe_keeps_it_and_restore_brings_it_back(stage1, tiny_set, tmp_path, capsys):
    """`probe import` replaced a probe `probe train` had spent minutes on, without a word and without a copy."""
    from api.cli import main
    from retrieval.encoders import EncoderConfig
    from retrieval.probe import LinearProbe
    from retrieval.workflows import build_gallery

    out, _ = stage1
    index = tmp_path / "gallery"
    build_gallery(index, "folder", tiny_set, encoder=EncoderConfig(spec=f"timm:local-dir:{out}", precision="fp32"),
                  progress=False)
    assert main(["probe", "train", "--index", str(index), "--folds", "2", "-q"]) == 0
    capsys.readouterr()
    stale = index / "text_prior.json"  # as an earlier probe train with a text encoder left it
    stale.write_text("{}", encoding="utf-8")
    assert main(["probe", "import", "--index", str(index), "--from", str(out), "-q"]) == 0
    assert not stale.exists()  # the head has none of its own: before, it stayed and was shared as the head's
    said = capsys.readouterr().out
    assert "\nreplaced the probe 'probe train' trained on " in said and "settings chosen on cv:2-fold" in said, said
    assert f"'speciesid probe restore --index {index}' brings it back" in said
    assert LinearProbe.load(index).source == f"finetune:{out}"
    assert main(["probe", "restore", "--index", str(index)]) == 0
    said = capsys.readouterr().out
    assert said.startswith("restored the probe 'probe train' trained on ")
    assert f"; the head of {out} that 'probe import' took on " in said and "again swaps back" in said, said
    assert LinearProbe.load(index).source is None


def _clusters(seed: int, per_class: int, noise: float):
    """3 noisy clusters on the unit sphere: (x, y, labels "s0".."s2", unit class centres)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, 16))
    y = np.repeat(np.arange(3), per_class)
    x = centers[y] + noise * rng.normal(size=(len(y), 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, y, [f"s{i}" for i in y], centers / np.linalg.norm(centers, axis=1, keepdims=True)


def test_select_blend_settings_fixed_probe():
    from retrieval.calibrate import select_settings
    from retrieval.probe import LinearProbe

    x, y, labels, w = _clusters(seed=0, per_class=10, noise=0.3)
    w = 10 * w
    probe = LinearProbe(["s0", "s1", "s2"], w.astype(np.float32), np.zeros(3, np.float32), "x#1")
    s = select_settings(x, labels, fingerprint=probe.fingerprint, probe=probe)
    assert s.selected_on.startswith("cv:5-fold") and s.rule == "seq-nll" and s.metrics["blend_top1"] > 0.9
    s = select_settings(x, labels, fingerprint=probe.fingerprint, probe=probe, val_embeddings=x[:6],
                        val_labels=labels[:6])
    assert s.selected_on == "val:val" and s.metrics["queries"] == 6


def test_init_specs(tmp_path):
    from finetune.model import resolve_init

    with pytest.raises(ValueError, match="timm CNNs"):
        resolve_init("open_clip:ViT-B-32")
    with pytest.raises(ValueError, match="--init"):
        resolve_init(None)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(ValueError, match="--model"):
        resolve_init(str(weights))
    src = resolve_init(str(weights), model="timm:test_efficientnet")
    assert src.timm_name == "test_efficientnet" and src.weights_file == str(weights)
    src = resolve_init("timm:test_efficientnet@random")
    assert src.timm_name == "test_efficientnet" and not src.pretrained


def test_cli_finetune_help(capsys):
    from api.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["finetune", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--init" in text and "--stage" in text and "--val-split" in text and "--no-emulate-bf16" in text
    assert "starting encoder, required unless --model" in " ".join(text.split())
    assert "label smoothing of the (mixed) training targets (default 0.1)" in " ".join(text.split())


def test_a_run_without_init_or_model_is_refused_before_torch_is_imported(tmp_path):
    """`finetune --help` showed --init as optional, and a run with neither --init nor --model was refused only after
    torch and timm had loaded. The help says so, and the run is refused before they are imported, naming both."""
    import subprocess
    import sys

    from conftest import REPO

    code = ("import sys; from api.cli import main; "
            f"rc = main(['finetune', '--root', {str(tmp_path)!r}, '--out', {str(tmp_path / 'out')!r}, '-q']); "
            "print(rc, 'torch' in sys.modules, 'timm' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["2", "False", "False"]
    assert run.stderr == ("speciesid: error: give --init SPEC (a timm spec, a previous stage's output folder, or a "
                          "weights file with --model timm:NAME) or --model timm:NAME alone (its hub weights); see "
                          "'speciesid finetune --help'\n")
    assert not (tmp_path / "out").exists()


def test_early_stopping_waits_for_min_epochs(tiny_set, tmp_path, monkeypatch):
    """Validation that only gets worse stops the run after min_epochs, keeping the epoch-0 weights."""
    import finetune.engine as engine
    import finetune.train as train

    scores = iter([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    monkeypatch.setattr(engine, "macro_f1", lambda y, pred, labels: next(scores))
    r = train.finetune(_config(tiny_set, tmp_path / "run", epochs=5, patience=1, min_epochs=3, select="macro-f1"),
                       progress=False)
    assert (r.epochs_run, r.best_epoch, r.stopped) == (3, 0, "early-stopping")
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["speciesid"]["best_epoch"] == 0 and cfg["speciesid"]["stopped"] == "early-stopping"
    assert cfg["speciesid"]["kept"] == "best val macro-F1 (epoch 0)"


@pytest.mark.parametrize("select, kept", [("nll", 3), ("macro-f1", 0)])
def test_the_kept_epoch_follows_the_selection_rule(tiny_set, tmp_path, monkeypatch, select, kept):
    """The epoch-0 trap: macro-F1 on few photos one photo better before fine-tuning (0.790 vs 0.783, as an AVX2
    run measured) while the log-loss fell every epoch. ``--select nll`` (the default) keeps the last epoch,
    ``macro-f1`` the untrained one."""
    import finetune.engine as engine
    import finetune.train as train
    f1 = iter([0.790, 0.737, 0.776, 0.783])
    nll = iter([0.895, 0.902, 0.854, 0.763])
    monkeypatch.setattr(engine, "macro_f1", lambda y, pred, labels: next(f1))
    monkeypatch.setattr(engine, "_fitted_nll", lambda logits, y: next(nll))
    r = train.finetune(_config(tiny_set, tmp_path / "run", select=select, test_size="train"), progress=False)
    assert (r.epochs_run, r.best_epoch) == (3, kept)
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert "val_nll" in log[0].split(",") and len(log) == 5
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["speciesid"]["settings"]["select"] == select
    assert cfg["speciesid"]["kept"].endswith(f"(epoch {kept})")


@pytest.mark.parametrize("sizes, kept", [(None, 0), ({0: (224, 0.60), 3: (288, 0.55)}, 3)])
def test_the_untrained_network_is_weighed_at_its_own_size(tiny_set, tmp_path, monkeypatch, sizes, kept):
    """Under ``nll`` epoch 0 competes at the end, each network at the side it would be embedded at: at the training
    size the untrained network (its head fitted there) wins (0.50 < 0.70); when the fine-tuned epoch's best side
    (288 px, 0.55) beats the untrained one's (224 px, 0.60) the fine-tuned epoch is kept (an AVX2 run kept epoch 0
    with 0.607 at 224 against 0.637 for its epoch 8, compared at 224 only)."""
    import finetune.engine as engine
    import finetune.train as train
    from finetune.engine import SizeChoice

    nll = iter([0.50, 0.90, 0.80, 0.70])
    monkeypatch.setattr(engine, "_fitted_nll", lambda logits, y: next(nll))
    if sizes is not None:
        calls = iter(sorted(sizes))  # the untrained network is measured first

        def fake_choice(net, loaders, device, **kw):
            size, loss = sizes[next(calls)]
            return SizeChoice(size=size, candidates=sorted(loaders), head_nll={size: loss}, head_top1={size: 0.5},
                              photos=4)

        monkeypatch.setattr(train, "choose_test_size", fake_choice)
    cfg = _config(tiny_set, tmp_path / "run", test_size="train" if sizes is None else "auto")
    r = train.finetune(cfg, progress=False)
    assert r.best_epoch == kept
    info = json.loads((tmp_path / "run" / "config.json").read_text())["speciesid"]
    versus = info["against_untrained"]
    assert versus["kept_epoch"] == kept and versus["fine_tuned_epoch"] == 3
    assert (versus["untrained_nll"], versus["fine_tuned_nll"]) == ((0.5, 0.7) if sizes is None else (0.6, 0.55))
    assert info["best_epoch"] == kept and info["kept"].endswith(f"(epoch {kept})")
    if sizes is not None:
        assert info["test_size"]["size"] == 288


def test_the_time_budgets_range_is_one_of_ranges_as_the_time_limits():
    """s50 left-over: --time-budget's range was checked apart (in FinetuneConfig.resolved and in the parser), worded
    its own way; it is a real-valued setting's range like --time-limit's, which RANGES holds for both."""
    from finetune.config import RANGES, FinetuneConfig

    assert RANGES["time_budget"] == RANGES["time_limit"] == (0, None, "()")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"^--time-budget must be more than 0, got {bad}$"):
            FinetuneConfig(root="r", out="o", time_budget=bad).resolved()
    assert FinetuneConfig(root="r", out="o", time_budget=0.5).resolved().time_budget == 0.5


def test_select_rule_is_checked():
    from finetune.config import FinetuneConfig

    with pytest.raises(ValueError, match="--select must be nll or macro-f1, got 'top1'"):
        FinetuneConfig(root="r", out="o", select="top1").resolved()
    with pytest.raises(ValueError, match="--epochs must be 0 or more, got -1"):
        FinetuneConfig(root="r", out="o", epochs=-1).resolved()
    with pytest.raises(ValueError, match="--batch-size must be 1 or more, got 0"):
        FinetuneConfig(root="r", out="o", batch_size=0).resolved()


def _refused(flag: str, value: str, allowed: str) -> str:
    """The parser's line for a value out of range (as every command's: the option, its range, its --help)."""
    return f"speciesid finetune: error: argument {flag}: '{value}' is not a {allowed}; see 'speciesid finetune --help'"


@pytest.mark.parametrize("args,message", [
    (["--rand-augment", "bogus"],
     "speciesid: error: --rand-augment 'bogus' is not a timm RandAugment policy; use e.g. rand-m9-mstd0.5"),
    (["--rand-augment", "rand-m9x"], "speciesid: error: --rand-augment 'rand-m9x' is not a timm RandAugment policy"),
    (["--device", "tpu"], "speciesid: error: unknown device 'tpu'; use auto (CUDA when present), cpu, cuda or cuda:N"),
    (["--mixup", "-1"], _refused("--mixup", "-1", "number of at least 0")),
    (["--cutmix", "-0.5"], _refused("--cutmix", "-0.5", "number of at least 0")),
    (["--mix-prob", "1.5"], _refused("--mix-prob", "1.5", "number in [0, 1]")),
    (["--ema", "1.5"], _refused("--ema", "1.5", "number in [0, 1)")),
    (["--crop-scale", "2"], _refused("--crop-scale", "2", "number in (0, 1]")),
    (["--time-limit", "-1"], _refused("--time-limit", "-1", "number above 0")),
    (["--time-budget", "0"], _refused("--time-budget", "0", "number above 0")),
    (["--lr", "0"], _refused("--lr", "0", "number above 0")),
    (["--lr", "nan"], _refused("--lr", "nan", "number above 0")),
    (["--backbone-lr", "-1"], _refused("--backbone-lr", "-1", "number of at least 0")),
    (["--layer-decay", "2"], _refused("--layer-decay", "2", "number in (0, 1]")),
    (["--weight-decay", "-1"], _refused("--weight-decay", "-1", "number of at least 0")),
    (["--warmup-epochs", "-1"], _refused("--warmup-epochs", "-1", "number of at least 0")),
    (["--label-smoothing", "1"], _refused("--label-smoothing", "1", "number in [0, 1)")),
    (["--head-scale", "0"], _refused("--head-scale", "0", "number above 0")),
    (["--drop-rate", "1"], _refused("--drop-rate", "1", "number in [0, 1)")),
    (["--vflip", "2"], _refused("--vflip", "2", "number in [0, 1]")),
    (["--color-jitter", "-0.1"], _refused("--color-jitter", "-0.1", "number of at least 0")),
    (["--val-split", "1"], _refused("--val-split", "1", "number in (0, 1)")),
    (["--train-size", "8"], _refused("--train-size", "8", "whole number of at least 32")),
    (["--epochs", "-1"], _refused("--epochs", "-1", "whole number of at least 0")),
    (["--workers", "-1"], _refused("--workers", "-1", "whole number of at least 0")),
    (["--threads", "0"], _refused("--threads", "0", "whole number of at least 1")),
    (["--seed", "-1"], _refused("--seed", "-1", "whole number of at least 0")),
])
def test_option_values_out_of_range_are_refused_before_any_work(args, message, tmp_path, monkeypatch, capsys):
    """Walkthrough s46 #7: --rand-augment bogus gave a bare AssertionError and --device tpu torch's error, both
    after the photos were decoded; --mixup -1, --ema 1.5, --crop-scale 2, --time-limit -1 (and the other numeric
    options) were not checked at all. Each is refused in one line naming the option and its range, before the
    photos are listed or OUT is made; a value out of range by the parser, as every command's (walk s50 #3), with
    the --help to read (FinetuneConfig.resolved still refuses it for library callers)."""
    import finetune.train as train
    from api.cli import main

    monkeypatch.setattr(train, "split_photos", lambda cfg: pytest.fail("the photos were read"))
    try:
        code = main(["finetune", "--root", str(tmp_path / "photos"), "--init", MOBILENET_SPEC, "--out",
                     str(tmp_path / "out"), "-q", *args])
    except SystemExit as exc:  # the parser's refusal
        code = exc.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(message), lines
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", ["CPU", " cpu ", " Auto"])
def test_finetune_reads_its_device_option_as_identify_does(device, tmp_path, monkeypatch):
    """Re-read w3-design #5: ``finetune --device CPU`` was refused (``unknown device 'CPU'``) where identify and
    serve read it as cpu (retrieval.encoders.read_option, the one reading)."""
    import finetune.train as train
    from api.cli import main
    from finetune.config import FinetuneConfig

    assert FinetuneConfig(root="r", out="o", device=device, init="x").resolved().device == device.strip().lower()
    seen = []

    def listed(cfg):  # the photos would be listed now: the options were accepted
        seen.append(cfg.device)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "split_photos", listed)
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        main(["finetune", "--root", str(tmp_path / "photos"), "--init", MOBILENET_SPEC,
              "--out", str(tmp_path / "out"), "-q", "--device", device])
    assert seen == [device.strip().lower()]


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_cuda_device_without_a_gpu_is_refused_before_out_is_made(device, tmp_path, monkeypatch, capsys):
    """--device cuda on a machine whose torch sees no GPU was refused only after OUT was made (an empty folder
    left); now in the option checks, one line, nothing made."""
    import finetune.train as train
    from api.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train, "split_photos", lambda cfg: pytest.fail("the photos were read"))
    code = main(["finetune", "--root", str(tmp_path / "photos"), "--init", MOBILENET_SPEC, "--out",
                 str(tmp_path / "out"), "-q", "--device", device])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines == [f"speciesid: error: device {device!r} asked for, but torch sees no CUDA GPU; "
                                   "use --device cpu"], lines
    assert not (tmp_path / "out").exists()

@pytest.mark.parametrize("arch", ["test_efficientnet", "test_convnext", "test_resnet", "mobilenetv1_100", "vgg11"])
def test_timm_cnns_in_general(arch, tmp_path):
    """Layer groups, freezing, layer-wise rates and the export (encoder + head-as-probe) across timm CNN families.

    Random weights: mechanics only. VGG (133M parameters) is not written to disk, to keep the suite light.
    """
    import timm

    from finetune.export import save_finetuned
    from finetune.model import (
        CosineHead,
        Net,
        create_backbone,
        feature_dim,
        freeze_layers,
        layer_ids,
        param_groups,
        resolve_init,
    )
    from retrieval.encoders import create_encoder
    from retrieval.probe import LinearProbe

    source = resolve_init(f"timm:{arch}@random")
    backbone = create_backbone(source)
    ids, n_groups = layer_ids(backbone)
    assert n_groups >= 3 and min(ids.values()) == 0
    dim = feature_dim(backbone)
    net = Net(backbone, CosineHead(dim, 3, scale=24.0))
    frozen = freeze_layers(backbone, 1)
    assert 0 < frozen < sum(p.numel() for p in backbone.parameters())
    groups = param_groups(net, lr=1e-3, backbone_lr=1e-4, layer_decay=0.5, weight_decay=0.05)
    rates = sorted({g["lr"] for g in groups if g["name"].startswith("layer")})
    assert rates[-1] == pytest.approx(1e-4) and rates[0] < rates[-1]  # earlier groups learn slower
    assert all(p.requires_grad for g in groups for p in g["params"])  # frozen parameters are left out
    if arch == "vgg11":
        return
    out = tmp_path / "out"
    save_finetuned(out, backbone, net.head, ["a b", "c d", "e f"], source, {"stage": "local"})
    enc = create_encoder(f"timm:local-dir:{out}", device="cpu", precision="fp32")
    assert enc.dim == dim
    probe = LinearProbe.load(out, expected_fingerprint=enc.fingerprint)
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        feats = torch.nn.functional.normalize(model.forward_head(model.forward_features(x), pre_logits=True), dim=-1)
        assert (model(x).argmax(1).numpy() == probe.predict_proba(feats.numpy()).argmax(1)).all()


def test_cli_ctrl_c_keeps_the_checkpoint_and_says_how_to_resume(tiny_set, tmp_path, monkeypatch, capsys):
    import finetune.train as train
    from api.cli import main

    def interrupted(config, progress=True, report=None):
        raise train.FinetuneInterrupted(Path(config.out), 3)

    monkeypatch.setattr(train, "finetune", interrupted)
    code = main(["finetune", "--root", str(tiny_set), "--init", MOBILENET_SPEC, "--out", str(tmp_path / "o"), "-q"])
    assert code == 130
    err = capsys.readouterr().err
    assert "interrupted after epoch 3" in err and "run the same command again to resume" in err
    # Ctrl-C outside the epochs (the head's start, the final evaluation and export) says what is left too
    (tmp_path / "o").mkdir()
    for checkpoint, says in ((False, "it had written no checkpoint yet"), (True, "run the same command again")):
        if checkpoint:
            (tmp_path / "o" / train.CHECKPOINT).write_bytes(b"x")
        monkeypatch.setattr(train, "finetune", lambda config, progress=True, report=None: (_ for _ in ()).throw(KeyboardInterrupt))
        assert main(["finetune", "--root", str(tiny_set), "--init", MOBILENET_SPEC, "--out", str(tmp_path / "o"),
                     "-q"]) == 130
        assert says in capsys.readouterr().err


def test_ctrl_c_before_the_first_checkpoint_leaves_nothing_and_the_same_command_starts_over(tiny_set, tmp_path,
                                                                                               monkeypatch):
    """Ctrl-C during the head's start ("it had written no checkpoint yet: run the command again to start over")
    left checkpoint-photos.json.gz alone in --out, and the guard refused the re-run (and --no-resume) as a
    stranger's file. Now the list is written beside the first checkpoint, and a leftover one (a run killed while it
    wrote that checkpoint) is known as a run's and removed by the fresh start; another file of that name is not."""
    import finetune.train as train
    from finetune.checkpoint import PHOTOS_FILE, save_photo_list

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(train, "init_head", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            train.finetune(_config(tiny_set, out, epochs=1), progress=False)
    assert not out.exists()  # made by the run, left empty: removed
    save_photo_list(out, {"root": [["a.jpg", "Foo bar", 1, 2]]}, "0" * 64)  # what a killed run can leave
    lines: list[str] = []
    r = train.finetune(_config(tiny_set, out, epochs=1), progress=False, report=lines.append)
    assert r.epochs_run == 1 and f"starting afresh in {out}: removed the earlier fine-tuning run's {PHOTOS_FILE}" in lines
    assert not (out / PHOTOS_FILE).exists() and (out / "model.safetensors").is_file()
    stranger = tmp_path / "other"
    stranger.mkdir()
    (stranger / PHOTOS_FILE).write_bytes(b"my own archive")
    for resume in ("auto", "no"):
        with pytest.raises(ValueError, match=f"holds {PHOTOS_FILE}, not written by a speciesid fine-tuning run"):
            train.finetune(_config(tiny_set, stranger, epochs=1, resume=resume), progress=False)
    assert (stranger / PHOTOS_FILE).read_bytes() == b"my own archive"


def test_head_temperature_calibrates_without_reranking():
    from retrieval.probe import LinearProbe, fit_head_temperature

    x, y, labels, w = _clusters(seed=1, per_class=40, noise=1.0)

    def nll(p):
        return -np.log(p.predict_proba(x)[np.arange(len(y)), y]).mean()

    for scale, sharper in ((0.5, True), (200.0, False)):  # an under- and an over-confident head
        probe = LinearProbe(["s0", "s1", "s2"], (scale * w).astype(np.float32), np.zeros(3, np.float32), "x#1")
        t = fit_head_temperature(probe, x, labels)
        assert (t < 1) if sharper else (t > 1), (scale, t)
        calibrated = probe.scaled(t)
        assert (calibrated.predict_proba(x).argmax(1) == probe.predict_proba(x).argmax(1)).all()
        assert nll(calibrated) < nll(probe)
    with pytest.raises(ValueError, match="cannot fit its temperature"):
        fit_head_temperature(probe, x[:2], ["zz", "zz"])


def test_fit_temperature_is_the_grid_minimum():
    from retrieval.probe import fit_temperature

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    z = rng.normal(size=(200, 4)) + 0.5 * np.eye(4)[y]  # weak, under-confident logits
    t, loss = fit_temperature(z, y)

    def nll(tt):
        zt = z / tt
        return float(np.mean(np.log(np.exp(zt).sum(1)) - zt[np.arange(200), y]))

    grid = np.geomspace(0.1, 10.0, 81)
    assert t in grid and loss == pytest.approx(nll(t)) and loss == pytest.approx(min(nll(g) for g in grid))
    assert fit_temperature(z, y, grid=[1.0]) == (1.0, pytest.approx(nll(1.0)))


def test_plan_epochs_fits_the_budget():
    from finetune.budget import MARGIN, plan_epochs

    # 100 s budget, 5 s fixed, frozen epoch 5 s then 10 s epochs: 95 - 5 = 90 s of room -> 5 + 8 * 10 = 85 s
    assert MARGIN == 0.05
    assert plan_epochs(100, 5, 10, 5, freeze_epochs=1, max_epochs=30) == 9
    assert plan_epochs(100, 5, 10, 5, freeze_epochs=1, max_epochs=4) == 4  # --epochs stays the most
    assert plan_epochs(100, 5, 10, 10, freeze_epochs=0, max_epochs=30) == 9
    assert plan_epochs(10, 9, 10, 5, freeze_epochs=0, max_epochs=30) == 0  # nothing fits


def test_time_budget_fits_the_epochs_and_trains_as_without_it(tiny_set, tmp_path):
    from finetune.train import finetune

    plain = finetune(_config(tiny_set, tmp_path / "plain", epochs=2), progress=False)
    # a budget every epoch fits in: the plan keeps --epochs, and the timed steps leave the run unchanged
    budgeted = finetune(_config(tiny_set, tmp_path / "budget", epochs=2, time_budget=30.0), progress=False)
    assert budgeted.epochs_run == 2 and budgeted.stopped == "epochs"
    assert [h["train_loss"] for h in budgeted.history] == [h["train_loss"] for h in plain.history]
    info = json.loads((tmp_path / "budget" / "config.json").read_text())["speciesid"]
    plan = info["time_budget"]
    assert plan["epochs"] == 2 and plan["budget_s"] == 1800.0
    assert plan["step_s"] > 0 and plan["epoch_s"] >= plan["step_s"] and plan["eval_batch_s"] > 0
    assert info["settings"]["time_budget"] == 30.0 and info["settings"]["epochs"] == 2
    assert info["process_wall_seconds"] >= info["seconds_before_final"] > 0  # the whole run: final and export too
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["speciesid"]["time_budget"] is None


def test_replan_fits_the_measured_epochs():
    from finetune.budget import EPOCH_OVERHEAD_S, BudgetPlan, replan

    def plan(**kw):
        base = dict(budget_s=100.0, spent_s=5.0, step_s=1.0, frozen_step_s=1.0, eval_batch_s=0.5, epoch_s=20.0,
                    frozen_epoch_s=20.0, init_s=2.0, final_s=11.0, epochs=3, val_s=4.0, max_epochs=30)
        return BudgetPlan(**{**base, **kw})

    # timed at 20 s an epoch, run at 9 s (+1 s overhead): after epoch 1 at 20 s elapsed, the final evaluation scaled
    # by the measured validation (2 s against 4 s timed: 1 + 10 * 0.5 = 6 s) -> 95 - 26 = 69 s of room -> 6 more
    p = plan()
    assert replan(p, after_epoch=1, elapsed_s=20.0, epoch_s=9.0, val_s=2.0) == 7
    assert p.final_s == EPOCH_OVERHEAD_S + 10.0 * 0.5
    assert p.replanned == {"after_epoch": 1, "epoch_s": 9.0, "val_s": 2.0, "final_s": 6.0, "epochs": 7}
    assert replan(plan(max_epochs=4), after_epoch=1, elapsed_s=20.0, epoch_s=9.0, val_s=2.0) == 4  # --epochs caps
    assert replan(plan(), after_epoch=2, elapsed_s=90.0, epoch_s=40.0, val_s=4.0) == 2  # slower: no epoch more


def test_a_pessimistic_plan_is_made_again_from_the_first_real_epoch(tiny_set, tmp_path, monkeypatch):
    from finetune import budget
    from finetune.train import finetune

    monkeypatch.setattr(budget, "_time_train_steps", lambda *a, **k: 6.0)  # steps "timed" far slower than they run
    r = finetune(_config(tiny_set, tmp_path / "ft", epochs=6, time_budget=1.0), progress=False)
    plan = json.loads((tmp_path / "ft" / "config.json").read_text())["speciesid"]["time_budget"]
    assert plan["epochs"] < 6 and plan["replanned"]["after_epoch"] == 1 and plan["replanned"]["epochs"] == 6
    assert r.epochs_run == 6 and r.stopped == "epochs"  # the epochs the real speed fits, on one schedule
    lrs = [h["lr"] for h in r.history if h["epoch"] > 0]
    assert lrs[-1] < lrs[1] and lrs[-1] < 0.2 * max(lrs)  # the stretched cosine still decays to the end


def test_time_budget_too_small_says_what_to_change(tiny_set, tmp_path):
    from finetune.train import finetune

    with pytest.raises(ValueError, match="fits no epoch on this machine.*bigger --time-budget"):
        finetune(_config(tiny_set, tmp_path / "tiny", time_budget=0.001), progress=False)
    with pytest.raises(ValueError, match=r"--time-budget must be more than 0, got 0\.0"):  # RANGES' wording
        finetune(_config(tiny_set, tmp_path / "zero", time_budget=0.0), progress=False)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="--out .*a-file is a file; give a folder"):
        finetune(_config(tiny_set, tmp_path / "a-file"), progress=False)


def test_smallest_budget_is_the_first_whole_minute_the_plan_fits():
    from finetune.budget import plan_epochs, smallest_budget_min

    # 100 s fixed + a 24 s epoch = 124 s, within 95% of the budget: 130.5 s -> 3 min (2 min fits none)
    assert smallest_budget_min(100.0, 24.0, 10.0, freeze_epochs=0, epochs=1) == 3
    assert plan_epochs(180.0, 100.0, 24.0, 10.0, freeze_epochs=0, max_epochs=1) == 1
    assert plan_epochs(120.0, 100.0, 24.0, 10.0, freeze_epochs=0, max_epochs=1) == 0
    # a frozen epoch first, then one that trains the backbone: 100 + 10 + 24 = 134 s -> 141 s -> 3 min
    assert smallest_budget_min(100.0, 24.0, 10.0, freeze_epochs=1, epochs=2) == 3
    assert smallest_budget_min(200.0, 30.0, 30.0, freeze_epochs=0, epochs=1) == 5  # 230 / 0.95 = 242 s
    assert smallest_budget_min(0.0, 1.0, 1.0, freeze_epochs=0, epochs=1) == 1  # never 0


@pytest.mark.parametrize(("load", "busy"), [((3.0, 2), True), ((0.2, 2), False), (None, False)])
def test_a_refused_budget_names_the_smallest_that_fits_and_leaves_no_out_folder(tiny_set, tmp_path, monkeypatch,
                                                                             load, busy):
    """Four budgets refused in a row on a loaded 2-core box, each saying only 'bigger', each leaving an empty --out."""
    import re

    import finetune.train as train
    from finetune import budget

    monkeypatch.setattr(budget, "_time_train_steps", lambda *a, **k: 15.0)  # a slow machine: ~31 s an epoch
    monkeypatch.setattr(train, "machine_load", lambda: load)
    plans, plan_epochs = [], budget.plan_epochs
    monkeypatch.setattr(budget, "plan_epochs", lambda *a, **k: plans.append((a, k)) or plan_epochs(*a, **k))
    with pytest.raises(ValueError) as refused:
        train.finetune(_config(tiny_set, tmp_path / "runs" / "ft", time_budget=0.05), progress=False)
    message = str(refused.value)
    smallest = re.search(r"give a bigger --time-budget \(--time-budget (\d+) fits one epoch by these timings\)",
                         message)
    assert smallest and int(smallest[1]) >= 1, message
    (_, fixed_s, epoch_s, frozen_s), kw = plans[0]  # the plan that refused: its figures, not the message's rounding
    assert plan_epochs(int(smallest[1]) * 60.0, fixed_s, epoch_s, frozen_s, **kw) >= 1  # it fits, and is the least
    assert int(smallest[1]) == 1 or plan_epochs((int(smallest[1]) - 1) * 60.0, fixed_s, epoch_s, frozen_s, **kw) == 0
    note = "These timings were taken with the machine busy (1-minute load average 3.0 on 2 cores as the run began)"
    assert (note in message) == busy, message
    assert not (tmp_path / "runs").exists()  # made for the run, removed with it
    (tmp_path / "mine").mkdir()  # a folder the user made stays
    with pytest.raises(ValueError, match="fits no epoch"):
        train.finetune(_config(tiny_set, tmp_path / "mine", time_budget=0.05), progress=False)
    assert (tmp_path / "mine").is_dir()


def test_a_run_that_fails_before_training_leaves_no_out_folder(tmp_path):
    from finetune.train import finetune

    with pytest.raises(ValueError):
        finetune(_config(tmp_path / "nope", tmp_path / "ft-x"), progress=False)
    assert not (tmp_path / "ft-x").exists()


def _budgeted_run_cut_after_its_first_epoch(tiny_set, out):
    """A 2-epoch budgeted run stopped (Ctrl-C) after its first epoch; its config returned, to resume it."""
    from finetune.train import FinetuneInterrupted, finetune

    def stop_after_first(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    cfg = _config(tiny_set, out, epochs=2, time_budget=30.0)
    with pytest.raises(FinetuneInterrupted):
        finetune(cfg, progress=False, on_epoch_end=stop_after_first)
    return cfg


def test_budgeted_run_resumes_with_the_epochs_it_fitted(tiny_set, tmp_path):
    from finetune.train import finetune

    a = _config(tiny_set, tmp_path, epochs=30, time_budget=5.0).resolved()
    b = _config(tiny_set, tmp_path, epochs=7, time_budget=5.0).resolved()
    assert a.training_key() == b.training_key()  # the fitted epochs do not make it another run
    assert a.training_key() != _config(tiny_set, tmp_path, epochs=30, time_budget=6.0).resolved().training_key()

    cfg = _budgeted_run_cut_after_its_first_epoch(tiny_set, tmp_path / "run")
    seen = []
    r = finetune(cfg, progress=False, on_epoch_end=lambda e, row: seen.append(e))
    assert seen == [2] and r.epochs_run == 2


def test_size_candidates_and_the_setting_checked():
    from finetune.config import FinetuneConfig
    from finetune.engine import size_candidates

    assert size_candidates("auto", 224, 224) == [224, 256, 288, 320]
    assert size_candidates("auto", 160, 224) == [160, 176, 208, 224]  # the model's own size is always measured
    assert size_candidates("train", 160, 224) == [224]  # what galleries embedded at before sizes were chosen
    assert size_candidates("300", 224, 224) == [300]
    for bad in ("big", "16", "-1"):
        with pytest.raises(ValueError, match="--test-size must be auto, train or a number of pixels"):
            FinetuneConfig(root=".", out=".", test_size=bad).resolved()


def test_test_size_is_chosen_on_the_held_out_photos_recorded_and_used(stage1, tiny_set, tmp_path):
    """The run measures the head at each candidate side on its held-out photos, keeps the least log-loss, and
    writes it as timm's test_input_size; the encoder of the folder then embeds at it, and says so in its
    fingerprint, so a gallery of the other side is refused."""
    import shutil

    from PIL import Image

    from index.layout import EncoderMismatchError, check_encoder
    from retrieval.encoders import create_encoder
    from retrieval.protocol import Protocol, size_origin

    out, r = stage1
    ts = r.test_size
    nll = {int(s): v for s, v in ts["head_nll"].items()}
    assert sorted(nll) == ts["candidates"] == [64, 80, 96, 224] and ts["photos"] == 6
    assert ts["size"] == min(nll, key=lambda s: (round(nll[s], 4), s))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["speciesid"]["test_size"]["size"] == ts["size"]
    expected = None if ts["size"] == 224 else [3, ts["size"], ts["size"]]
    assert cfg["pretrained_cfg"].get("test_input_size") == expected
    enc = create_encoder(f"timm:local-dir:{out}", device="cpu", precision="fp32")
    assert enc.input_size == ts["size"]
    # a copy told to embed at 96 px: another input, another fingerprint, galleries of one refuse the other
    other = tmp_path / "at96"
    shutil.copytree(out, other)
    cfg["pretrained_cfg"]["test_input_size"] = [3, 96, 96]
    (other / "config.json").write_text(json.dumps(cfg))
    e96 = create_encoder(f"timm:local-dir:{other}", device="cpu", precision="fp32")
    assert e96.input_size == 96 and e96.test_size == 96 and e96.fingerprint.endswith("+size=96")
    assert e96.preprocess(Image.open(next(tiny_set.rglob("*.jpg"))).convert("RGB")).shape == (3, 96, 96)
    # `speciesid evaluate` says which photos chose the size: the run's held-out photos, or its --val-root
    assert size_origin(e96, tiny_set) == ("the epoch kept and the input size (96 px), chosen by the fine-tuning run "
                                          "on the 6 photos it held out of its training photos (not the evaluated "
                                          "photos)", False)
    assert Protocol("s", False, size="x").lines()[:2] == ["settings: s", "network: x"]
    # the head takes a gallery embedded at another size (the size changes its input, as views do)
    from retrieval.encoders import EncoderConfig
    from retrieval.workflows import build_gallery, import_gallery_probe

    build_gallery(tmp_path / "g96", "folder", tiny_set, encoder=EncoderConfig(spec=f"timm:local-dir:{other}",
                  precision="fp32"), progress=False)
    imported = import_gallery_probe(tmp_path / "g96", out, progress=False, encoder=EncoderConfig(precision="fp32"))
    assert imported.probe.fingerprint == e96.fingerprint
    cfg["speciesid"]["val_source"] = f"val:{tiny_set}"
    (other / "config.json").write_text(json.dumps(cfg))
    text, chose = size_origin(e96, tiny_set)
    assert chose and text.endswith("= the evaluated photos")
    cfg["pretrained_cfg"].pop("test_input_size")
    (other / "config.json").write_text(json.dumps(cfg))
    e224 = create_encoder(f"timm:local-dir:{other}", device="cpu", precision="fp32")
    assert e224.input_size == 224 and e224.test_size is None and "+size" not in e224.fingerprint
    # a run that kept its training size still chose its epoch on its --val-root: evaluating those photos says so
    # (before, only a run that also chose another size was reported), from any folder, through any path or copy
    text, chose = size_origin(e224, tiny_set)
    assert chose and text.startswith("the epoch kept, chosen by the fine-tuning run on the")
    copy = tmp_path / "val-copy"
    shutil.copytree(tiny_set, copy)
    from index.photos import find_photos
    from retrieval.images import sha256_bytes

    digests = [sha256_bytes(p.read_bytes()) for p in find_photos(copy)]
    text, chose = size_origin(e224, copy, digests)
    assert chose and (f"({len(digests)} of the evaluated photos are among them; matched by the photos in that "
                      "folder now: their digests were not recorded when they chose)") in text  # no validation.csv
    with pytest.raises(EncoderMismatchError, match="size=96"):
        check_encoder("gallery G", e96.fingerprint, e224.fingerprint, fix="rebuild it")


def test_an_exported_encoder_keeps_the_test_size(stage1, tiny_set, tmp_path, monkeypatch):
    """ONNX export of a network embedded at a chosen test size: same input, fingerprint and embeddings as torch;
    the export cache keeps one entry per size (the warm path does not hand the 96-px export to the 224-px one)."""
    require_module("onnxruntime")
    import shutil

    from PIL import Image

    from retrieval.encoders import create_encoder

    monkeypatch.setenv("SPECIESID_CACHE", str(tmp_path / "cache"))
    out, _ = stage1
    folder = tmp_path / "net"
    shutil.copytree(out, folder)
    cfg = json.loads((folder / "config.json").read_text())
    images = [Image.open(p).convert("RGB") for p in sorted(tiny_set.rglob("*.jpg"))[:6]]
    for size in (96, None):
        if size:
            cfg["pretrained_cfg"]["test_input_size"] = [3, size, size]
        else:
            cfg["pretrained_cfg"].pop("test_input_size", None)
        (folder / "config.json").write_text(json.dumps(cfg))
        ref = create_encoder(f"timm:local-dir:{folder}", device="cpu", precision="fp32")
        for _ in range(2):  # cold (export), then warm (the cache)
            onnx = create_encoder(f"timm:local-dir:{folder}", runtime="onnx", precision="fp32", device="cpu")
            assert onnx.runtime == "onnx" and onnx.input_size == (size or 224) == ref.input_size
            assert onnx.fingerprint == ref.fingerprint
            cos = (onnx.encode_images(images) * ref.encode_images(images)).sum(axis=1)
            assert cos.min() > 0.999, cos


def test_test_size_train_keeps_the_model_size(tiny_set, tmp_path):
    from finetune.train import finetune

    out = tmp_path / "ft"
    r = finetune(_config(tiny_set, out, epochs=1, test_size="train"), progress=False)
    assert r.test_size == {"size": 224, "setting": "train"}
    assert "test_input_size" not in json.loads((out / "config.json").read_text())["pretrained_cfg"]


def test_the_final_evaluation_reuses_the_held_out_photos_the_size_choice_embedded(tiny_set, tmp_path, monkeypatch):
    from finetune import engine
    from finetune.train import finetune

    descs = []
    real = engine.predict

    def spy(*args, **kwargs):
        descs.append(kwargs.get("desc"))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "predict", spy)
    r = finetune(_config(tiny_set, tmp_path / "ft", epochs=1, final_eval=True), progress=False)
    size = r.test_size["size"]
    # each side once for the network before fine-tuning and once for the fine-tuned epoch (--select nll), no more
    assert [d for d in descs if d and d.startswith("test size")] == [f"test size {s}" for s in r.test_size["candidates"]] * 2
    assert "final: train features" in descs and "final: val features" not in descs  # embedded once, by the choice
    # the same photos at the same side: the final head top-1 is the one the choice measured there
    assert r.final["head_top1"] == pytest.approx(r.test_size["head_top1"][str(size)], abs=1e-4)


def _small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU6(),
        torch.nn.Conv2d(16, 32, 3, padding=1, stride=2), torch.nn.BatchNorm2d(32), torch.nn.ReLU6(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 5),
    )


def _forward_backward(net: torch.nn.Module, x: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor, dict]:
    net.zero_grad()
    with ctx:
        feats = net[:-1](x)
        out = net[-1](feats)
        loss = out.float().square().mean()
    loss.backward()
    return out.float().detach(), feats.float().detach(), {n: p.grad for n, p in net.named_parameters()}


def _is_bf16(t: torch.Tensor) -> bool:
    return bool(torch.equal(t, t.to(torch.bfloat16).float()))


def test_bf16_rounding_rounds_what_autocast_rounds_and_keeps_fp32():
    """The imitation's outputs, pooled features and gradients of conv / linear weights carry bf16 precision in
    fp32 tensors; batch-norm affine weights are not rounded (autocast keeps them fp32)."""
    from finetune.engine import BF16Rounding

    net = _small_cnn().train()
    x = torch.randn(4, 3, 16, 16)
    out, feats, grads = _forward_backward(net, x, BF16Rounding())
    assert out.dtype == torch.float32 and _is_bf16(out) and _is_bf16(feats)
    assert all(g.dtype == torch.float32 for g in grads.values())
    for name in ("0.weight", "0.bias", "3.weight", "8.weight", "8.bias"):
        assert _is_bf16(grads[name]), name
    assert not _is_bf16(grads["1.weight"]) and not _is_bf16(grads["4.bias"])  # batch norm's affine: not rounded
    with BF16Rounding():
        assert _is_bf16(torch.randn(2, 8, 4, 4).mean((2, 3)))  # pooling a feature map: rounded
        assert not _is_bf16(torch.tensor([0.1, 0.2, 0.3]).mean())  # a loss's mean: fp32 (0.2 is no bf16 value)
    plain_out, _, plain_grads = _forward_backward(net, x, torch.autocast("cpu", enabled=False))
    assert not _is_bf16(plain_out) and not _is_bf16(plain_grads["0.weight"])
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_bf16_rounding_is_closer_to_real_bf16_than_fp32_is():
    """Against real CPU bf16 autocast on the same batch, the imitation is nearer than fp32 is (outputs, features,
    gradients), and as far from fp32 as bf16 is (within 2x)."""
    from finetune.engine import BF16Rounding

    net = _small_cnn().train()
    x = torch.randn(8, 3, 32, 32)
    ref = _forward_backward(net, x, torch.autocast("cpu", dtype=torch.bfloat16))
    emu = _forward_backward(net, x, BF16Rounding())
    fp = _forward_backward(net, x, torch.autocast("cpu", enabled=False))

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm())

    pairs = [(ref[0], emu[0], fp[0]), (ref[1], emu[1], fp[1])]
    pairs += [(ref[2][n], emu[2][n], fp[2][n]) for n in ("0.weight", "3.weight", "8.weight")]
    for bf16, imitation, fp32 in pairs:
        assert rel(imitation, bf16) < rel(fp32, bf16)
        assert 0.5 < rel(imitation, fp32) / rel(bf16, fp32) < 2.0


def test_autocast_picks_the_imitation_for_fp32_cpu_training_steps_only(monkeypatch):
    from finetune import engine

    cpu = torch.device("cpu")
    monkeypatch.setattr(engine, "cpu_has_fast_bf16", lambda: False)
    assert isinstance(engine.autocast(cpu, True, train=True, emulate_bf16=True), engine.BF16Rounding)
    assert isinstance(engine.autocast(cpu, False, train=True, emulate_bf16=True), engine.BF16Rounding)
    assert not isinstance(engine.autocast(cpu, True, train=False, emulate_bf16=True), engine.BF16Rounding)
    assert not isinstance(engine.autocast(cpu, True, train=True), engine.BF16Rounding)
    monkeypatch.setattr(engine, "cpu_has_fast_bf16", lambda: True)
    native = engine.autocast(cpu, True, train=True, emulate_bf16=True)
    assert isinstance(native, torch.autocast) and native.fast_dtype == torch.bfloat16


@pytest.mark.parametrize("emulate", [True, False])
def test_a_training_step_on_a_cpu_without_native_bf16_rounds_by_default(emulate, tmp_path, monkeypatch):
    """The default config's steps on an fp32-only CPU carry bf16 precision (gradients of the conv weights);
    ``--no-emulate-bf16`` gives plain fp32 steps."""
    from finetune import engine
    from finetune.model import CosineHead, Net

    monkeypatch.setattr(engine, "cpu_has_fast_bf16", lambda: False)
    cfg = _config(tmp_path, tmp_path / "out", **({} if emulate else {"emulate_bf16": False})).resolved()
    assert cfg.emulate_bf16 is emulate
    net = Net(_small_cnn()[:-1], CosineHead(32, 5)).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    engine.train_step(net, torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]), opt,
                      torch.amp.GradScaler("cpu", enabled=False), cfg, n_classes=5, device=torch.device("cpu"),
                      class_weight=None, mixup=None, frozen=False)
    grad = net.backbone[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert _is_bf16(grad) is emulate


# ------------------------------------------------------------------ s44 audit of finetune (resume, data, output)
def _stop_after(n: int):
    """An ``on_epoch_end`` that interrupts the run (as Ctrl-C does) after epoch ``n``."""

    def stop(epoch, row):
        if epoch == n:
            raise KeyboardInterrupt

    return stop


def test_a_resume_on_other_photos_is_refused_naming_what_changed(tiny_set, tmp_path):
    """The checkpoint records the photos (path, species, size, time) and species: a renamed species folder (the
    head's rows would name the wrong species), an added photo (the split would move trained-on photos into the
    held-out ones) or another species count are refused before any data is decoded; the root may be spelled
    another way."""
    import shutil

    from finetune.train import FinetuneInterrupted, finetune

    root = tmp_path / "photos"
    shutil.copytree(tiny_set, root, symlinks=True)
    out = tmp_path / "run"
    with pytest.raises(FinetuneInterrupted):
        finetune(_config(root, out, epochs=2), progress=False, on_epoch_end=_stop_after(1))
    cobra = next(p for p in root.iterdir() if "Naja" in p.name)
    renamed = root / cobra.name.replace("Naja sumatrana", "Naja sputatrix")
    cobra.rename(renamed)
    with pytest.raises(ValueError, match=r"checkpoint.pt was written for other photos: species gone: Naja sumatrana, "
                       r"new: Naja sputatrix; photos under --root: 6 added .* 6 removed .*--no-resume.*new --out"):
        finetune(_config(root, out, epochs=2), progress=False)
    renamed.rename(cobra)
    extra = cobra / "extra.jpg"
    shutil.copyfile(next(cobra.iterdir()), extra)
    with pytest.raises(ValueError, match=r"photos under --root: 1 added \(Equatorial Cobra \(Naja sumatrana\)/extra"
                       r".jpg\)\. Resuming would train on other photos"):
        finetune(_config(root, out, epochs=2), progress=False)
    extra.unlink()
    other = next(p for p in root.iterdir() if "Lycodon" in p.name)
    shutil.rmtree(other)  # 2 species: the head's shape differs (it was torch's state_dict error)
    with pytest.raises(ValueError, match="species gone: Lycodon capucinus"):
        finetune(_config(root, out, epochs=2), progress=False)
    _subset(root, [other.name], 6)
    r = finetune(_config(str(root) + "/", out, epochs=2), progress=False)  # the same photos: resumed
    assert r.epochs_run == 2 and [h["epoch"] for h in r.history] == [0, 1, 2]


def test_the_checkpoint_keeps_the_photos_digest_and_an_older_checkpoint_resumes(tiny_set, tmp_path, monkeypatch,
                                                                                caplog):
    """The photo list (a row per photo: tens of MB at 400k photos) was pickled into every epoch's checkpoint: now
    its digest, the list written once beside it (removed with the checkpoint), from which a change is still named.
    A checkpoint of format 2 (written before the photos were recorded) resumed nowhere after an upgrade: it resumes
    with a warning that its photos cannot be checked."""
    import dataclasses
    import logging
    import re
    import shutil

    from finetune.checkpoint import PHOTOS_FILE
    from finetune.train import FinetuneInterrupted, finetune

    shutil.copytree(tiny_set, tmp_path / "photos", symlinks=True)
    monkeypatch.chdir(tmp_path)  # --root as given, relative: format 2's key compared it so
    out = tmp_path / "run"
    cfg = _config(Path("photos"), out, epochs=2)
    with pytest.raises(FinetuneInterrupted):
        finetune(cfg, progress=False, on_epoch_end=_stop_after(1))
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert checkpoint["format"] == 4 and "photos" not in checkpoint and len(checkpoint["photos_sha256"]) == 64
    assert (out / PHOTOS_FILE).is_file()
    folder = sorted((tmp_path / "photos").iterdir())[0]
    extra = folder / "extra.jpg"
    shutil.copyfile(sorted(folder.iterdir())[0], extra)
    with pytest.raises(ValueError, match=re.escape(f"photos under --root: 1 added ({folder.name}/extra.jpg)")):
        finetune(cfg, progress=False)
    extra.unlink()
    resolved = cfg.resolved()
    old = {k: v for k, v in checkpoint.items() if k not in ("photos_sha256", "plan", "elapsed_s", "stopped")}
    old.update(format=2, key=resolved.training_key(absolute=False),
               settings={k: v for k, v in dataclasses.asdict(resolved).items() if k != "out"})
    assert old["key"] != resolved.training_key()
    torch.save(old, out / "checkpoint.pt")
    (out / PHOTOS_FILE).unlink()
    caplog.set_level(logging.WARNING, logger="finetune.checkpoint")
    r = finetune(cfg, progress=False)
    assert r.epochs_run == 2 and [h["epoch"] for h in r.history] == [0, 1, 2]
    assert any("(checkpoint format 2), which did not record the photos" in m and "cannot be checked" in m
               for m in caplog.messages)
    assert not (out / PHOTOS_FILE).exists() and not (out / "checkpoint.pt").exists()


def test_photos_not_read_up_front_are_hashed_within_the_budget_and_said(tiny_set, tmp_path, monkeypatch):
    """A set too large to decode up front is read once more at export for trained.csv's sha256: counted in the
    time budget's final part and announced (with a bar); the digests are the photos' bytes'."""
    import finetune.budget as budget
    import finetune.data as data
    from finetune.train import finetune
    from retrieval.images import sha256_file

    timed, real = [], budget._time_hashing

    def spy(paths, sample=8):
        timed.append(len(paths))
        return real(paths, sample) + (7.0 if paths else 0.0)  # 18 small photos take ms: make it show in the plan

    monkeypatch.setattr(budget, "_time_hashing", spy)
    monkeypatch.setattr(data, "CACHE_LIMIT", 0)
    lines: list[str] = []
    out = tmp_path / "run"
    finetune(_config(tiny_set, out, epochs=1, time_budget=30.0, test_size="train"), progress=False,
             report=lines.append)
    plan = json.loads((out / "config.json").read_text())["speciesid"]["time_budget"]
    assert timed == [18] and plan["hash_s"] >= 7.0 and plan["final_s"] >= plan["hash_s"]
    assert any(line.startswith("reading 18 photos for their sha256 (trained.csv, heldout.csv)") for line in lines)
    with (out / "trained.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(row["sha256"] == sha256_file(row["path"]) for row in rows)
    # a set decoded up front is hashed as it is read: nothing is read again, nothing added to the budget
    monkeypatch.setattr(data, "CACHE_LIMIT", 20_000)
    lines.clear()
    finetune(_config(tiny_set, tmp_path / "cached", epochs=1, time_budget=30.0, test_size="train"), progress=False,
             report=lines.append)
    plan = json.loads((tmp_path / "cached" / "config.json").read_text())["speciesid"]["time_budget"]
    assert timed[-1] == 0 and plan["hash_s"] == 0 and not any(line.startswith("reading ") for line in lines)


def test_the_memory_cache_counts_the_pixels_it_holds(tmp_path, monkeypatch):
    """Validation photos are kept as a gallery decodes them for the model (a 1600x1200 JPEG at side 384: 1600x1200,
    against 597x448 in the training cache): the cache's limit counts the pixels really held, so a set whose decoded
    photos pass it is read from disk on each photo's turn (it was kept, at 7x the training cache's pixels)."""
    from PIL import Image

    import finetune.data as data
    import retrieval.images as images
    from finetune.data import LabelledPhotos, PhotoDataset

    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.jpg")
        Image.fromarray(rng.integers(0, 255, (1200, 1600, 3), dtype=np.uint8)).save(paths[-1])
    photos, index = LabelledPhotos(paths, ["a", "a", "b", "b"]), {"a": 0, "b": 1}
    monkeypatch.setattr(data, "CACHE_PIXELS", 4 * 597 * 448, raising=False)  # the four at the training cache's size
    train = PhotoDataset(photos, index, lambda im: im)
    val = PhotoDataset(photos, index, lambda im: im, stand_in=False, model_side=384)
    assert train.preload() == [] and val.preload() == []
    assert train._cache is not None and [im.size for im in train._cache] == [(597, 448)] * 4
    assert val._cache == [None] * 4  # 4 x 1600x1200 pixels: the first is over the limit already, none held
    assert val.image(1).tobytes() == images.model_image(paths[1].read_bytes(), 384).tobytes()  # read from disk
    assert val.sha256() == [images.sha256_file(p) for p in paths]
    assert len(val) == 4 and val.targets == [0, 0, 1, 1]


def test_a_set_past_the_memory_cache_keeps_the_photos_that_fit(tmp_path, monkeypatch, caplog):
    """Past CACHE_PIXELS the photos decoded so far stay in memory (before, the whole cache was dropped and every
    photo read from disk), the rest are read on their turn; the log's memory figure counts 4 bytes a pixel, as
    Pillow keeps an RGB image (review 2, D: it said 3)."""
    import re

    from PIL import Image

    import finetune.data as data
    import retrieval.images as images
    from finetune.data import LabelledPhotos, PhotoDataset

    rng = np.random.default_rng(1)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.jpg")
        Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(paths[-1])
    photos = LabelledPhotos(paths, ["a", "a", "b", "b", "b"])
    monkeypatch.setattr(data, "CACHE_PIXELS", 2 * 400 * 300 + 1000, raising=False)  # two photos fit
    caplog.set_level("INFO", logger="finetune.data")
    ds = PhotoDataset(photos, {"a": 0, "b": 1}, lambda im: im, stand_in=False, model_side=224)
    assert ds.preload() == []
    assert ds._cache is not None and [im is not None for im in ds._cache] == [True, True, False, False, False]
    for i in range(5):  # cached or read from disk: the same photo
        assert ds.image(i).tobytes() == images.model_image(paths[i].read_bytes(), 224).tobytes()
    assert ds.sha256() == [images.sha256_file(p) for p in paths]
    gb = float(re.search(r"CACHE_PIXELS: ([\d.]+) GB at 4 bytes a pixel", caplog.text).group(1))
    assert gb == round(4 * data.CACHE_PIXELS / 1e9, 1)
    assert "the 2 decoded before stay in memory, the set's other 3 are read from disk" in caplog.text


def test_a_large_set_leaves_unreadable_photos_out_everywhere(tmp_path, monkeypatch, caplog):
    """Over the memory cache's limit photos are read on their turn: an unreadable one must never stop the run, in
    the head's init, the epochs, the test-size choice or the final evaluation (it stopped the export before)."""
    import logging

    import finetune.data as data
    from finetune.train import finetune

    monkeypatch.setattr(data, "CACHE_LIMIT", 0)  # every set counts as too large to decode up front
    root = _subset(tmp_path / "photos", _species_dirs()[:3], 4)
    first = sorted(root.iterdir())[0]
    (first / "empty.jpg").write_bytes(b"")
    (first / "notes.jpg").write_text("not a photo")
    caplog.set_level(logging.WARNING, logger="finetune.data")
    r = finetune(_config(root, tmp_path / "run", epochs=2, val_split=0.5, head_init="probe", final_eval=True),
                 progress=False)
    assert r.epochs_run == 2 and r.final["head_top1"] >= 0 and r.test_size["size"] in r.test_size["candidates"]
    warned = [m for m in caplog.messages if m.startswith("unreadable photo")]
    assert warned and all(("empty.jpg" in m) or ("notes.jpg" in m) for m in warned)
    assert len(warned) == len(set(warned))  # once a photo, not once an epoch or a pass
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_the_time_budget_and_limit_survive_a_resume(tiny_set, tmp_path, monkeypatch):
    """A run the budget had stopped, interrupted in its export, trains no epoch more when run again, and keeps its
    plan in config.json; a killed budgeted run resumes under the same deadline (the time already spent counts);
    a --time-limit is looked at before the first resumed epoch."""
    import finetune.train as train

    cfg = _config(tiny_set, tmp_path / "budget", epochs=4, time_budget=30.0)
    real_stop, real_export = train._stop_reason, train._export
    monkeypatch.setattr(train, "_stop_reason", lambda run, s: "time-budget" if run.state.epoch >= 1 else "epochs")
    monkeypatch.setattr(train, "_export", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train.finetune(cfg, progress=False)
    monkeypatch.setattr(train, "_stop_reason", real_stop)
    monkeypatch.setattr(train, "_export", real_export)
    r = train.finetune(cfg, progress=False)
    assert (r.epochs_run, r.stopped) == (1, "time-budget")
    info = json.loads((tmp_path / "budget" / "config.json").read_text())["speciesid"]
    assert info["stopped"] == "time-budget" and info["time_budget"]["budget_s"] == 1800.0
    # killed after epoch 1 with (as recorded) its 30 minutes spent: the resumed run starts no epoch
    cfg = _config(tiny_set, tmp_path / "killed", epochs=4, time_budget=30.0)
    with pytest.raises(train.FinetuneInterrupted):
        train.finetune(cfg, progress=False, on_epoch_end=_stop_after(1))
    checkpoint = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)
    checkpoint["elapsed_s"] = 30 * 60.0
    torch.save(checkpoint, tmp_path / "killed" / "checkpoint.pt")
    r = train.finetune(cfg, progress=False)
    assert (r.epochs_run, r.stopped) == (1, "time-budget")
    # --time-limit (not a training setting: it may change between runs) is applied before the next epoch starts
    cfg = _config(tiny_set, tmp_path / "limit", epochs=4)
    with pytest.raises(train.FinetuneInterrupted):
        train.finetune(cfg, progress=False, on_epoch_end=_stop_after(1))
    cfg.time_limit = 1e-6
    r = train.finetune(cfg, progress=False)
    assert (r.epochs_run, r.stopped) == (1, "time-limit")


def _a_runs_config(folder: Path) -> None:
    """An earlier speciesid run's config.json (its ``speciesid`` block)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architecture": "x", "speciesid": {"stage": "local"}}))


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_no_resume_removes_the_earlier_runs_files(tiny_set, tmp_path):
    """An earlier split run's heldout.csv (or last/, or its model) left beside a --no-resume run with --val-root
    would be read as the new run's: probe import chose settings on photos the new network trained on. Removed
    only because its config.json is a speciesid run's; the removal is said (the CLI prints the run's lines)."""
    from finetune.train import finetune

    out = tmp_path / "run"
    (out / "last").mkdir(parents=True)
    _a_runs_config(out)
    for name in ("heldout.csv", "trained.csv", "validation.csv", "model.safetensors"):
        (out / name).write_text("an earlier run's")
    (out / "last" / "heldout.csv").write_text("an earlier run's")
    (out / "notes.txt").write_text("the user's")
    val = _subset(tmp_path / "val", _species_dirs()[:3], 2, split="val")
    lines: list[str] = []
    finetune(_config(tiny_set, out, epochs=1, val_root=str(val), test_size="train", resume="no"), progress=False,
             report=lines.append)
    assert (f"starting afresh in {out}: removed the earlier fine-tuning run's model.safetensors, config.json, "
            "heldout.csv, trained.csv, validation.csv, last/heldout.csv") in lines
    assert not (out / "heldout.csv").exists() and not (out / "last").exists()
    assert (out / "notes.txt").read_text() == "the user's"
    assert "an earlier run's" not in (out / "trained.csv").read_text() + (out / "validation.csv").read_text()


def test_an_out_that_is_the_init_folder_or_holds_a_model_is_refused_and_kept(tiny_set, tmp_path):
    """A fresh run removed, by name, files it never wrote: the --init model's own config.json and weights when
    --out was that folder (the run could then neither resume nor start again). Now refused before anything is
    written; and a pretrained model in --out is not called "a fine-tuned model" but named as not a run's."""
    import shutil

    from conftest import MOBILENET

    from finetune.train import finetune

    model = tmp_path / "my-model"
    shutil.copytree(MOBILENET, model)
    before = _tree(model)
    spec = f"timm:local-dir:{model}"
    for resume in ("auto", "no"):
        with pytest.raises(ValueError, match=r"--out .*my-model is the --init folder: the run would write its model "
                           r"over the one it starts from .*give the run its own --out folder"):
            finetune(_config(tiny_set, model, init=spec, epochs=1, resume=resume), progress=False)
        with pytest.raises(ValueError, match=r"--out .*my-model/run is inside the --init folder"):
            finetune(_config(tiny_set, model / "run", init=str(model), resume=resume), progress=False)
        with pytest.raises(ValueError, match=r"--out .* holds the --init folder .*my-model"):
            finetune(_config(tiny_set, tmp_path, init=spec, resume=resume), progress=False)
    assert _tree(model) == before
    # a pretrained model that is not the --init: its files are not a run's
    for resume in ("auto", "no"):
        with pytest.raises(ValueError, match=r"--out .*my-model holds model.safetensors, config.json, not written by "
                           r"a speciesid fine-tuning run .*give another --out"):
            finetune(_config(tiny_set, model, resume=resume), progress=False)
    assert _tree(model) == before


def test_an_out_holding_files_of_a_runs_names_that_are_not_a_runs_is_refused_and_kept(tiny_set, tmp_path):
    """The user's own config.json, log.csv, probe.npz and last/config.json were removed by the default (resume
    auto) fresh start, last/ with them (a run without save_last never writes it): refused now, naming them."""
    from finetune.train import finetune

    # the user's own files under the names a run writes, last/ included
    project = tmp_path / "project"
    (project / "last").mkdir(parents=True)
    (project / "config.json").write_text('{"my": "app settings"}')
    (project / "log.csv").write_text("my lab log\n")
    (project / "probe.npz").write_bytes(b"my numpy data")
    (project / "last" / "config.json").write_text('{"other": 1}')
    before = _tree(project)
    for resume in ("auto", "no"):
        with pytest.raises(ValueError, match=r"holds config.json, probe.npz, log.csv, last/config.json, not written"):
            finetune(_config(tiny_set, project, epochs=1, resume=resume), progress=False)
    assert _tree(project) == before
    # a run's folder whose last/ holds another config.json: that one is named, nothing is removed
    (project / "config.json").unlink()
    (project / "log.csv").unlink()
    (project / "probe.npz").unlink()
    _a_runs_config(project)
    before = _tree(project)
    with pytest.raises(ValueError, match=r"holds last/config.json, not written by a speciesid"):
        finetune(_config(tiny_set, project, epochs=1, resume="no"), progress=False)
    assert _tree(project) == before


def test_an_out_that_is_a_gallery_or_holds_another_probe_is_refused(tiny_set, tmp_path):
    from finetune.train import finetune

    gallery = tmp_path / "gallery"
    gallery.mkdir()
    (gallery / "gallery.json").write_text("{}")
    (gallery / "probe.json").write_text('{"source": null}')
    for resume in ("auto", "no"):
        with pytest.raises(ValueError, match=r"--out .*gallery is a gallery folder .*overwrite its probe"):
            finetune(_config(tiny_set, gallery, resume=resume), progress=False)
    (gallery / "gallery.json").unlink()
    with pytest.raises(ValueError, match="holds a probe that is not a fine-tuning run's head"):
        finetune(_config(tiny_set, gallery), progress=False)
    assert sorted(p.name for p in gallery.iterdir()) == ["probe.json"]  # nothing written


def test_the_resume_hint_of_a_no_resume_command_says_to_drop_it(tiny_set, tmp_path, monkeypatch, capsys):
    import finetune.train as train
    from api.cli import main

    def interrupted(config, progress=True, report=None):
        raise train.FinetuneInterrupted(Path(config.out), 2)

    monkeypatch.setattr(train, "finetune", interrupted)
    args = ["finetune", "--root", str(tiny_set), "--init", MOBILENET_SPEC, "--out", str(tmp_path / "o"), "-q"]
    assert main([*args, "--no-resume"]) == 130
    err = capsys.readouterr().err
    assert "run the command again without --no-resume to resume" in err and "same command" not in err
    assert main(args) == 130 and "run the same command again to resume" in capsys.readouterr().err


def test_webdataset_shards_fine_tune(tiny_set, tmp_path):
    """``--dataset webdataset`` photos (SHARD.tar#MEMBER) are read as ``index build`` reads them (every one was
    "unreadable"), and the run's photo lists carry their digests."""
    import io
    import tarfile

    from finetune.train import finetune
    from retrieval.images import sha256_file

    shard = tmp_path / "shards" / "shard-000000.tar"
    shard.parent.mkdir()
    digests = set()
    with tarfile.open(shard, "w") as tar:
        for k, photo in enumerate(sorted(p for p in tiny_set.rglob("*") if p.is_file())):
            species = photo.parent.name.split("(")[1].rstrip(")")
            for name, data in ((f"k{k:03d}{photo.suffix}", photo.read_bytes()),
                               (f"k{k:03d}.json", json.dumps({"scientific_name": species}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            digests.add(sha256_file(photo))
    out = tmp_path / "run"
    r = finetune(_config(shard.parent, out, epochs=1, dataset="webdataset", test_size="train"), progress=False)
    assert len(r.species) == 3 and r.epochs_run == 1
    with (out / "trained.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12 and all("#k" in row["path"] for row in rows)
    assert {row["sha256"] for row in rows} <= digests


def test_a_budget_that_fits_only_the_frozen_epochs_is_refused(tiny_set, tmp_path, monkeypatch, caplog):
    """One epoch fits and it is the frozen one: the export would be the starting backbone, called fine-tuned."""
    import logging

    from finetune import budget
    from finetune.train import finetune

    monkeypatch.setattr(budget, "_time_train_steps", lambda *a, **k: 15.0)  # a slow machine: ~31 s an epoch
    with pytest.raises(ValueError, match=r"fits only 1 epoch\(s\) on this machine, all with the backbone frozen "
                       r"\(--freeze-epochs 1\): the backbone would not train.*fewer --freeze-epochs"):
        finetune(_config(tiny_set, tmp_path / "run", epochs=4, freeze_epochs=1, time_budget=1.0), progress=False)
    # a generous budget, and --epochs the cap: not refused as a too small budget, but run as without a budget (the
    # CLI notes that the backbone did not train), and the warning names the cap
    caplog.set_level(logging.WARNING, logger="finetune.budget")
    r = finetune(_config(tiny_set, tmp_path / "capped", epochs=1, freeze_epochs=1, time_budget=120.0,
                         test_size="train"), progress=False)
    assert (r.epochs_run, r.backbone_trained) == (1, False)
    assert any(m.startswith("--epochs 1 with --freeze-epochs 1 leaves no epoch that trains the backbone (the time "
                            "budget is not what stops it)") and "raise --epochs or lower --freeze-epochs" in m
               for m in caplog.messages)


def test_weights_kept_before_the_backbone_trained_are_said_so(tiny_set, tmp_path, monkeypatch, capsys):
    import finetune.train as train
    from api.cli import main

    r = train.finetune(_config(tiny_set, tmp_path / "run", epochs=1, freeze_epochs=1, test_size="train"),
                       progress=False)
    info = json.loads((tmp_path / "run" / "config.json").read_text())["speciesid"]
    assert r.backbone_trained is False and info["backbone_trained"] is False
    # the CLI's summary says so, and names the epochs a budget allowed rather than "every epoch run"
    r.epochs_planned, r.max_epochs = 1, 30
    monkeypatch.setattr(train, "finetune", lambda config, progress=True, report=None: r)
    assert main(["finetune", "--root", str(tiny_set), "--init", MOBILENET_SPEC, "--out", str(tmp_path / "o"),
                 "-q"]) == 0
    text = capsys.readouterr().out
    assert "every epoch --time-budget allowed: 1 of --epochs 30" in text and "every epoch run" not in text
    assert "are from before the backbone trained" in text and "backbone_trained false" in text


def test_val_macro_f1_is_over_the_species_with_validation_photos(tiny_set, tmp_path, monkeypatch, caplog):
    """A --val-root without one training species: that species adds no F1 of 0 (epochs and final evaluation),
    and a warning names it."""
    import finetune.engine as engine
    from finetune.train import finetune

    seen = []
    real = engine.macro_f1
    monkeypatch.setattr(engine, "macro_f1", lambda y, pred, labels: seen.append(list(labels)) or real(y, pred, labels))
    val = _subset(tmp_path / "val", _species_dirs()[:2], 2, split="val")
    r = finetune(_config(tiny_set, tmp_path / "run", epochs=1, val_root=str(val), test_size="train",
                         final_eval=True), progress=False)
    present = sorted(r.species.index(d.split("(")[1].rstrip(")")) for d in _species_dirs()[:2])
    assert len(present) == 2 and seen and all(labels == present for labels in seen), seen
    missing = next(s for i, s in enumerate(r.species) if i not in present)
    assert any("1 training species have no validation photo" in m and missing in m for m in caplog.messages)


def test_a_fixed_test_size_weighs_the_untrained_network_at_that_side(tiny_set, tmp_path, monkeypatch):
    """``--test-size 96``: the untrained network and the fine-tuned one are compared at 96 px, where the gallery
    embeds (they were compared at the model's 224 px while config.json said otherwise)."""
    import finetune.train as train

    sides = []
    real = train.choose_test_size

    def measured(net, loaders, device, **kw):
        sides.append(sorted(loaders))
        return real(net, loaders, device, **kw)

    monkeypatch.setattr(train, "choose_test_size", measured)
    r = train.finetune(_config(tiny_set, tmp_path / "run", epochs=1, test_size="96"), progress=False)
    assert sides == [[96], [96]]  # the untrained network, then the best fine-tuned epoch
    info = json.loads((tmp_path / "run" / "config.json").read_text())["speciesid"]
    assert r.test_size == {"size": 96, "setting": "96"} == info["test_size"]
    assert info["against_untrained"]["untrained_nll"] is not None
    # the side chosen is exported where galleries read it (timm's test_input_size): they embed at 96 px, not 224
    from retrieval.encoders import create_encoder

    pcfg = json.loads((tmp_path / "run" / "config.json").read_text())["pretrained_cfg"]
    assert pcfg["test_input_size"] == [3, 96, 96]
    assert create_encoder(f"timm:local-dir:{tmp_path / 'run'}", device="cpu", precision="fp32").input_size == 96


def test_model_weights_follow_the_umask(tmp_path):
    from finetune.export import save_finetuned
    from finetune.model import CosineHead, create_backbone, feature_dim, resolve_init

    source = resolve_init("timm:test_resnet@random")
    backbone = create_backbone(source)
    old = os.umask(0o022)
    try:
        save_finetuned(tmp_path / "out", backbone, CosineHead(feature_dim(backbone), 2, scale=24.0), ["a b", "c d"],
                       source, {"stage": "local"})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert modes["model.safetensors"] == 0o644 == modes["config.json"], modes


def _strict(text: str) -> dict:
    """``text`` read as strict JSON: a NaN or Infinity in it fails."""
    def refuse(name: str) -> None:
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_a_nan_in_the_exported_config_is_written_as_null(tmp_path):
    """config.json is strict JSON, NaN/inf as null, as index.formats.jsonable writes them (the API, to_dict)."""
    from finetune.export import SPECIESID_KEY, record_wall_seconds, save_finetuned
    from finetune.model import CosineHead, create_backbone, feature_dim, resolve_init

    source = resolve_init("timm:test_resnet@random")
    backbone = create_backbone(source)
    out = tmp_path / "out"
    info = {"stage": "local", "val": {"val_loss": float("nan"), "val_top1": np.float32("nan"), "val_f1": 0.5},
            "final": {"knn_top1": float("inf")}}
    save_finetuned(out, backbone, CosineHead(feature_dim(backbone), 2, scale=24.0), ["a b", "c d"], source, info)
    record = _strict((out / "config.json").read_text(encoding="utf-8"))[SPECIESID_KEY]
    assert record["val"] == {"val_loss": None, "val_top1": None, "val_f1": 0.5} and record["final"] == {
        "knn_top1": None}, record
    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))  # a folder an older version wrote: NaN
    cfg[SPECIESID_KEY]["val"]["val_loss"] = float("nan")
    (out / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    record_wall_seconds(out, 12.34)
    record = _strict((out / "config.json").read_text(encoding="utf-8"))[SPECIESID_KEY]
    assert record["val"]["val_loss"] is None and record["process_wall_seconds"] == 12.3, record


def test_an_unreadable_checkpoint_and_a_failed_write_say_what_to_do(tiny_set, tmp_path, monkeypatch):
    import finetune.checkpoint as checkpoint
    from finetune.train import finetune

    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ValueError, match=r"checkpoint.pt cannot be read .*delete it to start afresh"):
        finetune(_config(tiny_set, out), progress=False)
    # it cannot be told to be a run's: --no-resume does not remove it either
    with pytest.raises(ValueError, match=r"holds checkpoint.pt, not written by a speciesid fine-tuning run"):
        finetune(_config(tiny_set, out, resume="no"), progress=False)
    (out / "checkpoint.pt").unlink()
    saves, real_save = [], torch.save

    def full_disk(payload, path):  # epoch 0's checkpoint is written, epoch 1's finds the disk full
        saves.append(path)
        if len(saves) > 1:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 40718720 vs 40718616")
        real_save(payload, path)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(OSError, match=r"could not write .*checkpoint.pt after epoch 1 \(.*unexpected pos.*is the disk "
                       r"full\?\): the checkpoint of the epoch before is kept"):
        finetune(_config(tiny_set, out, resume="no"), progress=False)


class _RunsCode:
    """A pickled object that runs a shell command when it is unpickled (a crafted checkpoint.pt)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import shlex

        return os.system, (f"echo ran > {shlex.quote(str(self.marker))}",)


def test_a_crafted_checkpoint_runs_no_code_and_says_it_is_not_one_of_ours(tiny_set, tmp_path, capsys):
    """Stop 57's types walk: torch.load(weights_only=False) unpickled any checkpoint.pt in --out, to resume it and
    (with --no-resume) only to recognise it, so a crafted one ran its code. It is read with weights_only=True now:
    refused, with what it asked for and what to do, and nothing of it runs."""
    from api.cli import main
    from finetune.train import finetune

    out, marker = tmp_path / "run", tmp_path / "ran.txt"
    out.mkdir()
    torch.save({"format": 4, "key": "x", "payload": _RunsCode(marker)}, out / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"checkpoint.pt is not a speciesid fine-tuning checkpoint, or not one that "
                       r"can be loaded safely \(it asks for \w+\.system; nothing of it was run\): delete it to start "
                       r"afresh, or give another --out$"):
        finetune(_config(tiny_set, out), progress=False)
    with pytest.raises(ValueError, match=r"holds checkpoint.pt, not written by a speciesid fine-tuning run"):
        finetune(_config(tiny_set, out, resume="no"), progress=False)
    assert main(["finetune", "--root", str(tiny_set), "--init", MOBILENET_SPEC, "--out", str(out), "-q"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing of it was run): delete it to start afresh" in err, err
    assert not marker.exists()


def test_a_checkpoint_of_ours_needs_nothing_but_numpy_arrays_beyond_what_torch_loads_safely(tiny_set, tmp_path):
    """What the safe load allows (finetune.checkpoint._SAFE_GLOBALS) is what a run's checkpoint holds: the numpy RNG
    state's arrays; an EMA run's checkpoint, interrupted, resumes through it (test_interrupted_run_resumes too)."""
    from finetune.checkpoint import load_checkpoint
    from finetune.train import FinetuneInterrupted, finetune

    out = tmp_path / "run"
    cfg = _config(tiny_set, out, epochs=2, ema=0.9, time_budget=30.0)

    def stop_after_first(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(FinetuneInterrupted):
        finetune(cfg, progress=False, on_epoch_end=stop_after_first)
    needs = set(torch.serialization.get_unsafe_globals_in_checkpoint(out / "checkpoint.pt"))
    assert needs <= {"numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray",
                     "numpy.dtype"}, needs
    checkpoint = load_checkpoint(out, cfg.resolved())
    assert checkpoint is not None and checkpoint["rng"]["numpy"][1].dtype == np.uint32 and checkpoint["plan"]
    assert finetune(cfg, progress=False).epochs_run == 2


def test_messages_say_what_is_wrong(tiny_set, tmp_path, capsys, caplog):
    """--val-root of none of the training species; the help of --no-amp, --no-resume, --epochs, --seed; no timm
    warning about the cosine schedule of a 2-epoch run with a frozen first epoch."""
    import logging

    from api.cli import main
    from finetune.config import FinetuneConfig
    from finetune.engine import StagedCosineLR
    from finetune.train import finetune

    val = _subset(tmp_path / "val", _species_dirs()[3:5], 2, split="val")
    with pytest.raises(ValueError, match=r"none of the photos under --val-root .* is of a training species"):
        finetune(_config(tiny_set, tmp_path / "run", val_root=str(val)), progress=False)
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "fp32 training steps on CPUs with native bf16" in text
    assert ("Whenever a run starts afresh (this, or no checkpoint in OUT) the earlier speciesid run's files in OUT "
            "(checkpoint, model, probe, photo lists, log, curves, last/) are removed before its first epoch; files of "
            "those names that are not a speciesid run's, and an OUT that is the --init folder, are refused") in text
    assert "--epochs EPOCHS epochs in all, the frozen ones included" in text and "--seed SEED seed of the split" in text
    cfg = FinetuneConfig(root="r", out="o", epochs=2).resolved()
    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "name": "head"},
                           {"params": [torch.zeros(1, requires_grad=True)], "name": "layer0"}], lr=0.1)
    caplog.set_level(logging.WARNING)
    StagedCosineLR(opt, total=2 * 2, warmup=2, unfreeze=cfg.freeze_epochs * 2)
    assert not [r for r in caplog.records if "Cosine annealing" in r.getMessage()]


def test_probe_import_says_when_head_and_gallery_species_differ(stage1, tiny_set, tmp_path, capsys, caplog):
    """A gallery whose folder of one species was renamed took the head silently (the head's species answered as an
    unknown taxon); a gallery of none of the head's species is refused."""
    import logging
    import shutil

    from api.cli import main
    from retrieval.encoders import EncoderConfig
    from retrieval.workflows import build_gallery, import_gallery_probe

    out, r = stage1
    photos = tmp_path / "photos"
    shutil.copytree(tiny_set, photos, symlinks=True)
    cobra = next(p for p in photos.iterdir() if "Naja sumatrana" in p.name)
    cobra.rename(photos / cobra.name.replace("Naja sumatrana", "Naja sputatrix"))
    encoder = EncoderConfig(spec=f"timm:local-dir:{out}", precision="fp32")
    build_gallery(tmp_path / "g", "folder", photos, encoder=encoder, progress=False)
    caplog.set_level(logging.WARNING, logger="retrieval.probe_flows")
    assert main(["probe", "import", "--index", str(tmp_path / "g"), "--from", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    warned = [m for m in caplog.messages if "species of" in m]  # said once, with what to do: not again on stdout
    assert len(warned) == 2 and "Naja sumatrana" not in text and "Naja sputatrix" not in text
    assert warned[0].startswith(f"1 species of the head of {out} have no photo in gallery") and (
        "so they are never answered (the blend answers only the gallery's species): Naja sumatrana. Renamed or left "
        "out? Name their folders") in warned[0]
    assert "not among the head's, so only the kNN vote answers them: Naja sputatrix. Fine-tune with" in warned[1]
    other = _subset(tmp_path / "other", _species_dirs()[3:5], 2)
    build_gallery(tmp_path / "g2", "folder", other, encoder=encoder, progress=False)
    with pytest.raises(ValueError, match="names none of the species of gallery"):
        import_gallery_probe(tmp_path / "g2", out, progress=False, encoder=EncoderConfig(precision="fp32"))


def _textured_photos(root: Path, species: tuple[str, ...], n: int,
                     size: tuple[int, int] = (1600, 1200)) -> list[Path]:
    """Large JPEGs with fine texture (stripes and noise): where decoding at another scale shows in the pixels."""
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    paths = []
    for s, name in enumerate(species):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            stripes = 127 + 100 * np.sin(xx * (0.3 + 0.1 * k) + yy * (0.2 + 0.05 * s))
            rgb = np.stack([stripes, np.roll(stripes, 7 * k + 3, axis=1), 255 - stripes], axis=-1)
            rgb = np.clip(rgb + rng.normal(0, 25, rgb.shape), 0, 255).astype(np.uint8)
            path = root / name / f"{k}.jpg"
            Image.fromarray(rgb).save(path, quality=92)
            paths.append(path)
    return paths


def test_evaluation_photos_are_what_the_gallery_encoder_gets(tmp_path):
    """Audit #10: validation, the test-size choice and the final evaluation read the photos cached at 448 px on the
    short side (a bilinear resize), where a gallery decodes at twice the model input and reduces by a whole factor
    (``retrieval.pipeline.model_input``): on a large photo the epoch and the test size were chosen on inputs no
    gallery sees. Every evaluation input is now the gallery encoder's, at the model's own side and a test side."""
    needs_shared()
    from finetune.augment import model_data_config
    from finetune.data import LabelledPhotos, Split, build_data
    from finetune.model import create_backbone, resolve_init
    from retrieval.encoders import create_encoder
    from retrieval.pipeline import model_input
    from retrieval.preprocess import from_timm

    paths = _textured_photos(tmp_path / "photos", ("a", "b"), 3)
    photos = LabelledPhotos(paths, [p.parent.name for p in paths])
    split = Split(photos.subset([0, 1, 3, 4]), photos.subset([2, 5]), ["a", "b"], "split:0.34")
    data_cfg = model_data_config(create_backbone(resolve_init(MOBILENET_SPEC)))
    cfg = _config(tmp_path / "photos", tmp_path / "out")
    data = build_data(split, data_cfg, cfg, train_size=64, device=torch.device("cpu"))
    enc = create_encoder(MOBILENET_SPEC, device="cpu", precision="fp32", runtime="torch")
    assert enc.input_size == 224

    def gallery(ds) -> np.ndarray:
        return np.stack([model_input(p.read_bytes(), enc, name=str(p))[0] for p in ds.paths])

    # the epochs' validation (the dataset itself, and its loader) at the model's own side
    val = np.stack([data.val[i][0].numpy() for i in range(len(data.val))])
    np.testing.assert_allclose(val, gallery(data.val), atol=1e-6)
    for side in (224, 288):  # the head's init / final kNN gallery (training photos) and the test-size candidates
        if side != enc.input_size:  # what TimmEncoder gives a network exported with timm's test_input_size
            enc.input_size = side
            enc.preprocess_config = from_timm({**data_cfg, "input_size": (3, side, side)})
        for ds in (data.train, data.val):
            batches = list(data.eval_loader(ds, cfg, side=side, device=torch.device("cpu"), workers=0))
            got = torch.cat([x for x, _ in batches]).numpy()
            np.testing.assert_allclose(got, gallery(ds), atol=1e-6)


def test_validation_leaves_an_unreadable_photo_out(tmp_path, monkeypatch, caplog):
    """A set too large to decode up front: an unreadable validation photo was replaced by another of its species
    (the training datasets' stand-in), so it was counted twice in the epochs' validation; the docs say left out."""
    needs_shared()
    import finetune.data
    from finetune.data import Split, build_data, load_photos

    monkeypatch.setattr(finetune.data, "CACHE_LIMIT", 0)  # read on each photo's turn
    root = _subset(tmp_path / "photos", _species_dirs()[:2], 3)
    bad = sorted(root.iterdir())[0] / "empty.jpg"
    bad.write_bytes(b"")
    photos = load_photos("folder", root)
    val_idx = [i for i, p in enumerate(photos.paths) if p == bad or p.name == sorted(bad.parent.iterdir())[1].name]
    split = Split(photos.subset([i for i in range(len(photos)) if i not in val_idx]), photos.subset(val_idx),
                  photos.species, "split:0.3")
    data_cfg = {"input_size": (3, 64, 64), "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406),
                "std": (0.229, 0.224, 0.225), "crop_pct": 0.875, "crop_mode": "center"}
    cfg = _config(root, tmp_path / "out")
    data = build_data(split, data_cfg, cfg, train_size=64, device=torch.device("cpu"))
    i = data.val.paths.index(bad)
    assert data.val[i] is None
    assert any(m.startswith("unreadable photo, left out") and "empty.jpg" in m for m in caplog.messages)
    batches = list(data.eval_loader(data.val, cfg, device=torch.device("cpu"), workers=0))
    assert sum(len(y) for _, y in batches) == len(data.val) - 1


def test_init_is_read_once(tmp_path):
    """``--init`` is read by one function (``parse_init``): the run's starting files (kept off ``--out``) and
    what ``resolve_init`` loads come from the same reading."""
    from finetune.checkpoint import init_paths
    from finetune.model import parse_init

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    folder = tmp_path / "model"
    folder.mkdir()
    assert parse_init(str(weights)).path == weights and parse_init(str(weights)).spec is None
    assert parse_init(str(folder)).spec == f"timm:local-dir:{folder}" and parse_init(str(folder)).path == folder
    for spec in (f"timm:local-dir:{folder}", f"local-dir:{folder}"):
        assert parse_init(spec).path == folder and parse_init(spec).spec == spec
    assert parse_init("timm:mobilenetv1_100").path is None
    cfg = _config(tmp_path, tmp_path / "out", init=str(folder), weights=str(weights))
    assert init_paths(cfg) == [folder, weights]
    assert init_paths(_config(tmp_path, tmp_path / "out", init="timm:hf-hub:org/repo")) == []


def test_out_is_scanned_once(tmp_path, monkeypatch):
    """``check_out`` and ``clear_run`` each listed the output folder; now ``check_out``'s scan is what
    ``clear_run`` removes (and an emptied ``last/`` with it)."""
    import finetune.checkpoint as ck

    out = tmp_path / "run"
    _a_runs_config(out)
    (out / "last").mkdir()
    for name in ("heldout.csv", "model.safetensors"):
        (out / name).write_text("an earlier run's")
    (out / "last" / "heldout.csv").write_text("an earlier run's")
    (out / "notes.txt").write_text("the user's")
    scans = []
    real = ck.earlier_run
    monkeypatch.setattr(ck, "earlier_run", lambda *a: scans.append(a) or real(*a))
    files = ck.check_out(out, _config(tmp_path, out, resume="no"))
    removed = ck.clear_run(out, files)
    assert len(scans) == 1
    assert sorted(p.relative_to(out).as_posix() for p in removed) == [
        "config.json", "heldout.csv", "last/heldout.csv", "model.safetensors"]
    assert not (out / "last").exists() and (out / "notes.txt").is_file()


def test_clear_run_removes_only_what_check_out_listed(tmp_path):
    """``--out`` is scanned once, by ``check_out`` (which refuses a folder holding files of a run's names that are
    not a run's). A file that appears there later, while the photos are read (a race), is neither refused nor
    removed by ``clear_run``: the run writes its own file of that name over it when it gets there."""
    import finetune.checkpoint as ck

    out = tmp_path / "run"
    _a_runs_config(out)
    (out / "heldout.csv").write_text("an earlier run's")
    files = ck.check_out(out, _config(tmp_path, out, resume="no"))
    (out / "trained.csv").write_text("the user's, written after the scan")
    (out / "last").mkdir()
    (out / "last" / "model.safetensors").write_text("the user's, written after the scan")
    removed = ck.clear_run(out, files)
    assert sorted(p.relative_to(out).as_posix() for p in removed) == ["config.json", "heldout.csv"]
    assert (out / "trained.csv").read_text() == "the user's, written after the scan"
    assert (out / "last" / "model.safetensors").is_file()
    assert ck.clear_run(out, files) == []  # listed files gone since: nothing removed, no error


def test_a_run_forks_its_loader_workers_without_the_store_loaded(tiny_set, tmp_path):
    """Walkthrough s46 #6: every run printed lancedb's "fork support is experimental ... deadlock" warning once per
    loader worker: the data path (``split_photos``) and the export imported ``retrieval.protocol``, which loaded
    the gallery store (LanceDB) before the workers forked. What a run imports and reads no longer loads it (a fresh
    process: this one has loaded it for other tests)."""
    import subprocess
    import sys

    from conftest import REPO

    script = f"""
import sys
import api.cli.finetune, finetune.train, finetune.export, finetune.checkpoint
from finetune.config import FinetuneConfig
from finetune.data import split_photos
from retrieval.protocol import HELDOUT_FILE, LINEAGE_KEY, SPLIT_SOURCE, TRAINED_FILE, VAL_FILE, inherited_training
split = split_photos(FinetuneConfig(root={str(tiny_set)!r}, out={str(tmp_path / "run")!r}, val_split=0.34))
inherited_training({MOBILENET_SPEC!r})
print(len(split.species), [m for m in sys.modules if m.split(".")[0] == "lancedb"][:1])
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["3", "[]"], run.stdout



def test_a_budgeted_run_resumes_from_a_checkpoint_whose_plan_holds_a_key_it_does_not_know(tiny_set, tmp_path,
                                                                                         caplog):
    """Re-read w2 #14: the resume made its budget plan with BudgetPlan(**checkpoint["plan"]), so a checkpoint a
    newer speciesid saved with one more plan field stopped it (TypeError), against CONTRIBUTING's "never
    Cls(**data)". Now the plan is read through index.formats.from_dict: the key is ignored, and logged."""
    import logging

    import torch

    from finetune.train import finetune

    cfg = _budgeted_run_cut_after_its_first_epoch(tiny_set, tmp_path / "run")
    path = tmp_path / "run" / "checkpoint.pt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["plan"]["warmup_s"] = 1.5  # a field a newer speciesid's plan has
    torch.save(checkpoint, path)
    seen = []
    with caplog.at_level(logging.INFO, logger="index.formats"):
        r = finetune(cfg, progress=False, on_epoch_end=lambda e, row: seen.append(e))
    assert seen == [2] and r.epochs_run == 2
    assert "'warmup_s'" in caplog.text and "does not know" in caplog.text, caplog.text


def test_rerunning_a_finished_run_is_refused_and_keeps_it(tiny_set, tmp_path):
    """A finished run keeps no checkpoint: the same command run again (resume auto) would start afresh and remove
    its model. Refused before anything is read or written, saying how to start afresh."""
    from finetune.train import finetune

    out = tmp_path / "run"
    _a_runs_config(out)
    (out / "model.safetensors").write_text("a finished run's")
    (out / "log.csv").write_text("a finished run's")
    before = _tree(out)
    with pytest.raises(ValueError, match=r"run already holds a finished fine-tuning run \(config.json \+ "
                       r"model.safetensors of speciesid finetune\); give another --out, or pass --no-resume"):
        finetune(_config(tiny_set, out, epochs=1), progress=False)
    assert _tree(out) == before


def _stopping_run(*, epoch: int = 3, epochs: int = 10, plan=None, time_limit=None, seconds: float = 0.0,
                  epoch_s: float = 20.0):
    """A stand-in run for ``_stop_reason``: ``epoch`` of ``epochs`` done, ``seconds`` trained in this run's epochs
    (each ``epoch_s``), not out of patience."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(epochs=epochs, time_limit=time_limit, freeze_epochs=0)
    state = SimpleNamespace(epoch=epoch, seconds=seconds, out_of_patience=lambda cfg: False,
                            history=[{"epoch": e, "seconds": epoch_s} for e in range(epoch + 1)])
    return SimpleNamespace(cfg=cfg, state=state, plan=plan)


@pytest.mark.parametrize(("final_s", "stop"), [(15.0, "time-budget"), (5.0, "epochs")])
def test_the_budget_stops_before_an_epoch_whose_final_evaluation_would_not_fit(final_s, stop, monkeypatch):
    """80 s of a 100 s budget spent, 10 s an epoch: another epoch fits only when the final evaluation and export
    (``final_s``) fit after it too; else the run would end past its --time-budget."""
    from types import SimpleNamespace

    import finetune.train as train

    monkeypatch.setattr(train, "_elapsed", lambda run: 80.0)
    run = _stopping_run(plan=SimpleNamespace(budget_s=100.0, final_s=final_s))
    assert train._stop_reason(run, 10.0) == stop
    run.state.epoch = 10  # the last epoch done: nothing to stop
    assert train._stop_reason(run, 10.0) == "epochs"


@pytest.mark.parametrize(("seconds", "stop"), [(50.0, "time-limit"), (30.0, "epochs")])
def test_the_time_limit_is_in_minutes(seconds, stop):
    """--time-limit 1: with 20 s an epoch, 50 s trained stops (70 s > 60 s), 30 s goes on (50 s)."""
    import finetune.train as train

    assert train._stop_reason(_stopping_run(time_limit=1, seconds=seconds, epoch_s=20.0), 20.0) == stop


def test_early_stopping_waits_patience_epochs_after_the_best(tiny_set, tmp_path, monkeypatch):
    """Validation better until epoch 4, then worse: with patience 2 the run stops after epoch 6, keeping epoch 4
    (the only other early-stopping test stops at min_epochs, whatever the patience)."""
    import finetune.engine as engine
    import finetune.train as train

    scores = iter([0.1, 0.2, 0.3, 0.4, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15])
    monkeypatch.setattr(engine, "macro_f1", lambda y, pred, labels: next(scores))
    r = train.finetune(_config(tiny_set, tmp_path / "run", epochs=10, patience=2, min_epochs=1, select="macro-f1",
                               batch_size=12), progress=False, on_epoch_end=_stop_after(8))
    assert (r.epochs_run, r.best_epoch, r.stopped) == (6, 4, "early-stopping")


def test_a_resumed_budgeted_run_keeps_the_epochs_its_budget_fitted(tiny_set, tmp_path, monkeypatch):
    """--epochs 30 whose budget fits 2: resumed after epoch 1, the run goes on for 2 epochs (its learning-rate
    schedule built for them, as the uninterrupted run's), not for the 30 asked."""
    import finetune.budget as budget
    import finetune.train as train

    monkeypatch.setattr(budget, "plan_epochs", lambda *a, **k: 2)  # the budget fits 2 epochs here
    monkeypatch.setattr(train, "replan", lambda plan, **k: 2)  # and the first epoch's time does not change that
    cfg = _config(tiny_set, tmp_path / "whole", epochs=30, time_budget=30.0)
    whole = train.finetune(cfg, progress=False, on_epoch_end=_stop_after(3))
    assert whole.epochs_run == 2
    cfg = _config(tiny_set, tmp_path / "cut", epochs=30, time_budget=30.0)
    with pytest.raises(train.FinetuneInterrupted):
        train.finetune(cfg, progress=False, on_epoch_end=_stop_after(1))
    lines: list[str] = []
    r = train.finetune(_config(tiny_set, tmp_path / "cut", epochs=30, time_budget=30.0), progress=False,
                       on_epoch_end=_stop_after(3), report=lines.append)  # an interrupt past 2 fails the test
    assert lines[0].startswith(f"resuming {tmp_path / 'cut' / 'checkpoint.pt'}: after epoch 1 of 2")
    assert r.epochs_run == 2
    assert [h["lr"] for h in r.history] == pytest.approx([h["lr"] for h in whole.history])
