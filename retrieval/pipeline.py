"""Photos -> embeddings at speed: parallel decode + preprocess, batched inference, streamed into a gallery.

Decoding and resizing run in a small thread pool (PIL releases the GIL while it decodes) while the main
thread runs the model, so the model never waits for JPEG decoding; :class:`PipelineStats` measures whether it
does (the time the model thread spends blocked on the decode queue, against the time it spends encoding). A bad photo is recorded and skipped,
never fatal; a photo whose bytes are already stored (sha256) is a duplicate and is not embedded again.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from index.gallery import Gallery, check_gallery_encoder
from index.lease import LeaseStoreError
from index.objects import StoreObjectError
from index.records import ReferenceRecord
from index.sources import SourceRefused, read_source
from index.text import printable
from retrieval.encoders import Encoder, stack_views
from retrieval.images import (
    BLANK_PHOTO,
    DEFAULT_MAX_PIXELS,
    MAX_PIXELS_ENV,
    MIN_REFERENCE_SIDE,
    OVER_PIXEL_LIMIT,
    TOO_ELONGATED,
    ImageLoadError,
    PixelLimitError,
    blank_reason,
    header_facts,
    max_pixels_setting,
    model_image,
    photo_note,
    photo_size,
    sha256_bytes,
)
from retrieval.metric import refuse_rows, unit_rows

logger = logging.getLogger(__name__)
#: A photo's bytes from its path (a file, a ``SHARD#MEMBER``; a gallery's ``read_photo`` also its store's objects).
Reader = Callable[[str | Path], bytes]
#: Why a photo whose embedding is NaN or inf is skipped (never committed: a gallery with such a row cannot open).
NON_FINITE = "the encoder gave a non-finite embedding (NaN or inf)"
#: The ``Prepared.tensor`` of a photo whose embedding its caller gave: checked, not decoded for the encoder.
GIVEN: tuple = ()


@dataclass
class Prepared:
    """One photo after the worker has read, hashed, decoded and preprocessed it."""

    position: int  # index in the input sequence
    sha256: str | None = None  # digest of the file bytes (None when unreadable)
    tensor: np.ndarray | tuple | None = None  # preprocessed float32 CHW array, or its views (None when skipped)
    error: str | None = None  # why it was skipped
    duplicate_of: int | None = None  # stored reference id with the same bytes
    note: str | None = None  # what an answer is to say of the photo as read (retrieval.images.photo_note)


@dataclass
class PipelineStats:
    """Where the model thread's time went: blocked on decoding, or encoding."""

    wait_s: float = 0.0  # blocked on the decode queue (the next photo not decoded yet)
    encode_s: float = 0.0  # in encoder.encode_batch
    batches: int = 0

    def wait_share(self, wall_s: float) -> float:
        """Share of ``wall_s`` the model thread spent waiting for decoded photos."""
        return self.wait_s / wall_s if wall_s > 0 else 0.0


#: The reason of a readable photo skipped for its size (what the report counts as "too small", not "unreadable").
TOO_SMALL = "is too small for a reference photo"
#: What a skipped photo counts as in reports (:func:`skip_kind`), by words of its reason: photos read, but refused
#: for their size, shape or pixel count; any other reason (empty, corrupt, not a photo, missing) is "unreadable".
SKIP_KINDS: tuple[tuple[str, str], ...] = (
    ("too small", TOO_SMALL), ("too elongated", TOO_ELONGATED), ("over the pixel limit", OVER_PIXEL_LIMIT),
    ("blank", BLANK_PHOTO),
)
#: The second field of a duplicate whose bytes the gallery held already (before this run, or stored meanwhile by
#: another writer): the id it repeats; a repeat within the run names the path of its first copy instead.
_STORED_ID = re.compile(r"id \d+")


def skip_kind(reason: str) -> str:
    """What the reason a photo was skipped counts as: "too small", "too elongated", "over the pixel limit", "blank"
    (read, but refused: :data:`SKIP_KINDS`) or "unreadable"."""
    return next((kind for kind, words in SKIP_KINDS if words in reason), "unreadable")


def skip_counts(reasons: Iterable[str]) -> dict[str, int]:
    """How many photos were skipped for each kind of reason (:func:`skip_kind`): "unreadable" first, always, then
    the kinds met, in :data:`SKIP_KINDS`' order."""
    kinds = [skip_kind(r) for r in reasons]
    return {"unreadable": kinds.count("unreadable"),
            **{kind: kinds.count(kind) for kind, _ in SKIP_KINDS if kind in kinds}}


