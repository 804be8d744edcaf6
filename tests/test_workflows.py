"""The one query flow (retrieval.workflows) through the CLI: ranks, observations, bytes vs paths, bad arguments.

Uses the small real MobileNetV1 gallery of the API tests (4 ph-snakes species, 10 photos each).
"""

from __future__ import annotations

import io
import json
import os
import re

import numpy as np
import pytest
from _api_support import COBRA, SPECIES, base_gallery, binomial, gallery_copy, photos

from api.cli import main
from retrieval.encoders import EncoderConfig


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return base_gallery(tmp_path_factory)


def test_identify_rank_rolls_up_with_evidence(index, capsys):
    code, out, _ = _run(capsys, "identify", "--index", index, COBRA, "--rank", "genus", "--format", "json", "-q")
    assert code == 0
    (answer,) = json.loads(out)
    results = answer["results"]
    assert answer["rank"] == "genus" and results[0]["name"] == "Naja" and results[0]["rank"] == "genus"
    assert results[0]["venomous"] is True and results[0]["family"] == "Elapidae"
    genus_scores = answer["genus_scores"]
    assert results[0]["score"] == pytest.approx(genus_scores["Naja"])
    assert sum(r["score"] for r in results) <= 1 + 1e-6
    from index.gallery import Gallery

    meta = Gallery.open(index).store.metadata(results[0]["evidence"])
    assert len(results[0]["evidence"]) == 5 and set(meta["genus"]) == {"Naja"}  # evidence of the genus only
    # the species predictions stay in the answer, and family works too
    assert answer["predictions"][0]["species"] == binomial(SPECIES[0])
    code, out, _ = _run(capsys, "identify", "--index", index, COBRA, "--rank", "family")
    assert code == 0 and "family Elapidae" in out and "VENOMOUS" in out


def test_identify_observation_gives_one_answer_from_all_photos(index, capsys, tmp_path):
    shots = photos("val", SPECIES[2], 3)
    code, out, _ = _run(capsys, "identify", "--index", index, *shots, "--format", "json", "-q")
    assert code == 0 and len(json.loads(out)) == 3
    code, out, _ = _run(capsys, "identify", "--index", index, *shots, "--observation", "--format", "json",
                        "--neighbours", "1000", "-q")
    (answer,) = json.loads(out)
    assert code == 0 and answer["image"] == ", ".join(str(p) for p in shots)
    assert answer["predictions"][0]["species"] == binomial(SPECIES[2])
    ids = [n["id"] for n in answer["neighbours"]]
    assert len(ids) == len(set(ids)) >= 30  # the photos' neighbours together, each reference listed once
    # a blank frame in the observation is set aside (it is far): the answer is the photos' own
    from PIL import Image

    Image.new("RGB", (300, 300), (255, 255, 255)).save(tmp_path / "white.png")
    code, out, _ = _run(capsys, "identify", "--index", index, *shots, tmp_path / "white.png", "--observation",
                        "--format", "json", "--neighbours", "1000", "-q")
    (with_blank,) = json.loads(out)
    assert with_blank["predictions"] == answer["predictions"] and not with_blank["far"]
    assert with_blank["venomous_score"] == answer["venomous_score"]
    # re-read s51 #5: the set-aside photo is said, in the JSON and the table (it was in neither)
    assert with_blank["set_aside"] == [3] and answer["set_aside"] == []
    code, out, _ = _run(capsys, "identify", "--index", index, *shots, tmp_path / "white.png", "--observation", "-q")
    assert f"  set aside (unlike every reference, so not counted): {tmp_path / 'white.png'}" in out, out


def test_far_answers_carry_their_advice_in_csv_and_json_and_an_answer_with_no_candidate_keeps_its_row(
        index, tmp_path, capsys):
    """Re-read s51 #6, #13: far advice in CSV and JSON; the CSV wrote no row for an answer with no candidates."""
    from PIL import Image

    from api.cli.identify import _identify_csv

    Image.new("RGB", (300, 300), (255, 255, 255)).save(tmp_path / "white.png")
    code, out, _ = _run(capsys, "identify", "--index", index, tmp_path / "white.png", "--format", "json", "-q")
    (answer,) = json.loads(out)
    assert answer["far"] and answer["venom_advice"]["level"] == "cannot_tell", answer
    code, out, _ = _run(capsys, "identify", "--index", index, tmp_path / "white.png", "--format", "csv", "-q")
    rows = out.splitlines()
    assert len(rows) > 1 and all(',cannot_tell,"This photo cannot be identified' in r for r in rows[1:]), out
    # re-read s51 #11: the table says the advice first (as the page does), before the candidates
    code, out, _ = _run(capsys, "identify", "--index", index, tmp_path / "white.png", "-q")
    assert -1 < out.index("This photo cannot be identified") < out.index("closest species"), out
    empty = {**answer, "predictions": [], "image": "none.jpg"}
    csv = _identify_csv([empty], "species").splitlines()
    assert len(csv) == 2 and csv[1].startswith("none.jpg,,species,") and ",cannot_tell," in csv[1], csv


