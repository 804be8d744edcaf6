"""Tests for index.datasets: every loader on small trees built in tmp_path, plus the real ph-snakes tree."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import pytest
from conftest import SHARED, needs_shared
from PIL import Image

from index import datasets
from index.datasets import DATASETS, DatasetScan, list_datasets, load_dataset, parse_folder_name
from index.photos import IMAGE_EXTENSIONS
from index.records import ReferenceRecord
from index.taxonomy import TaxonInfo, lookup_taxon

PH_SNAKES_TRAIN = SHARED / "data" / "ph-snakes" / "train"
SNAKECLEF_SAMPLE = SHARED / "reference" / "snakeclef2021_test_metadata_cleaned.sample.csv"

MOROCCAN_VENOMOUS = {
    "Bitis arietans",
    "Cerastes cerastes",
    "Cerastes vipera",
    "Daboia mauritanica",
    "Echis pyramidum",
    "Naja haje",
    "Vipera monticola",
}


def make_image(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    """Write a tiny real image (format from the suffix) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}.get(path.suffix.lower(), "PNG")
    Image.new("RGB", (4, 4), color).save(path, format=fmt)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# --------------------------------------------------------------------------------------------------
# names, taxonomy


def test_list_datasets_matches_constant() -> None:
    assert list_datasets() == list(DATASETS) == ["moroccan", "folder", "rare-species", "snakeclef2021", "manifest",
                                                 "webdataset"]
    assert ".heic" in IMAGE_EXTENSIONS and ".JPG".lower() in IMAGE_EXTENSIONS


def test_every_dataset_has_one_loader_and_a_layout() -> None:
    """A name of DATASETS is read by exactly one loader table (or streamed), and LAYOUTS says what it expects."""
    tables = [set(datasets.FOLDER_LOADERS), set(datasets.METADATA_LOADERS), set(datasets.STREAMED)]
    assert sorted(set().union(*tables)) == sorted(DATASETS)
    assert sum(len(t) for t in tables) == len(DATASETS)  # none in two tables
    assert set(datasets.LAYOUTS) == set(DATASETS)


