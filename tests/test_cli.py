"""The serve command's process-level tuning (the commands themselves run as real processes in
tests/web and tests/vault/test_vault.py)."""

from __future__ import annotations

import gc

from proxy.cli import GC_GEN0_THRESHOLD, _tune_collector


async def test_the_collector_is_tuned_for_a_server_once_started() -> None:
    before = gc.get_threshold()
    try:
        await _tune_collector(None)
        gen0, gen1, gen2 = gc.get_threshold()
        assert gen0 == GC_GEN0_THRESHOLD > before[0]
        assert (gen1, gen2) == before[1:]  # the older generations keep their settings
        assert gc.get_freeze_count() > 0  # the start-up heap is out of the collector's way
        assert gc.collect() >= 0  # collection still works
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
