"""`tiny:<family>`: seeded tiny random-init models with a real processor and an offline tokenizer.

Tests and CPU smoke runs use them. Each is built once, saved with `save_pretrained` under
`$DUOKIT_CACHE/tiny/<family>-<seed>-<hash>` (default `~/.cache/duokit`) and then loaded back by
`load_vlm` through the same `from_pretrained` path a hub checkpoint takes. `<hash>` is a hash of
this module, so a changed builder never reuses a stale model. Configs follow
the smallest shapes transformers 5.23's model classes accept:
text model of 2 layers, hidden 64, 4 query heads, 2 KV heads (head_dim 16), 2-layer vision towers.

The tokenizer is byte-level BPE with no merges (every UTF-8 byte is one token, so any prompt
tokenizes without a download) plus the family's special tokens, wrapped in `PreTrainedTokenizerFast`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

TINY_FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "llava_onevision", "llama", "mistral", "qwen2")
TINY_SEED = 0
# Weight matrices are drawn N(0, 0.3^2) instead of the usual 0.02: with 0.02 a tiny model's logits
# are nearly flat and its greedy tokens hardly depend on the prompt, so equivalence tests would pass
# on near-ties; at 0.3 each try's answer depends on its suffix and a position or cache bug shows.
TINY_INIT_STD = 0.3

# Special tokens sit right after the 256 byte tokens, inside the tiny vocabulary: every special token id the configs
# name (bos/eos/pad, image, video, vision start/end) must index the small embedding table.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|video_pad|>", "<|image_pad|>", "<video>", "<image>",
)
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every id decodes to a token

TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": VOCAB_SIZE, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
# head_dim 16 -> mrope sections must add up to head_dim / 2 = 8: the rotary embedding splits its head_dim / 2
# frequencies by `mrope_section` (transformers, models/qwen2_5_vl/modeling_qwen2_5_vl.py).
MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
# Frames are resized to at most 112x112 px: 4x4 merged tokens per 2-frame group (Qwen2/2.5-VL).
QWEN_VIDEO_SIZE = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}

# A Qwen-style chat template (system prompt, <|im_start|> turns); `video`/`image` items become the
# family's placeholder, which the processor expands into one token per visual token.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' %}VIDEO_PLACEHOLDER"
    "{% elif item['type'] == 'image' %}IMAGE_PLACEHOLDER"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PLACEHOLDERS = {
    "qwen": ("<|vision_start|><|video_pad|><|vision_end|>", "<|vision_start|><|image_pad|><|vision_end|>"),
    "llava": ("<video>", "<image>"),
}


def cache_root() -> Path:
    return Path(os.environ.get("DUOKIT_CACHE") or Path.home() / ".cache" / "duokit")


def tiny_path(family: str, seed: int = TINY_SEED) -> Path:
    """Build (once) and save the tiny model of `family`; return its directory."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny model 'tiny:{family}'; known: "
                         + ", ".join(f"tiny:{f}" for f in TINY_FAMILIES))
    # The builder's source and the libraries that build and save the model are part of the name, so neither
    # an edit of this module nor an upgrade of torch or transformers reuses a model saved before it.
    import torch
    import transformers

    built_by = Path(__file__).read_bytes() + f"{torch.__version__} {transformers.__version__}".encode()
    version = hashlib.sha256(built_by).hexdigest()[:10]
    path = cache_root() / "tiny" / f"{family}-{seed}-{version}"
    if not (path / "config.json").exists():
        _build_and_save(family, seed, path)
    return path


