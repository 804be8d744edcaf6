"""A harmless flag for a name that may be a medically important venomous taxon of the shipped taxonomy
(index.taxonomy.check_harmless_flag, the one rule of ``species set-venom NAME no`` and ``references add --venomous
no``): a near-spelling, a common name, an epithet in a genus the taxonomy lacks (re-read w2 safety #2: only the
exact taxon was refused, so 'Daboia russellii' set no answered 'unlikely' for Russell's viper)."""

from __future__ import annotations

import pytest
from _cli_support import ENCODER, _photo, _run, folder_gallery, venom_flags

from index.taxonomy import DISTINCT_OPTION, check_harmless_flag, venomous_lookalike

#: name -> the venomous taxon of the shipped taxonomy it may be
LOOKALIKES = {"Daboia russellii": "Daboia russelii", "Puff adder": "Bitis arietans",
              "Cryptelytrops albolabris": "Trimeresurus albolabris"}


def test_the_rule():
    for name, taxon in LOOKALIKES.items():
        found = venomous_lookalike(name)
        assert found is not None and found[0].species == taxon and found[0].venomous, (name, found)
    assert venomous_lookalike("Bufo bufo") is None and venomous_lookalike("Natrix maura") is None
    assert venomous_lookalike("Trimeresurus albolabris") is None  # the taxon itself: refused outright elsewhere
    # re-read w3-a #1: an old name in a genus the taxonomy knows is a synonym too (Vipera russelii: Russell's viper,
    # Agkistrodon rhodostoma: the Malayan pit viper); before, only a genus the taxonomy lacks was looked at
    assert venomous_lookalike("Vipera russelii")[0].species == "Daboia russelii"
    assert venomous_lookalike("Agkistrodon rhodostoma")[0].species == "Calloselasma rhodostoma"
    assert venomous_lookalike("Bitis sp", common_name="puff  adder")[0].species == "Bitis arietans"
    check_harmless_flag("Daboia russellii", distinct=True)  # confirmed: nothing refused
    with pytest.raises(ValueError, match=DISTINCT_OPTION):
        check_harmless_flag("Daboia russellii")


@pytest.mark.parametrize("name", ["Bufo viridis", "Lacerta viridis", "Bufotes viridis", "Chalcides ocellatus",
                                  "Timon lepidus", "Acanthodactylus erythrurus"])
def test_an_epithet_other_genera_share_is_no_synonym(name):
    """Re-read w3-design #4: a Moroccan toad or lizard whose epithet is an adjective several genera of the table
    use (viridis: Crotalus, Morelia, ...) was refused a harmless flag as a possible synonym of a venomous snake;
    only an epithet one genus has counts (albolabris: Trimeresurus)."""
    assert venomous_lookalike(name) is None
    check_harmless_flag(name)  # nothing refused
    found = venomous_lookalike("Cryptelytrops albolabris")
    assert found is not None and found[0].species == "Trimeresurus albolabris"
    # one genus of the table has it: still a name match (Vipera graeca), whatever Testudo is
    assert venomous_lookalike("Testudo graeca")[0].species == "Vipera graeca"


def test_the_rule_refuses_the_venomous_taxon_itself_whatever_is_confirmed():
    """One refusal of 'no' for a species the taxonomy records venomous, in check_harmless_flag (before, written in
    set_species_venomous and new_species_references, and check_harmless_flag let it through)."""
    for distinct in (False, True):
        with pytest.raises(ValueError, match=r"'Trimeresurus albolabris' is medically important venomous in the "
                           r"shipped taxonomy \(SnakeCLEF's list\): its flag stays yes"):
            check_harmless_flag("trimeresurus albolabris", distinct=distinct)


@pytest.mark.parametrize("name", sorted(LOOKALIKES))
def test_set_venom_no_refuses_a_venomous_lookalike_unless_confirmed(tmp_path, capsys, name):
    index = folder_gallery(tmp_path, capsys, (name, "Bufo bufo"))
    code, out, err = _run(capsys, "species", "set-venom", "--index", index, name, "no")
    assert code != 0 and f"{name!r} may be {LOOKALIKES[name]!r}, medically important venomous" in err, err
    assert f"If you are sure it is another, harmless species, add {DISTINCT_OPTION}" in err, err
    assert venom_flags(capsys, index)[name] is None
    code, out, err = _run(capsys, "species", "set-venom", "--index", index, name, "no", DISTINCT_OPTION)
    assert code == 0 and out.strip().startswith(f"{name}: venomous ? -> no"), (out, err)
    assert venom_flags(capsys, index)[name] is False
    assert _run(capsys, "species", "set-venom", "--index", index, "Bufo bufo", "no")[0] == 0  # no lookalike


def test_references_add_venomous_no_refuses_a_venomous_lookalike_unless_confirmed(tmp_path, capsys):
    index = folder_gallery(tmp_path, capsys, ("Bufo bufo", "Rana temporaria"))
    photo = _photo(tmp_path / "new" / "a.png", 40)
    add = ("references", "add", "--index", index, "--species", "Cryptelytrops albolabris", "--venomous", "no",
           photo, *ENCODER)
    code, out, err = _run(capsys, *add)
    assert code != 0 and "may be 'Trimeresurus albolabris'" in err and DISTINCT_OPTION in err, err
    assert "Cryptelytrops albolabris" not in venom_flags(capsys, index)
    code, out, err = _run(capsys, *add, DISTINCT_OPTION)
    assert code == 0 and venom_flags(capsys, index)["Cryptelytrops albolabris"] is False, (out, err)


def test_the_api_add_refuses_a_venomous_lookalike_unless_confirmed(tmp_path, capsys):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import Settings

    index = folder_gallery(tmp_path, capsys, ("Bufo bufo", "Rana temporaria"))
    photo = _photo(tmp_path / "new" / "a.png", 40, side=256)
    files = [("images", (photo.name, photo.read_bytes(), "image/png"))]
    settings = Settings(index=str(index), api_keys="secret", precision="fp32", refresh_s=0.0)
    with TestClient(create_app(settings)) as client:
        url = "/v1/species/Puff adder/references"
        refused = client.post(url, files=files, data={"venomous": "false", "new_species": "true"},
                              headers={"X-API-Key": "secret"})
        assert refused.status_code == 400 and "may be 'Bitis arietans'" in refused.json()["detail"], refused.json()
        assert "distinct_from_venomous=true" in refused.json()["detail"]
        done = client.post(url, files=files, headers={"X-API-Key": "secret"},
                           data={"venomous": "false", "new_species": "true", "distinct_from_venomous": "true"})
        assert done.status_code == 201, done.json()
