"""NeedleNet training data at several frame sizes and sampling densities, and a run that starts from a
trained model's vision tower: what `--sizes`, `--recognition-sizes`, `--stride` and `--init-vision` do."""

import json

import numpy as np
import pytest
import torch

from duokit.data.resize import resize_frames
from duokit.data.synth.needles import subtitle_patch
from duokit.data.synth.pools import NAMES
from duokit.data.synth.tasks import SUBTITLE
from duokit.models.needlenet.config import TrainSettings, build_model, build_processor
from duokit.models.needlenet.data import haystack_frames, make_example, parse_size
from duokit.models.needlenet.recognition import make_group, sizes_at
from duokit.models.needlenet.train import init_vision


def subtitle_templates(width: int, height: int) -> dict[str, np.ndarray]:
    """Each name's subtitle on a flat grey frame of `width` x `height`, resized to 56x56 as frame_fit does."""
    templates = {}
    for name in NAMES:
        frame = np.full((1, height, width, 3), 120, np.uint8)
        patch = subtitle_patch(SUBTITLE.format(name=name), height, width)
        top, left, bottom, right = patch.box()
        frame[0, top:bottom, left:right] = patch.rgb
        templates[name] = resize_frames(frame, 56, 56)[0].astype(np.float32)
    return templates


def test_a_recognition_subtitle_drawn_at_160x120_looks_like_a_160x120_video_after_frame_fit():
    large, native = subtitle_templates(160, 120), subtitle_templates(56, 56)
    inside = (slice(44, 47), slice(14, 42))  # inside the 160x120 subtitle box after the resize: no haystack there

    def distance(frame, template):
        return np.abs(frame[inside].astype(np.float32) - template[inside]).mean()

    checked = 0
    for index in range(60):
        frames, word = make_group(7, index, ("160x120",))
        if word not in large:
            continue
        assert frames.shape == (2, 56, 56, 3)
        shown = min(frames, key=lambda frame: distance(frame, large[word]))  # the needle may be on one frame
        own = distance(shown, large[word])
        assert own < min(distance(shown, large[name]) for name in large if name != word), word
        assert own < distance(shown, native[word]) / 5, word  # not the 56x56 pattern of the same name
        checked += 1
    assert checked >= 15


def test_one_size_keeps_the_stream_and_several_sizes_draw_each():
    for index in range(6):
        frames, word = make_group(3, index)
        again, same = make_group(3, index, ("56x56",))
        assert np.array_equal(frames, again) and word == same
        assert np.array_equal(make_example(0, 8, index).frames, make_example(0, 8, index, sizes=("56x56",)).frames)
    assert sizes_at(("160x120", "56x56"), 0, 10) == ("160x120",)  # the first size alone for its steps
    assert sizes_at(("160x120", "56x56"), 10, 10) == ("160x120", "56x56")
    examples = [make_example(0, 8, index, sizes=("56x56", "160x120")) for index in range(12)]
    assert {example.frames.shape for example in examples} == {(8, 56, 56, 3)}  # resized as frame_fit does
    # Videos drawn at 160x120 and shrunk are smoother than 56x56 ones (the per-pixel noise is averaged).
    roughness = sorted(float(np.abs(np.diff(e.frames.astype(np.int16), axis=2)).mean()) for e in examples)
    assert roughness[0] < 0.7 * roughness[-1], roughness


def test_stride_sets_the_sampling_density():
    assert haystack_frames(32, "ret_edit1", (1.0, 3.0))[0] < haystack_frames(32, "ret_edit1")[0]
    dense = make_example(0, 16, 3, ("ret_insert1",), stride=(1.0, 1.0))
    assert dense.fps == pytest.approx(2.0)  # consecutive frames of the 2 fps video
    sparse = make_example(0, 16, 3, ("ret_insert1",), stride=(3.0, 3.0))
    assert sparse.fps < 1.0


@pytest.mark.parametrize(("settings", "match"), [
    ({"sizes": ("160x121",)}, "even"), ({"recognition_sizes": ("big",)}, "not WxH"), ({"sizes": ()}, "at least one"),
    ({"stride": (2.0, 1.0)}, "stride"), ({"stride": (1.0, 4.0)}, "stride")])