def _build_and_save(family: str, seed: int, path: Path) -> None:
    import shutil
    import tempfile

    import torch

    torch.manual_seed(seed)
    model, processor = BUILDERS[family]()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, TINY_INIT_STD)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Save into a temp folder and rename, so a concurrent or interrupted build never leaves half a model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        os.replace(tmp, path)
    except OSError:
        if not (path / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def byte_tokenizer(placeholders: str = "qwen"):
    """Byte-level BPE without merges + the special tokens + a chat template using `placeholders`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    video, image = PLACEHOLDERS[placeholders]
    template = CHAT_TEMPLATE.replace("VIDEO_PLACEHOLDER", video).replace("IMAGE_PLACEHOLDER", image)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
        chat_template=template,
    )
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    return tokenizer


def _special_ids(tokenizer) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


def _text_ids(tokenizer) -> dict:
    ids = _special_ids(tokenizer)
    return {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"]}


def _qwen_vision_ids(tokenizer) -> dict:
    ids = _special_ids(tokenizer)
    return {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
            "vision_start_token_id": ids["<|vision_start|>"],
            "vision_end_token_id": ids["<|vision_end|>"]}


def _finish(model, tokenizer):
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def _qwen2_processor(processor_class, tokenizer):
    """The processor Qwen2-VL and Qwen2.5-VL share: Qwen2-VL image and video processors at the tiny size."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    return processor_class(
        image_processor=Qwen2VLImageProcessor(size=QWEN_VIDEO_SIZE),
        video_processor=Qwen2VLVideoProcessor(size=QWEN_VIDEO_SIZE, cap_pixels_per_frame=False),
        tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def _qwen2_5_vl():
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
    )

    tokenizer = byte_tokenizer("qwen")
    config = Qwen2_5_VLConfig(
        text_config=dict(TEXT, rope_parameters=MROPE, **_text_ids(tokenizer)),
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                       "out_hidden_size": 64, "fullatt_block_indexes": [1], "window_size": 56},
        **_qwen_vision_ids(tokenizer))
    return _finish(Qwen2_5_VLForConditionalGeneration(config), tokenizer), _qwen2_processor(
        Qwen2_5_VLProcessor, tokenizer)


def _qwen2_vl():
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
    )

    tokenizer = byte_tokenizer("qwen")
    config = Qwen2VLConfig(
        text_config=dict(TEXT, rope_parameters=MROPE, **_text_ids(tokenizer)),
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2},
        **_qwen_vision_ids(tokenizer))
    return _finish(Qwen2VLForConditionalGeneration(config), tokenizer), _qwen2_processor(
        Qwen2VLProcessor, tokenizer)


def _qwen3_vl():
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tokenizer = byte_tokenizer("qwen")
    config = Qwen3VLConfig(
        text_config=dict(TEXT, head_dim=16, rope_parameters=dict(MROPE, mrope_interleaved=True),
                         **_text_ids(tokenizer)),
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                       "out_hidden_size": 64, "patch_size": 16, "deepstack_visual_indexes": [0],
                       "num_position_embeddings": 64},
        **_qwen_vision_ids(tokenizer))
    # Qwen3-VL's `longest_edge` is a total T*H*W pixel budget (transformers,
    # models/qwen3_vl/video_processing_qwen3_vl.py `smart_resize`): 8 frames of 128x128.
    video_size = {"shortest_edge": 32 * 32 * 2, "longest_edge": 8 * 128 * 128}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=QWEN_VIDEO_SIZE, patch_size=16),
        video_processor=Qwen3VLVideoProcessor(size=video_size, cap_pixels_per_frame=False),
        tokenizer=tokenizer, chat_template=tokenizer.chat_template)
    return _finish(Qwen3VLForConditionalGeneration(config), tokenizer), processor


def _llava_onevision():
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tokenizer = byte_tokenizer("llava")
    ids = _special_ids(tokenizer)
    image_size = 56  # SigLIP 56 px, patch 14 -> 4x4 patches -> bilinear pool -> 2x2 = 4 tokens per frame
    config = LlavaOnevisionConfig(
        text_config=dict(TEXT, model_type="qwen2", **_text_ids(tokenizer)),
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": image_size,
                       "patch_size": 14},
        image_token_index=ids["<image>"], video_token_index=ids["<video>"],
        vision_feature_layer=-1, vision_aspect_ratio="anyres_max_1",
        image_grid_pinpoints=[[image_size, image_size]])
    size = {"height": image_size, "width": image_size}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=[[image_size] * 2]),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tokenizer, chat_template=tokenizer.chat_template,
        num_image_tokens=(image_size // 14) ** 2, vision_feature_select_strategy="full")
    return _finish(LlavaOnevisionForConditionalGeneration(config), tokenizer), processor


def _text_lm(config_cls, model_cls):
    tokenizer = byte_tokenizer("qwen")
    config = config_cls(**TEXT, **_text_ids(tokenizer))
    return _finish(model_cls(config), tokenizer), tokenizer


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return _text_lm(LlamaConfig, LlamaForCausalLM)


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return _text_lm(MistralConfig, MistralForCausalLM)


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _text_lm(Qwen2Config, Qwen2ForCausalLM)


BUILDERS = {"qwen2_5_vl": _qwen2_5_vl, "qwen2_vl": _qwen2_vl, "qwen3_vl": _qwen3_vl,
            "llava_onevision": _llava_onevision, "llama": _llama, "mistral": _mistral, "qwen2": _qwen2}
