"""Open a gallery with the encoder that built it (:func:`open_gallery`), ready to identify (:func:`open_identifier`);
the encoder a build into a folder uses (:func:`build_encoder`).

The one place a gallery folder and its encoder are put together; ``retrieval.workflows`` offers both.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from index.build_mark import build_status
from index.gallery import Gallery, check_gallery_encoder, gallery_encoder_fix, read_gallery_info
from index.layout import EncoderMismatchError, GalleryLayout, weights_only
from index.lease import is_s3
from index.store import MissingTableError, ReferenceStore, SpeciesSummary, source_file, storage_options
from retrieval.encoders import (
    Encoder,
    EncoderConfig,
    create_encoder_from_config,
    options_suffix,
    parse_spec,
    resolve_pool,
    spec_key,
)
from retrieval.identify import Identifier, file_marks
from retrieval.probe import LinearProbe, has_probe
from retrieval.probe_share import ProbeFollower, probe_follower
from retrieval.textprior import TextPriorScores, load_text_prior, warm_text_prior
from retrieval.vote import VoteConfig

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- what a public function's first arguments are
def folder_arg(value: object, func: str) -> str | Path:
    """``value`` where ``func`` takes a gallery's folder (a str or Path); TypeError saying what to pass otherwise
    (an open Gallery or Identifier: its folder), raised where the call starts, not deep inside."""
    if isinstance(value, (str, os.PathLike)):
        return value  # type: ignore[return-value]
    root = getattr(value, "root", None) or getattr(getattr(value, "gallery", None), "root", None)
    hint = f"its folder: {func}({str(root)!r})" if root is not None else "a folder, e.g. 'galleries/snakes'"
    kind = type(value).__name__
    raise TypeError(f"{func} takes the gallery's folder (a str or Path), not {'an' if kind[0] in 'AEIOU' else 'a'} "
                    f"{kind}: pass {hint}")


def identifier_arg(value: object, func: str) -> Identifier:
    """``value`` where ``func`` takes an :class:`Identifier`; TypeError saying how to make one from a folder or a
    Gallery otherwise. Other objects pass (duck typing)."""
    if isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{func} takes an Identifier, not a folder: open it once, "
                        f"ident = open_identifier({str(value)!r}), then {func}(ident, ...)")
    if isinstance(value, Gallery):
        raise TypeError(f"{func} takes an Identifier, not a Gallery: "
                        f"ident = open_identifier({str(value.root)!r}), then {func}(ident, ...)")
    if value is None:
        raise TypeError(f"{func} takes an Identifier: ident = open_identifier('GALLERY_DIR'), "
                        f"then {func}(ident, ...)")
    return value  # type: ignore[return-value]


def gallery_arg(value: object, func: str) -> Gallery:
    """``value`` where ``func`` takes an open :class:`Gallery`; TypeError saying how to get one otherwise (a folder:
    :func:`open_gallery`; an Identifier: its ``.gallery``)."""
    if isinstance(value, Gallery):
        return value
    if isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{func} takes an open Gallery, not a folder: "
                        f"gallery, encoder = open_gallery({str(value)!r}), then {func}(gallery, encoder, ...)")
    if isinstance(value, Identifier):
        raise TypeError(f"{func} takes a Gallery, not an Identifier: pass ident.gallery (and ident.encoder)")
    raise TypeError(f"{func} takes an open Gallery (gallery, encoder = open_gallery(DIR)), "
                    f"not a {type(value).__name__}")


def config_arg(value: object, func: str) -> EncoderConfig | None:
    """``value`` where ``func`` takes an encoder's settings (an :class:`EncoderConfig`, or None for the gallery's
    own); TypeError saying what to pass otherwise (a spec string: ``EncoderConfig(spec=...)``)."""
    if value is None or isinstance(value, EncoderConfig):
        return value
    if isinstance(value, str):
        raise TypeError(f"{func}'s encoder is an EncoderConfig, not a str: "
                        f"pass encoder=EncoderConfig(spec={value!r})")
    raise TypeError(f"{func}'s encoder is an EncoderConfig (e.g. EncoderConfig(spec='bioclip'), or None for the "
                    f"gallery's own), not a {type(value).__name__}")


def open_gallery(index_dir: str | Path, encoder: EncoderConfig | None = None, *,
                 refresh_s: float = 1.0, make_table: bool = False) -> tuple[Gallery, Encoder]:
    """Open a gallery with the encoder that built it (or refuse another one, saying which built it).

    ``encoder``: its unset spec, weights, pool and views are the gallery's own (:meth:`EncoderConfig.resolved`);
    others are refused by the fingerprint check. Its runtime (None: $SPECIESID_RUNTIME, else auto): the first time an
    exported model is made for this CPU, it is checked (and int8-calibrated) on the gallery's own photos.
    ``refresh_s``: the gallery's searches see other processes' writes at most this many seconds late.
    ``make_table``: a writer's open (``references add``), which makes a store's table where none was ever committed
    (:meth:`Gallery.open`).
    """
    index_dir, encoder = folder_arg(index_dir, "open_gallery"), config_arg(encoder, "open_gallery")
    info = read_gallery_info(index_dir)
    config = (encoder or EncoderConfig()).resolved(info["encoder"])
    check_encoder_choice(index_dir, info, config)  # before any loading; the fingerprint check stays the last word
    # the gallery alone knows where its store is (S3 or here)
    gallery = Gallery.open(index_dir, refresh_s=refresh_s, make_table=make_table)
    enc = create_encoder_from_config(config, photos=lambda: GalleryPhotos(gallery))  # listed when an export needs it
    check_gallery_encoder(index_dir, gallery.info, enc.fingerprint)
    return gallery, enc


class GalleryPhotos(Sequence[Path | bytes]):
    """The photos of a gallery's searchable references, what an exported encoder is checked and int8-calibrated on:
    a file by its path, and an upload kept in an S3 store (``<store>/_speciesid/uploads/``) by its bytes, read
    through the gallery's store (:meth:`~index.gallery.Gallery.read_photo`) when that item is taken: only the few
    sampled are read. An upload that cannot be read raises OSError (a StoreObjectError) as a file's read would."""

    def __init__(self, gallery: Gallery) -> None:
        self._gallery = gallery
        self._sources = [str(t) for t in gallery.store.metadata(include_excluded=False)["source_path"]]

    def __len__(self) -> int:
        return len(self._sources)

    def __getitem__(self, i: int | slice) -> Path | bytes | list[Path | bytes]:  # type: ignore[override]
        """The photo at ``i``: a path, or an S3-kept upload's bytes."""
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        source = self._sources[i]
        return self._gallery.read_photo(source) if is_s3(source) else source_file(source)

    def source(self, i: int) -> str:
        """The photo at ``i`` as the gallery's store records it (its path or S3 URI), read nowhere: what a log names."""
        return self._sources[i]


