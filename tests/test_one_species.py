"""Galleries that cannot tell species apart, or favour some (walk s57, findings 1, 2 and 5): a gallery of one species
answered other species "100% <that species>, venom unlikely"; a 70-photo species swamped 1-photo ones with no
warning; the same photo under two species was a plain "duplicate", and the near-copy note of a tie named one species
of two. Synthetic galleries (given vectors) and the tiny random ``timm:test_vit@random`` encoder: no shared assets."""

from __future__ import annotations

import json
import logging

import numpy as np
from _cli_support import DIM, ENC, ENCODER, FakeEncoder, _photo, _run, folder_gallery, unit

from index.gallery import Gallery, Neighbour
from index.records import ReferenceRecord
from retrieval.advice import imbalance_note, one_species_note, species_notes, venom_advice
from retrieval.identify import Identifier, near_copy_note
from retrieval.workflows import answer_notes, warn_species

WOLF = "Lycodon capucinus"
ONE_WOLF = ("this gallery holds one species (Lycodon capucinus): it cannot tell species apart, so every photo it "
            "does not mark far or UNKNOWN is answered as Lycodon capucinus at 100%, whatever animal it shows, and "
            "its venom advice is 'cannot tell, treat as venomous'; add reference photos of other species ({how})")


def _gallery(root, counts: dict[str, int], *, seed: int = 0, venomous: bool | None = False) -> Gallery:
    """A synthetic gallery: ``counts[species]`` references around one centre per species."""
    rng = np.random.default_rng(seed)
    g = Gallery.create(root, ENC)
    for k, (species, n) in enumerate(counts.items()):
        centre = rng.standard_normal(DIM)
        g.add([ReferenceRecord(path=f"/p/{k}-{i}.jpg", species=species, venomous=venomous) for i in range(n)],
              [f"{k}-{i}" for i in range(n)], unit(centre + 0.4 * rng.standard_normal((n, DIM))))
    return g


# ------------------------------------------------------------------------------------------------ one species
def test_a_gallery_of_one_harmless_species_never_advises_venom_unlikely(tmp_path):
    """The safety part of finding 1: a cobra answered "100% Common Wolf Snake, venomous 0.0%, unlikely". The answer
    keeps its scores; its advice is "cannot tell, treat as venomous", and it carries the one-species note."""
    g = _gallery(tmp_path / "g", {WOLF: 8})
    ident = Identifier(FakeEncoder(), g)
    query = g.reference_vectors([int(g.index.ids[0])])  # as close as can be: not far, not UNKNOWN
    answer = ident.identify_embeddings(query)[0]
    assert not answer.far and not answer.unknown and answer.predictions[0].score == 1.0
    assert answer.venomous_score == 0.0
    assert answer.venom_advice.level == "cannot_tell" and answer.venom_advice.treat_as_venomous
    assert answer.venom_advice.text == (
        "This gallery holds one species (Lycodon capucinus), so it cannot tell species apart and the photo's venom "
        "status cannot be told: if someone was bitten, treat the bite as venomous and seek medical care.")
    assert ONE_WOLF.format(how="speciesid references add") == one_species_note(WOLF)
    assert ONE_WOLF.format(how="POST /v1/species/{name}/references") in answer_notes(ident, api=True)


def test_a_gallery_of_two_species_keeps_its_venom_unlikely_advice(tmp_path):
    g = _gallery(tmp_path / "g", {WOLF: 8, "Natrix maura": 8})
    ident = Identifier(FakeEncoder(), g)
    answer = ident.identify_embeddings(g.reference_vectors([int(g.index.ids[0])]))[0]
    assert answer.venom_advice.level == "unlikely" and ident.one_species() is None
    assert not any("one species" in n for n in answer_notes(ident, api=True))


def test_venom_advice_of_one_species_is_cannot_tell_unless_far_or_off():
    kw = {"venom_unknown_score": 0.0, "one_species": "Naja samarensis"}
    said = venom_advice(unknown=False, far=False, venomous_score=1.0, **kw)  # a venomous one: not "probability 100%"
    assert (said.level, said.treat_as_venomous) == ("cannot_tell", True)
    assert "one species (Naja samarensis)" in said.text
    assert venom_advice(unknown=False, far=True, venomous_score=None, **kw).text.startswith(
        "This photo cannot be identified")
    assert venom_advice(unknown=False, far=False, venomous_score=0.0, applies=False, **kw) is None


