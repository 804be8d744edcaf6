"""The probe as the gallery moves on after it was trained: species deleted, species added, a rare species with one
photo, a server that keeps running while the probe is trained again, an evaluation of species the gallery lacks.

Uses the small real MobileNetV1 gallery of the API tests (4 ph-snakes species, 10 photos each), copied per test.
"""

from __future__ import annotations

import json
import logging
import os
import re

import numpy as np
import pytest
from _api_support import SPECIES, binomial, gallery_copy, photos

from api.cli import main
from retrieval.encoders import EncoderConfig

#: A ph-snakes species the small gallery does not hold.
WOLF = "Common Wolf Snake (Lycodon capucinus)"


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _train(index) -> None:
    from retrieval.workflows import train_gallery_probe

    train_gallery_probe(index, progress=False, encoder=EncoderConfig(precision="fp32"))


def _ids_of(index, species: str) -> list[int]:
    from index.gallery import Gallery

    meta = Gallery.open(index).store.metadata()
    return [int(i) for i in meta.index[meta["species"] == species]]


def test_a_species_deleted_from_the_gallery_is_no_answer_of_the_probe(tmp_path_factory, capsys, caplog):
    from retrieval.workflows import delete_references, identify, open_identifier

    index = gallery_copy(tmp_path_factory, "probe_deleted")
    _train(index)
    gone = binomial(SPECIES[1])
    assert len(delete_references(index, _ids_of(index, gone))) == 10  # every reference of it: the species is gone
    ident = open_identifier(index, EncoderConfig(precision="fp32"))
    assert gone in ident.probe.species  # the probe was trained with it, and is not retrained
    photo = photos("val", SPECIES[1], 1)[0]
    with caplog.at_level(logging.WARNING, logger="retrieval.identify"):
        for method in ("blend", "probe", "knn"):
            (answer,) = identify(ident, [photo], method=method, top=10)
            scores = answer.identification.scores
            assert gone not in scores and all(r.name != gone for r in answer.results), method
            assert sum(scores.values()) == pytest.approx(1.0), method  # the probe's share renormalised over the rest
    assert caplog.text.count(f"names 1 species the gallery no longer holds ({gone})") == 1  # said once
    # the CLI (and the API: the same Identifier) gives no ghost either
    code, out, _ = _run(capsys, "identify", "--index", index, photo, "--method", "probe", "--format", "json", "-q")
    (answer,) = json.loads(out)
    assert code == 0 and gone not in [p["species"] for p in answer["predictions"]]


def test_a_running_service_follows_probe_train_without_a_restart(tmp_path_factory):
    from api.service import SpeciesService
    from api.settings import Settings
    from index.layout import GalleryLayout
    from retrieval.workflows import identify, open_identifier

    index = gallery_copy(tmp_path_factory, "probe_followed")
    service = SpeciesService(Settings(index=str(index), precision="fp32", refresh_s=0.0))
    try:
        photo = photos("val", SPECIES[2], 1)[0]
        uploads = service.decode([(photo.name, photo.read_bytes())])
        before = service.identify(uploads)
        assert service.identifier.probe is None
        _train(index)  # `speciesid probe train`, as another process would run it
        after = service.identify(uploads)
        fresh = open_identifier(index, EncoderConfig(precision="fp32"))  # what the CLI or a restarted server answers
        expected = identify(fresh, embeddings=service.embed(uploads), observation=True)[0]
        assert service.identifier.probe is not None
        assert service.identifier.probe.species == fresh.probe.species
        assert service.identifier.config == fresh.config
        assert service.identifier.blend_weight == fresh.blend_weight
        assert after.identification.scores == pytest.approx(expected.identification.scores)
        assert after.identification.scores != pytest.approx(before.identification.scores)
        layout = GalleryLayout(index)  # the probe removed: back to the kNN vote alone
        layout.probe_meta.unlink()
        layout.probe_weights.unlink()
        again = service.identify(uploads)
        assert service.identifier.probe is None
        assert again.identification.scores == pytest.approx(before.identification.scores)
    finally:
        service.close()


