#!/usr/bin/env bash
# The hpchub test directory: two OpenLDAP slapd instances of their own (Debian's slapd, not its default
# instance), "a" and "b", holding the same entries, so that a client can fail over from one to the other.
#
#   a   ldap://127.0.0.1:10389 (StartTLS)   ldaps://127.0.0.1:10636   ldapi:///run/hpchub-test-ldap/a.ldapi
#   b   ldap://127.0.0.1:10390 (StartTLS)   ldaps://127.0.0.1:10637   ldapi:///run/hpchub-test-ldap/b.ldapi
#
# Usage (as root): ldap.sh start|stop|status
#   start    install slapd and ldap-utils (preseeded: no default database); make a CA and a server
#            certificate for 127.0.0.1 and localhost (once); make the test users alice and bob when missing;
#            for each instance, when it is new or its configuration, entries or certificates changed,
#            rebuild it: cn=config from slapd.ldif.in with slapadd, then the entries of seed.ldif.in over
#            ldapi as root (the memberOf overlay sees them added); start slapd detached (resuming one left
#            stopped by SIGSTOP), and wait until the service account binds over StartTLS and LDAPS.
#            Idempotent: on running, current instances it changes nothing.
#   stop     stop both instances
#   status   print whether they run (exit 0 when both run, 3 otherwise)
# Env: HPCHUB_LDAP_WAIT  seconds to wait for an instance to answer (default 30)
#      HPCHUB_LDAP_HOST  the IPv4 address or host name the instances listen on and clients connect to,
#                        for which the server certificate is made (besides localhost); default 127.0.0.1.
#                        The demo cluster's LDAP container (container.sh beside this script) sets its own
#                        host name.
#
# Directory: base dc=hpchub,dc=test; ou=people (alice and bob with the uidNumber, gidNumber and home of
# the Unix users of the same names; carol; dave), ou=groups (see seed.ldif.in), ou=services (the
# service account cn=hub-reader). Passwords, for tests only: reader "Reader-ldap-pw-5", alice
# "Alice-ldap-pw-1", bob "Bob-ldap-pw-2", carol "Carol-ldap-pw-3", dave "Dave-ldap-pw-4". Anonymous
# binds read nothing; bound users read everything but passwords.
# CA certificate (world-readable): /etc/hpchub-test-ldap/tls/ca.crt. Logs: /var/log/hpchub-test-ldap/.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TAG=ldap.sh
# shellcheck source=docker/lib/service.sh
source "$HERE/../lib/service.sh"
ROOT_FOR="packages, /etc, daemons"
LOCK=/run/hpchub-test-ldap.lock

SUFFIX=dc=hpchub,dc=test
ADDR=${HPCHUB_LDAP_HOST:-127.0.0.1}
ETC=/etc/hpchub-test-ldap
TLS=$ETC/tls
READER_PW_FILE=$ETC/reader.pw     # for the readiness probe: no password in argv
VAR=/var/lib/hpchub-test-ldap
RUN=/run/hpchub-test-ldap
LOGDIR=/var/log/hpchub-test-ldap
INSTANCES=(a b)
declare -A LDAP_PORT=([a]=10389 [b]=10390) LDAPS_PORT=([a]=10636 [b]=10637)
READER_DN="cn=hub-reader,ou=services,$SUFFIX"
declare -A PASSWORD=([READER]=Reader-ldap-pw-5 [ALICE]=Alice-ldap-pw-1 [BOB]=Bob-ldap-pw-2
                     [CAROL]=Carol-ldap-pw-3 [DAVE]=Dave-ldap-pw-4)
WAIT=${HPCHUB_LDAP_WAIT:-30}

pidfile() { echo "$RUN/$1.pid"; }
ldapi() { echo "ldapi://${RUN//\//%2F}%2F$1.ldapi"; }
slapd_pid() { local pid; pid=$(pidfile_pid "$(pidfile "$1")") && proc_alive "$pid" slapd && echo "$pid"; }
log_files() { local i; for i in "${INSTANCES[@]}"; do echo "$LOGDIR/$i.log"; done; }

install_packages() {
  debconf-set-selections <<EOF
slapd slapd/no_configuration boolean true
slapd slapd/purge_database boolean false
EOF
  apt_install slapd ldap-utils openssl
}

addr_is_ip() { [[ $ADDR =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]]; }