def test_identify_reports_bad_arguments_and_answers_the_rest(index, capsys, tmp_path):
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    (tmp_path / "dir.jpg").mkdir()
    code, out, err = _run(capsys, "identify", "--index", index, tmp_path / "dangling.jpg", COBRA,
                          tmp_path / "dir.jpg", "--format", "json")
    assert code == 1 and "skipped" not in err  # the output itself names them, first, with why
    answers = json.loads(out)
    assert [a["image"] for a in answers] == [str(tmp_path / "dangling.jpg"), str(tmp_path / "dir.jpg"), str(COBRA)]
    assert answers[0]["error"].startswith("broken symbolic link") and answers[1]["error"].startswith(
        "folder holds no photos") and "predictions" in answers[2]
    code, _, err = _run(capsys, "identify", "--index", index, tmp_path / "nope.jpg")
    assert code == 2 and "no photos to read" in err and "does not exist" in err


def _evidence(table: str) -> tuple[str, list[str]]:
    """The evidence heading of a table and its photo lines."""
    lines = table.splitlines()
    at = next(i for i, x in enumerate(lines) if x.strip().startswith("evidence"))
    return lines[at], [x for x in lines[at + 1:] if x.startswith("    #")]


def test_the_evidence_lines_print_the_similarity_they_are_ordered_by_and_the_file():
    """With the whitened metric the evidence is ordered by the vote's similarity: that is what is printed (cosine
    beside it, labelled), so the list reads in order; with plain cosine the one figure is labelled cosine. Each
    photo is on a line of its own with its file name (which photo is #400?)."""
    from api.cli.identify import _identify_table

    def answer(pairs: list[tuple[float, float]]) -> dict:
        neighbours = [{"id": 400 + i, "species": "Naja samarensis", "vote_similarity": vote, "similarity": cos,
                       "path": f"/data/train/Samar Cobra (Naja samarensis)/samar_{i}.jpg"}
                      for i, (vote, cos) in enumerate(pairs)]
        return {"image": "a.jpg", "unknown": False, "far": False, "nearest_similarity": max(c for _, c in pairs),
                "predictions": [], "neighbours": neighbours, "venomous_score": None, "venom_unknown_score": 0.0}

    whitened = [(0.71, 0.89), (0.69, 0.67), (0.65, 0.60), (0.62, 0.66), (0.58, 0.63)]  # the walkthrough's cosines
    head, rows = _evidence(_identify_table(answer(whitened), "species", 5))
    assert "whitened metric; cosine in brackets" in head
    assert rows[0] == "    #400  0.71 (0.89)  Naja samarensis  samar_0.jpg", rows
    assert [float(r.split()[1]) for r in rows] == [0.71, 0.69, 0.65, 0.62, 0.58]  # sorted, as the list is
    assert "0.62 (0.66)" in rows[3]
    plain = [(0.89, 0.89), (0.67, 0.67), (0.60, 0.60)]
    head, rows = _evidence(_identify_table(answer(plain), "species", 5))
    assert head == "  evidence, by cosine similarity:" and not any("(" in r for r in rows)
    assert rows == ["    #400  0.89  Naja samarensis  samar_0.jpg", "    #401  0.67  Naja samarensis  samar_1.jpg",
                    "    #402  0.60  Naja samarensis  samar_2.jpg"]


