"""System shared memory for apps on the same device (the Open Inference Protocol extension as Triton has it).

An app creates a POSIX shared-memory object (``/dev/shm/<key>``; ``tritonclient.utils.shared_memory`` does it),
registers it under a name with ``SystemSharedMemoryRegister``, and then names the region, offset and byte size in
an input's or requested output's parameters (``shared_memory_region``, ``shared_memory_offset``,
``shared_memory_byte_size``) instead of sending bytes: a 3×224×224 camera frame never goes through protobuf. Inputs
are read in place (no copy); outputs are written into the region.

Checked: the key is one POSIX shm name (``/name``, nothing that leads out of ``/dev/shm``), the object exists and
is large enough for ``offset + byte_size``, names are unique, every access stays inside the registered window, and
a tensor's byte size matches its shape. Regions are released by ``SystemSharedMemoryUnregister`` (all of them with
an empty name) and when the server stops.
"""

from __future__ import annotations

import mmap
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.errors import AlreadyExists, InvalidInput, ModelNotFound

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

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Map ``byte_size`` bytes at ``offset`` of the shared-memory object ``key`` under ``name``."""
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
                size = os.fstat(fd).st_size
                if offset < 0 or offset + byte_size > size:
                    raise InvalidInput(f"shared-memory object {key!r} has {size} bytes: {byte_size} bytes at offset "
                                       f"{offset} do not fit")
                mapped = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            self._regions[name] = Region(name, key, offset, byte_size, mapped)

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
