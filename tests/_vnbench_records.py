"""Small VNBench-schema annotation sets for the annotation and scoring tests (schema and text of
huggingface.co/datasets/videoniah/VNBench)."""

from __future__ import annotations

from duokit.data.vnbench import LETTERS, SUBTASKS, permuted_options

# The published `type` of each file suffix: the HF file swaps the two insert-retrieval labels
# (docs/scoring.md, "Scores").
PUBLISHED_LABEL = {s: s for s in SUBTASKS} | {"ret_insert1": "ret_insert2", "ret_insert2": "ret_insert1"}

# Verbatim from the VNBench annotations, kept apart from duokit's own templates so tests check those against it.
QUESTIONS = {
    "ret_edit1": "What is the secret word?",
    "ret_insert1": "What kind of fruit appears in this video?",
    "ret_insert2": "What is the name of the landmark in the picture?",
    "ord_edit1": "What is the order of the secret words that appeared in the video?",
    "ord_insert1": "What is the order of fruits appearing in the video?",
    "ord_insert2": "What is the order of images appearing in the video?",
    "cnt_edit1": "How many secret words appeared in the video?",
    "cnt_edit2": "Some apples were inserted into 4 small sections of the video. "
                 "How many apples appeared in the video in total?",
    "cnt_insert1": "How many cats appeared in the video?",
}
OPTIONS = {
    "ret_edit1": ["Alice", "Bob", "Carol", "Dave"],
    "ret_insert1": ["apple", "banana", "orange", "lemon"],
    "ret_insert2": ["Pretoria Bridge", "ETH Zurich", "A Famosa", "Tower Bridge"],
    "ord_edit1": ["Sam, Grace, Paul, Bob", "Grace, Sam, Paul, Bob", "Bob, Paul, Grace, Sam", "Paul, Bob, Sam, Grace"],
    "ord_insert1": ["apple, pear, kiwifruit, mango", "pear, apple, mango, kiwifruit",
                    "mango, kiwifruit, pear, apple", "kiwifruit, mango, apple, pear"],
    "ord_insert2": ["train, cow, sheep, tv monitor", "tv monitor, cow, train, sheep",
                    "cow, sheep, tv monitor, train", "tv monitor, cow, sheep, train"],
    "cnt_edit1": [2, 5, 1, 6],  # counting options are ints in the published file
    "cnt_edit2": [7, 8, 9, 10],
    "cnt_insert1": [3, 1, 4, 2],
}


def raw_tries(haystack: str, subtask: str, gt_index: int, label: str | None = None) -> list[dict]:
    """The 4 published-schema records of one sample, option orders by the official scheme."""
    options_try0 = OPTIONS[subtask]
    gt = options_try0[gt_index]
    records = []
    for try_index, options in enumerate(permuted_options(options_try0)):
        records.append({
            "video": f"./VNBench/{haystack}_{subtask}.mp4", "question": QUESTIONS[subtask],
            "options": options, "gt": gt, "gt_option": LETTERS[options.index(gt)],
            "type": label or PUBLISHED_LABEL[subtask], "try": try_index,
            "needle_time": [12.0 + try_index], "length": 60.0,
        })
    return records


def raw_annotations(per_task: int = 3) -> list[dict]:
    """`per_task` samples of each of the 9 sub-tasks, haystacks h0, h1, …, correct option rotating."""
    records = []
    for subtask in SUBTASKS:
        for h in range(per_task):
            records += raw_tries(f"h{h}", subtask, gt_index=(h + SUBTASKS.index(subtask)) % 4)
    return records
