r"""One table for the whole family: every objective on one suite's schedule.

  python -m mf_jax.tools.compare --suite=toy2d --output=/tmp/family
  python -m mf_jax.tools.compare --suite=digits --output=/tmp/family_digits \
      [--objectives=flow_matching,meanflow] [--steps=N] [--num_samples=N] \
      [--datasets=checkerboard] [--set=section.field=value ...]

Trains one run per objective (and per dataset: the toy2d suite has the
checkerboard and the two moons) in OUTPUT/<objective>/<dataset>, from
configs/<suite>.py:objective=NAME, the schedule every objective shares
(`--steps`, `--set` change it for all). Runs train only; then the last
checkpoint is scored as `--mode=eval` does, at 1, 2, 4 and 128 NFE of the
objective's own sampler and the adaptive 'ode' reference (Dopri5 on the
instantaneous velocity, eval.ode_rtol/ode_atol; not for the consistency
models, which never learn it): eval/<steps>.json, keys
'nfe1/...', 'ode/...' and 'ode/nfe_used'. The same compiled samplers draw
the figure's samples (compare_samples_<steps>.npz). A run with both files
is reused, not retrained; an unfinished one resumes. Then writes

- OUTPUT/table.md: per dataset and metric, one row per objective, columns
  1, 2, 4, 128 NFE and 'ode' (its mean NFE in brackets), and the compiled
  training step's FLOPs over flow matching's (one device, the run's batch);
- OUTPUT/results.json: each run's eval JSON, FLOPs and workdir;
- OUTPUT/samples.png: one row per run, one column per NFE (2-D scatter
  plots, or a class-balanced block of digits).

Every objective in `mf_jax.objectives.OBJECTIVES` is in the default list,
so a new method adds its row by existing; those the suite's config cannot
train as it is are listed as left out, with the reason. The students (an
objective's LEARNS_FROM, and the row 'meanflow_distill': MeanFlow with the
teacher's velocity in its target) learn from the flow-matching run of their
dataset, trained first: its export OUTPUT/flow_matching/<dataset>/
teacher.safetensors is their objective.teacher and starting point, and
reflow reads Suite.num_pairs pairs of its adaptive ODE from .../pairs. The
table's 'teacher' column is that run's 'ode' figure. OUTPUT is a local
folder.
"""

import dataclasses
import importlib.util
import os

import jax
import numpy as np
from absl import app
from absl import flags
from absl import logging

from mf_jax import files
from mf_jax import objectives
from mf_jax import preflight
from mf_jax import samplers
from mf_jax.data import toy2d
from mf_jax.evaluation import images
from mf_jax.tools import export as export_tool
from mf_jax.tools import make_pairs
from mf_jax.training import throughput
from mf_jax.training import trainer

# The table's schedules: few-step figures and the many-step reference.
# Each objective's own sampler at 1, 2, 4 and 128 steps (many steps: flow
# matching's Euler-128 is what the adaptive solve is held against; 128 is
# on shortcut's finest d-grid), then the adaptive solve of the
# instantaneous velocity.
NFES = (1, 2, 4, 128, "ode")
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")
BASELINE = "flow_matching"  # and the students' teacher
# A row beside the registry's: MeanFlow distilled from the baseline.
DISTILLED_MEANFLOW = "meanflow_distill"
# Samples drawn per figure cell: points of a 2-D scatter, or digits (two of
# each class, in rows of 5: a near-square block).
SCATTER_POINTS = 2000
DIGITS_PER_CELL = 20
CELL_INCHES, DPI = 1.6, 100


@dataclasses.dataclass(frozen=True)
class Suite:
  config: str  # configs/<config>.py
  datasets: tuple[str, ...]
  metrics: tuple[str, ...]  # eval JSON keys after 'nfe1/'
  lower_is_better: tuple[bool, ...]
  num_pairs: int  # the teacher's (noise, sample) pairs reflow trains on
  # The consistency models' 2 NFE: as in their papers (CM's ternary
  # search, iCT's sigma = 0.821), the time to re-noise to between the two
  # jumps is tuned per model: each run is scored at `1,t,0` for every t
  # here and its 2-NFE cell is the best by the suite's first metric. No one
  # t suits all (checkerboard, 6k steps: iCT 0.00037 at 0.3, 0.00077 at
  # 0.1; CT 0.0090 at 0.3, 0.0080 at 0.1; the midpoint 0.5 is worst for
  # both).
  consistency_mid_times: tuple[float, ...] = (0.1, 0.2, 0.3, 0.45, 0.6)


