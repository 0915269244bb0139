"""Rate-limit signal parsing: real vendor header samples in, facts out, and never an exception."""

from __future__ import annotations

import logging
import random
from email.utils import formatdate, parsedate_to_datetime

import pytest
from multidict import CIMultiDict

from proxy.ratelimit.signals.core import (
    MAX_COUNT,
    MAX_HORIZON_S,
    MAX_WINDOW_S,
    STYLES,
    Observation,
    Policy,
    parse_response,
    retry_after,
)
from proxy.ratelimit.signals.vendors import go_duration

NOW = 1_700_000_000.0


def close(expected: float | None) -> object:
    # Epoch-sized floats: pytest.approx's default relative tolerance would allow ~30 minutes.
    return None if expected is None else pytest.approx(expected, rel=0, abs=1e-6)


def epoch(http_date: str) -> float:
    return parsedate_to_datetime(http_date).timestamp()


def policy(obs: Observation, name: str) -> Policy:
    found = [p for p in obs.policies if p.name == name]
    assert len(found) == 1, obs
    return found[0]


# --- fast path and plumbing -----------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 404, 429, 503])
def test_no_known_header_is_empty(status: int) -> None:
    headers = {"Content-Type": "application/json", "Date": "Wed, 21 Oct 2015 07:28:00 GMT"}
    obs = parse_response(status, headers, now=NOW)
    assert obs == Observation(status, None, (), ())
    assert obs.is_empty()


def test_header_names_are_case_insensitive_and_pairs_are_accepted() -> None:
    pairs = [("X-RATELIMIT-LIMIT", "60"), ("x-RateLimit-Remaining", "59")]
    obs = parse_response(200, pairs, now=NOW)
    assert obs.policies == (Policy("default", 60, None, 59, None),)
    assert not obs.is_empty()


def test_header_names_are_classified_once_and_the_cache_stays_bounded() -> None:
    from proxy.ratelimit.signals import core as signals

    for i in range(3 * signals._NAMES_MAX):
        assert parse_response(200, [(f"X-Noise-{i}", "1")], now=NOW).is_empty()
    assert len(signals._names) <= signals._NAMES_MAX
    for _ in range(2):  # a second pass answers from the cache, with the same result
        obs = parse_response(429, [("Retry-After", "7"), ("X-Noise-1", "1"), (b"raw", "x")], now=NOW)  # type: ignore[list-item]
        assert obs.blocked_until == NOW + 7


def test_multidict_duplicates_are_combined_as_one_structured_list() -> None:
    headers = CIMultiDict(
        [
            ("RateLimit-Policy", '"burst";q=100;w=60'),
            ("RateLimit-Policy", '"daily";q=1000;w=86400'),
        ]
    )
    obs = parse_response(200, headers, now=NOW)
    assert [p.name for p in obs.policies] == ["burst", "daily"]


def test_styles_as_a_bare_string_means_that_one_style() -> None:
    obs = parse_response(200, {"X-RateLimit-Limit": "60"}, now=NOW, styles="github")
    assert obs.styles == ("github",)


def test_styles_constant_lists_every_supported_style() -> None:
    assert set(STYLES) >= {
        "retry-after", "ietf", "github", "x", "discord", "atlassian", "openai",
        "anthropic", "shopify", "salesforce", "hubspot", "zendesk",
    }  # fmt: skip
    assert len(set(STYLES)) == len(STYLES)


# --- Retry-After ----------------------------------------------------------------------------