def test_probe_files_caught_half_written_leave_the_loaded_probe_in_place(tmp_path_factory, caplog):
    from index.layout import GalleryLayout
    from retrieval.workflows import open_identifier

    index = gallery_copy(tmp_path_factory, "probe_half")
    _train(index)
    ident = open_identifier(index, EncoderConfig(precision="fp32"), refresh_s=0.0, follow_probe=True)
    species = ident.probe.species
    meta = GalleryLayout(index).probe_meta
    data = json.loads(meta.read_text())
    data["species"] = data["species"][:-1]  # the weights of one probe, the species list of another
    meta.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="retrieval.identify"):
        assert not ident.refresh_probe(force=True)
    assert ident.probe.species == species and "cannot be loaded" in caplog.text
    ident.identify_embeddings(np.ones((1, ident.gallery.dim), dtype=np.float32))  # still answers


def test_a_single_photo_species_is_left_to_the_knn_vote_not_a_refusal(tmp_path_factory, capsys, caplog):
    from retrieval.probe import LinearProbe
    from retrieval.workflows import identify, open_identifier

    index = gallery_copy(tmp_path_factory, "probe_rare")
    one = photos("train", WOLF, 1)[0]
    code, out, _ = _run(capsys, "references", "add", "--index", index, "--species", binomial(WOLF), one, "-q")
    assert code == 0
    with caplog.at_level(logging.WARNING, logger="retrieval.probe_flows"):
        code, out, err = _run(capsys, "probe", "train", "--index", index, "-q")
    assert code == 0, err
    wolf = binomial(WOLF)
    assert f"probe: 4 species (1 other species left to the kNN vote, too few distinct photos: {wolf})" in out
    assert f"{wolf} (1 photo)" in caplog.text and "kNN vote alone answers them" in caplog.text
    probe = LinearProbe.load(index)
    assert wolf not in probe.species and probe.calibration.left_out == {wolf: 1}
    assert probe.trained_on == 40
    ident = open_identifier(index, EncoderConfig(precision="fp32"))
    assert ident.probe.out_of_date({s.species: s.count for s in ident.gallery.species()}) == ""  # not out of date
    (answer,) = identify(ident, [one])
    assert answer.results[0].name == wolf  # its kNN score, untouched by the probe (the open-world rule)


def test_select_settings_refuses_only_when_fewer_than_two_species_can_be_cross_validated():
    from retrieval.calibrate import FewPhotosError, SelectionGrid, select_settings

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 16))
    x = np.concatenate([c + 0.3 * rng.standard_normal((n, 16)) for c, n in zip(centres, (8, 8, 1), strict=True)])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    labels = ["A a"] * 8 + ["B b"] * 8 + ["C c"]
    grid = SelectionGrid(Cs=(10.0,), ks=(3,), temperatures=(0.05,), weights=(0.5,), metrics=("cosine",))
    cal = select_settings(x, labels, fingerprint="f", folds=3, grid=grid)
    assert cal.left_out == {"C c": 1} and cal.metrics["queries"] == 16
    with pytest.raises(FewPhotosError, match="C c"):
        select_settings(x[8:], labels[8:], fingerprint="f", folds=3, grid=grid)  # B b alone would remain


