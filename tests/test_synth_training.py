"""The training variant (multi-needle, free-text answers with spans) and the train/eval held-out guarantee."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from duokit.data.synth.generate import SynthConfig, Synthesizer
from duokit.data.synth.haystack import HaystackFolder
from duokit.data.synth.images import FileNeedle, NeedleImages
from duokit.data.synth.needles import subtitle_patch
from duokit.data.synth.pools import FRUITS, NAMES
from duokit.data.synth.splits import SPLITS, split_of_file, split_of_seed, split_seed, tag_seed
from duokit.data.synth.training import DEPTH_GRID, TrainingConfig, TrainingGenerator, ordinal
from duokit.data.video import write_video
from duokit.io import atomic_write_json, read_json

SMALL = {"frame_counts": (32, 48), "fps": 4.0, "size": (64, 64), "needles": (2, 4)}


@pytest.fixture(scope="module")
def generator():
    return TrainingGenerator(TrainingConfig(**SMALL))


def test_ordinals():
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st"]


def test_depth_grid_spans_005_to_095():
    assert DEPTH_GRID[0] == 0.05 and DEPTH_GRID[-1] == 0.95 and len(DEPTH_GRID) == 10


def test_samples_are_a_function_of_their_index(generator):
    a, b = generator.sample(3), TrainingGenerator(TrainingConfig(**SMALL)).sample(3)
    assert np.array_equal(a.frames, b.frames) and a.qa == b.qa and a.needle_spans == b.needle_spans
    assert not np.array_equal(generator.sample(4).frames[:32], a.frames[:32])


def test_lengths_depths_and_needle_counts_follow_the_grids(generator):
    kinds = set()
    for sample in generator.samples(12):
        kinds.add(sample.kind)
        assert len(sample.frames) in SMALL["frame_counts"]  # also after inserting pictures
        assert 2 <= len(sample.needle_spans) <= 4
        assert list(sample.depths) == sorted(set(sample.depths)) and set(sample.depths) <= set(DEPTH_GRID)
        starts = [start for start, _ in sample.needle_spans]
        assert all(b - a > 2 for a, b in itertools.pairwise(starts))  # needles never touch
        assert sample.needle_time == [round(s / sample.fps, 4) for s in starts]
    assert kinds == {"subtitle", "picture"}


def test_subtitle_needles_are_at_their_depths_and_carry_their_ordinal(generator):
    sample = next(s for s in generator.samples(4) if s.kind == "subtitle")
    frames, haystack = sample.frames, sample.haystack.frames
    changed = (frames != haystack).any(axis=(1, 2, 3))
    expected = np.zeros(len(frames), bool)
    for (start, end), depth in zip(sample.needle_spans, sample.depths):
        assert start == round(depth * (len(frames) - 2))
        expected[start:end] = True
    assert np.array_equal(changed, expected)
    height, width = frames.shape[1:3]
    for k, ((start, _), needle) in enumerate(zip(sample.needle_spans, sample.needles)):
        def distance(text, frame=frames[start]):
            patch = subtitle_patch(text, height, width)
            top, left, bottom, right = patch.box()
            return np.abs(frame[top:bottom, left:right].astype(int) - patch.rgb.astype(int)).mean()
        right = f"The {ordinal(k + 1)} secret word is {needle['item']}."
        wrong = f"The {ordinal(k + 1)} secret word is {'Xander' if needle['item'] != 'Xander' else 'Bob'}."
        assert distance(right) < distance(wrong)


def test_picture_needles_are_inserted_frames(generator):
    sample = next(s for s in generator.samples(4) if s.kind == "picture")
    inserted = np.zeros(len(sample.frames), bool)
    for start, end in sample.needle_spans:
        inserted[start:end] = True
    assert np.array_equal(sample.frames[~inserted], sample.haystack.frames)


def test_answers_mark_the_spans_of_their_answer_words(generator):
    for sample in generator.samples(6):
        items = [needle["item"] for needle in sample.needles]
        assert len(sample.qa) == len(items) + 1
        for k, (qa, item) in enumerate(zip(sample.qa, items)):
            assert ordinal(k + 1) in qa.question and ordinal(k + 1) in qa.answer
            assert [qa.answer[a:b] for a, b in qa.answer_spans] == [item]
        recall_all = sample.qa[-1]
        assert [recall_all.answer[a:b] for a, b in recall_all.answer_spans] == items
        assert recall_all.answer == " ".join(qa.answer for qa in sample.qa[:-1])
        assert recall_all.to_json()["answer_spans"] == [list(s) for s in recall_all.answer_spans]
    subtitle = next(s for s in generator.samples(4) if s.kind == "subtitle")
    assert subtitle.qa[0].answer == f"The 1st secret word is {subtitle.needles[0]['item']}."
    assert all(n["item"] in NAMES for n in subtitle.needles)


def test_a_haystack_pool_reuses_haystacks_without_changing_samples():
    config = TrainingConfig(**SMALL, haystack_pool=2)
    warm = TrainingGenerator(config)
    drawn = {i: warm.sample(i) for i in range(8)}
    cold = TrainingGenerator(config).sample(5)  # a fresh generator, empty pool: same sample
    assert np.array_equal(cold.frames, drawn[5].frames) and cold.qa == drawn[5].qa
    assert {s.haystack.source for s in drawn.values()} <= set(warm.manifest(8)["haystacks"])
    assert len(warm.manifest(8)["haystacks"]) == 2
    assert all(len(s.frames) in SMALL["frame_counts"] for s in drawn.values())
    pooled = [h.frames.copy() for h in warm._loaded.values()]
    warm.sample(9)
    assert all(np.array_equal(a, h.frames) for a, h in zip(pooled, warm._loaded.values()))  # never edited


def test_bad_training_configs_are_refused():
    with pytest.raises(ValueError, match="split"):
        TrainingConfig(split="test")
    with pytest.raises(ValueError, match="needles"):
        TrainingConfig(needles=(3, 11))
    with pytest.raises(ValueError, match="kinds"):
        TrainingConfig(kinds=("audio",))
    tight = TrainingGenerator(TrainingConfig(frame_counts=(8,), needles=(4, 4), needle_frames=2, fps=4.0,
                                             size=(32, 32), kinds=("subtitle",)))
    with pytest.raises(ValueError, match="cannot place 4 needles"):
        tight.sample(0)


def test_training_manifest_records_seeds_and_sources(generator, tmp_path):
    manifest = generator.manifest(5, start=10)
    assert manifest["split"] == "train" and manifest["indices"] == [10, 15]
    assert manifest["sample_seeds"] == [generator.sample(i).seed for i in range(10, 15)]
    assert manifest["haystacks"][0] == generator.sample(10).haystack.source
    atomic_write_json(tmp_path / "manifest.json", manifest)
    assert read_json(tmp_path / "manifest.json") == manifest


# ---------------------------------------------------------------------------------------------
# Held-out guarantee


def test_seed_namespaces_are_disjoint_by_construction():
    seeds = {split: {split_seed(split, 0, "sample", i) for i in range(500)} for split in SPLITS}
    assert not seeds["eval"] & seeds["train"]
    assert all(split_of_seed(s) == split for split in SPLITS for s in seeds[split])
    assert tag_seed(12345, "eval") != tag_seed(12345, "train")
    with pytest.raises(ValueError, match="no split tag"):
        split_of_seed(12345)


def _provenance(entries):
    seeds = {entry["seed"] for entry in entries}
    haystacks = {entry["haystack"]["source"] for entry in entries}
    instances = {n for entry in entries for n in entry["needles"] if str(n).startswith("procedural:")}
    return seeds, haystacks, instances


def test_train_and_eval_sets_share_no_seed_haystack_or_needle_instance():
    config = {"per_task": 2, "seconds": (12.0, 12.0), "fps": 4.0, "size": (32, 32), "seed": 0}
    eval_set, train_set = (Synthesizer(SynthConfig(**config, split=split)) for split in SPLITS)
    eval_entries = [eval_set.manifest_entry(s) for s in eval_set]
    train_entries = [train_set.manifest_entry(s) for s in train_set]
    training = TrainingGenerator(TrainingConfig(**SMALL))  # split "train" by default, same user seed
    training_entries = [s.manifest_entry() for s in training.samples(8)]
    eval_seeds, eval_haystacks, eval_instances = _provenance(eval_entries)
    assert eval_instances  # the sets do contain picture instances to compare
    for entries in (train_entries, training_entries):
        seeds, haystacks, instances = _provenance(entries)
        assert instances
        assert not seeds & eval_seeds and not haystacks & eval_haystacks and not instances & eval_instances
    for entry in eval_entries:
        assert split_of_seed(entry["seed"]) == "eval"
        assert split_of_seed(int(entry["haystack"]["source"].split(":")[1])) == "eval"
        assert all(split_of_seed(int(n.rsplit(":", 1)[1])) == "eval" for n in entry["needles"]
                   if n.startswith("procedural:"))
    assert all(split_of_seed(e["seed"]) == "train" for e in train_entries + training_entries)


def test_user_folders_are_split_by_file(tmp_path):
    folder = tmp_path / "haystacks"
    rng = np.random.default_rng(0)
    names = [f"video{i}.mp4" for i in range(8)]
    assert {split_of_file(n) for n in names} == set(SPLITS)  # both splits get files
    for name in names:
        write_video(folder / name, rng.integers(0, 255, size=(16, 32, 32, 3), dtype=np.uint8), fps=4)
    by_split = {split: {p.name for p in HaystackFolder(folder, split).videos} for split in SPLITS}
    assert not by_split["eval"] & by_split["train"] and by_split["eval"] | by_split["train"] == set(names)
    training = TrainingGenerator(TrainingConfig(**SMALL, haystacks=str(folder)))
    used = {str(s.haystack.source).rsplit("/", 1)[1] for s in training.samples(6)}
    assert used <= by_split["train"]
    assert len(training.sample(0).frames) in SMALL["frame_counts"]


def _needle_image_folder(root, classes, per_split=2):
    """`per_split` images per class in each split (files are split by a hash of their name)."""
    for k, name in enumerate(classes):
        class_dir = root / name.replace(" ", "_")
        class_dir.mkdir(parents=True)
        files = [f"{name}-{i}.png" for i in range(100)]
        chosen = [f for split in SPLITS for f in [f for f in files if split_of_file(f) == split][:per_split]]
        for i, file in enumerate(chosen):
            Image.new("RGB", (20, 10), (10 * k, 5 * i, 200)).save(class_dir / file)


def test_needle_image_folders_are_split_by_file_and_used(tmp_path):
    _needle_image_folder(tmp_path / "needles", FRUITS)
    images = {split: NeedleImages(tmp_path / "needles", split) for split in SPLITS}
    for name in FRUITS:
        eval_files, train_files = (set(images[s].files["fruit"][name]) for s in SPLITS)
        assert eval_files and train_files and not eval_files & train_files
    picked = images["eval"].pick("fruit", "apple", np.random.default_rng(0))
    assert isinstance(picked, FileNeedle) and split_of_file(picked.path.name) == "eval"
    frame = picked.frame(32, 64)  # a 20x10 image letterboxed into 64x32: wide image fills the width
    assert frame.shape == (32, 64, 3) and (frame[0] == 0).all() and frame[16, 32, 2] == 200
    sample = next(iter(Synthesizer(SynthConfig(per_task=1, seconds=(12.0, 12.0), fps=4.0, size=(64, 32),
                                               needle_images=str(tmp_path / "needles"),
                                               tasks=("ret_insert1",)))))
    assert sample.needles[0]["instance"].endswith(".png")
    assert sample.haystack.noise_level > 0 and sample.frames[sample.needle_spans[0][0], 0, :, :].max() <= 2 * \
        sample.haystack.noise_level  # the letterbox bars, black plus haystack-level noise


def test_partial_needle_image_folder_is_a_clear_error(tmp_path):
    _needle_image_folder(tmp_path / "needles", FRUITS[:3])
    with pytest.raises(ValueError, match="3 of the 12 fruit classes"):
        NeedleImages(tmp_path / "needles")