DATE = "Wed, 21 Oct 2015 07:28:00 GMT"


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (429, {}, None),
        (429, {"Retry-After": "2"}, NOW + 2),
        (429, {"Retry-After": "1.5"}, NOW + 1.5),
        (503, {"Retry-After": "120"}, NOW + 120),
        (429, {"Retry-After": "0"}, NOW),
        (429, {"Retry-After": "-5"}, NOW),  # negative clamps to now
        (429, {"Retry-After": str(int(MAX_HORIZON_S) + 1)}, None),  # absurd: ignored
        (429, {"Retry-After": "soon"}, None),
        (429, {"Retry-After": ""}, None),
        # Date-corrected HTTP-date: 30 s after the upstream's own Date, whatever our clock says.
        (429, {"Date": DATE, "Retry-After": "Wed, 21 Oct 2015 07:28:30 GMT"}, NOW + 30),
        (429, {"Date": DATE, "Retry-After": "Wed, 21 Oct 2015 07:27:00 GMT"}, NOW),
        (429, {"retry-after-ms": "1500"}, NOW + 1.5),
        (429, {"x-ms-retry-after-ms": "250"}, NOW + 0.25),
        (429, {"retry-after-ms": "1500", "Retry-After": "2"}, NOW + 1.5),  # the precise one wins
        (429, {"retry-after-ms": "junk", "Retry-After": "2"}, NOW + 2),
        (200, {"Retry-After": "2"}, None),
        (401, {"Retry-After": "2"}, None),
        (301, {"Retry-After": "2"}, None),
        # GitHub secondary rate limit: 403 with Retry-After.
        (403, {"Retry-After": "60", "X-RateLimit-Remaining": "4999"}, NOW + 60),
        (403, {"X-RateLimit-Limit": "5000"}, None),  # a plain permission error
    ],
)
def test_retry_after(status: int, headers: dict[str, str], expected: float | None) -> None:
    obs = parse_response(status, headers, now=NOW)
    assert obs.blocked_until == close(expected)
    assert ("retry-after" in obs.styles) == (expected is not None)


@pytest.mark.parametrize("status", [429, 502, 503, 504])  # what the proxy retries
def test_retry_after_is_the_same_reading_whatever_the_status(status: int) -> None:
    # The proxy's retries wait for the same instant the limiter learns from a 429.
    cases = [
        ({"Retry-After": "2"}, NOW + 2),
        ({"Retry-After": "0.5"}, NOW + 0.5),
        ({"Retry-After-Ms": "1500", "Retry-After": "9"}, NOW + 1.5),
        ({"Date": DATE, "Retry-After": "Wed, 21 Oct 2015 07:28:30 GMT"}, NOW + 30),  # skew corrected
        ({"Retry-After": str(int(MAX_HORIZON_S) + 1)}, None),  # beyond the horizon: unknown
        ({"Retry-After": "garbage"}, None),
        ({"Retry-After": "inf"}, None),
        ({}, None),
    ]
    for headers, expected in cases:
        assert retry_after(CIMultiDict(headers), now=NOW) == close(expected), headers
        if status in (429, 503):
            assert parse_response(status, headers, now=NOW).blocked_until == close(expected)


def test_retry_after_http_date_without_date_header_is_taken_as_is() -> None:
    target = epoch("Wed, 21 Oct 2015 07:28:30 GMT")
    obs = parse_response(429, {"Retry-After": "Wed, 21 Oct 2015 07:28:30 GMT"}, now=target - 5)
    assert obs.blocked_until == close(target)


def test_retry_after_is_honoured_whatever_the_configured_styles() -> None:
    obs = parse_response(429, {"Retry-After": "3"}, now=NOW, styles=["shopify"])
    assert obs.blocked_until == NOW + 3
    assert obs.styles == ("retry-after",)


def test_github_403_with_exhausted_quota_blocks_until_reset() -> None:
    headers = {
        "Date": "Mon, 01 Jul 2013 17:27:06 GMT",
        "X-RateLimit-Limit": "60",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Used": "60",
        "X-RateLimit-Reset": "1372700873",
        "X-RateLimit-Resource": "core",
    }
    obs = parse_response(403, headers, now=NOW)
    assert obs.blocked_until == close(NOW + 1247)
    assert policy(obs, "core") == Policy("core", 60, None, 0, obs.blocked_until)


def test_429_without_retry_after_blocks_until_the_exhausted_quota_resets() -> None:
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "20s"}
    assert parse_response(429, headers, now=NOW).blocked_until == NOW + 20
    headers["x-ratelimit-remaining-requests"] = "3"
    assert parse_response(429, headers, now=NOW).blocked_until is None
    headers["x-ratelimit-remaining-requests"] = "0"
    assert parse_response(200, headers, now=NOW).blocked_until is None


