"""``PUT /v1/species/{name}/venomous``: the CLI's ``speciesid species set-venom NAME yes|no`` over HTTP (the venom
status of a running service's species could only be mended on the gallery's machine; the API's notes said "no API
route"). The key before the body, the body's 422, an unknown species' 404, the harmless flag's confirmation (400,
as the add's), the answer's summary and counts, identify's venom advice at once, and a second server on the same
gallery at its next look. Most run on galleries of the tiny random encoder; the identify test on the small real
MobileNetV1 gallery of the other API tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from _api_support import API_KEY, JSON, SPECIES, gallery_copy, photos, refused_unread, stand_in_app
from _cli_support import folder_gallery

KEYS = {"X-API-Key": API_KEY}
#: What a body that is not the flag is told first (api.routers.species.VENOMOUS_BODY).
SEND = ('send a JSON body {"venomous": true} or {"venomous": false} (with "distinct_from_venomous": true to confirm '
        "a harmless flag refused without it): ")
#: A folder build's species: one of no venom status, one whose common name holds a venomous kind's word, one the
#: shipped taxonomy records venomous.
FOLDERS = ("Bufo bufo", "Reed viper (Calamaria nova)", "Samar Cobra (Naja samarensis)")


def _client(index: Path, **settings):
    """A TestClient of a server on ``index`` (its model loaded on entering it), writes with :data:`API_KEY`."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import Settings

    return TestClient(create_app(Settings(index=str(index), api_keys=API_KEY, precision="fp32", **settings)))


@pytest.fixture
def gallery(tmp_path, capsys) -> Path:
    return folder_gallery(tmp_path, capsys, FOLDERS, 6)


def _put(client, name: str, body: dict, headers: dict | None = None):
    return client.put(f"/v1/species/{name}/venomous", json=body, headers=KEYS if headers is None else headers)


@pytest.mark.parametrize("key", [None, b"wrong"])
def test_a_put_without_a_valid_key_is_refused_before_its_body_is_read(key):
    """A 401 from the edge guard, as an add's: the body never received (before, the route did not exist: a 405)."""
    headers = JSON + ([(b"x-api-key", key)] if key else [])
    sent, received = refused_unread(stand_in_app(), "PUT", "/v1/species/Bufo_bufo/venomous", headers)
    assert sent.status == 401, sent.body
    assert sent.detail == "missing or wrong X-API-Key"
    assert received == []


def test_a_body_that_is_not_the_flag_is_a_422_saying_what_to_send(gallery):
    with _client(gallery) as client:
        for body, wrong in [({"venomous": "maybe"}, "venomous: Input should be a valid boolean"),
                            ({"venomous": "no"}, "venomous: Input should be a valid boolean"),  # not taken as false
                            ({"venomous": 0}, "venomous: Input should be a valid boolean"),
                            ({"venomous": 1}, "venomous: Input should be a valid boolean"),
                            ({"venomous": "yes"}, "venomous: Input should be a valid boolean"),
                            ({"venomous": False, "distinct_from_venomous": "yes"},
                             "distinct_from_venomous: Input should be a valid boolean"),
                            ({"venomous": "no", "distinct_from_venomous": 1},
                             "venomous: Input should be a valid boolean; distinct_from_venomous: Input should be a "
                             "valid boolean"),
                            ({"venomous": None}, "venomous: Input should be a valid boolean"),
                            ({}, "venomous: Field required"),
                            ({"venomous": False, "distinct_from_venomus": True},
                             "distinct_from_venomus: Extra inputs are not permitted")]:  # a typo is not dropped
            resp = _put(client, "Bufo_bufo", body)
            assert resp.status_code == 422 and resp.json()["detail"] == SEND + wrong, (body, resp.text)
        form = client.put("/v1/species/Bufo_bufo/venomous", data={"venomous": "true"}, headers=KEYS)
        assert form.status_code == 422 and form.json()["detail"] == (
            SEND[:-2] + ", with Content-Type: application/json (curl -H 'Content-Type: application/json' -d "
            "'{\"venomous\": true}', or curl --json '{\"venomous\": true}'), not application/x-www-form-urlencoded"
        ), form.text
        form_type = "application/x-www-form-urlencoded"
        for sent, said in [({"Content-Type": form_type}, form_type),
                           ({"Content-Type": "text/plain"}, "text/plain"),
                           ({}, "a request without a Content-Type")]:  # curl -d without -H: JSON in a form
            plain = client.put("/v1/species/Bufo_bufo/venomous", content=b'{"venomous": true}',
                               headers={**KEYS, **sent})
            assert plain.status_code == 422, plain.text
            assert plain.json()["detail"].startswith(SEND[:-2] + ", with Content-Type: application/json (curl -H")
            assert plain.json()["detail"].endswith(f", not {said}"), plain.text
        long = _put(client, "a" * 201, {"venomous": True})  # the path's name: not told to fix its JSON
        assert long.status_code == 422 and long.json()["detail"] == (
            "the species name in the path: String should have at most 200 characters (a gallery species, e.g. "
            "Bufo_bufo; GET /v1/species lists them)"), long.text
        both = _put(client, "a" * 201, {"venomous": "no"})
        assert both.status_code == 422 and both.json()["detail"] == (
            long.json()["detail"] + "; " + SEND + "venomous: Input should be a valid boolean"), both.text
        broken = client.put("/v1/species/Bufo_bufo/venomous", content=b'{"venomous": tr',
                            headers={**KEYS, "Content-Type": "application/json"})
        assert broken.status_code == 422 and broken.json()["detail"] == SEND + "body: JSON decode error", broken.text
        assert client.get("/v1/species/Bufo_bufo").json()["venomous"] is None  # nothing written


