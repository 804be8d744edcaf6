"""Shared helpers of the tests: the tiny random ``timm:test_vit@random`` encoder, random photos, running the CLI
in-process, galleries built with them by the CLI and their venom flags; a synthetic encoder for galleries of given
vectors. Fast, no shared assets."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from api.cli import main

ENCODER = ["--encoder", "timm:test_vit@random", "--precision", "fp32"]


def _photo(path: Path, seed: int, side: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path)
    return path


def image_bytes(image: Image.Image, fmt: str, **kw) -> bytes:
    """``image`` saved in ``fmt`` (Pillow's name) with ``kw``, in memory."""
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def folder_gallery(tmp_path: Path, capsys, folders: Sequence[str], photos: int | None = None,
                   extra: Sequence[str] = (), dataset: str = "folder") -> Path:
    """A gallery (``tmp_path / "g"``) built by the command line from ``photos`` random photos (2 a folder unless
    given: photo i, ``i.png``, in ``folders[i % len(folders)]``) under ``tmp_path / "photos"``, read as ``dataset``;
    ``extra``: more options of ``index build``."""
    root = tmp_path / "photos"
    for i in range(2 * len(folders) if photos is None else photos):
        _photo(root / folders[i % len(folders)] / f"{i}.png", i)
    index = tmp_path / "g"
    code, _, err = _run(capsys, "index", "build", "--dataset", dataset, "--root", root, "--index", index,
                        *ENCODER, *extra, "-q")
    assert code == 0, err
    return index


def two_species_gallery(tmp_path: Path, capsys) -> tuple[Path, Path]:
    """(gallery, its photo folder): 6 random photos of two species, one of them with a common name."""
    return folder_gallery(tmp_path, capsys, ("Natrix maura", "Samar Cobra (Naja samarensis)"), 6), tmp_path / "photos"


def venom_flags(capsys, index: Path) -> dict[str, bool | None]:
    """species -> its venomous flag, as ``species list --format json`` says (None: not recorded)."""
    code, out, err = _run(capsys, "species", "list", "--index", index, "--format", "json")
    assert code == 0, err
    return {s["species"]: s["venomous"] for s in json.loads(out)}


#: A synthetic encoder's record for galleries built from given vectors (no model): its dimension, and the
#: ``gallery.json`` encoder entry.
DIM = 16
ENC = {"spec": "test:synthetic", "fingerprint": "test:synthetic#abc", "dim": DIM}


class FakeEncoder:
    """Stands in for an encoder when only embeddings matter."""

    spec = ENC["spec"]
    fingerprint = ENC["fingerprint"]
    dim = DIM


def unit(x: np.ndarray) -> np.ndarray:
    """``x``'s rows (or ``x`` itself) scaled to length 1, as float32: a synthetic gallery's vectors."""
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
