"""duokit.report: rows read back from eval run directories, the table, results.md/json and the plots
(the end-to-end use is tests/test_demo.py and notebook 03)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from duokit import report
from duokit.data.vnbench import SUBTASKS
from duokit.io import atomic_write_json, read_json

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_eval_run(folder: Path, overall: float, kv_bytes: float, growth: list[int], n_errors: int = 0) -> Path:
    """An eval run directory as `duokit eval` leaves it: summary.json + predictions.jsonl (4 tries each)."""
    subtasks = {name: {"accuracy": overall, "n_samples": 1} for name in SUBTASKS}
    summary = {
        "scores": {"overall": overall, "overall_1try": min(1.0, overall + 0.1), "n_samples": len(growth),
                   "n_unparsed": 0, "families": {"ret": overall, "ord": overall / 2, "cnt": 0.0},
                   "subtasks": subtasks},
        "cost": {"n_samples": len(growth), "n_errors": n_errors, "kv_bytes": kv_bytes,
                 "peak_memory_bytes_max": 3 * 2**20, "peak_memory_exact": False, "prefill_s": 0.25,
                 "decode_s_per_token": 0.002, "prefix_tokens": 70.0},
    }
    atomic_write_json(folder / "summary.json", summary)
    lines = [json.dumps({"sample_id": f"s{i}", "try": t, "cost": {"peak_memory_growth_bytes": g} if t == 0 else None})
             for i, g in enumerate(growth) for t in range(4)]
    (folder / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def rows(tmp_path):
    baseline = fake_eval_run(tmp_path / "baseline", 0.5, 2 * 2**20, [2**20, 3 * 2**20, 5 * 2**20])
    duo = fake_eval_run(tmp_path / "duo-0.5", 0.25, 2**20, [2**20, 2**20], n_errors=1)
    return [report.eval_row(baseline, "baseline"), report.eval_row(duo, "duo 50%", 0.5, {"sparsity": 0.5})]


def test_rows_are_the_run_files_numbers(rows):
    baseline, duo = rows
    assert (baseline["method"], baseline["label"], baseline["streaming_heads"]) == ("baseline", "baseline", 0.0)
    assert (baseline["overall"], baseline["overall_1try"], baseline["kv_bytes"]) == (0.5, 0.6, 2 * 2**20)
    assert baseline["peak_growth_bytes_median"] == 3 * 2**20  # median of the per-sample growth, not the max
    assert duo["subtasks"] == dict.fromkeys(SUBTASKS, 0.25)
    assert (duo["n_errors"], duo["settings"]) == (1, {"sparsity": 0.5})


def test_text_table(rows):
    lines = report.text_table(rows).splitlines()
    assert lines[0].split("  ")[0].strip() == "method" and lines[0].rstrip().endswith("errors")
    assert lines[1].split() == ["baseline", "0", "50.0", "60.0", "50.0", "25.0", "0.0", "2.0000", "3.00", "0.2500",
                                "2.00", "0"]
    assert lines[2].split()[:4] == ["duo", "50%", "50", "25.0"] and lines[2].split()[-1] == "1"


def test_write_report(rows, tmp_path):
    paths = report.write_report(tmp_path / "out", "Baseline vs duo", "Some intro.", rows, {"config": {"frames": 8}})
    text = (tmp_path / "out" / "results.md").read_text()
    assert text.startswith("# Baseline vs duo\n\nSome intro.\n\n| method |")
    assert "| duo 50% | 50 | 25.0 |" in text and "![latency](plots/latency.png)" in text
    saved = read_json(paths["results.json"])
    assert saved["config"] == {"frames": 8} and [r["label"] for r in saved["methods"]] == ["baseline", "duo 50%"]
    for name in report.PLOTS:
        assert paths[name] == tmp_path / "out" / "plots" / f"{name}.png"
        assert paths[name].read_bytes().startswith(PNG_SIGNATURE)


def test_finished_runs_and_their_rows(rows, tmp_path):
    atomic_write_json(tmp_path / "baseline" / "config.json", {"method": {"name": "baseline"}})
    atomic_write_json(tmp_path / "duo-0.5" / "config.json", {"method": {"name": "duo", "sparsity": 0.5}})
    (tmp_path / "unfinished").mkdir()
    atomic_write_json(tmp_path / "unfinished" / "config.json", {"method": {"name": "baseline"}})
    runs = report.finished_runs(tmp_path)
    assert runs == [tmp_path / "baseline", tmp_path / "duo-0.5"]
    again = report.run_rows(runs)
    assert [(r["label"], r["streaming_heads"]) for r in again] == [("baseline", 0.0), ("duo-0.5", 0.5)]
    assert [r["overall"] for r in again] == [r["overall"] for r in rows]


def test_coverage_plot(tmp_path):
    path = report.plot_coverage([8, 16, 32], [0.2, 0.6, 1.0], tmp_path / "coverage.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(ValueError, match="one share per frame budget, got 3 budgets and 2 shares"):
        report.plot_coverage([8, 16, 32], [0.2, 0.6], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_unfinished_or_failed_runs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing/summary.json: no summary; run \(or resume\)"):
        report.eval_row(tmp_path / "nothing", "x")
    failed = tmp_path / "failed"
    atomic_write_json(failed / "summary.json", {"scores": {"n_samples": 0}, "cost": {"n_samples": 0, "n_errors": 3}})
    with pytest.raises(ValueError, match=r"no sample finished without an error \(3 failed\).*predictions.jsonl"):
        report.eval_row(failed, "x")
    with pytest.raises(ValueError, match="at least one finished run"):
        report.write_report(tmp_path / "empty", "t", "i", [])


def test_every_row_of_a_large_ablation_gets_its_own_colour_and_marker():
    from duokit.report import _colors

    styles = _colors([{"row": f"row{k}"} for k in range(30)])
    assert len(set(styles.values())) == 30
