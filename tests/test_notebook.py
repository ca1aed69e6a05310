"""The example notebooks (train_kernel, digits_cnn) run top to bottom in a fresh Jupyter kernel against
their own server."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "train_kernel.ipynb"
DIGITS = ROOT / "examples" / "digits_cnn.ipynb"


@pytest.mark.parametrize("path", [NOTEBOOK, DIGITS], ids=lambda p: p.name)
def test_the_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, cell.source[:60]


def _execute(path: Path, tmp_path, monkeypatch, backend: str) -> list:
    """Run a notebook in a fresh kernel of this interpreter; its code cells' outputs."""
    # A kernel spec for this interpreter, so the kernel imports what the tests import.
    spec = tmp_path / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    paths = [str(ROOT / d) for d in ("proto", "core", "server", "client")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("CONVRPC_TARGET", raising=False)  # the notebook starts its own server
    monkeypatch.setenv("CONVRPC_BACKEND", backend)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend renders the figures

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def test_train_kernel_notebook_runs_without_errors(tmp_path, monkeypatch):
    outputs = _execute(NOTEBOOK, tmp_path, monkeypatch, "numpy")  # no compile step: the notebook is about the SDK
    text = "".join(o.get("text", "") for o in outputs)
    assert "backend numpy" in text and text.count("converged after") == 2, text
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 3  # loss curve, images side by side, both loss curves


def test_digits_notebook_trains_classifies_and_draws_its_figures(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.setenv("CONVRPC_DIGITS_STEPS", "60")  # the README's figure comes from the full 600 steps
    outputs = _execute(DIGITS, tmp_path, monkeypatch, "numpy")
    text = "".join(o.get("text", "") for o in outputs)
    assert "backend numpy" in text and "max_steps after 60 steps" in text, text
    accuracy = float(text.split("held-out accuracy ")[1].split()[0])
    assert 0.5 < accuracy <= 1.0, text  # 60 steps of Adam already classify most digits
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 3  # sample digits, loss and accuracy curves, misclassified digits
