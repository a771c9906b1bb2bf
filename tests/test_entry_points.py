"""The README's main job and the shipped notebook run as documented."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_generates_and_the_reloaded_model_generates_the_same(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flamingo.demo", "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reloaded model generates the same: True" in result.stdout
    assert (tmp_path / "flamingo-tiny" / "model.safetensors").is_file()


def test_notebook_code_cells_run(tmp_path):
    notebook = json.loads((ROOT / "notebooks" / "few_shot.ipynb").read_text())
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec("".join(cell["source"]), namespace)  # noqa: S102 - our own notebook
    assert namespace["ids"].shape[1] > namespace["batch"]["input_ids"].shape[1]
