#!/usr/bin/env bash
# The hpchub test Slurm cluster on this host, without systemd (Debian 12, Slurm 22.05):
# munged, slurmctld and one `slurmd -N cN` per node (c1, c2), configured from slurm.conf.in beside
# this script, plus the ordinary test users alice and bob (passwords alicepw, bobpw).
#
# Usage (as root): cluster.sh start|stop|status|restart
#   start    install what is missing, write the configuration (restarting the Slurm daemons when it
#            changed), start what is not running, resume a node left down or drained, and wait until
#            both nodes are up. Idempotent: on a running cluster it changes nothing.
#   stop     stop the slurmd's, slurmctld and munged
#   status   print what runs (exit 0 when everything runs, 3 otherwise)
# Env:
#   HPCHUB_CONTROLLER_ADDR  IPv4 address of the controller and the nodes (default 127.0.0.1)
#   HPCHUB_CLUSTER_WAIT     seconds to wait for the nodes to come up (default 60)
# Progress goes to stderr; `start` prints one summary line on stdout. Logs: /var/log/slurm.
set -euo pipefail
umask 022
export DEBIAN_FRONTEND=noninteractive

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TEMPLATE=$HERE/slurm.conf.in
CONF=/etc/slurm/slurm.conf
RUN=/run/slurm
LOGDIR=/var/log/slurm
STATEDIR=/var/lib/slurm/slurmctld
MUNGE_PID=/run/munge/munged.pid
MUNGE_KEY=/etc/munge/munge.key
LOCK=/run/hpchub-cluster.lock
NODES=(c1 c2)                 # must match NodeName in slurm.conf.in
TEST_USERS=(alice bob)        # password: <name>pw
PACKAGES=(munge slurm-wlm slurmctld slurmd slurm-client sudo)
HOSTS_MARK='# hpchub-slurm-node'
CONTROLLER_ADDR=${HPCHUB_CONTROLLER_ADDR:-127.0.0.1}
WAIT=${HPCHUB_CLUSTER_WAIT:-60}
T0=$(date +%s%N)

