"""A harmless flag for a name holding a venomous snake kind's word (index.taxonomy.venomous_kind_word: re-read w3-a
#2, 'King cobra' set no was accepted: only the Moroccan checklist's species have a common name in the shipped lists),
and a species recorded no already needs no confirmation again (re-read w3-a #7)."""

from __future__ import annotations

import pytest
from _cli_support import ENCODER, _photo, _run, folder_gallery, venom_flags

from index.taxonomy import DISTINCT_OPTION, check_harmless_flag, venomous_kind_word


@pytest.mark.parametrize(("name", "word"), [
    ("King cobra", "cobra"), ("Russell's viper", "viper"), ("Common krait", "krait"), ("Black mamba", "mamba"),
    ("Fer-de-lance", "fer-de-lance"), ("Yellow-bellied sea snake", "sea snake"),
    ("Eastern coral snake", "coral snake"), ("Cobras", "cobra")])
def test_a_kind_word_asks_for_the_confirmation(name, word):
    assert venomous_kind_word(name) == word
    with pytest.raises(ValueError, match=f"holds {word!r}, a kind of venomous snake.*{DISTINCT_OPTION}"):
        check_harmless_flag(name)
    check_harmless_flag(name, distinct=True)  # confirmed: nothing refused


def test_names_without_a_kind_word_pass():
    for name in ("Bufo bufo", "Common toad", "Grass snake", "Viperine snake", "Aspidelaps", "Natrix maura"):
        assert venomous_kind_word(name) is None, name
        check_harmless_flag(name)
    assert venomous_kind_word("Xus yus", common_name="Russell's viper") == "viper"  # the common name too
    with pytest.raises(ValueError, match="'Xus yus' \\(\"Russell's viper\"\\) holds 'viper'"):
        check_harmless_flag("Xus yus", common_name="Russell's viper")


def test_set_venom_king_cobra_no_is_refused_unless_confirmed(tmp_path, capsys):
    index = folder_gallery(tmp_path, capsys, ("King cobra", "Bufo bufo"))
    code, out, err = _run(capsys, "species", "set-venom", "--index", index, "King cobra", "no")
    assert code != 0 and "'King cobra' holds 'cobra', a kind of venomous snake" in err, err
    assert f"add {DISTINCT_OPTION}" in err and venom_flags(capsys, index)["King cobra"] is None
    code, out, err = _run(capsys, "species", "set-venom", "--index", index, "King cobra", "no", DISTINCT_OPTION)
    assert code == 0 and venom_flags(capsys, index)["King cobra"] is False, err


def test_a_species_recorded_no_needs_no_confirmation_again(tmp_path, capsys):
    """Re-read w3-a #7: each later 'no' (an add's, a set-venom's) asked for --distinct-from-venomous again."""
    index = folder_gallery(tmp_path, capsys, ("Puff adder", "Bufo bufo"))
    assert _run(capsys, "species", "set-venom", "--index", index, "Puff adder", "no")[0] != 0  # a lookalike
    assert _run(capsys, "species", "set-venom", "--index", index, "Puff adder", "no", DISTINCT_OPTION)[0] == 0
    code, out, err = _run(capsys, "species", "set-venom", "--index", index, "Puff adder", "no")
    assert code == 0 and out.strip().startswith("Puff adder: venomous already no ("), (out, err)
    photo = _photo(tmp_path / "new" / "a.png", 40)
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Puff adder", "--venomous",
                          "no", photo, *ENCODER)
    assert code == 0 and venom_flags(capsys, index)["Puff adder"] is False, (out, err)


@pytest.mark.parametrize(("name", "word"), [
    ("Vipère à cornes", "vipère"), ("Vipere a cornes", "vipère"), ("VIPÈRES", "vipère"), ("Aspic", "aspic"),
    ("Crotale diamantin", "crotale"), ("Naja inconnu", "naja"), ("Céraste", "céraste"), ("أفعى", "أفعى"),
    ("افعى", "أفعى"), ("الأفعى", "أفعى"), ("كوبرا مصرية", "كوبرا"), ("الصل", "الصل"), ("لفعة", "لفعة"),
    ("لفعه", "لفعة")])
def test_french_and_arabic_kind_words_ask_for_the_confirmation(name, word):
    """Walk s53 phone #1: 'Vipère à cornes', 'أفعى' and 'كوبرا مصرية' were set harmless with no confirmation, where
    'Horned viper' is refused; matched accent- and hamza-folded ('افعى' is 'أفعى' without its hamza)."""
    assert venomous_kind_word(name) == word
    with pytest.raises(ValueError, match=f"holds {word!r}, a kind of venomous snake.*{DISTINCT_OPTION}"):
        check_harmless_flag(name)
    check_harmless_flag(name, distinct=True)


