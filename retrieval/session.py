"""The entry points the CLI and the API call: build a gallery, open one with its encoder."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index.datasets import DatasetScan, load_checklist, load_dataset
from index.gallery import Gallery, read_gallery_info
from index.layout import check_encoder
from index.store import SpeciesSummary
from index.vectors import VectorIndexConfig
from retrieval.calibrate import select_settings
from retrieval.clean import CleanConfig, CleanResult, clean_built_gallery
from retrieval.encoders import DEFAULT_ENCODER, Encoder, EncoderConfig, create_encoder_from_config
from retrieval.identify import Identifier
from retrieval.pipeline import BuildReport, add_references, embed_sources
from retrieval.probe import LinearProbe, fit_head_temperature, has_probe, train_probe
from retrieval.textprior import load_text_prior, save_text_prior
from retrieval.vote import VoteConfig

logger = logging.getLogger(__name__)


@dataclass
class BuildResult:
    """What ``build_gallery`` did."""

    gallery: Gallery  # the gallery, open
    scan: DatasetScan  # what the dataset loader found (with its warnings)
    report: BuildReport  # added / skipped / duplicates / timing
    clean: CleanResult | None = None  # the zero-shot filter's findings (build with clean=...)


def build_gallery(
    index_dir: str | Path,
    dataset: str,
    root: str | Path,
    *,
    metadata: str | Path | None = None,
    encoder: EncoderConfig | None = None,
    index_config: VectorIndexConfig | None = None,
    workers: int | None = None,
    progress: bool = True,
    clean: CleanConfig | None = None,
) -> BuildResult:
    """Scan a dataset, embed every photo and store it in the gallery at ``index_dir`` (created if new).

    Building into an existing gallery adds what is new (identical photos are stored once). With ``clean``,
    the zero-shot filter then excludes off-target references (report in ``index_dir/clean-report``).
    """
    scan = load_dataset(dataset, root, metadata=metadata)
    for warning in scan.warnings:
        logger.warning("%s", warning)
    if not scan.records:
        raise ValueError(f"no photos found under {root} for dataset {dataset!r}")
    config = encoder or EncoderConfig()
    enc = create_encoder_from_config(config)
    gallery = Gallery.create(index_dir, enc.describe(), index_config=index_config, weights=config.weights)
    report = add_references(gallery, enc, scan.records, workers=workers, progress=progress, desc="building")
    gallery.finish_build()
    cleaned = None
    if clean is not None:
        cleaned = clean_built_gallery(gallery, enc, dataset=scan.name, species=scan.species, config=clean,
                                      report_dir=Path(index_dir) / "clean-report")
    return BuildResult(gallery=gallery, scan=scan, report=report, clean=cleaned)


def open_gallery(
    index_dir: str | Path,
    *,
    encoder: str | None = None,
    weights: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 32,
) -> tuple[Gallery, Encoder]:
    """Open a gallery with the encoder that built it (or refuse another one, saying which built it)."""
    info = read_gallery_info(index_dir)
    built = info["encoder"]
    config = EncoderConfig(
        spec=encoder or built["spec"],
        weights=weights if encoder else (weights or built.get("weights")),
        device=device,
        precision=precision,
        batch_size=batch_size,
    )
    enc = create_encoder_from_config(config)
    gallery = Gallery.open(index_dir, expected_fingerprint=enc.fingerprint)
    return gallery, enc


def open_identifier(
    index_dir: str | Path,
    *,
    encoder: str | None = None,
    weights: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    vote: VoteConfig | None = None,
    use_probe: bool = True,
) -> Identifier:
    """Open a gallery and its encoder (plus its probe and text prior when present), ready to identify."""
    gallery, enc = open_gallery(index_dir, encoder=encoder, weights=weights, device=device, precision=precision)
    probe = LinearProbe.load(index_dir, expected_fingerprint=enc.fingerprint) if use_probe and has_probe(
        index_dir) else None
    text = load_text_prior(index_dir, enc) if use_probe else None
    return Identifier(enc, gallery, vote, probe=probe, text_prior=text)


@dataclass
class ProbeResult:
    """What ``train_gallery_probe`` did."""

    probe: LinearProbe  # the trained probe (saved beside the gallery)
    seconds_select: float  # time spent choosing settings
    seconds_train: float  # time spent training the final probe
    text_species: int  # species covered by the text prior (0 when none)


def _selection_data(
    gallery: Gallery, enc: Encoder, val_dataset: str | None, val_root: str | Path | None,
    val_metadata: str | Path | None, progress: bool,
) -> tuple[np.ndarray, list[str], np.ndarray | None, list[str] | None]:
    """The gallery's vectors and species, and the validation photos' embeddings and species (None without)."""
    ids, vectors = gallery.store.vectors()
    meta = gallery.store.metadata(ids)
    labels = [str(meta.at[int(i), "species"]) for i in ids]
    if val_root is None:
        return vectors, labels, None, None
    scan = load_dataset(val_dataset or "folder", val_root, metadata=val_metadata)
    val_emb, errors = embed_sources([r.path for r in scan.records], enc, progress=progress, desc="validation")
    ok = [i for i, e in enumerate(errors) if e is None]
    return vectors, labels, val_emb[ok], [scan.records[i].species for i in ok]


def train_gallery_probe(
    index_dir: str | Path,
    *,
    val_dataset: str | None = None,
    val_root: str | Path | None = None,
    val_metadata: str | Path | None = None,
    checklist: str | None = None,
    text_strength: float = 1.0,
    folds: int = 3,
    device: str = "auto",
    progress: bool = True,
) -> ProbeResult:
    """Train the gallery's linear probe, choosing blend settings on validation photos or by CV.

    With a text-capable encoder, also sets up the zero-shot text prior over the gallery's species
    plus ``checklist`` species (``moroccan`` or a file), so photo-less checklist species can be predicted.
    """
    import time

    gallery, enc = open_gallery(index_dir, device=device)
    vectors, labels, val_emb, val_labels = _selection_data(gallery, enc, val_dataset, val_root, val_metadata, progress)
    t0 = time.perf_counter()
    settings = select_settings(
        vectors, labels, fingerprint=gallery.fingerprint, val_embeddings=val_emb, val_labels=val_labels,
        val_name=str(val_root), folds=folds,
    )
    t1 = time.perf_counter()
    probe = train_probe(vectors, labels, fingerprint=gallery.fingerprint, C=settings.C)
    probe.calibration = settings
    t2 = time.perf_counter()
    probe.save(index_dir)
    text_species = 0
    if enc.supports_text:
        taxa = {s.species: s for s in gallery.species()}
        for t in load_checklist(checklist) if checklist else []:
            taxa.setdefault(t.species, SpeciesSummary(t.species, t.genus, t.family, None, t.venomous, 0))
        save_text_prior(index_dir, enc, list(taxa.values()), text_strength)
        text_species = len(taxa)
    elif checklist:
        logger.warning("encoder %s cannot read text: the checklist is ignored (no text prior)", enc.spec)
    return ProbeResult(probe=probe, seconds_select=t1 - t0, seconds_train=t2 - t1, text_species=text_species)


def import_gallery_probe(
    index_dir: str | Path,
    from_dir: str | Path,
    *,
    val_dataset: str | None = None,
    val_root: str | Path | None = None,
    val_metadata: str | Path | None = None,
    folds: int = 3,
    device: str = "auto",
    progress: bool = True,
) -> ProbeResult:
    """Use a fine-tuned network's head (``speciesid finetune`` output ``from_dir``) as the gallery's probe.

    The gallery must have been built with that network as its encoder (same weights). No probe is trained:
    only k, T, blend weight and unknown threshold are chosen, on ``val_root`` photos when given, else
    out-of-fold over the gallery with the head fixed (which favours the head: it was trained on them).
    """
    import time

    probe = _finetuned_head(from_dir)
    gallery, enc = open_gallery(index_dir, device=device)
    check_encoder(f"gallery {index_dir}", gallery.fingerprint, probe.fingerprint,
                  fix=f"it must be built with the fine-tuned network of {from_dir}: "
                  f"'speciesid index build --encoder timm:local-dir:{from_dir} ...' first")
    vectors, labels, val_emb, val_labels = _selection_data(gallery, enc, val_dataset, val_root, val_metadata, progress)
    t0 = time.perf_counter()
    head_temperature = None
    if val_emb is not None:  # calibrate the head's probabilities on photos it did not train on
        head_temperature = fit_head_temperature(probe, val_emb, val_labels)
        probe = probe.scaled(head_temperature)
    else:
        logger.info("no --val-root: the head's probabilities are left uncalibrated (its training photos would "
                    "make it over-confident)")
    probe.calibration = select_settings(vectors, labels, fingerprint=probe.fingerprint, probe=probe,
                                        val_embeddings=val_emb, val_labels=val_labels, val_name=str(val_root),
                                        folds=folds)
    if head_temperature is not None:
        probe.calibration.metrics["head_temperature"] = head_temperature
    probe.fingerprint = gallery.fingerprint
    probe.source = f"finetune:{from_dir}"
    probe.save(index_dir)
    return ProbeResult(probe=probe, seconds_select=time.perf_counter() - t0, seconds_train=0.0, text_species=0)


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


__all__ = [
    "DEFAULT_ENCODER",
    "BuildResult",
    "ProbeResult",
    "build_gallery",
    "import_gallery_probe",
    "open_gallery",
    "open_identifier",
    "train_gallery_probe",
]
