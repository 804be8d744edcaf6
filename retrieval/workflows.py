"""The workflows the CLI and the HTTP API run, and nothing else: the one way each is put together.

- build a gallery (:func:`build_gallery`), open one with its encoder (:func:`open_gallery`,
  :func:`open_identifier`);
- identify photos, bytes or embeddings, one photo or one multi-photo observation, at species, genus or
  family rank, with a country prior (:func:`identify`);
- evaluate on a labelled set (:func:`evaluate_dataset`);
- add reference photos from paths or uploaded bytes, with one duplicate check (:func:`add_photos`);
- calibrate the blend: train the probe (:func:`train_gallery_probe`) or import a fine-tuned head
  (:func:`import_gallery_probe`), and bring back the probe either replaced (:func:`restore_gallery_probe`);
- clean a dataset or a gallery (:func:`clean`, :func:`restore_exclusions`).

The work itself lives in the modules named in each function; this module only wires them. Opening a gallery
(``retrieval.galleries``) and calibrating its blend (``retrieval.probe_flows``) have their own modules; their
functions are offered here with the rest.
"""

from __future__ import annotations

import datetime as dt
import difflib
import functools
import itertools
import logging
import operator
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

import numpy as np

from index import exclusions
from index.atomic import atomic_write
from index.build_mark import (
    adding,
    build_note,
    build_status,
    building,
    dataset_key,
    photos_digest,
    unfinished_ids,
)
from index.datasets import DatasetScan, iter_dataset, load_dataset, no_photos_error, require_records
from index.errors import first_line
from index.formats import WRITTEN_BY, jsonable
from index.gallery import Gallery, Neighbour, StoreOpenError, read_gallery_info
from index.geography import country_presence, resolve_country
from index.interrupts import held_interrupt
from index.layout import GalleryLayout
from index.lease import LeaseError, LeaseLostError, canonical_s3_uri
from index.locks import write_lock
from index.objects import (
    SWEEP_GRACE_S,
    StoredObject,
    StoreObjectError,
    SweepReport,
    spellings,
    unused_uploads,
    upload_uri,
    uploads_uri,
)
from index.objects import sweep_uploads as sweep_gallery_uploads
from index.photos import PHOTO_FORMATS, first_few
from index.status import folder_status, store_status
from index.store import CompactReport, FragmentStats, SpeciesSummary, source_file, source_text
from index.taxonomy import (
    CONFIRM_HARMLESS,
    SUGGESTION,
    check_harmless_flag,
    find_species,
    gallery_lookalikes,
    lookup_taxon,
    new_species_references,
    species_key,
    taxa_text,
    taxonomy_lookalikes,
    unrecorded_venom_note,
)
from index.vectors import VectorIndexConfig
from retrieval.advice import (
    VENOM_ADVICE_KEY,
    add_how,
    checklist_coverage,
    far_note,
    one_species_note,
    record_checklist,
    record_venom_advice,
    recorded_venomous,
    species_notes,
    venom_advice_hint,
    venom_advice_on,
    venom_applies,
)
from retrieval.clean import CleanInterrupted, CleanResult, clean_built_gallery, run_clean
from retrieval.distributed import RayOptions, check_ray_views
from retrieval.encoders import (
    DEFAULT_ENCODER,
    Encoder,
    EncoderConfig,
    create_encoder_from_config,
    portable,
)
from retrieval.findings import CleanConfig
from retrieval.galleries import (
    build_encoder,
    check_encoder_choice,
    config_arg,
    empty_gallery_hint,
    folder_arg,
    gallery_arg,
    identifier_arg,
    no_references_error,
    open_gallery,
    open_identifier,
    stored_species,
)
from retrieval.identify import (
    NEAR_COPY_COSINE,
    Identification,
    Identifier,
    Method,
    RankedResult,
    parse_method,
    ranked_results,
)
from retrieval.images import MIN_REFERENCE_SIDE, ImageLoadError, image_format, sha256_bytes
from retrieval.metric import query_rows, unit_queries
from retrieval.pipeline import (
    BuildReport,
    Reader,
    ReferencesInterrupted,
    add_references,
    embed_photos,
    given_embeddings,
    one_photo,
    photo_list,
    skip_counts,
)
from retrieval.probe import MIN_PROBE_PHOTOS, LinearProbe, distinct_count, has_probe
from retrieval.probe_flows import (
    ProbeResult,
    import_gallery_probe,
    probe_cannot_name,
    publish_gallery_probe,
    refresh_gallery_metric,
    restore_gallery_probe,
    train_gallery_probe,
    withdraw_gallery_probe,
)
from retrieval.probe_share import probe_status
from retrieval.protocol import (
    ADD_WRITER,
    API_WRITER,
    BUILD_WRITER,
    embedding_info,
    embedding_note,
    record_embedding,
)
from retrieval.textprior import text_prior_taxa
from retrieval.vote import Rank, is_count, parse_rank

__all__ = [
    "DEFAULT_ENCODER", "ENGINES", "AddResult", "Answer", "BuildResult", "CleanConfig", "CleanInterrupted",
    "CleanResult", "CompactResult", "EncoderConfig", "EvaluationRun", "Gallery", "Identification",
    "Identifier", "Method", "Neighbour", "ProbeResult", "Rank", "RankedResult", "ReferencesInterrupted",
    "SpeciesNotFound",
    "VectorIndexConfig", "add_photos", "build_encoder", "build_gallery", "clean",
    "check_evaluation_set", "compact_gallery", "delete_references", "embed_photos", "evaluate_dataset",
    "answer_notes", "gallery_info", "identify", "import_gallery_probe", "list_species", "open_gallery",
    "no_references_error", "open_identifier",
    "presence_for", "publish_gallery_probe", "restore_exclusions", "restore_gallery_probe", "search",
    "set_species_venomous", "set_venom_advice", "skip_counts",
    "train_gallery_probe", "unit_queries", "withdraw_gallery_probe",
]

logger = logging.getLogger(__name__)

#: Where a build embeds: this process, or a Ray cluster (the ``ray`` extra).
ENGINES = ("local", "ray")


# ----------------------------------------------------------------------------------------------- build
@dataclass
class BuildResult:
    """What ``build_gallery`` did."""

    gallery: Gallery  # the gallery, open
    scan: DatasetScan  # what the dataset loader found (with its warnings)
    report: BuildReport  # added / skipped / duplicates / timing
    clean: CleanResult | None = None  # the zero-shot filter's findings (build with clean=...)
    resumed: bool = False  # the last build into the gallery had not finished: this one took it up (index.build_mark)
    #: species none of whose photos was usable (unreadable, or too small, elongated, over the pixel limit), not
    #: held: each with how many of its photos were skipped for each kind of reason (``skip_counts``, 0s left out);
    #: None: not looked for (a second Ctrl-C as the build's result was read: ``interrupted_after``)
    unread_species: dict[str, dict[str, int]] | None = field(default_factory=dict)
    #: a Ctrl-C came once the build was done (every photo committed, the index finished, the cleaning made): it
    #: stopped nothing, and the result is whole
    interrupted_after: bool = False
    #: photos of the dataset whose bytes are stored under another species (a repeat of an earlier photo of this
    #: build, or a reference held before): one of the two labels is wrong (:func:`_label_conflicts`)
    label_conflicts: list[LabelConflict] = field(default_factory=list)
    #: species of the dataset none of whose photos is in the gallery because each was stored under another species
    conflict_species: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LabelConflict:
    """A photo of a build stored once, under another species than its own: the same bytes carry two labels."""

    photo: str  # the photo's path
    species: str  # its species in the dataset
    stored_as: str  # the path of its first copy in this build, or "reference N" (held before)
    stored_species: str  # the species it is stored under

    def line(self) -> str:
        """One line for people: both photos and both species, and what to do (a terminal's caller escapes it:
        :func:`index.text.printable`)."""
        return (f"{self.photo} ({self.species}) is the same file as {self.stored_as} "
                f"({self.stored_species}): stored once, as {self.stored_species}; one of the two labels is wrong "
                "(move or delete the wrong copy, then build again)")


def build_gallery(
    index_dir: str | Path,
    dataset: str,
    root: str | Path,
    *,
    metadata: str | Path | None = None,
    encoder: EncoderConfig | None = None,
    index_config: VectorIndexConfig | None = None,
    index_kind: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    clean: CleanConfig | None = None,
    engine: str = "local",
    ray: RayOptions | None = None,
    store: str | None = None,
    storage_options: dict[str, str] | None = None,
    new_store: bool = False,
    venom_advice: bool | None = None,
) -> BuildResult:
    """Scan a dataset, embed every photo and store it in the gallery at ``index_dir`` (created if new).

    Building into an existing gallery adds what is new (identical photos are stored once); ``encoder``'s unset
    options: the gallery's own, or a new gallery's defaults (bioclip; :func:`build_encoder`). With ``clean``,
    the zero-shot filter then excludes off-target references (report in the gallery's ``clean-report``).
    ``engine="ray"``: embed on a Ray cluster (``ray``: address, actors, ...; see
    :mod:`retrieval.distributed`), records streamed from the loader. ``store``: an object-store URI for a new
    gallery's table (``s3://bucket/path``; credentials from AWS_* or ``storage_options``). ``index_kind``: the
    index kind only (``index build --index-kind``): an existing gallery keeps its other index settings
    (``index_config`` replaces them all). ``new_store``: an existing gallery whose store lost its table gets a new,
    empty one (ids go on past the folder's: :meth:`Gallery.create`). ``venom_advice``: False records in
    ``gallery.json`` that its answers give no venom advice (``--no-venom-advice``: birds, plants), True that they
    do; None leaves what it records (a new gallery: on). False is refused (ValueError; on Ray, whose records
    stream, after its photos are stored) while the gallery or the dataset holds a species recorded medically
    important venomous, as ``index venom-advice off`` is (:func:`refuse_venom_advice_off`): the dataset's species
    before the model loads, the gallery's once it is opened (the weights loaded), before any photo is embedded.
    """
    index_dir, encoder = folder_arg(index_dir, "build_gallery"), config_arg(encoder, "build_gallery")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
    info = read_gallery_info(index_dir) if GalleryLayout(Path(index_dir)).info.is_file() else None
    if index_kind is not None:
        if index_config is not None:
            raise ValueError("give index_config or index_kind, not both")
        kept = VectorIndexConfig.from_json(info.get("index", {}), f'{GalleryLayout(Path(index_dir)).info} "index"') \
            if info is not None else VectorIndexConfig()
        index_config = replace(kept, kind=index_kind)  # the gallery's tuned nprobe, candidates... stay
    # unset options: the gallery's own (build_encoder); it records where the weights are, usable from anywhere
    encoder = portable((encoder or EncoderConfig()).resolved(info["encoder"] if info else None))
    if info is not None:  # another encoder is refused before it loads (or downloads)
        with empty_gallery_hint(index_dir):
            check_encoder_choice(index_dir, info, encoder)
    if engine == "ray":  # options Ray cannot build: refused before the model loads (or downloads)
        check_ray_views(encoder.views)
        if clean is not None:
            raise ValueError("--clean runs in one process: build with --engine ray, then run 'speciesid clean'")
        return _build_on_ray(index_dir, dataset, root, metadata=metadata, encoder=encoder,
                             index_config=index_config, ray=ray, store=store, storage_options=storage_options,
                             progress=progress, new_store=new_store, venom_advice=venom_advice)
    before = unfinished_ids(index_dir)  # what this build may take up: the builds cut short before its scan
    scan = load_dataset(dataset, root, metadata=metadata)
    for warning in scan.warnings:
        logger.warning("%s", warning)
    require_records(scan)
    if venom_advice is False:  # before the model loads: refused as 'index venom-advice off' is
        refuse_venom_advice_off(index_dir, [r.species for r in scan.records if r.venomous])
    config = encoder  # always set above (the gallery's own, or the default for a new one)
    enc = create_encoder_from_config(config, photos=[r.path for r in scan.records])
    with empty_gallery_hint(index_dir):  # the fingerprint check, once the weights are loaded
        gallery = Gallery.create(index_dir, enc.describe(), index_config=index_config, weights=config.weights,
                                 store=store, options=storage_options, new_store=new_store)
    record_checklist(gallery, dataset)  # a checklist's gallery says which of its species it cannot name
    if venom_advice is False:  # the species it holds already
        refuse_gallery_venom_advice_off(gallery)
    if venom_advice is not None:  # before the first row: a server never answers its photos otherwise
        record_venom_advice(gallery, venom_advice)
    key, photos = dataset_key(dataset, root, metadata), photos_digest(source_text(r.path) for r in scan.records)
    done = late = False  # the build's work is done; a Ctrl-C came after that
    try:
        # marked until it completes: readers say a partial gallery is one
        with building(gallery.root, key=key, photos=photos, before=before) as earlier:
            report = add_references(gallery, enc, scan.records, workers=workers, progress=progress, desc="building",
                                    before_commit=functools.partial(record_embedding, gallery, enc, BUILD_WRITER))
            step = "finishing the index"
            try:  # every photo is committed: a Ctrl-C now loses none, and the same command finishes the step
                gallery.finish_build()
                step = "cleaning the gallery"
                cleaned = clean_built_gallery(gallery, enc, scan, clean) if clean is not None else None
            except KeyboardInterrupt as interrupt:
                raise ReferencesInterrupted(report, after=step) from interrupt
            done = True
    except KeyboardInterrupt:  # as the mark went (held until it had gone): the build is done all the same
        if not done:
            raise
        late = True
    unread: dict[str, dict[str, int]] | None = None
    conflicts: tuple[list[LabelConflict], list[str]] = ([], [])
    species: list[SpeciesSummary] | None = None
    try:  # the build is done: its result is read whole (the gallery's species: a remote store's round trip, once)
        with held_interrupt("the build is done; reading its species for the summary", reraise=False) as held:
            species = gallery.species()
            unread = _species_unread(scan, report, species)
            conflicts = _label_conflicts(scan, report, gallery, species)
        late = late or held.came
    except KeyboardInterrupt:  # a second Ctrl-C: the build is done all the same, its summary goes without them
        late = True
    if not late and species is not None:
        warn_species(gallery, counts={s.species: s.count for s in species})
    return BuildResult(gallery=gallery, scan=scan, report=report, clean=cleaned, resumed=earlier is not None,
                       unread_species=unread, interrupted_after=late, label_conflicts=conflicts[0],
                       conflict_species=conflicts[1])


