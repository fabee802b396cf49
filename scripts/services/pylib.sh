# Shared by the service scripts that run a Python server from its own venv
# (synapse.sh, mastodon.sh). Source it after setting SCRIPT (the script's
# name for messages), VENV, SERVICES, PYTHON, DIST (the PyPI distribution)
# and DIST_VERSION (pinned); the script defines `is_our_server PID DIR`
# (usually one `process_matches` call).

log() { echo "$SCRIPT: $*" >&2; }
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
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Is the pinned DIST installed in VENV?
dist_ok() {
	[[ -x $VENV/bin/python ]] || return 1
	[[ $("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$DIST'))" 2>/dev/null) == "$DIST_VERSION" ]]
}

# Install DIST==DIST_VERSION into a fresh VENV unless there (serialized
# between concurrent starts by a lock file; fd 9 is closed before any server starts).
ensure_dist() {
	dist_ok && return 0
	mkdir -p "$SERVICES"
	exec 9>"$SERVICES/.install.lock"
	if command -v flock >/dev/null; then flock 9; fi
	if ! dist_ok; then
		local t0
		t0=$(now_ms)
		log "installing $DIST==$DIST_VERSION into $VENV"
		rm -rf "$VENV"
		"$PYTHON" -m venv "$VENV" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
		PIP_ROOT_USER_ACTION=ignore "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
			"$DIST==$DIST_VERSION"
		dist_ok || die "$DIST $DIST_VERSION missing after install"
		log "installed in $(($(now_ms) - t0)) ms"
	fi
	exec 9>&-
}

# Is PID a live (not zombie) process whose command line matches PATTERN (a glob)?
process_matches() {
	local pid=$1 pattern=$2 cmdline
	[[ -r /proc/$pid/cmdline ]] || return 1
	cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
	# shellcheck disable=SC2053 # PATTERN is a glob on purpose
	[[ $cmdline == $pattern ]] || return 1
	[[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]]
}

# Before starting NAME on PORT: check both, install DIST, stop an old
# instance of NAME. Exits 3 when PORT is taken.
prepare_start() {
	local name=$1 port=$2
	check_name "$name"
	if ! [[ $port =~ ^[0-9]+$ ]] || ((port < 1024 || port > 65535)); then
		die "PORT must be 1024..65535, got '$port'"
	fi
	ensure_dist
	cmd_stop "$name"
	if port_in_use "$port"; then
		log "port $port in use"
		exit 3
	fi
}

# Stop the server NAME (TERM, then KILL after 5 s) and remove its state.
cmd_stop() {
	local name=$1 dir pid i
	check_name "$name"
	dir="$SERVICES/$name"
	[[ -d $dir ]] || return 0
	if [[ -f $dir/pid ]]; then
		pid=$(<"$dir/pid")
		if [[ $pid =~ ^[0-9]+$ ]] && is_our_server "$pid" "$dir"; then
			kill -TERM "$pid" 2>/dev/null || true
			for ((i = 0; i < 50; i++)); do
				is_our_server "$pid" "$dir" || break
				sleep 0.1
			done
			if is_our_server "$pid" "$dir"; then kill -KILL "$pid" 2>/dev/null || true; fi
			log "stopped '$name' (pid $pid)"
		fi
	fi
	rm -rf "${SERVICES:?}/$name"
}
