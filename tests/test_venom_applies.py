"""Venom advice on every gallery unless it records that it gives none (retrieval.advice.venom_applies: gallery.json's
``venom_advice``, set by ``index build --no-venom-advice`` or ``index venom-advice off``): never guessed from names.
Stop 52 made it a name heuristic, which left snakes named by common names ("Puff adder") or by genera the 2021
taxonomy lacks (``Cryptelytrops``) with no advice on far and unknown answers (re-read w1 #1, #2, #8)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _cli_support import DIM, ENC, ENCODER, FakeEncoder, _photo, _run, two_species_gallery
from PIL import Image

from index.gallery import Gallery
from index.records import ReferenceRecord
from index.store import SpeciesSummary
from retrieval.advice import FAR_TEXT, UNKNOWN_TEXT
from retrieval.identify import Identifier
from retrieval.vote import VoteConfig

BIRD_FOLDERS = ("Common Raven (Corvus corax)", "House Sparrow (Passer domesticus)")
NOT_RECORDED = "Venom status not recorded for "
HINT = "none of this gallery's species is in the shipped snake taxonomy"


def _gallery(tmp_path, species: dict[str, dict]) -> tuple[Gallery, np.ndarray]:
    """A gallery of 6 references of each species (``species``: name -> the records' other fields) around its own
    centre (spread so that they are not near-copies of each other: cosine ~0.9); with the first species' centre."""
    rng = np.random.default_rng(5)
    g = Gallery.create(tmp_path / "g", ENC)
    first = None
    for name, fields in species.items():
        centre = rng.standard_normal(DIM)
        first = centre if first is None else first
        x = centre + 0.4 * rng.standard_normal((6, DIM))
        g.add([ReferenceRecord(path=f"/photos/{name}/{i}.jpg", species=name, **fields) for i in range(6)],
              [f"{name}-{i}" for i in range(6)], (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    return g, first / np.linalg.norm(first)


def _far_and_unknown(g: Gallery, centre: np.ndarray):
    """A far answer (the photo opposite every reference) and an unknown one (at a species' centre, every
    reference voting alike: no species reaches the unknown threshold)."""
    ident = Identifier(FakeEncoder(), g)
    (far,) = ident.identify_embeddings((-centre)[None].astype(np.float32))
    ident.config = VoteConfig(k=len(g), temperature=1000.0, unknown_threshold=0.9)
    (unknown,) = ident.identify_embeddings(centre[None].astype(np.float32))
    assert far.far and far.unknown, far.nearest
    assert unknown.unknown and not unknown.far
    return far, unknown


def _assert_cautious(far, unknown) -> None:
    assert far.venom_applies and far.venom_advice.text == FAR_TEXT and far.venom_advice.treat_as_venomous
    # every species unrecorded: the unknown answer's whole mass warns as unrecorded, before 'cannot tell'
    assert unknown.venom_applies and unknown.venom_advice.treat_as_venomous
    assert unknown.venom_advice.text == UNKNOWN_TEXT or unknown.venom_advice.text.startswith(NOT_RECORDED)


def _folder_gallery(tmp_path, capsys, folders, *extra) -> tuple:
    """A gallery built from a plain folder (``index build --dataset folder``): (its folder, the build's stdout)."""
    root = tmp_path / "photos"
    for i in range(6):
        _photo(root / folders[i % len(folders)] / f"{i}.png", i)
    index = tmp_path / "g"
    code, out, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", index,
                          *ENCODER, *extra, "-q")
    assert code == 0, err
    return index, out


def _blank(tmp_path):
    blank = tmp_path / "white.png"
    Image.new("RGB", (64, 48), "white").save(blank)
    return blank


def _far_json(capsys, index, photo) -> dict:
    code, out, err = _run(capsys, "identify", "--index", index, photo, "--format", "json", "-q")
    assert code == 0, (out, err)
    (answer,) = json.loads(out)
    assert answer["far"], answer["nearest_similarity"]
    return answer


# ------------------------------------------------------------------------- snakes named in ways no table knows
@pytest.mark.parametrize("folders", [("Puff adder", "Moorish viper"), ("Egyptian cobra", "Saharan horned viper")])
def test_snakes_under_common_names_get_the_safe_advice_far_and_unknown(tmp_path, capsys, folders):
    """Re-read w1 #1: folders named by sentence-case common names read as scientific names of no snake genus, and
    the gallery got no venom advice at all, far and unknown answers included."""
    index, _ = _folder_gallery(tmp_path, capsys, folders)
    blank = _blank(tmp_path)
    answer = _far_json(capsys, index, blank)
    assert answer["venom_applies"] is True and answer["venom_advice"]["text"] == FAR_TEXT, answer
    photo = tmp_path / "photos" / folders[0] / "0.png"
    code, out, err = _run(capsys, "identify", "--index", index, photo, "--format", "json", "--unknown-threshold",
                          "0.999999", "-q")
    (answer,) = json.loads(out)
    assert code == 0 and answer["unknown"] and answer["venom_advice"]["treat_as_venomous"], (out, err)
    assert answer["venom_advice"]["text"].startswith(NOT_RECORDED), answer  # the whole mass: unrecorded
    code, out, err = _run(capsys, "identify", "--index", index, blank, "-q")
    assert code == 0 and "treat the bite as venomous" in out, out


@pytest.mark.parametrize("names", [("Cryptelytrops albolabris", "Popeia popeiorum"),
                                   ("Viridovipera stejnegeri", "Pelamis platura")])
def test_snakes_of_genera_the_taxonomy_lacks_get_the_safe_advice(tmp_path, names):
    """Re-read w1 #2: pit vipers and a sea snake under genera the 2021 table lacks got no advice at all."""
    g, centre = _gallery(tmp_path, {s: {} for s in names})
    _assert_cautious(*_far_and_unknown(g, centre))


# ---------------------------------------------------------------------------------- the recorded declaration
def test_a_gallery_of_birds_gets_the_advice_until_it_is_turned_off(tmp_path, capsys):
    """Safe by default: birds get the advice (and the build's hint how to turn it off) until 'index venom-advice
    off' records otherwise; then the CLI says nothing of venom; 'on' brings it back."""
    index, out = _folder_gallery(tmp_path, capsys, BIRD_FOLDERS)
    assert f"note: {HINT}" in out and f"'speciesid index venom-advice --index {index} off'" in out, out
    blank = _blank(tmp_path)
    assert _far_json(capsys, index, blank)["venom_advice"]["text"] == FAR_TEXT
    code, out, err = _run(capsys, "index", "venom-advice", "--index", index)
    assert code == 0 and out.startswith(f"gallery {index}: venom advice on\n"), (out, err)
    code, out, err = _run(capsys, "index", "venom-advice", "--index", index, "off")
    assert code == 0 and out.strip() == f"gallery {index}: venom advice on -> off", (out, err)
    assert json.loads((index / "gallery.json").read_text())["venom_advice"] is False
    answer = _far_json(capsys, index, blank)
    assert answer["venom_advice"] is None and answer["venom_applies"] is False, answer
    code, out, err = _run(capsys, "identify", "--index", index, blank, "-q")
    assert code == 0 and "venom" not in out.lower(), out
    info = json.loads(_run(capsys, "index", "info", "--index", index)[1])
    assert info["venom_advice"] == {"on": False, "note": ""}, info["venom_advice"]
    code, out, err = _run(capsys, "index", "venom-advice", "--index", index, "on")
    assert code == 0 and out.startswith(f"gallery {index}: venom advice off -> on"), (out, err)
    assert _far_json(capsys, index, blank)["venom_advice"]["text"] == FAR_TEXT


def test_build_no_venom_advice_records_it(tmp_path, capsys):
    index, out = _folder_gallery(tmp_path, capsys, BIRD_FOLDERS, "--no-venom-advice")
    assert json.loads((index / "gallery.json").read_text())["venom_advice"] is False
    assert HINT not in out, out
    answer = _far_json(capsys, index, _blank(tmp_path))
    assert answer["venom_advice"] is None and answer["venom_applies"] is False, answer
    # a build run again without the flag keeps what the gallery records
    code, out, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", tmp_path / "photos", "--index",
                          index, *ENCODER, "-q")
    assert code == 0 and json.loads((index / "gallery.json").read_text())["venom_advice"] is False, err


def test_a_running_server_follows_the_declaration(tmp_path, capsys):
    """The API's answer and /readyz (which the page words itself by) follow 'index venom-advice' of another process
    without a restart (gallery.json read again when it changes)."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import Settings

    index, _ = _folder_gallery(tmp_path, capsys, BIRD_FOLDERS)
    blank = _blank(tmp_path)
    files = [("images", (blank.name, blank.read_bytes(), "image/png"))]
    settings = Settings(index=str(index), api_keys="secret", precision="fp32", refresh_s=0.0)
    with TestClient(create_app(settings)) as client:
        before = client.post("/v1/identify", files=files).json()
        assert before["far"] and before["venom_advice"]["text"] == FAR_TEXT and before["venom_applies"] is True
        assert client.get("/readyz").json()["venom_applies"] is True
        assert _run(capsys, "index", "venom-advice", "--index", index, "off")[0] == 0
        after = client.post("/v1/identify", files=files).json()
        assert after["venom_advice"] is None and after["venom_applies"] is False, after
        assert client.get("/readyz").json()["venom_applies"] is False
        assert _run(capsys, "index", "venom-advice", "--index", index, "on")[0] == 0
        assert client.get("/readyz").json()["venom_applies"] is True
        assert client.post("/v1/identify", files=files).json()["venom_advice"]["text"] == FAR_TEXT


def test_off_is_refused_while_a_species_is_recorded_venomous(tmp_path, capsys):
    index, _ = two_species_gallery(tmp_path, capsys)  # Naja samarensis: venomous in the shipped taxonomy
    code, out, err = _run(capsys, "index", "venom-advice", "--index", index, "off")
    assert code != 0 and (f"gallery {index} holds species recorded medically important venomous (Naja samarensis): "
                          "its answers keep venom advice whatever it records") in err, err
    assert "venom_advice" not in json.loads((index / "gallery.json").read_text())


def test_a_recorded_venomous_species_keeps_the_advice_in_a_gallery_recorded_off(tmp_path):
    """A declaration never silences a species recorded venomous (one added after the gallery was turned off)."""
    g, centre = _gallery(tmp_path, {"Corvus corax": {}, "Naja haje": {"venomous": True}})
    g.record_info("venom_advice", False)
    far, unknown = _far_and_unknown(g, centre)
    assert far.venom_applies and far.venom_advice.text == FAR_TEXT
    assert unknown.venom_applies and unknown.venom_advice.treat_as_venomous  # the cobra's half warns


def _taxon(species: str, genus: str | None = None, family: str | None = None,
           venomous: bool | None = None) -> SpeciesSummary:
    return SpeciesSummary(species, genus, family, None, venomous, 3)


def test_the_rule_and_the_hint():
    """venom_applies: the declaration (absent: on), or a species recorded venomous; names never decide. The hint:
    only for a gallery on, none of whose species the snake taxonomy knows and none recording a venom status."""
    from retrieval.advice import venom_advice_hint, venom_applies

    birds = [_taxon("Corvus corax"), _taxon("Passer domesticus")]
    off = {"venom_advice": False}
    assert venom_applies({}, birds) and venom_applies({"venom_advice": True}, birds)
    assert venom_applies({}, [_taxon("Puff adder"), _taxon("Cryptelytrops albolabris")])
    assert not venom_applies(off, birds) and not venom_applies(off, [_taxon("Natrix maura", venomous=False)])
    assert venom_applies(off, [*birds, _taxon("Naja haje", venomous=True)])
    assert HINT in venom_advice_hint({}, birds, "G")
    assert "'speciesid index venom-advice --index G off'" in venom_advice_hint({}, birds, "G")
    assert venom_advice_hint(off, birds, "G") is None
    assert venom_advice_hint({}, [*birds, _taxon("Lycodon capucinus")], "G") is None  # a snake of the taxonomy
    assert venom_advice_hint({}, [_taxon("Lycodon novus")], "G") is None  # its genus
    assert venom_advice_hint({}, [_taxon("Foo bar", family="Viperidae")], "G") is None  # its family
    assert venom_advice_hint({}, [*birds, _taxon("Parus major", venomous=False)], "G") is None  # a status recorded
    assert venom_advice_hint({}, [], "G") is None
    said = venom_advice_hint(off, [*birds, _taxon("Naja haje", venomous=True)], "G")
    assert said.startswith("this gallery records no venom advice, but it holds species recorded medically "
                           "important venomous (Naja haje)"), said


def test_no_hint_for_a_gallery_of_snakes_by_ph_snakes_names(tmp_path, capsys):
    index, out = _folder_gallery(tmp_path, capsys, ("Common Wolf Snake (Lycodon capucinus)",
                                                    "Philippine Cobra (Naja philippinensis)"))
    assert HINT not in out, out
    info = json.loads(_run(capsys, "index", "info", "--index", index)[1])
    assert info["venom_advice"] == {"on": True, "note": ""}, info["venom_advice"]


def test_index_info_gives_the_hint_for_birds(tmp_path, capsys):
    index, _ = _folder_gallery(tmp_path, capsys, BIRD_FOLDERS)
    said = json.loads(_run(capsys, "index", "info", "--index", index)[1])["venom_advice"]
    assert said["on"] is True and said["note"].startswith(HINT), said


# ------------------------------------------------------------------------------------------ a mixed gallery
def test_a_toad_beside_a_cobra_counts_as_unrecorded_until_set_venom_no(tmp_path):
    """Names decide nothing: a toad of no recorded status warns as a species of unrecorded status does (stop 52 took
    it for no snake by its name); 'species set-venom NAME no' records it harmless, the explicit way."""
    from retrieval.workflows import set_species_venomous

    g, toad = _gallery(tmp_path, {"Bufo bufo": {}, "Rana temporaria": {}, "Naja haje": {"venomous": True}})
    ident = Identifier(FakeEncoder(), g)
    q = toad[None].astype(np.float32)
    (named,) = ident.identify_embeddings(q)
    assert not named.unknown and named.predictions[0].species == "Bufo bufo", named.predictions
    assert named.venom_advice.level == "possibly_venomous" and named.venom_unknown_score > 0.5
    assert named.venom_advice.text.startswith("Venom status not recorded for Bufo bufo"), named.venom_advice.text
    set_species_venomous(g, "Bufo bufo", False)
    (after,) = ident.identify_embeddings(q)
    assert after.venom_advice.level == "unlikely" and not after.venom_advice.treat_as_venomous, after.venom_advice
    (far,) = ident.identify_embeddings((-q).astype(np.float32))
    assert far.far and far.venom_advice.text == FAR_TEXT


def test_the_add_warning_says_possibly_venomous_unless_the_gallery_gives_no_advice(tmp_path, capsys, caplog):
    """Every new species of no flag the taxonomy lacks counts as possibly venomous, and the add says so, whatever
    its name (a bird too); in a gallery of no venom advice the add says nothing of venom."""
    index, _ = _folder_gallery(tmp_path, capsys, BIRD_FOLDERS)
    warned = ("'Sylvia atricapilla' is not in the shipped snake taxonomy (snakes only) and no venomous flag was "
              "given: its venom status stays unknown (answers count it as possibly venomous")
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Sylvia atricapilla",
                          _photo(tmp_path / "new" / "a.png", 40), *ENCODER)
    assert code == 0 and warned in caplog.text, caplog.text
    caplog.clear()
    assert _run(capsys, "index", "venom-advice", "--index", index, "off")[0] == 0
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Parus major",
                          _photo(tmp_path / "new" / "b.png", 41), *ENCODER)
    assert code == 0 and "venom" not in out + err + caplog.text, (out, err, caplog.text)


# ------------------------------------------------------------------- named answers where no status is recorded
@pytest.mark.parametrize("names", [("Puff adder", "Moorish viper"), ("Cryptelytrops albolabris", "Popeia popeiorum")])
def test_a_named_answer_of_a_gallery_recording_no_status_warns(tmp_path, names):
    """Re-read w2 #1: with the advice on and no species recording a status, a named answer got no advice at all
    (the old 'records any status' gate); every unrecorded species counts as unrecorded, the mass included."""
    g, centre = _gallery(tmp_path, {s: {} for s in names})
    (named,) = Identifier(FakeEncoder(), g).identify_embeddings(centre[None].astype(np.float32))
    assert not named.unknown and not named.far and named.predictions[0].species == names[0], named.predictions
    assert named.venom_unknown_score > 0.5, named.venom_unknown_score
    assert named.venom_advice.level == "possibly_venomous" and named.venom_advice.treat_as_venomous
    assert named.venom_advice.text.startswith(f"{NOT_RECORDED}{names[0]}"), named.venom_advice.text


def test_a_named_answer_of_a_folder_gallery_recording_no_status_warns(tmp_path, capsys):
    """The CLI's table and JSON for a gallery of common-name folders: the advice line, treat as venomous."""
    index, _ = _folder_gallery(tmp_path, capsys, ("Puff adder", "Moorish viper"))
    photo = tmp_path / "photos" / "Puff adder" / "0.png"
    code, out, err = _run(capsys, "identify", "--index", index, photo, "--format", "json", "-q")
    (answer,) = json.loads(out)
    assert code == 0 and not answer["far"] and not answer["unknown"], (out, err)
    assert answer["venom_advice"]["level"] == "possibly_venomous", answer
    assert answer["venom_advice"]["text"].startswith(NOT_RECORDED), answer
    code, out, err = _run(capsys, "identify", "--index", index, photo, "-q")
    assert code == 0 and NOT_RECORDED in out and "treat as venomous" in out, out


def test_a_ph_snakes_folder_gallery_takes_its_flags_from_the_taxonomy(tmp_path, capsys):
    """Folders 'Common name (Scientific name)' of species the shipped taxonomy knows get their flags at build: a
    named answer reads by them (the cobra's venomous, the wolf snake's harmless), not as unrecorded."""
    index, _ = _folder_gallery(tmp_path, capsys, ("Common Wolf Snake (Lycodon capucinus)",
                                                  "Philippine Cobra (Naja philippinensis)"))
    flags = {s["species"]: s["venomous"] for s in
             json.loads(_run(capsys, "species", "list", "--index", index, "--format", "json")[1])}
    assert flags == {"Lycodon capucinus": False, "Naja philippinensis": True}, flags
    code, out, err = _run(capsys, "identify", "--index", index, "--format", "json", "-q",
                          tmp_path / "photos" / "Common Wolf Snake (Lycodon capucinus)" / "0.png")
    (answer,) = json.loads(out)
    assert code == 0 and answer["venom_unknown_score"] == 0.0 and answer["venom_advice"] is not None, answer
    assert "not recorded" not in answer["venom_advice"]["text"], answer


# ------------------------------------------------------------------------- off refused while venomous (#4, #6)
def test_build_no_venom_advice_is_refused_while_a_species_is_recorded_venomous(tmp_path, capsys):
    """Re-read w2 #4: 'index build --no-venom-advice' recorded off beside a cobra, which 'index venom-advice off'
    refuses (the answers kept the advice; the record outlived the cobra). Refused the same way, before any work."""
    root = tmp_path / "photos"
    for i in range(4):
        _photo(root / ("Samar Cobra (Naja samarensis)" if i % 2 else "Parus major") / f"{i}.png", i)
    index = tmp_path / "g"
    code, out, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", index,
                          *ENCODER, "--no-venom-advice", "-q")
    assert code != 0 and (f"gallery {index} holds species recorded medically important venomous (Naja samarensis): "
                          "its answers keep venom advice whatever it records, so it stays on") in err, err
    assert not (index / "gallery.json").exists()
    assert _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", index, *ENCODER,
                "-q")[0] == 0  # built with the advice on; a build into it --no-venom-advice is refused as well
    code, out, err = _run(capsys, "index", "build", "--dataset", "folder", "--root", root, "--index", index,
                          *ENCODER, "--no-venom-advice", "-q")
    assert code != 0 and "(Naja samarensis): its answers keep venom advice" in err, err
    assert "venom_advice" not in json.loads((index / "gallery.json").read_text())


