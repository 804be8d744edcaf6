"""Cleaning a dataset or a gallery: run the checks of :mod:`retrieval.findings`, report, exclude reversibly.

:func:`run_clean` checks a dataset or a gallery's references (optionally against an evaluation set for
leakage) and writes the report (:mod:`retrieval.clean_report`); with ``apply`` the findings' references are
excluded from the gallery through :mod:`index.exclusions` (nothing is deleted; ``clean --restore`` undoes
it). :func:`clean_built_gallery` is the zero-shot filter of ``index build --clean``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from index.datasets import DatasetScan, load_dataset, require_records
from index.exclusions import exclude
from index.gallery import Gallery, read_gallery_info
from index.interrupts import held_interrupt
from index.layout import GalleryLayout
from index.photos import first_few, not_photos_warning, scan_photos, warn_skipped
from index.sources import read_source
from index.text import printable
from retrieval.clean_report import write_report
from retrieval.encoders import (
    Encoder,
    EncoderConfig,
    create_encoder_from_config,
)
from retrieval.findings import (
    APPLY_KINDS,
    KINDS,
    CleanConfig,
    Finding,
    PhotoSet,
    ZeroShotResult,
    check_apply_kinds,
    check_photos,
    unfindable_kinds,
    unfindable_text,
)
from retrieval.images import sha256_bytes
from retrieval.pipeline import Embedded, default_workers, embed_photos, read_error
from retrieval.probe import has_probe
from retrieval.probe_flows import refresh_gallery_metric

logger = logging.getLogger(__name__)


@dataclass
class ApplyResult:
    """What ``apply_exclusions`` did."""

    excluded: list[int] = field(default_factory=list)  # ids newly excluded
    already: int = 0  # flagged references that were excluded before
    not_in_gallery: int = 0  # findings of the chosen kinds whose photo is not a reference of the gallery
    kept_last: list[str] = field(default_factory=list)  # species whose every reference was flagged: one kept


@dataclass
class CleanResult:
    """What a cleaning run found (and did)."""

    findings: list[Finding]
    photos: PhotoSet
    against: PhotoSet | None
    encoder: str  # spec of the encoder used
    zero_shot: ZeroShotResult | None
    zero_shot_notice: str | None  # why the zero-shot filter did not run
    config: CleanConfig
    seconds_embed: float = 0.0
    seconds_rest: float = 0.0  # prompts, zero-shot scoring, duplicate search, --apply
    seconds_report: float = 0.0  # writing the CSV, contact sheet (thumbnails) and summary
    files: dict[str, Path] = field(default_factory=dict)
    applied: ApplyResult | None = None
    notes: list[str] = field(default_factory=list)  # what the user should do next (printed last)
    index: str | None = None  # the gallery cleaned or applied to, when there is one
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # entries the photo search could not read
    # a photo's bytes from its path, for the contact sheet: the gallery's read_photo (an upload kept in an S3 store)
    read: Callable[[str], bytes] | None = field(default=None, repr=False, compare=False)

    def counts(self) -> dict[str, int]:
        """Findings per kind (every kind listed)."""
        return {k: sum(f.kind == k for f in self.findings) for k in KINDS}

    def summary(self) -> str:
        """A human-readable paragraph."""
        c = self.counts()
        n = len(self.photos)
        embedded = self.photos.embedded + (self.against.embedded if self.against is not None else 0)
        total = n + (len(self.against) if self.against is not None else 0)
        failed = sum(e is not None for e in self.photos.errors) + (
            sum(e is not None for e in self.against.errors) if self.against is not None else 0
        )
        reused = total - embedded - failed
        lines = []
        if self.zero_shot_notice:
            lines.append(f"notice: {self.zero_shot_notice}")
            if not self.config.duplicates and not self.config.suspect_labels:
                return lines[0]  # nothing ran
        lines.append(
            f"cleaned {n} photos" + (f" against {len(self.against)} others" if self.against is not None else "")
            + f" with {self.encoder} in {self.seconds_embed + self.seconds_rest:.1f} s "
            f"(embedding {self.seconds_embed:.1f} s: {embedded} photos through the encoder"
            + (f", {reused} read from the gallery's store: photos, of either set, whose bytes it holds)" if reused
               else ")")
        )
        if self.zero_shot is not None:
            lines.append(
                f"off-target (p >= {self.config.threshold:g}, prompts {self.zero_shot.prompts.source}): "
                f"{c['off-target']} of {int(self.photos.ok.sum())} photos"
            )
        if self.config.duplicates:
            lines.append(
                f"duplicates: {c['duplicate']} same bytes, {c['near-duplicate']} near "
                f"(cosine >= {self.config.dup_threshold:g})"
            )
            if c["label-conflict"]:
                pairs = c["label-conflict"]
                lines.append(f"label conflicts: {pairs} pair{'' if pairs == 1 else 's'} of photos filed under two "
                             "species (the same or near-identical photo): check them by hand, one label is wrong")
            if self.against is not None:
                near = [f.score for f in self.findings if f.kind == "near-leak"]
                span = f", similarity {min(near):.3f}-{max(near):.3f}" if near else ""
                lines.append(f"leaks: {c['leak']} same bytes, {c['near-leak']} near-identical{span}")
        if self.config.suspect_labels:
            lines.append(
                f"suspect labels: {c['suspect-label']} photo{'' if c['suspect-label'] == 1 else 's'} whose "
                f"{self.config.suspect_k} nearest other photos all carry one other species (report only, never "
                "excluded: check them by hand)"
            )
        if c["unreadable"]:
            lines.append(f"unreadable: {c['unreadable']}" + (
                f" ({len(self.skipped)} skipped by the photo search, e.g. broken links: "
                + first_few([printable(p) for p, _ in self.skipped]) + ")" if self.skipped else ""))
        if self.files:
            lines.append("report: " + ", ".join(printable(p) for p in self.files.values()))
        lines.extend(self.applied_lines())
        return "\n".join(lines)

    def applied_lines(self) -> list[str]:
        """:meth:`summary`'s last lines, from what ``--apply`` did on (its notes included): what a run interrupted
        once it applied says (:class:`CleanInterrupted`)."""
        lines = []
        if self.applied is not None:
            a = self.applied
            lines.append(
                f"applied: {len(a.excluded)} references excluded ({a.already} already excluded, "
                f"{a.not_in_gallery} findings not in the gallery)" + (
                    f"; undo with 'speciesid clean --restore --index {self.index}'" if a.excluded else
                    "; nothing to undo (no run logged: --restore would undo an earlier one)")
            )
            if a.kept_last:
                lines.append(f"kept: every reference of {', '.join(a.kept_last)} was flagged; the oldest of each is "
                             "kept so no species disappears (check those findings by hand)")
        lines.extend(f"note: {n}" for n in self.notes)
        return lines


class CleanInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``clean --apply`` once references were excluded: ``result`` says what was applied
    (:meth:`CleanResult.applied_lines`, its notes: the probe trained with them); ``report``: the report folder,
    which was not written whole (None: no report was asked for)."""

    def __init__(self, result: CleanResult, report: str | Path | None) -> None:
        super().__init__(f"interrupted once {len(result.applied.excluded) if result.applied else 0} references "
                         "were excluded")
        self.result = result
        self.report = report


