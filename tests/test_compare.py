"""The compare tool end to end: three objectives (one a consistency model)
and two students of the first, a few steps, one dataset.

Checks what it writes against the runs' own files (each run's eval JSON,
the figure's grid, the teacher's export and pairs) and that a second call
reuses the finished runs.
"""

import dataclasses
import json
import os
import types

import numpy as np
import pytest
from PIL import Image

from mf_jax import export
from mf_jax import objectives
from mf_jax import samplers
from mf_jax.data import pairs
from mf_jax.tools import compare

STEPS = 4
OBJECTIVES = ["flow_matching", "meanflow", "ect"]
CONSISTENCY = "ect"  # never learns h = 0: no 'ode' figure
# Students of flow matching's run: from its export, and from its pairs.
STUDENTS = [compare.DISTILLED_MEANFLOW, "reflow"]
NUM_PAIRS = 128
# A small network on one device: this test is about the files, not the
# models (the suite's own schedule is for full runs).
TINY = {"model.hidden_size": "32", "model.depth": "1",
        "training.batch_size": "64", "eval.batch_size": "64",
        "mesh.num_devices": "1", "objective.ect_stages": "2"}


def _table_rows(table: str, heading: str) -> list[list[str]]:
  """The cells of the markdown table under `heading`, header first."""
  lines = table.split(heading, 1)[1].splitlines()[1:]
  rows = []
  for line in lines:
    if rows and not line.startswith("|"):
      break
    if line.startswith("|"):
      rows.append([cell.strip() for cell in line.strip("|").split("|")])
  return [rows[0]] + rows[2:]  # without the |---| line


def _mtimes(folder) -> dict:
  return {os.path.join(root, name): os.path.getmtime(os.path.join(root, name))
          for root, _, names in os.walk(folder) for name in names}


def _needs_a_teacher(config):
  raise ValueError(f"objective.name={config.objective.name} distils a "
                   "teacher: set objective.teacher=FILE.")


# An objective the suite's config cannot train as it is.
DISTILLED = types.SimpleNamespace(SAMPLER="flow_map", validate=_needs_a_teacher)


