r"""Does patient metadata help? Image-only, image+metadata and image+SHUFFLED-metadata on one split.

Makes a synthetic set whose metadata carries a known signal (make_synthetic --metadata
--metadata_signal: melanoma patients older, more often male, more often on head/neck or the upper
extremity) and whose images are less than perfectly informative (--image_signal: the other
melanomas look exactly like nevi), converts it with make_records --metadata_columns, and makes a
copy of the records whose metadata is permuted among the records of each split (same values, same
training statistics, no link to the label left). Then, per seed, in interleaved order, trains the
same model three ways on the same train/valid split (train --metadata="" / all / all on the
shuffled copy) and scores each on the same test split: test ROC AUC with its 95 % bootstrap
interval (patients resampled), and the paired bootstrap of the AUC difference to image-only (the
same resamples for both models). Image+metadata must beat image-only when the metadata carries
signal (the difference's interval above 0), and must not when it is shuffled.

  bench_metadata --num_images=600 --epochs=8 --seeds=1
  bench_metadata --metadata_signal=0 ...     (no signal: the metadata must not help either)
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

from absl import app
from absl import flags

from benchmarks import common

_NUM_IMAGES = flags.DEFINE_integer("num_images", 600, "Synthetic images.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Record and model image side.")
_FRACTION = flags.DEFINE_float("melanoma_fraction", 0.3, "Melanoma fraction of the set.")
_METADATA_SIGNAL = flags.DEFINE_float("metadata_signal", 1.0, "make_synthetic --metadata_signal.")
_IMAGE_SIGNAL = flags.DEFINE_float("image_signal", 0.4, "make_synthetic --image_signal: the "
                                   "fraction of melanomas that look malignant.")
_PER_PATIENT = flags.DEFINE_integer(
    "images_per_patient", 1, "make_synthetic --images_per_patient. The intervals resample "
    "patients: at its default of 4, 600 images leave 30 test patients and intervals ~0.35 wide.")
_EPOCHS = flags.DEFINE_integer("epochs", 8, "Epochs per run.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Training seeds (0 .. seeds-1), each training all "
                              "three models in turn.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Batch size.")
_LR = flags.DEFINE_float("learning_rate", 2e-3, "Learning rate.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples for the intervals.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the images, records and runs go.")
_KEEP = flags.DEFINE_boolean("keep", False, "Keep the work folder.")

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLUMNS = "sex,age_approx,anatom_site_general_challenge"
VARIANTS = ("image only", "image+metadata", "image+shuffled metadata")


def _run(cmd: list[str]) -> None:
  subprocess.run([sys.executable, str(ROOT / "bin" / cmd[0]), *cmd[1:]], check=True,
                 stdout=subprocess.DEVNULL, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def make_records(root: pathlib.Path) -> pathlib.Path:
  """The synthetic set with its metadata, converted (64 px, 60/20/20 split by patient)."""
  images, records = root / "images", root / "records"
  _run(["make_synthetic", f"--output_dir={images}", f"--num_images={_NUM_IMAGES.value}",
        "--flat", "--metadata", f"--metadata_signal={_METADATA_SIGNAL.value}",
        f"--image_signal={_IMAGE_SIGNAL.value}", f"--melanoma_fraction={_FRACTION.value}",
        f"--images_per_patient={_PER_PATIENT.value}", "--min_size=96x72", "--max_size=160x120",
        "--seed=0"])
  _run(["make_records", f"--input_dir={images / 'images'}", f"--labels_csv={images / 'labels.csv'}",
        "--patient_column=patient_id", f"--metadata_columns={COLUMNS}",
        f"--output_dir={records}", f"--image_size={_IMAGE_SIZE.value}", "--noprogress"])
  return records


def shuffled_copy(records: pathlib.Path, out: pathlib.Path, seed: int = 0) -> pathlib.Path:
  """A copy of `records` whose meta/ features are permuted among the records of each split: every
  value (and every missing one) stays in its split, so the training statistics are the same, but
  which image it belongs to is random. Fold statistics would change: they are dropped."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from skinrecords.core import metadata as md  # pylint: disable=g-import-not-at-top

  shutil.copytree(records, out)
  manifest = json.loads((out / "manifest.json").read_text())
  rng = np.random.default_rng(seed)
  for info in manifest["splits"].values():
    files = [out / s["file"] for s in info["shards"]]
    examples = [[tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(f))]
                for f in files]
    flat = [ex for group in examples for ex in group]
    metas = [{k: v for k, v in ex.features.feature.items() if k.startswith(md.PREFIX)}
             for ex in flat]
    order = rng.permutation(len(flat))
    for ex, j in zip(flat, order):
      for key in [k for k in ex.features.feature if k.startswith(md.PREFIX)]:
        del ex.features.feature[key]
      for key, value in metas[j].items():
        ex.features.feature[key].CopyFrom(value)
    for path, group in zip(files, examples):
      with tf.io.TFRecordWriter(str(path)) as writer:
        for ex in group:
          writer.write(ex.SerializeToString(deterministic=True))
  for column in manifest["metadata"]["columns"]:
    column.pop("folds", None)
  manifest["fingerprint"] = f"{manifest['fingerprint']}-metadata-shuffled-{seed}"
  (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
  return out


def train_and_score(records: pathlib.Path, model_dir: pathlib.Path, metadata: str,
                    seed: int) -> dict:
  """One run; its test probabilities, labels and patient ids."""
  # pylint: disable=g-import-not-at-top
  from skinrecords.input import pipeline
  from skinrecords.model import inference, models
  from skinrecords.training import train

  config = train.TrainConfig(
      records_dir=str(records), model_dir=str(model_dir), seed=seed, epochs=_EPOCHS.value,
      model=models.ModelConfig(backbone="simple_cnn", image_size=_IMAGE_SIZE.value,
                               weights="none"),
      batch_size=_BATCH.value, learning_rate=_LR.value, progress=False, metadata=metadata)
  summary = train.train(config)
  model, cfg = models.load_model_dir(model_dir)
  info = pipeline.load_info(str(records))
  probs, labels, names = inference.predict_split(
      model, info, "test", image_size=cfg.image_size, batch_size=64,
      metadata=inference.run_metadata(model, model_dir))
  return {"probs": probs, "labels": labels,
          "groups": pipeline.patient_ids(info, "test", None, names),
          "val_auc": (summary.get("best_metrics") or {}).get("val_auc"),
          "epoch": summary.get("best_epoch")}


def scores(runs: dict, resamples: int, seed: int = 0) -> dict:
  """Per variant: test AUC and its interval; per other variant: the paired AUC difference to
  image-only with its interval (one set of patient resamples for all three)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from skinrecords.evaluation import uncertainty  # pylint: disable=g-import-not-at-top

  base = runs[VARIANTS[0]]
  labels, groups = base["labels"], base["groups"]
  for run in runs.values():
    if not np.array_equal(run["labels"], labels):
      raise RuntimeError("the three runs scored different test images")
  _, inverse = np.unique(np.asarray(groups if groups else range(len(labels)), dtype=str),
                         return_inverse=True)
  rng = np.random.default_rng(seed)
  draws = rng.integers(0, inverse.max() + 1, size=(resamples, inverse.max() + 1))
  counts = np.stack([np.bincount(d, minlength=inverse.max() + 1) for d in draws])[:, inverse]
  boot, out = {}, {}
  for name, run in runs.items():
    sorted_scores = uncertainty.SortedScores(run["probs"], labels == 1)
    boot[name] = uncertainty.weighted_auc_ap(sorted_scores, counts.astype(np.float64))[0]
    auc = uncertainty.rank_auc(labels, run["probs"])
    out[name] = {"auc": auc, "ci": _interval(boot[name]), "val_auc": run["val_auc"],
                 "epoch": run["epoch"]}
  for name in VARIANTS[1:]:
    out[name]["delta"] = out[name]["auc"] - out[VARIANTS[0]]["auc"]
    out[name]["delta_ci"] = _interval(boot[name] - boot[VARIANTS[0]])
  out["n"], out["positives"] = len(labels), int((labels == 1).sum())
  out["units"] = int(inverse.max() + 1)
  return out


def _interval(values) -> list[float]:
  import numpy as np  # pylint: disable=g-import-not-at-top

  values = values[np.isfinite(values)]
  return [float(x) for x in np.percentile(values, [2.5, 97.5])]


def table(per_seed: list[dict]) -> str:
  """The side-by-side table, one block per seed, and the verdicts."""
  lines = []
  for seed, s in enumerate(per_seed):
    lines.append(f"seed {seed}: test split, {s['n']} images ({s['positives']} melanoma) of "
                 f"{s['units']} patients; 95 % bootstrap intervals, patients resampled")
    lines.append(f"  {'model':<26}{'test AUC':>9}  {'95% CI':<16}{'vs image only':>14}  "
                 f"{'95% CI of the difference':<26}{'val AUC':>8}")
    for name in VARIANTS:
      r = s[name]
      delta = (f"{r['delta']:>+14.4f}  [{r['delta_ci'][0]:+.4f}, {r['delta_ci'][1]:+.4f}]"
               if "delta" in r else f"{'':>14}  {'':<18}")
      lines.append(f"  {name:<26}{r['auc']:>9.4f}  [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}]"
                   f"{delta:<42}{'' if r['val_auc'] is None else format(r['val_auc'], '.4f'):>8}")
    helps = s[VARIANTS[1]]["delta_ci"][0] > 0
    shuffled = s[VARIANTS[2]]["delta_ci"][0] > 0
    lines.append(f"  {'PASS' if helps else 'MISS'} image+metadata beats image only (the "
                 "difference's interval lies above 0)")
    lines.append(f"  {'PASS' if not shuffled else 'MISS'} image+shuffled metadata does not "
                 "(its difference's interval reaches 0 or below)")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _SEEDS.value < 1 or _EPOCHS.value < 1 or _NUM_IMAGES.value < 60:
    raise app.UsageError("--seeds and --epochs must be >= 1, --num_images >= 60")
  with common.work_folder("bench_metadata_", _WORKDIR.value, _KEEP.value) as root:
    records = make_records(root)
    data = {VARIANTS[0]: (records, ""), VARIANTS[1]: (records, "all"),
            VARIANTS[2]: (shuffled_copy(records, root / "records_shuffled"), "all")}
    per_seed = []
    for seed in range(_SEEDS.value):
      runs = {}
      for i, (name, (where, metadata)) in enumerate(data.items()):
        runs[name] = train_and_score(where, root / f"seed{seed}" / f"run{i}", metadata, seed)
        print(f"seed {seed}: {name} trained", flush=True)
      per_seed.append(scores(runs, _BOOTSTRAP.value, seed))
    print(f"bench_metadata: {_NUM_IMAGES.value} synthetic images at {_IMAGE_SIZE.value} px, "
          f"metadata_signal={_METADATA_SIGNAL.value}, image_signal={_IMAGE_SIGNAL.value}, "
          f"melanoma_fraction={_FRACTION.value}, images_per_patient={_PER_PATIENT.value}; "
          f"simple_cnn, {_EPOCHS.value} epochs, batch "
          f"{_BATCH.value}, lr {_LR.value}; metadata: {COLUMNS}")
    print(table(per_seed))
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  return 0


def run():
  app.run(main)


if __name__ == "__main__":
  run()
