"""Start-up secrets: the master key ring and the admin token, from settings or dev-mode files.

Dev mode exists so `make run` works with no configuration: a master key and an admin token are
generated into the data dir (mode 0600) with a loud warning. With dev mode off, a missing key is a
``ConfigError`` before anything listens. Either way the ring must open every stored tenant key
(checked by ``Vault.verify_keys`` right after this).

A key file readable by group or others is refused (the master key opens every stored credential;
a world-readable copy is how it leaks). The key-file edits of the ``keys`` commands (add a
version, retire one) replace the file atomically with a private one, so a running service that
re-reads it (SIGHUP, or meeting an unknown version) sees the old ring or the new, never half.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from proxy.errors import ConfigError
from proxy.security import crypto
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


def write_new_private(path: Path, text: str) -> None:
    """`keys generate --out`: creates ``path`` mode 0600; an existing file is never replaced."""
    try:
        _write_private(path, text)
    except FileExistsError:
        raise ConfigError("out", f"{path} already exists; a key file is never overwritten") from None
    except OSError as exc:
        raise ConfigError("out", f"cannot create {path}: {exc.strerror}") from None


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
    key = "master_key_file" if settings.master_key_file else "data_dir"
    try:
        with open(path) as fh:
            _check_private(fh.fileno(), path, key, settings)
            text = fh.read()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    return crypto.KeyRing.parse(text), str(path)


def _check_private(fd: int, path: Path, key: str, settings: Settings) -> None:
    # fstat of the open file, not stat of the name: the file checked is the file read.
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    allowed = 0o040 if settings.master_key_file_group_readable else 0
    if mode & 0o077 & ~allowed:
        raise ConfigError(
            key,
            f"{path} has mode {mode:04o}: the master key file must not be readable by "
            + ("others" if allowed else "group or others")
            + f"; run `chmod 600 {path}` (or write it with `connection-proxy keys generate --out FILE`)",
        )


def ring_reader(settings: Settings) -> Callable[[], crypto.KeyRing] | None:
    """Re-reads the configured key file (same checks as at start-up); None when the ring came
    from PROXY_MASTER_KEY, which cannot change while the process runs."""
    if settings.master_key:
        return None
    return lambda: load_ring(settings, create=False)[0]


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
    _replace_private(path, new_ring.dump())
    return new_ring


def _replace_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    _write_private(tmp, text)
    os.replace(tmp, path)  # atomic: the file is old or new, never half-written


def check_retirable(ring: crypto.KeyRing, version: int) -> None:
    """Refuses what retiring can never do: a version not in the ring, or the newest one."""
    if version not in ring.versions:
        raise ConfigError(
            "master_key", f"version {version} is not in the key ring (it has {list(ring.versions)})"
        )
    if version == ring.newest_version:
        raise ConfigError(
            "master_key",
            f"version {version} is the newest master key: every new data key is wrapped with it. "
            "To stop using it, add a newer version (`connection-proxy keys add`, then SIGHUP every "
            f"replica), run `connection-proxy keys rotate`, then `connection-proxy keys retire {version}`",
        )


def retire_key_version(settings: Settings, version: int) -> tuple[crypto.KeyRing, Path]:
    """`keys retire`: removes ``version`` from the key file; the old file is kept, private, as a
    backup beside it (returned). The caller has checked that nothing uses the version."""
    path = key_file_path(settings)
    if settings.master_key or path is None:
        raise ConfigError(
            "master_key",
            f"the key ring comes from PROXY_MASTER_KEY; remove version {version} from it there and "
            "restart each replica",
        )
    ring, _ = load_ring(settings, create=False)
    check_retirable(ring, version)
    new_ring = ring.without(version)
    old_text = ring.dump()
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for n in range(100):
        backup = path.with_name(f"{path.name}.{stamp}{'' if n == 0 else f'.{n}'}.bak")
        try:
            _write_private(backup, old_text)  # O_EXCL: never overwrite an earlier backup
            break
        except FileExistsError:
            continue
    else:
        raise ConfigError("master_key_file", f"cannot find a free backup name beside {path}")
    _replace_private(path, new_ring.dump())
    return new_ring, backup
