#!/usr/bin/env bash
# natlab.sh -- a NAT-traversal lab made of Linux network namespaces.
#
# The project's copy of the verified recipe: tests/natlab/lab.py drives it
# (always `down` before `up`, one NATLAB_PREFIX per test session) so the
# NAT-traversal tests build real kernel NAT routers with nftables.
#
#   natlab.sh up [MODE_A[-MODE_B]]   build the lab (default: cone)
#   natlab.sh down                   kill processes inside the lab namespaces, delete them
#   natlab.sh status                 show namespaces, addresses, NAT rules, conntrack
#
# MODE is one of
#   cone       endpoint-independent mapping (port preserving masquerade) +
#              address-and-port-dependent filtering ("port-restricted cone", what
#              a typical Linux/OpenWrt home router does)
#   restricted endpoint-independent mapping + address-dependent filtering
#              ("restricted cone": a host the LAN host sent to may answer from any port)
#   fullcone   endpoint-independent mapping + endpoint-independent filtering
#              (any host may send to a mapped port once it exists)
#   symmetric  endpoint-dependent mapping (masquerade fully-random: a new random
#              public port for every new destination) + port-dependent filtering
# "up cone-symmetric" puts nat-a in cone mode and nat-b in symmetric mode;
# "up symmetric" puts both in symmetric mode.
#
# Topology (every address is inside 198.18.0.0/15, RFC 2544; nothing is ever
# connected to the root namespace, so no packet can leave the sandbox):
#
#   lan-a 198.19.1.2 --- 198.19.1.1 [nat-a] 198.18.0.11 ---+
#                                                            |  br0 in ns "inet"
#   lan-b 198.19.2.2 --- 198.19.2.1 [nat-b] 198.18.0.12 ---+  198.18.0.1 = rendezvous /
#                                                            |  bootstrap / relay host
#   pub   198.18.0.20 (host with a public address) ---------+
#
# Environment:
#   NATLAB_PREFIX       prefix for namespace names (default "", e.g. "t1-" for parallel labs)
#   NATLAB_UDP_TIMEOUT  conntrack UDP timeout (s) for unreplied flows on the routers (default kernel: 30)
#   NATLAB_UDP_STREAM_TIMEOUT  same for replied ("assured") flows (default kernel: 120)
#
# Needs: root, iproute2 (ip), nftables (nft). Kernel: netns, veth, bridge, nf_tables, nf_nat.
set -euo pipefail

P="${NATLAB_PREFIX:-}"
NS_INET="${P}inet"; NS_NATA="${P}nat-a"; NS_NATB="${P}nat-b"
NS_LANA="${P}lan-a"; NS_LANB="${P}lan-b"; NS_PUB="${P}pub"
ALL_NS=("$NS_LANA" "$NS_LANB" "$NS_PUB" "$NS_NATA" "$NS_NATB" "$NS_INET")

INET_IP=198.18.0.1;  INET_NET=198.18.0.0/24
NATA_WAN=198.18.0.11; NATB_WAN=198.18.0.12; PUB_IP=198.18.0.20
NATA_LAN=198.19.1.1; LANA_IP=198.19.1.2
NATB_LAN=198.19.2.1; LANB_IP=198.19.2.2

die() { echo "natlab: $*" >&2; exit 1; }
sx()  { ip netns exec "$1" sysctl -qw "$2" >/dev/null; }   # sysctl inside a namespace

preflight() {
  [ "$(id -u)" = 0 ] || die "must run as root"
  command -v ip  >/dev/null || die "iproute2 (ip) not found: apt-get install -y iproute2"
  command -v nft >/dev/null || die "nft not found: apt-get install -y nftables"
}

ns_new() {  # create a namespace with lo up, IPv6 off (no RA/DAD noise)
  ip netns add "$1"
  ip -n "$1" link set lo up
  sx "$1" net.ipv6.conf.all.disable_ipv6=1
  sx "$1" net.ipv6.conf.default.disable_ipv6=1
}

# veth pair created directly inside the two namespaces (never visible in the root ns)
veth() {  # ns1 if1 ns2 if2
  ip link add "$2" netns "$1" type veth peer name "$4" netns "$3"
}