def test_a_far_answer_prints_the_gallery_threshold_beside_the_nearest_similarity(index, capsys, tmp_path):
    """'unlike every reference photo (nearest similarity 0.98)' alone reads as a contradiction: the threshold it
    is under is printed beside it, with as many decimals as it takes to tell the two apart."""
    from PIL import Image

    from api.cli.identify import _identify_table
    from index.gallery import Gallery
    from retrieval.identify import far_threshold

    Image.new("RGB", (300, 300), (255, 255, 255)).save(tmp_path / "white.png")
    code, out, _ = _run(capsys, "identify", "--index", index, tmp_path / "white.png", "--precision", "fp32", "-q")
    limit = far_threshold(Gallery.open(index))
    found = re.search(r"unlike every reference photo \(nearest similarity (\d\.\d+), under this gallery's far "
                      r"threshold (\d\.\d+)\)", out)
    assert code == 0 and found, out
    assert float(found[1]) < float(found[2]) and float(found[2]) == pytest.approx(limit, abs=0.005)
    # walk s51 #4: its candidates' percentages (85% for a black frame) are said to be meaningless; the safe advice
    assert "  closest species (not meaningful: the photo is unlike every reference):" in out.splitlines(), out
    assert "This photo cannot be identified: if someone was bitten, treat the bite as venomous" in out, out
    close = {"image": "a.png", "far": True, "unknown": True, "nearest_similarity": 0.9851, "predictions": [],
             "neighbours": [], "venomous_score": None, "venom_unknown_score": 0.0}
    text = _identify_table(close, "species", far_threshold=0.9874)
    assert "(nearest similarity 0.985, under this gallery's far threshold 0.987)" in text, text


def test_paths_bytes_and_embeddings_give_the_same_answer(index):
    from retrieval.workflows import identify, open_identifier

    ident = open_identifier(index, EncoderConfig(precision="fp32"))
    by_path = identify(ident, [COBRA], rank="genus")[0]
    by_bytes = identify(ident, [COBRA.read_bytes()], rank="genus")[0]
    emb = ident.encoder.encode_images([__import__("PIL.Image").Image.open(COBRA).convert("RGB")])
    by_emb = identify(ident, embeddings=emb, rank="genus")[0]
    for a in (by_bytes, by_emb):
        assert [(r.name, round(r.score, 5)) for r in a.results] == [(r.name, round(r.score, 5)) for r in by_path.results]
        assert [n.id for n in a.identification.neighbours] == [n.id for n in by_path.identification.neighbours]
    bad = identify(ident, [b"not an image", COBRA.read_bytes()])
    assert bad[0].error and bad[0].identification is None and bad[1].error is None
    with pytest.raises(ValueError, match="photos or embeddings"):
        identify(ident)
    assert np.isclose(sum(by_path.identification.genus_scores.values()), sum(by_path.identification.scores.values()))


def test_references_add_keeps_going_past_bad_arguments(tmp_path_factory, capsys, tmp_path):
    index = gallery_copy(tmp_path_factory, "add_bad_args")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    new = photos("val", SPECIES[3], 2)
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", binomial(SPECIES[3]),
                          tmp_path / "dangling.jpg", *new, "-q")
    assert code == 1 and "broken symbolic link" in err
    assert "added 2" in out and "(existing species)" in out


def test_uploads_to_a_gallery_opened_by_a_relative_path_name_the_right_duplicate(tmp_path_factory, monkeypatch):
    from retrieval.workflows import add_photos, open_identifier

    index = gallery_copy(tmp_path_factory, "relative_uploads")
    monkeypatch.chdir(index.parent)  # as `SPECIESID_INDEX=runs/gallery` opens it: stored paths are absolute
    ident = open_identifier(index.name, EncoderConfig(precision="fp32"))
    data = photos("val", SPECIES[1], 1)[0].read_bytes()
    res = add_photos(ident.gallery, ident.encoder, binomial(SPECIES[1]), [("first.jpg", data), ("second.jpg", data)])
    (rid,) = res.report.ids
    assert [(name, i) for name, i, _ in res.duplicates] == [("second.jpg", rid)]  # the first one is stored
    assert (index / "uploads").is_dir() and len(list((index / "uploads").iterdir())) == 1  # and its file kept


def test_index_build_into_a_gallery_uses_its_own_encoder_by_default(tmp_path_factory, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    from index.gallery import Gallery

    index = gallery_copy(tmp_path_factory, "build_again")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # bioclip (the default of a new gallery) cannot load here
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    more = tmp_path / "more"
    (more / SPECIES[3]).mkdir(parents=True)
    for p in photos("val", SPECIES[3], 2):
        os.symlink(p, more / SPECIES[3] / p.name)
    code, out, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", more, "--index", index, "-q")
    assert code == 0, err
    assert "added 2" in out and f"encoder {Gallery.open(index).encoder_spec}" in out  # MobileNetV1, the gallery's
    code, _, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", more, "--index", tmp_path / "new",
                        "-q")
    assert code == 2 and "cannot download the weights of bioclip" in err  # a new gallery: bioclip, as before
    with pytest.raises(SystemExit):
        main(["index", "build", "--help"])
    assert "default: the one that built --index when it holds a gallery, else bioclip" in " ".join(
        capsys.readouterr().out.split())


