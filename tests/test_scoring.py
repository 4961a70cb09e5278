"""VNBench scoring: parsers, circular scoring, the official formats, and equivalence with the official scripts.

`reference_eval_py` and `reference_evaluation_utils` re-implement, independently of duokit, the scoring
loops of the two official scripts (github.com/joez17/VideoNIAH: evaluation/eval.py,
llava_examples/evaluation_utils.py; quirks included); duokit's
scores must equal theirs on the same predictions.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from _vnbench_records import PUBLISHED_LABEL, raw_annotations, raw_tries

from duokit.cli import main
from duokit.data.scoring import (
    PREDICTION_KEYS,
    PredictionFormatError,
    parse_answer,
    prediction_record,
    read_predictions,
    score_predictions,
    write_eval_py_jsonl,
)
from duokit.data.vnbench import SUBTASKS, parse_record

# ------------------------------------------------------------------ the official scripts, re-implemented


def reference_eval_py(lines: list[dict]) -> tuple[dict[str, float], float]:
    """joez17/VideoNIAH evaluation/eval.py: per-`type` accuracy of groups `question_id[:-2]`, Overall = their mean."""
    correct_tries: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for line in lines:
        if line["pred"] is None:
            continue
        gt = "ABCD"[line["gt"]] if line["gt"] in [0, 1, 2, 3] else line["gt"]
        if "gpt_judge" in line:
            ok = line["gpt_judge"][0] == "1"
        else:
            head = line["pred"].split(".")[0]
            letters = [letter for letter in "ABCD" if letter in head]
            ok = (letters[0] if letters else head) == gt
        correct_tries[line["type"]][line["question_id"][:-2]] += ok
    accuracy = {label: sum(n == 4 for n in groups.values()) / len(groups)
                for label, groups in sorted(correct_tries.items())}
    return accuracy, sum(accuracy.values()) / len(accuracy)


def reference_evaluation_utils(lines: list[dict]) -> dict[str, float]:
    """joez17/VideoNIAH llava_examples/evaluation_utils.py: first character, swap I-1/I-2, mean of family means."""
    total: dict[str, int] = defaultdict(int)
    task_of: dict[str, str] = {}
    for line in lines:
        ok = line["judge_result"] if "judge_result" in line else int(line["pred"][0] == line["gt"])
        total[line["video_path"]] += ok
        task_of[line["video_path"]] = line["task_type"]
    assert 4 * len(total) == len(lines)
    results: dict[str, list[bool]] = defaultdict(list)
    for video, n in total.items():
        results[task_of[video]].append(n == 4)
    accuracy = {task: sum(r) / len(r) for task, r in results.items()}
    families = {f: sum(a for task, a in accuracy.items() if f in task) / 3 for f in ("cnt", "ord", "ret")}
    accuracy["ret_insert1"], accuracy["ret_insert2"] = accuracy["ret_insert2"], accuracy["ret_insert1"]
    out = dict(sorted(accuracy.items())) | families
    out["Overall"] = (families["ord"] + families["cnt"] + families["ret"]) / 3
    return out


# ------------------------------------------------------------------ constructed predictions

# Answer styles, as templates over the correct letter {g}, a wrong letter {w} and {lower} = g.lower().
CLEAN_STYLES = ["{g}", "{g}.", "{g}. option text", "{g}\n"]
QUIRK_STYLES = [
    "{w}", "({g})", "The answer is {g}", "Answer: {g}", "I think {g}. A", "{lower}", "{g} or {w}",
    "Based on the video, {g}.", "D, not {g}", ".{g}", "{w}{g}", "  {g}",
]


def make_plan(per_task: int, styles: list[str], seed: int, with_empty: bool) -> list[tuple[dict, str]]:
    """(published record, model answer) for every try; about half the samples answered cleanly."""
    rng = random.Random(seed)
    plan = []
    for raw_sample in _samples(raw_annotations(per_task)):
        clean = rng.random() < 0.5
        for raw in raw_sample:
            gt = raw["gt_option"]
            wrong = rng.choice([c for c in "ABCD" if c != gt])
            choices = CLEAN_STYLES if clean else styles + ([""] if with_empty else [])
            plan.append((raw, rng.choice(choices).format(g=gt, w=wrong, lower=gt.lower())))
    return plan


def _samples(raw_records):
    return [raw_records[i:i + 4] for i in range(0, len(raw_records), 4)]


def stem(raw: dict) -> str:
    return Path(raw["video"]).stem


def eval_py_lines(plan) -> list[dict]:
    return [{"question_id": f"{stem(raw)}_{raw['try']}", "pred": pred, "gt": raw["gt_option"],
             "type": raw["type"]} for raw, pred in plan]


def evaluation_utils_lines(plan) -> list[dict]:
    return [{"video_path": raw["video"], "task_type": raw["type"], "pred": pred, "gt": raw["gt_option"],
             "try": raw["try"]} for raw, pred in plan]


def duokit_lines(plan, parser="official") -> list[dict]:
    return [prediction_record(parse_record(raw, i), pred, parser) for i, (raw, pred) in enumerate(plan)]


def write_jsonl(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def score_file(path: Path, parser=None) -> dict:
    return score_predictions(read_predictions(path).records, parser=parser)


# ------------------------------------------------------------------ parsers, hand-computed

OFFICIAL_CASES = [
    ("B", "B"), ("B.", "B"), ("(D)", "D"), ("The answer is B", "B"),
    ("Answer: C", "A"),  # the capital A of "Answer" wins (docs/scoring.md, "Parsers")
    ("I think B. A", "B"),  # only the text before the first '.' counts
    ("D, not A", "A"),  # A has priority wherever it occurs
    ("Based on the video, C.", "B"),  # the B of "Based"
    ("C.D", "C"), (".B", None), ("b", None), ("", None), ("none of them", None), (None, None),
]


@pytest.mark.parametrize("text,letter", OFFICIAL_CASES)
def test_official_parser(text, letter):
    assert parse_answer(text) == letter
    assert parse_answer(text, "official") == letter


STRICT_CASES = [
    ("B", "B"), ("B.", "B"), ("(B)", "B"), ("[B]", "B"), ("B)", "B"), ("B:", "B"), ("  C \n", "C"),
    ("B. banana", "B"), ("The answer is B", "B"), ("The answer is B.", "B"), ("Answer: C", "C"),
    ("the correct answer is (D)", "D"), ("Option A", "A"), ("B, I am sure", "B"),
    ("A or B", None), ("A banana", None), ("I think B", None), ("banana", None), ("b", None), ("", None),
    ("D, not A", None), ("B. A", None), ("AB", None), (None, None),
]


@pytest.mark.parametrize("text,letter", STRICT_CASES)
def test_strict_parser_without_options(text, letter):
    assert parse_answer(text, "strict") == letter


FRUITS = ["apple", "banana", "orange", "lemon"]


@pytest.mark.parametrize("text,options,letter", [
    ("B. banana", FRUITS, "B"), ("B. Banana!", FRUITS, "B"), ("B. apple", FRUITS, None),
    ("B", FRUITS, "B"), ("B. banana and apple", FRUITS, None),
    ("C. A Famosa", ["Pretoria Bridge", "ETH Zurich", "A Famosa", "Tower Bridge"], "C"),
    ("B. 5", [2, 5, 1, 6], "B"), ("B. 6", [2, 5, 1, 6], None),
])
def test_strict_parser_checks_option_text_when_given(text, options, letter):
    assert parse_answer(text, "strict", options) == letter


def test_strict_without_options_rejects_a_second_letter_word():
    assert parse_answer("C. A Famosa", "strict") is None  # documented: ambiguous without the options


ORDERS = ["Sam, Grace, Paul, Bob", "Grace, Sam, Paul, Bob", "Bob, Paul, Grace, Sam", "Paul, Bob, Sam, Grace"]


@pytest.mark.parametrize("text,options,letter", [
    ("banana", FRUITS, "B"), ("Banana.", FRUITS, "B"), ("  BANANA ", FRUITS, "B"),
    ("I saw a banana in the video", FRUITS, "B"), ("apple or banana", FRUITS, None), ("kiwifruit", FRUITS, None),
    ("bananas", FRUITS, None), ("", FRUITS, None), (None, FRUITS, None),
    ("sam grace paul bob", ORDERS, "A"), ("The order is: Bob, Paul, Grace, Sam.", ORDERS, "C"),
    ("Sam, Grace", ORDERS, None),
    ("4", [3, 4, 5, 14], "B"), ("There are 14 cats", [3, 4, 5, 14], "D"), ("3 or 4", [3, 4, 5, 14], None),
    ("B", FRUITS, None),  # a letter is not option text
])
def test_text_parser(text, options, letter):
    assert parse_answer(text, "text", options) == letter


def test_text_parser_exact_match_beats_occurrence():
    options = ["Tower Bridge", "Bridge", "ETH Zurich", "Pretoria Bridge"]
    assert parse_answer("Bridge", "text", options) == "B"  # also occurs in A and D
    assert parse_answer("the bridge", "text", options) == "B"  # only "bridge" occurs in it
    assert parse_answer("Tower Bridge or Pretoria Bridge", "text", options) is None  # three occur


@pytest.mark.parametrize("text,letter", [("B", "B"), ("B. x", "B"), ("(B)", None), ("b", None), ("", None),
                                         ("The answer is B", None), ("Answer: C", "A")])
def test_first_char_parser(text, letter):
    assert parse_answer(text, "first_char") == letter


def test_parser_errors():
    with pytest.raises(ValueError, match="unknown parser 'loose'"):
        parse_answer("A", "loose")
    with pytest.raises(ValueError, match="the 'text' parser .* pass options="):
        parse_answer("banana", "text")
    with pytest.raises(TypeError, match="must be a string, got int"):
        parse_answer(3)


# ------------------------------------------------------------------ prediction records


def test_prediction_record_fields():
    record = parse_record(raw_tries("h0", "ret_insert1", 1)[2], 0)  # try 2: gt banana is C
    out = prediction_record(record, "C. banana", "strict", prefill_s=1.5)
    assert list(out) == list(PREDICTION_KEYS) + ["prefill_s"]
    assert out == {
        "record_id": "h0_ret_insert1_2", "sample_id": "h0_ret_insert1", "video": "./VNBench/h0_ret_insert1.mp4",
        "subtask": "ret_insert1", "label": "ret_insert2", "try": 2,
        "question": "What kind of fruit appears in this video?", "options": ["banana", "lemon", "orange", "apple"],
        "gt": "banana", "gt_option": "A", "raw_output": "C. banana", "parser": "strict",
        "pred_letter": None, "correct": False, "error": None, "prefill_s": 1.5,
    }  # strict: "C. banana" names C but C is orange


def test_prediction_record_verdicts():
    record = parse_record(raw_tries("h0", "ret_insert1", 1)[0], 0)  # try 0: banana is B
    assert prediction_record(record, "B. banana", "strict")["correct"] is True
    assert prediction_record(record, "banana", "text")["pred_letter"] == "B"
    wrong = prediction_record(record, "Answer: B", "official")
    assert (wrong["pred_letter"], wrong["correct"]) == ("A", False)
    failed = prediction_record(record, "B", "official", error="video decode failed")
    assert (failed["pred_letter"], failed["correct"], failed["error"]) == (None, False, "video decode failed")
    with pytest.raises(ValueError, match=r"extra keys \['correct'\]"):
        prediction_record(record, "B", "official", correct=True)
    with pytest.raises(ValueError, match="unknown parser"):
        prediction_record(record, "B", "lenient")


# ------------------------------------------------------------------ equivalence with the official scripts


def test_eval_py_format_equals_eval_py(tmp_path):
    plan = make_plan(per_task=8, styles=QUIRK_STYLES, seed=1, with_empty=True)
    lines = eval_py_lines(plan)
    rng = random.Random(2)
    for line in lines:  # int gt, null preds and judge verdicts, as eval.py accepts them
        roll = rng.random()
        if roll < 0.15:
            line["gt"] = "ABCD".index(line["gt"])
        elif roll < 0.20:
            line["pred"] = None
        elif roll < 0.25:
            line["gpt_judge"] = [rng.choice("01"), "judge text"]
    for line in lines[:4]:  # a sample whose every pred is null disappears from eval.py's count
        line["pred"] = None
    expected, expected_overall = reference_eval_py(lines)
    assert 0.1 < expected_overall < 0.9  # a discriminating mixture

    loaded = read_predictions(write_jsonl(tmp_path / "eval.jsonl", lines))
    scores = score_predictions(loaded.records)
    assert loaded.format == "eval_py"
    assert loaded.skipped_lines == sum(line["pred"] is None for line in lines)
    assert scores["overall"] == pytest.approx(expected_overall, abs=1e-12)
    for subtask, row in scores["subtasks"].items():  # eval.py reports the published (swapped) labels
        assert row["accuracy"] == pytest.approx(expected[PUBLISHED_LABEL[subtask]], abs=1e-12)
    assert scores["n_samples"] == 9 * 8 - 1


def test_evaluation_utils_format_equals_evaluation_utils(tmp_path):
    plan = make_plan(per_task=8, styles=QUIRK_STYLES, seed=3, with_empty=False)
    lines = evaluation_utils_lines(plan)
    rng = random.Random(4)
    for line in lines:
        if rng.random() < 0.1:
            line["judge_result"] = rng.choice([0, 1])
    expected = reference_evaluation_utils(lines)
    assert 0.1 < expected["Overall"] < 0.9

    loaded = read_predictions(write_jsonl(tmp_path / "eu.jsonl", lines))
    scores = score_predictions(loaded.records)
    assert loaded.format == "evaluation_utils"
    assert scores["overall"] == pytest.approx(expected["Overall"], abs=1e-12)
    for family, mean in scores["families"].items():
        assert mean == pytest.approx(expected[family], abs=1e-12)
    for subtask, row in scores["subtasks"].items():  # after its swap, the file-suffix sub-tasks
        assert row["accuracy"] == pytest.approx(expected[subtask], abs=1e-12)


def test_duokit_records_equal_both_official_scripts(tmp_path):
    plan = make_plan(per_task=8, styles=QUIRK_STYLES, seed=5, with_empty=False)
    path = write_jsonl(tmp_path / "pred.jsonl", duokit_lines(plan))
    _, eval_py_overall = reference_eval_py(eval_py_lines(plan))
    evaluation_utils_overall = reference_evaluation_utils(evaluation_utils_lines(plan))["Overall"]
    assert eval_py_overall != evaluation_utils_overall  # the quirks separate the two rules

    assert read_predictions(path).format == "duokit"
    assert score_file(path)["overall"] == pytest.approx(eval_py_overall, abs=1e-12)
    assert score_file(path, parser="first_char")["overall"] == pytest.approx(evaluation_utils_overall, abs=1e-12)
    # and the other way round: each official file re-parsed with the other script's rule
    eval_py_file = write_jsonl(tmp_path / "eval.jsonl", eval_py_lines(plan))
    eu_file = write_jsonl(tmp_path / "eu.jsonl", evaluation_utils_lines(plan))
    assert score_file(eval_py_file, parser="first_char")["overall"] == pytest.approx(evaluation_utils_overall)
    assert score_file(eu_file, parser="official")["overall"] == pytest.approx(eval_py_overall)


def test_all_formats_and_both_scripts_agree_on_clean_answers(tmp_path):
    plan = make_plan(per_task=6, styles=["{w}", "{g}", "{g}. x", "{w}."], seed=6, with_empty=False)
    _, eval_py_overall = reference_eval_py(eval_py_lines(plan))
    evaluation_utils_overall = reference_evaluation_utils(evaluation_utils_lines(plan))["Overall"]
    assert eval_py_overall == pytest.approx(evaluation_utils_overall)  # equal sample counts per sub-task
    for name, lines in [("d", duokit_lines(plan)), ("e", eval_py_lines(plan)), ("u", evaluation_utils_lines(plan))]:
        assert score_file(write_jsonl(tmp_path / f"{name}.jsonl", lines))["overall"] == pytest.approx(
            eval_py_overall, abs=1e-12)


def one_sample_eval_py(pred: str | None, gt) -> list[dict]:
    """One ret_edit1 sample: tries 0-2 answered correctly, try 3 answered `pred` with gt `gt`."""
    lines = [{"question_id": f"h0_ret_edit1_{t}", "pred": "A", "gt": "A", "type": "ret_edit1"} for t in range(3)]
    return lines + [{"question_id": "h0_ret_edit1_3", "pred": pred, "gt": gt, "type": "ret_edit1"}]


@pytest.mark.parametrize("pred,gt,expected", [
    ("Answer: C", "C", 0.0), ("Answer: C", "A", 1.0), ("I think B. A", "B", 1.0), ("I think B. A", "A", 0.0),
    ("b", "B", 0.0), ("", "B", 0.0), ("D, not A", "A", 1.0), (".B", "B", 0.0), ("C", 2, 1.0), ("C", 1, 0.0),
    ("C", "c", 0.0), (None, "A", 0.0),  # a null pred is skipped: the sample has 3 tries, so it is wrong
])
def test_eval_py_quirks_hand_computed(tmp_path, pred, gt, expected):
    lines = one_sample_eval_py(pred, gt)
    if gt == "c":  # eval.py would compare 'C' with 'c'; duokit refuses a gt that is no letter A-D
        with pytest.raises(PredictionFormatError, match="line 4: gt 'c' is neither a letter A-D nor an index"):
            read_predictions(write_jsonl(tmp_path / "p.jsonl", lines))
        return
    assert reference_eval_py(lines)[1] == expected
    assert score_file(write_jsonl(tmp_path / "p.jsonl", lines))["overall"] == expected


@pytest.mark.parametrize("pred,expected", [("B", 1.0), ("B. banana", 1.0), ("(B)", 0.0), (" B", 0.0),
                                           ("The answer is B", 0.0), ("Based on it, B", 1.0)])
def test_evaluation_utils_quirks_hand_computed(tmp_path, pred, expected):
    lines = [{"video_path": "./VNBench/h0_ret_insert1.mp4", "task_type": "ret_insert2", "pred": p, "gt": "B"}
             for p in ("B", "B", "B", pred)]  # no `try`: numbered by order
    scores = score_file(write_jsonl(tmp_path / "p.jsonl", lines))
    assert scores["subtasks"]["ret_insert1"]["accuracy"] == expected
    assert scores["subtasks"]["ret_insert1"]["n_incomplete"] == 0


def test_evaluation_utils_crashes_on_an_empty_pred_where_duokit_counts_it_wrong(tmp_path):
    lines = [{"video_path": "./VNBench/h0_ret_edit1.mp4", "task_type": "ret_edit1", "pred": p, "gt": "A"}
             for p in ("A", "A", "A", "")]
    with pytest.raises(IndexError):
        reference_evaluation_utils(lines)
    scores = score_file(write_jsonl(tmp_path / "p.jsonl", lines))
    assert (scores["overall"], scores["n_unparsed"]) == (0.0, 1)


# ------------------------------------------------------------------ scorer numbers, hand-computed


def answered(raw_records, answers, parser="official"):
    return [prediction_record(parse_record(raw, i), answer, parser)
            for i, (raw, answer) in enumerate(zip(raw_records, answers, strict=True))]


def gts(raw_records):
    return [r["gt_option"] for r in raw_records]


def test_scores_hand_computed():
    edit = [raw_tries(f"h{h}", "ret_edit1", h) for h in range(3)]
    fruit, order = raw_tries("h0", "ret_insert1", 2), raw_tries("h0", "ord_edit1", 3)
    records = (answered(edit[0], gts(edit[0]))  # 4/4
               + answered(edit[1], gts(edit[1])[:3] + ["none"])  # 3/4, one unparsed
               + answered(edit[2], gts(edit[2]))  # 4/4
               + answered(fruit, gts(fruit))  # 4/4
               + answered(order, ["A", "B", "C", "D"]))  # DBBA expected: try 1 (B) right only
    scores = score_predictions(records)
    assert scores["subtasks"] == {
        "ret_edit1": {"paper_label": "Ret E", "accuracy": 2 / 3, "n_samples": 3, "n_correct": 2,
                      "accuracy_1try": 11 / 12, "n_incomplete": 0},
        "ret_insert1": {"paper_label": "Ret I-1", "accuracy": 1.0, "n_samples": 1, "n_correct": 1,
                        "accuracy_1try": 1.0, "n_incomplete": 0},
        "ord_edit1": {"paper_label": "Ord E", "accuracy": 0.0, "n_samples": 1, "n_correct": 0,
                      "accuracy_1try": 0.25, "n_incomplete": 0},
    }
    assert scores["families"] == {"ret": pytest.approx(5 / 6), "ord": 0.0, "cnt": None}
    assert scores["overall"] == pytest.approx(5 / 9)  # mean of sub-tasks, not pooled 3/5
    assert scores["overall_1try"] == pytest.approx((11 / 12 + 1.0 + 0.25) / 3)
    assert (scores["n_samples"], scores["n_records"], scores["n_unparsed"], scores["n_incomplete"]) == (5, 20, 1, 0)


def test_incomplete_and_failed_samples_count_as_wrong():
    full, partial = raw_tries("h0", "cnt_edit2", 1), raw_tries("h1", "cnt_edit2", 2)
    records = answered(full, gts(full)) + answered(partial[:3], gts(partial)[:3])
    scores = score_predictions(records)
    row = scores["subtasks"]["cnt_edit2"]
    assert (row["accuracy"], row["n_incomplete"], row["accuracy_1try"]) == (0.5, 1, 7 / 8)
    assert scores["n_incomplete"] == 1

    failed = prediction_record(parse_record(partial[3], 3), gts(partial)[3], "official", error="decode failed")
    scores = score_predictions(records + [failed])
    assert (scores["subtasks"]["cnt_edit2"]["accuracy"], scores["n_unparsed"], scores["n_incomplete"]) == (0.5, 1, 0)


def test_a_parser_argument_reparses_every_answer():
    raw = raw_tries("h0", "ret_insert1", 1)  # banana; gt letters BCAD
    records = answered(raw, ["B. banana", "C. banana", "A", "D"], parser="strict")
    assert score_predictions(records)["overall"] == 1.0
    assert score_predictions(records, parser="text")["overall"] == 0.0  # "A" names no option text
    assert score_predictions(records, parser="text")["n_unparsed"] == 2
    assert score_predictions(answered(raw, ["banana"] * 4, parser="text"))["overall"] == 1.0
    with pytest.raises(ValueError, match="unknown parser"):
        score_predictions(records, parser="loose")


def test_the_text_parser_needs_duokit_records(tmp_path):
    lines = [{"question_id": f"h0_ret_insert1_{t}", "pred": "banana", "gt": "A", "type": "ret_insert2"}
             for t in range(4)]
    with pytest.raises(ValueError, match=r"line 1: the 'text' parser needs the options"):
        score_file(write_jsonl(tmp_path / "eval.jsonl", lines), parser="text")


def test_judge_verdicts_decide_only_under_the_files_own_rule(tmp_path):
    lines = [{"question_id": f"h0_ret_edit1_{t}", "pred": "wrong", "gt": "A", "type": "ret_edit1",
              "gpt_judge": ["1"]} for t in range(4)]
    path = write_jsonl(tmp_path / "judged.jsonl", lines)
    assert reference_eval_py(lines)[1] == 1.0
    assert score_file(path)["overall"] == 1.0
    assert score_file(path, parser="official")["overall"] == 0.0


def test_scoring_errors():
    raw = raw_tries("h0", "ret_edit1", 0)
    records = answered(raw, gts(raw))
    with pytest.raises(ValueError, match="no predictions"):
        score_predictions([])
    with pytest.raises(ValueError, match="sample 'h0_ret_edit1' try 2 appears twice"):
        score_predictions(records + [records[2]])
    clash = dict(records[3], subtask="cnt_edit1")
    with pytest.raises(ValueError, match="sample 'h0_ret_edit1' is both ret_edit1 and cnt_edit1"):
        score_predictions(records[:3] + [clash])


# ------------------------------------------------------------------ reading and writing files


def test_real_llava_ov_lines_are_read_as_evaluation_utils(tmp_path):
    # the first sample of llava_examples/llava-ov-7b-videoniah-result.jsonl (prompt shortened)
    lines = [{"video_path": "./VNBench/v_PkRvgIFREJU_ord_insert2.mp4", "prompt": "…", "pred": pred, "gt": gt,
              "task_type": "ord_insert2", "try": t, "model_id": "llava_qwen"}
             for t, (pred, gt) in enumerate(zip("DDCB", "BCAD", strict=True))]
    loaded = read_predictions(write_jsonl(tmp_path / "llava.jsonl", lines))
    assert loaded.format == "evaluation_utils"
    assert [r["record_id"] for r in loaded.records] == [f"v_PkRvgIFREJU_ord_insert2_{t}" for t in range(4)]
    scores = score_predictions(loaded.records)
    assert (scores["overall"], scores["overall_1try"]) == (0.0, 0.0)


@pytest.mark.parametrize("lines,message", [
    ([{"foo": 1}], r"line 1: unknown prediction format \(keys \['foo'\]\)"),
    ([{"question_id": "a_0", "pred": "A", "gt": "A", "type": "ret_edit1"}, {"question_id": "a_1", "pred": "A"}],
     r"line 2: a eval_py-format file, but this line lacks \['gt', 'type'\]"),
    ([{"question_id": "a_7", "pred": "A", "gt": "A", "type": "ret_edit1"}], r"line 1: question_id 'a_7'"),
    ([{"question_id": "a_0", "pred": 3, "gt": "A", "type": "ret_edit1"}], "line 1: pred must be a string"),
    ([{"question_id": "a_0", "pred": "A", "gt": 4, "type": "ret_edit1"}], "line 1: gt 4 is neither"),
    ([{"question_id": "a_0", "pred": "A", "gt": "A", "type": "retrieval"}], "line 1: type 'retrieval'"),
    ([{"question_id": "a_0", "pred": "A", "gt": "A", "type": "ret_edit1", "gpt_judge": []}], "gpt_judge"),
    ([{"video_path": "x_ret_edit1.mp4", "task_type": "ret_edit1", "pred": "A", "gt": 0}], "gt 0 is not a letter"),
    ([{"video_path": "x_ret_edit1.mp4", "task_type": "ret_edit1", "pred": "A", "gt": "A", "try": 5}], "try 5"),
    ([{"video_path": "x_ret_edit1.mp4", "task_type": "ret_edit1", "pred": "A", "gt": "A", "judge_result": 2}],
     "judge_result 2"),
    ([["not", "an", "object"]], "line 1: expected a JSON object, got list"),
])
def test_bad_prediction_lines_name_file_and_line(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(PredictionFormatError, match=message) as err:
        read_predictions(path)
    assert str(err.value).startswith(str(path))


def test_bad_duokit_records_are_rejected(tmp_path):
    raw = raw_tries("h0", "ret_edit1", 0)
    good = answered(raw, gts(raw))[0]
    for change, message in [({"subtask": "x"}, "subtask 'x'"), ({"gt_option": "E"}, "gt_option 'E'"),
                            ({"parser": "loose"}, "parser 'loose'"), ({"try": 4}, "try 4"),
                            ({"raw_output": 5}, "raw_output must be text")]:
        path = write_jsonl(tmp_path / "bad.jsonl", [good, dict(good, **change)])
        with pytest.raises(PredictionFormatError, match=f"line 2: {message}"):
            read_predictions(path)


def test_file_level_reading(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_predictions(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(PredictionFormatError, match="no predictions"):
        read_predictions(tmp_path / "empty.jsonl")
    (tmp_path / "null.jsonl").write_text(json.dumps({"question_id": "a_ret_edit1_0", "pred": None, "gt": "A",
                                                     "type": "ret_edit1"}) + "\n")
    with pytest.raises(PredictionFormatError, match=r"null\.jsonl: no predictions in the file \(1 line"):
        read_predictions(tmp_path / "null.jsonl")
    line = json.dumps({"question_id": "a_ret_edit1_0", "pred": "A", "gt": "A", "type": "ret_edit1"})
    (tmp_path / "broken.jsonl").write_text(line + "\n{oops\n" + line + "\n")
    with pytest.raises(PredictionFormatError, match="line 2: not valid JSON"):
        read_predictions(tmp_path / "broken.jsonl")
    (tmp_path / "torn.jsonl").write_text(line + '\n{"question_id": "a_ret_e')  # a crash mid-append
    loaded = read_predictions(tmp_path / "torn.jsonl")
    assert (len(loaded.records), loaded.skipped_lines) == (1, 1)


def test_write_eval_py_jsonl_round_trips_through_eval_py(tmp_path):
    plan = make_plan(per_task=4, styles=QUIRK_STYLES, seed=7, with_empty=True)
    records = duokit_lines(plan)
    records[5] = prediction_record(parse_record(plan[5][0], 5), None, "official", error="decode failed")
    path = write_eval_py_jsonl(records, tmp_path / "out" / "eval.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    raw = plan[5][0]
    assert lines[5] == {"question_id": f"{stem(raw)}_{raw['try']}", "pred": "", "gt": raw["gt_option"],
                        "type": raw["type"]}
    assert lines[0]["pred"] == plan[0][1]
    assert reference_eval_py(lines)[1] == pytest.approx(score_predictions(records)["overall"], abs=1e-12)
    assert score_file(path)["overall"] == pytest.approx(score_predictions(records)["overall"], abs=1e-12)


# ------------------------------------------------------------------ the command line


@pytest.fixture
def prediction_file(tmp_path):
    plan = make_plan(per_task=3, styles=QUIRK_STYLES, seed=8, with_empty=True)
    return write_jsonl(tmp_path / "pred.jsonl", duokit_lines(plan))


def test_cli_json(prediction_file, capsys):
    assert main(["score", str(prediction_file), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = score_file(prediction_file)
    assert list(printed)[:6] == ["subtasks", "families", "overall", "overall_1try", "n_samples", "n_unparsed"]
    assert {k: printed[k] for k in expected} == json.loads(json.dumps(expected))
    assert printed["format"] == "duokit"


def test_cli_table_and_export(prediction_file, tmp_path, capsys):
    out_path = tmp_path / "eval_py.jsonl"
    assert main(["score", str(prediction_file), "--parser", "strict", "--export-eval-py", str(out_path)]) == 0
    text = capsys.readouterr().out
    scores = score_file(prediction_file, parser="strict")
    for subtask in SUBTASKS:
        row = scores["subtasks"][subtask]
        assert f"{row['n_correct']:>8}/{row['n_samples']}" in text
    for label in ("Ret E", "Ret I-1", "Ret I-2", "Ord E", "Ord I-1", "Ord I-2", "Cnt E-1", "Cnt E-2", "Cnt I"):
        assert f" {label} " in text
    assert f"Overall (4-try circular, mean of sub-tasks): {100 * scores['overall']:.1f}%" in text
    assert f"Overall (1-try, per-try accuracy):           {100 * scores['overall_1try']:.1f}%" in text
    assert f"unparsed {scores['n_unparsed']}," in text and "parser strict" in text
    exported = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert reference_eval_py(exported)[1] == pytest.approx(score_file(prediction_file)["overall"], abs=1e-12)


def test_cli_reports_bad_input(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"foo": 1}])
    assert main(["score", str(bad)]) == 1
    assert f"duokit score: error: {bad}, line 1: unknown prediction format" in capsys.readouterr().err
    assert main(["score", str(tmp_path / "absent.jsonl")]) == 1


def test_cli_entry_point(prediction_file):
    result = subprocess.run([sys.executable, "-m", "duokit", "score", str(prediction_file), "--json"],
                            capture_output=True, text=True, check=True)
    assert json.loads(result.stdout)["overall"] == pytest.approx(score_file(prediction_file)["overall"])