def build_encoder(index_dir: str | Path, encoder: EncoderConfig | None = None) -> EncoderConfig:
    """The encoder a build into ``index_dir`` uses: ``encoder`` resolved (:meth:`EncoderConfig.resolved`) with the
    gallery ``index_dir`` holds (as every other command opens a gallery), else with a new gallery's defaults
    (bioclip, model pooling, one view). Nothing is loaded here; ``build_gallery`` refuses one the gallery would refuse
    before loading it (:func:`check_encoder_choice`)."""
    built = read_gallery_info(index_dir)["encoder"] if GalleryLayout(Path(index_dir)).info.is_file() else None
    return (encoder or EncoderConfig()).resolved(built)


def check_encoder_choice(index_dir: str | Path, info: dict, config: EncoderConfig) -> None:
    """Refuse, before anything is loaded or downloaded, an encoder the gallery of ``info`` (its ``gallery.json``)
    would refuse by its fingerprint, with the message the fingerprint check gives (EncoderMismatchError).
    ``config``'s unset options are the gallery's (:meth:`EncoderConfig.resolved` with its record, as callers do).

    Refused: other pooling or views; a named encoder (an alias, a hub or timm model) other than the one that built
    the gallery while that one is at hand here; the same spec with or without a ``--weights`` file where the gallery
    was built the other way. Two folders or two weights files may hold the same weights: those are left to the
    fingerprint check after loading (nothing is downloaded for them)."""
    built = info["encoder"]
    config = config.resolved(built)
    source, built_source = spec_key(str(config.spec)), spec_key(str(built["spec"]))
    built_weights = built.get("weights")
    at_hand = ((built_source[0] == "named" or Path(built_source[1]).exists())
               and (not built_weights or Path(str(built_weights)).exists()))
    if (source == built_source and bool(config.weights) != bool(built_weights)) or (
            source != built_source and source[0] == "named" and at_hand):
        given = config.spec + (f" with weights {config.weights}" if config.weights else "")
        raise EncoderMismatchError(
            f"gallery {index_dir} was built with encoder {built['spec']!r}"
            + (f" with weights {built_weights}" if built_weights else "")
            + f", not with the encoder given ({given}); {gallery_encoder_fix(info)}")
    pool = resolve_pool(config.pool, parse_spec(config.spec)) if config.pool == "auto" else config.pool
    own = EncoderConfig().resolved(built)
    if (pool, config.views) != (own.pool, own.views):
        recorded = str(built["fingerprint"])
        size = re.search(r"\+size=(\d+)", recorded)
        same_weights = f"{recorded.rsplit('#', 1)[0]}#{weights_only(recorded)}"
        check_gallery_encoder(index_dir, info, same_weights + options_suffix(pool, config.views,
                                                                              int(size[1]) if size else None))


