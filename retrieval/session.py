"""The entry points the CLI and the API call: build a gallery, open one with its encoder."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from index.datasets import DatasetScan, load_dataset
from index.gallery import Gallery, read_gallery_info
from index.vectors import VectorIndexConfig
from retrieval.encoders import DEFAULT_ENCODER, Encoder, EncoderConfig, create_encoder_from_config
from retrieval.identify import Identifier
from retrieval.pipeline import BuildReport, add_references
from retrieval.vote import VoteConfig

logger = logging.getLogger(__name__)


@dataclass
class BuildResult:
    """What ``build_gallery`` did."""

    gallery: Gallery  # the gallery, open
    scan: DatasetScan  # what the dataset loader found (with its warnings)
    report: BuildReport  # added / skipped / duplicates / timing


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
) -> BuildResult:
    """Scan a dataset, embed every photo and store it in the gallery at ``index_dir`` (created if new).

    Building into an existing gallery adds what is new (identical photos are stored once).
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
    return BuildResult(gallery=gallery, scan=scan, report=report)


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
) -> Identifier:
    """Open a gallery and its encoder, ready to identify photos."""
    gallery, enc = open_gallery(index_dir, encoder=encoder, weights=weights, device=device, precision=precision)
    return Identifier(enc, gallery, vote)


__all__ = ["DEFAULT_ENCODER", "BuildResult", "build_gallery", "open_gallery", "open_identifier"]