def apply_exclusions(
    gallery: Gallery,
    findings: Sequence[Finding],
    kinds: Sequence[str] = ("off-target",),
    *,
    report: str | Path | None = None,
) -> ApplyResult:
    """Exclude the references of the findings of ``kinds`` (searchable again after ``restore_exclusions``).

    Duplicates and near-duplicates: the oldest reference (lowest id) of copies is kept and those that are copies
    of a kept one are excluded (a chain of look-alikes, A ~ B ~ C with A and C apart, keeps A and C); leaks and
    off-target photos exclude the gallery's reference. Label conflicts and suspect labels are never acted on (asking
    for them is refused: :func:`retrieval.findings.check_apply_kinds`). A species is never left without a
    searchable reference: when every one of its references is flagged, its oldest is kept and the species named in
    ``kept_last``. The ids newly excluded are logged as one run in the gallery's exclusion log
    (:mod:`index.exclusions`).
    """
    check_apply_kinds(kinds)
    wanted: set[int] = set()
    result = ApplyResult()
    copies: list[tuple[int, int]] = []
    for f in findings:
        if f.kind not in kinds:
            continue
        if f.reference_id is None:
            result.not_in_gallery += 1
        elif f.kind in ("duplicate", "near-duplicate"):
            if f.paired_reference_id is None:
                result.not_in_gallery += 1  # its twin is not a reference: this is the gallery's only copy
            elif f.paired_reference_id != f.reference_id:  # two files with the same bytes are one reference
                copies.append((f.reference_id, f.paired_reference_id))
    wanted.update(_all_but_oldest(copies))
    wanted.update(f.reference_id for f in findings if f.kind in kinds and f.reference_id is not None
                  and f.kind not in ("duplicate", "near-duplicate"))
    if not wanted:
        return result
    wanted -= _last_of_their_species(gallery, wanted, result)
    result.excluded, result.already = exclude(gallery, sorted(wanted), kinds=kinds, report=report)
    if result.excluded:  # like any write: the whitened vote follows the searchable photos
        refresh_gallery_metric(gallery)
    return result


