"""Access control: TLS and mutual TLS on the inference endpoint and the hub, with certificates the test makes."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
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

    def issue(subject: str, issuer_name, issuer_key, *, ca: bool = False, server: bool = False):
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
        return builder.sign(issuer_key or key, hashes.SHA256()), key

    ca_cert, ca_key = issue("edgeloop test CA", None, None, ca=True)
    server_cert, server_key = issue("127.0.0.1", ca_cert.subject, ca_key, server=True)
    client_cert, client_key = issue("edge-app-1", ca_cert.subject, ca_key)
    ca_path, _ = _write_pem_pair(root, "ca", ca_cert, ca_key)
    server_crt, server_key_path = _write_pem_pair(root, "server", server_cert, server_key)
    client_crt, client_key_path = _write_pem_pair(root, "client", client_cert, client_key)
    return {"ca": ca_path, "server_cert": server_crt, "server_key": server_key_path, "client_cert": client_crt,
            "client_key": client_key_path}


def _client(edge, pki, *, with_cert: bool) -> triton.InferenceServerClient:
    extra = {"private_key": str(pki["client_key"]), "certificate_chain": str(pki["client_cert"])} if with_cert else {}
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


def test_mutual_tls_requires_a_client_certificate_which_also_allows_repository_control(store, signing_key, trained,
                                                                                    edge_settings, pki):
    publish_model(store, signing_key, trained, "v1")
    edge = RunningEdge(edge_settings(store.bucket, tls_cert_file=pki["server_cert"], tls_key_file=pki["server_key"],
                                     tls_client_ca_file=pki["ca"], repository_control=True), store=store)
    try:
        edge.wait_ready()
        with pytest.raises(InferenceServerException):  # the handshake fails without a client certificate
            _client(edge, pki, with_cert=False).is_server_live(client_timeout=3)
        client = _client(edge, pki, with_cert=True)
        assert client.is_model_ready(MODEL)
        client.unload_model(MODEL)  # a verified client certificate is enough for repository control
        assert not client.is_model_ready(MODEL)
        client.load_model(MODEL)
        assert client.is_model_ready(MODEL)
    finally:
        edge.stop()


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
