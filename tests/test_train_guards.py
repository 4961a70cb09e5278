"""`train-duo` defaults and guards: frame size per model, sequences longer than sink + recent."""

from __future__ import annotations

import json
import shutil

import pytest

from duokit.cli import main
from duokit.data.synth.training import TrainingConfig
from duokit.methods.duo.train import (
    MIN_LENGTH_RATIO,
    SMALL_FRAME_SIZE,
    VLM_FRAME_SIZE,
    TrainSettings,
    check_settings_sequence_length,
    train_gates,
)
from duokit.methods.duo.train_data import VideoNeedleData
from duokit.models.tiny import tiny_path


@pytest.fixture(scope="module")
def published_resize(tmp_path_factory):
    """The tiny Qwen2.5-VL with the published checkpoints' resize limits (min 3,136 px, max 12,845,056)."""
    path = tmp_path_factory.mktemp("model") / "qwen"
    shutil.copytree(tiny_path("qwen2_5_vl"), path)
    config = json.loads((path / "processor_config.json").read_text())
    config["video_processor"]["size"] = {"shortest_edge": 3136, "longest_edge": 12845056}
    (path / "processor_config.json").write_text(json.dumps(config))
    return str(path)


def test_frame_size_defaults_per_model(published_resize):
    assert TrainSettings(model="tiny:qwen2_5_vl").frame_size == SMALL_FRAME_SIZE == (64, 64)
    assert TrainSettings(model="needlenet").frame_size == SMALL_FRAME_SIZE
    assert TrainSettings(model="Qwen/Qwen2.5-VL-3B-Instruct").frame_size == VLM_FRAME_SIZE == (448, 252)
    assert TrainSettings(model=published_resize).frame_size == VLM_FRAME_SIZE
    assert TrainSettings(model=published_resize, frame_size=(96, 64)).frame_size == (96, 64)


def test_64px_frames_on_a_real_processor_are_refused_with_the_numbers(published_resize, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train-duo", "--model", published_resize, "--out", str(run), "--frames", "32", "--no-progress"]
    assert main([*args, "--frame-size", "64", "64"]) == 1
    err = capsys.readouterr().err
    # 64x64 frames become 56x56: 2 x 2 merged tokens per 2 frames = 2 per frame, 64 for 32 frames.
    assert "a 32-frame 64x64 training video (64 video tokens, 2.0 per frame, with the prompt) has" in err
    assert f"at least {MIN_LENGTH_RATIO} x (sink 128 + recent 256) = 480" in err
    assert len(err.strip().splitlines()) == 1 and not run.exists()
    # The default frame size gives 72 tokens per frame: 2,304 video tokens, far above the window.
    check_settings_sequence_length(TrainSettings(model=published_resize, frames=(32,)))
    # A lower pixel cap is refused in the same way.
    with pytest.raises(ValueError, match=r"\(240 video tokens, 7.5 per frame"):
        check_settings_sequence_length(TrainSettings(model=published_resize, frames=(32,), max_pixels=112 * 112))


def test_passkey_contexts_shorter_than_the_window_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--context-min has 400 tokens"):
        check_settings_sequence_length(TrainSettings(model="tiny:llama", text_file="x.txt", context_min=400))


def test_every_example_is_checked_during_training(tmp_path):
    """Data passed in directly (NeedleNet's task, a script's own) is checked example by example."""
    settings = TrainSettings(model="tiny:qwen2_5_vl", steps=2, save_every=1, sink=4, recent=1000, frames=(8,),
                             frame_size=(56, 56), needles=(1, 1), progress=False)
    config = TrainingConfig(frame_counts=(8,), size=(56, 56), needles=(1, 1))
    with pytest.raises(ValueError, match=r"training example 0 has \d+ tokens, but gate training needs at least "
                                         r"1.25 x \(sink 4 \+ recent 1000\) = 1255"):
        train_gates(settings, tmp_path, data_source=lambda adapter: VideoNeedleData(adapter, config))
