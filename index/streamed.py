"""Datasets too big to list as folders, read lazily: a manifest table and webdataset tar shards.

- ``manifest``: a CSV or parquet table, one row per photo: ``path`` (relative to the image root, or
  absolute) and ``species`` are required; optional ``genus``, ``family``, ``kingdom``, ``phylum``,
  ``class``, ``order``, ``common_name``, ``venomous`` (1/0, true/false, yes/no) and ``country``. Aliases:
  ``file``/``file_name``/``filepath``/``image_path``; ``binomial``/``scientific_name``/``sciName``;
  ``common``/``vernacular_name``; ``mivs``; ``country_code``. A ``species`` without a space is an epithet
  joined to ``genus``. Rows are streamed in batches (10M rows never sit in memory as Python objects);
  files are not checked here: a missing photo is reported by the build, never fatal.
- ``webdataset``: tar shards (a shard, a folder of shards, or a glob), TreeOfLife-10M's layout: each sample
  is the members sharing a key (the member name up to its first dot): an image (``jpg``, ``jpeg``, ``png``,
  ``webp``) and text labels: ``taxonTag.txt`` ("a photo of kingdom Animalia … genus Pica species hudsonia."),
  ``scientific_name.txt``, ``taxonomic_name.txt``, ``common_name.txt``; or a ``json`` member with the
  manifest's field names. A photo's path is ``SHARD#MEMBER`` (read by :mod:`index.sources`).
"""

from __future__ import annotations

import glob
import json
import logging
import re
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa

from index.photos import (
    IMAGE_EXTENSIONS,
    SKIPPED_SHOWN,
    Skipped,
    entry_problem,
    scan_files,
    skipped_text,
    warn_skipped,
)
from index.records import HIGHER_RANKS, ReferenceRecord
from index.sources import SHARD_SUFFIXES, member_locator, remember_members

logger = logging.getLogger(__name__)

#: Manifest columns: canonical name -> accepted spellings (matched case-insensitively).
MANIFEST_COLUMNS: dict[str, tuple[str, ...]] = {
    "path": ("path", "file", "file_name", "filepath", "image_path"),
    "species": ("species", "binomial", "scientific_name", "sciname"),
    "genus": ("genus",),
    "family": ("family",),
    **{rank: (rank,) for rank in HIGHER_RANKS},
    "common_name": ("common_name", "common", "vernacular_name"),
    "venomous": ("venomous", "mivs"),
    "country": ("country", "country_code"),
}
MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
#: Member extensions that are the sample's photo: every photo format the gallery takes (``index.photos``).
IMAGE_MEMBERS = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
_BATCH_ROWS = 65_536
_TAG_RE = re.compile(r"\b(kingdom|phylum|class|order|family|genus|species)\s+([^\s.]+)")
_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f"}


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text or None


def _flag(value: object) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text.endswith(".0"):
        text = text[:-2]
    return True if text in _TRUE else False if text in _FALSE else None


def make_record(fields: dict[str, object], path: str | Path, dataset: str) -> ReferenceRecord | None:
    """A record from manifest-style fields (canonical names), or None without a species."""
    from index.taxonomy import lookup_taxon

    species, _ = _species_of(fields)
    if species is None:
        return None
    genus = _text(fields.get("genus"))
    taxon = lookup_taxon(species)
    venomous = _flag(fields.get("venomous"))
    common = _text(fields.get("common_name"))
    return ReferenceRecord(
        path=Path(path),
        species=species,
        genus=genus or (taxon.genus if taxon else None),
        family=_text(fields.get("family")) or (taxon.family if taxon else None),
        common_name=common if common != species else None,
        venomous=venomous if venomous is not None else (taxon.venomous if taxon else None),
        dataset=dataset,
        ranks={rank: v for rank in HIGHER_RANKS if (v := _text(fields.get(rank)))},
        country=_text(fields.get("country")),
    )


def _species_of(fields: dict[str, object]) -> tuple[str | None, str]:
    """(the species of manifest-style ``fields``, checked by :func:`index.taxonomy.check_name`, '') or (None, why
    there is none: no species, or check_name's message). An epithet beside its genus is joined to it (rare-species,
    TreeOfLife taxonTag)."""
    from index.taxonomy import InvalidNameError, check_name

    species, genus = _text(fields.get("species")), _text(fields.get("genus"))
    if species and " " not in species and genus:
        species = f"{genus} {species}"
    if not species:
        return None, "no species"
    try:
        return check_name(species), ""
    except InvalidNameError as exc:
        return None, str(exc)


