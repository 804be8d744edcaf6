"""Venom advice only where a bite can be of a snake (retrieval.advice.venom_applies): a gallery of birds gets none,
far and unknown answers included, in the library, the CLI and the API's answer; a gallery of snakes keeps the safe
advice on far and unknown answers even when it records no venom status (a plain folder, as ph-snakes); a gallery
that mixes the two keeps it too."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _cli_support import ENCODER, _photo, _run
from PIL import Image

from index.gallery import Gallery
from index.records import ReferenceRecord
from index.store import SpeciesSummary
from retrieval.advice import FAR_TEXT, UNKNOWN_TEXT, venom_applies
from retrieval.identify import Identifier
from retrieval.vote import VoteConfig

DIM = 16
ENC = {"spec": "test:synthetic", "fingerprint": "test:synthetic#abc", "dim": DIM}
BIRDS = ("Corvus corax", "Passer domesticus")
#: ph-snakes' folders name no venom status (``Common Name (Genus species)``): as records of unrecorded status.
PH_SNAKES = ("Naja philippinensis", "Lycodon capucinus")


class FakeEncoder:
    """Stands in for an encoder when only embeddings matter."""

    spec = ENC["spec"]
    fingerprint = ENC["fingerprint"]
    dim = DIM


def _gallery(tmp_path, species: dict[str, dict]) -> tuple[Gallery, np.ndarray]:
    """A gallery of 6 references of each species (``species``: name -> the records' other fields) around its own
    centre; with the first species' centre."""
    rng = np.random.default_rng(5)
    g = Gallery.create(tmp_path / "g", ENC)
    first = None
    for name, fields in species.items():
        centre = rng.standard_normal(DIM)
        first = centre if first is None else first
        x = centre + 0.05 * rng.standard_normal((6, DIM))
        g.add([ReferenceRecord(path=f"/photos/{name}/{i}.jpg", species=name, **fields) for i in range(6)],
              [f"{name}-{i}" for i in range(6)], (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    return g, first / np.linalg.norm(first)


def _far_and_unknown(g: Gallery, centre: np.ndarray):
    """A far answer (the photo opposite every reference) and an unknown one (at a species' centre, every
    reference voting alike: no species reaches the unknown threshold)."""
    ident = Identifier(FakeEncoder(), g)
    (far,) = ident.identify_embeddings((-centre)[None].astype(np.float32))
    ident.config = VoteConfig(k=len(g), temperature=1000.0, unknown_threshold=0.9)
    (unknown,) = ident.identify_embeddings(centre[None].astype(np.float32))
    assert far.far and far.unknown, far.nearest
    assert unknown.unknown and not unknown.far
    return far, unknown


def test_a_gallery_of_birds_gets_no_venom_advice_even_far_or_unknown(tmp_path):
    """It was told 'treat the bite as venomous' on a far or unknown answer, as a gallery of snakes is."""
    g, centre = _gallery(tmp_path, {s: {"family": f} for s, f in zip(BIRDS, ("Corvidae", "Passeridae"), strict=True)})
    for answer in _far_and_unknown(g, centre):
        assert answer.venom_advice is None and answer.venom_applies is False, answer.venom_advice
        said = answer.to_dict()
        assert said["venom_advice"] is None and said["venom_applies"] is False


@pytest.mark.parametrize("fields", [{}, {"family": "Elapidae"}], ids=["no family", "a family"])
def test_a_gallery_of_snakes_with_no_venom_status_keeps_the_safe_advice(tmp_path, fields):
    g, centre = _gallery(tmp_path, {s: fields for s in PH_SNAKES})
    assert all(s.venomous is None for s in g.species())  # no venom column
    far, unknown = _far_and_unknown(g, centre)
    assert far.venom_advice.text == FAR_TEXT and far.venom_advice.treat_as_venomous and far.venom_applies
    assert unknown.venom_advice.text == UNKNOWN_TEXT and unknown.venom_advice.treat_as_venomous


def test_a_gallery_of_birds_and_snakes_keeps_the_safe_advice(tmp_path):
    g, centre = _gallery(tmp_path, {BIRDS[0]: {}, BIRDS[1]: {}, "Naja haje": {"venomous": True}})
    far, unknown = _far_and_unknown(g, centre)  # the unknown answer is of a bird's photo
    assert far.venom_advice.text == FAR_TEXT and far.venom_applies and unknown.venom_applies
    # the birds' unrecorded status is no harmless share: their 2/3 of the probability warns
    assert unknown.venom_advice.treat_as_venomous and unknown.venom_advice.level == "possibly_venomous"


def _taxon(species: str, genus: str | None = None, family: str | None = None,
           venomous: bool | None = None) -> SpeciesSummary:
    return SpeciesSummary(species, genus, family, None, venomous, 3)


def test_the_rule_tells_snakes_by_what_the_gallery_knows():
    """Safe when in doubt: a venom status (harmless too), a species, genus or family of the shipped snake taxonomy,
    or a label that is no scientific name makes a gallery one of snakes; only scientific names of no snake genus or
    family, none with a venom status, make one that is not."""
    assert venom_applies([_taxon(s) for s in BIRDS]) is False
    assert venom_applies([_taxon("Corvus corax", "Corvus", "Corvidae")]) is False
    assert venom_applies([_taxon("Corvus corax"), _taxon("Naja haje")])  # a species of the taxonomy
    assert venom_applies([_taxon("Corvus corax"), _taxon("Lycodon novus")])  # a snake genus, a species it lacks
    assert venom_applies([_taxon("Corvus corax"), _taxon("Foo bar", family="Viperidae")])  # a snake family
    assert venom_applies([_taxon("Corvus corax"), _taxon("Foo bar", venomous=False)])  # a venom status recorded
    assert venom_applies([_taxon("Corvus corax"), _taxon("cobra")])  # a label: nothing tells what it is
    assert venom_applies([])


def _bird_folder(tmp_path, capsys):
    """A gallery of two birds built from a plain folder (``Common Name (Genus species)``), as ph-snakes is."""
    root = tmp_path / "photos"
    for i in range(6):
        _photo(root / ("Common Raven (Corvus corax)" if i % 2 else "House Sparrow (Passer domesticus)") / f"{i}.png",
               i)
    index = tmp_path / "g"
    code, _, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", index, *ENCODER,
                        "-q")
    assert code == 0, err
    return index


def test_the_cli_says_nothing_of_venom_for_a_gallery_of_birds(tmp_path, capsys):
    """The CLI's table, JSON and CSV of a far and an unknown answer of birds: no advice, no word of venom."""
    index = _bird_folder(tmp_path, capsys)
    blank = tmp_path / "white.png"
    Image.new("RGB", (64, 48), "white").save(blank)
    bird = tmp_path / "photos" / "Common Raven (Corvus corax)" / "1.png"
    for photo, extra in ((blank, ()), (bird, ("--unknown-threshold", "0.999999"))):
        code, out, err = _run(capsys, "identify", "--index", index, photo, "--format", "json", *extra, "-q")
        (answer,) = json.loads(out)
        assert code == 0 and answer["unknown"] and answer["venom_advice"] is None, (out, err)
        assert answer["venom_applies"] is False
        if photo == blank:
            assert answer["far"], answer["nearest_similarity"]
        code, out, err = _run(capsys, "identify", "--index", index, photo, *extra, "-q")
        assert code == 0 and "UNKNOWN" in out and "venom" not in out.lower(), out
        code, out, err = _run(capsys, "identify", "--index", index, photo, "--format", "csv", *extra, "-q")
        assert code == 0 and "treat the bite" not in out and "cannot_tell" not in out, out


def test_the_api_answers_a_gallery_of_birds_with_no_venom_advice(tmp_path, capsys):
    """/v1/identify of a far photo in a gallery of birds: venom_advice null, venom_applies false (the page then shows
    no venom wording: tests/test_web_page.py)."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import Settings

    index = _bird_folder(tmp_path, capsys)
    blank = tmp_path / "white.png"
    Image.new("RGB", (64, 48), "white").save(blank)
    with TestClient(create_app(Settings(index=str(index), api_keys="secret", precision="fp32"))) as client:
        resp = client.post("/v1/identify", files=[("images", (blank.name, blank.read_bytes(), "image/png"))])
    body = resp.json()
    assert resp.status_code == 200 and body["far"] and body["venom_advice"] is None, resp.text
    assert body["venom_applies"] is False
