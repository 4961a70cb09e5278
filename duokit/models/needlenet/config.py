"""NeedleNet's architecture: the real Qwen2.5-VL classes, tiny, random init (docs/needlenet.md).

The language model has 4 layers; by default grouped-query attention with 4 query / 2 KV heads (head_dim
32, NeedleNet v1); the shipped v2 is trained with `--heads 8 --kv-heads 8` (head_dim 16), so DuoAttention
has 32 (layer, KV head) pairs to choose between. The vision tower is 2 blocks of hidden 64.
Frames are 56x56 px: 2x2 merged 14 px patches per 2-frame group, i.e. 2 video tokens per frame, so
128 frames are 256 video tokens. At 56 px the VNBench subtitle line is set in a ~4 px font (needles.py
shrinks it to fit the width): legible as a fixed pixel pattern per name, not as text (docs/needlenet.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

FRAME_SIZE = 56  # px, square; a multiple of patch 14 x merge 2
EVAL_FRAMES = 32  # frames the shipped model is evaluated with (docs/needlenet.md)
ANSWER_PARSER = "text"  # answers name the option's text (duokit/data/scoring.py parser "text")
# NeedleNet trains on `get_rope_index`'s positions (transformers 5.23, data.BatchBuilder through the model's
# forward), so it is evaluated with them too: the Qwen-VL adapter's "transformers" rule (docs/architecture.md).
TEXT_AFTER_VIDEO = "transformers"
DUOKIT_FILE = "duokit.json"  # duokit's own metadata next to config.json: the answer parser, frames, frame fit

TEXT_CONFIG = {
    "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
}
VISION_CONFIG = {
    "depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "out_hidden_size": 128,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "tokens_per_second": 2,
    "window_size": 112, "fullatt_block_indexes": [1],
}
# The processor keeps frames at FRAME_SIZE x FRAME_SIZE (a square frame of another size is resized to it).
VIDEO_SIZE = {"shortest_edge": FRAME_SIZE * FRAME_SIZE, "longest_edge": FRAME_SIZE * FRAME_SIZE}


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 0
    # Query and KV heads per language-model layer; head_dim = hidden 128 / heads (text_config).
    heads: int = 4
    kv_heads: int = 2
    # Recognition pre-training of the vision tower (recognition.py), before the video QA steps.
    # A trained NeedleNet (save_pretrained folder) whose vision tower and word embeddings start this run
    # (train.init_vision); the language model's layers start from random init either way.
    init_vision: str | None = None
    # A trained NeedleNet of the same shape whose every weight starts this run (train.init_weights), e.g. to
    # teach its vision tower more frame sizes with `recognition_embeddings=False` and `steps=0`.
    init: str | None = None
    recognition_steps: int = 2000
    recognition_batch_size: int = 128  # 2-frame groups per step
    recognition_lr: float = 3e-3
    # `duokit synth --size`s the recognition needles are drawn at, then resized to FRAME_SIZE (recognition.py);
    # the first alone for the first third of the steps.
    recognition_sizes: tuple[str, ...] = (f"{FRAME_SIZE}x{FRAME_SIZE}",)
    recognition_first_size_share: float = 1 / 3  # of the recognition steps drawn at the first size alone
    # Whether recognition also trains the tied word embeddings (False: the vision tower alone learns to point
    # at the embeddings a trained language model already reads).
    recognition_embeddings: bool = True
    # With `init`: the tower learns, for each group, the tokens the init's own (frozen) tower gives the same
    # group as a 56x56 video shows it (recognition.teacher_loss) -- other sizes read as the trained size.
    recognition_teacher: bool = False
    steps: int = 8000
    batch_size: int = 16
    # frames per stage, the earlier probe's 2 -> 32 (docs/needlenet.md); 2 = the needle's own frames (data.py)
    curriculum: tuple[int, ...] = (2, 4, 8, 16, 32)
    # How often each retrieval / ordering / counting sub-task is drawn relative to the others, at the
    # stages where it fits (data.weighted_tasks). (1, 3, 2) took held-out ordering from 8% to 32% (4-try,
    # validation seed) over uniform (1, 1, 1); docs/needlenet.md "Training".
    family_weights: tuple[int, int, int] = (1, 3, 2)
    # Video QA examples: synthesized at one of `sizes` (a repeat weights a size), sampled frames resized to
    # FRAME_SIZE (data.make_example); `stride` = (min, max) video frames at 2 fps between sampled frames.
    sizes: tuple[str, ...] = (f"{FRAME_SIZE}x{FRAME_SIZE}",)
    stride: tuple[float, float] = (1.5, 3.0)
    advance_accuracy: float = 0.85
    window: int = 40  # steps
    max_stage_steps: int = 1000
    mix_stages: bool = True  # every other step revisits an earlier stage (train.step_frames)
    lr: float = 2e-3  # AdamW settings of the probe
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    warmup_steps: int = 150
    final_lr_fraction: float = 0.05
    clip_norm: float = 1.0
    threads: int = 1  # torch threads of the training process; the data worker adds one process
    workers: int = 1  # data processes (0: build batches in the training process)
    checkpoint_every: int = 100
    log_every: int = 10

    def __post_init__(self):
        if self.heads < 1 or self.kv_heads < 1 or self.heads % self.kv_heads or TEXT_CONFIG["hidden_size"] % (
                4 * self.heads):
            raise ValueError(f"heads must be a multiple of kv_heads and divide hidden {TEXT_CONFIG['hidden_size']} "
                             f"into head_dims that are multiples of 4, got heads={self.heads} kv_heads={self.kv_heads}")
        if self.recognition_steps < 0 or self.recognition_batch_size < 1:
            raise ValueError(f"need recognition_steps >= 0 and recognition_batch_size >= 1, got {self}")
        if self.init is not None and self.init_vision is not None:
            raise ValueError("init and init_vision both set: init already starts every weight, the vision tower too")
        if self.recognition_teacher and self.init is None:
            raise ValueError("recognition_teacher needs init: the teacher is the init model's vision tower")
        if not 0 <= self.recognition_first_size_share <= 1:
            raise ValueError(f"recognition_first_size_share is a fraction in [0, 1], got {self.recognition_first_size_share}")
        if self.steps < 0 or self.batch_size < 1 or not self.curriculum or min(self.curriculum) < 2:
            raise ValueError(f"need steps >= 0 (0: recognition only), batch_size >= 1 and curriculum frame counts >= 2, got {self}")
        if len(self.family_weights) != 3 or min(self.family_weights) < 1:
            raise ValueError(f"family_weights are 3 integers >= 1 (retrieval, ordering, counting), "
                             f"got {self.family_weights}")
        from duokit.models.needlenet.data import parse_size

        if not self.sizes or not self.recognition_sizes:
            raise ValueError("sizes and recognition_sizes need at least one WxH frame size")
        for size in (*self.sizes, *self.recognition_sizes):
            parse_size(size)
        if len(self.stride) != 2 or not 0 < self.stride[0] <= self.stride[1] <= 3.0:
            raise ValueError(f"stride is (min, max) video frames between sampled frames with 0 < min <= max <= 3 "
                             f"(a needle lasts 3 frames at 2 fps), got {self.stride}")
        if any(frames % 2 for frames in self.curriculum):
            raise ValueError(f"curriculum frame counts must be even (Qwen merges frames in pairs), got {self.curriculum}")

    def to_json(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


def build_processor():
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from duokit.models.needlenet.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=VIDEO_SIZE),
        video_processor=Qwen2VLVideoProcessor(size=VIDEO_SIZE, cap_pixels_per_frame=False),
        tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def text_config(settings: TrainSettings) -> dict:
    """TEXT_CONFIG with the settings' heads and an M-RoPE split of their head_dim."""
    half = TEXT_CONFIG["hidden_size"] // settings.heads // 2
    # The three M-RoPE sections (time, height, width) must add up to head_dim / 2 (transformers' Qwen2.5-VL config
    # gotcha); Qwen2.5-VL splits its 64 as 16/24/24, i.e. 1/4, 3/8, 3/8 -- [4, 6, 6] at head_dim 32.
    sections = [half // 4, half * 3 // 8]
    sections.append(half - sum(sections))
    return dict(TEXT_CONFIG, num_attention_heads=settings.heads, num_key_value_heads=settings.kv_heads,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections})


def build_model(tokenizer, settings: TrainSettings):
    """A random-init NeedleNet of the settings' shape whose vocabulary and special ids are the tokenizer's."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    special = {"bos_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    config = Qwen2_5_VLConfig(text_config=dict(text_config(settings), vocab_size=len(tokenizer), **special),
                              vision_config=VISION_CONFIG, tie_word_embeddings=True, **ids)
    torch.manual_seed(settings.seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