certs_current() {
  local for_addr=(-verify_hostname "$ADDR")
  addr_is_ip && for_addr=(-verify_ip "$ADDR")
  [[ -s $TLS/ca.crt && -s $TLS/server.crt && -s $TLS/server.key ]] \
    && openssl x509 -checkend 86400 -noout -in "$TLS/server.crt" >/dev/null \
    && openssl verify -CAfile "$TLS/ca.crt" "${for_addr[@]}" "$TLS/server.crt" >/dev/null 2>&1
}

make_certs() {
  install -d -m 755 -o root -g root "$ETC" "$TLS"
  certs_current && return 0
  log "creating a test CA and a server certificate for $ADDR and localhost in $TLS"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=hpchub test LDAP CA" \
    -keyout "$TMP/ca.key" -out "$TMP/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout "$TMP/server.key" -out "$TMP/server.csr" 2>/dev/null
  local san=IP:$ADDR
  addr_is_ip || san=DNS:$ADDR
  printf 'subjectAltName=DNS:localhost,%s\nextendedKeyUsage=serverAuth\n' "$san" >"$TMP/ext.cnf"
  openssl x509 -req -in "$TMP/server.csr" -CA "$TMP/ca.crt" -CAkey "$TMP/ca.key" -CAcreateserial -days 3650 \
    -extfile "$TMP/ext.cnf" -out "$TMP/server.crt" 2>/dev/null
  # world-readable CA: clients running as ordinary users must read it
  install -m 644 -o root -g root "$TMP/ca.crt" "$TLS/ca.crt"
  install -m 600 -o root -g root "$TMP/ca.key" "$TLS/ca.key"
  install -m 644 -o root -g root "$TMP/server.crt" "$TLS/server.crt"
  install -m 640 -o root -g openldap "$TMP/server.key" "$TLS/server.key"
}

# user_values: NAME=VALUE pairs for the numbers and homes of seed.ldif.in; alice and bob as in passwd
user_values() {
  local u uid gid home
  for u in "${TEST_USERS[@]}"; do
    IFS=: read -r _ _ uid gid _ home _ < <(getent passwd "$u") || die "test user $u is missing"
    printf '%s\n' "${u^^}_UID=$uid" "${u^^}_GID=$gid" "${u^^}_HOME=$home"
  done
  printf '%s\n' CAROL_UID=20003 CAROL_GID=20003 CAROL_HOME=/home/carol \
                DAVE_UID=20004 DAVE_GID=20004 DAVE_HOME=/home/dave
}

# stamp: what an instance is built from; a change rebuilds it
stamp() {
  cat "$HERE/slapd.ldif.in" "$HERE/seed.ldif.in" "$TLS/ca.crt" "$TLS/server.crt"
  user_values
  declare -p PASSWORD LDAP_PORT LDAPS_PORT
} 2>/dev/null

hash_password() {
  (umask 077 && printf '%s' "$1" >"$TMP/pw")
  slappasswd -h '{SSHA}' -T "$TMP/pw"
}

render_seed() {
  local values=() name
  mapfile -t values < <(user_values)
  for name in "${!PASSWORD[@]}"; do values+=("${name}_PW=$(hash_password "${PASSWORD[$name]}")"); done
  render "$HERE/seed.ldif.in" "$1" "SUFFIX=$SUFFIX" "${values[@]}"
}

start_instance() {
  local i=$1 pid
  if pid=$(slapd_pid "$i"); then
    if [[ $(awk '{print $3}' "/proc/$pid/stat") == T ]]; then
      log "slapd $i (pid $pid) was stopped (SIGSTOP): resuming it"
      kill -CONT "$pid"
    fi
    return 0
  fi
  log "starting slapd $i on ldap://$ADDR:${LDAP_PORT[$i]}, ldaps://$ADDR:${LDAPS_PORT[$i]}"
  rm -f "$(pidfile "$i")" "$RUN/$i.ldapi"
  # -d: stays in the foreground (launch detaches it) and logs connections and operations to its output
  launch "slapd-$i" "$LOGDIR/$i.log" /usr/sbin/slapd -d stats -u openldap -g openldap -F "$VAR/$i/slapd.d" \
    -h "ldap://$ADDR:${LDAP_PORT[$i]}/ ldaps://$ADDR:${LDAPS_PORT[$i]}/ $(ldapi "$i")"
}

