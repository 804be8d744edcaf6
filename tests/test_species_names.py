"""Species names as clients send them (API walk s50 #1, #2, #17): a decomposed (NFD) name is the same species as its
composed spelling, a near-spelling of a taxon of the shipped taxonomy is refused like one of a gallery species
(CLI and API, one rule), and a read of a near-spelling says what was meant; names that were not text,
start a spreadsheet formula or hold a backslash are refused, and a homoglyph's letter is named (walk s53
hostile #4, #7, #10, #11).

Galleries here use the tiny random ``timm:test_vit@random`` encoder on random photos: fast, no shared assets.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from pathlib import Path

import pytest
from _cli_support import ENCODER, _photo, _run, two_species_gallery

from index.gallery import Gallery
from index.taxonomy import check_name, find_species, species_key

NFC = "Naja n\u00efvea"  # "ï" composed
NFD = "Naja ni\u0308vea"  # "i" + COMBINING DIAERESIS: what macOS and iOS often send


@pytest.fixture
def built(tmp_path, capsys) -> tuple[Path, Path]:
    """(gallery, its photo folder): 6 random photos of two species."""
    return two_species_gallery(tmp_path, capsys)


def _client(index: Path):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import Settings

    return TestClient(create_app(Settings(index=str(index), api_keys="k", precision="fp32", runtime="torch")))


def test_a_decomposed_name_is_composed_where_names_enter():
    assert NFC != NFD and unicodedata.normalize("NFC", NFD) == NFC
    assert check_name(NFD) == NFC and check_name(f" {NFD}_x ".replace("_", " ")) == f"{NFC} x"
    assert species_key(NFD) == species_key(NFC)


def test_an_nfd_name_joins_its_nfc_species_from_the_cli_and_the_api(built, tmp_path, capsys):
    """Walk s50 #1: the NFD spelling made a second species that looks the same; now every route finds one."""
    index, _ = built
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", NFC, "--new-species",
                          _photo(tmp_path / "a.png", 50), *ENCODER)
    assert code == 0 and f"{NFC} (new species)" in out, (out, err)
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", NFD,
                          _photo(tmp_path / "b.png", 51), *ENCODER)  # no --new-species needed: it is the same name
    assert code == 0 and f"{NFC} (existing species)" in out, (out, err)
    data = _photo(tmp_path / "c.png", 52).read_bytes()
    with _client(index) as c:
        resp = c.post(f"/v1/species/{NFD}/references", files=[("images", ("c.png", data, "image/png"))],
                      headers={"X-API-Key": "k"})
        assert resp.status_code == 201 and resp.json()["species"] == NFC and resp.json()["created"] is False, resp.text
        got = c.get(f"/v1/species/{NFD.replace(' ', '_')}")
        assert got.status_code == 200 and got.json()["species"] == NFC and got.json()["count"] == 3, got.text
        assert [s["species"] for s in c.get("/v1/species").json()].count(NFC) == 1
    names = [s.species for s in Gallery.open(index).species()]
    assert NFC in names and NFD not in names


def test_a_folder_dataset_composes_its_folder_names(tmp_path, capsys):
    root = tmp_path / "photos"
    for i in range(2):
        _photo(root / NFD / f"{i}.png", 60 + i)
    code, _, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", tmp_path / "g",
                        *ENCODER, "-q")
    assert code == 0, err
    assert [s.species for s in Gallery.open(tmp_path / "g").species()] == [NFC]


def test_a_stored_decomposed_name_is_still_found_by_its_composed_spelling():
    """A gallery written before names were composed may hold an NFD name: matching composes both sides."""
    from index.store import SpeciesSummary

    held = [SpeciesSummary(species=NFD, genus="Naja", family="Elapidae", common_name=None, venomous=True, count=2)]
    assert find_species(held, NFC) is held[0]


