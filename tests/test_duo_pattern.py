"""DuoAttention patterns: the official file format, the official binarisation rule, clear errors, the CLI."""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace

import numpy as np
import pytest

from duokit.cli import main
from duokit.methods.base import get_method
from duokit.methods.duo.pattern import (
    CONFIG_FILE,
    GATES_FILE,
    Pattern,
    binarize,
    load_pattern,
    retrieval_heads_per_layer,
    save_pattern,
)
from duokit.models.base import Geometry, TokenCounts


def official_rule(gates: np.ndarray, sparsity: float) -> np.ndarray:
    """`sparsify_attention_heads` as the official duo_attn/utils.py defines it, after the official
    `seed_everything(42)`: global-RNG noise U(0, 1e-6), the linear `sparsity` quantile over all heads,
    retrieval iff gate >= threshold. The quantile is interpolated by hand, not with np.quantile."""
    np.random.seed(42)
    noisy = gates + np.random.uniform(0, 1e-6, gates.shape)
    ordered = np.sort(noisy.ravel())
    rank = sparsity * (ordered.size - 1)
    low = math.floor(rank)
    high = min(low + 1, ordered.size - 1)
    threshold = ordered[low] + (rank - low) * (ordered[high] - ordered[low])
    return noisy >= threshold


def official_shaped_gates(seed: int = 7) -> np.ndarray:
    """32 layers x 8 KV heads (Llama-3-8B), GQA-like: mostly near 1, a few near 0, many ties."""
    rng = np.random.default_rng(seed)
    gates = np.clip(rng.beta(5, 1, size=(32, 8)), 0, 1)
    gates[rng.random((32, 8)) < 0.2] = 1.0  # exact ties, as clipped trained gates have
    return np.round(gates, 3)


@pytest.mark.parametrize("sparsity", [0.5, 0.25, 0.75, 0.1, 0.2, 0.6])
def test_official_shaped_pattern_selects_the_official_heads(sparsity):
    gates = official_shaped_gates()
    retrieval, achieved = binarize(gates, sparsity)
    expected = official_rule(gates, sparsity)
    assert retrieval.shape == (32, 8)
    assert np.array_equal(retrieval, expected)
    assert achieved == pytest.approx(1 - expected.mean())


def test_half_sparsity_keeps_exactly_half_the_heads_despite_ties():
    gates = np.ones((32, 8))  # every gate tied: only the noise decides
    retrieval, achieved = binarize(gates, 0.5)
    assert retrieval.sum() == 128 and achieved == 0.5
    assert np.array_equal(retrieval, binarize(gates, 0.5)[0])  # deterministic


def test_extreme_sparsities_and_per_layer_rule():
    gates = official_shaped_gates()
    assert binarize(gates, 0.0)[0].all()
    assert not binarize(gates, 1.0)[0].any()
    per_layer, achieved = binarize(gates, 0.5, per_layer=True)
    assert (per_layer.sum(axis=1) == 4).all() and achieved == 0.5
    assert retrieval_heads_per_layer(np.array([[True, False, True], [False, False, False]])) == [[0, 2], []]


@pytest.mark.parametrize("sparsity", [-0.1, 1.5, float("nan")])
def test_sparsity_out_of_range_is_refused(sparsity, tmp_path):
    with pytest.raises(ValueError, match=r"sparsity must be a fraction"):
        binarize(np.ones((2, 2)), sparsity)
    save_pattern(tmp_path, np.ones((2, 2)), 128, 256)
    with pytest.raises(ValueError, match=r"sparsity must be a fraction"):
        get_method("duo", pattern=str(tmp_path), sparsity=sparsity)


def test_round_trip_writes_what_the_official_code_writes(tmp_path):
    gates = official_shaped_gates()
    save_pattern(tmp_path, gates, sink_size=128, recent_size=256, lr=0.02)
    official = io.StringIO()
    np.savetxt(official, np.array(gates.tolist()), delimiter="\t")  # `save_full_attention_heads`
    assert (tmp_path / GATES_FILE).read_text() == official.getvalue()
    assert json.loads((tmp_path / CONFIG_FILE).read_text()) == {"lr": 0.02, "sink_size": 128, "recent_size": 256}
    pattern = load_pattern(tmp_path)
    assert np.array_equal(pattern.gates, gates)
    assert (pattern.sink_size, pattern.recent_size, pattern.shape) == (128, 256, (32, 8))


def test_load_clips_like_the_official_loader(tmp_path):
    # Shipped TSVs hold bf16 gates such as -1.4e-03 (the official attn_patterns/).
    (tmp_path / GATES_FILE).write_text("9.9e-01\t-1.4e-03\n1.0000000000000002e+00\t5.0e-01\n")
    (tmp_path / CONFIG_FILE).write_text('{"sink_size": 128, "recent_size": 256, "deploy_sink_size": null}')
    assert load_pattern(tmp_path).gates.tolist() == [[0.99, 0.0], [1.0, 0.5]]


def test_single_row_and_single_column_patterns_keep_their_shape(tmp_path):
    for shape in [(1, 4), (4, 1)]:
        save_pattern(tmp_path / str(shape), np.full(shape, 0.5), 4, 8)
        assert load_pattern(tmp_path / str(shape)).shape == shape


