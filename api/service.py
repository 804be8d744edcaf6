"""The service behind the HTTP API: one encoder, one gallery, serialised writes, batched encoding.

Only public functions of ``retrieval`` and ``index`` are used; HTTP concerns stay in the routers.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from api.batcher import EncodeBatcher
from api.settings import Settings
from index.datasets import new_species_references
from index.gallery import Neighbour
from retrieval.identify import Identification, Identifier
from retrieval.images import ImageLoadError, decode_image, sha256_bytes
from retrieval.session import open_identifier
from retrieval.vote import Rank

logger = logging.getLogger(__name__)

_EXT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "HEIF": ".heic", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


class ServiceError(ValueError):
    """A client error the API turns into a 4xx response."""

    status = 400


class NotFound(ServiceError):
    """The thing asked for does not exist."""

    status = 404


class TooLarge(ServiceError):
    """The upload is over the size limit."""

    status = 413


class BadImage(ServiceError):
    """An upload is not a decodable photo."""

    status = 422


@dataclass
class Upload:
    """One uploaded photo, decoded."""

    name: str  # the client's file name
    data: bytes  # the raw bytes
    image: Image.Image  # RGB, EXIF orientation applied
    sha256: str  # digest of the bytes
    format: str  # PIL format name (JPEG, PNG, WEBP, HEIF, ...)


class SpeciesService:
    """Identify, search and curate one gallery."""

    def __init__(self, settings: Settings, identifier: Identifier | None = None) -> None:
        self.settings = settings
        self.identifier = identifier or open_identifier(
            settings.index, device=settings.device, precision=settings.precision
        )
        self.encoder = self.identifier.encoder
        self.gallery = self.identifier.gallery
        self.batcher = EncodeBatcher(self.encoder, window_ms=settings.batch_window_ms, max_batch=settings.max_batch)
        self.uploads_dir = Path(self.gallery.root) / "uploads"
        self._write_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="speciesid-decode")

    def close(self) -> None:
        """Stop background threads."""
        self.batcher.close()
        self._pool.shutdown(wait=False)

    # ---------------------------------------------------------------- uploads
    def decode(self, files: Sequence[tuple[str, bytes]]) -> list[Upload]:
        """Decode every upload or raise (413 / 422) naming the bad one; nothing is kept on failure."""
        limit = int(self.settings.max_upload_mb * 1024 * 1024)
        for name, data in files:
            if len(data) > limit:
                raise TooLarge(f"{name}: {len(data) / 1e6:.1f} MB is over the {self.settings.max_upload_mb:g} MB limit")

        def one(item: tuple[str, bytes]) -> Upload:
            name, data = item
            try:
                image = decode_image(data, max_pixels=self.settings.max_pixels, name=name)
                fmt = Image.open(io.BytesIO(data)).format or "JPEG"
            except ImageLoadError as exc:
                raise BadImage(str(exc)) from exc
            return Upload(name=name, data=data, image=image, sha256=sha256_bytes(data), format=fmt)

        return list(self._pool.map(one, files))

    def embed(self, uploads: Sequence[Upload]) -> np.ndarray:
        """(n, dim) embeddings, through the shared batcher."""
        tensors = torch.stack([self.encoder.preprocess(u.image) for u in uploads])
        return self.batcher.encode(tensors)

    # ------------------------------------------------------------------ reads
    def identify(
        self,
        uploads: Sequence[Upload],
        *,
        top: int = 5,
        rank: Rank = Rank.SPECIES,
        presence: dict[str, bool] | None = None,
    ) -> tuple[Identification, list[dict]]:
        """One answer for the photos of one observation, plus results at the asked rank."""
        emb = self.embed(uploads)
        answer = self.identifier.identify_observation(emb, top=max(top, 1), presence=presence)
        return answer, self.results_at_rank(answer, rank, top)

    def results_at_rank(self, answer: Identification, rank: Rank, top: int) -> list[dict]:
        """Ranked results: species predictions, or genus/family scores with their evidence."""
        if rank is Rank.SPECIES:
            out = []
            for p in answer.predictions[:top]:
                out.append({
                    "name": p.species, "rank": rank.value, "score": p.score, "species": p.species,
                    "common_name": p.common_name, "genus": p.genus, "family": p.family, "venomous": p.venomous,
                    "neighbours": [n for n in answer.neighbours if n.species == p.species],
                })
            return out
        taxa = self.identifier.taxa()
        attr = "genus" if rank is Rank.GENUS else "family"
        scores = answer.at_rank(rank)
        out = []
        for name, score in list(scores.items())[:top]:
            members = [s for s in answer.scores if getattr(taxa.get(s), attr, None) == name]
            flags = [taxa[s].venomous for s in members if s in taxa]
            family = {taxa[s].family for s in members if s in taxa} if rank is Rank.GENUS else {name}
            out.append({
                "name": name, "rank": rank.value, "score": score, "species": None, "common_name": None,
                "genus": name if rank is Rank.GENUS else None,
                "family": next(iter(family)) if len(family) == 1 else None,
                "venomous": True if any(flags) else (False if flags and all(f is False for f in flags) else None),
                "neighbours": [n for n in answer.neighbours if getattr(n, attr) == name],
            })
        return out

    def search_vector(self, vector: Sequence[float], k: int) -> list[Neighbour]:
        """Neighbours of an embedding (L2-normalised here)."""
        v = np.asarray(vector, dtype=np.float64)
        if v.ndim != 1 or v.shape[0] != self.gallery.dim:
            raise ServiceError(f"embedding must be a list of {self.gallery.dim} numbers, got shape {list(v.shape)}")
        if not np.all(np.isfinite(v)) or not np.any(v):
            raise ServiceError("embedding must be finite and not all zeros")
        v = v / np.abs(v).max()  # scale first: tiny or huge values must not under/overflow the norm
        v = (v / np.linalg.norm(v)).astype(np.float32)
        return self.gallery.search(v[None], k)[0]

    def search_image(self, upload: Upload, k: int) -> list[Neighbour]:
        """Neighbours of a photo."""
        return self.gallery.search(self.embed([upload]), k)[0]

    def species(self) -> list:
        """Species summaries."""
        return self.gallery.species()

    def thumbnail(self, ref_id: int) -> bytes:
        """A JPEG thumbnail of a reference photo."""
        meta = self.gallery.store.metadata([ref_id])
        if meta.empty:
            raise NotFound(f"no reference with id {ref_id}")
        path = Path(str(meta.iloc[0]["source_path"]))
        try:
            image = decode_image(path.read_bytes(), max_pixels=self.settings.max_pixels, name=str(path))
        except (OSError, ImageLoadError) as exc:
            raise NotFound(f"the photo of reference {ref_id} is no longer readable at {path}") from exc
        image.thumbnail((self.settings.thumbnail_px, self.settings.thumbnail_px))
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=85)
        return buf.getvalue()

    # ----------------------------------------------------------------- writes
    def add_references(
        self,
        species: str,
        uploads: Sequence[Upload],
        *,
        common_name: str | None = None,
        venomous: bool | None = None,
    ) -> dict:
        """Store the photos as references of ``species`` (created if new); searchable when this returns."""
        if not " ".join(species.replace("_", " ").split()):
            raise ServiceError("species name is empty")
        emb = self.embed(uploads)
        with self._write_lock:
            known = self.gallery.known_sha256()
            self.uploads_dir.mkdir(parents=True, exist_ok=True)
            paths, digests, rows, duplicates, seen = [], [], [], [], set()
            for i, u in enumerate(uploads):
                if u.sha256 in known or u.sha256 in seen:
                    duplicates.append({"file": u.name, "id": known.get(u.sha256)})
                    continue
                seen.add(u.sha256)
                path = self.uploads_dir / f"{u.sha256}{_EXT.get(u.format, '.img')}"
                if not path.exists():
                    tmp = path.with_suffix(path.suffix + ".tmp")
                    tmp.write_bytes(u.data)
                    tmp.replace(path)
                paths.append(path)
                digests.append(u.sha256)
                rows.append(i)
            species, records, prior = new_species_references(
                species, self.gallery.species(), paths, dataset="api", common_name=common_name, venomous=venomous)
            ids = self.gallery.add(records, digests, emb[rows]) if records else []
        return {"species": species, "created": prior is None and bool(ids), "ids": ids, "added": len(ids),
                "duplicates": duplicates}

    def delete_reference(self, ref_id: int) -> None:
        """Delete one reference (its uploaded file stays on disk)."""
        with self._write_lock:
            if not self.gallery.delete([ref_id]):
                raise NotFound(f"no reference with id {ref_id}")