def test_the_cli_refuses_a_near_spelling_of_a_taxonomy_species_unless_confirmed(built, tmp_path, capsys):
    """Walk s50 #2: 'Naja nivae' (for the venomous Cape cobra, 'Naja nivea') was created silently, venom unknown."""
    index, _ = built
    photo = _photo(tmp_path / "n.png", 70)
    code, _, err = _run(capsys, "references", "add", "--index", index, "--species", "Naja nivae", photo, *ENCODER)
    assert code == 2 and ("'Naja nivae' is not in the gallery or the shipped snake taxonomy, which has 'Naja nivea' "
                          "(venomous): give --species 'Naja nivea' to add to it, or give --new-species if 'Naja "
                          "nivae' is a new species\n") in err, err
    assert "Naja nivae" not in [s.species for s in Gallery.open(index).species()]
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Naja nivae", "--new-species",
                          photo, *ENCODER)
    assert code == 0 and "Naja nivae (new species)" in out, (out, err)
    assert ("note: 'Naja nivae' is not in the shipped snake taxonomy, which has 'Naja nivea' (venomous) and 'Naja "
            "nubiae'") in out, out  # the override keeps the suggestion in a note
    # the taxonomy's own spelling is added as before, with its venomous flag
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "naja-nivea",
                          _photo(tmp_path / "m.png", 71), *ENCODER)
    assert code == 0 and "Naja nivea (new species)" in out and "note: 'Naja" not in out, (out, err)
    assert find_species(Gallery.open(index).species(), "Naja nivea").venomous is True


def test_the_api_refuses_a_near_spelling_of_a_taxonomy_species_unless_confirmed(built, tmp_path):
    index, _ = built
    data = _photo(tmp_path / "n.png", 80).read_bytes()
    keys = {"X-API-Key": "k"}
    with _client(index) as c:
        url = "/v1/species/Naja nivae/references"
        resp = c.post(url, files=[("images", ("n.png", data, "image/png"))], headers=keys)
        assert resp.status_code == 409 and resp.json()["detail"] == (
            "'Naja nivae' is not in the gallery or the shipped snake taxonomy, which has 'Naja nivea' (venomous): send "
            "the photos to POST /v1/species/Naja_nivea/references to add them to 'Naja nivea', or send the form field "
            "new_species=true to create 'Naja nivae' as a new species"), resp.text
        resp = c.post(url, files=[("images", ("n.png", data, "image/png"))], data={"new_species": "true"},
                      headers=keys)
        assert resp.status_code == 201 and resp.json()["created"] is True, resp.text
        assert resp.json()["notes"][0].startswith(
            "'Naja nivae' is not in the shipped snake taxonomy, which has 'Naja nivea' (venomous) and 'Naja nubiae' "
            "(venomous): "
            "if the photos are of one of those, delete these references"), resp.json()["notes"]
        assert c.get("/v1/species/Naja_nivae").json()["venomous"] is None