@dataclass
class BuildReport:
    """What an add/build did."""

    added: int = 0  # photos stored
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of photos not stored: unreadable,
    #                                                               or read but refused (skip_kind)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (path, "id N" or path it repeats)
    duplicate_ids: list[int | None] = field(default_factory=list)  # per duplicate: the stored id it repeats
    duplicate_stored: list[bool] = field(default_factory=list)  # per duplicate: True when the gallery held its
    #                                                             bytes already, False for a repeat within the run
    seconds: float = 0.0  # wall time
    waited_s: float = 0.0  # of it, waiting for other writers of the gallery (their lock; on S3 the store's lease)
    lease_s: float = 0.0  # of it, taking the store's write lease (on S3): its own round trips, counted as work
    ids: list[int] = field(default_factory=list)  # ids of the stored photos, in input order
    notes: list[tuple[str, str]] = field(default_factory=list)  # (path, note) of stored photos read in part: an
    #                                  animation's first frame, a TIFF's first page (retrieval.images.photo_note)
    stats: PipelineStats = field(default_factory=PipelineStats)  # model-thread time: waiting vs encoding

    @property
    def images_per_second(self) -> float:
        """Photos handled (added + duplicates + skipped) per second of wall time, less the time spent waiting for
        other writers (:attr:`waited_s`)."""
        n = self.added + len(self.skipped) + len(self.duplicates)
        working = self.seconds - self.waited_s
        return n / working if working > 0 else 0.0

    def add_duplicate(self, path: str, *, stored_id: int | None = None, first: str | None = None) -> None:
        """Record a duplicate: of the reference ``stored_id`` the gallery held already, or (``first``: the path of
        its first copy in this run) a repeat within the run, its id filled in once that copy is stored."""
        self.duplicates.append((path, f"id {stored_id}" if first is None else first))
        self.duplicate_ids.append(stored_id)
        self.duplicate_stored.append(first is None)

    def _stored(self) -> list[bool]:
        """Per duplicate, whether the gallery held its bytes already (:attr:`duplicate_stored`; a duplicate recorded
        without it, in a report made by hand, is told by its second field: "id N")."""
        kinds = self.duplicate_stored[: len(self.duplicates)]
        return kinds + [_STORED_ID.fullmatch(other) is not None for _, other in self.duplicates[len(kinds):]]

    @property
    def already_stored(self) -> list[tuple[str, str]]:
        """The :attr:`duplicates` whose bytes the gallery held already (a re-run's photos): ``(path, "id N")``."""
        return [d for d, stored in zip(self.duplicates, self._stored(), strict=True) if stored]

    @property
    def repeats(self) -> list[tuple[str, str]]:
        """The :attr:`duplicates` that repeat an earlier photo of this run: ``(path, the path of its first copy)``."""
        return [d for d, stored in zip(self.duplicates, self._stored(), strict=True) if not stored]

    def summary(self, *, list_stored: bool = True, said_apart: Collection[str] = ()) -> str:
        """One human-readable paragraph. ``list_stored`` False: the photos already in the gallery are counted, not
        listed (a resumed build's, which are expected). ``said_apart``: paths of duplicates (already in the gallery,
        or repeats within the run) that the caller lists itself, with a more specific reason (a reference of another
        species, a label conflict): counted, not listed here."""
        waited = (f"; the model waited for decoding {self.stats.wait_share(self.seconds):.0%} of the time"
                  if self.stats.batches else "")  # measured by the local pipeline's model thread only
        counts = skip_counts(reason for _, reason in self.skipped)
        stored, repeats = self.already_stored, self.repeats
        parts = [f"added {self.added}", f"skipped {counts.pop('unreadable')} unreadable",
                 *(f"{n} {kind}" for kind, n in counts.items())]
        if repeats or not stored:
            parts.append(f"{len(repeats)} duplicates" + (" within this run" if repeats else ""))
        if stored:
            parts.append(f"{len(stored)} already in the gallery")
        lines = [
            ", ".join(parts)
            + f", in {self.seconds:.1f} s ({self.images_per_second:.1f} images/s{waited}"
            + (f"; {self.lease_s:.1f} s of it taking the store's write lease" if self.lease_s >= 0.1 else "")
            + (f"; {self.waited_s:.1f} s waiting for another writer, not counted" if self.waited_s >= 0.1 else "")
            + ")"
        ]
        for path, reason in self.skipped[:20]:
            lines.append(f"  skipped {printable(path)}: {printable(reason)}")
        if len(self.skipped) > 20:
            lines.append(f"  ... and {len(self.skipped) - 20} more skipped")
        shown = [(path, other) for path, other in repeats if path not in said_apart]
        for path, other in shown[:10]:
            how = "a link to" if _link_to(path, other) else "same bytes as"
            lines.append(f"  duplicate {printable(path)} ({how} {printable(other)})")
        if len(shown) > 10:
            lines.append(f"  ... and {len(shown) - 10} more duplicates within this run")
        listed = [(path, other) for path, other in stored if path not in said_apart] if list_stored else []
        for path, other in listed[:10]:
            lines.append(f"  already in the gallery: {printable(path)} (same bytes as reference "
                         f"{other.removeprefix('id ')})")
        if len(listed) > 10:
            lines.append(f"  ... and {len(listed) - 10} more already in the gallery")
        return "\n".join(lines)

    def note_lines(self, at_most: int = 10) -> list[str]:
        """The :attr:`notes` of the photos stored, one line each (``path: note``) for the first ``at_most``, one more
        counting the rest."""
        lines = [f"{printable(path)}: {note}" for path, note in self.notes[:at_most]]
        if len(self.notes) > at_most:
            lines.append(f"... and {len(self.notes) - at_most} more photos of several frames or pages, each read "
                         "from its first")
        return lines


