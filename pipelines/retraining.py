"""The retraining pipeline: load data, plan, train, prune, QAT, export, evaluate (gate), report, publish; or, when
the plan skips training, re-sign the channel pointers that expire soon.

The same steps train a classifier (``digits``, image folders, Speech Commands) or a detector (``data_uri=
synthetic-detection``, ``arch=detector``): each step judges the model by the data's task, top-1 accuracy or COCO
mAP@0.5."""

from kfp import dsl
from kfp.dsl.graph_component import GraphComponent

from components import steps

PIPELINE_NAME = "edgeloop-retraining"


S3_ENV_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
SIGNING_MOUNT = "/etc/edgeloop/signing"


def build_pipeline(*, s3_secret: str | None = None, signing_secret: str | None = None,
                   train_gpus: int = 0) -> GraphComponent:
    """The pipeline, plus the wiring a Kubeflow cluster needs (all off by default, as ``kfp.local`` runs it):

    * ``s3_secret``: a Kubernetes Secret with ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, given as environment
      to the steps that touch S3 (load data, plan, publish, resign channels);
    * ``signing_secret``: a Secret with ``signing-key.pem``, mounted into the publish step and the step that re-signs
      channel pointers ahead of expiry when the plan skips training;
    * ``train_gpus``: GPUs (``nvidia.com/gpu``) for train, prune and QAT.
    """

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="Train, prune, quantize, export, gate and publish a signed model version.")
    def pipeline(
        data_uri: str = "digits",
        model_name: str = "digits-cnn",
        arch: str = "cnn",
        epochs: int = 15,
        lr: float = 0.003,
        seed: int = 0,
        image_size: int = 32,
        channels: int = 1,
        prune_constraint: str = "flops",
        prune_keep_fraction: float = 0.6,
        prune_finetune_epochs: int = 8,
        qat_epochs: int = 3,
        tolerance_points: float = 1.0,
        calibration_samples: int = 512,
        min_speedup: float = 1.0,
        min_score: float = 0.0,
        bucket: str = "edgeloop",
        prefix: str = "",
        channel: str = "stable",
        s3_endpoint: str = "",
        force_retrain: bool = False,
    ) -> None:
        data = steps.load_data(data_uri=data_uri, seed=seed, image_size=image_size, channels=channels)
        data.set_caching_options(False)  # the same URI may hold new data
        decision = steps.plan(
            dataset=data.outputs["dataset"], model_name=model_name, bucket=bucket, prefix=prefix, channel=channel,
            s3_endpoint=s3_endpoint, arch=arch, epochs=epochs, lr=lr, seed=seed, prune_constraint=prune_constraint,
            prune_keep_fraction=prune_keep_fraction, prune_finetune_epochs=prune_finetune_epochs, qat_epochs=qat_epochs,
            tolerance_points=tolerance_points, calibration_samples=calibration_samples, min_speedup=min_speedup,
            force_retrain=force_retrain,
        )
        decision.set_caching_options(False)
        with dsl.If(decision.outputs["Output"] == "train", name="retrain"):
            fp32 = steps.train(dataset=data.outputs["dataset"], arch=arch, epochs=epochs, lr=lr, seed=seed)
            pruned = steps.prune(
                dataset=data.outputs["dataset"], model=fp32.outputs["model"], constraint=prune_constraint,
                keep_fraction=prune_keep_fraction, finetune_epochs=prune_finetune_epochs, seed=seed,
            )
            quantized = steps.qat(dataset=data.outputs["dataset"], model=pruned.outputs["pruned_model"],
                                  epochs=qat_epochs, seed=seed, calibration_samples=calibration_samples)
            onnx = steps.export(
                dataset=data.outputs["dataset"], dense_model=fp32.outputs["model"],
                pruned_model=pruned.outputs["pruned_model"], qat_model=quantized.outputs["qat_model"],
                calibration_samples=calibration_samples, seed=seed,
            )
            evaluated = steps.evaluate(dataset=data.outputs["dataset"], onnx_models=onnx.outputs["onnx_models"],
                                       tolerance_points=tolerance_points, min_speedup=min_speedup,
                                       min_score=min_score)
            reported = steps.report(dataset=data.outputs["dataset"], evaluation=evaluated.outputs["evaluation"],
                                    model_name=model_name)
            published = steps.publish(
                dataset=data.outputs["dataset"], onnx_models=onnx.outputs["onnx_models"],
                evaluation=evaluated.outputs["evaluation"], report_html=reported.outputs["report_html"],
                model_name=model_name, bucket=bucket, prefix=prefix, channel=channel, s3_endpoint=s3_endpoint,
                tolerance_points=tolerance_points, plan_info=decision.outputs["plan_info"],
            )
            published.set_caching_options(False)  # every publish is a new version
        with dsl.If(decision.outputs["Output"] == "skip", name="keep-channels-signed"):
            # nothing to train: still re-sign pointers that expire within a third of their TTL, or a model that does
            # not change for 90 days would stop being accepted by its own fleet
            resigned = steps.resign_channels(model_name=model_name, bucket=bucket, prefix=prefix,
                                             s3_endpoint=s3_endpoint)
            resigned.set_caching_options(False)

        for task in (fp32, pruned, quantized):
            if train_gpus:
                task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(train_gpus)
        if s3_secret or signing_secret:
            from kfp import kubernetes

            for task in (data, decision, published, resigned):
                if s3_secret:
                    kubernetes.use_secret_as_env(task, secret_name=s3_secret, secret_key_to_env=S3_ENV_KEYS)
            if signing_secret:
                for task in (published, resigned):  # the only steps that sign
                    kubernetes.use_secret_as_volume(task, secret_name=signing_secret, mount_path=SIGNING_MOUNT)
                    task.set_env_variable("EDGELOOP_SIGNING_KEY_FILE", f"{SIGNING_MOUNT}/signing-key.pem")

    return pipeline


retraining_pipeline = build_pipeline()
"""The pipeline as ``kfp.local`` runs it (credentials from this process's environment)."""
