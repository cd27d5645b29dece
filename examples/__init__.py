"""Example apps on the edge runtime's Open Inference Protocol endpoint (see ``docs/examples.md``)."""