# --- IETF -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (  # draft 11
            {
                "RateLimit-Policy": '"burst";q=100;w=60, "daily";q=1000;w=86400',
                "RateLimit": '"burst";r=50;t=30',
            },
            [Policy("burst", 100, 60.0, 50, NOW + 30), Policy("daily", 1000, 86400.0, None, None)],
        ),
        (  # draft 11 examples with partition keys; non-request quota units are skipped
            {
                "RateLimit-Policy": '"peruser";q=100;w=60;pk=:dHJpYWwxMjEzMjM=:, '
                '"bytes";q=65535;qu="content-bytes";w=10',
                "RateLimit": '"peruser";r=999;pk=:dHJpYWwxMjEzMjM=:',
            },
            [Policy("peruser", 100, 60.0, 999, None)],
        ),
        (  # RateLimit without a policy
            {"RateLimit": '"default";r=0;t=7'},
            [Policy("default", None, None, 0, NOW + 7)],
        ),
        (  # draft 07: dictionary and unnamed policies
            {"RateLimit": "limit=100, remaining=50, reset=30", "RateLimit-Policy": "100;w=60"},
            [Policy("default", 100, 60.0, 50, NOW + 30)],
        ),
        (  # drafts <= 06: one field per value (as Zendesk and many gateways still send)
            {"RateLimit-Limit": "100", "RateLimit-Remaining": "50", "RateLimit-Reset": "30"},
            [Policy("default", 100, None, 50, NOW + 30)],
        ),
        (  # early drafts: quota policies trailing the limit
            {"RateLimit-Limit": "10, 10;w=1, 50;w=60", "RateLimit-Remaining": "9"},
            [Policy("default", 10, 1.0, 9, None)],
        ),
        (  # malformed parameters are dropped one by one
            {"RateLimit-Policy": '"a";q=-1;w=0, "b";q=?1;w=60', "RateLimit": '"a";r=5;t=-3'},
            [Policy("a", None, None, 5, NOW)],
        ),
        ({"RateLimit": '"burst";r=50;t=30 garbage'}, []),
    ],
)
def test_ietf(headers: dict[str, str], expected: list[Policy]) -> None:
    obs = parse_response(200, headers, now=NOW, styles=["ietf"])
    assert list(obs.policies) == expected
    assert obs.styles == (("ietf",) if expected else ())


def test_atlassian_beta_ratelimit_is_read_for_atlassian_and_ietf_styles() -> None:
    # As logged from Jira Cloud's points-based quota.
    headers = {
        "Beta-RateLimit-Policy": '"tenant-app-quota";q=100100;w=3600',
        "Beta-RateLimit": '"tenant-app-quota";r=17842;t=2107',
        "X-Beta-RateLimit-Reason": "jira-quota-tenant-based",
    }
    expected = (Policy("tenant-app-quota", 100100, 3600.0, 17842, NOW + 2107),)
    for styles in (["atlassian"], ["ietf"], None):
        assert parse_response(200, headers, now=NOW, styles=styles).policies == expected
    assert parse_response(200, headers, now=NOW, styles=["github"]).is_empty()


# --- X-RateLimit family ---------------------------------------------------------------------

GITHUB = {  # GitHub REST docs sample
    "Date": "Mon, 01 Jul 2013 17:27:06 GMT",
    "X-RateLimit-Limit": "60",
    "X-RateLimit-Remaining": "56",
    "X-RateLimit-Used": "4",
    "X-RateLimit-Reset": "1372700873",
    "X-RateLimit-Resource": "core",
}


@pytest.mark.parametrize("styles", [None, ["github"]])
def test_github_reset_is_corrected_by_the_upstream_date(styles: list[str] | None) -> None:
    # Upstream clock 10 s behind ours: the reset is 1247 s after *its* Date, so after our now.
    now = epoch(GITHUB["Date"]) + 10
    obs = parse_response(200, GITHUB, now=now, styles=styles)
    assert obs.policies == (Policy("core", 60, None, 56, now + 1247),)
    assert obs.styles == ("github",)
    assert obs.blocked_until is None