def _label_conflicts(scan: DatasetScan, report: BuildReport, gallery: Gallery,
                     species: Sequence[SpeciesSummary]) -> tuple[list[LabelConflict], list[str]]:
    """(the duplicates of a build ``report`` stored under another species than their own: label conflicts, the
    species of ``scan`` the gallery does not hold because each of their photos is one of them), species compared
    as the gallery joins names (:func:`index.taxonomy.species_key`); ``species``: the gallery's, read once."""
    label = {str(r.path): r.species for r in scan.records}
    stored = set(report.already_stored)
    held_ids = [i for d, i in zip(report.duplicates, report.duplicate_ids, strict=True)
                if d in stored and i is not None]
    owner = gallery.store.metadata(held_ids)["species"].to_dict() if held_ids else {}
    found = []
    for (path, other), i in zip(report.duplicates, report.duplicate_ids, strict=True):
        mine = label.get(path)
        if (path, other) in stored:
            theirs, where = owner.get(i), f"reference {i}"
        else:
            theirs, where = label.get(other), other
        if mine is not None and theirs is not None and species_key(mine) != species_key(theirs):
            found.append(LabelConflict(path, mine, where, theirs))
    held = {species_key(s.species) for s in species if s.count > 0}
    lost = sorted({c.species for c in found if species_key(c.species) not in held})
    return found, lost


def _species_counts(gallery: Gallery, what: str) -> dict[str, int] | None:
    """The gallery's photo count of each species, or None where they could not be read (logged at info: a note
    must not fail a write that is committed; ``what``: the notes they were read for)."""
    try:
        return {s.species: s.count for s in gallery.species()}
    except Exception as exc:  # noqa: BLE001 - the write is committed: its notes are a courtesy
        logger.info("the gallery's species were not read for %s: %s", what, exc)
        return None


def warn_species(gallery: Gallery, *, only_one: bool = False, counts: Mapping[str, int] | None = None) -> None:
    """Log a warning for each of the gallery's species notes (:func:`retrieval.advice.species_notes`: one species,
    or photo counts that differ a lot; ``only_one``: only when it holds one species), after a build or a delete. A
    note must not fail a write that is done: a failure to read the species is logged at info. ``counts``: the
    species' photo counts where the caller has read them (not read again)."""
    if counts is None and (counts := _species_counts(gallery, "its notes")) is None:
        return
    if only_one and sum(n > 0 for n in counts.values()) != 1:
        return
    for note in species_notes(counts):
        logger.warning("%s", note)


def _species_unread(scan: DatasetScan, report: BuildReport,
                    species: Sequence[SpeciesSummary]) -> dict[str, dict[str, int]]:
    """The species of ``scan`` none of whose photos could be used (every one skipped by the build ``report``:
    unreadable, or read but too small, too elongated, over the pixel limit) and that the gallery does not hold,
    sorted, each with its skipped photos' kinds of reason (:func:`retrieval.pipeline.skip_counts`, 0s left out):
    they are not in it, and only the skipped files' lines would say so; ``species``: the gallery's, read once."""
    skipped = dict(report.skipped)
    photos: dict[str, list[str]] = {}
    for r in scan.records:
        photos.setdefault(r.species, []).append(str(r.path))
    held = {species_key(s.species) for s in species}
    return {s: {kind: n for kind, n in skip_counts(skipped[p] for p in photos[s]).items() if n}
            for s in sorted(photos)
            if species_key(s) not in held and all(p in skipped for p in photos[s])}


def _build_on_ray(index_dir: str | Path, dataset: str, root: str | Path, *, metadata: str | Path | None,
                  encoder: EncoderConfig, index_config: VectorIndexConfig | None, ray: RayOptions | None,
                  store: str | None, storage_options: dict[str, str] | None, progress: bool = True,
                  new_store: bool = False, venom_advice: bool | None = None) -> BuildResult:
    """``build_gallery`` on Ray: records streamed to the cluster in chunks; the index built in Ray tasks.
    ``progress``: a bar moved at each committed chunk (with the time left for a dataset listed up front)."""
    from retrieval.distributed import plan_cluster, ray_add_references, ray_map, start_ray, stop_ray

    warnings: list[str] = []
    skipped: list[tuple[Path, str]] = []  # entries the listing could not read (broken links...), logged once
    before = unfinished_ids(index_dir)  # what this build may take up: the builds cut short before its listing
    records = iter_dataset(dataset, root, metadata=metadata, warnings=warnings, skipped=skipped)
    total = operator.length_hint(records) or None  # a listed dataset's size; 0 (unknown) for a streamed one
    first = next(records, None)  # before Ray starts and the gallery is made: an empty folder creates nothing
    if first is None:
        raise no_photos_error(dataset, root)
    records = itertools.chain([first], records)
    config = encoder  # build_gallery's: the gallery's own, or the default for a new one
    enc = create_encoder_from_config(replace(config, device="cpu"))  # the driver's copy: identity, transform
    options = ray or RayOptions()
    started = start_ray(options)
    try:
        plan_cluster(enc, options)  # what Ray cannot build is refused before a gallery is made
        with empty_gallery_hint(index_dir):
            gallery = Gallery.create(index_dir, enc.describe(), index_config=index_config, weights=config.weights,
                                     store=store, options=storage_options, new_store=new_store)
        # marked until it completes, as a local build is (its photos streamed: none listed up front)
        record_checklist(gallery, dataset)
        if venom_advice is False:  # the species held already; the streamed ones once they are stored (below)
            refuse_gallery_venom_advice_off(gallery)
        if venom_advice:
            record_venom_advice(gallery, venom_advice)
        with building(gallery.root, key=dataset_key(dataset, root, metadata), before=before) as earlier:
            report = ray_add_references(gallery, config, records, encoder=enc, options=options, progress=progress,
                                        total=total)
            gallery.finish_build(map_fn=ray_map)
    finally:
        if started:
            stop_ray()
    if venom_advice is False:  # its records streamed: known once stored (the photos stay, the record is not made)
        refuse_gallery_venom_advice_off(gallery)
        record_venom_advice(gallery, False)
    for warning in warnings:
        logger.warning("%s", warning)
    warn_species(gallery)
    scan = DatasetScan(name=dataset, root=Path(root), records=[], warnings=warnings, skipped=skipped)
    return BuildResult(gallery=gallery, scan=scan, report=report, resumed=earlier is not None)


# -------------------------------------------------------------------------------------------- identify
@dataclass
class Answer:
    """The answer for one photo, or for one observation (several photos of one animal)."""

    source: str  # the photo's path or upload name ("a, b, c" for an observation)
    error: str | None = None  # why there is no answer (unreadable photo)
    identification: Identification | None = None  # scores, evidence, unknown flag
    results: list[RankedResult] = field(default_factory=list)  # the best candidates at the asked rank
    notes: list[str] = field(default_factory=list)  # what to know of its photos as read (an animated GIF: its first
    # frame only, retrieval.images.photo_note), each naming its photo in an observation

    @property
    def unknown(self) -> bool:
        """True when ``results[0]`` is not the answer to trust: no candidate is supported strongly enough, the photo
        is unlike every reference (``identification.far``), or it was not read (``error``)."""
        return self.identification is None or self.identification.unknown

    def to_dict(self, *, neighbours: bool = True) -> dict[str, object]:
        """The answer as plain data for JSON (str, float, int, bool, None, lists, dicts): the fields of the HTTP API's
        identify answer (``api.schemas.IdentifyOut``, under its names) but ``encoder`` and ``images``, with
        ``source`` and ``error``; each result's ``neighbours`` (its evidence, ``path`` a str) unless ``neighbours``
        is False. ``notes``: the answer's own (a far photo's scores, a country that changed nothing, a photo as
        read, a near-copy), not the gallery's (:func:`answer_notes`). An answer with an ``error``: ``source``,
        ``error``, ``unknown`` (true) and empty ``notes`` and ``results``."""
        found = self.identification
        if found is None:
            return jsonable({"source": self.source, "error": self.error, "unknown": True, "notes": list(self.notes),
                             "results": []})
        return jsonable({
            "source": self.source,
            "error": self.error,
            "venom_advice": found.venom_advice.to_dict() if found.venom_advice is not None else None,
            "unknown": found.unknown,
            "far": found.far,
            "venom_applies": found.venom_applies,
            "venomous_score": found.venomous_score,
            "venom_unknown_score": found.venom_unknown_score,
            "country_applied": found.country_applied,
            "nearest_similarity": found.nearest,
            "near_copy": found.near_copy,
            "set_aside": found.set_aside,
            "notes": ([far_note()] if found.far else []) + ([note] if (note := found.country_note()) else [])
            + self.notes,
            "results": [r.to_dict(neighbours=neighbours) for r in self.results],
        })


def presence_for(country: str | None, ident: Identifier | None = None) -> dict[str, bool] | None:
    """species -> recorded in ``country`` (ISO code or name): the shipped snake table, and the countries of
    ``ident``'s gallery's own photos (:func:`index.geography.country_presence`); None without a country."""
    if not country:
        return None
    return country_presence(resolve_country(country), ident.recorded_countries() if ident is not None else None)


def photo_notes(names: Sequence[str], notes: Sequence[str | None]) -> list[str]:
    """What an observation's answer says of its photos as read (an animated GIF: its first frame), one line per
    photo with a note: ``name: note`` (the CLI and the API word them alike)."""
    return [f"{name}: {note}" for name, note in zip(names, notes, strict=True) if note]


