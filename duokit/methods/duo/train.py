"""DuoAttention gate training on a frozen (video) language model (mit-han-lab/duo-attention).

Per step: one example (train_data.py), doubled into a teacher + student batch; the language model runs
once with the mixed attention (gates.py); the loss is the MSE between the teacher's and the student's
final hidden states (after the final norm) on the answer tokens, averaged over those tokens, plus
λ·mean|α| on the live gates; AdamW (weight decay 0) with the official warm-up/flat/decay schedule;
gates clamped to [0, 1] after each step. Every `save_every` steps the run writes an atomic checkpoint
(checkpoint.py) and the current pattern; re-running the same command resumes from it bit-exactly.

Run directory:
  RUN/config.json            the settings (a resumed run must match them)
  RUN/gate_history.jsonl     one record per step: losses, lr, the gates
  RUN/ckpt/latest.pt         gates, optimizer, scheduler, RNG states, data position
  RUN/pattern/               full_attention_heads.tsv + config.json (official format)
  RUN/plots/                 gates_heatmap.png, gate_histogram.png, loss.png
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from duokit.io import JsonlLog, atomic_write_json, atomic_write_text, iter_jsonl, read_json

if TYPE_CHECKING:  # torch is imported where it is used, so `duokit --help` stays fast
    import torch

# Official defaults actually used (mit-han-lab/duo-attentionscripts/train.sh and every shipped config.json).
OFFICIAL_LR = 0.02
OFFICIAL_REG_WEIGHT = 0.05
OFFICIAL_STEPS = 2000
OFFICIAL_SAVE_EVERY = 50
TRAIN_SINK, TRAIN_RECENT = 128, 256
# Streaming masks in training (gates.py): the exact token window, or the official default's block-sparse
# pattern, whose kernel (Block-Sparse-Attention) has a fixed block size.
STREAMING_MASKS = ("token", "blocksparse")
OFFICIAL_BLOCK_SIZE = 128
# Gate precision: float32, or the official choice, the model's dtype (bf16 in every shipped run), which
# puts the AdamW state in that dtype too.
GATE_DTYPE_NAMES = ("float32", "bfloat16")
HISTORY_FILE = "gate_history.jsonl"
CONFIG_FILE = "config.json"
# Settings that may change between a run and its resumption (they do not change the numbers).
RESUMABLE_CHANGES = ("save_every", "progress")
# Settings added after runs were already written: a saved config without them ran with these values.
ADDED_SETTINGS = {"streaming_mask": "token", "block_size": OFFICIAL_BLOCK_SIZE, "gate_dtype": "float32"}
# Which hidden states enter the loss: those AT the answer tokens (the official label alignment:
# `hidden_states[labels != -100]` in mit-han-lab/duo-attention `duo_attn/train.py::train`),
# or those PREDICTING them (position t − 1 produces token t; better for one-token answers).
LOSS_POSITIONS = ("answer", "predicting")
# Synthetic training frames (width, height). Real VLMs: 448x252 (16:9) is 72 tokens per frame on Qwen2.5-VL
# (16 x 9 merged 28-px tiles per 2 frames), so 32 frames are ~2,300 video tokens, far beyond sink + recent,
# and the subtitle needles are set in a 15 px font (6% of the height, docs/synth.md). Tiny models and
# NeedleNet keep 64x64 (their processors resize to at most 112x112 / 56x56 anyway).
VLM_FRAME_SIZE = (448, 252)
SMALL_FRAME_SIZE = (64, 64)
# Every training sequence must be at least this many times sink + recent tokens long, so at least a fifth of
# the keys are outside the streaming window at the last query. At or under sink + recent the streaming mask
# equals the causal one: the distillation loss is exactly 0 and the gates follow the L1 term alone.
MIN_LENGTH_RATIO = 1.25


@dataclass
class TrainSettings:
    model: str
    steps: int = OFFICIAL_STEPS
    save_every: int = OFFICIAL_SAVE_EVERY
    lr: float = OFFICIAL_LR
    reg_weight: float = OFFICIAL_REG_WEIGHT
    sink: int = TRAIN_SINK
    recent: int = TRAIN_RECENT
    variant: str = "paper"
    streaming_mask: str = "token"  # or "blocksparse", the official default (gates.py)
    block_size: int = OFFICIAL_BLOCK_SIZE  # blocksparse only
    gate_dtype: str = "float32"  # or "bfloat16", the official (model-dtype) gates
    loss_positions: str = "answer"
    seed: int = 0
    # video data (synthesizer training variant)
    frames: tuple[int, ...] = (32, 64, 128)
    frame_size: tuple[int, int] | None = None  # width, height; None: default_frame_size(model)
    max_pixels: int | None = None  # pixels per frame the processor resizes to (load_vlm; docs/video.md)
    min_pixels: int | None = None
    fps: float = 2.0
    needles: tuple[int, int] = (2, 5)
    # text data (official multi-passkey recipe)
    text_file: str | None = None
    context_min: int = 1000
    context_max: int = 32000
    gradient_checkpointing: bool | None = None  # None: on for CUDA, off on CPU
    dtype: str = "auto"
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        from duokit.methods.duo.gates import VARIANTS, check_window

        if self.steps < 1 or self.save_every < 1:
            raise ValueError(f"--steps and --save-every must be >= 1, got {self.steps}, {self.save_every}")
        if self.variant not in VARIANTS:
            raise ValueError(f"--variant must be one of {VARIANTS}, got {self.variant!r}")
        check_window(self.sink, self.recent, self.streaming_mask, self.block_size)
        if self.gate_dtype not in GATE_DTYPE_NAMES:
            raise ValueError(f"--gate-dtype must be one of {GATE_DTYPE_NAMES}, got {self.gate_dtype!r}")
        if self.loss_positions not in LOSS_POSITIONS:
            raise ValueError(f"--loss-positions must be one of {LOSS_POSITIONS}, got {self.loss_positions!r}")
        if self.frame_size is None:
            self.frame_size = default_frame_size(self.model)
        self.frames, self.frame_size, self.needles = tuple(self.frames), tuple(self.frame_size), tuple(self.needles)

    @property
    def window(self) -> tuple[int, int]:
        """(sink, recent) a streaming query sees at most (block multiples under the blocksparse mask)."""
        from duokit.methods.duo.gates import window_span

        return window_span(self.sink, self.recent, self.streaming_mask, self.block_size)

    def to_json(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


def default_frame_size(model: str) -> tuple[int, int]:
    """(width, height) of synthetic training frames for `model` (VLM_FRAME_SIZE, SMALL_FRAME_SIZE)."""
    from duokit.models.needlenet.gate_data import is_needlenet

    return SMALL_FRAME_SIZE if model.startswith("tiny:") or is_needlenet(model) else VLM_FRAME_SIZE


def check_sequence_length(tokens: int, sink: int, recent: int, what: str) -> None:
    """Refuse a training sequence too short for the streaming window to hide anything (MIN_LENGTH_RATIO)."""
    needed = MIN_LENGTH_RATIO * (sink + recent)
    if tokens < needed:
        raise ValueError(
            f"{what} has {tokens} tokens, but gate training needs at least {MIN_LENGTH_RATIO} x (sink {sink} + "
            f"recent {recent}) = {needed:.0f}: at or under sink + recent the streaming and full attention see the "
            "same keys and the loss is 0. Use more --frames, a larger --frame-size / --max-pixels, longer texts "
            "or a smaller --sink/--recent (and --block-size under the blocksparse mask; docs/duo_training.md)")


def official_lr_lambda(num_steps: int):
    """`min(1, max((s+1)/(N//5), .1), max((N−s)/(N//5), .1))` — warm-up, flat, decay to 10%
    (the official `LambdaLR`, mit-han-lab/duo-attention `duo_attn/train.py::main`)."""
    fifth = max(num_steps // 5, 1)

    def factor(step: int) -> float:
        return min(1.0, max((step + 1) / fifth, 0.1), max((num_steps - step) / fifth, 0.1))

    return factor


def distillation_loss(hidden: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Σ over answer tokens of mean_d (h_teacher − h_student)², / number of answer tokens (`distill_loss` in
    mit-han-lab/duo-attention `duo_attn/train.py::train`, on one process)."""
    half = hidden.shape[0] // 2
    teacher = hidden[:half][:, answer_mask].float().detach()
    student = hidden[half:][:, answer_mask].float()
    return (teacher - student).pow(2).mean(dim=-1).sum() / answer_mask.sum().clamp(min=1)