def test_a_new_name_not_written_as_a_scientific_one_is_refused_alike_by_the_cli_and_the_api(built, tmp_path, capsys):
    """Walk s50 #17: the species 'x' was created while the genus 'Naja' alone was refused. A new name is written
    'Genus species' (the folder dataset's rule of a scientific name); any other (a label, 'cats') is taken once
    confirmed, as a near-spelling is. Names the gallery or the taxonomy hold join as before."""
    index, _ = built
    photo = _photo(tmp_path / "x.png", 60)
    code, _, err = _run(capsys, "references", "add", "--index", index, "--species", "x", photo, *ENCODER)
    assert code == 2 and err.endswith(
        "'x' is not written as a scientific name ('Genus species': a capitalised genus, then one or two lower-case "
        "epithets; e.g. 'Naja haje' or 'Parus major'): give the species' scientific name, or give --new-species if "
        "'x' is a new "
        "species\n"), err
    code, _, err = _run(capsys, "references", "add", "--index", index, "--species", "naja nova", photo, *ENCODER)
    assert code == 2 and "lower-case epithets; did you mean 'Naja nova'?): give the species' scientific name" in err
    assert {s.species for s in Gallery.open(index).species()} == {"Natrix maura", "Naja samarensis"}  # none made
    data = photo.read_bytes()
    with _client(index) as c:
        for name in ("x", "cobra", "Common Wolf Snake"):
            resp = c.post(f"/v1/species/{name}/references", files=[("images", ("x.png", data, "image/png"))],
                          headers={"X-API-Key": "k"})
            assert resp.status_code == 409 and resp.json()["detail"] == (
                f"{name!r} is not written as a scientific name ('Genus species': a capitalised genus, then one or "
                "two lower-case epithets; e.g. 'Naja haje' or 'Parus major'): give the species' scientific name, or "
                "send the form "
                f"field new_species=true to create {name!r} as a new species"), resp.text
        assert c.get("/v1/species/x").status_code == 404
        resp = c.post("/v1/species/Naja/references", files=[("images", ("x.png", data, "image/png"))],
                      headers={"X-API-Key": "k"}, data={"new_species": "true"})
        assert resp.status_code == 400 and "'Naja' is a genus, not a species" in resp.text  # confirmed or not
        resp = c.post("/v1/species/x/references", files=[("images", ("x.png", data, "image/png"))],
                      headers={"X-API-Key": "k"}, data={"new_species": "true"})
        assert resp.status_code == 201 and resp.json()["species"] == "x" and resp.json()["created"], resp.text
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "X",
                          _photo(tmp_path / "y.png", 61), *ENCODER)  # a label the gallery holds joins it
    assert code == 0 and "x (existing species)" in out, (out, err)


def test_a_folder_dataset_named_like_a_taxonomy_species_is_not_refused(tmp_path, capsys):
    """A dataset's folder names are the user's data: an index build takes 'Naja nivae' as it is."""
    root = tmp_path / "photos"
    for i in range(2):
        _photo(root / "Naja nivae" / f"{i}.png", 90 + i)
    code, _, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", tmp_path / "g",
                        *ENCODER, "-q")
    assert code == 0, err
    assert [s.species for s in Gallery.open(tmp_path / "g").species()] == ["Naja nivae"]


def test_a_read_of_a_near_spelling_or_a_common_name_says_what_was_meant(built):
    """Walk s50 #17: GET of a near-spelling gave a bare 404 where the POST named the species in its 409."""
    index, _ = built
    with _client(index) as c:
        for name in ("Naja samarensiss", "Samar Cobra", "Naja_samarensiss"):
            resp = c.get(f"/v1/species/{name}")
            assert resp.status_code == 404 and resp.json()["detail"] == (
                f"no species {name!r} in this gallery; did you mean 'Naja samarensis'?"), resp.text
        resp = c.get("/v1/species/Testus novus")
        assert resp.status_code == 404 and resp.json()["detail"] == "no species 'Testus novus' in this gallery"


PAGE = Path(__file__).resolve().parents[1] / "api" / "static" / "index.html"


def _script() -> str:
    html = PAGE.read_text(encoding="utf-8")
    return html[html.index("<script>"):html.index("</script>")]


def test_the_page_can_confirm_a_new_species_after_a_409():
    """Walk s50 #3: the page's curate form could not send new_species, so the API's 409 advice was a dead end."""
    html, script = PAGE.read_text(encoding="utf-8"), _script()
    assert '<div id="new-species-row" hidden>' in html and '<input id="new-species" type="checkbox">' in html
    assert "create as a new species" in html
    # sent only while the box is shown (after a 409) and ticked; shown by a 409; hidden again when the name changes
    assert ('if (!$("new-species-row").hidden && $("new-species").checked) data.append("new_species", "true");'
            in script)
    assert 'const conflict = resp.status === 409;' in script and 'if (conflict) $("new-species-row").hidden = false;' \
        in script
    assert '$("species").addEventListener("input"' in script


