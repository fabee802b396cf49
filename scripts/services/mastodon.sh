#!/usr/bin/env bash
# Local Mastodon API server (mastodon-mock, a stateful FastAPI + SQLite
# mock of the Mastodon REST API) for the custos test suite.
#
#   scripts/services/mastodon.sh start NAME PORT   start a fresh server named NAME
#   scripts/services/mastodon.sh stop NAME         kill it and remove its state
#   scripts/services/mastodon.sh env NAME          print the path of its env file
#
# mastodon-mock (PyPI, pinned below; run as `mastodon_mock serve --config
# FILE --host 127.0.0.1 --port PORT`) is installed once into
# $ROOT/.venv-mastodon and reused. It implements /api/v1/statuses,
# /api/v1/notifications (types[] filter, max_id/min_id/since_id, Link
# headers), /api/v1/conversations (derived from direct statuses) and
# /api/v1/statuses/{id}/context among many others. Seeded accounts with
# fixed bearer tokens: custos (custos-token, the backed-up account),
# ana (ana-token), bob (bob-token). In-memory database; 127.0.0.1 only.
#
# `start` exits 3 when PORT is taken, 1 on any other failure.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
VENV="$ROOT/.venv-mastodon"
SERVICES="$ROOT/target/services/mastodon"
PYTHON=${PYTHON:-python3}

MOCK_VERSION=0.6.1
READY_TIMEOUT=${CUSTOS_MASTODON_READY_TIMEOUT:-60}

SCRIPT=mastodon.sh
DIST=mastodon-mock
DIST_VERSION=$MOCK_VERSION
# log, die, usage, now_ms, check_name, ensure_dist, process_matches, prepare_start, cmd_stop
# shellcheck source=scripts/services/pylib.sh
source "$SCRIPT_DIR/pylib.sh"

is_our_server() { process_matches "$1" "*mastodon_mock*$dir/mastodon_mock.toml*"; }

cmd_start() {
	local name=$1 port=$2 dir t0 t1 pid url i
	t0=$(now_ms)
	prepare_start "$name" "$port"
	t1=$(now_ms)
	dir="$SERVICES/$name"
	mkdir -p "$dir"
	cat >"$dir/mastodon_mock.toml" <<TOML
domain = "127.0.0.1:$port"
url_scheme = "http"

[database]
path = ":memory:"

[server]
host = "127.0.0.1"
port = $port

[faults]
enabled = false

[streaming]
enabled = false

[[seed.accounts]]
username = "custos"
display_name = "custos backup"
access_token = "custos-token"

[[seed.accounts]]
username = "ana"
access_token = "ana-token"

[[seed.accounts]]
username = "bob"
access_token = "bob-token"
TOML
	set +m
	(cd "$dir" && exec setsid "$VENV/bin/mastodon_mock" serve --config "$dir/mastodon_mock.toml" \
		--host 127.0.0.1 --port "$port" --log-level warning >>"$dir/server.log" 2>&1 </dev/null) &
	pid=$!
	disown "$pid"
	echo "$pid" >"$dir/pid"
	url="http://127.0.0.1:$port"
	for ((i = 0; i < READY_TIMEOUT * 10; i++)); do
		if "$VENV/bin/python" - "$url" <<'PY' 2>/dev/null; then break; fi
import sys, urllib.request
r = urllib.request.Request(sys.argv[1] + "/api/v1/accounts/verify_credentials",
                           headers={"Authorization": "Bearer custos-token"})
urllib.request.urlopen(r, timeout=2).read()
PY
		if ! is_our_server "$pid" "$dir"; then
			log "server '$name' exited; last lines of its log:"
			tail -n 40 "$dir/server.log" >&2 || true
			cmd_stop "$name" || true
			exit 1
		fi
		sleep 0.1
	done
	((i < READY_TIMEOUT * 10)) || {
		log "server '$name' not ready after ${READY_TIMEOUT}s"
		tail -n 40 "$dir/server.log" >&2 || true
		cmd_stop "$name" || true
		exit 1
	}
	cat >"$dir/env.tmp" <<ENV
export CUSTOS_TEST_MASTODON_URL=$url
export CUSTOS_TEST_MASTODON_TOKEN=custos-token
export CUSTOS_TEST_MASTODON_SENDER_TOKENS=ana-token,bob-token
ENV
	mv "$dir/env.tmp" "$dir/env"
	log "'$name' ready at $url (pid $pid; install check and stop of an old instance $((t1 - t0)) ms, start $(($(now_ms) - t1)) ms; env: $dir/env)"
}

cmd_env() {
	local name=$1
	check_name "$name"
	[[ -f $SERVICES/$name/env ]] || die "no env file for '$name' (not started?)"
	echo "$SERVICES/$name/env"
}

case "${1:-}:$#" in
start:3) cmd_start "$2" "$3" ;;
stop:2) cmd_stop "$2" ;;
env:2) cmd_env "$2" ;;
*) usage ;;
esac