def record_problem(fields: dict[str, object]) -> str:
    """Why :func:`make_record` makes no record of manifest-style ``fields`` that have a path: no species, or the
    species name :func:`index.taxonomy.check_name` refuses (its message); '' when it would make one."""
    return _species_of(fields)[1]


# ------------------------------------------------------------------------------------------- manifest
def _manifest_batches(path: Path) -> Iterator[pa.RecordBatch]:
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        yield from pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS)
        return
    import pyarrow.csv as pacsv

    reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 24),
                            convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    yield from reader


def _columns(names: list[str], path: Path) -> dict[str, str]:
    lower = {n.strip().lower(): n for n in names}
    found = {canon: next(lower[a] for a in alts if a in lower)
             for canon, alts in MANIFEST_COLUMNS.items() if any(a in lower for a in alts)}
    missing = [c for c in ("path", "species") if c not in found]
    if missing:
        raise ValueError(f"manifest {path} lacks the column(s) {', '.join(missing)} "
                         f"(found: {', '.join(names) or 'none'}; see 'speciesid index build --help')")
    return found


def manifest_file(root: Path, metadata: Path | None) -> tuple[Path, Path]:
    """(manifest table, image root): ``--metadata FILE``, or ``--root`` naming the table itself."""
    if metadata is not None:
        return metadata, root
    if root.is_file():
        return root, root.parent
    for suffix in MANIFEST_SUFFIXES:
        candidates = sorted(root.glob(f"*{suffix}"))
        if len(candidates) == 1:
            return candidates[0], root
    raise ValueError(f"manifest dataset: give the table with --metadata FILE (CSV or parquet); {root} holds "
                     "no single manifest file")


def iter_manifest(path: Path, root: Path, warnings: list[str]) -> Iterator[ReferenceRecord]:
    """Records of a CSV or parquet manifest, streamed; rows without a path or a usable species are counted, and
    the first few named in the warning with why: by data row (the first row after a CSV's header is row 1; blank
    lines are not rows, a quoted field may span lines) and by their ``path`` value, what an operator searches
    the file for."""
    if not path.is_file():
        raise ValueError(f"manifest {path} does not exist")
    columns: dict[str, str] | None = None
    bad = 0
    named: list[str] = []  # the first SKIPPED_SHOWN skipped rows: "data row N (path P): why"
    row = 0
    for batch in _manifest_batches(path):
        if columns is None:
            columns = _columns(batch.schema.names, path)
        data = {canon: batch.column(src).to_pylist() for canon, src in columns.items()}
        for i in range(batch.num_rows):
            row += 1
            fields = {canon: values[i] for canon, values in data.items()}
            rel = _text(fields.get("path"))
            record = make_record(fields, rel if rel is None or Path(rel).is_absolute() else root / rel,
                                 "manifest") if rel else None
            if record is None:
                bad += 1
                if len(named) < SKIPPED_SHOWN:
                    why = record_problem(fields) if rel else "no path"
                    where = f"data row {row} (path {rel})" if rel else f"data row {row}"
                    named.append(f"{where}: {why}")
                continue
            yield record
    if columns is None:
        _columns([], path)
    if bad:
        more = f"; ... ({bad - len(named)} more)" if bad > len(named) else ""
        warnings.append(f"{bad} row(s) of {path} without a path or a valid species skipped: {'; '.join(named)}{more}")


# ----------------------------------------------------------------------------------------- webdataset
def is_shard_name(name: str) -> bool:
    """True for a visible file name with a shard suffix (``.tar``, ``.tar.gz``, ``.tgz``)."""
    return not name.startswith(".") and name.endswith(SHARD_SUFFIXES)


