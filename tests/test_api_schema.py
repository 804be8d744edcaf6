"""Property-based tests over the OpenAPI schema with schemathesis: no input gives a 5xx.

Every operation is called with generated parameters and bodies, valid ones and invalid ones (with the
API key, so writes get past the auth check and reach the upload validation), against a private copy of
the small MobileNetV1 gallery; every response must be a non-5xx that matches the documented schema.

(``schemathesis.pytest.from_fixture`` fails under pytest 9 -- it reads the removed ``Node._nodeid`` --
so the cases come from each operation's hypothesis strategy instead.)
"""

from __future__ import annotations

import pytest
from _api_support import API_KEY, gallery_copy
from conftest import needs_shared

#: (method, path) of every operation in the schema (checked against the app's schema below).
OPERATIONS = [
    ("POST", "/v1/identify"),
    ("POST", "/v1/search"),
    ("GET", "/v1/species"),
    ("GET", "/v1/species/{name}"),
    ("POST", "/v1/species/{name}/references"),
    ("PUT", "/v1/species/{name}/venomous"),
    ("DELETE", "/v1/references/{ref_id}"),
    ("GET", "/v1/references/{ref_id}/image"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
]
#: Operations without inputs to get wrong have no negative cases.
NO_INPUT = {("GET", "/v1/species"), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")}
CASES = [(m, p, mode) for m, p in OPERATIONS for mode in ("positive", "negative")
         if mode == "positive" or (m, p) not in NO_INPUT]
EXAMPLES = 25  # per operation and generation mode; each case is one in-process request


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    needs_shared()
    import schemathesis

    from api.app import create_app
    from api.service import SpeciesService
    from api.settings import Settings

    index = gallery_copy(tmp_path_factory, "api_schema")
    settings = Settings(index=str(index), api_keys=API_KEY, precision="fp32")
    # schemathesis ends the app's lifespan after every test: a service given to create_app stays open
    # (the model loads once here) and is closed by this fixture
    service = SpeciesService(settings)
    yield schemathesis.openapi.from_asgi("/openapi.json", create_app(settings, service=service))
    service.close()


def test_the_schema_lists_every_operation(api_schema):
    listed = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert listed == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_no_server_errors(api_schema, method, path, mode):
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    operation = api_schema[path][method]
    strategy = operation.as_strategy(generation_mode=GenerationMode(mode))

    @given(case=strategy)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(case):
        case.call_and_validate(
            headers={"X-API-Key": API_KEY}, checks=[not_a_server_error, response_schema_conformance]
        )

    run()
