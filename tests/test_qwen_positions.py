"""Where Qwen-VL text after a video starts: Qwen's rule ("qwen", the default) and transformers 5.23's.

The reference below is Qwen's M-RoPE algorithm (qwen-vl-finetune/qwenvl/data/rope2d.py::get_rope_index_25
and get_rope_index_2; transformers <= 5.2), written here from its description, not from duokit's code: text
counts up by one on all 3 axes; the merged cell (i, j, k) of a video starting at position p gets
(p + floor(i * seconds_per_grid * tokens_per_second), p + j, p + k) (Qwen2-VL: p + i on the first axis);
text after a video starts one past the largest position so far.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from _tiny_models import tiny

from duokit.data.vnbench import official_prompt
from duokit.engine import LM, SampleInput, answer_tries
from duokit.methods import get_method
from duokit.models import load_vlm
from duokit.models.tiny import tiny_path

PROMPTS = [official_prompt(question, ["Alice", "Bob", "Carol", "Dave"])
           for question in ("What is the secret word?", "Which word appeared first?", "Who is shown?")]
# 16 frames at 0.35 fps (VNBench: 64 frames of ~3 min): 8 temporal cells 11.4 s apart, far past the
# tiny grid's 3 x 5 merged cells, the case where the two rules differ.
FPS = 0.35
QWEN_2_FAMILIES = ("qwen2_5_vl", "qwen2_vl")


def frames(count: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 96, 128, 3), dtype=np.uint8)


def prompt_inputs(adapter, videos: int):
    """Processor inputs of one prompt with `videos` videos (different lengths) before the question."""
    clips = [frames(16 - 4 * index, seed=index) for index in range(videos)]
    content = [{"type": "video"} for _ in clips] + [{"type": "text", "text": PROMPTS[0]}]
    text = adapter.processor.apply_chat_template([{"role": "user", "content": content}],
                                                 add_generation_prompt=True, tokenize=False)
    metadata = [adapter.video_kwargs(clip, FPS)["video_metadata"][0] for clip in clips]
    return adapter.processor(text=[text], videos=clips, return_tensors="pt", add_special_tokens=False,
                             videos_kwargs={"video_metadata": metadata, "do_sample_frames": False})


def qwen_reference_positions(model, inputs) -> torch.Tensor:
    """(3, 1, L) positions by Qwen's rule (see the module docstring)."""
    vision = model.config.vision_config
    merge = vision.spatial_merge_size
    video_token = model.config.video_token_id
    seconds = inputs.get("second_per_grid_ts")  # Qwen2.5-VL only
    ids = inputs["input_ids"][0].tolist()
    columns: list[tuple[int, int, int]] = []
    start, index, video = 0, 0, 0
    while index < len(ids):
        if ids[index] != video_token:
            columns.append((start, start, start))
            start, index = start + 1, index + 1
            continue
        t, h, w = inputs["video_grid_thw"][video].tolist()
        for i in range(t):
            time = i if seconds is None else int(i * float(seconds[video]) * vision.tokens_per_second)
            columns += [(start + time, start + j, start + k) for j in range(h // merge) for k in range(w // merge)]
        start = max(max(column) for column in columns) + 1
        index, video = index + t * (h // merge) * (w // merge), video + 1
    return torch.tensor(columns).T[:, None, :]


def rope_index(model, inputs) -> torch.Tensor:
    extra = {key: inputs[key] for key in ("video_grid_thw", "second_per_grid_ts") if key in inputs}
    positions, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                              **extra)
    return positions


def embed_with_rule(adapter, inputs, rule, monkeypatch):
    monkeypatch.setattr(adapter, "text_after_video", rule)
    return adapter.embed_prefix(inputs)


@pytest.mark.parametrize("videos", [1, 2])
@pytest.mark.parametrize("family", QWEN_2_FAMILIES)
def test_qwen_rule_equals_qwens_algorithm(family, videos, monkeypatch):
    model, _, adapter = tiny(family)
    inputs = prompt_inputs(adapter, videos)
    # The first video really is longer in time than across: its first axis goes past its spatial positions.
    video = adapter.video_mask(inputs["input_ids"]).tolist()
    start = video.index(True)
    cells = rope_index(model, inputs)[:, 0, start:video.index(False, start)]
    assert cells[0].max() > cells[1:].max()
    prefix = embed_with_rule(adapter, inputs, "qwen", monkeypatch)
    assert torch.equal(prefix.position_ids, qwen_reference_positions(model, inputs))
    assert prefix.next_position == int(prefix.position_ids[0, 0, -1]) + 1


@pytest.mark.parametrize("family", QWEN_2_FAMILIES)
def test_transformers_rule_is_get_rope_index_and_differs_from_qwens(family, monkeypatch):
    model, _, adapter = tiny(family)
    inputs = prompt_inputs(adapter, 1)
    transformers = embed_with_rule(adapter, inputs, "transformers", monkeypatch)
    assert torch.equal(transformers.position_ids, rope_index(model, inputs))
    qwen = embed_with_rule(adapter, inputs, "qwen", monkeypatch)
    video = qwen.video_mask
    after = int(video.nonzero()[-1, 0]) + 1
    assert torch.equal(qwen.position_ids[..., :after], transformers.position_ids[..., :after])
    assert (qwen.position_ids[:, 0, after] == qwen.position_ids[:, 0, video].max() + 1).all()
    assert (transformers.position_ids[:, 0, after] < transformers.position_ids[:, 0, video].max()).all()
    assert qwen.next_position > transformers.next_position


def test_qwen3_vl_rules_coincide(monkeypatch):
    """Qwen3-VL puts each frame in its own video run with one temporal index, so the video's largest
    position is on a spatial axis and transformers already starts the text one past it."""
    model, _, adapter = tiny("qwen3_vl")
    inputs = adapter.build_inputs(frames(), FPS, PROMPTS[0])
    qwen = embed_with_rule(adapter, inputs, "qwen", monkeypatch)
    assert torch.equal(qwen.position_ids, rope_index(model, inputs))
    assert torch.equal(qwen.position_ids, embed_with_rule(adapter, inputs, "transformers", monkeypatch).position_ids)


def test_qwen_rule_reaches_the_model(monkeypatch):
    model, _, adapter = tiny("qwen2_5_vl")
    method = get_method("baseline")
    answers = {}
    for rule in ("qwen", "transformers"):
        monkeypatch.setattr(adapter, "text_after_video", rule)
        with method.apply(model, adapter):
            result = answer_tries(LM(model, adapter), method, SampleInput(frames(), FPS), PROMPTS, chunk_size=32)
        answers[rule] = [answer.tokens for answer in result.answers]
    generated = []
    for prompt in PROMPTS:
        inputs = adapter.build_inputs(frames(), FPS, prompt)
        output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        generated.append(output[0, inputs["input_ids"].shape[1]:].tolist())
    assert answers["transformers"] == generated
    assert answers["qwen"] != generated


def test_unknown_rule_is_refused(monkeypatch):
    _, _, adapter = tiny("qwen2_5_vl")
    with pytest.raises(ValueError, match="text_after_video must be one of"):
        embed_with_rule(adapter, adapter.build_inputs(frames(), FPS, PROMPTS[0]), "max", monkeypatch)


def test_load_vlm_takes_the_rule_from_duokit_json(tmp_path):
    assert load_vlm("tiny:qwen2_5_vl")[2].text_after_video == "qwen"
    assert load_vlm("needlenet", device="cpu")[2].text_after_video == "transformers"
    model_dir = tmp_path / "qwen"
    shutil.copytree(tiny_path("qwen2_5_vl"), model_dir)
    (model_dir / "duokit.json").write_text(json.dumps({"text_after_video": "transformers"}))
    assert load_vlm(str(model_dir))[2].text_after_video == "transformers"
    (model_dir / "duokit.json").write_text(json.dumps({"text_after_video": "latest"}))
    with pytest.raises(ValueError, match=r"duokit\.json: text_after_video 'latest'"):
        load_vlm(str(model_dir))
    text_dir = tmp_path / "llama"
    shutil.copytree(tiny_path("llama"), text_dir)
    (text_dir / "duokit.json").write_text(json.dumps({"text_after_video": "qwen"}))
    with pytest.raises(ValueError, match="not a rule of llama models"):
        load_vlm(str(text_dir))


def test_needlenet_records_the_rule_it_was_trained_with(tmp_path):
    from duokit.models.needlenet.config import TrainSettings, build_model, build_processor
    from duokit.models.needlenet.train import save_model

    processor = build_processor()
    settings = TrainSettings()
    saved = save_model(build_model(processor.tokenizer, settings), processor, settings, tmp_path / "model", {})
    assert json.loads((saved / "duokit.json").read_text())["text_after_video"] == "transformers"
    assert load_vlm(str(saved), device="cpu")[2].text_after_video == "transformers"
