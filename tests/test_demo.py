"""`duokit demo` end to end in a reduced setting (16 frames, 1 sample per sub-task, 3 gate steps), its
resume and refusal rules, and NeedleNet's own gate-training data (`train-duo --model needlenet`)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from duokit import cli
from duokit.io import iter_jsonl, read_json
from duokit.methods import get_method
from duokit.models import resolve_model_path
from duokit.models.base import Geometry, TokenCounts
from duokit.runtime import torch_threads

REDUCED = ["--frames", "16", "--per-task", "1", "--gate-steps", "3"]
PLOTS = ("accuracy_subtasks.png", "accuracy_kv.png", "latency.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """Run with one torch thread, then give the thread count back: torch's setting is process-wide and would
    otherwise leak into every later test."""
    out, err = io.StringIO(), io.StringIO()
    with torch_threads(1), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("demo") / "run"
    code, stdout, stderr = run_cli(["demo", "--out", str(run), *REDUCED])
    assert code == 0, stderr
    return run, stdout


def stage_outputs(run: Path) -> dict[str, tuple[bytes, int]]:
    """Every file a stage writes (not the report), with its content and modification time."""
    files = [run / "demo.json", run / "stages.json", run / "data" / "annotations.json",
             *sorted((run / "data" / "videos").iterdir()), *sorted((run / "duo-train").rglob("*")),
             *sorted((run / "eval").rglob("*"))]
    return {str(path.relative_to(run)): (path.read_bytes(), path.stat().st_mtime_ns) for path in files if path.is_file()}


def test_demo_writes_table_and_plots(demo_run):
    run, stdout = demo_run
    for number, title in enumerate(("synthesizing 9 held-out samples", "evaluating baseline", "training DuoAttention",
                                    "evaluating DuoAttention", "writing the table"), start=1):
        assert f"[{number}/5] {title}" in stdout
    results = read_json(run / "results.json")
    rows = {row["method"]: row for row in results["methods"]}
    assert list(rows) == ["baseline", "duo"]
    for name, row in rows.items():
        # The table is the eval runs' own scores, nothing recomputed differently.
        scores = read_json(run / "eval" / name / "summary.json")["scores"]
        assert (row["overall"], row["overall_1try"], row["families"]) == (
            scores["overall"], scores["overall_1try"], scores["families"])
        assert row["n_samples"] == 9
        printed = next(line for line in stdout.splitlines() if line.startswith(row["label"]))
        assert f"{100 * row['overall']:.1f}" in printed.split()
        assert f"| {row['label']} |" in (run / "results.md").read_text()
    assert rows["baseline"]["streaming_heads"] == 0.0
    assert rows["duo"]["streaming_heads"] == 0.5
    assert set(results["stage_seconds"]) == {"synth", "eval-baseline", "prepare-duo", "eval-duo"}
    for name in PLOTS:
        assert (run / "plots" / name).read_bytes().startswith(PNG_SIGNATURE)


def test_held_out_set_is_real_files_of_the_eval_split(demo_run):
    run, _ = demo_run
    manifest = read_json(run / "data" / "manifest.json")
    assert manifest["config"]["split"] == "eval" and manifest["config"]["seed"] == 1  # demo seed 0 + 1
    records = read_json(run / "data" / "annotations.json")
    assert len(records) == 9 * 4
    assert all((run / "data" / record["video"]).is_file() for record in records)


def test_duo_holds_less_kv_exactly_as_its_formula_says(demo_run):
    from transformers import AutoConfig

    run, _ = demo_run
    text = AutoConfig.from_pretrained(resolve_model_path("needlenet")).get_text_config()
    head_dim = text.hidden_size // text.num_attention_heads
    geometry = Geometry(text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads, head_dim,
                        text.hidden_size, text.intermediate_size, dtype_bytes=4)
    pattern = run / "duo-train" / "pattern"
    methods = {"baseline": get_method("baseline"),
               "duo": get_method("duo", pattern=str(pattern), sparsity=0.5, sink=4, recent=16)}
    kv = {}
    for name, method in methods.items():
        costs = {r["sample_id"]: r["cost"] for r in iter_jsonl(run / "eval" / name / "predictions.jsonl")}
        assert len(costs) == 9
        for cost in costs.values():  # measured bytes of the cache (float32) = the method's prediction
            assert cost["kv_bytes"] == method.estimate_kv_bytes(geometry, TokenCounts(cost["prefix_tokens"]))
            assert cost["kv_bytes_peak"] == cost["kv_bytes_planned"]
        kv[name] = read_json(run / "results.json")["methods"][list(methods).index(name)]["kv_bytes"]
    assert 0 < kv["duo"] < kv["baseline"]


def test_gates_trained_on_needlenet_task_data(demo_run):
    run, _ = demo_run
    pattern = read_json(run / "duo-train" / "pattern" / "config.json")
    assert pattern["dataset_name"] == "NeedleNetTask"
    assert pattern["steps_done"] == 3 and (pattern["sink_size"], pattern["recent_size"]) == (4, 16)
    duo_config = read_json(run / "eval" / "duo" / "config.json")["method"]
    assert (duo_config["sink"], duo_config["recent"], duo_config["sparsity"]) == (4, 16, 0.5)


def test_second_run_skips_every_stage(demo_run):
    run, _ = demo_run
    before = stage_outputs(run)
    results = (run / "results.json").read_bytes()
    code, stdout, stderr = run_cli(["demo", "--out", str(run), *REDUCED])
    assert code == 0, stderr
    assert stdout.count("done before, skipped") == 4
    assert stage_outputs(run) == before  # not rewritten, not even touched
    assert (run / "results.json").read_bytes() == results


def test_interrupted_eval_resumes_to_the_same_predictions(demo_run):
    # In place: the duo run's config records its pattern's absolute path, so a copied run is another run.
    run, _ = demo_run
    predictions = run / "eval" / "duo" / "predictions.jsonl"
    complete = predictions.read_text().splitlines(keepends=True)
    predictions.write_text("".join(complete[:12]))  # 3 of 9 samples done, then the run was killed
    (run / "eval" / "duo" / "summary.json").unlink()
    code, stdout, stderr = run_cli(["demo", "--out", str(run), *REDUCED])
    assert code == 0, stderr
    assert stdout.count("done before, skipped") == 3 and "[4/5] evaluating DuoAttention on 9 samples …" in stdout
    strip = [{k: v for k, v in r.items() if k != "cost"} for r in iter_jsonl(predictions)]
    assert strip == [{k: v for k, v in json.loads(line).items() if k != "cost"} for line in complete]


def test_changed_config_into_the_same_out_is_refused(demo_run):
    run, _ = demo_run
    before = stage_outputs(run)
    code, _, stderr = run_cli(["demo", "--out", str(run), "--frames", "16", "--per-task", "2", "--gate-steps", "3"])
    assert code == 1
    assert "holds a demo run with other settings (per_task: 1 -> 2)" in stderr and "new --out" in stderr
    assert stage_outputs(run) == before


@pytest.mark.parametrize("flags, message", [(["--frames", "8"], "all nine sub-tasks need >= 16"),
                                            (["--sparsity", "1.5"], "sparsity must be a fraction"),
                                            (["--gate-steps", "0"], "--steps and --save-every must be >= 1")])
def test_bad_settings_fail_before_any_work(tmp_path, flags, message):
    out = tmp_path / "run"
    code, _, stderr = run_cli(["demo", "--out", str(out), *REDUCED, *flags])
    assert code == 1 and message in stderr and stderr.startswith("duokit demo: error:")
    assert not out.exists()


def test_run_cli_gives_the_thread_count_back(tmp_path):
    with torch_threads(2):
        assert run_cli(["demo", "--out", str(tmp_path / "run"), *REDUCED, "--frames", "8"])[0] == 1
        assert torch.get_num_threads() == 2


# ---------------------------------------------------------------------------------------------
# NeedleNet's gate-training data, picked by `train-duo --model needlenet`.

def test_train_duo_needlenet_trains_on_needlenet_examples(tmp_path):
    from duokit.methods.duo.train import TrainSettings, make_data
    from duokit.models import load_vlm
    from duokit.models.needlenet.data import make_example
    from duokit.models.needlenet.gate_data import NeedleNetTask

    out = tmp_path / "gates"
    code, _, stderr = run_cli(["train-duo", "--model", "needlenet", "--out", str(out), "--steps", "2", "--frames", "16",
                               "--sink", "4", "--recent", "16", "--loss-positions", "answer", "--no-progress",
                               "--device", "cpu", "--dtype", "float32"])
    assert code == 0, stderr
    assert read_json(out / "pattern" / "config.json")["dataset_name"] == "NeedleNetTask"
    assert read_json(out / "config.json")["loss_positions"] == "answer"  # the user's choice is kept
    assert len(list(iter_jsonl(out / "gate_history.jsonl"))) == 2

    _, processor, adapter = load_vlm("needlenet", dtype=torch.float32, device="cpu")
    data = make_data(TrainSettings(model="needlenet", frames=(16,), seed=0), adapter)
    assert isinstance(data, NeedleNetTask)
    unk = processor.tokenizer.unk_token_id
    for index in range(3):
        example = data.example(index)
        answer_ids = example.input_ids[0, example.answer_mask]
        assert unk not in answer_ids.tolist()
        # The loss tokens are exactly the gt option's text of NeedleNet's own training example.
        assert processor.tokenizer.decode(answer_ids) == make_example(0, 16, index, split="train").answer


def test_is_needlenet_reads_the_checkpoint_metadata(tmp_path):
    from duokit.models.needlenet.gate_data import is_needlenet

    shipped = Path(resolve_model_path("needlenet"))
    assert is_needlenet("needlenet")
    exported = tmp_path / "exported"  # a retrained model (`duokit needlenet export`) is a folder like it
    shutil.copytree(shipped, exported)
    assert is_needlenet(str(exported))
    meta = json.loads((exported / "duokit.json").read_text())
    (exported / "duokit.json").write_text(json.dumps({**meta, "name": "other"}))
    assert not is_needlenet(str(exported))
    assert not is_needlenet("tiny:qwen2_5_vl") and not is_needlenet("Qwen/Qwen2.5-VL-3B-Instruct")


def test_needlenet_task_cycles_frame_counts():
    from duokit.models import load_vlm
    from duokit.models.needlenet.gate_data import NeedleNetTask

    _, _, adapter = load_vlm("needlenet", dtype=torch.float32, device="cpu")
    task = NeedleNetTask(adapter, (16, 32), seed=0)
    video_tokens = [int(adapter.video_mask(task.example(i).input_ids).sum()) for i in range(2)]
    assert video_tokens == [32, 64]  # 2 video tokens per frame (docs/needlenet.md): 16 frames, then 32
    torch.testing.assert_close(task.example(2).inputs_embeds, NeedleNetTask(adapter, 16, 0).example(2).inputs_embeds,
                               rtol=0, atol=0)
