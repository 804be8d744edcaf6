"""What an API client meets at the edges (walk3 of stop 50): one photo per search, errors in one line naming the
field, k where the schema says, thumbnails cached privately with an ETag, the docs pages' frame headers, route
labels in /metrics, a trailing slash named, photos set aside listed. No model is loaded: the service is a stand-in
(the routes' own code runs), except for the library test of ``set_aside`` on a synthetic gallery."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient

from index.gallery import Neighbour

PNG = b"\x89PNG\r\n\x1a\n" + b"x" * 64  # the stand-in never decodes it
THUMB = b"\xff\xd8\xff\xe0fake-jpeg"


class StandIn:
    """A service whose every answer is canned: what the routes call, and the calls they made."""

    empty = False

    def __init__(self) -> None:
        from api.settings import Settings

        self.settings = Settings(index="nowhere", api_keys="k")
        self.gallery = SimpleNamespace(encoder_spec="test:stand-in")
        self.upload_limit = 1024 * 1024
        self.decoded: list[list[str]] = []
        self.searched: list[int] = []
        self.set_aside: list[int] = []

    def require_references(self) -> None:
        """The gallery holds references."""

    def check_size(self, name: str, size: int) -> None:
        """Every photo is small enough."""

    def answer_notes(self, rank=None) -> list[str]:
        """Nothing to say of the gallery."""
        return []

    def decode(self, raw):
        self.decoded.append([name for name, _ in raw])
        return [SimpleNamespace(name=name, data=data) for name, data in raw]

    def _hits(self, k: int) -> list[Neighbour]:
        self.searched.append(k)
        return [Neighbour(id=1, similarity=0.9, species="Naja naja", genus="Naja", family="Elapidae",
                          common_name=None, venomous=True, path="/srv/secret/1.jpg", dataset=None)]

    def search_image(self, upload, k: int) -> list[Neighbour]:
        return self._hits(k)

    def search_vector(self, vector, k: int) -> list[Neighbour]:
        return self._hits(k)

    def identify(self, uploads, *, top: int, rank, country):
        from retrieval.identify import Identification
        from retrieval.workflows import Answer

        found = Identification(predictions=[], neighbours=[], unknown=True, set_aside=list(self.set_aside))
        return Answer(", ".join(u.name for u in uploads), identification=found)  # the route calls its to_dict

    def thumbnail(self, ref_id: int):
        from api.service import Thumbnail

        return Thumbnail.of(THUMB)


@pytest.fixture()
def service() -> StandIn:
    return StandIn()


@pytest.fixture()
def client(service) -> TestClient:
    from api.app import create_app

    return TestClient(create_app(service.settings, service=service))  # no lifespan run: the stand-in stays


def _image(name: str = "a.png", data: bytes = PNG, field: str = "image") -> tuple[str, tuple[str, bytes, str]]:
    return (field, (name, data, "image/png"))


def test_a_search_with_two_photos_is_a_422_not_the_last_one_silently(client, service):
    resp = client.post("/v1/search", files=[_image("cobra.png"), _image("notes.txt", b"not a photo")])
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"] == "send one photo in 'image' (use /v1/identify for several), got 2"
    assert service.decoded == []  # neither was read
    assert client.post("/v1/search", files=[_image()]).status_code == 200


def _detail(resp, status: int = 422) -> str:
    assert resp.status_code == status, resp.text
    detail = resp.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "pydantic.dev" not in detail, detail
    return detail


def test_search_validation_errors_are_one_line_naming_the_field(client):
    vector = [0.1] * 8
    detail = _detail(client.post("/v1/search", json={"embedding": vector, "k": 0}))
    assert detail == 'expected JSON {"embedding": [...], "k": 10}: k: input should be greater than or equal to 1'
    detail = _detail(client.post("/v1/search", json={"k": 2}))
    assert detail == 'expected JSON {"embedding": [...], "k": 10}: embedding: field required'
    detail = _detail(client.post("/v1/search", json={"embedding": ["x"] * 5}))
    assert detail.endswith("embedding.2: input should be a valid number, unable to parse string as a number "
                           "(and 2 more)"), detail
    detail = _detail(client.post("/v1/search", content=b"{oops", headers={"Content-Type": "application/json"}))
    assert "not valid JSON (Expecting property name enclosed in double quotes, line 1 column 2)" in detail
    assert _detail(client.post("/v1/search", content=b"", headers={"Content-Type": "application/json"})).endswith(
        ": the body is empty")
    # the multipart k says the same as the JSON k, and as FastAPI's msg for identify's ?k=
    assert _detail(client.post("/v1/search", files=[_image()], data={"k": "0"})) == (
        "k: input should be greater than or equal to 1")
    assert _detail(client.post("/v1/search?k=abc", files=[_image()])) == (
        "k: input should be a valid integer, unable to parse string as an integer")
    listed = client.post("/v1/identify?k=0", files=[_image(field="images")])
    assert listed.status_code == 422 and listed.json()["detail"][0]["msg"] == "Input should be greater than or equal to 1"


def test_k_is_read_from_the_query_for_both_routes_and_identify_refuses_it_as_a_form_field(client, service):
    assert client.post("/v1/search?k=3", files=[_image()]).status_code == 200
    assert client.post("/v1/search?k=3", files=[_image()], data={"k": "4"}).status_code == 200  # the form wins
    assert client.post("/v1/search?k=5", json={"embedding": [0.1] * 8}).status_code == 200  # the body has none
    assert client.post("/v1/search?k=5", json={"embedding": [0.1] * 8, "k": 6}).status_code == 200
    assert service.searched == [3, 4, 5, 6]
    decoded = len(service.decoded)
    resp = client.post("/v1/identify", files=[_image(field="images")], data={"k": "1", "country": "PH"})
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"] == ("'k', 'country' are query parameters of /v1/identify, not form fields: send them "
                                     "as /v1/identify?k=...&country=... (only the photos go in the form, as 'images')")
    resp = client.post("/v1/identify", files=[_image(field="images")], data={"k": "1"})
    assert resp.json()["detail"].startswith("'k' is a query parameter of /v1/identify, not a form field: send it as "
                                            "/v1/identify?k=..."), resp.text
    assert len(service.decoded) == decoded  # refused before any photo was read
    schema = client.get("/openapi.json").json()["paths"]
    (k,) = schema["/v1/search"]["post"]["parameters"]
    assert k["name"] == "k" and k["in"] == "query" and k["schema"]["maximum"] == 1000
    assert {"200", "500", "503"} <= set(schema["/readyz"]["get"]["responses"])


def test_identify_lists_the_photos_it_set_aside(client, service):
    service.set_aside = [1]
    body = client.post("/v1/identify", files=[_image("a.png", field="images"), _image("b.png", field="images")]).json()
    assert body["images"] == 2 and body["set_aside"] == [1]
    service.set_aside = []
    assert client.post("/v1/identify", files=[_image(field="images")]).json()["set_aside"] == []


def test_the_library_says_which_photos_of_an_observation_it_set_aside(tmp_path):
    from test_gallery import DIM, ENC, FakeEncoder, _records, _unit

    from index.gallery import Gallery
    from retrieval import workflows
    from retrieval.identify import Identifier

    rng = np.random.default_rng(5)
    g = Gallery.create(tmp_path / "g", ENC)
    centre = rng.standard_normal(DIM)
    g.add(_records("Naja haje", 8, venomous=True), [f"a{i}" for i in range(8)], _unit(rng, 8, centre))
    g.add(_records("Natrix maura", 8, venomous=False), [f"b{i}" for i in range(8)],
          _unit(rng, 8, rng.standard_normal(DIM)))
    ident = Identifier(FakeEncoder(), g)
    near = _unit(rng, 2, centre, noise=0.05)
    far = -centre / np.linalg.norm(centre)  # unlike every reference
    photos = np.stack([near[0], far, near[1]]).astype(np.float32)
    (answer,) = workflows.identify(ident, embeddings=photos, observation=True)
    assert answer.identification.set_aside == [1] and not answer.identification.far
    (alone,) = workflows.identify(ident, embeddings=photos[[1]], observation=True)
    assert alone.identification.far and alone.identification.set_aside == []  # nothing else to answer from


def test_thumbnails_are_private_with_an_etag_and_answer_head(client):
    resp = client.get("/v1/references/1/image")
    assert resp.status_code == 200 and resp.content == THUMB
    assert resp.headers["cache-control"] == "private, max-age=3600"
    etag = resp.headers["etag"]
    assert etag.startswith('"') and len(etag) == 34
    again = client.get("/v1/references/1/image", headers={"If-None-Match": f'W/{etag}, "other"'})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    assert client.get("/v1/references/1/image", headers={"If-None-Match": '"other"'}).status_code == 200
    head = client.head("/v1/references/1/image")
    assert head.status_code == 200 and head.content == b"" and head.headers["etag"] == etag
    assert head.headers["content-type"] == "image/jpeg"


def test_the_docs_pages_may_not_be_framed(client):
    for path in ("/docs", "/redoc"):
        resp = client.get(path)
        assert resp.status_code == 200
        assert resp.headers["x-frame-options"] == "DENY", path
        assert resp.headers["content-security-policy"] == "frame-ancestors 'none'", path


@pytest.mark.parametrize("root", ["", "/api"])
def test_metrics_label_the_schema_and_docs_routes(root):
    """s57: behind a root_path (``root``, which the paths hold) too: the docs' files were ``unmatched`` there."""
    from api.app import create_app
    from api.settings import Settings

    # no service: the metrics are the requests'
    client = TestClient(create_app(Settings(index="nowhere")), root_path=root)
    client.get(root + "/openapi.json")
    client.get(root + "/docs")
    files = client.get(root + "/static-offline-docs/swagger-ui.css")
    assert files.status_code == 200
    client.get(root + "/no/such/route")
    assert client.post(root + "/v1/identify/").status_code == 404  # a trailing slash: no route serves it
    metrics = client.get(root + "/metrics").text
    for route in ("/openapi.json", "/docs", "/static-offline-docs/{path}"):
        assert f'route="{route}",status="200"' in metrics, route
    assert 'route="unmatched",status="200"' not in metrics
    assert 'route="unmatched",status="404"' in metrics  # what no route serves stays unmatched
    assert 'route="/v1/identify",status="404"' not in metrics  # the trailing-slash 404 is not the route's own


