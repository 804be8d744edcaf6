"""docs/python.md's code blocks run, in order, in one namespace: the Python page says only what works.

The lines marked ``# yours`` (where a reader puts their own folders and encoder) run as written, and the name each
one sets is then given the test's value instead: a few ph-snakes photos (symlinked into tmp) and the real MobileNetV1
weights. A ``# yours`` line must be ``NAME = ...`` for a NAME the test gives, so that none is skipped unseen. The
blocks start from an empty namespace (the test's values under ``_given`` only): a name the page uses but never sets
fails here as it would for a reader copying the blocks (a NameError).
"""

from __future__ import annotations

import os
import re

import pytest
from _api_support import COBRA, SPECIES, photos
from conftest import MOBILENET_SPEC, REPO, needs_shared

from retrieval.encoders import EncoderConfig

DOC = REPO / "docs" / "python.md"


#: The names the ``# yours`` lines may set: the test gives each its own value after the page's line has run.
YOURS_NAMES = ("photos", "gallery_dir", "encoder", "photo", "second_photo", "new_photos", "val", "report_dir")
_YOURS = re.compile(r"(?P<indent>\s*)(?P<name>\w+) = .+# yours\b")


def _raw_blocks(page: str | None = None) -> list[str]:
    """The python code blocks of ``page`` (the Python page unless given), as written."""
    page = DOC.read_text(encoding="utf-8") if page is None else page
    return re.findall(r"```python\n(.*?)```", page, flags=re.S)


def _blocks(page: str | None = None) -> list[str]:
    """The python code blocks of ``page`` (the Python page unless given), each ``# yours`` line followed by one
    giving its name the test's value (``_given[NAME]``)."""
    out = []
    for block in _raw_blocks(page):
        lines = []
        for line in block.splitlines():
            lines.append(line)
            if "# yours" in line:
                m = _YOURS.match(line)
                assert m and m["name"] in YOURS_NAMES, f"a '# yours' line the test does not know: {line!r}"
                lines.append(f"{m['indent']}{m['name']} = _given[{m['name']!r}]")
        out.append("\n".join(lines))
    return out


def _linked(root, split: str, folders, n: int):
    for folder in folders:
        (root / folder).mkdir(parents=True)
        for f in photos(split, folder, n):
            os.symlink(f, root / folder / f.name)
    return root


def test_the_python_page_is_linked_from_the_readme():
    assert "docs/python.md" in (REPO / "README.md").read_text(encoding="utf-8")


def test_the_yours_lines_only_set_names_the_block_test_gives():
    """No shared assets needed: every ``# yours`` line is an assignment the block test runs and then overrides, so
    a real call marked ``# yours`` cannot be skipped unseen."""
    lines = [line for block in _raw_blocks() for line in block.splitlines() if "# yours" in line]
    assert lines
    for line in lines:
        m = _YOURS.match(line)
        assert m and m["name"] in YOURS_NAMES, line
    assert sum(line.count("_given[") for line in "\n".join(_blocks()).splitlines()) == len(lines)


def test_the_yours_check_refuses_a_call_marked_yours():
    page = DOC.read_text(encoding="utf-8").replace(
        "```python\n", "```python\nwf.build_gallery(gallery_dir)  # yours\n", 1)
    with pytest.raises(AssertionError, match="a '# yours' line the test does not know"):
        _blocks(page)


def test_every_code_block_of_the_python_page_runs(tmp_path, capsys):
    needs_shared()
    blocks = _blocks()
    assert len(blocks) >= 5
    given = {
        "photos": _linked(tmp_path / "train", "train", [SPECIES[0], SPECIES[2], SPECIES[3]], 10),
        "gallery_dir": tmp_path / "gallery",
        "encoder": EncoderConfig(spec=MOBILENET_SPEC, precision="fp32"),
        "photo": COBRA,
        "second_photo": photos("val", SPECIES[0], 1)[0],
        "new_photos": photos("train", SPECIES[1], 5),
        "val": _linked(tmp_path / "val", "val", SPECIES, 3),
        "report_dir": tmp_path / "report",
    }
    assert set(given) == set(YOURS_NAMES)
    namespace = {"_given": given}  # nothing else: every name a block uses is set on the page
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{DOC}#block{i + 1}", "exec"), namespace)  # noqa: S102 - the page's own code
        except Exception as exc:  # the block's number and code in the failure
            pytest.fail(f"docs/python.md block {i + 1} failed: {exc!r}\n{block}")
    out = capsys.readouterr().out
    assert "Gallery(" in out and "Identifier(" in out and "LinearProbe(" in out
    assert namespace["added"].created and namespace["same"][0].results  # the add and the scaled embedding answered
    assert (given["report_dir"] / "report.md").is_file()
