"""Bring your own ONNX: import → quantize/convert → agreement gate → publish (the same contract and edge)."""

from kfp import dsl

from components import steps

PIPELINE_NAME = "edgeloop-import-onnx"


@dsl.pipeline(name=PIPELINE_NAME, description="Quantize an existing ONNX model, gate on output agreement, publish.")
def import_onnx_pipeline(
    onnx_uri: str,
    calibration_uri: str,
    model_name: str,
    holdout_fraction: float = 0.25,
    calibration_layout: str = "NCHW",
    calibration_scale: float = 1 / 255,
    calibration_mean: str = "0",
    calibration_std: str = "1",
    calibration_samples: int = 512,
    min_agreement: float = 0.98,
    tolerance: float = 0.01,
    bucket: str = "edgeloop",
    prefix: str = "",
    channel: str = "stable",
    s3_endpoint: str = "",
    task: str = "",
    layout: str = "",
    slices: str = "",
    nms: bool = False,
    max_detections: int = 100,
    score_threshold: float = 0.25,
    iou_threshold: float = 0.45,
    labels_uri: str = "",
) -> None:
    """``task`` (classification, detection, keyword_spotting, embedding or raw) and ``layout`` (a detector's: yolov5,
    yolov8, end2end or separate) say what the outputs mean where the model cannot; empty: inferred from the graph.
    A detector's ``score_threshold`` and ``iou_threshold`` go into its task; ``nms`` (YOLOv5/v8/v11 layouts) appends
    decode and NMS to every variant after quantization, at most ``max_detections`` boxes per image, so apps get
    boxes, scores, classes and num_detections over OIP. ``labels_uri``: COCO labels of the calibration rows' images
    (image ``i`` is row ``i`` of the .npz): the held-out rows' labels go into ``validation.npz``, every variant gets
    its mAP, and the device validates by mAP@0.5 against them."""
    imported = steps.import_onnx(onnx_uri=onnx_uri, calibration_uri=calibration_uri,
                                 holdout_fraction=holdout_fraction, calibration_layout=calibration_layout,
                                 calibration_scale=calibration_scale, calibration_mean=calibration_mean,
                                 calibration_std=calibration_std, calibration_samples=calibration_samples,
                                 task=task, layout=layout, slices=slices, nms=nms, max_detections=max_detections,
                                 score_threshold=score_threshold, iou_threshold=iou_threshold,
                                 labels_uri=labels_uri)
    imported.set_caching_options(False)
    gate = steps.evaluate_agreement(onnx_models=imported.outputs["onnx_models"], holdout=imported.outputs["holdout"],
                                    min_agreement=min_agreement)
    published = steps.publish_onnx(
        onnx_models=imported.outputs["onnx_models"], holdout=imported.outputs["holdout"],
        gate=gate.outputs["metrics"], model_name=model_name, bucket=bucket, prefix=prefix, channel=channel,
        s3_endpoint=s3_endpoint, tolerance=tolerance,
    )
    published.set_caching_options(False)
