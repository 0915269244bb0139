"""Schemathesis against the served ``/openapi.json`` of a real running service: every operation,
valid and invalid inputs, bounded examples and a fixed seed. The service must answer no 5xx, only
statuses its document declares, and bodies, content types and headers that fit the declaration.

The service runs in-process on a real socket with a real upstream on loopback (a seeded
connection points at it, so the proxy and the Connection Service reach their success paths);
schemathesis' synchronous client runs in a thread so the loop keeps serving both. Half the
cases use the seeded tenant and connection ids instead of generated ones: random ids alone
would only ever find 404s.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.app import ADMIN_TOKEN, running_service
from tests.support.upstream import Upstream

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
SEEDED = {"tenant_id": "t1", "connection_id": "c1"}
SEEDED_HEADERS = {"X-Connection-Id": "c1", "X-Tenant-Id": "t1", "X-Org-Id": "t1"}
# Per operation and mode: ~45 operations x 2 modes x 4 is ~400 requests, ~20 s of CPU. A deeper
# run for a bug hunt: OPENAPI_FUZZ_EXAMPLES=50 pytest tests/web/test_openapi_schemathesis.py
EXAMPLES = int(os.environ.get("OPENAPI_FUZZ_EXAMPLES", "4"))


def _examples(
    op: Any, mode: GenerationMode, base_url: str, session: requests.Session, failures: list[str]
) -> None:
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],  # no shrinking: report, do not minimise
    )
    @given(case=op.as_strategy(generation_mode=mode), seeded=st.booleans())
    def run(case: Any, seeded: bool) -> None:
        if seeded:
            for name, value in SEEDED.items():
                if case.path_parameters and name in case.path_parameters:
                    case.path_parameters[name] = value
            if op.path.startswith(("/proxy", "/api/internal/")):
                case.headers = {**(case.headers or {}), **SEEDED_HEADERS}
            if isinstance(case.body, dict) and "connection_id" in case.body:
                case.body["connection_id"] = "c1"
        try:
            case.call_and_validate(base_url=base_url, session=session, checks=CHECKS, timeout=10)
        except (Exception, FailureGroup) as exc:  # FailureGroup is a BaseExceptionGroup
            failures.append(f"{op.method.upper()} {op.path} [{mode.value}]: {exc}"[:2000])

    try:
        run()
    except Unsatisfiable:
        # Nothing to make invalid (an operation without parameters or body): positive only.
        assert mode is GenerationMode.NEGATIVE, f"{op.method} {op.path}: no valid case generated"


def _fuzz(
    base_url: str,
    seed: dict[str, Any],
    only: Callable[[str], bool] = lambda path: True,
    break_it: bool = False,
) -> tuple[list[str], Counter[tuple[str, str, int]]]:
    got = requests.get(base_url + "/openapi.json", timeout=10)
    assert got.status_code == 200
    doc = got.json()
    if break_it:  # the canary: a declaration the service does not keep must be reported
        ready = doc["paths"]["/readyz"]["get"]["responses"]["200"]["content"]["application/json"]
        ready["schema"]["properties"]["status"] = {"const": "never"}
        del doc["paths"]["/readyz"]["get"]["responses"]["503"]
    schema = schemathesis.openapi.from_dict(doc)
    failures: list[str] = []
    seen: Counter[tuple[str, str, int]] = Counter()
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
        session.hooks["response"].append(
            lambda r, *a, **k: seen.update([(r.request.method, urlsplit(r.url).path, r.status_code)])
        )
        for result in schema.get_all_operations():
            op = result.ok()
            if not only(op.path):
                continue
            # Again before every operation: a DELETE or a PUT of the one before may have changed it.
            put = session.put(f"{base_url}/admin/tenants/t1/connections/c1", json=seed, timeout=10)
            assert put.status_code in (200, 201), put.text
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                _examples(op, mode, base_url, session, failures)
    return failures, seen


@pytest.mark.system  # a fuzz run of every operation: tens of seconds, so not in make test-fast
async def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    tmp_path: Path, upstream: Upstream
) -> None:
    seed = {
        "integration_id": "http_bearer",
        "parameters": {"token": "tok-schemathesis-0001", "base_url": upstream.url},
        "rate_limits": [{"limit": 100000, "window": "1m"}],
    }
    async with running_service(tmp_path, trusted_networks=["127.0.0.1/32"]) as svc:
        canary, _ = await asyncio.to_thread(_fuzz, svc.url, seed, lambda path: path == "/readyz", True)
        failures, seen = await asyncio.to_thread(_fuzz, svc.url, seed)
    assert canary and all("/readyz" in f for f in canary), canary
    assert not failures, "\n\n".join(failures)
    # The run reached the success paths, not only 404s and 422s.
    ok = {(m, p) for (m, p, status), _n in seen.items() if status < 300}
    for must in [("GET", "/connections/t1/c1"), ("GET", "/admin/tenants/t1/connections/c1")]:
        assert must in ok, sorted(seen.items())
    assert any(m != "GET" and p.startswith("/proxy/") for m, p in ok), [k for k in seen if "/proxy" in k[1]]
    print(
        f"schemathesis: {sum(seen.values())} requests",
        sorted(Counter(s for *_, s in seen.elements()).items()),
    )