def test_an_unknown_species_is_a_404_naming_how_to_list_them(gallery):
    with _client(gallery) as client:
        resp = _put(client, "Bufo buffo", {"venomous": True})
        assert resp.status_code == 404, resp.text
        assert resp.json()["detail"] == ("no species 'Bufo buffo' in this gallery; did you mean 'Bufo bufo'? "
                                         "(GET /v1/species lists them)")  # no server path
        slashed = client.put("/v1/species/Bufo%2Fbufo/venomous", json={"venomous": True}, headers=KEYS)
        assert slashed.status_code == 422 and "cannot contain '/'" in slashed.json()["detail"], slashed.text


def test_the_answer_is_the_species_after_the_change_and_its_counts(gallery):
    with _client(gallery) as client:
        done = _put(client, "bufo_bufo", {"venomous": True})  # any spelling of the gallery's name
        assert done.status_code == 200, done.text
        after = client.get("/v1/species/Bufo bufo").json()
        assert after["venomous"] is True
        assert done.json() == {"species": after, "was": None, "found": 2, "changed": 2, "turned_off": 0}
        again = _put(client, "Bufo bufo", {"venomous": True})
        assert again.json() == {"species": after, "was": True, "found": 2, "changed": 0, "turned_off": 0}
        harmless = _put(client, "Bufo bufo", {"venomous": False})  # no venomous look: no confirmation asked
        assert harmless.status_code == 200, harmless.text
        assert harmless.json() == {"species": {**after, "venomous": False}, "was": True, "found": 2, "changed": 2,
                                   "turned_off": 2}
        listed = {s["species"]: s["venomous"] for s in client.get("/v1/species").json()}
        assert listed == {"Bufo bufo": False, "Calamaria nova": None, "Naja samarensis": True}  # the one species


def test_no_for_a_venomous_looking_name_needs_the_confirmation_field(gallery):
    with _client(gallery) as client:
        refused = _put(client, "Calamaria nova", {"venomous": False})
        assert refused.status_code == 400, refused.text  # the add's code (409: a new name)
        assert refused.json()["detail"] == (
            "'Calamaria nova' ('Reed viper') holds 'viper', a kind of venomous snake: it may be medically important "
            "venomous (the shipped taxonomy gives common names to the Moroccan checklist's species only, so it "
            "cannot tell which); a harmless answer for a venomous snake is the costly error. If you are sure it is "
            'a harmless species, send "distinct_from_venomous": true beside "venomous": false in the JSON body; else '
            "leave it as it is (not recorded: answers treat it as possibly venomous)")  # no flag to leave out
        assert client.get("/v1/species/Calamaria nova").json()["venomous"] is None  # nothing written
        done = _put(client, "Calamaria nova", {"venomous": False, "distinct_from_venomous": True})
        assert done.status_code == 200, done.text
        assert done.json()["species"]["venomous"] is False and done.json()["changed"] == 2
        listed = _put(client, "Naja samarensis", {"venomous": False, "distinct_from_venomous": True})
        assert listed.status_code == 400, listed.text  # the shipped taxonomy's venomous species: whatever is sent
        assert listed.json()["detail"] == (
            "'Naja samarensis' is medically important venomous in the shipped taxonomy (SnakeCLEF's list): its flag "
            "stays as it is (recorded venomous); a harmless answer for a venomous snake is the costly error"), (
            listed.text)
        assert client.get("/v1/species/Naja samarensis").json()["venomous"] is True


def test_a_refused_no_for_a_species_recorded_venomous_says_it_stays_venomous(gallery):
    """s56 re-read core #1: the refusal ended "else leave the flag out (its status stays unrecorded...)", wrong for a
    species recorded venomous and for a set-venom (no flag to leave out): it now says the species' status stays."""
    with _client(gallery) as client:
        assert _put(client, "Calamaria nova", {"venomous": True}).status_code == 200
        refused = _put(client, "Calamaria nova", {"venomous": False})
        assert refused.status_code == 400, refused.text
        assert refused.json()["detail"].endswith(
            'send "distinct_from_venomous": true beside "venomous": false in the JSON body; else leave it as it is '
            "(recorded venomous)"), refused.text
        assert client.get("/v1/species/Calamaria nova").json()["venomous"] is True


