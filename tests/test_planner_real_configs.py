"""The memory planners on the real Qwen2.5-VL-3B/7B geometry: models on the meta device (nothing allocated)
from their published config.json values, a processor from the published preprocessor config."""

from __future__ import annotations

import pytest
import torch

from duokit.methods import get_method
from duokit.methods.duo.train import plan_training_memory
from duokit.metrics import attention_kernel, plan_memory
from duokit.models.qwen_vl import QwenVLAdapter
from duokit.models.tiny import byte_tokenizer

GIB = 2**30
# config.json of Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct (the fields that decide the shapes).
VISION = {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
          "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
          "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2}
CONFIGS = {
    "3B": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
           "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
           "vision_config": {**VISION, "out_hidden_size": 2048}},
    "7B": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
           "vision_config": {**VISION, "out_hidden_size": 3584}},
}
COMMON = {"model_type": "qwen2_5_vl", "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
          "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}
PARAMS = {"3B": 3_754_622_976, "7B": 8_292_166_656}
KV_PER_TOKEN = {"3B": 36_864, "7B": 57_344}  # 2 (K, V) x layers x KV heads x 128 x 2 bytes
PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2}


class MetaAdapter(QwenVLAdapter):
    device = torch.device("cpu")  # processor outputs stay on the CPU; the weights are on the meta device


def meta_model(size: str, attn: str = "sdpa"):
    """(model on the meta device in bf16, adapter with the published video processor and an offline tokenizer)."""
    from transformers import (
        AutoModelForImageTextToText,
        Qwen2_5_VLConfig,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = byte_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("video_token_id", "<|video_pad|>"), ("image_token_id", "<|image_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config = Qwen2_5_VLConfig(**COMMON, **CONFIGS[size], **ids)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16, attn_implementation=attn)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**PREPROCESSOR),
                                    video_processor=Qwen2VLVideoProcessor(**PREPROCESSOR), tokenizer=tokenizer,
                                    chat_template=tokenizer.chat_template)
    return model, MetaAdapter(model, processor)


@pytest.fixture(scope="module", params=["3B", "7B"])
def qwen(request):
    return request.param, *meta_model(request.param)


def test_meta_models_have_the_published_parameter_counts(qwen):
    size, model, _ = qwen
    assert sum(p.numel() for p in model.parameters()) == PARAMS[size]


def test_eval_plan_on_a_gpu_from_first_principles(qwen):
    size, model, adapter = qwen
    baseline = get_method("baseline")
    adapter.set_pixel_limits(max_pixels=PREPROCESSOR["max_pixels"])  # the checkpoint's own limits
    native = plan_memory(model, adapter, baseline, 64, 360, 640, device="cuda")
    adapter.set_pixel_limits()  # duokit's default cap, 448 x 448 per frame
    capped = plan_memory(model, adapter, baseline, 64, 360, 640, device="cuda")
    assert (native.video_tokens, capped.video_tokens) == (64 * 299 // 2, 64 * 126)  # 149.5 and 126 per frame
    assert 0 <= native.weights_bytes - PARAMS[size] * 2 < 4096  # + the rotary inverse frequencies (buffers)
    suffix = 256 + 5
    assert native.kv_bytes == KV_PER_TOKEN[size] * (native.prefix_tokens + 4 * suffix)  # 4 tries together
    # sdpa on CUDA never materialises the scores: only MLP / hidden buffers / embeddings / logits remain.
    assert native.attention_kernel == "efficient"
    cpu = plan_memory(model, adapter, baseline, 64, 360, 640, device="meta")
    assert cpu.attention_kernel == "math" and cpu.activation_bytes > capped.activation_bytes
    # The vision tower: 64 frames at 640x360 are 32 x 26 x 46 = 38,272 patches of 1,176 values.
    patches = 32 * 26 * 46
    assert adapter.vision_sequence(adapter.build_prefix(
        torch.zeros(64, 360, 640, 3, dtype=torch.uint8).numpy(), 1.0)) == (32 * 24 * 42, 24 * 42)
    expected_vision = (patches * 1176 * (4 + 2) + patches * (8 * 1280 + 3 * 3420) * 2
                       + native.prefix_tokens * CONFIGS[size]["hidden_size"] * 2)
    assert native.vision_bytes == expected_vision
    assert 1.0 * GIB < native.vision_bytes < 2.5 * GIB
    assert native.total_bytes == native.weights_bytes + max(native.vision_bytes,
                                                            native.kv_bytes + native.activation_bytes)
    # 3B fits an L4 (22.5 GiB usable) with room; 7B in bf16 needs an A100 or an L4 at fewer frames.
    assert native.total_bytes < {"3B": 9.0, "7B": 17.5}[size] * GIB


def test_training_plan_follows_the_kernel():
    """At 64 frames of 640x360 (9,568 video + 300 text tokens) the math kernel's scores dominate; the
    memory-efficient kernel, which CUDA uses for the bool streaming mask in bf16, keeps only the mask."""
    _, adapter = meta_model("3B")
    tokens = 9568 + 300
    text = adapter.text_config
    math = plan_training_memory(PARAMS["3B"], text, tokens, 2, checkpointing=True, kernel="math")
    efficient = plan_training_memory(PARAMS["3B"], text, tokens, 2, checkpointing=True, kernel="efficient")
    assert math.total_bytes / GIB == pytest.approx(26.14, abs=0.01)
    assert efficient.attention_bytes == tokens * tokens * 3
    assert efficient.total_bytes / GIB == pytest.approx(math.total_bytes / GIB - tokens**2 * 128 / GIB)
    assert efficient.total_bytes < 22 * GIB < math.total_bytes  # an L4 (22 GiB): fits, where the math bound says not


@pytest.mark.parametrize("implementation,device,kernel", [
    ("sdpa", "cuda", "efficient"), ("duokit_duo", "cuda:0", "efficient"), ("flash_attention_2", "cuda", "flash"),
    ("eager", "cuda", "math"), ("sdpa", "cpu", "math")])
def test_attention_kernel(implementation, device, kernel):
    assert attention_kernel(implementation, device) == kernel