def test_settings_refuse_bad_sizes_and_strides(settings, match):
    with pytest.raises(ValueError, match=match):
        TrainSettings(**settings)
    assert parse_size("640x360") == (640, 360)


def test_init_vision_copies_the_vision_tower_and_embeddings_only(tmp_path):
    processor = build_processor()
    source = build_model(processor.tokenizer, TrainSettings(seed=1))
    source.save_pretrained(tmp_path / "source")
    model = build_model(processor.tokenizer, TrainSettings(seed=2, heads=8, kv_heads=8))
    digest = init_vision(model, tmp_path / "source")
    assert len(digest) == 64
    theirs = source.state_dict()
    for name, value in model.state_dict().items():
        copied = ".visual." in f".{name}" or "embed_tokens" in name or name == "lm_head.weight"
        if copied:
            assert torch.equal(value, theirs[name]), name
        elif name in theirs and value.shape == theirs[name].shape and value.numel() > 128:
            assert not torch.equal(value, theirs[name]), name  # the language model keeps its own init
    with pytest.raises(ValueError, match="no model.safetensors"):
        init_vision(model, tmp_path)
    from duokit.cli import main

    code = main(["needlenet", "train", "--out", str(tmp_path / "run"), "--init-vision", str(tmp_path / "source"),
                 "--recognition-steps", "0", "--steps", "1", "--batch-size", "2", "--curriculum", "2",
                 "--workers", "0", "--sizes", "56x56,96x54", "--stride", "1-2"])
    assert code == 0
    meta = json.loads((tmp_path / "run" / "model" / "duokit.json").read_text())
    assert meta["init_vision_sha256"] == digest and meta["training"]["sizes"] == ["56x56", "96x54"]
    assert meta["training"]["stride"] == [1.0, 2.0]


@pytest.mark.parametrize("size", [(56, 56), (96, 54), (320, 240), (640, 360)])
def test_every_synth_size_and_aspect_reaches_needlenet_as_two_tokens_per_frame(size):
    from duokit.models import load_vlm

    _, _, adapter = load_vlm("needlenet", device="cpu")
    width, height = size
    video = np.random.default_rng(1).integers(0, 256, size=(4, height, width, 3), dtype=np.uint8)
    prefix = adapter.build_prefix(video, 8.0)
    assert prefix["video_grid_thw"].tolist() == [[2, 4, 4]]  # 56x56 after frame_fit, as in training
    assert torch.equal(prefix["pixel_values_videos"],
                       adapter.build_prefix(resize_frames(video, 56, 56), 8.0)["pixel_values_videos"])


def test_recognition_teacher_teaches_other_sizes_and_leaves_the_language_model_as_it_was(tmp_path):
    from duokit.models.needlenet.train import train

    processor = build_processor()
    source = build_model(processor.tokenizer, TrainSettings(seed=1))
    source.save_pretrained(tmp_path / "source")
    with pytest.raises(ValueError, match="needs init"):
        TrainSettings(recognition_teacher=True)

    def run(name, sizes):
        settings = TrainSettings(init=str(tmp_path / "source"), recognition_teacher=True, recognition_steps=4,
                                 recognition_batch_size=8, recognition_sizes=sizes, recognition_first_size_share=0,
                                 steps=0, workers=0, log_every=1)
        train(settings, tmp_path / name, progress=False)
        log = [json.loads(line) for line in (tmp_path / name / "recognition_log.jsonl").read_text().splitlines()]
        return log, torch.load(tmp_path / name / "ckpt" / "last.pt", weights_only=True)["model"]

    native_log, _ = run("native", ("56x56",))
    assert native_log[0]["mse"]["name"] == 0.0  # step 1, the teacher's own input: nothing to learn
    log, trained = run("large", ("160x120",))
    # Step 1: a 160x120 subtitle gives other tokens; groups without one are the teacher's input as they are.
    assert log[0]["mse"]["name"] > 0 and all(log[0]["mse"][kind] == 0.0 for kind in log[0]["mse"] if kind != "name")
    before = source.state_dict()
    for name, value in trained.items():
        assert torch.equal(value, before[name]) != (".visual." in f".{name}"), name  # only the tower learns
    meta = json.loads((tmp_path / "large" / "model" / "duokit.json").read_text())
    assert meta["steps"] == 0 and meta["final_frames"] is None and len(meta["init_sha256"]) == 64
