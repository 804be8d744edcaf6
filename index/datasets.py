"""Dataset loaders: turn a folder of labelled photos (and its metadata) into ``ReferenceRecord`` s (names and the
taxonomy they are checked against: :mod:`index.taxonomy`).

Each loader only finds files and labels them; it never decodes images (the build reports corrupt
files later). Loaders:

- ``moroccan``: the 26 native snake species of Morocco, one folder per species (``Genus-species``, or the folder
  dataset's ``Common name (Genus species)`` / ``Genus species (Common name)``, the folder's common name kept).
- ``folder``: any class-per-folder tree (``Common Name (Genus species)``, ``Genus species (Common Name)``,
  ``Genus_species``, iNaturalist 2021's ``NNNNN_Kingdom_..._Family_Genus_species``, a label: ``cats``).
- ``rare-species``: the Hugging Face ``imageomics/rare-species`` layout (``metadata.csv`` + files).
- ``snakeclef2021``: SnakeCLEF 2021 metadata CSV plus the image root its ``image_path`` is relative to.
- ``manifest`` (CSV or parquet table) and ``webdataset`` (tar shards, TreeOfLife-10M's layout): streamed,
  for millions of photos (:mod:`index.streamed`; :func:`iter_dataset` yields their records lazily).
"""

from __future__ import annotations

import csv
import difflib
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from index.photos import (
    NOT_PHOTO_ADVICE,
    PhotoScan,
    entry_problem,
    first_few,
    is_hidden,
    is_photo_file,
    not_photos_text,
    not_photos_warning,
    scan_photos,
    warn_skipped,
)
from index.records import HIGHER_RANKS, ReferenceRecord
from index.taxonomy import (
    InvalidNameError,
    TaxonInfo,
    check_name,
    known_genus,
    looks_scientific,
    lookup_taxon,
    moroccan_checklist,
    scientific_spelling,
    species_key,
)

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("moroccan", "folder", "rare-species", "snakeclef2021", "manifest", "webdataset")
#: Datasets read lazily, whose root may be a file (a manifest table, a shard) or a glob of shards.
STREAMED: tuple[str, ...] = ("manifest", "webdataset")

#: Class-folder names that suggest the root is one level too high (a split folder, not a class).
_SPLIT_NAMES = {"train", "val", "valid", "validation", "test", "dev"}

_PAREN_RE = re.compile(r"^(?P<common>.*?)\s*\((?P<sci>[^()]+)\)\s*$")
#: iNaturalist 2021's class folders: ``02345_Animalia_Chordata_Aves_Passeriformes_Turdidae_Turdus_merula`` (an id,
#: then kingdom, phylum, class, order, family, genus and epithet joined by ``_``).
_INAT_RE = re.compile(r"^\d+_(?P<kingdom>[A-Z][a-z]+)_(?P<phylum>[A-Z][a-z]+)_(?P<class>[A-Z][a-z]+)_"
                      r"(?P<order>[A-Z][a-z]+)_(?P<family>[A-Z][a-z]+)_(?P<genus>[A-Z][a-z]+)_"
                      r"(?P<epithet>[a-z][a-z-]*)$")


@dataclass
class DatasetScan:
    """The result of scanning one dataset: records plus human-readable notes."""

    name: str  # dataset loader name
    root: Path  # image root
    records: list[ReferenceRecord]  # one per photo file found
    warnings: list[str] = field(default_factory=list)  # e.g. checklist species with no folder
    species: list[str] = field(default_factory=list)  # sorted distinct species of the records
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # entries not read (broken links...), with why


# --------------------------------------------------------------------------------------------------
# Folder helpers


def _scientific(text: str, *, dashes: bool = False) -> str | None:
    """``text`` as a scientific name (``_``, and with ``dashes`` ``-``, as spaces), or None when it is not written
    as one (:func:`looks_scientific`)."""
    spaced = text.replace("_", " ")
    variants = [spaced, spaced.replace("-", " ")] if dashes else [spaced]
    return next((" ".join(v.split()) for v in variants if looks_scientific(v.split())), None)


def recased_label(label: str, genera: Iterable[str]) -> str | None:
    """A folder's label typed in lower (or upper) case, re-cased as a scientific name (``turdus viscivorus`` ->
    ``Turdus viscivorus``) when its genus is one of ``genera`` (the dataset's other folders') or one the shipped
    snake taxonomy knows; None otherwise (``samar cobra``, a common name in lower case, stays a label)."""
    spelled = scientific_spelling(label.replace("_", " ").replace("-", " "))
    if spelled is None:
        return None
    genus = spelled.split()[0]
    return spelled if genus in set(genera) or known_genus(genus) else None


def _folder_readings(text: str) -> list[tuple[str, str | None]]:
    """The readings (species, common name) of ``A (B)`` as a scientific name: B's (``Common Name (Genus species)``)
    first, then A's (``Genus species (Common Name)``); none, one or both."""
    readings: list[tuple[str, str | None]] = []
    if match := _PAREN_RE.match(text):
        outer, inner = match["common"].strip(), match["sci"].strip()
        if sci := _scientific(inner):  # "Common Name (Genus species)"
            readings.append((sci, outer or None))
        if outer and (sci := _scientific(outer, dashes=True)):  # "Genus species (Common Name)"
            readings.append((sci, inner))
    return readings


