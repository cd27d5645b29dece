"""Assemble the gRPC server: inference service, ``grpc.health.v1`` tied to readiness, reflection, error mapping."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edge_runtime.protos import inference_pb2, inference_pb2_grpc
from edge_runtime.protos._pool import POOL
from edge_runtime.serve.errors import ErrorInterceptor
from edge_runtime.serve.servicer import InferenceServicer

if TYPE_CHECKING:
    from edge_runtime.lifecycle import ModelRuntime

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
LIVENESS_SERVICE = "edgeloop.liveness"
"""Health-service name the livenessProbe asks; SERVING whenever the process answers."""


def _share_with_reflection(file_descriptor) -> None:  # noqa: ANN001 - protobuf FileDescriptor
    """Reflection answers from our pool (see protos/_pool.py); add health's file so clients can resolve it too."""
    try:
        POOL.FindFileByName(file_descriptor.name)
    except KeyError:
        POOL.AddSerializedFile(file_descriptor.serialized_pb)


async def start_server(runtime: ModelRuntime, *, bind_address: str, port: int, max_batch_size: int,
                       max_message_bytes: int,
                       on_result: Callable[[str, str, float], None] | None = None) -> tuple[grpc.aio.Server, int]:
    """Start serving on ``bind_address:port`` (0: a free port); returns the server and the bound port.

    Health reports SERVING for the overall server and the inference service exactly when the runtime is ready
    (the desired version is validated and serving), which is what the pod's readiness probe asks.
    """
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(interceptors=[ErrorInterceptor(on_result)], options=options)
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(runtime, max_batch_size), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)

    async def publish_health() -> None:
        status = health_pb2.HealthCheckResponse.SERVING if runtime.ready() else \
            health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, status)

    pending: set = set()

    def on_change() -> None:
        import asyncio

        task = asyncio.get_running_loop().create_task(publish_health())
        pending.add(task)
        task.add_done_callback(pending.discard)

    runtime.on_change(on_change)
    await publish_health()
    # Liveness is "the process answers", not readiness: a long TensorRT build must not get the pod killed.
    await health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    _share_with_reflection(health_pb2.DESCRIPTOR)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server,
        pool=POOL)
    host = f"[{bind_address}]" if ":" in bind_address else bind_address
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        from edge_runtime.errors import ConfigError

        raise ConfigError(f"cannot bind the gRPC server to {bind_address}:{port}: is the port in use?")
    await server.start()
    return server, bound
