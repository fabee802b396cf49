#!/usr/bin/env bash
# Local Matrix homeserver (Synapse, SQLite) for the custos test suite.
#
#   scripts/services/synapse.sh start NAME PORT   start a fresh server named NAME
#   scripts/services/synapse.sh stop NAME         kill it and remove its state
#   scripts/services/synapse.sh env NAME          print the path of its env file
#
# Synapse (PyPI matrix-synapse, pinned below) is installed once into
# $ROOT/.venv-synapse and reused. The server listens on 127.0.0.1:PORT only
# (client API, no federation: trusted_key_servers is empty), keeps its state
# in target/services/synapse/NAME/ (thrown away by `stop` and the next
# `start`), has the rc_* rate limits raised for seeding, and registers the
# test users through the shared-secret admin API
# (/_synapse/admin/v1/register): `custos` (the backup account), `alice` and
# `bob` (senders), all with password custos-test-pw.
#
# `start` exits 3 when PORT is taken, 1 on any other failure.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
VENV="$ROOT/.venv-synapse"
SERVICES="$ROOT/target/services/synapse"
PYTHON=${PYTHON:-python3}

SYNAPSE_VERSION=1.163.2
SERVER_NAME=localhost
SHARED_SECRET=custos-test-registration-secret
PASSWORD=custos-test-pw
USERS=(custos alice bob)
READY_TIMEOUT=${CUSTOS_SYNAPSE_READY_TIMEOUT:-90}

SCRIPT=synapse.sh
DIST=matrix-synapse
DIST_VERSION=$SYNAPSE_VERSION
# log, die, usage, now_ms, check_name, ensure_dist, process_matches, prepare_start, cmd_stop
# shellcheck source=scripts/services/pylib.sh
source "$SCRIPT_DIR/pylib.sh"

is_our_server() { process_matches "$1" "*synapse.app.homeserver*$dir/homeserver.yaml*"; }

cmd_start() {
	local name=$1 port=$2 dir t0 t1 pid url i
	t0=$(now_ms)
	prepare_start "$name" "$port"
	t1=$(now_ms)
	dir="$SERVICES/$name"
	mkdir -p "$dir/media"
	cat >"$dir/log.yaml" <<YAML
version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(levelname)s - %(message)s'
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filename: $dir/homeserver.log
root:
  level: WARNING
  handlers: [file]
disable_existing_loggers: false
YAML
	# Rate limits raised far above what the tests send (seeding thousands
	# of messages, logging in per connector instance).
	local rc='{per_second: 100000, burst_count: 100000}'
	cat >"$dir/homeserver.yaml" <<YAML
server_name: "$SERVER_NAME"
public_baseurl: "http://127.0.0.1:$port/"
pid_file: "$dir/homeserver.pid"
listeners:
  - port: $port
    bind_addresses: ['127.0.0.1']
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client]
        compress: false
database:
  name: sqlite3
  args:
    database: "$dir/homeserver.db"
log_config: "$dir/log.yaml"
media_store_path: "$dir/media"
signing_key_path: "$dir/signing.key"
registration_shared_secret: "$SHARED_SECRET"
enable_registration: false
report_stats: false
trusted_key_servers: []
suppress_key_server_warning: true
macaroon_secret_key: "custos-test-macaroon-$name"
form_secret: "custos-test-form-$name"
presence:
  enabled: false
url_preview_enabled: false
enable_metrics: false
rc_message: $rc
rc_registration: $rc
rc_login:
  address: $rc
  account: $rc
  failed_attempts: $rc
rc_admin_redaction: $rc
rc_joins:
  local: $rc
  remote: $rc
rc_joins_per_room: $rc
rc_invites:
  per_room: $rc
  per_user: $rc
  per_issuer: $rc
rc_3pid_validation: $rc
rc_presence:
  per_user: $rc
rc_delayed_event_mgmt: $rc
rc_room_creation: $rc
rc_reports: $rc
YAML
	(cd "$dir" && "$VENV/bin/python" -m synapse.app.homeserver -c "$dir/homeserver.yaml" --generate-keys >/dev/null 2>&1) ||
		die "generating the signing key failed"
	echo "$port" >"$dir/port"
	set +m
	(cd "$dir" && exec setsid "$VENV/bin/python" -m synapse.app.homeserver -c "$dir/homeserver.yaml" \
		>>"$dir/stdout.log" 2>&1 </dev/null) &
	pid=$!
	disown "$pid"
	echo "$pid" >"$dir/pid"
	url="http://127.0.0.1:$port"
	for ((i = 0; i < READY_TIMEOUT * 10; i++)); do
		if "$VENV/bin/python" - "$url" <<'PY' 2>/dev/null; then break; fi
import sys, urllib.request
urllib.request.urlopen(sys.argv[1] + "/_matrix/client/versions", timeout=2).read()
PY
		if ! is_our_server "$pid" "$dir"; then
			log "server '$name' exited; last lines of its logs:"
			tail -n 40 "$dir/stdout.log" "$dir/homeserver.log" >&2 || true
			cmd_stop "$name" || true
			exit 1
		fi
		sleep 0.1
	done
	((i < READY_TIMEOUT * 10)) || {
		log "server '$name' not ready after ${READY_TIMEOUT}s"
		tail -n 40 "$dir/homeserver.log" >&2 || true
		cmd_stop "$name" || true
		exit 1
	}
	"$VENV/bin/python" - "$url" "$SHARED_SECRET" "$PASSWORD" "${USERS[@]}" <<'PY' || die "registering the test users failed"
import hashlib, hmac, json, sys, urllib.request
url, secret, password, users = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
ep = url + "/_synapse/admin/v1/register"
for user in users:
    nonce = json.load(urllib.request.urlopen(ep))["nonce"]
    admin = user == users[0]
    mac = hmac.new(secret.encode(), digestmod=hashlib.sha1)
    for part in (nonce, user, password, "admin" if admin else "notadmin"):
        mac.update(part.encode())
        if part in ("admin", "notadmin"):
            break
        mac.update(b"\x00")
    body = json.dumps({"nonce": nonce, "username": user, "password": password,
                       "admin": admin, "mac": mac.hexdigest()}).encode()
    req = urllib.request.Request(ep, data=body, headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req).read()
PY
	cat >"$dir/env.tmp" <<ENV
export CUSTOS_TEST_MATRIX_URL=$url
export CUSTOS_TEST_MATRIX_SERVER_NAME=$SERVER_NAME
export CUSTOS_TEST_MATRIX_USERS=$(
		IFS=,
		echo "${USERS[*]}"
	)
export CUSTOS_TEST_MATRIX_PASSWORD=$PASSWORD
ENV
	mv "$dir/env.tmp" "$dir/env"
	log "'$name' ready at $url (pid $pid; install check and stop of an old instance $((t1 - t0)) ms, start + users $(($(now_ms) - t1)) ms; env: $dir/env)"
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
