"""The Colab notebook runs top to bottom: train, show grids, restore, sample.

Executed with nbclient on a CPU kernel with tiny settings and no pip step;
the kernel inherits this process's 8 fake CPU devices (conftest).
"""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "launch", "colab_tpu.ipynb")
STEPS = 12


def _outputs(notebook, output_type):
  return [out for cell in notebook.cells if cell.cell_type == "code"
          for out in cell.get("outputs", []) if out.output_type == output_type]


def test_colab_notebook_trains_shows_grids_and_restores(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  monkeypatch.setenv("MF_NOTEBOOK_INSTALL", "0")
  monkeypatch.setenv("MF_NOTEBOOK_CODE_DIR", ROOT)
  monkeypatch.setenv("MF_NOTEBOOK_WORKDIR", str(workdir))
  monkeypatch.setenv("MF_NOTEBOOK_STEPS", str(STEPS))
  monkeypatch.setenv("MF_NOTEBOOK_BATCH", "16")
  monkeypatch.setenv("MF_NOTEBOOK_EVAL_SAMPLES", "200")
  monkeypatch.setenv("MF_JAX_CACHE", str(tmp_path / "cache"))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=240,
                                   kernel_name="python3",
                                   resources={"metadata": {"path": ROOT}})
  client.execute()  # raises CellExecutionError if any cell fails

  # Grids at steps 4, 8 and 12, the final checkpoint and eval.
  samples = sorted(os.listdir(workdir / "samples"))
  assert samples == [f"{s}_nfe1.png" for s in (12, 4, 8)]
  assert (workdir / "eval" / f"{STEPS}.json").exists()
  text = "".join(out.get("text", "") for out in _outputs(notebook, "stream"))
  assert f"restored step {STEPS}" in text
  assert "1 NFE: {'fd_digits'" in text and "2 NFE: {'fd_digits'" in text
  for nfe in (1, 2):
    assert (workdir / f"restored_{STEPS}_nfe{nfe}.png").exists()
  # Three training grids and two restored grids were displayed inline.
  pictures = [out for out in _outputs(notebook, "display_data")
              if "image/png" in out.get("data", {})]
  assert len(pictures) == 5