def test_off_counts_the_text_priors_flags_as_answers_do(tmp_path):
    """Re-read w2 #6: 'index venom-advice off' looked the text prior's species up in the shipped taxonomy, while
    answers read the flags text_prior.json records: a species recorded venomous there that the table lacks."""
    from index.layout import GalleryLayout
    from retrieval.workflows import set_venom_advice

    g, _ = _gallery(tmp_path, {"Corvus corax": {}, "Passer domesticus": {}})
    prior = {"fingerprint": ENC["fingerprint"], "strength": 1.0, "species": [
        {"species": "Cryptelytrops albolabris", "genus": "Cryptelytrops", "family": "Viperidae", "common_name": None,
         "venomous": True}]}
    GalleryLayout(g.root).text_prior.write_text(json.dumps(prior), encoding="utf-8")
    with pytest.raises(ValueError, match=r"\(Cryptelytrops albolabris\): its answers keep venom advice"):
        set_venom_advice(g, False)


def test_the_csv_and_json_say_whether_venom_advice_applies(tmp_path, capsys):
    """Re-read w2 #8: the CSV had no venom_applies column, so an empty advice cell could not tell a gallery of no
    venom advice from an old CLI's answer."""
    import csv
    import io

    index, _ = _folder_gallery(tmp_path, capsys, BIRD_FOLDERS, "--no-venom-advice")
    blank = _blank(tmp_path)
    code, out, err = _run(capsys, "identify", "--index", index, blank, "--format", "csv", "-q")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and rows and all(r["venom_applies"] == "False" and r["venom_advice"] == "" for r in rows), out
    assert _far_json(capsys, index, blank)["venom_applies"] is False
    assert _run(capsys, "index", "venom-advice", "--index", index, "on")[0] == 0
    code, out, err = _run(capsys, "identify", "--index", index, blank, "--format", "csv", "-q")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and all(r["venom_applies"] == "True" and r["venom_advice"] == FAR_TEXT for r in rows), out