def test_github_reset_without_date_is_absolute() -> None:
    headers = {k: v for k, v in GITHUB.items() if k != "Date"}
    obs = parse_response(200, headers, now=1372700000.0)
    assert policy(obs, "core").reset_at == 1372700873.0


def test_github_remaining_is_derived_from_used() -> None:
    headers = {"X-RateLimit-Limit": "5000", "X-RateLimit-Used": "4990"}
    obs = parse_response(200, headers, now=NOW, styles=["github"])
    assert obs.policies == (Policy("default", 5000, None, 10, None),)


@pytest.mark.parametrize(
    ("reset", "expected"),
    [
        (str(NOW + 1000), NOW + 1000),  # no Date header: the epoch is taken as is
        ("-1", NOW),  # a negative delta clamps to now
        (str(NOW + MAX_HORIZON_S + 60), None),  # more than a week away: ignored
        (str(NOW - 300), NOW),  # already passed: resets now
    ],
)
def test_epoch_reset_bounds(reset: str, expected: float | None) -> None:
    obs = parse_response(200, {"X-RateLimit-Limit": "1", "X-RateLimit-Reset": reset}, now=NOW)
    assert policy(obs, "default").reset_at == expected


X_SAMPLE = {  # docs.x.com rate-limits page
    "x-rate-limit-limit": "900",
    "x-rate-limit-remaining": "847",
    "x-rate-limit-reset": "1705420800",
}


@pytest.mark.parametrize("styles", [None, ["x"]])
def test_x(styles: list[str] | None) -> None:
    obs = parse_response(200, X_SAMPLE, now=1705420000.0, styles=styles)
    assert obs.policies == (Policy("default", 900, None, 847, 1705420800.0),)
    assert obs.styles == ("x",)


def test_x_style_also_reads_x_ratelimit_names() -> None:
    headers = {"X-RateLimit-Limit": "900", "X-RateLimit-Reset": str(NOW + 60)}
    obs = parse_response(200, headers, now=NOW, styles=["x"])
    assert obs.policies == (Policy("default", 900, None, None, NOW + 60),)


DISCORD = {  # discord.com developers docs, rate-limit header example
    "Date": "Tue, 02 Aug 2016 21:23:41 GMT",
    "X-RateLimit-Limit": "5",
    "X-RateLimit-Remaining": "0",
    "X-RateLimit-Reset": "1470173023.123",
    "X-RateLimit-Reset-After": "1",
    "X-RateLimit-Bucket": "abcd1234",
}


@pytest.mark.parametrize("styles", [None, ["discord"]])
def test_discord_prefers_reset_after(styles: list[str] | None) -> None:
    obs = parse_response(200, DISCORD, now=NOW, styles=styles)
    assert obs.policies == (Policy("abcd1234", 5, None, 0, NOW + 1),)
    assert obs.styles == ("discord",)


def test_discord_decimal_epoch_reset_with_clock_correction() -> None:
    headers = {k: v for k, v in DISCORD.items() if k != "X-RateLimit-Reset-After"}
    obs = parse_response(200, headers, now=NOW, styles=["discord"])
    expected = NOW + (1470173023.123 - epoch(DISCORD["Date"]))
    assert policy(obs, "abcd1234").reset_at == close(expected)


def test_discord_429_route_and_global() -> None:
    route = dict(DISCORD, **{"Retry-After": "1", "X-RateLimit-Scope": "user"})
    obs = parse_response(429, route, now=NOW, styles=["discord"])
    assert obs.blocked_until == NOW + 1
    assert obs.styles == ("discord", "retry-after")
    glob = {"X-RateLimit-Global": "true", "X-RateLimit-Scope": "global", "Retry-After": "65"}
    obs = parse_response(429, glob, now=NOW, styles=["discord"])
    assert obs.blocked_until == NOW + 65


def test_unsafe_bucket_name_falls_back_to_default() -> None:
    headers = {"X-RateLimit-Bucket": "a b/../\x7f", "X-RateLimit-Remaining": "3"}
    obs = parse_response(200, headers, now=NOW, styles=["discord"])
    assert [p.name for p in obs.policies] == ["default"]


