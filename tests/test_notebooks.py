"""The notebooks users open (.ipynb) say exactly what their reviewed sources (.py, jupytext percent) say,
and follow Colab's conventions (badge, GPU runtime, a literal-only parameters cell, the set-up cells).

Running them is pytest's job through nbmake (`--nbmake` in pyproject's addopts): each notebook is one
test item, executed with its CI-sized parameters; tests/test_notebooks_gpu_branch.py runs their GPU branch.
"""

import ast
import re
from pathlib import Path

import jupytext
import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))


def test_there_are_notebooks():
    assert [p.stem for p in SOURCES][:2] == ["00_setup", "01_data"]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_ipynb_matches_its_jupytext_source(source):
    expected = jupytext.read(source)
    notebook = source.with_suffix(".ipynb")
    assert notebook.exists(), f"{notebook} missing: run `jupytext --to ipynb {source}`"
    actual = nbformat.read(notebook, as_version=4)
    assert [(c.cell_type, c.source) for c in actual.cells] == [(c.cell_type, c.source) for c in expected.cells], (
        f"{notebook} is out of date: run `jupytext --to ipynb {source}`")


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_each_notebook_has_one_parameters_cell_before_its_code(source):
    cells = jupytext.read(source).cells
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
    first_code = next(i for i, c in enumerate(cells) if c.cell_type == "code")
    assert tagged == [first_code]


def github_repo() -> str:
    """The placeholder (or real) `owner/name` README defines once."""
    match = re.search(r"<!-- GITHUB_REPO = (\S+) -->", (REPO / "README.md").read_text())
    assert match, "README.md must define <!-- GITHUB_REPO = owner/name -->"
    return match.group(1)


def colab_url(repo: str, stem: str) -> str:
    return f"https://colab.research.google.com/github/{repo}/blob/main/notebooks/{stem}.ipynb"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_colab_conventions(source):
    notebook = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    assert notebook.metadata["accelerator"] == "GPU" and notebook.metadata["colab"]["gpuType"]
    first = notebook.cells[0]
    repo = github_repo()
    assert first.cell_type == "markdown" and f"(https://colab.research.google.com/assets/colab-badge.svg)]" \
        f"({colab_url(repo, source.stem)})" in first.source
    assert colab_url(repo, source.stem) in (REPO / "README.md").read_text()
    assert "**Needs" in first.source and "**Writes" in first.source  # what it needs from earlier notebooks


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_parameters_are_literals_and_setup_comes_next(source):
    """papermill can override every value: the parameters cell holds `NAME = literal` lines only."""
    cells = [c for c in jupytext.read(source).cells if c.cell_type == "code"]
    parameters = {}
    for statement in ast.parse(cells[0].source).body:
        assert isinstance(statement, ast.Assign) and len(statement.targets) == 1, ast.unparse(statement)
        parameters[statement.targets[0].id] = ast.literal_eval(statement.value)
    assert parameters["DUOKIT_REPO"] == f"https://github.com/{github_repo()}"
    assert parameters["MOUNT_DRIVE"] is True
    assert "colab_setup(" in cells[1].source and "pip\", \"install\"" in cells[1].source


def notebook_parameters(stem: str) -> dict:
    cells = [c for c in jupytext.read(NOTEBOOKS / f"{stem}.py").cells if c.cell_type == "code"]
    return {s.targets[0].id: ast.literal_eval(s.value) for s in ast.parse(cells[0].source).body}


def test_gpu_gate_recipe_and_deploy_window_agree_across_02_03_04_and_the_gpu_example():
    """02 trains the pattern 03 and 04 deploy, with train-duo's defaults; 04 trains the same when 02 left none,
    as `duokit ablate --example gpu` does; all deploy the same window."""
    import yaml

    from duokit.ablate import example_text
    from duokit.methods.duo.train import TrainSettings

    train, evaluate, ablation = (notebook_parameters(stem) for stem in ("02_train_duo", "03_eval_vnbench",
                                                                        "04_ablations"))
    example = yaml.safe_load(example_text("gpu"))
    defaults = TrainSettings(model=train["MODEL"])
    gates = {"steps": train["STEPS"], "frames": train["FRAMES"], "sink": train["SINK"], "recent": train["RECENT"]}
    assert gates == {"steps": defaults.steps, "frames": list(defaults.frames), "sink": defaults.sink,
                     "recent": defaults.recent}
    assert train["FRAME_SIZE"] == list(defaults.frame_size)
    assert example["prepare"]["duo_gates"] == gates == {key: ablation[f"GATE_{key.upper()}"] for key in gates}
    deployed = next(row for row in example["rows"] if row["name"] == "duo")["settings"]
    assert (evaluate["SINK"], evaluate["RECENT"]) == (ablation["SINK"], ablation["RECENT"]) == (
        deployed["sink"], deployed["recent"])
    assert train["MODEL"] == evaluate["MODEL"] == ablation["MODEL"] == example["model"]
    assert (ablation["FRAMES"], ablation["PER_TASK"]) == (example["frames"], example["per_task"])
