"""Field capture: the device's inputs and outputs, hard examples and ground truth, spooled on disk and sent home to
S3 as Parquet without slowing serving (docs/capture.md).

``worker`` (offer from the request path, judge, commit) → ``spool`` (crash-safe, bounded) → ``uploader`` (at least
once, back-off); ``rules`` judge hard examples by task, ``budget`` caps them, ``records`` is the Parquet schema,
``service`` the Label RPC, ``metrics`` what Prometheus sees."""

from edge_runtime.report.capture.metrics import CaptureMetrics
from edge_runtime.report.capture.uploader import Uploader
from edge_runtime.report.capture.worker import FieldCapture

__all__ = ["CaptureMetrics", "FieldCapture", "Uploader"]