def test_a_server_in_a_store_outage_follows_gallery_json_on_refresh_s(tmp_path):
    """Re-read w2 #10: during an outage the store's looks back off up to 30 s, and gallery.json was looked at only
    with them: 'index venom-advice on' reached a server late. It is looked at on refresh_s whatever the back-off."""
    import time

    from retrieval.advice import record_venom_advice

    g, _ = _gallery(tmp_path, {"Corvus corax": {}, "Passer domesticus": {}})
    record_venom_advice(g, False)
    server = Gallery.open(g.root, refresh_s=0.0)
    server.stale_reads = True  # as a server's (api.service)
    assert server.info["venom_advice"] is False
    server._failures, server._checked_at = 4, time.monotonic()  # an outage: the next look at the store 16 s off
    record_venom_advice(g, True)  # another process turns the advice on
    assert server.refresh() is False and server.info["venom_advice"] is True


def test_a_server_whose_store_look_hangs_follows_gallery_json(tmp_path, monkeypatch):
    """Re-read w3-a #3: gallery.json was looked at only when no store look was running, so a look that hangs (an S3
    partition: connect timeouts, the usual outage) kept 'index venom-advice on' from a server until it returned."""
    import threading

    from retrieval.advice import record_venom_advice

    g, _ = _gallery(tmp_path, {"Corvus corax": {}, "Passer domesticus": {}})
    record_venom_advice(g, False)
    server = Gallery.open(g.root, refresh_s=0.0)
    server.stale_reads = True  # as a server's (api.service)
    entered, release = threading.Event(), threading.Event()

    def hang() -> None:  # the store's look blocks until released
        entered.set()
        release.wait()

    monkeypatch.setattr(server, "_refuse_replaced", hang)
    try:
        assert server.refresh(wait=0.0) is False and entered.wait(60)
        check = server._check
        record_venom_advice(g, True)  # another process turns the advice on
        assert server.refresh(wait=0.0) is False
        assert server._check is check and not check.done.is_set()  # the look still hangs
        assert server.info["venom_advice"] is True
    finally:
        release.set()
    assert check.done.wait(60)


