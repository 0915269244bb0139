"""Command line: ``connection-proxy serve``, the key-management commands, ``ca export`` and ``run``.

``run`` is the client side of forward-proxy mode: it starts a command with the proxy and trust
variables every common runtime reads, so unmodified code calls APIs through the proxy (see
``proxy.runenv``). The caller credential comes from ``PROXY_CALLER_KEY`` or ``--key-file``, never
from the command line, where ``ps`` would show it.

Every start-up failure (bad setting, missing or wrong master key, a key file readable by group or
others) is printed as one clear line on stderr and exits with status 2 before anything listens.

Key rotation is online: ``serve`` re-reads the key file on SIGHUP (a ``--workers`` parent passes
the signal to every worker), and the vault re-reads it by itself when it meets a version it does
not hold; the ``keys`` commands edit the file atomically, private, keeping a backup on retire.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proxy import __version__
from proxy.errors import ProxyError
from proxy.observe import logformat
from proxy.security import crypto
from proxy.settings import Settings, load_settings

log = logging.getLogger("proxy.cli")


def _setup_logging(level: str, fmt: str = "text") -> None:
    logformat.configure(level, logformat.resolve_format(fmt, sys.stderr))


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "listen", None):
        overrides["listen"] = args.listen
    if getattr(args, "workers", None) is not None:
        overrides["workers"] = args.workers
    return load_settings(args.config, overrides=overrides)


# --- serve -------------------------------------------------------------------------------------


def _serve_one(settings: Settings, reuse_port: bool) -> None:
    from proxy.web.app import SERVICES, build_app
    from proxy.web.connguard import serve

    app = build_app(settings)
    app.on_startup.append(_reload_keys_on_sighup)
    app.on_startup.append(_tune_collector)  # last: after the service has loaded everything
    secrets = app[SERVICES].secrets
    # With JSON logs every line the service writes is a JSON record, these announcements too.
    json_logs = any(isinstance(h.formatter, logformat.JsonFormatter) for h in logging.getLogger().handlers)

    def say(msg: str) -> None:
        if json_logs:
            log.info("%s", msg.replace("\n", " "))
        else:
            print(msg, flush=True)

    if secrets.admin_token_file is not None:
        say(
            f'admin token: {secrets.admin_token_file}  (curl -H "Authorization: Bearer $(cat {secrets.admin_token_file})")'
        )
    # Not web.run_app: the listening socket uses the connection guard (connection cap, request
    # head deadline) as its protocol factory, which run_app cannot be given.
    asyncio.run(serve(app, settings, reuse_port=reuse_port, announce=say))


async def _reload_keys_on_sighup(app: Any) -> None:
    """SIGHUP: re-read the master key ring, the CA files and the listener's certificate; each
    part that fails to load keeps what it had, and the service keeps serving."""
    from proxy.web.app import SERVICES
    from proxy.web.tunnel import reload_tls

    vault = app[SERVICES].vault
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        try:
            if not await vault.reload_ring():
                log.info("SIGHUP: master key ring unchanged (versions %s)", list(vault.ring.versions))
        except ProxyError as exc:  # a bad file must not take down a running service
            log.error(
                "SIGHUP: master key ring not reloaded, keeping versions %s: %s",
                list(vault.ring.versions),
                exc.message,
            )
        try:
            for line in reload_tls(app):
                log.info("SIGHUP: %s", line)
        except ProxyError as exc:
            log.error(
                "SIGHUP: CA or listener certificate not reloaded, keeping the current one: %s", exc.message
            )

    def on_hup() -> None:
        task = loop.create_task(reload())
        pending.add(task)  # keep a reference until done
        task.add_done_callback(pending.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)


# Young-generation threshold of the cyclic collector (CPython's default is 700). See below.
GC_GEN0_THRESHOLD = 10_000


async def _tune_collector(app: Any) -> None:
    """Garbage-collector settings for a long-running server process (figures: bench/README.md).

    - Everything loaded at start-up (libraries, catalogue, templates, key ring, clients) lives
      as long as the process; ``gc.freeze`` moves it out of the collector's generations, so a
      collection walks only what was created since.
    - With the default threshold, the young generation is collected every 700 net allocations,
      which at 64 concurrent calls mostly walks and promotes the objects of calls still in
      flight, again and again. At 10,000 that cost nearly vanishes; what waits for collection
      is cyclic garbage only (reference counting frees the rest at once), bounded to a few MB.
    """
    import gc

    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
    gc.freeze()


def _serve_workers(settings: Settings, argv: Sequence[str]) -> int:
    """N processes on one port via SO_REUSEPORT; the kernel spreads connections among them."""
    if settings.redis_url is None:
        log.warning(
            "--workers %d without PROXY_REDIS_URL: workers share the SQLite store, but rate-limit "
            "state is per process (each worker enforces the full configured limit)",
            settings.workers,
        )
    # Dev-mode key and token files are created here, once, before any worker reads them.
    from proxy.security.bootstrap import load_secrets

    load_secrets(settings)
    children = []
    # Shared metric files: any worker's /metrics then answers for all workers.
    metrics_dir = tempfile.mkdtemp(prefix="connection-proxy-metrics-")
    env = dict(os.environ, PROXY_WORKER_CHILD="1", PROMETHEUS_MULTIPROC_DIR=metrics_dir)
    for _ in range(settings.workers):
        children.append(subprocess.Popen([sys.executable, "-m", "proxy", *argv], env=env))

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward)  # every worker re-reads the key ring
    codes = [child.wait() for child in children]
    shutil.rmtree(metrics_dir, ignore_errors=True)
    return max(codes, default=0)


def cmd_serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    settings = _settings(args)
    _setup_logging(settings.log_level, settings.log_format)
    if settings.workers > 1 and os.environ.get("PROXY_WORKER_CHILD") != "1":
        return _serve_workers(settings, argv)
    _serve_one(settings, reuse_port=os.environ.get("PROXY_WORKER_CHILD") == "1")
    return 0


# --- keys --------------------------------------------------------------------------------------


async def _with_vault(settings: Settings, action: str, version: int | None) -> int:
    from proxy.catalogue import Catalogue
    from proxy.security.bootstrap import append_key_version, check_retirable, load_ring, retire_key_version
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
        vault = Vault(store, ring, Catalogue.load(settings.integrations_dirs), 0)
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
    settings = _settings(args)
    _setup_logging(settings.log_level)
    if args.keys_cmd == "add":
        return _add(settings)
    action = {
        "rotate": "rotate-generate" if getattr(args, "generate", False) else "rotate",
        "retire": "retire",
        "status": "status",
        "reencrypt": "resume" if getattr(args, "resume", False) else "reencrypt",
    }[args.keys_cmd]
    return asyncio.run(_with_vault(settings, action, getattr(args, "version", None)))


# --- ca, run ----------------------------------------------------------------------------------


def cmd_ca(args: argparse.Namespace) -> int:
    from proxy.security.ca import load_ca

    settings = _settings(args)
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


DESCRIPTION = """\
A vault of API credentials for many tenants that proxies calls and injects them, a rate limiter
shared by every replica, and a Runtara Connection Service.

