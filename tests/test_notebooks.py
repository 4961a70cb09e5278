"""The notebooks users open (.ipynb) say exactly what their reviewed sources (.py, jupytext percent) say.

Running them is pytest's job through nbmake (`--nbmake` in pyproject's addopts): each notebook is one
test item, executed with its CI-sized parameters.
"""

from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
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