def _link_to(path: str, other: str) -> bool:
    """Whether ``path`` is a symbolic link to the file ``other`` (a repeat within a run said as such)."""
    try:
        return os.path.islink(path) and os.path.realpath(path) == os.path.realpath(other)
    except (OSError, ValueError):
        return False


def default_workers() -> int:
    """Decode threads: half the cores (the model uses the rest), at least 1, at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class ModelInput(NamedTuple):
    """A photo as the encoder sees it (:func:`model_input`)."""

    views: np.ndarray | tuple  # the encoder's input of every view
    size: tuple[int, int]  # the photo's (width, height) as stored
    note: str | None  # what an answer is to say of the photo as read (retrieval.images.photo_note), None when nothing
    blank: str | None = None  # why it cannot be a reference, when it is blank (retrieval.images.blank_reason)


def model_input(data: bytes, encoder: Encoder, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                name: str = "image", blank: bool = True) -> ModelInput:
    """A photo's bytes -> (the encoder's input of every view, the photo's (width, height) as stored, its note: an
    animated photo's, read from the header the decode opens; why it cannot be a reference when it is blank), decoded
    at reduced scale (``retrieval.images.model_image``): the one way every path (builds, the CLI, the server) turns
    a photo into what the encoder sees, so one photo gets one embedding. ``blank`` False: the blank test is not
    run (a query's; its ``blank`` is None). :class:`ImageLoadError` when it cannot be decoded."""
    image = model_image(data, int(getattr(encoder, "input_size", 224)), max_pixels=max_pixels, name=name)
    return ModelInput(encoder.preprocess_views(image), photo_size(image), photo_note(image),
                      blank_reason(image) if blank else None)


def read_error(exc: OSError) -> str:
    """What a photo that could not be read is said to be (every reader's words); one refused before it was read
    (:class:`index.sources.SourceRefused`: not a regular file, too large, not a photo) says why in its own words."""
    if isinstance(exc, SourceRefused):
        return exc.reason
    return f"cannot be read ({exc.strerror or exc})"


def prepare(
    position: int,
    source: str | Path | bytes,
    encoder: Encoder,
    known: dict[str, int] | None = None,
    max_pixels: int | None = None,
    min_side: int = 0,
    given: bool = False,
    read: Reader = read_source,
    blank_ok: bool = True,
) -> Prepared:
    """Read + hash + decode + preprocess one photo (runs in a worker thread).

    ``max_pixels``: the most pixels the photo may decode to (default :data:`~retrieval.images.MAX_PIXELS_ENV`'s,
    ``retrieval.images.max_pixels_setting``); over it, refused saying how small to save it, or the setting to raise.
    ``min_side``: photos whose short side is under this many pixels are refused (reference photos); ``blank_ok``
    False: so are blank ones (:func:`retrieval.images.blank_reason`).
    ``given``: the caller embedded the photo already (and checked it is not blank: the server's decode does): its
    size and note are read from its header (decoded only when the header cannot be read), and its tensor is
    :data:`GIVEN`. ``read``: a path's bytes (a gallery's :meth:`~index.gallery.Gallery.read_photo` reads its store's
    objects too).
    """
    name = f"image #{position}" if isinstance(source, bytes) else str(source)
    try:
        data = source if isinstance(source, bytes) else read(source)
    except OSError as exc:
        return Prepared(position, error=read_error(exc))
    digest = sha256_bytes(data)
    if known is not None and digest in known:
        return Prepared(position, sha256=digest, duplicate_of=known[digest])
    try:
        facts = header_facts(data) if given else None  # size as stored (photo_size's) and note: one header open
        if facts is not None:
            (size, note), tensor, blank = facts, GIVEN, None
        else:
            limit = max_pixels_setting() if max_pixels is None else max_pixels
            tensor, size, note, blank = model_input(data, encoder, max_pixels=limit, name=name, blank=not blank_ok)
        width, height = size
        if min(width, height) < min_side:  # the photo's size, not the reduced decode's
            return Prepared(position, sha256=digest, error=f"{width}x{height} pixels {TOO_SMALL} "
                            f"(at least {min_side} px on the short side)")
        if blank:  # set only where blank_ok is False (model_input's blank=)
            return Prepared(position, sha256=digest, error=blank)
    except PixelLimitError as exc:
        why = exc.advise("save", f"set {MAX_PIXELS_ENV}={{needed}} (or more) to read it as it is")
        return Prepared(position, sha256=digest, error=why.removeprefix(f"{name}: "))
    except ImageLoadError as exc:
        return Prepared(position, sha256=digest, error=str(exc).removeprefix(f"{name}: "))
    except Exception as exc:  # noqa: BLE001 - a transform failure must not abort a build
        return Prepared(position, sha256=digest, error=f"preprocessing failed ({exc})")
    return Prepared(position, sha256=digest, tensor=GIVEN if given else tensor, note=note)


def iter_prepared(
    sources: Sequence[str | Path | bytes],
    encoder: Encoder,
    *,
    known: dict[str, int] | None = None,
    workers: int | None = None,
    prefetch: int = 256,
    min_side: int = 0,
    stats: PipelineStats | None = None,
    given: bool = False,
    read: Reader = read_source,
    max_pixels: int | None = None,
    blank_ok: bool = True,
) -> Iterator[Prepared]:
    """Prepare photos in a thread pool, yielding in input order with a bounded look-ahead (``read``: a path's
    bytes, ``max_pixels``: the pixel limit of each photo, default the setting's, read once; ``blank_ok``:
    :func:`prepare`).

    ``stats.wait_s`` adds up the time the consumer spends blocked on a photo not yet prepared; ``given``: see
    :func:`prepare`. A consumer that stops early (Ctrl-C, an error, ``close()``) is not kept waiting for the photos
    being prepared: the look-ahead not started is cancelled, and the decoders at work finish their photo on their
    own (the interpreter's exit waits for them), so that a Ctrl-C reaches the caller at once."""
    workers = workers or default_workers()
    limit = max_pixels_setting() if max_pixels is None else max_pixels  # a bad setting: refused before any photo
    pending: deque[Future[Prepared]] = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="speciesid-decode")
    try:
        it = iter(enumerate(sources))
        for pos, src in it:
            pending.append(pool.submit(prepare, pos, src, encoder, known, limit, min_side=min_side, given=given,
                                       read=read, blank_ok=blank_ok))
            if len(pending) >= prefetch:
                break
        while pending:
            t0 = time.perf_counter()
            done = pending.popleft().result()
            if stats is not None:
                stats.wait_s += time.perf_counter() - t0
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(prepare, nxt[0], nxt[1], encoder, known, limit, min_side=min_side,
                                           given=given, read=read, blank_ok=blank_ok))
            yield done
    except BaseException:  # GeneratorExit, KeyboardInterrupt, an error: not joined (a second Ctrl-C would land here)
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def iter_embeddings(
    prepared: Iterable[Prepared],
    encoder: Encoder,
    *,
    before_encode: Callable[[list[Prepared]], None] | None = None,
    stats: PipelineStats | None = None,
) -> Iterator[tuple[list[Prepared], np.ndarray | None]]:
    """Group prepared photos into batches and embed them.

    Yields (items, embeddings) where embeddings has one row per item that has a tensor, in order;
    items without a tensor (skipped or duplicate) ride along so callers see every input exactly once.
    ``before_encode`` sees each batch first and may drop tensors (e.g. photos already stored).
    """

    def encode(items: list[Prepared]) -> np.ndarray | None:
        if before_encode is not None:
            before_encode(items)
        tensors = [i.tensor for i in items if i.tensor is not None]
        if not tensors:
            return None
        t0 = time.perf_counter()
        out = encoder.encode_batch(stack_views(tensors))
        if stats is not None:
            stats.encode_s += time.perf_counter() - t0
            stats.batches += 1
        return out

    items: list[Prepared] = []
    n_tensors = 0
    for item in prepared:
        items.append(item)
        n_tensors += item.tensor is not None
        if n_tensors >= encoder.batch_size:
            yield items, encode(items)
            items, n_tensors = [], 0
    if items:
        yield items, encode(items)


