"""The Colab notebook runs top to bottom: code, install, train, grids, restore.

Executed with nbclient on a CPU kernel with tiny settings; the kernel
inherits this process's 8 fake CPU devices (conftest). The code comes from a
zip of this checkout given as a URL, as a user would give GitHub's; the
install cell resolves the requirements against constraints.txt with
`pip install --dry-run` (PyPI must be reachable: a failure fails the test).
"""

import importlib.metadata
import os
import re
import zipfile

import nbclient
import nbformat
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "launch", "colab_tpu.ipynb")
STEPS = 12
# What the notebook needs from the repository.
SHIPPED = ("mf_jax", "configs", "requirements.txt", "constraints.txt")


def _outputs(notebook, output_type):
  return [out for cell in notebook.cells if cell.cell_type == "code"
          for out in cell.get("outputs", []) if out.output_type == output_type]


def _text(notebook):
  return "".join(out.get("text", "") for out in _outputs(notebook, "stream"))


def _zip_checkout(path):
  """A zip with one top folder, like GitHub's 'Download ZIP'."""
  with zipfile.ZipFile(path, "w") as archive:
    for name in SHIPPED:
      top = os.path.join(ROOT, name)
      files = [top] if os.path.isfile(top) else [
          os.path.join(d, f) for d, _, fs in os.walk(top) for f in fs
          if "__pycache__" not in d]
      for file in files:
        archive.write(file, os.path.join(
            "mf_jax-main", os.path.relpath(file, ROOT)))


def _execute(notebook, cells=None):
  if cells is not None:
    notebook.cells = notebook.cells[:cells]
  client = nbclient.NotebookClient(notebook, timeout=300,
                                   kernel_name="python3",
                                   resources={"metadata": {"path": ROOT}})
  client.execute()  # raises CellExecutionError if any cell fails


def _pins():
  """constraints.txt's pins that apply here, by normalised name."""
  pins = {}
  with open(os.path.join(ROOT, "constraints.txt")) as f:
    for line in f:
      line = line.split("#", 1)[0].strip()
      if line and not line.startswith("-"):
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate():
          (version,) = [s.version for s in req.specifier if s.operator == "=="]
          pins[canonicalize_name(req.name)] = version
  return pins


def test_colab_notebook_fetches_code_resolves_trains_and_restores(
    tmp_path, monkeypatch):
  workdir, code = tmp_path / "run", tmp_path / "code"
  _zip_checkout(tmp_path / "mf_jax.zip")
  monkeypatch.setenv("MF_NOTEBOOK_INSTALL", "dry-run")
  monkeypatch.setenv("MF_NOTEBOOK_CODE_DIR", str(code))
  monkeypatch.setenv("MF_NOTEBOOK_CODE_URL",
                     (tmp_path / "mf_jax.zip").as_uri())
  monkeypatch.delenv("MF_NOTEBOOK_CODE_ZIP", raising=False)
  monkeypatch.setenv("MF_NOTEBOOK_WORKDIR", str(workdir))
  monkeypatch.setenv("MF_NOTEBOOK_STEPS", str(STEPS))
  monkeypatch.setenv("MF_NOTEBOOK_BATCH", "16")
  monkeypatch.setenv("MF_NOTEBOOK_EVAL_SAMPLES", "200")
  monkeypatch.setenv("MF_JAX_CACHE", str(tmp_path / "cache"))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  _execute(notebook)
  text = _text(notebook)

  # The code came from the URL's zip, unpacked without its top folder.
  assert f"code: url -> {code}" in text
  assert (code / "mf_jax" / "main.py").is_file()
  # The install cell resolved every requirement from the index, at the
  # tested versions, with this kernel's own jax.
  (line,) = [l for l in text.splitlines() if l.startswith("pip would install")]
  resolved = dict(item.split("==") for item in line.split(":", 1)[1].split())
  resolved = {canonicalize_name(k): v for k, v in resolved.items()}
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    lines = [line.split("#", 1)[0].strip() for line in f]
  wanted = {canonicalize_name(Requirement(line).name) for line in lines
            if line and not line.startswith("-")}
  assert wanted <= set(resolved), wanted - set(resolved)
  assert resolved["jax"] == importlib.metadata.version("jax")
  pins = _pins()
  off = {n: (v, pins[n]) for n, v in resolved.items()
         if n in pins and n not in ("jax", "jaxlib") and v != pins[n]}
  assert not off, f"resolved (got, pinned): {off}"

  # Grids at steps 4, 8 and 12, the final checkpoint and eval.
  samples = sorted(os.listdir(workdir / "samples"))
  assert samples == [f"{s}_nfe1.png" for s in (12, 4, 8)]
  assert (workdir / "eval" / f"{STEPS}.json").exists()
  assert f"restored step {STEPS}" in text
  assert "1 NFE: {'fd_digits'" in text and "2 NFE: {'fd_digits'" in text
  for nfe in (1, 2):
    assert (workdir / f"restored_{STEPS}_nfe{nfe}.png").exists()
  # Three training grids and two restored grids were displayed inline.
  pictures = [out for out in _outputs(notebook, "display_data")
              if "image/png" in out.get("data", {})]
  assert len(pictures) == 5


def test_colab_notebook_without_code_stops_in_its_first_cell(
    tmp_path, monkeypatch):
  monkeypatch.setenv("MF_NOTEBOOK_CODE_DIR", str(tmp_path / "nothing"))
  for name in ("MF_NOTEBOOK_CODE_ZIP", "MF_NOTEBOOK_CODE_URL"):
    monkeypatch.delenv(name, raising=False)
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  first_code = next(i for i, c in enumerate(notebook.cells)
                    if c.cell_type == "code")
  with pytest.raises(nbclient.exceptions.CellExecutionError,
                     match=re.escape("No mf_jax code: ")):
    _execute(notebook, cells=first_code + 1)
  assert "MF_NOTEBOOK_CODE_URL" in str(
      notebook.cells[first_code].outputs[-1].get("evalue", ""))