def test_a_dataset_name_without_a_loader_is_refused_not_read_as_snakeclef(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A name added to DATASETS alone was read by the SnakeCLEF loader (its error asked for a SnakeCLEF --metadata):
    it is refused, naming the name and where its loader goes."""
    monkeypatch.setattr(datasets, "DATASETS", (*DATASETS, "flat"))
    make_image(tmp_path / "Naja_haje__1.jpg")
    with pytest.raises(ValueError) as err:
        load_dataset("flat", tmp_path)
    message = str(err.value)
    assert "dataset 'flat' is in DATASETS but has no loader" in message
    assert "FOLDER_LOADERS (moroccan, folder)" in message
    assert "METADATA_LOADERS (rare-species, snakeclef2021)" in message
    assert "snakeclef2021 (the SnakeCLEF" not in message


def test_unknown_dataset_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as excinfo:
        load_dataset("inaturalist", tmp_path)
    message = str(excinfo.value)
    assert "inaturalist" in message
    for name in DATASETS:
        assert name in message


def test_missing_root_names_path_and_option(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="does not exist") as excinfo:
        load_dataset("folder", missing)
    assert str(missing) in str(excinfo.value)
    assert "--root" in str(excinfo.value)


def test_lookup_taxon_known_and_unknown() -> None:
    naja = lookup_taxon("Naja haje")
    assert naja == TaxonInfo(species="Naja haje", genus="Naja", family="Elapidae", venomous=True,
                             common_name="Egyptian cobra")  # a Moroccan checklist species: its English name
    natrix = lookup_taxon("natrix_maura")
    assert natrix is not None and natrix.venomous is False and natrix.family == "Colubridae"
    # subspecies fall back to the species
    sub = lookup_taxon("Naja haje legionis")
    assert sub is not None and sub.species == "Naja haje"
    assert lookup_taxon("Felis catus") is None
    assert lookup_taxon("cats") is None


def test_shipped_moroccan_checklist_has_seven_venomous() -> None:
    with (Path(__file__).resolve().parents[1] / "index" / "data" / "moroccan.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 26
    assert {r["species"] for r in rows if r["venomous"] == "1"} == MOROCCAN_VENOMOUS
    assert all(r["family"] for r in rows)


# --------------------------------------------------------------------------------------------------
# moroccan


def test_the_moroccan_checklist_names_its_species_in_english() -> None:
    """data/moroccan.csv's common_name column: a name for each species it is known for, blank (None) for the rest."""
    from index.taxonomy import moroccan_checklist

    names = {t.species: t.common_name for t in moroccan_checklist()}
    assert names["Daboia mauritanica"] == "Moorish viper" and names["Naja haje"] == "Egyptian cobra"
    assert names["Bitis arietans"] == "Puff adder" and names["Malpolon monspessulanus"] == "Montpellier snake"
    assert names["Dasypeltis sahelensis"] is None  # left blank rather than guessed
    assert sum(n is not None for n in names.values()) == 19


def test_a_moroccan_build_answers_with_the_common_name(tmp_path: Path, capsys) -> None:
    """A clinician saw only 'Daboia mauritanica': the build stores the checklist's English name, which the species
    list and the answers show as a folder's ``Common Name (Genus species)`` is shown."""
    import json

    from _cli_support import _run, folder_gallery

    index = folder_gallery(tmp_path, capsys, ("Dasypeltis sahelensis", "Daboia-mauritanica"), dataset="moroccan")
    root = tmp_path / "photos"
    code, out, err = _run(capsys, "species", "list", "--index", index, "--format", "json")
    assert code == 0, err
    assert {s["species"]: s["common_name"] for s in json.loads(out)} == {
        "Daboia mauritanica": "Moorish viper", "Dasypeltis sahelensis": None}
    code, out, err = _run(capsys, "identify", "--index", index, root / "Daboia-mauritanica" / "1.png", "-q")
    assert code == 0 and "Daboia mauritanica (Moorish viper)" in out, (out, err)


def test_moroccan_accepts_three_folder_styles(tmp_path: Path) -> None:
    make_image(tmp_path / "Naja-haje" / "b.png")
    make_image(tmp_path / "Naja-haje" / "a.JPG")
    make_image(tmp_path / "Naja-haje" / "sub" / "c.jpeg")
    make_image(tmp_path / "Naja-haje" / ".hidden.png")
    (tmp_path / "Naja-haje" / "notes.txt").write_text("not a photo")
    make_image(tmp_path / "natrix_maura" / "x.png")
    make_image(tmp_path / "Daboia Mauritanica" / "y.png")

    scan = load_dataset("moroccan", tmp_path)

    assert isinstance(scan, DatasetScan)
    assert scan.name == "moroccan" and scan.root == tmp_path
    assert scan.species == ["Daboia mauritanica", "Naja haje", "Natrix maura"]
    naja = [r for r in scan.records if r.species == "Naja haje"]
    assert [r.path.relative_to(tmp_path / "Naja-haje").as_posix() for r in naja] == [
        "a.JPG",
        "b.png",
        "sub/c.jpeg",
    ]
    assert all(isinstance(r, ReferenceRecord) and r.dataset == "moroccan" for r in scan.records)
    by_species = {r.species: r for r in scan.records}
    # the English common names of data/moroccan.csv (none was recorded before)
    assert [by_species[s].common_name for s in scan.species] == ["Moorish viper", "Egyptian cobra",
                                                                 "Viperine water snake"]
    assert by_species["Naja haje"].venomous is True
    assert by_species["Naja haje"].family == "Elapidae"
    assert by_species["Naja haje"].genus == "Naja"
    assert by_species["Natrix maura"].venomous is False
    assert by_species["Natrix maura"].family == "Colubridae"
    assert by_species["Daboia mauritanica"].venomous is True
    assert len(scan.records) == 5


def test_moroccan_missing_species_warning(tmp_path: Path) -> None:
    make_image(tmp_path / "Naja-haje" / "a.png")
    make_image(tmp_path / "Natrix-maura" / "a.png")

    scan = load_dataset("moroccan", tmp_path)

    missing_warnings = [w for w in scan.warnings if "no photos" in w]
    assert len(missing_warnings) == 1
    warning = missing_warnings[0]
    assert "24 of 26" in warning
    assert "Vipera monticola" in warning and "Bitis arietans" in warning
    assert "Naja haje" not in warning and "Natrix maura" not in warning


def test_moroccan_unknown_folder_suggests_close_match(tmp_path: Path) -> None:
    make_image(tmp_path / "Naja-haje" / "a.png")
    make_image(tmp_path / "Naja-hajee" / "a.png")

    with pytest.raises(ValueError) as excinfo:
        load_dataset("moroccan", tmp_path)

    message = str(excinfo.value)
    assert "Naja-hajee" in message
    assert "Naja haje" in message
    assert "26" in message
    assert "--dataset folder" in message


def test_moroccan_rejects_other_taxa(tmp_path: Path) -> None:
    make_image(tmp_path / "Python-regius" / "a.png")
    with pytest.raises(ValueError, match="Python-regius"):
        load_dataset("moroccan", tmp_path)


def test_moroccan_split_folders_point_to_the_split_not_another_dataset(tmp_path: Path) -> None:
    for split in ("train", "test"):
        make_image(tmp_path / split / "Naja-haje" / "a.jpg")
    with pytest.raises(ValueError) as excinfo:
        load_dataset("moroccan", tmp_path)
    message = str(excinfo.value)
    assert "dataset split folder(s) (test, train)" in message
    assert f"--dataset moroccan --root {tmp_path / 'train'}" in message and "--dataset folder" not in message
    make_image(tmp_path / "2024" / "Daboia-mauritanica" / "b.jpg")  # not a split name, but it holds species folders
    with pytest.raises(ValueError, match=r"split folder\(s\) \(2024, test, train\)"):
        load_dataset("moroccan", tmp_path)


def test_folder_refuses_split_folders_holding_the_classes(tmp_path: Path) -> None:
    for split in ("train", "val"):
        make_image(tmp_path / split / "Naja naja" / "a.jpg")
    make_image(tmp_path / "val2" / "Naja naja" / "b.jpg")
    with pytest.raises(ValueError) as excinfo:
        load_dataset("folder", tmp_path)
    message = str(excinfo.value)
    assert "dataset split folder(s) (train, val) with the class folders inside" in message
    assert f"--root {tmp_path / 'train'}" in message
    # a class that happens to be called like a split, holding photos, is still read (with a warning)
    other = tmp_path.parent / (tmp_path.name + "-classes")
    make_image(other / "test" / "c.jpg")
    make_image(other / "Naja naja" / "d.jpg")
    scan = load_dataset("folder", other)
    assert scan.species == ["Naja naja", "test"] and any("look like dataset splits" in w for w in scan.warnings)


def test_moroccan_warns_about_loose_root_files(tmp_path: Path) -> None:
    make_image(tmp_path / "Naja-haje" / "a.png")
    make_image(tmp_path / "stray.jpg")
    scan = load_dataset("moroccan", tmp_path)
    assert len(scan.records) == 1
    assert any("stray.jpg" in w and "directly in" in w for w in scan.warnings)


# --------------------------------------------------------------------------------------------------
# folder


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Common Wolf Snake (Lycodon capucinus)", ("Lycodon capucinus", "Common Wolf Snake")),
        (
            "Red-tailed Green Ratsnake (Gonyosoma oxycephalum)",
            ("Gonyosoma oxycephalum", "Red-tailed Green Ratsnake"),
        ),
        (
            "North Philippine Temple Pit Viper (Tropidolaemus subannulatus)",
            ("Tropidolaemus subannulatus", "North Philippine Temple Pit Viper"),
        ),
        ("Lycodon-capucinus", ("Lycodon capucinus", None)),
        ("Lycodon_capucinus", ("Lycodon capucinus", None)),
        ("Lycodon capucinus", ("Lycodon capucinus", None)),
        ("Natrix natrix helvetica", ("Natrix natrix helvetica", None)),
        ("cats", ("cats", None)),
        ("Golden Retriever Dogs", ("Golden Retriever Dogs", None)),
        ("(Lycodon capucinus)", ("Lycodon capucinus", None)),
    ],
)
def test_parse_folder_name(name: str, expected: tuple[str, str | None]) -> None:
    assert parse_folder_name(name) == expected


