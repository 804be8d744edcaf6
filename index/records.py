"""The one record type that flows from datasets into the store."""

from __future__ import annotations

from dataclasses import dataclass, field
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
    genus: str | None = None  # genus name; derived from the binomial when missing
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
        if not self.genus and " " in self.species:
            self.genus = self.species.split(" ", 1)[0]
