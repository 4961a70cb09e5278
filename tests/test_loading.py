"""Loading decisions: tokens per frame under the pixel limits, dtype and attention choice, load failures."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
import torch
from _tiny_models import tiny

from duokit.models import DEFAULT_MAX_PIXELS, load_vlm, loading
from duokit.models.loading import ModelLoadError, explain_load_error, pick_attn_implementation, resolve_dtype
from duokit.models.qwen_vl import QwenVLAdapter

ROOT = Path(__file__).resolve().parent.parent
# Qwen/Qwen2.5-VL-3B-Instruct's preprocessor_config.json (the video processor reads it: there is no
# video_preprocessor_config.json), the values that decide the resize.
QWEN2_5_VL_PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                           "merge_size": 2}


def qwen_adapter(video_processor, model_type="qwen2_5_vl", max_pixels=None, min_pixels=None):
    """A QwenVLAdapter around a bare video processor: all the resize rule needs, no weights."""
    adapter = QwenVLAdapter(SimpleNamespace(config=SimpleNamespace(model_type=model_type)),
                            SimpleNamespace(video_processor=video_processor))
    adapter.set_pixel_limits(max_pixels, min_pixels)
    return adapter


def processor_grid(adapter, num_frames, height, width):
    frames = np.zeros((num_frames, height, width, 3), dtype=np.uint8)
    metadata = [{"fps": 1.0, "total_num_frames": num_frames}]
    out = adapter.processor.video_processor(videos=[frames], video_metadata=metadata, do_sample_frames=False,
                                            return_tensors="pt", **adapter.size_kwargs(num_frames))
    return tuple(out["video_grid_thw"][0].tolist())


# (width, height): tokens per frame with the checkpoint's own limits, and under duokit's default cap.
QWEN2_5_TOKENS = {(64, 64): (2.0, 2.0), (448, 252): (72.0, 72.0), (640, 360): (149.5, 126.0),
                  (1280, 720): (598.0, 126.0), (1920, 1080): (1345.5, 126.0)}


@pytest.mark.parametrize("size", QWEN2_5_TOKENS)
def test_qwen2_5_vl_tokens_per_frame_from_the_published_processor_config(size):
    from transformers import Qwen2VLVideoProcessor

    processor = Qwen2VLVideoProcessor(**QWEN2_5_VL_PREPROCESSOR)
    width, height = size
    own, capped = QWEN2_5_TOKENS[size]
    for max_pixels, expected in ((QWEN2_5_VL_PREPROCESSOR["max_pixels"], own), (None, capped)):
        adapter = qwen_adapter(processor, max_pixels=max_pixels)
        t, h, w = processor_grid(adapter, 8, height, width)
        assert (t, h, w) == adapter.video_grid(8, height, width)
        assert t * h * w / 4 / 8 == expected == adapter.tokens_per_frame(64, height, width)
    # The default cap: 448 x 448 px = 16 x 16 merged 28-px tiles = 128 tokens per frame at most.
    assert DEFAULT_MAX_PIXELS // (28 * 28) // 2 == 128


@pytest.mark.parametrize("num_frames", [8, 9, 64])
def test_qwen3_vl_budget_is_per_video_and_duokit_caps_each_frame(num_frames):
    from transformers import Qwen3VLVideoProcessor

    processor = Qwen3VLVideoProcessor(size={"shortest_edge": 4096, "longest_edge": 16384 * 32 * 32 * 4})
    for max_pixels in (None, 224 * 224, 10**7):
        adapter = qwen_adapter(processor, "qwen3_vl", max_pixels=max_pixels)
        grid = processor_grid(adapter, num_frames, 720, 1280)
        assert grid == adapter.video_grid(num_frames, 720, 1280)
        cap = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        assert grid[1] * grid[2] * 16 * 16 <= cap  # 16-px patches: each frame within the per-frame cap
    assert adapter.tokens_per_frame(64, 720, 1280) == 440.0  # 44 x 80 patches / (2 x 2) per frame


def test_pixel_limits_reach_the_processor_and_are_checked():
    _, _, adapter = tiny("qwen2_5_vl")
    frames = np.zeros((8, 112, 112, 3), dtype=np.uint8)
    before = adapter.build_prefix(frames, 2.0)
    try:
        adapter.set_pixel_limits(max_pixels=56 * 56)
        after = adapter.build_prefix(frames, 2.0)
    finally:
        adapter.set_pixel_limits()
    assert adapter.video_mask(before["input_ids"]).sum() == 4 * 16  # 112 px: 4 x 4 tokens per 2 frames
    assert adapter.video_mask(after["input_ids"]).sum() == 4 * 4  # 56 px: 2 x 2
    with pytest.raises(ValueError, match="min_pixels 5000 is more than max_pixels 4000"):
        adapter.set_pixel_limits(4000, 5000)
    with pytest.raises(ValueError, match="max_pixels must be >= 1"):
        load_vlm("tiny:qwen2_5_vl", max_pixels=0)
    with pytest.raises(ValueError, match="does not resize frames by pixel count"):
        load_vlm("tiny:llava_onevision", max_pixels=200704)


# ---------------------------------------------------------------------------------------------
# dtype and attention kernel.

def fake_gpu(monkeypatch, capability, total_bytes=16 * 2**30):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(total_memory=total_bytes))


@pytest.mark.parametrize("capability,model_type,params,expected", [
    ((8, 9), "qwen2_5_vl", 3_754_622_976, torch.bfloat16),
    ((7, 5), "llava_onevision", 893_000_000, torch.float16),
    ((7, 5), "qwen2_vl", 2_208_985_600, torch.float32),  # Qwen2-VL-2B: 8.2 GiB in fp32 on a 15 GiB T4
])
def test_auto_dtype_policy(monkeypatch, capability, model_type, params, expected):
    fake_gpu(monkeypatch, capability, total_bytes=15 * 2**30)
    config = SimpleNamespace(model_type=model_type)
    assert resolve_dtype("m", config, "cuda:0", "auto", num_params=params) == expected
    assert resolve_dtype("m", config, "cpu", "auto") == torch.float32
    assert resolve_dtype("m", config, "cuda:0", "float16", num_params=params) == torch.float16  # asked for


def test_qwen_vl_that_does_not_fit_in_float32_on_a_t4_is_refused_with_the_numbers(monkeypatch):
    fake_gpu(monkeypatch, (7, 5), total_bytes=15 * 2**30)
    with pytest.raises(ModelLoadError) as err:
        resolve_dtype("Qwen/Qwen2.5-VL-3B-Instruct", SimpleNamespace(model_type="qwen2_5_vl"), "cuda:0",
                      num_params=3_754_622_976)
    message = str(err.value)
    assert "Qwen/Qwen2.5-VL-3B-Instruct" in message and "sm75" in message and "13.99 GiB" in message
    assert "\n" not in message


def install_fake_flash_attn(monkeypatch, tmp_path):
    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text("__version__ = '0.0.fake'\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_flash_attention_is_chosen_only_where_it_runs(monkeypatch, tmp_path):
    fake_gpu(monkeypatch, (8, 0))
    assert pick_attn_implementation("cuda:0", torch.bfloat16) == "sdpa"  # flash_attn not installed
    install_fake_flash_attn(monkeypatch, tmp_path)
    assert loading.flash_attn_available()
    assert pick_attn_implementation("cuda:0", torch.bfloat16) == "flash_attention_2"
    assert pick_attn_implementation("cuda:0", "float16") == "flash_attention_2"
    assert pick_attn_implementation("cuda:0", torch.float32) == "sdpa"  # flash-attn 2 is fp16/bf16 only
    assert pick_attn_implementation("cpu", torch.bfloat16) == "sdpa"
    assert pick_attn_implementation("cuda:0", torch.bfloat16, "sdpa") == "sdpa"  # the override wins
    fake_gpu(monkeypatch, (7, 5))
    assert pick_attn_implementation("cuda:0", torch.float16) == "sdpa"  # T4: no flash-attn 2
    with pytest.raises(ValueError, match="compute capability 8.0"):
        pick_attn_implementation("cuda:0", torch.float16, "flash_attention_2")
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        pick_attn_implementation("cuda:0", torch.float16, "flash")


def test_load_vlm_passes_the_chosen_kernel_and_duo_still_sets_only_the_language_model(tmp_path):
    from duokit.methods import get_method
    from duokit.methods.duo.attention import ATTENTION_NAME
    from duokit.methods.duo.pattern import save_pattern

    model, _, adapter = load_vlm("tiny:qwen2_5_vl", attn_implementation="eager")
    assert model.config.get_text_config()._attn_implementation == "eager"
    assert model.config.vision_config._attn_implementation == "eager"
    save_pattern(tmp_path, [[0.9, 0.1], [0.2, 0.8]], sink_size=4, recent_size=8)
    with get_method("duo", pattern=str(tmp_path), sparsity=0.5, sink=4, recent=8).apply(model, adapter):
        assert model.config.get_text_config()._attn_implementation == ATTENTION_NAME
        assert model.config.vision_config._attn_implementation == "eager"
    assert model.config.get_text_config()._attn_implementation == "eager"
    assert load_vlm("tiny:qwen2_5_vl")[0].config.vision_config._attn_implementation == "sdpa"  # auto on CPU


# ---------------------------------------------------------------------------------------------
# Models that cannot be loaded: one line naming the model and the fix.

def test_a_hub_id_offline_gives_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "hf_not_a_real_token",
           "PYTHONPATH": str(ROOT)}
    videos = tmp_path / "videos"
    videos.mkdir()
    (tmp_path / "a.json").write_text("[]")
    result = subprocess.run([sys.executable, "-m", "duokit", "eval", "--model", "Qwen/Qwen2.5-VL-3B-Instruct",
                             "--annotations", str(tmp_path / "a.json"), "--videos", str(videos), "--frames", "8",
                             "--out", str(tmp_path / "run")], check=False, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "Qwen/Qwen2.5-VL-3B-Instruct" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert "hf_not_a_real_token" not in result.stderr + result.stdout


def test_train_duo_plan_offline_gives_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "duokit", "train-duo", "--model", "Qwen/Qwen2.5-VL-7B-Instruct",
                             "--out", str(tmp_path / "run"), "--plan"], check=False, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("duokit train-duo: error: model Qwen/Qwen2.5-VL-7B-Instruct: not in the local")
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_unsupported_architecture_gives_one_line(tmp_path):
    unknown, bert = tmp_path / "unknown", tmp_path / "bert"
    unknown.mkdir()
    bert.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "no_such_architecture"}))
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="not supported by the installed transformers") as err:
        load_vlm(str(unknown))
    assert str(unknown) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ModelLoadError, match="model type 'bert' is not supported by duokit") as err:
        load_vlm(str(bert))
    assert str(bert) in str(err.value)


def test_gated_and_unknown_repositories_name_the_fix(monkeypatch):
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    # huggingface_hub's errors wrap a response of the HTTP client it uses (httpx in 1.x, httpx2 in 2.x).
    http = importlib.import_module("httpx2" if huggingface_hub.__version__.startswith("2.") else "httpx")
    response = http.Response(401, request=http.Request("GET", "https://huggingface.co/x"))
    for cause, words in ((GatedRepoError("gated", response=response), "gated repository"),
                         (RepositoryNotFoundError("missing", response=response), "no such local folder")):
        err = OSError("transformers' wrapper")
        err.__cause__ = cause
        message = str(explain_load_error("meta-llama/Private", err))
        assert words in message and "meta-llama/Private" in message and "HF_TOKEN" in message
        assert "hf_not_a_real_token" not in message and "\n" not in message
