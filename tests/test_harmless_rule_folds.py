"""The harmless flag's rule (index.taxonomy.check_harmless_flag) against names that fold alike (re-read s53 w1-index
#1, #2, #5, #8, #9): a fold-twin of a gallery's venomous species is another species, not its own; full-width letters
fold (NFKC) in the shipped taxonomy's half too; every common name a species' references carry is looked at; a genus
all of whose species are venomous asks for the confirmation."""

from __future__ import annotations

import pytest

from index.store import SpeciesSummary
from index.taxonomy import (
    DISTINCT_OPTION,
    check_harmless_flag,
    find_species,
    gallery_lookalikes,
    new_species_references,
)


def _held(species: str, common: str | None, venomous: bool | None, count: int = 5) -> SpeciesSummary:
    return SpeciesSummary(species, species.split()[0], None, common, venomous, count)


def test_a_fold_twin_of_a_gallery_venomous_species_is_refused_harmless_without_the_confirmation():
    """'Elaps tachete' (a new species, --new-species) beside the venomous 'Élaps tacheté' was skipped as 'its own
    species' and stored harmless, where a farther spelling was refused."""
    held = [_held("Élaps tacheté", "Tacheté du sud", True)]
    with pytest.raises(ValueError, match=r"^'Elaps tachete' may be 'Élaps tacheté', which this gallery records as "
                                         r"medically important venomous: 'Elaps tachete' is its name"):
        new_species_references("Elaps tachete", held, ["a.jpg"], dataset="added", venomous=False, new_species=True)
    name, records, prior = new_species_references("Elaps tachete", held, ["a.jpg"], dataset="added",
                                                  venomous=False, new_species=True, distinct_from_venomous=True)
    assert (name, records[0].venomous, prior) == ("Elaps tachete", False, None)
    # set-venom: the gallery holds both; 'Elaps tachete' set no is refused, its own twin is no cover
    both = [*held, _held("Elaps tachete", None, None, 2)]
    found = find_species(both, "elaps tachete", folded=True)
    assert found is not None and found.species == "Elaps tachete"
    with pytest.raises(ValueError, match=DISTINCT_OPTION):
        check_harmless_flag(found.species, found.common_name, gallery_species=both)
    check_harmless_flag("Élaps tacheté", gallery_species=both)  # its own species: its flag is its own to change


@pytest.mark.parametrize("gallery", [[], [_held("Bitis arietans", "Puff adder", True)]])
def test_full_width_letters_fold_in_both_halves_of_the_rule(gallery):
    """'Ｂｉｔｉｓ ａｒｉｅｔａｎｓ' (full-width Latin) was stored harmless, in an empty gallery (the shipped taxonomy
    matched without NFKC) and beside the gallery's venomous 'Bitis arietans' (a fold-twin skipped)."""
    with pytest.raises(ValueError, match=r"may be 'Bitis arietans'") as refused:
        new_species_references("Ｂｉｔｉｓ ａｒｉｅｔａｎｓ", gallery, ["a.jpg"], dataset="added", venomous=False,
                               new_species=True)
    if not gallery:
        assert "is its name (case, accents, full-width letters aside)" in str(refused.value), str(refused.value)


def test_a_lookup_of_two_fold_twins_finds_none_and_suggests_both():
    held = [_held("Élaps tacheté", None, True), _held("Elaps tachéte", None, None, 2)]
    assert find_species(held, "ELAPS TACHETE", folded=True) is None  # two fold so: neither is taken
    same_common, close = gallery_lookalikes(held, "ELAPS TACHETE")
    assert same_common == [] and [s.species for s in close] == ["Élaps tacheté", "Elaps tachéte"], close


