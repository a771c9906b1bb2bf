"""The notebooks the README names are committed with the outputs of one top-to-bottom run of their current cells, so
that a code host shows them with their plots, and they still run: each runs again here in a fresh kernel, from memory,
in a temporary working folder, so that nothing is written beside them (together about 3 CPU minutes).

Only the notebooks the README names are tested, not whatever ``notebooks/*.ipynb`` holds: an executed copy saved
there (``jupyter nbconvert --execute`` writes ``X.nbconvert.ipynb`` beside ``X.ipynb``) is not a notebook of the
repository, and a glob would count it, check its outputs and run it too.

Fine-tuning runs ``FLAMINGO_NOTEBOOK_STEPS=20`` steps here. After changing a notebook's code, store the outputs of
its default run (150 fine-tuning steps; about a CPU minute for that notebook)::

    .venv/bin/python tests/test_notebooks.py [few_shot_prompting fine_tuning]

Code cells tagged ``same-output`` must print the same text in every run (the micro model's size, tensor shapes):
their stored outputs are compared with the fresh run's, so that the figures a reader sees are the model's own.
"""

import hashlib
import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
SAME_OUTPUT = "same-output"
MAX_BYTES = 400_000  # room for a notebook's figures, not for a training log or a widget dump


def notebooks_of(root: Path) -> list[Path]:
    """The notebooks ``root/README.md`` names (as `notebooks/NAME.ipynb`)."""
    names = re.findall(r"`(notebooks/[\w.-]+\.ipynb)`", (root / "README.md").read_text())
    return [root / name for name in sorted(set(names))]


NOTEBOOKS = notebooks_of(ROOT)


def execute(notebook, cwd: Path, *, timeout: int | None = 900) -> None:
    """Run every cell in a fresh kernel of this Python, each for at most ``timeout`` seconds; raises
    CellExecutionError at the first cell that fails."""
    NotebookClient(notebook, timeout=timeout, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(cwd)}}).execute()


def code_cells(notebook) -> list:
    return [c for c in notebook.cells if c.cell_type == "code"]


def sources_digest(notebook) -> str:
    """Identifies the code the stored outputs came from (markdown may change without a rerun)."""
    return hashlib.sha256(json.dumps([c.source for c in code_cells(notebook)]).encode()).hexdigest()


