#!/usr/bin/env bash
# Local IMAP test server (Dovecot, Debian `dovecot-imapd`) for the custos test suite.
#
#   scripts/services/imap.sh start NAME PORT   start a fresh server named NAME
#   scripts/services/imap.sh stop NAME         kill it and remove its state
#   scripts/services/imap.sh env NAME          print the path of its env file
#
# The server listens on 127.0.0.1:PORT only (plaintext IMAP; no other TCP
# listener: imaps, pop3, lmtp, submission and doveadm are off or unix sockets
# inside the state dir). One passwd-file user `custos` with a fixed password;
# mail in Maildir++ under target/services/imap/NAME/home/custos/Maildir, owned by
# the `dovecot` user (mail_uid/mail_gid). CONDSTORE and QRESYNC are on (they
# are in Dovecot 2.3's default capability list; `start` checks).
#
# The env file exports CUSTOS_TEST_IMAP_HOST, _PORT, _USER, _PASSWORD and
# CUSTOS_TEST_IMAP_MAILDIR (the user's Maildir root: tests may drop message
# files into <root>/.<folder>/new/ — Maildir delivery — which is much faster
# than APPEND for bulk loads).
#
# State lives in target/services/imap/NAME/ and is thrown away by `stop` (and by
# the next `start`). `start` exits 3 when PORT is taken, 1 on any other failure.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
SERVICES="$ROOT/target/services/imap"
USER_NAME=custos
PASSWORD=custos-imap-test-password
READY_TIMEOUT=${CUSTOS_IMAP_READY_TIMEOUT:-30}

log() { echo "imap.sh: $*" >&2; }
die() {
	log "error: $*"
	exit 1
}
usage() {
	echo "usage: $0 start NAME PORT | stop NAME | env NAME" >&2
	exit 2
}
now_ms() { echo $(($(date +%s%N) / 1000000)); }

