#!/usr/bin/env bash
# Optional API contract checks (not part of CI): the connectors' requests
# against the vendors' OpenAPI specs, validated by Stoplight Prism.
#
# Installs Prism with npm into target/prism (outside git, reused), then for
# each spec found under ../shared/contracts (CONTRACTS=DIR to point
# elsewhere; a missing spec is skipped with a message) starts
# `prism mock` on 127.0.0.1 on a free port, exports the connector's
# CUSTOS_PRISM_* variable, runs the connector's `prism_contract_check`
# test, and stops Prism by PID. Specs with a known error, or published as
# fragments, are first rewritten into target/prism/specs by
# scripts/{hubspot,slack,matrix}-prism-spec.py (each documents its change).
# Prism logs are kept in target/prism/logs. Exits non-zero if any check
# failed (or Prism could not be installed or started).
#
#   scripts/contract-check.sh            # every check whose spec is present
#   scripts/contract-check.sh slack x    # only these
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
CONTRACTS=${CONTRACTS:-$ROOT/../shared/contracts}
CACHE=$ROOT/target/prism
PRISM=$CACHE/node_modules/.bin/prism
log() { echo "contract-check: $*"; }

if ! command -v cargo >/dev/null && [[ -x $HOME/.cargo/bin/cargo ]]; then
	PATH="$HOME/.cargo/bin:$PATH"
fi

if [[ ! -x $PRISM ]]; then
	log "installing @stoplight/prism-cli into $CACHE"
	mkdir -p "$CACHE"
	npm install --prefix "$CACHE" --no-audit --no-fund @stoplight/prism-cli >"$CACHE/npm.log" 2>&1 || {
		log "npm install failed (see $CACHE/npm.log)"
		exit 1
	}
fi
mkdir -p "$CACHE/specs" "$CACHE/logs"

free_port() {
	python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

PRISM_PID=
stop_prism() {
	if [[ -n $PRISM_PID ]]; then
		kill "$PRISM_PID" 2>/dev/null
		wait "$PRISM_PID" 2>/dev/null
		PRISM_PID=
	fi
}
trap stop_prism EXIT

# name | spec (relative to CONTRACTS) | env var | test filter | prism flags
CHECKS=(
	"hubspot|hubspot/contacts.v3.json|CUSTOS_PRISM_HUBSPOT|hubspot::tests::prism_contract_check|-d"
	"x|x/openapi.json|CUSTOS_PRISM_X|x::tests::prism_contract_check|-d"
	"slack|slack/slack_web_openapi_v2.json|CUSTOS_PRISM_SLACK|slack::tests::prism_contract_check|"
	"mastodon|mastodon/schema.json|CUSTOS_PRISM_MASTODON|mastodon::tests::prism_contract_check|"
	"matrix|matrix/data/api/client-server|CUSTOS_PRISM_MATRIX|matrix::tests::prism_contract_check|"
)

# The spec file Prism serves for check $1 from $2 (written to $3 if needed).
prepare() {
	local name=$1 src=$2 out=$CACHE/specs/$1.json
	case $name in
	hubspot | slack | matrix)
		python3 "$ROOT/scripts/$name-prism-spec.py" "$src" "$out" || return 1
		echo "$out"
		;;
	*) echo "$src" ;;
	esac
}

PASSED=() FAILED=() SKIPPED=()
for entry in "${CHECKS[@]}"; do
	IFS='|' read -r name spec var filter flags <<<"$entry"
	if [[ $# -gt 0 && " $* " != *" $name "* ]]; then
		continue
	fi
	src=$CONTRACTS/$spec
	if [[ ! -e $src ]]; then
		log "$name: skipped, no spec at $src"
		SKIPPED+=("$name")
		continue
	fi
	if ! served=$(prepare "$name" "$src"); then
		log "$name: FAILED, could not prepare the spec"
		FAILED+=("$name")
		continue
	fi
	port=$(free_port)
	plog=$CACHE/logs/$name.log
	# shellcheck disable=SC2086
	"$PRISM" mock $flags -p "$port" -h 127.0.0.1 "$served" >"$plog" 2>&1 &
	PRISM_PID=$!
	for _ in $(seq 1 120); do
		grep -q "Prism is listening" "$plog" 2>/dev/null && break
		kill -0 "$PRISM_PID" 2>/dev/null || break
		sleep 0.5
	done
	if ! grep -q "Prism is listening" "$plog"; then
		log "$name: FAILED, Prism did not start (see $plog)"
		stop_prism
		FAILED+=("$name")
		continue
	fi
	log "$name: Prism (pid $PRISM_PID) on 127.0.0.1:$port serving $served"
	if env "$var=http://127.0.0.1:$port" cargo test -p custos-connectors --lib -- "$filter" --exact --nocapture; then
		PASSED+=("$name")
	else
		log "$name: FAILED (Prism log: $plog)"
		FAILED+=("$name")
	fi
	stop_prism
done

log "passed: ${PASSED[*]:-none}; failed: ${FAILED[*]:-none}; skipped: ${SKIPPED[*]:-none}"
[[ ${#FAILED[@]} -eq 0 ]]