def test_folder_loader_labels_and_taxonomy(tmp_path: Path) -> None:
    make_image(tmp_path / "Equatorial Cobra (Naja sumatrana)" / "1.png")
    make_image(tmp_path / "Equatorial Cobra (Naja sumatrana)" / "2.jpg")
    make_image(tmp_path / "Lycodon_capucinus" / "1.png")
    make_image(tmp_path / "cats" / "deep" / "tabby.webp")
    (tmp_path / "empty").mkdir()
    make_image(tmp_path / "loose.png")

    scan = load_dataset("folder", tmp_path)

    assert scan.name == "folder"
    assert scan.species == ["Lycodon capucinus", "Naja sumatrana", "cats"]
    assert len(scan.records) == 4
    cobra = [r for r in scan.records if r.species == "Naja sumatrana"]
    assert [r.path.name for r in cobra] == ["1.png", "2.jpg"]
    assert all(
        r.common_name == "Equatorial Cobra" and r.venomous is True and r.family == "Elapidae" for r in cobra
    )
    wolf = next(r for r in scan.records if r.species == "Lycodon capucinus")
    assert wolf.venomous is False and wolf.family == "Colubridae" and wolf.common_name is None
    cat = next(r for r in scan.records if r.species == "cats")
    assert cat.venomous is None and cat.family is None and cat.genus is None
    assert all(r.dataset == "folder" for r in scan.records)
    assert any("loose.png" in w for w in scan.warnings)
    assert any("empty" in w for w in scan.warnings)


