# Shared by scripts/setup-test-env.sh and scripts/demo.sh: install steps, each idempotent.
# Source it after setting REPO, VENV, PY, STAMP, EXTRAS ("" or "[test]"), CHP_SPEC and CHP_SPEC_NODE18.
# shellcheck shell=bash

log() { printf '[setup %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
secs() { local ms=$(( ($(date +%s%N) - $1) / 1000000 )); printf '%d.%01d s' $((ms / 1000)) $((ms % 1000 / 100)); }

# step NAME FUNCTION: run FUNCTION and say how long it took
TIMINGS=()
step() {
  local t; t=$(date +%s%N)
  log "== $1"
  "$2"
  TIMINGS+=("$1: $(secs "$t")")
  log "== $1 done in $(secs "$t")"
}

# --- apt ----------------------------------------------------------------------------------------
# shellcheck source=docker/lib/apt.sh
source "$REPO/docker/lib/apt.sh"
TMPDIRS=()
cleanup() {
  remove_policy
  ((${#TMPDIRS[@]} == 0)) || rm -rf "${TMPDIRS[@]}"
}
trap cleanup EXIT
trap 'exit 130' INT TERM   # so that the EXIT trap runs

# install_apt PKG...: the given packages, plus nodejs and npm where node (or, for a missing proxy, npm) is missing
install_apt() {
  local pkgs=("$@")
  command -v node >/dev/null || pkgs+=(nodejs npm)
  if command -v node >/dev/null && ! command -v npm >/dev/null && ! command -v configurable-http-proxy >/dev/null; then
    pkgs+=(npm)
  fi
  if [[ -z $(apt_missing "${pkgs[@]}") ]]; then log "apt packages present"; return 0; fi
  apt_install "${pkgs[@]}"
}

# --- npm ----------------------------------------------------------------------------------------
install_proxy() {
  if command -v configurable-http-proxy >/dev/null; then
    log "configurable-http-proxy present: $(command -v configurable-http-proxy)"
    return 0
  fi
  local spec=$CHP_SPEC major
  major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null) || die "node does not run"
  if ((major < 20)); then
    # Debian 12's own nodejs is 18; configurable-http-proxy 5.x wants node >= 20 (engineStrict)
    spec=$CHP_SPEC_NODE18
    log "node $(node --version) is older than 20, which $CHP_SPEC needs: installing $spec instead"
  fi
  log "npm install -g $spec"
  timeout 900 npm install -g --no-fund --no-audit --loglevel=error "$spec" >&2 \
    || die "npm install -g $spec failed"
  command -v configurable-http-proxy >/dev/null || die "configurable-http-proxy not on PATH after npm install -g"
}

# --- Python -------------------------------------------------------------------------------------
PIP_OPTS=(-q --disable-pip-version-check --no-input)

make_venv() {
  [[ -x $PY ]] || die "$PY missing (package python3)"
  if [[ -e $VENV ]]; then
    if [[ ! -f $VENV/pyvenv.cfg ]]; then die "$VENV exists but is not a virtual environment: move it away"; fi
    # must be built from $PY (Debian's python: jobs cannot read one under /root) and still work
    if grep -qx "home = $(dirname "$PY")" "$VENV/pyvenv.cfg" && "$VENV/bin/python" -c 'import pip' 2>/dev/null; then
      log "venv $VENV present ($("$VENV/bin/python" --version))"
      return 0
    fi
    log "venv $VENV is broken or not built from $PY: recreating it"
    rm -rf "$VENV"
  fi
  log "creating venv $VENV from $PY ($("$PY" --version))"
  "$PY" -m venv "$VENV"
  timeout 600 "$VENV/bin/pip" install "${PIP_OPTS[@]}" --upgrade pip || die "pip install --upgrade pip failed"
}

# stage_source DIR: copy the checkout without VCS data and build output. Built from a copy, setuptools
# leaves no build/ or *.egg-info in the checkout, and a stale build/lib cannot bring back deleted modules.
stage_source() {
  tar -C "$REPO" -cf - --exclude=./.git --exclude=./build --exclude=./dist --exclude='*.egg-info' \
      --exclude=__pycache__ --exclude=.pytest_cache --exclude=node_modules --exclude=./.venv --exclude=./venv . \
    | tar -C "$1" -xf -
}

install_project() {
  [[ -f $REPO/pyproject.toml ]] || die "no pyproject.toml in $REPO"
  local src sum
  src=$(mktemp -d /tmp/hpchub-src.XXXXXX); TMPDIRS+=("$src")
  stage_source "$src"
  sum=$(cat "$REPO/pyproject.toml" "$REPO/scripts/constraints.txt" <(echo "extras=$EXTRAS") | sha256sum | cut -d' ' -f1)
  if [[ -s $STAMP && $(<"$STAMP") == "$sum" ]]; then
    # dependencies unchanged since the last full install: only replace the project itself
    log "pip install --force-reinstall --no-deps $REPO"
    timeout 1800 "$VENV/bin/pip" install "${PIP_OPTS[@]}" --force-reinstall --no-deps "$src" \
      || die "pip install of $REPO failed"
  else
    log "pip install ${REPO}${EXTRAS} (with dependencies)"
    rm -f "$STAMP"
    # (current pip, as make_venv installs it, reinstalls a local directory even at the same version)
    timeout 1800 "$VENV/bin/pip" install "${PIP_OPTS[@]}" -c "$REPO/scripts/constraints.txt" "${src}${EXTRAS}" || die "pip install of ${REPO}${EXTRAS} failed"
    echo "$sum" >"$STAMP"
  fi
  chmod -R a+rX "$VENV"
}