def test_an_out_of_date_probe_says_so(tmp_path_factory, tmp_path, capsys, caplog):
    index = gallery_copy(tmp_path_factory, "probe_stale")
    _train(index)
    wolf = binomial(WOLF)
    code, out, _ = _run(capsys, "references", "add", "--index", index, "--species", wolf,
                        *photos("train", WOLF, 8), "-q")
    assert code == 0
    assert f"note: the probe of {index} does not know 1 species added since it was made ({wolf})" in out
    code, out, _ = _run(capsys, "references", "add", "--index", index, "--species", wolf,
                        *photos("train", WOLF)[8:9], "-q")
    assert code == 0 and "note:" not in out  # an existing species: nothing new to say
    query = photos("val", WOLF, 1)[0]
    with caplog.at_level(logging.WARNING, logger="retrieval.identify"):
        code, out, _ = _run(capsys, "identify", "--index", index, query, "--method", "probe", "-q")
    assert code == 0 and f"cannot name 1 of the gallery's species ({wolf}: added since it was trained" in caplog.text
    # evaluate: the right reason (species added, not photos that left), and the species the gallery lacks
    val = tmp_path / "val"
    for folder, name in ((SPECIES[0], SPECIES[0]), (WOLF, WOLF), (SPECIES[1], "Samar Cobra (Naja samarenses)")):
        (val / name).mkdir(parents=True)
        for p in photos("val", folder, 2):
            os.symlink(p, val / name / p.name)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="retrieval.workflows"):
        code, out, err = _run(capsys, "evaluate", "--index", index, "--dataset", "folder", "--root", val,
                              "--report", tmp_path / "report", "-q")
    assert code == 0, err
    assert f"1 species added since the probe was trained ({wolf}): it cannot name them" in out
    assert "photos that left it" not in out
    warning = ("1 evaluated species have no reference in the gallery, so the 2 photos of them count as misses "
               "whatever the settings: Naja samarenses (2 photos; closest: Naja samarensis)")
    assert warning in caplog.text
    assert warning in (tmp_path / "report" / "report.md").read_text()


def test_calibration_scores_a_head_over_the_gallerys_species_as_identification_does():
    """A fine-tuned head may know species the gallery has no photo of: the choice of settings renormalises its
    probabilities over the gallery's species, as the answers do (it chose on another blend before)."""
    from retrieval.calibrate import probe_matrix
    from retrieval.probe import LinearProbe

    rng = np.random.default_rng(0)
    head = LinearProbe(["A a", "B b", "Gone g"], rng.standard_normal((3, 8)).astype(np.float32),
                       np.zeros(3, np.float32), "f#1")
    q = rng.standard_normal((4, 8)).astype(np.float32)
    p, known = probe_matrix(head, q, {"A a": 0, "B b": 1}, 2)
    full = head.predict_proba(q)
    assert known.tolist() == [True, True]
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(p, full[:, :2] / full[:, :2].sum(axis=1, keepdims=True), rtol=1e-6)


def test_a_head_sharing_no_species_with_the_gallery_is_refused_naming_the_first_few_of_each():
    """The refusal names a few species of each side and how many more: no '...' after a list that is whole."""
    from retrieval.probe_flows import species_differences

    with pytest.raises(ValueError) as refused:
        species_differences(["Naja haje"], ["Vipera latastei", "Natrix maura"], "g", "run")
    assert "(head: Naja haje; gallery: Natrix maura, Vipera latastei): was the gallery built" in str(refused.value)
    many = [f"Species {i}" for i in range(8)]
    with pytest.raises(ValueError, match=r"\(head: Species 0, Species 1, Species 2, Species 3, Species 4, \.\.\. "
                       r"\(3 more\); gallery: Naja haje\)"):
        species_differences(many, ["Naja haje"], "g", "run")