def whole_at_least_1(value: object, name: str, what: str) -> None:
    """ValueError unless ``value`` is a whole number >= 1 (an int, not a bool): ``name`` is the argument, ``what``
    what it counts, both said in the message."""
    if not is_count(value):
        raise ValueError(f"{name} must be a whole number >= 1 ({what}), not {value!r}")


def identify(
    ident: Identifier,
    photos: Iterable[str | Path | bytes] | None = None,
    *,
    embeddings: np.ndarray | None = None,
    names: Sequence[str] | None = None,
    observation: bool = False,
    top: int = 5,
    method: Method | str = Method.BLEND,
    rank: Rank | str = Rank.SPECIES,
    country: str | None = None,
    progress: bool = False,
) -> list[Answer]:
    """Identify photos (paths or bytes) or their ``embeddings``: one answer per photo, or one per observation.

    ``observation``: the photos show one animal; their neighbours vote together and the probe sees their
    mean embedding. ``rank``: candidates as species, or rolled up to genus or family with their evidence.
    A photo that cannot be read gets an answer with its ``error`` (the others are still identified); an animated
    one, its first frame read, gets a note saying so (``Answer.notes``).

    ``photos`` is a list (any iterable, read once) of paths or bytes, even for one photo: one path or bytes alone
    is refused (ValueError), as are PIL images and arrays (TypeError saying what to pass;
    :meth:`Identifier.identify_images` takes PIL images); an empty list gets no answers (``[]``). ``embeddings``:
    one row per photo (a 1-D vector: one photo), each scaled to unit length (once:
    :meth:`Identifier.identify_embeddings`), so a vector's size changes no answer; a row all zeros or not finite is
    refused (ValueError naming it). ``names``: one per photo or row
    (default: the paths, ``image #i``, ``embedding #i``). ``top``: at least 1. ``method``: knn, probe or blend;
    ``rank``: species, genus or family.
    """
    ident = identifier_arg(ident, "identify")
    if (photos is None) == (embeddings is None):
        raise ValueError("identify needs photos or embeddings (one of the two)")
    method = parse_method(method)
    rank = parse_rank(rank)
    whole_at_least_1(top, "top", "the candidates each answer lists")
    if isinstance(names, (str, bytes)):
        raise ValueError(f'names is a list, one name per photo, even for one: pass [{names!r}]')
    if names is not None:
        names = [str(n) for n in names]
    presence = presence_for(country, ident)
    if embeddings is None:
        photos = photo_list(photos)
        if names is not None and len(names) != len(photos):
            raise ValueError(f"names must have one entry per photo: {len(photos)} photos, {len(names)} names")
        done = embed_photos(photos, ident.encoder, progress=progress, desc="identifying")
        emb, errors, notes = done.embeddings, done.errors, done.notes or [None] * len(done.errors)
        names = names or [f"image #{i}" if isinstance(p, bytes) else str(p) for i, p in enumerate(photos)]
    else:
        emb = query_rows(embeddings, ident.gallery.dim)  # scaled to unit length once, by the Identifier's methods
        if names is not None and len(names) != len(emb):
            raise ValueError(f"names must have one entry per embedding row: {len(emb)} rows, {len(names)} names")
        errors = notes = [None] * len(emb)
        names = names or [f"embedding #{i}" for i in range(len(emb))]
    ok = [i for i, e in enumerate(errors) if e is None]
    failed = [Answer(source=names[i], error=errors[i]) for i in range(len(errors)) if errors[i] is not None]
    if observation:
        if not ok:
            return failed
        found = ident.identify_observation(emb[ok], top=top, method=method, presence=presence)
        found.set_aside = [ok[i] for i in found.set_aside]  # positions among the photos given, unreadable ones too
        source = ", ".join(names[i] for i in ok)
        said = photo_notes([names[i] for i in ok], [notes[i] for i in ok]) + found.notes
        return [Answer(source, None, found, ranked_results(found, rank, top, ident.taxa()), said), *failed]
    found_each = ident.identify_embeddings(emb[ok], top=top, method=method, presence=presence) if ok else []
    answers: dict[int, Answer] = {
        i: Answer(names[i], None, a, ranked_results(a, rank, top, ident.taxa()),
                  ([notes[i]] if notes[i] else []) + a.notes)
        for i, a in zip(ok, found_each, strict=True)
    }
    answers.update({i: Answer(names[i], errors[i]) for i in range(len(errors)) if errors[i] is not None})
    return [answers[i] for i in range(len(errors))]


def answer_notes(ident: Identifier, *, api: bool = False, rank: Rank | str = Rank.SPECIES) -> list[str]:
    """What every answer from ``ident``'s gallery is to be shown with: that the last build into it did not finish
    (:func:`index.build_mark.build_note`: a partial gallery answers among the species it holds), and that it is too
    small to tell a photo unlike every reference (no far threshold: :func:`retrieval.identify.far_threshold`), and
    which venomous species of its checklist it cannot name (:meth:`Identifier.checklist_coverage`), at ``rank``
    family, which of its species record no family (:func:`family_note`), and, for the CLI, that its photos are
    embedded with another runtime or precision than the gallery's references
    (:func:`retrieval.protocol.embedding_note`; a server logs it once when it starts).
    ``api``: said for an HTTP client (how to add photos through the API; a running build's pid and host left out)."""
    notes = [note] if (note := build_note(ident.gallery.root, api=api)) else []
    if not api and (other := embedding_note(ident.gallery.info, ident.encoder)):  # a server logs it once at start
        notes.append(other)
    if (coverage := ident.checklist_coverage()) and (gap := coverage.note()):  # venomous checklist species
        notes.append(f"{gap} ({add_how(api)})")
    n = ident.gallery.index.ntotal  # the index's count: never a read of the store (an answer during its outage)
    if n and ident.far_threshold() is None:
        how = add_how(api)
        said, tail = _no_far_said(n)
        notes.append(f"this gallery holds {said}: too few to tell a photo unlike every "
                     "reference (a blank frame, another animal) from a match, so no answer is marked far or UNKNOWN "
                     f"for that, however unlike the photo is; add reference photos ({how}): from 2"
                     f"{tail}, the gallery measures that threshold")
    if (one := ident.one_species()) is not None:  # its 100% says nothing: never "venom unlikely" either
        notes.append(one_species_note(one, api=api))
    if parse_rank(rank) is Rank.FAMILY and (family := family_note(ident, api=api)):
        notes.append(family)
    if stale := ident.stale_probe_note(api=api):  # references added or deleted since the probe was trained
        notes.append(stale)
    return notes


def _no_far_said(n: int) -> tuple[str, str]:
    """What a gallery of ``n`` (>= 1) references with no far threshold holds, and the tail of "add reference photos:
    from 2 ..." (" that are not near-copies" for 2 or more: each one's nearest others are near-copies of it, which
    far_threshold passes over); shared by :func:`answer_notes` and the evaluation report's notes."""
    if n > 1:
        return (f"{n} reference photos, each a near-copy of the others near it (cosine >= {NEAR_COPY_COSINE}: the "
                "same photo saved again)", " that are not near-copies")
    return "1 reference photo", ""


def family_note(ident: Identifier, *, api: bool = False) -> str | None:
    """What ``--rank family`` is to be shown with where some of the gallery's species record no family (their
    scores go to 'unknown family'): families come only from the shipped snake taxonomy, a dataset that records
    them (a manifest's ``family`` column, rare-species, iNaturalist 2021's folder names) or an add's family; None
    when every species records one."""
    taxa = [t for t in ident.taxa().values() if t.count > 0]
    lacking = sorted(t.species for t in taxa if not t.family)
    if not lacking:
        return None
    how = "speciesid references add --family (the HTTP API's add takes no family)" if api else \
        "speciesid references add --family"
    which = "records no families" if len(lacking) == len(taxa) else \
        f"records no family for {len(lacking)} of its {len(taxa)} species ({first_few(lacking)})"
    return (f"this gallery {which}: their scores are summed as 'unknown family'. Families come only from the shipped "
            "snake taxonomy, a dataset that records them (index build --dataset manifest with a family column, "
            f"rare-species, iNaturalist 2021's folder names) or {how}")


def search(
    ident: Identifier, photo: str | Path | bytes | None = None, *, embedding: Sequence[float] | None = None, k: int = 10
) -> list[Neighbour]:
    """The ``k`` nearest reference photos of one photo (a path, or bytes as :func:`identify` takes them:
    :func:`retrieval.pipeline.one_photo`), or of an embedding made elsewhere (scaled
    to unit length here, as :func:`identify`'s are: :func:`retrieval.metric.unit_queries`)."""
    ident = identifier_arg(ident, "search")
    if (photo is None) == (embedding is None):
        raise ValueError("search needs a photo or an embedding (one of the two)")
    whole_at_least_1(k, "k", "the neighbours to return")
    if photo is not None:
        photo = one_photo(photo, "photo is one photo, here")  # the bytes identify takes (bytearray, memoryview too)
    if embedding is None:
        done = embed_photos([photo], ident.encoder)
        if done.errors[0] is not None:
            raise ImageLoadError(f"{'the photo' if isinstance(photo, bytes) else photo}: {done.errors[0]}")
        return ident.search(done.embeddings, k)[0]
    v = np.asarray(embedding, dtype=np.float64)
    dim = ident.gallery.dim
    if v.ndim != 1 or v.shape[0] != dim:
        raise ValueError(f"embedding must be a list of {dim} numbers, got shape {list(v.shape)}")
    return ident.search(unit_queries(v, dim), k)[0]  # unit length, as identify's embeddings are


# -------------------------------------------------------------------------------------------- evaluate
@dataclass
class EvaluationRun:
    """What ``evaluate_dataset`` measured and wrote."""

    results: dict[str, dict]  # method -> metrics (retrieval.metrics.evaluate)
    notes: list[str]  # what was evaluated, with which settings
    files: dict[str, Path]  # the report files
    queries: int  # photos identified
    unreadable: int  # photos skipped
    protocol: list[str] = field(default_factory=list)  # which photos chose what (retrieval.protocol)
    unseen: bool = False  # the figures are on unseen photos (retrieval.protocol.Protocol.unseen)