SUITES = {
    "toy2d": Suite("toy2d", ("checkerboard", "moons"), ("energy_distance",),
                   (True,), 65_536),
    "digits": Suite("digits", ("digits",), ("fd_digits", "class_accuracy"),
                    (True, False), 16_384),
}


def default_objectives() -> list[str]:
  """Flow matching (the baseline) and MeanFlow first, then every other
  objective that learns from data, then the students."""
  first = [BASELINE, "meanflow"]
  rest = [name for name in objectives.OBJECTIVES if name not in first]
  students = [name for name in rest if objectives.learns_from(name)]
  return (first + [name for name in rest if name not in students] + students
          + [DISTILLED_MEANFLOW])


def row_objective(row: str) -> str:
  """The objective a table row trains."""
  return "meanflow" if row == DISTILLED_MEANFLOW else row


def row_learns_from(row: str) -> str:
  """'teacher', 'pairs' or '' (see objectives.learns_from)."""
  if row == DISTILLED_MEANFLOW:
    return "teacher"
  return objectives.learns_from(row)


def two_step_schedules(suite: Suite) -> tuple[str, ...]:
  """A consistency model's 2-NFE candidates, `1,t,0` per re-noise time."""
  return tuple(f"1,{t:g},0" for t in suite.consistency_mid_times)


def row_nfes(suite: Suite, row: str) -> tuple:
  """What is evaluated for each column of NFES: a schedule, a tuple of
  candidate schedules (`best_schedule` picks the cell's), or None. A
  consistency model gets its two-step candidates for 2 NFE and no 'ode'
  (it never learns h = 0, so the ODE of its instantaneous velocity says
  nothing about it)."""
  if objectives.get(row_objective(row)).SAMPLER != "consistency":
    return NFES
  return tuple(None if nfe == "ode" else
               two_step_schedules(suite) if nfe == 2 else nfe
               for nfe in NFES)


def evaluated_schedules(suite: Suite, row: str) -> tuple:
  """Every schedule a row's run is scored at, candidates included."""
  out = []
  for spec in row_nfes(suite, row):
    if spec is not None:
      out += spec if isinstance(spec, tuple) else [spec]
  return tuple(out)


def best_schedule(suite: Suite, scores: dict, spec):
  """The schedule a column shows: `spec` itself, or of a tuple of
  candidates the best by the suite's first metric (every metric of the
  row then shows that one schedule)."""
  if not isinstance(spec, tuple):
    return spec
  metric, lower = suite.metrics[0], suite.lower_is_better[0]
  value = lambda s: scores[f"{samplers.schedule_name(s)}/{metric}"]
  return (min if lower else max)(spec, key=value)


def teacher_files(output: str, dataset: str) -> tuple[str, str]:
  """(export, pairs folder) of the baseline run of `dataset`."""
  base = os.path.join(output, BASELINE, dataset)
  return (os.path.join(base, "teacher.safetensors"),
          os.path.join(base, "pairs"))