def _write_prior(g: Gallery, species: str, venomous: bool) -> str:
    """A text_prior.json listing ``species`` with its flag; its sha256."""
    import hashlib

    from index.layout import GalleryLayout

    prior = {"fingerprint": ENC["fingerprint"], "strength": 1.0, "species": [
        {"species": species, "genus": species.split()[0], "family": None, "common_name": None,
         "venomous": venomous}]}
    path = GalleryLayout(g.root).text_prior
    path.write_text(json.dumps(prior), encoding="utf-8")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_venom_advice_off_ignores_a_text_prior_its_answers_do_not_take(tmp_path):
    """Re-read w3-a #5: the refusal counted a text_prior.json whose sha256 is not the one the probe records, which
    answers go without (load_text_prior): one reading of the venomous species now, the answers'."""
    from retrieval.probe import PROBE_META
    from retrieval.workflows import set_venom_advice

    g, _ = _gallery(tmp_path, {"Corvus corax": {}, "Passer domesticus": {}})
    digest = _write_prior(g, "Cryptelytrops albolabris", True)
    (g.root / PROBE_META).write_text(json.dumps({"text_prior_sha256": "0" * 64}), encoding="utf-8")  # another's
    assert set_venom_advice(g, False).now is False  # its answers have no venomous species: off is kept
    set_venom_advice(g, True)
    (g.root / PROBE_META).write_text(json.dumps({"text_prior_sha256": digest}), encoding="utf-8")  # the probe's own
    with pytest.raises(ValueError, match=r"\(Cryptelytrops albolabris\): its answers keep venom advice"):
        set_venom_advice(g, False)


