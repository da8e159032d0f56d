#!/usr/bin/env bash
# The hpchub test Son of Grid Engine cluster on this host, without systemd (Debian 12, SGE 8.1.9):
# sge_qmaster and one sge_execd, configured with qconf from sge.conf.in beside this script: queues
# all.q (8 slots) and short.q (2 slots, h_rt 10 min), parallel environments make/smp/mpi, a gpu
# consumable, project hpchub, scheduling every second. Jobs run as the test users alice and bob
# (created like docker/slurm-cluster/cluster.sh does, when missing).
#
# Usage (as root): cluster.sh start|stop|status|restart
#   start    install what is missing, start what is not running, apply sge.conf.in, wait until every
#            queue instance takes jobs. Idempotent: on a running cluster it changes nothing.
#   stop     stop sge_execd and sge_qmaster; running jobs go on under their sge_shepherd, and the
#            next start's sge_execd takes them back
#   status   print what runs (exit 0 when everything runs, 3 otherwise)
# Env:
#   HPCHUB_SGE_WAIT   seconds to wait for the daemons and queues (default 60)
# Progress goes to stderr; `start` prints one summary line on stdout. Daemon messages:
# /var/spool/gridengine/qmaster/messages, /var/spool/gridengine/execd/*/messages.
set -euo pipefail
export SGE_ROOT=/var/lib/gridengine SGE_CELL=default

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TAG="sge cluster.sh"
# shellcheck source=docker/lib/service.sh
source "$HERE/../lib/service.sh"
ROOT_FOR="it installs packages, writes /etc and starts daemons"
LOCK=/run/hpchub-sge.lock
LOCK_WAIT=600
CONF_TEMPLATE=$HERE/sge.conf.in
COMMON=$SGE_ROOT/$SGE_CELL/common
SPOOL=/var/spool/gridengine
QMASTER_PID=$SPOOL/qmaster/qmaster.pid
LOGDIR=/var/log/gridengine
PE_DIR=/usr/share/gridengine/util/resources/pe
QUEUES=(all.q short.q)             # the [queue ...] sections of sge.conf.in; the first is the default
PACKAGES=(gridengine-master gridengine-exec gridengine-client sudo)
WAIT=${HPCHUB_SGE_WAIT:-60}
HOST=$(hostname -s)

log_files() { printf '%s\n' "$SPOOL/qmaster/messages" "$SPOOL"/execd/*/messages "$LOGDIR"/*.out; }

# --- processes ----------------------------------------------------------------------------------
# pidfile COMM: where sge_qmaster or sge_execd writes its pid. The execd's spool directory is named
# as SGE resolves this host before host_aliases apply ("localhost" here): take the one that exists.
pidfile() {
  local f
  [[ $1 == sge_qmaster ]] && { echo "$QMASTER_PID"; return; }
  for f in "$SPOOL"/execd/*/execd.pid; do daemon_alive "$f" sge_execd && { echo "$f"; return; }; done
  for f in "$SPOOL"/execd/*/execd.pid; do [[ -e $f ]] && { echo "$f"; return; }; done
  echo "$SPOOL/execd/$HOST/execd.pid"
}

# --- packages, names, users ---------------------------------------------------------------------
install_packages() {
  [[ -z $(apt_missing "${PACKAGES[@]}") ]] && return 0
  # the answers gridengine-common asks for: without them no cell is created (or a dialog waits)
  debconf-set-selections <<EOF
gridengine-common shared/gridengineconfig boolean true
gridengine-common shared/gridenginecell string $SGE_CELL
gridengine-common shared/gridenginemaster string $HOST
EOF
  apt_install "${PACKAGES[@]}"
  [[ -s $COMMON/bootstrap ]] || die "$COMMON/bootstrap missing: gridengine-master made no cell (preseed ignored?)"
}

# write_if_changed FILE: stdin becomes FILE (owned by sgeadmin) unless FILE has it already; 0 if written
write_if_changed() {
  cat >"$TMP/new"
  install_if_changed 644 sgeadmin "$1" "$TMP/new"
}

# SGE compares the name a client claims with the reverse lookup of its address. Here the host name
# resolves to 127.0.0.1, which reverses to "localhost": every client is refused ("client IP resolved
# to host name localhost") unless host_aliases makes localhost another name of this host.
NAMES_CHANGED=0
ensure_names() {
  local addr canon
  resolve_host "$HOST"
  addr=$(getent hosts "$HOST" | awk '{print $1; exit}')
  canon=$(/usr/lib/gridengine/gethostbyaddr "$addr" | awk '$1 == "Hostname:" {print $2}')
  if [[ -n $canon && $canon != "$HOST" ]]; then
    echo "$HOST $canon" | write_if_changed "$COMMON/host_aliases" && NAMES_CHANGED=1
  elif [[ -e $COMMON/host_aliases ]]; then
    rm -f "$COMMON/host_aliases"; NAMES_CHANGED=1
  fi
  echo "$HOST" | write_if_changed "$COMMON/act_qmaster" && NAMES_CHANGED=1
  return 0
}

# --- configuration ------------------------------------------------------------------------------
# qconf's show and modify-from-file options per kind of object in sge.conf.in
declare -A SHOW=([global]=-sconf [sched]=-ssconf [complex]=-sc [hostgroup]=-shgrp [exechost]=-se
                 [project]=-sprj [userset]=-su [queue]=-sq [pe]=-sp)
declare -A MODIFY=([global]=-Mconf [sched]=-Msconf [complex]=-Mc [hostgroup]=-Mhgrp [exechost]=-Me
                   [project]=-Mprj [userset]=-Mu [queue]=-Mq [pe]=-Mp)
# what qconf shows but refuses to be given
declare -A READ_ONLY=([exechost]='load_values|processors')

# qconf_quiet ARGS...: qconf, its chatter ("root@host modified ...", on stderr) shown only on failure
qconf_quiet() {
  local out
  out=$(qconf "$@" 2>&1) || die "qconf $*: $out"
}

# normalize: one "key value" line per attribute (qconf wraps long values with a backslash)
normalize() { sed -e ':a' -e '/\\$/{N;s/\\\n[[:space:]]*//;ba' -e '}' | tr -s ' \t' ' ' | sed 's/ $//'; }

