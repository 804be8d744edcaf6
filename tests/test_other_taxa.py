"""Galleries of taxa other than snakes (walk s52 "taxon": birds, frogs): names of other taxa (hybrids, rank markers,
a subgenus, numbered morphospecies, authorities, a genus alone), the folder layouts of other datasets (iNaturalist
2021's, 'Genus species (Common)', lower case), --country from the gallery's own photos, --rank family without
families, country names birders use, and evaluate's confusion matrix with a long label.

Galleries here use the tiny random ``timm:test_vit@random`` encoder on random photos: fast, no shared assets.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from _cli_support import ENCODER, _photo, _run, two_species_gallery

from index.store import SpeciesSummary
from index.taxonomy import SpeciesNameConflictError, looks_scientific, new_species_references

INAT = "02345_Animalia_Chordata_Aves_Passeriformes_Turdidae_Turdus_merula"


# ------------------------------------------------------------------------------------------------ names (#4, #7)
@pytest.mark.parametrize("name", [
    "Larus argentatus × Larus fuscus", "Larus argentatus x fuscus", "Anas ×platyrhynchos",
    "×Chitalpa tashkentensis",
    "Anas platyrhynchos × rubripes", "Quercus robur subsp. robur", "Rosa canina var. dumalis",
    "Carabus (Megodontus) violaceus", "Phylloscopus sp. 2", "Carabus sp. A"])
def test_valid_names_of_other_taxa_are_written_as_scientific_names(name):
    assert looks_scientific(name.split()), name
    species, records, prior = new_species_references(name, [], ["a.jpg"], dataset="api")
    assert species == name and prior is None and records[0].species == name


@pytest.mark.parametrize("name", [
    "x", "Larus", "× Larus", "Larus argentatus ×", "Quercus robur subsp.", "Quercus robur robur robur",
    "Carabus (megodontus) violaceus", "Phylloscopus sp. 2 3", "Great Tit", "larus × Argentatus"])
def test_junk_stays_refused(name):
    assert not looks_scientific(name.split()), name


def test_a_hybrid_written_with_x_joins_its_spelling_with_the_sign():
    duck = SpeciesSummary("Anas platyrhynchos × rubripes", "Anas", "Anatidae", None, None, 12)
    for spelling in ("Anas platyrhynchos x rubripes", "anas platyrhynchos ×rubripes"):
        species, _, prior = new_species_references(spelling, [duck], ["a.jpg"], dataset="api")
        assert species == duck.species and prior is duck, spelling


def test_a_numbered_morphospecies_is_no_near_spelling_of_another():
    """'Phylloscopus sp. 2' beside 'Phylloscopus sp.' was refused as a near-spelling of it (walk #7)."""
    held = [SpeciesSummary("Phylloscopus sp.", "Phylloscopus", None, None, None, 12),
            SpeciesSummary("Phylloscopus sp. 3", "Phylloscopus", None, None, None, 4)]
    species, _, prior = new_species_references("Phylloscopus sp. 2", held, ["a.jpg"], dataset="api")
    assert species == "Phylloscopus sp. 2" and prior is None
    with pytest.raises(SpeciesNameConflictError, match="is not in the gallery, but 'Phylloscopus sp.'"):
        new_species_references("Phylloscopus spp.", held, ["a.jpg"], dataset="api")  # a typo is still one


def test_a_name_with_its_authority_is_told_to_leave_it_out():
    with pytest.raises(SpeciesNameConflictError) as refused:
        new_species_references("Parus major Linnaeus, 1758", [], ["a.jpg"], dataset="api")
    assert refused.value.advice(confirm="give --new-species if it is a new species") == (
        "'Parus major Linnaeus, 1758' ends with an author citation ('Linnaeus, 1758'): give the name without it, "
        "'Parus major', or give --new-species if it is a new species")
    with pytest.raises(SpeciesNameConflictError, match=r"author citation \('\(Linnaeus, 1758\)'\): give the name "
                       r"without it, 'Naja haje'"):
        new_species_references("Naja haje (Linnaeus, 1758)", [], ["a.jpg"], dataset="api")


def test_a_genus_alone_is_refused_for_any_taxon():
    """'Parus' beside 'Parus major' was created as a species (only snake genera were known); a one-word capitalised
    name the gallery does not know as a genus is told that a genus alone is not a species (walk #4)."""
    tit = SpeciesSummary("Parus major", "Parus", None, "Great Tit", None, 12)
    for new_species in (False, True):
        with pytest.raises(ValueError, match=r"^'Parus' is a genus, not a species: give the species' full name, "
                           r"e\.g\. 'Parus major'$"):
            new_species_references("Parus", [tit], ["a.jpg"], dataset="api", new_species=new_species)
    with pytest.raises(SpeciesNameConflictError) as refused:
        new_species_references("Larus", [tit], ["a.jpg"], dataset="api")
    assert refused.value.advice(confirm="give --new-species if 'Larus' is a new species") == (
        "'Larus' is one word: a genus alone is not a species: give the species' full name (genus and epithet), or "
        "give --new-species if 'Larus' is a new species")
    assert new_species_references("Larus", [tit], ["a.jpg"], dataset="api", new_species=True)[0] == \
        "Larus"  # a label gallery's one-word label, confirmed
    assert new_species_references("cats", [], ["a.jpg"], dataset="api", new_species=True)[0] == "cats"


def test_a_label_beside_a_longer_label_of_its_first_word_is_taken_confirmed():
    """A gallery of labels: ``dogs`` beside ``dogs small`` is a label, not the genus of one."""
    held = [SpeciesSummary("dogs small", "dogs", None, None, None, 5)]
    with pytest.raises(SpeciesNameConflictError, match=r"^'dogs' is not written as a scientific name"):
        new_species_references("dogs", held, ["a.jpg"], dataset="api")
    assert new_species_references("dogs", held, ["a.jpg"], dataset="api", new_species=True)[0] == "dogs"


def test_the_api_refuses_a_gallery_species_genus_alone(tmp_path, capsys):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import Settings

    index, _ = two_species_gallery(tmp_path, capsys)
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Parus major",
                          _photo(tmp_path / "tit.png", 70), *ENCODER)
    assert code == 0 and "Parus major (new species)" in out, (out, err)
    data = _photo(tmp_path / "x.png", 71).read_bytes()
    app = create_app(Settings(index=str(index), api_keys="k", precision="fp32", runtime="torch"))
    with TestClient(app) as c:
        resp = c.post("/v1/species/Parus/references", files=[("images", ("x.png", data, "image/png"))],
                      headers={"X-API-Key": "k"}, data={"new_species": "true"})
        assert resp.status_code == 400 and resp.json()["detail"] == (
            "'Parus' is a genus, not a species: give the species' full name, e.g. 'Parus major'"), resp.text
        resp = c.post("/v1/species/Larus/references", files=[("images", ("x.png", data, "image/png"))],
                      headers={"X-API-Key": "k"})
        assert resp.status_code == 409 and "'Larus' is one word: a genus alone is not a species" in resp.text
        assert "new_species=true" in resp.text