def test_every_common_name_of_the_species_references_is_looked_at():
    """The kind-word and name checks looked at the one common name a summary shows: a label showing 'Sand snake'
    whose references also carry 'Vipère des sables', or a gallery venomous species' common name, was set no."""
    commons = {"Serpent des sables": ["Sand snake", "Vipère des sables"]}
    with pytest.raises(ValueError, match=r"'Serpent des sables' \('Vipère des sables'\) holds 'vipère'"):
        check_harmless_flag("Serpent des sables", "Sand snake", common_names=commons)
    held = [_held("Zus venenatus", "Serpent de Tiznit", True), _held("Xus mitis", "Little snake", None)]
    commons = {"Xus mitis": ["Little snake", "Serpent de Tiznit"]}
    with pytest.raises(ValueError, match=r"may be 'Zus venenatus'.*'Serpent de Tiznit' is its common name"):
        check_harmless_flag("Xus mitis", "Little snake", gallery_species=held, common_names=commons)
    check_harmless_flag("Xus mitis", "Little snake", gallery_species=held, common_names=commons, distinct=True)
    check_harmless_flag("Xus mitis", "Little snake", gallery_species=held)  # no other name: nothing to refuse


def test_a_genus_all_of_whose_species_are_venomous_asks_for_the_confirmation():
    """Re-read #9: 'Vipera nova', 'Bitis nova', 'Echis nova' (a species the shipped taxonomy does not list, of a
    genus all of whose species there are venomous) were set harmless with no confirmation."""
    from index.taxonomy import venomous_genus

    for name, genus in (("Vipera nova", "Vipera"), ("Bitis nova", "Bitis"), ("Echis nova", "Echis"),
                        ("Daboia nova", "Daboia"), ("Crotalus zzz", "Crotalus")):
        assert venomous_genus(name)[0].genus == genus
        with pytest.raises(ValueError, match=rf"^'{name}' may be '{genus} [a-z]+', medically important venomous in "
                                             rf"the shipped taxonomy \(SnakeCLEF's list\): '{name}' is of the genus "
                                             rf"'{genus}', all \d+ of whose species .*{DISTINCT_OPTION}"):
            check_harmless_flag(name)
        check_harmless_flag(name, distinct=True)
    assert venomous_genus("Malpolon nova") is None and venomous_genus("Malpolon monspessulanus") is None
    check_harmless_flag("Malpolon nova")  # a genus with harmless species: nothing refused
    # the gallery's half: a genus all of whose species the gallery holds are recorded venomous
    held = [_held("Xus venenatus", None, True)]
    with pytest.raises(ValueError, match=r"may be 'Xus venenatus'.*'Xus mitis' is of its genus, all of whose 1 "
                                         r"species this gallery holds are recorded venomous"):
        check_harmless_flag("Xus mitis", gallery_species=held)
    check_harmless_flag("Xus mitis", gallery_species=[*held, _held("Xus alius", None, False)])


def test_moroccan_checks_a_folder_common_name_as_the_folder_dataset_does(tmp_path):
    """Re-read #3: '--dataset moroccan' stored a folder's common name unchecked ('=cmd', a bidi override, U+FFFD, a
    typographic apostrophe), where '--dataset folder' skips the folder or stores the apostrophe as "'": one check."""
    from _cli_support import _photo

    from index.datasets import load_dataset

    names = ("=cmd (Naja haje)", "Cobra\u202eetpygE (Cerastes cerastes)", "Vipère\ufffd (Daboia mauritanica)",
             "Couleuvre d\u2019Afrique (Malpolon monspessulanus)", "Naja-haje")
    for i, name in enumerate(names):
        _photo(tmp_path / "m" / name / f"{i}.png", i)
    scan = load_dataset("moroccan", tmp_path / "m")
    commons = {(r.species, r.common_name) for r in scan.records}
    assert commons == {("Naja haje", "Egyptian cobra"),  # the checklist's: '=cmd' skipped
                       ("Malpolon monspessulanus", "Couleuvre d'Afrique")}, commons
    for name in names[:3]:
        assert any(w.startswith(f"folder {name!r} skipped: the common name") for w in scan.warnings), scan.warnings


