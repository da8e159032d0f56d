#!/usr/bin/env bash
# The hpchub test PostgreSQL: Debian's PostgreSQL 15 with a cluster of its own (not Debian's default
# one), on 127.0.0.1:55432 and a socket in /run/hpchub-test-pg, holding the role hpchub and the
# database hpchub_ledger_test that the job ledger tests use. Throwaway data: nothing else relies on it.
#
# Usage (as root): postgres.sh start|stop|status
#   start    install the postgresql package if missing; create the cluster (initdb as user postgres,
#            once); write its settings and pg_hba.conf (restarting the server when they changed); start
#            it detached with pg_ctl, wait until pg_isready answers, create the role and the database
#            when missing, check that the role can log in over TCP. Idempotent: on a running server it
#            changes nothing. Prints the SQLAlchemy URL on stdout, progress on stderr.
#   stop     stop the server (fast shutdown; immediate after 30 s)
#   status   print whether it runs and answers, and the URL (exit 0 when it answers, 3 otherwise)
# Env: HPCHUB_PG_WAIT  seconds to wait for the server to accept connections (default 60)
#
# Authentication: peer for the superuser postgres over the socket; trust for hpchub, to its database
# only, over the socket and 127.0.0.1; everything else is rejected. Log: /var/log/hpchub-test-pg/.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TAG=postgres.sh
# shellcheck source=docker/lib/service.sh
source "$HERE/../lib/service.sh"
ROOT_FOR="packages, initdb as postgres, daemons"
PG_MAJOR=15
PGBIN=/usr/lib/postgresql/$PG_MAJOR/bin
BASE=/var/lib/hpchub-test-pg
DATA=$BASE/data
SOCKDIR=/run/hpchub-test-pg
LOGDIR=/var/log/hpchub-test-pg
LOG=$LOGDIR/postgres.log
LOCK=/run/hpchub-test-pg.lock
RUNNING_CONF=$SOCKDIR/settings.running   # the settings the running server started with
ADDR=127.0.0.1
PORT=55432
ROLE=hpchub
DB=hpchub_ledger_test
URL="postgresql+psycopg://$ROLE@$ADDR:$PORT/$DB"
WAIT=${HPCHUB_PG_WAIT:-60}
export PGCONNECT_TIMEOUT=5

# as_pg CMD...: CMD as the user postgres, from a directory it can read
as_pg() { (cd / && runuser -u postgres -- "$@"); }

# pg_pid: the postmaster's pid, from its lock file, when that names a live postgres
pg_pid() {
  local pid
  pid=$(pidfile_pid "$DATA/postmaster.pid") && proc_alive "$pid" postgres && echo "$pid"
}
pg_running() { pg_pid >/dev/null || fail_with_logs "PostgreSQL is not running"; }

ready() { timeout 10 "$PGBIN/pg_isready" -q -h "$ADDR" -p "$PORT" -U "$ROLE" -d "$DB" -t 5; }

# sql STATEMENT: run it as the superuser over the socket; prints the rows unaligned
sql() { as_pg timeout 30 "$PGBIN/psql" -X -q -tA -v ON_ERROR_STOP=1 -h "$SOCKDIR" -p "$PORT" -d postgres -c "$1"; }

log_files() { echo "$LOG"; }

init_cluster() {
  install -d -m 755 -o postgres -g postgres "$BASE" "$LOGDIR"
  if [[ -s $DATA/PG_VERSION ]]; then
    [[ $(<"$DATA/PG_VERSION") == "$PG_MAJOR" ]] \
      || die "$DATA holds a PostgreSQL $(<"$DATA/PG_VERSION") cluster, not $PG_MAJOR: remove $BASE to recreate it"
    return 0
  fi
  [[ ! -e $DATA ]] || die "$DATA exists but holds no cluster (no PG_VERSION): remove it to recreate the cluster"
  log "creating the cluster in $DATA (initdb)"
  rm -rf "$DATA.new"   # left by an interrupted initdb
  as_pg "$PGBIN/initdb" -D "$DATA.new" --username=postgres --auth-local=peer --auth-host=reject \
    --encoding=UTF8 --no-locale --no-instructions >&2 || die "initdb failed"
  grep -qx "include = 'hpchub.conf'" "$DATA.new/postgresql.conf" \
    || echo "include = 'hpchub.conf'" >>"$DATA.new/postgresql.conf"
  mv "$DATA.new" "$DATA"
}