def evaluate_dataset(
    ident: Identifier,
    dataset: str,
    root: str | Path,
    *,
    metadata: str | Path | None = None,
    country: str | None = None,
    report_dir: str | Path = "report",
    progress: bool = True,
    keep_duplicates: bool = False,
    settings_overridden: bool = False,
    methods: Sequence[str] | None = None,
    open_set: bool = False,
    scan: DatasetScan | None = None,
) -> EvaluationRun:
    """Identify a labelled set with ``methods`` (default: every method the gallery has); write the JSON + Markdown
    report.

    The report says which photos chose the settings, how many evaluated photos trained a network fine-tuned here,
    and how many the gallery already holds (same bytes or near-copies); those are left out of the figures unless
    ``keep_duplicates`` (:mod:`retrieval.protocol`).

    A set none of whose species the gallery holds is refused (ValueError: a mistyped or renamed folder set), unless
    ``open_set``: an open-set evaluation, of whether unknown species are abstained on and how often a venomous one is
    called harmless. ``scan``: the set as :func:`check_evaluation_set` returned it (checked before the model loaded).
    ``report_dir``: where report.json, report.md and the plots go (default ``report`` in the current folder; created
    if missing). ``methods``: a list of knn, probe, blend (an unknown name: ValueError naming the choices).
    """
    from retrieval.metrics import EvalItem, evaluate, write_report  # sklearn: not on the query path
    from retrieval.protocol import (
        Protocol,
        embedding_setup,
        embedding_text,
        find_duplicates,
        network_trained,
        settings_origin,
        size_origin,
        without_copies,
    )

    ident = identifier_arg(ident, "evaluate_dataset")
    if Path(report_dir).exists() and not Path(report_dir).is_dir():  # before the embedding work, not after it
        raise ValueError(f"the report folder {report_dir} is a file; give a folder (it is created if missing)")
    if isinstance(methods, (str, Method)):
        raise ValueError(f"methods is a list, even for one method: pass [{parse_method(methods).value!r}]")
    if methods is not None:
        methods = [parse_method(m).value for m in methods]  # an unknown name: ValueError naming the choices
    have = ["knn", "probe", "blend"] if ident.probe is not None else ["knn"]
    if methods is not None and (missing := [m for m in methods if m not in have]):
        raise ValueError(f"gallery {ident.gallery.root} has no probe for method {', '.join(missing)}: train one with "
                         f"'speciesid probe train --index {ident.gallery.root}', or evaluate --method knn")
    gallery_species = ident.gallery.species()
    if scan is None:
        scan = load_dataset(dataset, root, metadata=metadata)
        require_records(scan)
        if not open_set:
            _require_species_held([r.species for r in scan.records], gallery_species, ident.gallery.root,
                                  root)  # before the embedding work
    done = embed_photos([r.path for r in scan.records], ident.encoder, progress=progress, desc="evaluating")
    ok = [i for i, e in enumerate(done.errors) if e is None]
    if not ok:
        raise ValueError(f"none of the {len(scan.records)} photos under {root} could be read; nothing to evaluate")
    dups, kinds = find_duplicates(ident.gallery, done.sha256, done.embeddings[ok], ok)
    evaluated = [done.sha256[i] for i in ok]
    held = {s.species: s.count for s in gallery_species if s.count > 0}
    settings, chose = settings_origin(ident.probe, root, settings_overridden, evaluated, len(ident.gallery),
                                      gallery_species=held)
    size, size_chose = size_origin(ident.encoder, root, evaluated)
    if keep_duplicates and dups and ident.probe is not None and ident.probe.calibration.selected_on.startswith("cv:"):
        chose = True  # the gallery members kept in the figures were the folds that chose the settings
        settings += f"; {len(dups)} of the evaluated photos are gallery members: they were among those folds"
    trained, trained_from, trained_complete = network_trained(ident.encoder.spec, done.sha256, ok)
    embedding = embedding_setup(ident.encoder)
    protocol = Protocol(settings, chose or size_chose, dups, kinds, excluded=not keep_duplicates, size=size,
                        trained=trained, trained_from=trained_from, trained_complete=trained_complete,
                        embedded=embedding_text(embedding))
    readable = len(ok)
    if not keep_duplicates:
        ok = without_copies(ok, dups, f"all {readable} readable photos under {root} are already in the gallery (same "
                            "bytes or near-copies), so they would measure nothing; evaluate photos the gallery does "
                            "not hold, or pass --keep-duplicates to count them anyway")
    presence = presence_for(country, ident)
    methods = have if methods is None else list(methods)
    taxa = ident.taxa()
    venomous = {s: t.venomous for s, t in taxa.items()}
    for r in scan.records:
        if venomous.get(r.species) is None:
            info = lookup_taxon(r.species)
            venomous[r.species] = r.venomous if r.venomous is not None else (info.venomous if info else None)
    results = {}
    named = set(held) | set(ident.text_prior.taxa if ident.text_prior else ())  # what answers can name
    for method in methods:
        answers = ident.identify_embeddings(done.embeddings[ok], top=len(taxa) or 5, method=method,
                                            presence=presence)
        items = [EvalItem(truth=scan.records[i].species, scores=a.scores, unknown=a.unknown,
                          country=scan.records[i].country, image=str(scan.records[i].path))
                 for i, a in zip(ok, answers, strict=True)]
        scored = named | (set(ident.probe.species) if ident.probe is not None and method != "knn" else set())
        results[method] = evaluate(items, venomous=venomous, scored=scored)
    c = ident.config
    notes = [
        f"gallery {ident.gallery.root} ({len(ident.gallery)} references, encoder {ident.gallery.encoder_spec})",
        f"queries: dataset {dataset} at {root}: {len(ok)} photos"
        + (f", {len(scan.records) - readable} unreadable and skipped" if readable < len(scan.records) else ""),
        f"kNN k={c.k}, T={c.temperature}, unknown threshold {c.unknown_threshold}"
        + (f"; blend weight {ident.blend_weight}" if ident.probe is not None else "; no probe (kNN only)"),
    ]
    if country:
        notes.append(f"country prior: {country}")
    unheld = Counter(s for s in (scan.records[i].species for i in ok) if s not in held)  # held: see above
    if open_set and unheld:  # asked for: not a warning
        notes.append(f"open set: {len(unheld)} evaluated species ({sum(unheld.values())} photos) have no reference in "
                     "the gallery: their answers measure abstention (coverage) and venomous called harmless")
    elif absent := species_not_held([scan.records[i].species for i in ok], gallery_species):
        logger.warning("%s", absent)
        notes.append(f"warning: {absent}")
    if unfinished := build_note(ident.gallery.root):  # a partial gallery's figures are not the whole one's
        logger.warning("%s", unfinished)
        notes.append(f"warning: {unfinished}")
    if other := embedding_note(ident.gallery.info, ident.encoder):  # said once, on stderr too: a note, not an error
        logger.info("%s", other, extra={"note": True})
        notes.append(f"note: {other}")
    for caveat in _figure_notes(ident, named, results):  # figures a small gallery makes trivial (walk s57, #8)
        logger.info("%s", caveat, extra={"note": True})
        notes.append(f"note: {caveat}")
    notes += [f"protocol: {line}" for line in protocol.lines()]
    files = write_report(report_dir, results, title=f"speciesid evaluation: {dataset}", notes=notes,
                         embedding=embedding)
    return EvaluationRun(results, notes, files, len(ok), len(scan.records) - readable, protocol.lines(),
                         protocol.unseen)


def _figure_notes(ident: Identifier, named: set[str], results: Mapping[str, dict]) -> list[str]:
    """The report's notes on figures the gallery makes trivial or leaves out: one species (top-1 cannot be wrong),
    5 or fewer (top-5 lists them all), no far threshold (1 reference photo, or references that are all near-copies
    of each other: coverage counts every photo), and the evaluated species ROC-AUC leaves out (no reference: no
    answer scores them)."""
    notes = []
    names = sorted(named | (set(ident.probe.species) if ident.probe is not None else set()))
    if len(names) == 1:
        notes.append(f"the gallery holds one species ({names[0]}): every answer names it, so top-1 cannot be wrong "
                     "on its photos, and the figures say nothing of telling species apart; add references of other "
                     "species")
    elif 1 < len(names) <= 5:
        notes.append(f"the gallery holds {len(names)} species: every answer lists them all, so top-5 is trivially "
                     "right on their photos")
    n = ident.gallery.index.ntotal
    if n and ident.far_threshold() is None:
        said, tail = _no_far_said(n)
        notes.append(f"the gallery holds {said}: too few to measure how unlike every "
                     "reference a photo may be, so no answer is UNKNOWN for that and coverage counts photos of "
                     f"anything; add reference photos (from 2{tail}, the gallery measures that threshold)")
    unscored = sorted({s for r in results.values() for s in r.get("roc_auc_unscored") or ()})
    if unscored:
        shown = ", ".join(unscored[:5]) + (f" and {len(unscored) - 5} more" if len(unscored) > 5 else "")
        notes.append(f"ROC-AUC (per species and macro) leaves out the {len(unscored)} evaluated species with no "
                     f"reference in the gallery ({shown}): no answer scores them, so theirs would be 0.5 by "
                     "construction")
    return notes


def species_not_held(evaluated: Sequence[str], gallery_species: Sequence[SpeciesSummary]) -> str:
    """A warning naming the evaluated species the gallery holds no reference of (their photos count as misses that no
    setting could get right); "" when there are none. Each is named with its photo count and, when it is a gallery
    species' common name, that species, else the closest gallery names (a misspelt folder?)."""
    held = _held(gallery_species)
    counts = Counter(s for s in evaluated if s not in held)
    if not counts:
        return ""
    return (f"{len(counts)} evaluated species have no reference in the gallery, so the {sum(counts.values())} photos "
            f"of them count as misses whatever the settings: {_named_absent(counts, gallery_species)}. Add their "
            "photos to the gallery, or check the folder names")


def check_evaluation_set(
    index_dir: str | Path,
    dataset: str,
    root: str | Path,
    *,
    metadata: str | Path | None = None,
    open_set: bool = False,
) -> DatasetScan:
    """The labelled set :func:`evaluate_dataset` identifies (pass it as its ``scan``), checked against the gallery's
    species before any model loads: refused (ValueError) when none of its species is in the gallery, unless
    ``open_set``. A store that cannot be read here is left to the gallery's open to report."""
    scan = load_dataset(dataset, root, metadata=metadata)
    require_records(scan)
    if not open_set and (gallery_species := stored_species(index_dir)):
        _require_species_held([r.species for r in scan.records], gallery_species, index_dir, root)
    return scan


def _require_species_held(evaluated: Sequence[str], gallery_species: Sequence[SpeciesSummary], index: str | Path,
                          root: str | Path) -> None:
    """Refuse (ValueError) to evaluate photos none of whose species the gallery holds: every answer would be a miss,
    a report of zeros that measures nothing, most often a mistyped or renamed folder set. An open-set evaluation is
    asked for with ``--open-set``. A gallery with no species is left to the identifier's own refusal."""
    held = _held(gallery_species)
    if not held or any(s in held for s in evaluated):
        return
    counts = Counter(evaluated)
    raise ValueError(f"none of the {len(counts)} species under {root} has a reference in gallery {index}: "
                     f"{_named_absent(counts, gallery_species)}; name the folders as the gallery's species ('speciesid "
                     f"species list --index {index}' lists them), or evaluate another gallery; to measure how unknown "
                     "species are answered (abstentions, venomous called harmless), pass --open-set")


def _held(gallery_species: Sequence[SpeciesSummary]) -> set[str]:
    return {s.species for s in gallery_species if s.count > 0}


def _named_absent(counts: Counter[str], gallery_species: Sequence[SpeciesSummary]) -> str:
    """The first 10 species of ``counts`` (name -> photos), each with its photo count and what it may have meant: the
    gallery species whose common name it is, else the closest gallery names."""
    held = _held(gallery_species)
    names = sorted(held)
    common = {species_key(s.common_name): s.species for s in gallery_species if s.common_name and s.species in held}
    shown = []
    for species, n in sorted(counts.items())[:10]:
        if meant := common.get(species_key(species)):
            hint = f"; the common name of {meant}"
        else:
            close = difflib.get_close_matches(species, names, n=2, cutoff=0.75)
            hint = f"; closest: {', '.join(close)}" if close else ""
        shown.append(f"{species} ({n} photo{'s' * (n > 1)}{hint})")
    return "; ".join(shown) + ("; ..." if len(counts) > 10 else "")


# ------------------------------------------------------------------------------------------ references
@dataclass
class AddResult:
    """What ``add_photos`` did."""

    species: str  # the name the photos were stored under (an existing spelling when one matched)
    created: bool  # the species was new to the gallery and now has photos
    existed: bool  # the gallery already had the species: when this add's rows committed (another add of the name
    #                may commit while this one waits for the write lock), or, none stored, when it began
    report: BuildReport  # added ids, duplicates (with the id they repeat), unreadable photos
    # (photo or upload name, id it repeats, that reference's species: another one's when the photo is stored there)
    duplicates: list[tuple[str, int | None, str | None]] = field(default_factory=list)
    excluded: list[int] = field(default_factory=list)  # of those ids, the ones a clean run excluded (not searchable)
    probe_note: str = ""  # a new species the gallery's probe does not know: says so, and how to retrain it
    few_note: str = ""  # a species left with too few photos for 'probe train': says so, and what to do
    near_copies: list[NearCopy] = field(default_factory=list)  # photos stored that nearly copy a reference held
    taxon_note: str = ""  # a new species the shipped taxonomy does not know, named like a taxon there: which one
    absent_note: str = ""  # a new name none of whose photos was stored: that the species is still not in the gallery
    #: a new species of no venom flag (index.taxonomy.unrecorded_venom_note): possibly venomous in its answers, or,
    #: where the gallery gives no venom advice, a snake's genus with no bite advice; the API's (``api``): the CLI
    #: has the add's log line
    venom_note: str = ""
    #: photos stored from their first frame or page (an animated GIF, a TIFF of several pages), one note each:
    #: ``name: note`` (the upload's name, else the path), as an identify's answer says it
    photo_notes: list[str] = field(default_factory=list)
    #: the gallery's species after the add (retrieval.advice.species_notes): one species, or photo counts that
    #: differ a lot
    species_note: str = ""

    @property
    def exists(self) -> bool:
        """Whether the species is in the gallery after the add: False only for a new name none of whose photos was
        stored (every one a duplicate, or unusable)."""
        return self.existed or self.created

    @property
    def notes(self) -> list[str]:
        """The notes a caller shows beside the result (``absent_note``, ``taxon_note``, ``venom_note``,
        ``probe_note``, ``few_note``, ``species_note``, the ``photo_notes``, then the near-copies: one note each
        for the first :data:`NEAR_COPY_NOTES`, one more counting the rest), those that say something."""
        return ([note for note in (self.absent_note, self.taxon_note, self.venom_note, self.probe_note, self.few_note,
                                   self.species_note) if note]
                + self.photo_notes + near_copy_notes(self.near_copies))


