"""Model adapters and tiny models: loading, geometry, prompt split, the prefix embedding path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny_models import tiny

from duokit.data.vnbench import official_prompt
from duokit.models import TINY_FAMILIES, adapter_for, load_vlm
from duokit.models.tiny import cache_root

VLM_FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "llava_onevision")
TEXT_FAMILIES = ("llama", "mistral", "qwen2")
PROMPT = official_prompt("What is the secret word?", ["Alice", "Bob", "Carol", "Dave"])


def frames(count: int = 8, height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def test_every_tiny_family_is_covered():
    assert set(TINY_FAMILIES) == set(VLM_FAMILIES) | set(TEXT_FAMILIES)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_loads_from_its_saved_directory(family):
    model, processor, adapter = tiny(family)
    assert model.config.model_type == family
    assert adapter.processor is processor
    assert model.config.name_or_path.startswith(str(cache_root() / "tiny" / family))
    assert model.dtype == torch.float32 and model.device.type == "cpu"  # dtype/device "auto" on CPU
    assert not model.training
    assert (adapter.num_layers, adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (2, 4, 2, 16)
    assert len(adapter.decoder_layers) == 2
    assert adapter.is_multimodal == (family in VLM_FAMILIES)
    assert adapter.eos_token_ids == {adapter.tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_tiny_builds_are_seeded(tmp_path, monkeypatch):
    weights = []
    for root in ("a", "b"):
        monkeypatch.setenv("DUOKIT_CACHE", str(tmp_path / root))
        model, _, _ = load_vlm("tiny:llama")
        weights.append(model.state_dict())
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_tokenizer_round_trips_any_text():
    _, _, adapter = tiny("qwen2_5_vl")
    text = "Qu'est-ce que c'est ? 12 ½ — ✓\nA. x"
    ids = adapter.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert adapter.tokenizer.decode(ids) == text


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_prefix_and_suffix_make_the_full_prompt(family):
    _, _, adapter = tiny(family)
    video = frames()
    full = adapter.build_inputs(video, 2.0, PROMPT)
    prefix = adapter.build_prefix(video, 2.0)
    suffix = adapter.suffix_ids(PROMPT)
    assert torch.equal(torch.cat([prefix["input_ids"], suffix], dim=1), full["input_ids"])
    assert adapter.video_mask(prefix["input_ids"]).sum() == adapter.video_mask(full["input_ids"]).sum() > 0
    assert not adapter.video_mask(suffix).any()
    if family.startswith("qwen"):
        assert torch.equal(full["mm_token_type_ids"][0] == 2, adapter.video_mask(full["input_ids"]))
    # The suffix is the question onwards; the prefix does not depend on the question.
    assert adapter.tokenizer.decode(suffix[0]).startswith(PROMPT)
    assert adapter.split_prompt("another question")[0] == adapter.split_prompt(PROMPT)[0]


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_prefix_embedding_path_equals_the_model_forward(family, monkeypatch):
    model, _, adapter = tiny(family)
    if hasattr(adapter, "text_after_video"):  # the model's forward uses transformers' rule (test_qwen_positions.py)
        monkeypatch.setattr(adapter, "text_after_video", "transformers")
    inputs = adapter.build_inputs(frames(), 0.25, PROMPT)
    prefix = adapter.embed_prefix(inputs)
    with torch.no_grad():
        reference = model(**inputs).logits[0, -1]
        hidden = adapter.language_model(inputs_embeds=prefix.inputs_embeds, position_ids=prefix.position_ids,
                                        **adapter.chunk_inputs(prefix, 0, prefix.num_tokens))
        logits = adapter.lm_head(hidden.last_hidden_state[:, -1])[0]
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert prefix.num_video_tokens == int(adapter.video_mask(inputs["input_ids"]).sum())


def test_a_split_that_changes_the_tokens_is_refused(monkeypatch):
    _, _, adapter = tiny("qwen2_5_vl")
    text = adapter.render(PROMPT)
    cut = text.rindex("<|im_end|>") + 4  # inside a special token: apart it is 10 byte tokens, joined one
    monkeypatch.setattr(adapter, "split_prompt", lambda *args, **kwargs: (text[:cut], text[cut:]))
    with pytest.raises(ValueError, match="merges tokens across"):
        adapter.suffix_ids(PROMPT)


def test_text_adapter_takes_a_text_context_and_refuses_video():
    _, _, adapter = tiny("llama")
    prefix_text, suffix_text = adapter.split_prompt(PROMPT, context="Some context.")
    assert "Some context." in prefix_text and suffix_text.startswith(PROMPT)
    with pytest.raises(ValueError, match="text-only model"):
        adapter.build_prefix(frames(), 2.0)


def test_dtype_can_be_named():
    model, _, _ = load_vlm("tiny:llama", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp16'"):
        load_vlm("tiny:llama", dtype="fp16")


def test_unknown_names_fail_clearly():
    with pytest.raises(ValueError, match="tiny:qwen2_5_vl"):
        load_vlm("tiny:nope")
    with pytest.raises(ValueError, match="not supported by duokit"):
        adapter_for("bert")


def test_frames_need_a_positive_fps():
    _, _, adapter = tiny("qwen2_5_vl")
    with pytest.raises(ValueError, match="positive fps"):
        adapter.build_prefix(frames(), 0)


@pytest.mark.parametrize("family", ("qwen2_5_vl", "qwen2_vl", "qwen3_vl"))
def test_qwen_video_layout_matches_the_processor_grid_and_the_rope_positions(family, monkeypatch):
    """Layout against the processor's `video_grid_thw` and, independently, `get_rope_index`: a video token's
    height and width positions are its (row, column) in the merged grid, offset by where its group starts."""
    model, _, adapter = tiny(family)
    monkeypatch.setattr(adapter, "text_after_video", "transformers")  # get_rope_index's positions as they are
    inputs = adapter.build_prefix(frames(6), 0.25)
    prefix = adapter.embed_prefix(inputs)
    merge = model.config.vision_config.spatial_merge_size
    (t, h, w), = inputs["video_grid_thw"].tolist()
    assert prefix.video_grids == ((t, h // merge, w // merge),)
    video = prefix.video_mask
    assert torch.equal(prefix.frame_of >= 0, video) and torch.equal(prefix.cell_of[:, 0] >= 0, video)
    assert torch.equal(torch.bincount(prefix.frame_of[video]), torch.full((t,), (h // merge) * (w // merge)))
    positions = prefix.position_ids[:, 0]  # (3, L): temporal, height, width
    for group in range(t):
        rows = prefix.frame_of == group
        assert positions[0, rows].unique().numel() == 1  # one temporal position per group
        for axis in (1, 2):
            offset = positions[axis, rows] - prefix.cell_of[rows, axis - 1]
            assert offset.unique().numel() == 1
    group_starts = [int(positions[0, prefix.frame_of == g][0]) for g in range(t)]
    assert group_starts == sorted(set(group_starts))


def test_llava_onevision_video_layout_matches_the_video_features():
    model, _, adapter = tiny("llava_onevision")
    inputs = adapter.build_prefix(frames(5), 0.25)
    prefix = adapter.embed_prefix(inputs)
    config = model.config
    with torch.no_grad():
        features = model.model.get_video_features(
            inputs["pixel_values_videos"], vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy, return_dict=True).pooler_output
    (t, h, w), = prefix.video_grids
    side = -(-config.vision_config.image_size // config.vision_config.patch_size // 2)  # the 2x pooling, ceil
    assert (t, h, w) == (5, side, side)
    assert features.shape[1] == t * h * w + 1 == prefix.num_video_tokens  # + the closing newline token
    video = prefix.frame_of[prefix.video_mask]
    assert torch.equal(video[:-1], torch.arange(t).repeat_interleave(h * w)) and video[-1] == -1
    cells = prefix.cell_of[prefix.video_mask][:h * w]
    assert cells.tolist() == [[row, column] for row in range(h) for column in range(w)]


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_text_models_have_no_video_layout(family):
    _, _, adapter = tiny(family)
    prefix = adapter.embed_prefix(adapter.build_prefix(None, None, context="some context"))
    assert prefix.video_grids == () and not prefix.video_mask.any()
    assert (prefix.frame_of == -1).all() and (prefix.cell_of == -1).all()
