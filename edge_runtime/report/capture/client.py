"""The app's side of the Label RPC (``edgeloop edge label``): one label for one request id, to a running device."""

from __future__ import annotations

import json
from pathlib import Path

import grpc

from edgeloop_core.errors import ConfigError, EdgeloopError
from edgeloop_core.protos import capture_pb2 as pb
from edgeloop_core.protos import capture_pb2_grpc
from edgeloop_core.rpc_errors import STATUS_FOR


def label_request(model: str, request_id: str, label: str, source: str) -> pb.LabelRequest:
    """The request for ``label``: an integer is a class index, anything else must be JSON (a string label is
    ``'"cat"'``); a ConfigError that says so otherwise."""
    request = pb.LabelRequest(model_name=model, request_id=request_id, source=source)
    try:
        value = json.loads(label)
    except ValueError as exc:
        raise ConfigError(f"the label {label!r} is neither a class index nor JSON (quote a text label: "
                          f"'\"cat\"')") from exc
    if isinstance(value, int) and not isinstance(value, bool):
        request.class_index = value
    else:
        request.label_json = label
    return request


def send_label(address: str, model: str, request_id: str, label: str, *, source: str = "cli",
               token: str | None = None, ca_file: Path | None = None, timeout_s: float = 10.0) -> pb.LabelResponse:
    """Send one label to the device at ``address`` (``host:port``; TLS with ``ca_file``), with the control token
    when given. Errors are one line: :class:`EdgeloopError` with the device's status and message."""
    request = label_request(model, request_id, label, source)
    channel = (grpc.secure_channel(address, grpc.ssl_channel_credentials(Path(ca_file).read_bytes()))
               if ca_file else grpc.insecure_channel(address))
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        return capture_pb2_grpc.CaptureServiceStub(channel).Label(request, metadata=metadata, timeout=timeout_s)
    except grpc.RpcError as exc:
        error = next((cls for cls, code in STATUS_FOR.items() if code == exc.code()), EdgeloopError)
        raise error(f"label refused by {address}: {exc.code().name}: {exc.details()}") from exc
    finally:
        channel.close()
