"""duokit's scorer against a published result: the official LLaVA-OneVision-7B predictions on VNBench.

tests/data/llava_ov_7b_vnbench.tsv holds, for each of the 5,400 lines of the VideoNIAH repository's
`llava_examples/llava-ov-7b-videoniah-result.jsonl` (commit 942161dd), in file order: the video file stem,
`task_type`, `try`, `pred` and `gt` (the prompts are left out). On that file both official scripts give
Overall 0.5178; per sub-task (swap applied) Ret E 88.7, I-1 87.3, I-2 55.3, Ord E 70.0, I-1 50.0,
I-2 37.3, Cnt E-1 41.3, E-2 8.7, I 27.3; 1-try 0.628 (github.com/joez17/VideoNIAH:
llava_examples/; paper arXiv:2406.09367).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from duokit.data.scoring import read_predictions, score_predictions, write_eval_py_jsonl
from duokit.data.vnbench import PAPER_LABELS

TABLE = Path(__file__).parent / "data" / "llava_ov_7b_vnbench.tsv"
PUBLISHED = {"Ret E": 88.7, "Ret I-1": 87.3, "Ret I-2": 55.3, "Ord E": 70.0, "Ord I-1": 50.0, "Ord I-2": 37.3,
             "Cnt E-1": 41.3, "Cnt E-2": 8.7, "Cnt I": 27.3}


@pytest.fixture(scope="module")
def result_file(tmp_path_factory) -> Path:
    """The published file as evaluation_utils.py reads it (video_path, task_type, pred, gt, try)."""
    lines = []
    for row in TABLE.read_text().splitlines():
        stem, task_type, try_index, pred, gt = row.split("\t")
        lines.append(json.dumps({"video_path": f"./VNBench/{stem}.mp4", "task_type": task_type, "pred": pred,
                                 "gt": gt, "try": int(try_index)}))
    path = tmp_path_factory.mktemp("published") / "llava-ov-7b-videoniah-result.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_table_is_the_whole_official_file():
    rows = [row.split("\t") for row in TABLE.read_text().splitlines()]
    assert len(rows) == 5400 and all(len(row) == 5 for row in rows)
    tries = {}
    for stem, _, try_index, _, _ in rows:
        tries.setdefault(stem, []).append(int(try_index))
    assert len(tries) == 1350 and all(sorted(t) == [0, 1, 2, 3] for t in tries.values())


def test_evaluation_utils_input_gives_the_published_scores(result_file):
    predictions = read_predictions(result_file)
    assert predictions.format == "evaluation_utils"
    scores = score_predictions(predictions.records)
    assert round(scores["overall"], 4) == 0.5178
    assert round(scores["overall_1try"], 3) == 0.628
    per_label = {PAPER_LABELS[name]: round(100 * s["accuracy"], 1) for name, s in scores["subtasks"].items()}
    assert per_label == PUBLISHED
    assert scores["n_samples"] == 1350


def test_eval_py_input_gives_the_same_overall(result_file, tmp_path):
    """Re-exported as evaluation/eval.py input and read back with eval.py's parser (both scripts agree)."""
    exported = write_eval_py_jsonl(read_predictions(result_file).records, tmp_path / "eval_py.jsonl")
    predictions = read_predictions(exported)
    assert predictions.format == "eval_py"
    assert round(score_predictions(predictions.records)["overall"], 4) == 0.5178
