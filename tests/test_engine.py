"""The engine (prefix once, 4 tries) against `model.generate`, the method hook, `duokit eval` end to end."""

from __future__ import annotations

import json
import shutil
from dataclasses import FrozenInstanceError, dataclass, replace
from itertools import pairwise

import numpy as np
import pytest
import torch
from _tiny_models import tiny

from duokit.cli import main
from duokit.data.video import write_video
from duokit.data.vnbench import LETTERS, official_prompt, permuted_options
from duokit.engine import LM, SampleInput, Try, answer_tries
from duokit.eval_command import run_eval
from duokit.io import iter_jsonl
from duokit.methods import get_method
from duokit.methods.base import Method, method_class
from duokit.methods.duo.pattern import save_pattern
from duokit.models import TINY_FAMILIES

OPTIONS = ["Alice", "Bob", "Carol", "Dave"]
QUESTIONS = ["What is the secret word?", "Which word appeared first?", "Who is shown in the video?",
             "Name the card."]
# Four tries in the official prompt format; different questions make the tiny models' answers differ.
PROMPTS = [official_prompt(question, options)
           for question, options in zip(QUESTIONS, permuted_options(OPTIONS))]
# A low frame rate spreads Qwen's temporal M-RoPE positions past the prompt's text positions (as on
# VNBench: 8 frames of a 3-minute video), the case where decode positions are easiest to get wrong.
FPS = 0.25


def frames(count: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 96, 128, 3), dtype=np.uint8)


def shared_part(adapter):
    """(frames, context): a video for VLMs, a text-only prefix for text LMs."""
    if adapter.is_multimodal:
        return frames(), None
    return None, "The secret word of the day is written on a red card. " * 4


def run_engine(model, adapter, method, video, prompts, context=None, **kwargs):
    """The engine's answers with `method` applied."""
    with method.apply(model, adapter):
        return answer_tries(LM(model, adapter), method, SampleInput(video, FPS if video is not None else None, context),
                            prompts, **kwargs)


def generate_tokens(model, adapter, video, context, prompt, max_new_tokens=5) -> list[int]:
    inputs = adapter.build_inputs(video, FPS, prompt, context=context)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_engine_tokens_equal_generate_on_the_full_prompt(family, monkeypatch):
    model, _, adapter = tiny(family)
    if hasattr(adapter, "text_after_video"):
        # generate places Qwen-VL text after a video by transformers' rule, not Qwen's (duokit's default,
        # tests/test_qwen_positions.py); the positions are otherwise the same.
        monkeypatch.setattr(adapter, "text_after_video", "transformers")
    video, context = shared_part(adapter)
    # A chunk of 16 tokens splits the prefix (video included) over several prefill calls.
    result = run_engine(model, adapter, get_method("baseline"), video, PROMPTS, context, chunk_size=16)
    for prompt, answer in zip(PROMPTS, result.answers):
        assert answer.tokens == generate_tokens(model, adapter, video, context, prompt)
        assert answer.text == adapter.tokenizer.decode(answer.tokens, skip_special_tokens=True)
    # The tries share the prefix; differing answers show each try's suffix really reaches the model.
    assert len({tuple(answer.tokens) for answer in result.answers}) > 1


@dataclass
class ShiftedSuffix(Method):
    """Test method: moves the suffix positions; the tokens must then differ (the test above can fail)."""

    name = "test-shifted-suffix"

    def prepare_prefix(self, prefix, sample, lm):
        return replace(prefix, next_position=prefix.next_position + 40)


def test_wrong_positions_are_detected(monkeypatch):
    model, _, adapter = tiny("qwen2_5_vl")
    monkeypatch.setattr(adapter, "text_after_video", "transformers")  # generate's rule: only the shift differs
    result = run_engine(model, adapter, ShiftedSuffix(), frames(), PROMPTS[:2])
    expected = [generate_tokens(model, adapter, frames(), None, prompt) for prompt in PROMPTS[:2]]
    assert [answer.tokens for answer in result.answers] != expected


@dataclass
class DropHalfTheVideo(Method):
    """Test method: keeps every other video token with its original position (token pruning)."""

    name = "test-drop-half"

    def prepare_prefix(self, prefix, sample, lm):
        video_positions = prefix.video_mask.nonzero()[:, 0]
        keep = torch.ones_like(prefix.video_mask)
        keep[video_positions[1::2]] = False
        return prefix.keep(keep)


