#!/usr/bin/env bash
# The baseline of the benchmarks (bench/): JupyterHub with upstream batchspawner from PyPI, in its own
# virtual environment, because upstream's package has the same import name (`batchspawner`) as hpchub's.
# Built from Debian's /usr/bin/python3 in a world-readable place (batch jobs run its programs as the job's
# user), with the versions of bench/requirements-baseline.txt and scripts/constraints.txt. Idempotent.
#
# Usage (as root): scripts/install-bench-baseline.sh [VENV]   (default /opt/hpchub-baseline)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${1:-/opt/hpchub-baseline}
REQS=$REPO/bench/requirements-baseline.txt
STAMP=$VENV/.hpchub-bench-requirements

log() { printf '[install-bench-baseline] %s\n' "$*" >&2; }

((EUID == 0)) || { log "run as root: it writes $VENV"; exit 1; }
if [[ -s $STAMP ]] && cat "$REQS" "$REPO/scripts/constraints.txt" | cmp -s - "$STAMP"; then
  log "$VENV is up to date"
  exit 0
fi
[[ -x $VENV/bin/python ]] || { log "creating $VENV from /usr/bin/python3"; /usr/bin/python3 -m venv "$VENV"; }
log "installing $(grep -v '^#' "$REQS" | paste -sd ' ') into $VENV"
timeout 900 "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQS" -c "$REPO/scripts/constraints.txt" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
chmod -R a+rX "$VENV"
cat "$REQS" "$REPO/scripts/constraints.txt" >"$STAMP"
log "done: $("$VENV/bin/python" -c 'import importlib.metadata as m; print(*(f"{p} {m.version(p)}" for p in ("jupyterhub", "batchspawner", "matplotlib")), sep=", ")')"
