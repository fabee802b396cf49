#!/usr/bin/env bash
# The project's single test command.
#
# Starts a local S3 server (SeaweedFS, see scripts/services/s3.sh), a local
# IMAP server (Dovecot, see scripts/services/imap.sh), a Matrix homeserver
# (Synapse, scripts/services/synapse.sh) and a Mastodon API mock
# (mastodon-mock, scripts/services/mastodon.sh), runs the whole workspace
# test suite against them with CUSTOS_REQUIRE_{S3,IMAP,MATRIX,MASTODON}=1,
# and always stops the servers again. Extra arguments go to `cargo test`, e.g.
#   scripts/test.sh -p custos-connectors -- s3
# Exits with cargo's exit code.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

S3_SH="$ROOT/scripts/services/s3.sh"
S3_NAME=s3
IMAP_SH="$ROOT/scripts/services/imap.sh"
IMAP_NAME=imap
SYNAPSE_SH="$ROOT/scripts/services/synapse.sh"
SYNAPSE_NAME=synapse
MASTODON_SH="$ROOT/scripts/services/mastodon.sh"
MASTODON_NAME=mastodon
log() { echo "test.sh: $*"; }
# Wall time of each phase (install/start services, build, test) in the CI log.
phase_start=$SECONDS
phase_done() { log "phase $1 took $((SECONDS - phase_start)) s"; phase_start=$SECONDS; }

# rustup installs cargo here; a non-login shell may not have it on PATH.
if ! command -v cargo >/dev/null && [[ -x $HOME/.cargo/bin/cargo ]]; then
	PATH="$HOME/.cargo/bin:$PATH"
fi

# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
	bash "$S3_SH" stop "$S3_NAME" || log "warning: could not stop the S3 server '$S3_NAME'"
	bash "$IMAP_SH" stop "$IMAP_NAME" || log "warning: could not stop the IMAP server '$IMAP_NAME'"
	bash "$SYNAPSE_SH" stop "$SYNAPSE_NAME" || log "warning: could not stop the Matrix server '$SYNAPSE_NAME'"
	bash "$MASTODON_SH" stop "$MASTODON_NAME" || log "warning: could not stop the Mastodon server '$MASTODON_NAME'"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Each instance needs PORT..PORT+4 and PORT+10000..PORT+10004; s3.sh exits 3
# when any of them is taken, then the next candidate is tried.
log "starting S3 test server"
started=
for ((i = 0; i < 20; i++)); do
	port=$((18333 + 10 * i))
	rc=0
	bash "$S3_SH" start "$S3_NAME" "$port" || rc=$?
	if ((rc == 0)); then
		started=$port
		break
	elif ((rc == 3)); then
		log "ports near $port busy, trying another"
	else
		log "S3 server failed to start (exit $rc)"
		exit "$rc"
	fi
done
if [[ -z $started ]]; then
	log "no free port range found for the S3 server"
	exit 1
fi

# Stray AWS settings from the caller's environment must not change how the
# tests sign requests.
unset AWS_SESSION_TOKEN AWS_SECURITY_TOKEN AWS_PROFILE AWS_DEFAULT_REGION AWS_ENDPOINT AWS_ENDPOINT_URL
# shellcheck source=/dev/null
source "$(bash "$S3_SH" env "$S3_NAME")"
export CUSTOS_REQUIRE_S3=1
log "S3 at $CUSTOS_TEST_S3_ENDPOINT (buckets $CUSTOS_TEST_S3_BUCKET, $CUSTOS_TEST_S3_BUCKET2)"

# IMAP (Dovecot) on one loopback port; imap.sh exits 3 when it is taken.
log "starting IMAP test server"
started=
for ((i = 0; i < 20; i++)); do
	port=$((18143 + 7 * i))
	rc=0
	bash "$IMAP_SH" start "$IMAP_NAME" "$port" || rc=$?
	if ((rc == 0)); then
		started=$port
		break
	elif ((rc == 3)); then
		log "port $port busy, trying another"
	else
		log "IMAP server failed to start (exit $rc)"
		exit "$rc"
	fi
done
if [[ -z $started ]]; then
	log "no free port found for the IMAP server"
	exit 1
fi
# shellcheck source=/dev/null
source "$(bash "$IMAP_SH" env "$IMAP_NAME")"
export CUSTOS_REQUIRE_IMAP=1
log "IMAP at $CUSTOS_TEST_IMAP_HOST:$CUSTOS_TEST_IMAP_PORT"

# Matrix (Synapse) and Mastodon (mastodon-mock), one loopback port each;
# their scripts exit 3 when the port is taken.
start_one() { # SCRIPT NAME FIRST_PORT STEP WHAT
	local sh=$1 name=$2 first=$3 step=$4 what=$5 i port rc
	for ((i = 0; i < 20; i++)); do
		port=$((first + step * i))
		rc=0
		bash "$sh" start "$name" "$port" || rc=$?
		if ((rc == 0)); then return 0; fi
		if ((rc != 3)); then
			log "$what server failed to start (exit $rc)"
			exit "$rc"
		fi
		log "port $port busy, trying another"
	done
	log "no free port found for the $what server"
	exit 1
}
log "starting Matrix test server (Synapse)"
start_one "$SYNAPSE_SH" "$SYNAPSE_NAME" 18448 7 Matrix
# shellcheck source=/dev/null
source "$(bash "$SYNAPSE_SH" env "$SYNAPSE_NAME")"
export CUSTOS_REQUIRE_MATRIX=1
log "Matrix at $CUSTOS_TEST_MATRIX_URL"
log "starting Mastodon test server (mastodon-mock)"
start_one "$MASTODON_SH" "$MASTODON_NAME" 18480 7 Mastodon
# shellcheck source=/dev/null
source "$(bash "$MASTODON_SH" env "$MASTODON_NAME")"
export CUSTOS_REQUIRE_MASTODON=1
log "Mastodon at $CUSTOS_TEST_MASTODON_URL"

# The end-to-end suites (tests/) drive the real `custos` binary: build it
# first, in the same dev profile the tests use, so nothing compiles twice.
phase_done "install (servers installed if missing and started)"
log "building the custos binary"
cargo build --locked -p custos-agent --bin custos
phase_done "build"
log "running: cargo test --workspace --locked $*"
rc=0
cargo test --workspace --locked "$@" || rc=$?
phase_done "test"
log "cargo test exited with $rc"
exit "$rc"
