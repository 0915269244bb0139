"""Unit tests for proxy.security.crypto: envelope encryption, key ring parsing and secret helpers."""

from __future__ import annotations

import base64
import json
import string
import traceback
from typing import Any

import pytest

from proxy.errors import ConfigError, CryptoError, KeyVersionMissing, ProxyError, ValidationError
from proxy.security import crypto
from proxy.security.crypto import KeyRing, WrappedKey

CANARY = "xq-SECRET-canary-4471"
DEK = bytes(range(32))
OTHER_DEK = bytes(range(1, 33))
KEY_A = bytes(range(100, 132))
KEY_B = bytes(range(150, 182))
B64_A = base64.b64encode(KEY_A).decode()
B64_B = base64.b64encode(KEY_B).decode()


def deks(version: int) -> bytes:
    if version == 1:
        return DEK
    raise KeyVersionMissing(version, "a test data key")


def assert_no_leak(exc: BaseException, *secrets: str | bytes) -> None:
    texts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    if isinstance(exc, ProxyError):
        texts.append(json.dumps(exc.to_body()))
    for secret in secrets:
        forms = (
            [secret.hex(), base64.b64encode(secret).decode(), base64.urlsafe_b64encode(secret).decode()]
            if isinstance(secret, bytes)
            else [secret]
        )
        for form in forms:
            for text in texts:
                assert form not in text


# --- field values ------------------------------------------------------------------------------

VALUES: list[Any] = [
    "s3cr3t",
    "",
    "ünïcödé ✓ \x00 \n",
    0,
    -5,
    2**70,
    1.5,
    True,
    False,
    None,
    [1, "a", [True]],
    {"nested": {"a": [1, None], "b": "x"}},
]


@pytest.mark.parametrize("value", VALUES)
def test_value_round_trip_keeps_type(value: Any) -> None:
    token = crypto.encrypt_value(DEK, 1, "t1", "c1", "api_key", value)
    out = crypto.decrypt_value(deks, "t1", "c1", "api_key", token)
    assert out == value
    assert type(out) is type(value)


def test_token_format_and_fresh_nonce() -> None:
    t1 = crypto.encrypt_value(DEK, 7, "t1", "c1", "f", CANARY)
    t2 = crypto.encrypt_value(DEK, 7, "t1", "c1", "f", CANARY)
    assert t1.startswith("cpv1.7.")
    assert t1 != t2
    assert crypto.token_dek_version(t1) == 7
    assert CANARY not in t1
    assert "=" not in t1 and "+" not in t1 and "/" not in t1


@pytest.mark.parametrize("suffix", ["", "!", "!!"])  # all three base64 tail lengths
def test_every_single_character_change_is_detected(suffix: str) -> None:
    token = crypto.encrypt_value(DEK, 1, "t1", "c1", "f", CANARY + suffix)
    alphabet = string.ascii_letters + string.digits + "-_.="
    for i, ch in enumerate(token):
        for repl in {alphabet[(alphabet.find(ch) + 1) % len(alphabet)], "A", "2", "."} - {ch}:
            tampered = token[:i] + repl + token[i + 1 :]
            with pytest.raises(CryptoError) as info:
                crypto.decrypt_value(deks, "t1", "c1", "f", tampered)
            assert_no_leak(info.value, CANARY, DEK)


def test_truncated_or_extended_token_is_detected() -> None:
    token = crypto.encrypt_value(DEK, 1, "t1", "c1", "f", CANARY)
    for bad in [token[:i] for i in range(len(token))] + [token + "A", token + "=", " " + token]:
        with pytest.raises(CryptoError) as info:
            crypto.decrypt_value(deks, "t1", "c1", "f", bad)
        assert_no_leak(info.value, CANARY, DEK)


@pytest.mark.parametrize(
    "where",
    [
        ("t2", "c1", "f"),  # another tenant
        ("t1", "c2", "f"),  # another connection (row swap)
        ("t1", "c1", "g"),  # another field (field swap)
    ],
)
def test_value_moved_elsewhere_fails_and_names_the_target(where: tuple[str, str, str]) -> None:
    token = crypto.encrypt_value(DEK, 1, "t1", "c1", "f", CANARY)
    with pytest.raises(CryptoError) as info:
        crypto.decrypt_value(deks, *where, token)
    msg = str(info.value)
    assert all(repr(part) in msg for part in where)
    assert_no_leak(info.value, CANARY, DEK)


def test_associated_data_has_no_separator_collisions() -> None:
    token = crypto.encrypt_value(DEK, 1, "a|b", "c", "f", CANARY)
    with pytest.raises(CryptoError):
        crypto.decrypt_value(deks, "a", "b|c", "f", token)
    token = crypto.encrypt_value(DEK, 1, "a", "b.c", "f", CANARY)
    with pytest.raises(CryptoError):
        crypto.decrypt_value(deks, "a.b", "c", "f", token)


