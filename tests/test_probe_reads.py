"""The folder's small probe files are read once per command (beside the open's look at probe.json's format):
``speciesid probe publish`` puts the probe.json it read to describe (not a second read, which a take between the two
could change), and ``index info`` tells the store's copy from the probe_origin.json its look read (moto's S3 server;
test_s3_uploads' two folders)."""

from __future__ import annotations

from pathlib import Path

from test_object_store import BUCKET, s3_endpoint, s3_env  # noqa: F401 - the fixtures, reused
from test_s3_uploads import two_machines  # noqa: F401 - the fixture, reused

from api.cli import main


def _count_reads(monkeypatch) -> list[str]:
    """The names of the files read (Path.read_bytes / read_text) from now on."""
    reads: list[str] = []
    for name in ("read_bytes", "read_text"):
        real = getattr(Path, name)

        def counted(self, *args, _real=real, **kwargs):
            reads.append(self.name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(Path, name, counted)
    return reads


def test_probe_publish_and_index_info_read_the_folders_probe_files_once(
        two_machines, monkeypatch, capsys):  # noqa: F811
    from retrieval.workflows import gallery_info, train_gallery_probe

    a, _, _, _ = two_machines
    train_gallery_probe(a, progress=False)
    capsys.readouterr()
    reads = _count_reads(monkeypatch)

    assert main(["probe", "publish", "--index", str(a)]) == 0
    assert capsys.readouterr().out.startswith("shared the probe 'probe train' trained on ")
    # probe.json: read once to describe and put, and once by the gallery's open for its format alone (a newer one is
    # refused before anything is done: index.gallery.read_gallery_info)
    assert reads.count("probe.json") == 2 and reads.count("probe.npz") == 1
    reads.clear()

    shared = gallery_info(a)["probe"]["shared"]
    assert shared["matches"] is True and shared["copy"] == shared["store_copy"]
    assert reads.count("probe_origin.json") == 1
