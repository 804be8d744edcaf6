"""The one record type that flows from datasets into the store."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

#: Taxonomic ranks above genus that the store keeps when a dataset knows them.
HIGHER_RANKS: tuple[str, ...] = ("kingdom", "phylum", "class", "order")


def is_uri(root: str | Path) -> bool:
    """Whether ``root`` is an object-store URI (``s3://``, ``gs://``, ``az://`` ...) rather than a folder (a
    ``Path`` never is: it folds ``//``)."""
    return "://" in str(root) and not str(root).startswith("file://")


@dataclass
class ReferenceRecord:
    """One labelled reference photo, before it is embedded."""

    path: Path | str  # where the photo file lives; an object-store URI (an upload kept in an S3 store) as text
    species: str  # binomial, "Genus species" (the label everything votes on)
    genus: str | None = None  # genus name; derived from a scientific name when missing (a label has none)
    family: str | None = None  # family name, when known
    common_name: str | None = None  # English common name, when known
    venomous: bool | None = None  # medically important venomous (SnakeCLEF "mivs"); None = unknown
    dataset: str = "folder"  # which dataset loader produced it
    ranks: dict[str, str] = field(default_factory=dict)  # kingdom/phylum/class/order when known
    country: str | None = None  # where the photo was taken, when the metadata says

    def __post_init__(self) -> None:
        if not is_uri(self.path):  # Path() would fold "s3://b/k" into "s3:/b/k"
            self.path = Path(self.path)
        self.species = " ".join(self.species.split())
        if not self.genus and " " in self.species and label_genus(self.species) is None:
            self.genus = self.species.split(" ", 1)[0]


@lru_cache(maxsize=1 << 16)  # asked for every candidate of every answer at --rank genus
def label_genus(species: str) -> str | None:
    """None when ``species`` is written as a scientific name; else (a label: ``Vipère à cornes``, ``cats``) its first
    word, which is no genus: a label is grouped at ``--rank genus`` as itself (:func:`rank_genus`)."""
    from index.taxonomy import looks_scientific  # index.taxonomy imports this module

    words = species.split()
    return None if not words or looks_scientific(words) else words[0]


@lru_cache(maxsize=1 << 16)  # asked for every candidate of every answer at --rank genus
def rank_genus(species: str, genus: str | None) -> str | None:
    """What ``species`` is grouped under at ``--rank genus``: its ``genus``, but a label (not a scientific name) with
    no genus, or with its own first word as genus, is its own group (galleries built before the label kept no genus
    stored every label's first word as one: ``Vipère`` would group four unrelated French labels). A genus given with
    a label holds: another word (``Samar cobra``, genus ``Naja``), or its first word when that is a genus the
    shipped snake taxonomy knows (``Bitis arietans (juvenile)``, genus ``Bitis``: a manifest's column; such a
    stored genus cannot be told from a build's first word, so another taxon's is not kept: ``Parus major
    (juvenile)`` stays its own group)."""
    from index.taxonomy import known_genus  # index.taxonomy imports this module

    first = label_genus(species)
    if first is None or (genus and genus != first):
        return genus
    return genus if genus and known_genus(genus) else species
