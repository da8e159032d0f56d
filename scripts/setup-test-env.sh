#!/usr/bin/env bash
# Install everything the hpchub test suite needs on a fresh Debian 12 machine, then start the test
# services. Run as root; idempotent (a re-run reinstalls the current checkout and changes nothing else).
#
#   apt:  python3-venv python3-dev sudo curl procps (nodejs and npm only where missing); chromium and
#         fonts-liberation for tests/test_browser.py (Playwright drives Debian's chromium: Playwright's
#         own browser download is never used); nginx (tests/test_deploy.py runs a private instance of the
#         example site; the package's own service is not started) and systemd (systemd-analyze verify)
#   npm:  configurable-http-proxy@5.3.0, globally, unless one is on PATH (4.6.3 where node < 20)
#   venv: /opt/hpchub from Debian's /usr/bin/python3, world-readable: Slurm jobs run as ordinary
#         users, who can read neither the pyenv python under /root nor a checkout under /root. So the
#         checkout is installed into it as a copy (not editable), with its `test` extra.
#   then: docker/slurm-cluster/netns.sh up (a compute node the hub cannot reach),
#         docker/slurm-cluster/cluster.sh start, docker/sge-cluster/cluster.sh start,
#         docker/ldap/ldap.sh start, docker/sshd/sshd.sh start, docker/postgres/postgres.sh start
#
# Env: HPCHUB_VENV (default /opt/hpchub)
set -euo pipefail
umask 022
export DEBIAN_FRONTEND=noninteractive

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${HPCHUB_VENV:-/opt/hpchub}
CHP_SPEC=configurable-http-proxy@5.3.0
CHP_SPEC_NODE18=configurable-http-proxy@4.6.3   # for node < 20 (Debian 12's own nodejs is 18)
PY=/usr/bin/python3
STAMP=$VENV/.hpchub-pyproject.sha256   # dependencies of the last full install
T0=$(date +%s%N)
EXTRAS="[test]"
# shellcheck source=scripts/install-lib.sh
source "$REPO/scripts/install-lib.sh"

((EUID == 0)) || { echo "setup-test-env.sh must run as root (apt, npm -g, /opt, test users, daemons)" >&2; exit 1; }

start_netns_node() {
  "$REPO/docker/slurm-cluster/netns.sh" up
}

start_cluster() {
  "$REPO/docker/slurm-cluster/cluster.sh" start
}

start_sge() {
  "$REPO/docker/sge-cluster/cluster.sh" start
}

start_ldap() {
  "$REPO/docker/ldap/ldap.sh" start
}

start_sshd() {
  "$REPO/docker/sshd/sshd.sh" start
}

start_postgres() {
  "$REPO/docker/postgres/postgres.sh" start >/dev/null  # prints the ledger URL the tests use
}

# The environment must work for the users whose jobs use it (run from / so that the checkout in the
# working directory cannot stand in for the installed copy).
check_venv_as_user() {
  local where
  where=$(cd / && sudo -n -u alice -- "$VENV/bin/python" -c 'import hpchub, os; print(os.path.dirname(hpchub.__file__))') \
    || die "alice cannot import hpchub from $VENV"
  [[ $where == "$VENV"/* ]] || die "alice imports hpchub from $where, not from $VENV"
  log "alice imports hpchub from $where"
}

apt_test_packages() { install_apt python3-venv python3-dev sudo curl procps chromium fonts-liberation nginx systemd; }

step "apt packages" apt_test_packages
step "configurable-http-proxy" install_proxy
step "venv $VENV" make_venv
step "install $REPO" install_project
step "netns node" start_netns_node
step "Slurm cluster" start_cluster
step "SGE cluster" start_sge
step "LDAP directory" start_ldap
step "test sshd" start_sshd
step "PostgreSQL" start_postgres
step "check as alice" check_venv_as_user

timings=$(printf '%s; ' "${TIMINGS[@]}")
log "timings: ${timings%; }"
echo "hpchub test environment ready in $(secs "$T0"): venv $VENV, $(configurable-http-proxy --version 2>/dev/null | sed 's/^/configurable-http-proxy /'), Slurm up"
