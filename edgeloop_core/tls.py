"""TLS material from PEM files: the server side (an endpoint's certificate, and a client CA for mutual TLS) and the
client side (the CA a device trusts for the hub, and its own certificate for mutual TLS). A file that cannot be read
is a :class:`~edgeloop_core.errors.ConfigError` naming it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from edgeloop_core.errors import ConfigError


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS on the inference endpoint; ``client_ca`` set: mutual TLS (clients need a certificate)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials, or :class:`ConfigError` naming the file that cannot be read."""
        def read(path: Path) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read TLS file {path}: {exc.strerror}") from exc

        pairs = [(read(self.key), read(self.cert))]
        if self.client_ca is None:
            return grpc.ssl_server_credentials(pairs)
        return grpc.ssl_server_credentials(pairs, root_certificates=read(self.client_ca), require_client_auth=True)


@dataclass(frozen=True)
class HubTls:
    """TLS towards the hub: the CA that signed its certificate, and this device's certificate for mutual TLS."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials; :class:`ConfigError` naming a file that cannot be read."""
        def read(path: Path | None) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read TLS file {path}: {exc.strerror}") from exc

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))

