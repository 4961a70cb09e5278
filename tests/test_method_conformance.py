"""What every registered method must do, checked for each one on every tiny VLM family and a text LM.

A method joins this suite by being registered (`discover_methods` walks `duokit.methods`); its class
gives the settings of its identity (`Method.conformance_settings`). For each method:

- at its identity it reproduces the baseline's tokens and logits exactly (chunked prefill, 2 tries);
- the KV bytes it plans for the tokens its cache held equal the bytes the cache really held at peak;
- its prefilled cache survives `copy.deepcopy`: copies decode alike and leave the original untouched;
- its settings survive config.json (`settings()` -> JSON -> `from_settings`), and bad ones are one
  clear error naming the valid settings;
- `duokit eval --method NAME --set KEY=VALUE ...` writes a run that resumes to the same records and
  refuses a run directory made with other settings.
"""

from __future__ import annotations

import copy
import json
import sys
import types
from dataclasses import fields

import numpy as np
import pytest
import torch
from _tiny_models import tiny

from duokit.cli import main
from duokit.data.video import write_video
from duokit.data.vnbench import LETTERS, official_prompt, permuted_options, question_part
from duokit.engine import LM, SampleInput, Try, answer_tries, greedy_decode
from duokit.io import iter_jsonl
from duokit.methods import METHODS, discover_methods, get_method, method_class
from duokit.metrics import kv_cache_bytes

METHOD_NAMES = sorted(discover_methods())
FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "llava_onevision", "llama")
FPS = 0.5
CHUNK = 16  # splits every tiny prefix over several prefill calls
QUESTION = "What is the secret word?"
OPTIONS = ["Alice", "Bob", "Carol", "Dave"]
TRIES = [Try(official_prompt(QUESTION, options), question_part(QUESTION)) for options in permuted_options(OPTIONS)[:2]]


def sample_for(adapter) -> SampleInput:
    if adapter.is_multimodal:
        return SampleInput(np.random.default_rng(0).integers(0, 256, (4, 96, 128, 3), dtype=np.uint8), FPS)
    return SampleInput(None, None, "The secret word of the day is written on a red card. " * 3)


def identity(name, tmp_path, adapter):
    return get_method(name, **method_class(name).conformance_settings(tmp_path, adapter.geometry))


def baseline_like(method):
    """The baseline, prefilling per question when `method` does (the same prefix and chunks as the method)."""
    cls = method_class("baseline")
    if method.prefix_depends_on_question:
        cls = types.new_class(f"{cls.__name__}PerQuestion", (cls,),
                              exec_body=lambda namespace: namespace.update(prefix_depends_on_question=True))
    return cls()


