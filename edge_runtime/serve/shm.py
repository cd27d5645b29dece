"""System shared memory for apps on the same device (the Open Inference Protocol extension as Triton has it).

An app creates a POSIX shared-memory object (``/dev/shm/<key>``; ``tritonclient.utils.shared_memory`` does it),
registers it under a name with ``SystemSharedMemoryRegister``, and then names the region, offset and byte size in
an input's or requested output's parameters (``shared_memory_region``, ``shared_memory_offset``,
``shared_memory_byte_size``) instead of sending bytes: a 3×224×224 camera frame never goes through protobuf. Inputs
are read in place (no copy); outputs are written into the region.

Checked: the key is one POSIX shm name (``/name``, nothing that leads out of ``/dev/shm``), the object exists and
is large enough for ``offset + byte_size``, names are unique, every access stays inside the registered window, and
a tensor's byte size matches its shape. Regions are released by ``SystemSharedMemoryUnregister`` (all of them with
an empty name), when the server stops, at once when the app deletes or replaces the object (a region would
otherwise keep a dead object's memory, or serve stale bytes), and once the connection that registered it has been
closed for ``release_after_s`` (:meth:`SharedMemoryRegistry.sweep`, with the kernel's TCP table as the witness of
which clients are connected: :func:`connected_peers`).
"""

from __future__ import annotations

import ipaddress
import logging
import mmap
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgeloop_core.errors import AlreadyExists, InvalidInput, ModelNotFound

log = logging.getLogger(__name__)

SHM_ROOT = Path("/dev/shm")
_KEY = re.compile(r"^/?[A-Za-z0-9._-]{1,200}$")


@dataclass
class Region:
    """One registered window of a shared-memory object."""

    name: str
    key: str
    offset: int
    byte_size: int
    _map: mmap.mmap
    owner: str = ""
    """The gRPC peer that registered it (``ipv4:127.0.0.1:54321``), or empty."""
    identity: tuple[int, int] = (0, 0)
    """(device, inode) of the object when it was registered."""
    gone_since: float | None = field(default=None, compare=False)
    """When its owner's connection was first seen closed."""

    def window(self, offset: int, byte_size: int, what: str) -> memoryview:
        """The bytes at ``offset`` (within the registered window) for ``byte_size`` bytes."""
        if offset < 0 or byte_size < 0 or offset + byte_size > self.byte_size:
            raise InvalidInput(f"{what}: {byte_size} bytes at offset {offset} do not fit shared-memory region "
                               f"{self.name!r} ({self.byte_size} bytes)")
        start = self.offset + offset
        return memoryview(self._map)[start : start + byte_size]


