#!/usr/bin/env bash
# The hpchub test Slurm cluster on this host, without systemd (Debian 12, Slurm 22.05):
# munged, slurmctld and one `slurmd -N cN` per node (c1, c2), configured from slurm.conf.in beside
# this script, plus the ordinary test users alice and bob (passwords alicepw, bobpw).
# When the network namespace of netns.sh exists (start it first), a third node n1 runs inside it
# (partition netns), a node the hub cannot reach, and the controller is addressed at the bridge address
# so that n1 can reach it.
#
# Usage (as root): cluster.sh start|stop|status|restart
#   start    install what is missing, write the configuration (restarting the Slurm daemons when it
#            changed), start what is not running, resume a node left down or drained, and wait until
#            both nodes are up. Idempotent: on a running cluster it changes nothing.
#   stop     stop the slurmd's, slurmctld and munged
#   status   print what runs (exit 0 when everything runs, 3 otherwise)
# Env:
#   HPCHUB_CONTROLLER_ADDR  IPv4 address of the controller and of c1, c2 (default: the bridge address
#                           PREFIX.1 when the namespace exists, else 127.0.0.1)
#   HPCHUB_NETNS_PREFIX     as for netns.sh (default 10.251.0): n1 is PREFIX.11
#   HPCHUB_CLUSTER_WAIT     seconds to wait for the nodes to come up (default 60)
# Progress goes to stderr; `start` prints one summary line on stdout. Logs: /var/log/slurm.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TAG=cluster.sh
# shellcheck source=docker/lib/service.sh
source "$HERE/../lib/service.sh"
ROOT_FOR="it installs packages, writes /etc and starts daemons"
LOCK=/run/hpchub-cluster.lock
LOCK_WAIT=600
TEMPLATE=$HERE/slurm.conf.in
CONF=/etc/slurm/slurm.conf
RUN=/run/slurm
LOGDIR=/var/log/slurm
STATEDIR=/var/lib/slurm/slurmctld
MUNGE_PID=/run/munge/munged.pid
MUNGE_KEY=/etc/munge/munge.key
NODES=(c1 c2)                 # must match NodeName in slurm.conf.in
PACKAGES=(munge slurm-wlm slurmctld slurmd slurm-client sudo)
HOSTS_MARK='# hpchub-slurm-node'
NETNS_PREFIX=${HPCHUB_NETNS_PREFIX:-10.251.0}
NETNS_PATH=/run/netns/hpchub-n1      # netns.sh's namespace
NETNS_NODE=n1                        # must match the netns NodeName in slurm.conf.in
NETNS_NODE_ADDR=$NETNS_PREFIX.11
if [[ -e $NETNS_PATH ]]; then
  NODES+=("$NETNS_NODE")
  CONTROLLER_ADDR=${HPCHUB_CONTROLLER_ADDR:-$NETNS_PREFIX.1}
else
  CONTROLLER_ADDR=${HPCHUB_CONTROLLER_ADDR:-127.0.0.1}
fi
WAIT=${HPCHUB_CLUSTER_WAIT:-60}

log_files() {
  printf '%s\n' "$LOGDIR"/slurmctld.log "$LOGDIR"/slurmctld.out "$LOGDIR"/slurmd-*.log "$LOGDIR"/slurmd-*.out \
    /var/log/munge/munged.log "$LOGDIR"/munged.out
}

diagnose() {
  if command -v scontrol >/dev/null && ctld_up; then
    printf -- '----- sinfo -----\n'
    timeout 10 sinfo -N -o '%N %P %t %E' 2>&1 || true
  fi
}

