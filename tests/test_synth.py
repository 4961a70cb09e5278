"""The VideoNIAH synthesizer: schema, tries, needle visibility, ground truth, determinism, haystack folders."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _vnbench_records import QUESTIONS as PUBLISHED_QUESTIONS

import duokit
from duokit.cli import main
from duokit.data.scoring import prediction_record, score_predictions
from duokit.data.synth.generate import SynthConfig, Synthesizer
from duokit.data.synth.haystack import HaystackError, HaystackFolder, procedural_frames
from duokit.data.synth.images import ProceduralNeedle, draw_icon, icon_spec
from duokit.data.synth.needles import (
    SUBTITLE_BOX_RGB,
    insert_clips,
    sample_starts,
    subtitle_patch,
)
from duokit.data.synth.pools import FRUITS, LANDMARKS, NAMES, OBJECTS, POOLS, plural
from duokit.data.synth.splits import split_of_file
from duokit.data.synth.tasks import SUBTITLE, count_options, near_count_options
from duokit.data.synth.writer import write_synth_set
from duokit.data.video import load_frames, write_video
from duokit.data.vnbench import LETTERS, SUBTASKS, TRY_PERMUTATIONS, group_samples, load_annotations

TINY = {"per_task": 1, "seconds": (12.0, 12.0), "fps": 4.0, "size": (64, 64), "seed": 7}
EDIT_TASKS = ("ret_edit1", "ord_edit1", "cnt_edit1", "cnt_edit2")
INSERT_TASKS = ("ret_insert1", "ret_insert2", "ord_insert1", "ord_insert2", "cnt_insert1")


@pytest.fixture(scope="module")
def samples():
    """One tiny sample of each sub-task, in memory, keyed by sub-task."""
    return {sample.subtask: sample for sample in Synthesizer(SynthConfig(**TINY))}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_synth_set(Synthesizer(SynthConfig(**TINY)), out, progress=False)
    return out


# ---------------------------------------------------------------------------------------------
# Pools and building blocks


def test_pools_match_vnbench():
    assert len(NAMES) == 26 and [n[0] for n in NAMES] == [chr(ord("A") + i) for i in range(26)]
    assert len(FRUITS) == 12 and len(OBJECTS) == 20 and "flower" in OBJECTS
    assert len(set(LANDMARKS)) == len(LANDMARKS) >= 4
    assert [plural(n) for n in ("apple", "bus", "sheep", "person", "strawberry", "peach", "tv monitor")] == [
        "apples", "buses", "sheep", "people", "strawberries", "peaches", "tv monitors"]


@pytest.mark.parametrize("pool", ["fruit", "object", "landmark"])
def test_every_class_has_its_own_icon(pool):
    specs = [icon_spec(pool, name) for name in POOLS[pool]]
    assert len({(s.shape, s.colour) for s in specs}) == len(specs)
    icons = [draw_icon(spec, 32, seed=1) for spec in specs]
    for i in range(len(icons)):
        for j in range(i):
            assert np.abs(icons[i].astype(int) - icons[j].astype(int)).mean() > 5, (POOLS[pool][i], POOLS[pool][j])


def test_needle_instance_is_a_function_of_its_seed():
    a, b = ProceduralNeedle("fruit", "apple", 11), ProceduralNeedle("fruit", "apple", 11)
    assert np.array_equal(a.frame(48, 64), b.frame(48, 64))
    assert not np.array_equal(a.frame(48, 64), ProceduralNeedle("fruit", "apple", 12).frame(48, 64))
    assert a.frame(48, 64).shape == (48, 64, 3) and a.sticker(20).shape == (20, 20, 4)


def test_sample_starts_never_overlap_and_keep_gaps():
    rng = np.random.default_rng(0)
    seen_first = set()
    for _ in range(300):
        starts = sample_starts(rng, total=40, count=4, length=5, gap=2)
        assert starts == sorted(starts) and starts[0] >= 0 and starts[-1] + 5 <= 40
        assert all(b - a >= 5 + 2 for a, b in itertools.pairwise(starts))
        seen_first.add(starts[0])
    assert len(seen_first) > 5  # positions vary
    assert sample_starts(rng, total=26, count=4, length=5, gap=2) == [0, 7, 14, 21]  # the only placement
    with pytest.raises(ValueError, match="cannot place 4 needles"):
        sample_starts(rng, total=25, count=4, length=5, gap=2)


def test_insert_clips_keeps_haystack_order():
    frames = np.arange(5)[:, None, None, None] * np.ones((5, 2, 2, 3), np.uint8)
    clips = [np.full((2, 2, 2, 3), 100, np.uint8), np.full((1, 2, 2, 3), 200, np.uint8)]
    out, starts = insert_clips(frames, [0, 3], clips)
    assert out[:, 0, 0, 0].tolist() == [100, 100, 0, 1, 2, 200, 3, 4] and starts == [0, 5]


def test_subtitle_layout_follows_the_measured_vnbench_layout():
    patch = subtitle_patch(SUBTITLE.format(name="Alice"), 240, 320)
    _, left, bottom, right = patch.box()
    assert bottom == round(0.85 * 240)
    assert abs((left + right) / 2 - 160) <= 1
    assert tuple(patch.rgb[1, 1]) == SUBTITLE_BOX_RGB
    assert (patch.rgb == 255).all(axis=-1).sum() > 50  # white text is there
    text_rows = np.nonzero((patch.rgb == 255).all(axis=-1).any(axis=1))[0]
    assert 0.6 * 0.06 * 240 <= len(text_rows) <= 1.3 * 0.06 * 240  # glyph height about 6% of frame height


def test_procedural_haystacks_vary_and_repeat_per_seed():
    a, level = procedural_frames(5, 16, 32, 48)
    assert a.shape == (16, 32, 48, 3) and a.dtype == np.uint8 and level > 0
    assert np.array_equal(a, procedural_frames(5, 16, 32, 48)[0])
    assert not np.array_equal(a, procedural_frames(6, 16, 32, 48)[0])
    assert np.abs(np.diff(a.astype(int), axis=0)).mean() > 1  # it moves


# ---------------------------------------------------------------------------------------------
# Questions, options, tries


def test_questions_and_option_rules(samples):
    assert set(samples) == set(SUBTASKS)
    for subtask, sample in samples.items():
        assert len(set(sample.options)) == 4 and sample.gt in sample.options
        if subtask in ("ret_edit1", "ord_edit1", "cnt_edit1", "ret_insert1", "ret_insert2", "ord_insert1",
                       "ord_insert2"):
            assert sample.question == PUBLISHED_QUESTIONS[subtask]  # verbatim, VNBench annotations
    assert all(o in NAMES for o in samples["ret_edit1"].options)
    assert all(o in FRUITS for o in samples["ret_insert1"].options)
    assert all(o in LANDMARKS for o in samples["ret_insert2"].options)
    for subtask in ("ord_edit1", "ord_insert1", "ord_insert2"):
        orders = [tuple(o.split(", ")) for o in samples[subtask].options]
        assert len({frozenset(o) for o in orders}) == 1 and all(len(o) == 4 for o in orders)
    for subtask in ("cnt_edit1", "cnt_insert1"):
        assert all(isinstance(o, int) and 1 <= o <= 6 for o in samples[subtask].options)
    fruit = samples["cnt_edit2"].needles[0]["item"]
    assert samples["cnt_edit2"].question == (
        f"Some {plural(fruit)} were inserted into 4 small sections of the video. "
        f"How many {plural(fruit)} appeared in the video in total?")
    obj = samples["cnt_insert1"].needles[0]["item"]
    assert samples["cnt_insert1"].question == f"How many {plural(obj)} appeared in the video?"


def test_count_option_rules():
    rng = np.random.default_rng(0)
    for gt in range(1, 7):
        for _ in range(20):
            options = count_options(rng, gt)
            assert gt in options and len(set(options)) == 4 and all(1 <= o <= 6 for o in options)
    for gt in range(4, 17):
        for _ in range(20):
            options = near_count_options(rng, gt)
            assert gt in options and len(set(options)) == 4 and min(options) >= 1
            assert max(options) - min(options) <= 4


def test_gt_position_is_spread_over_letters():
    letters = {LETTERS[s.options.index(s.gt)]
               for s in Synthesizer(SynthConfig(**{**TINY, "per_task": 24}, tasks=("ret_edit1",)))}
    assert letters == set(LETTERS)


def test_tries_follow_the_official_permutations(written):
    records = load_annotations(written / "annotations.json")
    for sample in group_samples(records):
        assert [r.try_index for r in sample.tries] == [0, 1, 2, 3]
        base = sample.tries[0].options
        for record, perm in zip(sample.tries, TRY_PERMUTATIONS):
            assert record.options == tuple(base[i] for i in perm)
            assert record.gt_option == LETTERS[record.options.index(record.gt)]
        assert "".join(r.gt_option for r in sample.tries) in ("AADC", "BCAD", "CDCB", "DBBA")


# ---------------------------------------------------------------------------------------------
# The written set


def test_written_set_loads_and_matches_its_videos(written, samples):
    records = load_annotations(written / "annotations.json")
    assert len(records) == 4 * len(SUBTASKS)
    assert sorted(json.loads((written / "annotations.json").read_text())[0]) == sorted(
        ["video", "question", "options", "gt", "gt_option", "type", "try", "needle_time", "length"])
    for record in records:
        assert record.label == record.subtask  # no I-1/I-2 label swap in our sets
        sample = samples[record.subtask]
        assert record.video == f"./videos/{sample.sample_id}.mp4"
        assert record.needle_time == tuple(sample.needle_time) and record.length == sample.length
    for subtask in ("ret_edit1", "ord_insert1"):  # an edit and an insert video, decoded back
        video = load_frames(written / "videos" / f"{samples[subtask].sample_id}.mp4")
        assert video.frames.shape == samples[subtask].frames.shape
        assert video.duration == pytest.approx(samples[subtask].length)
        start = samples[subtask].needle_spans[0][0]  # H.264 at crf 18 keeps the needle frame close
        assert np.abs(video.frames[start].astype(int) - samples[subtask].frames[start].astype(int)).mean() < 8
    manifest = json.loads((written / "manifest.json").read_text())
    assert manifest["split"] == "eval" and len(manifest["samples"]) == len(SUBTASKS)


def test_written_set_is_scorable(written):
    records = load_annotations(written / "annotations.json")
    perfect = [prediction_record(r, r.gt_option, "strict") for r in records]
    assert score_predictions(perfect)["overall"] == 1.0
    wrong_once = [prediction_record(r, "A" if r.gt_option != "A" else "B", "strict") if r.try_index == 3 else p
                  for r, p in zip(records, perfect)]
    assert score_predictions(wrong_once)["overall"] == 0.0


def test_same_seed_gives_identical_files_and_frames(tmp_path, written):
    write_synth_set(Synthesizer(SynthConfig(**TINY)), tmp_path, progress=False)
    assert (tmp_path / "annotations.json").read_bytes() == (written / "annotations.json").read_bytes()
    assert (tmp_path / "manifest.json").read_bytes() == (written / "manifest.json").read_bytes()
    first = [s.frames for s in Synthesizer(SynthConfig(**TINY))]
    again = [s.frames for s in Synthesizer(SynthConfig(**TINY))]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    other = [s.frames for s in Synthesizer(SynthConfig(**{**TINY, "seed": 8}))]
    assert not any(np.array_equal(a, b) for a, b in zip(first, other))


SYNTH_ARGS = ["synth", "--procedural", "--per-task", "1", "--tasks", "ret_edit1", "cnt_insert1", "--seconds", "8",
              "--fps", "4", "--size", "64x48", "--seed", "5"]


def test_cli_same_seed_gives_identical_annotations_and_video_bytes(tmp_path):
    """Once in this process, once in a child whose fresh heap memory holds other bytes (glibc MALLOC_PERTURB_):
    x264 with B-frames encodes these textured frames differently each time on an AVX-512 CPU (docs/video.md)."""
    assert main([*SYNTH_ARGS, "--out", str(tmp_path / "here")]) == 0
    env = {**os.environ, "MALLOC_PERTURB_": "170", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(duokit.__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-m", "duokit", *SYNTH_ARGS, "--out", str(tmp_path / "child")], check=True,
                   env=env, capture_output=True)
    files = sorted(p.relative_to(tmp_path / "here") for p in (tmp_path / "here").rglob("*") if p.is_file())
    assert len(files) == 4 and Path("annotations.json") in files  # 2 videos, annotations, manifest
    for name in files:
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "child" / name).read_bytes(), name


def test_cli_writes_a_loadable_set(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["synth", "--out", str(out), "--procedural", "--per-task", "1", "--tasks", "ret_edit1",
                 "cnt_insert1", "--seconds", "12", "--fps", "4", "--size", "64x48", "--seed", "3"])
    assert code == 0
    records = load_annotations(out / "annotations.json")
    assert {r.subtask for r in records} == {"ret_edit1", "cnt_insert1"} and len(records) == 8
    assert load_frames(out / "videos" / "proc-eval3-0000_ret_edit1.mp4").frames.shape[1:3] == (48, 64)
    with pytest.raises(SystemExit):
        main(["synth", "--out", str(out), "--size", "64by48"])
    assert "WxH" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "x"), "--haystacks", str(tmp_path / "nowhere")]) == 1
    assert "haystack folder not found" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "x"), "--seconds", "5", "--fps", "4"]) == 1
    assert "raise --seconds" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# Needles are where needle_time says, and only there


def _changed(sample) -> np.ndarray:
    """Per output frame: does it differ from the haystack frame (edit tasks keep the timeline)?"""
    return (sample.frames != sample.haystack.frames).any(axis=(1, 2, 3))


def _runs(flags) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        if not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


@pytest.mark.parametrize("subtask", EDIT_TASKS)
def test_edit_needles_sit_exactly_in_their_windows(samples, subtask):
    sample = samples[subtask]
    assert sample.frames.shape == sample.haystack.frames.shape
    assert _runs(_changed(sample)) == list(sample.needle_spans)
    assert [round(s / sample.fps, 4) for s, _ in sample.needle_spans] == sample.needle_time
    height, width = sample.frames.shape[1:3]
    for (start, end), needle in zip(sample.needle_spans, sample.needles):
        boxes = needle.get("boxes") or [subtitle_patch(SUBTITLE.format(name=needle["item"]), height, width).box()]
        inside = np.zeros((height, width), bool)
        for top, left, bottom, right in boxes:
            inside[top:bottom, left:right] = True
            region = (slice(start, end), slice(top, bottom), slice(left, right))
            diff = np.abs(sample.frames[region].astype(int) - sample.haystack.frames[region].astype(int))
            assert diff.mean() > 10  # the needle is visible in its region on every frame of its window
        outside = (sample.frames[start:end] != sample.haystack.frames[start:end]).any(axis=-1) & ~inside
        assert not outside.any()  # and nowhere else


@pytest.mark.parametrize("subtask", INSERT_TASKS)
def test_inserted_needles_are_new_frames_at_needle_time(samples, subtask):
    sample = samples[subtask]
    haystack = sample.haystack.frames
    needle_frames = round(1.5 * sample.fps)
    inserted = np.zeros(len(sample.frames), bool)
    for start, end in sample.needle_spans:
        assert end - start == needle_frames
        inserted[start:end] = True
    assert np.array_equal(sample.frames[~inserted], haystack)  # the haystack, untouched and in order
    assert len(sample.frames) == len(haystack) + needle_frames * len(sample.needle_spans)
    assert sample.length == len(sample.frames) / sample.fps
    for start, _ in sample.needle_spans:
        assert round(start / sample.fps, 4) in sample.needle_time
        # the needle frame differs from the haystack frame it displaced in the output timeline
        displaced = haystack[min(start - inserted[:start].sum(), len(haystack) - 1)]
        assert np.abs(sample.frames[start].astype(int) - displaced.astype(int)).mean() > 10


# ---------------------------------------------------------------------------------------------
# Ground truth from the pixels


def test_cnt_edit1_gt_is_the_number_of_subtitle_windows(samples):
    sample = samples["cnt_edit1"]
    assert len(_runs(_changed(sample))) == sample.gt == len(sample.needle_time)


def test_cnt_insert1_gt_is_the_number_of_inserted_runs(samples):
    sample = samples["cnt_insert1"]
    haystack, frames = sample.haystack.frames, sample.frames
    inserted, next_haystack = [], 0  # align output to haystack: a frame equal to the next one is the haystack
    for frame in frames:
        if next_haystack < len(haystack) and np.array_equal(frame, haystack[next_haystack]):
            inserted.append(False)
            next_haystack += 1
        else:
            inserted.append(True)
    assert next_haystack == len(haystack)
    assert len(_runs(inserted)) == sample.gt == len(sample.needle_time)


def test_cnt_edit2_gt_is_the_number_of_pasted_stickers(samples):
    sample = samples["cnt_edit2"]
    total = 0
    for (start, _), needle in zip(sample.needle_spans, sample.needles):
        changed = (sample.frames[start] != sample.haystack.frames[start]).any(axis=-1)
        boxes = needle["boxes"]
        for i, (top, left, bottom, right) in enumerate(boxes):
            assert changed[top:bottom, left:right].mean() > 0.3
            for other in boxes[:i]:  # stickers never overlap, so each is one countable object
                assert bottom <= other[0] or other[2] <= top or right <= other[1] or other[3] <= left
        total += len(boxes)
    assert len(sample.needle_spans) == 4 and total == sample.gt and 4 <= sample.gt <= 16


def test_ord_edit1_gt_is_the_subtitle_order(samples):
    sample = samples["ord_edit1"]
    names = sample.gt.split(", ")
    height, width = sample.frames.shape[1:3]
    seen = []
    for start, _ in sample.needle_spans:
        def distance(name, frame=sample.frames[start]):
            patch = subtitle_patch(SUBTITLE.format(name=name), height, width)
            top, left, bottom, right = patch.box()
            return np.abs(frame[top:bottom, left:right].astype(int) - patch.rgb.astype(int)).mean()
        seen.append(min(names, key=distance))
    assert seen == names


@pytest.mark.parametrize("subtask,pool", [("ord_insert1", "fruit"), ("ord_insert2", "object")])
def test_ord_insert_gt_is_the_insertion_order(samples, subtask, pool):
    sample = samples[subtask]
    names = sample.gt.split(", ")
    height, width = sample.frames.shape[1:3]
    seen = []
    for (start, _), needle in zip(sample.needle_spans, sample.needles):
        seed = int(needle["instance"].rsplit(":", 1)[1])
        # which of the four classes, drawn with this instance's seed, is the picture on screen?
        seen.append(min(names, key=lambda name: np.abs(
            sample.frames[start].astype(int) - ProceduralNeedle(pool, name, seed).frame(height, width)).mean()))
    assert seen == names


# ---------------------------------------------------------------------------------------------
# User-video haystacks


def _names_in_split(split: str, count: int, stem: str = "clip") -> list[str]:
    names = [f"{stem}{i}.mp4" for i in range(200) if split_of_file(f"{stem}{i}.mp4") == split]
    return names[:count]


@pytest.fixture()
def haystack_folder(tmp_path):
    folder = tmp_path / "haystacks"
    rng = np.random.default_rng(0)
    for name in _names_in_split("eval", 2) + _names_in_split("train", 1):
        write_video(folder / name, rng.integers(0, 255, size=(96, 48, 80, 3), dtype=np.uint8), fps=8)
    return folder


def test_user_video_haystacks(haystack_folder, tmp_path):
    config = SynthConfig(per_task=None, seconds=(12.0, 12.0), fps=4.0, size=(64, 64), haystacks=str(haystack_folder),
                         tasks=("ret_edit1", "ret_insert1"))
    synthesizer = Synthesizer(config)
    assert [p.name for p in synthesizer.folder.videos] == _names_in_split("eval", 2)
    out = tmp_path / "out"
    write_synth_set(synthesizer, out, progress=False)
    records = load_annotations(out / "annotations.json")
    stems = {p.stem for p in synthesizer.folder.videos}
    assert {r.sample_id.rsplit("_", 2)[0] for r in records} == stems
    haystack = synthesizer.haystack(0)
    assert haystack.frames.shape == (48, 64, 64, 3)  # 12 s of a 8 fps clip at 4 fps, cropped and resized
    assert haystack.source == str(synthesizer.folder.videos[0])


def test_user_video_with_a_lower_frame_rate_is_resampled(tmp_path):
    folder = tmp_path / "slow"
    name = _names_in_split("eval", 1)[0]
    frames = np.repeat(np.arange(0, 240, 40, dtype=np.uint8), 1)[:, None, None, None] * np.ones((6, 16, 16, 3),
                                                                                                 np.uint8)
    write_video(folder / name, frames, fps=2)
    haystack = HaystackFolder(folder).load(folder / name, fps=4, size=(16, 16), max_seconds=None)
    assert len(haystack.frames) == 12  # 3 s at 4 fps
    levels = haystack.frames[:, 8, 8, 0].astype(int)
    assert np.abs(levels[0::2] - levels[1::2]).max() <= 3  # each source frame shown twice


def test_empty_haystack_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no videos here")
    with pytest.raises(HaystackError, match="no video files"):
        Synthesizer(SynthConfig(**{**TINY, "per_task": None}, haystacks=str(tmp_path / "empty")))
    with pytest.raises(HaystackError, match="not found"):
        HaystackFolder(tmp_path / "missing")


def test_unreadable_haystack_video_is_a_clear_error_and_nothing_is_written(haystack_folder, tmp_path):
    bad = haystack_folder / _names_in_split("eval", 1, stem="broken")[0]
    bad.write_bytes(b"this is not an mp4 file")
    synthesizer = Synthesizer(SynthConfig(**{**TINY, "per_task": None}, haystacks=str(haystack_folder)))
    out = tmp_path / "out"
    with pytest.raises(HaystackError, match=f"{bad.name}: unreadable haystack video"):
        write_synth_set(synthesizer, out, progress=False)
    assert not out.exists()


def test_too_short_haystack_names_the_video(haystack_folder):
    config = SynthConfig(per_task=1, seconds=(3.0, 3.0), fps=4.0, size=(64, 64), haystacks=str(haystack_folder),
                         tasks=("cnt_edit2",))
    with pytest.raises(ValueError, match=r"clip\d+\.mp4.*cnt_edit2.*cannot place 4 needles"):
        list(Synthesizer(config))
