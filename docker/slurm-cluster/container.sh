#!/usr/bin/env bash
# Entrypoint of the demo cluster's Slurm containers (compose.yaml beside this script): one image, one role
# per container. Slurm's configuration is the native test cluster's own slurm.conf.in, rendered for these
# hosts, with accounting.conf appended: the same file in every container (slurmctld also compares the hash
# each slurmd reports), and the native cluster renders the same template with cluster.sh.
#
# Usage: container.sh ROLE [ARGS]
#   keys              once, before the rest: the munge key and the accounting database's passwords, each
#                     made on first use in its volume and kept
#   slurmdbd          munged, then slurmdbd (MariaDB on the host DB_HOST)
#   slurmctld         munged; the cluster, its accounts and their users in slurmdbd; then slurmctld
#   slurmd NODE       munged, then slurmd -N NODE once slurmctld answers
#   login             munged, then the hub: hpchub -f hpchub-demo.toml (beside this script)
#   egress PORT DEST  the compute network's one way out: TCP PORT forwarded to DEST (HOST:PORT)
#   print-conf        print the slurm.conf the Slurm containers run (needs no root, changes nothing)
#   healthy ROLE [NODE]  the healthcheck of a role: exit 0 when it serves
# Daemons run in the foreground (their output is the container's log; SIGTERM stops them); their log files
# are in /var/log/slurm as on the native cluster.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TAG="container.sh ${1:-}"
# shellcheck source=docker/lib/service.sh
source "$HERE/../lib/service.sh"

TEMPLATE=$HERE/slurm.conf.in
ACCOUNTING=$HERE/accounting.conf
DBD_TEMPLATE=$HERE/slurmdbd.conf.in
TOML=$HERE/hpchub-demo.toml
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
CONTROLLER=slurmctld              # host name of the controller (the compose service and its hostname)
DBD_HOST=slurmdbd
DB_HOST=mariadb
DB_NAME=slurm_acct_db             # as MARIADB_DATABASE and MARIADB_USER in compose.yaml
DB_USER=slurm
SECRETS=/run/hpchub-demo-secrets  # the secrets volume (keys, mariadb, slurmdbd)
DB_PASSWORD_FILE=$SECRETS/db-password         # MariaDB's user DB_USER, and slurmdbd's
DB_ROOT_PASSWORD_FILE=$SECRETS/db-root-password   # MariaDB's root: nothing here uses it
MUNGE_KEY=/etc/munge/munge.key    # the munge volume
HUB_DATA=/var/lib/hpchub          # hub.data_dir in hpchub-demo.toml
LDAP_CA=/etc/hpchub/ldap-ca/ca.crt   # ldap.ca_file in hpchub-demo.toml: the ldap-ca volume
HUB_HEALTH=http://127.0.0.1:8000/hub/health
# The demo's Slurm accounts, and the users who may charge them (the first is the user's default account).
# carol has none: she could not submit even if a group let her log in.
ACCOUNTS=(physics chemistry)
ASSOCIATIONS=("alice:physics" "bob:chemistry,physics" "dave:physics,chemistry")
WAIT_CONTROLLER=600               # first start: MariaDB initialises, slurmdbd creates its tables
READY_STATES='idle|mix|alloc|plnd'

# compute_nodes: the NodeName expression of the nodes whose host names this script fills in (c[1-2])
compute_nodes() { sed -n 's/^NodeName=\([^ ]*\) NodeHostname=@NODE_HOSTNAMES@ .*/\1/p' "$TEMPLATE"; }

# slurm_conf: slurm.conf.in for these containers. The compute nodes are hosts of their own, reached at their
# names (compose's DNS); the controller is a name too, since it has one address on each network it is on.
# n1, netns.sh's node, has no container: its address is the controller's loopback, where no slurmd
# listens, so it is down from the start. Accounting goes to slurmdbd (accounting.conf says where).
render_conf() {
  local nodes
  nodes=$(compute_nodes)
  [[ -n $nodes ]] || die "no NodeName line with NodeHostname=@NODE_HOSTNAMES@ in $TEMPLATE"
  render "$TEMPLATE" "$1" CLUSTER_HOST="$CONTROLLER" CONTROLLER_ADDR="$CONTROLLER" NETNS_NODE_ADDR=127.0.0.1 \
    NODE_HOSTNAMES="$nodes" NODE_ADDRS="$nodes" ACCOUNTING_STORAGE_TYPE=accounting_storage/slurmdbd
  cat "$ACCOUNTING" >>"$1"
}

slurm_conf() {
  local tmp=$TMP/slurm.conf
  render_conf "$tmp"
  install -d -m 755 /etc/slurm
  install -m 644 -o root -g root "$tmp" "$CONF"
  rm -f "$tmp"
  log "slurm.conf sha256 $(sha256sum "$CONF" | cut -c1-16) (the same in every Slurm container)"
}