def test_a_second_server_on_the_same_gallery_sees_the_change_at_its_next_look(gallery):
    with _client(gallery) as writer, _client(gallery, refresh_s=0.0) as other:
        assert other.get("/v1/species/Bufo bufo").json()["venomous"] is None
        assert _put(writer, "Bufo bufo", {"venomous": True}).status_code == 200
        assert other.get("/v1/species/Bufo bufo").json()["venomous"] is True
        assert _put(writer, "Bufo bufo", {"venomous": False}).status_code == 200
        assert other.get("/v1/species/Bufo bufo").json()["venomous"] is False


def test_identify_advises_on_a_bite_at_once_after_yes(tmp_path_factory):
    """The real gallery: a ratsnake photo's answer is "unlikely" until the species is set venomous; then this
    server's next answer, and another server's on the same gallery, advise treating a bite as venomous."""
    index = gallery_copy(tmp_path_factory, "api_set_venom")
    ratsnake = photos("val", SPECIES[3])[3:4]
    files = [("images", (p.name, p.read_bytes(), "application/octet-stream")) for p in ratsnake]
    with _client(index) as client, _client(index, refresh_s=0.0) as other:
        before = client.post("/v1/identify", files=files).json()
        assert before["results"][0]["species"] == "Gonyosoma oxycephalum", before
        assert before["venom_advice"]["level"] == "unlikely" and before["results"][0]["venomous"] is False, before
        assert other.post("/v1/identify", files=files).json()["venom_advice"]["level"] == "unlikely"
        done = _put(client, "Gonyosoma oxycephalum", {"venomous": True})
        assert done.status_code == 200 and done.json()["was"] is False, done.text
        for server in (client, other):
            after = server.post("/v1/identify", files=files).json()
            assert after["results"][0]["species"] == "Gonyosoma oxycephalum", after
            assert after["results"][0]["venomous"] is True, after
            assert after["venom_advice"]["treat_as_venomous"] is True, after
            assert after["venom_advice"]["level"] == "possibly_venomous", after


def test_a_json_body_over_the_limit_is_told_the_flag_is_all_it_takes():
    """Not told "this route takes no JSON: send multipart/form-data photos", as a route of photos is."""
    from fastapi.testclient import TestClient

    client = TestClient(stand_in_app())
    resp = client.put("/v1/species/Bufo_bufo/venomous", content=b"x" * (2 * 1024 * 1024),
                      headers={"X-API-Key": "k", "Content-Type": "application/json"})
    assert resp.status_code == 413 and resp.json()["detail"] == (
        'JSON request body of 2.0 MB is over the 1 MB this route accepts; its JSON is far smaller: send only '
        '{"venomous": true}'), resp.text


def test_the_add_of_a_harmless_flag_for_a_species_recorded_venomous_names_the_route(gallery, tmp_path):
    """The add's 400 for venomous=false on a species recorded venomous tells an HTTP client to set the flag with
    this route, as its notes do (it named only the CLI)."""
    from _cli_support import _photo

    photo = _photo(tmp_path / "new" / "a.png", 40, side=256)
    files = [("images", (photo.name, photo.read_bytes(), "image/png"))]
    with _client(gallery) as client:
        assert _put(client, "Bufo bufo", {"venomous": True}).status_code == 200
        refused = client.post("/v1/species/Bufo bufo/references", files=files, data={"venomous": "false"},
                              headers=KEYS)
        assert refused.status_code == 400, refused.text
        assert refused.json()["detail"] == (
            "'Bufo bufo' is recorded as venomous, and a species stays venomous while any of its reference photos "
            "says so: leave the venomous flag out to add these photos; if that flag is wrong, set it first with "
            'PUT /v1/species/Bufo_bufo/venomous and {"venomous": false}'), refused.text
        assert client.get("/v1/species/Bufo bufo").json()["count"] == 2  # nothing added


def test_a_misspelt_name_or_a_refused_flag_is_answered_without_waiting_for_the_write_lock(gallery, monkeypatch):
    """s56 re-read api #10: the name and the harmless-flag rule were checked inside the write (this server's turn,
    the gallery's lock: up to SPECIESID_WRITE_WAIT_S, on S3 the lease). Now they are checked before it too: with the
    lock held elsewhere (its wait made to fail if it is ever asked for), a 404 and a 400 come, and a good request
    meets the lock."""
    from index.gallery import Gallery

    def held_elsewhere(self, *args, **kwargs):
        raise AssertionError("waited for the gallery's write lock")

    with _client(gallery) as client:
        monkeypatch.setattr(Gallery, "writing", held_elsewhere)
        missing = _put(client, "Bufo buffo", {"venomous": True})
        assert missing.status_code == 404 and missing.json()["detail"].startswith("no species 'Bufo buffo'"), (
            missing.text)
        refused = _put(client, "Calamaria nova", {"venomous": False})
        assert refused.status_code == 400 and "holds 'viper'" in refused.json()["detail"], refused.text
        listed = _put(client, "Naja samarensis", {"venomous": False, "distinct_from_venomous": True})
        assert listed.status_code == 400 and "in the shipped taxonomy" in listed.json()["detail"], listed.text
        with pytest.raises(AssertionError, match="waited for the gallery's write lock"):
            _put(client, "Bufo bufo", {"venomous": True})  # a good one does wait for it (the test client raises)