@pytest.mark.parametrize(
    ("reset", "date", "expected"),
    [
        ("30", None, NOW + 30),  # small number: delta seconds
        ("1700000045", None, NOW + 45),  # > 1e9: epoch seconds
        ("1700000045.5", None, NOW + 45.5),
        ("1700000045000", None, NOW + 45),  # epoch milliseconds
        ("2023-11-14T22:14Z", None, NOW + 40),  # ISO 8601 (Atlassian), no seconds
        ("2023-11-14T22:14:00+00:00", "Tue, 14 Nov 2023 22:13:10 GMT", NOW + 50),
        ("Tue, 14 Nov 2023 22:14:00 GMT", None, NOW + 40),
        ("tomorrow", None, None),
    ],
)
def test_generic_reset_heuristic(reset: str, date: str | None, expected: float | None) -> None:
    headers = {"X-RateLimit-Remaining": "1", "X-RateLimit-Reset": reset}
    if date:
        headers["Date"] = date
    obs = parse_response(200, headers, now=NOW)
    assert obs.policies[0].reset_at == close(expected)


def test_atlassian_429() -> None:
    # Jira Cloud: reset as yyyy-MM-ddTHH:mmZ, near-limit flag, Retry-After.
    headers = {
        "Date": "Wed, 01 May 2024 11:59:30 GMT",
        "Retry-After": "30",
        "X-RateLimit-Limit": "100",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": "2024-05-01T12:00Z",
        "X-RateLimit-NearLimit": "true",
        "RateLimit-Reason": "jira-quota-based",
    }
    for styles in (None, ["atlassian"]):
        obs = parse_response(429, headers, now=NOW, styles=styles)
        assert obs.policies == (Policy("default", 100, None, 0, NOW + 30),)
        assert obs.blocked_until == NOW + 30
        assert obs.styles == ("atlassian", "retry-after")


# --- AI vendors -----------------------------------------------------------------------------

OPENAI = {  # OpenAI rate-limits guide sample
    "x-ratelimit-limit-requests": "60",
    "x-ratelimit-limit-tokens": "150000",
    "x-ratelimit-remaining-requests": "59",
    "x-ratelimit-remaining-tokens": "149984",
    "x-ratelimit-reset-requests": "1s",
    "x-ratelimit-reset-tokens": "6m0s",
}


@pytest.mark.parametrize("styles", [None, ["openai"]])
def test_openai(styles: list[str] | None) -> None:
    obs = parse_response(200, OPENAI, now=NOW, styles=styles)
    assert obs.policies == (
        Policy("requests", 60, None, 59, NOW + 1),
        Policy("tokens", 150000, None, 149984, NOW + 360),
    )
    assert obs.styles == ("openai",)


def test_azure_openai_minus_one_means_unknown_not_exhausted() -> None:
    headers = {
        "x-ratelimit-limit-tokens": "-1",
        "x-ratelimit-remaining-tokens": "-1",
        "x-ratelimit-reset-tokens": "0",
    }
    obs = parse_response(200, headers, now=NOW, styles=["openai"])
    assert obs.policies == (Policy("tokens", None, None, None, NOW),)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("6m0s", 360.0),
        ("1s", 1.0),
        ("20ms", 0.02),
        ("12ms", 0.012),
        ("1h2m3.5s", 3723.5),
        ("0s", 0.0),
        ("1.5s", 1.5),
        ("300us", 0.0003),
        ("300µs", 0.0003),
        ("0", 0.0),
        ("12", 12.0),
        ("", None),
        ("s", None),
        ("5x", None),
        ("1s2", None),
        ("-1s", None),
        ("1 s", None),
        ("1h" * 40, None),
        (None, None),
    ],
)
def test_go_duration(text: str | None, seconds: float | None) -> None:
    assert go_duration(text) == close(seconds)