Settings come from --config FILE (or PROXY_CONFIG) and PROXY_* environment variables, the
environment winning; docs/configuration.md lists every one. Start with: connection-proxy serve
"""
EPILOG = "Run connection-proxy COMMAND --help for the options of a command."


class _Parser(argparse.ArgumentParser):
    """A command group given without its command prints the group's help, not argparse's
    "the following arguments are required: cmd"."""

    def error(self, message: str) -> Any:
        groups = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
        names = {str(g.metavar or g.dest) for g in groups}
        if message.startswith("the following arguments are required:") and any(n in message for n in names):
            self.print_help(sys.stderr)
            self.exit(2, f"\n{self.prog}: give one of the commands above\n")
        super().error(message)


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(
            f"must be a whole number of processes, at least 1 (got {text!r}); one process is --workers 1"
        )
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="connection-proxy",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the service")
    serve.add_argument("--config", help="TOML settings file (PROXY_* environment variables win)")
    serve.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:8080)")
    serve.add_argument(
        "--workers",
        type=_workers,
        help="processes sharing the port, at least 1 (default 1, or PROXY_WORKERS)",
    )

    keys = sub.add_parser("keys", help="master key ring and tenant data keys")
    ksub = keys.add_subparsers(dest="keys_cmd", required=True)
    generate = ksub.add_parser("generate", help="a new key-ring file (one 32-byte key), mode 0600")
    generate.add_argument("--out", metavar="FILE", help="create FILE (mode 0600; refused if it exists)")
    add = ksub.add_parser("add", help="add a new newest version to the key file (no store change)")
    rotate = ksub.add_parser("rotate", help="re-wrap every tenant key under the newest master key")
    rotate.add_argument("--generate", action="store_true", help="first add a new key version to the key file")
    retire = ksub.add_parser(
        "retire", help="remove an unused master key version from the key file (keeps a backup)"
    )
    retire.add_argument("version", type=int)
    status = ksub.add_parser("status", help="which master key versions are in use")
    reenc = ksub.add_parser("reencrypt", help="new tenant data keys; re-encrypt every record (resumable)")
    reenc.add_argument("--resume", action="store_true", help="finish an interrupted run without a new key")
    ca = sub.add_parser("ca", help="the CA that HTTPS_PROXY clients must trust")
    casub = ca.add_subparsers(dest="ca_cmd", required=True)
    export = casub.add_parser("export", help="print the CA certificate bundle (PEM) to trust")
    ca_rotate = casub.add_parser(
        "rotate",
        help="new signing CA, cross-signed by the current one (both trusted); --finish drops the old",
    )
    ca_rotate.add_argument(
        "--finish", action="store_true", help="end the overlap: keep only the signing CA in the file"
    )

    run = sub.add_parser(
        "run",
        help="run a command with HTTPS_PROXY/HTTP_PROXY and CA bundle variables set for the proxy",
        description="The caller credential comes from PROXY_CALLER_KEY or --key-file, never argv.",
    )
    run.add_argument("--connection", help="the connection whose credentials calls use")
    run.add_argument("--tenant", help="the tenant (needed for credentials not bound to one)")
    run.add_argument("--runtime-user", help="a runtime user id (its own connection, if any)")
    run.add_argument("--proxy", help="proxy URL (default: public_url, i.e. PROXY_PUBLIC_URL or PROXY_LISTEN)")
    run.add_argument("--key-file", help="read the caller credential from FILE instead of PROXY_CALLER_KEY")
    run.add_argument(
        "--proxy-cacert",
        metavar="FILE",
        help="CA that verifies an https:// proxy listener (added to the bundle), e.g. what ca export prints",
    )
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    for p in (generate, add, rotate, retire, status, reenc, export, ca_rotate, run):
        p.add_argument("--config", help="TOML settings file (PROXY_* environment variables win)")

    nginx = sub.add_parser(
        "nginx-config",
        help="print an nginx configuration that puts nginx in front (it asks this service per call)",
    )
    nginx.add_argument("--listen", dest="nginx_listen", required=True, help="HOST:PORT nginx listens on")
    nginx.add_argument("--service", required=True, help="this service's URL as nginx reaches it")
    nginx.add_argument("--prefix", default=".", help="nginx prefix dir: pid, logs, temp and cache paths")
    nginx.add_argument(
        "--workers", dest="nginx_workers", default="auto", help="nginx worker_processes (default auto)"
    )
    nginx.add_argument("--trusted-ca", help="CA bundle nginx verifies upstreams with (default: system)")
    nginx.add_argument(
        "--keepalive",
        action="append",
        default=[],
        metavar="NAME=IP:PORT",
        help="keep connections to this checked address of this host name alive (repeatable)",
    )
    nginx.add_argument("--config", help="TOML settings file (PROXY_* environment variables win)")

    from proxy import admin_client

    admin_client.add_parser(sub)
    backup = sub.add_parser("backup", help="a consistent online copy of the embedded SQLite store")
    backup.add_argument("file", help="the copy to create (mode 0600; never overwritten)")
    backup.add_argument("--config", help="TOML settings file (PROXY_* environment variables win)")
    return parser


def cmd_nginx_config(args: argparse.Namespace) -> int:
    from proxy.catalogue import Catalogue
    from proxy.nginxconf import render
    from proxy.pipeline.decision import injectable_headers

    settings = _settings(args)
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

    settings = _settings(args)
    size = backup_sqlite(settings, Path(args.file))
    print(f"backed up {settings.store_path} to {args.file} ({size} bytes, integrity checked)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "serve":
            return cmd_serve(args, argv)
        if args.cmd == "admin":
            from proxy import admin_client

            return admin_client.run(args)
        if args.cmd == "backup":
            return cmd_backup(args)
        if args.cmd == "ca":
            return cmd_ca(args)
        if args.cmd == "run":
            return cmd_run(args)
        if args.cmd == "nginx-config":
            return cmd_nginx_config(args)
        return cmd_keys(args, argv)
    except ProxyError as exc:
        print(f"connection-proxy: {exc.message}", file=sys.stderr)
        return 2