def list_shards(root: str | Path, skipped: list[Skipped] | None = None) -> list[Path]:
    """Tar shards named by ``root``: one shard, a folder of shards (searched by ``index.photos``' rule: recursive,
    hidden names skipped, links followed), or a glob; sorted.

    Nothing is dropped silently: a shard-named entry that is no readable file (a broken link, a link loop, a
    folder), a broken link of any name inside the folder and a folder that cannot be listed are logged in one
    warning (:func:`index.photos.warn_skipped`) and appended to ``skipped`` as ``(path, reason)``. ValueError
    when there is no shard (naming what was skipped).
    """
    text = str(root)
    if any(c in text for c in "*?["):
        matched = [Path(p) for p in glob.glob(text, recursive=True)]
        shards = [p for p in matched if p.name.endswith(SHARD_SUFFIXES) and p.is_file()]
        missed = [(p, "a folder, not a tar shard" if p.is_dir() else entry_problem(p))
                  for p in matched if p.name.endswith(SHARD_SUFFIXES) and not p.is_file()]
    elif Path(text).is_dir():
        shards, missed = scan_files(text, is_shard_name)
    elif Path(text).is_file():
        shards, missed = [Path(text)], []
    else:
        shards, missed = [], ([(Path(text), entry_problem(Path(text)))] if Path(text).is_symlink() else [])
    shards = sorted(p for p in shards if p.name.endswith(SHARD_SUFFIXES))
    warn_skipped(missed, root, "shards")
    if skipped is not None:
        skipped.extend(missed)
    if not shards:
        raise ValueError(f"no webdataset shards (.tar, .tar.gz, .tgz) at {root}"
                         + (f" (skipped: {skipped_text(missed)})" if missed else ""))
    return shards


def _split_key(name: str) -> tuple[str, str]:
    """Member name -> (sample key, extension): the key ends at the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def sample_fields(members: dict[str, bytes]) -> dict[str, object]:
    """Manifest-style fields of one sample from its label members (json first, then TreeOfLife's texts)."""
    fields: dict[str, object] = {}
    if "json" in members:
        try:
            data = json.loads(members["json"])
            if isinstance(data, dict):
                for canon, alts in MANIFEST_COLUMNS.items():
                    lower = {k.lower(): v for k, v in data.items()}
                    value = next((lower[a] for a in alts if a in lower), None)
                    if value is not None:
                        fields[canon] = value
        except (ValueError, UnicodeDecodeError):
            pass
    text = {k: v.decode("utf-8", "replace").strip() for k, v in members.items() if k.endswith("txt")}
    tagged = dict(_TAG_RE.findall(text.get("taxontag.txt", "").removeprefix("a photo of ")))
    if tagged.get("species") and tagged.get("genus"):
        tagged["species"] = f"{tagged['genus']} {tagged['species']}"  # taxonTag gives the epithet only
    for rank, value in tagged.items():
        fields.setdefault(rank, value)
    if not fields.get("species") and text.get("scientific_name.txt"):
        fields["species"] = text["scientific_name.txt"]
    if not fields.get("common_name") and text.get("common_name.txt"):
        fields["common_name"] = text["common_name.txt"]
    return fields


def _samples(shard: Path, table: dict[str, tuple[int, int]], warnings: list[str]
             ) -> Iterator[tuple[str | None, dict[str, bytes]]]:
    """(image member or None, label members) of each sample of one shard, in order; fills ``table``."""
    key: str | None = None
    members: dict[str, bytes] = {}
    image: str | None = None
    try:
        with tarfile.open(shard, "r:*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                table[info.name] = (info.offset_data, info.size)
                sample, ext = _split_key(info.name)
                if sample != key:
                    if key is not None:
                        yield image, members
                    key, members, image = sample, {}, None
                if ext in IMAGE_MEMBERS and image is None:
                    image = info.name
                elif ext == "json" or ext.endswith("txt"):
                    fh = tar.extractfile(info)
                    members[ext] = fh.read() if fh is not None else b""
    except (tarfile.TarError, OSError) as exc:
        warnings.append(f"shard {shard} could not be read to the end ({exc})")
    if key is not None:
        yield image, members


def iter_webdataset(root: str | Path, warnings: list[str], *, shards: Sequence[Path] | None = None
                    ) -> Iterator[ReferenceRecord]:
    """Records of webdataset shards, streamed; images are not read (only tar headers and label members).
    ``shards``: those :func:`list_shards` already found at ``root`` (otherwise listed here)."""
    no_image = no_label = 0
    for shard in list_shards(root) if shards is None else shards:
        table: dict[str, tuple[int, int]] = {}
        for image, members in _samples(shard, table, warnings):
            if image is None:
                no_image += 1
                continue
            record = make_record(sample_fields(members), member_locator(shard, image), "webdataset")
            if record is None:
                no_label += 1
            else:
                yield record
        if str(shard).endswith(".tar"):
            remember_members(str(shard), table)
    if no_image:
        warnings.append(f"{no_image} webdataset sample(s) without an image member skipped")
    if no_label:
        warnings.append(f"{no_label} webdataset sample(s) without a usable species label skipped")