def given_embeddings(embeddings: np.ndarray, n: int, dim: int) -> np.ndarray:
    """Embeddings a caller gives for ``n`` photos of a gallery ``dim`` wide, as the gallery stores them: float32,
    each row scaled to unit length (:func:`retrieval.metric.unit_rows`: the search is an inner product, so a longer
    row would win every answer near it). ValueError when their shape is not ``(n, dim)``, or for a row that is all
    zeros, naming it (:func:`retrieval.metric.refuse_rows`); a non-finite row is kept as given, the pipeline's to
    skip, as the encoder's would be."""
    out = np.asarray(embeddings, dtype=np.float32)
    if out.shape != (n, dim):
        raise ValueError(f"{n} photos of a gallery {dim} wide need embeddings of shape ({n}, {dim}), not "
                         f"{out.shape}")
    finite = np.isfinite(out).all(axis=1)
    refuse_rows(finite & ~out.any(axis=1), out)
    out = out.copy()  # the caller's array is not changed
    out[finite] = unit_rows(out[finite])
    return out


def _given_embeddings(
    prepared: Iterable[Prepared], embeddings: np.ndarray, batch_size: int,
    before_encode: Callable[[list[Prepared]], None],
) -> Iterator[tuple[list[Prepared], np.ndarray]]:
    """:func:`iter_embeddings`'s batches for photos whose embeddings are given (row ``i`` for the photo at
    position ``i``): the rows of the photos ``before_encode`` leaves a tensor, in order."""
    def batch(items: list[Prepared]) -> tuple[list[Prepared], np.ndarray]:
        before_encode(items)
        return items, embeddings[[i.position for i in items if i.tensor is not None]]

    items: list[Prepared] = []
    for item in prepared:
        items.append(item)
        if len(items) >= batch_size:
            yield batch(items)
            items = []
    if items:
        yield batch(items)