def test_the_page_shows_the_notes_of_an_add_escaped():
    """Walk s50 #12: the add's notes (a taxonomy suggestion, too few photos, retrain) never reached the curator."""
    html, script = PAGE.read_text(encoding="utf-8"), _script()
    assert '<ul id="curate-notes"></ul>' in html
    assert ('$("curate-notes").innerHTML = (out.notes || []).map((n) => `<li>${withNames(n, added)}</li>`)'
            '.join("");') in script  # escaped, its names isolated (walk s53 #2)
    assert "out += esc(raw.slice(last, m.index)) + bdi(m[0]);" in script and "return out + esc(raw.slice(last));" \
        in script


def test_the_page_adds_its_key_hint_only_where_a_key_can_help():
    """Walk s50 #13: a server with no keys configured answered 401, and the page told the user to type a key."""
    from api.guard import key_refusal, no_keys_message

    script = _script()
    assert 'const NO_KEYS = "no SPECIESID_API_KEYS";' in script
    assert "const hint = resp.status === 401 && !detail.includes(NO_KEYS) ? NEEDS_KEY : \"\";" in script
    for kind in ("read", "write"):  # the page reads the server's own words: they must keep the marker
        assert "no SPECIESID_API_KEYS" in no_keys_message(kind)
    assert "no SPECIESID_API_KEYS" not in key_refusal("wrong", ["k"], "read")  # a wrong key: the hint stays


@pytest.mark.parametrize("mark", ["\u2019", "\u2018", "\u02bc"])
def test_a_typographic_apostrophe_is_the_ascii_one(mark):
    """Walk s53 phone #4: a phone keyboard's 'Cobra d’Égypte' was another name than 'Cobra d'Égypte'."""
    assert check_name(f"Cobra d{mark}Égypte", "common name") == "Cobra d'Égypte"
    assert check_name(f"Vipère d{mark}Orient") == "Vipère d'Orient"
    assert species_key(f"Vipère d{mark}Orient") == species_key("vipère d'orient")


def test_a_stored_name_with_a_typographic_apostrophe_is_still_found(tmp_path):
    """A gallery written before apostrophes were folded may hold 'Vipère d’Orient': found by either spelling, and
    an add of 'Vipère d'Orient' joins it instead of making a second species that prints alike."""
    import numpy as np
    from _cli_support import DIM, ENC

    from index.records import ReferenceRecord
    from index.taxonomy import new_species_references
    from retrieval.workflows import set_species_venomous

    stored = "Vipère d\u2019Orient"
    g = Gallery.create(tmp_path / "g", ENC)
    x = np.random.default_rng(3).standard_normal((3, DIM)).astype(np.float32)
    g.add([ReferenceRecord(path=f"/p/{i}.jpg", species=stored) for i in range(3)], [f"v{i}" for i in range(3)],
          x / np.linalg.norm(x, axis=1, keepdims=True))
    held = g.species()
    assert find_species(held, "Vipère d'Orient") is held[0] and find_species(held, "vipère d‘orient") is held[0]
    name, _, prior = new_species_references("Vipère d'Orient", held, [], dataset="added", new_species=True)
    assert name == stored and prior is held[0]
    assert set_species_venomous(g, "Vipère d'Orient", True).species == stored