def test_a_label_keeps_a_given_genus_the_shipped_taxonomy_knows_at_genus_rank():
    """Re-read #4: 'Bitis arietans (juvenile)' with the manifest's genus 'Bitis' was its own group at --rank genus
    (a stored genus equal to the label's first word was dropped), splitting a venomous genus' score."""
    from index.records import rank_genus
    from index.streamed import make_record

    record = make_record({"species": "Bitis arietans (juvenile)", "genus": "Bitis"}, "a.jpg", "manifest")
    assert record.genus == "Bitis" and rank_genus(record.species, record.genus) == "Bitis"
    assert rank_genus("Echis leucogaster?", "Echis") == "Echis"
    assert rank_genus("Samar cobra", "Naja") == "Naja"  # another word: held, as before
    assert rank_genus("Vipère à cornes", "Vipère") == "Vipère à cornes"  # a build's first word: its own group
    assert rank_genus("Golden Retriever Dogs", "Golden") == "Golden Retriever Dogs"
    assert rank_genus("Vipère à cornes", None) == "Vipère à cornes"
    assert rank_genus("Bitis arietans", "Bitis") == "Bitis"
    # another taxon's genus as a label's first word is no genus the snake taxonomy knows: a build's first word
    assert rank_genus("Parus major (juvenile)", "Parus") == "Parus major (juvenile)"


