"""Tests for index.geography against the real generated table index/data/snake_countries.csv."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from index.geography import COUNTRIES_CSV, country_presence, resolve_country

MOROCCAN_CSV = Path(__file__).resolve().parents[1] / "index" / "data" / "moroccan.csv"
#: Checklist species the SnakeCLEF 2021 table does not mark present in Morocco (measured).
MOROCCAN_ABSENT_FROM_MA = {"Echis pyramidum", "Natrix astreptophora"}


def _moroccan_species() -> list[str]:
    with MOROCCAN_CSV.open(newline="", encoding="utf-8") as fh:
        return [row["species"] for row in csv.DictReader(fh)]


@pytest.mark.parametrize("text", ["MA", "ma", "Morocco", "morocco", " MOROCCO ", "MAR", "mar"])
def test_morocco_resolves(text: str) -> None:
    assert resolve_country(text) == "MA"


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("PH", "PH"),
        ("Philippines", "PH"),
        ("usa", "US"),
        ("United States", "US"),
        ("Ivory Coast", "CI"),
        ("Côte d'Ivoire", "CI"),
        ("cote d'ivoire", "CI"),
        ("Turkey", "TR"),
        ("burma", "MM"),
        ("Kosovo", "XK"),
        ("guinea-bissau", "GW"),
        ("DEU", "DE"),
    ],
)
def test_other_countries_resolve(text: str, code: str) -> None:
    assert resolve_country(text) == code


def test_every_alias_is_written_as_a_looked_up_name_is() -> None:
    """An alias key not in ``_country_key``'s form (``st kitts and nevis``, once ``st`` became ``saint``) is never
    matched; the island names birders write ``St Kitts`` / ``St Vincent`` resolve."""
    from index.geography import COUNTRY_ALIASES, _country_key

    assert [key for key in COUNTRY_ALIASES if _country_key(key) != key] == []
    assert [resolve_country(t) for t in ("St Kitts", "St. Vincent", "Saint Kitts and Nevis")] == ["KN", "VC", "KN"]


@pytest.mark.parametrize(("text", "code"), [
    ("Saint Helena", "SH"), ("St. Helena", "SH"), ("St Martin", "MF"), ("Saint Martin", "MF"), ("St Barts", "BL"),
    ("St. Barths", "BL"), ("Sint Maarten", "SX"), ("St Kitts & Nevis", "KN"), ("Trinidad & Tobago", "TT"),
    ("Trinidad&Tobago", "TT"), ("Bosnia & Herzegovina", "BA"), ("Antigua & Barbuda", "AG"), ("ST", "ST"),
])
def test_island_names_and_an_ampersand_resolve(text: str, code: str) -> None:
    """pycountry's names carry words people leave out (``Saint Helena, Ascension and Tristan da Cunha``, ``Saint
    Martin (French part)``) and spell ``and`` where they write ``&``: these were refused (re-read w2 #10)."""
    assert resolve_country(text) == code


@pytest.mark.parametrize("text", ["Xyz", "ZZ", "", "Atlantis"])
def test_unknown_country_raises(text: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        resolve_country(text)
    message = str(excinfo.value)
    assert message.startswith(f"unknown country {text!r}: ")
    assert "give an ISO 3166 code such as MA or a name such as Morocco" in message


def test_unknown_country_suggests_close_match() -> None:
    with pytest.raises(ValueError, match=r"did you mean .*Morocco \(MA\)"):
        resolve_country("Marocco")
    with pytest.raises(ValueError, match=r"unknown country"):
        country_presence("Marocco")


def test_table_shape() -> None:
    with COUNTRIES_CSV.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["species", "countries"]
        rows = list(reader)
    species = [row["species"] for row in rows]
    assert len(rows) > 3000
    assert species == sorted(species) and len(set(species)) == len(species)
    for row in rows:
        codes = row["countries"].split(";") if row["countries"] else []
        assert codes == sorted(set(codes))
        assert all(len(code) == 2 and code.isupper() for code in codes), row


def test_presence_covers_every_species() -> None:
    presence = country_presence("MA")
    assert len(presence) == len(country_presence("Philippines"))
    assert all(isinstance(value, bool) for value in presence.values())
    assert presence["Daboia mauritanica"] is True
    assert presence["Naja haje"] is True
    assert presence["Naja philippinensis"] is False
    assert country_presence("PH")["Naja philippinensis"] is True
    assert country_presence("ma") == presence


def test_moroccan_species_present_in_morocco() -> None:
    moroccan = _moroccan_species()
    assert len(moroccan) == 26
    presence = country_presence("Morocco")
    assert all(presence[name] for name in moroccan)  # the checklist fills the table's two gaps
    with COUNTRIES_CSV.open(newline="", encoding="utf-8") as fh:
        table = {row["species"]: row["countries"].split(";") for row in csv.DictReader(fh)}
    assert {name for name in moroccan if "MA" not in table[name]} == MOROCCAN_ABSENT_FROM_MA
    assert presence["Echis pyramidum"] and country_presence("EG")["Echis pyramidum"]


def test_country_presence_of_single_species() -> None:
    """What ``identify --country`` reads (retrieval.workflows): presence by the table's species names."""
    morocco, egypt, philippines = (country_presence(c) for c in ("MA", "Egypt", "ph"))
    assert morocco["Daboia mauritanica"]
    assert morocco["Naja haje"] and egypt["Naja haje"]
    assert philippines["Naja philippinensis"] and not morocco["Naja philippinensis"] and not egypt["Naja philippinensis"]
    # Rows the source splits by a trailing space / misspelling are merged (Northern Cyprus -> CY).
    assert country_presence("CY")["Dolichophis jugularis"]
    for name in ("Hemorhois nummifer", "Naja nonexistens", "", "Naja"):  # not in the table: no answer either way
        assert name not in morocco


@pytest.mark.parametrize(("text", "code"), [
    ("Maroc", "MA"), ("maroc", "MA"), ("Royaume du Maroc", "MA"), ("المغرب", "MA"), ("المملكة المغربية", "MA"),
    ("Algérie", "DZ"), ("Algerie", "DZ"), ("الجزائر", "DZ"), ("الجزاير", "DZ"), ("Tunisie", "TN"), ("تونس", "TN"),
    ("Libye", "LY"), ("ليبيا", "LY"), ("Égypte", "EG"), ("Egypte", "EG"), ("مصر", "EG"), ("Mauritanie", "MR"),
    ("موريتانيا", "MR"), ("Mali", "ML"), ("مالي", "ML"), ("Niger", "NE"), ("النيجر", "NE"), ("Tchad", "TD"),
    ("تشاد", "TD"), ("Soudan", "SD"), ("السودان", "SD"), ("Sénégal", "SN"), ("Senegal", "SN"), ("السنغال", "SN"),
    ("Sahara occidental", "EH"), ("الصحراء الغربية", "EH"),
])
def test_french_and_arabic_country_names_resolve(text: str, code: str) -> None:
    """Walk s53 phone #6: 'Maroc', 'المغرب' and 'Royaume du Maroc' were unknown countries, with no suggestion."""
    assert resolve_country(text) == code


@pytest.mark.parametrize(("text", "meant"), [("Marok", "Maroc (MA)"), ("Royaume du Marok", "Royaume du Maroc (MA)"),
                                             ("لمغرب", "المغرب (MA)"), ("Tunisi", "Tunisie (TN)")])
def test_a_near_miss_of_a_french_or_arabic_name_says_what_was_meant(text: str, meant: str) -> None:
    with pytest.raises(ValueError, match=rf"^unknown country .*\(did you mean {re.escape(meant)}\?\)$"):
        resolve_country(text)
