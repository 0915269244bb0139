"""docs/configuration.md is generated from proxy/settings.py and must match it; every setting has a
description (its field's docstring)."""

from __future__ import annotations

import dataclasses

import pytest

from proxy import configref, settings
from tests.support.app import REPO_ROOT


def test_the_configuration_reference_is_current() -> None:
    on_disk = (REPO_ROOT / configref.DOC_PATH).read_text(encoding="utf-8")
    assert on_disk == configref.render(), f"{configref.DOC_PATH} is stale: run {configref.REGENERATE}"


def test_every_setting_and_every_field_is_described() -> None:
    listed = {e.key for e in configref.entries()}
    assert listed == set(settings._PARSERS)
    docs = configref.field_docs()
    composite_parts = {n for names in settings.COMPOSITE_KEYS.values() for n in names[1:]}
    undocumented = [
        f.name
        for f in dataclasses.fields(settings.Settings)
        if f.name not in docs and f.name not in composite_parts
    ]
    assert undocumented == []


def test_a_setting_without_a_description_names_itself_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(configref, "field_docs", lambda: {})
    with pytest.raises(ValueError, match=r"setting 'listen' has no description.*make docs"):
        configref.entries()


def test_bounds_and_secrets_come_from_the_parsers_and_fields() -> None:
    by_key = {e.key: e for e in configref.entries()}
    assert by_key["workers"].type == "integer, >= 1"
    assert by_key["ratelimit_fail_mode"].type == "string, one of open, closed"
    assert by_key["admin_token"].secret and not by_key["listen"].secret
    assert by_key["envelope_max_response_bytes"].default == "10485760 (10 MiB)"
    assert by_key["dev_mode"].env == "PROXY_DEV_MODE"