def _store_alone(index_dir: str | Path, info: dict) -> ReferenceStore:
    """The store of the gallery of ``info`` (its ``gallery.json``), opened alone (no vector index, no encoder);
    MissingTableError when it holds no table yet."""
    where = info.get("store") or {}
    return ReferenceStore(GalleryLayout(Path(index_dir)).store_location(info), int(info["dim"]), refresh_s=None,
                          options=storage_options(where.get("options")) if where.get("uri") else None, create=False)


def holds_no_references(index_dir: str | Path, info: dict) -> bool:
    """Whether the gallery of ``info`` (its ``gallery.json``) holds no reference at all, excluded ones included: its
    store has no table yet, or an empty one. False when that cannot be told (a store that cannot be read)."""
    try:
        return _store_alone(index_dir, info).count(include_excluded=True) == 0
    except MissingTableError:
        return True
    except Exception:  # noqa: BLE001 - only to word an error better: unknown is "not empty"
        logger.debug("could not count the references of %s", index_dir, exc_info=True)
        return False


def stored_species(index_dir: str | Path) -> list[SpeciesSummary] | None:
    """The species of the gallery at ``index_dir`` with their counts, read from its store alone (no vector index, no
    encoder loaded); None when the store cannot be read here, or holds no table yet (opening the gallery says why)."""
    info = read_gallery_info(index_dir)
    try:
        return _store_alone(index_dir, info).species()
    except Exception:  # noqa: BLE001 - a check ahead of the open: the open itself words what is wrong
        logger.debug("could not read the species of %s", index_dir, exc_info=True)
        return None


def no_references_error(gallery: Gallery, shown: str | Path | None = None) -> str:
    """Why ``gallery`` (which holds no searchable reference) holds none, and what to do, in one line: a build or add
    into it that did not finish (run it again: :func:`index.build_mark.build_status`'s note), references all
    excluded by ``clean --apply`` (``clean --restore``), all deleted, or none added yet. ``shown``: the gallery as
    the user named it (default its folder)."""
    why = []
    try:
        excluded = gallery.store.count(include_excluded=True) - gallery.store.count()
    except Exception:  # noqa: BLE001 - only to word an error better: the store's own error comes at its next read
        logger.debug("could not count the excluded references of %s", gallery.root, exc_info=True)
        excluded = 0
    if (status := build_status(gallery.root, references=len(gallery) + excluded))["state"] != "complete":
        why.append(status["note"])
    if excluded:
        why.append(f"{'its' if excluded > 1 else 'the'} {excluded} reference{'s are all' if excluded > 1 else ' is'} "
                   "excluded by 'speciesid clean --apply': 'speciesid clean --restore' brings them back")
    if not why:
        why.append(("all were deleted" if gallery.ids_given() else "none was added")  # ids.json: ever given
                   + ": add photos with 'speciesid index build' or 'speciesid references add'")
    return f"gallery {gallery.root if shown is None else shown} has no searchable references: {'; '.join(why)}"