def test_a_root_without_photos_for_its_dataset_names_the_layout_and_the_options(tmp_path, capsys):
    """One message for every command that reads a dataset: the layout the dataset expects, and the options to
    change (--val-root / --val-dataset where those gave the photos)."""
    from PIL import Image

    from finetune.data import load_photos

    loose = tmp_path / "loose"
    loose.mkdir()
    for i in range(2):  # photos without species folders: the folder dataset reads none of them
        Image.new("RGB", (40, 40), (60 * i, 0, 0)).save(loose / f"{i}.jpg")
    folder_fix = ("for dataset 'folder', which expects ROOT/<species>/<photos>: one folder per species ('Naja haje', "
                  "'Common Name (Genus species)', ...); point --root at such a folder, or give the --dataset that "
                  "fits it (moroccan, folder, rare-species, snakeclef2021, manifest, webdataset)")
    for argv in (["index", "build", "--index", tmp_path / "g"], ["clean", "--report", tmp_path / "r"]):
        code = main([str(a) for a in [*argv, "--dataset", "folder", "--root", loose, "--encoder",
                                      "timm:test_vit@random", "-q"]])
        err = capsys.readouterr().err
        assert code == 2 and f"no photos found under {loose} {folder_fix}" in err, err
    assert not (tmp_path / "g").exists()
    with pytest.raises(ValueError, match=r"for dataset 'moroccan', which expects ROOT/<Genus-species>/<photos>: "
                       r"one folder per species of the Moroccan checklist "
                       r"\('Naja-haje', 'Cobra d'Égypte \(Naja haje\)', \.\.\.\); "
                       r"point --val-root at such a folder, or "
                       r"give the --val-dataset that fits it"):
        load_photos("moroccan", loose, options="--val-")


def test_uploads_added_with_their_embeddings_store_what_embedding_them_inside_stores(tmp_path_factory):
    """The API embeds its uploads before it takes the write lock and hands add_photos the embeddings: the same ids,
    duplicates (a repeat within the call, a photo already stored), photos too small, and stored vectors as the
    path that embeds them inside. A wrong shape is refused before any upload is kept; a non-finite row is skipped
    as the encoder's would be. Before, add_photos took no embeddings."""
    from PIL import Image

    from retrieval.encoders import stack_views
    from retrieval.pipeline import NON_FINITE, model_input
    from retrieval.workflows import add_photos, open_identifier

    new, known = photos("val", SPECIES[3], 3), photos("train", SPECIES[0], 1)[0]  # `known`: in the built gallery
    tiny = io.BytesIO()
    Image.new("RGB", (20, 24), (90, 120, 60)).save(tiny, "PNG")
    uploads = [("a.jpg", new[0].read_bytes()), ("b.jpg", new[1].read_bytes()), ("again.jpg", new[0].read_bytes()),
               ("known.jpg", known.read_bytes()), ("tiny.png", tiny.getvalue()), ("c.jpg", new[2].read_bytes())]
    results, vectors = [], []
    for given in (False, True):
        index = gallery_copy(tmp_path_factory, f"add_given_{given}")
        ident = open_identifier(index, EncoderConfig(precision="fp32"))
        enc = ident.encoder
        emb = enc.encode_batch(stack_views([model_input(data, enc)[0] for _, data in uploads])) if given else None
        if given:
            with pytest.raises(ValueError, match=r"6 photos .* need embeddings of shape \(6, "):
                add_photos(ident.gallery, enc, binomial(SPECIES[3]), uploads, embeddings=emb[:5])
            assert not (index / "uploads").exists() or not any((index / "uploads").iterdir())
        res = add_photos(ident.gallery, enc, binomial(SPECIES[3]), uploads, embeddings=emb)
        report = res.report
        results.append((res.species, res.created, res.existed, res.duplicates, report.added, report.ids,
                        report.duplicate_ids, [(os.path.basename(p), why) for p, why in report.skipped],
                        sorted(p.name for p in (index / "uploads").iterdir())))
        vectors.append(ident.gallery.store.vectors(ids=report.ids)[1])
    assert results[0] == results[1]
    assert len(results[0][5]) == 3 and [n for n, *_ in results[0][3]] == ["again.jpg", "known.jpg"]
    assert "too small" in results[0][7][0][1]
    # the two paths embed other batches (6 photos given, 4 once the stored and the small one are dropped): a
    # runtime's kernels may round the last bits differently by batch
    np.testing.assert_allclose(vectors[1], vectors[0], atol=1e-5)
    # a row the encoder gave as NaN is skipped, saying so; the rest are stored
    index = gallery_copy(tmp_path_factory, "add_given_nan")
    ident = open_identifier(index, EncoderConfig(precision="fp32"))
    pair = [(p.name, p.read_bytes()) for p in photos("val", SPECIES[2], 5)[3:]]
    emb = ident.encoder.encode_batch(stack_views([model_input(data, ident.encoder)[0] for _, data in pair]))
    emb[0, 3] = np.nan
    res = add_photos(ident.gallery, ident.encoder, binomial(SPECIES[2]), pair, embeddings=emb)
    assert res.report.added == 1 and [why for _, why in res.report.skipped] == [NON_FINITE]


