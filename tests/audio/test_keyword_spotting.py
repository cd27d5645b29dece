"""Keyword spotting: the Speech Commands loader, log-mel features, and the audio spectrogram transformer."""

from __future__ import annotations

import time

import numpy as np
import pytest

from components.data import load_dataset
from edgeloop_core.errors import InvalidInput
from edgeloop_core.features import MelConfig, log_mel, read_wav, write_wav
from tests.edge_runtime.test_triton import triton_python  # noqa: F401 - the fixture

CHANCE = 0.10
"""Ten keywords."""
REQUIRED_ACCURACY = 0.60
"""On clips spoken by a voice the model never heard in training: six times chance."""


def test_log_mel_of_a_tone_peaks_in_its_band(tmp_path):
    config = MelConfig()
    t = np.arange(config.sample_rate) / config.sample_rate
    features = log_mel(0.5 * np.sin(2 * np.pi * 1000 * t), config)
    assert features.shape == (1, config.n_mels, config.frames) == (1, 40, 98)
    low = log_mel(0.5 * np.sin(2 * np.pi * 300 * t), config)
    assert features[0, :, 50].argmax() > low[0, :, 50].argmax()
    write_wav(tmp_path / "tone.wav", 0.5 * np.sin(2 * np.pi * 1000 * t))
    from_file = log_mel(read_wav(tmp_path / "tone.wav"))
    loud = features > features.max() - 8  # 16-bit rounding only moves the near-silent bins
    np.testing.assert_allclose(from_file[loud], features[loud], atol=0.05)
    assert MelConfig.from_params(config.to_params()) == config


def test_wrong_wav_formats_are_refused(tmp_path):
    write_wav(tmp_path / "8k.wav", np.zeros(8000), sample_rate=8000)
    with pytest.raises(InvalidInput) as info:
        read_wav(tmp_path / "8k.wav")
    assert "16000 Hz" in str(info.value)
    (tmp_path / "junk.wav").write_bytes(b"RIFFnope")
    with pytest.raises(InvalidInput):
        read_wav(tmp_path / "junk.wav")


def test_speech_commands_layout_is_split_by_its_lists(speech_commands):
    data = load_dataset(str(speech_commands))
    assert data.labels == sorted(["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"])
    assert data.input_shape == (1, 40, 98)
    assert len(data.y_val) == len(data.y_test) == 30  # one voice, three speeds, ten words each
    assert len(data.y_train) == 2 * 120  # four voices x three speeds x ten words, clean and with noise
    assert data.preprocessing.kind == "spectrogram" and data.preprocessing.params["hop"] == 160
    assert abs(float(data.x_train.mean())) < 1e-3  # normalised with the training statistics


def test_audio_spectrogram_transformer_learns_the_keywords(speech_commands):
    from components.train import accuracy, train_model

    data = load_dataset(str(speech_commands))
    model, spec, _ = train_model(data, arch="ast", epochs=30, lr=2e-3, progress=False)
    assert (spec.image_size, spec.width) == (40, 98)
    held_out = accuracy(model, data.x_test, data.y_test)
    assert held_out >= REQUIRED_ACCURACY, f"{held_out:.2f} on an unseen voice (chance {CHANCE:.2f})"