check_name() {
	[[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "bad NAME '$1' (letters, digits, . _ -)"
}

port_in_use() {
	(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Install dovecot-imapd unless there (apt-get update once when the install fails).
ensure_dovecot() {
	if command -v dovecot >/dev/null && [[ -x /usr/lib/dovecot/imap ]]; then return 0; fi
	mkdir -p "$SERVICES"
	exec 9>"$SERVICES/.imap-install.lock"
	if command -v flock >/dev/null; then flock 9; fi
	if ! { command -v dovecot >/dev/null && [[ -x /usr/lib/dovecot/imap ]]; }; then
		log "installing dovecot-imapd"
		local apt=(apt-get -o DPkg::Lock::Timeout=300 install -y -q dovecot-imapd)
		if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" >"$SERVICES/.imap-install.log" 2>&1; then
			DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -q >>"$SERVICES/.imap-install.log" 2>&1 || true
			DEBIAN_FRONTEND=noninteractive "${apt[@]}" >>"$SERVICES/.imap-install.log" 2>&1 ||
				die "apt-get install dovecot-imapd failed (see $SERVICES/.imap-install.log)"
		fi
	fi
	exec 9>&-
	command -v dovecot >/dev/null || die "dovecot missing after install"
	# The package may have started the system instance; it listens on 143/993.
	# We never touch it: our instance has its own base_dir and port.
}

# Is $1 the live dovecot master of state dir $2?
is_our_server() {
	local pid=$1 dir=$2 cmdline state
	[[ -r /proc/$pid/cmdline ]] || return 1
	cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
	[[ $cmdline == *"dovecot -c $dir/dovecot.conf"* ]] || return 1
	state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
	[[ $state != Z ]]
}

cmd_stop() {
	local name=$1 dir pid pgid i
	check_name "$name"
	dir="$SERVICES/$name"
	[[ -d $dir ]] || return 0
	if [[ -f $dir/pid ]]; then
		pid=$(<"$dir/pid")
		if [[ $pid =~ ^[0-9]+$ ]] && is_our_server "$pid" "$dir"; then
			pgid=$(awk '{print $5}' "/proc/$pid/stat" 2>/dev/null || true)
			if [[ $pgid == "$pid" ]]; then
				kill -KILL -- "-$pid" 2>/dev/null || true # its process group (setsid): master + children
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
	rm -rf "$dir"
}

# Wait until the server greets on 127.0.0.1:$1 (master pid $2).
wait_ready() {
	local port=$1 pid=$2 deadline line
	deadline=$(($(date +%s) + READY_TIMEOUT))
	while (($(date +%s) < deadline)); do
		kill -0 "$pid" 2>/dev/null || return 1
		if { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null; then
			line=
			IFS= read -r -t 5 line <&3 || true
			exec 3<&- 3>&-
			[[ $line == "* OK"* ]] && return 0
		fi
		sleep 0.1
	done
	return 1
}

# Log in and print the CAPABILITY line.
capabilities() {
	local port=$1 line caps=
	exec 3<>"/dev/tcp/127.0.0.1/$port" || return 1
	IFS= read -r -t 5 line <&3 || true
	printf 'a LOGIN %s %s\r\nb CAPABILITY\r\nc LOGOUT\r\n' "$USER_NAME" "$PASSWORD" >&3
	while IFS= read -r -t 5 line <&3; do
		[[ $line == "* CAPABILITY"* ]] && caps=$line
		[[ $line == "c "* ]] && break
	done
	exec 3<&- 3>&-
	echo "$caps"
}

cmd_start() {
	local name=$1 port=$2 dir t0 pid caps
	check_name "$name"
	if ! [[ $port =~ ^[0-9]+$ ]] || ((port < 1024 || port > 65535)); then
		die "PORT must be 1024..65535, got '$port'"
	fi
	t0=$(now_ms)
	ensure_dovecot
	cmd_stop "$name"
	if port_in_use "$port"; then
		log "port $port in use"
		exit 3
	fi

	dir="$SERVICES/$name"
	mkdir -p "$dir/run" "$dir/state" "$dir/home/$USER_NAME/Maildir"
	echo "$port" >"$dir/port"
	printf '%s:{PLAIN}%s::::::\n' "$USER_NAME" "$PASSWORD" >"$dir/passwd"
	chmod 0644 "$dir/passwd"
	local uid gid
	uid=$(id -u dovecot)
	gid=$(id -g dovecot)
	chown -R dovecot:dovecot "$dir/home"
	# The mail processes (uid dovecot) must be able to reach the Maildir.
	chmod o+x "$dir" "$SERVICES" "$ROOT/target" 2>/dev/null || true
	cat >"$dir/dovecot.conf" <<EOF
# custos test instance '$name' (generated by scripts/services/imap.sh)
base_dir = $dir/run
state_dir = $dir/state
instance_name = custos-$name
log_path = $dir/dovecot.log
info_log_path = $dir/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
default_login_user = dovenull
default_internal_user = dovecot
mail_uid = $uid
mail_gid = $gid
first_valid_uid = $uid
last_valid_uid = $uid
first_valid_gid = $gid
last_valid_gid = $gid
mail_location = maildir:$dir/home/%u/Maildir
mail_fsync = never
mail_max_userip_connections = 100
imap_capability = +CONDSTORE QRESYNC
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u $dir/passwd
}
userdb {
  driver = static
  args = uid=$uid gid=$gid home=$dir/home/%u
}
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $port
  }
  inet_listener imaps {
    port = 0
  }
}
service doveadm {
  inet_listener {
    port = 0
  }
}
EOF
	echo "dovecot -c $dir/dovecot.conf -F" >"$dir/cmdline"
	set +m
	(cd "$dir" && exec setsid dovecot -c "$dir/dovecot.conf" -F >"$dir/server.log" 2>&1 </dev/null) &
	pid=$!
	disown "$pid"
	echo "$pid" >"$dir/pid"

	if ! wait_ready "$port" "$pid"; then
		log "server '$name' failed to come up; last lines of its logs:"
		tail -n 20 "$dir/server.log" "$dir/dovecot.log" >&2 2>/dev/null || true
		cmd_stop "$name" || true
		exit 1
	fi
	caps=$(capabilities "$port" || true)
	if [[ $caps != *CONDSTORE* || $caps != *QRESYNC* ]]; then
		log "server '$name' lacks CONDSTORE/QRESYNC: $caps"
		tail -n 20 "$dir/dovecot.log" >&2 2>/dev/null || true
		cmd_stop "$name" || true
		exit 1
	fi

	cat >"$dir/env.tmp" <<EOF
export CUSTOS_TEST_IMAP_HOST=127.0.0.1
export CUSTOS_TEST_IMAP_PORT=$port
export CUSTOS_TEST_IMAP_USER=$USER_NAME
export CUSTOS_TEST_IMAP_PASSWORD=$PASSWORD
export CUSTOS_TEST_IMAP_MAILDIR=$dir/home/$USER_NAME/Maildir
EOF
	mv "$dir/env.tmp" "$dir/env"
	log "'$name' ready at 127.0.0.1:$port (pid $pid, $(($(now_ms) - t0)) ms, env: $dir/env)"
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
