"""Big-dataset inputs: --dataset manifest (CSV, parquet) and --dataset webdataset (TreeOfLife-10M's shards)."""

from __future__ import annotations

import csv
import hashlib
import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import PH_SNAKES, needs_shared

from api.cli import main
from index.datasets import iter_dataset, load_dataset
from index.sources import read_source, split_locator

SPECIES = {"Samar Cobra (Naja samarensis)": ("Naja samarensis", "Elapidae"),
           "Asian Sunbeam Snake (Xenopeltis unicolor)": ("Xenopeltis unicolor", "Xenopeltidae")}


def _photos(n_each: int = 3) -> list[tuple[Path, str, str]]:
    needs_shared()
    out = []
    for folder, (species, family) in SPECIES.items():
        out += [(p, species, family) for p in sorted((PH_SNAKES / "val" / folder).iterdir())[:n_each]]
    return out


def _as_tiff(photo: Path) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    with Image.open(photo) as img:
        img.convert("RGB").save(buf, format="TIFF")
    return buf.getvalue()


def write_tol_shard(path: Path, photos: list[tuple[Path, str, str]], *, extra: bool = True) -> list[str]:
    """A shard in TreeOfLife-10M's layout (UUID-like keys, jpg + taxonomic text members); returns the keys.

    ``extra``: also a sample with no image and one with no usable label (both must be reported, not fatal).
    """
    keys = []
    with tarfile.open(path, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for photo, species, family in photos:
            key = hashlib.md5(str(photo).encode()).hexdigest()
            keys.append(key)
            genus, epithet = species.split()
            tag = (f"a photo of kingdom Animalia phylum Chordata class Reptilia order Squamata family {family} "
                   f"genus {genus} species {epithet}.")
            add(f"{key}.jpg", photo.read_bytes())
            add(f"{key}.com.txt", f"a photo of {species}.".encode())
            add(f"{key}.common_name.txt", species.encode())  # ToL falls back to the scientific name
            add(f"{key}.scientific_name.txt", species.encode())
            add(f"{key}.taxonTag.txt", tag.encode())
            add(f"{key}.taxonomic_name.txt", f"Animalia Chordata Reptilia Squamata {family} {species}".encode())
        if extra:
            add("00000000-no-image.taxonTag.txt", b"a photo of genus Naja species naja.")
            add("ffffffff-no-label.jpg", photos[0][0].read_bytes())
    return keys


def test_webdataset_shard_streams_tol_labels_and_reads_members(tmp_path):
    photos = _photos()
    shard = tmp_path / "shard-000000.tar"
    keys = write_tol_shard(shard, photos)
    warnings: list[str] = []
    records = list(iter_dataset("webdataset", tmp_path, warnings=warnings))
    assert [split_locator(r.path) for r in records] == [(str(shard), f"{k}.jpg") for k in keys]
    first = records[0]
    assert first.species == "Naja samarensis" and first.genus == "Naja" and first.family == "Elapidae"
    assert first.ranks == {"kingdom": "Animalia", "phylum": "Chordata", "class": "Reptilia", "order": "Squamata"}
    assert first.common_name is None  # equal to the scientific name: not a common name
    assert first.venomous is True  # filled from the shipped snake taxonomy
    assert read_source(first.path) == photos[0][0].read_bytes()
    assert any("without an image" in w for w in warnings) and any("usable species" in w for w in warnings)
    # a glob of shards, and a generic .json member with the manifest's names
    other = tmp_path / "more" / "shard-000001.tar"
    other.parent.mkdir()
    with tarfile.open(other, "w") as tar:
        for name, data in (("k1.png", photos[1][0].read_bytes()),
                           ("k1.json", b'{"scientific_name": "Naja naja", "vernacular_name": "Indian cobra", '
                                       b'"country": "IN"}'),
                           ("k2.tiff", _as_tiff(photos[2][0])),  # every photo format a folder takes, not only JPEG
                           ("k2.json", b'{"scientific_name": "Naja samarensis"}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    rec, tiff = load_dataset("webdataset", str(tmp_path / "more" / "*.tar")).records
    assert (rec.species, rec.common_name, rec.country) == ("Naja naja", "Indian cobra", "IN")
    assert tiff.species == "Naja samarensis" and split_locator(tiff.path)[1] == "k2.tiff"
    with pytest.raises(ValueError, match="no webdataset shards"):
        load_dataset("webdataset", tmp_path / "more" / "nothing-*.tar")
    # a shard cut short, read by a process that never listed it (a Ray worker): its whole members still read
    from index import sources

    cut = tmp_path / "cut" / "shard-000002.tar"
    cut.parent.mkdir()
    cut.write_bytes(shard.read_bytes()[: int(shard.stat().st_size * 0.6)])
    sources._tables.clear()
    assert sources.read_member(str(cut), f"{keys[0]}.jpg") == photos[0][0].read_bytes()
    with pytest.raises(OSError):
        sources.read_member(str(cut), f"{keys[-1]}.jpg")  # past the cut


def _json_shard(path: Path) -> None:
    """A one-sample shard (a small PNG + a json label) that needs no shared data."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 120, 30)).save(buf, "PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in (("k1.png", buf.getvalue()), ("k1.json", b'{"scientific_name": "Naja naja"}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_shard_listing_reports_a_broken_link_once_instead_of_dropping_it(tmp_path, caplog):
    """A dangling ``.tar`` link among the shards (a disk not mounted) is skipped with its reason, named in one
    warning and in the scan's ``skipped``, as the photo finder does; the valid shard is still read."""
    from index.photos import SKIPPED_ADVICE
    from index.streamed import list_shards

    shards = tmp_path / "shards"
    _json_shard(shards / "shard-000000.tar")
    gone = shards / "shard-000001.tar"
    gone.symlink_to(tmp_path / "unmounted" / "shard-000001.tar")
    caplog.set_level("WARNING", logger="index")
    scan = load_dataset("webdataset", shards)  # the shards listed once: one warning, the valid shard's photo read
    assert [r.species for r in scan.records] == ["Naja naja"]
    assert [p for p, _ in scan.skipped] == [gone] and scan.skipped[0][1].startswith("broken symbolic link")
    warned = [r.getMessage() for r in caplog.records if "not read as shards" in r.getMessage()]
    assert warned == [f"1 entry under {shards} skipped, not read as shards: {gone}: {scan.skipped[0][1]}. "
                      f"{SKIPPED_ADVICE}"]
    caplog.clear()
    skipped: list[tuple[Path, str]] = []
    assert list_shards(shards, skipped) == [shards / "shard-000000.tar"] and skipped == scan.skipped
    # a glob that matches the broken link reports it too; with no shard left, the error names it
    caplog.clear()
    assert list_shards(str(shards / "*.tar")) == [shards / "shard-000000.tar"]
    assert any(str(gone) in r.getMessage() for r in caplog.records)
    (shards / "shard-000000.tar").unlink()
    with pytest.raises(ValueError, match=r"no webdataset shards .* \(skipped: .*shard-000001.tar: broken symbolic"):
        list_shards(shards)


def _manifest_rows(photos, root: Path) -> list[dict]:
    rows = []
    for i, (photo, species, family) in enumerate(photos):
        genus, epithet = species.split()
        rows.append({"file_name": str(photo.relative_to(root)), "genus": genus,
                     "species": epithet if i % 2 else species, "family": family, "vernacular_name": f"snake {i}",
                     "mivs": "1" if genus == "Naja" else "0", "country_code": "PH", "order": "Squamata"})
    return rows


def test_manifest_csv_and_parquet_give_the_same_records(tmp_path):
    photos = _photos()
    root = PH_SNAKES / "val"
    rows = _manifest_rows(photos, root)
    rows.append({"file_name": "", "genus": "", "species": "Naja naja"})  # no path: reported
    rows.append({"file_name": "x.jpg", "genus": "", "species": "Bad\u202ename"})  # bidi override: reported
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    scan = load_dataset("manifest", root, metadata=tmp_path / "m.csv")
    assert [r.path for r in scan.records] == [p for p, _, _ in photos]
    r0, r1 = scan.records[:2]
    assert (r0.species, r0.common_name, r0.venomous, r0.country, r0.ranks) == (
        "Naja samarensis", "snake 0", True, "PH", {"order": "Squamata"})
    assert r1.species == "Naja samarensis"  # an epithet beside its genus
    assert any("2 row(s)" in w for w in scan.warnings)
    parquet = load_dataset("manifest", root, metadata=tmp_path / "m.parquet")
    assert parquet.records == scan.records
    with open(tmp_path / "bad.csv", "w") as fh:
        fh.write("image,label\nx.jpg,Naja naja\n")
    with pytest.raises(ValueError, match="lacks the column"):
        load_dataset("manifest", root, metadata=tmp_path / "bad.csv")


def test_manifest_and_webdataset_build_through_the_cli(tmp_path, tiny_clip_dir, capsys):
    photos = _photos(2)
    root = PH_SNAKES / "val"
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tol_shard(shards / "shard-000000.tar", photos, extra=False)
    (shards / "shard-000001.tar").symlink_to(tmp_path / "unmounted.tar")  # reported by the build, not fatal
    pq.write_table(pa.Table.from_pylist(_manifest_rows(photos, root)), tmp_path / "m.parquet")
    spec = f"open_clip:local-dir:{tiny_clip_dir}"
    for name, args in (("wds", ["--dataset", "webdataset", "--root", shards]),
                       ("man", ["--dataset", "manifest", "--root", root, "--metadata", tmp_path / "m.parquet"])):
        code = main([str(a) for a in ["index", "build", *args, "--index", tmp_path / name, "--encoder", spec,
                                      "--precision", "fp32", "-q"]])
        out = capsys.readouterr().out
        assert code == 0 and "4 references, 2 species" in out, out
        # named once, with what to do, in the listing's warning (stderr); stdout only counts them
        assert (name == "wds") == (f"not read: 1 entry under {shards} (broken links, link loops, devices or pipes, "
                                   "unreadable folders: see the warning above)" in out), out
        assert "shard-000001.tar" not in out
    from index.gallery import Gallery

    wds, man = Gallery.open(tmp_path / "wds"), Gallery.open(tmp_path / "man")
    a = wds.store.metadata().sort_values("sha256")
    b = man.store.metadata().sort_values("sha256")
    assert list(a["sha256"]) == list(b["sha256"]) and list(a["species"]) == list(b["species"])
    assert all(split_locator(p) for p in a["source_path"])  # photos named inside their shard
    code = main(["identify", "--index", str(tmp_path / "wds"), str(photos[0][0]), "--format", "json", "-q"])
    assert code == 0 and "Naja samarensis" in capsys.readouterr().out
