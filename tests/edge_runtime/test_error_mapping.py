"""Every row of the error → gRPC status table, through a real grpc.aio server and the real mapping
(:meth:`ErrorMapping.add_servicer`, as both servers register their services)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from edgeloop_core import errors
from edgeloop_core.rpc_errors import INTERNAL_MESSAGE, STATUS_FOR, ErrorMapping, status_for

ROWS = [(cls, code) for cls, code in STATUS_FOR.items()] + [
    (errors.EngineError, grpc.StatusCode.INTERNAL),  # ours, unmapped: hidden like anything else
    (KeyError, grpc.StatusCode.INTERNAL),  # not ours at all
    (errors.DigestMismatch, grpc.StatusCode.FAILED_PRECONDITION),  # a subclass follows its parent's row
    (errors.BucketNotFound, grpc.StatusCode.INTERNAL),  # StoreError itself is not in the table
]


def _add_raiser(exc: BaseException):
    """An ``add_..._to_server`` function for a service whose one method raises ``exc``, registering it the way
    grpcio-tools' generated code does."""

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise exc

    def add_to_server(servicer: object, server: grpc.aio.Server) -> None:
        handlers = {"Raise": grpc.unary_unary_rpc_method_handler(handler)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Raiser", handlers),))
        server.add_registered_method_handlers("test.Raiser", handlers)

    return add_to_server


@pytest.mark.parametrize(("cls", "code"), ROWS, ids=[c.__name__ for c, _ in ROWS])
def test_each_row_reaches_the_client(cls, code):
    message = "secret internals at /var/lib/x" if code == grpc.StatusCode.INTERNAL else "what to do next"
    exc = cls(message)

    async def scenario():
        server = grpc.aio.server()
        ErrorMapping().add_servicer(_add_raiser(exc), None, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/test.Raiser/Raise")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(b"", timeout=5)
                return info.value
        finally:
            await server.stop(0)

    error = asyncio.run(scenario())
    assert error.code() == code
    if code == grpc.StatusCode.INTERNAL:
        assert error.details() == INTERNAL_MESSAGE and "secret" not in error.details()
    else:
        assert error.details() == message


def test_status_for_walks_the_class_hierarchy():
    class Narrower(errors.InvalidInput):
        pass

    assert status_for(Narrower("x")) == (grpc.StatusCode.INVALID_ARGUMENT, "x")
    assert status_for(RuntimeError("boom"))[0] == grpc.StatusCode.INTERNAL
