"""What the CLI says when the gallery's store fails: an outage of a network store (S3) is one line saying to check
the network and run again (tests/test_ops_findings.py); a local store's I/O error (a data file deleted, a full
disk) is one line naming the store's folder as damaged or unreadable and what to do, never AWS_ENDPOINT_URL.

Galleries here use the tiny random ``timm:test_vit@random`` encoder on random photos: fast, no shared assets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from api.cli import main

ENCODER = ["--encoder", "timm:test_vit@random", "--precision", "fp32", "--runtime", "torch", "-q"]


def _err(capsys, *argv) -> tuple[int, list[str]]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def gallery(tmp_path, capsys) -> Path:
    """A local gallery of 4 random photos of two species."""
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for i in range(4):
        (root / ("Naja haje" if i % 2 else "Natrix maura")).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(
            root / ("Naja haje" if i % 2 else "Natrix maura") / f"{i}.png")
    index = tmp_path / "g"
    code, err = _err(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", index, *ENCODER)
    assert code == 0, err
    return index


#: What Lance raised reading a local table whose data file was deleted (the s47 review's experiment): kind N/A.
FILE_GONE = ("lance error: LanceError(IO): Generic N/A error: Wrapped error: Not found: "
             "/tmp/s47r/lt/x.lance/data/0b1c.lance")


def test_a_local_store_whose_data_file_was_deleted_is_named_damaged_not_an_outage(gallery, capsys, monkeypatch):
    """Lance's I/O error for a missing data file of a local table (no kind named) was called an unreachable store,
    with "check the network and the endpoint (AWS_ENDPOINT_URL), then run the command again"."""
    from index.store import ReferenceStore

    def gone(self, *args, **kwargs):
        raise RuntimeError(FILE_GONE)

    monkeypatch.setattr(ReferenceStore, "species", gone)
    code, err = _err(capsys, "species", "list", "--index", gallery)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"speciesid: error: the gallery's store at {gallery / 'store'} is damaged or "
                             f"unreadable ({FILE_GONE}); "), err
    assert err[0].endswith("check the disk (free space, errors) and the folder's permissions, or rebuild the gallery "
                           "into a new folder with 'speciesid index build --index NEW_DIR ...'"), err
    assert "AWS_ENDPOINT_URL" not in err[0] and "network" not in err[0] and "run the command again" not in err[0]


def test_a_full_local_disk_is_no_outage_but_an_s3_stores_io_error_is(gallery, capsys, monkeypatch):
    """ENOSPC on a local store (Lance's LocalFileSystem error): the damaged-or-unreadable line naming the folder;
    the same error text from a gallery whose store is an object store (its gallery.json names an s3:// URI) is an
    outage of it, to retry."""
    from index.store import ReferenceStore

    full = "lance error: LanceError(IO): Generic LocalFileSystem error: No space left on device (os error 28)"

    def no_space(self, *args, **kwargs):
        raise RuntimeError(full)

    monkeypatch.setattr(ReferenceStore, "species", no_space)
    code, err = _err(capsys, "species", "list", "--index", gallery)
    assert code == 2 and len(err) == 1 and "is damaged or unreadable (" + full + ")" in err[0], err
    assert f"the gallery's store at {gallery / 'store'}" in err[0] and "AWS_ENDPOINT_URL" not in err[0], err

    import argparse

    from api.cli import store_outage

    args = argparse.Namespace(store="s3://bucket/g", index=None)
    line = store_outage(RuntimeError(full), args)
    assert line is not None and line.startswith("the gallery's LocalFileSystem store could not be reached"), line
    assert line.endswith("then run the command again"), line
    args.store = None
    assert store_outage(ValueError(full), args) is None and store_outage(RuntimeError("a bug"), args) is None