def test_relabelled_dek_version_fails_even_with_same_key() -> None:
    token = crypto.encrypt_value(DEK, 1, "t1", "c1", "f", CANARY)
    relabelled = token.replace("cpv1.1.", "cpv1.2.", 1)
    with pytest.raises(CryptoError):
        crypto.decrypt_value(lambda v: DEK, "t1", "c1", "f", relabelled)


def test_wrong_dek_fails_and_unknown_dek_version_is_callbacks_error() -> None:
    token = crypto.encrypt_value(DEK, 1, "t1", "c1", "f", CANARY)
    with pytest.raises(CryptoError) as info:
        crypto.decrypt_value(lambda v: OTHER_DEK, "t1", "c1", "f", token)
    assert_no_leak(info.value, CANARY, DEK, OTHER_DEK)

    def missing(version: int) -> bytes:
        raise LookupError(f"no data key {version}")

    with pytest.raises(LookupError, match="no data key 1"):
        crypto.decrypt_value(missing, "t1", "c1", "f", token)


@pytest.mark.parametrize(
    "bad", ["", "cpv1", "cpv1.1", "cpv2.1.AAAA", "cpv1.x.AAAA", "cpv1.1.AAAA", "cpv1..AAAA"]
)
def test_garbled_tokens_raise_crypto_error(bad: str) -> None:
    with pytest.raises(CryptoError, match="'c1'"):
        crypto.decrypt_value(deks, "t1", "c1", "f", bad)


def test_noncanonical_version_spellings_are_rejected() -> None:
    token = crypto.encrypt_value(DEK, 1, "t1", "c1", "f", CANARY)
    body = token.split(".", 2)[2]
    for version in ("01", "0", "+1", "1 ", "\u0661"):
        with pytest.raises(CryptoError):
            crypto.decrypt_value(lambda v: DEK, "t1", "c1", "f", f"cpv1.{version}.{body}")
        with pytest.raises(CryptoError):
            crypto.token_dek_version(f"cpv1.{version}.{body}")


def test_unencodable_value_is_a_validation_error_without_the_value() -> None:
    with pytest.raises(ValidationError) as info:
        crypto.encrypt_value(DEK, 1, "t1", "c1", "f", {CANARY: {CANARY.encode()}})
    assert set(info.value.fields) == {"f"}
    assert_no_leak(info.value, CANARY)
    with pytest.raises(ValidationError):
        crypto.encrypt_value(DEK, 1, "t1", "c1", "f", float("nan"))


def test_encrypt_rejects_bad_key_or_version() -> None:
    with pytest.raises(CryptoError):
        crypto.encrypt_value(DEK[:16], 1, "t1", "c1", "f", "x")
    with pytest.raises(CryptoError):
        crypto.encrypt_value(DEK, 0, "t1", "c1", "f", "x")


# --- data key wrapping -------------------------------------------------------------------------


def test_wrap_round_trip_and_serialisation() -> None:
    ring = KeyRing({1: KEY_A, 3: KEY_B})
    wrapped = crypto.wrap_dek(ring, "t1", 5, DEK)
    assert (wrapped.kek_version, wrapped.dek_version) == (3, 5)
    assert DEK not in wrapped.blob
    data = json.loads(json.dumps(wrapped.to_dict()))
    assert WrappedKey.from_dict(data) == wrapped
    assert crypto.unwrap_dek(ring, "t1", WrappedKey.from_dict(data)) == DEK
    assert "blob" not in repr(wrapped)


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"kek_version": 1, "dek_version": 1},
        {"kek_version": "1", "dek_version": 1, "blob": "AAAA"},
        {"kek_version": True, "dek_version": 1, "blob": "AAAA"},
        {"kek_version": 1, "dek_version": 0, "blob": "AAAA"},
        {"kek_version": 1, "dek_version": 1, "blob": "not base64!"},
        {"kek_version": 1, "dek_version": 1, "blob": 5},
    ],
)
def test_malformed_wrapped_record_is_crypto_error(data: dict[str, Any]) -> None:
    with pytest.raises(CryptoError, match="malformed"):
        WrappedKey.from_dict(data)


def test_wrapped_dek_moved_to_another_tenant_fails() -> None:
    ring = KeyRing({1: KEY_A})
    wrapped = crypto.wrap_dek(ring, "tenant-a", 1, DEK)
    with pytest.raises(CryptoError) as info:
        crypto.unwrap_dek(ring, "tenant-b", wrapped)
    assert str(info.value) == (
        "master key version 1 cannot open the data key of tenant 'tenant-b': wrong master key or tampered record"
    )
    assert_no_leak(info.value, DEK, KEY_A)


