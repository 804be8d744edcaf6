"""A gallery directory: the LanceDB store (truth) + the FAISS index derived from it.

The folder's files are named in :mod:`index.layout`. Writes go to the store first, then the derived index; a crash in between is repaired on the next open
(the manifest's store version no longer matches, so the index is rebuilt from the store).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from index.atomic import write_json_atomic
from index.layout import EncoderMismatchError, GalleryLayout, check_encoder
from index.records import ReferenceRecord
from index.store import ReferenceStore, SpeciesSummary
from index.vectors import VectorIndex, VectorIndexConfig

logger = logging.getLogger(__name__)

GALLERY_FORMAT = 1

__all__ = [
    "GALLERY_FORMAT", "EncoderMismatchError", "Gallery", "Neighbour", "check_gallery_encoder", "read_gallery_info",
]


@dataclass
class Neighbour:
    """One reference photo returned by a search, with its metadata."""

    id: int  # stable reference id (store row id)
    similarity: float  # cosine similarity to the query
    species: str  # binomial
    genus: str | None  # genus name
    family: str | None  # family name
    common_name: str | None  # English common name
    venomous: bool | None  # medically important venomous, when known
    path: str  # source path of the reference photo
    dataset: str | None  # dataset it came from

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict."""
        return asdict(self)