def test_an_unknown_answer_gives_the_safe_venom_advice_whatever_its_venomous_score(index, capsys):
    """Walk s51 #1, #3: an UNKNOWN answer (not far) printed 'probability medically important venomous: 7.1%' and no
    'treat as venomous'; the CLI and the page gave different advice. One rule (retrieval.advice) now says it."""
    harmless = photos("val", SPECIES[3])[3]  # Red-tailed Green Ratsnake, a harmless answer of ~0.99
    code, out, _ = _run(capsys, "identify", "--index", index, harmless, "--unknown-threshold", "0.999999",
                        "--precision", "fp32", "--format", "json", "-q")
    (answer,) = json.loads(out)
    assert code == 0 and answer["unknown"] and not answer["far"] and answer["venomous_score"] < 0.1, answer
    assert answer["venom_advice"]["level"] == "cannot_tell" and answer["venom_advice"]["treat_as_venomous"] is True
    code, out, _ = _run(capsys, "identify", "--index", index, harmless, "--unknown-threshold", "0.999999",
                        "--precision", "fp32", "-q")
    assert "UNKNOWN: no species is supported strongly enough" in out
    assert "treat the bite as venomous and seek medical care" in out and "probability medically" not in out, out
    # named with confidence: the low probability, and still the doubt's advice
    code, out, _ = _run(capsys, "identify", "--index", index, harmless, "--precision", "fp32", "-q")
    assert "UNKNOWN" not in out and re.search(r"Probability medically important venomous: \d+\.\d%.*; when in doubt, "
                                              r"treat a bite as venomous\.", out), out
    # a venomous answer: the page's warning, word for word, on the terminal too
    code, out, _ = _run(capsys, "identify", "--index", index, COBRA, "--precision", "fp32", "-q")
    assert re.search(r"Possibly MEDICALLY IMPORTANT VENOMOUS \(Philippine Cobra\) — probability \d+\.\d%\. Treat as "
                     r"venomous and seek medical care\.", out), out
    code, out, _ = _run(capsys, "identify", "--index", index, COBRA, "--precision", "fp32", "--format", "csv", "-q")
    assert ",possibly_venomous,Possibly MEDICALLY IMPORTANT VENOMOUS" in out.splitlines()[1], out


