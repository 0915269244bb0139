"""The decision's pure parts: observation tokens, the injectable header set, cache lifetimes.
The decision itself runs end to end in tests/web/test_decide.py (through real nginx)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.catalogue import Catalogue
from proxy.pipeline.decision import Decider, injectable_headers, observation_key
from proxy.web.decide import DECIDER
from tests.support.app import RunningService, running_service
from tests.support.nginx import DECISION_TOKEN


def test_observation_key_is_derived_and_distinct() -> None:
    a, b = observation_key(b"\x01" * 32), observation_key(b"\x02" * 32)
    assert a == observation_key(b"\x01" * 32) and a != b and len(a) == 32


def test_injectable_headers() -> None:
    names = injectable_headers(Catalogue.load(), ["X-Acme", "Bad_Name", "Host", "Transfer-Encoding", " "])
    assert {"authorization", "cookie", "x-api-key", "x-acme"} <= set(names)
    # Ambiguous as an nginx variable, or framing/routing: never settable, such calls take the service route.
    assert not {"bad_name", "host", "transfer-encoding", ""} & set(names)
    assert list(names) == sorted(names)


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[RunningService]:
    async with running_service(tmp_path, decision_token=DECISION_TOKEN) as s:
        yield s


async def test_tokens_verify_only_unchanged_and_unexpired(
    svc: RunningService, monkeypatch: pytest.MonkeyPatch
) -> None:
    decider: Decider = svc.app[DECIDER]
    token = decider.sign("api_key:k1", "t1", "c1")
    assert decider.verify(token) == ("api_key:k1", "t1", "c1")
    body, _, mac = token.partition(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload[2] = "c2"
    other = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
    assert decider.verify(f"{other}.{mac}") is None
    assert decider.verify("x.y") is None and decider.verify("") is None
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 3600)
    assert decider.verify(token) is None


async def test_lifetime_bound_by_the_in_process_caches(tmp_path: Path) -> None:
    async with running_service(
        tmp_path, decision_token=DECISION_TOKEN, nginx_decision_cache_s=30, credential_cache_ttl_s=3
    ) as s:
        # nginx may hold an entry one second past its lifetime: 3 s caches allow 2 s.
        assert s.app[DECIDER].max_lifetime == 2
    async with running_service(tmp_path / "b", decision_token=DECISION_TOKEN, credential_cache_ttl_s=1) as s:
        assert s.app[DECIDER].max_lifetime == 0
