#!/usr/bin/env bash
# Build and smoke-run the container image of deploy/Dockerfile where no container registry is
# reachable (only a Debian mirror and PyPI), which is why `make image` exists at all:
#   deploy/image.sh base    debootstrap a Debian bookworm rootfs with python3 + venv and import it
#                           as $IMAGE_BASE (a stand-in for python:3.11-slim-bookworm; needs root)
#   deploy/image.sh build   build deploy/Dockerfile on $IMAGE_BASE (making the base first if it is
#                           a localhost/ one that is missing) and tag it $IMAGE
#   deploy/image.sh smoke   run $IMAGE against a throw-away redis-server on this host; check
#                           /healthz, /readyz, /metrics, the non-root uid, the HEALTHCHECK and a
#                           clean SIGTERM stop
# Where a registry is reachable: IMAGE_BASE=python:3.11-slim-bookworm deploy/image.sh build.
# Not part of `make test`: CI has no container engine that can run it.
set -euo pipefail

ENGINE=${CONTAINER_ENGINE:-podman}
IMAGE=${IMAGE:-localhost/connection-proxy:0.1.0}
IMAGE_BASE=${IMAGE_BASE:-localhost/python:3.11-slim-bookworm}
# A TLS-intercepting egress proxy's CA reaches pip as a build secret, never as an image layer.
PIP_CERT_FILE=${PIP_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
REPO=$(cd "$(dirname "$0")/.." && pwd)

say() { printf '+ %s\n' "$*" >&2; }
run() { say "$*"; "$@"; }
# Podman without systemd logs an error for every healthcheck timer it cannot set: noise here.
run_quiet() { say "$*"; "$@" 2> >(grep --line-buffered -v 'systemd' >&2); }

# The Debian mirror this machine's apt uses (deb822 or one-line sources), else deb.debian.org.
debian_mirror() {
    local url
    url=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
        | grep -v security | grep -oE 'https?://[^ ]+' | head -n1 || true)
    echo "${DEBIAN_MIRROR:-${url:-http://deb.debian.org/debian}}"
}

make_base() {
    command -v debootstrap >/dev/null || { echo "needs debootstrap: apt-get install -y debootstrap" >&2; exit 1; }
    [ "$(id -u)" = 0 ] || { echo "debootstrap needs root" >&2; exit 1; }
    ROOTFS=$(mktemp -d "${TMPDIR:-/var/tmp}/connection-proxy-rootfs.XXXXXX")
    trap 'rm -rf "$ROOTFS"' EXIT
    local rootfs=$ROOTFS
    # python-is-python3: the Dockerfile calls `python`, as on the official image;
    # ca-certificates: the service verifies upstream TLS against the system store.
    run debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
        bookworm "$rootfs" "$(debian_mirror)" >/dev/null
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
    say "tar -C $rootfs -c . | $ENGINE import - $IMAGE_BASE"
    tar -C "$rootfs" -c . | "$ENGINE" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$IMAGE_BASE" >/dev/null
}

