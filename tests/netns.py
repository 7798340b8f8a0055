"""Network namespaces as stand-in machines for tests: each host is a namespace with an address of its own, reached
from this (the root) namespace over a veth pair, as a machine on the local network would be.

Host i of a run gets the /30 subnet 4i of a block of 16 chosen by this process's id (so parallel runs do not
clash), inside 198.18.0.0/15, the range set aside for network tests (RFC 2544): .1 of the subnet is this side's
end of the pair, .2 the host's. Everything made is removed on leaving `hosts`, even after a failure.
"""
import contextlib
import dataclasses
import ipaddress
import os
import shutil
import subprocess
from collections.abc import Iterator

TEST_RANGE = ipaddress.ip_network("198.18.0.0/15")
HOSTS_PER_RUN = 16


@dataclasses.dataclass(frozen=True)
class Host:
    netns: str  # the namespace's name, for `ip netns exec`
    address: str  # the host's address, reachable from the root namespace
    link: str  # the root namespace's end of the veth pair


def unavailable() -> str | None:
    """Why tests cannot make namespaces here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    probe = f"eb-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], check=True)
    return None


@contextlib.contextmanager
def hosts(count: int) -> Iterator[list[Host]]:
    """`count` hosts, each a namespace with its loopback up and one veth link to this namespace."""
    assert count <= HOSTS_PER_RUN
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(_host(i)) for i in range(count)]


@contextlib.contextmanager
def _host(index: int) -> Iterator[Host]:
    pid = os.getpid()
    subnet = _subnet(pid, index)
    ours, theirs = (f"{subnet[n]}/{subnet.prefixlen}" for n in (1, 2))
    host = Host(netns=f"eb-{pid}-{index}", address=str(subnet[2]), link=f"eb{pid}h{index}")  # names <= 15 chars
    if _ip("-4", "route", "show", str(subnet)):
        raise RuntimeError(f"{subnet} is routed already: another run, or a real network, uses it")
    try:
        _ip("netns", "add", host.netns)
        _ip("link", "add", host.link, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        _ip("addr", "add", ours, "dev", host.link)
        _ip("link", "set", host.link, "up")
        _ip("-n", host.netns, "addr", "add", theirs, "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")
        yield host
    finally:
        # deleting a namespace removes its end of the pair only later, in the background: remove the pair now,
        # so that its address and route are gone when this returns
        subprocess.run(["ip", "link", "delete", host.link], capture_output=True)
        subprocess.run(["ip", "netns", "delete", host.netns], capture_output=True)


def _subnet(pid: int, index: int) -> ipaddress.IPv4Network:
    block = pid % (TEST_RANGE.num_addresses // (4 * HOSTS_PER_RUN))
    first = TEST_RANGE.network_address + (block * HOSTS_PER_RUN + index) * 4
    return ipaddress.ip_network(f"{first}/30")


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout
