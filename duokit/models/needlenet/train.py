"""Train NeedleNet from scratch on CPU: a recognition stage, then video QA with a curriculum on frame count.

1. Recognition (recognition.py, `recognition_steps`): the vision tower learns to map a needle's 2-frame
   group onto the embedding of its answer word (the tied word embeddings learn with it; the language
   model's layers get no gradient).
2. Video QA: AdamW, warm-up + cosine, recipe from an earlier probe (docs/needlenet.md): the model
   only learns to find a needle when the haystack grows gradually, 2 -> 4 -> 8 -> 16 -> 32 frames. A
   stage ends when the answers to the retrieval questions of its last `window` steps are right at least
   `advance_accuracy` of the time (the probe's 0.9), or after `max_stage_steps` (a cap so one stuck
   sub-task cannot stall the run). Stages below 8 frames train retrieval only: ordering and counting
   videos need more frames to show every needle (data.tasks_for).

The data of every step is a pure function of (seed, stage, step), built in a worker process while the
model trains; a checkpoint every `checkpoint_every` steps makes a killed run resume where it stopped,
with the same result.

OUT/recognition_log.jsonl  one record per `log_every` recognition steps (loss, accuracy per needle kind)
OUT/train_log.jsonl  one record per `log_every` steps (loss, accuracy per sub-task, frames, lr, s/step)
OUT/ckpt/last.pt     model + optimizer + curriculum state, written atomically
OUT/model/           the trained model in `save_pretrained` form + processor + duokit.json
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import shutil
import tempfile
import time
from collections import deque
from pathlib import Path

import torch

from duokit.data.vnbench import SUBTASKS
from duokit.io import JsonlLog, atomic_write_bytes, atomic_write_json
from duokit.models.needlenet.config import (
    ANSWER_PARSER,
    DUOKIT_FILE,
    EVAL_FRAMES,
    FRAME_SIZE,
    TEXT_AFTER_VIDEO,
    TrainSettings,
    build_model,
    build_processor,
)
from duokit.models.needlenet.data import IGNORE, RETRIEVAL, BatchBuilder, make_example, weighted_tasks
from duokit.models.needlenet.recognition import KINDS, RecognitionBatches, teacher_loss, word_logits


def warmup_cosine(peak: float, warmup: int, total: int, floor: float, step: int) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then cosine down to `floor * peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def learning_rate(settings: TrainSettings, step: int) -> float:
    return warmup_cosine(settings.lr, settings.warmup_steps, settings.steps, settings.final_lr_fraction, step)


def recognition_learning_rate(settings: TrainSettings, step: int) -> float:
    warmup = min(settings.warmup_steps, settings.recognition_steps // 10)
    return warmup_cosine(settings.recognition_lr, warmup, settings.recognition_steps, settings.final_lr_fraction, step)


def step_frames(settings: TrainSettings, stage: int, step: int) -> int:
    """Frames of `step` in `stage`: the stage's own, or with `mix_stages` a round robin over the stages
    so far (the stage's own every other step), so earlier skills keep being practised."""
    if not settings.mix_stages or stage == 0 or step % 2 == 0:
        return settings.curriculum[stage]
    return settings.curriculum[(step // 2) % stage]


class StageBatches(torch.utils.data.Dataset):
    """Batch of step `first_step + i` in `stage`: `batch_size` examples of the stream."""

    def __init__(self, processor, settings: TrainSettings, stage: int, first_step: int):
        self.builder = BatchBuilder(processor)
        self.settings, self.stage, self.first_step = settings, stage, first_step

    def __len__(self) -> int:
        return self.settings.steps - self.first_step

    def __getitem__(self, i: int) -> tuple[dict, list[str]]:
        size, step = self.settings.batch_size, self.first_step + i
        frames = step_frames(self.settings, self.stage, step)
        tasks = weighted_tasks(frames, self.settings.family_weights)
        examples = [make_example(self.settings.seed, frames, step * size + k, tasks, sizes=self.settings.sizes,
                                 stride=self.settings.stride) for k in range(size)]
        return self.builder(examples), [example.subtask for example in examples]


def _batches(processor, settings: TrainSettings, stage: int, first_step: int):
    return _loader(StageBatches(processor, settings, stage, first_step), settings)


def _loader(dataset, settings: TrainSettings):
    if settings.workers == 0:
        return iter(dataset[i] for i in range(len(dataset)))
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=settings.workers,
                                            prefetch_factor=4, persistent_workers=False))


def answer_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) bool: every answer token (and the closing <|im_end|>) is the argmax under teacher forcing."""
    predicted, target = logits[:, :-1].argmax(-1), labels[:, 1:]
    scored = target != IGNORE
    return ((predicted == target) | ~scored).all(-1)


def init_vision(model, path: str | Path) -> str:
    """Copy the vision tower and the (tied) word embeddings of the NeedleNet saved at `path` into `model`;
    returns the sha256 of its weights file. Refuses a model of another vision shape or vocabulary."""
    import hashlib

    from transformers import Qwen2_5_VLForConditionalGeneration

    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"--init-vision {path}: no model.safetensors there; give a NeedleNet model folder "
                         f"(duokit/assets/needlenet or a run's OUT/model)")
    source = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    ours, theirs = model.get_input_embeddings().weight, source.get_input_embeddings().weight
    if ours.shape != theirs.shape:
        raise ValueError(f"--init-vision {path}: vocabulary {tuple(theirs.shape)} differs from this "
                         f"NeedleNet's {tuple(ours.shape)}")
    try:
        model.model.visual.load_state_dict(source.model.visual.state_dict())
    except RuntimeError as err:
        raise ValueError(f"--init-vision {path}: its vision tower has another shape ({err})") from None
    with torch.no_grad():
        ours.copy_(theirs)
    return hashlib.sha256(weights.read_bytes()).hexdigest()


def init_weights(model, path: str | Path) -> str:
    """Every weight of the NeedleNet saved at `path` into `model` (same shape); returns its weights' sha256."""
    import hashlib

    from transformers import Qwen2_5_VLForConditionalGeneration

    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"--init {path}: no model.safetensors there; give a NeedleNet model folder "
                         f"(duokit/assets/needlenet or a run's OUT/model)")
    try:
        model.load_state_dict(Qwen2_5_VLForConditionalGeneration.from_pretrained(path).state_dict())
    except RuntimeError as err:
        raise ValueError(f"--init {path}: another shape than this run's (--heads/--kv-heads?): {err}") from None
    return hashlib.sha256(weights.read_bytes()).hexdigest()


