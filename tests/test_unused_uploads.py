"""Photos an add cut off left in ``uploads/`` (soak walk, stop 54: a server killed mid-add): ``index info`` and
``/readyz`` count them and say what to run (``index sweep-uploads``); nothing running removes them (a sweep takes the
write hold, and such a photo is younger than the sweep's one-day grace anyway)."""

from __future__ import annotations

import hashlib
import json
import os
import time

from _api_support import gallery_copy
from conftest import until

from api.cli import main


def _orphans(index) -> list:
    """Two photos no row uses, as a kill between an add's keep and its commit leaves them: one 2 days old."""
    uploads = index / "uploads"
    uploads.mkdir(exist_ok=True)
    made = []
    for i, age_days in enumerate((2, 0)):
        data = f"photo {i}".encode()
        path = uploads / f"{hashlib.sha256(data).hexdigest()}.jpg"
        path.write_bytes(data)
        then = time.time() - age_days * 86400
        os.utime(path, (then, then))
        made.append(path)
    return made


def test_index_info_and_readyz_count_the_unused_uploads_and_name_the_sweep(tmp_path_factory, capsys):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.service import SpeciesService
    from api.settings import Settings

    index = gallery_copy(tmp_path_factory, "unused_uploads")
    made = _orphans(index)
    assert main(["index", "info", "--index", str(index)]) == 0
    uploads = json.loads(capsys.readouterr().out)["uploads"]
    assert {k: uploads[k] for k in ("unused", "removable")} == {"unused": 2, "removable": 1}
    assert uploads["note"].startswith("2 kept upload photos that no reference uses (1 older than a day: ")
    assert f"run `speciesid index sweep-uploads --index {index}` (it removes" in uploads["note"]
    service = SpeciesService(Settings(index=str(index), precision="fp32"))  # counts them on a thread at start
    try:
        with TestClient(create_app(service=service)) as client:
            until(lambda: "uploads" in client.get("/readyz").json(), "/readyz's uploads block")
            body = client.get("/readyz").json()
        assert body["uploads"]["unused"] == 2 and body["uploads"]["removable"] == 1
        assert "with the server's gallery folder, on its machine" in body["uploads"]["note"]
    finally:
        service.close()
    assert all(p.exists() for p in made)  # counted, never removed by either
    for p in made:
        p.unlink()
    assert main(["index", "info", "--index", str(index)]) == 0
    assert json.loads(capsys.readouterr().out)["uploads"] == {"unused": 0, "removable": 0, "bytes": 0, "note": ""}
