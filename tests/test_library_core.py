"""``retrieval.workflows`` as a library (re-read of stop 54): reference embeddings a caller gives ``add_photos`` (the
API's, a notebook's) are stored as the encoder's would be, unit length, so a species added with long vectors does
not win every inner-product search, and a row of zeros is refused, naming it; query embeddings are scaled once;
``search`` and ``identify`` take the same photo bytes; whole-number arguments are checked by one rule. Synthetic
encoder and vectors: fast, no shared assets."""

from __future__ import annotations

import re

import numpy as np
import pytest
from _cli_support import DIM, ENC, FakeEncoder
from PIL import Image

from index.gallery import Gallery
from index.records import ReferenceRecord
from retrieval import workflows as wf
from retrieval.identify import Identifier


class _Encoder(FakeEncoder):
    """Enough of an encoder for photos whose embeddings are given (their bytes are read, not embedded)."""

    batch_size = 8
    input_size = 224
    device = "cpu"
    runtime = "torch"
    precision = "fp32"

    def preprocess_views(self, image: Image.Image) -> np.ndarray:
        return np.asarray(image.convert("RGB").resize((8, 8)), np.float32).transpose(2, 0, 1)[None] / 255

    def encode_batch(self, batch: np.ndarray) -> np.ndarray:
        """A unit row per photo from its pixels (the same photo, the same row)."""
        rows = batch.reshape(len(batch), -1)[:, :DIM] - 0.5
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def setup(tmp_path):
    """(gallery, encoder, 4 photo files, two unit vectors a and b)."""
    g = Gallery.create(tmp_path / "g", ENC)
    rng = np.random.default_rng(1)
    files = []
    for i in range(4):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(p)
        files.append(p)
    a, b = rng.standard_normal((2, DIM))
    return g, _Encoder(), files, a / np.linalg.norm(a), b / np.linalg.norm(b)


def test_a_species_added_with_long_vectors_does_not_win_a_query_near_another(setup):
    """Before, the toad's 100x rows were stored as given: the inner product 21.8 beat the cobra's cosine 0.96."""
    g, enc, files, a, b = setup
    wf.add_photos(g, enc, "Naja naja", files[:2], venomous=True, embeddings=np.stack([a, a + 0.01]))
    given = 100 * np.stack([b, b + 0.01])
    wf.add_photos(g, enc, "Bufo bufo", files[2:], venomous=False, embeddings=given)
    assert np.abs(given[0]).max() > 10  # the caller's array is not changed
    ids = [int(i) for i in g.store.metadata()["id"]]
    np.testing.assert_allclose(np.linalg.norm(g.reference_vectors(ids), axis=1), 1.0, atol=1e-5)
    ident = Identifier(enc, g)
    q = a + 0.3 * b
    q /= np.linalg.norm(q)  # cosine 0.96 to the cobra's references, 0.21 to the toad's
    answer = wf.identify(ident, embeddings=q[None], method="knn")[0]
    assert answer.results[0].name == "Naja naja"
    assert answer.identification.nearest == pytest.approx(float(q @ a), abs=0.01)  # a cosine, not 21.8
    assert [n.species for n in wf.search(ident, embedding=q.tolist(), k=4)][:2] == ["Naja naja"] * 2


def test_a_given_row_of_zeros_is_refused_naming_it_before_anything_is_stored(setup, tmp_path):
    g, enc, files, a, _ = setup
    with pytest.raises(ValueError, match="embedding row 1 is all zeros: an embedding must be finite and not all "
                                         "zeros; drop that row, or embed its photo again"):
        wf.add_photos(g, enc, "Naja naja", files[:2], venomous=True, embeddings=np.stack([a, np.zeros(DIM)]))
    assert len(g) == 0
    uploads = [(f.name, f.read_bytes()) for f in files[:2]]
    with pytest.raises(ValueError, match="embedding row 0 is all zeros"):
        wf.add_photos(g, enc, "Naja naja", uploads, venomous=True, embeddings=np.stack([np.zeros(DIM), a]))
    assert len(g) == 0 and not any((tmp_path / "g" / "uploads").glob("*"))