conf_value() { sed -n "s/^$1=//p" "$CONF" | head -n1; }

# slurm_dirs [NODE]: the directories slurm.conf names (pid files, logs, state; NODE's spool)
slurm_dirs() {
  install -d -m 755 -o slurm -g slurm "$(dirname "$(conf_value SlurmctldPidFile)")" \
    "$(dirname "$(conf_value SlurmctldLogFile)")" "$(conf_value StateSaveLocation)"
  if [[ -n ${1:-} ]]; then
    local spool
    spool=$(conf_value SlurmdSpoolDir)
    install -d -m 755 "${spool//%n/$1}"
  fi
}

munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  [[ -s $MUNGE_KEY ]] || die "no munge key at $MUNGE_KEY: the keys service makes it (docker compose up runs it first)"
  install -d -m 755 -o munge -g munge /run/munge
  install -d -m 700 -o munge -g munge /var/log/munge
  install -d -m 711 -o munge -g munge /var/lib/munge
  rm -f /run/munge/munged.pid
  launch munged "$(dirname "$(conf_value SlurmctldLogFile)")/munged.out" runuser -u munge -- /usr/sbin/munged
  wait_until 15 munge_ok || die "munge credentials do not work: see /var/log/munge/munged.log"
}

# (output captured before it is matched: grep -q leaving early would fail the pipe under pipefail)
ctld_up() { local out; out=$(timeout 10 scontrol ping 2>/dev/null) && [[ $out == *'is UP'* ]]; }
sacctmgr_answers() { timeout 10 sacctmgr --noheader show cluster >/dev/null 2>&1; }
node_ready() { local out; out=$(timeout 10 sinfo -h -N -n "$1" -o '%t' 2>/dev/null) && grep -qxE "($READY_STATES)" <<<"$out"; }

# serve AFTER CMD...: the daemon CMD in the foreground of the container, SIGTERM and SIGINT passed on to it;
# AFTER (a function) runs once it has started; exits with the daemon's status
DAEMON_PID=
daemon_running() { proc_alive "$DAEMON_PID" || die "$DAEMON_NAME exited"; }
serve() {
  local after=$1
  shift
  DAEMON_NAME=$1
  log "starting $*"
  "$@" &
  DAEMON_PID=$!
  trap 'kill -TERM "$DAEMON_PID" 2>/dev/null || true' TERM INT
  "$after"
  while proc_alive "$DAEMON_PID"; do wait "$DAEMON_PID" || true; done
  wait "$DAEMON_PID"
}
nothing_after() { :; }

# --- roles ----------------------------------------------------------------------------------------------
# new_password FILE: a random password (48 hex digits) in FILE, unless it has one
new_password() {
  local tmp
  [[ -s $1 ]] && return 0
  log "creating the password $1"
  tmp=$(mktemp "$1.XXXXXX")
  od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$tmp"
  mv "$tmp" "$1"
}

role_keys() {
  install -d -m 700 -o munge -g munge "$(dirname "$MUNGE_KEY")"
  if [[ ! -s $MUNGE_KEY ]]; then
    log "creating the munge key $MUNGE_KEY"
    (umask 077 && dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none)
  fi
  chown munge:munge "$MUNGE_KEY"
  chmod 400 "$MUNGE_KEY"
  install -d -m 755 "$SECRETS"
  new_password "$DB_PASSWORD_FILE"
  new_password "$DB_ROOT_PASSWORD_FILE"
  # readable by MariaDB's entrypoint, which reads them as the mysql user; only the mariadb and slurmdbd
  # containers mount this volume, and nobody logs in to them
  chmod 444 "$DB_PASSWORD_FILE" "$DB_ROOT_PASSWORD_FILE"
  echo "keys ready: $MUNGE_KEY, $DB_PASSWORD_FILE, $DB_ROOT_PASSWORD_FILE"
}

role_slurmdbd() {
  local tmp=$TMP/slurmdbd.conf
  slurm_conf
  slurm_dirs
  [[ -s $DB_PASSWORD_FILE ]] || die "no database password at $DB_PASSWORD_FILE: the keys service makes it"
  render "$DBD_TEMPLATE" "$tmp" DBD_HOST="$DBD_HOST" DB_HOST="$DB_HOST" DB_NAME="$DB_NAME" DB_USER="$DB_USER"
  # appended with the shell's own printf: the password never appears in a command line
  printf 'StoragePass=%s\n' "$(<"$DB_PASSWORD_FILE")" >>"$tmp"
  install -m 600 -o slurm -g slurm "$tmp" "$DBD_CONF"
  rm -f "$tmp"
  start_munge
  serve nothing_after slurmdbd -D
}

