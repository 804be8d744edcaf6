"""Ctrl-C during ``index build`` / ``references add`` keeps what was embedded and says so; a gallery that holds no
reference, refusing another encoder, says to delete it. Tiny random ``timm:test_vit@random`` encoder, random photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from api.cli import main

ENCODER = ["--encoder", "timm:test_vit@random", "--precision", "fp32"]


def _photo(path: Path, seed: int, side: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path)
    return path


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _interrupt_on_batch(monkeypatch, n: int, *, module: str = "retrieval.workflows", again: bool = False) -> None:
    """Encoders that ``module`` makes embed 2 photos a batch and raise KeyboardInterrupt at batch ``n``; ``again``:
    a second Ctrl-C comes while the rows embedded before it are committed."""
    import importlib

    from index.gallery import Gallery

    made_by = importlib.import_module(module)
    real_create = made_by.create_encoder_from_config

    def create(config, **kw):
        enc = real_create(config, **kw)
        enc.batch_size = 2
        real, calls = enc.encode_batch, []

        def encode_batch(batch):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real(batch)

        enc.encode_batch = encode_batch
        return enc

    monkeypatch.setattr(made_by, "create_encoder_from_config", create)
    if again:
        def add_unique(self, *args, **kw):
            raise KeyboardInterrupt

        monkeypatch.setattr(Gallery, "add_unique", add_unique)


def test_an_interrupted_build_keeps_what_was_embedded_and_the_same_command_adds_the_rest(tmp_path, capsys,
                                                                                        monkeypatch):
    root = tmp_path / "photos"
    for i in range(10):
        _photo(root / ("Naja haje" if i % 2 else "Natrix maura") / f"{i}.png", i)
    index = tmp_path / "g"
    build = ["index", "build", "--dataset", "folder", "--root", root, "--index", index, *ENCODER, "-q"]
    with monkeypatch.context() as m:
        _interrupt_on_batch(m, 3)  # two batches of 2 photos embedded, below the 1,024 rows of a commit
        code, _, err = _run(capsys, *build)
    assert code == 130
    assert err.strip().endswith(f"speciesid: interrupted: 4 references kept in {index}; run the same command again "
                                "to add the rest"), err
    code, out, err = _run(capsys, "index", "info", "--index", index)
    assert code == 0 and '"references": 4' in out, (out, err)
    code, out, err = _run(capsys, *build)
    assert code == 0 and "added 6, skipped 0 unreadable, 4 already in the gallery" in out, (out, err)


def test_a_second_ctrl_c_stops_the_commit_and_says_at_least(tmp_path, capsys, monkeypatch):
    root = tmp_path / "photos"
    for i in range(6):
        _photo(root / "Natrix maura" / f"{i}.png", i)
    index = tmp_path / "g"
    with monkeypatch.context() as m:
        _interrupt_on_batch(m, 2, again=True)
        code, _, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", index,
                            *ENCODER, "-q")
    assert code == 130 and f"interrupted: at least 0 references kept in {index}" in err, err


def test_an_interrupted_references_add_keeps_what_was_embedded(tmp_path, capsys, monkeypatch):
    root = tmp_path / "photos"
    for i in range(4):
        _photo(root / ("Naja haje" if i % 2 else "Natrix maura") / f"{i}.png", i)
    index = tmp_path / "g"
    assert _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", index, *ENCODER,
                "-q")[0] == 0
    new = [_photo(tmp_path / "new" / f"{i}.png", 100 + i) for i in range(5)]
    with monkeypatch.context() as m:
        _interrupt_on_batch(m, 2, module="retrieval.galleries")
        code, _, err = _run(capsys, "references", "add", "--index", index, "--species", "Naja haje", *new)
    assert code == 130 and f"interrupted: 2 references kept in {index}; run the same command again" in err, err
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Naja haje", *new)
    assert code == 0 and "added 3, skipped 0 unreadable, 2 already in the gallery" in out, (out, err)


def test_an_empty_gallery_refusing_another_encoder_says_to_delete_it(tmp_path, capsys, monkeypatch):
    """A first build interrupted before any photo was kept leaves a gallery with no reference: another encoder is
    refused, saying that it is empty and what to do (a gallery holding references keeps the usual advice)."""
    root = tmp_path / "photos"
    for i in range(4):
        _photo(root / "Natrix maura" / f"{i}.png", i)
    index = tmp_path / "g"
    with monkeypatch.context() as m:
        _interrupt_on_batch(m, 1)
        assert _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", index, *ENCODER,
                    "-q")[0] == 130
    code, _, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", index,
                        "--encoder", "bioclip", "-q")
    assert code == 2 and f"gallery {index} was built with encoder 'timm:test_vit@random', not with the encoder given " \
        f"(bioclip); it holds no references: delete {index} (or choose another --index) to start over with this " \
        "encoder" in err, err
    assert "use --encoder" not in err, err
    assert _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", index, *ENCODER,
                "-q")[0] == 0
    code, _, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", index,
                        "--encoder", "bioclip", "-q")
    assert code == 2 and "use --encoder timm:test_vit@random or build a new index" in err, err
    assert "holds no references" not in err, err


@pytest.mark.parametrize("given", [False, True])
def test_add_references_commits_what_it_embedded_on_ctrl_c(tmp_path, given):
    """The pipeline itself: on Ctrl-C one commit of the rows embedded, then ReferencesInterrupted (a
    KeyboardInterrupt) with what this call kept; embeddings given by a caller alike."""
    from index.gallery import Gallery
    from index.records import ReferenceRecord
    from retrieval.encoders import create_encoder
    from retrieval.pipeline import ReferencesInterrupted, add_references, embed_sources

    enc = create_encoder("timm:test_vit@random", precision="fp32", runtime="torch")
    enc.batch_size = 2
    paths = [_photo(tmp_path / f"{i}.png", i) for i in range(7)]
    g = Gallery.create(tmp_path / "g", enc.describe())
    records = [ReferenceRecord(path=p, species="Naja haje") for p in paths]
    seen = []

    def stop(done, total):
        seen.append(done)
        if done >= 4:
            raise KeyboardInterrupt

    embeddings = embed_sources(paths, enc)[0] if given else None
    with pytest.raises(ReferencesInterrupted) as caught:
        add_references(g, enc, records, progress=False, workers=1, on_progress=stop, embeddings=embeddings)
    assert isinstance(caught.value, KeyboardInterrupt) and caught.value.saved
    assert caught.value.report.added == 4 and len(caught.value.report.ids) == 4
    assert len(Gallery.open(g.root)) == 4