def save_model(model, processor, settings: TrainSettings, path: Path, extra: dict) -> Path:
    """save_pretrained + processor + duokit.json into a temp folder, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        atomic_write_json(tmp / DUOKIT_FILE, {
            "name": "needlenet", "answer_parser": ANSWER_PARSER, "text_after_video": TEXT_AFTER_VIDEO,
            "frames": EVAL_FRAMES,
            "frame_size": [FRAME_SIZE, FRAME_SIZE], "frame_fit": [FRAME_SIZE, FRAME_SIZE],
            "training": settings.to_json(), **extra})
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _save_checkpoint(path: Path, model, optimizer, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _pretrain_recognition(model, optimizer, processor, settings: TrainSettings, state: dict, out: Path,
                          progress: bool, teacher=None) -> None:
    """The recognition stage (recognition.py): vision tower + word embeddings only (the language model's
    weights get no gradient, so AdamW leaves them as they are), logged to OUT/recognition_log.jsonl.
    With a `teacher` (a frozen vision tower) the tower learns the teacher's tokens instead of the words
    (recognition.teacher_loss), and the log has each kind's mean squared error instead of its accuracy."""
    from tqdm.auto import tqdm

    log = JsonlLog(out / "recognition_log.jsonl", key="step")
    checkpoint = out / "ckpt" / "last.pt"
    batches = _loader(RecognitionBatches(BatchBuilder(processor), settings.seed, settings.recognition_batch_size,
                                         state["recognition_step"], settings.recognition_steps,
                                         settings.recognition_sizes, settings.recognition_first_size_share,
                                         pairs=teacher is not None), settings)
    totals = {"loss": 0.0, "steps": 0, "right": dict.fromkeys(KINDS, 0), "seen": dict.fromkeys(KINDS, 0)}
    bar = tqdm(total=settings.recognition_steps, initial=state["recognition_step"], desc="needlenet recognition",
               unit="step", disable=not progress)
    clock = time.perf_counter()
    while state["recognition_step"] < settings.recognition_steps:
        step = state["recognition_step"]
        pixels, grid, words, kinds, *native = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = recognition_learning_rate(settings, step)
        if teacher is None:
            logits = word_logits(model, pixels, grid, settings.recognition_embeddings)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), words.repeat_interleave(logits.shape[1]))
            scores = (logits.detach().mean(1).argmax(-1) == words).tolist()
        else:
            errors = teacher_loss(model, teacher, pixels, native[0], grid)
            loss, scores = errors.mean(), errors.detach().tolist()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_norm)
        optimizer.step()
        for kind, score in zip(kinds, scores):
            totals["right"][kind] += score
            totals["seen"][kind] += 1
        totals["loss"] += float(loss.detach())
        totals["steps"] += 1
        state["recognition_step"] = step + 1
        bar.update(1)
        done = state["recognition_step"] == settings.recognition_steps
        if state["recognition_step"] % settings.log_every == 0 or done:
            record = {"step": state["recognition_step"], "loss": totals["loss"] / totals["steps"],
                      "lr": recognition_learning_rate(settings, step),
                      "mse" if teacher is not None else "accuracy":
                          {k: totals["right"][k] / totals["seen"][k] for k in KINDS if totals["seen"][k]},
                      "s_per_step": (time.perf_counter() - clock) / totals["steps"]}
            if record["step"] not in log:  # a resumed run repeats the steps after its last checkpoint
                log.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", names=f"{record.get('accuracy', record.get('mse'))['name']:.3f}")
            totals = {"loss": 0.0, "steps": 0, "right": dict.fromkeys(KINDS, 0), "seen": dict.fromkeys(KINDS, 0)}
            clock = time.perf_counter()
        if state["recognition_step"] % settings.checkpoint_every == 0 or done:
            _save_checkpoint(checkpoint, model, optimizer, state)
    bar.close()


