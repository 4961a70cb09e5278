"""Notebook 04's GPU branch, run on CPU: papermill executes it with `ON_CPU="as-is"`, a tiny Qwen2.5-VL and
VNBench on the "Drive" (as tests/test_notebooks_gpu_branch.py does for 01-03), so the code a GPU runtime
runs — VNBench unpacked from Drive, a pattern from 02's folder, the standard config with controls, the plan,
the resumable run, the table and plots — runs here too. Only the registered methods are named (the GPU
default names all five; a missing one is refused, tests/test_ablate.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_notebooks_gpu_branch import NOTEBOOKS, TINY, printed, seed_vnbench_on_drive

from duokit.io import read_json
from duokit.methods.duo.pattern import save_pattern
from duokit.models import DEFAULT_MAX_PIXELS

papermill = pytest.importorskip("papermill")

PARAMETERS = {"ON_CPU": "as-is", "MOUNT_DRIVE": False, "MODEL": TINY, "DATASET": "vnbench", "FRAMES": 8,
              "PER_TASK": 1, "BUDGETS": [0.5], "METHODS": ["duo", "llavolta"], "LLAVOLTA_LAYER": 1, "SINK": 4,
              "RECENT": 8}


def execute(tmp_path) -> dict:
    out = tmp_path / "04.out.ipynb"
    papermill.execute_notebook(str(NOTEBOOKS / "04_ablations.ipynb"), str(out), parameters=PARAMETERS,
                               cwd=str(tmp_path), kernel_name="python3", progress_bar=False, execution_timeout=900)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_04_gpu_branch_on_cpu(tmp_path, monkeypatch):
    root = tmp_path / "drive" / "duokit"
    monkeypatch.setenv("DUOKIT_ROOT", str(root))
    monkeypatch.setenv("DUOKIT_LOCAL", str(tmp_path / "vm"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    samples = seed_vnbench_on_drive(root / "data" / "vnbench", tmp_path / "scratch")
    # 02's pattern for the tiny model (2 layers x 2 KV heads), where 04 looks for it.
    save_pattern(root / "patterns" / "tiny-qwen2_5_vl", np.random.default_rng(0).random((2, 2)), sink_size=4,
                 recent_size=8)

    text = printed(execute(tmp_path))
    assert "No GPU: CPU recipe" not in text and "estimated time:" in text
    run = root / "runs" / "ablate-tiny-qwen2_5_vl-vnbench"
    results = read_json(run / "results.json")
    cells = [f"{c['row']}/{c['cell']}" for c in results["cells"]]
    assert cells == ["baseline/settings", "duo/rho0.5", "llavolta/rho0.5", "llavolta_duo/settings",
                     "fewer_frames/rho0.5", "lower_resolution/rho0.5", "random_drop/rho0.5",
                     *(f"duo_random_heads/rho0.5-random_heads{k}" for k in range(3))]
    for cell in results["cells"]:
        summary = read_json(run / "cells" / cell["row"] / cell["cell"] / "summary.json")
        assert summary["scores"]["n_samples"] == samples and cell["overall"] == summary["scores"]["overall"]
    assert read_json(run / "cells/duo/rho0.5/config.json")["method"]["pattern"] == str(
        root / "patterns" / "tiny-qwen2_5_vl")
    # Half the pixels per frame asked of the processor; these 64x48 videos are below either cap, so the
    # control achieves the full budget, and the table says so (measured, not taken from the mapping).
    lower = next(c for c in results["cells"] if c["row"] == "lower_resolution")
    assert read_json(run / "cells/lower_resolution/rho0.5/config.json")["max_pixels"] == DEFAULT_MAX_PIXELS // 2
    assert lower["preprocessing"]["pixels_per_frame"] == results["cells"][0]["preprocessing"]["pixels_per_frame"]
    assert lower["budget_achieved_kv"] == pytest.approx(1.0)
    assert (run / "plots" / "accuracy_budget.png").is_file() and "KV ach." in text

    predictions = {path: path.read_bytes() for path in run.glob("cells/*/*/predictions.jsonl")}
    execute(tmp_path)  # a re-run after a disconnect: every cell is found done
    assert {path: path.read_bytes() for path in predictions} == predictions