#: Nearest references each stored photo is compared with to find one held before that it nearly copies: this many
#: beyond the add's own photos (passed over), :data:`NEAR_COPY_FIRST_K` at most at first, then twice as many for a
#: photo whose nearest were all the add's own at a near-copy cosine (a burst of frames of one animal).
NEAR_COPY_K = 8
#: The most neighbours each stored photo's first near-copy search asks for (a large add).
NEAR_COPY_FIRST_K = 64
#: Stored photos searched at once for near-copies (bounds the search's memory on a large add).
NEAR_COPY_ROWS = 256
#: Near-copies named one note each; the rest are counted in one more note.
NEAR_COPY_NOTES = 10


@dataclass(frozen=True)
class NearCopy:
    """A photo ``references add`` stored that nearly copies a reference the gallery held before (cosine at or above
    the ``speciesid clean`` leak rule, :data:`retrieval.findings.DEFAULT_DUP_THRESHOLD`): the same photo re-saved or
    mirrored, whose bytes differ (copies resized and saved as JPEG mostly fall under it:
    ``benchmarks/bench_near_copies.py``)."""

    photo: str  # the photo's path, or the upload's name
    id: int  # the reference it was stored as
    of: int  # the reference held before that it nearly copies
    species: str  # that reference's species
    of_photo: str  # that reference's photo (its file name)
    cosine: float
    same_species: bool  # stored under the species of the reference it copies

    def note(self) -> str:
        """One line naming the photo, the reference it nearly copies and what to do."""
        head = (f"{self.photo} (reference {self.id}) is a near-copy of reference {self.of} of {self.species} "
                f"({self.of_photo}, cosine {self.cosine:.3f})")
        if self.same_species:
            return (head + ": it adds little to the vote (and 'probe train' counts near-copies once); if it was "
                    f"added by mistake, delete it: speciesid references delete {self.id}")
        return (head + ", another species: one of the two photos is likely mislabelled; delete that one: "
                f"speciesid references delete {self.id} (or {self.of})")


def near_copy_notes(found: Sequence[NearCopy]) -> list[str]:
    """The notes for ``found``: one each for the first :data:`NEAR_COPY_NOTES`, one more counting the rest."""
    notes = [n.note() for n in found[:NEAR_COPY_NOTES]]
    rest = found[NEAR_COPY_NOTES:]
    if rest:
        notes.append(f"{len(rest)} more photo{'s are' if len(rest) > 1 else ' is a'} near-cop"
                     f"{'ies' if len(rest) > 1 else 'y'} of references held (references "
                     f"{first_few([n.id for n in rest])}); 'speciesid clean --index GALLERY --no-zero-shot "
                     "--report DIR' lists every pair (near-duplicate)")
    return notes


def find_near_copies(gallery: Gallery, ids: Sequence[int], names: dict[int, str]) -> list[NearCopy]:
    """The references ``ids`` just stored that nearly copy a reference held before them (not one of ``ids``): the
    nearest reference held before of each stored embedding (the add's embeddings, read back from the index; see
    :data:`NEAR_COPY_K`: a search goes on past the add's own photos while they are at a near-copy cosine).
    ``names``: the photo name to show per id (default: its stored source)."""
    if not ids or len(gallery) <= len(ids):
        return []
    new = {int(i) for i in ids}
    hits: list[tuple[int, int, float]] = []  # (new id, held id, cosine)
    for start in range(0, len(ids), NEAR_COPY_ROWS):
        batch = [int(i) for i in ids[start:start + NEAR_COPY_ROWS]]
        hits += _near_held(gallery, batch, new)
    if not hits:
        return []
    meta = gallery.store.metadata(sorted({i for rid, of, _ in hits for i in (rid, of)}))
    species, sources = meta["species"].to_dict(), meta["source_path"].to_dict()
    out = []
    for rid, of, cosine in hits:
        if of not in species or rid not in species:  # deleted meanwhile
            continue
        out.append(NearCopy(photo=names.get(rid) or str(sources[rid]), id=rid, of=of, species=str(species[of]),
                            of_photo=str(sources[of]).replace("\\", "/").rsplit("/", 1)[-1], cosine=cosine,
                            same_species=species[of] == species[rid]))
    return out


def _near_held(gallery: Gallery, batch: list[int], new: set[int]) -> list[tuple[int, int, float]]:
    """(id, held id, cosine) of the references ``batch`` (some of the add's ``new``) whose nearest reference held
    before is a near-copy (the clean rule's cosine), in ``batch``'s order (:func:`find_near_copies`)."""
    from retrieval.findings import DEFAULT_DUP_THRESHOLD  # the clean leak rule

    vectors, total = gallery.reference_vectors(batch), len(gallery)
    found_for: dict[int, tuple[int, float]] = {}
    rows, k = list(range(len(batch))), min(len(new) + NEAR_COPY_K, NEAR_COPY_FIRST_K, total)
    while rows:
        sims, found = gallery.nearest(vectors[rows], k)
        again = []
        for row, row_sims, row_ids in zip(rows, sims, found, strict=True):
            held = next(((int(j), float(c)) for j, c in zip(row_ids, row_sims, strict=True)
                         if j >= 0 and j not in new), None)
            if held is not None:
                if held[1] >= DEFAULT_DUP_THRESHOLD:
                    found_for[row] = held
            elif k < total and (row_ids >= 0).all() and row_sims[-1] >= DEFAULT_DUP_THRESHOLD:
                again.append(row)  # all the add's own, a held one may still be that near: look further
        rows, k = again, min(2 * k, total)
    return [(batch[row], *found_for[row]) for row in sorted(found_for)]


def check_new_references(
    gallery: Gallery,
    species: str,
    *,
    common_name: str | None = None,
    venomous: bool | None = None,
    new_species: bool = False,
    distinct_from_venomous: bool = False,
    api: bool = False,
) -> None:
    """Refuse (ValueError, SpeciesNameConflictError) what :func:`add_photos` would refuse about the name and flags of
    photos for ``species``, before any work: a caller that embeds first (the API) answers a refused name without a
    forward pass. :func:`add_photos` checks again with the gallery as it is when it writes, and logs what the name
    leaves unknown (its venom status) then, once. ``api``: its messages name no server path (``DIR``)."""
    held, names = gallery.species_names()  # one version, one store round trip at most
    new_species_references(species, held, [], dataset="added", common_name=common_name,
                           venomous=venomous, new_species=new_species,
                           distinct_from_venomous=distinct_from_venomous, root="DIR" if api else gallery.root,
                           common_names=names, api=api)


#: Photos an add (:func:`add_photos`) commits at a time: one LanceDB commit each. An add of more photos marks the
#: gallery folder before its first commit, until it completes (:func:`index.build_mark.adding`).
ADD_CHUNK = 1024


def add_photos(
    gallery: Gallery,
    encoder: Encoder,
    species: str,
    photos: Sequence[str | Path] | Sequence[tuple[str, bytes]],
    *,
    common_name: str | None = None,
    venomous: bool | None = None,
    genus: str | None = None,
    family: str | None = None,
    dataset: str = "added",
    progress: bool = False,
    min_side: int = MIN_REFERENCE_SIDE,
    new_species: bool = False,
    embeddings: np.ndarray | None = None,
    api: bool = False,
    distinct_from_venomous: bool = False,
) -> AddResult:
    """Store photos as references of ``species`` (created if new); searchable when this returns.

    ``new_species``: the caller confirmed that a new name looking like a gallery species (a near-spelling, or its
    common name) is a new species; without it such a name is refused (SpeciesNameConflictError) before any work.
    ``distinct_from_venomous``: ``venomous`` False is meant although the name looks like a venomous taxon's
    (:func:`index.taxonomy.check_harmless_flag`: refused without it).

    ``photos`` are paths, or uploads ``(name, bytes)`` whose bytes are kept by content digest in the gallery's
    ``uploads/`` folder, or, for a store on S3, in the store (``<store>/_speciesid/uploads/``: every machine sharing
    it reads them), put before the rows commit; at least one (an empty list is refused: ValueError). One duplicate
    check for both
    (:func:`retrieval.pipeline.add_references`): photos whose bytes are already stored, or repeat an earlier photo of
    the call, are stored once.

    ``embeddings``: the photos' embeddings by ``encoder``, one row per photo in order, made before (the API embeds
    its uploads before it takes the write lock); the photos are then not embedded again. Each row is stored scaled to
    unit length, as the encoder's are (a row of zeros refused, naming it; a non-finite row skipped: its photo not
    stored: :func:`retrieval.pipeline.given_embeddings`). ``api``: the notes worded
    for an HTTP client (:func:`retrieval.probe_flows.probe_cannot_name`).

    Rows are committed :data:`ADD_CHUNK` photos at a time, or, with ``embeddings``, all in one commit (all there or
    not at all, whatever is killed when). An add of more photos than one commit takes marks the gallery folder just
    before its first commit, until it completes, and so does one cut by Ctrl-C after it kept photos: readers say
    the add did not finish until the same add completes (:func:`index.build_mark.adding`).
    """
    gallery = gallery_arg(gallery, "add_photos")
    if encoder is None or isinstance(encoder, (str, EncoderConfig)):
        raise TypeError("add_photos takes the gallery's loaded encoder, not "
                        f"{'a spec' if isinstance(encoder, str) else 'a ' + type(encoder).__name__}: "
                        "gallery, encoder = open_gallery(DIR) (or ident.gallery, ident.encoder)")
    photos = photo_list(photos, uploads=True)
    if not photos:  # storing nothing is not an add: said, not answered with a result of nothing stored
        raise ValueError('photos is empty: no photos were given to add_photos; pass the photo files to store, e.g. '
                         '["photo.jpg"] (or uploads [("photo.jpg", data)])')
    if folders := [p for p in photos if not isinstance(p, tuple) and Path(p).is_dir()]:
        raise ValueError(f"add_photos takes photo files, and {folders[0]} is a folder: pass the photos in it, "
                         f"e.g. index.photos.find_photos({str(folders[0])!r}) (the CLI expands folders itself)")
    if embeddings is not None:  # a wrong shape is refused before any upload is kept
        embeddings = given_embeddings(embeddings, len(photos), gallery.dim)
    paths: list[Path | str] = []
    names: dict[str, list[str]] = {}  # stored path -> the names of the uploads with those bytes, in order
    uploads: list[tuple[Path | str, bytes]] = []
    for item in photos:
        if isinstance(item, tuple):
            path = _upload_path(gallery, *item)
            names.setdefault(source_text(path), []).append(item[0])  # keyed as the store records paths
            paths.append(path)
            uploads.append((path, item[1]))
        else:
            paths.append(Path(item))
    held, common_names = gallery.species_names()  # one version, one store round trip at most
    name, records, prior = new_species_references(
        species, held, paths, dataset=dataset, common_name=common_name, venomous=venomous, genus=genus,
        family=family, new_species=new_species, distinct_from_venomous=distinct_from_venomous,
        root="DIR" if api else gallery.root,  # an HTTP client is told no server path
        common_names=common_names,  # every name of a species' references (several languages)
        api=api,
    )  # a refused name or flag leaves nothing behind: the uploads are kept only from here
    # a new species of no flag: possibly venomous where the advice applies; where it does not, said of a snake's
    venom_note = "" if prior is not None or not records else unrecorded_venom_note(
        name, records[0].venomous, genus=records[0].genus, family=records[0].family,
        advice_on=venom_applies(gallery.info, _venom_taxa(gallery, held)), root=gallery.root, api=api)
    if venom_note and not api:  # the CLI's note, before its progress; the server's once the add stored a photo
        logger.warning("%s", venom_note)
    add_digest = photos_digest(source_text(p) for p in paths)  # the add's mark (index.build_mark.adding)
    # rows committed ADD_CHUNK photos at a time; given embeddings (the API's, all in memory): all in one commit
    chunk = ADD_CHUNK if embeddings is None else max(len(paths), 1)
    several = len(paths) > chunk  # more than one commit: the gallery may come to hold part of this add
    written = [path for path, data in uploads if _keep_upload(gallery, path, data)]
    held_at_commit: list[bool] = []  # whether the species was in the gallery when this add's first rows committed

    complete: ReferencesInterrupted | None = None  # a Ctrl-C once every photo was committed: said once marks go
    with adding(gallery.root, name, add_digest) as mark:  # cleared once every photo is committed
        def note_species() -> None:  # under the write lock: another add of the same name may have committed
            if not held_at_commit:  # meanwhile
                if several:  # marked before its first rows: a kill from here on leaves the mark, read as interrupted
                    mark()
                record_embedding(gallery, encoder, API_WRITER if api else ADD_WRITER)  # what embeds its rows
                held_at_commit.append(gallery.store.has_species(name))

        try:
            report = add_references(gallery, encoder, records, progress=progress, min_side=min_side, chunk=chunk,
                                    embeddings=embeddings, read=_upload_reader(gallery, uploads),
                                    before_commit=note_species)
        except ReferencesInterrupted as exc:  # what was committed is kept: say what the normal path would say of it
            exc.species, exc.existed = name, _existed(gallery, name, prior, held_at_commit, read_again=False)
            exc.notes = _interrupted_notes(gallery, name, prior, exc.report)
            if exc.after:  # every photo is in (the Ctrl-C came at the last commit): the add is complete
                complete = exc
            else:
                if exc.report.added or not exc.saved:  # the gallery holds part of the add: readers say so until a
                    mark(added=exc.report.added)  # re-run
                raise
    if complete is not None:
        raise complete
    try:
        return _added(gallery, name, prior, report, held_at_commit, uploads, written, names, venom_note, api=api)
    except KeyboardInterrupt as interrupt:  # every photo is committed: the notes and checks that follow are not
        done = ReferencesInterrupted(report, after="checking the photos added")  # the add's: said as such
        done.species, done.existed = name, _existed(gallery, name, prior, held_at_commit, read_again=False)
        done.notes = _interrupted_notes(gallery, name, prior, report)
        raise done from interrupt


