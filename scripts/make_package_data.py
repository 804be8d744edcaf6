"""Generate the package data in ``index/data/`` from the read-only shared reference files.

Run from the project root::

    .venv/bin/python scripts/make_package_data.py --shared ../shared   # default: $SPECIESID_SHARED, else ../shared

Writes:

- ``index/data/snake_taxonomy.csv``: ``species,genus,family,venomous`` for every species of
  SnakeCLEF 2021's medical-importance table (``venomous`` is its ``mivs`` column, 1/0), deduplicated
  and sorted by species.
- ``index/data/moroccan.csv``: the same columns for the 26 species of ``moroccan_snakes.txt``, in
  checklist order, and ``common_name``: the English common names, curated by hand in that file (no shared file
  has them), kept from the file being replaced, else (``--out`` a new folder) taken from the shipped
  ``index/data/moroccan.csv``; a species neither file has a row for is written blank, with a warning. Fails
  if a checklist species is missing from the medical-importance table.
- ``index/data/snake_countries.csv``: ``species,countries`` for every species of SnakeCLEF 2021's
  species-to-country matrix, sorted by species; ``countries`` is the sorted ISO 3166-1 alpha-2 codes
  of the columns where the species is marked 1, joined by ``;`` (empty if none). Every column name
  must map to a code (``index.geography.resolve_country``: ``COUNTRY_ALIASES``, then pycountry), else the
  script fails. Rows whose names differ only by whitespace (or by a known misspelling, ``SPECIES_FIXES``) are
  merged by union.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "index" / "data"
COLUMNS = ("species", "genus", "family", "venomous")
#: moroccan.csv's columns: COLUMNS and the hand-curated English common name (docs/identification.md).
MOROCCAN_COLUMNS = (*COLUMNS, "common_name")
MEDICAL_FILE = "reference/snakeclef2021_species_medical_importance.csv"
MOROCCAN_FILE = "reference/moroccan_snakes.txt"
#: The checklist's own comment names these seven as medically important; checked against the table.
EXPECTED_MOROCCAN_VENOMOUS = frozenset(
    {
        "Bitis arietans",
        "Cerastes cerastes",
        "Cerastes vipera",
        "Daboia mauritanica",
        "Echis pyramidum",
        "Naja haje",
        "Vipera monticola",
    }
)
EXPECTED_MOROCCAN_COUNT = 26
COUNTRIES_FILE = "reference/snakeclef2021_species_to_country_mapping.csv"
COUNTRY_COLUMNS = ("species", "countries")
#: SnakeCLEF country names are resolved the way the package resolves a country at run time
#: (index.geography.resolve_country: its name normalisation, COUNTRY_ALIASES, then pycountry). "n cyprus"
#: (Northern Cyprus) has no ISO 3166 code of its own and is folded into CY; "kosovo" uses the user-assigned
#: code XK (not in pycountry).
sys.path.insert(0, str(REPO))
from index.geography import resolve_country  # noqa: E402

#: Misspelt species rows of the country matrix, merged into the correctly spelt row.
SPECIES_FIXES = {"Hemorhois nummifer": "Hemorrhois nummifer"}


def _clean(text: str) -> str:
    return " ".join(text.split())


def read_taxonomy(path: Path) -> dict[str, tuple[str, str, str, str]]:
    """Read the medical-importance CSV into ``{species: (species, genus, family, venomous)}``."""
    table: dict[str, tuple[str, str, str, str]] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"species", "genus", "family", "mivs"} - set(reader.fieldnames or ())
        if missing:
            raise SystemExit(f"{path}: missing columns {sorted(missing)}")
        for row in reader:
            species = _clean(row["species"])
            if not species:
                continue
            genus = _clean(row["genus"]) or species.split(" ", 1)[0]
            family = _clean(row["family"])
            mivs = row["mivs"].strip()
            if mivs not in {"0", "1"}:
                raise SystemExit(f"{path}: {species!r} has mivs={mivs!r}, expected 0 or 1")
            entry = (species, genus, family, mivs)
            previous = table.get(species)
            if previous is not None and previous != entry:
                raise SystemExit(f"{path}: conflicting rows for {species!r}: {previous} vs {entry}")
            table[species] = entry
    return table


def read_common_names(path: Path) -> dict[str, str]:
    """The ``common_name`` column of an existing ``moroccan.csv`` (``{}`` without the file or the column): the
    hand-curated names, kept when the file is written again."""
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as fh:
        return {row["species"]: row.get("common_name") or "" for row in csv.DictReader(fh)}


def common_names(out: Path) -> dict[str, str]:
    """The hand-curated common names to write (a blank name is a curated "none in English"): those of ``out``'s
    ``moroccan.csv``, and for a species it has no row for (``--out`` a new folder), the shipped
    ``index/data/moroccan.csv``'s."""
    names = read_common_names(OUT_DIR / "moroccan.csv")
    names.update(read_common_names(out / "moroccan.csv"))
    return names