def test_lookups_and_suggestions_ignore_accents_and_hamza(tmp_path, capsys):
    """Walk s53 phone #7: 'Vipere a cornes' was no species (no suggestion); GET /v1/species/cobra d'egypte gave a
    bare 404 where 'Cobra d'Égypte' said "did you mean 'Naja haje'?"."""
    from _cli_support import folder_gallery

    index = folder_gallery(tmp_path, capsys,
                           ("Vipère à cornes", "Cobra d'Égypte (Naja haje)", "أفعى", "Natrix maura"))
    code, out, err = _run(capsys, "species", "set-venom", "--index", index, "Vipere a cornes", "yes")
    assert code == 0 and out.startswith("Vipère à cornes: venomous ? -> yes"), (out, err)
    code, out, err = _run(capsys, "species", "set-venom", "--index", index, "Vipere a corne", "yes")
    assert code == 2 and "no species 'Vipere a corne' in gallery" in err and "did you mean 'Vipère à cornes'?" in err
    code, out, err = _run(capsys, "species", "set-venom", "--index", index, "افعى", "yes")  # no hamza
    assert code == 0 and out.startswith("أفعى: venomous ? -> yes"), (out, err)
    with _client(index) as c:
        resp = c.get("/v1/species/cobra d'egypte")
        assert resp.status_code == 404 and resp.json()["detail"] == (
            "no species \"cobra d'egypte\" in this gallery; did you mean 'Naja haje'?"), resp.text
        resp = c.get("/v1/species/vipere a cornes")
        assert resp.status_code == 200 and resp.json()["species"] == "Vipère à cornes", resp.text


def test_an_add_takes_any_common_name_the_species_references_carry(tmp_path, capsys):
    """Walk s53 phone #3: 'Naja haje', built from folders in French, English and Arabic, carries three common names,
    but an add was refused every one but the one shown."""
    from _cli_support import folder_gallery

    index = folder_gallery(tmp_path, capsys, ("Cobra d'Égypte (Naja haje)", "Naja haje (Egyptian cobra)",
                                              "كوبرا مصرية (Naja haje)"), 7)  # 3 French photos: the one shown
    shown = {s.species: s.common_name for s in Gallery.open(index).species()}
    assert shown == {"Naja haje": "Cobra d'Égypte"}
    for i, given in enumerate(("كوبرا مصرية", "Egyptian cobra", "cobra d\u2019egypte")):
        code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Naja haje",
                              "--common-name", given, _photo(tmp_path / f"a{i}.png", 90 + i), *ENCODER)
        assert code == 0 and "Naja haje (existing species)" in out, (given, out, err)
    names = Gallery.open(index).store.species_names()[1]["Naja haje"]
    assert sorted(names) == sorted(["Cobra d'Égypte", "Egyptian cobra", "كوبرا مصرية"]), names  # stored as carried
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Naja haje",
                          "--common-name", "Cobra royal", _photo(tmp_path / "b.png", 99), *ENCODER)
    assert code == 2 and ("'Naja haje' is recorded with common names \"Cobra d'Égypte\" or 'Egyptian cobra' or "
                          "'كوبرا مصرية', not 'Cobra royal': leave the common name out") in err, err


@pytest.mark.parametrize("what", ["species name", "genus", "family", "common name", "class folder name"])
def test_a_name_that_was_not_text_or_starts_a_formula_is_refused_saying_why(what):
    """Walk s53 hostile #7, #4: a URL's undecodable byte (``%FF``, decoded as U+FFFD) was stored in a species name;
    a name starting with ``=``, ``+``, ``-`` or ``@`` went raw into every CSV export, where a spreadsheet runs it."""
    with pytest.raises(ValueError, match=(
            rf"^the {what} 'Naja\ufffdhaje' is not valid text \(U\+FFFD, the replacement character: the name was not "
            r"valid UTF-8\); send it encoded as UTF-8, give e\.g\. ")):
        check_name("Naja\ufffdhaje", what)
    with pytest.raises(ValueError, match=r"'\ufffd\ufffd' is not valid text"):  # not "has no letters or digits"
        check_name("\ufffd\ufffd", what)
    for name in ("=1+1", "+cmd", "-2+3", "@SUM(1+1)", " \t=HYPERLINK(\"x\")"):
        start = name.strip()[0]
        with pytest.raises(ValueError, match=(
                rf"^the {what} '{re.escape(name.strip()[:4])}.*' starts with '{re.escape(start)}', which a "
                rf"spreadsheet \(Excel, LibreOffice\) opening a CSV export reads as a formula and runs; leave the "
                rf"'{re.escape(start)}' out, give e\.g\. ")):
            check_name(name, what)
    assert check_name("Naja =haje-1", what) == "Naja =haje-1"  # inside a name, no cell starts with it
    with pytest.raises(ValueError, match="has no letters or digits"):
        check_name("-", what)