write_conf() {
  local tmp
  tmp=$TMP/new
  cat >"$tmp" <<EOF
# written by docker/postgres/postgres.sh: the hpchub test server
listen_addresses = '$ADDR'
port = $PORT
unix_socket_directories = '$SOCKDIR'
max_connections = 50
EOF
  if install_if_changed 600 postgres "$DATA/hpchub.conf" "$tmp"; then log "writing $DATA/hpchub.conf"; fi
  tmp=$TMP/new
  cat >"$tmp" <<EOF
# written by docker/postgres/postgres.sh
# TYPE  DATABASE            USER      ADDRESS       METHOD
local   all                 postgres                peer
local   $DB  $ROLE                  trust
host    $DB  $ROLE    $ADDR/32  trust
EOF
  if install_if_changed 600 postgres "$DATA/pg_hba.conf" "$tmp"; then log "writing $DATA/pg_hba.conf"; fi
}

stop() {
  local pid
  pid=$(pg_pid) || { rm -f "$RUNNING_CONF"; return 0; }
  log "stopping PostgreSQL (pid $pid)"
  if ! as_pg timeout 40 "$PGBIN/pg_ctl" stop -D "$DATA" -m fast -w -t 30 >&2; then
    log "fast shutdown did not finish in 30 s: immediate shutdown"
    as_pg timeout 40 "$PGBIN/pg_ctl" stop -D "$DATA" -m immediate -w -t 30 >&2 || die "PostgreSQL (pid $pid) does not stop"
  fi
  rm -f "$RUNNING_CONF"
}

settings() { cat "$DATA/hpchub.conf" "$DATA/pg_hba.conf"; }

start_pg() {
  if pg_pid >/dev/null && ! settings | cmp -s - "$RUNNING_CONF"; then
    log "the settings changed: restarting PostgreSQL"
    stop
  fi
  pg_pid >/dev/null && return 0
  install -d -m 755 -o postgres -g postgres "$SOCKDIR"
  # a lock file naming a dead or foreign process (machine reset, kill -9) would stop the start
  rm -f "$DATA/postmaster.pid" "$SOCKDIR/.s.PGSQL.$PORT" "$SOCKDIR/.s.PGSQL.$PORT.lock"
  settings >"$RUNNING_CONF"
  # the server appends to it as postgres: it must not be created by root's redirection below
  [[ -e $LOG ]] || install -m 640 -o postgres -g postgres /dev/null "$LOG"
  log "starting PostgreSQL $PG_MAJOR on $ADDR:$PORT"
  # pg_ctl -W returns at once (the wait is ours, with pg_isready)
  launch PostgreSQL "$LOG" runuser -u postgres -- "$PGBIN/pg_ctl" start -W -D "$DATA" -l "$LOG"
}

ensure_database() {
  if [[ $(sql "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'") != 1 ]]; then
    log "creating the role $ROLE"
    sql "CREATE ROLE $ROLE LOGIN" || die "cannot create the role $ROLE"
  fi
  if [[ $(sql "SELECT 1 FROM pg_database WHERE datname = '$DB'") != 1 ]]; then
    log "creating the database $DB"
    sql "CREATE DATABASE $DB OWNER $ROLE" || die "cannot create the database $DB"
  fi
  local who
  who=$(timeout 30 "$PGBIN/psql" -X -tA -d "postgresql://$ROLE@$ADDR:$PORT/$DB" -c 'SELECT current_user' 2>&1) || true
  [[ $who == "$ROLE" ]] || fail_with_logs "$ROLE cannot log in to $DB over TCP: $who"
}

start() {
  [[ $WAIT =~ ^[0-9]+$ ]] || die "HPCHUB_PG_WAIT must be a whole number of seconds, not '$WAIT'"
  apt_install postgresql
  [[ -x $PGBIN/postgres ]] || die "$PGBIN/postgres is missing: this script wants PostgreSQL $PG_MAJOR (Debian 12)"
  init_cluster
  write_conf
  start_pg
  wait_ready "$WAIT" pg_running ready || fail_with_logs "PostgreSQL does not accept connections after ${WAIT} s"
  ensure_database
  log "PostgreSQL $PG_MAJOR ready on $ADDR:$PORT in $(elapsed) (pid $(pg_pid)), database $DB, role $ROLE; $(started)"
  echo "$URL"
}

status() {
  local pid
  if pid=$(pg_pid) && ready; then
    echo "hpchub test PostgreSQL: running (pid $pid) on $ADDR:$PORT, accepting connections; $URL"
  elif [[ -n ${pid:-} ]]; then
    echo "hpchub test PostgreSQL: running (pid $pid) but not accepting connections on $ADDR:$PORT"
    return 3
  else
    echo "hpchub test PostgreSQL: not running"
    return 3
  fi
}

service_main "$@"