# --- host, users, configuration -----------------------------------------------------------------
valid_ipv4() {
  local IFS=. octet
  [[ $1 =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || return 1
  for octet in $1; do ((10#$octet <= 255)) || return 1; done
}

node_addr() { if [[ $1 == "$NETNS_NODE" ]]; then echo "$NETNS_NODE_ADDR"; else echo "$CONTROLLER_ADDR"; fi; }

# The host name must resolve (slurmctld checks it is the SlurmctldHost), and so must the node names:
# jobs are reached at their node's name. Node lines carry a marker, so re-runs replace them.
ensure_hosts() {
  local host=$1 tmp=$TMP/hosts n
  resolve_host "$host"
  grep -v -- "$HOSTS_MARK\$" /etc/hosts >"$tmp" || true
  for n in "${NODES[@]}"; do printf '%s %s %s\n' "$(node_addr "$n")" "$n" "$HOSTS_MARK" >>"$tmp"; done
  if ! cmp -s "$tmp" /etc/hosts; then
    log "writing the node names ${NODES[*]} into /etc/hosts"
    cat "$tmp" >/etc/hosts       # in place: /etc/hosts may be a bind mount (containers)
  fi
  rm -f "$tmp"
}

CONF_CHANGED=0
write_conf() {
  local host=$1 tmp=$TMP/slurm.conf n cluster old
  install -d -m 755 /etc/slurm
  install -d -m 755 -o slurm -g slurm "$RUN" "$LOGDIR" "$STATEDIR"
  for n in "${NODES[@]}"; do install -d -m 755 "/var/lib/slurm/slurmd/$n"; done
  # c1 and c2 share this host and its address; no accounting database. The demo cluster in containers
  # (container.sh beside this script) renders the same template with c1 and c2 as hosts of their own and
  # accounting in slurmdbd.
  render "$TEMPLATE" "$tmp" CLUSTER_HOST="$host" CONTROLLER_ADDR="$CONTROLLER_ADDR" NETNS_NODE_ADDR="$NETNS_NODE_ADDR" \
    NODE_HOSTNAMES="$host" NODE_ADDRS="$CONTROLLER_ADDR" ACCOUNTING_STORAGE_TYPE=accounting_storage/none
  if install_if_changed 644 root "$CONF" "$tmp"; then
    log "writing $CONF"
    CONF_CHANGED=1
  fi
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
    launch munged "$LOGDIR/munged.out" runuser -u munge -- /usr/sbin/munged
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
    launch slurmctld "$LOGDIR/slurmctld.out" slurmctld
  fi
  for n in "${NODES[@]}"; do
    if ! daemon_alive "$RUN/slurmd-$n.pid" slurmd; then
      rm -f "$RUN/slurmd-$n.pid"
      log "starting slurmd $n"
      if [[ $n == "$NETNS_NODE" ]]; then   # nsenter, not `ip netns exec`: see netns.sh
        launch "slurmd-$n" "$LOGDIR/slurmd-$n.out" nsenter --net="$NETNS_PATH" slurmd -N "$n"
      else
        launch "slurmd-$n" "$LOGDIR/slurmd-$n.out" slurmd -N "$n"
      fi
    fi
  done
}

# slurm_ready: slurmctld answers and every node is idle/mix/alloc/plnd. A node that answers but is down
# or drained (left over from an earlier run) is resumed once.
RESUMED=" "
slurm_ready() {
  local states n
  ctld_up && states=$(nodes_state) || return 1
  nodes_ready "$states" && return 0
  for n in "${NODES[@]}"; do
    if [[ $RESUMED != *" $n "* ]] && grep -qE "^$n (down|drain|drng)\$" <<<"$states"; then
      log "node $n is $(sed -n "s/^$n //p" <<<"$states") ($(timeout 10 sinfo -h -N -n "$n" -o '%E' | head -n1)): resuming it"
      timeout 10 scontrol update NodeName="$n" State=RESUME >&2 || true
      RESUMED+="$n "
    fi
  done
  return 1
}

daemons_running() {
  local n
  daemon_alive "$RUN/slurmctld.pid" slurmctld || fail_with_logs "slurmctld is not running"
  for n in "${NODES[@]}"; do
    daemon_alive "$RUN/slurmd-$n.pid" slurmd || fail_with_logs "slurmd $n is not running"
  done
}

# --- commands -----------------------------------------------------------------------------------
start() {
  local host states parts
  [[ $WAIT =~ ^[0-9]+$ ]] || die "HPCHUB_CLUSTER_WAIT must be a whole number of seconds, not '$WAIT'"
  valid_ipv4 "$CONTROLLER_ADDR" || die "HPCHUB_CONTROLLER_ADDR must be an IPv4 address, not '$CONTROLLER_ADDR'"
  apt_install "${PACKAGES[@]}"
  host=$(hostname -s)
  ensure_hosts "$host"
  ensure_test_users
  write_conf "$host"
  start_munge
  if ((CONF_CHANGED)); then
    log "slurm.conf changed: restarting the Slurm daemons"
    stop_slurm
  fi
  start_slurm
  wait_ready "$WAIT" daemons_running slurm_ready \
    || fail_with_logs "Slurm not ready after ${WAIT} s (want ${NODES[*]} idle/mix/alloc/plnd)"
  states=$(nodes_state | awk '{printf "%s%s=%s", (NR > 1 ? " " : ""), $1, $2}')
  parts=$(timeout 10 sinfo -h -o '%P' | paste -sd ' ')
  echo "Slurm cluster hpchub ready on $host in $(elapsed): $states; partitions $parts; $(started)"
}

stop() {
  stop_slurm
  stop_daemon "$MUNGE_PID" munged
  log "stopped"
}

restart() { stop; start; }

status() {
  local rc=0 f n name
  report "$MUNGE_PID" munged munged || rc=3
  report "$RUN/slurmctld.pid" slurmctld slurmctld || rc=3
  for n in "${NODES[@]}"; do report "$RUN/slurmd-$n.pid" slurmd "slurmd $n" || rc=3; done
  for f in "$RUN"/slurmd-*.pid; do       # leftovers of nodes no longer configured
    [[ -e $f ]] || continue
    name=${f##*/slurmd-}; name=${name%.pid}
    [[ " ${NODES[*]} " == *" $name "* ]] || report "$f" slurmd "slurmd $name (not configured)" || rc=3
  done
  if daemon_alive "$RUN/slurmctld.pid" slurmctld; then
    timeout 10 scontrol ping || rc=3
    timeout 10 sinfo || rc=3
  fi
  return "$rc"
}

service_main "$@"
