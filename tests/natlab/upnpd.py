"""miniupnpd (the Debian package `miniupnpd-nftables`) on a lab router: UPnP-IGD, NAT-PMP and PCP.

miniupnpd refuses to forward ports when its external interface has a reserved
address (every lab address is in 198.18.0.0/15, RFC 2544) unless told the
public address another way. `ext_ip=` with a reserved address is a start-up
error in 2.3.1 (the `ext_allow_private_ipv4` option arrived in
2.3.9), but `ext_perform_stun=yes` takes the address a STUN server saw and
enables forwarding whenever its four binding requests come back unfiltered
and unchanged, without checking that address against the reserved ranges. Our
DHT nodes answer STUN, so the lab's bootstrap node on inet is the STUN host.

The nftables backend (2.3.1) adds its rules to `table inet filter`, chains
`miniupnpd` (forward) and `prerouting_miniupnpd` / `postrouting_miniupnpd`
(nat); `start_miniupnpd` creates them first. The lab's own `ip natlab` forward chain
already accepts DNATed flows (`ct status dnat`), so nothing else changes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.natlab.lab import INET_IP, LabProcess, NatLab

CHAINS = """
table inet filter {
  chain forward { type filter hook forward priority filter; policy accept; jump miniupnpd; }
  chain miniupnpd { }
  chain prerouting { type nat hook prerouting priority dstnat; policy accept; jump prerouting_miniupnpd; }
  chain postrouting { type nat hook postrouting priority srcnat; policy accept; jump postrouting_miniupnpd; }
  chain prerouting_miniupnpd { }
  chain postrouting_miniupnpd { }
}
"""
LAN_NETS = {"nat-a": "198.19.1.0/24", "nat-b": "198.19.2.0/24"}


def skip_unless_installed() -> None:
    if shutil.which("miniupnpd") is None:
        pytest.skip("miniupnpd is not installed: apt-get install -y miniupnpd-nftables")


def _write_config(tmp: Path, router: str, stun_port: int) -> Path:
    conf = tmp / f"miniupnpd-{router}.conf"
    conf.write_text(
        "ext_ifname=wan\n"
        "listening_ip=lan\n"
        "http_port=0\n"
        "enable_natpmp=yes\n"
        "enable_upnp=yes\n"
        "ext_perform_stun=yes\n"
        f"ext_stun_host={INET_IP}\n"
        f"ext_stun_port={stun_port}\n"
        "secure_mode=yes\n"
        "system_uptime=yes\n"
        "min_lifetime=60\n"
        "uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b\n"
        f"allow 1024-65535 {LAN_NETS[router]} 1024-65535\n"
        "deny 0-65535 0.0.0.0/0 0-65535\n"
    )
    return conf


async def start_miniupnpd(lab: NatLab, router: str, tmp: Path, stun_port: int = 4000) -> LabProcess:
    """Run miniupnpd on `router` ("nat-a" / "nat-b"); STUN (DHT) must answer on inet:stun_port.
    Returns once it has enabled port forwarding (its log says so)."""
    skip_unless_installed()
    rules = tmp / f"miniupnpd-{router}.nft"
    rules.write_text(CHAINS)
    lab.run(router, ["nft", "-f", str(rules)])
    conf = _write_config(tmp, router, stun_port)
    proc = await lab.spawn(router, ["miniupnpd", "-d", "-f", str(conf), "-P", str(tmp / f"miniupnpd-{router}.pid")])
    await proc.wait_for(r"Port forwarding is now enabled", 30)
    await proc.wait_for(r"Listening for NAT-PMP/PCP traffic", 30)
    return proc


def forwarded(lab: NatLab, router: str) -> str:
    """The router's current port forwards (miniupnpd's DNAT chain), as nft prints them."""
    return lab.run(router, ["nft", "list", "chain", "inet", "filter", "prerouting_miniupnpd"]).stdout