def test_wrapped_dek_tamper_is_detected() -> None:
    ring = KeyRing({1: KEY_A})
    wrapped = crypto.wrap_dek(ring, "t1", 1, DEK)
    for i in range(len(wrapped.blob)):
        blob = bytearray(wrapped.blob)
        blob[i] ^= 0x01
        with pytest.raises(CryptoError):
            crypto.unwrap_dek(ring, "t1", WrappedKey(1, 1, bytes(blob)))
    for bad in (WrappedKey(1, 2, wrapped.blob), WrappedKey(1, 1, wrapped.blob[:20])):
        with pytest.raises(CryptoError):
            crypto.unwrap_dek(ring, "t1", bad)


def test_unknown_kek_version_names_the_version() -> None:
    wrapped = crypto.wrap_dek(KeyRing({4: KEY_A}), "t1", 1, DEK)
    with pytest.raises(KeyVersionMissing) as info:
        crypto.unwrap_dek(KeyRing({1: KEY_A}), "t1", wrapped)
    assert info.value.version == 4
    assert "master key version 4" in str(info.value)
    assert "'t1'" in str(info.value)
    assert_no_leak(info.value, DEK, KEY_A)


def test_wrong_master_key_is_crypto_error_not_missing_version() -> None:
    wrapped = crypto.wrap_dek(KeyRing({1: KEY_A}), "t1", 1, DEK)
    with pytest.raises(CryptoError) as info:
        crypto.unwrap_dek(KeyRing({1: KEY_B}), "t1", wrapped)
    assert not isinstance(info.value, KeyVersionMissing)
    assert "wrong master key" in str(info.value)
    assert_no_leak(info.value, DEK, KEY_A, KEY_B)


def test_rotation_rewrap_then_retire_old_key() -> None:
    ring1 = KeyRing({1: KEY_A})
    old = crypto.wrap_dek(ring1, "t1", 2, DEK)
    ring2 = ring1.with_new_key()
    assert ring2.versions == (1, 2) and ring2.newest_version == 2
    assert ring1.versions == (1,)  # immutable: the old ring is unchanged
    assert ring2.get(1) == KEY_A

    new = crypto.rewrap_dek(ring2, "t1", old)
    assert (new.kek_version, new.dek_version) == (2, 2)
    assert crypto.rewrap_dek(ring2, "t1", new) is new  # already newest: unchanged

    ring3 = ring2.without(1)
    assert ring3.versions == (2,)
    assert crypto.unwrap_dek(ring3, "t1", new) == DEK
    with pytest.raises(KeyVersionMissing, match="version 1"):
        crypto.unwrap_dek(ring3, "t1", old)


def test_rewrap_verifies_records_already_under_newest_key() -> None:
    ring = KeyRing({1: KEY_A})
    wrapped = crypto.wrap_dek(ring, "t1", 1, DEK)
    with pytest.raises(CryptoError):
        crypto.rewrap_dek(ring, "t2", wrapped)


# --- key ring ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (B64_A, {1: KEY_A}),
        (f"\n  {B64_A}  \n", {1: KEY_A}),
        (f"# master key\n\n{B64_A}\n", {1: KEY_A}),
        (base64.urlsafe_b64encode(KEY_A).decode().rstrip("="), {1: KEY_A}),
        (f"1:{B64_A},2:{B64_B}", {1: KEY_A, 2: KEY_B}),
        (f"1:{B64_A}\n2:{B64_B}\n", {1: KEY_A, 2: KEY_B}),
        (f"# ring\n7 : {B64_B} # newest\n\n 3:{B64_A},\n", {3: KEY_A, 7: KEY_B}),
    ],
)
def test_parse_accepted_forms(text: str, expected: dict[int, bytes]) -> None:
    ring = KeyRing.parse(text)
    assert ring.versions == tuple(sorted(expected))
    assert ring.newest_version == max(expected)
    assert all(ring.get(v) == k for v, k in expected.items())


SHORT = base64.b64encode(b"k" * 16).decode()
LONG = base64.b64encode(KEY_A + b"x").decode()