@dataclass
class Embedded:
    """Photos run through :func:`embed_photos`."""

    embeddings: np.ndarray  # (N, dim) float32, zero rows where a photo failed
    sha256: list[str | None]  # digest of each photo's bytes (None when unreadable)
    errors: list[str | None]  # why a photo has no embedding (None when it has one)
    fresh: int = 0  # photos run through the encoder (the rest came from the cache, or failed)
    notes: list[str | None] = field(default_factory=list)  # per photo, what its answer is to say of how it was read
    # (an animated GIF: its first frame; ``Prepared.note``); empty when not kept


#: What a caller that gave one photo where a list is wanted is told (every function that takes photos takes a list).
ONE_PHOTO = 'pass a list of photos, even for one: ["photo.jpg"] (or [photo_bytes])'


def not_a_photo(item: object) -> str:
    """What to pass instead of ``item``, a value that is neither a path nor bytes (:func:`photo_list`)."""
    module = type(item).__module__
    if module.startswith("PIL."):
        return ("a PIL image: pass its file's path or bytes, or encode it (buf = io.BytesIO(); image.save(buf, "
                '"PNG"); buf.getvalue()); Identifier.identify_images([image]) identifies PIL images directly')
    if isinstance(item, np.ndarray):
        return ("a numpy array: pass the photo's file path or bytes; pixels (H x W x 3, uint8): "
                "Identifier.identify_images([array])")
    return f"a {type(item).__name__}: pass the photo's file path (str or Path) or its bytes"


def photo_list(photos: Iterable[str | Path | bytes] | Iterable[tuple[str, bytes]], *, what: str = "photos",
               uploads: bool = False) -> list:
    """``photos`` checked where a public function takes them, as a list (a generator is read once): each a path
    (str, Path) or a file's bytes, or, with ``uploads`` (:func:`retrieval.workflows.add_photos`), a path or a
    ``(name, bytes)`` upload. One path or one bytes given alone is refused (ValueError: :data:`ONE_PHOTO`), not read
    as a list of characters; anything else (a PIL image, a numpy array, None) is refused (TypeError) with what to
    pass instead. ``what``: the argument's name in the messages."""
    if isinstance(photos, (str, os.PathLike, bytes, bytearray, memoryview)):
        raise ValueError(f"{what} is a list of photos; got one {type(photos).__name__}: {ONE_PHOTO}")
    if isinstance(photos, tuple) and uploads and len(photos) == 2 and isinstance(photos[1], (bytes, bytearray)):
        raise ValueError(f"{what} is a list of uploads; got one (name, bytes) tuple: pass [(name, data)]")
    if not isinstance(photos, Iterable):
        raise TypeError(f"{what} is a list of photos; got {not_a_photo(photos)}")
    out: list = []
    for i, item in enumerate(photos):
        if uploads and isinstance(item, tuple):
            if len(item) != 2 or not isinstance(item[0], str) or not isinstance(item[1], (bytes, bytearray)):
                raise TypeError(f"{what}[{i}] is a tuple but not an upload: pass (name, bytes), e.g. "
                                '("photo.jpg", data)')
            item = (item[0], bytes(item[1]))
        else:
            item = one_photo(item, f"{what}[{i}] is")
            if uploads and isinstance(item, bytes):
                raise TypeError(f"{what}[{i}] is bytes: an upload is a (name, bytes) tuple: pass "
                                '[("photo.jpg", data)]')
        out.append(item)
    return out


def one_photo(item: object, said: str) -> str | os.PathLike | bytes:
    """One photo as a public function takes it: a path (str, Path) or its file's bytes (a bytearray or memoryview
    copied to bytes); anything else refused (TypeError: ``said`` and what to pass instead, :func:`not_a_photo`)."""
    if isinstance(item, (bytearray, memoryview)):
        return bytes(item)
    if not isinstance(item, (str, os.PathLike, bytes)):
        raise TypeError(f"{said} {not_a_photo(item)}")
    return item