def _load_config_module(name: str):
  path = os.path.join(CONFIGS_DIR, f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"compare_config_{name}",
                                                path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_overrides(items) -> dict[str, str]:
  """['model.depth=1', ...] as {'model.depth': '1'}."""
  overrides = {}
  for item in items or ():
    field, sep, value = item.partition("=")
    if not sep or "." not in field:
      raise ValueError(f"--set={item!r} is not section.field=value.")
    overrides[field] = value
  return overrides


def _override(config, field: str, text: str):
  """Sets a dotted field from text, typed like the value it replaces."""
  section, _, name = field.partition(".")
  if section not in config or name not in config[section]:
    raise ValueError(f"--set {field}: the suite's config has no such field.")
  old = config[section][name]
  if isinstance(old, bool):
    value = text.lower() in ("1", "true", "yes")
  elif isinstance(old, (int, float, str)):
    value = type(old)(text)
  elif isinstance(old, tuple) and old and len({type(v) for v in old}) == 1:
    value = tuple(type(old[0])(item) for item in text.split(","))
  else:
    raise ValueError(f"--set {field}: only numbers, booleans, strings and "
                     f"tuples of one type (items split by ',') can be set "
                     f"here (it holds {old!r}).")
  config[section][name] = value


def run_config(suite: Suite, row: str, dataset: str,
               steps: int | None = None, num_samples: int | None = None,
               overrides: dict[str, str] | None = None, output: str = ""):
  """The suite's config for one row. Training only: `run` scores the
  last step at NFES and draws the figure's samples itself (no grids).
  `overrides` ({'model.depth': '1'}) change the shared schedule for all.
  A student learns from the baseline's files in `output`."""
  arg = f"objective={row_objective(row)}"
  if suite.config == "toy2d":
    arg += f",dataset={dataset}"
  c = _load_config_module(suite.config).get_config(arg)
  for field, text in (overrides or {}).items():
    _override(c, field, text)
  if steps:
    c.training.num_steps = steps
  c.eval.update(nfe=evaluated_schedules(suite, row), every_steps=0)
  c.sample.every_steps = 0
  if num_samples:
    c.eval.num_samples = num_samples
  export_path, pairs_dir = teacher_files(output, dataset)
  if row_learns_from(row) == "pairs":  # its manifest names the teacher
    c.data.pairs_dir = pairs_dir
  elif row_learns_from(row) == "teacher":
    c.objective.update(teacher=export_path, init_from=export_path)
  return c


def prepare_teacher(suite: Suite, output: str, dataset: str, config,
                    learns_from: str):
  """Exports the baseline run of `dataset` (trained by now) and, for
  reflow, makes its pairs; both are reused once complete."""
  export_path, pairs_dir = teacher_files(output, dataset)
  if not files.exists(export_path):
    export_tool.export_run(os.path.dirname(export_path), export_path,
                           config=config)
  if learns_from == "pairs":
    make_pairs.run(export_path, pairs_dir, suite.num_pairs,
                   rtol=config.eval.ode_rtol, atol=config.eval.ode_atol)


def metric_keys(suite: Suite, nfes) -> list[str]:
  keys = [f"{samplers.schedule_name(nfe)}/{metric}"
          for nfe in nfes for metric in suite.metrics]
  return keys + (["ode/nfe_used"] if "ode" in nfes else [])


def check_configs(configs: dict):
  """Every run's config checked before anything trains: one line each."""
  for config in configs.values():
    preflight.validate_config(config)
    objectives.validate(config)
    for schedule in config.eval.nfe:
      samplers.parse_schedule(schedule)


def run(config, workdir: str, kind: str, keys: list[str]):
  """(eval JSON, figure samples per NFE name, reused) of one finished run.

  Trains (or resumes) unless a checkpoint of the last step exists, then
  scores it as `--mode=eval` does (eval/<steps>.json) and draws the
  figure's samples with the same compiled samplers (cached beside the run
  as compare_samples_<steps>.npz). A run with both files is reused as is.
  """
  steps = config.training.num_steps
  eval_path = os.path.join(workdir, "eval", f"{steps}.json")
  samples_path = os.path.join(workdir, f"compare_samples_{steps}.npz")
  nfes = tuple(config.eval.nfe)
  names = [samplers.schedule_name(nfe) for nfe in nfes]
  if (files.exists(eval_path) and files.exists(samples_path)
      and set(keys) <= set(files.read_json(eval_path))):
    with np.load(samples_path) as cached:
      if set(names) <= set(cached.files):
        logging.info("Reusing %s: eval/%d.json and its samples exist.",
                     workdir, steps)
        return (files.read_json(eval_path),
                {name: cached[name] for name in names}, True)
  exp = trainer.Experiment(config, workdir)
  state, step = exp.restore()
  if step < steps:
    exp.checkpointer.close()
    logging.info("Training %s (%d steps).", workdir, steps)
    trainer.train_and_evaluate(config, workdir)
    exp = trainer.Experiment(config, workdir)
    state, step = exp.restore()
  exp.checkpointer.close()
  if step != steps:
    raise RuntimeError(f"{workdir}: the latest checkpoint is step {step}, "
                       f"not {steps} (stopped early, or a longer run): run "
                       "again, or pick another --output or --steps.")
  evaluator = exp.make_evaluator()
  scores = trainer.evaluate(exp, state, steps, evaluator)
  params = exp.eval_params(state)
  rng = jax.random.key(config.training.seed + 3)
  samples = {}
  for name, nfe in zip(names, nfes):
    if kind == "toy2d":
      samples[name], _ = evaluator.generate(params, rng, SCATTER_POINTS, nfe,
                                            "random")
    else:
      samples[name], _ = evaluator.generate(params, rng, DIGITS_PER_CELL, nfe,
                                            "balanced")
  if jax.process_index() == 0:
    np.savez(samples_path, **samples)
  return scores, samples, False


def train_step_flops(config) -> float | None:
  """XLA's FLOPs of the compiled training step on one device (on several,
  replicated per-parameter work would dilute the comparison)."""
  c = config.copy_and_resolve_references()
  c.mesh.update(data=-1, fsdp=1, num_devices=1)
  exp = trainer.Experiment(c, workdir="")
  return throughput.compiled_flops(exp.lower_train_step().compile())


def cached_flops(config, path: str) -> float | None:
  """`train_step_flops`, kept in `path` with the batch it was taken at."""
  batch = config.training.batch_size
  if files.exists(path):
    record = files.read_json(path)
    if record.get("batch_size") == batch:
      return record["flops"]
  flops = train_step_flops(config)
  files.write_json(path, {"flops": flops, "batch_size": batch})
  return flops


def _format(value, nfe_used=None) -> str:
  if value is None:
    return "–"
  text = f"{value:.4g}"
  return text if nfe_used is None else f"{text} ({nfe_used:.0f} NFE)"


def _cell(suite: Suite, scores: dict, metric: str, nfe, spec) -> str:
  if nfe == "ode":
    return _format(scores.get(f"ode/{metric}"), scores.get("ode/nfe_used"))
  if spec is None:
    return _format(None)
  chosen = best_schedule(suite, scores, spec)
  text = _format(scores.get(f"{samplers.schedule_name(chosen)}/{metric}"))
  if isinstance(spec, tuple):  # the re-noise time picked
    text += f" (t = {chosen.split(',')[1]})"
  return text


def table_markdown(suite: Suite, results: dict, steps: int) -> str:
  """table.md: one section per dataset and metric."""
  first = next(iter(next(iter(results["runs"].values())).values()))
  rtol, atol = first["ode_rtol"], first["ode_atol"]
  steps_columns = [nfe for nfe in NFES if nfe != "ode"]
  lines = [
      f"# {suite.config}: {steps} training steps per objective", "",
      "Columns " + ", ".join(map(str, steps_columns)) + ": NFE of each "
      "objective's own sampler (flow matching: Euler; score_sde: "
      "Euler-Maruyama); `ode`: adaptive Dopri5 on the instantaneous velocity "
      f"(h = 0, rtol {rtol:g}, atol {atol:g}), its mean NFE in brackets, "
      "'–' for the consistency models, which never learn h = 0 (their 2 "
      "NFE: `1,t,0` at the best re-noise time t of "
      f"{', '.join(map(str, suite.consistency_mid_times))} by {suite.metrics[0]}"
      ", shown in brackets). teacher: a "
      f"student's teacher ({BASELINE}'s run of the dataset) at 'ode'. Step "
      "FLOPs: the compiled training step (one device; a student's includes "
      "its teacher's passes) over flow matching's.", ""]
  header = ([f"{nfe} NFE" for nfe in steps_columns]
            + ["ode", "teacher", "step FLOPs vs flow matching"])
  for dataset in suite.datasets:
    for metric, lower in zip(suite.metrics, suite.lower_is_better):
      better = "lower" if lower else "higher"
      lines += [f"## {dataset}: {metric} ({better} is better)", "",
                "| objective | " + " | ".join(header) + " |",
                "|---" * (len(header) + 1) + "|"]
      for objective, runs in results["runs"].items():
        run = runs[dataset]
        scores = run["eval"]
        cells = [_cell(suite, scores, metric, nfe, spec)
                 for nfe, spec in zip(NFES, row_nfes(suite, objective))]
        teacher = results["runs"][BASELINE][dataset]["eval"] if run.get(
            "teacher") else {}
        cells.append(_format(teacher.get(f"ode/{metric}"),
                             teacher.get("ode/nfe_used")))
        ratio = run["flops_vs_flow_matching"]
        cells.append("–" if ratio is None else f"{ratio:.2f}")
        lines.append(f"| {objective} | " + " | ".join(cells) + " |")
      lines.append("")
  if results.get("left_out"):
    lines += ["Left out (the suite's config cannot train them as it is):", ""]
    lines += [f"- {name}: {why}" for name, why in results["left_out"].items()]
    lines.append("")
  return "\n".join(lines)


def samples_figure(suite: Suite, samples: dict, results: dict, path: str):
  """samples.png: a row per run (objective, dataset), a column per NFE;
  each cell CELL_INCHES square at DPI."""
  # Imported here: picking the file backend is a process-wide setting.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = list(samples)
  fig, axes = plt.subplots(
      len(rows), len(NFES), squeeze=False,
      figsize=(CELL_INCHES * len(NFES), CELL_INCHES * len(rows)))
  for i, (objective, dataset) in enumerate(rows):
    scores = results["runs"][objective][dataset]["eval"]
    for j, (nfe, spec) in enumerate(zip(NFES, row_nfes(suite, objective))):
      ax = axes[i, j]
      ax.set_xticks([])
      ax.set_yticks([])
      x = None if spec is None else samples[objective, dataset].get(
          samplers.schedule_name(best_schedule(suite, scores, spec)))
      if x is None:  # not sampled (a consistency model's 'ode')
        ax.set_axis_off()
      elif x.ndim == 2:  # 2-D points
        ax.scatter(x[:, 0], x[:, 1], s=0.3, c="k", linewidths=0)
        ax.set_xlim(-3.5, 3.5)
        ax.set_ylim(-3.5, 3.5)
      else:
        ax.imshow(images.image_grid(x, columns=5), cmap="gray", vmin=0,
                  vmax=255)
      if i == 0:
        ax.set_title("ode" if nfe == "ode" else f"{nfe} NFE", fontsize=8)
      if nfe == "ode" and x is not None:  # the adaptive solve's count
        ax.text(0.03, 0.97, f"{scores.get('ode/nfe_used', 0):.0f} NFE",
                transform=ax.transAxes, fontsize=6, va="top", color="tab:red",
                bbox=dict(facecolor="white", edgecolor="none", pad=1))
      if j == 0:
        label = objective if len(suite.datasets) == 1 else (
            f"{objective}\n{dataset}")
        ax.set_ylabel(label, fontsize=7)
  fig.subplots_adjust(left=0.08, right=0.99, bottom=0.01, top=0.94,
                      wspace=0.04, hspace=0.04)
  fig.savefig(path, dpi=DPI)
  plt.close(fig)


def compare(suite_name: str, output: str, objective_names=None,
            steps: int | None = None, num_samples: int | None = None,
            datasets=None, overrides: dict[str, str] | None = None) -> dict:
  """Trains or reuses every run, then writes the table, the results and
  the figure into `output`; returns the results."""
  if suite_name not in SUITES:
    raise ValueError(f"Unknown --suite={suite_name!r}; valid: "
                     f"{sorted(SUITES)}.")
  suite = SUITES[suite_name]
  if datasets:
    unknown = sorted(set(datasets) - set(suite.datasets))
    if unknown:
      raise ValueError(f"--datasets {unknown} are not in suite "
                       f"{suite_name}'s {suite.datasets}.")
    suite = dataclasses.replace(
        suite, datasets=tuple(d for d in suite.datasets if d in datasets))
  chosen = objective_names is not None
  objective_names = list(objective_names or default_objectives())
  for name in objective_names:
    objectives.get(row_objective(name))  # unknown names fail before any run
  if BASELINE not in objective_names and any(
      row_learns_from(name) for name in objective_names):
    objective_names.insert(0, BASELINE)  # the students' teacher
  preflight.check_writable(output, "the comparison")
  configs, skipped = {}, {}
  for name in objective_names:
    runs = {(name, d): run_config(suite, name, d, steps, num_samples,
                                  overrides, output) for d in suite.datasets}
    try:
      check_configs(runs)
    except ValueError as e:
      if chosen:
        raise
      # By default every objective is tried; those the suite's config
      # cannot train as it is (a teacher to distil, say) are left out.
      logging.warning("Leaving out %s: %s", name, e)
      skipped[name] = str(e)
      continue
    configs.update(runs)
  objective_names = [o for o in objective_names if o not in skipped]
  results = {"suite": suite_name, "nfe": list(NFES), "runs": {},
             "left_out": skipped}
  samples = {}
  for (row, dataset), config in configs.items():  # the baseline first
    workdir = os.path.join(output, row, dataset)
    kind = "toy2d" if dataset in toy2d.DATASETS else "digits"
    learns_from = row_learns_from(row)
    if learns_from:
      prepare_teacher(suite, output, dataset, configs[BASELINE, dataset],
                      learns_from)
    scores, samples[row, dataset], reused = run(
        config, workdir, kind, metric_keys(suite, config.eval.nfe))
    results["runs"].setdefault(row, {})[dataset] = {
        "workdir": files.absolute(workdir), "reused": reused,
        "steps": config.training.num_steps, "eval": scores,
        "teacher": (teacher_files(output, dataset)[learns_from == "pairs"]
                    if learns_from else ""),
        "ode_rtol": config.eval.ode_rtol, "ode_atol": config.eval.ode_atol}
  # FLOPs don't depend on the dataset: one per row (a student's includes
  # its teacher's passes), the baseline's even when it is not in the table.
  flops = {}
  for name in dict.fromkeys([BASELINE, *objective_names]):
    config = configs.get((name, suite.datasets[0])) or run_config(
        suite, name, suite.datasets[0], steps, num_samples, overrides)
    flops[name] = cached_flops(config, os.path.join(
        output, name, "train_step_flops.json"))
  for name, runs in results["runs"].items():
    for entry in runs.values():
      entry["train_step_flops"] = flops[name]
      entry["flops_vs_flow_matching"] = (
          flops[name] / flops[BASELINE]
          if flops[name] and flops[BASELINE] else None)
  num_steps = next(iter(configs.values())).training.num_steps
  if jax.process_index() == 0:
    files.write_json(os.path.join(output, "results.json"), results)
    with open(os.path.join(output, "table.md"), "w") as f:
      f.write(table_markdown(suite, results, num_steps))
    samples_figure(suite, samples, results,
                   os.path.join(output, "samples.png"))
  return results


def main(argv):
  del argv
  compare(_SUITE.value, _OUTPUT.value, _OBJECTIVES.value, _STEPS.value,
          _NUM_SAMPLES.value, _DATASETS.value, parse_overrides(_SET.value))
  print(open(os.path.join(_OUTPUT.value, "table.md")).read())


if __name__ == "__main__":
  # Flags are defined here so that the module imports cleanly in tests.
  _SUITE = flags.DEFINE_enum("suite", None, sorted(SUITES), "Which suite.")
  _OUTPUT = flags.DEFINE_string("output", None, "Output folder: runs, "
                                "table.md, results.json, samples.png.")
  _OBJECTIVES = flags.DEFINE_list(
      "objectives", None, "Objectives to compare (default: all).")
  _STEPS = flags.DEFINE_integer(
      "steps", None, "Training steps per run (default: the suite config's).")
  _NUM_SAMPLES = flags.DEFINE_integer(
      "num_samples", None, "Samples per evaluation (default: the config's).")
  _DATASETS = flags.DEFINE_list(
      "datasets", None, "A subset of the suite's datasets (default: all).")
  _SET = flags.DEFINE_multi_string(
      "set", None, "section.field=value for every run, e.g. "
      "--set=training.batch_size=128 or --set=training.ema_decays=0.99 "
      "(changes the shared schedule).")
  flags.mark_flags_as_required(["suite", "output"])
  app.run(main)