stop_instance() {
  local pid
  pid=$(slapd_pid "$1") && kill -CONT "$pid" 2>/dev/null   # a stopped process cannot act on SIGTERM
  stop_daemon "$(pidfile "$1")" slapd
}

CURRENT=""
current_alive() { slapd_pid "$CURRENT" >/dev/null || fail_with_logs "slapd $CURRENT is not running"; }

# probe I MODE: the service account binds to instance I over StartTLS ("starttls") or LDAPS ("ldaps")
probe() {
  local uri=ldap://$ADDR:${LDAP_PORT[$1]} tls=-ZZ
  if [[ $2 == ldaps ]]; then uri=ldaps://$ADDR:${LDAPS_PORT[$1]}; tls=; fi
  LDAPTLS_CACERT=$TLS/ca.crt timeout 10 \
    ldapwhoami -x $tls -o nettimeout=5 -H "$uri" -D "$READER_DN" -y "$READER_PW_FILE"
}
root_answers() {
  timeout 10 ldapsearch -Q -LLL -Y EXTERNAL -H "$(ldapi "$CURRENT")" -b cn=config -s base dn 2>/dev/null
}

wait_answers() {
  CURRENT=$1
  wait_ready "$WAIT" current_alive root_answers || fail_with_logs "slapd $1 does not answer on ldapi after $WAIT s"
}

build_instance() {
  local i=$1 dir=$VAR/$1 out
  log "building slapd $i in $dir"
  stop_instance "$i"
  rm -rf "$dir"
  install -d -m 750 -o openldap -g openldap "$dir" "$dir/slapd.d" "$dir/data"
  render "$HERE/slapd.ldif.in" "$TMP/slapd-$i.ldif" "NAME=$i" "RUN=$RUN" "DB=$dir/data" "SUFFIX=$SUFFIX" "TLS=$TLS"
  out=$(slapadd -n0 -F "$dir/slapd.d" -l "$TMP/slapd-$i.ldif" 2>&1) \
    || die "slapadd of the configuration of $i failed: $out"
  chown -R openldap:openldap "$dir"
  start_instance "$i"
  wait_answers "$i"
  render_seed "$TMP/seed.ldif"
  out=$(timeout 60 ldapadd -Q -Y EXTERNAL -H "$(ldapi "$i")" -f "$TMP/seed.ldif" 2>&1) \
    || die "loading the entries into $i failed: $out"
  stamp >"$dir/stamp"
}

converge() {
  local i=$1 m
  if ! cmp -s <(stamp) "$VAR/$i/stamp"; then
    build_instance "$i"
  else
    start_instance "$i"
    wait_answers "$i"
  fi
  for m in starttls ldaps; do
    wait_ready "$WAIT" current_alive probe "$i" "$m" \
      || fail_with_logs "the service account cannot bind to slapd $i over $m after $WAIT s: $(probe "$i" "$m" 2>&1)"
  done
}

start() {
  [[ $WAIT =~ ^[0-9]+$ ]] || die "HPCHUB_LDAP_WAIT must be a whole number of seconds, not '$WAIT'"
  [[ $ADDR =~ ^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]] \
    || die "HPCHUB_LDAP_HOST must be an IPv4 address or a host name, not '$ADDR'"
  ensure_test_users
  install_packages
  make_certs
  install -d -m 755 -o root -g root "$VAR" "$LOGDIR"
  install -d -m 755 -o openldap -g openldap "$RUN"
  printf '%s' "${PASSWORD[READER]}" >"$TMP/reader.pw"
  install_if_changed 600 root "$READER_PW_FILE" "$TMP/reader.pw" || true
  local i
  for i in "${INSTANCES[@]}"; do converge "$i"; done
  echo "hpchub test LDAP ready in $(elapsed): a ldap://$ADDR:${LDAP_PORT[a]} ldaps://$ADDR:${LDAPS_PORT[a]}," \
       "b ldap://$ADDR:${LDAP_PORT[b]} ldaps://$ADDR:${LDAPS_PORT[b]}, base $SUFFIX, CA $TLS/ca.crt; $(started)"
}

stop() { local i; for i in "${INSTANCES[@]}"; do stop_instance "$i"; done; }

status() {
  local i rc=0
  for i in "${INSTANCES[@]}"; do report "$(pidfile "$i")" slapd "hpchub test slapd $i" || rc=3; done
  return $rc
}

service_main "$@"