def _record(settings: TrainSettings, state: dict) -> dict:
    """What duokit.json records of a run's state: steps, last frame count, the inits' sha256, CPU kinds."""
    return {"steps": state["step"], "final_frames": settings.curriculum[state["stage"]] if settings.steps else None,
            **{key: state[key] for key in ("init_vision_sha256", "init_sha256", "cpu_capabilities") if key in state}}


def train(settings: TrainSettings, out: str | Path, progress: bool = True) -> dict:
    """Train (or resume) into `out`; returns the final state (step, stage frames, last losses). Runs on
    `settings.threads` threads and gives the caller back its own count."""
    from duokit.runtime import torch_threads

    with torch_threads(settings.threads):
        return _train(settings, Path(out), progress)


def _train(settings: TrainSettings, out: Path, progress: bool) -> dict:
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    settings_path = out / "settings.json"
    if settings_path.exists() and json.loads(settings_path.read_text()) != settings.to_json():
        raise ValueError(f"{settings_path}: {out} holds a run with other settings; use a new --out or delete it")
    atomic_write_json(settings_path, settings.to_json())
    processor = build_processor()
    model = build_model(processor.tokenizer, settings).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=settings.betas,
                                  weight_decay=settings.weight_decay)
    state = {"recognition_step": 0, "step": 0, "stage": 0, "stage_start": 0, "window": []}
    checkpoint = out / "ckpt" / "last.pt"
    if settings.init_vision is not None:  # also on resume: the sha256 goes into duokit.json
        state["init_vision_sha256"] = init_vision(model, settings.init_vision)
    teacher = None
    if settings.init is not None:
        state["init_sha256"] = init_weights(model, settings.init)
        if settings.recognition_teacher:  # the init's own tower, before a checkpoint replaces the weights
            teacher = copy.deepcopy(model.model.visual).eval().requires_grad_(False)
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(saved.pop("model"))
        optimizer.load_state_dict(saved.pop("optimizer"))
        state = saved
    # Float results depend on the CPU's vector kernels (AVX2 vs AVX-512): a retrain is bit-identical only on
    # the same kind (docs/needlenet.md, "Reproducibility"), so the model records every kind it trained on.
    capabilities = state.setdefault("cpu_capabilities", ["unknown"] if state["step"] or state["recognition_step"] else [])
    kind = torch.backends.cpu.get_cpu_capability()
    if kind not in capabilities:
        capabilities.append(kind)
    if state["recognition_step"] < settings.recognition_steps:
        _pretrain_recognition(model, optimizer, processor, settings, state, out, progress, teacher)
    log = JsonlLog(out / "train_log.jsonl", key="step")
    # (retrieval answers right, retrieval answers) per step of the current stage.
    window = deque((tuple(pair) for pair in state["window"]), maxlen=settings.window)
    totals = {"loss": 0.0, "steps": 0, "right": dict.fromkeys(SUBTASKS, 0), "seen": dict.fromkeys(SUBTASKS, 0)}
    bar = tqdm(total=settings.steps, initial=state["step"], desc="needlenet", unit="step", disable=not progress)
    batches = _batches(processor, settings, state["stage"], state["step"])
    clock = time.perf_counter()
    while state["step"] < settings.steps:
        step, frames = state["step"], settings.curriculum[state["stage"]]
        batch, subtasks = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings, step)
        output = model(**batch)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_norm)
        optimizer.step()
        correct = answer_correct(output.logits.detach(), batch["labels"]).tolist()
        for subtask, right in zip(subtasks, correct):
            totals["right"][subtask] += right
            totals["seen"][subtask] += 1
        if step_frames(settings, state["stage"], step) == frames:  # the stage's own frame count only
            retrieval = [right for subtask, right in zip(subtasks, correct) if subtask in RETRIEVAL]
            window.append((sum(retrieval), len(retrieval)))
        totals["loss"] += float(output.loss.detach())
        totals["steps"] += 1
        state["step"] = step + 1
        bar.update(1)
        stage_steps = state["step"] - state["stage_start"]
        accuracy = sum(r for r, _ in window) / max(1, sum(n for _, n in window))
        advance = state["stage"] + 1 < len(settings.curriculum) and (
            (len(window) == settings.window and accuracy >= settings.advance_accuracy)
            or stage_steps >= settings.max_stage_steps)
        if state["step"] % settings.log_every == 0 or advance or state["step"] == settings.steps:
            seconds = time.perf_counter() - clock
            record = {"step": state["step"], "frames": frames, "loss": totals["loss"] / totals["steps"],
                      "lr": learning_rate(settings, step), "retrieval_window_accuracy": accuracy,
                      "accuracy": {t: totals["right"][t] / totals["seen"][t] for t in SUBTASKS if totals["seen"][t]},
                      "s_per_step": seconds / totals["steps"]}
            if record["step"] not in log:  # a resumed run repeats the steps after its last checkpoint
                log.append(record)
            bar.set_postfix(frames=frames, loss=f"{record['loss']:.3f}", ret=f"{accuracy:.2f}")
            totals = {"loss": 0.0, "steps": 0, "right": dict.fromkeys(SUBTASKS, 0), "seen": dict.fromkeys(SUBTASKS, 0)}
            clock = time.perf_counter()
        if advance:
            state.update(stage=state["stage"] + 1, stage_start=state["step"])
            window.clear()
            batches = _batches(processor, settings, state["stage"], state["step"])
        state["window"] = [list(pair) for pair in window]
        if state["step"] % settings.checkpoint_every == 0 or state["step"] == settings.steps:
            _save_checkpoint(checkpoint, model, optimizer, state)
    bar.close()
    model.eval()
    save_model(model, processor, settings, out / "model", _record(settings, state))
    return {"step": state["step"], "frames": settings.curriculum[state["stage"]],
            "log": log.records[-1] if log.records else None}


def export_checkpoint(out: str | Path) -> Path:
    """Write OUT/model from OUT/ckpt/last.pt (a run stopped before its last step); returns the path."""
    out = Path(out)
    checkpoint, settings_path = out / "ckpt" / "last.pt", out / "settings.json"
    if not checkpoint.exists() or not settings_path.exists():
        raise ValueError(f"{out}: no checkpoint (ckpt/last.pt + settings.json); train into it first")
    raw = json.loads(settings_path.read_text())
    settings = TrainSettings(**{key: tuple(value) if isinstance(value, list) else value for key, value in raw.items()})
    saved = torch.load(checkpoint, weights_only=True)
    processor = build_processor()
    model = build_model(processor.tokenizer, settings)
    model.load_state_dict(saved["model"])
    return save_model(model.eval(), processor, settings, out / "model", _record(settings, saved))