@pytest.mark.integration
def test_keyword_spotting_through_pipeline_s3_runtime_and_tritonclient(speech_commands, local_s3, key_dir,
                                                                       edge_settings, tmp_path, triton_python):  # noqa: F811
    """kfp.local publishes an AST version to the real S3; the edge runtime validates and serves it; tritonclient
    sends held-out spectrograms and gets the keywords back; every request is captured, on the builtin server and
    with Triton as the data plane."""
    import tritonclient.grpc as triton

    from edgeloop_core.features import MelConfig
    from pipelines.local_run import run_local
    from tests.edge_runtime.conftest import RunningEdge

    mp = pytest.MonkeyPatch()
    for name, value in local_s3.env().items():
        mp.setenv(name, value)
    mp.setenv("EDGELOOP_SIGNING_KEY_FILE", str(key_dir / "signing-key.pem"))
    store = local_s3.store("kws")
    try:
        # the AST's attention width cannot shrink, so FastNAS can remove less than from the CNN: keep 80%
        result = run_local({"data_uri": str(speech_commands), "model_name": "kws-ast", "arch": "ast", "epochs": 30,
                            "lr": 0.002, "prune_keep_fraction": 0.8, "prune_finetune_epochs": 5, "qat_epochs": 2,
                            "tolerance_points": 100.0, "bucket": "kws", "s3_endpoint": local_s3.endpoint_url},
                           runs_dir=tmp_path / "runs")
    finally:
        mp.undo()
    manifest = result.manifest
    assert manifest is not None and manifest.preprocessing.kind == "spectrogram"
    assert MelConfig.from_params(manifest.preprocessing.params) == MelConfig()  # clients can rebuild the features
    assert manifest.inputs[0].shape == [-1, 1, 40, 98]
    assert manifest.variant("fp32-dense").accuracy >= REQUIRED_ACCURACY

    assert manifest.field_baseline is not None and "input:input:c0:mean" in manifest.field_baseline.features

    import json

    from tests.edge_runtime.conftest import assert_captured

    desired = tmp_path / "desired.json"  # field capture of every request: audio features come home as Parquet
    desired.write_text(json.dumps({"models": [{"name": "kws-ast", "capture": {"sample_rate": 1.0}}],
                                   "capture": {"shard_max_age_s": 0.2}}))
    edge = RunningEdge(edge_settings(store.bucket, desired_file=desired))
    try:
        edge.wait_ready()
        client = triton.InferenceServerClient(edge.address)
        data = load_dataset(str(speech_commands))
        correct, sent = 0, {}
        for start in range(0, len(data.y_test), 10):
            batch = data.x_test[start : start + 10].astype(np.float32)
            tensor = triton.InferInput("input", list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch)
            logits = client.infer("kws-ast", [tensor], request_id=f"kws-{start}").as_numpy("logits")
            sent[f"kws-{start}"] = (batch, logits)
            correct += int((logits.argmax(1) == data.y_test[start : start + 10]).sum())
        assert correct / len(data.y_test) >= REQUIRED_ACCURACY
        assert_captured(store, sent, "kws-ast")

        # `edgeloop edge infer` with WAV files, features computed from the manifest's settings
        import subprocess
        import sys
        from pathlib import Path

        manifest_file = tmp_path / "manifest.json"
        manifest_file.write_text(manifest.to_json())
        from edge_runtime.cli import wav_to_input

        listed = set((speech_commands / "testing_list.txt").read_text().split())
        order = [f"{w}/{p.name}" for w in data.labels for p in sorted((speech_commands / w).glob("*.wav"))
                 if f"{w}/{p.name}" in listed]  # the loader's order of the test split
        clips = [c for c in order if "_165_" in c]
        assert len(clips) == 10
        for clip in clips:
            x, labels = wav_to_input(speech_commands / clip, manifest_file)
            # the client computes exactly the features the model was trained and validated on
            np.testing.assert_allclose(x[0], data.x_test[order.index(clip)], rtol=1e-4, atol=1e-4)
            out = subprocess.run([str(Path(sys.executable).parent / "edgeloop"), "edge", "infer",
                                  str(speech_commands / clip), "--manifest", str(manifest_file), "--address",
                                  edge.address, "--model", "kws-ast"], capture_output=True, text=True, timeout=60,
                                 check=True).stdout
            tensor = triton.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            expected = labels[int(client.infer("kws-ast", [tensor]).as_numpy("logits").argmax())]
            assert out.startswith(f"{Path(clip).name}: {expected} ")
    finally:
        edge.stop()

    # the same model served by Triton (engine: triton, Python backend): its requests are captured too, through the tap
    from tests.edge_runtime.conftest import assert_captured, free_port

    edge = RunningEdge(edge_settings(store.bucket, desired_file=desired, serving_engine="triton",
                                     triton_python=triton_python, triton_backend="python", grpc_port=free_port(),
                                     triton_metrics_port=0, control_port=0, device_id="test-jetson-triton",
                                     cache_dir=tmp_path / "triton-device"))  # its own spool
    try:
        edge.wait_ready()
        # the runtime publishes the model's rates as it starts serving; Triton's model looks every LOOK_S
        from edge_runtime.serve.triton.backend.edgeloop_tap import LOOK_S
        from tests.edge_runtime.conftest import wait_until

        wait_until(lambda: "kws-ast" in edge.app.tap.publish()["models"])
        time.sleep(LOOK_S + 0.1)
        client = triton.InferenceServerClient(edge.address)
        sent = {}
        for start in range(0, 30, 10):
            batch = data.x_test[start : start + 10].astype(np.float32)
            tensor = triton.InferInput("input", list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch)
            sent[f"kws-triton-{start}"] = (batch, client.infer("kws-ast", [tensor], request_id=f"kws-triton-{start}")
                                           .as_numpy("logits"))
        # exactly the app's requests: the runtime's own through Triton (variant timing, batch sweep) are not field data
        assert_captured(store, sent, "kws-ast", device="test-jetson-triton")
    finally:
        edge.stop()


@pytest.mark.integration
def test_speech_commands_from_an_s3_prefix(speech_commands, store, s3_env):
    for path in sorted(p for p in speech_commands.rglob("*") if p.is_file()):
        store.put_file(f"datasets/kws/{path.relative_to(speech_commands)}", path)
    from_s3 = load_dataset(f"s3://{store.bucket}/datasets/kws")
    from_disk = load_dataset(str(speech_commands))
    assert from_s3.fingerprint() == from_disk.fingerprint()
    assert from_s3.source == f"s3://{store.bucket}/datasets/kws"