def test_a_backslash_is_refused_in_a_taxon_name_like_a_slash():
    """Walk s53 hostile #11: 'Naja\\haje' was created (a path separator on Windows exports)."""
    for what in ("species name", "genus", "family", "class folder name"):
        with pytest.raises(ValueError) as refused:
            check_name("Naja\\haje", what)
        assert str(refused.value).startswith(
            f"the {what} 'Naja\\\\haje' cannot contain '\\' (a path separator on Windows); give e.g. "), refused.value
    assert check_name("Cobra \\ naja", "common name") == "Cobra \\ naja"  # a common name is no path, as with '/'


def test_a_homoglyph_names_the_letter_that_is_not_latin(built, tmp_path, capsys):
    """Walk s53 hostile #10: 'Naja hаje' (a Cyrillic 'а') was refused as "not written as a scientific name", which
    reads as nonsense: it looks exactly like 'Naja haje'. The refusal names the letter; an accent is no lookalike."""
    from index.taxonomy import SpeciesNameConflictError, new_species_references

    index, _ = built
    photo = _photo(tmp_path / "h.png", 70)
    code, _, err = _run(capsys, "references", "add", "--index", index, "--species", "Natrix h\u0430je", photo,
                        *ENCODER)
    assert code == 2 and err.endswith(
        "'Natrix h\u0430je' is not written as a scientific name: '\u0430' (U+0430 CYRILLIC SMALL LETTER A) where a "
        "Latin letter is expected ('Genus species': a capitalised genus, then one or two lower-case epithets; e.g. "
        "'Naja haje' or 'Parus major'): type the name again in Latin letters, or give --new-species if "
        "'Natrix h\u0430je' is a new species\n"), err
    with _client(index) as c:
        resp = c.post("/v1/species/Natrix h\u0430je/references", headers={"X-API-Key": "k"},
                      files=[("images", ("h.png", photo.read_bytes(), "image/png"))])
        assert resp.status_code == 409 and resp.json()["detail"].startswith(
            "'Natrix h\u0430je' is not written as a scientific name: '\u0430' (U+0430 CYRILLIC SMALL LETTER A) where "
            "a Latin letter is expected"), resp.text
    with pytest.raises(SpeciesNameConflictError, match=r"'\uff48' \(U\+FF48 FULLWIDTH LATIN SMALL LETTER H\) where "
                                                       r"a plain Latin letter is expected"):
        new_species_references("Natrix \uff48aje", [], ["a.jpg"], dataset="api")
    with pytest.raises(SpeciesNameConflictError) as refused:  # an accent is seen: no letter named
        new_species_references("Vip\u00e8re aspic", [], ["a.jpg"], dataset="api")
    assert "U+" not in str(refused.value) and "give the species' scientific name" in str(refused.value)


