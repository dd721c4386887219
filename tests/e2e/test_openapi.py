"""GET /openapi.json of `splitserve up` against the implementation: the routes it lists are the
server's routes, its limits are the served model's, and schemathesis, driven from it, finds nothing
(no 5xx, documented statuses, content types and bodies, invalid input refused, valid input served)."""
from __future__ import annotations

import json
import urllib.request

import pytest

from splitserve.bench import http_fuzz
from splitserve.gateway.api_fields import FIELDS, REQUIRED

BOUNDED_EXAMPLES = 250  # generated requests in the bounded run (~15 s on an idle 2-core machine)


def get(url: str):
    with urllib.request.urlopen(url, timeout=60) as resp:
        return resp.status, resp.headers.get("content-type"), json.load(resp)


@pytest.fixture(scope="module")
def base(http_stack) -> str:
    return http_stack.http_base.removesuffix("/v1")


@pytest.fixture(scope="module")
def doc(base) -> dict:
    status, content_type, body = get(base + "/openapi.json")
    assert status == 200 and content_type == "application/json"
    return body


def test_the_document_lists_exactly_the_servers_routes_and_methods(doc):
    from starlette.routing import Route

    from splitserve.gateway.http import HttpApi

    app = HttpApi(service=None).app
    served = {route.path.replace("{model:path}", "{model}"): {m.lower() for m in route.methods} - {"head"}
              for route in app.routes if isinstance(route, Route)}
    assert doc["openapi"] == "3.1.0"
    assert {path: set(ops) for path, ops in doc["paths"].items()} == served


def test_the_documents_limits_are_the_served_models(doc, base):
    _, _, models = get(base + "/v1/models")
    card = models["data"][0]
    schemas = doc["components"]["schemas"]
    for kind in ("completion", "chat"):
        body = schemas[kind]
        assert set(body["properties"]) == set(FIELDS[kind]) and body["required"] == list(REQUIRED[kind])
        assert body["properties"]["model"]["enum"] == [card["id"]]
        assert body["properties"]["max_tokens"]["maximum"] == card["max_model_len"] - 1
        assert str(card["max_model_len"]) in body["description"]
    token_ids = schemas["completion"]["properties"]["prompt"]["anyOf"][2]["items"]
    assert token_ids["maximum"] == 49151  # the default model's vocabulary: 49,152 ids


def test_schemathesis_from_the_document_finds_nothing_and_the_server_serves_afterwards(base, doc):
    tally = http_fuzz.run(base, BOUNDED_EXAMPLES, seed=18, doc=doc)
    report = json.dumps(tally.summary()) + json.dumps(tally.examples)[:3000]
    assert tally.requests >= BOUNDED_EXAMPLES * 0.9, report
    assert tally.by_mode["positive"] > 50 and tally.by_mode["negative"] > 50, report
    assert tally.statuses[200] > 50 and tally.statuses[400] > 30, report  # both sides were exercised
    assert tally.num_5xx == 0 and not tally.transport_errors and not tally.check_failures, report
    status, _, health = get(base + "/health")
    assert status == 200 and health["status"] == "ok"
    model = doc["components"]["schemas"]["completion"]["properties"]["model"]["enum"][0]
    req = urllib.request.Request(base + "/v1/completions", json.dumps(
        {"model": model, "prompt": "Hello", "max_tokens": 3, "ignore_eos": True}).encode(),
        {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200 and json.load(resp)["usage"]["completion_tokens"] == 3