# ------------------------------------------------------------------------------------------------ folders (#5)
@pytest.mark.parametrize(("name", "expected"), [
    (INAT, ("Turdus merula", None)),
    ("Erithacus rubecula (European Robin)", ("Erithacus rubecula", "European Robin")),
    ("turdus viscivorus", ("turdus viscivorus", None)),  # re-cased by the loader where its genus is known (below)
    ("Mallard x American Black Duck (Anas platyrhynchos × rubripes)",
     ("Anas platyrhynchos × rubripes", "Mallard x American Black Duck")),
    ("Quercus_robur_subsp._robur", ("Quercus robur subsp. robur", None)),
    ("Golden Retriever Dogs", ("Golden Retriever Dogs", None)),
])
def test_real_world_folder_names_of_other_taxa(name, expected):
    from index.datasets import parse_folder_name

    assert parse_folder_name(name) == expected


def test_folder_dataset_reads_inat_ranks_and_names_folders_taken_as_labels(tmp_path):
    from index.datasets import load_dataset

    _photo(tmp_path / INAT / "1.jpg", 301)
    _photo(tmp_path / "Erithacus rubecula (European Robin)" / "1.jpg", 302)
    _photo(tmp_path / "Golden Retriever Dogs" / "1.jpg", 303)
    _photo(tmp_path / "cats" / "1.jpg", 304)
    _photo(tmp_path / "turdus viscivorus" / "1.jpg", 309)
    scan = load_dataset("folder", tmp_path)
    assert scan.species == ["Erithacus rubecula", "Golden Retriever Dogs", "Turdus merula", "Turdus viscivorus",
                            "cats"]
    blackbird = next(r for r in scan.records if r.species == "Turdus merula")
    assert (blackbird.genus, blackbird.family) == ("Turdus", "Turdidae")
    thrush = next(r for r in scan.records if r.species == "Turdus viscivorus")  # its genus' family, from the other
    assert (thrush.genus, thrush.family) == ("Turdus", "Turdidae")
    assert blackbird.ranks == {"kingdom": "Animalia", "phylum": "Chordata", "class": "Aves", "order": "Passeriformes"}
    (warning,) = [w for w in scan.warnings if "not written as scientific names" in w]
    assert warning.startswith("2 class folder(s) not written as scientific names, each taken whole as a species "
                              "label (no genus, no family: --rank genus answers it as itself, --rank family as "
                              "'unknown family'; fine for a gallery of labels)"), warning
    assert "Golden Retriever Dogs; cats" in warning and "Erithacus" not in warning, warning


