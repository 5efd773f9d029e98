"""A test network of real hosts on one machine: network namespaces on a bridge, links shaped with tbf.

Each `Host` is a network namespace with loopback up and one veth pair: the namespace end carries the host's
address (10.77.0.N/24), the other end is a port of the network's bridge in the root namespace. Every host can
reach every other one over the bridge, and nothing else (no route out). `Network.shape(host, mbit)` puts a token
bucket (`tc qdisc replace ... root tbf rate ...`) on both ends of the host's veth, so its uploads (egress of the
namespace end) and downloads (egress of the bridge end) are each limited to the rate, as on a symmetric line.
`netem` (delay, loss) is not available on these machines; tbf's `latency` only bounds its queue.

Processes run in a host with `host.argv([...])`, which prefixes `ip netns exec NS`. `ip netns exec` execs
the command in place (no fork), so the pid `Procs` (peer/lab/harness.py) holds is the command's own: SIGTERM
reaches it directly and its process group is the one `Procs` kills. Names carry the creating process's pid and a
random part, so concurrent runs never collide, and a later run removes what a killed run (its pid gone) left behind.

    def test_x(netns, procs):  # the fixtures of tests/conftest.py
        boot = netns.add_host("boot")
        peer = netns.add_host("peer", rate_mbit=5)
        procs.start("boot", boot.argv(murmur("bootstrap", "--host-maddrs", boot.maddr(), ...)))

Outside pytest (benchmarks/exchange_speed.py): `with Network() as net: ...`; `unavailable()` says why it cannot
work here. Here rather than in tests/, so that benchmarks import it as a module of their package.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PREFIX = "murmur-"
"""Namespaces are named murmur-<tag>-<host>; the tag is the owner's pid (6 hex) and 2 random hex digits."""
_NETNS = re.compile(r"^murmur-([0-9a-f]{6})[0-9a-f]{2}-")
_LINKS = (re.compile(r"^\d+: (mb([0-9a-f]{6})[0-9a-f]{2}):"), re.compile(r"^\d+: (m([0-9a-f]{6})[0-9a-f]{2}\d+h)@"))
"""A bridge (mb<tag>) and the bridge end of a host's veth (m<tag><index>h) in `ip -o link show`."""
TBF_LATENCY = "50ms"
"""How long a packet may wait in a shaped link's queue (tbf's limit), before it is dropped."""


class NetnsError(RuntimeError):
    """A network command failed; the message has the command and its stderr."""