def test_the_add_note_counts_the_text_priors_venomous_species_as_answers_do(tmp_path, capsys, caplog):
    """Re-read w3-a #5: a gallery recorded off but kept on by its text prior's venomous species: the add's note
    read the gallery's own species alone, and said nothing of a new bird's unknown status, while answers advise."""
    import logging

    index, _ = _folder_gallery(tmp_path, capsys, BIRD_FOLDERS, "--no-venom-advice")
    _write_prior(Gallery.open(index), "Cryptelytrops albolabris", True)  # no probe: answers take any prior
    caplog.set_level(logging.WARNING)
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Sylvia atricapilla",
                          _photo(tmp_path / "new" / "a.png", 40), *ENCODER)
    assert code == 0, err
    assert ("'Sylvia atricapilla' is not in the shipped snake taxonomy (snakes only) and no venomous flag was given: "
            "its venom status stays unknown (answers count it as possibly venomous") in caplog.text, caplog.text


def _birds_with_a_cobra_prior(tmp_path) -> tuple[Gallery, str]:
    """A gallery of two birds with the Moroccan checklist and a text_prior.json naming Naja haje venomous (no probe
    yet): the gallery and the prior's sha256."""
    from retrieval.advice import record_checklist

    g, _ = _gallery(tmp_path, {"Corvus corax": {}, "Passer domesticus": {}})
    record_checklist(g, "moroccan")
    return g, _write_prior(g, "Naja haje", True)