# sacct_has LINE ARGS...: `sacctmgr -nP ARGS` prints LINE
sacct_has() {
  local line=$1 out
  shift
  out=$(timeout 30 sacctmgr --noheader --parsable2 "$@") || die "sacctmgr $* failed"
  grep -qxF -- "$line" <<<"$out"
}
sacct_add() { log "sacctmgr $*"; timeout 30 sacctmgr --immediate "$@" >&2 || die "sacctmgr $* failed"; }

ensure_accounting() {
  local cluster entry user accounts account
  cluster=$(conf_value ClusterName)
  wait_until 120 sacctmgr_answers || die "slurmdbd on $DBD_HOST does not answer after 120 s"
  sacct_has "$cluster" show cluster format=cluster || sacct_add add cluster "$cluster"
  for account in "${ACCOUNTS[@]}"; do
    sacct_has "$account" show account format=account \
      || sacct_add add account "$account" cluster="$cluster" description="$account (demo)" organization=hpchub-demo
  done
  for entry in "${ASSOCIATIONS[@]}"; do
    user=${entry%%:*}
    accounts=${entry#*:}
    for account in ${accounts//,/ }; do   # the first one added is the default account
      sacct_has "$cluster|$account|$user" show associations format=cluster,account,user \
        || sacct_add add user "$user" account="$account" cluster="$cluster"
    done
  done
}

# the compute nodes' names resolve only once their containers exist; a name slurmctld cannot resolve when
# it starts makes that node unusable ("NO NETWORK ADDRESS FOUND") until slurmctld restarts
names_resolve() { local n; for n in "$@"; do getent hosts "$n" >/dev/null || return 1; done; }

explain_n1() {
  wait_ready 120 daemon_running ctld_up || die "slurmctld does not answer after 120 s"
  timeout 10 scontrol update NodeName=n1 State=DOWN \
    Reason="netns.sh's node: not part of the demo cluster" >&2 || true
  log "slurmctld is up"
}

role_slurmctld() {
  local nodes
  slurm_conf
  slurm_dirs
  start_munge
  ensure_accounting
  mapfile -t nodes < <(timeout 10 scontrol show hostnames "$(compute_nodes)")
  wait_until 120 names_resolve "${nodes[@]}" || die "the compute nodes ${nodes[*]} do not resolve after 120 s"
  serve explain_n1 slurmctld -D
}

role_slurmd() {
  local node=${1:-} nodes
  nodes=$(compute_nodes)
  [[ -n $node ]] || die "usage: container.sh slurmd NODE"
  slurm_conf
  timeout 10 scontrol show hostnames "$nodes" | grep -qxF -- "$node" || die "$node is not one of the nodes $nodes"
  [[ $(hostname) == "$node" ]] || die "this container's host name is $(hostname), not $node (compose's hostname:)"
  slurm_dirs "$node"
  start_munge
  log "waiting for slurmctld"
  wait_until "$WAIT_CONTROLLER" ctld_up || die "slurmctld does not answer after $WAIT_CONTROLLER s"
  serve nothing_after slurmd -D -N "$node"
}

role_login() {
  slurm_conf
  slurm_dirs
  start_munge
  wait_until "$WAIT_CONTROLLER" ctld_up || die "slurmctld does not answer after $WAIT_CONTROLLER s"
  [[ -r $LDAP_CA ]] || die "no LDAP CA certificate at $LDAP_CA: the ldap service publishes it"
  install -d -m 700 "$HUB_DATA"
  cd "$HUB_DATA"
  log "starting hpchub -f $TOML"
  exec /opt/hpchub/bin/hpchub -f "$TOML"
}

role_egress() {
  local port=${1:-} dest=${2:-}
  [[ $port =~ ^[0-9]+$ && $dest =~ ^[A-Za-z0-9.-]+:[0-9]+$ ]] || die "usage: container.sh egress PORT HOST:PORT"
  log "forwarding TCP $port to $dest, nothing else"
  exec socat "TCP-LISTEN:$port,fork,reuseaddr" "TCP:$dest"
}

role_print-conf() { render_conf "$TMP/slurm.conf"; cat "$TMP/slurm.conf"; }

role_healthy() {
  case ${1:-} in
    slurmdbd) munge_ok && sacctmgr_answers ;;
    slurmctld) ctld_up ;;
    slurmd) [[ -n ${2:-} ]] && node_ready "$2" ;;
    login) /opt/hpchub/bin/python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' \
             "$HUB_HEALTH" ;;
    *) die "usage: container.sh healthy slurmdbd|slurmctld|slurmd NODE|login" ;;
  esac
}

case ${1:-} in
  keys|slurmdbd|slurmctld|slurmd|login|egress|print-conf|healthy)
    role=$1
    shift
    "role_$role" "$@"
    ;;
  *)
    echo "usage: $0 keys|slurmdbd|slurmctld|slurmd NODE|login|egress PORT HOST:PORT|print-conf|healthy ROLE" >&2
    exit 2
    ;;
esac
