r"""Epoch-selection rules and decision thresholds, replayed over many seeds (issue 21).

Trains the README job (600 synthetic images, 64 px, simple_cnn, 8 epochs, lr 2e-3) once per seed,
recording every epoch's history row and its validation AND test predictions, then replays every
candidate selection rule (selection.RULES, through selection.replay: the rule training applies)
with every threshold (a fixed 0.5; Youden's J on the kept epoch's validation predictions) over those
saved predictions, offline. The same for a set with --imbalanced_fraction melanomas. Prints, per
data set, rule and threshold: test accuracy (min / mean), runs below 0.9, and sensitivity and
specificity (min). Predictions are kept in --workdir/<set>/seed_<s>.npz, so --replay_only reruns
the table without training.

  bench_selection --seeds=6 --workdir=/tmp/bench_selection --keep
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from absl import app
from absl import flags

from benchmarks import common

_SEEDS = flags.DEFINE_integer("seeds", 6, "Training seeds per data set (0 .. seeds-1).")
_FRACTION = flags.DEFINE_float("imbalanced_fraction", 0.15, "Melanoma fraction of the second set.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 600, "Synthetic images per set.")
_EPOCHS = flags.DEFINE_integer("epochs", 8, "Epochs per run.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where records and predictions go.")
_KEEP = flags.DEFINE_boolean("keep", False, "Keep the work folder.")
_CONTINUE = flags.DEFINE_string("continue_in", None, "A kept work folder: train only the seeds "
                                "it lacks, then print the tables.")
_DETERMINISM_ROUNDS = flags.DEFINE_integer("determinism_rounds", 0, "Instead: time the README "
                                           "job with op determinism off and on, this many "
                                           "interleaved rounds.")
_REPLAY_ONLY = flags.DEFINE_string("replay_only", None, "A kept work folder: replay its saved "
                                   "predictions, train nothing.")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _records(root: pathlib.Path, name: str, fraction: float) -> pathlib.Path:
  images, records = root / name / "images", root / name / "records"
  if not (records / "manifest.json").exists():
    for cmd in (["make_synthetic", f"--output_dir={images}", f"--num_images={_NUM_IMAGES.value}",
                 "--min_size=96x72", "--max_size=160x120", f"--melanoma_fraction={fraction}"],
                ["make_records", f"--input_dir={images}", f"--output_dir={records}",
                 "--image_size=64", "--classes=NotMelanoma,Melanoma", "--noprogress"]):
      subprocess.run([sys.executable, str(ROOT / "bin" / cmd[0]), *cmd[1:]], check=True,
                     stdout=subprocess.DEVNULL)
  return records


def _train_recording(records: pathlib.Path, model_dir: pathlib.Path, seed: int) -> dict:
  """One README run; every epoch's row and valid/test predictions (selection.update_best hooked)."""
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from skinrecords.input import pipeline
  from skinrecords.model import inference, models
  from skinrecords.training import selection, train

  info = pipeline.load_info(str(records))
  sets = {s: pipeline.make_dataset(info, s, batch_size=64, training=False, image_size=64)
          for s in ("valid", "test")}
  rows, preds = [], {"valid": [], "test": []}
  original = selection.update_best

  def recording(state, row, epoch, has_valid, first, rule=selection.DEFAULT):
    rows.append({k: float(v) for k, v in row.items() if isinstance(v, (int, float))})
    for s, ds in sets.items():
      p, y, _ = inference.predict_dataset(state.model, ds)
      preds[s].append(p)
      preds[s + "_labels"] = y
    return original(state, row, epoch, has_valid, first, rule)

  selection.update_best = recording
  try:
    config = train.TrainConfig(
        records_dir=str(records), model_dir=str(model_dir), seed=seed, epochs=_EPOCHS.value,
        learning_rate=2e-3, progress=False, overwrite=True, deterministic="auto",
        model=models.ModelConfig(backbone="simple_cnn", weights="none", image_size=64))
    train.train(config)
  finally:
    selection.update_best = original
  return {"rows": rows, "valid": np.stack(preds["valid"]), "test": np.stack(preds["test"]),
          "valid_labels": preds["valid_labels"], "test_labels": preds["test_labels"]}


def _rates(probs, labels, threshold):
  import numpy as np  # pylint: disable=g-import-not-at-top
  predicted = probs >= threshold
  pos, neg = labels == 1, labels == 0
  return (float(np.mean(predicted == pos)), float(predicted[pos].mean()),
          float(1 - predicted[neg].mean()))


