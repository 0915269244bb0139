"""The one-shot operator commands: ``keys``, ``ca``, ``run``, ``nginx-config`` and ``backup``.

They live apart from ``proxy.cli`` (the parser and ``serve``) because each is a small program of
its own with its own imports; ``proxy.cli`` dispatches to them. Every one reads its settings the
way ``serve`` does (``settings_from_args``), so a command sees exactly the configuration the
service runs with.

``run`` is the client side of forward-proxy mode: it starts a command with the proxy and trust
variables every common runtime reads, so unmodified code calls APIs through the proxy (see
``proxy.runenv``). The caller credential comes from ``PROXY_CALLER_KEY`` or ``--key-file``, never
from the command line, where ``ps`` would show it. The ``keys`` commands edit the key file
atomically, private, keeping a backup on retire.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proxy.observe import logformat
from proxy.security import crypto
from proxy.settings import Settings, load_settings


def setup_logging(level: str, fmt: str = "text") -> None:
    logformat.configure(level, logformat.resolve_format(fmt, sys.stderr))


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "listen", None):
        overrides["listen"] = args.listen
    if getattr(args, "workers", None) is not None:
        overrides["workers"] = args.workers
    return load_settings(args.config, overrides=overrides)


async def _with_vault(settings: Settings, action: str, version: int | None) -> int:
    from proxy.catalogue import Catalogue
    from proxy.security.bootstrap import append_key_version, check_retirable, load_ring, retire_key_version
    from proxy.stale import StaleWindow
    from proxy.store import open_store
    from proxy.vault.rotation import check_retire
    from proxy.vault.vault import Vault

    if action == "rotate-generate":
        ring = append_key_version(settings)
        print(
            f"added master key version {ring.newest_version} (fingerprint {ring.fingerprint(ring.newest_version)})"
        )
    else:
        ring, _ = load_ring(settings, create=False)
    store = open_store(settings)
    await store.open()
    try:
        vault = Vault(
            store,
            ring,
            Catalogue.load(settings.integrations_dirs),
            0,
            stale=StaleWindow(settings.stale_if_error_s, store.name),
        )
        if action == "status":
            await vault.verify_keys()
            in_use = await vault.kek_versions_in_use()
            for v in ring.versions:
                mark = "in use" if v in in_use else "unused"
                newest = " (newest)" if v == ring.newest_version else ""
                print(f"master key v{v} {ring.fingerprint(v)}: {mark}{newest}")
            return 0
        if action.startswith("rotate"):
            rewrapped = await vault.rewrap_all()
            print(f"re-wrapped {rewrapped} tenant key record(s) under master key v{ring.newest_version}")
            return 0
        if action == "retire":
            assert version is not None
            check_retirable(ring, version)
            check_retire(await vault.kek_versions_in_use(), version)
            _, backup = retire_key_version(settings, version)
            print(
                f"master key v{version} wraps nothing any more: removed it from the key file "
                f"(the old file is kept as {backup}; delete it once every replica runs without v{version})"
            )
            return 0
        if action == "reencrypt":
            for tenant in await store.list_tenants():
                new = await vault.rotate_tenant_key(tenant.tenant_id)
                done = await vault.reencrypt_tenant(tenant.tenant_id)
                retired = await vault.retire_tenant_keys(tenant.tenant_id)
                print(
                    f"tenant {tenant.tenant_id}: data key v{new}, {done} record(s) re-encrypted, retired {retired}"
                )
            return 0
        if action == "resume":
            for tenant in await store.list_tenants():
                done = await vault.reencrypt_tenant(tenant.tenant_id)
                retired = await vault.retire_tenant_keys(tenant.tenant_id)
                print(f"tenant {tenant.tenant_id}: {done} record(s) re-encrypted, retired {retired}")
            return 0
    finally:
        await store.close()
    raise AssertionError(action)


def _generate(out: str | None) -> int:
    from proxy.security.bootstrap import write_new_private

    text = crypto.generate_master_key_text()
    if out is not None:
        write_new_private(Path(out), text)
        print(f"wrote a new key-ring file {out} (mode 0600)", file=sys.stderr)
        return 0
    # `keys generate > FILE`: the shell made FILE with its umask (often 0644) before this ran;
    # make it private before the key is written into it. A pipe or a terminal has no mode.
    if stat.S_ISREG(os.fstat(sys.stdout.fileno()).st_mode):
        try:
            os.fchmod(sys.stdout.fileno(), 0o600)
        except OSError:
            print(
                "connection-proxy: warning: cannot make the output file private; use --out FILE",
                file=sys.stderr,
            )
    sys.stdout.write(text)
    return 0


def _add(settings: Settings) -> int:
    from proxy.security.bootstrap import append_key_version

    ring = append_key_version(settings)
    v = ring.newest_version
    print(
        f"added master key version {v} (fingerprint {ring.fingerprint(v)}); copy the file to every "
        "replica and send each SIGHUP, then run `connection-proxy keys rotate`"
    )
    return 0


def cmd_keys(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.keys_cmd == "generate":
        return _generate(args.out)
    settings = settings_from_args(args)
    setup_logging(settings.log_level)
    if args.keys_cmd == "add":
        return _add(settings)
    action = {
        "rotate": "rotate-generate" if getattr(args, "generate", False) else "rotate",
        "retire": "retire",
        "status": "status",
        "reencrypt": "resume" if getattr(args, "resume", False) else "reencrypt",
    }[args.keys_cmd]
    return asyncio.run(_with_vault(settings, action, getattr(args, "version", None)))


def cmd_ca(args: argparse.Namespace) -> int:
    from proxy.security.ca import load_ca

    settings = settings_from_args(args)
    if args.ca_cmd == "rotate":
        return _ca_rotate(settings, args.finish)
    ca = load_ca(settings)
    if ca is None:
        print(
            "connection-proxy: no CA: dev_mode is off and ca_cert_file/ca_key_file are not set",
            file=sys.stderr,
        )
        return 2
    sys.stdout.write(ca.bundle_pem)  # certificates only: the key is never printed
    return 0


def _ca_rotate(settings: Settings, finish: bool) -> int:
    """The two steps of a CA rotation (runbook: docs/ca-rotation.md)."""
    from proxy.security import ca_rotation

    if finish:
        done = ca_rotation.finish(settings)
        print(
            f"rotation finished: {done.cert_file} now holds only the signing CA (sha256 {done.signer}). "
            "Send SIGHUP to every serve process (or restart); clients that still trust only the old "
            "CA fail from then on"
        )
        return 0
    done = ca_rotation.rotate(settings)
    print(
        f"new signing CA sha256 {done.signer}, cross-signed by the old one; {done.cert_file} exports "
        f"{len(done.trusted)} CA certificates. Send SIGHUP to every serve process (or restart): "
        "clients trusting either CA keep working. Once every client trusts the new bundle "
        "(GET /ca.pem, `ca export`), run `connection-proxy ca rotate --finish`"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from proxy import runenv

    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        print(
            "connection-proxy: run needs a command: connection-proxy run [options] -- CMD ARGS...",
            file=sys.stderr,
        )
        return 2
    proxy_url = args.proxy or load_settings(args.config).public_url
    key = runenv.caller_key(os.environ, args.key_file)
    with runenv.prepared(
        proxy_url, key, args.connection, args.tenant, args.runtime_user, args.proxy_cacert
    ) as env_vars:
        env = {k: v for k, v in os.environ.items() if k != runenv.KEY_ENV}
        env.update(env_vars)
        try:
            child = subprocess.Popen(command, env=env)
        except OSError as exc:
            print(f"connection-proxy: cannot start {command[0]!r}: {exc.strerror}", file=sys.stderr)
            return 127

        def forward(signum: int, _frame: Any) -> None:
            if child.poll() is None:
                child.send_signal(signum)

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, forward)
        return child.wait()


def _cache_dir_warnings(settings: Settings) -> list[str]:
    """What this machine shows wrong with the decision cache's directory. Warnings, not refusals:
    the config is often generated on another machine (a build host, an image build) than the
    one nginx runs on, where nothing here can be seen."""
    from proxy.nginxconf import memory_backed

    if settings.nginx_decision_cache_s <= 0:
        return []
    where = settings.nginx_decision_cache_dir
    out = []
    try:
        mounts = Path("/proc/self/mounts").read_text()
    except OSError:
        mounts = ""
    if memory_backed(where, mounts) is False:
        out.append(
            f"{where} is not on tmpfs or ramfs: nginx's decision cache would write credentials and "
            "caller keys to persistent disk; set nginx_decision_cache_dir to a directory on tmpfs "
            "(e.g. under /dev/shm), or nginx_decision_cache_s = 0"
        )
    try:
        st = os.lstat(where)
    except OSError:
        return out
    if not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o077:
        out.append(
            f"{where} is not a directory of mode 0700 (a symlink, or open to other users): they "
            "could read or plant decisions there; remove it and create it 0700 for nginx's user"
        )
    return out


def cmd_nginx_config(args: argparse.Namespace) -> int:
    from proxy.catalogue import Catalogue
    from proxy.nginxconf import render
    from proxy.pipeline.decision import injectable_headers

    settings = settings_from_args(args)
    for warning in _cache_dir_warnings(settings):
        print(f"connection-proxy nginx-config: warning: {warning}", file=sys.stderr)
    names = injectable_headers(Catalogue.load(settings.integrations_dirs), settings.nginx_inject_headers)
    print(
        render(
            settings,
            names,
            listen=args.nginx_listen,
            service=args.service,
            prefix=Path(args.prefix),
            workers=args.nginx_workers,
            trusted_ca=Path(args.trusted_ca) if args.trusted_ca else None,
            keepalive=args.keepalive,
        ),
        end="",
    )
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from proxy.store.backup import backup_sqlite

    settings = settings_from_args(args)
    size = backup_sqlite(settings, Path(args.file))
    print(f"backed up {settings.store_path} to {args.file} ({size} bytes, integrity checked)")
    return 0
