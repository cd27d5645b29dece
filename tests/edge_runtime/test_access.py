"""Access control: TLS and mutual TLS on the inference endpoint and the hub, with certificates the test makes."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import time
import uuid
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.edge_runtime.conftest import RunningEdge, publish_model

pytestmark = pytest.mark.integration
MODEL = "digits-cnn"


def _write_pem_pair(directory: Path, name: str, cert, key) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization

    (directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                              serialization.PrivateFormat.PKCS8,
                                                              serialization.NoEncryption()))
    return directory / f"{name}.crt", directory / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost, and a client certificate, all signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    root = tmp_path_factory.mktemp("pki")
    now = dt.datetime.now(dt.timezone.utc)

    def issue(subject: str, issuer_name, issuer_key, *, ca: bool = False, server: bool = False, sans=()):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        elif not ca:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            if sans:
                builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]),
                                                critical=False)
        return builder.sign(issuer_key or key, hashes.SHA256()), key

    ca_cert, ca_key = issue("edgeloop test CA", None, None, ca=True)
    server_cert, server_key = issue("127.0.0.1", ca_cert.subject, ca_key, server=True)
    client_cert, client_key = issue("edge-app-1", ca_cert.subject, ca_key)
    # the operator's certificate: listed for repository control by its SAN, not its CN
    admin_cert, admin_key = issue("ops console", ca_cert.subject, ca_key, sans=["edge-admin.ops.example"])
    ca_path, _ = _write_pem_pair(root, "ca", ca_cert, ca_key)
    server_crt, server_key_path = _write_pem_pair(root, "server", server_cert, server_key)
    client_crt, client_key_path = _write_pem_pair(root, "client", client_cert, client_key)
    admin_crt, admin_key_path = _write_pem_pair(root, "admin", admin_cert, admin_key)
    return {"ca": ca_path, "server_cert": server_crt, "server_key": server_key_path, "client_cert": client_crt,
            "client_key": client_key_path, "admin_cert": admin_crt, "admin_key": admin_key_path}


def _client(edge, pki, *, with_cert: bool, who: str = "client") -> triton.InferenceServerClient:
    extra = {"private_key": str(pki[f"{who}_key"]), "certificate_chain": str(pki[f"{who}_cert"])} if with_cert else {}
    return triton.InferenceServerClient(edge.address, ssl=True, root_certificates=str(pki["ca"]), **extra)


@pytest.mark.parametrize("hub_address", [None, "127.0.0.1:9"], ids=["no hub", "plaintext hub"])
def test_tls_on_the_inference_endpoint(store, signing_key, trained, edge_settings, pki, hub_address):
    """The endpoint's TLS, whatever the telemetry hub's (a hub without TLS once switched the endpoint's off)."""
    publish_model(store, signing_key, trained, "v1")
    edge = RunningEdge(edge_settings(store.bucket, tls_cert_file=pki["server_cert"], tls_key_file=pki["server_key"],
                                     hub_address=hub_address, hub_token="tok" if hub_address else None), store=store)
    try:
        edge.wait_ready()
        assert _client(edge, pki, with_cert=False).is_model_ready(MODEL)  # TLS, no client certificate needed
        with pytest.raises(InferenceServerException):  # a plaintext client cannot talk to it
            triton.InferenceServerClient(edge.address).is_server_live(client_timeout=3)
    finally:
        edge.stop()


def test_mutual_tls_requires_a_client_certificate_and_only_listed_ones_control_the_repository(
        store, signing_key, trained, edge_settings, pki):
    """Authentication is not authorisation: every certificate the client CA signed may infer, but only one named in
    control_client_names (CN or SAN), or a caller with the control token, may load and unload."""
    publish_model(store, signing_key, trained, "v1")
    edge = RunningEdge(edge_settings(store.bucket, tls_cert_file=pki["server_cert"], tls_key_file=pki["server_key"],
                                     tls_client_ca_file=pki["ca"], repository_control=True, control_token="ctl",
                                     control_client_names="edge-admin.ops.example, someone-else"), store=store)
    try:
        edge.wait_ready()
        with pytest.raises(InferenceServerException):  # the handshake fails without a client certificate
            _client(edge, pki, with_cert=False).is_server_live(client_timeout=3)
        app = _client(edge, pki, with_cert=True)  # an inference client's certificate: infers, may not control
        assert app.is_model_ready(MODEL)
        for control in (app.unload_model, app.load_model):
            with pytest.raises(InferenceServerException) as info:
                control(MODEL)
            assert info.value.status() == "StatusCode.PERMISSION_DENIED"
            assert "edge-app-1" in info.value.message() and "EDGE_CONTROL_CLIENT_NAMES" in info.value.message()
        assert app.is_model_ready(MODEL)
        admin = _client(edge, pki, with_cert=True, who="admin")  # listed by its SAN
        admin.unload_model(MODEL)
        assert not admin.is_model_ready(MODEL)
        admin.load_model(MODEL)
        assert admin.is_model_ready(MODEL)
        app.unload_model(MODEL, headers={"authorization": "Bearer ctl"})  # the token still works for anyone
        assert not app.is_model_ready(MODEL)
    finally:
        edge.stop()


def test_under_tls_the_probes_get_real_health_on_a_plaintext_health_only_port(store, signing_key, trained,
                                                                               edge_settings, pki):
    """The kubelet's gRPC probes cannot do TLS (the chart once fell back to TCP checks, which a wedged loop or an
    unready device passes): health_port serves grpc.health.v1 alone, in plaintext, with the endpoint's answers."""
    import socket

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from edgeloop_core.protos import inference_pb2 as ipb
    from edgeloop_core.protos import inference_pb2_grpc

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        health_port = probe.getsockname()[1]
    publish_model(store, signing_key, trained, "v1")
    edge = RunningEdge(edge_settings(store.bucket, tls_cert_file=pki["server_cert"], tls_key_file=pki["server_key"],
                                     tls_client_ca_file=pki["ca"], health_port=health_port), store=store)
    try:
        edge.wait_ready()
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            for service in ("", "inference.GRPCInferenceService", "edgeloop.liveness"):
                assert check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
                    health_pb2.HealthCheckResponse.SERVING
            edge.call(edge.app.repository.unload(MODEL))  # readiness follows the device, not the port
            deadline = time.monotonic() + 10
            while check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "readiness never followed the unload"
                time.sleep(0.05)
            with pytest.raises(grpc.RpcError) as info:  # nothing but health there: no inference, no control
                inference_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(
                    ipb.RepositoryModelLoadRequest(model_name=MODEL), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        edge.stop()
    with socket.socket() as after, pytest.raises(OSError):  # it stops with the server
        after.settimeout(2)
        after.connect(("127.0.0.1", health_port))


def test_the_hub_over_mutual_tls(tmp_path, pki):
    from edge_runtime.report.telemetry import Outbox, TelemetrySender
    from edgeloop_core.protos import telemetry_pb2 as pb
    from edgeloop_core.protos import telemetry_pb2_grpc
    from edgeloop_core.tls import HubTls
    from telemetry_hub.server import HubSettings, fleet_status, start_hub

    async def scenario():
        settings = HubSettings(database_url=f"sqlite:///{tmp_path / 'hub.sqlite'}", port=0,
                               tokens="jetson-1:tok", read_tokens="reader", tls_cert_file=pki["server_cert"],
                               tls_key_file=pki["server_key"], tls_client_ca_file=pki["ca"])
        server, port, store = await start_hub(settings)
        try:
            outbox = Outbox(tmp_path / "outbox.sqlite", "jetson-1")
            outbox.add("stats", {"state": "serving"})
            sender = TelemetrySender(outbox, f"127.0.0.1:{port}", "tok",
                                     tls=HubTls(pki["ca"], pki["client_cert"], pki["client_key"]))
            assert await sender.flush() == 1
            await sender.close()
            outbox.close()
            # without a client certificate the handshake fails, whatever the token
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}",
                                               grpc.ssl_channel_credentials(pki["ca"].read_bytes())) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await telemetry_pb2_grpc.TelemetryHubStub(channel).Report(
                        pb.ReportRequest(device_id="jetson-1", events=[pb.Event(
                            id=str(uuid.uuid4()), device_id="jetson-1", kind="stats", timestamp_ms=1,
                            payload_json="{}")]), metadata=(("authorization", "Bearer tok"),), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            (device,) = await fleet_status(f"127.0.0.1:{port}", "reader",
                                           HubTls(pki["ca"], pki["client_cert"], pki["client_key"]))
            assert device.device_id == "jetson-1" and store.count_events("jetson-1") == 1
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def test_the_outbox_is_private_and_bounded_and_never_drops_state_changes(tmp_path):
    from edge_runtime.report.telemetry import Outbox

    outbox = Outbox(tmp_path / "outbox.sqlite", "jetson-1", max_events=100)
    assert (tmp_path / "outbox.sqlite").stat().st_mode & 0o077 == 0
    for i in range(20):
        outbox.add("failed", {"i": i})
    for i in range(200):
        outbox.add("stats", {"i": i})
    assert outbox.count() == 100 and outbox.dropped() == 120
    kinds = [e.kind for e in outbox.pending(1000)]
    assert kinds.count("failed") == 20  # every state change kept; the oldest stats went
    for i in range(100):
        outbox.add("serving", {"i": i})
    assert outbox.count() == 120 and [e.kind for e in outbox.pending(1000)].count("stats") == 0
    outbox.close()
