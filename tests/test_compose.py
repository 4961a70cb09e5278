"""`compose` (methods acting at different places, run as one) and the ablation's controls `random_drop`
and duo's `random_heads`, on the shipped NeedleNet with a real synthetic sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from duokit.data.synth.generate import Synthesizer
from duokit.data.synth.writer import write_synth_set
from duokit.data.video import load_frames, sampled_fps
from duokit.data.vnbench import group_samples, load_annotations, question_part, resolve_video
from duokit.engine import LM, SampleInput, Try, answer_tries
from duokit.methods import get_method
from duokit.methods.compose import format_parts, parse_parts
from duokit.methods.duo.pattern import save_pattern
from duokit.methods.random_drop import kept_video_tokens
from duokit.models import load_vlm
from duokit.models.needlenet.data import eval_synth_config


@pytest.fixture(scope="module")
def needlenet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compose")
    write_synth_set(Synthesizer(eval_synth_config(32, 1, seed=5)), folder / "data", progress=False)
    sample = group_samples(load_annotations(folder / "data" / "annotations.json"))[0]
    video = load_frames(resolve_video(sample.video_name, folder / "data" / "videos"), num_frames=32)
    model, _, adapter = load_vlm("needlenet", dtype="float32", device="cpu")
    pattern = folder / "pattern"
    save_pattern(pattern, np.random.default_rng(1).random((adapter.num_layers, adapter.num_kv_heads)),
                 sink_size=4, recent_size=16)
    tries = [Try(record.prompt, question_part(record.question)) for record in sample.tries[:2]]
    return model, adapter, SampleInput(video.frames, sampled_fps(video.timestamps, video.fps)), tries, pattern


def answer(needlenet, method):
    model, adapter, sample, tries, _ = needlenet
    with method.apply(model, adapter):
        return answer_tries(LM(model, adapter), method, sample, tries, chunk_size=16, keep_logits=True)


def test_composition_at_identity_settings_is_the_baseline(needlenet):
    pattern = needlenet[4]
    baseline = answer(needlenet, get_method("baseline"))
    composed = answer(needlenet, get_method(
        "compose", parts=f"llavolta(layer=2,stride=1) + duo(pattern={pattern},sparsity=0,sink=4,recent=16)"))
    for ours, theirs in zip(composed.answers, baseline.answers):
        assert ours.tokens == theirs.tokens
        torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=1e-5)
    assert composed.cost["kv_bytes"] == baseline.cost["kv_bytes"]


def test_composition_pools_then_splits_heads_and_plans_its_kv_exactly(needlenet):
    pattern = needlenet[4]
    duo = f"duo(pattern={pattern},sparsity=0.5,sink=4,recent=16)"
    baseline = answer(needlenet, get_method("baseline")).cost
    pool = answer(needlenet, get_method("llavolta", stride=2)).cost
    split = answer(needlenet, get_method("compose", parts=duo)).cost
    both = answer(needlenet, get_method("compose", parts=f"llavolta(stride=2) + {duo}")).cost
    assert both["kv_bytes_planned"] == both["kv_bytes_peak"]
    assert both["kv_bytes"] < min(pool["kv_bytes"], split["kv_bytes"]) < baseline["kv_bytes"]
    # Layers >= K ran on the pooled sequence, as with llavolta alone.
    assert both["tokens_per_layer"] == pool["tokens_per_layer"]


def test_parts_parse_and_format_round_trip():
    parts = parse_parts("llavolta(layer=2, stride=4) + duo(pattern=/p,sparsity=0.5) + baseline")
    assert parts == [("llavolta", {"layer": "2", "stride": "4"}), ("duo", {"pattern": "/p", "sparsity": "0.5"}),
                     ("baseline", {})]
    assert parse_parts(format_parts(parts)) == parts


@pytest.mark.parametrize("parts, message", [
    ("llavolta(stride)", "is not key=value"),
    ("llavolta(stride=2", "is not `name`"),
    ("nosuch(x=1)", "unknown method 'nosuch'"),
    ("llavolta(nosuch=1)", "has no setting 'nosuch'"),
    ("llavolta(stride=2) + llavolta(stride=4)", "both override `prefill`"),
    ("compose(parts=baseline)", "cannot themselves be compose"),
])
def test_bad_parts_are_one_clear_error(parts, message):
    with pytest.raises((ValueError, KeyError), match=message):
        get_method("compose", parts=parts)


def test_random_drop_keeps_the_budgets_share_of_video_tokens(needlenet):
    model, adapter, sample, _, _ = needlenet
    lm = LM(model, adapter)
    prefix = lm.embed(sample)
    kept = {seed: get_method("random_drop", keep=0.25, seed=seed).prepare_prefix(prefix, sample, lm)
            for seed in (0, 1)}
    video = prefix.num_video_tokens
    for one in kept.values():
        assert one.num_video_tokens == kept_video_tokens(video, 0.25) == video // 4
        assert one.num_tokens - one.num_video_tokens == prefix.num_tokens - video  # text untouched
    again = get_method("random_drop", keep=0.25, seed=0).prepare_prefix(prefix, sample, lm)
    assert torch.equal(again.position_ids, kept[0].position_ids)
    assert not torch.equal(kept[0].position_ids, kept[1].position_ids)
    assert get_method("random_drop", keep=1.0).prepare_prefix(prefix, sample, lm) is prefix
    with pytest.raises(ValueError, match="keep must be a share"):
        get_method("random_drop", keep=1.5)


def test_duo_random_heads_chooses_as_many_heads_at_random(needlenet):
    pattern = needlenet[4]
    trained = get_method("duo", pattern=str(pattern), sparsity=0.5).retrieval
    draws = [get_method("duo", pattern=str(pattern), sparsity=0.5, random_heads=seed).retrieval for seed in range(4)]
    assert all(d.sum() == trained.sum() for d in draws)
    assert np.array_equal(draws[0], get_method("duo", pattern=str(pattern), sparsity=0.5, random_heads=0).retrieval)
    assert len({d.tobytes() for d in draws} | {trained.tobytes()}) > 2