ANTHROPIC = {  # recorded from api.anthropic.com; only the requests reset moved later
    "date": "Thu, 21 Aug 2025 12:41:00 GMT",
    "anthropic-ratelimit-input-tokens-limit": "80000",
    "anthropic-ratelimit-input-tokens-remaining": "80000",
    "anthropic-ratelimit-input-tokens-reset": "2025-08-21T12:40:59Z",
    "anthropic-ratelimit-output-tokens-limit": "16000",
    "anthropic-ratelimit-output-tokens-remaining": "16000",
    "anthropic-ratelimit-output-tokens-reset": "2025-08-21T12:41:00Z",
    "anthropic-ratelimit-requests-limit": "1000",
    "anthropic-ratelimit-requests-remaining": "999",
    "anthropic-ratelimit-requests-reset": "2025-08-21T12:41:06Z",
    "anthropic-ratelimit-tokens-limit": "96000",
    "anthropic-ratelimit-tokens-remaining": "96000",
    "anthropic-ratelimit-tokens-reset": "2025-08-21T12:40:59Z",
    "request-id": "req_011CSLsW7mFqvHHnzrKdKjAE",
}


@pytest.mark.parametrize("styles", [None, ["anthropic"]])
def test_anthropic(styles: list[str] | None) -> None:
    obs = parse_response(200, ANTHROPIC, now=NOW, styles=styles)
    assert obs.policies == (
        Policy("requests", 1000, None, 999, NOW + 6),  # 6 s after the upstream Date
        Policy("tokens", 96000, None, 96000, NOW),  # already passed by its own clock
        Policy("input-tokens", 80000, None, 80000, NOW),
        Policy("output-tokens", 16000, None, 16000, NOW),
    )
    assert obs.styles == ("anthropic",)


def test_anthropic_429_retry_after() -> None:
    headers = dict(ANTHROPIC, **{"retry-after": "7", "anthropic-ratelimit-tokens-remaining": "0"})
    obs = parse_response(429, headers, now=NOW, styles=["anthropic"])
    assert obs.blocked_until == NOW + 7
    assert policy(obs, "tokens").remaining == 0


# --- SaaS vendors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("32/40", Policy("default", 40, None, 8, None)),
        ("40/40", Policy("default", 40, None, 0, None)),
        ("41/40", Policy("default", 40, None, 0, None)),
        ("32/", None),
        ("/40", None),
        ("32/40/2", None),
        ("-1/40", None),
    ],
)
def test_shopify(value: str, expected: Policy | None) -> None:
    obs = parse_response(200, {"X-Shopify-Shop-Api-Call-Limit": value}, now=NOW)
    assert obs.policies == ((expected,) if expected else ())


def test_configured_shopify_ignores_github_headers() -> None:
    headers = dict(GITHUB, **{"X-Shopify-Shop-Api-Call-Limit": "1/40"})
    obs = parse_response(200, headers, now=NOW, styles=["shopify"])
    assert obs.policies == (Policy("default", 40, None, 39, None),)
    assert obs.styles == ("shopify",)
    assert parse_response(200, GITHUB, now=NOW, styles=["shopify"]).is_empty()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("api-usage=25/15000", [Policy("api-usage", 15000, 86400.0, 14975, None)]),
        (
            "api-usage=25/5000; per-app-api-usage=17/250(appName=sample-connected-app)",
            [
                Policy("api-usage", 5000, 86400.0, 4975, None),
                Policy("per-app-api-usage", 250, 86400.0, 233, None),
            ],
        ),
        ("api-usage=25", []),
        ("api-usage=x/5000", []),
    ],
)
def test_salesforce(value: str, expected: list[Policy]) -> None:
    obs = parse_response(200, {"Sforce-Limit-Info": value}, now=NOW, styles=["salesforce"])
    assert list(obs.policies) == expected


HUBSPOT = {  # HubSpot API usage guidelines sample
    "X-HubSpot-RateLimit-Daily": "250000",
    "X-HubSpot-RateLimit-Daily-Remaining": "249999",
    "X-HubSpot-RateLimit-Interval-Milliseconds": "10000",
    "X-HubSpot-RateLimit-Max": "100",
    "X-HubSpot-RateLimit-Remaining": "99",
    "X-HubSpot-RateLimit-Secondly": "10",
    "X-HubSpot-RateLimit-Secondly-Remaining": "9",
}