def test_prepare_prefix_hook_shrinks_what_is_prefilled():
    model, _, adapter = tiny("qwen2_5_vl")
    full = run_engine(model, adapter, get_method("baseline"), frames(), PROMPTS[:1])
    pruned = run_engine(model, adapter, DropHalfTheVideo(), frames(), PROMPTS[:1])
    video_tokens = full.cost["video_tokens"]
    assert pruned.cost["input_video_tokens"] == video_tokens
    assert pruned.cost["video_tokens"] == video_tokens // 2
    assert pruned.cost["prefix_tokens"] == full.cost["prefix_tokens"] - video_tokens // 2
    bytes_per_token = full.cost["kv_bytes"] // full.cost["prefix_tokens"]
    assert pruned.cost["kv_bytes"] == bytes_per_token * pruned.cost["prefix_tokens"]
    assert pruned.cost["tokens_per_layer"] == [pruned.cost["prefix_tokens"]] * adapter.num_layers
    assert pruned.cost["visual_token_layers"] == adapter.num_layers * video_tokens // 2
    assert len(pruned.answers[0].tokens) == 5


def test_engine_reports_costs():
    model, _, adapter = tiny("llava_onevision")
    result = run_engine(model, adapter, get_method("baseline"), frames(), PROMPTS[:1])
    cost = result.cost
    assert cost["frames"] == 8
    assert cost["video_tokens"] == 8 * 4 + 1  # 2x2 pooled tokens per 56-px frame + one newline token
    # K and V x 2 layers x 2 KV heads x head_dim 16 x 4 bytes (fp32) per prefix token
    assert cost["kv_bytes"] == 2 * 2 * 2 * 16 * 4 * cost["prefix_tokens"]
    # At the peak the cache also holds the try's suffix and every answer token but the last.
    suffix = adapter.suffix_ids(PROMPTS[0]).shape[1]
    in_cache = cost["prefix_tokens"] + suffix + len(result.answers[0].tokens) - 1
    assert cost["kv_bytes_peak"] == cost["kv_bytes_planned"] == 2 * 2 * 2 * 16 * 4 * in_cache
    assert cost["tokens_per_layer"] == [cost["prefix_tokens"]] * 2
    assert cost["visual_token_layers"] == 2 * cost["video_tokens"]
    # Dense analytic FLOPs (docs/metrics.md): hidden 64, 4 query heads, intermediate 128 on the tiny Qwen2.
    n, geometry = cost["prefix_tokens"], adapter.geometry
    hidden, heads, kv_heads, head_dim = geometry.hidden_size, geometry.num_heads, geometry.num_kv_heads, 16
    per_layer = (2 * n * hidden * (2 * heads * head_dim + 2 * kv_heads * head_dim)
                 + 4 * heads * head_dim * n * (n + 1) // 2)
    assert cost["attention_flops"] == 2 * per_layer
    assert cost["mlp_flops"] == 2 * 6 * n * hidden * geometry.intermediate_size
    assert cost["prefill_s"] > 0 and cost["decode_s_per_token"] > 0
    assert cost["peak_memory_bytes"] > 0


@dataclass
class RecordsItsOwnCosts(Method):
    """Records a prefix cost and plans from the prepared prefix, as a selection method would."""

    name = "records_its_own_costs"

    def prepare_prefix(self, prefix, sample, lm):
        return replace(prefix, costs={"selected_tokens": 7})

    def estimate_sample_kv_bytes(self, geometry, tokens, prefix):
        return 1000 + prefix.num_tokens


def test_prefix_costs_and_the_sample_kv_estimate_reach_the_recorded_costs():
    model, _, adapter = tiny("qwen2_5_vl")
    result = run_engine(model, adapter, RecordsItsOwnCosts(), frames(), PROMPTS[:1])
    assert result.cost["selected_tokens"] == 7
    assert result.cost["kv_bytes_planned"] == 1000 + result.cost["prefix_tokens"]


def test_budget_settings_map_a_budget_to_each_methods_knob():
    geometry = tiny("qwen2_5_vl")[2].geometry
    with pytest.raises(NotImplementedError, match="has no budget knob"):
        Method.budget_settings(0.5, geometry, None)
    assert method_class("duo").budget_settings(0.25, geometry, None) == {"sparsity": 0.75}
    assert method_class("llavolta").budget_settings(0.25, geometry, None) == {"stride": 4}
    with pytest.raises(ValueError, match="budget must be in"):
        method_class("llavolta").budget_settings(0.0, geometry, None)


def test_chunk_size_must_be_positive():
    model, _, adapter = tiny("llama")
    with pytest.raises(ValueError, match="chunk_size"):
        run_engine(model, adapter, get_method("baseline"), None, PROMPTS[:1], context="x", chunk_size=0)


def test_engine_refuses_a_method_that_is_not_applied():
    model, _, adapter = tiny("llama")
    with pytest.raises(RuntimeError, match="must run inside"):
        answer_tries(LM(model, adapter), get_method("baseline"), SampleInput(None, None, "x"), PROMPTS[:1])


@dataclass
class AsksForTheQuestion(Method):
    """Test method: its prefix depends on the question; it records what `prepare_prefix` saw."""

    name = "test-asks-question"
    prefix_depends_on_question = True

    def __post_init__(self):
        self.seen = []

    def prepare_prefix(self, prefix, sample, lm):
        self.seen.append(sample.question)
        return prefix


def test_a_question_dependent_prefix_is_prefilled_once_per_question():
    """Tries of one question share one prefill that ends with the question; the tokens stay generate's."""
    model, _, adapter = tiny("qwen2_5_vl")
    question = QUESTIONS[0] + "\n"
    tries = [Try(official_prompt(QUESTIONS[0], options), question) for options in permuted_options(OPTIONS)]
    tries.append(Try(PROMPTS[1], QUESTIONS[1] + "\n"))
    method = AsksForTheQuestion()
    with monkeypatch_rule(adapter):
        result = run_engine(model, adapter, method, frames(), tries)
        expected = [generate_tokens(model, adapter, frames(), None, t.prompt) for t in tries]
    assert method.seen == [question, QUESTIONS[1] + "\n"]
    assert result.cost["prefills"] == 2
    assert [a.tokens for a in result.answers] == expected
    # The baseline builds one prefix for all four tries, and its prefix has no question in it.
    baseline = run_engine(model, adapter, get_method("baseline"), frames(), tries)
    assert baseline.cost["prefills"] == 1
    assert baseline.cost["prefix_tokens"] < result.cost["prefix_tokens"]


class monkeypatch_rule:
    """generate's rule for Qwen-VL text after a video, for the block (see the first test)."""

    def __init__(self, adapter):
        self.adapter = adapter

    def __enter__(self):
        self.previous = self.adapter.text_after_video
        self.adapter.text_after_video = "transformers"

    def __exit__(self, *exc):
        self.adapter.text_after_video = self.previous


def test_prefix_is_immutable_and_keep_slices_every_array():
    model, _, adapter = tiny("qwen3_vl")
    prefix = LM(model, adapter).embed(SampleInput(frames(4), FPS))
    with pytest.raises(FrozenInstanceError):
        prefix.next_position = 0
    video = prefix.video_mask.nonzero()[:, 0]
    keep = torch.ones_like(prefix.video_mask)
    keep[video[::3]] = False
    kept = prefix.keep(keep)
    assert kept.num_tokens == prefix.num_tokens - len(video[::3])
    for name in ("video_mask", "frame_of"):
        assert torch.equal(getattr(kept, name), getattr(prefix, name)[keep])
    assert torch.equal(kept.cell_of, prefix.cell_of[keep])
    assert torch.equal(kept.input_ids, prefix.input_ids[:, keep])
    assert torch.equal(kept.inputs_embeds, prefix.inputs_embeds[:, keep])
    assert torch.equal(kept.position_ids, prefix.position_ids[..., keep])
    rows = keep[prefix.video_mask]
    deepstack = prefix.layer_inputs["deepstack_visual_embeds"]
    assert len(deepstack) > 0
    for before, after in zip(deepstack, kept.layer_inputs["deepstack_visual_embeds"]):
        assert torch.equal(after, before[rows])
    assert kept.next_position == prefix.next_position and kept.video_grids == prefix.video_grids
    with pytest.raises(ValueError, match="mask"):
        prefix.keep(keep[:-1])
    with pytest.raises(ValueError, match="disagree on the token count"):
        replace(prefix, video_mask=prefix.video_mask[:-1])


# ---------------------------------------------------------------------------------------------
# `duokit eval` end to end.

SAMPLES = ["h0_ret_edit1", "h1_cnt_insert1", "h2_ord_edit1", "h3_cnt_edit1"]


def write_dataset(root):
    """Two decodable videos, one missing and one corrupt, 4 tries each, in the VNBench annotation schema."""
    videos = root / "videos"
    videos.mkdir()
    records = []
    for index, name in enumerate(SAMPLES):
        if name == "h3_cnt_edit1":
            (videos / f"{name}.mp4").write_bytes(b"not a video")
        elif name != "h2_ord_edit1":  # h2's video is missing
            write_video(videos / f"{name}.mp4", frames(count=20, seed=index), fps=10.0)
        gt = OPTIONS[index]
        for try_index, options in enumerate(permuted_options(OPTIONS)):
            records.append({"video": f"./VNBench/{name}.mp4", "question": "What is the secret word?",
                            "options": options, "gt": gt, "gt_option": LETTERS[options.index(gt)],
                            "type": name.split("_", 1)[1], "try": try_index, "needle_time": [0.5],
                            "length": 2.0})
    annotations = root / "annotations.json"
    annotations.write_text(json.dumps(records))
    return annotations, videos


def eval_args(annotations, videos, out, frames_count=4):
    return ["eval", "--model", "tiny:qwen2_5_vl", "--method", "baseline", "--annotations", str(annotations),
            "--videos", str(videos), "--frames", str(frames_count), "--out", str(out), "--chunk-size", "32"]


def test_eval_cli_writes_a_resumable_run(tmp_path, capsys, monkeypatch):
    annotations, videos = write_dataset(tmp_path)
    run = tmp_path / "run"
    assert main(eval_args(annotations, videos, run)) == 0

    predictions = list(iter_jsonl(run / "predictions.jsonl"))
    assert len(predictions) == 16
    assert len({p["record_id"] for p in predictions}) == 16
    failed = [p for p in predictions if p["sample_id"] in ("h2_ord_edit1", "h3_cnt_edit1")]
    assert len(failed) == 8 and all(p["correct"] is False and p["raw_output"] is None for p in failed)
    assert all("video not found" in p["error"] for p in failed if p["sample_id"] == "h2_ord_edit1")
    assert all("cannot decode" in p["error"] for p in failed if p["sample_id"] == "h3_cnt_edit1")
    decoded = [p for p in predictions if p not in failed]
    assert all(p["error"] is None and len(p["output_tokens"]) == 5 for p in decoded)
    assert all(p["cost"]["frames"] == 4 and p["cost"]["needles_missed"] == 0 for p in decoded)

    assert "on 4 samples; 2 failed, counted wrong (errors in" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["scores"]["n_samples"] == 4 and summary["scores"]["n_records"] == 16
    assert summary["scores"]["overall_1try"] == pytest.approx(sum(p["correct"] for p in predictions) / 16)
    assert summary["cost"]["n_samples"] == 2 and summary["cost"]["n_errors"] == 2
    assert summary["cost"]["needle_coverage"] == 1.0
    config = json.loads((run / "config.json").read_text())
    assert config["frames"] == 4 and config["method"] == {"name": "baseline"}
    assert set(config["versions"]) >= {"torch", "transformers", "duokit"}

    # Re-run after deleting the summary and two tries of a decoded sample: only those two are redone,
    # appended after the untouched lines, with the same answers.
    def without_timings(record):
        return {key: value for key, value in record.items() if key != "cost"}

    lines = (run / "predictions.jsonl").read_text().splitlines(keepends=True)
    redo = ("h1_cnt_insert1_2", "h1_cnt_insert1_3")
    removed = [i for i, p in enumerate(predictions) if p["record_id"] in redo]
    kept = [line for i, line in enumerate(lines) if i not in removed]
    (run / "predictions.jsonl").write_text("".join(kept))
    (run / "summary.json").unlink()
    # This time through the Python entry point, which must be the same run as the CLI's.
    resumed = run_eval(annotations, videos, 4, run, model="tiny:qwen2_5_vl", chunk_size=32)
    assert (run / "predictions.jsonl").read_text().splitlines(keepends=True)[:14] == kept
    redone = list(iter_jsonl(run / "predictions.jsonl"))[14:]
    assert [without_timings(p) for p in redone] == [without_timings(predictions[i]) for i in removed]
    assert resumed == json.loads((run / "summary.json").read_text())
    assert resumed["scores"] == summary["scores"]

    # A finished run re-runs without loading the model and adds nothing.
    def no_model(*args, **kwargs):
        raise AssertionError("a finished run must not load the model")

    monkeypatch.setattr("duokit.models.load_vlm", no_model)
    assert main(eval_args(annotations, videos, run)) == 0
    assert len(list(iter_jsonl(run / "predictions.jsonl"))) == 16

    # The same directory with other settings is refused with one clear message.
    assert main(eval_args(annotations, videos, run, frames_count=6)) == 1
    assert "differs in: frames" in capsys.readouterr().err
    annotations.write_text(annotations.read_text() + " ")  # as is another annotation file
    assert main(eval_args(annotations, videos, run)) == 1
    assert "differs in: annotations_sha256; the annotation file changed" in capsys.readouterr().err
    annotations.write_text(annotations.read_text()[:-1])


def test_a_resume_evaluates_again_what_changed_videos_or_errors_made(tmp_path, capsys):
    """A video that changed since its tries were logged (a synthetic set re-made under the same ids, a
    missing video put in place) has those tries evaluated again; `--retry-errors` also redoes the tries
    that failed; everything else is kept line for line."""
    annotations, videos = write_dataset(tmp_path)
    run = tmp_path / "run"
    assert main(eval_args(annotations, videos, run)) == 0
    before = list(iter_jsonl(run / "predictions.jsonl"))
    assert {p["video_bytes"] is None for p in before if p["sample_id"] == "h2_ord_edit1"} == {True}
    shutil.copy(videos / "h0_ret_edit1.mp4", videos / "h2_ord_edit1.mp4")  # the missing video arrives
    write_video(videos / "h1_cnt_insert1.mp4", frames(count=20, seed=99), fps=10.0)  # re-made
    capsys.readouterr()
    assert main(eval_args(annotations, videos, run)) == 0
    assert "evaluating again 8 tries made on a video that has changed since (2 samples)" in capsys.readouterr().err
    after = list(iter_jsonl(run / "predictions.jsonl"))
    redone = {"h2_ord_edit1", "h1_cnt_insert1"}
    assert [p for p in after if p["sample_id"] not in redone] == [p for p in before if p["sample_id"] not in redone]
    fresh = [p for p in after if p["sample_id"] in redone]
    assert len(fresh) == 8 and all(p["error"] is None for p in fresh)
    assert {p["video_bytes"] for p in fresh if p["sample_id"] == "h2_ord_edit1"} == {
        (videos / "h0_ret_edit1.mp4").stat().st_size}

    # The corrupt video's tries stay logged as errors unless asked; then they are made again (and fail again).
    assert main(eval_args(annotations, videos, run)) == 0
    assert "evaluating again" not in capsys.readouterr().err
    assert main([*eval_args(annotations, videos, run), "--retry-errors"]) == 0
    assert "evaluating again 4 tries logged with an error (1 samples)" in capsys.readouterr().err
    final = list(iter_jsonl(run / "predictions.jsonl"))
    assert len(final) == 16 and [p["sample_id"] for p in final[-4:]] == ["h3_cnt_edit1"] * 4
    assert all("cannot decode" in p["error"] for p in final[-4:])


def test_eval_cli_reports_bad_input(tmp_path, capsys):
    annotations, videos = write_dataset(tmp_path)
    assert main(eval_args(annotations, tmp_path / "nowhere", tmp_path / "run")) == 1
    assert "not a folder; give the folder holding the annotation file's videos" in capsys.readouterr().err
    assert main(eval_args(annotations, tmp_path, tmp_path / "run")) == 1  # the folder above the videos
    err = capsys.readouterr().err
    assert "none of the 4 videos the annotations name is there (e.g. h0_ret_edit1.mp4)" in err
    assert "duokit synth --out DIR" in err
    args = eval_args(annotations, videos, tmp_path / "run")
    args[args.index("baseline")] = "no-such-method"
    assert main(args) == 1
    assert "unknown method" in capsys.readouterr().err
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        run_eval(annotations, videos, 4, tmp_path / "run", model="tiny:qwen2_5_vl", chunk_size=0)
    with pytest.raises(ValueError, match="unknown parser"):
        run_eval(annotations, videos, 4, tmp_path / "run", model="tiny:qwen2_5_vl", parser="nope")
    assert not (tmp_path / "run").exists()


def test_eval_with_duo_checks_the_pattern_before_writing_the_run(tmp_path, capsys):
    annotations, videos = write_dataset(tmp_path)
    save_pattern(tmp_path / "wrong", np.ones((3, 2)), sink_size=4, recent_size=8)  # the tiny model has 2 layers
    save_pattern(tmp_path / "pattern", [[0.9, 0.1], [0.2, 0.8]], sink_size=4, recent_size=8)
    run = tmp_path / "run"
    args = eval_args(annotations, videos, run)
    args[args.index("baseline")] = "duo"
    duo_flags = ["--sparsity", "0.5", "--sink", "4", "--recent", "16"]
    assert main([*args, "--pattern", str(tmp_path / "wrong"), *duo_flags]) == 1
    assert "shape (3, 2)" in capsys.readouterr().err
    assert not run.exists()

    assert main([*args, "--pattern", str(tmp_path / "pattern"), *duo_flags]) == 0
    decoded = [p for p in iter_jsonl(run / "predictions.jsonl") if p["error"] is None]
    assert len(decoded) == 8 and all(len(p["output_tokens"]) == 5 for p in decoded)
    # One retrieval + one streaming KV head per layer: 2 heads keep every prefix token, 2 their fixed buffer
    # of sink + recent + 1 slots (the window a query sees: the sink, the recent tokens before it, itself).
    prefix_tokens = decoded[0]["cost"]["prefix_tokens"]
    assert decoded[0]["cost"]["kv_bytes"] == 2 * 16 * 4 * (2 * prefix_tokens + 2 * min(prefix_tokens, 4 + 16 + 1))
    config = json.loads((run / "config.json").read_text())
    assert config["method"]["name"] == "duo" and config["method"]["recent"] == 16


@dataclass
class FrameChunks(Method):
    """Test method owning its prefill: one chunk per temporal group boundary, each with a 4-D causal mask
    and its own keyword, which a forward pre-hook on the decoder layers records."""

    name = "test-frame-chunks"

    def __post_init__(self):
        self.seen = []

    def install(self, model, adapter):
        from contextlib import ExitStack

        stack = ExitStack()

        def record(module, args, kwargs):
            if "probe" in kwargs:
                self.seen.append(kwargs["probe"])

        for layer in adapter.decoder_layers:
            stack.callback(layer.register_forward_pre_hook(record, with_kwargs=True).remove)
        return stack

    def prefill(self, lm, prefix, cache, chunk_size):
        starts = (prefix.frame_of[1:] != prefix.frame_of[:-1]).nonzero()[:, 0] + 1
        bounds = [*starts.tolist(), prefix.num_tokens]

        def chunk_kwargs(start, end):
            mask = torch.ones(end - start, end, dtype=torch.bool).tril(start)  # causal, bottom-right aligned
            return {"attention_mask": mask[None, None], "probe": (start, end)}

        return lm.prefill(prefix, cache, chunk_size, bounds=bounds, chunk_kwargs=chunk_kwargs)


def test_a_method_gives_chunk_bounds_and_per_chunk_inputs():
    model, _, adapter = tiny("qwen2_5_vl")
    method = FrameChunks()
    with monkeypatch_rule(adapter):
        result = run_engine(model, adapter, method, frames(), PROMPTS[:1])
        expected = generate_tokens(model, adapter, frames(), None, PROMPTS[0])
    assert result.answers[0].tokens == expected
    prefix = LM(model, adapter).embed(SampleInput(frames(), FPS))
    groups = int(prefix.frame_of.max()) + 1
    chunks = sorted(set(method.seen))
    assert len(chunks) == groups + 2  # the text before the video, each temporal group, the text after it
    assert chunks[0][0] == 0 and chunks[-1][1] == prefix.num_tokens
    assert all(a[1] == b[0] for a, b in pairwise(chunks))
    for group, (start, end) in enumerate(chunks[1:-1]):
        assert (prefix.frame_of[start:end] == group).all()
    with pytest.raises(ValueError, match="bounds"):
        LM(model, adapter).prefill(prefix, None, 16, bounds=[5, 3, prefix.num_tokens])


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_lm_exposes_layers_rotary_and_geometry(family):
    """What a method that works inside the model uses: the decoder layers, the rotary embedding for
    positions it makes up (M-RoPE takes (3, 1, n), others (1, n); floats allowed), the geometry."""
    model, _, adapter = tiny(family)
    lm = LM(model, adapter)
    assert len(lm.layers) == lm.geometry.num_layers == 2
    positions = adapter.positions(0, 5).float() + 0.5
    hidden = torch.zeros(1, 5, lm.geometry.hidden_size)
    cos, sin = lm.rotary(hidden, positions)
    assert cos.shape[-2:] == sin.shape[-2:] == (5, lm.geometry.head_dim)
    assert lm.geometry.dtype_bytes == 4
