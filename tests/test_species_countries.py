"""The countries a gallery's photos record (``ReferenceStore.species_countries``, read by
``Identifier.recorded_countries`` for ``--country``): two columns of the searchable rows, the same mapping the whole
metadata frame gave (blank and missing countries skipped, values stripped, excluded rows left out)."""

from __future__ import annotations

import numpy as np
from _cli_support import DIM, ENC, FakeEncoder

from index.gallery import Gallery
from index.records import ReferenceRecord
from retrieval.identify import Identifier


def _from_whole_metadata(g: Gallery) -> dict[str, frozenset[str]]:
    """The mapping as ``recorded_countries`` built it before: every metadata column of the searchable rows."""
    frame = g.store.metadata(include_excluded=False)
    frame = frame[frame["country"].notna() & (frame["country"].astype(str).str.strip() != "")]
    found: dict[str, set[str]] = {}
    for species, country in zip(frame["species"], frame["country"], strict=True):
        found.setdefault(str(species), set()).add(str(country).strip())
    return {s: frozenset(c) for s, c in found.items()}


def test_species_countries_is_the_mapping_the_whole_metadata_gave(tmp_path):
    rows = [("Parus major", "GB"), ("Parus major", " FR "), ("Parus major", "GB"), ("Parus major", None),
            ("Turdus merula", "France"), ("Turdus merula", "  "), ("Turdus merula", ""),
            ("Corvus corax", None), ("Corvus corax", "MA"), ("Naja haje", None)]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((len(rows), DIM)).astype(np.float32)
    g = Gallery.create(tmp_path / "g", ENC)
    ids = g.add([ReferenceRecord(path=f"/photos/{i}.jpg", species=s, country=c) for i, (s, c) in enumerate(rows)],
                [f"k{i}" for i in range(len(rows))], x / np.linalg.norm(x, axis=1, keepdims=True))
    g.set_excluded([ids[8]])  # Corvus corax's only country: an excluded photo records none

    expected = {"Parus major": frozenset({"GB", "FR"}), "Turdus merula": frozenset({"France"})}
    assert g.store.species_countries() == expected
    assert _from_whole_metadata(g) == expected
    assert Identifier(FakeEncoder(), g).recorded_countries() == expected


def test_a_gallery_of_no_countries_records_none(tmp_path):
    g = Gallery.create(tmp_path / "g", ENC)
    x = np.eye(DIM, dtype=np.float32)[:2]
    g.add([ReferenceRecord(path=f"/photos/{i}.jpg", species="Naja haje") for i in range(2)], ["a", "b"], x)
    assert g.store.species_countries() == {}
