"""proxy.services wires one stale-if-error window into every cache of store reads and /readyz."""

from __future__ import annotations

from pathlib import Path

from proxy.services import build_services
from proxy.settings import load_settings


def test_every_cache_of_store_reads_shares_the_one_window_from_the_setting(tmp_path: Path) -> None:
    settings = load_settings(
        env={}, overrides={"data_dir": str(tmp_path), "dev_mode": True, "stale_if_error_s": 42.0}
    )
    svc = build_services(settings)
    assert svc.stale.stale_s == 42.0
    # One object: they agree on whether the store is down, since when, and for how long to serve.
    assert svc.vault.stale is svc.stale
    assert svc.auth.stale is svc.stale
    assert svc.tenant_flags.stale is svc.stale