@pytest.fixture
def ident(tmp_path):
    """An Identifier over 12 unit references of 3 species (the synthetic encoder)."""
    g = Gallery.create(tmp_path / "refs", ENC)
    x = np.random.default_rng(0).standard_normal((12, DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    species = ["Naja naja", "Bufo bufo", "Rana temporaria"]
    g.add([ReferenceRecord(path=f"/p/{i}.jpg", species=species[i % 3], venomous=i % 3 == 0) for i in range(12)],
          [f"{i:064x}" for i in range(12)], x.astype(np.float32))
    return Identifier(_Encoder(), g)


@pytest.mark.parametrize("observation", [False, True])
def test_identify_scales_given_embeddings_once(ident, monkeypatch, observation):
    """Before, workflows.identify scaled the rows, then identify_embeddings / identify_observation again."""
    import retrieval.identify as identify_module
    from retrieval import metric

    calls = []

    def counted(embeddings, dim):
        calls.append(len(embeddings))
        return metric.unit_queries(embeddings, dim)

    monkeypatch.setattr(identify_module, "unit_queries", counted)
    monkeypatch.setattr(wf, "unit_queries", counted)
    emb = 3 * np.random.default_rng(5).standard_normal((2, DIM))
    answers = wf.identify(ident, embeddings=emb, observation=observation, method="knn")
    assert calls == [2] and len(answers) == (1 if observation else 2) and answers[0].results
    with pytest.raises(ValueError, match="embedding row 1 is all zeros"):  # still refused, naming the row
        wf.identify(ident, embeddings=np.stack([emb[0], np.zeros(DIM)]), observation=observation)
    with pytest.raises(ValueError, match=rf"embeddings must be {DIM} numbers per row"):
        wf.identify(ident, embeddings=emb[:, :5], observation=observation)


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_search_takes_the_photo_bytes_identify_takes(ident, tmp_path, kind):
    """Before, search(photo=bytearray(...)) was refused ('a bytearray: pass ... its bytes') while identify took it."""
    p = tmp_path / "q.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
    data = p.read_bytes()
    near = wf.search(ident, kind(data), k=3)
    assert [n.id for n in near] == [n.id for n in wf.search(ident, data, k=3)] and len(near) == 3
    assert wf.identify(ident, [kind(data)])[0].error is None
    with pytest.raises(TypeError, match=r"photo is one photo, here a list: pass the photo's file path"):
        wf.search(ident, [data])
    with pytest.raises(TypeError, match=r"photo is one photo, here a int: pass the photo's file path"):
        wf.search(ident, 3)


@pytest.mark.parametrize("bad", [0, -2, True, 2.0, "3"])
def test_top_and_k_are_whole_numbers_from_1_by_one_rule(ident, bad):
    emb = np.random.default_rng(2).standard_normal((1, DIM))
    with pytest.raises(ValueError, match=rf"top must be a whole number >= 1 \(the candidates each answer lists\), "
                                         rf"not {re.escape(repr(bad))}"):
        wf.identify(ident, embeddings=emb, top=bad)
    with pytest.raises(ValueError, match=rf"k must be a whole number >= 1 \(the neighbours to return\), "
                                         rf"not {re.escape(repr(bad))}"):
        wf.search(ident, embedding=emb[0].tolist(), k=bad)


def test_the_venom_and_sweep_functions_take_an_identifier_as_their_hints_and_docs_say(ident):
    import typing
    from pathlib import Path

    assert wf.set_venom_advice(ident, None).now is True
    assert wf.set_species_venomous(ident, "Bufo bufo", False).was is False
    assert wf.venom_advice_note(ident) == wf.venom_advice_note(ident.gallery)
    assert wf.sweep_uploads(ident, dry_run=True, progress=False) is not None
    for fn in (wf.set_venom_advice, wf.set_species_venomous, wf.venom_advice_note, wf.sweep_uploads):
        assert Identifier in typing.get_args(typing.get_type_hints(fn)["gallery"]), fn.__name__
    doc = " ".join((Path(__file__).parents[1] / "docs" / "python.md").read_text().split())
    assert ("`delete_references`, `set_species_venomous`, `set_venom_advice`, `venom_advice_note` and "
            "`sweep_uploads` any of the three") in doc