def embed_photos(
    sources: Iterable[str | Path | bytes],
    encoder: Encoder,
    *,
    cache: tuple[Sequence[str], np.ndarray] | None = None,
    workers: int | None = None,
    progress: bool = False,
    desc: str = "embedding",
    read: Reader = read_source,
) -> Embedded:
    """Embed photos (paths or bytes); a photo whose sha256 is in ``cache`` (digests, embeddings) is not re-run.
    ``read``: a path's bytes (a gallery's stored sources: its ``read_photo``). ``sources`` is a list (or any
    iterable, read once) even for one photo (:func:`photo_list`: ValueError for one path or bytes alone)."""
    sources = photo_list(sources)
    known = {sha: i for i, sha in enumerate(cache[0])} if cache is not None else None
    out = Embedded(np.zeros((len(sources), encoder.dim), dtype=np.float32), [None] * len(sources),
                   [None] * len(sources), notes=[None] * len(sources))
    with tqdm(total=len(sources), desc=desc, unit="img", disable=not progress) as bar:
        prepared = iter_prepared(sources, encoder, known=known, workers=workers, read=read)
        for items, emb in iter_embeddings(prepared, encoder):
            row = 0
            for item in items:
                out.sha256[item.position] = item.sha256
                if item.duplicate_of is not None:
                    out.embeddings[item.position] = cache[1][item.duplicate_of]  # type: ignore[index]
                elif item.tensor is None:
                    out.errors[item.position] = item.error or "unreadable"
                else:
                    out.embeddings[item.position] = emb[row]
                    out.notes[item.position] = item.note
                    row += 1
                    out.fresh += 1
            bar.update(len(items))
    return out


def embed_sources(
    sources: Sequence[str | Path | bytes],
    encoder: Encoder,
    *,
    workers: int | None = None,
    progress: bool = False,
    desc: str = "embedding",
) -> tuple[np.ndarray, list[str | None]]:
    """Embed photos (paths or bytes). Returns (N, dim) float32 (zero rows where failed) and per-photo errors."""
    done = embed_photos(sources, encoder, workers=workers, progress=progress, desc=desc)
    return done.embeddings, done.errors


class ReferencesInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`add_references`, after the photos embedded before it were committed: ``report.added`` of
    them by this call (all that it committed; fewer when another writer held the gallery too long for that last
    commit, which a warning said). ``saved`` is False when a second Ctrl-C cut that last commit short: then at
    least ``report.added`` were committed. ``after``: the Ctrl-C came once every photo was handled, during that
    step (e.g. "finishing the index" of a build; :data:`LAST_COMMIT` when it came as the last rows were committed,
    and they were): all ``report.added`` were kept, and a re-run finishes it (an add has nothing left to add).
    ``notes``: what a caller would have shown beside the result about what was kept (e.g. a new species the
    gallery's probe does not know: :func:`retrieval.workflows.add_photos` fills them in, with ``species`` (the name
    the photos were stored under) and ``existed`` (the gallery held it before))."""

    def __init__(self, report: BuildReport, *, saved: bool = True, after: str | None = None) -> None:
        super().__init__(f"interrupted after {report.added} references were committed"
                         + (f", while {after}" if after else ""))
        self.report = report
        self.saved = saved
        self.after = after
        self.notes: list[str] = []
        self.species: str | None = None
        self.existed: bool | None = None


#: Seconds at most that the commit after a Ctrl-C waits for another writer of the gallery (its lock; on S3 the
#: store's lease) before it stops without committing: the user is waiting to get the prompt back.
INTERRUPT_WRITE_WAIT_S = 10.0

#: :attr:`ReferencesInterrupted.after` of a Ctrl-C that came once every photo was embedded, as the last rows were
#: committed (or the index saved), when that commit was then made: every photo of the call is in the gallery.
LAST_COMMIT = "committing the last photos"


def _photos(n: int) -> str:
    return f"{n} photo{'' if n == 1 else 's'}"


def _interrupt_text(added: int, embedded: int, last: bool) -> str:
    """What a Ctrl-C in :func:`add_references` does now, said at once: ``added`` rows committed before it,
    ``embedded`` to commit, ``last``: every photo of the call was handled (the last commit)."""
    if not embedded:
        return f"the {_photos(added)} embedded are committed; saving the index"
    if added:
        return f"{_photos(added)} committed; committing the {'last ' if last else ''}{embedded} embedded since"
    return f"committing the last {_photos(embedded)} embedded" if last else \
        f"committing the {_photos(embedded)} embedded so far"


def _commit_interrupted(gallery: Gallery, report: BuildReport, buf: list, flush: Callable[[], None],
                        settle: Callable[[], None], interrupt: KeyboardInterrupt,
                        generators: Sequence[Iterator], *, last: bool = False) -> None:
    """After the Ctrl-C ``interrupt`` in :func:`add_references`: say so at once, commit the rows embedded (``buf``,
    by ``flush``) and save the index, waiting :data:`INTERRUPT_WRITE_WAIT_S` at most for another writer, fill in
    the report (``settle``) and raise :class:`ReferencesInterrupted`. Any Ctrl-C from here on is a second one: it
    stops at once (``saved=False``). ``last``: the Ctrl-C came once every photo was handled (at the last commit):
    when that commit is made, every photo of the call is in the gallery (``after`` :data:`LAST_COMMIT`)."""
    try:
        if buf or report.added:  # else nothing to commit: the caller says so (nothing added)
            logger.warning("interrupted: %s (Ctrl-C again to stop now)",
                           _interrupt_text(report.added, len(buf), last))
        for generator in generators:
            generator.close()  # the decoders drop the photos they have not started, and are not waited for
        if buf or report.added:  # else nothing to commit, no index to save
            wait = INTERRUPT_WRITE_WAIT_S if gallery.write_wait_s is None else min(gallery.write_wait_s,
                                                                                   INTERRUPT_WRITE_WAIT_S)
            try:
                with gallery.writing(wait=wait):  # the writes nested in it do not wait again
                    flush()
                    gallery.save_index()  # as a call that ends does (else the next open syncs it by difference)
            except TimeoutError as exc:  # another writer holds the gallery: the user is not kept waiting for it
                logger.warning("not committed: the %s embedded since the last commit are not in the gallery, whose "
                               "writes waited %.0f s for another writer (%s)", _photos(len(buf)), wait, exc)
                last = False  # not every photo is in
    except KeyboardInterrupt:  # a second Ctrl-C: stop now
        settle()
        raise ReferencesInterrupted(report, saved=False) from interrupt
    settle()
    raise ReferencesInterrupted(report, after=LAST_COMMIT if last else None) from interrupt


def _store_failures_raise(read: Reader) -> Reader:
    """``read``, with a failure of the gallery's own store (StoreObjectError, an OSError that :func:`prepare` would
    count as an unreadable photo) raised as a LeaseStoreError instead, which fails the add."""

    def reader(source: str | Path) -> bytes:
        try:
            return read(source)
        except StoreObjectError as exc:
            name = str(source).rsplit("/", 1)[-1]  # the object's name: an answer names no bucket
            stopped = (f"the photo {name} could not be read from the gallery's store, so this add stopped (photos "
                       "committed before it stay stored)")
            error = LeaseStoreError(f"{stopped}; add it again: {exc}", transient=exc.transient)
            error.public = stopped  # the API's answer: the store's error (its object, its bucket) only in its log
            raise error from exc

    return reader


def add_references(
    gallery: Gallery,
    encoder: Encoder,
    records: Sequence[ReferenceRecord],
    *,
    workers: int | None = None,
    chunk: int = 1024,
    progress: bool = True,
    desc: str = "adding references",
    on_progress: Callable[[int, int], None] | None = None,
    min_side: int = MIN_REFERENCE_SIDE,
    embeddings: np.ndarray | None = None,
    read: Reader | None = None,
    before_commit: Callable[[], None] | None = None,
) -> BuildReport:
    """Embed reference photos and store them in the gallery (searchable when this returns).

    Unreadable photos, and readable ones refused as references (too small, blank: :func:`prepare`), are skipped and
    reported; the notes of photos stored from their first frame or page are in ``report.notes``; photos whose bytes
    are already stored (looked up per batch, before embedding) or repeat an earlier photo of this call are reported
    as duplicates and stored once.
    Rows are committed every ``chunk`` photos; the gallery re-checks the digests under its write lock, so
    two processes adding the same photo at once store it once. On Ctrl-C the photos embedded so far are committed
    (one commit, said at once in a warning; a second Ctrl-C cuts it short, and it is not made when another writer
    holds the gallery for :data:`INTERRUPT_WRITE_WAIT_S`) and :class:`ReferencesInterrupted` says how many this
    call kept.

    ``embeddings``: the photos' embeddings, one row per record in order, made by ``encoder`` from the same bytes
    (e.g. a server that embeds before it takes the write lock); the photos are then read for their digest, size
    and note only, not decoded (nor checked for blank: the caller's decode does it), and the rows stored as the
    encoder's would be: scaled to unit length (a row of zeros refused, a non-finite row skipped:
    :func:`given_embeddings`).

    ``read``: a record path's bytes (default the gallery's :meth:`~index.gallery.Gallery.read_photo`; the API serves
    the uploads it holds in memory). A photo that the gallery's own store could not serve (a StoreObjectError:
    throttling, the network, a permission) fails the add with a :class:`index.lease.LeaseStoreError` saying so, not
    skipped as unreadable: the photo is there, the store was not. Rows committed before it stay.

    ``before_commit``: called under the write lock before each commit of rows (:meth:`index.gallery.Gallery.
    add_unique`), to read the store as that commit finds it.
    """
    check_gallery_encoder(gallery.root, gallery.info, encoder.fingerprint)
    if embeddings is not None:
        embeddings = given_embeddings(embeddings, len(records), gallery.dim)
    report = BuildReport()
    start = time.perf_counter()
    waited_before, lease_before = gallery.write_waited_s, gallery.write_lease_s
    first_path: dict[str, str] = {}  # digest -> the first path of this call with those bytes
    stored_id: dict[str, int] = {}  # digest -> the id its first path of this call was stored under (or found at)
    repeats: list[tuple[int, str]] = []  # (position in report.duplicate_ids, digest) of repeats within this call
    buf: list[tuple[ReferenceRecord, str, np.ndarray]] = []
    cut: list[bool] = []  # a commit of ``buf`` was cut short by Ctrl-C: the rows it made are this call's

    def drop_stored(items: list[Prepared]) -> None:
        stored = gallery.store.find_sha256(i.sha256 for i in items if i.tensor is not None)
        for item in items:
            if item.tensor is not None and item.sha256 in stored:
                item.tensor, item.duplicate_of = None, stored[item.sha256]

    def flush() -> None:
        if not buf:
            return
        again = bool(cut)  # an earlier commit of these rows was cut short: it may have committed them
        cut.append(True)
        ids, dropped = gallery.add_unique([b[0] for b in buf], [b[1] for b in buf], np.concatenate([b[2] for b in buf]),
                                          save_index=False, before_commit=before_commit)
        batch = buf.copy()
        buf.clear()  # committed: a Ctrl-C from here on must not commit it again (its rows "already stored")
        cut.clear()
        report.added += len(ids)
        kept = iter(ids)
        for pos, (rec, digest, _) in enumerate(batch):
            if again and dropped.get(pos) is not None:  # committed by the commit the Ctrl-C cut short: this
                report.added += 1  # call's (another process storing the same bytes in that instant: counted here)
                report.ids.append(dropped[pos])
                stored_id[digest] = dropped[pos]
            elif pos in dropped:  # stored by another process since the batch was checked
                report.add_duplicate(str(rec.path), stored_id=dropped[pos])
                stored_id[digest] = dropped[pos]
            else:
                report.ids.append(next(kept))
                stored_id[digest] = report.ids[-1]

    def settle() -> None:  # the report's last figures, once the rows are committed
        for pos, digest in repeats:
            report.duplicate_ids[pos] = stored_id.get(digest)
        report.seconds = time.perf_counter() - start
        report.waited_s = min(gallery.write_waited_s - waited_before, report.seconds)
        report.lease_s = min(gallery.write_lease_s - lease_before, report.seconds - report.waited_s)

    done = 0
    prepared = iter_prepared([r.path for r in records], encoder, workers=workers, min_side=min_side,
                             stats=report.stats, given=embeddings is not None, blank_ok=False,
                             read=_store_failures_raise(read or gallery.read_photo))  # S3-kept uploads too
    batches = (iter_embeddings(prepared, encoder, before_encode=drop_stored, stats=report.stats)
               if embeddings is None else _given_embeddings(prepared, embeddings, encoder.batch_size, drop_stored))
    last = False  # every photo handled: the Ctrl-C came at the last commit
    with tqdm(total=len(records), desc=desc, unit="img", disable=not progress) as bar:
        try:
            for items, emb in batches:
                row = 0
                for item in items:
                    rec = records[item.position]
                    if item.duplicate_of is not None:
                        report.add_duplicate(str(rec.path), stored_id=item.duplicate_of)
                    elif item.error is not None:
                        report.skipped.append((str(rec.path), item.error))
                    elif item.sha256 in first_path:
                        report.add_duplicate(str(rec.path), first=first_path[item.sha256])  # its id: below
                        repeats.append((len(report.duplicate_ids) - 1, item.sha256))
                        row += 1
                    elif not np.isfinite(emb[row]).all():  # never committed: the gallery could not be opened again
                        report.skipped.append((str(rec.path), NON_FINITE))
                        row += 1
                    else:
                        first_path[item.sha256] = str(rec.path)
                        buf.append((rec, item.sha256, emb[row : row + 1]))
                        if item.note:  # an animation's first frame, a TIFF's first page: said with the add
                            report.notes.append((str(rec.path), item.note))
                        row += 1
                if len(buf) >= chunk:
                    flush()
                done += len(items)
                bar.update(len(items))
                if on_progress:
                    on_progress(done, len(records))
            last = True
            flush()  # the last commit (a call of under ``chunk`` photos: its only one), under the same Ctrl-C
            gallery.save_index()  # handling as the others: cut short, it is made again and counted
        except KeyboardInterrupt as interrupt:  # keep what was embedded: one commit (add_unique re-checks digests)
            bar.close()  # the bar's line ends before the messages
            _commit_interrupted(gallery, report, buf, flush, settle, interrupt, (batches, prepared), last=last)
    settle()
    logger.info("model thread: %.1f s encoding, %.1f s waiting for decoded photos (%.0f%% of %.1f s)",
                report.stats.encode_s, report.stats.wait_s, 100 * report.stats.wait_share(report.seconds),
                report.seconds)
    for path, reason in report.skipped:
        logger.info("skipped %s: %s", path, reason)  # the report says it to the caller
    return report