@pytest.mark.parametrize("styles", [None, ["hubspot"]])
def test_hubspot(styles: list[str] | None) -> None:
    obs = parse_response(200, HUBSPOT, now=NOW, styles=styles)
    assert obs.policies == (
        Policy("daily", 250000, 86400.0, 249999, None),
        Policy("interval", 100, 10.0, 99, None),
        Policy("secondly", 10, 1.0, 9, None),
    )
    assert obs.styles == ("hubspot",)


def test_hubspot_oauth_calls_have_no_daily_quota() -> None:
    headers = {k: v for k, v in HUBSPOT.items() if "Daily" not in k}
    obs = parse_response(200, headers, now=NOW, styles=["hubspot"])
    assert [p.name for p in obs.policies] == ["interval", "secondly"]


ZENDESK = {  # Zendesk "best practices for avoiding rate limiting" sample
    "x-rate-limit": "700",
    "ratelimit-limit": "700",
    "x-rate-limit-remaining": "699",
    "ratelimit-remaining": "699",
    "ratelimit-reset": "41",
    "zendesk-ratelimit-tickets-index": "total=100; remaining=99; resets=41",
}


@pytest.mark.parametrize(("styles", "matched"), [(None, ("ietf", "zendesk")), (["zendesk"], ("zendesk",))])
def test_zendesk(styles: list[str] | None, matched: tuple[str, ...]) -> None:
    obs = parse_response(200, ZENDESK, now=NOW, styles=styles)
    assert obs.policies == (
        Policy("default", 700, 60.0, 699, NOW + 41),
        Policy("tickets-index", 100, None, 99, NOW + 41),
    )
    assert obs.styles == matched


def test_zendesk_endpoint_header_garbage_is_ignored_field_by_field() -> None:
    headers = {"zendesk-ratelimit-search": "total=abc; remaining=5; resets=; junk"}
    obs = parse_response(200, headers, now=NOW, styles=["zendesk"])
    assert obs.policies == (Policy("search", None, None, 5, None),)


# --- bounds ---------------------------------------------------------------------------------


def test_windows_beyond_a_month_are_dropped_but_the_quota_is_kept() -> None:
    headers = {"RateLimit-Policy": f'"monthly";q=10;w={int(MAX_WINDOW_S) + 1}'}
    assert parse_response(200, headers, now=NOW).policies == (Policy("monthly", 10, None, None, None),)


def test_counts_beyond_64_bits_are_ignored() -> None:
    headers = {"X-RateLimit-Limit": str(MAX_COUNT + 1), "X-RateLimit-Remaining": str(MAX_COUNT)}
    assert parse_response(200, headers, now=NOW).policies == (Policy("default", None, None, MAX_COUNT, None),)


def test_garbage_date_header_falls_back_to_local_clock() -> None:
    headers = {"Date": "not a date", "X-RateLimit-Limit": "1", "X-RateLimit-Reset": str(NOW + 9)}
    assert parse_response(200, headers, now=NOW).policies[0].reset_at == NOW + 9


# --- never raises ---------------------------------------------------------------------------

