"""Assemble the gRPC server: inference service, ``grpc.health.v1`` tied to readiness, reflection, error mapping."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edge_runtime.serve.servicer import InferenceServicer, RepositoryControl
from edge_runtime.serve.shm import connected_peers
from edgeloop_core.errors import ConfigError
from edgeloop_core.protos import inference_pb2, inference_pb2_grpc
from edgeloop_core.protos._pool import POOL
from edgeloop_core.rpc_errors import ErrorMapping
from edgeloop_core.tls import TlsFiles

if TYPE_CHECKING:
    from edge_runtime.serve.servicer import ServedModels
    from edge_runtime.serve.shm import SharedMemoryRegistry

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
LIVENESS_SERVICE = "edgeloop.liveness"
"""Health-service name the livenessProbe asks; SERVING whenever the process answers."""
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _share_with_reflection(file_descriptor) -> None:  # noqa: ANN001 - protobuf FileDescriptor
    """Reflection answers from our pool (see protos/_pool.py); add health's file so clients can resolve it too."""
    try:
        POOL.FindFileByName(file_descriptor.name)
    except KeyError:
        POOL.AddSerializedFile(file_descriptor.serialized_pb)


async def start_server(runtime: ServedModels, *, bind_address: str, port: int, max_batch_size: int,
                       max_message_bytes: int,
                       on_result: Callable[[str, str, float, str], None] | None = None,
                       tls: TlsFiles | None = None, control: RepositoryControl | None = None,
                       alive: Callable[[], bool] | None = None,
                       liveness_period_s: float = 2.0,
                       shm_release_after_s: float = 10.0, health_port: int = 0,
                       services: Sequence[tuple[str, Callable[[grpc.aio.Server], None]]] = ()
                       ) -> tuple[grpc.aio.Server, int]:
    """Start serving on ``bind_address:port`` (0: a free port); returns the server and the bound port.

    Health reports SERVING for the overall server and the inference service exactly when the device is ready (its
    desired models validated and serving, by ``ready_policy``), which is what the pod's readiness probe asks. The
    liveness service follows ``alive()`` (the life-cycle loops run, none wedged), checked every
    ``liveness_period_s``. With ``health_port``, the same health service is also served in plaintext on that port
    (and nothing else there), for the kubelet's gRPC probes, which cannot speak TLS.
    """
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ])
    servicer = InferenceServicer(runtime, max_batch_size, control=control)
    ErrorMapping(on_result).add_servicer(inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server, servicer,
                                         server)
    server.edgeloop_shared_memory = servicer.shared  # released when the app stops
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    pending: set[asyncio.Task] = set()
    await _follow_readiness(health_servicer, runtime, pending)
    # Liveness is "the loop is alive", not readiness: a long TensorRT build must not get the pod killed, but a dead
    # or wedged loop must (the kubelet restarts the pod, which serves its cached last good version first).
    await health_servicer.set(LIVENESS_SERVICE, SERVING)
    if alive is not None:
        pending.add(asyncio.get_running_loop().create_task(
            _follow_liveness(health_servicer, alive, liveness_period_s), name="edgeloop-liveness"))
    for _, add_service in services:
        add_service(server)
    _enable_reflection(server, tuple(name for name, _ in services))
    bound = _bind(server, bind_address, port, tls)
    await server.start()
    pending.add(asyncio.get_running_loop().create_task(
        _sweep_shared_memory(servicer.shared, bound, liveness_period_s, shm_release_after_s),
        name="edgeloop-shm-sweep"))
    if health_port:
        pending.add(await _serve_health_only(server, health_servicer, bind_address, health_port))
    server.edgeloop_background = pending  # the liveness and shared-memory loops, cancelled when the app stops
    return server, bound


async def _serve_health_only(server: grpc.aio.Server, health_servicer: health.aio.HealthServicer,
                             bind_address: str, port: int) -> asyncio.Task:
    """Serve ``grpc.health.v1`` alone, in plaintext, on ``bind_address:port``: the kubelet's gRPC probes cannot do
    TLS, and an exec probe would start a Python process per probe (and need a client certificate under mutual
    TLS). It tells only what the probes may see: readiness and liveness. Returns the task that stops it once
    ``server`` stops (or is cancelled)."""
    health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
    _bind(health_server, bind_address, port, None)
    await health_server.start()

    async def stop_with_server() -> None:
        try:
            await server.wait_for_termination()
        finally:
            await health_server.stop(0)

    return asyncio.get_running_loop().create_task(stop_with_server(), name="edgeloop-health-port")


async def _follow_readiness(health_servicer: health.aio.HealthServicer, runtime: ServedModels,
                            pending: set[asyncio.Task]) -> None:
    """Publish readiness as the health of the server and of the inference service, now and after every change of
    any model's state (each publication a task kept in ``pending`` until it is done)."""

    async def publish() -> None:
        status = SERVING if runtime.ready() else NOT_SERVING
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, status)

    def on_change() -> None:
        task = asyncio.get_running_loop().create_task(publish())
        pending.add(task)
        task.add_done_callback(pending.discard)

    runtime.on_change(on_change)
    await publish()


async def _follow_liveness(health_servicer: health.aio.HealthServicer, alive: Callable[[], bool],
                           period_s: float) -> None:
    """Every ``period_s``: the liveness service says SERVING exactly while ``alive()``."""
    last = True
    while True:
        await asyncio.sleep(period_s)
        now = alive()
        if now != last:
            await health_servicer.set(LIVENESS_SERVICE, SERVING if now else NOT_SERVING)
            last = now


async def _sweep_shared_memory(shared: SharedMemoryRegistry, port: int, period_s: float,
                               release_after_s: float) -> None:
    """Every ``period_s``: release regions whose object is gone or whose client has left (see
    shm.SharedMemoryRegistry.sweep)."""
    while True:
        await asyncio.sleep(period_s)
        try:
            shared.sweep(lambda: connected_peers(port), release_after_s)
        except Exception:  # a background loop reports and goes on
            log.exception("shared-memory sweep failed")


def _enable_reflection(server: grpc.aio.Server, extra: tuple[str, ...] = ()) -> None:
    """Reflection for the inference and health services and ``extra`` ones (grpcurl, Postman)."""
    _share_with_reflection(health_pb2.DESCRIPTOR)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, *extra, reflection.SERVICE_NAME),
        server, pool=POOL)


def _bind(server: grpc.aio.Server, bind_address: str, port: int, tls: TlsFiles | None) -> int:
    """Add the listening port (TLS when ``tls``); returns the bound port, :class:`ConfigError` when it cannot bind."""
    host = f"[{bind_address}]" if ":" in bind_address else bind_address
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    if bound == 0:
        raise ConfigError(f"cannot bind the gRPC server to {bind_address}:{port}: is the port in use?")
    return bound