def test_index_info_reads_the_text_prior_as_answers_take_it(tmp_path):
    """Final re-read #2: index info's venom note and checklist block read a text_prior.json whose sha256 is not the
    probe's, which answers go without; one reading now (workflows._answered_prior), the answers'."""
    from retrieval.probe import PROBE_META
    from retrieval.workflows import gallery_info

    g, digest = _birds_with_a_cobra_prior(tmp_path)
    (g.root / PROBE_META).write_text(json.dumps({"text_prior_sha256": "0" * 64}), encoding="utf-8")  # another's
    info = gallery_info(g)  # the prior taken by no answer: birds only -> the hint; Naja haje not nameable
    assert "none of" in info["venom_advice"]["note"].casefold(), info["venom_advice"]
    assert "Naja haje" in info["checklist"]["venomous_missing"], info["checklist"]
    (g.root / PROBE_META).write_text(json.dumps({"text_prior_sha256": digest}), encoding="utf-8")  # the probe's own
    info = gallery_info(g)  # a cobra among its answers' species: no hint, and its prior names it
    assert info["venom_advice"]["note"] == "" and "Naja haje" not in info["checklist"]["venomous_missing"], info


@pytest.mark.parametrize("recorded", ["own", "another", "none"])
def test_index_info_reads_text_prior_json_once(tmp_path, count_opens, recorded):
    """``index info`` read text_prior.json twice when the probe records a prior's sha256 (once for its digest, once
    for its species); once now, and the prior is taken as before: its species when the digest is the probe's."""
    from retrieval.probe import PROBE_META
    from retrieval.workflows import gallery_info

    g, digest = _birds_with_a_cobra_prior(tmp_path)
    if recorded != "none":
        sha = digest if recorded == "own" else "0" * 64
        (g.root / PROBE_META).write_text(json.dumps({"text_prior_sha256": sha}), encoding="utf-8")
    reads = count_opens("text_prior.json")
    info = gallery_info(g)
    assert len(reads) == 1, reads
    assert ("Naja haje" in info["checklist"]["venomous_missing"]) is (recorded == "another"), info["checklist"]