FUZZ_NAMES = [
    "Date", "Retry-After", "retry-after-ms", "x-ms-retry-after-ms", "RateLimit",
    "RateLimit-Policy", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset",
    "Beta-RateLimit", "Beta-RateLimit-Policy", "X-RateLimit-Limit", "X-RateLimit-Remaining",
    "X-RateLimit-Reset", "X-RateLimit-Reset-After", "X-RateLimit-Used", "X-RateLimit-Resource",
    "X-RateLimit-Bucket", "X-RateLimit-Global", "X-RateLimit-NearLimit", "x-rate-limit-limit",
    "x-rate-limit-reset", "x-rate-limit-remaining", "x-rate-limit",
    "x-ratelimit-limit-requests", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens",
    "x-ratelimit-remaining-tokens", "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-limit", "X-Shopify-Shop-Api-Call-Limit", "Sforce-Limit-Info",
    "X-HubSpot-RateLimit-Interval-Milliseconds", "X-HubSpot-RateLimit-Max",
    "X-HubSpot-RateLimit-Daily", "zendesk-ratelimit-tickets-index", "zendesk-ratelimit-\x00",
]  # fmt: skip
FUZZ_VALUES = [
    "", " ", "0", "-0", "-1", "1", "1.5", "-1.5", "NaN", "nan", "inf", "-inf", "Infinity",
    "1e309", "1e5", "9" * 30, "9" * 5000, "1_000", "0x10", "١٢٣", "²", "\x00", "\r\n", "é",
    "😀", "1.2.3", "..", "1,2", "4;w=", "2024-13-45T99:99Z", "2024-05-01T12:00Z",
    "9999-12-31T23:59:59Z", "0001-01-01T00:00:00+14:00", "Wed, 99 Oct 2015 07:28:00 GMT",
    "Wed, 21 Oct 99999 07:28:00 GMT", "Wed, 21 Oct 2015 07:28:00 GMT", '"burst";q=',
    '"a";q=1;w=0', '"a";r=?1;t=?0', '"a";r=1.5;t=1e3', "(((", ")", ", ,", ";;;",
    '"a";q=99999999999999999999', '("a" "b");q=1', "a=(1 2);x", "limit=, remaining=",
    "limit=?1, remaining=-4, reset=1.5", "32/", "/40", "-3/-4", "99999999999999999999/1",
    "a=1/0", "api-usage=1/2(", "total=;remaining=;resets=-1e9", "total=1;total=2",
    "1h" * 40, "99999999999h", "1.5.5s", "true", "false", "1470173023.123",
    "1470173023123123", str(2**63), str(-(2**63)), "x" * 200,
]  # fmt: skip


def test_fuzz_never_raises_and_respects_bounds(caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(20240501)
    styles_pool = [*STYLES, "unknown", "GITHUB", " openai "]
    printable = "".join(chr(c) for c in range(32, 127))
    caplog.set_level(logging.WARNING, logger="proxy.ratelimit.signals.core")
    for case in range(2000):
        pairs = []
        for _ in range(rng.randint(1, 6)):
            if rng.random() < 0.15:
                value = "".join(rng.choice(printable) for _ in range(rng.randint(0, 40)))
            else:
                value = rng.choice(FUZZ_VALUES)
            pairs.append((rng.choice(FUZZ_NAMES), value))
        status = rng.choice([200, 301, 403, 429, 500, 503])
        styles = None if rng.random() < 0.4 else rng.sample(styles_pool, rng.randint(0, 3))
        obs = parse_response(status, pairs, now=NOW, styles=styles)
        assert isinstance(obs, Observation), case
        assert obs.status == status
        if obs.blocked_until is not None:
            assert NOW <= obs.blocked_until <= NOW + MAX_HORIZON_S, (case, pairs)
        for p in obs.policies:
            for count in (p.limit, p.remaining):
                assert count is None or (type(count) is int and 0 <= count <= MAX_COUNT)
            assert p.window_s is None or 0 < p.window_s <= MAX_WINDOW_S, (case, pairs)
            assert p.reset_at is None or NOW <= p.reset_at <= NOW + MAX_HORIZON_S, (case, pairs)
            assert p.name and len(p.name) <= 64
        assert set(obs.styles) <= set(STYLES)
    # The catch-all safety net logs; reaching it would mean a parser bug the fuzz found.
    assert [r.getMessage() for r in caplog.records] == []


def test_safety_net_turns_a_broken_input_object_into_an_empty_observation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Exploding:
        def __iter__(self) -> object:
            raise RuntimeError("boom")

    obs = parse_response(429, Exploding(), now=NOW)  # type: ignore[arg-type]
    assert obs == Observation(429, None, (), ())
    assert "RuntimeError" in caplog.text


def test_now_in_a_date_header_round_trip() -> None:
    # formatdate is what an upstream would send; the clock correction must be exact for it.
    date = formatdate(NOW - 10, usegmt=True)
    obs = parse_response(200, {"Date": date, "X-RateLimit-Reset": str(NOW + 20)}, now=NOW)
    assert obs.policies == (Policy("default", None, None, None, NOW + 30),)
