#!/usr/bin/env bash
# The hpchub test SSH submit host: an OpenSSH sshd of its own on 127.0.0.1:2222 (key-only, not the
# system's sshd), the service account hpchub-submit that SSHRunner logs in as, and a sudoers drop-in
# that lets that account run exactly hpchub's scheduler commands as the test users alice and bob.
#
# Usage (as root): sshd.sh start|stop|status
#   start    install openssh-server if missing; create the host key, the service account, its key
#            pair and known_hosts (once); write the configuration and the sudoers drop-in (validated
#            with visudo); start sshd detached (restarting it when its configuration changed) and wait
#            until the service account can log in and run a command as alice through sudo. Idempotent.
#   stop     stop this sshd and its sessions
#   status   print whether it runs (exit 0 when it runs, 3 otherwise)
# Env: HPCHUB_SSHD_WAIT  seconds to wait for sshd to accept the service account's key (default 30)
#
# What the hub side uses (root-only directory):
#   /etc/hpchub-test-sshd/client/id_ed25519    the service account's private key
#   /etc/hpchub-test-sshd/client/known_hosts   "[127.0.0.1]:2222 ssh-ed25519 ..." for this sshd
# Log: /var/log/hpchub-test-sshd.log. The test users come from docker/slurm-cluster/cluster.sh.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TAG=sshd.sh
# shellcheck source=docker/lib/service.sh
source "$HERE/../lib/service.sh"
ROOT_FOR="packages, accounts, /etc, sudoers"
DIR=/etc/hpchub-test-sshd
CONF=$DIR/sshd_config
HOST_KEY=$DIR/ssh_host_ed25519_key
AUTH_DIR=$DIR/authorized_keys
CLIENT_DIR=$DIR/client
CLIENT_KEY=$CLIENT_DIR/id_ed25519
KNOWN_HOSTS=$CLIENT_DIR/known_hosts
SUDOERS=/etc/sudoers.d/hpchub-test-ssh     # no dot in the name: sudo skips such files in sudoers.d
PIDFILE=/run/hpchub-test-sshd.pid
RUNNING=/run/hpchub-test-sshd.running      # the configuration and host key the running sshd started with
LOG=/var/log/hpchub-test-sshd.log
LOCK=/run/hpchub-test-sshd.lock
ADDR=127.0.0.1
PORT=2222
SERVICE_USER=hpchub-submit
SERVICE_HOME=/var/lib/hpchub-submit
WAIT=${HPCHUB_SSHD_WAIT:-30}

# sshd_pid: the pid of this sshd, when it runs: a live sshd started with our configuration (a stale
# pid file may name a reused pid)
sshd_pid() {
  local pid
  pid=$(pidfile_pid "$PIDFILE") && proc_alive "$pid" sshd || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "-f $CONF " || return 1
  echo "$pid"
}
sshd_running() { sshd_pid >/dev/null || fail_with_logs "sshd is not running"; }

# probe: log in as the service account with its key, the host key checked against known_hosts, and
# run a command as the first test user through sudo; prints what came back
probe() {
  timeout 10 ssh -F none -i "$CLIENT_KEY" -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes \
    -o UserKnownHostsFile="$KNOWN_HOSTS" -o GlobalKnownHostsFile=/dev/null -o ConnectTimeout=5 -p "$PORT" \
    "$SERVICE_USER@$ADDR" sudo -n -u "${TEST_USERS[0]}" -- /usr/bin/id -un </dev/null 2>&1
}
login_works() { [[ $(probe) == "${TEST_USERS[0]}" ]]; }

log_files() { echo "$LOG"; }

# render_in NAME OUT: NAME.in beside this script with its placeholders substituted
render_in() {
  local runas
  printf -v runas '%s, ' "${TEST_USERS[@]}"
  render "$HERE/$1.in" "$2" DIR="$DIR" ADDR="$ADDR" PORT="$PORT" PIDFILE="$PIDFILE" SERVICE_USER="$SERVICE_USER" \
    RUNAS="${runas%, }"
}

ensure_service_account() {
  if ! id "$SERVICE_USER" >/dev/null 2>&1; then
    log "creating the service account $SERVICE_USER"
    useradd --system --user-group --shell /bin/sh --home-dir "$SERVICE_HOME" --create-home "$SERVICE_USER"
  fi
  # "*": no password, yet not locked ("!"), which sshd without PAM would refuse even for a key
  [[ $(getent shadow "$SERVICE_USER" | cut -d: -f2) == '*' ]] || usermod -p '*' "$SERVICE_USER"
}