def test_folder_loader_reports_broken_links_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A broken link to a photo or to a whole class folder is in the scan's ``skipped`` and in one warning for the
    dataset (not one per class folder), never dropped silently."""
    make_image(tmp_path / "Naja haje" / "1.png")
    (tmp_path / "Naja haje" / "2.jpg").symlink_to(tmp_path / "elsewhere" / "2.jpg")
    make_image(tmp_path / "Natrix maura" / "1.png")
    (tmp_path / "Natrix maura" / "3.png").symlink_to(tmp_path / "elsewhere" / "3.png")
    (tmp_path / "Vipera latastei").symlink_to(tmp_path / "unmounted-disk" / "Vipera latastei")
    caplog.set_level("WARNING", logger="index")
    scan = load_dataset("folder", tmp_path)
    assert len(scan.records) == 2
    assert sorted(p.relative_to(tmp_path).as_posix() for p, _ in scan.skipped) == [
        "Naja haje/2.jpg", "Natrix maura/3.png", "Vipera latastei"]
    assert all(why.startswith("broken symbolic link") for _, why in scan.skipped)
    warned = [r.getMessage() for r in caplog.records if "skipped, not read as photos" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"3 entries under {tmp_path} skipped")


def test_real_ph_snakes_train_tree() -> None:
    needs_shared(PH_SNAKES_TRAIN)
    scan = load_dataset("folder", PH_SNAKES_TRAIN)

    assert len(scan.species) == 14
    assert len(scan.records) == 980
    assert scan.warnings == []
    assert "Lycodon capucinus" in scan.species
    assert all(r.common_name for r in scan.records)
    # every ph-snakes species is in the shipped SnakeCLEF taxonomy
    assert all(lookup_taxon(s) is not None for s in scan.species)
    venomous = {r.species for r in scan.records if r.venomous}
    assert venomous == {
        "Naja philippinensis",
        "Naja samarensis",
        "Naja sumatrana",
        "Trimeresurus flavomaculatus",
        "Tropidolaemus philippensis",
        "Tropidolaemus subannulatus",
    }
    assert all(r.venomous is not None and r.family for r in scan.records)
    # deterministic order
    assert [r.path for r in scan.records] == [r.path for r in load_dataset("folder", PH_SNAKES_TRAIN).records]


# --------------------------------------------------------------------------------------------------
# rare-species

RARE_HEADER = [
    "rarespecies_id",
    "kingdom",
    "phylum",
    "class",
    "order",
    "family",
    "genus",
    "species",
    "common",
    "file_name",
]


def test_rare_species_loader(tmp_path: Path) -> None:
    make_image(tmp_path / "dataset" / "a" / "1.jpg")
    make_image(tmp_path / "dataset" / "b" / "2.jpg")
    make_image(tmp_path / "dataset" / "c" / "3.jpg")
    write_csv(
        tmp_path / "metadata.csv",
        RARE_HEADER,
        [
            [
                "1",
                "Animalia",
                "Chordata",
                "Reptilia",
                "Squamata",
                "Viperidae",
                "Vipera",
                "monticola",
                "Atlas Mountain Viper",
                "dataset/a/1.jpg",
            ],
            [
                "2",
                "Animalia",
                "Chordata",
                "Mammalia",
                "Carnivora",
                "Felidae",
                "Panthera",
                "Panthera tigris",
                "Tiger",
                "dataset/b/2.jpg",
            ],
            [
                "3",
                "Animalia",
                "Chordata",
                "Aves",
                "Psittaciformes",
                "Psittacidae",
                "Ara",
                "macao",
                "",
                "dataset/c/3.jpg",
            ],
            [
                "4",
                "Animalia",
                "Chordata",
                "Aves",
                "Psittaciformes",
                "Psittacidae",
                "Ara",
                "ararauna",
                "Blue-and-yellow Macaw",
                "dataset/d/missing.jpg",
            ],
        ],
    )

    scan = load_dataset("rare-species", tmp_path)

    assert scan.name == "rare-species"
    assert scan.species == ["Ara macao", "Panthera tigris", "Vipera monticola"]
    viper, tiger, macaw = scan.records
    assert viper.path == tmp_path / "dataset" / "a" / "1.jpg"
    assert viper.genus == "Vipera" and viper.family == "Viperidae"
    assert viper.common_name == "Atlas Mountain Viper"
    assert viper.ranks == {
        "kingdom": "Animalia",
        "phylum": "Chordata",
        "class": "Reptilia",
        "order": "Squamata",
    }
    assert viper.venomous is True  # known snake
    assert tiger.species == "Panthera tigris" and tiger.venomous is None
    assert macaw.common_name is None
    assert all(r.dataset == "rare-species" for r in scan.records)
    missing = [w for w in scan.warnings if "not found" in w]
    assert len(missing) == 1 and "1 file" in missing[0] and "dataset/d/missing.jpg" in missing[0]


def test_rare_species_sciname_and_explicit_metadata(tmp_path: Path) -> None:
    make_image(tmp_path / "images" / "x.png")
    meta = write_csv(
        tmp_path / "elsewhere" / "meta.csv",
        ["genus", "species", "sciName", "file_name"],
        [["Naja", "haje", "Naja haje", "images/x.png"]],
    )
    scan = load_dataset("rare-species", tmp_path, metadata=meta)
    assert scan.species == ["Naja haje"]
    record = scan.records[0]
    assert record.ranks == {} and record.venomous is True and record.family == "Elapidae"


def test_rare_species_missing_columns(tmp_path: Path) -> None:
    write_csv(tmp_path / "metadata.csv", ["genus", "common"], [["Ara", "Macaw"]])
    with pytest.raises(ValueError) as excinfo:
        load_dataset("rare-species", tmp_path)
    assert "file_name" in str(excinfo.value) and "species" in str(excinfo.value)


def test_rare_species_missing_metadata_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="metadata.csv"):
        load_dataset("rare-species", tmp_path)


# --------------------------------------------------------------------------------------------------
# snakeclef2021


def _sample_rows(n: int) -> tuple[list[str], list[dict[str, str]]]:
    with SNAKECLEF_SAMPLE.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(itertools.islice(reader, n))
        return list(reader.fieldnames or []), rows


def test_snakeclef2021_requires_metadata(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--metadata CSV is required for snakeclef2021"):
        load_dataset("snakeclef2021", tmp_path)


def test_snakeclef2021_loader_with_real_rows(tmp_path: Path) -> None:
    needs_shared(SNAKECLEF_SAMPLE)
    header, rows = _sample_rows(5)
    meta = write_csv(tmp_path / "meta.csv", header, [[row[c] for c in header] for row in rows])
    images = tmp_path / "images"
    for row in rows[:4]:
        make_image(images / row["image_path"])
    absent = rows[4]["image_path"]

    scan = load_dataset("snakeclef2021", images, metadata=meta)

    assert scan.name == "snakeclef2021"
    assert len(scan.records) == 4
    for record, row in zip(scan.records, rows[:4], strict=True):
        assert record.path == images / row["image_path"]
        assert record.species == row["binomial"]
        assert record.genus == row["genus"] and record.family == row["family"]
        assert record.country == row["country"]
        assert record.dataset == "snakeclef2021"
        taxon = lookup_taxon(row["binomial"])
        assert taxon is not None and record.venomous is taxon.venomous
    assert scan.species == sorted({row["binomial"] for row in rows[:4]})
    # the real sample starts with Imantodes cenchoa (harmless) and Bothriechis schlegelii (a pit viper)
    by_species = {r.species: r for r in scan.records}
    assert by_species["Bothriechis schlegelii"].venomous is True
    assert by_species["Imantodes cenchoa"].venomous is False
    missing = [w for w in scan.warnings if "not found" in w]
    assert len(missing) == 1 and "1 file" in missing[0] and absent in missing[0]


def test_snakeclef2021_missing_columns(tmp_path: Path) -> None:
    meta = write_csv(tmp_path / "meta.csv", ["binomial", "country"], [["Naja haje", "Egypt"]])
    with pytest.raises(ValueError, match="image_path"):
        load_dataset("snakeclef2021", tmp_path, metadata=meta)


@pytest.mark.parametrize("dataset", ["rare-species", "snakeclef2021"])
def test_metadata_loaders_skip_and_report_rows_whose_species_name_check_name_refuses(dataset, tmp_path, caplog):
    """The rare-species and snakeclef2021 loaders took a species name as the metadata gave it: a bidi override or a
    '/' went into the gallery (which the API could not address), against the one naming rule the folder loader and
    the streamed loaders apply (index.taxonomy.check_name). Such a row is skipped, counted and reported with an
    example (a warning every caller logs); the other rows load, their names' spaces collapsed as the rule does."""
    import logging

    from finetune.data import load_photos

    good, bidi, slash = "Naja  haje", "Naja \u202ehaje", "Naja/haje"
    for name in ("a", "b", "c"):
        make_image(tmp_path / "img" / f"{name}.jpg")
    if dataset == "rare-species":
        meta = write_csv(tmp_path / "metadata.csv", ["genus", "species", "file_name"],
                         [["Naja", sp, f"img/{n}.jpg"] for sp, n in ((good, "a"), (bidi, "b"), (slash, "c"))])
        root = tmp_path
    else:
        meta = write_csv(tmp_path / "meta.csv", ["binomial", "image_path"],
                         [[sp, f"{n}.jpg"] for sp, n in ((good, "a"), (bidi, "b"), (slash, "c"))])
        root = tmp_path / "img"
    scan = load_dataset(dataset, root, metadata=meta)
    assert scan.species == ["Naja haje"] and len(scan.records) == 1
    (warning,) = [w for w in scan.warnings if "invalid species name" in w]
    assert warning.startswith(f"2 row(s) of {meta} with an invalid species name skipped"), warning
    assert "b.jpg: the species name " in warning and "RIGHT-TO-LEFT OVERRIDE (U+202E)" in warning, warning
    with caplog.at_level(logging.WARNING):
        assert load_photos(dataset, root, metadata=meta).labels == ["Naja haje"]
    assert f"2 row(s) of {meta} with an invalid species name skipped" in caplog.text, caplog.text