class Gallery:
    """Reference photos with their embeddings, searchable by similarity."""

    def __init__(self, root: Path, info: dict, index_config: VectorIndexConfig) -> None:
        self.root = root
        self.layout = GalleryLayout(root)
        self.info = info
        self.index_config = index_config
        self.store = ReferenceStore(self.layout.store, int(info["dim"]))
        self._lock = threading.RLock()
        self._meta_cache: dict[int, Neighbour] = {}
        self._index = self._load_or_rebuild_index()

    # ----------------------------------------------------------------- opening
    @classmethod
    def create(
        cls,
        root: str | Path,
        encoder: dict,
        *,
        index_config: VectorIndexConfig | None = None,
        weights: str | None = None,
    ) -> Gallery:
        """Create a new gallery (or open an existing one built with the same encoder).

        ``encoder`` is ``Encoder.describe()``: it must hold spec, fingerprint and dim.
        """
        root = Path(root)
        if GalleryLayout(root).info.is_file():
            return cls.open(root, expected_fingerprint=encoder["fingerprint"], index_config=index_config)
        if root.exists() and any(root.iterdir()):
            raise ValueError(f"{root} exists and is not a speciesid gallery; choose an empty or new --index DIR")
        root.mkdir(parents=True, exist_ok=True)
        config = index_config or VectorIndexConfig()
        info = {
            "format": GALLERY_FORMAT,
            "encoder": {k: encoder[k] for k in ("spec", "fingerprint", "dim")} | {"weights": weights},
            "dim": int(encoder["dim"]),
            "index": asdict(config),
        }
        write_json_atomic(GalleryLayout(root).info, info)
        return cls(root, info, config)

    @classmethod
    def open(
        cls,
        root: str | Path,
        *,
        expected_fingerprint: str | None = None,
        index_config: VectorIndexConfig | None = None,
    ) -> Gallery:
        """Open an existing gallery; refuse one built by another encoder than ``expected_fingerprint``."""
        root = Path(root)
        info = read_gallery_info(root)
        if expected_fingerprint is not None:
            check_gallery_encoder(root, info, expected_fingerprint)
        config = index_config or VectorIndexConfig(**info.get("index", {}))
        return cls(root, info, config)

    @property
    def encoder_spec(self) -> str:
        """Spec string of the encoder that built this gallery."""
        return str(self.info["encoder"]["spec"])

    @property
    def encoder_weights(self) -> str | None:
        """Weights file the encoder was built with, if any."""
        return self.info["encoder"].get("weights")

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the encoder that built this gallery."""
        return str(self.info["encoder"]["fingerprint"])

    @property
    def dim(self) -> int:
        """Embedding width."""
        return int(self.info["dim"])

    # ------------------------------------------------------------ derived index
    @property
    def _vectors_path(self) -> Path:
        return self.layout.vectors

    def _manifest(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "dim": self.dim,
            "store_version": self.store.version,
            "count": self.store.count(),
        }

    def _load_or_rebuild_index(self) -> VectorIndex:
        reason = None
        try:
            index, manifest = VectorIndex.load(self._vectors_path)
            expected = self._manifest()
            for key in ("fingerprint", "dim", "store_version", "count"):
                if manifest.get(key) != expected[key]:
                    reason = f"stale ({key}: index {manifest.get(key)!r}, store {expected[key]!r})"
                    break
            else:
                if index.ntotal == expected["count"]:
                    return index
                reason = f"stale (index holds {index.ntotal} vectors, store {expected['count']})"
        except FileNotFoundError:
            reason = "missing"
        except ValueError as exc:
            reason = f"unreadable ({exc})"
        logger.info("vector index %s: rebuilding from the store", reason)
        return self.rebuild_index()

    def rebuild_index(self) -> VectorIndex:
        """Rebuild the FAISS index from the store and save it atomically."""
        with self._lock:
            ids, vectors = self.store.vectors()
            index = VectorIndex.build(vectors, ids, self.index_config, dim=self.dim)
            index.save(self._vectors_path, self._manifest())
            self._index = index
            return index

    @property
    def index(self) -> VectorIndex:
        """The FAISS index (read-only use)."""
        return self._index

    # ------------------------------------------------------------------ writes
    def known_sha256(self) -> dict[str, int]:
        """Content digest -> id of every stored photo (duplicates are stored once)."""
        return self.store.known_sha256()

    def add(
        self,
        records: Sequence[ReferenceRecord],
        sha256s: Sequence[str],
        embeddings: np.ndarray,
        *,
        save_index: bool = True,
    ) -> list[int]:
        """Store new references and make them searchable at once; returns their ids."""
        with self._lock:
            ids = self.store.add(records, sha256s, embeddings, self.fingerprint)
            if ids:
                self._index.add(np.asarray(embeddings, dtype=np.float32), np.asarray(ids, dtype=np.int64))
                if save_index:
                    self.save_index()
            return ids

    def delete(self, ids: Sequence[int]) -> int:
        """Delete references by id; returns how many existed."""
        with self._lock:
            found = self.store.delete(ids)
            if found:
                self._index.remove(np.asarray(list(ids), dtype=np.int64))
                for i in ids:
                    self._meta_cache.pop(int(i), None)
                self.save_index()
            return found

    def set_excluded(self, ids: Sequence[int], excluded: bool = True) -> int:
        """Leave references out of search and probe training (or bring them back); nothing is deleted.

        The store is written first; the FAISS index is then rebuilt from the store's searchable rows.
        Returns how many of ``ids`` exist.
        """
        with self._lock:
            found = self.store.set_excluded(ids, excluded)
            if found:
                for i in ids:
                    self._meta_cache.pop(int(i), None)
                self.rebuild_index()
            return found

    def save_index(self) -> None:
        """Persist the FAISS index with a manifest matching the current store version."""
        with self._lock:
            self._index.save(self._vectors_path, self._manifest())

    def finish_build(self) -> None:
        """After a bulk build: compact the store, pick the index kind for the final size, save."""
        with self._lock:
            self.store.optimize()
            self.rebuild_index()

    # ------------------------------------------------------------------- reads
    def __len__(self) -> int:
        return self.store.count()

    def search(self, queries: np.ndarray, k: int) -> list[list[Neighbour]]:
        """Nearest references of each query embedding, best first, with metadata."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dim:
            raise ValueError(f"query embeddings are {queries.shape[1]}-d but this gallery holds {self.dim}-d")
        with self._lock:
            sims, ids = self._index.search(queries, k)
        return [self._neighbours(row_ids, row_sims) for row_ids, row_sims in zip(ids, sims, strict=True)]

    def _neighbours(self, ids: np.ndarray, sims: np.ndarray) -> list[Neighbour]:
        wanted = [int(i) for i in ids if i >= 0]
        missing = [i for i in wanted if i not in self._meta_cache]
        if missing:
            df = self.store.metadata(missing)
            for rid, row in df.iterrows():
                self._meta_cache[int(rid)] = Neighbour(
                    id=int(rid),
                    similarity=0.0,
                    species=row["species"],
                    genus=_opt(row["genus"]),
                    family=_opt(row["family"]),
                    common_name=_opt(row["common_name"]),
                    venomous=None if _opt(row["venomous"]) is None else bool(row["venomous"]),
                    path=row["source_path"],
                    dataset=_opt(row["dataset"]),
                )
        out = []
        for rid, sim in zip(ids, sims, strict=True):
            base = self._meta_cache.get(int(rid))
            if base is not None:
                out.append(Neighbour(**{**asdict(base), "similarity": float(sim)}))
        return out

    def species(self) -> list[SpeciesSummary]:
        """Species in the gallery with counts and metadata."""
        return self.store.species()


def check_gallery_encoder(root: str | Path, info: dict, fingerprint: str) -> None:
    """Refuse an encoder that did not build the gallery, saying which one did (EncoderMismatchError)."""
    built = info["encoder"]
    check_encoder(
        f"gallery {root}", built["fingerprint"], fingerprint,
        fix=f"use --encoder {built['spec']}" + (f" --weights {built['weights']}" if built.get("weights") else "")
        + " or build a new index in another directory",
    )


def read_gallery_info(root: str | Path) -> dict:
    """Read ``gallery.json``; clear ``ValueError`` when DIR is not a gallery."""
    root = Path(root)
    path = GalleryLayout(root).info
    if not path.is_file():
        raise ValueError(
            f"{root} is not a speciesid gallery (no {path.name}); build one with "
            "'speciesid index build --index DIR ...'"
        )
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is unreadable ({exc})") from exc
    if info.get("format") != GALLERY_FORMAT:
        raise ValueError(f"{path} has format {info.get('format')!r}; this speciesid reads {GALLERY_FORMAT}")
    return info


def _opt(value: object) -> object | None:
    if value is None:
        return None
    try:
        if value != value:  # NaN
            return None
    except (TypeError, ValueError):
        pass
    return value
