"""Calibrate a gallery's blend: train its linear probe (:func:`train_gallery_probe`) or use a fine-tuned network's
head as the probe (:func:`import_gallery_probe`); either keeps the probe it replaces, which
:func:`restore_gallery_probe` brings back; share it through an S3 store (:func:`publish_gallery_probe`) or withdraw
it from there (:func:`withdraw_gallery_probe`). ``retrieval.workflows`` offers them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from index.datasets import load_dataset
from index.gallery import Gallery
from index.layout import EncoderMismatchError, GalleryLayout, check_encoder, weights_digest, weights_only
from index.lease import LeaseError
from index.objects import probe_uri
from index.photos import first_few
from index.sources import absolute_path
from index.store import SpeciesSummary
from index.taxonomy import load_checklist
from retrieval.encoders import Encoder, EncoderConfig
from retrieval.galleries import config_arg, folder_arg, no_references_error, open_gallery
from retrieval.identify import fitted_whitening
from retrieval.metric import Whitening
from retrieval.pipeline import embed_photos
from retrieval.probe import (
    Calibration,
    LinearProbe,
    finish_interrupted_swap,
    fit_head_temperature,
    has_probe,
    keep_previous,
    now_utc,
    probe_origin,
    restore_previous,
    train_probe,
)
from retrieval.probe_share import ProbePublishInterrupted, publish_probe, withdraw_probe
from retrieval.protocol import (
    HELDOUT_FILE,
    HELDOUT_PREFIX,
    find_duplicates,
    heldout_positions,
    kinds_text,
    run_record,
    run_val_root,
    same_folder,
    without_copies,
)
from retrieval.textprior import build_text_prior, remove_text_prior, save_text_prior, text_prior_digest
from retrieval.whitening_sync import save_stats, stats_from_rows

logger = logging.getLogger(__name__)

#: ``probe import --blend-weight`` words: "auto" fixes the weight at the prior where the selection photos already
#: chose the fine-tuning run's epoch (or trained the head), else chooses it; "choose" always chooses it.
WEIGHT_RULES = ("auto", "choose")


@dataclass
class ProbeResult:
    """What ``train_gallery_probe`` / ``import_gallery_probe`` did."""

    probe: LinearProbe  # the probe (saved beside the gallery)
    seconds_select: float  # time spent choosing settings
    seconds_train: float  # time spent training the final probe
    text_species: int  # species covered by the text prior (0 when none)
    dropped: list[str] = field(default_factory=list)  # --val-root photos left out: the gallery holds them
    dropped_kinds: dict[str, int] = field(default_factory=dict)  # "same bytes" / "near-copy" -> count
    head_only: list[str] = field(default_factory=list)  # an imported head's species the gallery has no photo of
    gallery_only: list[str] = field(default_factory=list)  # the gallery's species the imported head does not name
    replaced: str = ""  # the probe this one replaced, in words (kept as probe.prev.*), "" when there was none
    shared: str = ""  # where the store shares it with other machines (its S3 folder), "" when the store is local


@dataclass
class ValidationPhotos:
    """The --val-root photos that choose the settings (readable, not held by the gallery unless kept); without
    --val-root, none (``embeddings`` and ``labels`` None)."""

    embeddings: np.ndarray | None = None  # (N, dim)
    labels: list[str] | None = None  # species of each
    sha256: list[str] = field(default_factory=list)  # content digest of each (Calibration.selection_sha256)
    dropped: list[str] = field(default_factory=list)  # photos left out: copies or near-copies of gallery references
    dropped_kinds: dict[str, int] = field(default_factory=dict)  # "same bytes" / "near-copy" -> count


def _selection_data(
    gallery: Gallery, enc: Encoder, val_dataset: str | None, val_root: str | Path | None,
    val_metadata: str | Path | None, progress: bool, keep_duplicates: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[str], ValidationPhotos]:
    """The gallery's ids, vectors and species, and the validation photos (none without ``val_root``).

    Validation photos the gallery holds (same bytes, or near-copies by the ``speciesid clean`` leak rule: the
    evaluation's :func:`retrieval.protocol.find_duplicates`) would find themselves among the references and favour
    the kNN vote: they are left out unless ``keep_duplicates`` (logged, with their paths)."""
    ids, vectors = gallery.store.vectors()  # the whole table: the final probe and the whitening fit on all of it
    labels = _species_of(gallery, ids)
    if val_root is None:
        return ids, vectors, labels, ValidationPhotos()
    scan = load_dataset(val_dataset or "folder", val_root, metadata=val_metadata, options="--val-")
    done = embed_photos([r.path for r in scan.records], enc, progress=progress, desc="validation")
    ok = [i for i, e in enumerate(done.errors) if e is None]
    if not ok:
        raise ValueError(f"--val-root {val_root} holds no readable photo ({len(scan.records)} found): give a folder "
                         "of labelled photos (one sub-folder a species), or leave --val-root out")
    dups, kinds = find_duplicates(gallery, done.sha256, done.embeddings[ok], ok)
    dropped: list[str] = []
    if dups and not keep_duplicates:
        dropped = [str(scan.records[i].path) for i in dups]
        ok = without_copies(ok, dups, f"all {len(dropped)} readable photos under --val-root {val_root} are already "
                            "in the gallery (same bytes or near-copies): they would find themselves among the "
                            "references; give other photos, leave --val-root out, or pass --keep-duplicates")
        logger.info("%d of the --val-root photos left out of the selection, the gallery holds them (%s): %s",
                    len(dropped), kinds_text(kinds), ", ".join(dropped))
    elif dups:
        logger.warning("%d of the --val-root photos are in the gallery (%s) and kept (--keep-duplicates): they find "
                       "themselves among the references", len(dups), kinds_text(kinds))
    return ids, vectors, labels, ValidationPhotos(
        done.embeddings[ok], [scan.records[i].species for i in ok], [done.sha256[i] for i in ok], dropped,
        kinds if dropped else {})


def _species_of(gallery: Gallery, ids: np.ndarray) -> list[str]:
    """The species of rows ``ids``, in order: the id and species columns read once (``store.species_of`` of every
    id filters by ``id IN (...)``, ~0.2 ms an id: 40 s at 200k); rows written since that read are asked for."""
    known, species = gallery.store.id_species(include_excluded=True)
    pos = np.minimum(np.searchsorted(known, ids), max(len(known) - 1, 0))
    found = (known[pos] == ids) if len(known) else np.zeros(len(ids), dtype=bool)
    labels = [species[p] if f else "" for p, f in zip(pos.tolist(), found.tolist(), strict=True)]
    missing = [i for i, f in enumerate(found.tolist()) if not f]
    if missing:  # a write between the two reads
        for i, s in zip(missing, gallery.store.species_of([int(ids[i]) for i in missing]), strict=True):
            labels[i] = s
    return labels


def train_gallery_probe(
    index_dir: str | Path,
    *,
    val_dataset: str | None = None,
    val_root: str | Path | None = None,
    val_metadata: str | Path | None = None,
    checklist: str | None = None,
    text_strength: float = 1.0,
    folds: int = 5,
    rule: str = "seq-nll",
    encoder: EncoderConfig | None = None,
    progress: bool = True,
    keep_duplicates: bool = False,
    max_photos: int | None | Literal["auto"] = "auto",
) -> ProbeResult:
    """Train the gallery's linear probe, choosing blend settings on validation photos or by CV.

    Validation photos the gallery holds are left out of the selection unless ``keep_duplicates``; the digests of
    those that chose are recorded with the settings (``Calibration.selection_sha256``) for ``speciesid evaluate``.
    With a text-capable encoder, also sets up the zero-shot text prior over the gallery's species
    plus ``checklist`` species (``moroccan`` or a file), so photo-less checklist species can be predicted.
    Bad input is refused (ValueError) before any work, leaving the gallery as it was: a negative
    ``text_strength``, a checklist that cannot be read, or one given for an image-only encoder. ``encoder``: how the
    gallery's encoder runs (device, precision, runtime; unset options are the gallery's own, :func:`open_gallery`).
    ``max_photos``: the final probe's bound (:func:`retrieval.probe.train_probe`; "auto": a memory bound by species,
    None: every photo).
    """
    from retrieval.calibrate import select_settings  # sklearn: not on the query path

    index_dir, encoder = folder_arg(index_dir, "train_gallery_probe"), config_arg(encoder, "train_gallery_probe")
    if not text_strength >= 0:  # NaN too
        raise ValueError(f"--text-strength is the text prior's weight in photos' worth of evidence: 0 (the prior "
                         f"counts for nothing) or more, got {text_strength:g}")
    listed = load_checklist(checklist) if checklist else []  # a missing or empty file: refused before any work
    gallery, enc = open_gallery(index_dir, encoder or EncoderConfig(progress=progress))  # -q: the export's too
    if checklist and not enc.supports_text:
        raise ValueError(f"--checklist adds species to the text prior, which needs an encoder that reads text (a "
                         f"CLIP-style encoder such as bioclip); gallery {index_dir} was built with {enc.spec}, which "
                         "is image-only: leave --checklist out, or build the gallery with --encoder bioclip")
    if not len(gallery):  # why (an interrupted build, a clean run, none added) before any validation photo is read
        raise ValueError(no_references_error(gallery, index_dir) + "; then train the probe")
    ids, vectors, labels, val = _selection_data(gallery, enc, val_dataset, val_root, val_metadata, progress,
                                                keep_duplicates)
    taxa: dict[str, SpeciesSummary] = {}
    if enc.supports_text:  # its prompts embedded (and cached) before the slow work and before any write
        taxa = {s.species: s for s in gallery.species()}
        for t in listed:
            taxa.setdefault(t.species, SpeciesSummary(t.species, t.genus, t.family, None, t.venomous, 0))
        build_text_prior(enc, list(taxa.values()), GalleryLayout(Path(index_dir)).text_prior_cache, strength=text_strength)
    t0 = time.perf_counter()
    calibration = select_settings(vectors, labels, fingerprint=gallery.fingerprint, val_embeddings=val.embeddings,
                                  val_labels=val.labels, val_name=str(absolute_path(val_root)), folds=folds, rule=rule,
                                  progress=progress)
    calibration.selection_sha256 = val.sha256
    t1 = time.perf_counter()
    learn = [i for i, s in enumerate(labels) if s not in calibration.left_out]  # all, unless some were left out
    _warn_left_out(calibration.left_out, "left out of the probe's training and of the choice of its settings")
    probe = train_probe(vectors[learn], [labels[i] for i in learn], fingerprint=gallery.fingerprint, C=calibration.C,
                        max_photos=max_photos, progress=progress)
    calibration.metrics.update(probe.calibration.metrics)  # a subsample it trained on (max_photos), said
    probe.calibration = calibration
    probe.whitening = _metric_for(calibration, gallery, ids, vectors, labels)
    probe.reference_ids = np.sort(np.asarray(ids, dtype=np.int64))  # what answers tell a gallery moved on by
    t2 = time.perf_counter()

    def text_prior() -> None:  # before the probe, under its hold and before its publish: the store's copy carries it
        if taxa:
            save_text_prior(index_dir, enc, list(taxa.values()), text_strength)
        else:  # an image-only encoder: a text_prior.json left here belongs to an older probe
            remove_text_prior(index_dir)

    replaced, shared = save_replacing(gallery, probe, text_prior=text_prior)
    return ProbeResult(probe=probe, seconds_select=t1 - t0, seconds_train=t2 - t1, text_species=len(taxa),
                       dropped=val.dropped, dropped_kinds=val.dropped_kinds, replaced=replaced, shared=shared)


def import_gallery_probe(
    index_dir: str | Path,
    from_dir: str | Path,
    *,
    val_dataset: str | None = None,
    val_root: str | Path | None = None,
    val_metadata: str | Path | None = None,
    folds: int = 5,
    rule: str = "seq-nll",
    blend_weight: str | float = "auto",
    encoder: EncoderConfig | None = None,
    progress: bool = True,
    keep_duplicates: bool = False,
) -> ProbeResult:
    """Use a fine-tuned network's head (``speciesid finetune`` output ``from_dir``) as the gallery's probe.

    The gallery must have been built with that network as its encoder (same weights). No probe is trained:
    only k, T, blend weight and unknown threshold are chosen, on ``val_root`` photos when given, else on the
    photos the run held out of its training photos (``heldout.csv``, matched in the gallery by content: kNN from
    the other gallery photos), else out-of-fold over the gallery with the head fixed (which favours the head).

    ``blend_weight`` (:func:`parse_weight_rule`): "auto" (default) fixes the weight at the prior
    (``retrieval.calibrate.PRIOR``) when the selection photos cannot weigh the head fairly -- the run's held-out
    photos or its own --val-root (they chose its epoch and test size by the head's log-loss), or the gallery the head
    trained on -- and chooses it on fresh validation photos; "choose" always chooses it; a number fixes it there.
    ``encoder``: how the gallery's encoder runs, as for :func:`train_gallery_probe`.
    """
    from retrieval.calibrate import select_settings  # sklearn: not on the query path

    index_dir, encoder = folder_arg(index_dir, "import_gallery_probe"), config_arg(encoder, "import_gallery_probe")
    blend_weight = parse_weight_rule(blend_weight)  # before any slow work
    probe = _finetuned_head(from_dir)
    gallery, enc = open_gallery(index_dir, encoder or EncoderConfig(progress=progress))  # -q: the export's too
    options = weights_digest(gallery.fingerprint).partition("+")[2]
    if weights_only(gallery.fingerprint) != weights_only(probe.fingerprint):  # the head's own size may be another
        check_encoder(f"gallery {index_dir}", gallery.fingerprint, probe.fingerprint,
                      fix=f"it must be built with the fine-tuned network of {from_dir}: "
                      f"'speciesid index build --encoder timm:local-dir:{from_dir} ...' first")
    if "pool=" in options:  # views (flip, ms) and the input size only change the head's input: those are fine
        raise EncoderMismatchError(
            f"gallery {index_dir} was built with '{options}', but the head of {from_dir} was trained on the "
            f"network's own pooling: build the gallery without --pool (--views may stay)")
    head_only, gallery_only = species_differences(probe.species, [s.species for s in gallery.species()],
                                                  index_dir, from_dir)
    ids, vectors, labels, val = _selection_data(gallery, enc, val_dataset, val_root, val_metadata, progress,
                                                keep_duplicates)
    val_emb, val_labels = val.embeddings, val.labels  # replaced by the run's held-out photos below, when none
    all_ids, all_vectors, all_labels = ids, vectors, labels
    val_name = str(absolute_path(val_root))  # absolute: `evaluate` run from elsewhere still recognises it
    if val_emb is None:  # the run's own held-out training photos, when it wrote them: the head never saw them
        held = heldout_positions(gallery, ids, from_dir)
        if held is not None:
            rest = np.setdiff1d(np.arange(len(labels)), held)
            val_emb, val_labels = vectors[held], [labels[i] for i in held]
            vectors, labels = vectors[rest], [labels[i] for i in rest]
            val_name = f"{HELDOUT_PREFIX}{len(held)} photos listed in {Path(from_dir) / HELDOUT_FILE}"
            logger.info("choosing the blend settings on the %d photos the fine-tuning run held out", len(held))
    fixed, why = import_weight(blend_weight, _weight_bias(val_root, val_name, from_dir))
    if why:
        logger.info("blend weight %s", why)
    t0 = time.perf_counter()
    head_temperature = None
    if val_emb is not None:  # calibrate the head's probabilities on photos it did not train on
        head_temperature = fit_head_temperature(probe, val_emb, val_labels)
        probe = probe.scaled(head_temperature)
    else:
        logger.info("no --val-root: the head's probabilities are left uncalibrated (its training photos would "
                    "make it over-confident)")
    probe.calibration = select_settings(vectors, labels, fingerprint=probe.fingerprint, probe=probe,
                                        val_embeddings=val_emb, val_labels=val_labels, val_name=val_name,
                                        folds=folds, rule=rule, blend_weight=fixed, progress=progress)
    probe.calibration.weight_fixed = why
    _warn_left_out(probe.calibration.left_out, "left out of the choice of the blend settings (the head still knows "
                   "those it was fine-tuned on)")
    probe.calibration.selection_sha256 = val.sha256
    if head_temperature is not None:
        probe.calibration.metrics["head_temperature"] = head_temperature
    probe.whitening = _metric_for(probe.calibration, gallery, all_ids, all_vectors, all_labels)
    probe.fingerprint = gallery.fingerprint
    probe.source = f"finetune:{from_dir}"
    # a head has no text prior of its own, and its settings were chosen without one: a text_prior.json left here
    # belongs to the probe it replaces (as for probe train with an image-only encoder)
    replaced, shared = save_replacing(gallery, probe, text_prior=lambda: remove_text_prior(index_dir))
    return ProbeResult(probe=probe, seconds_select=time.perf_counter() - t0, seconds_train=0.0, text_species=0,
                       dropped=val.dropped, dropped_kinds=val.dropped_kinds,
                       head_only=head_only, gallery_only=gallery_only, replaced=replaced, shared=shared)


class ProbeNotSharedError(ValueError):
    """The gallery folder holds the new probe, but publishing it to the S3 store failed: the message says so and
    what to run (``speciesid probe publish``), not the command again."""


@dataclass
class Shared:
    """Where :func:`_saving_and_sharing` shared the probe: the store's probe folder, "" when the store is local."""

    where: str = ""


@contextlib.contextmanager
def _saving_and_sharing(gallery: Gallery, done: str) -> Iterator[Shared]:
    """One hold for writing the folder's probe files and publishing them (:func:`retrieval.probe_share.publish_probe`)
    when the store is on S3: the store's lease with the folder's lock (a follower of the store's copy on this
    folder cannot write between the save and the publish); the folder's lock alone otherwise. A publish that fails
    after the files were written is a :class:`ProbeNotSharedError`: ``done`` says what the folder holds now. It
    yields a :class:`Shared`, filled once the probe is shared."""
    shared = gallery.objects is not None
    box = Shared()
    with gallery.writing(local=not shared):
        yield box
        if shared:
            try:
                publish_probe(gallery)  # the files just written under this hold (no follower wrote since)
                box.where = probe_uri(gallery.objects.uri, "")
            except ProbePublishInterrupted as exc:  # it says what happened and what to run
                raise ProbeNotSharedError(f"{done} in {gallery.root}, but not shared through the gallery's store: "
                                          f"{exc}, not this command again") from exc
            except (OSError, LeaseError, TimeoutError) as exc:
                raise ProbeNotSharedError(
                    f"{done} in {gallery.root}, but it is not shared through the gallery's store yet ({exc}): "
                    f"the other machines keep their probe. Run 'speciesid probe publish --index {gallery.root}' "
                    "when the store answers, not this command again") from exc


def save_replacing(gallery: Gallery, probe: LinearProbe, *,
                   text_prior: Callable[[], object] | None = None) -> tuple[str, str]:
    """Save ``probe`` as the gallery's (made now), under the gallery's write lock, after setting the probe it
    replaces aside as probe.prev.* (:func:`retrieval.probe.keep_previous`, one generation), and on an S3 store
    publish it under the same hold (:func:`_saving_and_sharing`). ``text_prior``: writes (or removes) the folder's
    text prior, called first, before the probe is set aside and saved, and its digest is recorded in the new
    ``probe.json`` (:attr:`LinearProbe.text_prior_sha256`: a prior write that fails leaves the folder's probe and
    prior as they were; a save that fails after it leaves the old probe, which ignores the new prior when it
    records its own); the publish shares the folder's text prior with the probe (None: the folder's is left as it
    is, nothing recorded). Returns in words what it replaced ("" when there was none) and where the store shares it
    ("" when the store is local)."""
    probe.made_at = now_utc()
    # under one hold: no other writer's probe kept as the previous one, and no half swap
    with _saving_and_sharing(gallery, "the new probe is saved") as shared:
        if text_prior is not None:
            try:
                text_prior()
            except OSError as exc:
                raise OSError(f"the text prior of {gallery.root} could not be written ({exc}): the "
                              "gallery's probe and text prior are as they were; free the disk (or fix the folder) "
                              f"and run 'speciesid probe train --index {gallery.root}' again") from exc
            probe.text_prior_sha256 = text_prior_digest(gallery.root)
        replaced = keep_previous(gallery.root)
        probe.save(gallery.root)
    if replaced:
        logger.info("replaced %s (kept as probe.prev.*)", replaced)
    return replaced, shared.where


def restore_gallery_probe(index_dir: str | Path) -> tuple[str, str, str]:
    """Bring back the probe the last ``probe train`` / ``probe import`` replaced in gallery ``index_dir``, setting
    the current one aside in its place (run again to swap back): (what was restored, what was set aside, "" when
    the gallery had no probe), in words, and where the store shares it ("" when the store is local).
    FileNotFoundError when none was kept; a kept probe of another encoder than
    the gallery's is refused (EncoderMismatchError). A store on S3 shares the restored probe as it shares a trained
    one, under the same hold (:func:`_saving_and_sharing`; a failed publish: :class:`ProbeNotSharedError`)."""
    gallery = Gallery.open(folder_arg(index_dir, "restore_gallery_probe"))
    with _saving_and_sharing(gallery, "the earlier probe is restored") as shared:
        restored, replaced = restore_previous(gallery.root, expected_fingerprint=gallery.fingerprint)
    return restored, replaced, shared.where


def publish_gallery_probe(index_dir: str | Path) -> str:
    """Share the probe of gallery ``index_dir`` through its S3 store (:func:`retrieval.probe_share.publish_probe`):
    after a ``probe train``, ``import`` or ``restore`` whose publish failed. Returns the probe in words. ValueError
    when the store is not on S3 (nothing to share), FileNotFoundError when the folder has no probe."""
    gallery = Gallery.open(folder_arg(index_dir, "publish_gallery_probe"))
    if gallery.objects is None:
        raise ValueError(f"the store of {index_dir} is not on S3: its probe is not shared through the store (every "
                         "process reads the folder's probe files); nothing to publish")
    with gallery.writing():
        try:
            meta = gallery.layout.probe_meta.read_bytes()  # read once: what is put, and what the words describe
        except FileNotFoundError:
            raise FileNotFoundError(f"{index_dir} has no probe to publish: train one with 'speciesid probe train "
                                    f"--index {index_dir}'") from None
        publish_probe(gallery, meta=meta)
    return probe_origin(json.loads(meta))


def withdraw_gallery_probe(index_dir: str | Path) -> list[str]:
    """Withdraw the probe shared through the S3 store of gallery ``index_dir``
    (:func:`retrieval.probe_share.withdraw_probe`): the objects removed, [] when the store held none. ValueError when
    the store is not on S3."""
    return withdraw_probe(Gallery.open(folder_arg(index_dir, "withdraw_gallery_probe")))


def _warn_left_out(left_out: dict[str, int], what: str) -> None:
    """One warning naming the species cross-validation had to leave out (fewer than 2 distinct photos)."""
    if left_out:
        named = ", ".join(f"{s} ({n} photo{'s' * (n > 1)})" for s, n in list(left_out.items())[:10])
        logger.warning("%d species with fewer than 2 distinct reference photos %s: %s%s. The kNN vote alone answers "
                       "them until they have 2 (not near-copies); then train the probe again", len(left_out), what,
                       named, ", ..." if len(left_out) > 10 else "")


def species_differences(head: list[str], gallery: list[str], index_dir: str | Path,
                        from_dir: str | Path) -> tuple[list[str], list[str]]:
    """(the head's species the gallery has no photo of, the gallery's species the head does not name), warned
    about once here, with what to do (the CLI does not repeat them): the first are never answered by the kNN vote,
    the second only by it (the blend's open-world rule). A head that shares no species with the gallery is refused
    (ValueError)."""
    head_only, gallery_only = sorted(set(head) - set(gallery)), sorted(set(gallery) - set(head))
    if gallery and not set(head) & set(gallery):
        raise ValueError(f"the head of {from_dir} names none of the species of gallery {index_dir} (head: "
                         f"{first_few(sorted(head))}; gallery: {first_few(sorted(gallery))}): was the gallery built "
                         "from the photos the network was fine-tuned on?")
    if head_only:
        logger.warning("%d species of the head of %s have no photo in gallery %s, so they are never answered (the "
                       "blend answers only the gallery's species): %s. Renamed or left out? Name their folders as the head does (the run's config.json, "
                       "label_names) and rebuild the gallery, or add their photos", len(head_only), from_dir,
                       index_dir, ", ".join(head_only))
    if gallery_only:
        logger.warning("%d species of gallery %s are not among the head's, so only the kNN vote answers them: %s. "
                       "Fine-tune with their photos for the head to know them", len(gallery_only), index_dir,
                       ", ".join(gallery_only))
    return head_only, gallery_only


def parse_weight_rule(text: str | float) -> str | float:
    """A ``--blend-weight`` value: "auto", "choose" or a weight from 0 to 1 (ValueError otherwise)."""
    from retrieval.calibrate import check_weight

    if text in WEIGHT_RULES:
        return str(text)
    try:
        return check_weight(float(text))
    except ValueError:
        raise ValueError(f"blend weight: give auto, choose or a number from 0 (kNN only) to 1 (head only), not "
                         f"{text!r}") from None


def import_weight(rule: str | float, bias: str) -> tuple[float | None, str]:
    """(the blend weight to fix, None to choose it; why it is fixed, "" when chosen) for ``rule`` (``auto``,
    ``choose`` or a number), where ``bias`` says why the selection photos would favour the head ("" if fresh)."""
    from retrieval.calibrate import PRIOR

    rule = parse_weight_rule(rule)
    if not isinstance(rule, str):
        return rule, f"fixed at {rule:g} by the caller"
    if rule == "choose" or not bias:
        return None, ""
    return PRIOR["weight"], f"fixed at the prior {PRIOR['weight']:g}: {bias}"


def _weight_bias(val_root: str | Path | None, val_name: str, from_dir: str | Path) -> str:
    """Why the photos that choose an imported head's blend settings would favour the head ("" when they are fresh)."""
    if val_name.startswith(HELDOUT_PREFIX):
        return "the photos the run held out also chose its epoch and test size"
    if val_root is None:
        return ("no fresh photos to choose it on (no --val-root, and none of the run's held-out photos is in the "
                "gallery): the gallery's photos may be the head's own training photos")
    if same_folder(run_val_root(run_record(f"timm:local-dir:{from_dir}")), val_root):
        return "these validation photos also chose the fine-tuning run's epoch"
    return ""


def probe_cannot_name(gallery: Gallery, *, api: bool = False) -> str:
    """A note naming the gallery's species its probe does not know, added since it was made ("" when there are
    none, or no probe). ``api``: worded for an HTTP client, which has no ``--method`` to choose (a server follows
    the probe a retrain writes)."""
    if not has_probe(gallery.root):
        return ""
    try:
        probe = LinearProbe.load(gallery.root)
    except (OSError, ValueError, KeyError) as exc:  # being replaced: nothing to say now
        logger.info("probe of %s not read: %s", gallery.root, exc)
        return ""
    added = probe.added_since({s.species: s.count for s in gallery.species()})
    if not added:
        return ""
    species = f"{len(added)} species added since it was made ({first_few(added)})"
    if api:  # no server path in an answer (an HTTP client cannot use it)
        return (f"the gallery's probe does not know {species}: identify answers them by the kNN vote alone, and the "
                "probe cannot name them until it is retrained on the server's machine ('speciesid probe train "
                "--index' with the server's gallery folder; the server takes the new probe up without a restart)")
    known = f"the probe of {gallery.root} does not know {species}"
    return (f"{known}: the blend answers them by the kNN vote alone and --method probe cannot name them; retrain: "
            f"speciesid probe train --index {gallery.root}")


def refresh_gallery_metric(gallery: Gallery) -> bool:
    """After a write: when the gallery's probe votes on the whitened metric and its whitening no longer fits the
    gallery (a species came or went, the count moved > 10%), fit it again on the gallery and save it with the probe,
    so that every later reader (a CLI call, another server) starts from it. Returns whether it did."""
    if not has_probe(gallery.root):
        return False
    with gallery.writing(local=True):  # reads the store, writes the folder's probe files: not the store's lease
        finish_interrupted_swap(gallery.root)  # a crashed 'probe restore': its pairs made whole first
        probe = LinearProbe.load(gallery.root)
        if probe.calibration.metric != "whitened":
            return False
        fresh = fitted_whitening(gallery, [probe.whitening], save_stats=True)
        if fresh is None or fresh is probe.whitening:
            return False
        probe.whitening = fresh
        probe.save(gallery.root)
    return True


def _metric_for(calibration: Calibration, gallery: Gallery, ids: np.ndarray, vectors: np.ndarray,
                labels: list[str]) -> Whitening | None:
    """The whitening the chosen metric needs, fitted on every gallery photo the vote will search (else None); its
    statistics are saved with the gallery, so that later refits start from them (``retrieval.whitening_sync``)."""
    if calibration.metric != "whitened":
        return None
    current = stats_from_rows(gallery, ids, vectors, labels)
    save_stats(gallery, current)
    return current.stats.fit()


def _finetuned_head(folder: str | Path) -> LinearProbe:
    """The head of a ``speciesid finetune`` output folder, as a probe (ValueError when it is not one)."""
    folder = Path(folder)
    if not has_probe(folder):
        raise ValueError(f"{folder} is not a fine-tuned model folder (no probe.json): give the --out folder of "
                         "'speciesid finetune'")
    probe = LinearProbe.load(folder)
    if not (probe.source or "").startswith("finetune:"):
        raise ValueError(f"{folder} holds a probe, but not the head of a 'speciesid finetune' output")
    return probe