def test_the_advice_rule():
    """retrieval.advice.venom_advice: far and unknown are never told 'unlikely'; 10% on venomous or unrecorded
    species warns; a gallery the advice does not apply to (recorded off) gets none."""
    from retrieval.advice import VENOM_WARN_AT, venom_advice

    def level(**kw):
        given = {"unknown": False, "far": False, "venomous_score": 0.02, "venom_unknown_score": 0.0, **kw}
        advice = venom_advice(**given)
        return advice and (advice.level, advice.treat_as_venomous)

    assert level() == ("unlikely", False)
    assert level(unknown=True) == ("cannot_tell", True)
    assert level(unknown=True, far=True, venomous_score=None) == ("cannot_tell", True)
    assert level(venomous_score=VENOM_WARN_AT) == ("possibly_venomous", True)
    assert level(unknown=True, venomous_score=0.42) == ("possibly_venomous", True)  # says more than 'cannot tell'
    assert level(venomous_score=0.05, venom_unknown_score=0.05) == ("possibly_venomous", True)
    assert level(applies=False) is None and level(venomous_score=None, unknown=True) == ("cannot_tell", True)
    # re-read s51 #3, #4, #2: the wording
    assert level(venomous_score=0.0999) == ("possibly_venomous", True)  # prints as 10.0%: warns as 10% does
    assert level(venomous_score=0.0994) == ("unlikely", False)
    only = venom_advice(unknown=False, far=False, venomous_score=0.0, venom_unknown_score=0.6,
                        unrecorded_names=["Rat Snake"]).text
    assert only == ("Venom status not recorded for Rat Snake (60.0% of the probability): treat as venomous and "
                    "seek medical care."), only
    mixed = venom_advice(unknown=False, far=False, venomous_score=0.3, venom_unknown_score=0.2,
                         venomous_names=["Cobra"]).text
    assert "separately" not in mixed and mixed.startswith("Possibly MEDICALLY IMPORTANT VENOMOUS (Cobra) — "
                                                          "probability 30.0%, and 20.0% on species whose"), mixed
    low = venom_advice(unknown=False, far=False, venomous_score=0.02, venom_unknown_score=0.04).text
    assert "treat those as venomous" not in low and "(and 4.0% on species of unknown venom status)" in low, low
    assert "among this gallery's own species only" in low, low


def test_a_venomous_checklist_species_named_only_by_the_text_prior_stays_in_the_note():
    """Re-read s51 #8: a species the text prior lists left the checklist note (its accuracy is not measured)."""
    from retrieval.advice import checklist_coverage

    cov = checklist_coverage({"checklist": "moroccan"}, ["Naja haje"], ["Echis pyramidum"])
    assert "Echis pyramidum" in cov.venomous_text_only and "Echis pyramidum" not in cov.venomous_missing
    assert ("(Echis pyramidum) is named only by its text description, accuracy not measured (no photos of it)"
            in cov.note()), cov.note()
    assert cov.to_dict()["venomous_text_only"] == ["Echis pyramidum"]


def test_a_moroccan_gallery_names_the_venomous_checklist_species_it_cannot_name(index, tmp_path, capsys):
    """Walk s51 #2: a gallery built from the Moroccan checklist with photos of a few species said what it lacked once,
    at build; every answer and 'index info' now name the venomous checklist species it cannot name."""
    root = tmp_path / "mor"
    for folder, src in (("Naja-haje", SPECIES[0]), ("Natrix maura", SPECIES[3])):
        (root / folder).mkdir(parents=True)
        for p in photos("train", src, 3):
            (root / folder / p.name).write_bytes(p.read_bytes())
    from conftest import MOBILENET_SPEC

    code, _, _ = _run(capsys, "index", "build", "--dataset", "moroccan", "--root", root, "--index", tmp_path / "g",
                      "--encoder", MOBILENET_SPEC, "--precision", "fp32", "-q")
    assert code == 0
    missing = ("Bitis arietans, Cerastes cerastes, Cerastes vipera, Daboia mauritanica, Echis pyramidum, "
               "Vipera monticola")
    code, out, err = _run(capsys, "identify", "--index", tmp_path / "g", COBRA, "--precision", "fp32", "-q")
    assert code == 0 and (f"note: this gallery cannot name 6 of the 7 medically important venomous species of the "
                          f"moroccan checklist ({missing}): it has no photos of them") in out, out
    assert "it holds photos of 2 of the checklist's 26 species); add their photos (speciesid references add)" in out
    code, out, _ = _run(capsys, "index", "info", "--index", tmp_path / "g")
    block = json.loads(out)["checklist"]
    assert block["checklist"] == "moroccan" and block["with_photos"] == 2 and len(block["missing"]) == 24
    assert ", ".join(block["venomous_missing"]) == missing and block["note"].startswith("this gallery cannot name 6")
    # the service says it too, worded for an HTTP client
    from retrieval.workflows import answer_notes, open_identifier

    notes = answer_notes(open_identifier(tmp_path / "g", EncoderConfig(precision="fp32")), api=True)
    assert any(n.startswith("this gallery cannot name 6") and n.endswith("(POST /v1/species/{name}/references)")
               for n in notes), notes
    # a gallery of no checklist says nothing of it
    assert "checklist" not in json.loads(_run(capsys, "index", "info", "--index", index)[1])