def test_a_trailing_slash_is_a_404_naming_the_route_not_a_redirect_built_from_host(client):
    resp = client.post("/v1/identify/", files=[_image(field="images")], follow_redirects=False)
    assert resp.status_code == 404, (resp.status_code, resp.headers.get("location"))
    assert resp.json()["detail"] == "no route /v1/identify/: send the request to /v1/identify (without the trailing " \
                                    "slash)"
    species = client.get("/v1/species/", follow_redirects=False)
    assert species.status_code == 404 and "send the request to /v1/species (" in species.json()["detail"]
    assert client.get("/no/such/", follow_redirects=False).json()["detail"] == "Not Found"


def test_behind_a_root_path_the_docs_frame_headers_and_the_slash_hint_hold(service):
    """s57: behind a root_path (``uvicorn --root-path /api``: the path holds it) the docs pages lost their frame
    headers and a trailing slash its hint, the app matching the path with the prefix against its routes."""
    from api.app import create_app

    client = TestClient(create_app(service.settings, service=service), root_path="/api")
    for path in ("/api/docs", "/api/redoc"):
        resp = client.get(path)
        assert resp.status_code == 200 and resp.headers["x-frame-options"] == "DENY", path
    resp = client.post("/api/v1/identify/", files=[_image(field="images")], follow_redirects=False)
    assert resp.status_code == 404, (resp.status_code, resp.headers.get("location"))
    assert resp.json()["detail"] == ("no route /api/v1/identify/: send the request to /api/v1/identify (without the "
                                     "trailing slash)")
    assert client.get("/api/no/such/", follow_redirects=False).json()["detail"] == "Not Found"