log() { printf '[cluster.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now_ns() { date +%s%N; }
elapsed() { local ms=$(( ($(now_ns) - T0) / 1000000 )); printf '%d.%01d s' $((ms / 1000)) $((ms % 1000 / 100)); }

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
pidfile_pid() { [[ -s $1 ]] && tr -dc 0-9 <"$1"; }
# daemon_alive PIDFILE COMM
daemon_alive() { local pid; pid=$(pidfile_pid "$1") && proc_alive "$pid" "$2"; }

# stop_daemon PIDFILE COMM: SIGTERM, wait up to 10 s, then SIGKILL
stop_daemon() {
  local f=$1 comm=$2 pid deadline
  if pid=$(pidfile_pid "$f") && proc_alive "$pid" "$comm"; then
    log "stopping $comm (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$(( $(now_ns) + 10000000000 ))
    while proc_alive "$pid" "$comm" && (( $(now_ns) < deadline )); do sleep 0.1; done
    if proc_alive "$pid" "$comm"; then
      log "$comm (pid $pid) ignored SIGTERM for 10 s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      deadline=$(( $(now_ns) + 5000000000 ))
      while proc_alive "$pid" "$comm" && (( $(now_ns) < deadline )); do sleep 0.1; done
    fi
  fi
  rm -f "$f"
}

# detach LOGFILE CMD...: start CMD fully detached: own session, no terminal, none of our file
# descriptors (a caller reading our output through a pipe would otherwise wait for the daemon).
detach() {
  local out=$1; shift
  setsid -f "$@" </dev/null >>"$out" 2>&1 9>&-
}

# wait_until SECONDS CMD...: poll CMD every 0.2 s until it succeeds; fail after SECONDS
wait_until() {
  local deadline=$(( $(now_ns) + $1 * 1000000000 )); shift
  until "$@" >/dev/null 2>&1; do
    (( $(now_ns) < deadline )) || return 1
    sleep 0.2
  done
}

# fail_with_logs MESSAGE: the message, the tails of the relevant logs, exit 1
fail_with_logs() {
  local f
  log "ERROR: $1"
  for f in "$LOGDIR"/slurmctld.log "$LOGDIR"/slurmctld.out "$LOGDIR"/slurmd-*.log "$LOGDIR"/slurmd-*.out \
           /var/log/munge/munged.log "$LOGDIR"/munged.out; do
    [[ -s $f ]] || continue
    printf -- '----- tail of %s -----\n' "$f" >&2
    tail -n 15 "$f" >&2
  done
  if command -v scontrol >/dev/null && ctld_up; then
    printf -- '----- sinfo -----\n' >&2
    timeout 10 sinfo -N -o '%N %P %t %E' >&2 2>&1 || true
  fi
  exit 1
}

# --- packages -----------------------------------------------------------------------------------
# shellcheck source=docker/slurm-cluster/apt.sh
source "$HERE/apt.sh"
trap remove_policy EXIT
trap 'exit 130' INT TERM   # so that the EXIT trap runs

# --- host, users, configuration -----------------------------------------------------------------
valid_ipv4() {
  local IFS=. octet
  [[ $1 =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || return 1
  for octet in $1; do ((10#$octet <= 255)) || return 1; done
}

# The host name must resolve (slurmctld checks it is the SlurmctldHost), and so must the node names:
# jobs are reached at their node's name. Node lines carry a marker, so re-runs replace them.
ensure_hosts() {
  local host=$1 tmp n
  if ! getent hosts "$host" >/dev/null; then
    log "host name $host does not resolve: adding it to /etc/hosts"
    printf '127.0.0.1 %s # hpchub-host\n' "$host" >>/etc/hosts
  fi
  tmp=$(mktemp)
  grep -v -- "$HOSTS_MARK\$" /etc/hosts >"$tmp" || true
  for n in "${NODES[@]}"; do printf '%s %s %s\n' "$CONTROLLER_ADDR" "$n" "$HOSTS_MARK" >>"$tmp"; done
  if ! cmp -s "$tmp" /etc/hosts; then
    log "writing the node names ${NODES[*]} into /etc/hosts"
    cat "$tmp" >/etc/hosts       # in place: /etc/hosts may be a bind mount (containers)
  fi
  rm -f "$tmp"
}

ensure_users() {
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

# render_conf HOST ADDR OUTFILE: slurm.conf.in with its placeholders substituted
render_conf() {
  local host=$1 addr=$2 out=$3 left
  [[ $host =~ ^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?$ ]] || die "host name '$host' is not a valid short host name"
  valid_ipv4 "$addr" || die "controller address '$addr' (HPCHUB_CONTROLLER_ADDR) is not an IPv4 address"
  [[ -r $TEMPLATE ]] || die "missing template $TEMPLATE"
  sed -e "s/@CLUSTER_HOST@/$host/g" -e "s/@CONTROLLER_ADDR@/$addr/g" "$TEMPLATE" >"$out"
  if left=$(grep -n '@[A-Za-z_]*@' "$out"); then die "unknown placeholder left in $TEMPLATE: $left"; fi
}

CONF_CHANGED=0
write_conf() {
  local host=$1 tmp n cluster old
  install -d -m 755 /etc/slurm
  install -d -m 755 -o slurm -g slurm "$RUN" "$LOGDIR" "$STATEDIR"
  for n in "${NODES[@]}"; do install -d -m 755 "/var/lib/slurm/slurmd/$n"; done
  tmp=$(mktemp)
  render_conf "$host" "$CONTROLLER_ADDR" "$tmp"
  if ! cmp -s "$tmp" "$CONF"; then
    log "writing $CONF"
    install -m 644 "$tmp" "$CONF"
    CONF_CHANGED=1
  fi
  rm -f "$tmp"
  # slurmctld refuses to start on the state of a cluster with another name: a test cluster may drop it
  cluster=$(sed -n 's/^ClusterName=//p' "$CONF")
  if [[ -s $STATEDIR/clustername ]] && old=$(<"$STATEDIR/clustername") && [[ $old != "$cluster" ]]; then
    log "saved state in $STATEDIR belongs to cluster '$old', not '$cluster': removing it"
    stop_slurm
    find "$STATEDIR" -mindepth 1 -delete
  fi
}

# --- daemons ------------------------------------------------------------------------------------
munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  local key_new=0
  install -d -m 755 -o munge -g munge /run/munge
  [[ -d /var/log/munge ]] || install -d -m 700 -o munge -g munge /var/log/munge
  [[ -d /var/lib/munge ]] || install -d -m 711 -o munge -g munge /var/lib/munge
  if [[ ! -s $MUNGE_KEY ]]; then
    log "creating the munge key $MUNGE_KEY"
    install -d -m 700 -o munge -g munge /etc/munge
    dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    key_new=1
  fi
  chown munge:munge "$MUNGE_KEY"
  chmod 400 "$MUNGE_KEY"
  ((key_new)) && stop_daemon "$MUNGE_PID" munged
  if ! daemon_alive "$MUNGE_PID" munged; then
    rm -f "$MUNGE_PID"
    log "starting munged"
    STARTED+=(munged)
    detach "$LOGDIR/munged.out" runuser -u munge -- /usr/sbin/munged
  fi
  wait_until 15 munge_ok || fail_with_logs "munge credentials do not work (munged not running?)"
}

ctld_up() { timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }

# nodes_state: "c1 idle" lines, one per node (sinfo lists a node once per partition). Ask only
# when slurmctld answers: against a dead controller sinfo retries for 9 s.
nodes_state() { timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null | sort -u; }

# nodes_ready STATES: every node idle, mixed, allocated or planned for a pending job (not down, drained, not responding)
nodes_ready() {
  local n
  for n in "${NODES[@]}"; do grep -qE "^$n (idle|mix|alloc|plnd)\$" <<<"$1" || return 1; done
}

stop_slurm() {
  local f
  for f in "$RUN"/slurmd-*.pid; do [[ -e $f ]] && stop_daemon "$f" slurmd; done
  stop_daemon "$RUN/slurmctld.pid" slurmctld
}

start_slurm() {
  local n
  if ! daemon_alive "$RUN/slurmctld.pid" slurmctld; then
    rm -f "$RUN/slurmctld.pid"
    log "starting slurmctld"
    STARTED+=(slurmctld)
    detach "$LOGDIR/slurmctld.out" slurmctld
  fi
  for n in "${NODES[@]}"; do
    if ! daemon_alive "$RUN/slurmd-$n.pid" slurmd; then
      rm -f "$RUN/slurmd-$n.pid"
      log "starting slurmd $n"
      STARTED+=("slurmd-$n")
      detach "$LOGDIR/slurmd-$n.out" slurmd -N "$n"
    fi
  done
}

# wait_ready: until slurmctld answers and every node is idle/mix/alloc. A node that answers but is
# down or drained (left over from an earlier run) is resumed once. Fails early when a daemon died.
wait_ready() {
  local start deadline grace now states n resumed=" "
  start=$(now_ns); deadline=$(( start + WAIT * 1000000000 )); grace=$(( start + 5000000000 ))
  while :; do
    if ctld_up && states=$(nodes_state); then
      nodes_ready "$states" && return 0
      for n in "${NODES[@]}"; do
        if [[ $resumed != *" $n "* ]] && grep -qE "^$n (down|drain|drng)\$" <<<"$states"; then
          log "node $n is $(sed -n "s/^$n //p" <<<"$states") ($(timeout 10 sinfo -h -N -n "$n" -o '%E' | head -n1)): resuming it"
          timeout 10 scontrol update NodeName="$n" State=RESUME >&2 || true
          resumed+="$n "
        fi
      done
    fi
    now=$(now_ns)
    if (( now > grace )); then   # the daemons have written their pid files by now
      daemon_alive "$RUN/slurmctld.pid" slurmctld || fail_with_logs "slurmctld is not running"
      for n in "${NODES[@]}"; do
        daemon_alive "$RUN/slurmd-$n.pid" slurmd || fail_with_logs "slurmd $n is not running"
      done
    fi
    (( now < deadline )) || fail_with_logs "Slurm not ready after ${WAIT} s (want ${NODES[*]} idle/mix/alloc/plnd)"
    sleep 0.2
  done
}

# --- commands -----------------------------------------------------------------------------------
require_root() {
  ((EUID == 0)) || { echo "cluster.sh: $1 must run as root (it installs packages, writes /etc and" \
    "starts daemons); try: sudo $0 $1" >&2; exit 1; }
}

take_lock() {
  exec 9>"$LOCK"
  flock -w 600 9 || die "another cluster.sh holds $LOCK"
}

STARTED=()
start() {
  local host states parts started
  [[ $WAIT =~ ^[0-9]+$ ]] || die "HPCHUB_CLUSTER_WAIT must be a whole number of seconds, not '$WAIT'"
  valid_ipv4 "$CONTROLLER_ADDR" || die "HPCHUB_CONTROLLER_ADDR must be an IPv4 address, not '$CONTROLLER_ADDR'"
  apt_install "${PACKAGES[@]}"
  host=$(hostname -s)
  ensure_hosts "$host"
  ensure_users
  write_conf "$host"
  start_munge
  if ((CONF_CHANGED)); then
    log "slurm.conf changed: restarting the Slurm daemons"
    stop_slurm
  fi
  start_slurm
  wait_ready
  states=$(nodes_state | awk '{printf "%s%s=%s", (NR > 1 ? " " : ""), $1, $2}')
  parts=$(timeout 10 sinfo -h -o '%P' | paste -sd ' ')
  started="nothing to start"
  ((${#STARTED[@]} == 0)) || started="started ${STARTED[*]}"
  echo "Slurm cluster hpchub ready on $host in $(elapsed): $states; partitions $parts; $started"
}

stop() {
  stop_slurm
  stop_daemon "$MUNGE_PID" munged
  log "stopped"
}

status() {
  local rc=0 f n name pid
  report() {  # PIDFILE COMM NAME
    if pid=$(pidfile_pid "$1") && proc_alive "$pid" "$2"; then
      echo "$3: running (pid $pid)"
    else
      echo "$3: not running"; rc=3
    fi
  }
  report "$MUNGE_PID" munged munged
  report "$RUN/slurmctld.pid" slurmctld slurmctld
  for n in "${NODES[@]}"; do report "$RUN/slurmd-$n.pid" slurmd "slurmd $n"; done
  for f in "$RUN"/slurmd-*.pid; do       # leftovers of nodes no longer configured
    [[ -e $f ]] || continue
    name=${f##*/slurmd-}; name=${name%.pid}
    [[ " ${NODES[*]} " == *" $name "* ]] || report "$f" slurmd "slurmd $name (not configured)"
  done
  if daemon_alive "$RUN/slurmctld.pid" slurmctld; then
    timeout 10 scontrol ping || rc=3
    timeout 10 sinfo || rc=3
  fi
  return "$rc"
}

case "${1:-}" in
  start) require_root start; take_lock; start ;;
  stop) require_root stop; take_lock; stop ;;
  restart) require_root restart; take_lock; stop; start ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
