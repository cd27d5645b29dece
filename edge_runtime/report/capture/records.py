"""A captured item as data: its Arrow row (one column per field, tensors as ``list<struct{name, dtype, shape,
data}>``), the one-item file the spool keeps, and the Parquet shard that goes home (columns:
:data:`edgeloop_core.contract.captures.CAPTURE_COLUMNS`, documented in docs/capture.md)."""

from __future__ import annotations

import secrets
import struct
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from edgeloop_core.contract.captures import CAPTURE_COLUMNS, CAPTURE_OPTIONAL_COLUMNS
from edgeloop_core.files import atomic_output

TENSOR = pa.struct([("name", pa.string()), ("dtype", pa.string()), ("shape", pa.list_(pa.int64())),
                    ("data", pa.binary())])
TIME = pa.timestamp("us", tz="UTC")
SCHEMA = pa.schema([
    ("capture_id", pa.string()), ("time", TIME), ("device_id", pa.string()), ("model", pa.string()),
    ("version", pa.string()), ("variant", pa.string()), ("target_key", pa.string()), ("request_id", pa.string()),
    ("policy", pa.string()), ("score", pa.float64()), ("inputs", pa.list_(TENSOR)), ("outputs", pa.list_(TENSOR)),
    ("payload", pa.binary()), ("payload_type", pa.string()), ("label", pa.string()), ("label_source", pa.string()),
    ("label_time", TIME), ("group", pa.string()),
])
assert tuple(SCHEMA.names) == CAPTURE_COLUMNS


def new_capture_id(now_ns: int | None = None) -> str:
    """A capture id that sorts by capture time: 16 hex digits of Unix ns, a dash, 12 random hex digits."""
    return f"{now_ns or time.time_ns():016x}-{secrets.token_hex(6)}"


_DTYPE_NAMES: dict[np.dtype, str] = {}
"""numpy dtype → its name (``dtype.name`` costs microseconds a call; capture asks for every tensor)."""


def tensor_record(name: str, array: np.ndarray) -> dict[str, Any]:
    """One tensor as a row entry: numpy dtype name and C-order little-endian bytes (OIP BYTES: ``bytes``, each
    element length-prefixed as in the protocol)."""
    dtype = array.dtype
    if dtype.kind in "OSU":
        flat = [e if isinstance(e, bytes) else str(e).encode() for e in array.reshape(-1)]
        data = b"".join(struct.pack("<I", len(e)) + e for e in flat)
        return {"name": name, "dtype": "bytes", "shape": list(array.shape), "data": data}
    if dtype.byteorder == ">" or (dtype.byteorder == "=" and sys.byteorder == "big"):
        array = array.astype(dtype.newbyteorder("<"))
    type_name = _DTYPE_NAMES.get(dtype)
    if type_name is None:
        type_name = _DTYPE_NAMES[dtype] = dtype.name
    return {"name": name, "dtype": type_name, "shape": list(array.shape), "data": array.tobytes()}  # C order




@dataclass
class CapturedItem:
    """One captured request, as it will be stored."""

    capture_id: str
    time: datetime
    device_id: str
    model: str
    version: str
    variant: str
    target_key: str
    request_id: str
    policy: str
    score: float | None
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    payload: bytes | None = None
    payload_type: str | None = None
    label: str | None = None
    label_source: str | None = None
    label_time: datetime | None = None
    group: str = ""
    """Who or what the data came from beyond the device (request parameter ``edgeloop.capture_group``), ``""``."""
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The item as one row of :data:`SCHEMA` (its fields but ``extra``; a copy of ``__dict__`` costs a fraction
        of a getattr per column)."""
        row = dict(self.__dict__)
        del row["extra"]
        return row

    def size_bytes(self) -> int:
        """Bytes of tensor data and payload (what the budgets count)."""
        return sum(len(t["data"]) for t in self.inputs + self.outputs) + len(self.payload or b"")


def table_of(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows of :data:`SCHEMA` as a table."""
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def write_items(path: Path, items: list[CapturedItem]) -> int:
    """Write ``items`` to ``path`` atomically (Arrow IPC, fsync, rename); returns the file's size in bytes."""
    with atomic_output(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, SCHEMA) as writer:
            writer.write_table(table_of([item.row() for item in items]))
    return path.stat().st_size


def read_table(path: Path) -> pa.Table:
    """An item file (:func:`write_items`) as a table of :data:`SCHEMA` (one spooled before a column was added gets
    the column, :func:`conform`)."""
    with pa.OSFile(str(path), "rb") as source:
        return conform(ipc.open_file(source).read_all())


def conform(table: pa.Table) -> pa.Table:
    """``table`` in :data:`SCHEMA`: a column it lacks (an item spooled by an older runtime) filled with its
    :data:`~edgeloop_core.contract.captures.CAPTURE_OPTIONAL_COLUMNS` value."""
    if table.schema.equals(SCHEMA):
        return table
    for name, value in CAPTURE_OPTIONAL_COLUMNS.items():
        if name not in table.column_names:
            table = table.append_column(SCHEMA.field(name), pa.array([value] * table.num_rows, pa.string()))
    return table.select(list(SCHEMA.names)).cast(SCHEMA)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of an item file (:func:`write_items`)."""
    return read_table(path).to_pylist()  # type: ignore[no-any-return]


def write_shard(path: Path, rows: list[dict[str, Any]]) -> int:
    """Write ``rows`` as one Parquet file (zstd) atomically; returns its size in bytes."""
    return write_shard_table(path, table_of(rows))


def write_shard_table(path: Path, table: pa.Table) -> int:
    """Write ``table`` (of :data:`SCHEMA`) sorted by capture id as one Parquet file (zstd) atomically; returns its
    size in bytes. Arrow to Parquet directly: no row passes through Python objects."""
    with atomic_output(path) as tmp:
        pq.write_table(table.sort_by("capture_id"), tmp, compression="zstd")
    return path.stat().st_size


def shard_ids(path: Path) -> list[str]:
    """The capture ids a shard holds."""
    return pq.read_table(path, columns=["capture_id"]).column("capture_id").to_pylist()  # type: ignore[no-any-return]


def shard_items(path: Path) -> int:
    """How many items a shard holds (from its footer, nothing else read)."""
    return int(pq.ParquetFile(path).metadata.num_rows)


def utc_now() -> datetime:
    """Now, in UTC."""
    return datetime.now(timezone.utc)
