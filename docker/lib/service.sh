# shellcheck shell=bash
# What the hpchub test service scripts (docker/*/*.sh) share: progress on stderr, the root check and the
# lock around their commands, daemon liveness read from /proc, waits with a deadline, detached starts,
# stops with SIGTERM then SIGKILL, files rewritten only when they change, and package installs (apt.sh
# beside this file).
#
# Source it first, with TAG set (the prefix of log lines, e.g. "sshd.sh"). The script then sets LOCK (a
# lock file), ROOT_FOR (why its commands need root) and optionally LOCK_WAIT (seconds, default 300);
# defines start, stop, status, optionally restart, and log_files (the logs whose tails explain a failed
# start, one a line) and diagnose (more of that, on stdout); and ends with `service_main "$@"`.
# Temporary files go in TMP, removed on exit.

umask 022
export DEBIAN_FRONTEND=noninteractive
T0=$(date +%s%N)
TEST_USERS=(alice bob)   # ordinary test users; password: <name>pw

log() { printf '[%s %(%H:%M:%S)T] %s\n' "$TAG" -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now_ns() { date +%s%N; }
elapsed() { local ms=$(( ($(now_ns) - T0) / 1000000 )); printf '%d.%01d s' $((ms / 1000)) $((ms % 1000 / 100)); }

# shellcheck source=docker/lib/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
TMP=$(mktemp -d)
trap 'remove_policy; rm -rf "$TMP"' EXIT
trap 'exit 130' INT TERM   # so that the EXIT trap runs

# --- processes ----------------------------------------------------------------------------------
# proc_alive PID [COMM]: PID runs, is no zombie (kill -0 succeeds on zombies, and PID 1 here reaps
# them lazily) and, when COMM is given, is that program (a stale pid file may name a reused PID).
proc_alive() {
  local stat rest comm
  [[ ${1:-} =~ ^[0-9]+$ ]] || return 1
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  rest=${stat##*) }                      # "pid (comm) state ...": comm may contain spaces and ')'
  comm=${stat#*(}; comm=${comm%) *}
  [[ ${rest%% *} != [ZX] ]] || return 1
  [[ -z ${2:-} || $comm == "$2" ]]
}
gone() { ! proc_alive "$@"; }
# pidfile_pid FILE: the pid on FILE's first line (PostgreSQL's lock file holds more lines)
pidfile_pid() { [[ -s $1 ]] && head -n1 "$1" | tr -dc 0-9; }
# daemon_alive PIDFILE COMM
daemon_alive() { local pid; pid=$(pidfile_pid "$1") && proc_alive "$pid" "$2"; }

# report PIDFILE COMM NAME: "NAME: running (pid N)", or "NAME: not running" and status 3
report() {
  local pid
  if pid=$(pidfile_pid "$1") && proc_alive "$pid" "$2"; then
    echo "$3: running (pid $pid)"
  else
    echo "$3: not running"
    return 3
  fi
}

# launch NAME LOGFILE CMD...: start CMD fully detached, from /: own session, no terminal, none of our
# file descriptors (a caller reading our output through a pipe would otherwise wait for the daemon),
# its output appended to LOGFILE. NAME joins STARTED.
STARTED=()
launch() {
  local out=$2
  STARTED+=("$1")
  shift 2
  (cd / && setsid -f "$@" </dev/null >>"$out" 2>&1 9>&-)
}
# started: "started NAME..." for what this run started, or "nothing to start"
started() { if ((${#STARTED[@]})); then echo "started ${STARTED[*]}"; else echo "nothing to start"; fi; }

# terminate PID COMM GRACE [PID...]: SIGTERM to PID (and the other PIDs), SIGKILL to PID when it still
# runs after GRACE seconds; dies when it outlives that by GRACE seconds more
terminate() {
  local pid=$1 comm=$2 grace=$3
  shift 3
  kill -TERM "$@" "$pid" 2>/dev/null || true
  wait_until "$grace" gone "$pid" "$comm" && return 0
  log "$comm (pid $pid) ignored SIGTERM for $grace s: SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  wait_until "$grace" gone "$pid" "$comm" || die "$comm (pid $pid) survives SIGKILL"
}

# stop_daemon PIDFILE COMM [GRACE]: terminate the COMM the pid file names (GRACE: 10 s), remove the file
stop_daemon() {
  local pid
  if pid=$(pidfile_pid "$1") && proc_alive "$pid" "$2"; then
    log "stopping $2 (pid $pid)"
    terminate "$pid" "$2" "${3:-10}"
  fi
  rm -f "$1"
}

# --- waiting ------------------------------------------------------------------------------------
# wait_ready SECONDS ALIVE CMD...: poll CMD every 0.2 s until it succeeds; status 1 after SECONDS.
# After the first 5 s (a daemon has written its pid file by then) ALIVE runs on every round too: it
# ends the start with fail_with_logs when the daemon died.
wait_ready() {
  local start deadline alive=$2
  start=$(now_ns); deadline=$(( start + $1 * 1000000000 ))
  shift 2
  until "$@" >/dev/null; do
    if (( $(now_ns) > start + 5000000000 )); then "$alive" >/dev/null || return 1; fi
    (( $(now_ns) < deadline )) || return 1
    sleep 0.2
  done
}
# wait_until SECONDS CMD...: poll CMD every 0.2 s until it succeeds; status 1 after SECONDS
wait_until() { local seconds=$1; shift; wait_ready "$seconds" true "$@"; }

# fail_with_logs MESSAGE: the message, the tails of the files log_files names, what diagnose prints
# (where the script defines it); exit 1
fail_with_logs() {
  local f files=()
  log "ERROR: $1"
  mapfile -t files < <(log_files)
  for f in "${files[@]}"; do
    [[ -s $f ]] || continue
    printf -- '----- tail of %s -----\n' "$f" >&2
    tail -n 20 "$f" >&2
  done
  if declare -F diagnose >/dev/null; then diagnose >&2; fi
  exit 1
}

# --- files, names, users ------------------------------------------------------------------------
# install_if_changed MODE OWNER FILE NEW: FILE (owned by OWNER and its group) becomes NEW when they
# differ; NEW is removed either way. Succeeds only when FILE changed.
install_if_changed() {
  if cmp -s "$4" "$3"; then rm -f "$4"; return 1; fi
  install -m "$1" -o "$2" -g "$2" "$4" "$3"
  rm -f "$4"
}

# render TEMPLATE OUT NAME=VALUE...: TEMPLATE with every @NAME@ replaced by its VALUE (which holds no
# "|" or "&"); dies when a placeholder is left
render() {
  local template=$1 out=$2 pair left expressions=()
  shift 2
  [[ -r $template ]] || die "missing template $template"
  for pair in "$@"; do expressions+=(-e "s|@${pair%%=*}@|${pair#*=}|g"); done
  sed "${expressions[@]}" "$template" >"$out"
  if left=$(grep -n '@[A-Za-z_]*@' "$out"); then die "unknown placeholder left in $template: $left"; fi
}

# resolve_host NAME: NAME, this host's short name, is valid and resolves (127.0.0.1 in /etc/hosts when
# it did not): daemons check that it is theirs
resolve_host() {
  [[ $1 =~ ^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?$ ]] || die "host name '$1' is not a valid short host name"
  getent hosts "$1" >/dev/null && return 0
  log "host name $1 does not resolve: adding it to /etc/hosts"
  printf '127.0.0.1 %s # hpchub-host\n' "$1" >>/etc/hosts
}

# ensure_test_users: the TEST_USERS exist, with a home and their password
ensure_test_users() {
  local u home
  for u in "${TEST_USERS[@]}"; do
    if ! id "$u" >/dev/null 2>&1; then
      log "creating test user $u"
      useradd -m -s /bin/bash "$u"
    fi
    home=$(getent passwd "$u" | cut -d: -f6)
    [[ -d $home ]] || install -d -m 755 -o "$u" -g "$(id -g "$u")" "$home"
    printf '%s:%spw\n' "$u" "$u" | chpasswd
  done
}

# --- commands -----------------------------------------------------------------------------------
require_root() {
  ((EUID == 0)) || { echo "${0##*/}: $1 must run as root ($ROOT_FOR); try: sudo $0 $1" >&2; exit 1; }
}

take_lock() {
  exec 9>"$LOCK"
  flock -w "${LOCK_WAIT:-300}" 9 || die "another $TAG holds $LOCK"
}

# service_main COMMAND: run the script's function COMMAND: start, stop, status, or restart where the
# script has one; all but status as root and one at a time
service_main() {
  local commands="start|stop|status"
  if declare -F restart >/dev/null; then commands+="|restart"; fi
  [[ "|$commands|" == *"|${1:-}|"* ]] || { echo "usage: $0 $commands" >&2; exit 2; }
  if [[ $1 != status ]]; then
    require_root "$1"
    take_lock
  fi
  "$1"
}