def run(model, adapter, method):
    with method.apply(model, adapter):
        return answer_tries(LM(model, adapter), method, sample_for(adapter), TRIES, chunk_size=CHUNK,
                            keep_logits=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_identity_reproduces_the_baseline_and_plans_its_peak_kv(name, family, tmp_path):
    model, _, adapter = tiny(family)
    method = identity(name, tmp_path, adapter)
    expected = run(model, adapter, baseline_like(method))
    result = run(model, adapter, method)
    for got, want in zip(result.answers, expected.answers, strict=True):
        assert got.tokens == want.tokens
        assert torch.equal(got.logits, want.logits)
    cost = result.cost
    assert cost["kv_bytes_peak"] == cost["kv_bytes_planned"] > 0
    assert cost["kv_bytes_peak"] >= cost["kv_bytes"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_prefilled_cache_survives_deepcopy(name, family, tmp_path):
    model, _, adapter = tiny(family)
    method, lm = identity(name, tmp_path, adapter), LM(model, adapter)
    sample = sample_for(adapter)
    with method.apply(model, adapter):
        prefix = method.prepare_prefix(lm.embed(sample), sample, lm)
        cache = method.prefill(lm, prefix, method.new_cache(lm, prefix), CHUNK)
        held, length = kv_cache_bytes(cache), cache.get_seq_length()
        suffix = adapter.suffix_ids(TRIES[0].prompt, sample.frames is not None, sample.context)
        first = greedy_decode(lm, copy.deepcopy(cache), prefix, suffix)
        second = greedy_decode(lm, copy.deepcopy(cache), prefix, suffix)
    assert first == second and len(first) > 0
    assert kv_cache_bytes(cache) == held and cache.get_seq_length() == length


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_settings_round_trip_through_config_json(name, tmp_path):
    _, _, adapter = tiny("qwen2_5_vl")
    method = identity(name, tmp_path, adapter)
    recorded = json.loads(json.dumps(method.settings()))
    back = type(method).from_settings(recorded)
    assert back == method and back.settings() == recorded
    for key in type(method).derived_settings:  # a recorded fact the settings no longer give
        with pytest.raises(ValueError, match="do not describe"):
            type(method).from_settings({**recorded, key: "tampered"})
    with pytest.raises(ValueError, match="has no setting 'no_such_setting'"):
        type(method).from_settings({**recorded, "no_such_setting": 1})


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_bad_settings_are_one_clear_error(name, tmp_path):
    _, _, adapter = tiny("qwen2_5_vl")
    settings = method_class(name).conformance_settings(tmp_path, adapter.geometry)
    with pytest.raises(ValueError, match=f"method {name!r} has no setting 'no_such_setting'; its settings: "):
        get_method(name, **settings, no_such_setting="1")
    for field in fields(method_class(name)):
        if field.type in ("int", "float", "bool"):
            with pytest.raises(ValueError, match=f"setting {field.name}='many' is not a valid {field.type}"):
                get_method(name, **{**settings, field.name: "many"})


def write_dataset(root):
    """Two videos, 4 tries each, in the VNBench annotation schema."""
    videos = root / "videos"
    videos.mkdir()
    records = []
    for index, name in enumerate(["c0_ret_edit1", "c1_cnt_insert1"]):
        write_video(videos / f"{name}.mp4", np.random.default_rng(index).integers(0, 256, (8, 64, 64, 3),
                                                                                    dtype=np.uint8), fps=4.0)
        for try_index, options in enumerate(permuted_options(OPTIONS)):
            records.append({"video": f"./VNBench/{name}.mp4", "question": QUESTION, "options": options,
                            "gt": OPTIONS[index], "gt_option": LETTERS[options.index(OPTIONS[index])],
                            "type": name.split("_", 1)[1], "try": try_index, "needle_time": [0.5], "length": 2.0})
    (root / "annotations.json").write_text(json.dumps(records))
    return root / "annotations.json", videos


def eval_args(name, settings, annotations, videos, run_dir, chunk=CHUNK):
    args = ["eval", "--model", "tiny:qwen2_5_vl", "--method", name, "--annotations", str(annotations),
            "--videos", str(videos), "--frames", "4", "--out", str(run_dir), "--chunk-size", str(chunk)]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return args


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_eval_resumes_and_refuses_other_settings(name, tmp_path, capsys):
    _, _, adapter = tiny("qwen2_5_vl")
    settings = method_class(name).conformance_settings(tmp_path, adapter.geometry)
    annotations, videos = write_dataset(tmp_path)
    run_dir = tmp_path / "run"
    args = eval_args(name, settings, annotations, videos, run_dir)
    assert main(args) == 0
    predictions = list(iter_jsonl(run_dir / "predictions.jsonl"))
    assert len(predictions) == 8 and all(p["error"] is None for p in predictions)
    config = json.loads((run_dir / "config.json").read_text())
    assert method_class(name).from_settings(config["method"]) == get_method(name, **settings)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["cost"]["kv_bytes_peak"] == summary["cost"]["kv_bytes_planned"]

    # Resume after losing the last two tries: only they are redone, with the same answers.
    lines = (run_dir / "predictions.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "predictions.jsonl").write_text("".join(lines[:-2]))
    assert main(args) == 0

    def without_cost(record):
        return {key: value for key, value in record.items() if key != "cost"}

    redone = list(iter_jsonl(run_dir / "predictions.jsonl"))
    assert [without_cost(p) for p in redone] == [without_cost(p) for p in predictions]

    # Another chunk size, or another method, is another run: refused with one message.
    assert main(eval_args(name, settings, annotations, videos, run_dir, chunk=CHUNK + 1)) == 1
    assert "differs in: chunk_size" in capsys.readouterr().err
    for other in (m for m in METHOD_NAMES if m != name):
        other_settings = method_class(other).conformance_settings(tmp_path, adapter.geometry)
        assert main(eval_args(other, other_settings, annotations, videos, run_dir)) == 1
        assert "differs in: method" in capsys.readouterr().err
    # An unknown setting names the valid ones.
    assert main([*args, "--set", "no_such_setting=1"]) == 1
    assert "has no setting 'no_such_setting'" in capsys.readouterr().err


def test_a_new_method_module_is_discovered_without_editing_a_list(tmp_path, monkeypatch):
    import duokit.methods as package

    (tmp_path / "conformance_probe.py").write_text(
        "from dataclasses import dataclass\n"
        "from duokit.methods.base import Method, register_method\n\n\n"
        "@register_method\n@dataclass\nclass Probe(Method):\n    name = 'conformance-probe'\n")
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "duokit.methods.conformance_probe", raising=False)
    try:
        assert "conformance-probe" in discover_methods()
    finally:
        METHODS.pop("conformance-probe", None)
        sys.modules.pop("duokit.methods.conformance_probe", None)


def test_apply_is_not_overridden_and_runs_once():
    with pytest.raises(TypeError, match="override `install`"):
        types.new_class("Bad", (method_class("baseline"),), exec_body=lambda ns: ns.update(apply=lambda self: None))
    model, _, adapter = tiny("llama")
    method = get_method("baseline")
    with method.apply(model, adapter), pytest.raises(RuntimeError, match="already applied"), \
            method.apply(model, adapter):
        pass
