"""The edge runtime's settings: one object, from (lowest to highest) defaults, an optional file, ``EDGE_*``
environment variables, and command-line flags (applied in ``main()`` only)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from edgeloop_core.contract.captures import CapturePolicy
from edgeloop_core.errors import ConfigError


def _checked_name(value: str, info: ValidationInfo) -> str:
    from edgeloop_core.contract.channel import check_name

    try:
        return check_name(value, info.field_name or "name")
    except ConfigError as exc:
        raise ValueError(str(exc)) from exc


class ModelEntry(BaseModel):
    """One model this device serves, with its own life cycle: a name under models/ in the bucket, a version or
    channel, and optionally its own variant and batching limits (unset: the device-wide settings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="model name under models/ in the bucket")
    version: str = Field("stable", description="a version (v2026...) or a channel name (stable, canary)")
    variant: str | None = Field(None, description="force this manifest variant (unset: the fastest validated)")
    max_batch_size: int | None = Field(None, gt=0, description="most samples in one engine run (unset: the setting)")
    max_queue_delay_us: int | None = Field(None, ge=0, description="extra wait for company, µs (unset: the setting)")
    batching_budget_ms: float | None = Field(
        None, gt=0, description="tune batching limits within this latency, ms (unset: the setting)")
    capture: CapturePolicy | None = Field(
        None, description="field capture of this model's requests (docs/capture.md; unset: not captured)")

    _names = field_validator("name", "version")(_checked_name)