def test_an_answer_groups_labels_at_genus_rank_by_rank_genus(tmp_path):
    """An answer's genus scores go through rank_genus: two labels of a gallery built before labels kept no genus
    (each stored with its first word, 'Vipère', as genus) stay two groups; a genus the taxonomy knows is summed
    (walk s55, M47: the stored genus was summed as it is)."""
    import numpy as np
    from _cli_support import DIM, ENC, FakeEncoder

    from index.gallery import Gallery
    from index.records import ReferenceRecord
    from retrieval.identify import Identifier

    rng = np.random.default_rng(0)
    g = Gallery.create(tmp_path / "g", ENC)
    centre = rng.standard_normal(DIM)
    names = {"Vipère aspic": "Vipère", "Vipère péliade": "Vipère", "Bitis arietans": None, "Bitis gabonica": None}
    for n, (name, genus) in enumerate(names.items()):
        x = centre + 0.5 * rng.standard_normal((3, DIM))
        g.add([ReferenceRecord(path=f"/p/{n}{i}.jpg", species=name, genus=genus) for i in range(3)],
              [f"{n}-{i}" for i in range(3)], (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    assert {s.species: s.genus for s in g.species()}["Vipère aspic"] == "Vipère"  # stored so, as before
    ident = Identifier(FakeEncoder(), g)
    ident.config = type(ident.config)(k=12, temperature=1.0)  # every reference votes: all four species score
    (answer,) = ident.identify_embeddings((centre / np.linalg.norm(centre))[None])
    s = answer.scores
    assert len(s) == 4 and answer.genus_scores == pytest.approx({
        "Vipère aspic": s["Vipère aspic"], "Vipère péliade": s["Vipère péliade"],
        "Bitis": s["Bitis arietans"] + s["Bitis gabonica"]})


def test_a_name_check_reads_the_species_and_their_common_names_of_one_version_once(tmp_path, capsys, monkeypatch):
    """Re-read #6: the add's name check asked the store for its version twice (the list, then its common names),
    and a server (stale_reads) asked it once where it asks none: names and list of one version, one read at most."""
    from _cli_support import folder_gallery

    from index.gallery import Gallery
    from index.store import ReferenceStore
    from retrieval.workflows import check_new_references

    index = folder_gallery(tmp_path, capsys, ("Cobra d'Égypte (Naja haje)", "Natrix maura"))
    gallery = Gallery.open(index)
    asked: list[int] = []
    version = ReferenceStore.version
    monkeypatch.setattr(ReferenceStore, "version", property(lambda store: asked.append(1) or version.fget(store)))
    check_new_references(gallery, "Naja haje", common_name="cobra d'egypte")
    assert len(asked) == 1, asked  # a command: the table's version, asked once
    gallery.stale_reads = True  # a server: the index's version, no round trip
    asked.clear()
    check_new_references(gallery, "Naja haje", common_name="cobra d'egypte")
    assert asked == [], asked
    held, names = gallery.species_names()
    assert [s.species for s in held] == ["Naja haje", "Natrix maura"] and names["Naja haje"] == ["Cobra d'Égypte"]


def test_a_qualifier_in_front_does_not_hide_a_venomous_genus():
    """Re-read w3 #4: the genus rules looked at the first word only: 'cf. Bitis nova', '?Bitis nova', '(Bitis) nova',
    'juvenile Bitis nova', 'Echis.nova' (and 'cf. Xus nova' beside a gallery's venomous Xus) were set harmless."""
    from index.taxonomy import venomous_genus

    for name, genus in (("cf. Bitis nova", "Bitis"), ("?Bitis nova", "Bitis"), ("(Bitis) nova", "Bitis"),
                        ("juvenile Bitis nova", "Bitis"), ("Echis.nova", "Echis"), ("aff. Daboia nova", "Daboia")):
        assert venomous_genus(name)[0].genus == genus, name
        with pytest.raises(ValueError, match=rf"is of the genus '{genus}', all \d+ of whose species"):
            check_harmless_flag(name)
        check_harmless_flag(name, distinct=True)
    # an epithet after a genus of the taxonomy is no genus: no false refusal of a harmless species
    assert venomous_genus("Lycodon nova") is None and venomous_genus("Malpolon naja") is None
    check_harmless_flag("cf. Malpolon nova")
    held = [_held("Xus venenatus", None, True)]
    for name in ("cf. Xus nova", "Xus.nova", "(Xus) nova"):
        with pytest.raises(ValueError, match=r"may be 'Xus venenatus'.*is of its genus, all of whose 1 species"):
            check_harmless_flag(name, gallery_species=held)


def test_an_unrecorded_species_does_not_break_the_gallery_genus_rule():
    """Re-read w3 #3: one venomous and one unrecorded species in the gallery's genus: 'Xus nova' was set harmless
    (an unrecorded species counted as harmless; answers take it as possibly venomous). A recorded harmless one
    still breaks the rule."""
    held = [_held("Xus venenatus", None, True), _held("Xus ignotus", None, None)]
    with pytest.raises(ValueError, match=r"may be 'Xus venenatus'.*'Xus nova' is of its genus, "
                                         r"all of whose 2 species "
                                         r"this gallery holds are recorded venomous or not recorded \(1\)"):
        check_harmless_flag("Xus nova", gallery_species=held)
    check_harmless_flag("Xus nova", gallery_species=[*held, _held("Xus mitis", None, False)])
    check_harmless_flag("Xus nova", gallery_species=[_held("Xus ignotus", None, None)])  # none venomous: no rule


def test_the_gallery_genus_rule_stops_at_the_names_own_genus():
    """Final re-read #1: the gallery's genus rule took every word of the name for a genus, so the harmless Lycodon
    ophiophagus (listed harmless in the shipped taxonomy) was refused beside a gallery's venomous Ophiophagus hannah,
    told it "is of its genus". The words after the name's genus (one the taxonomy or the gallery knows) are
    epithets, as the shipped rule already took them; a qualifier in front still does not hide the genus."""
    from index.taxonomy import genus_words

    held = [_held("Ophiophagus hannah", None, True)]
    check_harmless_flag("Lycodon ophiophagus", gallery_species=held)
    assert genus_words("Lycodon ophiophagus", {"lycodon"}) == ["lycodon"]
    assert genus_words("cf. Xus nova", {"xus"}) == ["cf", "xus"]
    with pytest.raises(ValueError, match=r"may be 'Ophiophagus hannah'.*is of its genus"):
        check_harmless_flag("cf. Ophiophagus nova", gallery_species=held)
    # a gallery genus the taxonomy does not know ends the genus words too: "Yus xus" is of Yus, not of Xus
    check_harmless_flag("Yus xus", gallery_species=[_held("Xus venenatus", None, True),
                                                    _held("Yus mitis", None, False)])


def test_the_gallery_genus_rule_leaves_a_species_the_taxonomy_lists_harmless():
    """A gallery holding only the venomous Rhabdophis subminiatus of its genus asked for --distinct-from-venomous to
    record the keelback Rhabdophis nigrocinctus harmless, which the shipped taxonomy lists as not medically important
    (as the shipped genus rule already took a listed name); a species it does not list still needs it."""
    held = [_held("Rhabdophis subminiatus", None, True)]
    check_harmless_flag("Rhabdophis nigrocinctus", gallery_species=held)
    with pytest.raises(ValueError, match=r"may be 'Rhabdophis subminiatus'.*is of its genus"):
        check_harmless_flag("Rhabdophis nova", gallery_species=held)