nat_rules() {  # ns mode wan_ip lan_net
  local ns=$1 mode=$2 wan_ip=$3 lan_net=$4 masq fc_fwd="" fc_pre="" fc_map=""
  case "$mode" in
    cone|restricted|fullcone) masq="masquerade" ;;     # keeps the source port when free -> EIM
    symmetric)     masq="masquerade fully-random" ;;   # random port per conntrack -> EDM
    *) die "unknown NAT mode '$mode' (cone|restricted|fullcone|symmetric)" ;;
  esac
  if [ "$mode" = fullcone ]; then
    # Endpoint-independent filtering: remember "public port -> LAN host" for every
    # outbound UDP flow, and DNAT unsolicited inbound UDP to that port back to the host.
    # (Relies on port preservation, which holds while the LAN port is free on the router.)
    fc_map="map fcmap { type inet_service : ipv4_addr; flags dynamic,timeout; timeout 180s; }"
    # (placed before the established rule so that every outbound packet refreshes the entry)
    fc_fwd="iifname \"lan\" oifname \"wan\" meta l4proto udp update @fcmap { udp sport timeout 180s : ip saddr }"
    fc_pre="iifname \"wan\" ip daddr $wan_ip meta l4proto udp dnat ip to udp dport map @fcmap"
  elif [ "$mode" = restricted ]; then
    # Address-dependent filtering: like fullcone, but the key also holds the remote IP the
    # LAN host sent to, so only hosts it already contacted (any port) get through.
    fc_map="map fcmap { type inet_service . ipv4_addr : ipv4_addr; flags dynamic,timeout; timeout 180s; }"
    fc_fwd="iifname \"lan\" oifname \"wan\" meta l4proto udp update @fcmap { udp sport . ip daddr timeout 180s : ip saddr }"
    fc_pre="iifname \"wan\" ip daddr $wan_ip meta l4proto udp dnat ip to udp dport . ip saddr map @fcmap"
  fi
  ip netns exec "$ns" nft -f - <<EOF
table ip natlab {
  $fc_map
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    $fc_pre
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan" ip saddr $lan_net $masq
  }
  chain forward {
    type filter hook forward priority filter; policy drop;
    $fc_fwd
    ct state established,related accept
    ct state invalid drop
    iifname "lan" oifname "wan" ip daddr 198.18.0.0/15 accept
    iifname "wan" ct status dnat accept
    counter comment "forward-dropped"
  }
  chain input {
    type filter hook input priority filter; policy drop;
    iif "lo" accept
    ct state established,related accept
    iifname "lan" accept
    counter comment "input-dropped"
  }
}
EOF
}

router_sysctls() {  # ns
  sx "$1" net.ipv4.ip_forward=1
  # conntrack timeouts are per-namespace; shorten them to test keep-alives
  if [ -n "${NATLAB_UDP_TIMEOUT:-}" ]; then
    sx "$1" net.netfilter.nf_conntrack_udp_timeout="$NATLAB_UDP_TIMEOUT"
  fi
  if [ -n "${NATLAB_UDP_STREAM_TIMEOUT:-}" ]; then
    sx "$1" net.netfilter.nf_conntrack_udp_timeout_stream="$NATLAB_UDP_STREAM_TIMEOUT"
  fi
}

