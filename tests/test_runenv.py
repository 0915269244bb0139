"""proxy.runenv: what ``connection-proxy run --proxy-cacert FILE`` accepts, and a bad file refused
as a one-line error naming the flag (status 2), never a traceback from the TLS library."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from proxy import runenv
from proxy.errors import ConfigError
from tests.support.app import REPO_ROOT


def test_a_pem_ca_file_is_read_once_as_its_certificates(tmp_path: Path) -> None:
    ca = trustme.CA()
    pem = ca.cert_pem.bytes().decode()
    bundle = tmp_path / "ca.pem"
    # Bundles often carry comments, sometimes not ASCII (Mozilla's names): only the blocks count.
    bundle.write_text("# Főtanúsítvány\n" + pem + "trailing words\n", encoding="utf-8")
    assert runenv.listener_ca(str(bundle)) == pem.strip() + "\n"


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    der = x509.load_pem_x509_certificate(trustme.CA().cert_pem.bytes()).public_bytes(Encoding.DER)
    files = {
        "der": (der, "binary data"),
        "binary": (b"\x00\xff\xfe\x80 not text", "binary data"),
        "text": (b"just some text\n", "holds no PEM certificate"),
        "key": (trustme.CA().private_key_pem.bytes(), "holds no PEM certificate"),
        "armour": (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "do not parse"),
    }
    out: dict[str, tuple[Path, str]] = {}
    for name, (data, why) in files.items():
        path = tmp_path / f"{name}.pem"
        path.write_bytes(data)
        out[name] = (path, why)
    out["missing"] = (tmp_path / "nope.pem", "cannot read it (No such file or directory)")
    out["directory"] = (tmp_path, "cannot read it (Is a directory)")
    return out


def test_files_that_are_no_pem_ca_are_refused_naming_the_flag(tmp_path: Path) -> None:
    for name, (path, why) in _bad_files(tmp_path).items():
        with pytest.raises(ConfigError) as info:
            runenv.listener_ca(str(path))
        assert info.value.key == "proxy_cacert", name
        assert f"--proxy-cacert {path}: " in info.value.message and why in info.value.message, (
            name,
            info.value.message,
        )


@pytest.mark.parametrize("case", ["binary", "text", "armour"])
def test_run_with_a_bad_proxy_cacert_exits_2_with_one_line(tmp_path: Path, case: str) -> None:
    path, why = _bad_files(tmp_path)[case]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PROXY_CALLER_KEY"] = "cpk_some_key"
    # An https proxy URL: the CA file would verify the listener (nothing listens on port 1).
    argv = [sys.executable, "-m", "proxy", "run", "--connection", "c1", "--proxy", "https://127.0.0.1:1"]
    p = subprocess.run(
        [*argv, "--proxy-cacert", str(path), "--", "true"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert "--proxy-cacert" in p.stderr and why in p.stderr, p.stderr
    assert "cpk_some_key" not in p.stderr
