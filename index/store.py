"""The reference store: one LanceDB table, embedded on disk, the gallery's source of truth.

Every write is one LanceDB commit (all or nothing); readers see committed versions only, and an open
store notices other processes' commits within ``refresh_s`` seconds (LanceDB's read consistency
interval). Ids are given by the caller (:class:`index.gallery.Gallery` reserves them under its write lock).

Source paths are stored as text; a path that is not valid UTF-8 (possible on Linux) is stored as its
``file://`` URI, which keeps every byte (:func:`source_text`, :func:`source_file`).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes, urlparse

import lancedb
import numpy as np
import pandas as pd
import pyarrow as pa

from index.records import HIGHER_RANKS, ReferenceRecord

logger = logging.getLogger(__name__)

TABLE = "references"
#: Metadata columns (everything but the embedding), in table order.
META_COLUMNS: tuple[str, ...] = (
    "id",
    "species",
    "genus",
    "family",
    *HIGHER_RANKS,
    "common_name",
    "venomous",
    "dataset",
    "source_path",
    "country",
    "sha256",
    "added_at",
    "encoder",
    "excluded",
)


def _schema(dim: int) -> pa.Schema:
    text = pa.string()
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("species", text, nullable=False),
            pa.field("genus", text),
            pa.field("family", text),
            *[pa.field(rank, text) for rank in HIGHER_RANKS],
            pa.field("common_name", text),
            pa.field("venomous", pa.bool_()),
            pa.field("dataset", text),
            pa.field("source_path", text),
            pa.field("country", text),
            pa.field("sha256", text, nullable=False),
            pa.field("added_at", pa.timestamp("us", tz="UTC")),
            pa.field("encoder", text, nullable=False),
            pa.field("excluded", pa.bool_()),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        ]
    )


@dataclass
class SpeciesSummary:
    """A species in the gallery, with how many reference photos it has."""

    species: str  # binomial
    genus: str | None  # genus name
    family: str | None  # family name
    common_name: str | None  # most frequent common name among its references
    venomous: bool | None  # medically important venomous; None when unknown
    count: int  # reference photos (excluded ones not counted)


def source_text(path: str | Path) -> str:
    """A source path as storable text: itself, or its ``file://`` URI when it is not valid UTF-8."""
    text = str(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:  # undecodable bytes of a Linux file name (surrogate escapes)
        return Path(os.path.abspath(path)).as_uri()


def source_file(text: str) -> Path:
    """The file a stored source path names (the inverse of :func:`source_text`)."""
    if text.startswith("file://"):
        return Path(os.fsdecode(unquote_to_bytes(urlparse(text).path)))
    return Path(text)


#: Digests per ``sha256 IN (...)`` query.
_IN_CHUNK = 1000


class ReferenceStore:
    """LanceDB table of reference photos: metadata + embedding, one row per photo."""

    def __init__(self, root: str | Path, dim: int, *, refresh_s: float | None = 1.0) -> None:
        self.root = Path(root)
        self.dim = dim
        interval = None if refresh_s is None else dt.timedelta(seconds=refresh_s)
        self._db = lancedb.connect(str(self.root), read_consistency_interval=interval)
        if TABLE in self._table_names():
            self._table = self._db.open_table(TABLE)
        else:
            try:
                self._table = self._db.create_table(TABLE, schema=_schema(dim))
            except (ValueError, OSError) as exc:  # another process created it first
                if TABLE not in self._table_names():
                    raise
                logger.debug("table created by another process: %s", exc)
                self._table = self._db.open_table(TABLE)
        got = self._table.schema.field("embedding").type.list_size
        if got != dim:
            raise ValueError(f"store {self.root} holds {got}-d embeddings, not {dim}-d")

    def _table_names(self) -> list[str]:
        names = self._db.list_tables() if hasattr(self._db, "list_tables") else self._db.table_names()
        return list(getattr(names, "tables", names))

    def max_id(self) -> int:
        """The largest id stored (0 for an empty store); reads only the id column."""
        ids = self.ids(include_excluded=True)
        return int(ids.max()) if len(ids) else 0

    def refresh(self) -> None:
        """See other processes' commits now (otherwise within ``refresh_s``)."""
        self._table.checkout_latest()

    def _read(self, columns: Sequence[str], where: str | None = None) -> pd.DataFrame:
        query = self._table.search().select(list(columns)).limit(max(self._table.count_rows(), 1))
        if where:
            query = query.where(where)
        return query.to_arrow().to_pandas()

    @property
    def version(self) -> int:
        """LanceDB table version: grows with every write (the derived index records it)."""
        return int(self._table.version)

    def count(self, *, include_excluded: bool = False) -> int:
        """Number of reference rows."""
        if include_excluded:
            return int(self._table.count_rows())
        return int(self._table.count_rows("excluded = false OR excluded IS NULL"))

    def find_sha256(self, digests: Iterable[str]) -> dict[str, int]:
        """Digest -> reference id of the given digests that are stored (excluded rows too)."""
        wanted = sorted({d for d in digests if d and all(c in "0123456789abcdef" for c in d)})
        found: dict[str, int] = {}
        for start in range(0, len(wanted), _IN_CHUNK):
            chunk = wanted[start : start + _IN_CHUNK]
            df = self._read(["id", "sha256"], "sha256 IN (" + ", ".join(f"'{d}'" for d in chunk) + ")")
            found.update(zip(df["sha256"], df["id"].astype(int), strict=True))
        return found

    def uses_source(self, text: str) -> bool:
        """Whether any row (excluded ones too) has this stored source path."""
        quoted = text.replace("'", "''")
        return self._table.count_rows(f"source_path = '{quoted}'") > 0

    def ids(self, *, include_excluded: bool = False) -> np.ndarray:
        """Sorted int64 ids of the searchable rows (all rows with ``include_excluded``); reads one column."""
        where = None if include_excluded else "excluded = false OR excluded IS NULL"
        query = self._table.search().select(["id"]).limit(max(self._table.count_rows(), 1))
        if where:
            query = query.where(where)
        return np.sort(query.to_arrow().column("id").to_numpy().astype(np.int64))

    def add(
        self,
        records: Sequence[ReferenceRecord],
        sha256s: Sequence[str],
        embeddings: np.ndarray,
        encoder: str,
        ids: Sequence[int],
    ) -> list[int]:
        """Append rows under the given (reserved, unused) ids, in one commit; returns the ids."""
        n = len(records)
        if len(sha256s) != n or embeddings.shape != (n, self.dim) or len(ids) != n:
            raise ValueError(
                f"add needs as many digests, ids and ({n}, {self.dim}) embeddings as records; "
                f"got {len(sha256s)} digests, {len(ids)} ids and {embeddings.shape}"
            )
        if n == 0:
            return []
        ids = [int(i) for i in ids]
        now = dt.datetime.now(dt.timezone.utc)
        cols: dict[str, pa.Array] = {
            "id": pa.array(ids, pa.int64()),
            "species": pa.array([r.species for r in records], pa.string()),
            "genus": pa.array([r.genus for r in records], pa.string()),
            "family": pa.array([r.family for r in records], pa.string()),
        }
        for rank in HIGHER_RANKS:
            cols[rank] = pa.array([r.ranks.get(rank) for r in records], pa.string())
        cols.update(
            {
                "common_name": pa.array([r.common_name for r in records], pa.string()),
                "venomous": pa.array([r.venomous for r in records], pa.bool_()),
                "dataset": pa.array([r.dataset for r in records], pa.string()),
                "source_path": pa.array([source_text(r.path) for r in records], pa.string()),
                "country": pa.array([r.country for r in records], pa.string()),
                "sha256": pa.array(list(sha256s), pa.string()),
                "added_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
                "encoder": pa.array([encoder] * n, pa.string()),
                "excluded": pa.array([False] * n, pa.bool_()),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1)), self.dim
                ),
            }
        )
        self._table.add(pa.table(cols, schema=_schema(self.dim)))
        return ids

    def _matching(self, ids: Sequence[int]) -> tuple[str, int]:
        """SQL filter for the ids and how many rows it matches."""
        ids = [int(i) for i in ids]
        if not ids:
            return "", 0
        where = f"id IN ({', '.join(map(str, ids))})"
        return where, int(self._table.count_rows(where))

    def delete(self, ids: Sequence[int]) -> int:
        """Delete rows by id; returns how many existed."""
        where, found = self._matching(ids)
        if found:
            self._table.delete(where)
        return found

    def set_excluded(self, ids: Sequence[int], excluded: bool) -> int:
        """Mark rows excluded from search (reversible); returns how many rows matched."""
        where, found = self._matching(ids)
        if found:
            self._table.update(where=where, values={"excluded": excluded})
        return found

    def metadata(self, ids: Sequence[int] | None = None, *, include_excluded: bool = True) -> pd.DataFrame:
        """Metadata rows (no embeddings), optionally only the given ids, indexed by id."""
        clauses = []
        if ids is not None:
            ids = [int(i) for i in ids]
            if not ids:
                return pd.DataFrame(columns=list(META_COLUMNS)).set_index("id")
            clauses.append(f"id IN ({', '.join(map(str, ids))})")
        if not include_excluded:
            clauses.append("(excluded = false OR excluded IS NULL)")
        df = self._read(META_COLUMNS, " AND ".join(clauses) or None)
        return df.set_index("id", drop=False)

    def vectors(
        self, *, include_excluded: bool = False, ids: Sequence[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 (N,), embeddings float32 (N, dim)) of the searchable rows (or of ``ids``, any row)."""
        if ids is not None:
            parts = [self._vectors(f"id IN ({', '.join(map(str, map(int, ids[s : s + _IN_CHUNK])))})")
                     for s in range(0, len(ids), _IN_CHUNK)] or [self._vectors("id < 0")]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return self._vectors(None if include_excluded else "excluded = false OR excluded IS NULL")

    def _vectors(self, where: str | None) -> tuple[np.ndarray, np.ndarray]:
        query = self._table.search().select(["id", "embedding"]).limit(max(self._table.count_rows(), 1))
        if where:
            query = query.where(where)
        tbl = query.to_arrow()
        ids = tbl.column("id").to_numpy().astype(np.int64)
        flat = tbl.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return ids, np.ascontiguousarray(flat, dtype=np.float32).reshape(len(ids), self.dim)

    def species(self) -> list[SpeciesSummary]:
        """Distinct species with reference counts and their metadata, sorted by name."""
        df = self._read(["species", "genus", "family", "common_name", "venomous", "excluded"])
        if df.empty:
            return []
        df = df[~df["excluded"].fillna(False).astype(bool)]
        out = []
        for name, group in df.groupby("species", sort=True):
            common = group["common_name"].dropna()
            venom = group["venomous"].dropna()
            out.append(
                SpeciesSummary(
                    species=str(name),
                    genus=_first(group["genus"]),
                    family=_first(group["family"]),
                    common_name=str(common.mode().iloc[0]) if len(common) else None,
                    venomous=bool(venom.mode().iloc[0]) if len(venom) else None,
                    count=int(len(group)),
                )
            )
        return out

    def optimize(self) -> None:
        """Compact small fragments after a large build (best effort)."""
        try:
            self._table.optimize()
        except Exception as exc:  # noqa: BLE001 - optional maintenance, depends on lancedb extras
            logger.debug("lancedb optimize skipped: %s", exc)


def _first(series: pd.Series) -> str | None:
    values = series.dropna()
    return str(values.iloc[0]) if len(values) else None
