"""GPU-path guards that run on CPU: NaN logits as named errors, the run's resolved precision and pixel
limits, and the planner sized from the largest video."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _tiny_models import tiny
from test_engine import eval_args, write_dataset

from duokit.cli import main
from duokit.data.video import VideoError, frame_size, write_video
from duokit.data.vnbench import group_samples, load_annotations
from duokit.engine import LM, NonFiniteLogits, SampleInput, greedy_decode
from duokit.eval_command import largest_frame_size
from duokit.io import iter_jsonl
from duokit.methods import get_method


def nan_head(model):
    """A forward hook that turns the LM head's output into NaN, as an fp16 overflow does."""
    return model.lm_head.register_forward_hook(lambda module, args, output: torch.full_like(output, float("nan")))


def test_nan_logits_raise_a_named_error():
    model, _, adapter = tiny("qwen2_5_vl")
    method = get_method("baseline")
    frames = np.zeros((4, 56, 56, 3), dtype=np.uint8)
    lm = LM(model, adapter)
    with method.apply(model, adapter):
        prefix = lm.embed(SampleInput(frames, 1.0))
        cache = lm.prefill(prefix, method.new_cache(lm, prefix))
        handle = nan_head(model)
        try:
            with pytest.raises(NonFiniteLogits, match="NaN/inf logits at decoding step 1 of a torch.float32 model"):
                greedy_decode(lm, cache, prefix, adapter.suffix_ids("A?"))
        finally:
            handle.remove()


def test_eval_records_nan_logits_as_errors_and_counts_them(tmp_path, capsys):
    annotations, videos = write_dataset(tmp_path)
    model, _, _ = tiny("qwen2_5_vl")
    handle = nan_head(model)
    try:
        import duokit.models

        original = duokit.models.load_vlm
        duokit.models.load_vlm = lambda *args, **kwargs: tiny("qwen2_5_vl")
        try:
            assert main(eval_args(annotations, videos, tmp_path / "run")) == 0
        finally:
            duokit.models.load_vlm = original
    finally:
        handle.remove()
    records = list(iter_jsonl(tmp_path / "run" / "predictions.jsonl"))
    decodable = [r for r in records if r["sample_id"] in ("h0_ret_edit1", "h1_cnt_insert1")]
    assert len(decodable) == 8
    assert all(r["error"].startswith("NonFiniteLogits: NaN/inf logits") and r["raw_output"] is None
               for r in decodable)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["cost"]["n_errors"] == 4  # 2 undecodable videos + 2 NaN samples


def test_run_records_the_resolved_precision_and_refuses_another(tmp_path, capsys):
    annotations, videos = write_dataset(tmp_path)
    run = tmp_path / "run"
    assert main(eval_args(annotations, videos, run)) == 0
    config = json.loads((run / "config.json").read_text())
    assert (config["dtype"], config["device"]) == ("float32", "cpu")  # "auto" resolved
    assert (config["max_pixels"], config["min_pixels"], config["attn_implementation"]) == (200704, None, "sdpa")
    # A resume that would run in another precision (as on a GPU of another kind) is refused, naming both.
    assert main([*eval_args(annotations, videos, run), "--dtype", "bfloat16"]) == 1
    assert "dtype: 'float32' -> 'bfloat16'" in capsys.readouterr().err
    assert main([*eval_args(annotations, videos, run), "--max-pixels", "3136"]) == 1
    assert "max_pixels: 200704 -> 3136" in capsys.readouterr().err
    assert main(eval_args(annotations, videos, run)) == 0  # the same settings resume


def test_the_planner_sizes_from_the_largest_video_by_header(tmp_path):
    annotations, videos = write_dataset(tmp_path)  # h0, h1: 96 x 128; h2 missing; h3 corrupt
    write_video(videos / "h1_cnt_insert1.mp4", np.zeros((4, 240, 320, 3), dtype=np.uint8), fps=10.0)
    samples = group_samples(load_annotations(annotations))
    assert frame_size(videos / "h1_cnt_insert1.mp4") == (240, 320)
    with pytest.raises(VideoError, match="cannot read this video's header"):
        frame_size(videos / "h3_cnt_edit1.mp4")
    assert largest_frame_size(samples, videos) == (240, 320)
    assert largest_frame_size(samples[2:], videos) == (360, 640)  # none readable: the documented default


def test_gpu_smoke_runs_on_cpu_and_says_what_it_skipped(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_smoke.py"
    spec = importlib.util.spec_from_file_location("gpu_smoke", script)
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    monkeypatch.setattr(smoke, "MODELS", ("needlenet",))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert smoke.main(["--json", str(tmp_path / "smoke.json")]) == 0
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert result["ok"] and result["device"] == "cpu" and result["command"].startswith("python ")
    assert {"date", "versions", "checks", "skipped"} <= set(result)
    assert len(result["checks"]) == 5 and all(check["ok"] for check in result["checks"])
    assert any("max_memory_allocated" in what for what in result["skipped"])
