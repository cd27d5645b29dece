"""The one mapping from our error tree to gRPC status codes, applied by one server interceptor."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from edge_runtime import errors

log = logging.getLogger(__name__)

STATUS_FOR: dict[type[errors.EdgeloopError], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.ObjectNotFound: grpc.StatusCode.NOT_FOUND,
    errors.NotReady: grpc.StatusCode.UNAVAILABLE,
    errors.StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ValidationFailed: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ContractError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.AccessDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.CacheFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.InsufficientMemory: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
"""Most specific class first is not needed: lookup walks the exception's MRO."""

INTERNAL_MESSAGE = "internal error; the server log has the details"


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Code and message for ``exc``: mapped errors keep their message, everything else hides internals."""
    for cls in type(exc).__mro__:
        if cls in STATUS_FOR:
            return STATUS_FOR[cls], str(exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


class _Undecodable:
    """Stands for a request whose bytes did not parse (see ``ErrorInterceptor``)."""

    def __init__(self, error: str) -> None:
        self.error = error


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions escaping unary handlers into the status from :data:`STATUS_FOR`.

    ``on_result(method, code_name, seconds, model_name)``, when given, sees every unary call's outcome (metrics;
    ``model_name`` is the request's, or empty).
    """

    def __init__(self, on_result: Callable[[str, str, float], None] | None = None) -> None:
        self._on_result = on_result

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = handler_call_details.method
        decode = handler.request_deserializer

        def deserialize(data: bytes) -> Any:  # noqa: ANN401 - any request message
            # grpc answers UNKNOWN (with a Python class name) when a deserializer raises; hand the handler a marker
            # instead, so an unparseable request gets INVALID_ARGUMENT like any other bad input
            try:
                return decode(data) if decode is not None else data
            except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
                return _Undecodable(type(exc).__name__)

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                if isinstance(request, _Undecodable):
                    raise errors.InvalidInput(f"the request is not a valid {method.rsplit('/', 1)[-1]} message")
                return await inner(request, context)
            except grpc.aio.AbortError:
                code = grpc.StatusCode.UNKNOWN
                raise
            except Exception as exc:  # noqa: BLE001 - the whole point: nothing escapes unmapped
                code, message = status_for(exc)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("unexpected error in %s", method)
                await context.abort(code, message)
            finally:
                if self._on_result is not None:
                    self._on_result(method, code.name, time.perf_counter() - started,
                                    getattr(request, "model_name", "") or getattr(request, "name", ""))

        return grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=deserialize,
            response_serializer=handler.response_serializer,
        )
