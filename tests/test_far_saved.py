"""The far threshold is kept beside the index: a new process reuses it while the index is the same, and estimates
it again once the index moved (each CLI ``identify`` used to estimate it again: 2,000 searches)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _cli_support import DIM, ENC, FakeEncoder

import retrieval.identify as identify
from index.gallery import Gallery
from index.records import ReferenceRecord
from retrieval.identify import FAR_FILE, Identifier, far_threshold


def _add(g: Gallery, rng: np.random.Generator, species: str, n: int, tag: str) -> None:
    x = rng.standard_normal(DIM) + 0.2 * rng.standard_normal((n, DIM))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    g.add([ReferenceRecord(path=f"/p/{tag}{i}.jpg", species=species) for i in range(n)],
          [f"{tag}-{i}" for i in range(n)], x)


def test_far_threshold_is_kept_and_reused_while_the_index_is_the_same(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    g = Gallery.create(tmp_path / "g", ENC)
    _add(g, rng, "Naja haje", 20, "a")
    _add(g, rng, "Natrix maura", 20, "b")
    expected = far_threshold(g)
    assert Identifier(FakeEncoder(), g).far_threshold() == expected
    kept = json.loads((g.layout.root / FAR_FILE).read_text())
    assert kept["threshold"] == expected and kept["key"]["count"] == 40

    calls = []
    monkeypatch.setattr(identify, "far_threshold", lambda gallery, **kw: calls.append(1) or -1.0)
    again = Gallery.open(tmp_path / "g")  # a new process: the same index
    assert Identifier(FakeEncoder(), again).far_threshold() == expected and not calls

    _add(again, rng, "Vipera aspis", 5, "c")  # the index moved: estimated again, not the kept one
    assert Identifier(FakeEncoder(), Gallery.open(tmp_path / "g")).far_threshold() == -1.0 and calls == [1]
    monkeypatch.undo()
    fresh = Gallery.open(tmp_path / "g")
    (g.layout.root / FAR_FILE).write_text("{not json")  # unreadable: estimated again, the same value as before
    assert Identifier(FakeEncoder(), fresh).far_threshold() == pytest.approx(far_threshold(fresh))


def test_a_threshold_kept_for_another_index_kind_or_rule_is_estimated_again(tmp_path, monkeypatch):
    """Rebuilding a gallery's index as another kind adds no store version and keeps the count and class (flat and
    hnsw are both VectorIndex): the kept threshold is not the new index's; nor is one an earlier rule kept."""
    from index.vectors import VectorIndexConfig

    rng = np.random.default_rng(1)
    g = Gallery.create(tmp_path / "g", ENC)
    _add(g, rng, "Naja haje", 20, "a")
    _add(g, rng, "Natrix maura", 20, "b")
    assert Identifier(FakeEncoder(), g).far_threshold() is not None  # kept for the flat index
    calls = []
    monkeypatch.setattr(identify, "far_threshold", lambda gallery, **kw: calls.append(1) or -1.0)
    hnsw = Gallery.create(tmp_path / "g", ENC, index_config=VectorIndexConfig(kind="hnsw"))
    hnsw.rebuild_index()
    assert hnsw.index.kind == "hnsw" and hnsw.version == g.version
    assert Identifier(FakeEncoder(), hnsw).far_threshold() == -1.0 and calls == [1]
    monkeypatch.setattr(identify, "FAR_RULE", identify.FAR_RULE + 1)
    assert Identifier(FakeEncoder(), Gallery.open(tmp_path / "g")).far_threshold() == -1.0 and calls == [1, 1]
