#!/usr/bin/env bash
# Entrypoint of the demo cluster's directory (docker/slurm-cluster/compose.yaml): the test directory of
# ldap.sh beside this script, as the native tests run it (two instances, the entries of seed.ldif.in,
# StartTLS and LDAPS with a CA of its own), listening on this container's host name instead of 127.0.0.1.
#
# Usage: container.sh serve|healthy
#   serve    ldap.sh start (HPCHUB_LDAP_HOST: the host name clients dial, default this container's);
#            publish the CA certificate, and only it, in PUBLISH for the login node; then watch the
#            instances: exit 1 when one stops, ldap.sh stop on SIGTERM
#   healthy  the healthcheck: both instances run and the CA certificate is published
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LDAP_SH=$HERE/ldap.sh
CA=/etc/hpchub-test-ldap/tls/ca.crt     # where ldap.sh makes it
PUBLISH=/srv/hpchub-ldap-ca             # the ldap-ca volume, mounted read-only on the login node
WATCH_EVERY=5

log() { printf '[ldap container.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

serve() {
  HPCHUB_LDAP_HOST=${HPCHUB_LDAP_HOST:-$(hostname)}
  export HPCHUB_LDAP_HOST
  "$LDAP_SH" start
  install -d -m 755 "$PUBLISH"
  install -m 644 "$CA" "$PUBLISH/ca.crt"
  log "CA certificate published in $PUBLISH/ca.crt"
  local stopping=0
  trap 'stopping=1' TERM INT
  while ((stopping == 0)); do
    if ! "$LDAP_SH" status >/dev/null; then
      "$LDAP_SH" status >&2 || true
      log "an instance stopped: exiting"
      exit 1
    fi
    sleep "$WATCH_EVERY" &
    wait $! || true
  done
  "$LDAP_SH" stop
}

healthy() { [[ -s $PUBLISH/ca.crt ]] && "$LDAP_SH" status >/dev/null; }

case ${1:-} in
  serve) serve ;;
  healthy) healthy ;;
  *) echo "usage: $0 serve|healthy" >&2; exit 2 ;;
esac
