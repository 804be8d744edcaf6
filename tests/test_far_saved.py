"""The far threshold is kept beside the index: a new process reuses it while the index is the same, and estimates
it again once the index moved (each CLI ``identify`` used to estimate it again: 2,000 searches)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _cli_support import DIM, ENC, FakeEncoder, unit

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


def _cluster_gallery(root, n: int = 20, seed: int = 2) -> tuple[Gallery, np.ndarray]:
    """``n`` references around one centre (their nearest others at cosine ~0.9, under the near-copy rule); and that
    centre."""
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal(DIM)
    g = Gallery.create(root, ENC)
    g.add([ReferenceRecord(path=f"/p/a{i}.jpg", species="Naja haje") for i in range(n)], [f"a-{i}" for i in range(n)],
          unit(centre + 0.4 * rng.standard_normal((n, DIM))))
    return g, centre


def test_an_off_target_reference_does_not_set_the_far_threshold_alone(tmp_path):
    """A reference unlike every other (a drawing, a blank) is set aside by the fence: the threshold stays the
    cluster's, so a blank photo still reads as far (walk s55, M27: without the fence it fell to that reference's)."""
    g, centre = _cluster_gallery(tmp_path / "g")
    clean = far_threshold(g)
    assert 0.8 < clean < 1.0
    off = np.random.default_rng(3).standard_normal(DIM)
    off -= (off @ centre) / (centre @ centre) * centre  # at right angles to the cluster: cosine ~0 to every reference
    g.add([ReferenceRecord(path="/p/drawing.jpg", species="Naja haje")], ["drawing"], unit(off)[None])
    assert far_threshold(g) == pytest.approx(clean)


def test_a_reference_its_search_misses_counts_its_first_hit_as_its_nearest_other(tmp_path, monkeypatch):
    """An approximate index may not find a reference itself (or an identical twin may come first): the first hit is
    then its nearest other, not the second (walk s55, M28: the second hit set a lower threshold)."""
    g, _ = _cluster_gallery(tmp_path / "g")
    exact = far_threshold(g)
    nearest = g.nearest

    def missing_itself(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims, found = nearest(queries, k + 1)
        own = found[np.arange(len(found)), np.argmax(sims, axis=1)]  # each query is a reference's vector
        keep = [np.flatnonzero(row != i)[:k] for row, i in zip(found, own, strict=True)]
        return (np.stack([s[j] for s, j in zip(sims, keep, strict=True)]),
                np.stack([f[j] for f, j in zip(found, keep, strict=True)]))

    monkeypatch.setattr(g, "nearest", missing_itself)
    assert far_threshold(g) == pytest.approx(exact)


def test_one_identifier_estimates_the_far_threshold_again_as_the_gallery_grows(tmp_path, monkeypatch):
    """A long-running server's Identifier: an add of more than 10 % of the references estimates the threshold again;
    a smaller one keeps it (walk s55, M30: the first estimate was kept for good)."""
    g, centre = _cluster_gallery(tmp_path / "g")
    ident = Identifier(FakeEncoder(), g)
    first = ident.far_threshold()
    assert first == pytest.approx(far_threshold(g))
    calls = []
    monkeypatch.setattr(identify, "far_threshold", lambda gallery, **kw: calls.append(len(gallery)) or -1.0)
    rng = np.random.default_rng(4)
    g.add([ReferenceRecord(path="/p/b0.jpg", species="Naja haje")], ["b-0"],
          unit(centre + rng.standard_normal((1, DIM))))
    assert ident.far_threshold() == first and not calls  # 21 references: within 10 %
    g.add([ReferenceRecord(path=f"/p/c{i}.jpg", species="Naja haje") for i in range(10)],
          [f"c-{i}" for i in range(10)], unit(centre + 0.15 * rng.standard_normal((10, DIM))))
    assert ident.far_threshold() == -1.0 and calls == [31]


def test_near_copies_among_the_references_do_not_raise_the_far_threshold(tmp_path):
    """Each photo saved twice (walk s57, finding 4): a reference's nearest other was its own copy, so the threshold
    rose to ~0.94-1.00 and every real photo was far. Near-copies (cosine >= the near-copy rule) are passed over:
    the threshold is the one of the same gallery without the copies."""
    rng = np.random.default_rng(5)
    centre = rng.standard_normal(DIM)
    x = unit(centre + 0.4 * rng.standard_normal((20, DIM)))
    single = Gallery.create(tmp_path / "single", ENC)
    single.add([ReferenceRecord(path=f"/p/a{i}.jpg", species="Naja haje") for i in range(20)],
               [f"a-{i}" for i in range(20)], x)
    twins = Gallery.create(tmp_path / "twins", ENC)  # each photo again, re-saved: its vector nudged (cosine ~0.999)
    copies = unit(x + 0.01 * rng.standard_normal(x.shape))
    assert ((x * copies).sum(axis=1) >= identify.NEAR_COPY_COSINE).all()
    twins.add([ReferenceRecord(path=f"/p/{tag}{i}.jpg", species="Naja haje") for tag in "ab" for i in range(20)],
              [f"{tag}-{i}" for tag in "ab" for i in range(20)], np.concatenate([x, copies]))
    expected = far_threshold(single)
    assert 0.8 < expected < 0.95
    assert far_threshold(twins) == pytest.approx(expected, abs=0.01)


def test_a_gallery_of_copies_of_one_photo_has_no_far_threshold_and_its_answers_say_why(tmp_path):
    """Ten references with the same pixels (walk s57: threshold 1.00, every photo not an exact copy far): none has a
    nearest other that is not a near-copy, so the gallery has no far threshold, and its answers say why."""
    from retrieval.workflows import answer_notes

    g = Gallery.create(tmp_path / "g", ENC)
    v = unit(np.random.default_rng(6).standard_normal(DIM))
    g.add([ReferenceRecord(path=f"/p/{i}.jpg", species="Naja haje" if i < 5 else "Naja naja") for i in range(10)],
          [f"d-{i}" for i in range(10)], np.repeat(v[None], 10, axis=0))
    assert far_threshold(g) is None
    notes = answer_notes(Identifier(FakeEncoder(), g), api=True)
    assert ("this gallery holds 10 reference photos, each a near-copy of the others near it (cosine >= 0.95: the "
            "same photo saved again): too few to tell a photo unlike every reference") in notes[0]
    assert notes[0].endswith("add reference photos (POST /v1/species/{name}/references): from 2 that are not "
                             "near-copies, the gallery measures that threshold")


def test_the_evaluation_note_on_a_gallery_of_near_copies_says_why_it_has_no_far_threshold(tmp_path):
    """final-core s57 #1: the report's note said "too few ... (from 2, the gallery measures that threshold)" for 10
    references that are copies of one photo; it names the near-copies, as answer_notes does."""
    from retrieval.workflows import _figure_notes

    g = Gallery.create(tmp_path / "g", ENC)
    v = unit(np.random.default_rng(6).standard_normal(DIM))
    g.add([ReferenceRecord(path=f"/p/{i}.jpg", species="Naja haje" if i < 5 else "Naja naja") for i in range(10)],
          [f"d-{i}" for i in range(10)], np.repeat(v[None], 10, axis=0))
    notes = _figure_notes(Identifier(FakeEncoder(), g), {"Naja haje", "Naja naja"}, {})
    assert ("the gallery holds 10 reference photos, each a near-copy of the others near it (cosine >= 0.95: the "
            "same photo saved again): too few to measure how unlike every reference a photo may be, so no answer "
            "is UNKNOWN for that and coverage counts photos of anything; add reference photos (from 2 that are not "
            "near-copies, the gallery measures that threshold)") in notes
