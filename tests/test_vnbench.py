"""VNBench annotation layer: schema validation, sub-tasks and the label swap, prompt, tries, subsets."""

from __future__ import annotations

import copy
import json
import re
from collections import Counter

import pytest
from _vnbench_records import raw_annotations, raw_tries

from duokit.data.vnbench import (
    SUBTASKS,
    AnnotationError,
    Record,
    group_samples,
    label_disagreements,
    load_annotations,
    official_prompt,
    parse_record,
    permuted_options,
    resolve_video,
    stratified_subset,
    subtask_from_video,
)


def write_annotations(tmp_path, records, name="anno.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def test_load_annotations_reads_every_record(tmp_path):
    raw = raw_annotations(per_task=2)
    records = load_annotations(write_annotations(tmp_path, raw))
    assert len(records) == 9 * 2 * 4
    assert all(isinstance(r, Record) for r in records)
    assert [r.to_json() for r in records] == [dict(r, options=[str(o) for o in r["options"]], gt=str(r["gt"]))
                                              for r in raw]


# (field, bad value, words the error must contain besides the record index and field name)
BAD_VALUES = [
    ("video", "", "non-empty string"),
    ("video", 7, "non-empty string"),
    ("question", None, "non-empty string"),
    ("options", ["apple", "banana", "orange"], "list of 4"),
    ("options", "apple, banana", "list of 4"),
    ("options", ["apple", "banana", "orange", None], "strings or numbers"),
    ("options", ["apple", "banana", "orange", True], "strings or numbers"),
    ("options", ["apple", "banana", "apple", "lemon"], "repeat"),
    ("options", ["apple", "banana", " ", "lemon"], "blank"),
    ("gt", "kiwifruit", "not one of the options"),
    ("gt", None, "correct option's value"),
    ("gt_option", "E", "A-D"),
    ("gt_option", "", "non-empty string"),
    ("type", "retrieval_edit", "is not one of"),
    ("try", 4, "0, 1, 2 or 3"),
    ("try", "1", "0, 1, 2 or 3"),
    ("try", 1.0, "0, 1, 2 or 3"),
    ("try", True, "0, 1, 2 or 3"),
    ("needle_time", 12.0, "list of seconds"),
    ("needle_time", [12.0, "x"], "number"),
    ("length", "60", "number"),
    ("length", None, "number"),
]


@pytest.mark.parametrize("field,value,words", BAD_VALUES)
def test_a_bad_field_names_record_index_and_field(tmp_path, field, value, words):
    raw = raw_tries("h0", "ret_insert1", gt_index=1)
    raw[2][field] = value
    path = write_annotations(tmp_path, raw)
    with pytest.raises(AnnotationError) as err:
        load_annotations(path)
    message = str(err.value)
    assert message.startswith(f"{path}: record 2, field {field!r}:")
    assert words in message


@pytest.mark.parametrize("field", ["video", "question", "options", "gt", "gt_option", "type", "try",
                                   "needle_time", "length"])
def test_a_missing_field_names_record_index_and_field(tmp_path, field):
    raw = raw_tries("h0", "ord_edit1", gt_index=0)
    del raw[3][field]
    with pytest.raises(AnnotationError, match=rf"record 3, field '{field}': missing"):
        load_annotations(write_annotations(tmp_path, raw))


def test_gt_option_must_point_at_gt(tmp_path):
    raw = raw_tries("h0", "ret_insert1", gt_index=1)  # gt banana is B in try 0
    raw[0]["gt_option"] = "A"
    with pytest.raises(AnnotationError, match=r"record 0, field 'gt_option': 'A' but gt 'banana' is option B"):
        load_annotations(write_annotations(tmp_path, raw))


def test_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        load_annotations(tmp_path / "absent.json")
    with pytest.raises(AnnotationError, match="expected a JSON list"):
        load_annotations(write_annotations(tmp_path, {"video": "x"}))
    with pytest.raises(AnnotationError, match=r"record 1: expected an object, got str"):
        load_annotations(write_annotations(tmp_path, [raw_tries("h0", "cnt_edit1", 0)[0], "oops"]))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_annotations(tmp_path / "broken.json")


def test_counting_options_given_as_ints_become_strings():
    raw = raw_tries("h0", "cnt_edit1", gt_index=1)[0]  # options [2, 5, 1, 6], gt 5
    assert raw["options"] == [2, 5, 1, 6] and raw["gt"] == 5
    record = parse_record(raw, 0)
    assert record.options == ("2", "5", "1", "6")
    assert record.gt == "5" and record.gt_option == "B"
    assert "\nB. 5\n" in record.prompt
    # gt given as a string while the options are ints also matches (compared as strings: VNBench's counting options are ints)
    assert parse_record(dict(raw, gt="5"), 0) == record


def test_subtask_comes_from_the_file_suffix_and_fixes_the_swap(tmp_path):
    raw = raw_tries("video7014", "ret_insert1", 0) + raw_tries("v_PkRvgIFREJU", "ret_insert2", 2)
    raw += raw_tries("3261112327", "ret_edit1", 1)
    records = load_annotations(write_annotations(tmp_path, raw))
    fruit, landmark, edit = records[0], records[4], records[8]
    assert (fruit.label, fruit.subtask) == ("ret_insert2", "ret_insert1")  # published label kept, fixed
    assert (landmark.label, landmark.subtask) == ("ret_insert1", "ret_insert2")
    assert (edit.label, edit.subtask) == ("ret_edit1", "ret_edit1")
    assert label_disagreements(records) == {("ret_insert2", "ret_insert1"): 4, ("ret_insert1", "ret_insert2"): 4}


def test_label_disagreements_is_empty_for_consistent_labels():
    records = [parse_record(r, i) for i, r in enumerate(raw_tries("h0", "ret_insert1", 0, label="ret_insert1"))]
    assert label_disagreements(records) == {}


def test_a_video_name_without_a_suffix_keeps_the_published_type():
    raw = dict(raw_tries("h0", "ord_insert2", 0)[0], video="./VNBench/custom_clip.mp4")
    assert parse_record(raw, 0).subtask == "ord_insert2"


@pytest.mark.parametrize("video,subtask", [
    ("./VNBench/video7014_ret_insert1.mp4", "ret_insert1"),
    ("VNBench_new\\v_PkRvgIFREJU_ord_insert2.mp4", "ord_insert2"),
    ("3261112327_cnt_edit2.mp4", "cnt_edit2"),
    ("/data/v_a_b_cnt_insert1.mp4", "cnt_insert1"),
    ("./VNBench/clip.mp4", None),
    ("./VNBench/clip_ret_insert3.mp4", None),
])
def test_subtask_from_video(video, subtask):
    assert subtask_from_video(video) == subtask


def test_record_ids_and_json_round_trip():
    raw = raw_tries("v_PkRvgIFREJU", "ord_insert2", 1)[3]
    record = parse_record(raw, 0)
    assert record.video_name == "v_PkRvgIFREJU_ord_insert2.mp4"
    assert record.sample_id == "v_PkRvgIFREJU_ord_insert2"
    assert record.record_id == "v_PkRvgIFREJU_ord_insert2_3"
    assert record.to_json() == raw
    assert parse_record(record.to_json(), 0) == record


def test_official_prompt_text_exactly():
    expected = ("What is the order of images appearing in the video?\n"
                "A. train, cow, sheep, tv monitor\n"
                "B. tv monitor, cow, train, sheep\n"
                "C. cow, sheep, tv monitor, train\n"
                "D. tv monitor, cow, sheep, train\n"
                "Answer with the option's letter from the given choices directly.")
    assert official_prompt(QUESTION_PK, OPTIONS_PK[0]) == expected
    assert parse_record(raw_tries("v_PkRvgIFREJU", "ord_insert2", 1)[0], 0).prompt == expected


# The 4 tries of v_PkRvgIFREJU_ord_insert2 as in the official repo's LLaVA-OV result file
# (github.com/joez17/VideoNIAH, llava_examples/).
QUESTION_PK = "What is the order of images appearing in the video?"
OPTIONS_PK = [
    ["train, cow, sheep, tv monitor", "tv monitor, cow, train, sheep", "cow, sheep, tv monitor, train",
     "tv monitor, cow, sheep, train"],
    ["train, cow, sheep, tv monitor", "tv monitor, cow, sheep, train", "tv monitor, cow, train, sheep",
     "cow, sheep, tv monitor, train"],
    ["tv monitor, cow, train, sheep", "tv monitor, cow, sheep, train", "cow, sheep, tv monitor, train",
     "train, cow, sheep, tv monitor"],
    ["tv monitor, cow, sheep, train", "cow, sheep, tv monitor, train", "train, cow, sheep, tv monitor",
     "tv monitor, cow, train, sheep"],
]


def test_permuted_options_reproduce_the_published_tries():
    assert permuted_options(OPTIONS_PK[0]) == OPTIONS_PK


@pytest.mark.parametrize("gt_index,pattern", [(0, "AADC"), (1, "BCAD"), (2, "CDCB"), (3, "DBBA")])
def test_permuted_options_give_the_published_gt_letter_patterns(gt_index, pattern):
    options = ["w", "x", "y", "z"]
    letters = "".join("ABCD"[order.index(options[gt_index])] for order in permuted_options(options))
    assert letters == pattern


def test_permuted_options_need_four_options():
    with pytest.raises(ValueError, match="4 options, got 3"):
        permuted_options(["a", "b", "c"])


def records_of(raw):
    return [parse_record(r, i) for i, r in enumerate(raw)]


def test_group_samples_orders_tries_and_keeps_first_seen_sample_order():
    raw = raw_tries("h1", "cnt_edit2", 2) + raw_tries("h0", "ret_edit1", 3)
    shuffled = [raw[i] for i in (6, 3, 1, 7, 0, 4, 2, 5)]  # h0 is seen first
    samples = group_samples(records_of(shuffled))
    assert [s.sample_id for s in samples] == ["h0_ret_edit1", "h1_cnt_edit2"]
    for sample in samples:
        assert [r.try_index for r in sample.tries] == [0, 1, 2, 3]
    first = samples[0]
    assert (first.video_name, first.subtask, first.question) == (
        "h0_ret_edit1.mp4", "ret_edit1", "What is the secret word?")
    assert first.needle_time == (12.0,)
    assert [r.gt_option for r in first.tries] == list("DBBA")


def test_group_samples_accepts_fewer_tries():
    samples = group_samples(records_of(raw_tries("h0", "ret_edit1", 0)[:3]))
    assert len(samples) == 1 and len(samples[0].tries) == 3


@pytest.mark.parametrize("change,words", [
    ({"try": 1}, "try indices repeat: [0, 1, 1, 3]"),
    ({"question": "What is the secret name?"}, "try 2 has question"),
    ({"options": ["Alice", "Bob", "Carol", "Eve"], "gt": "Alice", "gt_option": "A"}, "try 2 has a different option set"),
    ({"gt": "Carol", "gt_option": "C"}, "try 2 has gt 'Carol'"),
])
def test_group_samples_rejects_inconsistent_tries(change, words):
    raw = copy.deepcopy(raw_tries("h0", "ret_edit1", 0))  # options Alice, Bob, Carol, Dave
    raw[2].update(change)
    with pytest.raises(AnnotationError, match=re.escape(f"sample h0_ret_edit1: {words}")):
        group_samples(records_of(raw))


def test_group_samples_rejects_two_subtasks_for_one_video():
    # without a sub-task suffix the published type is the sub-task, so one video can get two
    raw = [dict(r, video="./VNBench/clip.mp4") for r in raw_tries("h0", "ret_edit1", 0)]
    raw[3]["type"] = "cnt_edit1"
    with pytest.raises(AnnotationError, match="sample clip: try 3 has subtask 'cnt_edit1', try 0 has 'ret_edit1'"):
        group_samples(records_of(raw))


def samples_of(per_task):
    return group_samples(records_of(raw_annotations(per_task)))


def test_stratified_subset_is_seeded_stratified_and_ordered():
    samples = samples_of(per_task=6)
    subset = stratified_subset(samples, per_task=2, seed=0)
    assert Counter(s.subtask for s in subset) == {s: 2 for s in SUBTASKS}
    positions = [samples.index(s) for s in subset]
    assert positions == sorted(positions)  # the input order is kept
    assert stratified_subset(samples, per_task=2, seed=0) == subset  # deterministic
    picks = {tuple(s.sample_id for s in stratified_subset(samples, 2, seed)) for seed in range(5)}
    assert len(picks) > 1  # the seed matters


def test_stratified_subset_takes_all_when_a_subtask_is_short():
    samples = samples_of(per_task=2)
    assert stratified_subset(samples, per_task=5, seed=3) == samples
    with pytest.raises(ValueError, match="per_task must be >= 1"):
        stratified_subset(samples, per_task=0)


def test_resolve_video_uses_the_basename(tmp_path):
    video = tmp_path / "h0_ret_edit1.mp4"
    video.write_bytes(b"")
    assert resolve_video("./VNBench/h0_ret_edit1.mp4", tmp_path) == video
    assert resolve_video("VNBench_new\\h0_ret_edit1.mp4", str(tmp_path)) == video
    with pytest.raises(FileNotFoundError) as err:
        resolve_video("./VNBench/h1_ret_edit1.mp4", tmp_path)
    assert str(tmp_path / "h1_ret_edit1.mp4") in str(err.value)
    assert "`duokit data fetch videos`" in str(err.value) and "`duokit synth --out DIR`" in str(err.value)
