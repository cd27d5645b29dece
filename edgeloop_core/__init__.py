"""edgeloop's neutral core: the artifact contract, the error tree, the object store, TLS, the fleet's
node contract, the wire protocols and the measures shared by the pipeline, the hub and the device.

It imports nothing from ``edge_runtime``, ``components``, ``pipelines``, ``telemetry_hub`` or the ``edgeloop`` CLI,
needs no torch, and runs on Python 3.10+."""