@pytest.mark.parametrize(("name", "genera", "expected"), [
    ("Daboia mauritanica (Moorish viper)", (), ("Daboia mauritanica", "Moorish viper")),  # its genus is known
    ("Lycodon capucinus (Common wolf snake)", (), ("Lycodon capucinus", "Common wolf snake")),
    ("Moorish viper (Daboia mauritanica)", (), ("Daboia mauritanica", "Moorish viper")),
    ("Erithacus rubecula (European robin)", ("Erithacus",), ("Erithacus rubecula", "European robin")),
    ("Erithacus rubecula (European robin)", (), ("European robin", "Erithacus rubecula")),  # a guess: warned
])
def test_a_common_name_in_sentence_case_beside_the_scientific_one(name, genera, expected):
    """Both halves look like binomials: the half whose genus the taxonomy or the other folders know wins."""
    from index.datasets import parse_folder_name

    assert parse_folder_name(name, genera) == expected


def test_folder_loader_reads_sentence_case_common_names_and_the_taxonomy_common_name(tmp_path):
    from index.datasets import load_dataset

    for i, name in enumerate(["Daboia mauritanica (Moorish viper)", "Naja-haje", "Turdus_merula",
                              "Turdus philomelos (Song thrush)", "Erithacus rubecula (European robin)"]):
        _photo(tmp_path / name / "1.jpg", 300 + i)
    scan = load_dataset("folder", tmp_path)
    by_species = {r.species: r for r in scan.records}
    viper = by_species["Daboia mauritanica"]
    assert (viper.genus, viper.family, viper.venomous, viper.common_name) == ("Daboia", "Viperidae", True,
                                                                             "Moorish viper")
    assert by_species["Naja haje"].common_name == "Egyptian cobra"  # the folder gives none: the taxonomy's
    assert by_species["Turdus philomelos"].common_name == "Song thrush"  # settled by Turdus_merula's genus
    # settled by the side the others were read by (Daboia's, Turdus philomelos'): no guess left, no warning
    assert by_species["Erithacus rubecula"].common_name == "European robin"
    assert not [w for w in scan.warnings if "name in brackets" in w], scan.warnings


