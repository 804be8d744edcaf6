"""A probe older than the gallery: answers, ``/readyz`` and ``index info`` say how many references came and went since
it was trained; and a photo that is a near-copy of a reference is told so (``retrieval.identify.near_copy_note``),
its answer and venom advice the blend's all the same (a lift out of UNKNOWN turned "cannot tell, treat as venomous"
into "unlikely": stop 54's re-read).

Synthetic galleries (given vectors, a probe of given probabilities) for the rules; the small real MobileNetV1 gallery
of the API tests for the CLI and the server (soak walk, stop 54: a photo just added answered "UNKNOWN, possibly
venomous").
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _cli_support import DIM, ENC, FakeEncoder, _run, unit

import retrieval.identify as identify_module
from index.gallery import Gallery
from index.records import ReferenceRecord
from retrieval.identify import Identifier
from retrieval.probe import Calibration, LinearProbe, references_since
from retrieval.probe_share import probe_status
from retrieval.workflows import answer_notes

HARMLESS, VENOMOUS = "Natrix maura", "Naja haje"


def _gallery(tmp_path) -> tuple[Gallery, dict[str, np.ndarray]]:
    """Two species of 10 photos each around two centres (one harmless, one venomous)."""
    rng = np.random.default_rng(0)
    g = Gallery.create(tmp_path / "g", ENC)
    centres = {HARMLESS: rng.standard_normal(DIM), VENOMOUS: rng.standard_normal(DIM)}
    for species, venomous in ((HARMLESS, False), (VENOMOUS, True)):
        x = unit(centres[species] + 0.3 * rng.standard_normal((10, DIM)))
        g.add([ReferenceRecord(path=f"/p/{species[:4]}{i}.jpg", species=species, venomous=venomous)
               for i in range(10)], [f"{species}-{i}" for i in range(10)], x)
    return g, centres


def _probe(g: Gallery, harmless: float = 0.1) -> LinearProbe:
    """A probe that gives every photo ``harmless`` to the harmless species (the rest to the venomous one), blended
    half and half with the kNN vote, UNKNOWN under 0.7, trained on the gallery as it is now."""
    species = sorted((HARMLESS, VENOMOUS))
    probs = np.array([harmless if s == HARMLESS else 1 - harmless for s in species])
    return LinearProbe(species=species, weight=np.zeros((2, DIM), np.float32), bias=np.log(probs).astype(np.float32),
                       fingerprint=ENC["fingerprint"], trained_on=len(g), made_at="2026-12-07T14:41:54+00:00",
                       calibration=Calibration(blend_weight=0.5, k=5, temperature=0.03, unknown_threshold=0.7),
                       reference_ids=np.sort(np.asarray(g.index.ids, dtype=np.int64)))


def _add(g: Gallery, species: str, x: np.ndarray, tag: str) -> list[int]:
    return g.add([ReferenceRecord(path=f"/p/{tag}{i}.jpg", species=species) for i in range(len(x))],
                 [f"{tag}-{i}" for i in range(len(x))], unit(x))


def _without_note(monkeypatch, ident: Identifier, query: np.ndarray):
    """The answer with no near-copy look at all (:func:`retrieval.identify.near_copy_note` off)."""
    with monkeypatch.context() as m:
        m.setattr(identify_module, "near_copy_note", lambda *a, **k: None)
        (answer,) = ident.identify_embeddings(query[None])
    return answer


def _same_answer(answer, plain) -> None:
    """The near-copy note changed nothing of the answer: UNKNOWN, scores, venom probability and advice."""
    assert answer.unknown == plain.unknown and answer.far == plain.far
    assert answer.scores == plain.scores and answer.venomous_score == plain.venomous_score
    assert answer.venom_advice == plain.venom_advice


def test_a_photo_added_after_the_probe_keeps_the_blends_answer_and_names_its_copy(tmp_path, monkeypatch):
    g, centres = _gallery(tmp_path)
    ident = Identifier(FakeEncoder(), g, probe=_probe(g))
    new = unit(centres[HARMLESS] + 0.3 * np.random.default_rng(5).standard_normal(DIM))
    (rid,) = _add(g, HARMLESS, new[None], "later")
    (answer,) = ident.identify_embeddings(new[None])
    # kNN: all harmless (its own copy first); the probe says 10 %: blend 0.5 + 0.5 * 0.1 = 0.55, under 0.7
    assert answer.scores[HARMLESS] == pytest.approx(0.55, abs=0.01)
    assert answer.predictions[0].species == HARMLESS
    assert answer.unknown and answer.near_copy == rid  # UNKNOWN as the blend says; the copy named, nothing more
    assert answer.venom_advice.level == "possibly_venomous" and answer.venom_advice.treat_as_venomous
    _same_answer(answer, _without_note(monkeypatch, ident, new))
    (note,) = answer.notes
    assert note.startswith(f"this photo is a near-copy of reference #{rid} of {HARMLESS} (later0.jpg, cosine 1.000)")
    assert "the answer and its venom advice are the blend's all the same" in note
    assert "the probe was trained before that reference was added: `speciesid probe train` lets the probe learn it" \
        in note
    # the probe alone is a closed-world answer of its own: not looked at there
    (alone,) = ident.identify_embeddings(new[None], method="probe")
    assert alone.predictions[0].species == VENOMOUS and alone.near_copy is None and not alone.notes


def test_a_harmless_near_copy_under_the_warning_share_still_cannot_tell_and_treats_as_venomous(tmp_path,
                                                                                                 monkeypatch):
    """The re-reader's case (stop 54, p1): a near-copy of a harmless reference, the blend 9.5 % venomous (under the
    10 % warning) and under the unknown threshold: "cannot tell, treat as venomous" stays, never "unlikely"."""
    rng = np.random.default_rng(0)
    harmless2 = "Coronella girondica"
    g = Gallery.create(tmp_path / "g", ENC)
    centres = {s: rng.standard_normal(DIM) for s in (HARMLESS, harmless2, VENOMOUS)}
    for species, venomous in ((HARMLESS, False), (harmless2, False), (VENOMOUS, True)):
        g.add([ReferenceRecord(path=f"/p/{species[:4]}{i}.jpg", species=species, venomous=venomous)
               for i in range(10)], [f"{species}-{i}" for i in range(10)],
              unit(centres[species] + 0.3 * rng.standard_normal((10, DIM))))
    species = sorted(centres)
    probs = {HARMLESS: 0.01, VENOMOUS: 0.19, harmless2: 0.80}
    probe = LinearProbe(species=species, weight=np.zeros((3, DIM), np.float32),
                        bias=np.log(np.array([probs[s] for s in species])).astype(np.float32),
                        fingerprint=ENC["fingerprint"], trained_on=len(g),
                        calibration=Calibration(blend_weight=0.5, k=5, temperature=0.03, unknown_threshold=0.7),
                        reference_ids=np.sort(np.asarray(g.index.ids, dtype=np.int64)))
    ident = Identifier(FakeEncoder(), g, probe=probe)
    query = unit(centres[HARMLESS] + 0.3 * np.random.default_rng(5).standard_normal(DIM))
    copy = unit(query + 0.02 * np.random.default_rng(9).standard_normal(DIM))
    (rid,) = g.add([ReferenceRecord(path="/p/later.jpg", species=HARMLESS, venomous=False)], ["later"], copy[None])
    (answer,) = ident.identify_embeddings(query[None])
    assert answer.neighbours[0].id == rid and answer.neighbours[0].plain_cosine >= 0.99
    assert answer.venomous_score == pytest.approx(0.095, abs=0.005)  # under VENOM_WARN_AT
    assert answer.unknown and answer.near_copy == rid
    assert answer.venom_advice.level == "cannot_tell" and answer.venom_advice.treat_as_venomous
    _same_answer(answer, _without_note(monkeypatch, ident, query))


def test_a_copy_ranked_another_species_or_a_copy_of_two_species_changes_nothing(tmp_path, monkeypatch):
    g, centres = _gallery(tmp_path)
    probe = _probe(g, harmless=0.001)
    ident = Identifier(FakeEncoder(), g, probe=probe)
    ident.blend_weight = 0.9  # the probe outweighs the vote: the venomous species ranks first
    new = unit(centres[HARMLESS] + 0.3 * np.random.default_rng(6).standard_normal(DIM))
    (rid,) = _add(g, HARMLESS, new[None], "later")
    (answer,) = ident.identify_embeddings(new[None])
    assert answer.predictions[0].species == VENOMOUS and answer.near_copy == rid  # named, the answer as it was
    _same_answer(answer, _without_note(monkeypatch, ident, new))
    assert f"near-copy of reference #{rid} of {HARMLESS}" in answer.notes[0]
    assert f"the answer ranks {VENOMOUS} first: check that reference's label" in answer.notes[0]
    ident.blend_weight = 0.5
    (other,) = _add(g, VENOMOUS, new[None] * 1.0001, "copy")  # the same photo filed under the other species
    (answer,) = ident.identify_embeddings(new[None])
    assert answer.near_copy is None
    assert "near-copy of references of 2 species" in answer.notes[0] and "likely mislabelled" in answer.notes[0]
    assert f"#{other} {VENOMOUS}" in answer.notes[0] or f"#{rid} {HARMLESS}" in answer.notes[0]
    _same_answer(answer, _without_note(monkeypatch, ident, new))


def test_a_copy_the_probe_trained_beside_says_nothing_of_retraining(tmp_path):
    g, centres = _gallery(tmp_path)
    new = unit(centres[HARMLESS] + 0.3 * np.random.default_rng(5).standard_normal(DIM))
    (rid,) = _add(g, HARMLESS, new[None], "later")
    (answer,) = Identifier(FakeEncoder(), g, probe=_probe(g)).identify_embeddings(new[None])  # trained after it
    assert answer.near_copy == rid and "probe train" not in answer.notes[0]


def test_a_photo_of_no_near_copy_is_answered_as_before(tmp_path):
    g, centres = _gallery(tmp_path)
    ident = Identifier(FakeEncoder(), g, probe=_probe(g))
    query = unit(centres[HARMLESS] + 0.6 * np.random.default_rng(7).standard_normal(DIM))
    assert g.search(query[None], 1)[0][0].similarity < 0.95
    (answer,) = ident.identify_embeddings(query[None])
    assert answer.unknown and answer.near_copy is None and not answer.notes


def test_references_added_and_deleted_since_the_probe_are_counted_once_per_gallery_version(tmp_path, monkeypatch):
    g, centres = _gallery(tmp_path)
    probe = _probe(g)
    ident = Identifier(FakeEncoder(), g, probe=probe)
    assert not ident.references_since().stale and ident.stale_probe_note() == ""
    assert not any("probe is older" in n for n in answer_notes(ident, api=True))
    added = _add(g, HARMLESS, centres[HARMLESS] + np.random.default_rng(8).standard_normal((3, DIM)), "new")
    g.delete([int(g.index.ids[0])])
    calls = []
    real = identify_module.references_since
    monkeypatch.setattr(identify_module, "references_since", lambda *a: calls.append(1) or real(*a))
    since = ident.references_since()
    assert (since.added, since.deleted, since.exact, since.stale) == (3, 1, True, True)
    for _ in range(3):  # every answer carries the note; counted once for this gallery version
        notes = answer_notes(ident, api=True)
        ident.identify_embeddings(g.reference_vectors(added[:1]))
    assert calls == [1]
    note = next(n for n in notes if "probe is older" in n)
    assert "3 reference photos added and 1 deleted since the probe was trained on 2026-12-07 14:41 UTC" in note
    assert "run `speciesid probe train` on the server's machine" in note
    assert f"run `speciesid probe train --index {g.root}`" in ident.stale_probe_note()  # the CLI's words
    _add(g, VENOMOUS, centres[VENOMOUS][None], "more")  # a new gallery version: counted again
    assert ident.references_since().added == 4 and calls == [1, 1]
    # /readyz and index info: the probe block says it (computed here, or the server's count passed in)
    block = probe_status(probe, g)
    assert block["references_since"] | {"note": ""} == {"added": 4, "deleted": 1, "exact": True, "stale": True,
                                                        "note": ""}
    assert "4 reference photos added and 1 deleted" in block["references_since"]["note"]
    assert probe_status(probe, g, since=ident.references_since())["references_since"]["added"] == 4


def test_the_id_set_survives_a_save_and_an_older_probe_says_the_net_change(tmp_path):
    g, _ = _gallery(tmp_path)
    probe = _probe(g)
    probe.save(tmp_path / "saved")
    loaded = LinearProbe.load(tmp_path / "saved")
    assert np.array_equal(loaded.reference_ids, probe.reference_ids)
    older = LinearProbe(species=probe.species, weight=probe.weight, bias=probe.bias, fingerprint=probe.fingerprint,
                        trained_on=18)  # no id set recorded (probe.json before it): the counts, net
    since = references_since(older, g.index.ids)
    assert (since.added, since.deleted, since.exact) == (2, 0, False)
    assert "2 reference photos more than when the probe was trained" in since.note()
    imported = LinearProbe(species=probe.species, weight=probe.weight, bias=probe.bias,
                           fingerprint=probe.fingerprint, source="finetune:/runs/a")
    assert references_since(imported, g.index.ids) is None  # a head trained elsewhere: nothing to compare


def test_the_net_change_is_counted_and_worded_once_for_answers_and_evaluate(tmp_path):
    """Re-read of stop 54 (finding 10): evaluate's protocol (``LinearProbe.out_of_date``) counted the net change of
    an older probe.json again, in words of its own ("the probe trained on 18 references and the gallery now holds
    20: 2 references were added since"); it now says what answers, /readyz and index info say."""
    g, _ = _gallery(tmp_path)
    probe = _probe(g)
    species = {HARMLESS: 10, VENOMOUS: 10}
    for trained_on, words in ((18, "2 reference photos more than when the probe was trained"),
                              (23, "3 reference photos fewer than when the probe was trained")):
        older = LinearProbe(species=probe.species, weight=probe.weight, bias=probe.bias,
                            fingerprint=probe.fingerprint, trained_on=trained_on)
        moved = references_since(older, g.index.ids).moved()
        assert moved.startswith(words) and moved in references_since(older, g.index.ids).note()
        assert older.out_of_date(species) == f"{moved} (retrain: speciesid probe train)"
    assert ": photos that left it may have trained it" in moved


def test_the_cli_and_the_server_say_the_probe_is_older_than_photos_added_since(tmp_path_factory, capsys):
    """Real MobileNetV1 weights: train, add 3 photos of a species the probe knows, then identify one (CLI), look at
    ``index info`` and ``/readyz``; train again: nothing to say."""
    from _api_support import SPECIES, binomial, gallery_copy, photos
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.service import SpeciesService
    from api.settings import Settings
    from retrieval.encoders import EncoderConfig
    from retrieval.workflows import train_gallery_probe

    index = gallery_copy(tmp_path_factory, "stale_probe")
    train_gallery_probe(index, progress=False, encoder=EncoderConfig(precision="fp32"))
    later = photos("train", SPECIES[3])[10:13]  # photos 11-13 of a species the probe knows (10 each)

    said: list[str] = []

    def run(*argv) -> str:
        code, out, err = _run(capsys, *argv)
        assert code == 0, err
        said[:] = [line for line in err.splitlines() if "note: the probe is older than the gallery" in line]
        return out

    run("references", "add", "--index", index, "--species", binomial(SPECIES[3]), *later, "-q")
    (answer,) = json.loads(run("identify", "--index", index, later[0], "--format", "json", "-q"))
    assert said and "3 reference photos added and 0 deleted since the probe was trained" in said[0]  # on stderr
    assert answer["predictions"][0]["species"] == binomial(SPECIES[3]) and not answer["unknown"]
    info = json.loads(run("index", "info", "--index", index))
    assert info["probe"]["references_since"]["added"] == 3
    assert "run `speciesid probe train --index" in info["probe"]["references_since"]["note"]
    service = SpeciesService(Settings(index=str(index), precision="fp32", refresh_s=0.0))
    try:
        with TestClient(create_app(service=service)) as client:
            probe = client.get("/readyz").json()["probe"]
            assert probe["references_since"]["stale"] and probe["references_since"]["added"] == 3
            assert "on the server's machine" in probe["references_since"]["note"]
            train_gallery_probe(index, progress=False, encoder=EncoderConfig(precision="fp32"))
            service.identifier.refresh_probe(force=True)  # as the next answer does: the server follows the new probe
            probe = client.get("/readyz").json()["probe"]  # nothing moved since it
            assert probe["references_since"] == {"added": 0, "deleted": 0, "exact": True, "stale": False,
                                                 "note": ""}
    finally:
        service.close()
    run("identify", "--index", index, later[0], "--format", "json", "-q")
    assert not said
