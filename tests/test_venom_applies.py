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
    # the birds are no snakes: their unrecorded status is no venom share (walk s52 #2); the cobra's third warns
    assert unknown.venom_advice.treat_as_venomous and unknown.venom_advice.level == "possibly_venomous"
    assert unknown.venom_unknown_score == 0.0 and "(Naja haje)" in unknown.venom_advice.text


def _taxon(species: str, genus: str | None = None, family: str | None = None,
           venomous: bool | None = None) -> SpeciesSummary:
    return SpeciesSummary(species, genus, family, None, venomous, 3)


def test_the_rule_tells_snakes_by_what_the_gallery_knows():
    """Safe when in doubt: a species recorded venomous, a species, genus or family of the shipped snake taxonomy,
    or a label that is no scientific name makes a gallery one of snakes; only scientific names of no snake genus or
    family, none recorded venomous, make one that is not (a harmless flag on a bird says nothing of snakes)."""
    assert venom_applies([_taxon(s) for s in BIRDS]) is False
    assert venom_applies([_taxon("Corvus corax", "Corvus", "Corvidae")]) is False
    assert venom_applies([_taxon("Corvus corax"), _taxon("Naja haje")])  # a species of the taxonomy
    assert venom_applies([_taxon("Corvus corax"), _taxon("Lycodon novus")])  # a snake genus, a species it lacks
    assert venom_applies([_taxon("Corvus corax"), _taxon("Foo bar", family="Viperidae")])  # a snake family
    assert venom_applies([_taxon("Corvus corax"), _taxon("Foo bar", venomous=True)])  # recorded venomous
    # walk s52 #2b: a bird flagged harmless made a gallery of birds one of snakes (treat far answers as venomous)
    assert venom_applies([_taxon("Corvus corax"), _taxon("Parus major", venomous=False)]) is False
    assert venom_applies([_taxon("Corvus corax"), _taxon("Natrix maura", venomous=False)])  # a harmless snake
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
        ready = client.get("/readyz").json()  # what the page words itself by (walk s52 #6)
    body = resp.json()
    assert resp.status_code == 200 and body["far"] and body["venom_advice"] is None, resp.text
    assert body["venom_applies"] is False and ready["venom_applies"] is False, ready


# -------------------------------------------------------------------- a gallery of snakes and other animals
FROGS = ("Bufo bufo", "Rana temporaria")


def test_a_toad_beside_a_cobra_is_named_with_no_venom_advice(tmp_path):
    """Walk s52 #2a: a mixed gallery (toads and a cobra) told 'Venom status not recorded for Bufo bufo (100.0% of the
    probability): treat as venomous'; a scientific name of no snake genus or family is no snake: its share is no
    unrecorded venom, and its named answer gets no advice of its own. The far answer keeps the safe advice."""
    g, toad = _gallery(tmp_path, {FROGS[0]: {}, FROGS[1]: {}, "Naja haje": {"venomous": True}})
    ident = Identifier(FakeEncoder(), g)
    (named,) = ident.identify_embeddings(toad[None].astype(np.float32))
    assert not named.unknown and named.predictions[0].species == "Bufo bufo", named.predictions
    assert named.venom_advice is None and named.venom_unknown_score == 0.0, named.venom_advice
    assert named.venom_applies and named.predictions[0].venomous is None  # the gallery's snakes keep the advice
    (far,) = ident.identify_embeddings((-toad)[None].astype(np.float32))
    assert far.far and far.venom_advice.text == FAR_TEXT and far.venom_advice.treat_as_venomous


@pytest.mark.parametrize("name", ["Lycodon novus", "cobra"], ids=["a snake genus", "a label"])
def test_a_snake_or_a_label_of_unrecorded_status_beside_toads_still_warns(tmp_path, name):
    """What is, or may be, a snake (a snake genus the taxonomy lacks; a label nothing can check) keeps 'unrecorded
    -> treat as venomous', beside toads too."""
    g, snake = _gallery(tmp_path, {name: {}, FROGS[0]: {}, "Naja haje": {"venomous": True}})
    (named,) = Identifier(FakeEncoder(), g).identify_embeddings(snake[None].astype(np.float32))
    assert named.predictions[0].species == name, named.predictions
    advice = named.venom_advice
    assert advice.level == "possibly_venomous" and advice.treat_as_venomous, advice
    assert advice.text.startswith(f"Venom status not recorded for {name} ("), advice.text
    assert named.venom_unknown_score > 0.5


