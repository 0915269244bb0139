"""Dev-mode secrets on a fresh data dir: created once, complete, private, and the same for every
process that starts at the same moment (``serve --workers N``, replicas sharing a volume)."""

from __future__ import annotations

import multiprocessing
import stat
from pathlib import Path

import pytest

from proxy.security.bootstrap import DEV_KEY_FILE, DEV_TOKEN_FILE, load_secrets
from proxy.settings import load_settings


def _start(
    data_dir: str, barrier: multiprocessing.synchronize.Barrier, out: multiprocessing.Queue[tuple[str, str]]
) -> None:
    settings = load_settings(env={}, overrides={"data_dir": data_dir, "dev_mode": True})
    barrier.wait()
    secrets = load_secrets(settings)
    out.put((secrets.ring.fingerprint(secrets.ring.newest_version), secrets.admin_token))


@pytest.mark.system
def test_processes_starting_together_on_a_fresh_dir_share_one_key_and_token(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    n = 6
    for attempt in range(3):  # the race window is small: give it several chances to show
        data_dir = tmp_path / f"data{attempt}"
        barrier = ctx.Barrier(n)
        out: multiprocessing.Queue[tuple[str, str]] = ctx.Queue()
        procs = [ctx.Process(target=_start, args=(str(data_dir), barrier, out)) for _ in range(n)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * n
        results = {out.get(timeout=5) for _ in range(n)}
        assert len(results) == 1  # one key, one token, whoever won
        files = sorted(f.name for f in data_dir.iterdir())
        assert files == sorted([DEV_KEY_FILE, DEV_TOKEN_FILE])  # no temporary files left behind
        for name in files:
            assert stat.S_IMODE((data_dir / name).stat().st_mode) == 0o600


def test_an_existing_key_is_never_replaced(tmp_path: Path) -> None:
    settings = load_settings(env={}, overrides={"data_dir": str(tmp_path), "dev_mode": True})
    first = load_secrets(settings)
    key_text = (tmp_path / DEV_KEY_FILE).read_text()
    again = load_secrets(settings)
    assert (tmp_path / DEV_KEY_FILE).read_text() == key_text
    assert again.ring.fingerprint(again.ring.newest_version) == first.ring.fingerprint(
        first.ring.newest_version
    )
    assert again.admin_token == first.admin_token
