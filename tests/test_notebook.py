"""Visualize_Reconstruction.ipynb: runs headless from the repository root and shows what it promises.

The notebook runs on the model its settings cell names (the sample SSIM model), so these tests fail,
rather than skip, until sample_models/ holds it. To try another checkpoint while developing:

    NOTEBOOK_MODEL_PATH=/tmp/model.pth python -m pytest tests/test_notebook.py
"""
import base64
import importlib.util
import json
import os
import re

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "Visualize_Reconstruction.ipynb")
MAX_NOTEBOOK_BYTES = 1_500_000
NUMBER = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
AVERAGE_LINE = re.compile(rf"^Average over (.+?): MSE {NUMBER}  SSIM {NUMBER}  PSNR {NUMBER} dB$", re.MULTILINE)


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebook", os.path.join(ROOT, "tools", "make_notebook.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _executed_notebook():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    override = os.environ.get("NOTEBOOK_MODEL_PATH")
    if override:
        settings = nb.cells[1]
        settings.source = re.sub(r'^model_path = "[^"]*"', lambda _: f"model_path = {json.dumps(override)}",
                                 settings.source, count=1, flags=re.MULTILINE)
        assert override in settings.source
    NotebookClient(nb, timeout=300, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": ROOT}}).execute()
    return nb


def _stdout(nb):
    return "".join(out.text for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.outputs if out.output_type == "stream" and out.name == "stdout")


def test_notebook_runs_headless_and_shows_figure_and_averages():
    nb = _executed_notebook()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]

    pngs = [base64.b64decode(out.data["image/png"]) for out in outputs
            if out.output_type in ("display_data", "execute_result") and "image/png" in out.data]
    assert len(pngs) == 1
    assert pngs[0].startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(pngs[0][16:20], "big"), int.from_bytes(pngs[0][20:24], "big")
    assert width > 2 * height  # one row of 8 originals over one row of 8 reconstructions

    averages = {label: tuple(map(float, values)) for label, *values in AVERAGE_LINE.findall(_stdout(nb))}
    assert set(averages) == {"the 8 images shown", "all 16 images in input_images"}
    for mse, ssim, psnr in averages.values():
        assert 0.0 <= mse <= 1.0
        assert -1.0 <= ssim <= 1.0
        assert 0.0 <= psnr <= 100.0


def test_committed_notebook_is_the_executed_generator_output():
    """The .ipynb is what `python tools/make_notebook.py --execute` writes, for the sample model."""
    committed = nbformat.read(NOTEBOOK, as_version=4)
    built = _generator().build()
    assert [(c.id, c.cell_type, c.source) for c in committed.cells] == \
           [(c.id, c.cell_type, c.source) for c in built.cells]
    assert all(cell.execution_count for cell in committed.cells if cell.cell_type == "code")
    assert os.path.getsize(NOTEBOOK) < MAX_NOTEBOOK_BYTES