# overlay OVERRIDES: stdin (normalized) with the attributes in file OVERRIDES replaced or appended
overlay() {
  awk 'NR == FNR { if (NF) { key[++n] = $1; line[$1] = $0 } next }
       ($1 in line) { if (!done[$1]++) print line[$1]; next }
       { print }
       END { for (i = 1; i <= n; i++) if (!done[key[i]]) print line[key[i]] }' "$1" -
}

# create KIND NAME: a new object with SGE's defaults, for overlay() to complete
create() {
  case $1 in
    queue) EDITOR=true qconf_quiet -aq "$2" ;;     # the default queue (its pe_list needs make/smp/mpi)
    hostgroup) printf 'group_name %s\nhostlist NONE\n' "$2" >"$TMP/obj"; qconf_quiet -Ahgrp "$TMP/obj" ;;
    exechost) printf 'hostname %s\n' "$2" >"$TMP/obj"; qconf_quiet -Ae "$TMP/obj" ;;
    project)
      printf 'name %s\noticket 0\nfshare 0\nacl NONE\nxacl NONE\n' "$2" >"$TMP/obj"
      qconf_quiet -Aprj "$TMP/obj" ;;
    *) die "sge.conf.in: cannot create $1 $2 (no such object in SGE)" ;;
  esac
}

CONFIGURED=()
# apply KIND NAME OVERRIDES: make the object's attributes those of OVERRIDES; qconf only on a change
apply() {
  local kind=$1 name=$2 file=$TMP/obj current show added=0
  [[ -n ${SHOW[$kind]:-} ]] || die "sge.conf.in: unknown kind '$kind'"
  [[ $kind == global ]] && file=$TMP/global    # -Mconf names the configuration after the file
  show=("${SHOW[$kind]}")
  [[ $kind == sched || $kind == complex ]] || show+=("$name")   # the only one of their kind
  if ! current=$(qconf "${show[@]}" 2>/dev/null); then
    log "adding $kind $name"
    create "$kind" "$name"
    current=$(qconf "${show[@]}")
    added=1
  fi
  current=$(normalize <<<"$current" | grep -Ev "^(${READ_ONLY[$kind]:-#}) ")
  overlay "$3" <<<"$current" >"$file"
  if [[ $(<"$file") != "$current" ]]; then
    log "setting $kind $name: $(paste -sd ';' "$3")"
    qconf_quiet "${MODIFY[$kind]}" "$file"
  elif ((added == 0)); then
    return 0
  fi
  CONFIGURED+=("$kind:$name")
}

# configure: this host as submit host, the parallel environments Debian ships, then every section
# of sge.conf.in, in order
configure() {
  local pe f kind name
  if ! qconf -ss 2>/dev/null | grep -qxF "$HOST"; then
    log "adding submit host $HOST"
    qconf_quiet -as "$HOST"
    CONFIGURED+=("submithost:$HOST")
  fi
  for pe in make smp mpi; do
    qconf -sp "$pe" >/dev/null 2>&1 && continue
    log "adding parallel environment $pe"
    qconf_quiet -Ap "$PE_DIR/$pe"
    CONFIGURED+=("pe:$pe")
  done
  render "$CONF_TEMPLATE" "$TMP/conf" HOST="$HOST"
  # one file per section: "KIND NAME", then its attribute lines
  awk -v dir="$TMP" '/^\[/ { f = sprintf("%s/section.%03d", dir, ++n); gsub(/[][]/, ""); print > f; next }
                     n && NF && !/^#/ { print > f }' "$TMP/conf"
  for f in "$TMP"/section.*; do
    read -r kind name <"$f"
    tail -n +2 "$f" >"$TMP/attributes"
    apply "$kind" "$name" "$TMP/attributes"
  done
  # a job that names no queue runs in the first one, all.q; short.q (like a partition with a time
  # limit) only when asked for. A job's own -q replaces this default.
  printf '# hpchub: the queue of jobs that name none\n-q %s\n' "${QUEUES[0]}" \
    | write_if_changed "$COMMON/sge_request" && CONFIGURED+=("sge_request")
  return 0
}

