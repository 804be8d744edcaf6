"""Start-up: no random init, the digest cache, a light parser, and identify without torch on a warm cache;
the pipeline's measure of how long the model waits for decoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import PH_SNAKES, REPO, require_module
from PIL import Image

HEAVY = ("torch", "open_clip", "timm", "sklearn", "torchvision")


def _photo_tree(root, per_species: int = 8) -> list:
    """A folder dataset: real ph-snakes photos (symlinked) when present, else random images in 3 classes."""
    if PH_SNAKES.is_dir():
        for d in sorted((PH_SNAKES / "train").iterdir())[:4]:
            (root / d.name).mkdir(parents=True)
            for f in sorted(d.iterdir())[:per_species]:
                os.symlink(f, root / d.name / f.name)
    else:
        rng = np.random.default_rng(0)
        for s in ("Naja haje", "Natrix maura", "Vipera latastei"):
            (root / s).mkdir(parents=True)
            for i in range(per_species):
                Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(root / s / f"{i}.jpg")
    return sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())


def _cache_files(name: str):
    from retrieval.runtimes.cache import models_dir

    return models_dir().glob(f"*/{name}")


def test_meta_load_equals_the_librarys_load_and_digest(tiny_clip_dir):
    import open_clip
    import torch

    from retrieval.encoders import create_encoder
    from retrieval.torch_encoders import seeded_init, state_dict_digest

    with seeded_init():
        model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip_dir}")
    model.eval()
    enc = create_encoder(f"open_clip:local-dir:{tiny_clip_dir}", runtime="torch", precision="fp32", device="cpu")
    assert enc.fingerprint.endswith("#" + state_dict_digest(model)[:16])
    assert enc.weights_digest == state_dict_digest(model)
    images = [Image.fromarray(np.full((40, 50, 3), v, dtype=np.uint8)) for v in (10, 128, 250)]
    x = torch.stack([transform(im) for im in images])
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(model.encode_image(x), dim=-1).numpy()
        tref = torch.nn.functional.normalize(model.encode_text(open_clip.get_tokenizer(
            f"local-dir:{tiny_clip_dir}")(["a snake", "a lizard"])), dim=-1).numpy()
    np.testing.assert_array_equal(enc.encode_images(images), ref)
    np.testing.assert_array_equal(enc.encode_text(["a snake", "a lizard"]), tref)
    assert not any(t.is_meta for t in [*enc.model.parameters(), *enc.model.buffers()])


def test_digest_cache_is_keyed_by_file_identity(tiny_clip_dir, tmp_path, monkeypatch):
    import shutil

    from retrieval import torch_encoders
    from retrieval.encoders import create_encoder

    monkeypatch.setenv("SPECIESID_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    shutil.copytree(tiny_clip_dir, folder)
    first = create_encoder(f"open_clip:local-dir:{folder}", runtime="torch", precision="fp32")
    table = json.loads((tmp_path / "cache" / "digests.json").read_text())
    assert list(table.values()) == [first.weights_digest]
    real = torch_encoders.state_dict_digest
    monkeypatch.setattr(torch_encoders, "state_dict_digest", lambda m: pytest.fail("digest recomputed"))
    again = create_encoder(f"open_clip:local-dir:{folder}", runtime="torch", precision="fp32")
    assert again.fingerprint == first.fingerprint
    weights = folder / "open_clip_model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed (same bytes here)
    calls = []
    monkeypatch.setattr(torch_encoders, "state_dict_digest", lambda m: calls.append(1) or real(m))
    third = create_encoder(f"open_clip:local-dir:{folder}", runtime="torch", precision="fp32")
    assert calls == [1] and third.fingerprint == first.fingerprint


def test_every_command_is_mapped_and_the_query_parser_imports_nothing_heavy():
    from api.cli import COMMAND_NAMES, build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(n for names in COMMAND_NAMES.values() for n in names)
    code = ("import sys; from api.cli import parser_for; "
            "a = parser_for(['identify', '--index', 'g', 'x.jpg', '--runtime', 'onnx']).parse_args("
            "['identify', '--index', 'g', 'x.jpg', '--runtime', 'onnx']); "
            f"print(a.runtime, sorted(m for m in {HEAVY + ('lancedb', 'faiss')!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["onnx", "[]"]


def test_every_writer_listed_is_a_command_and_its_help_says_how_long_it_waits():
    """WRITERS is hand-kept (docs/architecture.md, "A command"): a path that names no command was skipped silently."""
    import argparse

    from api.cli import DOCS_HELP, PIXELS_HELP, READERS, WRITE_WAIT_HELP, WRITERS, build_parser

    for path in WRITERS + READERS:
        parser = build_parser()
        for name in path:
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            assert name in sub.choices, f"{' '.join(path)!r} is no command"
            parser = sub.choices[name]
        said = [WRITE_WAIT_HELP] * (path in WRITERS) + [PIXELS_HELP] * (path in READERS)  # walk s57 #4: the pixels
        assert parser.epilog in (" ".join(said), " ".join([*said, DOCS_HELP])), path  # docs/ named: where


def test_decoding_photos_for_a_model_imports_no_gallery_stack(tmp_path):
    """Fine-tuning's photos and the runtime choice's check photos are decoded by ``retrieval.images.model_image``:
    neither loads the gallery's LanceDB or FAISS to do it (the rule lived in ``retrieval.pipeline``)."""
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 800, 3), dtype=np.uint8)).save(photo)
    code = ("import sys; import numpy as np; from pathlib import Path; import finetune.data as d; "
            "from retrieval.runtimes.select import _Photos; "
            "Ref = type('Ref', (), {'input_size': 224, "
            "'preprocess': staticmethod(lambda im: np.asarray(im.resize((8, 8)), dtype=np.float32))}); "
            f"im = d._open(Path({str(photo)!r}), None, model_side=224); "
            f"p = _Photos([Path({str(photo)!r})] * 10, Ref()); p._load(); "
            "print(im.size, p.real, sorted(m for m in ('lancedb', 'faiss', 'index.gallery') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["(800,", "600)", "True", "[]"]


def test_identify_on_a_warm_cache_never_imports_torch(tiny_clip_dir, tmp_path, capsys, monkeypatch):
    """Build with ``--runtime auto`` (the export is made and checked on the dataset's photos), then identify in a
    fresh process: the cached exported tower answers, and torch, open_clip, timm, sklearn are never imported."""
    require_module("onnxruntime")
    from api.cli import main

    photos = _photo_tree(tmp_path / "photos")
    index = tmp_path / "gallery"
    monkeypatch.setenv("SPECIESID_RUNTIME", "auto")
    monkeypatch.setenv("SPECIESID_CPU_KIND", "baseline")  # onnx fp32: the quickest export to make in a test
    code = main(["index", "build", "--dataset", "folder", "--root", str(tmp_path / "photos"), "--index", str(index),
                 "--encoder", f"open_clip:local-dir:{tiny_clip_dir}", "--quiet"])
    env = dict(os.environ)
    assert code == 0, capsys.readouterr()
    choice = json.loads(next(_cache_files("choice-auto-auto-baseline.json")).read_text())
    assert choice["chosen"] == {"runtime": "onnx", "precision": "fp32"} and choice["photos"] == "real"
    probe = ("import sys, json; from api.cli import main; "
             f"rc = main(['identify', '--index', {str(index)!r}, {str(photos[0])!r}, '--format', 'json', '-q']); "
             f"print('@@', json.dumps([rc, sorted(m for m in {HEAVY!r} if m in sys.modules)]))")
    run = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    rc, heavy = json.loads(run.stdout.split("@@", 1)[1])
    assert rc == 0 and heavy == []
    (answer,) = json.loads(run.stdout.split("@@", 1)[0])
    assert answer["predictions"] and answer["image"] == str(photos[0])


def test_build_reports_how_long_the_model_waited_for_decoding(tiny_clip_dir, tmp_path, monkeypatch):
    """The wait share tells a decode-bound build from a model-bound one: decoding slowed (0.15 s a photo, one
    decode thread) and the model instant (a stand-in's unit vectors, so a loaded machine's model time cannot
    outweigh the decoding), the model waits most of the build; the model slowed (0.3 s a batch) and decoding
    instant, it hardly waits (the decode thread runs ahead)."""
    import time

    import retrieval.pipeline
    from index.datasets import load_dataset
    from index.gallery import Gallery
    from retrieval.encoders import create_encoder
    from retrieval.pipeline import BuildReport, add_references

    _photo_tree(tmp_path / "photos", per_species=4)
    records = load_dataset("folder", tmp_path / "photos").records
    enc = create_encoder(f"open_clip:local-dir:{tiny_clip_dir}", runtime="torch", precision="fp32", batch_size=4)
    decode, encode = retrieval.pipeline.model_input, enc.encode_batch

    def build(name: str) -> BuildReport:
        return add_references(Gallery.create(tmp_path / name, enc.describe()), enc, records, progress=False,
                              workers=1)

    def slow_decode(*args, **kwargs):
        time.sleep(0.15)
        return decode(*args, **kwargs)

    def slow_model(batch):
        time.sleep(0.3)
        return encode(batch)

    def instant_model(batch):
        n = len(batch[0]) if isinstance(batch, tuple) else len(batch)
        return np.tile(np.eye(1, enc.dim, dtype=np.float32), (n, 1))

    monkeypatch.setattr(retrieval.pipeline, "model_input", slow_decode)
    monkeypatch.setattr(enc, "encode_batch", instant_model)
    report = build("decode-bound")
    s = report.stats
    assert s.batches >= report.added / 4 and s.encode_s > 0 and s.encode_s + s.wait_s <= report.seconds
    assert s.wait_share(report.seconds) > 0.5, (s, report.seconds)
    assert "the model waited for decoding" in report.summary()
    monkeypatch.setattr(retrieval.pipeline, "model_input", decode)
    monkeypatch.setattr(enc, "encode_batch", slow_model)
    model_bound = build("model-bound")
    assert model_bound.added == report.added
    assert model_bound.stats.wait_share(model_bound.seconds) < 0.2, (model_bound.stats, model_bound.seconds)
    # a build whose model time nobody measured (a Ray build's actors) does not claim it never waited
    ray_like = BuildReport(added=report.added, seconds=report.seconds)
    assert "waited" not in ray_like.summary() and f"added {report.added}," in ray_like.summary()
