"""Shared helpers of the CLI tests: the tiny random ``timm:test_vit@random`` encoder, random photos, running the CLI
in-process, and a small two-species gallery built with them. Fast, no shared assets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


def two_species_gallery(tmp_path: Path, capsys) -> tuple[Path, Path]:
    """(gallery, its photo folder): 6 random photos of two species, one of them with a common name."""
    root = tmp_path / "photos"
    for i in range(6):
        _photo(root / ("Samar Cobra (Naja samarensis)" if i % 2 else "Natrix maura") / f"{i}.png", i)
    index = tmp_path / "g"
    code, _, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", index,
                        *ENCODER, "-q")
    assert code == 0, err
    return index, root
