"""skinrecords: sharded TFRecords, a tf.data pipeline and XLA augmentation for skin-lesion classifiers.

Data flows one way, one module per stage:
sources -> preprocess -> records (write) -> pipeline (read) -> augment -> models -> train/evaluate.
Modules are imported explicitly (``from skinrecords import pipeline``) so that importing the
package does not pull in TensorFlow for tools that only need OpenCV.
"""

__version__ = "0.1.0"
