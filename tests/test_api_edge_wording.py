"""What the API's edge says, worded for an HTTP client: the body limit that applied, and the route's own field
where the library's refusal would name a command-line option. No model is loaded here: the guard answers
before routing, and the service is a stand-in."""

from __future__ import annotations

import pytest

KEYS = {"X-API-Key": "k"}
_MB = 1024 * 1024


@pytest.fixture()
def app():
    from api.app import create_app
    from api.settings import Settings

    # 50 photos x 20 MB + 1 MB would be 1001 MB: the 3 MB cap of every request is what applies to an add
    return create_app(Settings(index="nowhere", api_keys="k", max_request_mb=3, max_upload_mb=20))


def test_the_content_length_413_names_the_limit_that_applied(app):
    from fastapi.testclient import TestClient

    client = TestClient(app)  # no lifespan: no service; the guard answers before any route
    headers = {**KEYS, "Content-Type": "multipart/form-data; boundary=b"}
    body = b"x" * (4 * _MB)
    announced = client.post("/v1/species/Naja_naja/references", headers=headers, content=body)

    def chunks():
        for _ in range(4):
            yield b"x" * _MB

    streamed = client.post("/v1/species/Naja_naja/references", headers=headers, content=chunks())
    for resp in (announced, streamed):
        assert resp.status_code == 413
        detail = resp.json()["detail"]
        assert "SPECIESID_MAX_REQUEST_MB" in detail and "over the 3 MB this route accepts" in detail, detail
        assert "SPECIESID_MAX_UPLOAD_MB" not in detail, detail  # raising it would change nothing
    assert announced.json()["detail"].startswith("request body of 4.0 MB is over")