def _added(gallery: Gallery, name: str, prior: SpeciesSummary | None, report: BuildReport,
           held_at_commit: list[bool], uploads: list[tuple[Path | str, bytes]], written: list[Path | str],
           names: dict[str, list[str]], venom_note: str, *, api: bool) -> AddResult:
    """The :class:`AddResult` of :func:`add_photos` once every photo is committed (``report``): the uploads no
    reference uses dropped, the duplicates named, the notes and the near-copy check."""
    if venom_note and api and report.ids:  # an add that stored nothing (every photo a duplicate) made no species
        logger.warning("%s", venom_note)
    stored_meta = gallery.store.metadata(report.ids) if report.ids else None
    stored = {str(p) for p in stored_meta["source_path"]} if stored_meta is not None else set()
    shown = {int(i): (names[src][0] if names.get(src) else src)  # the upload's name, else the stored path
             for i, src in stored_meta["source_path"].map(str).items()} if stored_meta is not None else {}
    for path in written:  # an upload that was a duplicate of a reference stored elsewhere is not kept
        if source_text(path) not in stored:
            _drop_upload(gallery, path)
    lost = [path for path, data in uploads  # a concurrent delete of the last reference of the same bytes may have
            if source_text(path) in stored and not _keep_upload_again(gallery, path, data)]  # removed it meanwhile
    said = photo_notes([names[src][0] if names.get(src := source_text(path)) else str(path)  # an upload by its
                        for path, _ in report.notes], [note for _, note in report.notes])  # client's name
    for path in stored & names.keys():
        names[path].pop(0)  # the first upload with those bytes is the one stored; the rest are duplicates
    known = [i for i in report.duplicate_ids if i is not None]
    meta = gallery.store.metadata(known) if known else None
    owner = meta["species"].to_dict() if meta is not None else {}
    excluded = sorted(int(i) for i, ex in meta["excluded"].fillna(False).items() if ex) if meta is not None else []
    duplicates = [(names[source_text(p)].pop(0) if names.get(source_text(p)) else p, i, owner.get(i))
                  for (p, _), i in zip(report.duplicates, report.duplicate_ids, strict=True)]
    if report.ids:
        refresh_gallery_metric(gallery)
    if lost:
        raise UploadsNotKeptError(
            f"the photos were stored (references {', '.join(map(str, report.ids))}), but the gallery's store "
            f"could not be checked for {', '.join(str(p).rsplit('/', 1)[-1] for p in lost)}, which another "
            "machine's delete may have removed meanwhile: if a thumbnail answers 404, send the same photos again "
            "(answered as duplicates, which puts them back)")
    probe_note, few_note = _species_notes(gallery, name, prior, len(report.ids), api=api)
    try:
        near = find_near_copies(gallery, report.ids, shown)
    except Exception as exc:  # noqa: BLE001 - a note must not fail an add that is committed (a reference deleted
        logger.warning("the near-copy check of the photos added was skipped: %s", exc)  # meanwhile, the store)
        near = []
    existed = _existed(gallery, name, prior, held_at_commit)  # as the commit found it, else as the store is now
    species_note = ""
    if report.ids:
        if (counts := _species_counts(gallery, "the add's notes")) is not None:
            species_note = "; ".join(species_notes(counts, api=api))
    return AddResult(species=name, created=not existed and bool(report.ids), existed=existed,
                     report=report, duplicates=duplicates, excluded=excluded, probe_note=probe_note,
                     taxon_note=_taxon_note(name) if prior is None and report.ids else "",
                     venom_note=venom_note if api and report.ids else "",  # the CLI has the log line
                     few_note=few_note, near_copies=near, photo_notes=said, species_note=species_note,
                     absent_note=_absent_note(name, report) if not existed and not report.ids else "")


def _existed(gallery: Gallery, name: str, prior: SpeciesSummary | None, held_at_commit: list[bool], *,
             read_again: bool = True) -> bool:
    """Whether species ``name`` was in the gallery for an add: as its first commit found it, under the write lock;
    with no commit (every photo a duplicate), as the store holds it now, read again after the gallery's own look
    (:meth:`Gallery.refresh`, which moves the store under the gallery's lock): another writer may have stored the
    same photos under this name since ``prior`` was read, before the lock (``prior`` when that read fails, and
    without ``read_again``: an interrupt's handling does no store I/O that a second Ctrl-C would cut short)."""
    if held_at_commit:
        return held_at_commit[0]
    if not read_again:
        return prior is not None
    try:
        gallery.refresh(force=True)
        return gallery.store.has_species(name)
    except Exception as exc:  # noqa: BLE001 - the add is done: its answer falls back to what was read before
        logger.warning("could not read again whether %s is in the gallery (%s): answered as read before the add",
                       name, exc)
        return prior is not None


def _absent_note(name: str, report: BuildReport) -> str:
    """The note of an add that stored no photo under a name the gallery does not hold: the species was not made."""
    why = ("every photo is a reference already (the duplicates)" if not report.skipped else
           "no photo could be used" if not report.duplicates else
           "every photo is a reference already or could not be used")
    return (f"nothing was stored: {why}, so {name!r} is not in the gallery (a species is made by the first photo "
            "stored under its name)")


def _taxon_note(name: str) -> str:
    """The note of a new species ``name`` that the shipped taxonomy does not know but that is named like a taxon
    there (:data:`index.taxonomy.SUGGESTION`): which one, so that a misspelling confirmed as a new species (or just
    under the near-spelling rule) is not left unnoticed; '' otherwise."""
    close = taxonomy_lookalikes(name, SUGGESTION)
    if not close:
        return ""
    return (f"{name!r} is not in the shipped snake taxonomy, which has {taxa_text(close)}: if the photos are of "
            f"{'that species' if len(close) == 1 else 'one of those'}, delete these references and add the photos "
            "under its name (its venom status and countries come from the taxonomy)")


#: The most searchable photos of a species whose near-copies an add's few-photos note counts once
#: (:func:`_distinct_photos`, which reads the species' rows and groups their vectors): a species with more is
#: taken to have :data:`retrieval.probe.MIN_PROBE_PHOTOS` distinct ones.
FEW_NOTE_PHOTOS = 8


def _species_notes(gallery: Gallery, name: str, prior: SpeciesSummary | None, added: int, *,
                   api: bool = False) -> tuple[str, str]:
    """(probe note, few note) of :class:`AddResult` after ``added`` photos of ``name`` were stored (``prior``: the
    species as the gallery held it before, None when new). The few note counts near-copies once, as ``probe
    train`` does (:func:`_distinct_photos`), and the species' photos as the gallery holds them now (another add of
    it may have committed since ``prior`` was read)."""
    held = (prior.count if prior else 0) + added  # at least the searchable references of the species now
    distinct = held
    if added and held <= FEW_NOTE_PHOTOS:  # a concurrent add only adds: more than that never gets the note
        held, distinct = _distinct_photos(gallery, name, held)
    copies = f", {distinct} counting near-copies once" if distinct < held else ""
    few = (f"{name} has {held} reference photo{'s' * (held != 1)}{copies}; 'speciesid probe train' needs "
           f"{MIN_PROBE_PHOTOS} that are not near-copies of each other, and leaves it out until then (the kNN vote "
           "alone answers it): add another photo of it" if added and distinct < MIN_PROBE_PHOTOS else "")
    return (probe_cannot_name(gallery, api=api) if prior is None and added else ""), few


def _distinct_photos(gallery: Gallery, name: str, held: int) -> tuple[int, int]:
    """(the searchable photos of species ``name`` now, those with near-copies counted once by ``probe train``'s
    own rule: :func:`retrieval.probe.distinct_count`) over the species'
    rows (read by species, not the whole gallery's) and the store's float32 vectors, which ``probe train`` groups
    (not an ivfpq index's float16 ones). A note must not fail an add that is committed: a failure gives
    (``held``, ``held``), logged."""
    try:
        ids = [int(i) for i in gallery.store.metadata(include_excluded=False, species=name).index]
        if not MIN_PROBE_PHOTOS <= len(ids) <= FEW_NOTE_PHOTOS:
            return len(ids), len(ids)
        return len(ids), distinct_count(gallery.store.vectors(ids=ids)[1])
    except Exception as exc:  # noqa: BLE001 - the photos counted as they are, near-copies or not
        logger.info("near-copies of %s not counted for the few-photos note: %s", name, exc)
        return held, held


def _interrupted_notes(gallery: Gallery, name: str, prior: SpeciesSummary | None, report: BuildReport) -> list[str]:
    """The taxon, probe and few notes of an add cut short by Ctrl-C, for the ``report.added`` photos it kept (as
    :attr:`AddResult.notes` orders them); [] when they cannot be told (the gallery unreadable now, or a second
    Ctrl-C: the user is waiting for the prompt)."""
    try:
        taxon = _taxon_note(name) if prior is None and report.added else ""
        return [note for note in (taxon, *_species_notes(gallery, name, prior, report.added)) if note]
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - a note must not hide the interrupt
        logger.info("notes of the interrupted add not made: %s", exc)
        return []


