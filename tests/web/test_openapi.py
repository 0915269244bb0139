"""``GET /openapi.json``: served by the real app, valid OpenAPI 3.1, one declared operation for
every route the router holds, the seed contract's Connection Service operation and schemas, and
request schemas that accept exactly what the ``proxy.shapes`` declarations accept."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate

from proxy import errors
from proxy.connect.sessions import SessionRequest
from proxy.security.api_keys import API_KEY_SHAPE
from proxy.shapes import ID_PATTERN, Ident, Int, ListOf, Nullable, Number, Simple, Text
from proxy.vault.inputs import OPTIONS, PATCH_SHAPE, PUT_SHAPE
from proxy.vault.tenants import TENANT_SHAPE
from proxy.web.openapi import routes_of
from proxy.web.openapi.components import all_codes
from proxy.web.openapi.declare import Operation
from proxy.web.openapi.document import OPERATIONS, build
from proxy.web.openapi.ops_admin import CONNECT_SESSION_FIELDS
from proxy.web.openapi.ops_front import OBSERVATION_FIELDS
from tests.support.app import RunningService, running_service

SEED = Path("/work/shared/seeds/runtara-connection-service.txt")


@pytest.fixture
async def served(tmp_path: Path) -> tuple[RunningService, dict[str, Any]]:
    async with running_service(tmp_path, connection_service_prefix="/svc/conn") as svc:
        async with svc.session.get(svc.url + "/openapi.json") as r:
            assert r.status == 200
            assert r.content_type == "application/json"
            doc = await r.json()
        yield svc, doc


async def test_the_served_document_is_valid_openapi_3_1_and_public(
    served: tuple[RunningService, dict[str, Any]],
) -> None:
    _svc, doc = served  # fetched without any Authorization header
    assert doc["openapi"] == "3.1.0"
    validate(doc)  # openapi-spec-validator, the 3.1 schema
    assert "x-undeclared-routes" not in doc


async def test_every_route_of_the_router_is_in_the_document(
    served: tuple[RunningService, dict[str, Any]],
) -> None:
    svc, doc = served
    settings_ = svc.settings
    built = build(routes_of(svc.app), prefix="/svc/conn", public_url=settings_.public_url)
    assert built.undeclared == ()
    paths = doc["paths"]
    for method, path in routes_of(svc.app):
        if method == "HEAD":
            continue  # aiohttp's HEAD beside every GET
        plain = re.sub(r"\{(\w+):[^}]*\}", r"{\1}", path)
        if plain == "/svc/conn/{tail}":  # the Connection Service's catch-all, split by its handler
            assert "get" in paths["/svc/conn/{tenant_id}/{connection_id}"]
            assert "get" in paths["/svc/conn/{tenant_id}/{connection_id}/metadata"]
            continue
        methods = ("get", "post", "put", "delete", "patch") if method == "*" else (method.lower(),)
        for m in methods:
            assert m in paths[plain], f"{method} {path} is not in /openapi.json"
    # Under the configured prefix, not the default one.
    assert not any(p.startswith("/connections/") for p in paths)
    for must in (
        "/healthz",
        "/readyz",
        "/metrics",
        "/ca.pem",
        "/openapi.json",
        "/oauth/callback",
        "/proxy/{path}",
    ):
        assert must in paths


def test_a_route_without_a_declaration_is_reported() -> None:
    routes = [("GET", "/healthz"), ("HEAD", "/healthz"), ("GET", "/nginx/decide/{x:.*}")]
    built = build(routes, prefix="/connections", public_url="http://x")
    assert built.undeclared == (("GET", "/nginx/decide/{x}"),)
    assert built.document["x-undeclared-routes"] == ["GET /nginx/decide/{x}"]
    # Declared, it is in the document (and the HEAD beside the GET is not a route of its own).
    op = Operation("GET", "/nginx/decide/{x:.*}", {"responses": {"204": {"description": "yes"}}})
    built = build(routes, prefix="/connections", public_url="http://x", operations=(*OPERATIONS, op))
    assert built.undeclared == ()
    assert "get" in built.document["paths"]["/nginx/decide/{x}"]
    assert "/readyz" not in built.document["paths"]  # only what the router holds


def _seed_document() -> dict[str, Any]:
    text = SEED.read_text()
    start = text.index("openapi: 3.1.0")
    end = text.index("Implementation Considerations", start)
    doc = yaml.safe_load(text[start:end])
    assert doc["paths"], "the seed's OpenAPI document was not found"
    return doc


def _as_3_1(node: Any) -> Any:
    """The seed writes 3.0's ``nullable: true``; OpenAPI 3.1 says ``type: [T, "null"]``."""
    if isinstance(node, dict):
        out = {k: _as_3_1(v) for k, v in node.items() if k != "nullable"}
        if node.get("nullable") is True:
            out["type"] = [node["type"], "null"]
        return out
    if isinstance(node, list):
        return [_as_3_1(v) for v in node]
    return node


def _assert_contains(ours: Any, seed: Any, where: str) -> None:
    """Everything the seed says is in ours, equal (ours may add responses, headers, bodies)."""
    if isinstance(seed, dict):
        assert isinstance(ours, dict), where
        for key, value in seed.items():
            assert key in ours, f"{where}.{key} missing"
            _assert_contains(ours[key], value, f"{where}.{key}")
    else:
        assert ours == seed, f"{where}: {ours!r} != {seed!r}"