def test_identify_without_a_body_says_so_in_words(client):
    resp = client.post("/v1/identify")
    assert resp.status_code == 415
    assert resp.json()["detail"].endswith(", not a request without a Content-Type (no body?)"), resp.text


def test_the_guard_writes_its_json_as_the_app_does():
    from api.app import create_app
    from api.settings import Settings

    resp = TestClient(create_app(Settings(index="nowhere", api_keys="k"))).delete("/v1/references/1")
    assert resp.status_code == 401 and resp.content == b'{"detail":"missing or wrong X-API-Key"}'


def test_a_malformed_multipart_body_is_a_400_saying_what_to_send(client):
    for url in ("/v1/identify", "/v1/search"):
        resp = client.post(url, content=b"garbage", headers={"Content-Type": "multipart/form-data"})
        assert resp.status_code == 400, resp.text
        assert resp.json()["detail"] == ("the multipart body cannot be read (Missing boundary in multipart): send "
                                         "multipart/form-data as curl -F or a browser's FormData does"), url


def test_the_add_forms_field_errors_are_fastapis_list_as_the_docs_say(client):
    """docs/api.md, "Limits and errors": a form field FastAPI checks answers the list, one item a field."""
    url = "/v1/species/Naja haje/references"
    resp = client.post(url, files=[_image(field="images")], headers={"X-API-Key": "k"},
                       data={"common_name": "x" * 201, "venomous": "maybe", "new_species": "maybe"})
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert isinstance(detail, list), detail
    assert sorted(err["loc"][-1] for err in detail) == ["common_name", "new_species", "venomous"], detail
    assert _detail(client.post(url, headers={"X-API-Key": "k"}, data={"venomous": "true"}), 415)  # no photo: a line


def test_a_score_that_is_not_finite_is_null_in_the_answer_not_a_500(client, service, monkeypatch):
    """NaN and infinite scores should not happen; when one does, identify still answers 200, with null for it (the
    library's ``to_dict`` makes it None, which the schema's score fields take back), and the schema says so: number
    or null."""
    from retrieval.identify import Identification, RankedResult
    from retrieval.workflows import Answer

    def identify(uploads, *, top, rank, country):
        found = Identification(predictions=[], neighbours=[], unknown=True, venom_unknown_score=float("inf"))
        ranked = [RankedResult(name="Naja haje", rank="species", score=float("nan"), species="Naja haje"),
                  RankedResult(name="Naja naja", rank="species", score=np.float32(0.25), species="Naja naja")]
        return Answer("a.png", identification=found, results=ranked)

    monkeypatch.setattr(service, "identify", identify)
    answer = client.post("/v1/identify", files=[_image(field="images")])
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [r["score"] for r in body["results"]] == [None, 0.25]
    assert body["venom_unknown_score"] is None
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    nullable = [{"type": "number"}, {"type": "null"}]
    assert schemas["ResultOut"]["properties"]["score"]["anyOf"] == nullable, schemas["ResultOut"]
    assert schemas["IdentifyOut"]["properties"]["venom_unknown_score"]["anyOf"] == nullable, schemas["IdentifyOut"]
    assert "score" in schemas["ResultOut"]["required"]  # nullable, not optional: every result carries its score