def _read_folder_name(name: str, genera: Iterable[str] = (),
                      readings: list[tuple[str, str | None]] | None = None) -> tuple[str, str | None, bool]:
    """:func:`parse_folder_name`'s reading, and whether it is a guess: both halves of ``A (B)`` look like scientific
    names (``Daboia mauritanica (Moorish viper)``) and the genus of neither, or of both, is in ``genera`` or
    the shipped snake taxonomy. ``readings``: the name's :func:`_folder_readings`, where already worked out."""
    text = " ".join(name.split())
    if inat := _INAT_RE.match(text):
        return f"{inat['genus']} {inat['epithet']}", None, False
    if readings is None:
        readings = _folder_readings(text)
    if len(readings) == 2:
        known = set(genera)
        named = [r for r in readings if r[0].split()[0] in known or known_genus(r[0].split()[0])]
        if len(named) != 1:
            return *readings[0], True
        readings = named
    if readings:
        return *readings[0], False
    return _scientific(text, dashes=True) or text, None, False


def parse_folder_name(name: str, genera: Iterable[str] = ()) -> tuple[str, str | None]:
    """Species label and common name from a class-folder name.

    ``"Common Wolf Snake (Lycodon capucinus)"`` -> ``("Lycodon capucinus", "Common Wolf Snake")``;
    ``"Erithacus rubecula (European Robin)"`` -> ``("Erithacus rubecula", "European Robin")``;
    ``"Lycodon-capucinus"`` / ``"Lycodon_capucinus"`` -> ``("Lycodon capucinus", None)`` (``"lycodon capucinus"``
    is re-cased by the loader where its genus is known: :func:`recased_label`);
    iNaturalist 2021's ``"02345_Animalia_..._Turdidae_Turdus_merula"`` -> ``("Turdus merula", None)``
    (:func:`folder_ranks` gives its family and higher ranks); anything else (``"cats"``) is its own label:
    ``("cats", None)``.

    A common name in sentence case looks like a binomial: of ``"Daboia mauritanica (Moorish viper)"`` the half
    whose genus ``genera`` (the dataset's other folders') or the shipped snake taxonomy knows is the species;
    when that tells neither, the name in brackets is.
    """
    return _read_folder_name(name, genera)[:2]


def folder_ranks(name: str) -> dict[str, str]:
    """The ranks above genus a class-folder name spells (iNaturalist 2021's: kingdom, phylum, class, order and
    family), {} for any other name."""
    inat = _INAT_RE.match(" ".join(name.split()))
    return {rank: inat[rank] for rank in ("kingdom", "phylum", "class", "order", "family")} if inat else {}


def unparsed_folders_warning(labels: Iterable[str]) -> str | None:
    """One warning naming the class folders taken whole as labels, not scientific names (``cats``, ``Golden
    Retriever Dogs``): they have no genus and no family, so ``--rank genus`` and ``--rank family`` cannot group them;
    a name in lower case that may be a binomial says how to write it. None when every folder was read as a
    scientific name."""
    labels = [f"{name} (if a scientific name: {spelled!r})" if (spelled := scientific_spelling(name)) else name
              for name in sorted(labels)]
    if not labels:
        return None
    return (f"{len(labels)} class folder(s) not written as scientific names, each taken whole as a species label "
            f"(no genus, no family: --rank genus answers it as itself, --rank family as 'unknown family'; fine for a "
            f"gallery of labels): {first_few(labels, '; ')}. Read as scientific names: 'Genus species', "
            "'Genus_species', 'Genus-species', 'genus species', 'Common Name (Genus species)', 'Genus species "
            "(Common Name)', iNaturalist 2021's 'NNNNN_Kingdom_Phylum_Class_Order_Family_Genus_species'; rename the "
            "folders to one of these")


def _spelling_differences(folder: str, species: str) -> list[str]:
    """How a folder's name differs from the species it was read as, where the difference does not show: Unicode
    composed/decomposed, spaces (trailing, doubled), case."""
    composed = unicodedata.normalize("NFC", folder)
    spaced = " ".join(composed.split())
    said = ["Unicode decomposed"] if composed != folder else []
    if spaced != composed:
        said.append("trailing or doubled spaces")
    if spaced != species and spaced.casefold() == species.casefold():
        said.append("case")
    return said


