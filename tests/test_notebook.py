"""examples/train_kernel.ipynb runs top to bottom in a fresh Jupyter kernel against its own server."""

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


def test_the_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, cell.source[:60]


def test_train_kernel_notebook_runs_without_errors(tmp_path, monkeypatch):
    # A kernel spec for this interpreter, so the kernel imports what the tests import.
    spec = tmp_path / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    paths = [str(ROOT / d) for d in ("proto", "core", "server", "client")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("CONVRPC_TARGET", raising=False)  # the notebook starts its own server
    monkeypatch.setenv("CONVRPC_BACKEND", "numpy")  # no compile step: the notebook is about the SDK
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend renders the figures

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "backend numpy" in text and text.count("converged after") == 2, text
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 3  # loss curve, images side by side, both loss curves