async def test_the_connection_service_matches_the_seed_contract(
    served: tuple[RunningService, dict[str, Any]],
) -> None:
    _svc, doc = served
    seed = _as_3_1(_seed_document())
    # The seed's service is mounted at "/"; ours under the configured prefix.
    seed_op = seed["paths"]["/{tenant_id}/{connection_id}"]["get"]
    ours = doc["paths"]["/svc/conn/{tenant_id}/{connection_id}"]["get"]
    assert ours["operationId"] == seed_op["operationId"] == "getConnection"
    assert ours["parameters"][:2] == seed_op["parameters"]  # the path parameters, exactly
    _assert_contains(ours["responses"], seed_op["responses"], "responses")
    # The schemas exactly: nothing added, nothing dropped.
    for name in ("ConnectionResponse", "RateLimitState"):
        assert doc["components"]["schemas"][name] == seed["components"]["schemas"][name], name


async def test_the_errors_are_the_exception_tree(served: tuple[RunningService, dict[str, Any]]) -> None:
    _svc, doc = served
    enum = doc["components"]["schemas"]["Error"]["properties"]["error"]["enum"]
    assert enum == all_codes()
    for code in ("UNAUTHENTICATED", "CONNECTION_NOT_FOUND", "RATE_LIMITED", "CONNECT_LINK_USED", "INTERNAL"):
        assert code in enum
    responses = doc["components"]["responses"]
    assert responses["E404"]["content"]["application/json"]["schema"]["properties"]["error"][
        "enum"
    ] == sorted({"NOT_FOUND", "CONNECTION_NOT_FOUND", "CONNECT_LINK_UNKNOWN"})
    assert "Retry-After" in responses["E429"]["headers"]

    class NewError(errors.ProxyError):  # a class added to the tree is in the enum without more work
        code = "SOMETHING_NEW"
        status = 418

    try:
        assert "SOMETHING_NEW" in all_codes()
    finally:
        del NewError


async def test_the_request_bodies_are_the_shapes_the_handlers_parse_with(
    served: tuple[RunningService, dict[str, Any]],
) -> None:
    _svc, doc = served
    conn = doc["paths"]["/admin/tenants/{tenant_id}/connections/{connection_id}"]

    def schema(op: dict[str, Any]) -> Any:
        return op["requestBody"]["content"]["application/json"]["schema"]

    assert schema(conn["put"]) == PUT_SHAPE.to_json_schema()
    assert schema(conn["patch"]) == PATCH_SHAPE.to_json_schema()
    assert schema(doc["paths"]["/admin/tenants/{tenant_id}"]["put"]) == TENANT_SHAPE.to_json_schema()
    assert (
        schema(doc["paths"]["/admin/tenants/{tenant_id}/api-keys"]["post"]) == API_KEY_SHAPE.to_json_schema()
    )
    put = schema(conn["put"])
    assert put["required"] == ["integration_id"] and put["additionalProperties"] is False
    assert set(put["properties"]) == set(PUT_SHAPE.fields)
    assert set(put["properties"]["options"]["properties"]) == set(OPTIONS.fields)
    # Bodies checked by hand name the handler's own fields.
    assert set(CONNECT_SESSION_FIELDS) == set(SessionRequest.__dataclass_fields__)
    assert set(OBSERVATION_FIELDS) == {"status", "headers", "observed_at"}


def test_every_declared_operation_names_a_registered_route_form() -> None:
    ids = [op.spec.get("operationId") for op in OPERATIONS if "operationId" in op.spec]
    assert len(ids) == len(set(ids)), "operation ids must be unique"
    for op in OPERATIONS:
        assert op.route.startswith(("/", "{prefix}/")), op.route
        assert op.spec["responses"], op.route


def _validator(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    return jsonschema.Draft202012Validator(schema)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
_strings = st.from_regex(ID_PATTERN.replace("{0,199}", "{0,8}"), fullmatch=True) | st.text(max_size=12)
_CHECKS: list[Simple] = [
    Int(0),
    Int(0, 5),
    Number(gt=0),
    Ident(),
    Text(1, 5),
    Text(1, 5, stripped=True),
    Nullable(Text(1, 200)),
    ListOf(Text(1, 6, stripped=True), 3),
]


def _comparable(value: Any) -> bool:
    # JSON Schema's "integer" takes 1.0 (no client sends it: JSON encoders write 1); and Python's
    # re, which jsonschema uses, lets "$" match before a final newline, which ECMA 262 does not.
    def ok(v: Any) -> bool:
        if isinstance(v, float):
            return not v.is_integer()
        if isinstance(v, str):
            return not v.endswith("\n")
        if isinstance(v, list):
            return all(ok(x) for x in v)
        return True

    return ok(value)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    body=st.fixed_dictionaries(
        {},
        optional={
            "integration_id": _strings,
            "connection_subtype": st.none() | _strings,
            "runtime_user_id": st.none() | _strings,
            "rate_limits": st.none()
            | st.lists(
                st.fixed_dictionaries(
                    {"limit": st.integers(-1, 5)}, optional={"window": st.sampled_from(["1m", "x", 5, 0])}
                ),
                max_size=2,
            ),
            "allowed_hosts": st.none() | st.lists(_strings, max_size=2),
            "metadata": st.none() | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
            "options": st.none()
            | st.fixed_dictionaries(
                {}, optional={"retries": st.integers(-1, 7), "max_wait_ms": st.none() | st.integers(-1, 9)}
            ),
            "surprise": st.integers(),
        },
    )
)
def test_the_put_schema_accepts_exactly_the_bodies_put_accepts(body: dict[str, Any]) -> None:
    if not _comparable(list(body.values())) or not _comparable(json.loads(json.dumps(body))):
        return
    _values, problems = PUT_SHAPE.parse(body)
    assert (problems == {}) == _validator(PUT_SHAPE.to_json_schema()).is_valid(body), (body, problems)
