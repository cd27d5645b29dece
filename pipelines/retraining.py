"""The retraining pipeline: (promote the canary), load data, mix in field data, plan, train (from scratch or warm
from the deployed version), prune, QAT, export, evaluate, report, gate, publish; or, when the plan skips training,
re-sign the channel pointers that expire soon.

The same steps train a classifier (``digits``, image folders, Speech Commands) or a detector (``data_uri=
synthetic-detection``, ``arch=detector``): each step judges the model by the data's task, top-1 accuracy or COCO
mAP@0.5. With the defaults (no field data, no canary) a run does what it did before the flywheel (docs/flywheel.md):
the field data step copies the dataset unchanged and the plan skips when data and config are unchanged."""

from kfp import dsl
from kfp.dsl.graph_component import GraphComponent

from components import steps

PIPELINE_NAME = "edgeloop-retraining"


S3_ENV_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
SIGNING_MOUNT = "/etc/edgeloop/signing"
VERIFY_MOUNT = "/etc/edgeloop/verify"
PROMOTE_RULES = {"min_devices": 1, "drift_margin": 0.05, "accuracy_margin_points": 1.0, "min_feedback": 20}
"""The canary rules of a scheduled promotion besides its window (``edgeloop fleet promote``'s defaults)."""


def build_pipeline(*, s3_secret: str | None = None, signing_secret: str | None = None,
                   train_gpus: int = 0, verify_secret: str | None = None) -> GraphComponent:
    """The pipeline, plus the wiring a Kubeflow cluster needs (all off by default, as ``kfp.local`` runs it):

    * ``s3_secret``: a Kubernetes Secret with ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, given as environment
      to the steps that touch S3 (promote, load data, field data, plan, train, evaluate, publish, resign channels);
    * ``signing_secret``: a Secret with ``signing-key.pem``, mounted only into the steps that sign (publish, promote,
      the step that re-signs channel pointers ahead of expiry when the plan skips training);
    * ``verify_secret``: a Secret (or any key material you are happy to mount) with ``verify-key.pem``, the public
      key the steps that use the deployed version check it with (field data's teacher, train's warm start,
      evaluate's comparison); without it they fall back to ``EDGELOOP_SIGNING_KEY[_FILE]``, which they do not get
      on a cluster, so a flywheel run on a cluster needs it;
    * ``train_gpus``: GPUs (``nvidia.com/gpu``) for train, prune and QAT.

    The hub's reader token (drift trigger, promote) comes from the environment variable ``HUB_READ_TOKEN`` of the
    plan and promote steps: on a cluster, add it to those steps' pods (e.g. a Secret as env) when ``hub_address``
    is set.
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
        field_snapshot: str = "",
        field_since: str = "",
        field_ratio: float = 0.3,
        field_slice_fraction: float = 0.3,
        teacher: str = "",
        teacher_min_confidence: float = 0.9,
        warm_start: bool = False,
        deployed_channel: str = "",
        field_gate: str = "beat",
        field_tolerance_points: float = 0.0,
        retrain_min_new_labels: int = 50,
        retrain_min_new_share: float = 0.0,
        retrain_drift_threshold: float = 0.0,
        hub_address: str = "",
        promote_from: str = "",
        promote_window_s: float = 600.0,
    ) -> None:
        s3 = {"bucket": bucket, "prefix": prefix, "s3_endpoint": s3_endpoint}
        with dsl.If(promote_from != "", name="promote-canary"):
            # the canary ring first: move the deployed channel to promote_from's version when the canary devices'
            # field signals allow (else it logs why and the run goes on). Nothing below waits for it: KFP forbids
            # depending on a task inside a dsl.If. kfp.local runs it first (declaration order); on a cluster it runs
            # beside load_data, so a promotion counts as "deployed" from the next run on.
            promoted = steps.promote(
                model_name=model_name, hub_address=hub_address, promote_from=promote_from,
                promote_to=deployed_channel, window_s=promote_window_s, **PROMOTE_RULES, **s3,
            )
            promoted.set_caching_options(False)
        data = steps.load_data(data_uri=data_uri, seed=seed, image_size=image_size, channels=channels)
        data.set_caching_options(False)  # the same URI may hold new data
        field = steps.field_data(
            dataset=data.outputs["dataset"], model_name=model_name, channel=channel,
            deployed_channel=deployed_channel, field_snapshot=field_snapshot, field_since=field_since,
            field_ratio=field_ratio, field_slice_fraction=field_slice_fraction, teacher=teacher,
            teacher_min_confidence=teacher_min_confidence, seed=seed, **s3,
        )
        field.set_caching_options(False)  # "latest" means the captures of now
        dataset = field.outputs["field_dataset"]
        decision = steps.plan(
            dataset=dataset, base_dataset=data.outputs["dataset"], model_name=model_name, channel=channel,
            arch=arch, epochs=epochs, lr=lr, seed=seed, prune_constraint=prune_constraint,
            prune_keep_fraction=prune_keep_fraction, prune_finetune_epochs=prune_finetune_epochs, qat_epochs=qat_epochs,
            tolerance_points=tolerance_points, calibration_samples=calibration_samples, min_speedup=min_speedup,
            force_retrain=force_retrain, deployed_channel=deployed_channel, warm_start=warm_start,
            retrain_min_new_labels=retrain_min_new_labels, retrain_min_new_share=retrain_min_new_share,
            retrain_drift_threshold=retrain_drift_threshold, hub_address=hub_address, **s3,
        )
        decision.set_caching_options(False)
        with dsl.If(decision.outputs["Output"] == "train", name="retrain"):
            fp32 = steps.train(dataset=dataset, arch=arch, epochs=epochs, lr=lr, seed=seed, warm_start=warm_start,
                               model_name=model_name, channel=channel, deployed_channel=deployed_channel, **s3)
            fp32.set_caching_options(False)  # a warm start reads the deployed version of now
            pruned = steps.prune(
                dataset=dataset, model=fp32.outputs["model"], constraint=prune_constraint,
                keep_fraction=prune_keep_fraction, finetune_epochs=prune_finetune_epochs, seed=seed,
            )
            quantized = steps.qat(dataset=dataset, model=pruned.outputs["pruned_model"],
                                  epochs=qat_epochs, seed=seed, calibration_samples=calibration_samples)
            onnx = steps.export(
                dataset=dataset, dense_model=fp32.outputs["model"],
                pruned_model=pruned.outputs["pruned_model"], qat_model=quantized.outputs["qat_model"],
                calibration_samples=calibration_samples, seed=seed,
            )
            evaluated = steps.evaluate(
                dataset=dataset, onnx_models=onnx.outputs["onnx_models"], tolerance_points=tolerance_points,
                min_speedup=min_speedup, min_score=min_score, model_name=model_name, channel=channel,
                deployed_channel=deployed_channel, field_gate=field_gate,
                field_tolerance_points=field_tolerance_points, **s3,
            )
            evaluated.set_caching_options(False)  # compares with the deployed version of now
            reported = steps.report(dataset=dataset, evaluation=evaluated.outputs["evaluation"],
                                    model_name=model_name)
            # the gate fails the run after the report is written (it shows every failure), before anything is
            # published
            gated = steps.gate(evaluation=evaluated.outputs["evaluation"]).after(reported)
            gated.set_caching_options(False)
            published = steps.publish(
                dataset=dataset, onnx_models=onnx.outputs["onnx_models"],
                evaluation=evaluated.outputs["evaluation"], report_html=reported.outputs["report_html"],
                model_name=model_name, channel=channel, tolerance_points=tolerance_points,
                plan_info=decision.outputs["plan_info"], dense_model=fp32.outputs["model"], **s3,
            ).after(gated)
            published.set_caching_options(False)  # every publish is a new version
        with dsl.If(decision.outputs["Output"] == "skip", name="keep-channels-signed"):
            # nothing to train: still re-sign pointers that expire within a third of their TTL, or a model that does
            # not change for 90 days would stop being accepted by its own fleet
            resigned = steps.resign_channels(model_name=model_name, **s3)
            resigned.set_caching_options(False)

        for task in (fp32, pruned, quantized):
            if train_gpus:
                task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(train_gpus)
        s3_tasks = [promoted, data, field, decision, fp32, evaluated, published, resigned]
        _wire_cluster(s3_tasks, s3_secret)
        _mount(signing_secret, [promoted, published, resigned],  # the steps that sign
               SIGNING_MOUNT, "EDGELOOP_SIGNING_KEY_FILE", "signing-key.pem")
        _mount(verify_secret, [field, fp32, evaluated],  # the steps that check the deployed version's signature
               VERIFY_MOUNT, "EDGELOOP_VERIFY_KEY_FILE", "verify-key.pem")

    return pipeline


def _wire_cluster(tasks: list[dsl.PipelineTask], s3_secret: str | None) -> None:
    """S3 credentials from the Secret ``s3_secret`` as environment of ``tasks``."""
    if s3_secret:
        from kfp import kubernetes

        for task in tasks:
            kubernetes.use_secret_as_env(task, secret_name=s3_secret, secret_key_to_env=S3_ENV_KEYS)


def _mount(secret: str | None, tasks: list[dsl.PipelineTask], mount_path: str, env: str, file: str) -> None:
    """The Secret ``secret`` mounted at ``mount_path`` into ``tasks``, with ``env`` naming ``file`` in it."""
    if secret:
        from kfp import kubernetes

        for task in tasks:
            kubernetes.use_secret_as_volume(task, secret_name=secret, mount_path=mount_path)
            task.set_env_variable(env, f"{mount_path}/{file}")


retraining_pipeline = build_pipeline()
"""The pipeline as ``kfp.local`` runs it (credentials from this process's environment)."""