def test_the_api_and_the_cli_refuse_an_undecodable_or_formula_name_even_confirmed(built, tmp_path, capsys):
    """Walk s53 hostile #7, #4, #11: 'Naja%FFhaje' with new_species=true was stored as 'Naja\ufffdhaje' (201), and
    '=1+1', '@SUM(1+1)' and '-2+3' were created by the CLI and the API, with any common name."""
    index, _ = built
    data = _photo(tmp_path / "f.png", 71).read_bytes()
    keys = {"X-API-Key": "k"}
    with _client(index) as c:
        for path, why in (("Naja%FFhaje", "is not valid text (U+FFFD, the replacement character: the name was not "
                                          "valid UTF-8)"),
                          ("%3D1%2B1", "starts with '=', which a spreadsheet"),
                          ("@SUM(1+1)", "starts with '@', which a spreadsheet"),
                          ("Naja%5Chaje", "cannot contain '\\' (a path separator on Windows)")):
            resp = c.post(f"/v1/species/{path}/references", files=[("images", ("f.png", data, "image/png"))],
                          data={"new_species": "true"}, headers=keys)
            assert resp.status_code == 422 and why in resp.json()["detail"], (path, resp.text)
        resp = c.post("/v1/species/Testus novus/references", files=[("images", ("f.png", data, "image/png"))],
                      data={"new_species": "true", "common_name": "=HYPERLINK(\"x\")"}, headers=keys)
        assert resp.status_code == 422 and resp.json()["detail"].startswith(
            "the common name '=HYPERLINK(\"x\")' starts with '='"), resp.text
    photo = tmp_path / "f.png"
    code, _, err = _run(capsys, "references", "add", "--index", index, "--species=-2+3", "--new-species", photo,
                        *ENCODER)
    assert code == 2 and "the species name '-2+3' starts with '-', which a spreadsheet" in err, err
    for option in ("--genus", "--family"):
        code, _, err = _run(capsys, "references", "add", "--index", index, "--species", "Testus novus",
                            "--new-species", f"{option}=+x", photo, *ENCODER)
        assert code == 2 and f"the {option[2:]} '+x' starts with '+'" in err, err
    assert {s.species for s in Gallery.open(index).species()} == {"Natrix maura", "Naja samarensis"}  # none made


def test_a_folder_build_skips_a_folder_whose_name_starts_a_formula_naming_it(tmp_path, capsys, caplog):
    """Walk s53 hostile #4: class folders '=SUM(A1:A2)', '+cmd', '@x' became species with no confirmation."""
    root = tmp_path / "photos"
    folders = ("=SUM(A1:A2)", "+cmd", "=cmd (Naja haje)", "Naja\\haje", "Natrix maura")
    for i, folder in enumerate(folders):
        _photo(root / folder / f"{i}.png", 80 + i)
    with caplog.at_level(logging.WARNING):
        code, _, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index",
                            tmp_path / "g", *ENCODER, "-q")
    assert code == 0, err
    assert [s.species for s in Gallery.open(tmp_path / "g").species()] == ["Natrix maura"]
    said = caplog.text
    for folder, why in (("=SUM(A1:A2)", "the class folder name '=SUM(A1:A2)' starts with '='"),
                        ("+cmd", "the class folder name '+cmd' starts with '+'"),
                        ("=cmd (Naja haje)", "the common name '=cmd' starts with '='"),
                        ("Naja\\haje", "cannot contain '\\' (a path separator on Windows)")):
        assert f"folder {folder!r} skipped: " in said and why in said, (folder, said)


def test_a_gallery_holding_a_formula_name_from_before_still_opens_and_takes_photos(tmp_path, capsys, monkeypatch):
    """A gallery built before the formula rule may hold '=1+1': it opens, lists, identifies, and an add joins the
    species it holds (its CSV cells are the CSV writers' to escape); a new one is refused."""
    from _cli_support import folder_gallery

    monkeypatch.setattr("index.taxonomy.FORMULA_STARTS", (), raising=False)  # the rule of before
    index = folder_gallery(tmp_path, capsys, ("=1+1", "Natrix maura"))
    monkeypatch.undo()
    assert {s.species for s in Gallery.open(index).species()} == {"=1+1", "Natrix maura"}
    code, out, err = _run(capsys, "species", "list", "--index", index, "--format", "csv")
    assert code == 0 and "=1+1" in out, (out, err)
    code, out, err = _run(capsys, "identify", "--index", index, tmp_path / "photos" / "=1+1" / "0.png", *ENCODER)
    assert code == 0 and "=1+1" in out, (out, err)
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "=1+1",
                          _photo(tmp_path / "n.png", 72), *ENCODER)
    assert code == 0 and "=1+1 (existing species)" in out, (out, err)
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "=2+2", "--new-species",
                          _photo(tmp_path / "m.png", 73), *ENCODER)
    assert code == 2 and "the species name '=2+2' starts with '='" in err, err