def test_new_species_references_join_existing_spellings():
    from index.store import SpeciesSummary
    from index.taxonomy import SpeciesNameConflictError, new_species_references

    species, records, prior = new_species_references("naja-haje", [], ["a.jpg", "b.jpg"], dataset="added")
    assert species == "Naja haje" and prior is None  # the taxonomy's spelling, and what it knows
    assert {(r.species, r.genus, r.family, r.venomous, r.dataset) for r in records} == {
        ("Naja haje", "Naja", "Elapidae", True, "added")}
    mine = SpeciesSummary("Naja haje", "Naja", "Elapidae", "Egyptian cobra", False, 3)  # the gallery's word wins
    species, records, prior = new_species_references("NAJA_HAJE", [mine], ["c.jpg"], dataset="api")
    assert prior is mine and records[0].venomous is False and records[0].common_name == "Egyptian cobra"
    species, records, prior = new_species_references("Testus c-album", [mine], ["d.jpg"], dataset="api",
                                                     venomous=True)
    assert species == "Testus c-album" and prior is None and records[0].venomous is True
    with pytest.raises(ValueError, match="species name is empty"):
        new_species_references(" _ ", [], ["e.jpg"], dataset="api")
    for nameless in ("-", "...", "- -"):  # would match no species key but the empty one
        with pytest.raises(ValueError, match="has no letters or digits"):
            new_species_references(nameless, [], ["e.jpg"], dataset="api")
    with pytest.raises(ValueError, match=r"contains the control character U\+0001; use printable"):
        new_species_references("Naja\x01haje", [], ["e.jpg"], dataset="api")
    # a genus alone is no species; a new label that is no scientific name ("cats") is taken once confirmed
    with pytest.raises(ValueError, match=r"'naja' is a genus, not a species: give the species' full name, e\.g\. 'Naja "):
        new_species_references("naja", [], ["e.jpg"], dataset="api")
    with pytest.raises(SpeciesNameConflictError, match=r"^'cats' is not written as a scientific name") as refused:
        new_species_references("cats", [], ["e.jpg"], dataset="api")
    assert refused.value.meant is None
    assert new_species_references("cats", [], ["e.jpg"], dataset="api", new_species=True)[0] == "cats"
    cats = SpeciesSummary("cats", None, None, None, None, 4)  # a gallery of labels: its own label joins
    assert new_species_references("Cats", [cats], ["e.jpg"], dataset="api")[2] is cats


