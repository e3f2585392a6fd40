"""skinrecords: sharded TFRecords, a tf.data pipeline and XLA augmentation for skin-lesion classifiers.

Data flows one way: sources -> preprocess -> records (write) -> manifest -> pipeline (read) ->
augment -> models -> train -> inference -> evaluate/predict/export. Modules are imported explicitly
(``from skinrecords import pipeline``) so that importing the package does not pull in TensorFlow
for tools that only need OpenCV.

The layout, in one place: tests/test_layout.py keeps this map true, and tools/relayout.py moves the
modules into these sub-packages. Each package lists its modules, then ("- ") what it owns. A package
imports only the packages above it; "never:" names one it must not import even so. Nothing imports
cli/ and no library module imports absl.flags; core/ and data/ import neither TensorFlow nor Keras
at module level (a converter worker starts in ~0.15 s without it, ~3.4 s with it).

    core/        fileio features tfrecord manifest rundir
                 - file access, the record schema, manifest.json, the run directory
    data/        labels patients dedup sources splits hair preprocess synthetic_structures
                 synthetic records workers convert
                 - the converter's write side: inputs, labels, splits, OpenCV preprocessing, shards
    input/       kaggle pipeline data_service augment
                 - the tf.data reader (ours and SIIM-ISIC files), the tf.data service, augmentation
    model/       backbones models recipes xla inference
                 - backbones, the model, the training recipe, the XLA policy, the one forward pass
    evaluation/  uncertainty metrics calibration plots submission ensemble explain evaluate predict
                 - metrics with intervals, calibration, figures, submissions, ensembles, reports
    training/    distribute feeding selection run_state steps train cv
                 - strategies and clusters, distributed input, epoch selection, the loop, CV
    serving/     export
                 - SavedModel and TFLite export
                 never: training
    cli/         common data_service evaluate export make_records make_synthetic predict
                 show_preprocessing train verify_records
                 - the commands: absl flags -> a config -> one library call
"""

__version__ = "0.1.0"
