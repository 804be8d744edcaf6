"""docs/python.md's code blocks run, in order, in one namespace: the Python page says only what works.

The lines marked ``# yours`` (where a reader puts their own folders and encoder) are left out, and the names they
set are given here instead: a few ph-snakes photos (symlinked into tmp) and the real MobileNetV1 weights.
"""

from __future__ import annotations

import os
import re

import pytest
from _api_support import COBRA, SPECIES, photos
from conftest import MOBILENET_SPEC, REPO, needs_shared

from retrieval.encoders import EncoderConfig

DOC = REPO / "docs" / "python.md"


def _blocks() -> list[str]:
    """The page's python code blocks, without the ``# yours`` lines."""
    found = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    return ["\n".join(line for line in block.splitlines() if "# yours" not in line) for block in found]


def _linked(root, split: str, folders, n: int):
    for folder in folders:
        (root / folder).mkdir(parents=True)
        for f in photos(split, folder, n):
            os.symlink(f, root / folder / f.name)
    return root


def test_the_python_page_is_linked_from_the_readme():
    assert "docs/python.md" in (REPO / "README.md").read_text(encoding="utf-8")


def test_every_code_block_of_the_python_page_runs(tmp_path, capsys):
    needs_shared()
    blocks = _blocks()
    assert len(blocks) >= 5 and all("# yours" not in b for b in blocks)
    given = {
        "photos": _linked(tmp_path / "train", "train", [SPECIES[0], SPECIES[2], SPECIES[3]], 10),
        "gallery_dir": tmp_path / "gallery",
        "encoder": EncoderConfig(spec=MOBILENET_SPEC, precision="fp32"),
        "photo": COBRA,
        "photo_bytes": COBRA.read_bytes(),
        "second_photo": photos("val", SPECIES[0], 1)[0],
        "new_photos": photos("train", SPECIES[1], 5),
        "val": _linked(tmp_path / "val", "val", SPECIES, 3),
        "report_dir": tmp_path / "report",
    }
    namespace = dict(given)
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{DOC}#block{i + 1}", "exec"), namespace)  # noqa: S102 - the page's own code
        except Exception as exc:  # the block's number and code in the failure
            pytest.fail(f"docs/python.md block {i + 1} failed: {exc!r}\n{block}")
    out = capsys.readouterr().out
    assert "Gallery(" in out and "Identifier(" in out and "LinearProbe(" in out
    assert namespace["added"].created and namespace["same"][0].results  # the add and the scaled embedding answered
    assert (given["report_dir"] / "report.md").is_file()