@pytest.mark.parametrize(("names", "expected"), [
    (["Eurasian blackbird (Turdus merula)", "Song thrush (Turdus philomelos)", "House sparrow (Passer domesticus)"],
     {"Turdus merula": "Eurasian blackbird", "Turdus philomelos": "Song thrush",
      "Passer domesticus": "House sparrow"}),
    (["Turdus merula (Eurasian blackbird)", "Turdus philomelos (Song thrush)", "Erithacus rubecula (European robin)"],
     {"Turdus merula": "Eurasian blackbird", "Turdus philomelos": "Song thrush",
      "Erithacus rubecula": "European robin"}),
    (["Common toad (Bufo bufo)", "Common frog (Rana temporaria)"], {"Bufo bufo": "Common toad",
                                                                   "Rana temporaria": "Common frog"}),
    (["Eurasian blackbird (Turdus merula)"], {"Turdus merula": "Eurasian blackbird"}),
    (["Naja haje (Egyptian cobra)", "House sparrow (Passer domesticus)"],
     {"Naja haje": "Egyptian cobra", "Passer domesticus": "House sparrow"}),
    (["Turdus merula (Eurasian blackbird)", "Turdus philomelos (Song thrush)", "House sparrow (Passer domesticus)"],
     {"Turdus merula": "Eurasian blackbird", "Turdus philomelos": "Song thrush",
      "Passer domesticus": "House sparrow"}),
], ids=["the documented layout", "the converse layout", "a repeated common-name word", "one folder",
        "its own epithet over a known genus' layout", "its own epithet over the others' layout"])
def test_a_dataset_settles_its_sentence_case_folders_without_a_warning(tmp_path, names, expected):
    """Of birds the snake taxonomy does not know: a folder's own Latin-looking epithet beside a last word that is
    not, then the side the other folders were read by, settle the reading; a common name's first word repeated
    ('Common') settles nothing. Before, every such folder of the main documented layout was named in a warning
    advising to rename it to the layout it used, and 'Turdus merula (Eurasian blackbird)' was read as the species
    'Eurasian blackbird'; then the other folders' layout overruled a folder's own epithet, and 'House sparrow
    (Passer domesticus)' beside 'Naja haje (Egyptian cobra)' was read as the species 'House sparrow'."""
    from index.datasets import load_dataset

    for i, name in enumerate(names):
        _photo(tmp_path / name / "1.jpg", 400 + i)
    scan = load_dataset("folder", tmp_path)
    assert {r.species: r.common_name for r in scan.records} == expected
    assert not [w for w in scan.warnings if "name in brackets" in w], scan.warnings


def test_a_folder_nothing_settles_is_warned_by_the_reading_taken(tmp_path):
    """Neither epithet Latin-looking, no genus known or repeated, no other folder: the brackets' reading, warned
    naming the species taken."""
    from index.datasets import load_dataset

    _photo(tmp_path / "Common toad (Bufo bufo)" / "1.jpg", 410)
    scan = load_dataset("folder", tmp_path)
    assert [r.species for r in scan.records] == ["Bufo bufo"]
    (warning,) = [w for w in scan.warnings if "name in brackets" in w]
    assert "'Common toad (Bufo bufo)' as Bufo bufo" in warning, warning
    assert "rename the folder 'Common name (Genus species)'" in warning


# ------------------------------------------------------------------------------------------------ countries (#3, #10)
@pytest.mark.parametrize(("text", "code"), [("England", "GB"), ("Scotland", "GB"), ("Wales", "GB"),
                                            ("Northern Ireland", "GB"), ("Great Britain", "GB"), ("Holland", "NL"),
                                            ("The Gambia", "GM"), ("St Lucia", "LC"), ("Cape Verde", "CV"),
                                            ("ST", "ST"), ("st", "ST"), ("St. Kitts and Nevis", "KN")])