def joined_folders_warning(joined: dict[str, list[str]]) -> str | None:
    """One line naming the class folders joined into one species (``joined``: species -> its folders' names, in
    the order read), and how names that look alike differ (``'Naja haje' + 'Naja haje ' (trailing or doubled
    spaces)``; ``'Vipère de Lataste' x2 (Unicode composed/decomposed)``); None when no species has two folders."""
    parts = []
    for species, folders in joined.items():
        if len(folders) < 2:
            continue
        shown = [unicodedata.normalize("NFC", f) for f in folders]
        if len(set(shown)) == 1:  # alike on screen: the same text, composed and decomposed
            parts.append(f"{shown[0]!r} x{len(folders)} (Unicode composed/decomposed)")
            continue
        why = sorted({d for f in folders for d in _spelling_differences(f, species)} - {"Unicode decomposed"})
        unicode = any(unicodedata.normalize("NFC", f) != f for f in folders)
        why += ["Unicode composed/decomposed"] if unicode else []
        into = "" if species in folders else f" -> {species!r}"
        parts.append(" + ".join(repr(f) for f in folders) + into + (f" ({', '.join(why)})" if why else ""))
    if not parts:
        return None
    return f"joined folders that name one species: {first_few(parts, '; ')}"


def common_names_warning(records: Iterable[ReferenceRecord], what: str = "folders") -> str | None:
    """One line naming the species whose photos carry several common names (a French, an English and an Arabic
    folder of one species): the gallery keeps them all and answers show one, the most frequent (ties: the first in
    code-point order, as ``index.store`` picks it). ``what``: where the names came from. None when each species has
    one name at most."""
    names: dict[str, Counter[str]] = {}
    for r in records:
        if r.common_name:
            names.setdefault(r.species, Counter())[r.common_name] += 1
    several = {s: c for s, c in names.items() if len(c) > 1}
    if not several:
        return None
    parts = []
    for species in sorted(several):
        counts = several[species]
        top = max(counts.values())
        shown = min(n for n, c in counts.items() if c == top)
        parts.append(f"{species}: its {what} give {len(counts)} common names ({', '.join(sorted(counts))}); answers "
                     f"show {shown!r}")
    return (f"{first_few(parts, '; ')} (the name most of its photos carry, ties to the first in code-point order; "
            f"every name is kept with its photos)")


#: Endings of a Latin or Latinised species epithet (``merula``, ``domesticus``, ``philomelos``, ``rubecula``), which
#: the last word of an English common name (``blackbird``, ``thrush``, ``toad``, ``frog``) seldom has: what tells a
#: folder's scientific half (``Passer domesticus``) from its common name in sentence case (``House sparrow``).
_EPITHET_ENDINGS = ("a", "us", "um", "is", "i", "ae", "es", "os", "ix", "ex", "ax", "ys", "or", "ens", "ans")


def _epithet_like(species: str) -> bool:
    """Whether the second word of ``species`` ends as a Latin epithet does (:data:`_EPITHET_ENDINGS`)."""
    words = species.split()
    return len(words) > 1 and words[1].casefold().endswith(_EPITHET_ENDINGS)


def _settle_guesses(readings: dict[str, list[tuple[str, str | None]]], taken: dict[str, int]) -> dict[str, int]:
    """Which half of each guessed folder (``readings``: its two readings, the brackets' first) to take, for those
    the dataset settles: the folder's own Latin-looking epithet beside a last word that is not (``House sparrow
    (Passer domesticus)``); else the side most folders were read by (``taken``: the folders read with certainty,
    name -> 0 the brackets', 1 the name's; with the folders settled by their own epithet). Returns name -> 0 or 1
    for the settled ones (the others: ``Common toad (Bufo bufo)`` alone)."""
    settled = {name: side for name, pair in readings.items() for side in (0, 1)
               if _epithet_like(pair[side][0]) and not _epithet_like(pair[1 - side][0])}
    layout = Counter([*taken.values(), *settled.values()]).most_common()
    if layout and (len(layout) == 1 or layout[0][1] > layout[1][1]):
        settled.update({name: layout[0][0] for name in readings if name not in settled})
    return settled


def ambiguous_folders_warning(read: Iterable[tuple[str, str]]) -> str | None:
    """One warning naming the class folders whose two halves both read as scientific names that nothing in the
    dataset settles (no genus the snake taxonomy or another folder knows, none repeated, no folder read with
    certainty either way), each with the species it was read as (``read``: folder name, species); None when there
    are none."""
    read = sorted(read)
    if not read:
        return None
    shown = [f"{name!r} as {species}" for name, species in read]
    return (f"{len(read)} class folder(s) where either the name or the name in brackets may be the scientific name, "
            f"and nothing in the dataset tells which (no genus known or repeated): read as 'Common name (Genus "
            f"species)', the name in brackets the species: {first_few(shown, '; ')}. If the scientific name is the "
            "one outside the brackets, rename the folder 'Common name (Genus species)', or write the common name in "
            "Title Case ('Genus species (Common Name)')")