def _upload_path(gallery: Gallery, name: str, data: bytes) -> Path | str:
    """Where uploaded bytes are kept, as ``<sha256><ext>``: in the gallery's ``uploads/`` folder, or for a store on
    S3 in the store (an ``s3://`` URI, :func:`index.objects.upload_uri`), where every machine sharing it reads it."""
    ext = _EXTENSIONS.get(image_format(data) or "", Path(name).suffix.lower() or ".img")
    if gallery.objects is not None:
        return upload_uri(gallery.objects.uri, f"{sha256_bytes(data)}{ext}")
    return gallery.layout.uploads / f"{sha256_bytes(data)}{ext}"


def _upload_reader(gallery: Gallery, uploads: Sequence[tuple[Path | str, bytes]]) -> Reader:
    """A photo's bytes for :func:`retrieval.pipeline.add_references`: this call's uploads from the bytes in memory
    (an upload kept in an S3 store is never read back from it), anything else through ``gallery.read_photo``."""
    held = {source_text(path): data for path, data in uploads}

    def read(source: str | Path) -> bytes:
        data = held.get(source_text(source))
        return data if data is not None else gallery.read_photo(source)

    return read


def _keep_upload(gallery: Gallery, path: Path | str, data: bytes, *, look_first: bool = False) -> bool:
    """Write uploaded bytes at ``path`` (:func:`_upload_path`) unless they are there; whether this call wrote them.
    In an S3 store a put with ``If-None-Match: *`` (same bytes, same key: a race with another machine is harmless);
    ``look_first``: a HEAD first, for bytes most likely there already."""
    if isinstance(path, str):
        assert gallery.objects is not None
        if look_first and gallery.objects.exists(path):
            return False
        return gallery.objects.put_if_absent(path, data)
    if path.exists():
        return False
    atomic_write(path, data)
    return True


def _keep_upload_again(gallery: Gallery, path: Path | str, data: bytes) -> bool:
    """After the commit: put an upload the committed rows use back if it is gone (:func:`_keep_upload` with
    ``look_first``); a failure of the store is tried once more. Whether the upload is there now (False: both tries
    failed, logged). A file of the folder's ``uploads/`` is written as before (an error raised)."""
    if not isinstance(path, str):
        _keep_upload(gallery, path, data, look_first=True)
        return True
    for attempt in (1, 2):
        try:
            _keep_upload(gallery, path, data, look_first=True)
            return True
        except (OSError, LeaseError, TimeoutError) as exc:
            logger.warning("could not make sure %s is in the gallery's store (try %d of 2): %s", path, attempt, exc)
    return False


class UploadsNotKeptError(StoreObjectError):
    """An add committed its rows, but an upload they use is not in the gallery's store and could not be put back
    (:func:`add_photos`); the message says which and what to do. Transient: the same add again puts it back."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


def _drop_upload(gallery: Gallery, path: Path | str) -> None:
    """Remove a kept upload no reference was stored for (a duplicate of a photo stored from another path). A file of
    the folder as it always was; an object of an S3 store only when no reference uses it, checked and deleted under
    the store's lease (:func:`_remove_unused_upload`): another machine may have stored the same bytes meanwhile.
    After the commit, so best effort: a failure is a warning naming the object (left unused in the store)."""
    if isinstance(path, str):
        _remove_unused_upload_after_commit(gallery, path)
    else:
        path.unlink(missing_ok=True)


def _remove_unused_upload_after_commit(gallery: Gallery, uri: str) -> None:
    """:func:`_remove_unused_upload` after a commit, best effort: the write it follows did happen, so a failure
    of the store (or its lease) is logged, naming the object left unused in the store, not raised."""
    try:
        _remove_unused_upload(gallery, uri)
    except (OSError, LeaseError, TimeoutError) as exc:
        logger.warning("could not remove %s from the gallery's store (no reference may use it any more; it stays "
                       "there unused, which harms nothing, until 'speciesid index sweep-uploads --index %s' removes "
                       "it): %s", uri, gallery.root, exc)


def _remove_unused_upload(gallery: Gallery, uri: str) -> None:
    """Delete the upload object ``uri`` of an S3 store when no reference uses it. Under the gallery's whole write
    hold, not ``local=True``: the object is shared by every machine of the store, and an add on another machine
    commits its rows under the store's lease, not this folder's ``flock``; holding the lease makes the check and
    the delete one step against every machine's commits (an add that put the same bytes before and commits after
    puts them again: :func:`add_photos`). The store is re-read first: a commit another machine made within
    ``refresh_s`` is seen (a server's look that does not answer in time: the object stays, for the sweep); every
    spelling of the URI a row may hold counts (:func:`index.objects.spellings`). The lease is checked right before
    the delete: lost meanwhile, the object stays (logged), for ``index sweep-uploads``."""
    assert gallery.objects is not None
    with gallery.writing():
        gallery.refresh(force=True)
        if gallery.reading_stale:  # a server's look not answered in time: the store not re-read (re-read 4 #2)
            logger.info("did not remove %s now: the store did not answer in time, so a reference another machine "
                        "committed may use it; it stays, harmless, and 'speciesid index sweep-uploads --index %s' "
                        "removes it once it is unused and older than a day", uri, gallery.root)
            return
        if any(gallery.store.uses_source(text) for text in spellings(uri)):  # s3a:// rows name it too
            return
        try:  # the reads above may have outlasted the lease: another machine's add may have committed meanwhile
            write_lock(gallery.layout.write_lock).check()
        except LeaseLostError as exc:
            logger.warning("did not remove %s, which no reference used when looked at: this writer lost the store's "
                           "lease before the delete (%s), so another machine may use it now; it stays, harmless, "
                           "and 'speciesid index sweep-uploads --index %s' removes it once it is unused and older "
                           "than a day", uri, exc, gallery.root)
            return
        gallery.objects.delete(uri)
        logger.info("removed %s: no reference uses it any more", uri)


_EXTENSIONS = {fmt: exts[0] for fmt, exts in PHOTO_FORMATS.items()}  # a kept upload's file name


def delete_references(gallery: Gallery | Identifier | str | Path, ids: Sequence[int]) -> list[int]:
    """Delete references by id; returns the ids that existed (and are gone now). A photo the API stored
    (``uploads/``, or in an S3 store its ``_speciesid/uploads/``) is removed with its last reference."""
    g = _gallery(gallery)
    ids = list(dict.fromkeys(int(i) for i in ids))
    meta = g.store.metadata(ids)
    found = g.delete(ids)
    uploads = g.layout.uploads.resolve()
    kept = uploads_uri(g.objects.uri) + "/" if g.objects is not None else None
    for text in set(meta["source_path"]) if found else ():
        # an object of the S3 store is every machine's: checked and deleted under the store's lease, not the
        # folder's flock alone (writing(local=True) below), which no other machine's add commits under. Compared
        # in one spelling: a row written through an s3a:// name of the store names the same object
        if kept is not None and canonical_s3_uri(str(text)).startswith(kept):
            _remove_unused_upload_after_commit(g, canonical_s3_uri(str(text)))  # rows gone: a failure is a warning
            continue
        path = source_file(str(text))
        with g.writing(local=True):  # an add of the same bytes commits under this lock too: never both
            if path.parent.resolve() == uploads and not g.store.uses_source(str(text)):
                path.unlink(missing_ok=True)
                logger.info("removed %s: no reference uses it any more", path)
    if found:
        refresh_gallery_metric(g)
        if len(g) == 0:  # identify, search and probe train refuse it now: said at once, not at the next identify
            logger.warning("gallery %s holds no searchable reference now: identify and probe train refuse it until "
                           "photos are added ('speciesid references add' or 'speciesid index build')", g.root)
        else:
            warn_species(g, only_one=True)  # left with one species: it cannot tell species apart
    existed = set(meta.index.tolist())
    return [i for i in ids if i in existed]


def sweep_uploads(gallery: Gallery | Identifier | str | Path, *, older_than_s: float = SWEEP_GRACE_S,
                  dry_run: bool = False, progress: bool = True) -> SweepReport:
    """Remove the gallery's uploads no reference uses, older than ``older_than_s`` (the store's on S3, the folder's
    ``uploads/``): :func:`index.objects.sweep_uploads`, with progress bars over the store's listing and the
    removals."""
    from tqdm.auto import tqdm

    def bar(listing: Iterator[StoredObject]) -> Iterator[StoredObject]:
        yield from tqdm(listing, desc="listing the store's uploads", unit="object", disable=not progress,
                        leave=False)

    def removing(total: int) -> tqdm:
        return tqdm(total=total, desc="removing unused uploads", unit="upload", disable=not progress, leave=False)

    return sweep_gallery_uploads(_gallery(gallery), older_than_s=older_than_s, dry_run=dry_run, progress=bar,
                                 removing=removing)


def list_species(gallery: Gallery | Identifier | str | Path) -> list[SpeciesSummary]:
    """The gallery's species with reference counts and metadata, sorted by name."""
    return _gallery(gallery).species()


@dataclass(frozen=True)
class VenomSet:
    """What :func:`set_species_venomous` did."""

    species: str  # the gallery's own spelling of the name
    was: bool | None  # the species' venomous flag before (None: not recorded)
    now: bool  # the flag it has now
    references: int  # references of the species (excluded ones too), every one set
    changed: int = 0  # of those, the ones that said otherwise (0: every one said so already, nothing written)
    turned_off: int = 0  # of those, the ones that said yes (a "no" that made them harmless; excluded ones too)


class SpeciesNotFound(ValueError):
    """:func:`set_species_venomous` was given a name the gallery does not hold (the API answers it 404)."""


#: How the API's set-venom (``PUT /v1/species/{name}/venomous``) is told to confirm a harmless flag
#: (:func:`index.taxonomy.check_harmless_flag`'s ``confirm``).
API_CONFIRM_HARMLESS = 'send "distinct_from_venomous": true beside "venomous": false in the JSON body'


#: A species' recorded venom status, as a refused set-venom says it stays (:func:`check_harmless_flag`'s ``status``).
RECORDED = {True: "recorded venomous", False: "recorded harmless",
            None: "not recorded: answers treat it as possibly venomous"}


def _venom_target(g: Gallery, name: str, venomous: bool, *, distinct_from_venomous: bool,
                  api: bool) -> SpeciesSummary:
    """The gallery species ``name`` is, refused as :func:`set_species_venomous` refuses it (its first part)."""
    where, listing = ("this gallery", "GET /v1/species") if api else (
        f"gallery {g.root}", f"'speciesid species list --index {g.root}'")
    held, common_names = g.species_names()  # one version, one store round trip at most
    found = find_species(held, name, folded=True)  # "Vipere a cornes" finds "Vipère à cornes"
    if found is None:
        same_common, close = gallery_lookalikes(held, name)
        meant = list(dict.fromkeys(s.species for s in same_common + close))
        raise SpeciesNotFound(f"no species {name!r} in {where}"
                              + (f"; did you mean {' or '.join(map(repr, meant))}?" if meant else "")
                              + f" ({listing} lists them)")
    if venomous is False:
        check_harmless_flag(found.species, found.common_name,  # recorded no already: confirmed when recorded
                            distinct=distinct_from_venomous or found.venomous is False,
                            gallery_species=held, common_names=common_names,
                            status=RECORDED[found.venomous],  # no flag to leave out: it stays
                            confirm=API_CONFIRM_HARMLESS if api else CONFIRM_HARMLESS)
    return found


def check_species_venomous(gallery: Gallery | Identifier | str | Path, name: str, venomous: bool, *,
                           distinct_from_venomous: bool = False, api: bool = False) -> None:
    """Refuse what :func:`set_species_venomous` would refuse (a name the gallery does not hold, a harmless flag the
    rule refuses), with no lock: a caller that waits for the gallery's write lock (the API) answers a misspelt name
    or a refused flag at once. :func:`set_species_venomous` checks again under the lock."""
    _venom_target(_gallery(gallery), name, venomous, distinct_from_venomous=distinct_from_venomous, api=api)


