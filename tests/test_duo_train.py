"""DuoAttention gate training: the mixed attention, loss, schedule, data masks, checkpoints and resume.

References are written independently of the code under test: an eager softmax with explicit masks for
the mixed attention, the official `generate_streaming_mask` formula (triu-based), hand-computed
learning rates of the official LambdaLR, and the inference `duo` method for an all-streaming student.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from duokit.data.synth.training import TrainingConfig
from duokit.methods.duo.checkpoint import CHECKPOINT_FILE, load_checkpoint, rng_state, save_checkpoint
from duokit.methods.duo.gates import (
    DuoGates,
    MixedAttentionPlan,
    blocksparse_mask,
    enable_gate_training,
    mixed_attention,
    streaming_mask,
)
from duokit.methods.duo.pattern import load_pattern, save_pattern
from duokit.methods.duo.profile import far_attention_mass
from duokit.methods.duo.train import (
    TEXT_TOKENS,
    TrainSettings,
    check_sequence_length,
    distillation_loss,
    loss_mask,
    official_lr_lambda,
    plan_for_model,
    plan_training_memory,
    step_loss,
    train_gates,
)
from duokit.methods.duo.train_data import BUFFER_TOKENS, NATO, PasskeyData, VideoNeedleData
from duokit.models import load_vlm
from duokit.runtime import torch_threads

SINK, RECENT = 4, 8
# Small synthetic videos: 8 frames of 56x56 (16 video tokens), 1-2 needles.
VIDEO = {"frames": (8,), "frame_size": (56, 56), "needles": (1, 2)}
CLI_VIDEO = ["--frames", "8", "--frame-size", "56", "56", "--needles", "1", "2", "--sink", str(SINK),
             "--recent", str(RECENT)]


@pytest.fixture(scope="module")
def qwen():
    model, _, adapter = load_vlm("tiny:qwen2_5_vl", dtype=torch.float32, device="cpu")
    config = TrainingConfig(frame_counts=VIDEO["frames"], size=VIDEO["frame_size"], needles=VIDEO["needles"])
    return model, adapter, VideoNeedleData(adapter, config)


# --- mixed attention ----------------------------------------------------------------------------

def official_streaming_mask(length, sink, recent):
    """duo_attn/patch/streaming_attn.py::generate_streaming_mask, without the rounding to 8."""
    ones = torch.ones(length, length, dtype=torch.bool)
    causal = ~torch.triu(ones, diagonal=1)
    recent_mask = torch.triu(ones, diagonal=-recent + 1)
    sink_mask = ones.clone()
    sink_mask[:, sink:] = False
    return (recent_mask | sink_mask) & causal


@pytest.mark.parametrize("length,sink,recent", [(20, 4, 8), (7, 0, 0), (33, 128, 256), (50, 3, 5)])
def test_streaming_mask_is_the_official_one_with_the_inference_meaning_of_recent(length, sink, recent):
    """duokit's `recent` counts the tokens before the query (as inference does); the official training
    mask counts the query among its `recent`, so it is the official mask of recent + 1."""
    assert torch.equal(streaming_mask(length, sink, recent, torch.device("cpu")),
                       official_streaming_mask(length, sink, recent + 1))


def official_block_streaming_mask(length, sink_blocks, local_blocks, block):
    """Block-Sparse-Attention's test reference (`generate_streaming_mask` in block_sparse_tests/.../utils.py,
    causal, equal query and key lengths): a [rows, cols] block mask, row i = the first `sink_blocks` columns
    and columns i − local_blocks + 1 … i, expanded to tokens, cut to `length`, and causal inside."""
    blocks = -(-length // block)
    base = torch.zeros(blocks, blocks, dtype=torch.bool)
    for row in range(blocks):
        base[row, max(row + 1 - local_blocks, 0):row + 1] = True
        base[row, :sink_blocks] = True
    tokens = base.repeat_interleave(block, 0).repeat_interleave(block, 1)[:length, :length]
    return tokens & official_streaming_mask(length, 0, length)


@pytest.mark.parametrize("length,sink,recent,block", [(600, 128, 256, 128), (37, 4, 8, 4), (50, 5, 7, 4),
                                                      (20, 0, 3, 2), (9, 4, 64, 16)])
def test_blocksparse_mask_is_the_official_block_pattern(length, sink, recent, block):
    """ceil(sink / block) sink blocks and ceil(recent / block) local blocks (official llama.py)."""
    assert torch.equal(blocksparse_mask(length, sink, recent, block, torch.device("cpu")),
                       official_block_streaming_mask(length, -(-sink // block), -(-recent // block), block))


def test_blocksparse_mask_by_hand():
    mask = blocksparse_mask(10, 2, 4, 2, torch.device("cpu"))  # blocks of 2: 1 sink block, 2 local blocks
    seen = {query: set(torch.nonzero(mask[query]).flatten().tolist()) for query in (3, 5, 8, 9)}
    assert seen == {3: {0, 1, 2, 3}, 5: {0, 1, 2, 3, 4, 5}, 8: {0, 1, 6, 7, 8}, 9: {0, 1, 6, 7, 8, 9}}
    # the official 128/256 at block 128: the first 128 tokens + 129 (first query of a block) to 256 (last)
    # recent tokens, the query included; the token mask keeps exactly 256 + the query
    mask = blocksparse_mask(1024, 128, 256, 128, torch.device("cpu"))
    assert [int(mask[q].sum()) for q in (512, 575, 639)] == [128 + 129, 128 + 192, 128 + 256]
    assert mask[512, :128].all() and mask[512, 384:513].all() and not mask[512, 128:384].any()
    assert int(streaming_mask(1024, 128, 256, torch.device("cpu"))[639].sum()) == 128 + 257


def test_bad_streaming_windows_are_refused():
    with pytest.raises(ValueError, match="streaming mask must be one of"):
        TrainSettings(model="tiny:qwen2_5_vl", streaming_mask="flex")
    with pytest.raises(ValueError, match="blocksparse mask needs --block-size >= 1 and --recent >= 1"):
        TrainSettings(model="tiny:qwen2_5_vl", streaming_mask="blocksparse", recent=0)
    with pytest.raises(ValueError, match="blocksparse mask needs --block-size >= 1"):
        TrainSettings(model="tiny:qwen2_5_vl", streaming_mask="blocksparse", block_size=0)
    with pytest.raises(ValueError, match="--gate-dtype"):
        TrainSettings(model="tiny:qwen2_5_vl", gate_dtype="float16")
    # the length guard counts the whole blocks a streaming query may see: 16 + 16 here, not 4 + 8
    settings = TrainSettings(model="tiny:qwen2_5_vl", sink=4, recent=8, streaming_mask="blocksparse", block_size=16)
    assert settings.window == (16, 16)
    with pytest.raises(ValueError, match=r"sink 16 \+ recent 16\) = 40"):
        check_sequence_length(39, *settings.window, "a test sequence")


def eager(query, key, value, mask, scaling):
    scores = (query @ key.transpose(-1, -2)) * scaling
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ value


@pytest.mark.parametrize("variant,mask", [("paper", "token"), ("official-teacher", "token"),
                                          ("paper", "blocksparse")])
def test_mixed_attention_is_the_gated_sum(variant, mask):
    torch.manual_seed(0)
    kv_heads, groups, length, dim = 3, 2, 24, 8
    gates = DuoGates(2, kv_heads)
    with torch.no_grad():
        gates.gates.copy_(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.3, 0.8]]))
    module = SimpleNamespace(layer_idx=1, num_key_value_groups=groups,
                             duokit_duo_gates=MixedAttentionPlan(gates, SINK, RECENT, variant, mask, block_size=3))
    query = torch.randn(2, kv_heads * groups, length, dim)
    key, value = torch.randn(2, kv_heads, length, dim), torch.randn(2, kv_heads, length, dim)
    out, _ = mixed_attention(module, query, key, value, None, scaling=0.3)

    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    causal = official_streaming_mask(length, 0, length)
    window = (official_streaming_mask(length, SINK, RECENT + 1) if mask == "token"
              else official_block_streaming_mask(length, 2, 3, 3))  # ceil(4 / 3), ceil(8 / 3)
    teacher = eager(query[:1], key[:1], value[:1], causal, 0.3)
    student_full = teacher if variant == "official-teacher" else eager(query[1:], key[1:], value[1:], causal, 0.3)
    student_stream = eager(query[1:], key[1:], value[1:], window, 0.3)
    alpha = torch.tensor([0.0, 0.3, 0.8]).repeat_interleave(groups)[None, :, None, None]
    student = alpha * student_full + (1 - alpha) * student_stream
    expected = torch.cat([teacher, student]).transpose(1, 2)
    assert out.shape == (2, length, kv_heads * groups, dim)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_bf16_gates_mix_like_float32_gates_and_get_the_rounded_gradient():
    """The official gates are bf16 parameters: the forward is the float32 one for the same (bf16) values,
    and the gradient is the float32 gradient rounded to bf16."""
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 4, 24, 8), torch.randn(2, 2, 24, 8), torch.randn(2, 2, 24, 8)
    outputs, grads = [], []
    for dtype in (torch.float32, torch.bfloat16):
        gates = DuoGates(1, 2, dtype=dtype)
        with torch.no_grad():
            gates.gates.copy_(torch.tensor([[0.3, 0.8]]))
        module = SimpleNamespace(layer_idx=0, num_key_value_groups=2,
                                 duokit_duo_gates=MixedAttentionPlan(gates, SINK, RECENT, "paper"))
        out, _ = mixed_attention(module, query, key, value, None, scaling=0.3)
        out[1].square().sum().backward()
        assert gates.gates.dtype == gates.gates.grad.dtype == dtype
        outputs.append(out)
        grads.append(gates.gates.grad)
        if dtype == torch.float32:  # the float32 run uses the bf16-rounded values too
            with torch.no_grad():
                assert not torch.equal(gates.gates, gates.gates.bfloat16().float())
    assert not torch.equal(outputs[0], outputs[1])  # 0.3 and 0.8 are not bf16 numbers
    gates = DuoGates(1, 2)
    with torch.no_grad():
        gates.gates.copy_(torch.tensor([[0.3, 0.8]]).bfloat16().float())
    module = SimpleNamespace(layer_idx=0, num_key_value_groups=2,
                             duokit_duo_gates=MixedAttentionPlan(gates, SINK, RECENT, "paper"))
    out, _ = mixed_attention(module, query, key, value, None, scaling=0.3)
    out[1].square().sum().backward()
    assert torch.equal(out, outputs[1])
    assert torch.equal(gates.gates.grad.bfloat16(), grads[1])


def test_mixed_attention_refuses_odd_batches_and_masks():
    plan = MixedAttentionPlan(DuoGates(1, 1), SINK, RECENT, "paper")
    module = SimpleNamespace(layer_idx=0, num_key_value_groups=1, duokit_duo_gates=plan)
    q = torch.randn(1, 1, 5, 4)
    with pytest.raises(ValueError, match="even size"):
        mixed_attention(module, q, q, q, None)
    q = torch.randn(2, 1, 5, 4)
    with pytest.raises(ValueError, match="attention mask"):
        mixed_attention(module, q, q, q, torch.ones(2, 1, 5, 5, dtype=torch.bool))


# --- loss, regularisation, schedule -------------------------------------------------------------

def test_l1_term_is_live_and_is_a_mean():
    gates = DuoGates(3, 4)
    with torch.no_grad():
        gates.gates.mul_(torch.linspace(0.1, 1.0, 12).view(3, 4))
    reg = gates.regularization()
    assert reg.item() == pytest.approx(gates.gates.detach().abs().mean().item())
    (0.05 * reg).backward()  # a community VLM port (VILA) used `.data` here: no gradient at all
    torch.testing.assert_close(gates.gates.grad, torch.full((3, 4), 0.05 / 12))


def test_distillation_loss_uses_answer_tokens_only():
    hidden = torch.zeros(2, 5, 4)
    hidden[1, 1] = 2.0  # answer token: squared error 4 in every dimension
    hidden[1, 3] = 1.0  # answer token: squared error 1
    hidden[1, 0] = 100.0  # not an answer token: ignored
    mask = torch.tensor([False, True, False, True, False])
    assert distillation_loss(hidden, mask).item() == pytest.approx((4.0 + 1.0) / 2)


def test_loss_positions_at_or_before_the_answer():
    mask = torch.tensor([False, False, True, True, False, True])
    assert torch.equal(loss_mask(mask, "answer"), mask)
    assert loss_mask(mask, "predicting").tolist() == [False, True, True, False, True, False]


def test_official_schedule_values():
    factor = official_lr_lambda(2000)  # N // 5 = 400: warm-up 400, flat, decay over the last 400, floor 0.1
    lrs = {s: round(0.02 * factor(s), 10) for s in (0, 39, 199, 399, 1000, 1600, 1800, 1999)}
    assert lrs == {0: 0.002, 39: 0.002, 199: 0.01, 399: 0.02, 1000: 0.02, 1600: 0.02, 1800: 0.01, 1999: 0.002}


# --- on the tiny Qwen2.5-VL ----------------------------------------------------------------------

def test_answer_mask_covers_the_answer_words_only(qwen):
    _, adapter, data = qwen
    for index in range(3):
        example = data.example(index)
        sample = data.generator.sample(index)
        words = "".join(qa.answer[a:b] for qa in sample.qa for a, b in qa.answer_spans)
        ids = data.adapter.tokenizer  # byte-level: one token per byte
        prefix = adapter.process(data.conversation(sample.qa)[0], sample.frames, sample.fps)["input_ids"]
        full_ids = torch.cat([prefix[0], torch.tensor(ids(data.conversation(sample.qa)[1],
                                                          add_special_tokens=False)["input_ids"])])
        assert example.num_tokens == len(full_ids)
        assert ids.decode(full_ids[example.answer_mask.cpu()]) == words
        assert not example.answer_mask[:prefix.shape[1]].any()
        assert example.position_ids.shape == (3, 1, example.num_tokens)


@pytest.mark.parametrize("variant,mask", [("paper", "token"), ("official-teacher", "token"),
                                          ("official-teacher", "blocksparse")])
def test_gates_at_one_give_zero_distillation_and_pure_l1_gradient(qwen, variant, mask):
    model, adapter, data = qwen
    gates = DuoGates(adapter.num_layers, adapter.num_kv_heads)
    example = data.example(0)
    with enable_gate_training(model, gates, SINK, RECENT, variant, mask, block_size=4):
        loss, parts = step_loss(adapter, gates, example, reg_weight=0.05)
        loss.backward()
    assert parts["distill_loss"] == 0.0  # student == teacher bit for bit when every head is full
    torch.testing.assert_close(gates.gates.grad, torch.full_like(gates.gates, 0.05 / gates.gates.numel()))
    # ... while half-open gates do change the student (the window hides keys of this example)
    with torch.no_grad():
        gates.gates.fill_(0.5)
    with torch.no_grad(), enable_gate_training(model, gates, SINK, RECENT, variant, mask, block_size=4):
        assert step_loss(adapter, gates, example, reg_weight=0.05)[1]["distill_loss"] > 0
    if variant != "paper" or mask != "token":
        return
    # the teacher half is the unpatched model
    with torch.no_grad():
        plain = adapter.language_model(inputs_embeds=example.inputs_embeds, position_ids=example.position_ids,
                                       use_cache=False).last_hidden_state
    with torch.no_grad(), enable_gate_training(model, gates, SINK, RECENT):
        two_way = adapter.language_model(**example.two_way(), use_cache=False).last_hidden_state
    torch.testing.assert_close(two_way[:1], plain, atol=1e-5, rtol=1e-5)
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_distillation_keeps_up_the_gates_the_loss_needs(qwen):
    """L1 alone lowers every gate alike; with the distillation term the heads whose streaming version costs
    the most loss (measured independently: one head streaming, every other full) stay high."""
    model, adapter, data = qwen
    example = data.example(1)
    layers, kv_heads = adapter.num_layers, adapter.num_kv_heads
    need = np.zeros((layers, kv_heads))
    for layer in range(layers):
        for head in range(kv_heads):
            alone = DuoGates(layers, kv_heads)
            with torch.no_grad():
                alone.gates[layer, head] = 0.0
            with torch.no_grad(), enable_gate_training(model, alone, SINK, RECENT):
                need[layer, head] = step_loss(adapter, alone, example, 0.0)[1]["distill_loss"]

    def train(distill: bool) -> np.ndarray:
        gates = DuoGates(layers, kv_heads)
        optimizer = torch.optim.AdamW(gates.parameters(), lr=0.02, weight_decay=0.0)
        with enable_gate_training(model, gates, SINK, RECENT):
            for _ in range(25):
                loss = step_loss(adapter, gates, example, 0.05)[0] if distill else 0.05 * gates.regularization()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                gates.clamp_()
        return gates.values()

    l1_only, both = train(False), train(True)
    assert np.all(l1_only == l1_only.flat[0]) and l1_only.flat[0] < 0.6  # ~ lr per step, whatever λ
    assert both.min() > l1_only.flat[0] + 0.3
    ranked = np.argsort(need, axis=None)  # least needed first
    assert both.flat[ranked[-2:]].min() > both.flat[ranked[:2]].max()
    assert need.flat[ranked[-2:]].min() > 5 * need.flat[ranked[:2]].max()  # the two groups really differ


def test_distillation_gradient_reaches_every_gate(qwen):
    model, adapter, data = qwen
    gates = DuoGates(adapter.num_layers, adapter.num_kv_heads, initial_value=0.5)
    with enable_gate_training(model, gates, SINK, RECENT):
        loss, parts = step_loss(adapter, gates, data.example(1), reg_weight=0.0)
        loss.backward()
    assert parts["distill_loss"] > 0
    assert (gates.gates.grad != 0).all()


def test_student_with_closed_gates_is_the_streaming_inference_model(qwen, tmp_path):
    """Gates 0 = every head streaming: must equal the `duo` inference method with every head streaming.

    Training and inference give `recent` the same meaning (the tokens before the query), so the same
    value gives the same window (docs/duoattention.md).
    """
    from duokit.methods.base import get_method

    model, adapter, data = qwen
    example = data.example(2)
    assert example.num_tokens > SINK + RECENT + 10
    gates = DuoGates(adapter.num_layers, adapter.num_kv_heads, initial_value=0.0)
    with torch.no_grad(), enable_gate_training(model, gates, SINK, RECENT):
        student = adapter.language_model(**example.two_way(), use_cache=False).last_hidden_state[1:]
    save_pattern(tmp_path, np.zeros((adapter.num_layers, adapter.num_kv_heads)), SINK, RECENT)
    method = get_method("duo", pattern=str(tmp_path), sparsity=1.0, sink=SINK, recent=RECENT)
    with torch.no_grad(), method.apply(model, adapter):
        streaming = adapter.language_model(inputs_embeds=example.inputs_embeds, position_ids=example.position_ids,
                                           use_cache=False).last_hidden_state
    torch.testing.assert_close(student, streaming, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradient(qwen):
    model, adapter, data = qwen
    example = data.example(1)
    grads = []
    for checkpointing in (False, True):
        gates = DuoGates(adapter.num_layers, adapter.num_kv_heads, initial_value=0.7)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            adapter.language_model.train()
        try:
            with enable_gate_training(model, gates, SINK, RECENT):
                step_loss(adapter, gates, example, 0.05)[0].backward()
        finally:
            adapter.language_model.eval()
            model.activation_checkpointing_disable()
        grads.append(gates.gates.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen3_vl", "llava_onevision"])
def test_teacher_half_is_the_plain_model_in_other_families(family):
    """The doubled batch (Qwen3-VL deepstack rows included) leaves the teacher equal to the plain model."""
    model, _, adapter = load_vlm(f"tiny:{family}", dtype=torch.float32, device="cpu")
    config = TrainingConfig(frame_counts=VIDEO["frames"], size=VIDEO["frame_size"], needles=VIDEO["needles"])
    example = VideoNeedleData(adapter, config).example(0)
    gates = DuoGates(adapter.num_layers, adapter.num_kv_heads, initial_value=0.5)
    with torch.no_grad():
        plain = adapter.language_model(inputs_embeds=example.inputs_embeds, position_ids=example.position_ids,
                                       use_cache=False, **example.model_kwargs).last_hidden_state
        with enable_gate_training(model, gates, SINK, RECENT):
            two_way = adapter.language_model(**example.two_way(), use_cache=False).last_hidden_state
    torch.testing.assert_close(two_way[:1], plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(two_way[1:], plain, atol=1e-3)  # the half-open gates change the student


def test_official_teacher_variant_differs_from_paper(qwen):
    model, adapter, data = qwen
    example = data.example(1)
    losses = {}
    for variant in ("paper", "official-teacher"):
        gates = DuoGates(adapter.num_layers, adapter.num_kv_heads, initial_value=0.5)
        with torch.no_grad(), enable_gate_training(model, gates, SINK, RECENT, variant):
            losses[variant] = step_loss(adapter, gates, example, 0.0)[1]["distill_loss"]
    assert losses["paper"] > 0 and losses["official-teacher"] > 0 and losses["paper"] != losses["official-teacher"]


def test_wrong_gate_shape_and_variant_are_refused(qwen):
    model, adapter, _ = qwen
    with pytest.raises(ValueError, match="layers x KV heads"):
        enable_gate_training(model, DuoGates(adapter.num_layers + 1, adapter.num_kv_heads), SINK, RECENT)
    with pytest.raises(ValueError, match="variant"):
        enable_gate_training(model, DuoGates(adapter.num_layers, adapter.num_kv_heads), SINK, RECENT, "teacher")


# --- text LMs: the official multi-passkey recipe ------------------------------------------------------

def test_passkey_recipe_on_a_local_text(tmp_path):
    _, _, adapter = load_vlm("tiny:llama", dtype=torch.float32, device="cpu")
    text = tmp_path / "book.txt"
    text.write_text("It was a dark and stormy night; the rain fell in torrents. " * 160)  # 9,440 byte tokens
    data = PasskeyData(adapter, text, context_min=300, context_max=2000, num_passkeys=3, passkey_words=4)
    for index in (0, 7):
        example = data.example(index)
        decoded = adapter.tokenizer.decode(example.input_ids[0])  # byte-level: one token per byte
        answers = re.findall(r"Passkey: ([a-z ]+)\n\n", decoded)
        hidden = re.findall(r"it's the (\w+) passkey to the vault: ([a-z ]+)\n\n", decoded)
        assert [words for _, words in hidden] == answers and len(answers) == 3
        assert [ordinal for ordinal, _ in hidden] == ["first", "second", "third"]  # the official words
        assert re.findall(r"what is the (\w+) passkey", decoded) == ["first", "second", "third"]
        assert all(len(a.split()) == 4 and set(a.split()) <= set(NATO) for a in answers)
        assert adapter.tokenizer.decode(example.input_ids[0][example.answer_mask]) == "".join(answers)
        assert decoded.startswith("<|im_start|> This is a very long story book: <book> ")  # no BOS: none exists
        assert example.position_ids.shape == (1, example.num_tokens) and example.model_kwargs == {}
    lengths = {data.example(i).num_tokens for i in range(3)}
    assert len(lengths) == 3  # a different context length of the grid each step
    # The official budget: the haystack is trimmed so that no sequence exceeds context_max - 300 ...
    assert max(data.example(i).num_tokens for i in range(50)) <= 2000 - BUFFER_TOKENS
    with pytest.raises(ValueError, match="leaves .* haystack tokens.*raise --context-max"):
        PasskeyData(adapter, text, context_min=300, context_max=1000, num_passkeys=3, passkey_words=4)
    with pytest.raises(ValueError, match="1 to 20 passkeys"):
        PasskeyData(adapter, text, context_min=300, context_max=8000, num_passkeys=21, passkey_words=4)
    # ... and the opening text is encoded with the tokenizer's special tokens, as the official loader does:
    # a tokenizer that adds a BOS puts it first, once.
    from tokenizers.processors import TemplateProcessing

    bos = adapter.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    adapter.tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    with_bos = PasskeyData(adapter, text, context_min=300, context_max=2000, num_passkeys=3, passkey_words=4).example(0)
    assert with_bos.input_ids[0, 0] == bos and (with_bos.input_ids[0] == bos).sum() == 1
    assert torch.equal(with_bos.input_ids[0, 1:], data.example(0).input_ids[0])
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(ValueError, match="short.txt"):
        PasskeyData(adapter, short, context_min=300, context_max=800)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        PasskeyData(adapter, tmp_path / "missing.txt")
    # the trainer on a text LM: two steps of the official recipe (10 passkeys of 32 words)
    summary = train_gates(TrainSettings(model="tiny:llama", steps=2, save_every=1, sink=SINK, recent=16,
                                        text_file=str(text), context_min=300, context_max=8000, progress=False),
                          tmp_path / "run")
    config = json.loads((tmp_path / "run" / "pattern" / "config.json").read_text())
    assert config["dataset_format"] == "multiple_passkey" and config["steps_done"] == 2
    history = [json.loads(line) for line in (tmp_path / "run" / "gate_history.jsonl").read_text().splitlines()]
    assert summary["gates"].shape == (2, 2)
    # gates at 1 on step 1; on step 2 the window hides part of the passkey context from the student
    assert history[0]["distill_loss"] == 0.0 and history[1]["distill_loss"] > 0


def merging_tokenizer(text, add_special_tokens=False, **_):
    """A BPE-like toy: one token per character, but a space + lowercase letter is ONE token (like "Ġa"),
    so "vault: alpha" is not tokens("vault: ") + tokens("alpha"). Special-token mode adds a BOS (257)."""
    ids, i = [257] if add_special_tokens else [], 0
    while i < len(text):
        if text[i] == " " and text[i + 1:i + 2].islower():
            ids.append(230 + ord(text[i + 1]) - ord("a"))
            i += 2
        else:
            ids.append(ord(text[i]) % 128)
            i += 1
    return {"input_ids": ids}


def test_passkey_is_the_same_tokens_in_needle_and_answer(tmp_path):
    """The official loader encodes needle text and passkey separately, then concatenates: the model must
    copy exactly the tokens it read. Encoding "…vault: alpha …" in one piece would merge across the seam."""
    _, _, real = load_vlm("tiny:llama", dtype=torch.float32, device="cpu")
    adapter = SimpleNamespace(tokenizer=merging_tokenizer, model=real.model, device=real.device,
                              positions=real.positions)
    text = tmp_path / "book.txt"
    text.write_text("It was a dark and stormy night; the rain fell in torrents. " * 160)
    data = PasskeyData(adapter, text, context_min=300, context_max=3000, num_passkeys=3, passkey_words=4)
    for index in range(4):
        example = data.example(index)
        ids, mask = example.input_ids[0].tolist(), example.answer_mask.tolist()
        assert ids[0] == 257 and ids.count(257) == 1  # BOS once, first
        answers, current = [], []
        for token, is_answer in zip(ids + [None], mask + [False]):
            if is_answer:
                current.append(token)
            elif current:
                answers.append(current)
                current = []
        assert len(answers) == 3
        first_answer = mask.index(True)
        for k, answer in enumerate(answers):
            needle = (merging_tokenizer("\n\n")["input_ids"] + merging_tokenizer(
                f"Remeber this sequence of words, it's the {['first', 'second', 'third'][k]} passkey to the vault: "
            )["input_ids"] + answer + merging_tokenizer("\n\n")["input_ids"])
            context = ids[:first_answer]
            assert any(context[i:i + len(needle)] == needle for i in range(len(context))), f"needle {k} of {index}"
        assert len(ids) <= 3000 - BUFFER_TOKENS


# --- memory plan ---------------------------------------------------------------------------------------

def test_memory_plan_formula_and_token_count(qwen):
    text = SimpleNamespace(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=4, num_hidden_layers=3)
    plan = plan_training_memory(100, text, tokens=10, dtype_bytes=2, checkpointing=True)
    layer = 2 * 10 * 2 * (6 * 8 + 4 * 16 + 2 * (2 + 2) * 4) + 10 * 2 * 4 * (2 * 2 + 12)
    assert (plan.weights_bytes, plan.saved_bytes, plan.layer_bytes) == (200, 3 * 2 * 10 * 8 * 2, layer)
    assert plan.attention_bytes == 10 * 10 * (2 * 2 * 4 + 1 + 2)
    unchecked = plan_training_memory(100, text, tokens=10, dtype_bytes=2, checkpointing=False)
    assert unchecked.saved_bytes == 3 * layer and unchecked.layer_bytes == 0
    # the planner counts the video tokens a training example really has
    _, adapter, data = qwen
    example = data.example(0)
    video_tokens = int(adapter.video_mask(example.input_ids).sum())
    planned = plan_for_model("tiny:qwen2_5_vl", VIDEO["frames"][0], VIDEO["frame_size"])
    assert planned.tokens == video_tokens + TEXT_TOKENS
    assert planned.weights_bytes == 2 * sum(p.numel() for p in adapter.model.parameters())


# --- checkpoints ---------------------------------------------------------------------------------------

def test_checkpoint_round_trip_with_weights_only(tmp_path):
    gates = DuoGates(2, 2)
    optimizer = torch.optim.AdamW(gates.parameters(), lr=0.02, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, official_lr_lambda(10))
    gates.regularization().backward()
    optimizer.step()
    scheduler.step()
    save_checkpoint(tmp_path, {"gates": gates.gates.detach(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "rng": rng_state(), "data_position": 1})
    state = load_checkpoint(tmp_path)  # torch.load(weights_only=True) inside
    assert torch.equal(state["gates"], gates.gates.detach())
    assert state["scheduler"]["last_epoch"] == 1 and state["data_position"] == 1
    assert not list((tmp_path / "ckpt").glob("*.tmp"))
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="latest.pt"):
        load_checkpoint(tmp_path)


def test_far_attention_mass_counts_keys_outside_the_window():
    dim, length = 4, 12
    key = torch.zeros(1, 1, length, dim)
    key[0, 0, 5, 0] = 50.0  # a far key (position 5; sink 2, recent 3, query at 11)
    query = torch.zeros(1, 1, length, dim)
    query[0, 0, 11, 0] = 1.0
    mass = far_attention_mass(query, key, torch.tensor([11]), 1.0, sink=2, recent=3)
    assert mass.item() == pytest.approx(1.0, abs=1e-6)
    mass = far_attention_mass(query, key, torch.tensor([11]), 1.0, sink=6, recent=3)  # now a sink key
    assert mass.item() == pytest.approx(0.0, abs=1e-6)


# --- the command line: outputs, resume after SIGKILL, bad input ---------------------------------------

def train_duo(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "duokit", "train-duo", "--model", "tiny:qwen2_5_vl", "--out", str(out),
            "--no-progress", *CLI_VIDEO, *extra]


def subprocess_env() -> dict:
    # One thread: the same floating-point reduction order in every process.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# The command line of `train_duo`, in a process that SIGKILLs itself right after writing the checkpoint of
# step argv[1]: the crash lands at a known step however loaded the machine is.
DIE_AFTER_CHECKPOINT = """
import os, signal, sys
from duokit.cli import main
from duokit.methods.duo import checkpoint

