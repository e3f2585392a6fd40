"""skinrecords: sharded TFRecords, a tf.data pipeline and XLA augmentation for skin-lesion classifiers.

Data flows one way: sources -> preprocess -> records (write) -> manifest -> pipeline (read) ->
augment -> models -> train -> inference -> evaluate/predict/export. Modules are imported explicitly,
never through this package's namespace, so that importing the package does not pull in TensorFlow
for tools that only need OpenCV.

The layout, in one place: tests/test_layout.py keeps this map true (a new module goes into its
package here and in the tree). Each package lists its modules, then ("- ") what it owns. A package
imports only the packages above it; "never:" names one it must not import even so. Nothing imports
cli/ and no library module imports absl.flags; core/ and data/ import neither TensorFlow nor Keras
at module level (a converter worker starts in ~0.15 s without it, ~3.4 s with it).

    core/        fileio features tfrecord manifest metadata rundir tflog waiting interop
                 - file access, record schema, manifest.json, run directory, TF logs, bounded waits
    data/        labels patients dedup sources splits hair preprocess synthetic_structures
                 synthetic pseudonyms neardup records workers meta_columns convert
                 - the converter's write side: inputs, labels, splits, OpenCV preprocessing, shards
    input/       kaggle metadata_input pipeline data_service augment
                 - the tf.data reader (ours and SIIM-ISIC files), the tf.data service, augmentation
    model/       backbones batchnorm models recipes xla inference
                 - backbones, the model, the training recipe, the XLA policy, the one forward pass
    evaluation/  uncertainty metrics thresholds calibration plots submission ensemble explain evaluate
                 metadata_csv predict
                 - metrics with intervals, calibration, figures, submissions, ensembles, reports
    training/    distribute feeding selection run_state steps train cv
                 - strategies and clusters, distributed input, epoch selection, the loop, CV
    serving/     serving metadata_inputs export score_folder
                 - SavedModel and TFLite export, the converter's geometry as a graph
                 never: training
    cli/         common data_service evaluate export make_records make_synthetic predict
                 show_preprocessing train verify_records
                 - the commands: absl flags -> a config -> one library call
"""

__version__ = "0.1.0"


def layout() -> tuple[dict[str, list[str]], dict[str, set[str]]]:
  """The map above as data: ({package: its modules} in table order, {package: what it never
  imports}). Read by tests/test_layout.py, which keeps it true."""
  import re  # pylint: disable=g-import-not-at-top

  packages: dict[str, list[str]] = {}
  never: dict[str, set[str]] = {}
  current = None
  for line in (__doc__ or "").splitlines():
    m = re.match(r"^    (\w+)/\s+(.*)$", line)
    if m:
      current = m[1]
      packages[current], never[current] = m[2].split(), set()
    elif current and line.startswith(" " * 17) and line.strip():
      item = line.strip()
      if item.startswith("never:"):
        never[current] |= {n.strip().rstrip("/") for n in item[len("never:"):].split(",")}
      elif not item.startswith("- "):
        packages[current] += item.split()
    else:
      current = None
  if not packages:
    raise RuntimeError("no map of the layout in the docstring of skinrecords/__init__.py "
                       "(python -OO strips docstrings)")
  return packages, never