def test_the_rule_tells_which_unrecorded_species_count_as_possibly_venomous():
    """retrieval.advice.not_snakes / may_be_snake / venom_advice(top_applies): the one rule."""
    from retrieval.advice import may_be_snake, not_snakes, unrecorded_share, venom_advice

    taxa = [_taxon("Bufo bufo"), _taxon("Parus major", "Parus", "Paridae"), _taxon("Lycodon novus"),
            _taxon("Foo bar", family="Viperidae"), _taxon("cobra"), _taxon("Naja haje", venomous=True),
            _taxon("Corvus corax", venomous=False), _taxon("Natrix maura")]
    assert not_snakes(taxa) == {"Bufo bufo", "Parus major"}  # a status recorded, or a snake: never in it
    assert may_be_snake("Natrix maura") and may_be_snake("cobra") and not may_be_snake("Bufo bufo")
    flags = {t.species: t.venomous for t in taxa}
    scores = {"Bufo bufo": 0.5, "Lycodon novus": 0.2, "Naja haje": 0.3}
    assert unrecorded_share(scores, flags, not_snakes(taxa)) == pytest.approx(0.2)
    assert unrecorded_share(scores, flags) == pytest.approx(0.7)  # with no species known to be no snake
    # a toad named, nothing on venomous or unrecorded snakes: no advice; a cobra's share keeps the 'unlikely' line
    assert venom_advice(unknown=False, far=False, venomous_score=0.0, venom_unknown_score=0.0,
                        top_applies=False) is None
    said = venom_advice(unknown=False, far=False, venomous_score=0.04, venom_unknown_score=0.0, top_applies=False)
    assert said.level == "unlikely" and "4.0%" in said.text
    assert venom_advice(unknown=False, far=False, venomous_score=0.0, venom_unknown_score=0.0).level == "unlikely"
    # unknown and far answers keep the safe advice whatever the top candidate is
    for far, unknown in ((True, True), (False, True)):
        assert venom_advice(unknown=unknown, far=far, venomous_score=0.0, venom_unknown_score=0.0,
                            top_applies=False).treat_as_venomous


def test_the_add_warns_of_possibly_venomous_only_for_what_may_be_a_snake(tmp_path, capsys, caplog):
    """Walk s52 #2b: adding a bird warned that answers 'count it as possibly venomous', which they did not (and now
    never do); a species of a snake genus the taxonomy lacks still gets the warning, and answers do count it."""
    index = _bird_folder(tmp_path, capsys)
    photo = _photo(tmp_path / "new" / "a.png", 40)
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Sylvia atricapilla", photo,
                          *ENCODER)
    assert code == 0 and "venom" not in out + err + caplog.text, (out, err, caplog.text)
    photo = _photo(tmp_path / "new" / "b.png", 41)
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Lycodon novus", photo,
                          *ENCODER)
    assert code == 0 and ("'Lycodon novus' is not in the shipped snake taxonomy and no venomous flag was given: its "
                          "venom status stays unknown (answers count it as possibly venomous)") in caplog.text, caplog.text


def test_the_add_says_a_name_of_no_snake_genus_is_taken_for_no_snake_in_a_gallery_of_snakes(tmp_path, capsys,
                                                                                          caplog):
    """In a gallery with snakes, a new species of no snake genus or family and no flag is taken for no snake (its
    share is no unrecorded venom): said, so that a snake of a genus the taxonomy lacks is not left so unsaid."""
    from _cli_support import two_species_gallery

    index, _ = two_species_gallery(tmp_path, capsys)  # Naja samarensis, Natrix maura
    photo = _photo(tmp_path / "new" / "a.png", 40)
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Testus incertus", photo,
                          *ENCODER)
    assert code == 0, (out, err)
    assert ("'Testus incertus' is of no genus or family of the shipped snake taxonomy and no venomous flag was given: "
            "answers take it for no snake") in caplog.text, caplog.text
    assert "possibly venomous" not in caplog.text, caplog.text


def test_a_gallery_of_birds_one_flagged_harmless_gets_no_venom_advice(tmp_path, capsys):
    """Walk s52 #2b: a bird added with '--venomous no' (or set so: species set-venom) turned a gallery of birds into
    one of snakes, every far and unknown answer told to treat the bite as venomous."""
    index = _bird_folder(tmp_path, capsys)
    code, out, err = _run(capsys, "species", "set-venom", "--index", index, "Corvus corax", "no")
    assert code == 0, err
    blank = tmp_path / "white.png"
    Image.new("RGB", (64, 48), "white").save(blank)
    code, out, err = _run(capsys, "identify", "--index", index, blank, "--format", "json", "-q")
    (answer,) = json.loads(out)
    assert code == 0 and answer["far"] and answer["venom_advice"] is None and answer["venom_applies"] is False, out