def _class_folders(root: Path, warnings: list[str], skipped: list[tuple[Path, str]]) -> list[Path]:
    """Visible sub-folders of ``root``, sorted; warns about photos lying directly in ``root``; a visible entry
    that is neither a folder nor a file (a broken link to a class folder) goes to ``skipped``."""
    entries = sorted(root.iterdir())  # listed once
    visible = [p for p in entries if not is_hidden(p.name)]  # __MACOSX (a Mac's zip) too: no class
    folders = sorted((p for p in visible if p.is_dir()), key=lambda p: p.name)
    skipped.extend((p, entry_problem(p)) for p in visible if not p.is_dir() and not p.is_file())
    loose = [p.name for p in visible if p.is_file() and is_photo_file(p)]
    if loose:
        warnings.append(
            f"{len(loose)} photo file(s) directly in {root} ignored (photos must be in one folder per class): "
            + first_few(sorted(loose))
        )
    splits = [p.name for p in folders if p.name.lower() in _SPLIT_NAMES]
    if splits:  # maybe a class after all (split folders holding the classes, and nothing else, are refused)
        warnings.append(
            f"class folder(s) {', '.join(splits)} look like dataset splits, not classes; "
            f"did you mean --root {root / splits[0]}?"
        )
    return folders


def _holds_photos(folder: Path) -> bool:
    """Whether ``folder`` has photos directly inside (False when it cannot be listed)."""
    try:
        return any(p.is_file() and is_photo_file(p) for p in folder.iterdir())
    except OSError:
        return False


def _holds_classes(folder: Path) -> bool:
    """Whether ``folder`` has visible sub-folders with photos directly inside (False when it cannot be listed)."""
    try:
        return any(p.is_dir() and not is_hidden(p.name) and _holds_photos(p) for p in folder.iterdir())
    except OSError:
        return False


def _split_error(root: Path, splits: list[Path], dataset: str) -> ValueError:
    """The error for a root whose class folders are dataset splits (``train/``, ``test/``) holding the classes."""
    first = next((p for p in splits if p.name.lower() == "train"), splits[0])
    return ValueError(
        f"{root} holds dataset split folder(s) ({', '.join(p.name for p in splits)}) with the class folders inside, "
        f"not one folder per species: give one split as the root, e.g. --dataset {dataset} --root {first}"
    )


def _missing_files_warning(missing: list[str], source: Path) -> str:
    return f"{len(missing)} file(s) listed in {source} not found on disk, skipped: {first_few(missing)}"


def _checked(species: str, where: str, invalid: list[str]) -> str | None:
    """``species`` as :func:`check_name` returns it, or None when it refuses it: the row's file (``where``) and the
    refusal are appended to ``invalid`` (:func:`_warn_invalid`)."""
    try:
        return check_name(species)
    except InvalidNameError as exc:
        invalid.append(f"{where}: {exc}")
        return None


def _warn_invalid(invalid: list[str], source: Path, warnings: list[str]) -> None:
    """One warning for the rows of ``source`` whose species name :func:`check_name` refused (``invalid``: each row's
    file and the refusal, :func:`_checked`), with the first as an example; none when there are none."""
    if invalid:
        warnings.append(f"{len(invalid)} row(s) of {source} with an invalid species name skipped (fix the name in "
                        f"{source} to include them), e.g. {invalid[0]}")


# --------------------------------------------------------------------------------------------------
# Loaders


def _photos_in(folder: Path, skipped: list[tuple[Path, str]], not_photos: list[Path]) -> PhotoScan:
    """The photos under a class folder (``scan_photos``); what had to be skipped goes to ``skipped``, and the
    files that are not photos beside photos to ``not_photos`` (each reported once per dataset; the files of a
    folder none of whose files is a photo are named with it: :func:`_no_photos`)."""
    scan = scan_photos(folder)
    skipped.extend(scan.skipped)
    if scan.photos:
        not_photos.extend(scan.not_photos)
    return scan


def _no_photos(name: str, scans: Iterable[PhotoScan], folders: Iterable[Path]) -> str:
    """``name`` as a warning lists a species (or folder) without photos: with the files its folders hold, none a
    photo, when they hold any (a whole species missing from the gallery for its files' names)."""
    files = [p.relative_to(folder) for scan, folder in zip(scans, folders, strict=True) for p in scan.not_photos]
    if not files:
        return name
    return f"{name} (holds {len(files)} file{'s' if len(files) > 1 else ''}, none a photo: {not_photos_text(files)})"


def _checked_folder_names(folder: Path, species: str | None, common: str | None,
                           warnings: list[str]) -> tuple[str | None, str | None] | None:
    """A class folder's species name and common name as :func:`check_name` stores them (``species`` None: the
    checklist's own, not checked), or None, with the warning that ``folder`` is skipped and why ("=cmd (Naja
    haje)", a bidi override, U+FFFD): the one check of the folder and moroccan loaders."""
    try:
        species = check_name(species, "class folder name") if species is not None else None
        common = check_name(common, "common name") if common else common
    except InvalidNameError as exc:
        warnings.append(f"folder {folder.name!r} skipped: {exc}")
        return None
    return species, common