def loss_mask(answer_mask: torch.Tensor, positions: str = "answer") -> torch.Tensor:
    """The positions whose hidden states enter the loss (see LOSS_POSITIONS)."""
    if positions == "answer":
        return answer_mask
    predicting = answer_mask.clone()
    predicting[:-1], predicting[-1] = answer_mask[1:], False
    return predicting


def step_loss(adapter: Any, gates: Any, example: Any, reg_weight: float,
              positions: str = "answer") -> tuple[torch.Tensor, dict]:
    """Total loss of one example and its parts (floats), under `enable_gate_training`."""
    mask = loss_mask(example.answer_mask, positions)
    if not mask.any():
        raise ValueError("the training example has no answer tokens; the loss would be empty")
    output = adapter.language_model(**example.two_way(), use_cache=False)
    distill = distillation_loss(output.last_hidden_state, mask)
    reg = gates.regularization()
    loss = distill + reg_weight * reg
    return loss, {"loss": loss.item(), "distill_loss": distill.item(), "reg_loss": reg.item(),
                  "answer_tokens": int(mask.sum()), "tokens": example.num_tokens}


def make_data(settings: TrainSettings, adapter: Any) -> Any:
    from duokit.data.synth.training import TrainingConfig
    from duokit.methods.duo.train_data import PasskeyData, VideoNeedleData
    from duokit.models.needlenet.gate_data import NeedleNetTask, is_needlenet

    if settings.text_file is not None:
        return PasskeyData(adapter, settings.text_file, settings.context_min, settings.context_max, seed=settings.seed)
    if not adapter.is_multimodal:
        raise ValueError(f"{settings.model} is a text LM: pass --text-file (any long local text) for the official "
                         "multi-passkey recipe")
    if is_needlenet(settings.model):  # its word-level tokenizer cannot read the training variant's sentences
        return NeedleNetTask(adapter, settings.frames, settings.seed)
    config = TrainingConfig(frame_counts=settings.frames, fps=settings.fps, size=settings.frame_size,
                            needles=settings.needles, seed=settings.seed, split="train")
    return VideoNeedleData(adapter, config)