def test_missing_and_broken_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=GATES_FILE):
        load_pattern(tmp_path)
    (tmp_path / GATES_FILE).write_text("0.5\tx\n")
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        load_pattern(tmp_path)
    (tmp_path / CONFIG_FILE).write_text('{"sink_size": 128}')
    with pytest.raises(ValueError, match=f"{GATES_FILE}: not a tab-separated"):
        load_pattern(tmp_path)
    (tmp_path / GATES_FILE).write_text("0.5\t0.5\n")
    with pytest.raises(ValueError, match=f"{CONFIG_FILE}: missing recent_size"):
        load_pattern(tmp_path)


def test_shape_mismatch_names_the_file_and_both_shapes(tmp_path):
    save_pattern(tmp_path, np.ones((32, 8)), 128, 256)
    with pytest.raises(ValueError) as err:
        load_pattern(tmp_path).check_shape(28, 4)
    message = str(err.value)
    assert str(tmp_path / GATES_FILE) in message and "(32, 8)" in message and "(28, 4)" in message
    Pattern(np.ones((2, 2)), 1, 1).check_shape(2, 2)


def test_duo_method_needs_a_pattern(tmp_path):
    with pytest.raises(ValueError, match="pattern directory"):
        get_method("duo")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'missing' / GATES_FILE}: missing"):
        get_method("duo", pattern=str(tmp_path / "missing"))


def test_settings_identify_the_gates_not_only_the_directory(tmp_path):
    save_pattern(tmp_path, [[0.9, 0.1], [0.8, 0.7]], 128, 256)
    first = get_method("duo", pattern=str(tmp_path), sparsity=0.5).settings()
    assert first["pattern"] == str(tmp_path) and first["sparsity"] == 0.5 and first["sink"] == 64
    assert get_method("duo", pattern=str(tmp_path), sparsity=0.5).settings() == first
    save_pattern(tmp_path, [[0.9, 0.1], [0.8, 0.6]], 128, 256)  # retrained into the same directory
    assert get_method("duo", pattern=str(tmp_path), sparsity=0.5).settings()["pattern_sha256"] != first["pattern_sha256"]


def test_estimate_kv_bytes_is_the_analytic_formula(tmp_path):
    save_pattern(tmp_path, [[0.9, 0.1], [0.8, 0.7]], 128, 256)
    method = get_method("duo", pattern=str(tmp_path), sparsity=0.5, sink=64, recent=256)
    # Retrieval heads: layer 0 head 0, layer 1 head 0 (gate 0.8 > 0.7): 2 full heads, 2 streaming heads.
    geometry = Geometry(num_layers=2, num_heads=2, num_kv_heads=2, head_dim=128, hidden_size=256,
                        intermediate_size=512, dtype_bytes=2)
    for tokens in (100, 320, 321, 322, 5000):  # a streaming head's ring buffer: sink + recent + 1 = 321 slots
        expected = 2 * 128 * 2 * (2 * tokens + 2 * min(tokens, 64 + 256 + 1))
        assert method.estimate_kv_bytes(geometry, TokenCounts(text=tokens - 30, video=30)) == expected
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(3, 2\)"):
        method.estimate_kv_bytes(replace(geometry, num_layers=3), TokenCounts(10))


def test_prefill_flops_count_the_streaming_window(tmp_path):
    """Streaming heads score each query against min(p + 1, sink + recent + 1) keys; the rest is dense."""
    geometry = Geometry(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=32,
                        intermediate_size=64, dtype_bytes=4)
    save_pattern(tmp_path, [[0.9, 0.1], [0.8, 0.7]], 128, 256)
    tokens = [100, 100]
    dense = get_method("baseline").estimate_prefill_flops(geometry, tokens)
    assert get_method("duo", pattern=str(tmp_path), sparsity=0.0).estimate_prefill_flops(geometry, tokens) == dense
    duo = get_method("duo", pattern=str(tmp_path), sparsity=0.5, sink=4, recent=10)
    costs = duo.estimate_prefill_flops(geometry, tokens)
    assert costs["mlp_flops"] == dense["mlp_flops"] == 2 * 6 * 100 * 32 * 64
    window_pairs = sum(min(p + 1, 4 + 10 + 1) for p in range(100))
    # One streaming KV head per layer, 2 query heads each: their pairs shrink from causal to the window;
    # a pair costs 4·head_dim per query head (q·k and the weighted v, a multiply-add counting 2).
    saved = 4 * 8 * 2 * (100 * 101 // 2 - window_pairs)
    assert costs["attention_flops"] == dense["attention_flops"] - 2 * saved


def test_cli_pattern_show_json(tmp_path, capsys):
    gates = official_shaped_gates()
    save_pattern(tmp_path, gates, 128, 256)
    assert main(["pattern", "show", str(tmp_path), "--sparsity", "0.5", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["retrieval"] == [np.flatnonzero(row).tolist() for row in official_rule(gates, 0.5)]
    assert (summary["num_layers"], summary["num_kv_heads"], summary["achieved_sparsity"]) == (32, 8, 0.5)
    assert main(["pattern", "show", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "32 layers x 8 KV heads" in text and "layer  31" in text


def test_cli_pattern_show_errors(tmp_path, capsys):
    assert main(["pattern", "show", str(tmp_path / "missing")]) == 1
    assert "full_attention_heads.tsv: missing" in capsys.readouterr().err
