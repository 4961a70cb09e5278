"""FlexAttention (`flex`): the selection rule, the question-row probe against a dense eager pass, the
re-injected tokens' positions, both identity forms, the random control, the budget cap, the refused
family and the per-sample costs.

The references here share nothing with duokit.methods.flex but the model: the attention rows come from
transformers' eager attention (`output_attentions=True` over the whole low-res prefix), and the selection
is recomputed token by token from the rule as FlexAttention states it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny_models import tiny
from test_method_conformance import baseline_like

from duokit.data.vnbench import official_prompt, permuted_options, question_part
from duokit.engine import LM, SampleInput, Try, answer_tries
from duokit.methods import get_method, method_class
from duokit.methods.flex.method import embed_at
from duokit.methods.flex.probe import question_attention
from duokit.methods.flex.select import binary_rows, high_res_positions, select_tokens
from duokit.models import load_vlm
from duokit.models.base import Geometry, TokenCounts

QWEN = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")
QUESTION = "What is the secret word?"
TRIES = [Try(official_prompt(QUESTION, options), question_part(QUESTION))
         for options in permuted_options(["Alice", "Bob", "Carol", "Dave"])[:2]]
LOW_PIXELS = 56 * 56  # the tiny models' frames are at most 112 x 112 (Qwen3-VL: 128 x 128)
CHUNK = 16


def sample(question: str = "") -> SampleInput:
    frames = np.random.default_rng(0).integers(0, 256, (4, 96, 128, 3), dtype=np.uint8)
    return SampleInput(frames, 0.5, question=question)


def run(model, adapter, method, pixels=None):
    saved = adapter.max_pixels, adapter.min_pixels
    if pixels is not None:
        adapter.set_pixel_limits(pixels, pixels)
    try:
        with method.apply(model, adapter):
            return answer_tries(LM(model, adapter), method, sample(), TRIES, chunk_size=CHUNK, keep_logits=True)
    finally:
        adapter.set_pixel_limits(*saved)


def assert_same_answers(result, expected):
    for got, want in zip(result.answers, expected.answers, strict=True):
        assert got.tokens == want.tokens
        assert torch.equal(got.logits, want.logits)


# ---------------------------------------------------------------------------------------------
# Identity: an empty selection is the baseline at the low resolution; equal resolutions, the baseline.

@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("empty", [{"budget": 0.0}, {"threshold": 1.0}, {"cell": 1, "budget": 0.01}])
def test_an_empty_selection_is_the_baseline_at_the_low_resolution(family, empty):
    # budget 0 and threshold 1 select nothing before the probe; a budget below one cell runs the probe
    # and the rule, then keeps nothing: the probe leaves the model as it found it.
    model, _, adapter = tiny(family)
    method = get_method("flex", low_res=LOW_PIXELS, **empty)
    result = run(model, adapter, method)
    expected = run(model, adapter, baseline_like(method), pixels=LOW_PIXELS)
    assert_same_answers(result, expected)
    cost = result.cost
    assert cost["selected_tokens"] == 0 and cost["look_again_tokens"] == 0
    assert cost["low_res_tokens"] == cost["video_tokens"] < cost["high_res_tokens"] == cost["input_video_tokens"]
    assert (cost["selection_s"] > 0) == ("cell" in empty)


@pytest.mark.parametrize("family", QWEN)
def test_equal_resolutions_and_no_selection_are_the_plain_baseline(family):
    model, _, adapter = tiny(family)
    method = get_method("flex", **method_class("flex").conformance_settings(None, adapter.geometry))
    assert method.low_res == 1 and method.budget == 0
    assert_same_answers(run(model, adapter, method), run(model, adapter, baseline_like(method)))
    # Pixels equal to high_res are the same resolution too (the high-res prefix is the context).
    method = get_method("flex", low_res=LOW_PIXELS, high_res=LOW_PIXELS, budget=0.0)
    assert_same_answers(run(model, adapter, method), run(model, adapter, baseline_like(method), pixels=LOW_PIXELS))


# ---------------------------------------------------------------------------------------------
# The probe and the selection against a dense eager pass.

def reference_selection(attention, low_grid, high_grid, threshold, cell):
    """{(group, i, j)} of high-res tokens, by FlexAttention's rule written out token by token: per row
    min-max then `> threshold`; a cell of cell x cell high-res tokens is taken when any low-res token
    whose extent overlaps the cell passes in any row."""
    t, h, w = low_grid
    _, height, width = high_grid
    passed = set()
    for row in attention.tolist():
        low, high = min(row), max(row)
        passed |= {k for k, value in enumerate(row) if high > low and (value - low) / (high - low) > threshold}
    chosen = set()
    for group in range(t):
        for i in range(height):
            for j in range(width):
                a, b = i // cell, j // cell
                rows = (a * cell, min((a + 1) * cell, height))
                cols = (b * cell, min((b + 1) * cell, width))
                for r in range(h):
                    for c in range(w):
                        overlaps = (r * height / h < rows[1] and (r + 1) * height / h > rows[0]
                                    and c * width / w < cols[1] and (c + 1) * width / w > cols[0])
                        if overlaps and group * h * w + r * w + c in passed:
                            chosen.add((group, i, j))
    return chosen


@pytest.mark.parametrize(("family", "cell", "rows"), [(family, cell, "question") for family in QWEN for cell in (1, 2)]
                         + [("qwen2_5_vl", 1, "last")])
def test_probe_and_selection_match_a_dense_eager_pass(family, cell, rows):
    model, _, adapter = tiny(family)
    _, _, eager_adapter = load_vlm(f"tiny:{family}", attn_implementation="eager")
    lm = LM(model, adapter)
    view = sample(question_part("Who?"))  # few query rows, so their union does not take every cell
    low = embed_at(lm, view, 2 * LOW_PIXELS)  # 2 x 4 low-res tokens per group, 2 groups
    rows_from = int(low.video_mask.nonzero()[-1, 0]) + 1
    method = get_method("flex", low_res=2 * LOW_PIXELS, cell=cell, threshold=0.97, rows=rows)
    layer = method.layer(adapter.num_layers)

    with torch.no_grad():
        dense = eager_adapter.language_model(
            inputs_embeds=low.inputs_embeds, position_ids=low.position_ids, output_attentions=True,
            **eager_adapter.chunk_inputs(low, 0, low.num_tokens)).attentions[layer]
    expected = dense[0].sum(0)[rows_from:][:, low.video_mask]
    probe = question_attention(lm, low, layer, rows_from, chunk_size=CHUNK)
    assert probe.shape == expected.shape and len(probe) > 1
    torch.testing.assert_close(probe, expected.float(), atol=1e-5, rtol=1e-4)

    with method.apply(model, adapter):
        prefix = method.prepare_prefix(lm.embed(view), view, lm)
    (high_grid,) = lm.embed(view).video_grids
    injected = prefix.video_mask.clone()
    injected[: low.num_tokens] = False
    got = {(int(g), int(i), int(j)) for g, (i, j) in zip(prefix.frame_of[injected], prefix.cell_of[injected])}
    want = reference_selection(expected if rows == "question" else expected[-1:], low.video_grids[0], high_grid,
                               0.97, cell)
    assert got == want
    assert 0 < len(got) < high_grid[0] * high_grid[1] * high_grid[2]
    assert prefix.costs["selected_tokens"] == len(got)


# ---------------------------------------------------------------------------------------------
# The rule's parts.

def test_rows_are_min_max_normalised_then_thresholded():
    attention = torch.tensor([[0.1, 0.3, 0.5, 0.2], [0.2, 0.2, 0.2, 0.2]])
    # Row 0: (x - 0.1) / 0.4 = 0, 0.5, 1, 0.25; FlexAttention's 255·Â > 48 is Â > 48/255 = 0.188.
    assert binary_rows(attention, 48 / 255).tolist() == [[False, True, True, True], [False] * 4]
    assert binary_rows(attention, 0.6).tolist() == [[False, False, True, False], [False] * 4]


def test_cells_take_every_high_res_token_they_cover():
    # One group, low-res 2 x 2, high-res 4 x 4, cells of 2: cell (a, b) is exactly low-res token (a, b).
    attention = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    chosen = select_tokens(attention, [(1, 2, 2)], [(1, 4, 4)], threshold=0.5, cell=2, budget=None,
                           selection="attention", random_p=0.1)
    assert chosen.reshape(4, 4).nonzero().tolist() == [[0, 2], [0, 3], [1, 2], [1, 3]]
    # Cells of 3 on a 4 x 4 grid: cell (0, 1) holds high-res columns 3 only, low-res column 1.
    chosen = select_tokens(attention, [(1, 2, 2)], [(1, 4, 4)], threshold=0.5, cell=3, budget=None,
                           selection="attention", random_p=0.1).reshape(4, 4)
    # Cell (0, 0) covers low-res rows 0-1 and columns 0-1 (high-res 0-2 straddles both), so it is taken too.
    assert chosen[:3, :].all() and not chosen[3:, :].any()


def test_the_budget_keeps_the_cells_of_most_attention():
    # Two groups of low-res 1 x 2, high-res 2 x 4, cells of 2: 2 cells of 4 tokens per group, 16 tokens.
    attention = torch.tensor([[0.0, 0.6, 0.9, 0.7]])
    grids = {"threshold": 0.0, "cell": 2, "selection": "attention", "random_p": 0.1}
    everything = select_tokens(attention, [(2, 1, 2)], [(2, 2, 4)], budget=None, **grids)
    assert everything.reshape(2, 2, 4)[0, :, 2:].all() and not everything.reshape(2, 2, 4)[0, :, :2].any()
    assert int(everything.sum()) == 12
    capped = select_tokens(attention, [(2, 1, 2)], [(2, 2, 4)], budget=0.5, **grids).reshape(2, 2, 4)
    # floor(0.5 · 16) = 8 tokens: the two cells of most mass (0.9, 0.7), not the third (0.6).
    assert capped[1].all() and not capped[0].any()
    assert int(select_tokens(attention, [(2, 1, 2)], [(2, 2, 4)], budget=0.3, **grids).sum()) == 4


def test_the_random_control_is_seeded_and_draws_cells_with_probability_p():
    def draw(seed, p, budget=None):
        return select_tokens(None, [(64, 2, 2)], [(64, 4, 4)], threshold=0.0, cell=2, budget=budget,
                             selection="random", random_p=p, generator=torch.Generator().manual_seed(seed))

    first = draw(1, 0.1)
    assert torch.equal(first, draw(1, 0.1)) and not torch.equal(first, draw(2, 0.1))
    cells = first.reshape(64, 2, 2, 2, 2).transpose(2, 3).reshape(64, 4, 4)
    assert (cells.all(-1) | ~cells.any(-1)).all()  # whole cells
    assert 10 <= int(cells.all(-1).sum()) <= 42  # 256 cells at p = 0.1: 25.6 expected
    assert not draw(1, 0.0).any() and draw(1, 1.0).all()
    assert int(draw(1, 1.0, budget=0.25).sum()) == 256


def test_random_draws_depend_on_the_seed_and_the_sample_only():
    method = get_method("flex", selection="random", seed=3)
    one, other = sample("a"), sample("b")
    assert torch.equal(method.generator(one).get_state(), get_method("flex", selection="random",
                                                                          seed=3).generator(one).get_state())
    assert not torch.equal(method.generator(one).get_state(), method.generator(other).get_state())
    assert not torch.equal(method.generator(one).get_state(), get_method("flex", seed=4).generator(one).get_state())


def test_high_res_tokens_sit_at_their_centres_in_the_low_res_grid():
    # Low-res group 1 x 2 at (t, y, x) = (5, 7, 7), (5, 7, 8); high-res 2 x 4 of the same picture.
    low = torch.tensor([[5, 5], [7, 7], [7, 8]])
    positions = high_res_positions(low, [(1, 1, 2)], [(1, 2, 4)])
    assert positions.dtype == torch.float32
    assert positions[0].tolist() == [5.0] * 8
    assert positions[1].tolist() == [6.75] * 4 + [7.25] * 4
    assert positions[2].tolist() == [6.75, 7.25, 7.75, 8.25] * 2


@pytest.mark.parametrize("family", QWEN)
def test_the_look_again_prefix_layout_and_positions(family):
    model, _, adapter = tiny(family)
    lm, view = LM(model, adapter), sample(question_part(QUESTION))
    method = get_method("flex", low_res=LOW_PIXELS, cell=1, budget=0.5)
    with method.apply(model, adapter):
        high = lm.embed(view)
        prefix = method.prepare_prefix(high, view, lm)
    low = embed_at(lm, view, LOW_PIXELS)
    question = adapter.token_ids(view.question)
    count = prefix.costs["selected_tokens"]
    assert 0 < count <= high.num_video_tokens // 2
    length = low.num_tokens
    assert prefix.num_tokens == length + 2 + count + len(question)
    assert torch.equal(prefix.input_ids[0, :length], low.input_ids[0])
    tail = prefix.input_ids[0, length:].tolist()
    video = low.video_mask.nonzero()[:, 0]
    assert tail[0] == int(low.input_ids[0, video[0] - 1]) and tail[count + 1] == int(low.input_ids[0, video[-1] + 1])
    assert tail[1:count + 1] == [adapter.video_token_id] * count and tail[count + 2:] == question
    # Text continues from the low-res prefix; the high-res tokens stay within their group's low-res range.
    start = low.next_position
    positions = prefix.position_ids[:, 0]
    assert positions[:, length].tolist() == [start] * 3
    assert positions[:, length + count + 1:].tolist() == [list(range(start + 1, start + 2 + len(question)))] * 3
    assert prefix.next_position == start + 2 + len(question)
    for index in range(length + 1, length + 1 + count):
        group = low.frame_of == prefix.frame_of[index]
        own = low.position_ids[:, 0, group].float()
        assert positions[0, index] == own[0, 0]
        assert (own[1:].amin(1) - 0.5 <= positions[1:, index]).all() and (positions[1:, index] <= own[1:].amax(1) + 0.5).all()
    # Each injected token is the high-res token of its (group, cell), embedding and id alike.
    where = {(int(g), int(r), int(c)): k for k, (g, (r, c)) in enumerate(zip(high.frame_of, high.cell_of)) if g >= 0}
    rows = [where[(int(prefix.frame_of[k]), *map(int, prefix.cell_of[k]))] for k in range(length + 1, length + 1 + count)]
    assert torch.equal(prefix.inputs_embeds[0, length + 1:length + 1 + count], high.inputs_embeds[0, rows])


# ---------------------------------------------------------------------------------------------
# Costs, budgets, refusal.

@pytest.mark.parametrize("family", QWEN)
def test_costs_are_recorded_and_the_planned_kv_is_the_peak(family):
    model, _, adapter = tiny(family)
    for settings in ({"cell": 1, "threshold": 0.2}, {"cell": 1, "selection": "random", "random_p": 0.5}):
        result = run(model, adapter, get_method("flex", low_res=LOW_PIXELS, **settings))
        cost = result.cost
        assert cost["selected_tokens"] > 0 and cost["look_again_tokens"] == 2 + len(adapter.token_ids(TRIES[0].question))
        assert cost["video_tokens"] == cost["low_res_tokens"] + cost["selected_tokens"]
        assert cost["kv_bytes_peak"] == cost["kv_bytes_planned"]
        assert cost["low_res_vision_s"] > 0 and cost["selection_s"] > 0


def test_budget_settings_split_the_budget_between_context_and_selection():
    geometry = Geometry(4, 4, 2, 32, 128, 512, 4)
    tokens = TokenCounts(20, 64, ((16, 2, 2),))
    assert method_class("flex").budget_settings(0.5, geometry, tokens) == {"low_res": 0.25, "budget": 0.25}
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
        method_class("flex").budget_settings(0.0, geometry, tokens)
    # The planner's estimate: text + a quarter of the video (low_res 0.25) + the budget's share of it.
    method = get_method("flex", budget=0.25)
    assert method.layer_tokens(geometry, tokens) == [20 + 16 + 16] * 4


def test_bad_settings_and_the_refused_family():
    for settings, message in (({"selection": "topk"}, "selection must be one of attention, random"),
                              ({"budget": 1.5}, "budget must be a fraction"), ({"cell": 0}, "cell must be >= 1"),
                              ({"low_res": 0}, "low_res must be > 0"), ({"rows": "all"}, "rows must be one of question, last"), ({"random_p": 2}, "random_p must be")):
        with pytest.raises(ValueError, match=message):
            get_method("flex", **settings)
    model, _, adapter = tiny("qwen2_5_vl")
    with pytest.raises(ValueError, match="select_layer 9 is not below the model's 2 layers"), \
            get_method("flex", select_layer=9).apply(model, adapter):
        pass
    model, _, adapter = tiny("llava_onevision")
    with pytest.raises(ValueError, match="flex needs M-RoPE positions .* llava_onevision has 1-D positions"), \
            get_method("flex").apply(model, adapter):
        pass
    with get_method("flex", low_res=1.0, budget=0.0).apply(model, adapter):  # the identity runs
        pass
