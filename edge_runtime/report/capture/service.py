"""``edgeloop.capture.v1.CaptureService`` (protos/capture.proto) on the device's gRPC endpoint: ground truth by
request id, under the same access control as repository control. Translates only; errors are ours, mapped by
:mod:`edgeloop_core.rpc_errors`."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from edgeloop_core.contract.channel import check_name
from edgeloop_core.errors import InvalidInput, ModelNotFound
from edgeloop_core.protos import capture_pb2 as pb
from edgeloop_core.protos import capture_pb2_grpc
from edgeloop_core.rpc_errors import ErrorMapping

if TYPE_CHECKING:
    from collections.abc import Callable

    import grpc

    from edge_runtime.report.capture.worker import FieldCapture
    from edge_runtime.serve.servicer import RepositoryControl

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CaptureService"].full_name
"""``edgeloop.capture.v1.CaptureService`` (for reflection)."""
MAX_LABEL_BYTES = 64 << 10
"""Largest label a request may carry (JSON text), bytes."""
MAX_SOURCE_CHARS = 128


def label_value(request: pb.LabelRequest) -> Any:  # noqa: ANN401 - any JSON value
    """The label a request carries, as a JSON value; :class:`InvalidInput` when there is none or it does not parse."""
    which = request.WhichOneof("label")
    if which == "class_index":
        return int(request.class_index)
    if which != "label_json":
        raise InvalidInput("the label request carries no label: set label_json or class_index")
    if len(request.label_json.encode()) > MAX_LABEL_BYTES:
        raise InvalidInput(f"label_json is over {MAX_LABEL_BYTES} bytes")
    try:
        return json.loads(request.label_json)
    except ValueError as exc:
        raise InvalidInput(f"label_json is not JSON: {exc}") from exc


class CaptureServicer(capture_pb2_grpc.CaptureServiceServicer):
    """Labels for captured requests: checks the caller (``control``), the request, then hands it to ``capture`` (and,
    once stored, to ``feedback``: told (model, request id, label value) of every label accepted; it must return at
    once, :meth:`edge_runtime.report.field.FieldStatistics.feedback`)."""

    def __init__(self, capture: FieldCapture, control: RepositoryControl,
                 feedback: Callable[[str, str, Any], None] | None = None) -> None:
        self.capture, self.control, self.feedback = capture, control, feedback

    async def Label(self, request: pb.LabelRequest, context: grpc.aio.ServicerContext) -> pb.LabelResponse:  # noqa: N802
        self.control.authorize(context)
        if not request.request_id or len(request.request_id) > 256:
            raise InvalidInput("request_id must be the ModelInfer request's id (1 to 256 characters)")
        if len(request.source) > MAX_SOURCE_CHARS:
            raise InvalidInput(f"source is over {MAX_SOURCE_CHARS} characters")
        name = check_name(request.model_name, "model_name")
        if name not in self.capture.policies:
            raise ModelNotFound(f"model {name!r} is not captured on this device: give it a capture policy first")
        value = label_value(request)
        outcome, joined = await asyncio.to_thread(self.capture.label, name, request.request_id, value,
                                                  request.source)
        if self.feedback is not None:
            self.feedback(name, request.request_id, value)
        return pb.LabelResponse(outcome=outcome, captures=joined)


def add_capture_service(server: grpc.aio.Server, capture: FieldCapture, control: RepositoryControl,
                        feedback: Callable[[str, str, Any], None] | None = None) -> None:
    """Serve :class:`CaptureServicer` on ``server`` (before it starts), with our error mapping; ``feedback`` is told
    of every label stored."""
    ErrorMapping().add_servicer(capture_pb2_grpc.add_CaptureServiceServicer_to_server,
                                CaptureServicer(capture, control, feedback), server)