# --- daemons ------------------------------------------------------------------------------------
alive() { daemon_alive "$(pidfile "$1")" "$1"; }

start_daemon() {  # COMM
  alive "$1" && return 0
  rm -f "$(pidfile "$1")"
  log "starting $1"
  # they fork into the background themselves; launch keeps our pipes out of them
  launch "$1" "$LOGDIR/$1.out" "/usr/sbin/$1"
  wait_until "$WAIT" alive "$1" || fail_with_logs "$1 did not start (no live pid in $(pidfile "$1"))"
}

qmaster_answers() { timeout 10 qstat >/dev/null 2>&1; }

# queues_ready: each queue instance on this host has a load report and no state that keeps jobs
# out (a alarm, u unknown, d disabled, E error, o orphaned, s/S suspended, c configuration ambiguous)
queues_ready() {
  local out q
  out=$(timeout 10 qstat -f -q "$(IFS=,; echo "${QUEUES[*]}")" 2>/dev/null) || return 1
  for q in "${QUEUES[@]}"; do
    awk -v qi="$q@$HOST" '$1 == qi && $4 != "-NA-" && (NF < 6 || $6 !~ /[auUdDEosSc]/) {ok = 1} END {exit !ok}' \
      <<<"$out" || return 1
  done
}

# repair_queues: a queue instance left in error state (E: a job could not start on it) or disabled (d)
# takes no jobs: clear or enable it, as the Slurm cluster script resumes a node left down
repair_queues() {
  local out q states
  out=$(timeout 10 qstat -f -q "$(IFS=,; echo "${QUEUES[*]}")" 2>/dev/null) || return 0
  for q in "${QUEUES[@]}"; do
    states=$(awk -v qi="$q@$HOST" '$1 == qi && NF >= 6 {print $6}' <<<"$out")
    if [[ $states == *E* ]]; then
      log "queue instance $q@$HOST is in error state: clearing it"
      timeout 10 qmod -c "$q@$HOST" >/dev/null 2>&1 && CONFIGURED+=("cleared:$q@$HOST")
    fi
    if [[ $states == *d* ]]; then
      log "queue instance $q@$HOST is disabled: enabling it"
      timeout 10 qmod -e "$q@$HOST" >/dev/null 2>&1 && CONFIGURED+=("enabled:$q@$HOST")
    fi
  done
  return 0
}

start() {
  local changed
  [[ $WAIT =~ ^[0-9]+$ ]] || die "HPCHUB_SGE_WAIT must be a whole number of seconds, not '$WAIT'"
  install_packages
  ensure_test_users
  ensure_names
  install -d -m 755 "$LOGDIR"
  install -d -m 755 -o sgeadmin -g sgeadmin /run/gridengine
  if ((NAMES_CHANGED)) && { alive sge_qmaster || alive sge_execd; }; then
    log "host names changed: restarting the daemons"
    stop
  fi
  start_daemon sge_qmaster
  wait_until "$WAIT" qmaster_answers || fail_with_logs "sge_qmaster does not answer qstat"
  configure
  # A running execd takes 15-20 s to report to a new qmaster. Restarting it would be quicker, but a
  # new execd notices the end of a job it took over from the old one only about a minute late.
  start_daemon sge_execd
  repair_queues
  if ! wait_until "$WAIT" queues_ready; then
    timeout 10 qstat -f >&2 || true
    fail_with_logs "queue instances of ${QUEUES[*]} on $HOST not ready after ${WAIT} s"
  fi
  changed=$(started)
  ((${#CONFIGURED[@]} == 0)) || changed+="; configured ${CONFIGURED[*]}"
  echo "SGE cluster ready on $HOST in $(elapsed): queues $(qconf -sql | paste -sd ' '); $changed"
}

# stop: sge_qmaster takes 5-10 s to stop
stop() {
  stop_daemon "$(pidfile sge_execd)" sge_execd 30
  stop_daemon "$QMASTER_PID" sge_qmaster 30
  log "stopped"
}

restart() { stop; start; }

status() {
  local rc=0 comm
  for comm in sge_qmaster sge_execd; do report "$(pidfile "$comm")" "$comm" "$comm" || rc=3; done
  if ((rc == 0)); then
    timeout 10 qstat -f || rc=3
  fi
  return "$rc"
}

service_main "$@"