def test_country_names_birders_use(text, code):
    from index.geography import resolve_country

    assert resolve_country(text) == code


def test_an_unknown_country_is_suggested_by_its_words_first():
    from index.geography import resolve_country

    with pytest.raises(ValueError, match=r"did you mean South Korea \(KR\), North Korea \(KP\)\?"):
        resolve_country("Korea")


def test_presence_comes_from_the_gallery_photos_where_the_snake_table_has_no_word():
    from index.geography import country_presence

    recorded = {"Parus major": {"GB"}, "Turdus merula": {"France", "nowhere"}, "Naja haje": {"United Kingdom"}}
    in_gb = country_presence("England", recorded)
    assert in_gb["Parus major"] is True and in_gb["Turdus merula"] is False
    assert in_gb["Naja haje"] is True  # the table has no Naja haje in GB; a photo there says it is
    assert "Erithacus rubecula" not in in_gb  # neither knows it: its score is kept
    assert country_presence("FR", recorded)["Turdus merula"] is True


def test_a_photo_recorded_in_sao_tome_by_its_code_counts():
    """``ST`` is a code, not "Saint": a manifest's country ``ST`` is read, not dropped."""
    from index.geography import country_presence

    assert country_presence("STP", {"Parus major": {"ST"}})["Parus major"] is True


def test_presence_without_recorded_countries_is_the_table_and_keys_are_normalised_once():
    from index.geography import _table_keys, country_presence

    assert country_presence("MA", {}) == country_presence("MA")
    assert country_presence("MA")["Naja haje"] is True
    _table_keys.cache_clear()
    country_presence("GB", {"Parus major": {"GB"}})
    country_presence("FR", {"Parus major": {"GB"}})
    assert _table_keys.cache_info().misses == 1
    assert country_presence("EG")["Naja haje"] is True  # the snake table as before


def _manifest_gallery(tmp_path: Path, capsys) -> Path:
    rows = ["path,species,country"]
    for i in range(8):
        species, country = ("Parus major", "GB") if i % 2 else ("Turdus merula", "FR")
        rows.append(f"{_photo(tmp_path / 'birds' / f'{i}.png', 100 + i)},{species},{country}")
    manifest = tmp_path / "birds.csv"
    manifest.write_text("\n".join(rows) + "\n")
    index = tmp_path / "birds-g"
    code, _, err = _run(capsys, "index", "build", "--dataset", "manifest", "--root", manifest, "--index", index,
                        *ENCODER, "-q")
    assert code == 0, err
    return index


def test_country_favours_the_species_the_gallery_photos_record_there(tmp_path, capsys):
    """Walk #3: --country changed nothing for a manifest of birds whose rows all record their country."""
    index = _manifest_gallery(tmp_path, capsys)
    query = _photo(tmp_path / "q.png", 999)
    answers = {}
    for country in ("GB", "FR"):
        code, out, err = _run(capsys, "identify", "--index", index, query, "--country", country, "--format", "json",
                              *ENCODER)
        assert code == 0, err
        (answers[country],) = json.loads(out)
    for country, favoured in (("GB", "Parus major"), ("FR", "Turdus merula")):
        r = answers[country]
        assert r["country_applied"] is True and r["country_note"] is None, r
        assert r["predictions"][0]["species"] == favoured, r["predictions"]


