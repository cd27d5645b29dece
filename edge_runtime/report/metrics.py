"""Prometheus metrics of the edge runtime, on their own port (``/metrics``); model figures carry a ``model`` label."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from edge_runtime.states import State

STATES = tuple(s.value for s in State)


class RuntimeMetrics:
    """One registry per runtime (tests run several in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("edgeloop_requests", "Inference requests by model and gRPC status code (model \"\": "
                                "a name this device does not serve)", ["model", "code"], registry=self.registry)
        self.latency = Histogram("edgeloop_request_latency_seconds", "ModelInfer latency seconds", ["model"],
                                 buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                                 registry=self.registry)
        self.batch_size = Histogram("edgeloop_batch_size", "Samples per engine run (dynamic batching)", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.batch_seconds = Histogram("edgeloop_batch_seconds", "Engine run time per batch, seconds", ["model"],
                                       registry=self.registry)
        self.state = Gauge("edgeloop_model_state", "1 for the model's current life-cycle state", ["model", "state"],
                           registry=self.registry)
        self.model_ready = Gauge("edgeloop_model_ready", "1 when the model's desired version is validated and serving",
                                 ["model"], registry=self.registry)
        self.ready = Gauge("edgeloop_ready", "1 when the device is ready (EDGE_READY_POLICY: all or any model)",
                           registry=self.registry)
        self.validation = Gauge("edgeloop_validation_value", "Last on-device validation metric value", ["model"],
                                registry=self.registry)
        self.energy = Gauge("edgeloop_energy_millijoules_per_inference",
                            "Module energy per inference of the serving variant, mJ, from the power rails while it "
                            "was timed on this device (absent where there are no rails)", ["model", "variant"],
                            registry=self.registry)
        self._energy_labels: dict[str, tuple[str, str]] = {}

        self.jetson_gpu = Gauge("edgeloop_jetson_gpu_utilization_percent", "GPU load (devfreq)",
                                registry=self.registry)
        self.jetson_gpu_freq = Gauge("edgeloop_jetson_gpu_frequency_megahertz", "GPU clock (devfreq)",
                                     registry=self.registry)
        self.jetson_ram = Gauge("edgeloop_jetson_ram_used_megabytes", "RAM in use, shared by CPU and GPU",
                                registry=self.registry)
        self.jetson_temp = Gauge("edgeloop_jetson_temperature_celsius", "Thermal zones", ["zone"],
                                 registry=self.registry)
        self.jetson_power = Gauge("edgeloop_jetson_power_milliwatts", "Power rails (INA3221)", ["rail"],
                                  registry=self.registry)
        self.jetson_available = Gauge("edgeloop_jetson_figure_available",
                                      "1 when a Jetson figure could be read, 0 when not (the reason is in telemetry)",
                                      ["figure"], registry=self.registry)

    def observe_jetson(self, sample) -> None:  # noqa: ANN001 - edge_runtime.report.jetson.JetsonSample
        """Mirror the latest Jetson sample, and which figures could not be read."""
        for figure in ("gpu_utilization", "gpu_frequency", "ram", "temperatures", "power"):
            self.jetson_available.labels(figure).set(0.0 if figure in sample.unavailable else 1.0)
        if sample.gpu_utilization_pct is not None:
            self.jetson_gpu.set(sample.gpu_utilization_pct)
        if sample.gpu_freq_mhz is not None:
            self.jetson_gpu_freq.set(sample.gpu_freq_mhz)
        if sample.ram_used_mb is not None:
            self.jetson_ram.set(sample.ram_used_mb)
        for zone, celsius in sample.temperatures_c.items():
            self.jetson_temp.labels(zone).set(celsius)
        for rail, milliwatts in sample.power_mw.items():
            self.jetson_power.labels(rail).set(milliwatts)

    def observe_batch(self, model: str, rows: int, seconds: float) -> None:
        """Called by a model's batcher after each engine run."""
        self.batch_size.labels(model).observe(rows)
        self.batch_seconds.labels(model).observe(seconds)

    def set_state(self, model: str, state: str, ready: bool, validation: float | None) -> None:
        """Mirror one model's state."""
        for name in STATES:
            self.state.labels(model, name).set(1.0 if name == state else 0.0)
        self.model_ready.labels(model).set(1.0 if ready else 0.0)
        if validation is not None:
            self.validation.labels(model).set(validation)

    def set_energy(self, model: str, variant: str | None, mj_per_inference: float | None) -> None:
        """Mirror the serving variant's energy per inference (mJ); ``None`` removes the series (absent, never 0)."""
        old = self._energy_labels.pop(model, None)
        if old is not None and (mj_per_inference is None or old != (model, variant or "")):
            self.energy.remove(*old)
        if mj_per_inference is not None:
            labels = (model, variant or "")
            self.energy.labels(*labels).set(mj_per_inference)
            self._energy_labels[model] = labels

    def serve(self, address: str, port: int) -> None:
        """Start the HTTP exporter thread."""
        start_http_server(port, addr=address, registry=self.registry)