up() {
  local spec="${1:-cone}" mode_a mode_b
  case "$spec" in
    *-*) mode_a="${spec%%-*}"; mode_b="${spec#*-}" ;;
    *)   mode_a="$spec"; mode_b="$spec" ;;
  esac
  for m in "$mode_a" "$mode_b"; do
    case "$m" in cone|restricted|fullcone|symmetric) ;; *) die "unknown NAT mode '$m' (cone|restricted|fullcone|symmetric)";; esac
  done
  for ns in "${ALL_NS[@]}"; do
    if ip netns list | awk '{print $1}' | grep -qx -- "$ns"; then
      die "namespace $ns already exists; run '$0 down' first"
    fi
  done
  trap 'echo "natlab: up failed, cleaning up" >&2; down >/dev/null 2>&1 || true' ERR

  for ns in "${ALL_NS[@]}"; do ns_new "$ns"; done

  # "internet": a bridge in ns inet; the inet host itself is the rendezvous/bootstrap host
  ip -n "$NS_INET" link add br0 type bridge
  ip -n "$NS_INET" addr add "$INET_IP/24" dev br0
  ip -n "$NS_INET" link set br0 up
  veth "$NS_INET" p-nat-a "$NS_NATA" wan
  veth "$NS_INET" p-nat-b "$NS_NATB" wan
  veth "$NS_INET" p-pub   "$NS_PUB"  eth0
  for p in p-nat-a p-nat-b p-pub; do
    ip -n "$NS_INET" link set "$p" master br0
    ip -n "$NS_INET" link set "$p" up
  done

  # LANs
  veth "$NS_NATA" lan "$NS_LANA" eth0
  veth "$NS_NATB" lan "$NS_LANB" eth0

  ip -n "$NS_NATA" addr add "$NATA_WAN/24" dev wan; ip -n "$NS_NATA" addr add "$NATA_LAN/24" dev lan
  ip -n "$NS_NATB" addr add "$NATB_WAN/24" dev wan; ip -n "$NS_NATB" addr add "$NATB_LAN/24" dev lan
  ip -n "$NS_LANA" addr add "$LANA_IP/24" dev eth0
  ip -n "$NS_LANB" addr add "$LANB_IP/24" dev eth0
  ip -n "$NS_PUB"  addr add "$PUB_IP/24"  dev eth0
  for ns in "$NS_NATA" "$NS_NATB"; do ip -n "$ns" link set wan up; ip -n "$ns" link set lan up; done
  for ns in "$NS_LANA" "$NS_LANB" "$NS_PUB"; do ip -n "$ns" link set eth0 up; done

  # routes: LAN hosts default via their router; routers have NO default route, so a
  # packet to anything outside 198.18.0.0/24 + their LAN is unroutable and dropped.
  ip -n "$NS_LANA" route add default via "$NATA_LAN"
  ip -n "$NS_LANB" route add default via "$NATB_LAN"

  router_sysctls "$NS_NATA"; router_sysctls "$NS_NATB"
  nat_rules "$NS_NATA" "$mode_a" "$NATA_WAN" 198.19.1.0/24
  nat_rules "$NS_NATB" "$mode_b" "$NATB_WAN" 198.19.2.0/24
  trap - ERR
  echo "natlab up: nat-a=$mode_a nat-b=$mode_b (inet $INET_IP, pub $PUB_IP, lan-a $LANA_IP, lan-b $LANB_IP)"
}

down() {
  local ns pids rc=0
  for ns in "${ALL_NS[@]}"; do
    ip netns list | awk '{print $1}' | grep -qx -- "$ns" || continue
    # processes still inside the namespace would keep it alive after 'ip netns del'
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    if [ -n "$pids" ]; then
      # shellcheck disable=SC2086
      kill $pids 2>/dev/null || true
      for _ in 1 2 3 4 5 6 7 8 9 10; do
        [ -z "$(ip netns pids "$ns" 2>/dev/null || true)" ] && break
        sleep 0.1
      done
      pids=$(ip netns pids "$ns" 2>/dev/null || true)
      # shellcheck disable=SC2086
      [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
    fi
    ip netns del "$ns" || rc=1
  done
  return $rc
}

status() {
  local ns
  for ns in "${ALL_NS[@]}"; do
    ip netns list | awk '{print $1}' | grep -qx -- "$ns" || { echo "== $ns: absent"; continue; }
    echo "== $ns"
    ip -n "$ns" -br addr | grep -v '^lo '
    ip -n "$ns" route
    case "$ns" in *nat-*)
      ip netns exec "$ns" nft list ruleset
      ip netns exec "$ns" cat /proc/net/nf_conntrack 2>/dev/null | grep udp || true ;;
    esac
  done
}

cmd="${1:-}"; shift || true
case "$cmd" in
  up)     preflight; up "$@" ;;
  down)   preflight; down ;;
  status) preflight; status ;;
  *) echo "usage: $0 up [cone|restricted|fullcone|symmetric|MODE_A-MODE_B] | down | status" >&2; exit 2 ;;
esac