def test_a_replaced_probe_is_kept_named_and_restored_and_a_server_follows_each_swap(tmp_path_factory, capsys,
                                                                                   monkeypatch):
    """`probe train` (or `probe import`) over a probe said nothing and kept nothing: minutes of work lost. Now the
    replaced one is kept as probe.prev.*, named in one line with how to get it back, and `probe restore` swaps."""
    from conftest import stderr_a_terminal

    from index.layout import PROBE_PREV_META
    from retrieval.probe import LinearProbe
    from retrieval.workflows import open_identifier

    stderr_a_terminal(monkeypatch)  # the folds' bar below: bars only on a terminal

    index = gallery_copy(tmp_path_factory, "probe_replaced")
    code, out, err = _run(capsys, "probe", "train", "--index", index, "--folds", "3")
    assert code == 0, err
    assert "replaced" not in out  # nothing was
    assert "choosing settings (3 folds)" in err  # the bar over the folds' settings (finding #4)
    assert re.search(r"training the probe \(\d+ photos, \d+ species\): \d\d:\d\d", err)  # the final fit's time
    server = open_identifier(index, EncoderConfig(precision="fp32"), refresh_s=0.0, follow_probe=True)
    assert server.probe.calibration.selected_on == "cv:3-fold"
    code, out, err = _run(capsys, "probe", "train", "--index", index, "-q")
    assert code == 0, err
    assert "choosing settings" not in err and "training the probe" not in err  # -q hides the bars
    trained = r"the probe 'probe train' trained on \d{4}-\d\d-\d\d \d\d:\d\d UTC \(C=[\d.]+, settings chosen on "
    digest = r", weights sha256 ([0-9a-f]{12})"  # two probes of one minute told apart
    (line,) = [x for x in out.splitlines() if x.startswith("replaced")]
    assert re.fullmatch(f"replaced {trained}cv:3-fold, rule seq-nll\\){digest}; it is kept as probe.prev.json/npz: "
                        f"'speciesid probe restore --index {re.escape(str(index))}' brings it back", line), line
    assert json.loads((index / PROBE_PREV_META).read_text())["settings"]["selected_on"] == "cv:3-fold"
    assert server.refresh_probe(force=True) and server.probe.calibration.selected_on == "cv:5-fold"
    code, out, err = _run(capsys, "probe", "restore", "--index", index)
    assert code == 0, err
    swapped = re.fullmatch(f"restored {trained}cv:3-fold, rule seq-nll\\){digest}; {trained}cv:5-fold, rule "
                           f"seq-nll\\){digest} is kept in its place: 'speciesid probe restore --index "
                           f"{re.escape(str(index))}' again swaps back\n", out)
    assert swapped and swapped.group(1) != swapped.group(2), out
    assert LinearProbe.load(index).calibration.selected_on == "cv:3-fold"
    assert server.refresh_probe(force=True) and server.probe.calibration.selected_on == "cv:3-fold"
    code, out, _ = _run(capsys, "probe", "restore", "--index", index)  # and back again
    assert code == 0 and out.startswith("restored the probe 'probe train' trained on ")
    assert LinearProbe.load(index).calibration.selected_on == "cv:5-fold"
    # a kept probe of another encoder is refused, the probe in use untouched
    meta = json.loads((index / PROBE_PREV_META).read_text())
    (index / PROBE_PREV_META).write_text(json.dumps({**meta, "fingerprint": "timm:other#0123"}))
    code, _, err = _run(capsys, "probe", "restore", "--index", index)
    assert code == 2 and "the earlier probe kept in" in err and "train a new one" in err, err
    assert LinearProbe.load(index).calibration.selected_on == "cv:5-fold"
    # nothing kept: said so
    bare = gallery_copy(tmp_path_factory, "probe_none_kept")
    code, _, err = _run(capsys, "probe", "restore", "--index", bare)
    assert code == 2 and f"no earlier probe is kept in {bare} (probe.prev.json)" in err, err


def test_probe_files_of_two_saves_are_refused_not_mixed(tmp_path):
    """A reader caught between the writes of probe.npz and probe.json (a server following `probe train` or `probe
    restore`) took the new weights with the old settings whenever the species count was the same."""
    from index.layout import PROBE_WEIGHTS
    from retrieval.probe import LinearProbe

    old, new = tmp_path / "old", tmp_path / "new"
    _two_species_probe(1.0).save(old)
    _two_species_probe(50.0, seed=1).save(new)
    (old / PROBE_WEIGHTS).write_bytes((new / PROBE_WEIGHTS).read_bytes())  # the weights written, the json not yet
    with pytest.raises(ValueError, match="probe.npz is not the one probe.json was saved with"):
        LinearProbe.load(old)


def _two_species_probe(c: float, seed: int = 0):
    from retrieval.probe import LinearProbe

    rng = np.random.default_rng(seed)
    p = LinearProbe(["A a", "B b"], rng.standard_normal((2, 8)).astype(np.float32), np.zeros(2, np.float32), "enc#1")
    p.calibration.C = c
    return p