def set_species_venomous(gallery: Gallery | Identifier | str | Path, name: str, venomous: bool, *,
                         distinct_from_venomous: bool = False, api: bool = False) -> VenomSet:
    """Set the medically-important-venomous flag of a gallery species, on every one of its references, with no
    photo (``speciesid species set-venom``, the API's ``PUT /v1/species/{name}/venomous``): how a species a folder
    dataset built gets a venom status, or a toad's flag says "no". ``name`` in any spelling of a gallery species
    (case, ``_``, ``-``). Refused: a name the gallery does not hold (:class:`SpeciesNotFound`, naming the species it
    may mean), and ``no`` for a species the shipped snake taxonomy records as medically important venomous (the rule
    of ``references add --venomous no``), or for a name that may be one (a near-spelling, its common name, its
    epithet, one of no other genus there) unless ``distinct_from_venomous``
    (:func:`index.taxonomy.check_harmless_flag`: :class:`~index.taxonomy.HarmlessFlagRefused`). A recorded yes
    turned no is logged as a warning naming the change (its answers stop advising on a bite by it). ``api``: the
    messages name no server path, and say what an HTTP client sends and where it lists the species."""
    g = _gallery(gallery)
    found = _venom_target(g, name, venomous, distinct_from_venomous=distinct_from_venomous, api=api)
    count, changed, turned_off = g.set_venomous(found.species, venomous)
    if not count:  # deleted by another writer since the list was read
        raise SpeciesNotFound(f"no species {found.species!r} in {'this gallery' if api else f'gallery {g.root}'} "
                              "any more (another writer deleted it)")
    if turned_off:  # the one edit that can make an answer harmless: said, not asked (excluded rows counted too)
        logger.warning("%r was recorded medically important venomous by %s and is now recorded harmless "
                       "(venomous yes -> no): answers naming it no longer advise treating a bite as venomous; if "
                       "that is wrong, 'speciesid species set-venom --index %s \"%s\" yes' restores it",
                       found.species, "its references" if found.venomous else
                       f"{turned_off} of its references (excluded ones: answers use them once restored)",
                       g.root, found.species)
    return VenomSet(found.species, found.venomous, venomous, count, changed, turned_off)


@dataclass(frozen=True)
class VenomAdviceSet:
    """What :func:`set_venom_advice` did."""

    was: bool  # venom advice was on
    now: bool  # it is on now (as recorded)
    note: str | None  # what to know of it (:func:`retrieval.advice.venom_advice_hint`), None when nothing


def _venom_taxa(g: Gallery, held: list[SpeciesSummary] | None = None,
                prior: list[SpeciesSummary] | None = None) -> list[SpeciesSummary]:
    """The species whose venom flags count for a gallery, as its answers count them
    (:meth:`retrieval.identify.Identifier.taxa`): its own (``held``: ``g.species()`` when None) and its text
    prior's, with the flags its ``text_prior.json`` records, as its answers take that prior
    (:func:`retrieval.textprior.text_prior_taxa`).
    The one reading of an add's venom note, the refusal of venom advice off (``index venom-advice off``, ``index
    build --no-venom-advice``) and its hint. ``prior``: ``text_prior_taxa``'s, where already read."""
    held = g.species() if held is None else held
    names = {s.species for s in held}
    return held + [t for t in (text_prior_taxa(g.root) if prior is None else prior) if t.species not in names]


def venom_advice_note(gallery: Gallery | Identifier | str | Path,
                      taxa: list[SpeciesSummary] | None = None) -> str | None:
    """What to tell of a gallery's venom advice (:func:`retrieval.advice.venom_advice_hint`: on for a gallery none
    of whose species the shipped snake taxonomy knows; off while a species is recorded venomous), None when
    nothing: said at the end of ``index build`` and in ``index info``. ``taxa``: :func:`_venom_taxa`'s, where
    already read."""
    g = _gallery(gallery)
    return venom_advice_hint(g.info, _venom_taxa(g) if taxa is None else taxa, g.root)


def refuse_venom_advice_off(root: str | Path, venomous: Sequence[str]) -> None:
    """Refuse (ValueError) recording a gallery's venom advice off while ``venomous`` (species it holds, its text
    prior's, or a build's) are recorded medically important venomous: its answers would keep the advice, and a
    record that says off outlives them. The rule of ``index venom-advice off`` and ``index build
    --no-venom-advice``."""
    if venomous:
        raise ValueError(f"gallery {root} holds species recorded medically important venomous "
                         f"({first_few(sorted(set(venomous)))}): its answers keep venom advice whatever it records, "
                         f"so it stays on; if one is not, 'speciesid species set-venom --index {root} NAME no' "
                         "records it (refused for a species the shipped snake taxonomy records as venomous)")


def refuse_gallery_venom_advice_off(g: Gallery) -> None:
    """:func:`refuse_venom_advice_off` for the species ``g`` holds and its text prior's (:func:`_venom_taxa`)."""
    refuse_venom_advice_off(g.root, recorded_venomous(_venom_taxa(g)))


def set_venom_advice(gallery: Gallery | Identifier | str | Path, on: bool | None) -> VenomAdviceSet:
    """Record whether the gallery's answers give venom advice (``speciesid index venom-advice``), in its
    ``gallery.json`` (the folder's write lock, the file re-read first); ``on`` None: read it, change nothing. A
    running server follows at its next look at the gallery. ``off`` is refused (ValueError) while a species is
    recorded medically important venomous: its answers would give the advice all the same."""
    g = _gallery(gallery)
    was = venom_advice_on(g.info)
    if on is False:
        refuse_gallery_venom_advice_off(g)
    if on is not None:
        record_venom_advice(g, on)
    return VenomAdviceSet(was, venom_advice_on(g.info), venom_advice_note(g))


def gallery_info(gallery: Gallery | Identifier | str | Path) -> dict[str, object]:
    """What a gallery holds, which encoder built it, and its store: where it is, leftover build journals, and on
    S3 the write lease's holder and the shared id mark (:func:`index.status.store_status`), and its probe (which
    one, and on S3 whether it is the store's copy: :func:`_probe_info`). A store that cannot be opened: what the
    folder knows, with ``store.error`` (:func:`index.status.folder_status`). ``build``: whether the last build into
    the gallery completed (:func:`index.build_mark.build_status`: a partial gallery says so)."""
    try:
        g = _gallery(gallery)
    except StoreOpenError as exc:  # the store unreachable or refused: what the folder knows, and the store's error
        folder = cast("str | Path", gallery)  # only a folder is opened: a Gallery (an Identifier's) is open already
        return folder_status(folder, exc) | {
            "build": build_status(folder), **embedding_info(read_gallery_info(folder))}
    species, prior = g.species(), text_prior_taxa(g.root)  # each read once; the prior as answers take it
    return {"index": str(g.root), "encoder": g.info["encoder"], "references": len(g),
            "excluded": g.store.count(include_excluded=True) - g.store.count(), "species": len(species),
            "index_kind": g.index.kind, "store_version": g.store.version, **_calibration_info(g),
            "store": store_status(g) | {"fragments": _fragments_info(g)}, "probe": _probe_info(g),
            "build": build_status(g.root, references=g.store.count(include_excluded=True)),
            **embedding_info(g.info, len(g)),
            WRITTEN_BY: g.info.get(WRITTEN_BY),
            "uploads": unused_uploads(g),  # photos an add cut off left: what `index sweep-uploads` would take
            **_checklist_info(g, species, prior),
            "species_notes": species_notes({s.species: s.count for s in species}),
            VENOM_ADVICE_KEY: {"on": venom_advice_on(g.info),
                               "note": venom_advice_note(g, _venom_taxa(g, species, prior)) or ""}}


def _checklist_info(g: Gallery, species: list[SpeciesSummary], prior: list[SpeciesSummary]) -> dict[str, object]:
    """The ``checklist`` block of ``index info`` (:func:`retrieval.advice.checklist_coverage`), for a gallery of a
    checklist: which of its species it cannot name (no photos, not in its text prior); ``species``: the gallery's,
    ``prior``: its text prior's (:func:`retrieval.textprior.text_prior_taxa`)."""
    held = [s.species for s in species if s.count > 0]
    coverage = checklist_coverage(g.info, held, [t.species for t in prior])
    return {"checklist": coverage.to_dict()} if coverage is not None else {}


def _calibration_info(g: Gallery) -> dict[str, object]:
    """An IVF-PQ index's search calibration for ``index info`` (``index_calibration``: nprobe, the recall@10 it gave
    on stored vectors, the target and whether it was reached); nothing for the other kinds."""
    calibration = getattr(g.index, "calibration", None) or {}
    keep = ("nprobe", "recall_at_10", "target", "target_reached")
    return {"index_calibration": {k: calibration[k] for k in keep if k in calibration}} if calibration else {}


def _fragments_info(g: Gallery) -> dict[str, object]:
    """The store's fragments for ``index info``: how many, how many small (``speciesid index compact`` merges them;
    a write does once ``compact_every`` more have piled up than the last compaction left: the setting of the
    process that reads it, SPECIESID_COMPACT_FRAGMENTS, which a running server may have set otherwise), and the
    versions kept (None on an object store: not counted)."""
    stats = g.store.fragment_stats(versions=True)
    return {"fragments": stats.fragments, "small": stats.small, "versions": stats.versions,
            "compact_every": g.compact_fragments}


@dataclass
class CompactResult:
    """What :func:`compact_gallery` did: the store before and after, and the compaction's report."""

    gallery: Gallery
    before: FragmentStats  # fragments and versions kept before
    after: FragmentStats  # and after
    report: CompactReport


def compact_gallery(index: str | Path, *, prune_older_than: dt.timedelta | None = None) -> CompactResult:
    """Merge the small fragments of a gallery's store and prune its versions superseded longer ago than
    ``prune_older_than`` (:meth:`index.gallery.Gallery.compact`, under the write lock; on S3 the store's lease)."""
    gallery = Gallery.open(folder_arg(index, "compact_gallery"))
    before = gallery.store.fragment_stats(versions=True)
    report = gallery.compact(prune_older_than=prune_older_than)
    return CompactResult(gallery, before, gallery.store.fragment_stats(versions=True), report)


def _probe_info(g: Gallery) -> dict[str, object]:
    """The ``probe`` block of ``index info``: the folder's probe (:func:`retrieval.probe_share.probe_status`; one
    that does not load: ``loaded`` false and its ``error``), and on S3 the store's copy, looked at now."""
    probe, error = None, None
    if has_probe(g.root):
        try:
            probe = LinearProbe.load(g.root, expected_fingerprint=g.fingerprint)
        except (OSError, ValueError, KeyError) as exc:  # EncoderMismatchError is a ValueError
            error = first_line(exc, 500)
    block = probe_status(probe, g, look=True)
    if error:
        block["error"] = error
    return block


def _gallery(gallery: Gallery | Identifier | str | Path) -> Gallery:
    """An open gallery (an Identifier's own), or the one at a folder, opened; TypeError saying what to pass for
    anything else."""
    if isinstance(gallery, Gallery):
        return gallery
    if isinstance(gallery, Identifier):
        return gallery.gallery
    if not isinstance(gallery, (str, os.PathLike)):
        raise TypeError(f"pass a Gallery, an Identifier or the gallery's folder (a str or Path), not a "
                        f"{type(gallery).__name__}")
    return Gallery.open(gallery)


# ---------------------------------------------------------------------------------------------- clean
#: Check a dataset or a gallery's references, report, optionally exclude what was found (see ``run_clean``).
clean = run_clean


def restore_exclusions(index: str | Path, which: str = "last") -> tuple[Gallery, int]:
    """Bring back the references a ``clean --apply`` run excluded (``last``), or every one (``all``)."""
    gallery = Gallery.open(folder_arg(index, "restore_exclusions"))
    restored = exclusions.restore(gallery, which)
    if restored:
        refresh_gallery_metric(gallery)
    return gallery, restored