@pytest.mark.parametrize("name,scientific", [
    ("Naja haje", True), ("Naja haje legionis", True), ("Polygonia c-album", True), ("Naja sp.", True),
    ("x", False), ("Naja", False), ("naja haje", False), ("Naja Haje", False), ("Common Wolf Snake", False),
    ("Naja haje legionis extra", False), ("Polygonia c-", False), ("Naja h4je", False)])
def test_looks_scientific_is_the_one_rule_of_folder_names_and_new_species(name, scientific):
    from index.datasets import parse_folder_name
    from index.taxonomy import looks_scientific

    assert looks_scientific(name.split()) is scientific
    assert (parse_folder_name(f"Common ({name})")[0] == name) is scientific  # a folder's "Common Name (Genus species)"


def test_a_subspecies_name_joins_its_gallery_species_and_takes_its_metadata():
    from index.store import SpeciesSummary
    from index.taxonomy import new_species_references

    mine = SpeciesSummary("Naja haje", "Naja", "Elapidae", "Egyptian cobra", True, 3)
    species, records, prior = new_species_references("Naja haje legionis", [mine], ["a.jpg"], dataset="api")
    assert species == "Naja haje" and prior is mine and records[0].common_name == "Egyptian cobra"
    listed = SpeciesSummary("Naja haje legionis", "Naja", "Elapidae", "Moroccan cobra", True, 2)
    _, _, prior = new_species_references("naja haje legionis", [mine, listed], ["b.jpg"], dataset="api")
    assert prior is listed  # a gallery species of exactly that name comes first