def _checklist_folder(name: str, by_key: dict) -> tuple[TaxonInfo, str | None] | None:
    """The checklist taxon a moroccan folder names, and the folder's own common name: ``Naja-haje``, ``Naja_haje``,
    ``Naja haje``, or read by the folder dataset's parser (:func:`_folder_readings`) ``Common name (Genus species)``
    or ``Genus species (Common name)`` (a French or Arabic name kept: ``Vipère à cornes (Cerastes cerastes)``);
    None when it names no checklist species, or two (both halves)."""
    if (taxon := by_key.get(species_key(name))) is not None:
        return taxon, None
    found = [(by_key[key], common) for sci, common in _folder_readings(" ".join(name.split()))
             if (key := species_key(sci)) in by_key]
    return found[0] if len(found) == 1 else None


def _load_moroccan(root: Path, warnings: list[str], skipped: list[tuple[Path, str]],
                   not_photos: list[Path]) -> list[ReferenceRecord]:
    checklist = moroccan_checklist()
    by_key = {species_key(t.species): t for t in checklist}
    matched: dict[str, list[Path]] = {}
    commons: dict[Path, str | None] = {}  # a folder's own common name (its French or Arabic one)
    unknown: list[str] = []
    for folder in _class_folders(root, warnings, skipped):
        found = _checklist_folder(folder.name, by_key)
        if found is None:
            unknown.append(folder.name)
        elif (checked := _checked_folder_names(folder, None, found[1], warnings)) is not None:
            matched.setdefault(found[0].species, []).append(folder)
            commons[folder] = checked[1]  # as the folder dataset keeps it
    splits = [root / n for n in unknown if _holds_species(root / n, by_key)]
    if splits:  # e.g. train/Naja-haje, test/Naja-haje: the split is the root (a bare 'test' is an unknown folder)
        raise _split_error(root, splits, "moroccan")
    if unknown:
        keys = list(by_key)
        details = []
        for name in unknown:
            close = difflib.get_close_matches(species_key(name), keys, n=3, cutoff=0.6)
            hint = (
                f" (closest checklist names: {', '.join(by_key[k].species for k in close)})" if close else ""
            )
            details.append(f"{name!r}{hint}")
        raise ValueError(
            f"folder(s) in {root} match no Moroccan checklist species: {'; '.join(details)}. "
            f"The moroccan dataset only accepts the {len(checklist)} checklist species "
            f"(folders named Genus-species, Genus_species, 'Genus species', 'Common name (Genus species)' or "
            f"'Genus species (Common name)'); "
            f"use --dataset folder for other taxa."
        )
    records: list[ReferenceRecord] = []
    no_photos: list[str] = []
    files = False  # a species' folder holds files, none a photo
    for taxon in checklist:
        folders = matched.get(taxon.species, [])
        if len(folders) > 1:
            warnings.append(
                f"{taxon.species}: {len(folders)} folders merged ({', '.join(f.name for f in folders)})"
            )
        scans = [_photos_in(folder, skipped, not_photos) for folder in folders]
        if not any(scan.photos for scan in scans):
            no_photos.append(_no_photos(taxon.species, scans, folders))
            files = files or any(scan.not_photos for scan in scans)
        records.extend(
            ReferenceRecord(
                path=p,
                species=taxon.species,
                genus=taxon.genus,
                family=taxon.family,
                # the folder's own name (French, Arabic) over the checklist's English one (data/moroccan.csv)
                common_name=commons[folder] or taxon.common_name,
                venomous=taxon.venomous,
                dataset="moroccan",
            )
            for folder, scan in zip(folders, scans, strict=True) for p in scan.photos
        )
    if no_photos:
        warnings.append(
            f"{len(no_photos)} of {len(checklist)} checklist species have no photos (no folder or an empty one): "
            + ("; " if files else ", ").join(no_photos)
            + (f". {NOT_PHOTO_ADVICE}" if files else "")
        )
    return records


def _holds_species(folder: Path, by_key: dict) -> bool:
    """Whether ``folder`` has a sub-folder named as a checklist species (``by_key``: species_key -> taxon)."""
    try:
        return any(p.is_dir() and _checklist_folder(p.name, by_key) is not None for p in folder.iterdir())
    except OSError:
        return False