def test_an_api_add_names_no_server_path_in_its_refusals(tmp_path):
    """Final re-read #1: a refused venomous=false through the API named the server's gallery folder in a CLI command
    the client cannot run; the CLI's check says the folder, the API's names the route (s56 re-read api #4: it said
    ``--index DIR``, a command the client cannot run either)."""
    from retrieval.workflows import check_new_references

    g, _ = _gallery(tmp_path, {"Lycodon novus": {"venomous": True}, "Corvus corax": {}})  # recorded venomous
    with pytest.raises(ValueError) as api:
        check_new_references(g, "Lycodon novus", venomous=False, api=True)
    with pytest.raises(ValueError) as cli:
        check_new_references(g, "Lycodon novus", venomous=False)
    route = 'set it first with PUT /v1/species/Lycodon_novus/venomous and {"venomous": false}'
    assert str(api.value).endswith(route), api.value
    assert str(g.root) not in str(api.value), api.value
    assert f"speciesid species set-venom --index {g.root} \"Lycodon novus\" no" in str(cli.value), cli.value


# ------------------------------------------------------- mixed recorded statuses, and what a country may change
def _voting(g: Gallery, counts: dict[str, int]) -> list:
    """Neighbours of equal similarity, ``counts[species]`` each: a k-NN vote of exactly those shares."""
    from index.gallery import Neighbour

    taxa = {t.species: t for t in g.species()}
    return [Neighbour(i, 0.8, s, taxa[s].genus, taxa[s].family, None, taxa[s].venomous, f"/photos/{s}/{i}.jpg", None)
            for i, s in enumerate(s for s, n in counts.items() for _ in range(n))]