def as_displayed(text: str) -> str:
    """``text`` as a terminal or Jupyter shows it: each line as its last carriage return left it."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def tidy(outputs: list) -> list:
    """The outputs worth storing: printed text (consecutive prints joined, as displayed), results and figures.

    Left out: stderr, which holds progress bars (tqdm redraws each a hundred times, nested ones with cursor moves)
    and warnings of the machine that ran it; and widgets (tqdm.auto's bars where ipywidgets is installed), whose
    state is not stored, so that a code host would show each bar at 0%.
    """
    kept = []
    for output in outputs:
        if output.output_type == "stream" and output.name == "stderr":
            continue
        if "application/vnd.jupyter.widget-view+json" in output.get("data", {}):
            continue
        if output.output_type == "stream" and kept and kept[-1].output_type == "stream":
            kept[-1].text += output.text
        else:
            kept.append(output)
    for output in kept:
        if output.output_type == "stream":
            output.text = as_displayed(output.text)
    return kept


def stdout(cell) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def test_the_notebooks_are_the_ones_the_readme_names():
    assert {p.name for p in NOTEBOOKS} == {"few_shot_prompting.ipynb", "fine_tuning.ipynb"}
    assert all(p.is_file() for p in NOTEBOOKS)


def test_an_executed_copy_beside_a_notebook_is_not_tested(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "README.md").write_text("Open `notebooks/demo.ipynb`; `flamingo/` is the library.")
    for name in ("demo.ipynb", "demo.nbconvert.ipynb", "demo-executed.ipynb"):
        nbformat.write(nbformat.v4.new_notebook(), tmp_path / "notebooks" / name)
    assert notebooks_of(tmp_path) == [tmp_path / "notebooks" / "demo.ipynb"]


def test_stored_outputs_leave_out_progress_bars_and_widgets():
    bar = [nbformat.v4.new_output("stream", name="stderr", text=t) for t in ("\rbar  0%", "\rbar 50%", "\rbar 100%\n")]
    printed = [nbformat.v4.new_output("stream", name="stdout", text=t) for t in ("step 1\rstep 2\n", "done\n")]
    widget = nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "x", "version_major": 2, "version_minor": 0},
        "text/plain": "train:   0%|          | 0/400"})
    figure = nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"})
    stored = tidy([bar[0], printed[0], widget, bar[1], printed[1], bar[2], figure])
    assert [(o.output_type, o.get("text")) for o in stored] == [("stream", "step 2\ndone\n"), ("display_data", None)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_with_the_outputs_of_its_current_cells(path):
    notebook = nbformat.read(path, as_version=4)
    code = code_cells(notebook)
    store = f"store fresh ones with `.venv/bin/python tests/test_notebooks.py {path.stem}`"
    assert notebook.metadata.get("flamingo", {}).get("outputs_of") == sources_digest(notebook), (
        f"{path.name}: its code changed since its outputs were stored; {store}")
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), (
        f"{path.name}: its outputs are not those of one top-to-bottom run (saved from JupyterLab?); {store}")
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type == "display_data" and "image/png" in o.data for o in outputs)
    assert not [o for o in outputs if o.output_type == "stream" and (o.name == "stderr" or "\r" in o.text)]
    assert {mime for o in outputs for mime in o.get("data", {})} <= {"text/plain", "image/png"}
    assert "widgets" not in notebook.metadata
    assert path.stat().st_size < MAX_BYTES


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom_and_prints_its_stored_figures(path, tmp_path, monkeypatch):
    monkeypatch.setenv("FLAMINGO_NOTEBOOK_STEPS", "20")
    stored = nbformat.read(path, as_version=4)
    notebook = nbformat.read(path, as_version=4)
    execute(notebook, tmp_path)
    code = code_cells(notebook)
    assert all(c.execution_count for c in code)  # every cell ran
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for c in code for o in c.outputs)
    assert list(tmp_path.iterdir()) == []  # the notebooks write to folders of their own, never where they run
    for old, new in zip(code_cells(stored), code):
        if SAME_OUTPUT in old.metadata.get("tags", []):
            assert stdout(new) and stdout(new) == stdout(old), f"{path.name}: a `{SAME_OUTPUT}` cell printed otherwise"


def test_the_few_shot_notebook_checks_the_figures_it_states():
    """The micro model's size and its visual tokens per image are printed by cells whose output is checked."""
    cells = code_cells(nbformat.read(ROOT / "notebooks/few_shot_prompting.ipynb", as_version=4))
    checked = "".join(stdout(c) for c in cells if SAME_OUTPUT in c.metadata.get("tags", []))
    assert re.search(r"[\d,]+ parameters, [\d,]+ of them trained", checked)
    assert "perceiver: " in checked and "visual tokens: (1, 3, " in checked


def test_a_failing_cell_fails_the_run(tmp_path):
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise ValueError('cell failed')")])
    with pytest.raises(CellExecutionError, match="cell failed"):
        execute(notebook, tmp_path)


def store_outputs(path: Path, work: Path) -> None:
    """Run ``path`` as a reader would (default settings) and write it back with its tidied outputs."""
    notebook = nbformat.read(path, as_version=4)
    execute(notebook, work, timeout=None)  # the full run: minutes, more on a busy machine
    for cell in code_cells(notebook):
        cell.outputs = tidy(cell.outputs)
    notebook.metadata.pop("widgets", None)  # the state of the widgets left out
    notebook.metadata["flamingo"] = {"outputs_of": sources_digest(notebook)}
    nbformat.write(notebook, path)
    print(f"stored the outputs of {path.relative_to(ROOT)} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    import os
    import tempfile

    os.environ.pop("FLAMINGO_NOTEBOOK_STEPS", None)
    wanted = set(sys.argv[1:]) or {p.stem for p in NOTEBOOKS}
    if unknown := wanted - {p.stem for p in NOTEBOOKS}:
        sys.exit(f"no such notebook: {', '.join(sorted(unknown))}; the README's are {[p.stem for p in NOTEBOOKS]}")
    for notebook_path in NOTEBOOKS:
        if notebook_path.stem in wanted:
            with tempfile.TemporaryDirectory() as folder:
                store_outputs(notebook_path, Path(folder))