def _load_folder(root: Path, warnings: list[str], skipped: list[tuple[Path, str]],
                 not_photos: list[Path]) -> list[ReferenceRecord]:
    records: list[ReferenceRecord] = []
    empty: list[str] = []
    files = False  # a folder holds files, none a photo: a species left out
    folders = _class_folders(root, warnings, skipped)
    splits = [p for p in folders if p.name.lower() in _SPLIT_NAMES and _holds_classes(p)]
    # each would become one "species" of every photo under it; but beside classes holding photos, a split-named
    # folder is a class too (test/2024-05/*.jpg: photos sorted by date), read with _class_folders' warning
    if splits and not any(_holds_photos(p) for p in folders if p not in splits):
        raise _split_error(root, splits, "folder")
    labels: dict[str, str] = {}  # label -> the first folder taken whole as it, not as a scientific name
    joined: dict[str, list[str]] = {}  # species -> the names of its folders (several: joined into one species)
    readings = {folder: _folder_readings(" ".join(folder.name.split())) for folder in folders}  # parsed once
    read = {folder: _read_folder_name(folder.name, readings=readings[folder]) for folder in folders}
    sure = {name.split()[0] for name, _, guess in read.values() if not guess and looks_scientific(name.split())}
    read = {folder: _read_folder_name(folder.name, sure, readings[folder]) if guess else (name, common, guess)
            for folder, (name, common, guess) in read.items()}  # a guess settled by the other folders' genera
    pairs = {folder: pair for folder, pair in readings.items() if len(pair) == 2}
    settle = _settle_guesses({folder.name: pairs[folder] for folder in pairs if read[folder][2]},
                             {folder.name: [r[0] for r in pairs[folder]].index(read[folder][0])
                              for folder in pairs if not read[folder][2]})
    read = {folder: (*pairs[folder][settle[folder.name]], False) if folder.name in settle and read[folder][2]
            else reading for folder, reading in read.items()}  # settled by its own epithet, then by the layout
    parsed = {folder: (name, common) for folder, (name, common, _) in read.items()}
    guesses: list[tuple[str, str]] = []  # (folder, species) read by a guess nothing in the dataset settles
    genera = {name.split()[0] for name, _ in parsed.values() if looks_scientific(name.split())}
    for folder in folders:
        species, common = parsed[folder]
        species = recased_label(species, genera) or species
        if (checked := _checked_folder_names(folder, species, common, warnings)) is None:
            continue  # "=cmd (Naja haje)": skipped, said
        species, common = checked
        scan = _photos_in(folder, skipped, not_photos)
        paths = scan.photos
        if not paths:
            empty.append(_no_photos(folder.name, [scan], [folder]))
            files = files or bool(scan.not_photos)
            continue
        if not looks_scientific(species.split()):
            labels.setdefault(species, folder.name)
        joined.setdefault(species, []).append(folder.name)
        if read[folder][2]:
            guesses.append((folder.name, species))
        taxon = lookup_taxon(species)
        ranks = folder_ranks(folder.name)  # iNaturalist 2021's folders spell their family and higher ranks
        family = taxon.family if taxon else ranks.get("family")
        records.extend(
            ReferenceRecord(
                path=p,
                species=species,
                genus=taxon.genus if taxon else None,
                family=family,
                common_name=common or (taxon.common_name if taxon else None),
                venomous=taxon.venomous if taxon else None,
                dataset="folder",
                ranks={rank: v for rank, v in ranks.items() if rank in HIGHER_RANKS},
            )
            for p in paths
        )
    families = {r.genus: r.family for r in records if r.genus and r.family}  # a genus' family, where one folder
    for r in records:  # spells it (iNaturalist 2021's), is its other species' too ('turdus viscivorus' beside one)
        if not r.family and r.genus in families:
            r.family = families[r.genus]
    for warning in (unparsed_folders_warning(labels.values()), ambiguous_folders_warning(guesses),
                    joined_folders_warning(joined)):
        if warning:
            warnings.append(warning)
    if empty:
        warnings.append(f"{len(empty)} folder(s) with no photos ignored: {first_few(empty, '; ')}"
                        + (f". {NOT_PHOTO_ADVICE}" if files else ""))
    return records


def _read_metadata(path: Path, required: Iterable[str], dataset: str) -> Iterator[dict[str, str]]:
    if not path.is_file():
        raise ValueError(f"{dataset} metadata file {path} does not exist (set it with --metadata)")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = {c.strip() for c in reader.fieldnames or ()}
        missing = [c for c in required if c not in columns]
        if missing:
            raise ValueError(
                f"{dataset} metadata {path} lacks required column(s): {', '.join(missing)} "
                f"(found: {', '.join(sorted(columns)) or 'none'})"
            )
        for row in reader:
            yield {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}


def _resolve(root: Path, relative: str) -> Path:
    path = Path(relative)
    return path if path.is_absolute() else root / path


def _load_rare_species(root: Path, metadata: Path | None, warnings: list[str]) -> list[ReferenceRecord]:
    meta_path = metadata if metadata is not None else root / "metadata.csv"
    records: list[ReferenceRecord] = []
    missing: list[str] = []
    invalid: list[str] = []
    unlabelled = 0
    for row in _read_metadata(meta_path, ("file_name", "genus", "species"), "rare-species"):
        file_name, genus, epithet = row["file_name"], row["genus"], row["species"]
        if " " in epithet:
            species = epithet
        elif row.get("sciName"):
            species = row["sciName"]
        elif genus and epithet:
            species = f"{genus} {epithet}"
        else:
            species = ""
        if not file_name or not species:
            unlabelled += 1
            continue
        species = _checked(species, file_name, invalid)
        if species is None:
            continue
        path = _resolve(root, file_name)
        if not path.is_file():
            missing.append(file_name)
            continue
        taxon = lookup_taxon(species)
        records.append(
            ReferenceRecord(
                path=path,
                species=species,
                genus=genus or None,
                family=row.get("family") or (taxon.family if taxon else None),
                common_name=row.get("common") or None,
                venomous=taxon.venomous if taxon else None,
                dataset="rare-species",
                ranks={rank: row[rank] for rank in HIGHER_RANKS if row.get(rank)},
            )
        )
    if unlabelled:
        warnings.append(f"{unlabelled} row(s) of {meta_path} without file_name or species skipped")
    _warn_invalid(invalid, meta_path, warnings)
    if missing:
        warnings.append(_missing_files_warning(missing, meta_path))
    return records