ensure_keys() {
  install -d -m 755 -o root -g root "$DIR" "$AUTH_DIR"
  install -d -m 700 -o root -g root "$CLIENT_DIR"
  install -d -m 755 -o root -g root /run/sshd      # sshd's privilege separation directory
  if [[ ! -s $HOST_KEY ]]; then
    log "creating the host key $HOST_KEY"
    rm -f "$HOST_KEY" "$HOST_KEY.pub"
    ssh-keygen -q -t ed25519 -N '' -C "hpchub-test-sshd" -f "$HOST_KEY"
  fi
  if [[ ! -s $CLIENT_KEY ]]; then
    log "creating the service account's key $CLIENT_KEY"
    rm -f "$CLIENT_KEY" "$CLIENT_KEY.pub"
    ssh-keygen -q -t ed25519 -N '' -C "$SERVICE_USER@hpchub-test" -f "$CLIENT_KEY"
  fi
  # as docs/runners.md recommends: no forwarding, no pty, and only from the hub's address
  printf 'restrict,from="%s" %s\n' "$ADDR" "$(cat "$CLIENT_KEY.pub")" >"$TMP/new"
  install_if_changed 644 root "$AUTH_DIR/$SERVICE_USER" "$TMP/new" || true
  printf '[%s]:%s %s\n' "$ADDR" "$PORT" "$(cut -d' ' -f1,2 "$HOST_KEY.pub")" >"$TMP/new"
  install_if_changed 644 root "$KNOWN_HOSTS" "$TMP/new" || true
}

write_sudoers() {
  local tmp=$TMP/sudoers out
  render_in sudoers "$tmp"
  out=$(visudo -c -q -f "$tmp" 2>&1) || die "sudoers drop-in from $HERE/sudoers.in is invalid: $out"
  if install_if_changed 440 root "$SUDOERS" "$tmp"; then
    log "writing $SUDOERS"
    out=$(visudo -c -q 2>&1) || { rm -f "$SUDOERS"; die "sudoers invalid with $SUDOERS (removed it): $out"; }
  fi
}

write_conf() {
  local tmp=$TMP/sshd_config out
  render_in sshd_config "$tmp"
  out=$(/usr/sbin/sshd -t -f "$tmp" 2>&1) || die "sshd rejects the configuration: $out"
  if install_if_changed 644 root "$CONF" "$tmp"; then log "writing $CONF"; fi
}

# stop: TERM the listener's sessions and the listener (sessions outlive it otherwise); KILL after 10 s
stop() {
  local pid pids
  pid=$(sshd_pid) || { rm -f "$PIDFILE" "$RUNNING"; return 0; }
  log "stopping sshd (pid $pid) and its sessions"
  mapfile -t pids < <(ps -o pid= --ppid "$pid" | tr -d ' ')
  terminate "$pid" sshd 10 "${pids[@]}"
  rm -f "$PIDFILE" "$RUNNING"
}

running_state() { cat "$CONF" "$HOST_KEY.pub"; }

start_sshd() {
  if sshd_pid >/dev/null && ! cmp -s <(running_state) "$RUNNING"; then
    log "the configuration or the host key changed: restarting sshd"
    stop
  fi
  sshd_pid >/dev/null && return 0
  rm -f "$PIDFILE"
  log "starting sshd on $ADDR:$PORT"
  running_state >"$RUNNING"
  # -D: launch detaches it instead; what sshd prints before it opens its -E log goes to the same file
  launch sshd "$LOG" /usr/sbin/sshd -D -f "$CONF" -E "$LOG"
}

start() {
  local u
  [[ $WAIT =~ ^[0-9]+$ ]] || die "HPCHUB_SSHD_WAIT must be a whole number of seconds, not '$WAIT'"
  for u in "${TEST_USERS[@]}"; do
    id "$u" >/dev/null 2>&1 || die "test user $u is missing: run docker/slurm-cluster/cluster.sh start first"
  done
  apt_install openssh-server openssh-client sudo
  ensure_service_account
  ensure_keys
  write_sudoers
  write_conf
  start_sshd
  wait_ready "$WAIT" sshd_running login_works \
    || fail_with_logs "$SERVICE_USER cannot log in after ${WAIT} s: $(probe | tail -n 3)"
  echo "hpchub test sshd ready on $ADDR:$PORT in $(elapsed) (pid $(sshd_pid)): $SERVICE_USER, key $CLIENT_KEY," \
       "known_hosts $KNOWN_HOSTS, sudo to ${TEST_USERS[*]}; $(started)"
}

status() {
  local pid
  if pid=$(sshd_pid); then
    echo "hpchub test sshd: running (pid $pid) on $ADDR:$PORT"
  else
    echo "hpchub test sshd: not running"
    return 3
  fi
}

service_main "$@"