def read_checklist(path: Path) -> list[str]:
    """Species names of a one-name-a-line checklist, skipping blank and ``#`` comment lines."""
    names: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.append(_clean(line))
    return names


def country_code(name: str) -> str:
    """ISO 3166-1 alpha-2 code of a SnakeCLEF country column name, by :func:`index.geography.resolve_country`;
    ``LookupError`` if unknown."""
    try:
        return resolve_country(_clean(name))
    except ValueError as exc:
        raise LookupError(str(exc)) from exc


def read_countries(path: Path) -> dict[str, frozenset[str]]:
    """Read the species x country 0/1 matrix into ``{species: alpha-2 codes where it is 1}``."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header or len(header) < 2:
            raise SystemExit(f"{path}: expected a header of species then country names")
        codes: list[str] = []
        unmapped: list[str] = []
        for name in header[1:]:
            try:
                codes.append(country_code(name))
            except LookupError:
                unmapped.append(name)
        if unmapped:
            raise SystemExit(
                f"{path}: country columns with no ISO 3166 code (add them to COUNTRY_ALIASES): "
                f"{', '.join(repr(name) for name in unmapped)}"
            )
        table: dict[str, set[str]] = {}
        for line, row in enumerate(reader, start=2):
            if not row or not _clean(row[0]):
                continue
            if len(row) != len(header):
                raise SystemExit(f"{path}:{line}: {len(row)} fields, header has {len(header)}")
            species = _clean(row[0])
            species = SPECIES_FIXES.get(species, species)
            present = table.setdefault(species, set())
            for code, value in zip(codes, row[1:], strict=True):
                value = value.strip()
                if value not in {"0", "1"}:
                    raise SystemExit(f"{path}:{line}: {species!r} has {value!r}, expected 0 or 1")
                if value == "1":
                    present.add(code)
    return {species: frozenset(present) for species, present in table.items()}


def write_csv(path: Path, rows: list[tuple[str, ...]], columns: tuple[str, ...] = COLUMNS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shared", type=Path, default=Path(os.environ.get("SPECIESID_SHARED") or REPO.parent / "shared"),
        metavar="DIR", help="the shared assets folder (default: $SPECIESID_SHARED, else ../shared beside the repo)"
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where to write the CSVs")
    args = parser.parse_args(argv)

    taxonomy = read_taxonomy(args.shared / MEDICAL_FILE)
    checklist = read_checklist(args.shared / MOROCCAN_FILE)

    if len(checklist) != EXPECTED_MOROCCAN_COUNT or len(set(checklist)) != len(checklist):
        raise SystemExit(
            f"expected {EXPECTED_MOROCCAN_COUNT} distinct Moroccan species, got {len(checklist)}"
        )
    missing = [name for name in checklist if name not in taxonomy]
    if missing:
        raise SystemExit(f"Moroccan species missing from {MEDICAL_FILE}: {', '.join(missing)}")
    common = common_names(args.out)
    moroccan = [(*taxonomy[name], common.get(name, "")) for name in checklist]
    unnamed = [name for name in checklist if name not in common]
    if unnamed:
        print(f"warning: {len(unnamed)} Moroccan species have no row in moroccan.csv ({', '.join(unnamed[:3])}"
              f"{', ...' if len(unnamed) > 3 else ''}); their common_name is written blank: add it by hand "
              f"in {args.out / 'moroccan.csv'}", file=sys.stderr)
    venomous = {row[0] for row in moroccan if row[3] == "1"}
    if venomous != EXPECTED_MOROCCAN_VENOMOUS:
        raise SystemExit(
            f"Moroccan venomous species differ from the expected seven: "
            f"extra {sorted(venomous - EXPECTED_MOROCCAN_VENOMOUS)}, "
            f"missing {sorted(EXPECTED_MOROCCAN_VENOMOUS - venomous)}"
        )

    countries = read_countries(args.shared / COUNTRIES_FILE)
    country_rows = [(name, ";".join(sorted(countries[name]))) for name in sorted(countries)]

    all_rows = [taxonomy[name] for name in sorted(taxonomy)]
    write_csv(args.out / "snake_taxonomy.csv", all_rows)
    write_csv(args.out / "moroccan.csv", moroccan, MOROCCAN_COLUMNS)
    write_csv(args.out / "snake_countries.csv", country_rows, COUNTRY_COLUMNS)
    outputs = (
        ("snake_taxonomy.csv", all_rows),
        ("moroccan.csv", moroccan),
        ("snake_countries.csv", country_rows),
    )
    for name, rows in outputs:
        size = (args.out / name).stat().st_size
        print(f"wrote {args.out / name}: {len(rows)} species, {size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