def test_index_build_of_one_species_warns_and_identify_notes_it(tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        index = folder_gallery(tmp_path, capsys, ("Common Wolf Snake (Lycodon capucinus)",), 3)
    assert ONE_WOLF.format(how="speciesid references add") in caplog.text
    query = _photo(tmp_path / "q.png", 99)
    code, out, err = _run(capsys, "identify", "--index", index, query, "-q", "--precision", "fp32")
    assert code == 0 and f"note: {ONE_WOLF.format(how='speciesid references add')}" in out, (out, err)
    assert "venom status cannot be told" in out or "cannot be identified" in out
    assert "Probability medically important venomous" not in out


def test_references_delete_that_leaves_one_species_warns(tmp_path, capsys, caplog):
    index = folder_gallery(tmp_path, capsys, ("Common Wolf Snake (Lycodon capucinus)", "Natrix maura"), 4)
    found = json.loads(_run(capsys, "search", "--index", index, tmp_path / "photos" / "Natrix maura" / "1.png",
                            "--k", "4", "--format", "json")[1])["neighbours"]
    maura = [n["id"] for n in found if n["species"] == "Natrix maura"]
    assert len(maura) == 2
    with caplog.at_level(logging.WARNING):
        code, out, err = _run(capsys, "references", "delete", "--index", index, *maura)
    assert code == 0 and ONE_WOLF.format(how="speciesid references add") in caplog.text, (out, err)


# -------------------------------------------------------------------------------------------------- imbalance
def test_imbalance_note_names_the_largest_and_smallest_species_and_what_to_do():
    note = imbalance_note({WOLF: 70, "Naja samarensis": 1, "Ptyas carinata": 1, "Natrix maura": 30})
    assert note == ("photo counts per species differ a lot (Lycodon capucinus has 70 reference photos, Naja "
                    "samarensis 1; 2 species have under a tenth of that (Naja samarensis, Ptyas carinata)): the kNN "
                    "vote counts each neighbouring photo, so it favours species with many photos (a photo of a small "
                    "species is often answered as a large one); add photos of the small species (speciesid "
                    "references add), and 'speciesid probe train' (its probe weighs every species alike, blended "
                    "with the vote) lessens it")
    assert imbalance_note({WOLF: 70, "Naja samarensis": 7}) == ""  # 10x, not more
    assert imbalance_note({WOLF: 19, "Naja samarensis": 1}) == ""  # a small gallery, not a skewed one
    assert imbalance_note({WOLF: 70, "Naja samarensis": 0}) == ""  # no photo: not a species it holds
    assert species_notes({WOLF: 70, "Naja samarensis": 0}) == [one_species_note(WOLF)]
    assert species_notes({s: 70 for s in ("a b", "c d")}) == []  # ph-snakes: 70 a species, no note


def test_a_build_and_index_info_and_species_list_say_the_gallery_is_unbalanced(tmp_path, capsys, caplog):
    g = _gallery(tmp_path / "g", {WOLF: 22, "Naja samarensis": 2})
    with caplog.at_level(logging.WARNING):
        warn_species(g)  # what index build says at its end
    assert "photo counts per species differ a lot (Lycodon capucinus has 22 reference photos, Naja samarensis 2)" \
        in caplog.text
    code, out, err = _run(capsys, "species", "list", "--index", g.root)
    assert code == 0 and out.splitlines()[-1].startswith("note: photo counts per species differ a lot"), (out, err)
    info = json.loads(_run(capsys, "index", "info", "--index", g.root)[1])
    assert info["species_notes"] == [imbalance_note({WOLF: 22, "Naja samarensis": 2})]


def test_references_add_says_the_gallery_is_unbalanced(tmp_path, capsys):
    index = folder_gallery(tmp_path, capsys, ("Common Wolf Snake (Lycodon capucinus)",), 21)
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Natrix maura", *ENCODER,
                          _photo(tmp_path / "new" / "m.png", 500))
    assert code == 0, (out, err)
    assert ("note: photo counts per species differ a lot (Lycodon capucinus has 21 reference photos, Natrix maura 1)"
            in out), out


# -------------------------------------------------------------------------------------- the same photo, two labels
def test_the_same_file_under_two_species_is_a_label_conflict_naming_both(tmp_path, capsys):
    root = tmp_path / "photos"
    first = _photo(root / "Philippine Cobra (Naja philippinensis)" / "x1.png", 1)
    (root / "Samar Cobra (Naja samarensis)").mkdir()
    (root / "Samar Cobra (Naja samarensis)" / "x1.png").write_bytes(first.read_bytes())
    code, out, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", tmp_path / "g",
                          *ENCODER, "-q")
    assert code == 0, err
    assert "1 references, 1 species" in out and "  duplicate " not in out, out
    assert any(line.startswith("label conflict: ") and "(Naja samarensis) is the same file as " in line
               and "(Naja philippinensis): stored once, as Naja philippinensis; one of the two labels is wrong"
               in line
               for line in out.splitlines()), out
    assert ("species left with no photos, each of theirs stored under another species (the label conflicts above): "
            "Naja samarensis") in out


def _neighbour(i: int, cosine: float, species: str) -> Neighbour:
    return Neighbour(i, cosine, species, species.split()[0], None, None, True, f"/p/{i}.jpg", None)


def test_the_near_copy_note_of_several_species_names_a_reference_of_each():
    """Walk s57: "a near-copy of references of 2 species (#10 Naja samarensis, #9 ..., #7 Naja samarensis; ...)"."""
    near = [_neighbour(10 - i, 1.0, "Naja samarensis") for i in range(5)] + \
        [_neighbour(5 - i, 1.0, "Naja philippinensis") for i in range(5)]
    note = near_copy_note(near, "Naja samarensis").note
    assert note.startswith("this photo is a near-copy of references of 2 species (#10 Naja samarensis, #9 Naja "
                           "samarensis, #8 Naja samarensis, #5 Naja philippinensis; cosine >= 0.95)"), note
    three = near[:5] + [_neighbour(20, 0.99, "Naja naja"), _neighbour(21, 0.98, "Naja sumatrana"),
                        _neighbour(22, 0.97, "Naja philippinensis")]
    note = near_copy_note(three, "Naja samarensis").note
    assert "references of 4 species (#10 Naja samarensis, #20 Naja naja, #21 Naja sumatrana, #22 Naja " \
           "philippinensis;" in note, note
