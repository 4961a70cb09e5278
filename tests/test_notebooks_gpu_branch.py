"""The notebooks' GPU branch, run on CPU: papermill executes 00 → 01 → 02 → 03 with `ON_CPU="as-is"` and tiny
models, so the code a GPU runtime runs (VNBench from Drive, a hub-style model id, the report) runs here too.

As on Colab: everything lives under one root (the "Drive"), `DUOKIT_ROOT`; VNBench's annotations and zip are
already on it with their integrity record, as a first download leaves them, so 01 only unpacks the zip to
the VM's disk (`DUOKIT_LOCAL`) — and 03, started on a "new VM" (another local folder), unpacks it again. The
defaults chain: 02 writes the pattern where 03 looks for it, 01 the data. (The CPU setting of every notebook
is nbmake's test, with the notebooks' own defaults.)
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from duokit.data import manifest as mf
from duokit.data.synth.generate import SynthConfig, Synthesizer
from duokit.data.synth.writer import write_synth_set
from duokit.io import atomic_write_json, read_json

papermill = pytest.importorskip("papermill")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
TINY = "tiny:qwen2_5_vl"
GPU_BRANCH = {"ON_CPU": "as-is", "MOUNT_DRIVE": False}
PARAMETERS = {
    "00_setup": {},
    "01_data": {"SOURCE": "vnbench", "FRAME_BUDGETS": [4, 8]},
    "02_train_duo": {"MODEL": TINY, "STEPS": 2, "SAVE_EVERY": 1, "FRAMES": [8], "FRAME_SIZE": [56, 56],
                     "NEEDLES": [1, 2], "SINK": 4, "RECENT": 8},
    "03_eval_vnbench": {"MODEL": TINY, "DATASET": "vnbench", "FRAMES": 8, "PER_TASK": 1, "SINK": 4, "RECENT": 8},
}


def seed_vnbench_on_drive(data: Path, scratch: Path) -> int:
    """ROOT/data/vnbench as `duokit data fetch` leaves it after the first download: annotations file, the
    videos' zip (VNBench_new/…) and the integrity record (their sha256). Returns the number of samples."""
    synth = scratch / "synth"
    write_synth_set(Synthesizer(SynthConfig(per_task=1, seconds=(12.0, 12.0), size=(64, 48), split="eval", seed=3)),
                    synth, progress=False)
    manifest = mf.load_manifest()
    records = read_json(synth / "annotations.json")
    annotations = atomic_write_json(data / manifest.annotations.filename, records)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for video in sorted((synth / "videos").iterdir()):
            archive.write(video, f"{manifest.videos.extract_to}/{video.name}")
    zip_path = data / manifest.videos.filename
    zip_path.write_bytes(buffer.getvalue())
    atomic_write_json(data / mf.INTEGRITY_FILE, {
        "annotations": {"file": annotations.name, "sha256": mf.sha256_of(annotations)},
        "videos": {"zip": zip_path.name, "zip_sha256": mf.sha256_of(zip_path)}})
    return len({record["video"] for record in records})


def execute(name: str, tmp_path: Path) -> dict:
    """Run one notebook with its GPU-branch parameters; returns the executed notebook (JSON)."""
    out = tmp_path / f"{name}.out.ipynb"
    papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(out), parameters={**GPU_BRANCH, **PARAMETERS[name]},
                               cwd=str(tmp_path), kernel_name="python3", progress_bar=False,
                               execution_timeout=600)
    return json.loads(out.read_text())


def printed(notebook: dict) -> str:
    return "".join("".join(output.get("text", "")) for cell in notebook["cells"] for output in cell.get("outputs", []))


@pytest.mark.slow
def test_gpu_branch_chain_on_cpu(tmp_path, monkeypatch):
    root, vm1, vm2 = tmp_path / "drive" / "duokit", tmp_path / "vm1", tmp_path / "vm2"
    monkeypatch.setenv("DUOKIT_ROOT", str(root))  # the kernels papermill starts inherit the environment
    monkeypatch.setenv("DUOKIT_LOCAL", str(vm1))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    samples = seed_vnbench_on_drive(root / "data" / "vnbench", tmp_path / "scratch")

    setup = printed(execute("00_setup", tmp_path))
    assert f"duokit root: {root}" in setup and "transformers: " in setup
    assert all((root / folder).is_dir() for folder in ("data", "runs", "patterns"))

    data = printed(execute("01_data", tmp_path))
    assert "No GPU: CPU recipe" not in data  # the GPU branch ran
    assert f"{samples} samples" in data and (root / "data" / "vnbench" / "coverage.png").is_file()
    assert len(list((vm1 / "vnbench" / "VNBench_new").iterdir())) == samples  # unpacked on the VM's disk
    assert not (root / "data" / "vnbench" / "VNBench_new").exists()

    train = printed(execute("02_train_duo", tmp_path))
    assert f"pattern for 03: {root / 'patterns' / 'tiny-qwen2_5_vl'}" in train
    assert read_json(root / "runs" / "train_duo-tiny-qwen2_5_vl" / "pattern" / "config.json")["steps_done"] == 2
    assert (root / "patterns" / "tiny-qwen2_5_vl" / "full_attention_heads.tsv").read_bytes() == (
        root / "runs" / "train_duo-tiny-qwen2_5_vl" / "pattern" / "full_attention_heads.tsv").read_bytes()

    monkeypatch.setenv("DUOKIT_LOCAL", str(vm2))  # 03 on a new VM: the videos come from the zip on Drive
    evaluation = printed(execute("03_eval_vnbench", tmp_path))
    assert "No GPU: CPU recipe" not in evaluation
    assert len(list((vm2 / "vnbench" / "VNBench_new").iterdir())) == samples
    runs = root / "runs" / "eval-tiny-qwen2_5_vl-vnbench"
    results = read_json(runs / "report" / "results.json")
    assert [row["label"] for row in results["methods"]] == ["eval-tiny-qwen2_5_vl-vnbench/baseline",
                                                           "eval-tiny-qwen2_5_vl-vnbench/duo-0.5"]
    for row in results["methods"]:  # the printed table is the runs' own numbers
        summary = read_json(runs / row["method"] / "summary.json")
        assert row["overall"] == summary["scores"]["overall"]
        assert f"{100 * row['overall']:.1f}" in evaluation
    assert (runs / "report" / "plots" / "accuracy_kv.png").is_file()

    predictions = {name: (runs / name / "predictions.jsonl").read_bytes() for name in ("baseline", "duo-0.5")}
    execute("03_eval_vnbench", tmp_path)  # a re-run after a disconnect: every sample is found done
    assert {name: (runs / name / "predictions.jsonl").read_bytes() for name in predictions} == predictions
    assert read_json(runs / "report" / "results.json")["methods"] == results["methods"]