def test_french_names_of_harmless_snakes_without_a_kind_word_pass():
    for name in ("Couleuvre vipérine", "Couleuvre de Montpellier", "Natrix maura", "ثعبان الماء", "Aspidelaps"):
        assert venomous_kind_word(name) is None, name
        check_harmless_flag(name)


def _held(species, common, venomous, count=5):
    from index.store import SpeciesSummary

    return SpeciesSummary(species, species.split()[0], None, common, venomous, count)


def test_a_name_of_a_species_this_gallery_records_venomous_asks_for_the_confirmation():
    """Walk s53 phone #1: 'Serpent de Tiznit' (no kind word), the common name of a species the gallery records
    venomous, and its near-spellings and other names (folded) were taken harmless."""
    held = [_held("Xus venenatus", "Serpent de Tiznit", True), _held("Xus mitis", "Serpent doux", False)]
    commons = {"Xus venenatus": ["Serpent de Tiznit", "حنش تيزنيت"]}
    for name, common, how in (
            ("Serpent de Tiznit", None, "'Serpent de Tiznit' is its common name"),
            ("Yus yus", "serpent de tiznít", "'serpent de tiznít' is its common name 'Serpent de Tiznit' (case, "
                                             "accents, hamza or apostrophes aside)"),
            ("Serpent de Tiznitt", None, "'Serpent de Tiznitt' is a near-spelling of its common name 'Serpent de "
                                         "Tiznit'"),
            ("حنش تيزنيت", None, "'حنش تيزنيت' is its common name"),
            ("Xus venenatos", None, "'Xus venenatos' is a near-spelling of its name 'Xus venenatus'")):
        with pytest.raises(ValueError) as refused:
            check_harmless_flag(name, common, gallery_species=held, common_names=commons)
        assert str(refused.value).startswith(
            f"{name!r} may be 'Xus venenatus', which this gallery records as medically important venomous: "
            f"{how}; "), str(refused.value)
        assert f"add {DISTINCT_OPTION} (the API's add: distinct_from_venomous=true)" in str(refused.value)
        check_harmless_flag(name, common, gallery_species=held, common_names=commons, distinct=True)
    check_harmless_flag("Xus venenatus", gallery_species=held)  # its own flag is its own to change
    check_harmless_flag("Serpent doux", gallery_species=held)  # a harmless species' name
    check_harmless_flag("Serpent de Tiznit", gallery_species=[_held("Xus venenatus", "Serpent de Tiznit", None)])


def test_the_cli_and_the_api_refuse_a_french_or_arabic_name_of_a_gallery_venomous_species(tmp_path, capsys):
    """Walk s53 phone #1, end to end: a new species named as the gallery's venomous Vipera latastei's French common
    name, or one hamza off its Arabic one, set harmless; and 'أفعى' set no."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import Settings

    index = folder_gallery(tmp_path, capsys, ("Vipère de Lataste (Vipera latastei)",
                                              "أفعى موريتانيا (Daboia mauritanica)", "أفعى", "Natrix maura"))
    assert venom_flags(capsys, index)["Vipera latastei"] is True
    photo = _photo(tmp_path / "new" / "a.png", 40, side=64)
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Vipere de Lataste",
                          "--new-species", "--venomous", "no", photo, *ENCODER)
    assert code == 2 and ("'Vipere de Lataste' may be 'Vipera latastei', which this gallery records as "
                          "medically important venomous: 'Vipere de Lataste' is its common name "
                          "'Vipère de Lataste'") in err, err
    assert "Vipere de Lataste" not in venom_flags(capsys, index)
    code, out, err = _run(capsys, "species", "set-venom", "--index", index, "أفعى", "no")
    assert code != 0 and "'أفعى' holds 'أفعى', a kind of venomous snake" in err and venom_flags(capsys, index)[
        "أفعى"] is None, err
    files = [("images", (photo.name, photo.read_bytes(), "image/png"))]
    settings = Settings(index=str(index), api_keys="secret", precision="fp32", refresh_s=0.0)
    with TestClient(create_app(settings)) as client:
        url = "/v1/species/افعى موريتانيا/references"
        refused = client.post(url, files=files, data={"venomous": "false", "new_species": "true"},
                              headers={"X-API-Key": "secret"})
        assert refused.status_code == 400 and "may be 'Daboia mauritanica'" in refused.json()["detail"], \
            refused.json()
        assert "'افعى موريتانيا' is its common name 'أفعى موريتانيا'" in refused.json()["detail"]
        done = client.post(url, files=files, headers={"X-API-Key": "secret"},
                           data={"venomous": "false", "new_species": "true", "distinct_from_venomous": "true"})
        assert done.status_code == 201, done.json()
