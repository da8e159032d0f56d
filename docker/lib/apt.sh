# Installing Debian packages, shared by the service scripts (through service.sh beside it) and
# scripts/install-lib.sh (setup-test-env.sh, demo.sh). Source it; the caller defines `log MESSAGE` and
# `die MESSAGE`, and its EXIT trap must call remove_policy, so that a policy-rc.d this library wrote does
# not outlive an interrupted install.
# shellcheck shell=bash

POLICY=/usr/sbin/policy-rc.d
POLICY_OURS=0
remove_policy() { if ((POLICY_OURS)); then rm -f "$POLICY"; POLICY_OURS=0; fi; }

pkg_installed() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == 'install ok installed' ]]; }

# apt_missing PKG...: those not installed, one a line
apt_missing() { local p; for p in "$@"; do pkg_installed "$p" || echo "$p"; done; }

# apt_install PKG...: install the missing ones; `apt-get update` only when a package has no
# candidate or the install fails; maintainer scripts may not start daemons (policy-rc.d).
apt_install() {
  local missing=() p updated=0
  mapfile -t missing < <(apt_missing "$@")
  ((${#missing[@]})) || return 0
  log "apt-get install ${missing[*]}"
  if [[ ! -e $POLICY ]]; then
    printf '#!/bin/sh\n# hpchub %s: no daemon starts from maintainer scripts\nexit 101\n' "${0##*/}" >"$POLICY"
    chmod 755 "$POLICY"
    POLICY_OURS=1
  fi
  local apt=(apt-get -y -q -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef
             -o Dpkg::Options::=--force-confold)
  for p in "${missing[@]}"; do
    if ! apt-cache policy "$p" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
      timeout 600 "${apt[@]}" update >&2 || die "apt-get update failed"
      updated=1
      break
    fi
  done
  if ! timeout 1200 "${apt[@]}" install --no-install-recommends "${missing[@]}" >&2; then
    ((updated == 0)) || die "apt-get install ${missing[*]} failed"
    log "apt-get install failed: updating the package lists and retrying"
    timeout 600 "${apt[@]}" update >&2 || die "apt-get update failed"
    timeout 1200 "${apt[@]}" install --no-install-recommends "${missing[@]}" >&2 \
      || die "apt-get install ${missing[*]} failed"
  fi
  remove_policy
}