@pytest.mark.parametrize(
    ("text", "leak", "says"),
    [
        (SHORT, SHORT, "16 bytes"),
        (f"1:{LONG}", LONG, "33 bytes"),
        (f"1:{B64_A}\n1:{B64_B}", B64_B, "appears twice"),
        (f"vXq9:{B64_A}", "vXq9", "version"),
        (f"0:{B64_A}", B64_A, "version"),
        (f"01:{B64_A}", B64_A, "version"),
        (f"1:{B64_A[:-4]}!{CANARY}", CANARY, "base64"),
        (f"{B64_A},2:{B64_B}", B64_A, "<version>:<base64>"),
        ("", "", "no key"),
        ("# only a comment\n\n", "only a comment", "no key"),
    ],
)
def test_parse_bad_forms_raise_config_error_without_echo(text: str, leak: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        KeyRing.parse(text)
    assert info.value.key == "master_key"
    assert says in str(info.value)
    if leak:
        assert_no_leak(info.value, leak)
    assert_no_leak(info.value, KEY_A, KEY_B)


@pytest.mark.parametrize("keys", [{}, {1: KEY_A[:31]}, {0: KEY_A}, {True: KEY_A}, {1: B64_A}])
def test_constructor_validates(keys: dict[Any, Any]) -> None:
    with pytest.raises(ConfigError):
        KeyRing(keys)


def test_dump_parse_round_trip_and_generated_text() -> None:
    ring = KeyRing({2: KEY_B, 1: KEY_A}).with_new_key()
    again = KeyRing.parse(ring.dump())
    assert again.versions == (1, 2, 3)
    assert [again.get(v) for v in again.versions] == [ring.get(v) for v in ring.versions]
    assert ring.dump().splitlines()[0] == f"1:{B64_A}"

    fresh = KeyRing.parse(crypto.generate_master_key_text())
    assert fresh.versions == (1,)
    assert KeyRing.parse(crypto.generate_master_key_text()).get(1) != fresh.get(1)


def test_fingerprint_is_short_stable_and_not_the_key() -> None:
    ring = KeyRing({1: KEY_A, 2: KEY_B})
    fp = ring.fingerprint(1)
    assert len(fp) == 12 and all(c in string.hexdigits for c in fp)
    assert fp == KeyRing({1: KEY_A}).fingerprint(1)
    assert fp != ring.fingerprint(2)
    assert fp not in KEY_A.hex()
    assert fp in repr(ring)
    for form in (B64_A, B64_B, KEY_A.hex(), KEY_B.hex()):
        assert form not in repr(ring)


def test_get_and_without_errors() -> None:
    ring = KeyRing({1: KEY_A})
    with pytest.raises(KeyVersionMissing, match="version 9 is needed to open the thing"):
        ring.get(9, "the thing")
    with pytest.raises(ConfigError, match="only key"):
        ring.without(1)
    with pytest.raises(ConfigError, match="version 1 is not in the key ring"):
        ring.with_new_key().without(1).without(1)


# --- API keys and tokens -----------------------------------------------------------------------


def test_new_api_keys_split_back_and_are_unique() -> None:
    seen = set()
    for _ in range(300):
        key_id, full = crypto.new_api_key()
        assert len(key_id) == 12 and key_id.isalnum()
        assert full.startswith(f"cpk_{key_id}_")
        split = crypto.split_api_key(full)
        assert split is not None
        assert split[0] == key_id and full.endswith("_" + split[1])
        assert len(split[1]) == 43
        seen.add(full)
    assert len(seen) == 300
    key_id, full = crypto.new_api_key("adm")
    assert full.startswith("adm_") and crypto.split_api_key(full) == (key_id, full[17:])


@pytest.mark.parametrize(
    "bad",
    ["", "cpk", "cpk_abc_def", crypto.generate_token(), "cpk_ab_defghijklm_" + "x" * 43],
    ids=["empty", "prefix", "short", "token", "short-id"],  # stable ids: one value is random
)
def test_split_api_key_rejects_other_shapes(bad: str) -> None:
    assert crypto.split_api_key(bad) is None
    _, full = crypto.new_api_key()
    assert crypto.split_api_key(full + "x") is None
    assert crypto.split_api_key(full[:-1]) is None


def test_api_key_prefix_must_be_alphanumeric() -> None:
    with pytest.raises(ConfigError):
        crypto.new_api_key("c_k")


def test_hash_and_compare_helpers() -> None:
    _, full = crypto.new_api_key()
    digest = crypto.hash_api_key(full)
    assert len(digest) == 64 and digest == crypto.hash_api_key(full)
    assert digest != crypto.hash_api_key(full[:-1] + ("A" if full[-1] != "A" else "B"))
    assert crypto.secrets_equal(digest, crypto.hash_api_key(full))
    assert not crypto.secrets_equal(digest, digest[:-1])
    assert crypto.secrets_equal("ünï", "ünï") and not crypto.secrets_equal("ünï", "uni")
    assert len(crypto.generate_token()) == 43 and len(crypto.generate_token(16)) == 22
    assert crypto.generate_token() != crypto.generate_token()