def test_compare_writes_its_files_and_reuses_finished_runs(tmp_path,
                                                            monkeypatch):
  out = str(tmp_path / "family")
  # The default list: every objective; this one is left out, with why.
  monkeypatch.setitem(objectives.OBJECTIVES, "distilled", DISTILLED)
  monkeypatch.setattr(compare, "default_objectives",
                      lambda: OBJECTIVES + ["distilled"] + STUDENTS)
  monkeypatch.setitem(compare.SUITES, "toy2d", dataclasses.replace(
      compare.SUITES["toy2d"], num_pairs=NUM_PAIRS))
  kwargs = dict(steps=STEPS, num_samples=64, datasets=["checkerboard"],
                overrides=TINY)
  compare.compare("toy2d", out, **kwargs)

  saved = json.load(open(os.path.join(out, "results.json")))
  table = open(os.path.join(out, "table.md")).read()
  rows = _table_rows(table, "## checkerboard: energy_distance")
  assert rows[0] == ["objective", "1 NFE", "2 NFE", "4 NFE", "128 NFE",
                     "ode", "teacher", "step FLOPs vs flow matching"]
  assert [row[0] for row in rows[1:]] == OBJECTIVES + STUDENTS
  for row in rows[1:]:
    objective = row[0]
    run_dir = os.path.join(out, objective, "checkerboard")
    scores = json.load(open(os.path.join(run_dir, "eval", f"{STEPS}.json")))
    assert saved["runs"][objective]["checkerboard"]["eval"] == scores
    suite = compare.SUITES["toy2d"]
    specs = compare.row_nfes(suite, objective)
    score = lambda spec: scores[
        f"{samplers.schedule_name(spec)}/energy_distance"]
    for cell, spec in zip(row[1:5], specs):
      if isinstance(spec, tuple):  # a consistency model's 2 NFE
        value, mid = cell.removesuffix(")").split(" (t = ")
        # the best of its two-step candidates, and which one
        assert float(value) == pytest.approx(min(map(score, spec)), rel=1e-3)
        assert float(value) == pytest.approx(score(f"1,{mid},0"), rel=1e-3)
      else:
        assert float(cell) == pytest.approx(score(spec), rel=1e-3)
    # A consistency model's 2 NFE: `1,t,0` at each of the suite's times.
    assert specs[1] == (tuple(f"1,{t:g},0" for t in suite.consistency_mid_times)
                        if objective == CONSISTENCY else 2)
    if objective == CONSISTENCY:
      assert row[5] == "–" and "ode/nfe_used" not in scores
    else:
      value, nfe_used = row[5].removesuffix(" NFE)").split(" (")
      assert float(value) == pytest.approx(scores["ode/energy_distance"],
                                           rel=1e-3)
      # Dopri5: 1 evaluation to start, 6 per step.
      assert int(nfe_used) == round(scores["ode/nfe_used"])
      assert (scores["ode/nfe_used"] - 1) % 6 == 0
    # A student's teacher column: flow matching's adaptive figure.
    assert row[6] == (rows[1][5] if objective in STUDENTS else "–")
  assert "- distilled: objective.name=distilled distils a teacher" in table
  assert list(saved["left_out"]) == ["distilled"]
  flops = {row[0]: float(row[7]) for row in rows[1:]}
  # MeanFlow's step adds a JVP to flow matching's forward and backward;
  # distilled, a teacher's forward pass.
  assert flops["flow_matching"] == 1.0 and flops["meanflow"] > 1.1
  assert flops[compare.DISTILLED_MEANFLOW] > flops["meanflow"]

  # The teacher: flow matching's run, exported; reflow's pairs are its.
  teacher_file, pairs_dir = compare.teacher_files(out, "checkerboard")
  meta = export.load(teacher_file)[1]
  assert meta["objective"] == "flow_matching" and meta["step"] == STEPS
  manifest = pairs.read_manifest(pairs_dir)
  assert manifest["num_pairs"] == NUM_PAIRS
  assert manifest["teacher"] == os.path.abspath(teacher_file)
  assert (saved["runs"]["reflow"]["checkerboard"]["teacher"] == pairs_dir
          and saved["runs"][STUDENTS[0]]["checkerboard"]["teacher"]
          == teacher_file)

  # One row of cells per objective, one column per NFE, each with points
  # (but the consistency model's blank 'ode').
  picture = np.asarray(Image.open(os.path.join(out, "samples.png"))
                       .convert("L"))
  cell = int(compare.CELL_INCHES * compare.DPI)
  rows_drawn = len(OBJECTIVES + STUDENTS)
  assert picture.shape == (rows_drawn * cell, len(compare.NFES) * cell)
  dark = {}
  for i, objective in enumerate(OBJECTIVES + STUDENTS):
    for j, nfe in enumerate(compare.NFES):
      block = picture[i * cell:(i + 1) * cell, j * cell:(j + 1) * cell]
      dark[objective, nfe] = (block < 100).sum()
  blank = dark.pop((CONSISTENCY, "ode"))
  # Points and a frame in every cell; in the blank one, only the edges of
  # its neighbours' frames (the grid sits a margin off the cell raster).
  assert min(dark.values()) > 2 * max(blank, 100), (blank, dark)

  before = _mtimes(out)
  again = compare.compare("toy2d", out, **kwargs)
  after = _mtimes(out)
  runs = [os.path.join(out, o) for o in OBJECTIVES + STUDENTS]
  for path, mtime in before.items():
    if any(path.startswith(run) for run in runs):
      assert after[path] == mtime, path  # nothing retrained or rescored
  assert all(again["runs"][o]["checkerboard"]["reused"]
             for o in OBJECTIVES + STUDENTS)
  assert open(os.path.join(out, "table.md")).read() == table


def test_bad_input_fails_before_training(tmp_path, monkeypatch):
  # Named on the command line, an objective that cannot run is an error.
  monkeypatch.setitem(objectives.OBJECTIVES, "distilled", DISTILLED)
  with pytest.raises(ValueError, match="distils a teacher"):
    compare.compare("toy2d", str(tmp_path), ["distilled"])
  with pytest.raises(ValueError, match="Unknown objective.name 'meanfow'"):
    compare.compare("toy2d", str(tmp_path), ["meanfow"])
  with pytest.raises(ValueError, match="not in suite toy2d"):
    compare.compare("toy2d", str(tmp_path), datasets=["digits"])
  with pytest.raises(ValueError, match="no such field"):
    compare.compare("toy2d", str(tmp_path), ["meanflow"],
                    overrides={"model.widht": "3"})
  assert not os.listdir(tmp_path)
