"""The notebooks in `notebooks/`: committed without outputs, and each one runs on tiny settings.

Each notebook is executed with nbclient in a kernel that runs this interpreter (a kernelspec
written into the test's temporary folder, so neither a user's Jupyter setup nor a missing
system-wide `python3` kernel matters) and inherits the environment: the current
`KERAS_BACKEND`, `TOOLKIT_NOTEBOOK_TINY=1` (the notebooks' tiny sizes) and a `TMPDIR` inside the
test's folder, where the notebooks create their working folders (deleted again in tiny mode).
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
NAMES = ("attention_tour", "asr_quickstart", "medimg_heatmaps")
CELL_TIMEOUT = 600  # seconds per cell


def test_every_notebook_is_tested_and_committed_without_outputs():
    found = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    assert found == sorted(NAMES), "add new notebooks to NAMES and give them an execution test"
    for name in NAMES:
        path = NOTEBOOKS / f"{name}.ipynb"
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        assert notebook.metadata["kernelspec"]["name"] == "python3", path.name
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type != "code":
                continue
            assert cell.outputs == [], f"{path.name}: cell {index} has outputs (clear them)"
            assert cell.execution_count is None, f"{path.name}: cell {index} has a count"


def execute(name, tmp_path, monkeypatch):
    """Runs notebook `name` on tiny settings in `tmp_path`; returns the executed notebook."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    kernels = tmp_path / "kernels"
    # argv[0] is sys.executable: the kernel runs this interpreter with its packages.
    write_kernel_spec(kernels / "toolkit-test")
    manager = KernelManager(
        kernel_name="toolkit-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernels])
    )
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TOOLKIT_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setenv("ATTENTION_TOOLKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    work = tmp_path / "cwd"
    work.mkdir()
    client = NotebookClient(
        notebook, km=manager, timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(work)}}
    )
    client.execute()  # raises CellExecutionError, with the cell's traceback, if a cell fails
    # Its working folder (under TMPDIR) is removed at the end in tiny mode.
    prefix = name.replace("_", "-")
    assert not [p.name for p in temp.iterdir() if p.name.startswith(prefix)]
    assert sorted(p.name for p in work.iterdir()) == [], "the notebook wrote into its cwd"
    return notebook


def stdout_of(notebook):
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream" and output.name == "stdout"
    )


def images_of(notebook):
    images = [
        base64.b64decode(output.data["image/png"])
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type in ("display_data", "execute_result") and "image/png" in output.data
    ]
    assert all(image.startswith(b"\x89PNG") for image in images)
    return images


def number_after(label, text):
    match = re.search(re.escape(label) + r"\s*([-+0-9.e]+)", text)
    assert match, f"{label!r} not in the output"
    return float(match.group(1))


def test_attention_tour(tmp_path, monkeypatch):
    notebook = execute("attention_tour", tmp_path, monkeypatch)
    text = stdout_of(notebook)
    # The hand-made softmax: every row of the weights sums to 1, and the toolkit agrees.
    assert "row sums of the weights: [1. 1. 1. 1.]" in text
    assert number_after("max |A - toolkit weights| =", text) < 1e-5
    assert number_after("max |C - toolkit output|  =", text) < 1e-5
    assert "weight sums per row: [1. 1. 1. 1. 1. 1. 1.]" in text
    # The learned scores solve the lookup task (chance is 1/8).
    assert number_after("accuracy after training: general", text) >= 0.9
    assert number_after("additive", text.split("accuracy after training:")[1]) >= 0.9
    # The chunked path equals the explicit one at every timed length.
    differences = [float(d) for d in re.findall(r"max \|explicit - chunked\| = ([-+0-9.e]+)", text)]
    assert len(differences) >= 2 and max(differences) < 1e-4
    assert len(images_of(notebook)) >= 10


@pytest.mark.slow
def test_asr_quickstart(tmp_path, monkeypatch):
    notebook = execute("asr_quickstart", tmp_path, monkeypatch)
    text = stdout_of(notebook)
    assert 0.0 <= number_after("best dev CER", text.replace("%", "")) <= 1000.0
    assert re.search(r"alignment \(\d+, \d+\) row sums \[1\. 1\. 1\.", text), text[-2000:]
    assert re.search(r"dev_cer: [0-9.]+, [0-9.]+\n", text)  # two epochs in the MLflow run
    assert "mlflow ui --backend-store-uri sqlite:///" + str(tmp_path / "tmp") in text
    assert len(images_of(notebook)) >= 3


@pytest.mark.slow
def test_medimg_heatmaps(tmp_path, monkeypatch):
    notebook = execute("medimg_heatmaps", tmp_path, monkeypatch)
    text = stdout_of(notebook)
    table = text.split("held-out positive scans on the model grid")[1]
    for method in ("gate", "pool", "native (combined)", "Grad-CAM"):
        assert method in table
    for method in ("native", "gradcam"):
        assert re.search(rf"\n{method} +[0-9.na]+ +[0-9.na]+ +[0-9.]+", table), table
    assert "ViT: " in text and "best validation AUC" in text
    assert re.search(r"val_auc: [0-9.]+, [0-9.]+, [0-9.]+\n", text)  # three epochs logged
    assert "mlflow ui --backend-store-uri sqlite:///" + str(tmp_path / "tmp") in text
    assert len(images_of(notebook)) >= 5