def check_run_dir(run_dir: Path, settings: TrainSettings) -> None:
    """Write RUN/config.json, or check that a resumed run uses the same settings."""
    path = run_dir / CONFIG_FILE
    wanted = settings.to_json()
    if path.exists():
        saved = {**ADDED_SETTINGS, **read_json(path)}
        changed = sorted(k for k in set(saved) | set(wanted)
                         if k not in RESUMABLE_CHANGES and saved.get(k) != wanted.get(k))
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in changed)
            raise ValueError(f"{path}: this run was started with other settings ({details}); re-run with the same "
                             "settings to resume, or use a new --out folder")
    atomic_write_json(path, wanted)


def gate_stats(gates: np.ndarray) -> dict:
    return {"gate_mean": float(gates.mean()), "gate_min": float(gates.min()),
            "below_half": float((gates < 0.5).mean())}


def truncate_history(path: Path, last_step: int) -> None:
    """Drop records after the checkpoint: those steps run again (identically) after a resume."""
    if path.exists():
        kept = [r for r in iter_jsonl(path) if r["step"] <= last_step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def pattern_config(settings: TrainSettings, step: int, num_layers: int, num_kv_heads: int,
                   custom_data: str | None = None) -> dict:
    """The official config.json fields (`vars(args)` of `duo_attn/utils.py::parse_args`, which
    `duo_attn/train.py::main` writes; mit-han-lab/duo-attention) plus duokit's."""
    data = custom_data or (f"passkeys:{settings.text_file}" if settings.text_file else "duokit-synth-training")
    return {"model_name": settings.model, "lr": settings.lr, "reg_weight": settings.reg_weight,
            "num_steps": settings.steps, "steps_done": step, "initial_value": 1.0, "seed": settings.seed,
            "dataset_name": data, "dataset_format": "multiple_passkey" if settings.text_file else "video_needles",
            "context_length_min": settings.context_min, "context_length_max": settings.context_max,
            "frames": list(settings.frames), "frame_size": list(settings.frame_size),
            "max_pixels": settings.max_pixels, "min_pixels": settings.min_pixels,
            "streaming_attn_implementation": "sdpa" if settings.streaming_mask == "token" else "blocksparse",
            "block_size": settings.block_size if settings.streaming_mask == "blocksparse" else None,
            "gate_dtype": settings.gate_dtype, "variant": settings.variant,
            "num_layers": num_layers, "num_kv_heads": num_kv_heads, "method": "DuoAttention (trained gates)"}


# Teacher + student in one batch (the official two-way forward, mit-han-lab/duo-attention).
TWO_WAY = 2
# Text tokens of the chat turns, questions and teacher-forced answers around the video (5 needles).
TEXT_TOKENS = 300
# The passkey recipe's 10 QA blocks after the context: a ~25-token question + a 32-word passkey each.
PASSKEY_QA_TOKENS = 1000
# CUDA context, allocator fragmentation and the vision tower's transient activations (no grad).
RUNTIME_OVERHEAD_BYTES = 2 * 2**30


@dataclass
class TrainingMemoryPlan:
    """Analytic peak-memory estimate of one training step (docs/duo_training.md "Memory")."""

    tokens: int
    weights_bytes: int
    saved_bytes: int  # activations kept for backward across all layers
    layer_bytes: int  # one layer's autograd activations (recomputed one at a time under checkpointing)
    # the [T, T] bool streaming mask + its additive-bias copy, and in the worst case the math sdpa
    # kernel's fp32 scores + softmax of every query head for the masked call
    attention_bytes: int
    overhead_bytes: int = RUNTIME_OVERHEAD_BYTES
    available_bytes: int | None = None

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.saved_bytes + self.layer_bytes + self.attention_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.total_bytes <= self.available_bytes

    def describe(self) -> str:
        gib = 2**30
        parts = ", ".join(f"{name} {getattr(self, name + '_bytes') / gib:.2f}" for name in
                          ("weights", "saved", "layer", "attention", "overhead"))
        where = "" if self.available_bytes is None else f" of {self.available_bytes / gib:.1f} GiB"
        return f"{self.tokens} tokens: {self.total_bytes / gib:.2f} GiB{where} ({parts} GiB)"


def plan_training_memory(num_params: int, text_config: Any, tokens: int, dtype_bytes: int = 2,
                         checkpointing: bool = True, available_bytes: int | None = None,
                         kernel: str = "math") -> TrainingMemoryPlan:
    """Weights + saved activations + one layer's activations + attention workspace + overhead.

    `kernel` is the sdpa kernel of the masked (streaming) call: "efficient" (CUDA: the memory-efficient
    kernel takes the bool mask as a bias and never materialises scores) or "math" (CPU, or a fallback:
    fp32 scores + softmax of every query head).

    Per decoder layer and token of the doubled batch, autograd keeps about 6 hidden-size tensors
    (norms, residuals, o_proj input/output), 4 intermediate-size ones (gate, up, activation, product),
    q/k/v before and after RoPE, and for the student the full and streaming outputs plus their fp32
    mix (gates.py). Under checkpointing only each layer's input is kept, and one layer is live at a time.
    """
    hidden, intermediate = text_config.hidden_size, text_config.intermediate_size
    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    rows = TWO_WAY * tokens
    layer_input = rows * hidden * dtype_bytes
    layer = (rows * dtype_bytes * (6 * hidden + 4 * intermediate + 2 * (heads + 2 * kv_heads) * head_dim)
             + tokens * heads * head_dim * (2 * dtype_bytes + 3 * 4))
    per_layer_saved = layer_input if checkpointing else layer
    return TrainingMemoryPlan(tokens=tokens, weights_bytes=num_params * dtype_bytes,
                              saved_bytes=text_config.num_hidden_layers * per_layer_saved,
                              layer_bytes=layer if checkpointing else 0,
                              attention_bytes=tokens * tokens * (1 + dtype_bytes + (2 * heads * 4 if kernel == "math"
                                                                                     else 0)),
                              available_bytes=available_bytes)


def meta_adapter(name: str, max_pixels: int | None = None, min_pixels: int | None = None) -> Any:
    """The adapter of model `name` over its weights' shapes on the meta device and its real processor."""
    import torch
    from transformers import AutoProcessor, AutoTokenizer

    from duokit.models import _model_config
    from duokit.models.loading import explain_load_error

    path, config, adapter_cls, loader = _model_config(name)
    with torch.device("meta"):  # parameter shapes only, nothing allocated
        model = loader.from_config(config)
    try:
        processor = (AutoProcessor if adapter_cls.is_multimodal else AutoTokenizer).from_pretrained(path)
    except OSError as err:
        raise explain_load_error(name, err) from err
    adapter = adapter_cls(model, processor)
    adapter.set_pixel_limits(max_pixels, min_pixels)
    return adapter


def video_prompt_tokens(adapter: Any, num_frames: int, frame_size: tuple[int, int]) -> tuple[int, int]:
    """(video tokens, all tokens) of a one-question prompt with `num_frames` black frames of (width, height)."""
    width, height = frame_size
    frames = np.zeros((num_frames, height, width, 3), dtype=np.uint8)
    inputs = adapter.processor(text=[adapter.render("?", with_video=True)], videos=[frames],
                               videos_kwargs=adapter.video_kwargs(frames, 1.0), return_tensors="pt")
    return int(adapter.video_mask(inputs["input_ids"]).sum()), int(inputs["input_ids"].shape[1])


def check_settings_sequence_length(settings: TrainSettings) -> None:
    """Refuse, before any weights load, settings whose shortest training sequence is too short
    (check_sequence_length): the passkey texts' shortest context, or a prompt with the fewest frames
    (a lower bound: the training examples add questions and answers). NeedleNet's own task and custom
    data are checked example by example during training."""
    from duokit.models.needlenet.gate_data import is_needlenet

    if settings.text_file is not None:
        check_sequence_length(settings.context_min, *settings.window, "--context-min")
        return
    if is_needlenet(settings.model):
        return
    adapter = meta_adapter(settings.model, settings.max_pixels, settings.min_pixels)
    if not adapter.is_multimodal:
        return  # make_data refuses a text LM without --text-file
    frames = min(settings.frames)
    video, total = video_prompt_tokens(adapter, frames, settings.frame_size)
    width, height = settings.frame_size
    check_sequence_length(total, *settings.window,
                          f"a {frames}-frame {width}x{height} training video ({video} video tokens, "
                          f"{video / frames:.1f} per frame, with the prompt)")


def plan_for_model(name: str, num_frames: int, frame_size: tuple[int, int], dtype_bytes: int = 2,
                   checkpointing: bool = True, available_bytes: int | None = None,
                   text_tokens: int = TEXT_TOKENS, max_pixels: int | None = None,
                   min_pixels: int | None = None, kernel: str = "math") -> TrainingMemoryPlan:
    """`plan_training_memory` for a model, reading only its config and processor (no weights).

    Tokens = `text_tokens` + the video tokens the processor makes of `num_frames` frames (VLMs)."""
    adapter = meta_adapter(name, max_pixels, min_pixels)
    num_params = sum(p.numel() for p in adapter.model.parameters())
    tokens = text_tokens
    if adapter.is_multimodal:
        tokens += video_prompt_tokens(adapter, num_frames, frame_size)[0]
    return plan_training_memory(num_params, adapter.text_config, tokens, dtype_bytes, checkpointing,
                                available_bytes, kernel)


def train_gates(settings: TrainSettings, run_dir: str | os.PathLike,
                data_source: Callable[[Any], Any] | None = None) -> dict:
    """Train (or resume training) the gates; returns a summary with the final gates.

    `data_source(adapter)` replaces the settings' data with any object whose `example(index)` returns
    a `train_data.Example` (a script's own synthetic task); examples must be a pure function of the
    index for resuming to be exact.
    """
    import torch
    from tqdm.auto import tqdm

    from duokit.methods.duo.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
    from duokit.methods.duo.gates import GATE_DTYPES, DuoGates, enable_gate_training
    from duokit.methods.duo.pattern import save_pattern
    from duokit.methods.duo.train_data import PasskeyData, VideoNeedleData
    from duokit.methods.duo.train_plots import write_plots
    from duokit.models import load_vlm

    run_dir = Path(run_dir)
    if data_source is None:
        check_settings_sequence_length(settings)
    check_run_dir(run_dir, settings)
    model, _, adapter = load_vlm(settings.model, dtype=settings.dtype, device=settings.device,
                                 max_pixels=settings.max_pixels, min_pixels=settings.min_pixels)
    model.requires_grad_(False)
    gates = DuoGates(adapter.num_layers, adapter.num_kv_heads, dtype=GATE_DTYPES[settings.gate_dtype]).to(adapter.device)
    optimizer = torch.optim.AdamW(gates.parameters(), lr=settings.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, official_lr_lambda(settings.steps))
    state = load_checkpoint(run_dir)
    if state is None:
        start = 0
        np.random.seed(settings.seed)
        torch.manual_seed(settings.seed)
        random.seed(settings.seed)
    else:
        with torch.no_grad():
            gates.gates.copy_(state["gates"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start = state["data_position"]
    truncate_history(run_dir / HISTORY_FILE, start)
    history = JsonlLog(run_dir / HISTORY_FILE, key="step")
    data = make_data(settings, adapter) if data_source is None else data_source(adapter)
    # The pattern records which data trained it: a name for anything but the two generic recipes.
    custom_data = None if isinstance(data, (PasskeyData, VideoNeedleData)) else type(data).__qualname__

    def save(step: int) -> None:
        save_checkpoint(run_dir, {"step": step, "data_position": step, "gates": gates.gates.detach().cpu(),
                                  "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                  "rng": rng_state()})
        save_pattern(run_dir / "pattern", gates.values(), settings.sink, settings.recent,
                     **pattern_config(settings, step, adapter.num_layers, adapter.num_kv_heads, custom_data))

    checkpointing = settings.gradient_checkpointing
    if checkpointing is None:
        checkpointing = adapter.device.type == "cuda"
    language_model = adapter.language_model
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    language_model.train(checkpointing)  # transformers checkpoints layers only in training mode
    bar = tqdm(total=settings.steps, initial=start, desc="train-duo", disable=not settings.progress)
    try:
        with enable_gate_training(model, gates, settings.sink, settings.recent, settings.variant,
                                  settings.streaming_mask, settings.block_size):
            for step in range(start, settings.steps):
                example = data.example(step)
                check_sequence_length(example.num_tokens, *settings.window, f"training example {step}")
                loss, parts = step_loss(adapter, gates, example, settings.reg_weight, settings.loss_positions)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                gates.clamp_()
                values = gates.values()
                history.append({"step": step + 1, **parts, "lr": lr, **gate_stats(values), "gates": values.tolist()})
                bar.update(1)
                bar.set_postfix(loss=f"{parts['loss']:.4f}", **{k: f"{v:.3f}" for k, v in gate_stats(values).items()})
                if (step + 1) % settings.save_every == 0 or step + 1 == settings.steps:
                    save(step + 1)
    finally:
        bar.close()
        language_model.eval()
        if checkpointing:
            model.activation_checkpointing_disable()
    if start >= settings.steps:  # finished before: rewrite the outputs (idempotent)
        save(settings.steps)
    final = gates.values()
    write_plots(run_dir / "plots", final, list(iter_jsonl(run_dir / HISTORY_FILE)))
    return {"run_dir": str(run_dir), "steps": settings.steps, "resumed_from": start, "gates": final,
            **gate_stats(final)}