def test_a_venomous_answer_beside_a_species_of_unrecorded_status_warns(tmp_path):
    """Walk s55 M02: a cobra at 93% beside a toad of no recorded status at 7% is venomous at 93%; one unrecorded
    candidate once dropped the venomous share to none, and the answer read 'unlikely' (0.0%, and 7.0% unknown)."""
    g, _ = _gallery(tmp_path, {"Naja haje": {"venomous": True}, "Bufo bufo": {}})
    answer = Identifier(FakeEncoder(), g).answer(_voting(g, {"Naja haje": 93, "Bufo bufo": 7}), method="knn")
    assert not answer.unknown and answer.predictions[0].species == "Naja haje", answer.predictions
    assert answer.venomous_score == pytest.approx(0.93) and answer.venom_unknown_score == pytest.approx(0.07)
    assert answer.venom_advice.level == "possibly_venomous" and answer.venom_advice.treat_as_venomous
    assert answer.venom_advice.text.startswith("Possibly MEDICALLY IMPORTANT VENOMOUS (Naja haje) — probability "
                                               "93.0%, and 7.0% on species"), answer.venom_advice.text


@pytest.mark.parametrize("flag", [True, None], ids=["venomous", "unrecorded"])
def test_a_country_never_makes_a_bite_look_safer_than_the_photo_does(tmp_path, flag):
    """Walk s55 M25 (docs/identification.md, --country): the photo says 30% on a venomous (or unrecorded) species
    the country does not record; the country reorders the candidates (it is then 4%), but the answer's venomous
    and unrecorded shares are the photo's, and it warns as the photo alone does (not 'unlikely')."""
    g, _ = _gallery(tmp_path, {"Naja haje": {"venomous": flag}, "Natrix maura": {"venomous": False}})
    ident = Identifier(FakeEncoder(), g)
    voting = _voting(g, {"Naja haje": 30, "Natrix maura": 70})
    photo = ident.answer(voting, method="knn")
    answer = ident.answer(voting, method="knn", presence={"Naja haje": False, "Natrix maura": True})
    assert answer.country_applied and answer.scores["Naja haje"] == pytest.approx(0.03 / 0.73), answer.scores
    share = answer.venomous_score if flag else answer.venom_unknown_score
    assert share == pytest.approx(0.30), (answer.venomous_score, answer.venom_unknown_score)
    assert answer.venom_advice.level == photo.venom_advice.level == "possibly_venomous", answer.venom_advice
    assert answer.venom_advice.treat_as_venomous


def test_a_country_never_turns_an_unknown_answer_into_a_named_one(tmp_path):
    """Walk s55 M24: the photo splits 50/50 between two harmless species (unknown: cannot tell, treat as
    venomous); a country that records one of them lifts the other to 91%, but the answer stays unknown."""
    g, _ = _gallery(tmp_path, {"Natrix maura": {"venomous": False}, "Natrix natrix": {"venomous": False}})
    ident = Identifier(FakeEncoder(), g)
    voting = _voting(g, {"Natrix maura": 5, "Natrix natrix": 5})
    assert ident.answer(voting, method="knn").unknown
    answer = ident.answer(voting, method="knn", presence={"Natrix maura": True, "Natrix natrix": False})
    assert answer.predictions[0].species == "Natrix maura", answer.predictions
    assert answer.predictions[0].score == pytest.approx(0.5 / 0.55)
    assert answer.unknown and answer.venom_advice.level == "cannot_tell", answer.venom_advice
    assert answer.venom_advice.text == UNKNOWN_TEXT and answer.venom_advice.treat_as_venomous