class EdgeSettings(BaseSettings):
    """Settings of ``edgeloop edge serve``. Every field reads ``EDGE_<NAME>`` from the environment."""

    model_config = SettingsConfigDict(env_prefix="EDGE_", extra="forbid")

    # --- what to serve
    model_name: str = Field("digits-cnn", description="model name under models/ in the bucket")
    model_version: str = Field("stable", description="a version (v2026...) or a channel name (stable, canary)")
    models: list[ModelEntry] = Field(
        default_factory=list, description="several models, each {name, version, variant?, max_batch_size?, "
                                          "max_queue_delay_us?, batching_budget_ms?} (JSON in the environment); "
                                          "empty: the one model named by model_name/model_version")
    desired_file: Path | None = Field(
        None, description="JSON/YAML file with `models` (or model_name/model_version), watched for changes (a Helm "
                          "ConfigMap)")
    ready_policy: Literal["all", "any"] = Field(
        "all", description="server readiness: every desired model validated and serving (all), or at least one (any)")
    memory_budget_bytes: int | None = Field(
        None, gt=0, description="memory the models' engines may use together, bytes (unset: what the kernel reports "
                                "available, less memory_reserve_bytes; Jetson RAM is shared by CPU and GPU)")
    memory_reserve_bytes: int = Field(
        256 << 20, ge=0, description="memory left to the rest of the device when no budget is set, bytes")

    # --- where artifacts come from (credentials: boto3's chain, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint; unset for AWS S3")
    s3_bucket: str = Field("edgeloop", description="bucket")
    s3_prefix: str = Field("", description="key prefix before models/")
    s3_connect_timeout_s: float = Field(2.0, gt=0, description="S3 connect timeout, seconds")
    s3_read_timeout_s: float = Field(
        3.0, gt=0, description="S3 read timeout: longest silence within a response, seconds (what a hung endpoint "
                               "costs per attempt)")
    s3_max_attempts: int = Field(2, ge=1, description="boto3 attempts per S3 request (downloads also resume)")
    verify_key_file: Path | None = Field(
        None, description="ed25519 public key (PEM) trusted for manifests; else EDGELOOP_VERIFY_KEY[_FILE]")

    # --- local cache
    cache_dir: Path = Field(Path("/var/cache/edgeloop"), description="artifact and engine cache (survives restarts)")
    cache_max_bytes: int = Field(4 << 30, gt=0, description="cache size cap in bytes; least recently used out first")

    # --- engines
    backend: Literal["auto", "tensorrt", "onnxruntime"] = Field("auto", description="engine backend")
    allow_cpu_fallback: bool = Field(
        False, description="on a Jetson whose TensorRT is unusable, serve with ONNX Runtime on the CPU (else refuse)")
    device_module: str | None = Field(
        None, description="Jetson module (orin-nx, orin-nano, agx-orin) where the device-tree model is not mounted")
    device_model_file: Path = Field(Path("/proc/device-tree/model"), description="the Jetson module's name")
    tegra_release_file: Path = Field(Path("/etc/nv_tegra_release"), description="the L4T release")
    variant: str | None = Field(
        None, description="force a manifest variant (default: the fastest validated one, measured on this device)")
    variant_choice_budget_s: float = Field(
        2.0, ge=0, description="seconds of timing per candidate variant when choosing the fastest (0: no measuring, "
                               "the first compatible variant in preference order)")
    variant_objective: Literal["balanced", "latency", "throughput", "energy"] = Field(
        "balanced", description="what the measured variant choice optimises among the variants that pass validation: "
                                "the geometric mean of per-sample p50 at batch 1 and at the serving batch (balanced), "
                                "batch-1 p50 (latency), per-sample p50 at the serving batch (throughput), or the "
                                "module's mJ per inference from its power rails (energy; without rails: balanced)")
    power_root: Path = Field(
        Path("/"), description="where /sys is read from for the INA3221 power rails (energy per inference); a path "
                               "without them turns energy measuring off")
    power_rails: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="INA3221 rail labels whose sum is the module's power (comma-separated; "
                                          "empty: VDD_IN, or every rail where there is none, as on AGX Orin)")
    power_sample_period_ms: float = Field(
        10.0, gt=0, description="power sampling period during timing runs, ms (the energy is the trapezoid integral)")
    share_engines: bool = Field(False, description="upload engines this device built to S3 for identical devices")
    engine_signing_key_file: Path | None = Field(
        None, description="fleet build key (ed25519 PEM) that signs engines this device shares; needed to share")
    engine_verify_key_file: Path | None = Field(
        None, description="fleet build public key: a shared engine is used only with its valid signature")
    opt_batch_size: int = Field(8, gt=0, description="TensorRT optimization-profile opt batch")

    # --- validation
    latency_budget_p99_ms: float | None = Field(None, gt=0, description="fail validation above this batch-1 p99")

    # --- serving
    serving_engine: Literal["builtin", "triton"] = Field(
        "builtin", description="who serves the inference port: edgeloop's embedded server (builtin), or a supervised "
                               "NVIDIA Triton that edgeloop builds, validates and swaps models for (triton)")
    triton_home: Path | None = Field(
        None, description="a Triton install (bin/tritonserver, backends/), e.g. /opt/tritonserver (engine triton)")
    triton_python: Path | None = Field(
        None, description="else: the python of a virtualenv with nvidia-pytriton (its tritonserver), numpy<2 and "
                          "onnxruntime (engine triton)")
    triton_backend: Literal["auto", "onnxruntime", "python", "edgeloop"] = Field(
        "auto", description="what runs ONNX Runtime engines in Triton: Triton's native onnxruntime backend where the "
                            "Triton install has it, else Triton's Python backend (auto); onnxruntime or python: that "
                            "one; edgeloop: edgeloop's own C backend in tritonserver's process, opt-in (needs a C "
                            "compiler or a prebuilt library) (engine triton)")
    triton_metrics_port: int = Field(8002, ge=0, le=65535, description="Triton's Prometheus port (0: pick one)")
    control_port: int = Field(
        8005, ge=0, le=65535, description="with engine triton, edgeloop's own gRPC (health, readiness, repository "
                                          "control) moves here; Triton takes grpc_port (0: pick one)")
    bind_address: str = Field("127.0.0.1", description="address the gRPC and metrics servers bind to")
    grpc_port: int = Field(8001, ge=0, le=65535, description="Open Inference Protocol gRPC port (0: pick one)")
    metrics_port: int = Field(9091, ge=0, le=65535, description="Prometheus /metrics port (0: disabled)")
    max_batch_size: int = Field(16, gt=0, description="dynamic batching: most samples in one engine run (1: off)")
    max_queue_delay_us: int = Field(
        0, ge=0, description="extra wait for company when the engine is free and the batch not full, µs (0: none; "
                             "batches form from what queues while the engine is busy)")
    company_queue_delay_us: int = Field(
        3000, ge=0, description="wait for company while waiting brings it, µs: under load a Python gRPC layer hands "
                                "requests over one at a time, and a fuller batch costs less per request; a short "
                                "probe (about 0.3 ms; 16 runs apart, doubling to 256 while probes find nobody) starts "
                                "it, two waits that bring nobody stop it, so a lone client waits only on probes (0: "
                                "off; capped by the batching budget's slack)")
    max_request_batch_size: int = Field(
        256, gt=0, description="most samples one request may carry (larger than an engine run: split and rejoined)")
    ort_intra_op_threads: int = Field(
        0, ge=0, description="ONNX Runtime threads per run (0: one per core this process may use, its CPU "
                          "affinity; never ONNX Runtime's own default, which pins a worker to every core of the "
                          "machine, past taskset and cpusets)")
    ort_spin_wait: bool | None = Field(
        None, description="ONNX Runtime worker threads spin between runs (unset: only on CPUs with more than 4 cores; "
                          "spinning burns a core a small device needs)")
    max_message_bytes: int = Field(16 << 20, gt=0, description="gRPC max receive/send message size, bytes")
    shm_release_after_s: float = Field(
        10.0, ge=0, description="a shared-memory region is released this long after the connection that registered "
                                "it closed (0: only when unregistered); one whose object was deleted or replaced, "
                                "at once")
    health_port: int = Field(
        0, ge=0, le=65535, description="also serve grpc.health.v1 alone, in plaintext, on this port, for gRPC probes "
                                       "when the endpoint uses TLS (0: off); no inference or control there")
    tls_cert_file: Path | None = Field(None, description="server certificate (PEM): set with tls_key_file for TLS")
    tls_key_file: Path | None = Field(None, description="server private key (PEM)")
    tls_client_ca_file: Path | None = Field(
        None, description="CA (PEM) for client certificates: set, every client must present one (mutual TLS)")
    repository_control: bool = Field(
        False, description="allow RepositoryModelLoad/Unload (with control_token or a certificate in "
                           "control_client_names)")
    control_token: SecretStr | None = Field(
        None, description="bearer token that allows the repository-control RPCs")
    control_client_names: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="client-certificate names (subject CN or a SAN; comma-separated) allowed repository control under "
                    "mutual TLS; any other certificate may infer but not load or unload")
    batching_budget_ms: float | None = Field(
        None, gt=0, description="after validation, sweep batch sizes and pick batching limits within this latency, ms")

    # --- the life cycle loop
    poll_interval_s: float = Field(30.0, gt=0, description="how often the channel pointer is re-read, seconds")
    retry_initial_s: float = Field(2.0, gt=0, description="first back-off after a failure, seconds")
    retry_max_s: float = Field(300.0, gt=0, description="back-off cap, seconds")
    liveness_timeout_s: float = Field(
        1800.0, gt=0, description="a life-cycle loop silent this long turns liveness off, seconds; bytes arriving "
                                  "for a download and a finished build count as life, a stalled one does not")
    fetch_attempts: int = Field(8, gt=0, description="attempts per file download before the cycle fails")

    # --- identity and telemetry
    device_id: str = Field(default_factory=socket.gethostname, description="device id (default: host name)")
    hub_address: str | None = Field(None, description="telemetry hub host:port; unset: telemetry stays in the outbox")
    hub_token: SecretStr | None = Field(None, description="device token for the hub")
    hub_tls_ca_file: Path | None = Field(None, description="CA (PEM) that signed the hub's certificate: set, use TLS")
    hub_tls_cert_file: Path | None = Field(None, description="client certificate (PEM) for a mutual-TLS hub")
    hub_tls_key_file: Path | None = Field(None, description="client private key (PEM) for a mutual-TLS hub")
    outbox_max_events: int = Field(
        10_000, ge=100, description="outbox cap: above it the oldest stats events go (state changes never)")
    telemetry_interval_s: float = Field(30.0, gt=0, description="period of stats events and outbox flushes, seconds")
    field_stats_rate: float = Field(
        0.1, ge=0, le=1, description="share of answered requests counted into the field statistics the hub compares "
                                     "with the training data for drift (0: off; only counts per bin leave the device)")
    field_stats_min_samples: int = Field(
        200, ge=1, description="samples a model's field statistics gather before a stats event carries them (fewer "
                               "say too little about a distribution)")
    kube_node_name: str | None = Field(
        None, description="this pod's node (downward API); set: read its labels, write edgeloop.io/* annotations")

    _names = field_validator("model_name", "model_version")(_checked_name)

    @field_validator("control_client_names", "power_rails", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        if isinstance(value, str):  # EDGE_CONTROL_CLIENT_NAMES=edge-admin,ops.example.com
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("models")
    @classmethod
    def _unique(cls, value: list[ModelEntry]) -> list[ModelEntry]:
        return unique_models(value)

    def desired_models(self) -> list[ModelEntry]:
        """The models the settings name: ``models``, or the one ``model_name``/``model_version`` with ``variant``."""
        return list(self.models) or [ModelEntry(name=self.model_name, version=self.model_version,
                                                variant=self.variant)]

    @classmethod
    def load(cls, file: Path | None = None, **overrides: Any) -> EdgeSettings:  # noqa: ANN401 - CLI flag values
        """Defaults < ``file`` (JSON or YAML) < ``EDGE_*`` environment < ``overrides`` (CLI flags; ``None`` skipped)."""
        try:
            from_env = cls()
            merged = {
                **(read_settings_file(file) if file is not None else {}),
                **{name: getattr(from_env, name) for name in from_env.model_fields_set},
                **{k: v for k, v in overrides.items() if v is not None},
            }
            return cls(**merged)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"setting {where}: {first['msg']}") from exc


def unique_models(entries: list[ModelEntry]) -> list[ModelEntry]:
    """``entries`` when no name repeats; else a ValueError naming the repeated one."""
    seen: set[str] = set()
    for entry in entries:
        if entry.name in seen:
            raise ValueError(f"model {entry.name!r} is listed twice")
        seen.add(entry.name)
    return entries


def read_settings_file(path: Path) -> dict[str, Any]:
    """A flat mapping of setting names from a JSON or YAML file; a bad file is a ConfigError."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read settings file {path}: {exc.strerror}") from exc
    try:
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text or "{}")
    except ValueError as exc:
        raise ConfigError(f"{path} does not parse: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of setting names to values")
    return data
