"""What an add says of a new species' venom status (index.taxonomy.unrecorded_venom_note): in a gallery recorded
off, a species of a snake genus the shipped taxonomy knows (re-read w2 safety #3: silent); and the API's add
carries it in its notes (#7: a server log line only)."""

from __future__ import annotations

import json

from _cli_support import ENCODER, _photo, _run, folder_gallery

BIRDS = ("Corvus corax", "Passer domesticus")


def test_an_off_gallery_warns_at_the_add_of_a_snake_genus(tmp_path, capsys, caplog):
    index = folder_gallery(tmp_path, capsys, BIRDS, extra=["--no-venom-advice"])
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Bungarus suzhenae",
                          _photo(tmp_path / "new" / "a.png", 40), *ENCODER)
    assert code == 0, err
    off = ("this gallery records no venom advice, but Bungarus suzhenae is of a snake genus or family the shipped "
           "snake taxonomy knows, with no venom status recorded: its answers say nothing of a bite; if it holds "
           f"snakes, 'speciesid index venom-advice --index {index} on' turns it on ('speciesid species set-venom "
           f"--index {index} \"Bungarus suzhenae\" yes' (or no) records a species' status)")
    assert off in caplog.text, caplog.text
    said = json.loads(_run(capsys, "index", "info", "--index", index)[1])["venom_advice"]
    assert said["on"] is False and said["note"] == off, said  # one wording (re-read w3-a #4)
    caplog.clear()  # a bird added to it: nothing of venom
    code, out, err = _run(capsys, "references", "add", "--index", index, "--species", "Sylvia atricapilla",
                          _photo(tmp_path / "new" / "b.png", 41), *ENCODER)
    assert code == 0 and "venom" not in out + err + caplog.text, (out, err, caplog.text)


def test_the_api_add_tells_its_client_of_an_unrecorded_status(tmp_path, capsys):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import Settings

    index = folder_gallery(tmp_path, capsys, BIRDS)
    photo = _photo(tmp_path / "new" / "a.png", 40, side=256)
    files = [("images", (photo.name, photo.read_bytes(), "image/png"))]
    with TestClient(create_app(Settings(index=str(index), api_keys="secret", precision="fp32"))) as client:
        done = client.post("/v1/species/Sylvia atricapilla/references", files=files, headers={"X-API-Key": "secret"})
        assert done.status_code == 201, done.json()
        notes = done.json()["notes"]
        assert any(n.startswith("'Sylvia atricapilla' is not in the shipped snake taxonomy (snakes only) and no "
                                "venomous flag was given: its venom status stays unknown (answers count it as "
                                "possibly venomous; PUT /v1/species/Sylvia_atricapilla/venomous with "
                                '{"venomous": true} (or false) and an API key records it)') for n in notes), notes


def test_the_api_add_to_an_off_gallery_names_the_route_that_records_a_status(tmp_path, capsys):
    """The note of a snake added to a gallery of no venom advice names the set-venom route (it said "no API
    route": the CLI on the gallery's machine was the only way)."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import Settings

    index = folder_gallery(tmp_path, capsys, BIRDS, extra=["--no-venom-advice"])
    photo = _photo(tmp_path / "new" / "a.png", 40, side=256)
    files = [("images", (photo.name, photo.read_bytes(), "image/png"))]
    with TestClient(create_app(Settings(index=str(index), api_keys="secret", precision="fp32"))) as client:
        done = client.post("/v1/species/Bungarus suzhenae/references", files=files, headers={"X-API-Key": "secret"})
        assert done.status_code == 201, done.json()
        assert any(n.endswith("if it holds snakes, the gallery's operator turns it on with 'speciesid index "
                              "venom-advice on' (PUT /v1/species/Bungarus_suzhenae/venomous with {\"venomous\": "
                              "true} (or false) and an API key records a species' status)")
                   for n in done.json()["notes"]), done.json()["notes"]
