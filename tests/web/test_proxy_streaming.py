"""Streaming both ways with constant memory, in a real service process; bodies pass unchanged."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.app import ADMIN_TOKEN, RunningService, running_service, start_service_process
from tests.support.upstream import PATTERN, Upstream, pattern_bytes

GIB = 1 << 30
# The memory test moves this much each way (override with CONNECTION_PROXY_TEST_STREAM_BYTES).
STREAM_BYTES = int(os.environ.get("CONNECTION_PROXY_TEST_STREAM_BYTES", str(GIB)))
MAX_GROWTH = 50 * 1024 * 1024


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


async def _generate(total: int) -> AsyncIterator[bytes]:
    left = total
    while left > 0:
        part = PATTERN if left >= len(PATTERN) else PATTERN[:left]
        left -= len(part)
        yield part


def _pattern_sha(total: int) -> str:
    digest = hashlib.sha256()
    full, rest = divmod(total, len(PATTERN))
    for _ in range(full):
        digest.update(PATTERN)
    digest.update(PATTERN[:rest])
    return digest.hexdigest()


@pytest.mark.system
async def test_one_gib_each_way_in_constant_memory(tmp_path: Path, upstream: Upstream) -> None:
    with start_service_process(tmp_path / "svc") as proc:
        pid = proc.proc.pid
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        h = {**admin, "X-Tenant-Id": "t1", "X-Connection-Id": "big"}
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.put(
                proc.url + "/admin/tenants/t1/connections/big",
                json={
                    "integration_id": "http_bearer",
                    "parameters": {"token": "t", "base_url": upstream.url},
                },
                headers=admin,
            ) as r:
                assert r.status in (200, 201), await r.text()
            # Warm up every code path once, then measure from a settled baseline.
            async with session.get(proc.url + "/proxy/download?n=1000000", headers=h) as r:
                assert len(await r.read()) == 1_000_000
            baseline_kb = _status_kb(pid, "VmRSS")
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak (VmHWM) to now

            started = time.monotonic()
            received = 0
            digest = hashlib.sha256()
            async with session.get(proc.url + f"/proxy/download?n={STREAM_BYTES}", headers=h) as r:
                assert r.status == 200
                assert int(r.headers["Content-Length"]) == STREAM_BYTES
                async for chunk in r.content.iter_chunked(1 << 20):
                    if received < 4 << 20:
                        digest.update(chunk[: (4 << 20) - received])
                    received += len(chunk)
            download_s = time.monotonic() - started
            assert received == STREAM_BYTES
            assert digest.hexdigest() == _pattern_sha(4 << 20)

            started = time.monotonic()
            async with session.post(proc.url + "/proxy/upload", data=_generate(STREAM_BYTES), headers=h) as r:
                assert r.status == 200, await r.text()
                result = await r.json()
            upload_s = time.monotonic() - started
            assert result == {"len": STREAM_BYTES, "sha256": _pattern_sha(STREAM_BYTES)}

            peak_kb = _status_kb(pid, "VmHWM")
        growth = (peak_kb - baseline_kb) * 1024
        mib = STREAM_BYTES / (1 << 20)
        print(
            f"\nstreamed {mib:.0f} MiB down in {download_s:.1f}s and up in {upload_s:.1f}s; "
            f"service RSS baseline {baseline_kb / 1024:.1f} MiB, peak growth {growth / (1 << 20):.1f} MiB"
        )
        assert growth < MAX_GROWTH, f"RSS grew by {growth / (1 << 20):.1f} MiB"


# --- bodies pass unchanged ---------------------------------------------------------------------


@pytest.fixture
async def svc(tmp_path: Path, upstream: Upstream) -> AsyncIterator[RunningService]:
    async with running_service(tmp_path) as s:
        await s.put_connection(
            "t1",
            "c1",
            {"integration_id": "http_bearer", "parameters": {"token": "t", "base_url": upstream.url}},
        )
        yield s


def _h(svc: RunningService, **extra: str) -> dict[str, str]:
    return {**svc.admin_headers, "X-Tenant-Id": "t1", "X-Connection-Id": "c1", **extra}


async def test_chunked_download_passes_unchanged(svc: RunningService) -> None:
    async with svc.session.get(svc.url + "/proxy/download?n=300000&chunked=1", headers=_h(svc)) as r:
        assert r.status == 200
        assert "Content-Length" not in r.headers
        assert r.headers.get("Transfer-Encoding") == "chunked"
        assert await r.read() == pattern_bytes(300000)


async def test_chunked_parts_arrive(svc: RunningService) -> None:
    async with svc.session.get(svc.url + "/proxy/chunked?parts=20", headers=_h(svc)) as r:
        assert await r.text() == "".join(f"part-{i};" for i in range(20))


async def test_sized_upload_keeps_content_length(svc: RunningService, upstream: Upstream) -> None:
    body = os.urandom(3_000_000)
    async with svc.session.put(svc.url + "/proxy/upload", data=body, headers=_h(svc)) as r:
        assert await r.json() == {"len": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert upstream.seen[-1].header("Content-Length") == [str(len(body))]
    assert "transfer-encoding" not in upstream.seen[-1].header_names


async def test_multipart_passes_byte_for_byte(svc: RunningService, upstream: Upstream) -> None:
    boundary = "----proxytestboundary"
    blob = os.urandom(5000)
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="field"\r\n\r\nvalue\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="b.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + blob
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = _h(svc, **{"Content-Type": f"multipart/form-data; boundary={boundary}"})
    async with svc.session.post(svc.url + "/proxy/upload", data=body, headers=headers) as r:
        assert await r.json() == {"len": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert upstream.seen[-1].header("Content-Type") == [f"multipart/form-data; boundary={boundary}"]


async def test_compressed_response_not_decoded(svc: RunningService) -> None:
    q = "respond_header=Content-Encoding:gzip"
    async with svc.session.get(svc.url + "/proxy/echo?" + q, headers=_h(svc), auto_decompress=False) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        raw = await r.read()
    assert raw.startswith(b"{")  # passed as the upstream sent it, not re-encoded or decoded


async def test_head_keeps_content_length(svc: RunningService) -> None:
    async with svc.session.head(svc.url + "/proxy/download?n=12345", headers=_h(svc)) as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == "12345"
        assert await r.read() == b""