class SharedMemoryRegistry:
    """The registered regions, by name; safe to use from the event loop and the engine thread."""

    def __init__(self, root: Path = SHM_ROOT) -> None:
        self.root = root
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    def register(self, name: str, key: str, offset: int, byte_size: int, owner: str = "") -> None:
        """Map ``byte_size`` bytes at ``offset`` of the shared-memory object ``key`` under ``name`` for ``owner``
        (the registering gRPC peer)."""
        if not name or len(name) > 128:
            raise InvalidInput("a shared-memory region needs a name of 1 to 128 characters")
        if not _KEY.match(key) or key.strip("/") in (".", ".."):
            raise InvalidInput(f"shared-memory key {key!r} is not a POSIX shared-memory name like /camera0")
        if byte_size <= 0:
            raise InvalidInput(f"shared-memory region {name!r} needs a positive byte size")
        with self._lock:
            if name in self._regions:
                raise AlreadyExists(f"shared-memory region {name!r} is already registered: unregister it first")
            path = self.root / key.lstrip("/")
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError as exc:
                raise InvalidInput(f"shared-memory object {key!r} cannot be opened ({exc.strerror}): create it "
                                   f"first (tritonclient.utils.shared_memory.create_shared_memory_region)") from exc
            try:
                stat = os.fstat(fd)
                size = stat.st_size
                if offset < 0 or offset + byte_size > size:
                    raise InvalidInput(f"shared-memory object {key!r} has {size} bytes: {byte_size} bytes at offset "
                                       f"{offset} do not fit")
                mapped = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            self._regions[name] = Region(name, key, offset, byte_size, mapped, owner, (stat.st_dev, stat.st_ino))

    def unregister(self, name: str = "") -> None:
        """Release ``name`` (every region when empty)."""
        with self._lock:
            if name and name not in self._regions:
                raise ModelNotFound(f"no shared-memory region called {name!r} is registered")
            for region_name in [name] if name else list(self._regions):
                region = self._regions.pop(region_name)
                try:
                    region._map.close()
                except BufferError:  # a request still reads it: the mapping goes with its last view
                    pass

    def sweep(self, connected: Callable[[], set[tuple[str, int]] | None], release_after_s: float,
              now: float | None = None) -> list[str]:
        """Release the regions whose object was deleted or replaced, and (``release_after_s`` > 0) those whose owner's
        connection has been closed that long; ``connected()`` gives the connected peers, or None when it cannot
        tell (then only the first rule applies). Returns the names released."""
        now = time.monotonic() if now is None else now
        with self._lock:
            regions = list(self._regions.values())
        if not regions:
            return []
        peers = connected() if release_after_s > 0 and any(r.owner for r in regions) else None
        released = []
        for region in regions:
            try:
                stat = os.stat(self.root / region.key.lstrip("/"))
                replaced = (stat.st_dev, stat.st_ino) != region.identity
            except OSError:
                replaced = True  # deleted
            if peers is not None and region.owner:
                here = peer_address(region.owner)
                if here is not None and here not in peers:
                    region.gone_since = region.gone_since or now
                else:
                    region.gone_since = None
            departed = region.gone_since is not None and now - region.gone_since >= release_after_s
            if replaced or departed:
                with self._lock:
                    if self._regions.get(region.name) is not region:
                        continue
                self.unregister(region.name)
                released.append(region.name)
                log.info("released shared-memory region %r: %s", region.name,
                         "its object was deleted or replaced" if replaced else
                         f"the client that registered it disconnected {release_after_s:.0f}s ago")
        return released

    def status(self, name: str = "") -> list[Region]:
        """The regions (or the one called ``name``)."""
        with self._lock:
            if name and name not in self._regions:
                raise ModelNotFound(f"no shared-memory region called {name!r} is registered")
            return [self._regions[name]] if name else list(self._regions.values())

    def get(self, name: str, what: str) -> Region:
        """The region called ``name``, or INVALID_ARGUMENT naming ``what`` referred to it."""
        with self._lock:
            region = self._regions.get(name)
        if region is None:
            raise InvalidInput(f"{what} names shared-memory region {name!r}, which is not registered")
        return region


def _host(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An address as both sides write it: an IPv4 client of a dual-stack server (``::ffff:a.b.c.d``) as IPv4."""
    return str(getattr(ip, "ipv4_mapped", None) or ip)


def peer_address(peer: str) -> tuple[str, int] | None:
    """(address, port) of a gRPC peer string (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``); None for other kinds
    (unix sockets)."""
    from urllib.parse import unquote

    kind, _, rest = unquote(peer).partition(":")  # some gRPC versions write ipv6:%5B::1%5D:5000
    if kind not in ("ipv4", "ipv6"):
        return None
    host, _, port = rest.rpartition(":")
    try:
        return _host(ipaddress.ip_address(host.strip("[]"))), int(port)
    except ValueError:
        return None


def connected_peers(local_port: int, proc: Path = Path("/proc/net")) -> set[tuple[str, int]] | None:
    """The (address, port) of every established TCP connection to ``local_port``, from the kernel's tables
    (``/proc/net/tcp`` and ``tcp6``); None where they cannot be read (not Linux)."""
    peers: set[tuple[str, int]] = set()
    read = False
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / table).read_text().splitlines()[1:]
        except OSError:
            continue
        read = True
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != "01":  # 01: ESTABLISHED
                continue
            local, remote = fields[1], fields[2]
            if int(local.rsplit(":", 1)[1], 16) != local_port:
                continue
            address, port = remote.rsplit(":", 1)
            raw = bytes.fromhex(address)
            if sys.byteorder == "little":  # the kernel prints each 32-bit word in host order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            peers.add((_host(ipaddress.ip_address(raw)), int(port, 16)))
    return peers if read else None
