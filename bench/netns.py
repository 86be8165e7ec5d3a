"""Several "hosts" on one machine: Linux network namespaces on one bridge, for the tests and
benchmarks of jobs that span hosts (issue 24).

`hosts(n)` makes n namespaces, each with `lo` and an `eth0` (one end of a veth pair whose
other end is a port of a bridge in the root namespace) on a private /24: the bridge is .1,
host i is .(i + 2). Every host reaches every other one and the root namespace's services on
the bridge's address; nothing is routed beyond the subnet. Only the network is separate: the
file system (so a folder is storage all hosts share) and the PID namespace (so /proc shows
every host's processes) are the machine's. Needs root and iproute2's `ip`.

Each run takes a free slot k by holding an flock on /run/tid-netns/slot-k.lock for its
lifetime; k names everything it makes (`tidn{k}br`, `tidn{k}v{i}`, `tidn{k}h{i}`) and its
subnet, so runs in parallel never collide. A run that dies uncleaned leaves its lock free:
the next run takes such slots in turn, kills what still runs in their namespaces and deletes
their namespaces and links. On exit, even on an error, a run does the same to its own.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

PREFIX = "tidn"
SLOTS = 64  # slot k's subnet: 10.213.k.0/24
LOCK_DIR = Path("/run/tid-netns")
NETNS_DIR = Path("/run/netns")  # where `ip netns add` mounts the namespaces
IP_TIMEOUT_S = 10.0
KILL_TIMEOUT_S = 10.0
_NAME = re.compile(rf"^{PREFIX}(\d+)(br|v|h)\d*$")  # slot, kind: bridge, veth, host


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no `ip`, or the kernel refused)."""


def ip(*args: str) -> str:
    """Run `ip ARGS`; its stdout. A failure raises with ip's own message."""
    try:
        done = subprocess.run(
            ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {exc}") from exc
    if done.returncode != 0:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Host:
    """One namespace: its name, its address on the bridge, the processes started in it."""

    name: str
    address: str
    started: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `args` inside this host (`ip netns exec`, which execs it: the Popen's pid is the
        process itself). It is killed when the run ends, with everything else in the host."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *args], **kwargs)
        self.started.append(proc)
        return proc

    def holds(self, pid: int) -> bool:
        """Whether the process `pid` lives in this host's network namespace."""
        try:
            return os.stat(f"/proc/{pid}/ns/net").st_ino == (NETNS_DIR / self.name).stat().st_ino
        except OSError:  # gone, or a zombie
            return False


@dataclass(frozen=True)
class Network:
    """A run's hosts and the names of what it made."""

    slot: int
    bridge_address: str
    hosts: list[Host]


def subnet(slot: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"10.213.{slot}.0/24")


def slot_names(slot: int, count: int) -> set[str]:
    """The bridge, root-namespace veth ends and namespaces of a slot with `count` hosts."""
    return {f"{PREFIX}{slot}br"} | {f"{PREFIX}{slot}{k}{i}" for k in "vh" for i in range(count)}


def leftovers() -> set[str]:
    """The namespaces and root-namespace links, named as this module names them, there now."""
    found = {*os.listdir(NETNS_DIR)} if NETNS_DIR.is_dir() else set()
    return {name for name in found | {*os.listdir("/sys/class/net")} if _NAME.match(name)}


def _kill_namespace(name: str, started: list[subprocess.Popen[Any]]) -> None:
    """SIGKILL everything in the namespace (torchrun's workers too, in sessions of their own)
    and wait, bounded, until nothing is left in it; reaps `started` on the way."""
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while pids := [int(pid) for pid in ip("netns", "pids", name).split()]:
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in started:
            proc.poll()
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} still run in namespace {name}")
        time.sleep(0.05)