def _load_snakeclef2021(root: Path, metadata: Path | None, warnings: list[str]) -> list[ReferenceRecord]:
    if metadata is None:
        raise ValueError("--metadata CSV is required for snakeclef2021 (the SnakeCLEF 2021 metadata file)")
    records: list[ReferenceRecord] = []
    missing: list[str] = []
    invalid: list[str] = []
    unlabelled = 0
    for row in _read_metadata(metadata, ("binomial", "image_path"), "snakeclef2021"):
        species, image_path = row["binomial"], row["image_path"]
        if not species or not image_path:
            unlabelled += 1
            continue
        species = _checked(species, image_path, invalid)
        if species is None:
            continue
        path = _resolve(root, image_path)
        if not path.is_file():
            missing.append(image_path)
            continue
        taxon = lookup_taxon(species)
        records.append(
            ReferenceRecord(
                path=path,
                species=species,
                genus=row.get("genus") or (taxon.genus if taxon else None),
                family=row.get("family") or (taxon.family if taxon else None),
                venomous=taxon.venomous if taxon else None,
                dataset="snakeclef2021",
                country=row.get("country") or None,
            )
        )
    if unlabelled:
        warnings.append(f"{unlabelled} row(s) of {metadata} without binomial or image_path skipped")
    _warn_invalid(invalid, metadata, warnings)
    if missing:
        warnings.append(_missing_files_warning(missing, metadata))
    return records


# --------------------------------------------------------------------------------------------------
# Public entry points


def list_datasets() -> list[str]:
    """Names accepted by ``load_dataset``."""
    return list(DATASETS)


def _dataset_key(name: str) -> str:
    """A dataset name as :data:`DATASETS` spells it (``Rare_Species`` -> ``rare-species``)."""
    return name.strip().lower().replace("_", "-")


def _check_args(name: str, root: str | Path, metadata: str | Path | None) -> tuple[str, Path, Path | None]:
    key = _dataset_key(name)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    root_path = Path(root).expanduser()
    glob_root = key == "webdataset" and any(c in str(root) for c in "*?[")
    if not glob_root and not root_path.exists():
        raise ValueError(f"dataset root {root_path} does not exist (set the image folder with --root)")
    if key not in STREAMED and not root_path.is_dir():
        raise ValueError(f"dataset root {root_path} is not a folder (set the image folder with --root)")
    return key, root_path, Path(metadata).expanduser() if metadata is not None else None


def _named_options(text: str, options: str) -> str:
    """``text`` (a loader's message) with --dataset, --root and --metadata named as the command's own options."""
    return re.sub(r"(?<![\w-])--(dataset|root|metadata)\b", lambda m: f"{options}{m.group(1)}", text)


def iter_dataset(
    name: str, root: str | Path, *, metadata: str | Path | None = None, warnings: list[str] | None = None,
    skipped: list[tuple[Path, str]] | None = None,
) -> Iterator[ReferenceRecord]:
    """The records of dataset ``name``, one at a time (streamed for ``manifest`` and ``webdataset``).

    Arguments are checked before the first record (same errors as :func:`load_dataset`); ``warnings`` is
    filled as the scan goes (complete when the iterator is exhausted); ``skipped`` gets the entries of a
    class-per-folder dataset, or among ``webdataset`` shards, that could not be read (broken links...), which
    are also logged, once.
    """
    from index import streamed

    key, root_path, meta_path = _check_args(name, root, metadata)
    notes = warnings if warnings is not None else []
    if key == "manifest":
        table, image_root = streamed.manifest_file(root_path, meta_path)
        return streamed.iter_manifest(table, image_root, notes)
    if key == "webdataset":
        shards = streamed.list_shards(root, skipped)  # fail now when there is none; what was skipped logged once
        if meta_path is not None:
            notes.append(f"--metadata {meta_path} is ignored by the webdataset dataset")
        return streamed.iter_webdataset(root, notes, shards=shards)
    return iter(_load_listed(key, root_path, meta_path, notes, skipped if skipped is not None else []))


#: The class-per-folder layouts: ``loader(root, warnings, skipped, not_photos)``, reading each folder with
#: :func:`_photos_in` (so entries not read and files that are not photos are reported once for the dataset).
FOLDER_LOADERS: dict[str, Callable[..., list[ReferenceRecord]]] = {"moroccan": _load_moroccan,
                                                                    "folder": _load_folder}
#: The layouts a metadata table drives (``--metadata``): ``loader(root, metadata, warnings)``.
METADATA_LOADERS: dict[str, Callable[..., list[ReferenceRecord]]] = {"rare-species": _load_rare_species,
                                                                      "snakeclef2021": _load_snakeclef2021}


def _load_listed(key: str, root_path: Path, meta_path: Path | None, warnings: list[str],
                 skipped: list[tuple[Path, str]]) -> list[ReferenceRecord]:
    """The records of a dataset read whole, by its loader in :data:`FOLDER_LOADERS` or :data:`METADATA_LOADERS`
    (the :data:`STREAMED` ones are read by :func:`iter_dataset`); a name of :data:`DATASETS` in neither is refused,
    never read by another layout's loader."""
    first = len(skipped)
    not_photos: list[Path] = []  # beside photos (those of a folder without any are named with it)
    if key in FOLDER_LOADERS:
        records = FOLDER_LOADERS[key](root_path, warnings, skipped, not_photos)
    elif key in METADATA_LOADERS:
        records = METADATA_LOADERS[key](root_path, meta_path, warnings)
    else:
        raise ValueError(f"dataset {key!r} is in DATASETS but has no loader: add it to FOLDER_LOADERS "
                         f"({', '.join(FOLDER_LOADERS)}) or METADATA_LOADERS ({', '.join(METADATA_LOADERS)}) in "
                         f"index/datasets.py (docs/architecture.md, 'A dataset layout')")
    if meta_path is not None and key in FOLDER_LOADERS:
        warnings.append(f"--metadata {meta_path} is ignored by the {key} dataset")
    warn_skipped(skipped[first:], root_path)  # one warning for the whole dataset, not one per class folder
    if not_photos:
        warnings.append(not_photos_warning(not_photos, root_path, root_path))
    if note := common_names_warning(records, "folders" if key in FOLDER_LOADERS else "photos"):
        warnings.append(note)
    return records


def load_dataset(name: str, root: str | Path, *, metadata: str | Path | None = None,
                 options: str = "--") -> DatasetScan:
    """Scan dataset ``name`` under image root ``root`` (``metadata``: CSV for metadata-driven loaders).

    Raises ``ValueError`` for an unknown name, a missing root or metadata file, missing metadata
    columns, or (``moroccan``) a folder that is not a checklist species. ``options``: the prefix of the command's
    options that gave the three (``--val-``: --val-dataset, --val-root, --val-metadata), named in errors and
    warnings instead of --dataset, --root and --metadata.
    """
    warnings: list[str] = []
    skipped: list[tuple[Path, str]] = []
    try:
        key, root_path, _ = _check_args(name, root, metadata)
        records = list(iter_dataset(name, root, metadata=metadata, warnings=warnings, skipped=skipped))
    except ValueError as exc:
        if options == "--":
            raise
        raise ValueError(_named_options(str(exc), options)) from exc
    warnings = [_named_options(w, options) for w in warnings]
    species = sorted({r.species for r in records})
    logger.info("dataset %s at %s: %d photos of %d species", key, root_path, len(records), len(species))
    for warning in warnings:
        logger.debug("dataset %s: %s", key, warning)
    return DatasetScan(name=key, root=root_path, records=records, warnings=warnings, species=species,
                       skipped=skipped)


#: What each dataset expects under its root, named when the root holds no photo for it.
LAYOUTS: dict[str, str] = {
    "moroccan": "ROOT/<Genus-species>/<photos>: one folder per species of the Moroccan checklist ('Naja-haje', "
                "'Cobra d'Égypte (Naja haje)', ...)",
    "folder": "ROOT/<species>/<photos>: one folder per species ('Naja haje', 'Common Name (Genus species)', ...)",
    "rare-species": "ROOT/metadata.csv (or --metadata FILE) whose file_name column names photos under ROOT",
    "snakeclef2021": "--metadata FILE (the SnakeCLEF 2021 CSV) whose image_path column names photos under ROOT",
    "manifest": "a CSV or parquet table (ROOT itself, the one table in ROOT, or --metadata FILE) with a path and a "
                "species column, paths relative to ROOT",
    "webdataset": "tar shards (ROOT: a shard, a folder of shards or a glob) of images with their taxon labels",
}


def no_photos_error(dataset: str, root: str | Path, *, options: str = "--") -> ValueError:
    """The one error for a dataset root that holds no photo: the layout ``dataset`` expects, and the options to change
    (``options``: their prefix, ``--val-`` for --val-dataset / --val-root)."""
    key = _dataset_key(dataset)
    layout = _named_options(LAYOUTS.get(key, "its own layout"), options)
    return ValueError(f"no photos found under {root} for dataset {key!r}, which expects {layout}; point "
                      f"{options}root at such a folder, or give the {options}dataset that fits it "
                      f"({', '.join(DATASETS)})")


def require_records(scan: DatasetScan, *, options: str = "--") -> list[ReferenceRecord]:
    """The records of ``scan``; none: :func:`no_photos_error`."""
    if not scan.records:
        raise no_photos_error(scan.name, scan.root, options=options)
    return scan.records
