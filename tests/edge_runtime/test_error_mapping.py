"""Every row of the error → gRPC status table, through a real grpc.aio server and the real mapping
(:meth:`ErrorMapping.add_servicer`, as both servers register their services)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from edgeloop_core import errors
from edgeloop_core.rpc_errors import INTERNAL_MESSAGE, STATUS_FOR, ErrorMapping, status_for

OK_AS_INTERNAL = {
    errors.EdgeloopError: "the base: never raised itself",
    errors.StoreError: "an S3 failure we could not classify: a server fault, not the caller's",
    errors.BucketNotFound: "the server's own bucket is missing: its operator's problem, not the caller's",
    errors.VersionExists: "raised where we write to S3 (a publish, an engine share), which no RPC does",
    errors.DeviceError: "a branch: never raised itself",
    errors.EngineError: "an engine that fails to build or run is a server fault; its details stay in the log",
    errors.ServingError: "a branch: never raised itself",
    errors.CloudError: "a branch: never raised itself",
    errors.GateFailed: "raised by the pipeline, which no RPC runs",
    errors.PipelineFailed: "raised by the pipeline, which no RPC runs",
    errors.RolloutFailed: "raised by a fleet rollout, which no RPC runs",
}
"""Classes of the tree that deliberately have no row in STATUS_FOR (nor a mapped ancestor), and why."""

STATUS = {
    errors.ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ContractError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ManifestInvalid: grpc.StatusCode.FAILED_PRECONDITION,
    errors.SignatureInvalid: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ChannelExpired: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ChannelRollback: grpc.StatusCode.FAILED_PRECONDITION,
    errors.DigestMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    errors.StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ObjectNotFound: grpc.StatusCode.NOT_FOUND,
    errors.ValidationFailed: grpc.StatusCode.FAILED_PRECONDITION,
    errors.InsufficientMemory: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.CacheFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.NotReady: grpc.StatusCode.UNAVAILABLE,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.AccessDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.HubAuthError: grpc.StatusCode.UNAUTHENTICATED,
} | {cls: grpc.StatusCode.INTERNAL for cls in OK_AS_INTERNAL}
"""What a gRPC caller gets for each class of the tree: written out, so that moving a class in the tree cannot
change a caller's status unnoticed."""


def _tree(root: type[errors.EdgeloopError] = errors.EdgeloopError) -> list[type[errors.EdgeloopError]]:
    """``root`` and every class below it that :mod:`edgeloop_core.errors` defines."""
    return [root] + [cls for child in root.__subclasses__() if child.__module__ == errors.__name__
                     for cls in _tree(child)]


ROWS = list(STATUS.items()) + [
    (KeyError, grpc.StatusCode.INTERNAL),  # not ours at all
]


def test_every_class_of_the_tree_has_a_row_or_is_internal_on_purpose():
    tree = _tree()
    assert set(STATUS) == set(tree), (
        f"not in STATUS: {sorted(c.__name__ for c in set(tree) - set(STATUS))}; "
        f"gone from the tree: {sorted(c.__name__ for c in set(STATUS) - set(tree))}")
    assert set(STATUS_FOR) <= set(tree)
    for cls in tree:
        mapped = next((c for c in cls.__mro__ if c in STATUS_FOR), None)
        assert (mapped is None) == (cls in OK_AS_INTERNAL), f"{cls.__name__}: a row, or a reason to have none"
        assert status_for(cls("x"))[0] == STATUS[cls], cls.__name__


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
