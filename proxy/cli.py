"""Command line: the parser, ``connection-proxy serve`` and the dispatch to the one-shot operator
commands of ``proxy.cli_ops`` (``keys``, ``ca``, ``run``, ``nginx-config``, ``backup``) and of
``proxy.admin_client`` (``admin``).

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
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from proxy import __version__
from proxy.cli_ops import (
    cmd_backup,
    cmd_ca,
    cmd_keys,
    cmd_nginx_config,
    cmd_run,
    settings_from_args,
    setup_logging,
)
from proxy.errors import ProxyError
from proxy.observe import logformat
from proxy.settings import Settings

log = logging.getLogger("proxy.cli")


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
    settings = settings_from_args(args)
    setup_logging(settings.log_level, settings.log_format)
    if settings.workers > 1 and os.environ.get("PROXY_WORKER_CHILD") != "1":
        return _serve_workers(settings, argv)
    _serve_one(settings, reuse_port=os.environ.get("PROXY_WORKER_CHILD") == "1")
    return 0


# --- keys --------------------------------------------------------------------------------------


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
