"""Distributed plumbing read from torchrun's environment; single-process values otherwise."""

from __future__ import annotations

import datetime
import fcntl
import logging
import os
import signal
import socket
import struct
import sys
from contextlib import suppress
from typing import Any

import torch
import torch.distributed as dist

from tid_core.launch import route_source, set_parent_death_signal

log = logging.getLogger("tid_core.dist")
SIOCGIFADDR = 0x8915  # linux/sockios.h: an interface's IPv4 address


def init_distributed(device: torch.device) -> None:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) when WORLD_SIZE > 1.

    Across nodes, gloo is bound to the interface that reaches MASTER_ADDR unless
    GLOO_SOCKET_IFNAME names one: by default gloo binds the address the host name resolves to,
    which is often a loopback address (127.0.1.1 in Debian's /etc/hosts) that the other nodes
    cannot reach, or one not even in this host's network namespace (gloo then falls back to
    127.0.0.1).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "gloo" and spans_nodes() and "GLOO_SOCKET_IFNAME" not in os.environ:
            interface = route_interface(os.environ["MASTER_ADDR"])
            if interface is None:
                log.warning("no IPv4 interface reaches %s", os.environ["MASTER_ADDR"])
            else:
                log.info("gloo uses %s, the interface to the master node", interface)
                os.environ["GLOO_SOCKET_IFNAME"] = interface
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))


def spans_nodes() -> bool:
    """Whether torchrun's world is on more than one node (host)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def route_interface(address: str) -> str | None:
    """The interface this host sends from to `address` (IPv4): the one holding the source
    address the kernel picks for it. None without an IPv4 route or such an interface."""
    source = route_source(address)
    if source is None:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # for the ioctl
        for _, name in socket.if_nameindex():
            with suppress(OSError):  # no IPv4 address
                request = struct.pack("256s", name.encode())
                if socket.inet_ntoa(fcntl.ioctl(probe, SIOCGIFADDR, request)[20:24]) == source:
                    return name
    return None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return get_rank() == 0


def pick_device(choice: str) -> torch.device:
    """This rank's device for `resources.device` ("auto", "cpu" or "cuda"): under torchrun,
    the GPU of its local rank, made the current one."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError('resources.device is "cuda" but no CUDA device is available')
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank())
    return torch.device("cuda", local_rank())


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a copy); identity in a single process."""
    out = values.detach().clone()
    if is_distributed():
        dist.all_reduce(out)
        out /= get_world_size()
    return out


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    """Every rank's object, on every rank, in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj: Any) -> list[Any]:
    """Every rank's object on rank 0 (an empty list elsewhere)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size() if is_main_process() else []
    dist.gather_object(obj, out if is_main_process() else None, dst=0)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def die_with_launcher() -> None:
    """Under torchrun, exit when the launcher dies without stopping us (SIGKILL, OOM).

    torchrun starts each worker in a session of its own, so killing the launcher's process
    group does not reach the workers: without this they would train on as orphans beside the
    job's next attempt. A launcher that is merely stopped forwards SIGTERM itself first.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or sys.platform != "linux":
        return
    parent = os.getppid()
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:  # it died before the call took effect
        os._exit(1)