def _all_but_oldest(pairs: Sequence[tuple[int, int]]) -> set[int]:
    """Ids to exclude among copies (``pairs``): oldest first, a photo is kept unless it is a copy of a photo kept
    already. Only direct copies are excluded: connected groups would let a chain of look-alikes, each a little
    different from the last, take a whole species with it."""
    copies: dict[int, set[int]] = {}
    for a, b in pairs:
        copies.setdefault(a, set()).add(b)
        copies.setdefault(b, set()).add(a)
    kept: set[int] = set()
    out: set[int] = set()
    for node in sorted(copies):
        (out if copies[node] & kept else kept).add(node)
    return out


def _last_of_their_species(gallery: Gallery, wanted: set[int], result: ApplyResult) -> set[int]:
    """Of ``wanted``, the oldest reference of each species whose every searchable reference is in ``wanted``
    (those species are named in ``result.kept_last``)."""
    meta = gallery.store.metadata(sorted(wanted))
    by_species: dict[str, list[int]] = {}
    for i, sp, gone in zip(meta["id"], meta["species"], meta["excluded"].fillna(False), strict=True):
        if not gone:  # excluded before: not searchable now either
            by_species.setdefault(str(sp), []).append(int(i))
    searchable = {s.species: s.count for s in gallery.store.species()}
    keep = set()
    for sp, flagged in sorted(by_species.items()):
        if searchable.get(sp, 0) and len(flagged) >= searchable[sp]:
            keep.add(min(flagged))
            result.kept_last.append(sp)
            logger.warning("every reference of %s was flagged: its oldest (#%d) is kept, so the species stays "
                           "searchable; check the findings by hand", sp, min(flagged))
    return keep


