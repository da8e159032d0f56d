#!/usr/bin/env bash
# Installs everything the tests need, starts the test services and runs the whole test suite.
# Run as root on Debian 12. Arguments go to pytest. CI (.ci/run) runs exactly this with CI=true.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
"$repo/scripts/setup-test-env.sh"
cd "$repo/tests"
# /opt/hpchub holds the installed project (jobs run as test users and cannot read a checkout under /root);
# running pytest from tests/ keeps the checkout itself off sys.path, so the installed copy is what is tested
exec /opt/hpchub/bin/pytest -c "$repo/pyproject.toml" --rootdir "$repo" -p no:cacheprovider "$@" "$repo/tests"
