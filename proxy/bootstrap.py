"""Start-up secrets: the master key ring and the admin token, from settings or dev-mode files.

Dev mode exists so `make run` works with no configuration: a master key and an admin token are
generated into the data dir (mode 0600) with a loud warning. With dev mode off, a missing key is a
``ConfigError`` before anything listens. Either way the ring must open every stored tenant key
(checked by ``Vault.verify_keys`` right after this).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from proxy import crypto
from proxy.errors import ConfigError
from proxy.settings import Settings

log = logging.getLogger("proxy.bootstrap")

DEV_KEY_FILE = "master.key"
DEV_TOKEN_FILE = "admin.token"


@dataclass(frozen=True)
class Secrets:
    ring: crypto.KeyRing
    admin_token: str = field(repr=False)
    key_source: str  # a description for logs: never the key
    admin_token_file: Path | None


def ensure_data_dir(settings: Settings) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)


def _write_private(path: Path, text: str) -> None:
    # O_EXCL: never clobber an existing key (losing it would lose every stored secret).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def _publish_private(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text``, complete or not at all; False if it already exists.

    Several processes may start on a fresh data dir at once (``serve --workers N``, replicas
    sharing a volume). The file is written under a private name and hard-linked into place:
    the link fails if another process published first, and a reader never sees a half-written
    key. The loser then reads the winner's file, so every process ends up with the same key.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    _write_private(tmp, text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def key_file_path(settings: Settings) -> Path | None:
    if settings.master_key_file is not None:
        return settings.master_key_file
    if settings.master_key is None and settings.dev_mode:
        return settings.data_dir / DEV_KEY_FILE
    return None


def load_ring(settings: Settings, create: bool = True) -> tuple[crypto.KeyRing, str]:
    if settings.master_key:
        return crypto.KeyRing.parse(settings.master_key), "PROXY_MASTER_KEY"
    path = key_file_path(settings)
    if path is None:
        raise ConfigError(
            "master_key", "no master key configured: set PROXY_MASTER_KEY or PROXY_MASTER_KEY_FILE"
        )
    if not path.exists():
        if settings.master_key_file is not None:
            raise ConfigError("master_key_file", f"{path} does not exist")
        if not create:
            raise ConfigError("master_key", f"no dev master key at {path}; start the service once first")
        ensure_data_dir(settings)
        if _publish_private(path, crypto.generate_master_key_text()):
            log.warning(
                "DEV MODE: generated a master key at %s. Anyone who can read this file can decrypt "
                "every stored credential. For production set dev_mode = false and provide "
                "PROXY_MASTER_KEY_FILE.",
                path,
            )
    try:
        text = path.read_text()
    except OSError as exc:
        key = "master_key_file" if settings.master_key_file else "data_dir"
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    return crypto.KeyRing.parse(text), str(path)


def load_admin_token(settings: Settings) -> tuple[str, Path | None]:
    if settings.admin_token:
        return settings.admin_token, None
    path = settings.data_dir / DEV_TOKEN_FILE
    if not path.exists():
        ensure_data_dir(settings)
        if _publish_private(path, crypto.generate_token() + "\n"):
            log.warning(
                "DEV MODE: generated an admin token at %s (set PROXY_ADMIN_TOKEN in production)", path
            )
    return path.read_text().strip(), path


def load_secrets(settings: Settings) -> Secrets:
    # The data dir is created only where a file is written into it (dev mode, the SQLite store).
    ring, source = load_ring(settings)
    token, token_file = load_admin_token(settings)
    return Secrets(ring=ring, admin_token=token, key_source=source, admin_token_file=token_file)


def append_key_version(settings: Settings) -> crypto.KeyRing:
    """`keys rotate --generate`: adds a new newest key to the key file (never to the environment)."""
    path = key_file_path(settings)
    if settings.master_key or path is None:
        raise ConfigError(
            "master_key",
            "the key ring comes from PROXY_MASTER_KEY; add the new version there (e.g. '1:OLD,2:NEW') "
            "and run `connection-proxy keys rotate` without --generate",
        )
    ring, _ = load_ring(settings, create=False)
    new_ring = ring.with_new_key()
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    _write_private(tmp, new_ring.dump())
    os.replace(tmp, path)  # atomic: the file is old or new, never half-written
    return new_ring