def test_a_probe_refuses_to_score_rows_that_are_not_finite():
    """Walk-tiny 12: predict_proba of a NaN row gave NaN probabilities without complaint."""
    p = _two_species_probe(1.0)
    rows = np.ones((3, 8), np.float32)
    rows[1, 2], rows[2, 0] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"embeddings must be finite: rows 1, 2 hold NaN or inf \(or values too "
                       r"large to score\)"):
        p.predict_proba(rows)
    with pytest.raises(ValueError, match="embeddings must be finite: row 0 holds NaN or inf"):
        p.scores(rows[1])
    assert np.allclose(p.predict_proba(rows[:1]).sum(axis=1), 1.0)


def test_a_torn_probe_is_not_kept_and_an_older_one_is_kept_with_its_time(tmp_path, caplog):
    from index.layout import PROBE_META, PROBE_PREV_META, PROBE_WEIGHTS
    from retrieval.probe import LinearProbe, keep_previous

    old, new = tmp_path / "old", tmp_path / "new"
    _two_species_probe(1.0).save(old)
    _two_species_probe(50.0, seed=1).save(new)
    (old / PROBE_WEIGHTS).write_bytes((new / PROBE_WEIGHTS).read_bytes())
    with caplog.at_level(logging.WARNING, logger="retrieval.probe"):
        assert keep_previous(old) == ""  # a torn pair is not kept as the earlier probe
    assert "is not kept" in caplog.text and not (old / PROBE_PREV_META).exists()
    # a probe.json of before the digest: kept with its time of writing, loadable
    legacy = tmp_path / "legacy"
    _two_species_probe(5.0).save(legacy)
    meta = json.loads((legacy / PROBE_META).read_text())
    del meta["weights_sha256"], meta["made_at"]
    (legacy / PROBE_META).write_text(json.dumps(meta))
    assert LinearProbe.load(legacy).calibration.C == 5.0
    assert re.fullmatch(r"the probe 'probe train' trained on \d{4}-\d\d-\d\d \d\d:\d\d UTC \(C=5, settings chosen "
                        r"on default\), weights sha256 [0-9a-f]{12}", keep_previous(legacy))
    assert json.loads((legacy / PROBE_PREV_META).read_text())["weights_sha256"]


def test_an_imported_head_is_named_by_its_run():
    from retrieval.probe import probe_origin

    meta = {"source": "finetune:runs/ft-ph", "made_at": "2026-12-06T21:01:33+00:00", "settings": {"C": 1.0}}
    assert probe_origin(meta) == "the head of runs/ft-ph that 'probe import' took on 2026-12-06 21:01 UTC"


def test_the_probe_summary_tells_a_trained_probe_from_an_imported_head(tmp_path):
    """/readyz's and index info's probe block (walkthrough s3 #5): the kind, its settings or the run it came from,
    when it was made and its weights' short sha256, as saved and as loaded again."""
    import hashlib

    from index.layout import PROBE_WEIGHTS
    from retrieval.probe import LinearProbe, probe_summary

    probe = _two_species_probe(5.0)
    probe.made_at = "2026-12-06T21:01:33+00:00"
    probe.save(tmp_path)
    digest = hashlib.sha256((tmp_path / PROBE_WEIGHTS).read_bytes()).hexdigest()
    trained = probe_summary(LinearProbe.load(tmp_path))
    assert trained["kind"] == "trained" and trained["settings"]["C"] == 5.0 and "run" not in trained
    assert trained["made_at"] == probe.made_at and trained["weights_sha256"] == digest[:12]
    assert trained["what"].startswith("the probe 'probe train' trained on 2026-12-06 21:01 UTC (C=5")
    probe.source = "finetune:runs/ft-ph"
    imported = probe_summary(probe)
    assert imported["kind"] == "imported" and imported["run"] == "runs/ft-ph" and "C" not in imported["settings"]
    assert imported["what"].startswith("the head of runs/ft-ph that 'probe import' took on 2026-12-06 21:01 UTC")