def test_a_venomous_species_is_not_quietly_outvoted():
    from collections import Counter

    from index.store import SpeciesSummary, _venomous
    from index.taxonomy import new_species_references

    cobra = SpeciesSummary("Naja haje", "Naja", "Elapidae", None, True, 3)
    with pytest.raises(ValueError, match="'Naja haje' is recorded as venomous.*leave the venomous flag out"):
        new_species_references("Naja haje", [cobra], ["a.jpg"], dataset="api", venomous=False)
    _, records, _ = new_species_references("Naja haje", [cobra], ["a.jpg"], dataset="api")
    assert records[0].venomous is True
    harmless = SpeciesSummary("Testus novus", None, None, None, False, 3)  # flagging a species venomous is taken
    _, records, _ = new_species_references("Testus novus", [harmless], ["a.jpg"], dataset="api", venomous=True)
    assert records[0].venomous is True
    # the other species-level fields are not quietly stored against the species' own either
    with pytest.raises(ValueError, match="recorded with family 'Elapidae', not 'Viperidae'"):
        new_species_references("Naja haje", [cobra], ["a.jpg"], dataset="api", family="Viperidae")
    mine = SpeciesSummary("Naja haje", "Naja", "Elapidae", "Egyptian cobra", True, 3)
    with pytest.raises(ValueError, match="recorded with common name 'Egyptian cobra'"):
        new_species_references("Naja haje", [mine], ["a.jpg"], dataset="api", common_name="Spitting cobra")
    _, records, _ = new_species_references("Naja haje", [mine], ["a.jpg"], dataset="api", common_name="egyptian cobra",
                                           family="Elapidae")
    assert records[0].family == "Elapidae"
    # a new species the shipped taxonomy lists as venomous cannot be added as harmless either
    with pytest.raises(ValueError, match="'Naja sumatrana' is medically important venomous in the shipped taxonomy"):
        new_species_references("Naja sumatrana", [cobra], ["a.jpg"], dataset="api", venomous=False)
    with pytest.raises(ValueError, match="genus 'Bitis' does not match the species name 'Naja haje'"):
        new_species_references("Naja haje", [], ["a.jpg"], dataset="api", genus="Bitis")
    # the species' flag over its references: venomous when any says so (a tie, or one of many, included)
    assert _venomous(Counter({True: 1, False: 1})) is True and _venomous(Counter({True: 1, False: 9})) is True
    assert _venomous(Counter({False: 2})) is False and _venomous(Counter()) is None and _venomous(None) is None


