"""The OpenAPI document: it covers every route under /api, its page works offline, and schemathesis
finds the live API (a real app.py process) true to it: no 5xx, only documented statuses, bodies,
content types and headers as described."""

from __future__ import annotations

import os
import re
from dataclasses import replace

import fakeredis
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app import create_app
from notifier import consent, keys
from notifier.api.openapi import api_routes, openapi_path, stale, undocumented
from notifier.api.operations import OPERATIONS
from notifier.db import database
from notifier.models import Status
from tests.helpers import LITERAL, VERIFICATION, make_notification
from tests.processes import Stack, request

# Bounded, so the suite stays quick; FUZZ_RANDOM=1 explores new inputs on each run instead of the same ones.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
DERANDOMIZE = os.environ.get("FUZZ_RANDOM") != "1"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


@pytest.fixture
def local_app(sqlite_settings, sqlite_db):
    """The API on SQLite and fakeredis: enough to read its routes and its document."""
    return create_app(sqlite_settings, redis=fakeredis.FakeRedis())


def test_every_route_under_api_is_documented(local_app):
    assert undocumented(local_app, OPERATIONS) == [], "add these to notifier/api/operations.py"
    assert stale(local_app, OPERATIONS) == [], "these routes are gone: remove them from notifier/api/operations.py"


def test_document_describes_each_route_method_and_the_error_envelope(local_app):
    response = local_app.test_client().get("/api/openapi.json")

    assert response.status_code == 200
    spec = response.get_json()
    assert spec["openapi"].startswith("3.")
    described = {(path, method.upper()) for path, item in spec["paths"].items() for method in item
                 if method != "parameters"}
    assert described == {(openapi_path(rule), method) for rule, method in api_routes(local_app)}
    assert spec["components"]["securitySchemes"]["ApiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert set(spec["components"]["schemas"]["Error"]["properties"]) == {"error"}
    send = spec["paths"]["/api/notifications/send"]["post"]
    assert {"400", "401", "409", "413", "422", "503"} <= set(send["responses"])
    assert {"$ref": "#/components/parameters/Idempotency-Key"} in send["parameters"]
    assert spec["paths"]["/api/health"]["get"]["security"] == []


def test_document_gives_the_idempotency_key_headers_constraints(local_app):
    header = local_app.test_client().get("/api/openapi.json").get_json()["components"]["parameters"]["Idempotency-Key"]
    assert header["schema"]["maxLength"] == 255
    pattern = re.compile(header["schema"]["pattern"])
    assert pattern.search("order-1 a/b:c") and pattern.search("k" * 255)
    for refused in ("a,b", "ключ", "caf\u00e9", "k\x00", ""):
        assert not pattern.search(refused), refused


def test_docs_page_lists_every_operation_and_loads_nothing_from_elsewhere(local_app):
    client = local_app.test_client()
    response = client.get("/api/docs")

    assert response.status_code == 200
    assert response.content_type.startswith("text/html")
    page = response.get_data(as_text=True)
    for rule, method in api_routes(local_app):
        assert f"{method}</span> <span class=\"path\">{openapi_path(rule)}</span>" in page
    assert "<script" not in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page must work offline"
    assert "idempotency_key" in page and "X-API-Key" in page


def test_document_and_page_need_no_api_key_and_say_which_request_they_answer(local_app):
    client = local_app.test_client()
    for path in ("/api/openapi.json", "/api/docs"):
        response = client.get(path, headers={"X-Request-ID": "docs-check.1"})
        assert response.status_code == 200
        assert response.headers["X-Request-ID"] == "docs-check.1"


# --- schemathesis against a real app.py process --------------------------------------------------------


@pytest.fixture
def live_api(pg_settings, pg_db, redis_conn, tmp_path):
    """(base URL, API key) of app.py on the real PostgreSQL and Redis, with a rate limit the fuzzing
    never reaches (429 is documented, but a test answered 429 tests nothing else)."""
    stack = Stack(replace(pg_settings), tmp_path, RATE_LIMIT="1000000/minute").start("api")
    yield stack.base, stack.key
    stack.close()


def _seed(base: str, key: str) -> dict[str, list[str]]:
    """Things of the key's own for path parameters to name: notifications (one failed), a suppression."""
    ids = []
    seeds = (("send", LITERAL), ("send-verification", VERIFICATION), ("send", LITERAL | {"delay_seconds": 60}))
    for path, body in seeds:
        status, answer = request("POST", f"{base}/api/notifications/{path}", key, body)
        assert status == 202, answer
        ids.append(answer["id"])
    with database.connection_context():
        owner = keys.authenticate(key)
        consent.suppress(owner.id, "gone@example.com", reason="550 no such user")
    ids.append(make_notification(owner, Status.FAILED, last_error="550 no such user").id)
    return {"notification_id": ids, "email": ["gone@example.com"], "user_id": ["u1"]}


@pytest.mark.integration
def test_live_api_conforms_to_its_document(live_api):
    base, key = live_api
    known = _seed(base, key)
    schema = schemathesis.openapi.from_url(f"{base}/api/openapi.json")
    problems = []
    for result in schema.get_all_operations():
        operation = result.ok()
        # Valid requests and invalid ones alike: either way the answer must be one the document describes.
        strategies = [operation.as_strategy(mode, headers={"X-API-Key": key}) for mode in GenerationMode]
        for parameter in operation.path_parameters:
            # Also paths that name things that exist, so success answers are checked too.
            strategies += [operation.as_strategy(headers={"X-API-Key": key}, path_parameters={parameter.name: value})
                           for value in known.get(parameter.name, [])]

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
                  suppress_health_check=list(HealthCheck))
        @given(case=st.one_of(*strategies))
        def conforms(case):
            case.call_and_validate(base_url=base, checks=CHECKS, timeout=10)

        try:
            conforms()
        # schemathesis reports its findings as a BaseExceptionGroup; collect every operation's, then report all.
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001
            problems.append(f"{operation.label}: {exc}")
    assert not problems, "\n\n".join(problems)
