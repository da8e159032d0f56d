#!/usr/bin/env bash
# Runs hpchub on its embedded default: the local batch system (jobs are local processes going through
# the same job template and submit/query/cancel lifecycle as on a cluster), on 127.0.0.1:8000, with a
# demo user whose one-time password is printed. Arguments go to `hpchub` (e.g. --port 8001).
#
# As an ordinary user: installs hpchub into ~/.local/share/hpchub/venv and the proxy into
#   ~/.local/share/hpchub/node (needs python3-venv and node/npm), then runs it as you.
# As root: installs what is missing (apt, npm -g, /opt/hpchub), then runs the hub as the unprivileged
#   user hpchub-demo (created if missing): single-user servers refuse to run as root.
set -euo pipefail
umask 022
export DEBIAN_FRONTEND=noninteractive

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=/usr/bin/python3
[[ -x $PY ]] || PY=$(command -v python3)
EXTRAS=""
CHP_SPEC=configurable-http-proxy@5.3.0
CHP_SPEC_NODE18=configurable-http-proxy@4.6.3
DEMO_USER=hpchub-demo

if ((EUID == 0)); then
  VENV=${HPCHUB_VENV:-/opt/hpchub}
else
  HOME_DATA=${XDG_DATA_HOME:-$HOME/.local/share}/hpchub
  VENV=${HPCHUB_VENV:-$HOME_DATA/venv}
fi
STAMP=$VENV/.hpchub-pyproject.sha256
# shellcheck source=scripts/install-lib.sh
source "$REPO/scripts/install-lib.sh"

# as an ordinary user: the proxy goes into a private npm prefix
install_proxy_for_user() {
  export PATH="$HOME_DATA/node/bin:$PATH"
  command -v configurable-http-proxy >/dev/null && return 0
  command -v npm >/dev/null || die "npm is missing: install nodejs and npm (as root: apt-get install nodejs npm)"
  log "npm install configurable-http-proxy into $HOME_DATA/node"
  timeout 900 npm install -g --prefix "$HOME_DATA/node" --no-fund --no-audit --loglevel=error "$CHP_SPEC" >&2 \
    || die "npm install $CHP_SPEC failed"
}

if ((EUID == 0)); then
  apt_demo_packages() { install_apt python3-venv; }
  step "apt packages" apt_demo_packages
  step "configurable-http-proxy" install_proxy
  step "venv $VENV" make_venv
  step "install hpchub" install_project
  id "$DEMO_USER" >/dev/null 2>&1 \
    || useradd --system --create-home --home-dir "/var/lib/$DEMO_USER" --shell /usr/sbin/nologin "$DEMO_USER"
  data=/var/lib/$DEMO_USER/data
  cd "/var/lib/$DEMO_USER"
  exec runuser -u "$DEMO_USER" -- env -i HOME="/var/lib/$DEMO_USER" LANG=C.UTF-8 HPCHUB_DATA_DIR="$data" \
    PATH="$VENV/bin:/usr/local/bin:/usr/bin:/bin" "$VENV/bin/hpchub" "$@"
else
  "$PY" -c 'import venv, ensurepip' 2>/dev/null \
    || die "$PY cannot create virtual environments: install python3-venv (as root: apt-get install python3-venv)"
  step "configurable-http-proxy" install_proxy_for_user
  step "venv $VENV" make_venv
  step "install hpchub" install_project
  mkdir -p "$HOME_DATA"
  cd "$HOME_DATA"
  exec "$VENV/bin/hpchub" "$@"
fi