def run_clean(
    *,
    dataset: str | None = None,
    root: str | Path | None = None,
    metadata: str | Path | None = None,
    index: str | Path | None = None,
    against: str | Path | None = None,
    encoder: EncoderConfig | Encoder | None = None,
    config: CleanConfig | None = None,
    report_dir: str | Path | None = None,
    apply: bool = False,
    apply_kinds: Sequence[str] = ("off-target",),
    workers: int | None = None,
    progress: bool = True,
) -> CleanResult:
    """Check a dataset (``dataset`` + ``root``) or a gallery's references (``index`` alone) and report.

    ``encoder`` is a config or a loaded encoder. With ``index``, findings map to the gallery's references by
    sha256; the encoder's unset options are the gallery's own: with its own encoder, its stored embeddings are reused.
    ``against`` is a folder of photos (any layout) checked for leakage into the set. ``apply`` excludes the
    references of the findings of ``apply_kinds`` from the gallery (reversible: :func:`restore_exclusions`).
    """
    config = config or CleanConfig()
    if (dataset is None) != (root is None):
        raise ValueError("--dataset and --root go together (or give neither and --index to clean a gallery)")
    if dataset is None and index is None:
        raise ValueError("say what to clean: --dataset and --root, or --index DIR (a gallery's references)")
    if apply and index is None:
        raise ValueError("--apply needs --index DIR: the gallery whose references are to be excluded")
    check_apply_kinds(apply_kinds)
    against_paths = None
    skipped: list[tuple[Path, str]] = []  # entries the photo search could not read: reported as unreadable
    if against is not None:
        if not Path(against).is_dir():
            raise ValueError(f"{against} is not a folder of photos (--against)")
        found = scan_photos(against)
        warn_skipped(found.skipped, against)
        if found.not_photos:  # named, never dropped silently (a leak among them would not be found)
            logger.warning("%s", not_photos_warning(found.not_photos, against, against))
        against_paths = found.photos
        skipped.extend((p, "against: " + why) for p, why in found.skipped)
        if not against_paths:
            raise ValueError(f"no photos under {against} (--against)")

    gallery, enc, reuse = _resolve_encoder(index, encoder)
    if config.zero_shot and not enc.supports_text:  # refused before any photo is embedded for nothing
        if not config.duplicates and not config.suspect_labels:
            raise ValueError(f"nothing to check: encoder {enc.spec} is image-only, so the zero-shot filter cannot run, "
                             "and --no-duplicates with --no-suspect-labels turns off the other checks; use a "
                             "text-capable encoder (bioclip)")
        if config.prompts is not None:
            raise ValueError(f"--prompts needs an encoder that reads text (such as bioclip); {enc.spec} is image-only. "
                             "Leave --prompts out to check duplicates and leaks only")
    unfindable = unfindable_kinds(APPLY_KINDS, config, enc, against=against is not None) if apply else {}
    cannot = {k: unfindable[k] for k in dict.fromkeys(apply_kinds) if k in unfindable}
    if cannot and len(cannot) == len(set(apply_kinds)):  # refused before any photo is embedded for nothing
        found = [k for k in APPLY_KINDS if k not in unfindable]
        raise ValueError(f"--apply would exclude nothing: it acts on {', '.join(cannot)} findings (--apply-to, "
                         f"default off-target), which this run cannot find: {unfindable_text(cannot)}"
                         + (f"; what it finds: --apply-to {','.join(found)}" if found else ""))
    t0 = time.perf_counter()
    cache, known, stored, dataset_name = None, {}, None, None
    read = gallery.read_photo if gallery is not None else read_source  # a stored upload in an S3 store too
    lookup = gallery is not None and dataset is not None  # only the photos' own digests: never the whole table
    if lookup:
        scan = load_dataset(dataset, root, metadata=metadata)  # type: ignore[arg-type]
    elif gallery is not None:  # the gallery itself: every row, read as column arrays
        ids_all, vec_all = gallery.store.vectors(include_excluded=True)
        meta = gallery.store.metadata().loc[ids_all]
        shas_all = meta["sha256"].astype(str).tolist()
        known = dict(zip(shas_all, (int(i) for i in ids_all), strict=True))
        cache = (shas_all, vec_all) if reuse else None
        stored = (meta["source_path"].astype(str).tolist(), [int(i) for i in ids_all],
                  meta["species"].astype(str).tolist())
        datasets = meta["dataset"].dropna()
        dataset_name = str(datasets.mode().iloc[0]) if len(datasets) else None

    def embed(paths: Sequence[str | Path], desc: str, use_cache: bool = True) -> Embedded:
        if lookup:  # each photo read once: hashed, looked up in the store, decoded from the same bytes
            return _embed_looking_up(gallery, paths, enc, read, known,  # type: ignore[arg-type]
                                     reuse=reuse, workers=workers, progress=progress, desc=desc)
        return embed_photos(list(paths), enc, cache=cache if use_cache else None, workers=workers,
                            progress=progress, desc=desc, read=read)

    if dataset is not None:
        if gallery is None:
            scan = load_dataset(dataset, root, metadata=metadata)  # type: ignore[arg-type]
        for warning in scan.warnings:
            logger.warning("%s", warning)
        require_records(scan)
        skipped[:0] = scan.skipped
        done = embed([r.path for r in scan.records], "cleaning: embedding")
        photos = PhotoSet.from_embedded([r.path for r in scan.records], done, [known.get(s or "") for s in done.sha256],
                                        [r.species for r in scan.records])
        dataset_name = scan.name
    elif reuse:
        photos = PhotoSet(stored[0], list(shas_all), vec_all, [None] * len(ids_all), stored[1], stored[2], 0)
    else:
        photos = PhotoSet.from_embedded(stored[0], embed(stored[0], "cleaning: embedding", False), stored[1], stored[2])
    other = None
    if against_paths is not None:
        done = embed(against_paths, "cleaning: against")
        other = PhotoSet.from_embedded(against_paths, done, [known.get(s or "") for s in done.sha256])
    t1 = time.perf_counter()
    findings, zs, notice = check_photos(photos, enc, config, against=other, dataset=dataset_name,
                                        prompt_cache=GalleryLayout(index).prompt_cache if index is not None else None,
                                        progress=progress, skipped=skipped)
    result = CleanResult(findings=findings, photos=photos, against=other, encoder=enc.spec, zero_shot=zs,
                         zero_shot_notice=notice, config=config, seconds_embed=t1 - t0,
                         index=str(index) if index is not None else None, skipped=skipped,
                         read=gallery.read_photo if gallery is not None else None)
    if apply:
        if cannot:
            result.notes.append(f"--apply-to {', '.join(cannot)} excluded nothing, this run cannot find them "
                                f"({unfindable_text(cannot)})")
        # a Ctrl-C meanwhile waits for the exclusion and its log entry, then says what was applied (a second: now)
        with held_interrupt("excluding the flagged references, then stopping", reraise=False) as held:
            result.applied = apply_exclusions(gallery, findings, apply_kinds, report=report_dir)
            if result.applied.excluded and has_probe(index):
                result.notes.append(f"the probe of {index} was trained with the excluded references; retrain it "
                                    f"with 'speciesid probe train --index {index}'")
        if held.came:
            if result.applied.excluded:
                raise CleanInterrupted(result, report_dir)
            raise KeyboardInterrupt
    result.seconds_rest = time.perf_counter() - t1
    if report_dir is not None:
        title = "speciesid clean: " + (f"{dataset} {root}" if dataset else f"gallery {index}")
        try:
            result.files = write_report(report_dir, result, title=title, progress=progress)
        except KeyboardInterrupt as interrupt:  # what was applied is said, not only "interrupted"
            if result.applied is not None and result.applied.excluded:
                raise CleanInterrupted(result, report_dir) from interrupt
            raise
        result.seconds_report = time.perf_counter() - t1 - result.seconds_rest
    return result


