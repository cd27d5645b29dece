"""``inference.GRPCInferenceService``: each RPC turns the request into domain values, calls the runtime once,
and turns the result back. Errors are raised as ours and mapped by :mod:`edgeloop_core.rpc_errors`."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from edge_runtime import __version__
from edge_runtime.serve.converters import outputs_to_response, request_to_inputs, requested_outputs, tensor_metadata
from edge_runtime.serve.observers import notify_infer
from edge_runtime.serve.shm import SharedMemoryRegistry
from edge_runtime.states import State
from edgeloop_core.errors import AccessDenied, ModelNotFound, Unauthenticated
from edgeloop_core.protos import inference_pb2 as pb
from edgeloop_core.protos import inference_pb2_grpc

if TYPE_CHECKING:
    from edge_runtime.serve.slot import ServingModel

EXTENSIONS = ["model_repository", "health", "dynamic_batching", "system_shared_memory"]


class ServedModels(Protocol):
    """What the gRPC side asks of the device's models (:class:`~edge_runtime.repository.ModelRepository` answers):
    readiness and its changes, a model by name, the repository index, and the repository extension's load and
    unload. Serving depends on this, never on the life cycle that implements it."""

    def ready(self) -> bool:
        """Server readiness (the desired models validated and serving)."""

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every state change of any model."""

    def model(self, name: str, version: str = "") -> ServingModel:
        """The serving model called ``name`` (and ``version`` when given), or the right error."""

    def index(self) -> list[dict[str, Any]]:
        """Every model with its status: ``model_name``, ``serving_version``, ``state``, ``error``, ``paused``."""

    async def load(self, name: str, version: str | None = None) -> object:
        """Serve ``name`` now (pinned to ``version`` when given); returns when that cycle ends."""

    async def unload(self, name: str) -> None:
        """Stop serving ``name`` until a load request."""


@dataclass(frozen=True)
class RepositoryControl:
    """Who may load and unload models: nobody unless ``enabled``; then a caller presenting ``token`` as
    ``authorization: Bearer <token>``, or one whose verified client certificate (mutual TLS) names, as subject CN
    or a subject alternative name, one of ``client_names``. Authentication is not authorisation: any other client
    certificate may infer but gets PERMISSION_DENIED here."""

    enabled: bool
    token: str | None = None
    client_names: frozenset[str] = frozenset()

    def authorize(self, context: grpc.aio.ServicerContext) -> None:
        """Raise :class:`AccessDenied` or :class:`Unauthenticated` unless this caller may change the repository."""
        if not self.enabled:
            raise AccessDenied("repository control is off on this device (EDGE_REPOSITORY_CONTROL): models follow "
                               "the desired file and channel")
        header = dict(context.invocation_metadata() or ()).get("authorization", "")
        presented = header.removeprefix("Bearer ").strip()
        if self.token and presented and hmac.compare_digest(presented.encode(), self.token.encode()):
            return
        names = certificate_names(context)
        if names & self.client_names:
            return  # the TLS layer verified the certificate against our client CA; the list says it may control
        if names:
            raise AccessDenied(f"client certificate {', '.join(sorted(names))} may infer but not control the "
                               "repository: list it in EDGE_CONTROL_CLIENT_NAMES or present the control token")
        raise Unauthenticated("repository control needs the control token (authorization: Bearer ...) or a client "
                              "certificate listed in EDGE_CONTROL_CLIENT_NAMES")


def certificate_names(context: grpc.aio.ServicerContext) -> set[str]:
    """The subject CN and subject alternative names of the caller's verified client certificate (empty without)."""
    peer = context.auth_context() or {}
    return {value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            for key in ("x509_common_name", "x509_subject_alternative_name") for value in peer.get(key, ())}


class InferenceServicer(inference_pb2_grpc.GRPCInferenceServiceServicer):
    """Open Inference Protocol v2 over the device's models (:class:`ServedModels`: every model by name)."""

    def __init__(self, runtime: ServedModels, max_batch_size: int, *,
                 control: RepositoryControl | None = None) -> None:
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self.control = control or RepositoryControl(enabled=False)
        self.shared = SharedMemoryRegistry()

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:  # noqa: N802,E501
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:  # noqa: N802,E501
        return pb.ServerReadyResponse(ready=self.runtime.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:  # noqa: N802,E501
        try:
            self.runtime.model(request.name, request.version)
        except ModelNotFound:
            raise
        except Exception:  # noqa: BLE001 - not ready is an answer here, not an error
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:  # noqa: N802,E501
        return pb.ServerMetadataResponse(name="edgeloop", version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:  # noqa: N802,E501
        model = self.runtime.model(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=model.name, versions=[model.version], platform=model.engine.platform,
            inputs=tensor_metadata(model.engine.inputs), outputs=tensor_metadata(model.engine.outputs),
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:  # noqa: N802,E501
        model = self.runtime.model(request.model_name, request.model_version)
        inputs = request_to_inputs(request, model.engine.inputs, self.max_batch_size, self.shared)  # largest *request*
        names = requested_outputs(request, model.engine.outputs)
        outputs = await model.batcher.infer(inputs)  # the model looked up above: one lookup per request
        response = outputs_to_response(request, model.version, outputs, names, self.shared)
        notify_infer(self.runtime, request, model, inputs, outputs)  # field capture: only queues, never waits
        return response

    async def SystemSharedMemoryRegister(self, request: pb.SystemSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext) -> pb.SystemSharedMemoryRegisterResponse:  # noqa: N802,E501
        self.shared.register(request.name, request.key, int(request.offset), int(request.byte_size),
                             owner=context.peer() or "")
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request: pb.SystemSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext) -> pb.SystemSharedMemoryUnregisterResponse:  # noqa: N802,E501
        self.shared.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def SystemSharedMemoryStatus(self, request: pb.SystemSharedMemoryStatusRequest, context: grpc.aio.ServicerContext) -> pb.SystemSharedMemoryStatusResponse:  # noqa: N802,E501
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self.shared.status(request.name):
            response.regions[region.name].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(
                name=region.name, key=region.key, offset=region.offset, byte_size=region.byte_size))
        return response

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext) -> pb.RepositoryIndexResponse:  # noqa: N802,E501
        response = pb.RepositoryIndexResponse()
        for status in self.runtime.index():
            serving = status["serving_version"] is not None
            if request.ready and not serving:
                continue
            state = "READY" if serving else ("LOADING" if State(status["state"]).loading else "UNAVAILABLE")
            reason = status["error"] or ("unloaded through the repository API" if status["paused"] else "")
            response.models.add(name=status["model_name"], version=status["serving_version"] or "", state=state,
                                reason=reason)
        return response

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext) -> pb.RepositoryModelLoadResponse:  # noqa: N802,E501
        self.control.authorize(context)
        version = request.parameters["version"].string_param if "version" in request.parameters else None
        await self.runtime.load(request.model_name, version)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext) -> pb.RepositoryModelUnloadResponse:  # noqa: N802,E501
        self.control.authorize(context)
        await self.runtime.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()