def test_country_says_why_it_changed_nothing_in_a_gallery_of_no_countries(tmp_path, capsys):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import Settings

    root = tmp_path / "birds"
    for i in range(6):
        _photo(root / ("Parus major" if i % 2 else "Turdus merula") / f"{i}.png", 200 + i)
    index = tmp_path / "g"
    assert _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", index, *ENCODER,
                "-q")[0] == 0
    query = _photo(tmp_path / "q.png", 998)
    code, out, err = _run(capsys, "identify", "--index", index, query, "--country", "GB", *ENCODER)
    assert code == 0, err
    said = ("the country changed nothing here: none of these candidates is in the shipped country table "
            "(SnakeCLEF 2021's snake species only) or has a reference photo whose country this gallery records (a "
            "manifest's country column, index build --dataset manifest)")
    assert f"  ({said})" in out, out
    app = create_app(Settings(index=str(index), api_keys="k", precision="fp32", runtime="torch"))
    with TestClient(app) as c:
        resp = c.post("/v1/identify?country=England", files=[("images", ("q.png", query.read_bytes(), "image/png"))])
        assert resp.status_code == 200 and resp.json()["country_applied"] is False, resp.text
        assert said in resp.json()["notes"], resp.json()["notes"]
        resp = c.post("/v1/identify?rank=family", files=[("images", ("q.png", query.read_bytes(), "image/png"))])
        assert resp.status_code == 200, resp.text
        assert any(n.startswith("this gallery records no families: their scores are summed as 'unknown family'. "
                                "Families come only from") for n in resp.json()["notes"]), resp.json()["notes"]
    # --rank family says it once, beside the table (#8)
    code, out, err = _run(capsys, "identify", "--index", index, query, query, "--rank", "family", *ENCODER)
    assert code == 0 and out.count("note: this gallery records no families") == 1, out
    code, out, err = _run(capsys, "identify", "--index", index, query, "--rank", "genus", *ENCODER)
    assert code == 0 and "records no families" not in out, out


# ------------------------------------------------------------------------------------------------ evaluate (#9)
def test_a_long_species_label_neither_squeezes_the_confusion_matrix_nor_warns(tmp_path):
    from retrieval.metrics import _plot_confusion, _save_figure

    labels = ["Cyanistes caeruleus", "Erithacus rubecula",
              "Mallard x American Black Duck (Anas platyrhynchos × rubripes)", "Motacilla flava flavissima",
              "Parus major", "Phylloscopus sp."]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "constrained_layout not applied": axes collapsed to zero
        fig = _plot_confusion("probe", {"labels": labels, "matrix": (np.eye(6) * 4).tolist()})
        _save_figure(fig, tmp_path / "c.png")
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert ticks[2] == "Mallard x American Black Duck (…" and ticks[0] == "Cyanistes caeruleus", ticks


def test_the_report_says_where_the_countries_came_from(tmp_path):
    from retrieval.metrics import EvalItem, evaluate, write_report

    items = [EvalItem(truth="Parus major", scores={"Parus major": 0.9, "Turdus merula": 0.1}, unknown=False)]
    files = write_report(tmp_path, {"knn": evaluate(items, venomous={})}, title="birds")
    text = files["report.md"].read_text()
    assert "the countries are the evaluated photos' own, from the dataset's metadata (its country column)" in text
    assert "(SnakeCLEF 2021)." not in text


def test_a_lower_case_folder_is_re_cased_only_where_its_genus_is_known(tmp_path):
    """'turdus merula' beside 'Turdus philomelos' (or 'naja haje': a snake genus) is a scientific name; 'samar cobra'
    or 'parus major' alone may be a common name: kept as a label, the warning saying how to write it."""
    from index.datasets import load_dataset

    for i, name in enumerate(("Turdus philomelos", "turdus merula", "naja haje", "samar cobra", "parus major")):
        _photo(tmp_path / name / "1.jpg", 310 + i)
    scan = load_dataset("folder", tmp_path)
    assert scan.species == ["Naja haje", "Turdus merula", "Turdus philomelos", "parus major", "samar cobra"]
    (warning,) = [w for w in scan.warnings if "not written as scientific names" in w]
    assert "parus major (if a scientific name: 'Parus major'); samar cobra (if a scientific name: 'Samar cobra')" \
        in warning, warning