@contextlib.contextmanager
def empty_gallery_hint(index_dir: str | Path) -> Iterator[None]:
    """A build's EncoderMismatchError on a gallery that holds no reference (a first build interrupted, or one
    started with the wrong encoder) says so and what to do: delete it, or choose another folder."""
    try:
        yield
    except EncoderMismatchError as exc:
        info = read_gallery_info(index_dir)
        if not holds_no_references(index_dir, info):
            raise
        message, fix = str(exc), gallery_encoder_fix(info)
        if message.endswith(fix):  # "use --encoder X or build a new index in another directory": not the way here
            message = message[: -len(fix)].rstrip("; ")
        raise EncoderMismatchError(f"{message}; it holds no references: delete {index_dir} (or choose another "
                                   "--index) to start over with this encoder") from exc


def open_identifier(
    index_dir: str | Path,
    encoder: EncoderConfig | None = None,
    *,
    vote: VoteConfig | None = None,
    use_probe: bool = True,
    refresh_s: float = 1.0,
    follow_probe: bool = False,
) -> Identifier:
    """Open a gallery and its encoder (:func:`open_gallery`; plus its probe and text prior when present), ready to
    identify.

    ``follow_probe``: load the probe and text prior again when ``speciesid probe train`` / ``probe import`` (another
    process) rewrites them, looked at most every ``refresh_s`` seconds (a server; a command keeps what it opened).

    A gallery whose store is on S3 shares its probe through the store (:mod:`retrieval.probe_share`): a folder
    without a probe takes the store's at open, and a process following the probe takes a newer store copy into
    its folder within ``refresh_s`` (one HEAD per look, on a thread of its own: the copy taken is loaded at the
    next look, ``refresh_s`` later at most; a text prior taken with it has its class embeddings computed on that
    thread, before the files change, so no answer waits on them)."""
    index_dir, encoder = folder_arg(index_dir, "open_identifier"), config_arg(encoder, "open_identifier")
    gallery, enc = open_gallery(index_dir, encoder, refresh_s=refresh_s)
    follower = probe_follower(gallery) if use_probe else None
    if follower is not None:
        follower.warm = functools.partial(warm_text_prior, index_dir, enc)  # a taken prior: embedded on its thread
        follower.at_open()

    def load() -> tuple[LinearProbe | None, TextPriorScores | None]:
        probe = None
        if use_probe and has_probe(index_dir):
            probe = LinearProbe.load(index_dir, expected_fingerprint=enc.fingerprint)
        if not use_probe:
            return probe, None
        return probe, load_text_prior(index_dir, enc, expected_sha256=probe.text_prior_sha256 if probe else None)

    layout = GalleryLayout(Path(index_dir))
    files = [layout.probe_meta, layout.probe_weights, layout.text_prior]
    marks = file_marks(files)  # before loading: a write meanwhile is seen at the first look
    probe, text = load()
    ident = Identifier(enc, gallery, vote, probe=probe, text_prior=text)
    ident.probe_follower = follower
    if follow_probe and use_probe:
        ident.follow_probe(files, load, refresh_s, marks=marks, sync=_unless_stale(gallery, follower)
                           if follower else None, quiet=follower.files_quiet if follower else None)
    return ident


def _unless_stale(gallery: Gallery, follower: ProbeFollower) -> Callable[[bool], None]:
    """The probe follower's look at the store (a HEAD), skipped while the gallery's reads are stale (its store failing
    or not answering): no identify waits on the HEAD's timeouts during an outage; the probe loaded stays. A look
    before an answer runs on a thread of its own (:meth:`ProbeFollower.look_soon`: no answer waits on the HEAD); a
    forced one (``force``) waits for that thread's look to end, then runs here, so its take is loaded at once."""
    def sync(force: bool) -> None:
        if gallery.reading_stale:
            return
        if force:
            follower.wait_for_look()  # not two looks at once: this one would find the folder's lock held
            follower.check()
        else:
            follower.look_soon()
    return sync
