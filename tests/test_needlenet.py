"""NeedleNet: tokenizer, batches equal to the real processor's, training lowers the loss, and the
shipped model loads through load_vlm and beats chance on a fresh held-out set."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from duokit.data.synth.pools import NAMES, OBJECTS
from duokit.data.vnbench import SUBTASKS, official_prompt
from duokit.models.needlenet.config import ANSWER_PARSER, DUOKIT_FILE, TrainSettings, build_processor
from duokit.models.needlenet.data import BatchBuilder, make_example, tasks_for, weighted_tasks
from duokit.models.needlenet.recognition import (
    BACKGROUND_TOKEN,
    KINDS,
    RecognitionBatches,
    kind_of,
    make_group,
)
from duokit.models.needlenet.tokenizer import answer_items, build_tokenizer, corpus
from duokit.models.needlenet.train import answer_correct, export_checkpoint, learning_rate, train

SHIPPED = Path(__file__).resolve().parents[1] / "duokit" / "assets" / "needlenet"


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def test_every_prompt_word_is_in_the_vocabulary_and_answers_fit_in_max_new_tokens(processor):
    tokenizer = processor.tokenizer
    for text in corpus():
        assert tokenizer.unk_token_id not in tokenizer(text, add_special_tokens=False)["input_ids"], text
    # Longest answers: a 4-word landmark, an order of two-word objects; official max_new_tokens is 5.
    orders = ["dining table, tv monitor, cat, dog", ", ".join(NAMES[:4])]
    for answer in [*answer_items(), *orders]:
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        assert len(ids) <= 4, answer  # + <|im_end|> = 5 tokens
        assert tokenizer.decode(ids) == answer
    assert build_tokenizer().get_vocab() == tokenizer.get_vocab()  # deterministic


def test_plural_question_words_are_not_eaten_by_multiword_item_tokens(processor):
    tokens = processor.tokenizer.tokenize("How many tv monitors appeared in the video?")
    assert tokens[:4] == ["How", "many", "tv", "monitors"]
    assert "tv monitor" in OBJECTS and processor.tokenizer.tokenize("tv monitor,") == ["tv monitor,"]


def test_batch_equals_the_real_processor(processor):
    builder = BatchBuilder(processor)
    examples = [make_example(3, 8, index) for index in range(3)]
    batch = builder(examples)
    for row, example in enumerate(examples):
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": example.prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        count = len(example.frames)
        metadata = {"fps": example.fps, "total_num_frames": count, "frames_indices": list(range(count))}
        reference = processor(text=[text], videos=[example.frames], return_tensors="pt", add_special_tokens=False,
                              videos_kwargs={"video_metadata": [metadata], "do_sample_frames": False})
        length = reference["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][row, :length], reference["input_ids"][0])
        assert torch.equal(batch["mm_token_type_ids"][row, :length], reference["mm_token_type_ids"][0])
        assert torch.equal(batch["video_grid_thw"][row], reference["video_grid_thw"][0])
        assert batch["second_per_grid_ts"][row].item() == pytest.approx(reference["second_per_grid_ts"][0])
        patches = reference["pixel_values_videos"].shape[0]
        assert torch.allclose(batch["pixel_values_videos"][row * patches:(row + 1) * patches],
                              reference["pixel_values_videos"], atol=1e-5)
        answer = processor.tokenizer(example.answer, add_special_tokens=False)["input_ids"]
        labels = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert labels == answer + [processor.tokenizer.eos_token_id]
        assert example.prompt.startswith(official_prompt(example.prompt.split("\n")[0], example.options))


def test_examples_are_reproducible_and_train_eval_splits_differ():
    first, again = make_example(0, 4, 7), make_example(0, 4, 7)
    assert np.array_equal(first.frames, again.frames) and first.prompt == again.prompt
    held_out = make_example(0, 4, 7, split="eval")
    assert not np.array_equal(first.frames, held_out.frames)
    assert tasks_for(2) == ("ret_edit1", "ret_insert1", "ret_insert2")
    assert tasks_for(32) == SUBTASKS


def test_family_weights_repeat_sub_tasks_and_uniform_weights_keep_the_default_stream():
    assert weighted_tasks(32, (1, 1, 1)) == tasks_for(32)
    assert weighted_tasks(2, (1, 3, 2)) == tasks_for(2)  # no ordering or counting at 2 frames
    drawn = Counter(weighted_tasks(32, (1, 3, 2)))
    assert drawn == {task: {"ret": 1, "ord": 3, "cnt": 2}[task[:3]] for task in SUBTASKS}
    default = [make_example(0, 16, index).subtask for index in range(20)]
    assert [make_example(0, 16, index, weighted_tasks(16, (1, 1, 1))).subtask for index in range(20)] == default
    weighted = Counter(make_example(0, 32, index, weighted_tasks(32, (1, 4, 1))).subtask[:3] for index in range(90))
    assert weighted["ord"] > 2 * weighted["ret"], weighted
    with pytest.raises(ValueError, match="family_weights"):
        TrainSettings(family_weights=(1, 0, 1))


def test_answer_correct_needs_every_answer_token():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, -100, 5, 6]])
    logits = torch.zeros(2, 4, 8)
    logits[0, 1, 5] = logits[0, 2, 6] = 1  # row 0 predicts 5 then 6
    logits[1, 1, 5] = logits[1, 2, 7] = 1  # row 1 gets the second token wrong
    assert answer_correct(logits, labels).tolist() == [True, False]


def test_export_needs_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint"):
        export_checkpoint(tmp_path)


def test_settings_reject_bad_values_and_schedule_warms_up():
    with pytest.raises(ValueError, match="even"):
        TrainSettings(curriculum=(3, 8))
    settings = TrainSettings(steps=100, warmup_steps=10)
    assert learning_rate(settings, 0) < learning_rate(settings, 9) == pytest.approx(settings.lr)
    assert learning_rate(settings, 99) == pytest.approx(settings.lr * settings.final_lr_fraction, rel=0.05)


def test_the_shipped_config_is_what_its_recorded_training_builds_and_variants_train_with_more_kv_heads(tmp_path):
    from duokit.cli import main
    from duokit.models import load_vlm
    from duokit.models.needlenet.config import text_config

    with pytest.raises(ValueError, match="multiple of kv_heads"):
        TrainSettings(heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="multiples of 4"):
        TrainSettings(heads=64, kv_heads=8)  # head_dim 2 leaves no M-RoPE section for time
    shipped = json.loads((SHIPPED / "config.json").read_text())["text_config"]
    recorded = json.loads((SHIPPED / "duokit.json").read_text())["training"]
    assert (recorded["heads"], recorded["kv_heads"]) == (8, 8)  # NeedleNet v2
    built = text_config(TrainSettings(heads=recorded["heads"], kv_heads=recorded["kv_heads"]))
    for key in ("num_attention_heads", "num_key_value_heads", "hidden_size", "num_hidden_layers"):
        assert built[key] == shipped[key], key
    assert built["rope_parameters"]["mrope_section"] == shipped["rope_parameters"]["mrope_section"]
    assert text_config(TrainSettings())["num_key_value_heads"] == 2  # the defaults stay v1's recipe
    assert text_config(TrainSettings(heads=8, kv_heads=8))["rope_parameters"]["mrope_section"] == [2, 3, 3]
    code = main(["needlenet", "train", "--out", str(tmp_path), "--heads", "8", "--kv-heads", "8",
                 "--recognition-steps", "0", "--steps", "2", "--batch-size", "2", "--curriculum", "2",
                 "--workers", "0"])
    assert code == 0
    model, _, adapter = load_vlm(str(tmp_path / "model"), device="cpu", dtype="float32")
    assert (adapter.num_layers, adapter.num_kv_heads) == (4, 8)
    assert model.model.language_model.layers[0].self_attn.k_proj.out_features == 8 * 16  # 8 heads of dim 16
    assert json.loads((tmp_path / "model" / DUOKIT_FILE).read_text())["training"]["kv_heads"] == 8


def test_short_training_run_lowers_the_loss_and_saves_a_loadable_model(tmp_path):
    from duokit.models import load_vlm

    threads = torch.get_num_threads()
    settings = TrainSettings(recognition_steps=0, steps=24, batch_size=4, curriculum=(2,), warmup_steps=2,
                             workers=0, log_every=4, checkpoint_every=12, threads=threads + 1)
    train(settings, tmp_path, progress=False)
    assert torch.get_num_threads() == threads  # the caller's count back: later tests must not inherit ours
    losses = [json.loads(line)["loss"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0] - 1.0, losses
    assert (tmp_path / "ckpt" / "last.pt").exists()
    meta = json.loads((tmp_path / "model" / DUOKIT_FILE).read_text())
    assert meta["answer_parser"] == ANSWER_PARSER and meta["steps"] == 24
    model, _, adapter = load_vlm(str(tmp_path / "model"), device="cpu", dtype="float32")
    assert adapter.num_layers >= 4 and adapter.num_kv_heads >= 2
    # Exporting the last checkpoint gives the same weights as the end of the run.
    (tmp_path / "model").rename(tmp_path / "trained")
    exported, _, _ = load_vlm(str(export_checkpoint(tmp_path)), device="cpu", dtype="float32")
    for (name, value), (_, again) in zip(model.state_dict().items(), exported.state_dict().items()):
        assert torch.equal(value, again), name
    with pytest.raises(ValueError, match="other settings"):  # a different run into the same folder
        train(TrainSettings(recognition_steps=0, steps=25, batch_size=4, curriculum=(2,), workers=0), tmp_path,
              progress=False)


def test_recognition_groups_are_reproducible_and_name_one_word_each(processor):
    frames, word = make_group(5, 11)
    again, same = make_group(5, 11)
    assert np.array_equal(frames, again) and word == same and frames.shape == (2, 56, 56, 3)
    words = [make_group(5, index)[1] for index in range(300)]
    kinds = Counter(kind_of(word) for word in words)
    assert set(kinds) == set(KINDS) and kinds["name"] > kinds["fruit"]  # the KINDS weights
    ids = processor.tokenizer.convert_tokens_to_ids(words)
    assert processor.tokenizer.unk_token_id not in ids  # every answer word is one token of the vocabulary
    assert {word for word in words if kind_of(word) == "haystack"} == {BACKGROUND_TOKEN}


def test_recognition_stage_trains_only_vision_and_embeddings_lowers_its_loss_and_resumes_exactly(
        tmp_path, monkeypatch, processor):
    from duokit.models.needlenet.config import build_model

    settings = TrainSettings(recognition_steps=30, recognition_batch_size=16, steps=1, batch_size=2,
                             curriculum=(2,), workers=0, log_every=5, checkpoint_every=10)
    train(settings, tmp_path / "whole", progress=False)
    log = [json.loads(line) for line in (tmp_path / "whole" / "recognition_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [5, 10, 15, 20, 25, 30]
    assert log[-1]["loss"] < log[0]["loss"] - 0.5, log
    # Stop the run inside the recognition stage (after the step-20 checkpoint), then resume it.
    original = RecognitionBatches.__getitem__

    def fail_at_step_25(self, i):
        if self.first_step + i == 25:
            raise KeyboardInterrupt
        return original(self, i)

    monkeypatch.setattr(RecognitionBatches, "__getitem__", fail_at_step_25)
    with pytest.raises(KeyboardInterrupt):
        train(settings, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(RecognitionBatches, "__getitem__", original)
    # The step-20 checkpoint: only the vision tower and the (tied) word embeddings have learned.
    stopped = torch.load(tmp_path / "resumed" / "ckpt" / "last.pt", weights_only=True)
    assert stopped["recognition_step"] == 20 and stopped["step"] == 0
    for name, value in build_model(processor.tokenizer, settings).state_dict().items():
        learns = ".visual." in f".{name}" or "embed_tokens" in name or name == "lm_head.weight"
        assert torch.equal(value, stopped["model"][name]) != learns, name
    here = torch.backends.cpu.get_cpu_capability()
    # The resume runs on "another CPU kind": the model must record both kinds it trained on.
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "OTHER-ISA")
    train(settings, tmp_path / "resumed", progress=False)
    whole = torch.load(tmp_path / "whole" / "ckpt" / "last.pt", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "resumed" / "ckpt" / "last.pt", weights_only=True)["model"]
    for name, value in whole.items():
        assert torch.equal(value, resumed[name]), name
    kinds = {run: json.loads((tmp_path / run / "model" / DUOKIT_FILE).read_text())["cpu_capabilities"]
             for run in ("whole", "resumed")}
    assert kinds == {"whole": [here], "resumed": [here, "OTHER-ISA"]}


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").exists(), reason="no shipped NeedleNet weights")
def test_shipped_model_beats_chance_on_a_fresh_held_out_set():
    from duokit.models import load_vlm
    from duokit.models.needlenet.evaluate import heldout_scores

    meta = json.loads((SHIPPED / DUOKIT_FILE).read_text())
    assert meta["answer_parser"] == "text" and meta["frame_fit"] == [56, 56]  # every video resized to 56x56
    total = sum(f.stat().st_size for f in SHIPPED.iterdir())
    assert total <= 25 * 2**20
    model, _, adapter = load_vlm("needlenet", device="cpu")
    assert adapter.num_layers >= 4 and adapter.num_kv_heads >= 2
    retrieval = ("ret_edit1", "ret_insert1", "ret_insert2")
    # A seed no docs table used; 4-try chance is 1/256 per sample (4 tries, each of 4 options).
    scores = heldout_scores(model, adapter, meta["answer_parser"], frames=meta["frames"], per_task=4, seed=9091,
                            tasks=retrieval)
    accuracy = np.mean([scores["subtasks"][task]["accuracy"] for task in retrieval])
    assert accuracy >= RETRIEVAL_FLOOR, scores["subtasks"]


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").exists(), reason="no shipped NeedleNet weights")
def test_every_frame_size_reaches_needlenet_as_the_56_px_frames_it_was_trained_on(tmp_path):
    import shutil

    from duokit.data.resize import resize_frames
    from duokit.models import load_vlm

    _, _, adapter = load_vlm("needlenet", device="cpu")
    assert adapter.frame_fit == (56, 56)
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, size=(8, 120, 160, 3), dtype=np.uint8)  # 4:3, as `duokit synth --size 160x120`
    fitted = adapter.build_prefix(video, 2.0)
    reference = adapter.build_prefix(resize_frames(video, 56, 56), 2.0)
    assert fitted["video_grid_thw"].tolist() == [[4, 4, 4]]  # 2 video tokens per frame, as in training
    assert torch.equal(fitted["pixel_values_videos"], reference["pixel_values_videos"])
    assert torch.equal(fitted["input_ids"], reference["input_ids"])
    adapter.frame_fit = None  # the processor's own resize keeps the aspect: 28x56, 1 token per frame
    assert adapter.build_prefix(video, 2.0)["video_grid_thw"].tolist() == [[4, 2, 4]]
    broken = tmp_path / "needlenet"
    shutil.copytree(SHIPPED, broken)
    meta = json.loads((broken / DUOKIT_FILE).read_text())
    (broken / DUOKIT_FILE).write_text(json.dumps(dict(meta, frame_fit=56)))
    with pytest.raises(ValueError, match="duokit.json: frame_fit must be \\[width, height\\]"):
        load_vlm(str(broken), device="cpu")


RETRIEVAL_FLOOR = 0.6  # mean 4-try of the 3 retrieval sub-tasks; docs/needlenet.md measured 0.98, chance 0.004


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").exists(), reason="no shipped NeedleNet weights")
def test_heldout_scores_applies_the_method_it_is_given(tmp_path):
    from duokit.methods import get_method
    from duokit.methods.duo.pattern import save_pattern
    from duokit.models import load_vlm
    from duokit.models.needlenet.evaluate import heldout_scores

    model, _, adapter = load_vlm("needlenet", device="cpu")
    pattern = save_pattern(tmp_path, np.linspace(0.1, 0.9, adapter.num_layers * adapter.num_kv_heads)
                           .reshape(adapter.num_layers, adapter.num_kv_heads), sink_size=1, recent_size=1)

    def scores(method):
        return heldout_scores(model, adapter, "text", frames=32, per_task=3, seed=9092, tasks=("ret_insert1",),
                              method=method)

    baseline = scores(None)
    # Identity: no streaming head reproduces the baseline's every answer.
    assert scores(get_method("duo", pattern=str(pattern), sparsity=0.0, sink=1, recent=1)) == baseline
    # Every head sees 2 tokens: the needle is out of reach, so the retrieval answer must change.
    streaming = scores(get_method("duo", pattern=str(pattern), sparsity=1.0, sink=1, recent=1))
    assert baseline["overall"] > 0.5 and streaming["overall"] < baseline["overall"]


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").exists(), reason="no shipped NeedleNet weights")
def test_duokit_eval_picks_the_text_parser_recorded_with_needlenet(tmp_path):
    from duokit.data.synth.generate import Synthesizer
    from duokit.data.synth.writer import write_synth_set
    from duokit.eval_command import run_eval
    from duokit.models import answer_parser
    from duokit.models.needlenet.data import eval_synth_config

    assert answer_parser("needlenet") == "text" and answer_parser("tiny:qwen2_5_vl") == "official"
    config = eval_synth_config(32, per_task=1, seed=515, tasks=("ret_insert1", "ord_edit1"))
    annotations = write_synth_set(Synthesizer(config), tmp_path / "set", progress=False)
    summary = run_eval(annotations, tmp_path / "set" / "videos", 32, tmp_path / "run", model="needlenet",
                       device="cpu")
    assert summary["config"]["parser"] == "text" and summary["scores"]["n_samples"] == 2
    lines = (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 8 and all(json.loads(line)["error"] is None for line in lines)


def _same(a, b) -> bool:
    """Nested batches (dicts, lists, tuples of tensors and plain values) equal to the bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def test_data_workers_do_not_change_the_batches():
    """`--workers` only moves batch building to other processes: every batch of both stages is a function
    of (seed, step), so any worker count trains on the same data (a retrain may pick its own)."""
    from itertools import islice

    from duokit.models.needlenet.train import StageBatches, _loader

    processor = build_processor()
    settings = {w: TrainSettings(steps=6, batch_size=2, curriculum=(2, 4), recognition_steps=6,
                                 recognition_batch_size=2, workers=w) for w in (0, 2)}
    for make in (lambda s: StageBatches(processor, s, 1, 2),
                 lambda s: RecognitionBatches(BatchBuilder(processor), s.seed, 2, 1, s.recognition_steps)):
        batches = {w: list(islice(_loader(make(s), s), 4)) for w, s in settings.items()}
        assert len(batches[0]) == 4 and _same(batches[0], batches[2])