save, die_at = checkpoint.save_checkpoint, int(sys.argv[1])

def save_then_die(run_dir, state):
    path = save(run_dir, state)
    if state["step"] == die_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return path

checkpoint.save_checkpoint = save_then_die
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_then_resume_gives_bit_identical_gates(tmp_path):
    steps, save_every = 9, 3
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    command = train_duo(killed, "--steps", str(steps), "--save-every", str(save_every))
    first = subprocess.run([sys.executable, "-c", DIE_AFTER_CHECKPOINT, str(save_every), *command[3:]],
                           check=False, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    saved = load_checkpoint(killed)
    assert saved is not None and saved["step"] == save_every, "the run must die after its first checkpoint"
    subprocess.run(command, env=subprocess_env(), check=True, capture_output=True)  # the same command resumes
    with torch_threads(1):  # as in the subprocesses
        train_gates(TrainSettings(model="tiny:qwen2_5_vl", steps=steps, save_every=save_every, sink=SINK,
                                  recent=RECENT, progress=False, **VIDEO), whole)
    resumed, uninterrupted = load_checkpoint(killed), load_checkpoint(whole)
    assert resumed["step"] == uninterrupted["step"] == steps
    assert torch.equal(resumed["gates"], uninterrupted["gates"])
    assert len(np.unique(resumed["gates"].numpy())) > 1  # the distillation term moved the gates apart
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(resumed["optimizer"]["state"][0][name], uninterrupted["optimizer"]["state"][0][name])
    assert (killed / "pattern" / "full_attention_heads.tsv").read_bytes() == (
        whole / "pattern" / "full_attention_heads.tsv").read_bytes()
    history = (killed / "gate_history.jsonl").read_text().splitlines()
    assert history == (whole / "gate_history.jsonl").read_text().splitlines() and len(history) == steps


def test_run_outputs_official_pattern_history_and_plots(tmp_path):
    settings = TrainSettings(model="tiny:qwen2_5_vl", steps=5, save_every=2, sink=SINK, recent=RECENT,
                             progress=False, **VIDEO)
    summary = train_gates(settings, tmp_path)
    pattern = load_pattern(tmp_path / "pattern")
    assert pattern.shape == (2, 2) and (pattern.sink_size, pattern.recent_size) == (SINK, RECENT)
    np.testing.assert_allclose(pattern.gates, summary["gates"], rtol=0, atol=1e-7)
    assert ((summary["gates"] >= 0) & (summary["gates"] <= 1)).all()
    for name in ("gates_heatmap.png", "gate_histogram.png", "loss.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # re-running a finished run resumes at the end and changes nothing
    again = train_gates(settings, tmp_path)
    assert again["resumed_from"] == 5 and np.array_equal(again["gates"], summary["gates"])
    # a run written before --streaming-mask, --block-size and --gate-dtype existed resumes (their defaults)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("streaming_mask", "block_size", "gate_dtype"):
        del config[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert train_gates(settings, tmp_path)["resumed_from"] == 5
    # resuming with other settings is refused, naming what changed
    with pytest.raises(ValueError, match="lr"):
        train_gates(TrainSettings(**{**settings.__dict__, "lr": 0.1}), tmp_path)


def test_blocksparse_mask_and_bf16_gates_train_and_are_recorded(tmp_path):
    settings = TrainSettings(model="tiny:qwen2_5_vl", steps=3, save_every=3, sink=SINK, recent=RECENT,
                             streaming_mask="blocksparse", block_size=4, gate_dtype="bfloat16", progress=False,
                             **VIDEO)
    summary = train_gates(settings, tmp_path)
    state = load_checkpoint(tmp_path)
    assert state["gates"].dtype == torch.bfloat16
    for name in ("exp_avg", "exp_avg_sq"):  # the AdamW state is in the gates' dtype, as in the official code
        assert state["optimizer"]["state"][0][name].dtype == torch.bfloat16
    assert np.array_equal(summary["gates"], state["gates"].float().numpy())
    config = json.loads((tmp_path / "pattern" / "config.json").read_text())
    assert (config["streaming_attn_implementation"], config["block_size"], config["gate_dtype"]) == (
        "blocksparse", 4, "bfloat16")
    np.testing.assert_array_equal(load_pattern(tmp_path / "pattern").gates, summary["gates"])
    with pytest.raises(ValueError, match="gate_dtype: 'bfloat16' -> 'float32'"):
        train_gates(TrainSettings(**{**settings.__dict__, "gate_dtype": "float32"}), tmp_path)


def test_cli_errors_are_one_clear_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "duokit", "train-duo", "--model", "tiny:llama", "--out",
                             str(tmp_path), "--steps", "1"], check=False, capture_output=True, text=True, env=subprocess_env())
    assert result.returncode == 1
    assert "text LM: pass --text-file" in result.stderr and "Traceback" not in result.stderr


def test_profile_fallback_writes_a_labelled_pattern(tmp_path, capsys):
    from duokit.cli import main

    out = tmp_path / "profile"
    assert main(["train-duo", "--model", "tiny:qwen2_5_vl", "--out", str(out), "--no-progress", *CLI_VIDEO,
                 "--profile", "2"]) == 0
    pattern = load_pattern(out / "pattern")
    assert pattern.shape == (2, 2) and ((pattern.gates >= 0) & (pattern.gates <= 1)).all()
    assert pattern.gates.max() > 0  # answers read needles outside the 4 + 8 window
    config = (out / "pattern" / "config.json").read_text()
    assert "NOT DuoAttention" in config and (out / "plots" / "profile_heatmap.png").exists()
    assert "NOT DuoAttention" in capsys.readouterr().out
    (out / CHECKPOINT_FILE).parent.mkdir()
    (out / CHECKPOINT_FILE).write_bytes(b"")
    assert main(["train-duo", "--model", "tiny:qwen2_5_vl", "--out", str(out), "--profile", "2"]) == 1
    assert "holds a gate-training run" in capsys.readouterr().err
