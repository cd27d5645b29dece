"""The one way edgeloop writes a file: a temporary file beside the target, fsync, rename, fsync of the folder; a
full disk becomes :class:`~edgeloop_core.errors.CacheFull`. Every writer (the device's cache, the store's downloads,
ONNX Runtime and TensorRT builds, Triton's model folders) goes through :func:`atomic_output`."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgeloop_core.errors import CacheFull


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """The one way files are written: yields a temporary path in ``path``'s folder for the writer (our code, ONNX
    Runtime, TensorRT) to fill; when the block succeeds the file is fsync'ed and renamed over ``path`` (then the
    folder is fsync'ed), otherwise it is removed. A full disk becomes :class:`CacheFull`; ``path`` is either the
    old file or the complete new one, never half of one (a kill leaves a ``.tmp`` that start-up sweeps)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with no_space_is_cache_full(path):
            yield tmp
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        place(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_output`."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def place(tmp: Path, path: Path) -> None:
    """Rename a complete, fsync'ed ``tmp`` over ``path`` and make the rename durable (fsync of the folder)."""
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def no_space_is_cache_full(where: Path) -> Iterator[None]:
    """Turn ``ENOSPC``/``EDQUOT`` into :class:`CacheFull` (one line that says what to do); other errors pass."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CacheFull(f"no space left on the device for {where}: free space under the cache folder") from exc
        raise