def test_folder_reads_a_class_named_like_a_split_with_dated_sub_folders(tmp_path: Path) -> None:
    """A species folder called ``test`` with photos sorted into date folders, beside species holding photos: read,
    with a warning, not refused as a split."""
    make_image(tmp_path / "Naja haje" / "0.jpg")
    make_image(tmp_path / "Vipera latastei" / "0.jpg")
    make_image(tmp_path / "test" / "2024-05" / "0.jpg")
    scan = load_dataset("folder", tmp_path)
    assert scan.species == ["Naja haje", "Vipera latastei", "test"]
    assert any("look like dataset splits" in w for w in scan.warnings)


def test_moroccan_a_photo_only_folder_named_test_is_an_unknown_folder_not_a_split(tmp_path: Path) -> None:
    make_image(tmp_path / "Naja-haje" / "a.jpg")
    make_image(tmp_path / "test" / "b.jpg")
    with pytest.raises(ValueError) as excinfo:
        load_dataset("moroccan", tmp_path)
    message = str(excinfo.value)
    assert "match no Moroccan checklist species: 'test'" in message and "split folder" not in message


def test_folder_reads_jpeg_aliases_and_extensionless_photos_and_names_what_it_skips(tmp_path: Path) -> None:
    """Walkthrough s48 #1: a .jfif and an extensionless phone export are photos of their class folder; the files
    that are not photos are counted and named in one warning (relative to the root), and a species folder none of
    whose files is a photo says how many it holds and which, rather than just "no photos"."""
    make_image(tmp_path / "Naja haje" / "1.jpg")
    Image.new("RGB", (4, 4)).save(tmp_path / "Naja haje" / "2.jfif", format="JPEG")
    Image.new("RGB", (4, 4)).save(tmp_path / "Naja haje" / "IMG_0006", format="JPEG")
    (tmp_path / "Naja haje" / "notes.txt").write_text("found near the river")
    (tmp_path / "Naja haje" / ".DS_Store").write_bytes(b"x")
    for name in ("a.xyz", "b.xyz", "c.pdf", "d.txt"):
        (tmp_path / "Naja samarensis" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "Naja samarensis" / name).write_bytes(b"x")
    scan = load_dataset("folder", tmp_path)
    assert sorted(r.path.name for r in scan.records) == ["1.jpg", "2.jfif", "IMG_0006"]
    assert scan.species == ["Naja haje"]
    assert f"skipped 1 file that is not a photo under {tmp_path}: Naja haje/notes.txt. A photo among them" \
        in scan.warnings[1], scan.warnings
    assert scan.warnings[0].startswith("1 folder(s) with no photos ignored: Naja samarensis (holds 4 files, none a "
                                       "photo: a.xyz, b.xyz, c.pdf, d.txt). A photo among them is read once"), scan.warnings
    assert len(scan.warnings) == 2


def test_moroccan_names_a_species_folder_whose_files_are_no_photos(tmp_path: Path) -> None:
    make_image(tmp_path / "Natrix-maura" / "a.png")
    (tmp_path / "Naja-haje").mkdir()
    (tmp_path / "Naja-haje" / "cobra.xyz").write_bytes(b"x")
    (warning,) = [w for w in load_dataset("moroccan", tmp_path).warnings if "no photos" in w]
    assert "Naja haje (holds 1 file, none a photo: cobra.xyz)" in warning and "Bitis arietans; " in warning, warning


def test_a_macs_zip_metadata_folder_is_skipped_as_hidden_files_are(tmp_path: Path) -> None:
    """Walk s57 #12: a dataset unzipped from a Mac's zip has ``__MACOSX/<species>/._x.jpg`` beside its classes; it
    was warned about as a class folder with no photos. It is skipped unsaid, like ``.DS_Store``, also by a search
    of a folder of photos (``references add DIR``)."""
    from index.photos import scan_photos

    make_image(tmp_path / "Naja haje" / "1.jpg")
    make_image(tmp_path / "Naja haje" / "__MACOSX" / "2.jpg")  # a real one would hold ._ files; never read
    (tmp_path / "__MACOSX" / "Naja haje").mkdir(parents=True)
    (tmp_path / "__MACOSX" / "Naja haje" / "._1.jpg").write_bytes(b"\0\5\26\7" + b"\0" * 60)
    scan = load_dataset("folder", tmp_path)
    assert [r.path.name for r in scan.records] == ["1.jpg"] and scan.species == ["Naja haje"]
    assert scan.warnings == [], scan.warnings
    assert scan_photos(tmp_path).photos == [tmp_path / "Naja haje" / "1.jpg"]
