#!/usr/bin/env bash
# A compute "node" the hub cannot reach: the network namespace hpchub-n1 on a bridge of its own, as on
# clusters whose compute nodes sit on a private network. The namespace reaches the host (at the bridge
# address only: no route beyond, no forwarding, no NAT), but the host reaches nothing in it except the
# ports in HPCHUB_NETNS_ALLOW_PORTS (slurmd's, so that slurmctld can talk to a slurmd running there):
# a server in the namespace is reachable only through a tunnel the namespace opens itself.
#
# Usage (as root): netns.sh up|down|status      (start and stop are the same as up and down)
#   up      install iproute2 and nftables if missing; create the bridge hpchub-br0 with the host's
#           address PREFIX.1/24, the namespace hpchub-n1 joined to it by a veth pair (hpchub-v1 on the
#           host, eth0 inside) with the address PREFIX.11/24, and load the namespace's firewall (inbound:
#           loopback, replies to its own connections, and TCP to the allowed ports; everything else is
#           dropped); wait until the namespace reaches the host. Idempotent.
#   down    delete the namespace and the bridge; refused while processes still run in the namespace
#   status  print the addresses, the firewall and the processes inside (exit 0 when up, 3 otherwise)
# Env: HPCHUB_NETNS_PREFIX       the private /24, first three octets (default 10.251.0)
#      HPCHUB_NETNS_ALLOW_PORTS  inbound TCP ports open from the host, space-separated (default "6818")
#
# Run a program in the node with `nsenter --net=/run/netns/hpchub-n1 PROGRAM...` (not `ip netns exec`,
# which remounts /sys and hides /sys/fs/cgroup from it: slurmd 22.05 then fails to start).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TAG=netns.sh
# shellcheck source=docker/lib/service.sh
source "$HERE/../lib/service.sh"
ROOT_FOR="network namespaces, links, addresses, firewall"
LOCK=/run/hpchub-netns.lock
PREFIX=${HPCHUB_NETNS_PREFIX:-10.251.0}
ALLOW=${HPCHUB_NETNS_ALLOW_PORTS-6818}
BRIDGE=hpchub-br0
NS=hpchub-n1
HOST_VETH=hpchub-v1
HOST_ADDR=$PREFIX.1
NODE_ADDR=$PREFIX.11
NSPATH=/run/netns/$NS
TABLE=hpchub    # nftables table (family inet) in the namespace

in_ns() { nsenter --net="$NSPATH" "$@"; }
ns_exists() { [[ -e $NSPATH ]] && ip netns list | grep -qw "^$NS"; }

check_settings() {
  [[ $PREFIX =~ ^(10|172|192)\.[0-9]{1,3}\.[0-9]{1,3}$ ]] \
    || die "HPCHUB_NETNS_PREFIX must be the first three octets of a private /24 (e.g. 10.251.0), not '$PREFIX'"
  local p
  for p in $ALLOW; do
    if ! [[ $p =~ ^[0-9]+$ ]] || ((p < 1 || p > 65535)); then
      die "HPCHUB_NETNS_ALLOW_PORTS: '$p' is not a TCP port"
    fi
  done
}

# reaches_host: a TCP connect from the namespace to the host's bridge address gets an answer (an accept or
# a refusal: both prove the path; a drop would time out)
reaches_host() {
  local out
  out=$(in_ns timeout 2 bash -c "exec 3<>/dev/tcp/$HOST_ADDR/9" 2>&1) && return 0
  grep -q 'Connection refused' <<<"$out"
}

firewall() {
  local allow=""
  [[ -n ${ALLOW// /} ]] && allow="    tcp dport { ${ALLOW// /, } } accept"
  # declare, delete and define in one transaction: an existing table is replaced, never merged
  in_ns nft -f - <<EOF
table inet $TABLE
delete table inet $TABLE
table inet $TABLE {
  chain input {
    type filter hook input priority 0; policy drop;
    iif lo accept
    ct state established,related accept
$allow
  }
}
EOF
}

up() {
  check_settings
  apt_install iproute2 nftables util-linux
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    log "creating the bridge $BRIDGE ($HOST_ADDR/24)"
    ip link add "$BRIDGE" type bridge
  fi
  ip addr replace "$HOST_ADDR/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  if ! ns_exists; then
    log "creating the namespace $NS ($NODE_ADDR)"
    ip netns add "$NS"
  fi
  if ! ip link show "$HOST_VETH" >/dev/null 2>&1; then
    ip link add "$HOST_VETH" type veth peer name eth0 netns "$NS"
  fi
  ip link set "$HOST_VETH" master "$BRIDGE" up
  ip -n "$NS" link set lo up
  ip -n "$NS" addr replace "$NODE_ADDR/24" dev eth0
  ip -n "$NS" link set eth0 up
  firewall
  wait_until 10 reaches_host || die "$NS cannot reach the host at $HOST_ADDR within 10 s"
  echo "netns node ready in $(elapsed): $NS at $NODE_ADDR (inbound TCP open: ${ALLOW:-none}), host at $HOST_ADDR" \
       "on $BRIDGE; run programs there with: nsenter --net=$NSPATH PROGRAM..."
}

down() {
  local pids
  if ns_exists; then
    pids=$(ip netns pids "$NS" | tr '\n' ' ')
    [[ -z ${pids// /} ]] || die "processes still run in $NS (pids $pids): stop them first"
    log "deleting the namespace $NS"
    ip netns del "$NS"
  fi
  # the veth pair went with the namespace
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    log "deleting the bridge $BRIDGE"
    ip link del "$BRIDGE"
  fi
  echo "netns node down"
}

status() {
  local ok=1
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    echo "bridge $BRIDGE: $(ip -br addr show "$BRIDGE" | awk '{print $2, $3}')"
  else
    echo "bridge $BRIDGE: missing"; ok=0
  fi
  if ns_exists; then
    echo "namespace $NS: $(ip -n "$NS" -br addr show eth0 2>/dev/null | awk '{print $2, $3}' || echo 'no eth0')"
    if in_ns nft list table inet "$TABLE" >/dev/null 2>&1; then
      echo "firewall: inbound TCP open from the host: ${ALLOW:-none}"
    else
      echo "firewall: missing"; ok=0
    fi
    echo "processes inside: $(ip netns pids "$NS" | tr '\n' ' ')"
  else
    echo "namespace $NS: missing"; ok=0
  fi
  ((ok)) || return 3
}

start() { up; }
stop() { down; }

case ${1:-} in
  up) set -- start ;;
  down) set -- stop ;;
  start|stop|status) ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
service_main "$@"