build() {
    local flags=(--build-arg "BASE=$IMAGE_BASE" -f "$REPO/deploy/Dockerfile" -t "$IMAGE")
    if [[ $IMAGE_BASE == localhost/* ]]; then
        "$ENGINE" image exists "$IMAGE_BASE" 2>/dev/null || make_base
        flags+=(--pull=never)
    fi
    [ -s "$PIP_CERT_FILE" ] && flags+=(--secret "id=pip_cert,src=$PIP_CERT_FILE")
    if [ "$ENGINE" = podman ]; then
        # docker format: the OCI format has no HEALTHCHECK and podman drops it with a warning.
        # chroot isolation: RUN steps need no cgroups (crun refuses hybrid v1/v2 hosts).
        flags+=(--format docker --isolation=chroot)
    fi
    run "$ENGINE" build "${flags[@]}" "$REPO"
    "$ENGINE" image ls "$IMAGE"
}

# Flags that let podman run a container in a sandbox without CAP_SYS_RESOURCE (no raising a
# hard rlimit: podman's defaults are nofile 1048576, nproc as conmon's) on hybrid cgroups (crun
# refuses them; runc copes).
run_flags() {
    local nofile nproc
    nofile=$(ulimit -Hn) nproc=$(ulimit -Hu)
    [ "$nofile" = unlimited ] && nofile=1048576
    { [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
    echo "--ulimit nofile=$nofile:$nofile --ulimit nproc=$nproc:$nproc"
    if [ "$ENGINE" = podman ] && [ -d /sys/fs/cgroup/unified ] && command -v runc >/dev/null; then
        echo "--runtime runc"
    fi
}

# An upstream on this host answering with the Authorization header it received.
start_upstream() {
    UPSTREAM_PORT=$(free_port)
    python3 - "$UPSTREAM_PORT" >"$WORK/upstream.log" 2>&1 <<'PY' &
import http.server, json, sys
class Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"path": self.path, "authorization": self.headers.get("Authorization")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Echo).serve_forever()
PY
    echo $! >"$WORK/upstream.pid"
}

# Store a bearer connection, mint a caller key, call the upstream through the proxy: the token
# must arrive injected, and appear in no log line of the container.
proxied_call() {
    local base=$1 admin="Authorization: Bearer $PROXY_ADMIN_TOKEN" secret key answer
    secret="smoke-secret-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    say "PUT $base/admin/tenants/smoke/connections/echo (http_bearer to 127.0.0.1:$UPSTREAM_PORT)"
    curl -fsS -o /dev/null -X PUT "$base/admin/tenants/smoke/connections/echo" -H "$admin" \
        -H 'Content-Type: application/json' --data-binary @- <<JSON
{"integration_id": "http_bearer",
 "parameters": {"token": "$secret", "base_url": "http://127.0.0.1:$UPSTREAM_PORT"}}
JSON
    key=$(curl -fsS -X POST "$base/admin/tenants/smoke/api-keys" -H "$admin" \
        -H 'Content-Type: application/json' -d '{"name": "smoke"}' \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["api_key"])')
    say "curl $base/proxy/hello -H 'Authorization: Bearer cpk_...' -H 'X-Connection-Id: echo'"
    answer=$(curl -fsS "$base/proxy/hello" -H "Authorization: Bearer $key" -H 'X-Connection-Id: echo')
    echo "$answer" | sed "s/$secret/<the stored token>/"
    [ "$(echo "$answer" | python3 -c 'import json,sys; print(json.load(sys.stdin)["authorization"])')" = "Bearer $secret" ]
    if "$ENGINE" logs "$NAME" 2>&1 | grep -qF -e "$secret" -e "$PROXY_ADMIN_TOKEN" -e "$key"; then
        echo "a secret is in the container's log" >&2; exit 1
    fi
    say "the token arrived injected; no secret in the container's log"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

smoke() {
    local redis_port port
    redis_port=$(free_port) port=$(free_port)
    # Globals: the EXIT trap reads them after this function returns.
    NAME="connection-proxy-smoke-$$" WORK=$(mktemp -d)
    local name=$NAME work=$WORK
    redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
        --daemonize yes --pidfile "$work/redis.pid" --logfile "$work/redis.log"
    trap '"$ENGINE" rm -f "$NAME" >/dev/null 2>&1 || true; kill "$(cat "$WORK/redis.pid")" "$(cat "$WORK/upstream.pid" 2>/dev/null)" 2>/dev/null || true; rm -rf "$WORK"' EXIT
    # Fresh throw-away secrets, passed by name so they are in no command line.
    PROXY_MASTER_KEY=$(head -c 32 /dev/urandom | base64)
    PROXY_ADMIN_TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
    export PROXY_MASTER_KEY PROXY_ADMIN_TOKEN
    # shellcheck disable=SC2046  # run_flags is a list of words
    start_upstream
    run_quiet "$ENGINE" run -d --name "$name" --network=host $(run_flags) \
        -e PROXY_LISTEN="127.0.0.1:$port" -e PROXY_REDIS_URL="redis://127.0.0.1:$redis_port/0" \
        -e PROXY_EGRESS_ALLOW=127.0.0.1/32 -e PROXY_MASTER_KEY -e PROXY_ADMIN_TOKEN "$IMAGE"
    local base="http://127.0.0.1:$port" i
    for i in $(seq 50); do curl -fsS -o /dev/null "$base/healthz" 2>/dev/null && break; sleep 0.2; done
    run curl -fsS "$base/healthz"; echo
    run curl -fsS "$base/readyz"; echo
    say "curl -fsS $base/metrics | grep '^# TYPE proxy_requests_total'"
    curl -fsS "$base/metrics" | grep '^# TYPE proxy_requests_total'
    proxied_call "$base"
    local uid
    uid=$("$ENGINE" exec "$name" id -u)
    say "uid in the container: $uid"
    [ "$uid" != 0 ] || { echo "the service runs as root" >&2; exit 1; }
    say "process: $(ps -o user=,cmd= -p "$("$ENGINE" inspect -f '{{.State.Pid}}' "$name")")"
    if [ "$ENGINE" = podman ]; then
        run_quiet podman healthcheck run "$name"
        say "health: $(podman inspect -f '{{.State.Health.Status}}' "$name")"
    else
        for i in $(seq 30); do
            [ "$(docker inspect -f '{{.State.Health.Status}}' "$name")" = healthy ] && break; sleep 1
        done
        say "health: $(docker inspect -f '{{.State.Health.Status}}' "$name")"
    fi
    run_quiet "$ENGINE" stop -t 30 "$name" >/dev/null
    local code
    code=$("$ENGINE" inspect -f '{{.State.ExitCode}}' "$name")
    say "exit code after SIGTERM: $code"
    [ "$code" = 0 ]
    echo "smoke: ok"
}

case "${1:-build}" in
    base) make_base ;;
    build) build ;;
    smoke) smoke ;;
    *) echo "usage: $0 base|build|smoke" >&2; exit 2 ;;
esac
