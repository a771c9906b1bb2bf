"""The notebooks run top to bottom in a fresh kernel, as a reader runs them, and are committed with outputs cleared.

Fine-tuning runs ``FLAMINGO_NOTEBOOK_STEPS`` steps (set short here); each notebook takes well under three minutes.
"""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def execute(notebook, cwd: Path) -> None:
    """Run every cell in a fresh kernel of this Python; raises CellExecutionError at the first cell that fails."""
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()


def test_the_notebooks_are_there():
    assert {p.name for p in NOTEBOOKS} == {"few_shot_prompting.ipynb", "fine_tuning.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_with_outputs_cleared(path):
    cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    assert cells and all(not c.outputs and c.execution_count is None for c in cells)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    monkeypatch.setenv("FLAMINGO_NOTEBOOK_STEPS", "20")
    notebook = nbformat.read(path, as_version=4)
    execute(notebook, tmp_path)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)  # every cell ran
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for c in code for o in c.outputs)


def test_a_failing_cell_fails_the_run(tmp_path):
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise ValueError('cell failed')")])
    with pytest.raises(CellExecutionError, match="cell failed"):
        execute(notebook, tmp_path)