def replay(run: dict) -> dict:
  """{(rule, threshold kind): (test accuracy, sensitivity, specificity, kept epoch)}."""
  # pylint: disable=g-import-not-at-top
  from skinrecords.evaluation import thresholds
  from skinrecords.training import selection

  out = {}
  for rule in selection.RULES:
    epoch = selection.replay(run["rows"], True, rule)
    valid, test = run["valid"][epoch - 1], run["test"][epoch - 1]
    for kind in ("fixed:0.5", "youden"):
      t, _ = thresholds.choose(kind, valid, run["valid_labels"])
      out[(rule, kind)] = (*_rates(test, run["test_labels"], t), epoch)
  return out


def table(name: str, runs: list[dict]) -> str:
  import numpy as np  # pylint: disable=g-import-not-at-top
  results = [replay(r) for r in runs]
  lines = [f"{name}: {len(runs)} seeds, load average {os.getloadavg()[0]:.2f}",
           f"  {'rule':<13} {'threshold':<10} {'acc min':>7} {'acc mean':>8} {'<0.9':>4} "
           f"{'sens min':>8} {'spec min':>8}  kept epochs"]
  for key in results[0]:
    acc, sens, spec, epochs = (np.array([r[key][i] for r in results]) for i in range(4))
    lines.append(f"  {key[0]:<13} {key[1]:<10} {acc.min():7.3f} {acc.mean():8.3f} "
                 f"{int((acc < 0.9).sum()):4d} {sens.min():8.3f} {spec.min():8.3f}  "
                 f"{' '.join(str(int(e)) for e in epochs)}")
  return "\n".join(lines)


def _load(path: pathlib.Path) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  z = np.load(path)
  return {"rows": json.loads(str(z["rows"])), **{k: z[k] for k in
                                                 ("valid", "test", "valid_labels", "test_labels")}}


def _save(path: pathlib.Path, run: dict) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  np.savez(path, rows=json.dumps(run["rows"]), **{k: run[k] for k in
                                                  ("valid", "test", "valid_labels", "test_labels")})


def main(argv):
  del argv
  sets = {"balanced (README job)": ("balanced", 0.5),
          f"{_FRACTION.value:.0%} melanoma": ("imbalanced", _FRACTION.value)}
  if _REPLAY_ONLY.value:
    for title, (name, _) in sets.items():
      folder = pathlib.Path(_REPLAY_ONLY.value) / name
      runs = [_load(p) for p in sorted(folder.glob("seed_*.npz"))]
      if runs:
        print(table(title, runs))
    return
  if _CONTINUE.value:
    _all(pathlib.Path(_CONTINUE.value), sets)
    return
  with common.work_folder("bench_selection_", _WORKDIR.value, _KEEP.value) as root:
    _all(root, sets)


def _all(root: pathlib.Path, sets: dict) -> None:
  for title, (name, fraction) in sets.items():
    records = _records(root, name, fraction)
    if _DETERMINISM_ROUNDS.value:
      print(determinism_cost(records, root / "timing", _DETERMINISM_ROUNDS.value), flush=True)
      return
    runs = []
    for seed in range(_SEEDS.value):
      path = root / name / f"seed_{seed}.npz"
      if not path.exists():
        _save(path, _train_recording(records, root / name / "model", seed))
      runs.append(_load(path))
      print(f"{title}: seed {seed} done", flush=True)
    print(table(title, runs), flush=True)


def determinism_cost(records: pathlib.Path, model_dir: pathlib.Path, rounds: int) -> str:
  """Wall time of the README job (3 epochs) with op determinism off and on, interleaved."""
  # pylint: disable=g-import-not-at-top
  import time
  from skinrecords.model import models
  from skinrecords.training import train

  times = {"off": [], "on": []}
  for r in range(rounds):
    for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
      config = train.TrainConfig(
          records_dir=str(records), model_dir=str(model_dir), seed=r, epochs=3,
          learning_rate=2e-3, progress=False, overwrite=True, deterministic=mode,
          model=models.ModelConfig(backbone="simple_cnn", weights="none", image_size=64))
      t0 = time.perf_counter()
      train.train(config)
      times[mode].append(time.perf_counter() - t0)
  off, on = sorted(times["off"]), sorted(times["on"])
  return (f"README job, 3 epochs, {rounds} interleaved rounds, load average "
          f"{os.getloadavg()[0]:.2f}: deterministic off {off} s, on {on} s; median on/off "
          f"{on[len(on) // 2] / off[len(off) // 2]:.3f}")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