def _remove(names: set[str], started: list[subprocess.Popen[Any]]) -> None:
    """Kill what runs in these namespaces, then delete the veths (each takes its peer along),
    the namespaces and the bridges that exist. Every step is tried; the first failure raises
    after the others."""
    for proc in started:  # by pid too: one may not have entered its namespace yet
        proc.kill()
    kind = {name: _NAME.match(name).group(2) for name in names & leftovers()}  # type: ignore[union-attr]
    namespaces = sorted(n for n, k in kind.items() if k == "h")
    steps: list[Callable[[], object]] = [partial(_kill_namespace, n, started) for n in namespaces]
    steps += [partial(ip, "link", "del", n) for n, k in sorted(kind.items()) if k == "v"]
    steps += [partial(ip, "netns", "del", n) for n in namespaces]
    steps += [partial(ip, "link", "del", n) for n, k in sorted(kind.items()) if k == "br"]
    errors = []
    for step in steps:
        try:
            step()
        except Exception as exc:
            errors.append(exc)
    for proc in started:
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=KILL_TIMEOUT_S)
    if errors:
        raise errors[0]


def _lock(slot: int) -> IO[bytes] | None:
    """The slot's lock file, locked, or None when a live run holds it."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    file = (LOCK_DIR / f"slot-{slot}.lock").open("ab")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.close()
        return None
    return file


def _by_slot() -> dict[int, set[str]]:
    by_slot: dict[int, set[str]] = {}
    for name in leftovers():
        by_slot.setdefault(int(_NAME.match(name).group(1)), set()).add(name)  # type: ignore[union-attr]
    return by_slot


def sweep() -> None:
    """Remove what dead runs left behind: the leftovers of every slot whose lock is free.
    Sweeps take turns (one lock for all, each sweep bounded), so when one returns, what a
    dead run left is gone even where a parallel sweep was the one removing it."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    with (LOCK_DIR / "sweep.lock").open("ab") as turn:
        fcntl.flock(turn, fcntl.LOCK_EX)
        for slot, names in sorted(_by_slot().items()):
            lock = _lock(slot)
            if lock is not None:
                with lock:
                    _remove(names, [])


def _claim() -> tuple[int, IO[bytes]]:
    """A free slot, locked, whose subnet no route of the root namespace overlaps and which
    holds nothing (a dead run's leftovers are the sweep's to remove)."""
    routed = []
    for line in ip("-4", "route", "show").splitlines():
        with suppress(ValueError, IndexError):
            routed.append(ipaddress.IPv4Network(line.split()[0], strict=False))
    used = _by_slot()
    for slot in range(SLOTS):
        if slot in used or any(subnet(slot).overlaps(net) for net in routed):
            continue
        lock = _lock(slot)
        if lock is not None:
            return slot, lock
    raise NetnsUnavailable(f"all {SLOTS} slots are taken or their subnets routed")


def _create(slot: int, count: int, network: Network) -> None:
    bridge = f"{PREFIX}{slot}br"
    ip("link", "add", bridge, "type", "bridge")
    ip("addr", "add", f"{network.bridge_address}/24", "dev", bridge)
    ip("link", "set", bridge, "up")
    addresses = list(subnet(slot).hosts())[1:]
    for i in range(count):
        name, veth = f"{PREFIX}{slot}h{i}", f"{PREFIX}{slot}v{i}"
        ip("netns", "add", name)
        network.hosts.append(Host(name, str(addresses[i])))
        ip("-n", name, "link", "set", "lo", "up")
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
        ip("link", "set", veth, "master", bridge)
        ip("link", "set", veth, "up")
        ip("-n", name, "addr", "add", f"{addresses[i]}/24", "dev", "eth0")
        ip("-n", name, "link", "set", "eth0", "up")


@contextmanager
def hosts(count: int) -> Iterator[Network]:
    """`count` hosts for the `with` block; after it, even on an error, nothing started in them
    runs and nothing made for them is left (NetnsUnavailable where namespaces cannot be
    made)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        raise NetnsUnavailable("network namespaces need root and iproute2's `ip`")
    if not 1 <= count < 250:
        raise ValueError(f"1 to 249 hosts, not {count}")
    sweep()
    slot, lock = _claim()
    network = Network(slot, str(next(subnet(slot).hosts())), [])
    with lock:
        try:
            _create(slot, count, network)
            yield network
        finally:
            _remove(slot_names(slot, count), [p for h in network.hosts for p in h.started])