def _run(argv: Sequence[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


@functools.cache
def unavailable() -> str | None:
    """Why the network cannot be built here (not root, no `ip`/`tc`, namespaces, veths, bridges or tbf refused),
    or None when it can: a probe builds one namespace with a shaped veth on a bridge and removes it again."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add, tc); run as root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (install iproute2)"
    tag = secrets.token_hex(3)
    netns, bridge, veth = f"{PREFIX}probe-{tag}", f"mprobe{tag}", f"mprobe{tag}v"
    steps = (
        ("create a network namespace", ["ip", "netns", "add", netns]),
        ("create a bridge", ["ip", "link", "add", bridge, "type", "bridge"]),
        ("create a veth pair", ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth1", "netns", netns]),
        ("shape a link with tbf", ["tc", "qdisc", "add", "dev", veth, "root", *tbf(10)]),
    )
    try:
        for what, argv in steps:
            done = _run(argv, check=False)
            if done.returncode != 0:
                return f"cannot {what} ({' '.join(argv[:4])} ...): {done.stderr.strip()}"
        return None
    finally:
        for argv in (["ip", "link", "del", veth], ["ip", "link", "del", bridge], ["ip", "netns", "del", netns]):
            _run(argv, check=False)


def tbf(rate_mbit: float) -> list[str]:
    """tc's arguments for a token bucket of `rate_mbit` Mbit/s (10^6 bit/s).

    The bucket holds at least one 4 ms timer tick of traffic (HZ=250), or a few full packets on slow links,
    so the rate is reached without a burst worth mentioning next to the megabytes a test moves.
    """
    if not rate_mbit > 0:
        raise ValueError(f"rate must be positive, got {rate_mbit} Mbit/s")
    burst = max(32 * 1024, int(rate_mbit * 1e6 / 8 / 250))
    return ["tbf", "rate", f"{rate_mbit:g}mbit", "burst", str(burst), "latency", TBF_LATENCY]


@dataclass(frozen=True, slots=True)
class Host:
    """One namespace of the network, with its address and the two ends of its link."""

    name: str
    netns: str
    address: str
    ns_veth: str
    bridge_veth: str

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this host (exec'd in place: same pid, signals reach the command)."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def maddr(self, port: int = 0) -> str:
        """A libp2p multiaddr on this host's address (port 0: any free one)."""
        return f"/ip4/{self.address}/tcp/{port}"

    def endpoint(self, port: int = 0) -> str:
        return f"{self.address}:{port}"


class Network:
    """Namespaces on one bridge; `close()` (or leaving the `with`) removes all of it, processes inside included."""

    def __init__(self, subnet: str = "10.77.0") -> None:
        reason = unavailable()
        if reason is not None:
            raise NetnsError(reason)
        if not re.fullmatch(r"\d{1,3}\.\d{1,3}\.\d{1,3}", subnet):
            raise ValueError(f"subnet must be the first three octets of a /24, e.g. 10.77.0, got {subnet!r}")
        sweep_orphans()
        self.subnet = subnet
        self.tag = f"{os.getpid() & 0xFFFFFF:06x}{secrets.token_hex(1)}"
        self.bridge = f"mb{self.tag}"
        self.hosts: dict[str, Host] = {}
        self.rates: dict[str, float | None] = {}
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        try:
            _run(["ip", "link", "set", self.bridge, "up"])
            forward_within(self.bridge, True)
        except NetnsError:
            self.close()
            raise

    def add_host(self, name: str, rate_mbit: float | None = None) -> Host:
        """A new namespace on the bridge at the next address (.1, .2, ...); its link shaped when `rate_mbit`."""
        if not re.fullmatch(r"[a-z0-9]{1,16}", name) or name in self.hosts:
            raise ValueError(f"host names are new, 1-16 of [a-z0-9]: {name!r}")
        index = len(self.hosts) + 1
        if index > 250:
            raise ValueError("a /24 network holds at most 250 hosts here")
        host = Host(name=name, netns=f"{PREFIX}{self.tag}-{name}", address=f"{self.subnet}.{index}",
                    ns_veth=f"m{self.tag}{index}n", bridge_veth=f"m{self.tag}{index}h")  # fmt: skip
        self.hosts[name] = host  # before the first command, so close() removes a half-built host too
        _run(["ip", "netns", "add", host.netns])
        _run(["ip", "link", "add", host.bridge_veth, "type", "veth", "peer", "name", host.ns_veth])
        _run(["ip", "link", "set", host.ns_veth, "netns", host.netns])
        _run(["ip", "link", "set", host.bridge_veth, "master", self.bridge, "up"])
        _run(["ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", host.ns_veth])
        _run(["ip", "-n", host.netns, "link", "set", host.ns_veth, "up"])
        _run(["ip", "-n", host.netns, "link", "set", "lo", "up"])
        self.rates[name] = None
        if rate_mbit is not None:
            self.shape(host, rate_mbit)
        return host

    def shape(self, host: Host, rate_mbit: float | None) -> None:
        """Limit the host's uploads and downloads to `rate_mbit` each (None: unshaped again)."""
        for prefix, dev in ((["tc", "-n", host.netns], host.ns_veth), (["tc"], host.bridge_veth)):
            if rate_mbit is None:
                _run([*prefix, "qdisc", "del", "dev", dev, "root"], check=False)  # none there is fine
            else:
                _run([*prefix, "qdisc", "replace", "dev", dev, "root", *tbf(rate_mbit)])
        self.rates[host.name] = rate_mbit

    def exec(self, host: Host, argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside `host` to completion; raises NetnsError when it fails."""
        return _run(host.argv(argv), timeout=timeout)

    def link_bytes(self, host: Host) -> tuple[int, int]:
        """(bytes the host sent, bytes it received) on its link so far: Ethernet frames, headers included."""
        stats = Path("/sys/class/net") / host.bridge_veth / "statistics"
        # the bridge end's receive counter is what left the namespace, and the other way round
        return int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text())

    def close(self) -> None:
        """Kill what still runs in the namespaces, delete them (their veths go with them) and the bridge."""
        for host in self.hosts.values():
            _kill_inside(host.netns)
            _run(["ip", "netns", "del", host.netns], check=False)
            _run(["ip", "link", "del", host.bridge_veth], check=False)  # gone already unless the move failed
        self.hosts.clear()
        forward_within(self.bridge, False)
        _run(["ip", "link", "del", self.bridge], check=False)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def forward_within(bridge: str, allow: bool) -> None:
    """Let IPv4 traffic between the bridge's own ports through the firewall (allow), or take that rule out again.

    Where br_netfilter is loaded with bridge-nf-call-iptables=1, bridged frames go through iptables' FORWARD chain,
    and Docker's daemon sets that chain's policy to DROP: while dockerd ran, the hosts could not reach each other
    (tests/test_netns_swarm.py failed). One rule at the top of FORWARD for this bridge only; nothing where iptables
    is missing or refuses (then there is no firewall in the way either, or the probe would have said so)."""
    if shutil.which("iptables") is None:
        return
    rule = ["FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT"]
    if allow:
        _run(["iptables", "-I", *rule], check=False)
    else:
        while _run(["iptables", "-D", *rule], check=False).returncode == 0:
            pass  # a rule added twice comes out twice


def _kill_inside(netns: str) -> None:
    """SIGKILL every process in `netns` (what a test left running there), and wait until they are gone."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = _run(["ip", "netns", "pids", netns], check=False).stdout.split()
        if not pids:
            return
        for pid in map(int, pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_orphans() -> None:
    """Remove the namespaces, veths and bridges of networks whose creating process is gone (a killed test run)."""
    for line in _run(["ip", "netns", "list"], check=False).stdout.splitlines():
        name = line.split(" ", 1)[0]
        match = _NETNS.match(name)
        if match and not _alive(int(match.group(1), 16)):
            _kill_inside(name)
            _run(["ip", "netns", "del", name], check=False)
    for line in _run(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
        for pattern in _LINKS:
            match = pattern.match(line)
            if match and not _alive(int(match.group(2), 16)):
                _run(["ip", "link", "del", match.group(1)], check=False)
                if pattern is _LINKS[0]:
                    forward_within(match.group(1), False)

