"""Report: telemetry to the hub (with an on-disk outbox), Prometheus metrics, Jetson sensors, and this
node's annotations in Kubernetes."""
