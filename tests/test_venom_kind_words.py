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
    assert code == 0 and out.strip().startswith("Puff adder: venomous no -> no"), (out, err)
    photo = _photo(tmp_path / "new" / "a.png", 40)
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Puff adder", "--venomous",
                          "no", photo, *ENCODER)
    assert code == 0 and venom_flags(capsys, index)["Puff adder"] is False, (out, err)