#: Photos read, hashed and looked up in the store at a time by :func:`_embed_looking_up` (their bytes held meanwhile).
LOOKUP_CHUNK = 256


def _read_or_why(read: Callable[[str | Path], bytes], path: str | Path) -> bytes | str:
    """A photo's bytes, or why it cannot be read (:func:`retrieval.pipeline.read_error`)."""
    try:
        return read(path)
    except OSError as exc:
        return read_error(exc)


def _embed_looking_up(gallery: Gallery, paths: Sequence[str | Path], enc: Encoder,
                      read: Callable[[str | Path], bytes], known: dict[str, int], *, reuse: bool,
                      workers: int | None = None, progress: bool = False, desc: str = "embedding") -> Embedded:
    """Embed photos that the gallery may store already, reading each file once: :data:`LOOKUP_CHUNK` photos at a
    time are read, hashed and looked up in the store (one ``sha256 IN`` query; ``known`` gains digest -> reference
    id), then decoded from the bytes read. With ``reuse`` (the gallery's own encoder) a stored photo's vector is
    taken from the store and not run through the encoder. Never reads the gallery's whole table."""
    n = len(paths)
    out = Embedded(np.zeros((n, enc.dim), dtype=np.float32), [None] * n, [None] * n)
    with tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="speciesid-read") as pool:
        for start in range(0, n, LOOKUP_CHUNK):
            got = list(pool.map(lambda p: _read_or_why(read, p), paths[start : start + LOOKUP_CHUNK]))
            rows, data = [], []  # the photos read (their rows in ``out``, their bytes); the others' errors kept
            for row, g in enumerate(got, start):
                if isinstance(g, bytes):
                    rows.append(row)
                    data.append(g)
                else:
                    out.errors[row] = g
            found = gallery.store.find_sha256([sha256_bytes(d) for d in data])
            known.update(found)
            cache = None
            if reuse and found:
                ids, vectors = gallery.store.vectors(ids=sorted(set(found.values())))
                by_id = {int(i): sha for sha, i in found.items()}
                cache = ([by_id[int(i)] for i in ids], vectors)
            done = embed_photos(data, enc, cache=cache, workers=workers)
            for r, row in enumerate(rows):
                out.embeddings[row], out.sha256[row], out.errors[row] = done.embeddings[r], done.sha256[r], \
                    done.errors[r]
            out.fresh += done.fresh
            bar.update(len(got))
    return out


