"""The clip model on its own (no pipeline run): what it accepts, how it exports, what FastNAS may prune in it, and
how the pipeline refuses a clip model on images and an image model on clips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from components.action_data import ACTIONS
from components.data import load_dataset, load_digits_dataset, load_synthetic_actions
from components.models import ModelSpec, build_model
from edgeloop_core.contract import Clip, Preprocessing
from edgeloop_core.errors import ConfigError


def test_the_clip_model_exports_plain_5d_convolutions_with_a_dynamic_batch(tmp_path):
    import onnx

    from components.export import export_onnx, run_onnx

    torch.manual_seed(0)
    model = build_model(ModelSpec("r2plus1d", 1, 32, len(ACTIONS), frames=8)).eval()
    path = export_onnx(model, tmp_path / "clip.onnx", (1, 8, 32, 32))
    graph = onnx.load(str(path)).graph
    assert {node.op_type for node in graph.node} <= {"Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm", "Identity"}
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, 8, 32, 32]  # NCTHW, no transpose in front of the first convolution
    x = np.random.default_rng(0).random((3, 1, 8, 32, 32), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    for n in (1, 3):
        np.testing.assert_allclose(run_onnx(path, x[:n]), expected[:n], atol=1e-4)


def test_fastnas_prunes_the_3d_convolutions_in_steps_of_16():
    import modelopt.torch.nas as mtn
    from modelopt.torch.opt.utils import named_hparams

    from components.prune import FASTNAS_RULES

    model = mtn.convert(build_model(ModelSpec("r2plus1d", 1, 32, 7, frames=8)), mode=[("fastnas", FASTNAS_RULES)])
    choices = {name: hp.choices for name, hp in named_hparams(model, configurable=True)}
    # both (2+1)D blocks' channels: without Conv3d/BatchNorm3d rules, only the last could be cut, to 32
    assert [c for c in choices.values()] == [[16, 32], [16, 32], [16, 32, 48, 64]], choices


def test_arch_and_data_must_agree_for_clips():
    from components.train import train_model

    actions = load_synthetic_actions(sizes=(14, 7, 7))
    with pytest.raises(ConfigError) as clip_model_on_digits:
        train_model(load_digits_dataset(), arch="r2plus1d", epochs=1, progress=False)
    with pytest.raises(ConfigError) as image_model_on_clips:
        train_model(actions, arch="cnn", epochs=1, progress=False)
    assert "is classification data" in str(clip_model_on_digits.value)
    assert "is clip data" in str(image_model_on_clips.value) and "set arch to one of r2plus1d" in str(
        image_model_on_clips.value)
    _, spec, history = train_model(actions, arch="r2plus1d", epochs=1, progress=False)
    assert (spec.in_channels, spec.frames, spec.image_size, spec.width) == (1, 8, 32, None)
    assert len(history.epochs) == 1


def test_the_action_set_describes_its_clips():
    data = load_dataset("synthetic-actions")
    assert data.input_shape == (1, 8, 32, 32) and data.labels == list(ACTIONS) and data.task == "classification"
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (1050, 210, 490)
    assert np.bincount(data.y_test).tolist() == [70] * len(ACTIONS)
    assert data.preprocessing.layout == "NCTHW"
    assert data.preprocessing.clip == Clip(frames=8, fps=8.0, stride=1, layout="NCTHW")
    assert load_digits_dataset().preprocessing.clip is None
    train = {clip.tobytes() for clip in data.x_train[:, 0, 0]}
    assert not any(clip.tobytes() in train for clip in data.x_test[:, 0, 0])  # split by seed: no clip in two splits
    with pytest.raises(ValidationError):
        Clip(frames=8, fps=0.0)


def test_the_clip_is_part_of_the_preprocessing_and_agrees_with_its_layout():
    clip = Clip(frames=16, fps=25.0, stride=4, layout="NTCHW")
    assert Preprocessing(layout="NTCHW", clip=clip).clip == clip
    with pytest.raises(ValidationError, match="differs from its clip"):
        Preprocessing(layout="NCTHW", clip=clip)