def _resolve_encoder(
    index: str | Path | None, config: EncoderConfig | Encoder | None
) -> tuple[Gallery | None, Encoder, bool]:
    """(gallery or None, encoder, whether the gallery's stored embeddings are this encoder's)."""
    if isinstance(config, Encoder):
        enc = config
    else:  # unset options: the gallery's own (its stored embeddings reused), else a new gallery's defaults
        built = read_gallery_info(index)["encoder"] if index is not None else None
        enc = create_encoder_from_config((config or EncoderConfig()).resolved(built))
    if index is None:
        return None, enc, False
    gallery = Gallery.open(index)  # any encoder may clean a gallery; only the gallery's own reuses its store
    reuse = enc.fingerprint == gallery.fingerprint
    if not reuse:
        logger.info("encoder %s is not the gallery's (%s): every photo is embedded again", enc.spec,
                    gallery.encoder_spec)
    return gallery, enc, reuse


def clean_built_gallery(gallery: Gallery, encoder: Encoder, scan: DatasetScan, config: CleanConfig) -> CleanResult:
    """The zero-shot filter over a gallery just built (``index build --clean``): score its searchable
    references from the store, exclude the off-target ones, write the report."""
    config = replace(config, duplicates=False, suspect_labels=False)
    t0 = time.perf_counter()
    ids, vectors = gallery.store.vectors()
    meta = gallery.store.metadata(include_excluded=False).loc[ids]  # one read, then column arrays
    photos = PhotoSet(meta["source_path"].astype(str).tolist(), meta["sha256"].astype(str).tolist(), vectors,
                      [None] * len(ids), [int(i) for i in ids], meta["species"].astype(str).tolist())
    findings, zs, notice = check_photos(photos, encoder, config, dataset=scan.name,
                                        prompt_cache=gallery.layout.prompt_cache)
    if notice:
        notice = notice.replace("zero-shot filter skipped", "--clean skipped")
    result = CleanResult(findings=findings, photos=photos, against=None, encoder=encoder.spec, zero_shot=zs,
                         zero_shot_notice=notice, config=config, index=str(gallery.root), read=gallery.read_photo)
    report_dir = gallery.layout.clean_report
    if zs is not None:
        result.applied = apply_exclusions(gallery, findings, ("off-target",), report=report_dir)
    result.seconds_rest = time.perf_counter() - t0
    if zs is not None:
        result.files = write_report(report_dir, result, title=f"speciesid index build --clean: {gallery.root}")
    return result
