"""Keras 3 classifiers: an ImageNet backbone (or a small CNN) under a float32 logit head.

Every model takes RGB pixels in 0..255 (float32 or uint8) and applies its backbone's own ImageNet
preprocessing inside the graph, in a small serialisable layer. The notebook's ResNet50 run fed
``rescale=1/255`` images to a caffe-mode backbone (which expects 0..255 minus the BGR means), got
near-constant features and predicted one class for all 3,560 test images; with preprocessing inside
the model the input convention is the same for every backbone and that mistake cannot be made.

Layout: ``image -> preprocess -> <backbone sub-model> -> pool -> dropout -> logits``. The backbone
is the keras.applications model nested as one layer, so its layer names (``block4_conv1``,
``conv4_block1_1_conv``...) stay addressable for ``freeze="from:LAYER"``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Sequence

import keras

from skinrecords.core import fileio
from skinrecords.core import rundir
from skinrecords.model import backbones as backbones_lib
from skinrecords.model import batchnorm
# The ImageNet weight files live with the backbone table; these names are part of models' API.
from skinrecords.model.backbones import IMAGENET_FILES  # pylint: disable=unused-import
from skinrecords.model.backbones import WeightsUnavailableError
from skinrecords.model.backbones import imagenet_weights_path  # pylint: disable=unused-import

# The five short names; any keras.applications constructor name is accepted too (backbones.NAMES).
BACKBONES = ("simple_cnn", "vgg16", "resnet50", "densenet121", "efficientnetv2s")
_WEIGHT_SUFFIXES = (".weights.h5", ".h5", ".hdf5", ".keras")
# keras.applications rejects smaller inputs for most backbones (Inception 75, Xception 71:
# backbones.min_image_size); 32 also keeps 3+ poolings > 1 px.
_MIN_IMAGE_SIZE = 32

_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


def _parse_freeze(freeze: str) -> tuple[str, str | None]:
  if freeze in ("all", "none"):
    return freeze, None
  if isinstance(freeze, str) and freeze.startswith("from:") and len(freeze) > len("from:"):
    return "from", freeze[len("from:"):]
  raise ValueError(f"ModelConfig.freeze={freeze!r} is not valid; use 'all', 'none' or "
                   "'from:LAYER' (backbone layers before LAYER frozen, e.g. 'from:block4_conv1').")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """What `build_model` builds. `num_classes=2` gives one binary logit, more give softmax logits."""
  # The defaults are what `skinrecords-train` uses too (its flags read them from here): the
  # notebook's best backbone with ImageNet weights, at its 512 px.
  backbone: str = "densenet121"
  image_size: int = 512
  num_classes: int = 2
  # "auto" | "imagenet" | "none" | a .weights.h5 / .h5 / .keras file; auto: imagenet for the
  # keras.applications backbones, none for simple_cnn (which has no pretrained weights).
  weights: str = "auto"
  dropout: float = 0.3
  freeze: str = "none"  # "all" | "none" | "from:LAYER"
  # Patient metadata (issue 24): the length of the encoded "metadata" input (core.metadata's
  # MetadataSpec.width; train sets it from --metadata's columns), 0 for an image-only model, and
  # the dense branch it goes through before joining the pooled image features.
  metadata_features: int = 0
  metadata_width: int = 32
  metadata_dropout: float = 0.3

  def validate(self) -> None:
    """Raises ValueError naming the field, the bad value and what is accepted."""
    try:
      backbones_lib.check(self.backbone)
    except ValueError as err:
      raise ValueError(f"ModelConfig.{err}") from err
    least = backbones_lib.min_image_size(self.backbone)
    if (not isinstance(self.image_size, int) or isinstance(self.image_size, bool)
        or self.image_size < least):
      raise ValueError(f"ModelConfig.image_size={self.image_size!r} must be an int >= {least} "
                       f"(pixels per side): keras.applications builds {self.backbone} from "
                       f"{least} px up; records of another size are resized on read.")
    if (not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool)
        or self.num_classes < 2):
      raise ValueError(f"ModelConfig.num_classes={self.num_classes!r} must be an int >= 2 "
                       "(2 -> one binary logit, >2 -> one logit per class).")
    if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"ModelConfig.dropout={self.dropout!r} must be a float in [0, 1).")
    _parse_freeze(self.freeze)
    self._validate_metadata()
    if not isinstance(self.weights, str) or not self.weights:
      raise ValueError(f"ModelConfig.weights={self.weights!r} must be 'auto', 'imagenet', 'none' "
                       "or a path "
                       f"ending in one of {_WEIGHT_SUFFIXES}.")
    if self.weights == "imagenet" and self.backbone == "simple_cnn":
      raise ValueError("ModelConfig.weights='imagenet' has no meaning for backbone='simple_cnn'; "
                       "use 'none', a weights file, or a keras.applications backbone.")
    if self.weights not in ("auto", "imagenet", "none") and not self.weights.endswith(
        _WEIGHT_SUFFIXES):
      raise ValueError(f"ModelConfig.weights={self.weights!r} is neither 'auto', 'imagenet', "
                       "'none' nor a "
                       f"path ending in one of {_WEIGHT_SUFFIXES}.")

  def _validate_metadata(self) -> None:
    for name, least in (("metadata_features", 0), ("metadata_width", 1)):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"ModelConfig.{name}={value!r} must be an int >= {least}"
                         f"{' (units of the metadata branch; default 32)' if least else ''}.")
    value = self.metadata_dropout
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
      raise ValueError(f"ModelConfig.metadata_dropout={value!r} must be a float in [0, 1).")

  @property
  def resolved_weights(self) -> str:
    """`weights` with "auto" resolved for this backbone."""
    if self.weights != "auto":
      return self.weights
    return "none" if self.backbone == "simple_cnn" else "imagenet"

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@keras.saving.register_keras_serializable(package="skinrecords")
class BackbonePreprocess(keras.layers.Layer):
  """RGB 0..255 -> what a backbone was trained on; always computes in float32.

  Modes follow keras.applications.imagenet_utils.preprocess_input: "caffe" (RGB->BGR, minus the
  ImageNet BGR means), "torch" (/255, minus mean, over std), "tf" (/127.5 - 1), "scale" (/255) and
  "none" (cast only). Which backbone takes which: backbones.FAMILIES.
  """

  MODES = ("caffe", "torch", "tf", "scale", "none")

  def __init__(self, mode: str, **kwargs):
    # float32 even under mixed_float16: 255 - 123.68 in float16 would round to a step of 0.125.
    kwargs.setdefault("dtype", "float32")
    super().__init__(**kwargs)
    if mode not in self.MODES:
      raise ValueError(f"BackbonePreprocess mode={mode!r} is not one of {self.MODES}.")
    self.mode = mode

  def call(self, inputs):
    x = keras.ops.cast(inputs, "float32")
    if self.mode == "caffe":
      return keras.ops.flip(x, axis=-1) - keras.ops.convert_to_tensor(_CAFFE_BGR_MEAN, "float32")
    if self.mode == "torch":
      mean = keras.ops.convert_to_tensor(_TORCH_MEAN, "float32")
      std = keras.ops.convert_to_tensor(_TORCH_STD, "float32")
      return (x / 255.0 - mean) / std
    if self.mode == "tf":
      return x / 127.5 - 1.0
    if self.mode == "scale":
      return x / 255.0
    return x

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), "mode": self.mode}


def _simple_cnn(size: int) -> keras.Model:
  """The notebook's small CNN: 4 x (Conv3x3 + ReLU + MaxPool), 32-64-128-128 filters, 241k params.

  No batch norm on purpose. Measured on 64 px synthetic lesions (480 train / 120 validation images,
  15 steps an epoch): with BN (momentum 0.99) training accuracy hit 100% while validation predicted
  one class for 5 epochs, because the moving variance was still ~0.74 from its init of 1 against a
  batch variance of ~0.002; momentum 0.9 still lagged 2 epochs. Without BN validation AUC was 0.98
  after one epoch and 1.0 after five, and inference behaves exactly like training. Four poolings
  give a ~46 px receptive field, enough to see a whole lesion's border and asymmetry at 64 px.
  """
  inputs = keras.Input((size, size, 3), name="simple_cnn_input")
  x = inputs
  for i, filters in enumerate((32, 64, 128, 128), start=1):
    x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"block{i}_conv")(x)
    x = keras.layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
  return keras.Model(inputs, x, name="simple_cnn")


def _backbone(config: ModelConfig, weights: str | None) -> keras.Model:
  """The backbone network; `weights` is a local file, None, or "imagenet" (Keras downloads it)."""
  if config.backbone == backbones_lib.SIMPLE_CNN:
    return _simple_cnn(config.image_size)
  constructor = getattr(keras.applications, backbones_lib.constructor_name(config.backbone))
  with backbones_lib.socket_timeout(backbones_lib.DOWNLOAD_TIMEOUT_S):
    return constructor(include_top=False, weights=weights,
                       input_shape=(config.image_size, config.image_size, 3),
                       **backbones_lib.constructor_kwargs(config.backbone))


def _initial_bias(num_classes: int, class_counts: Sequence[int] | None) -> list[float] | None:
  """Log prior, so the untrained model predicts the class frequencies (Karpathy's 'init well')."""
  if class_counts is None:
    return None
  counts = [float(c) for c in class_counts]
  if len(counts) != num_classes or any(not math.isfinite(c) or c <= 0 for c in counts):
    raise ValueError(f"class_counts={list(class_counts)!r} must hold {num_classes} positive counts "
                     f"(one per class, num_classes={num_classes}).")
  total = sum(counts)
  if num_classes == 2:
    return [math.log(counts[1] / counts[0])]  # log(p / (1 - p)) with p = counts[1] / total
  return [math.log(c / total) for c in counts]


def _load_weights_file(model: keras.Model, path: str) -> None:
  """Loads a whole-model file, or failing that a backbone-only file (e.g. a *_notop.h5)."""
  if not fileio.exists(path):
    raise WeightsUnavailableError(f"weights file {path!r} does not exist; pass an existing "
                                  f"{'/'.join(_WEIGHT_SUFFIXES)} file, 'imagenet' or 'none'.")
  try:
    with warnings.catch_warnings():
      # A backbone-only .weights.h5 makes Keras warn once per nested container before it fails.
      warnings.simplefilter("ignore")
      model.load_weights(path)
    return
  except Exception as err:  # pylint: disable=broad-except
    model_err = err
  try:
    with warnings.catch_warnings():
      # Keras 3.15 warns about Functional's internal `_operations_by_depth` containers, which hold
      # no variables of their own; real mismatches still raise.
      warnings.filterwarnings("ignore", message="Skipping nested container")
      get_backbone(model).load_weights(path)
  except Exception as err:  # pylint: disable=broad-except
    raise ValueError(
        f"weights file {path!r} fits neither the whole model {model.name!r} "
        f"({_short(model_err)}) nor its backbone {get_backbone(model).name!r} ({_short(err)}). "
        "Was it saved from the same backbone and image_size?") from err


def _short(err: Exception, limit: int = 300) -> str:
  text = f"{type(err).__name__}: {err}".replace("\n", " ")
  return text if len(text) <= limit else text[:limit] + "..."


def build_model(config: ModelConfig, class_counts: Sequence[int] | None = None) -> keras.Model:
  """Builds `image (N, S, S, 3) RGB 0..255 -> logits (N, 1 or num_classes)`, float32 logits.

  Args:
    config: what to build; validated here.
    class_counts: optional examples per class; sets the head bias to the log prior.

  Raises:
    ValueError: bad config or class_counts, or a weights file that fits neither model nor backbone.
    WeightsUnavailableError: the weights file is missing or ImageNet weights cannot be fetched.
  """
  config.validate()
  bias = _initial_bias(config.num_classes, class_counts)
  backbone = _backbone_with_weights(config)

  inputs = keras.Input((config.image_size, config.image_size, 3), name="image")
  x = BackbonePreprocess(backbones_lib.preprocess_mode(config.backbone), name="preprocess")(inputs)
  x = backbone(x)
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  x = keras.layers.Dropout(config.dropout, name="dropout")(x)
  if config.metadata_features:
    inputs, x = _with_metadata_branch(config, inputs, x)
  units = 1 if config.num_classes == 2 else config.num_classes
  bias_init = keras.initializers.Constant(bias) if bias is not None else "zeros"
  # float32 head: under mixed_float16 float16 logits lose precision and saturate sigmoid/softmax.
  outputs = keras.layers.Dense(units, bias_initializer=bias_init, dtype="float32",
                               name="logits")(x)
  model = keras.Model(inputs, outputs, name=f"skinrecords_{config.backbone}")
  if config.resolved_weights not in ("imagenet", "none"):
    _load_weights_file(model, config.resolved_weights)
  # Every BatchNormalization (the backbone's; simple_cnn and the head have none) on TensorFlow's
  # fused kernel: DenseNet121's step 1.55-1.61 -> 1.05 CPU s on an AVX-512/AMX CPU, tf_keras's
  # cost (FIELD_NOTES); 1.02x on this AVX2 build machine (BUILD_NOTES "BatchNorm").
  batchnorm.fuse(model)
  set_freeze(model, config.freeze)
  return model


def _with_metadata_branch(config: ModelConfig, image, pooled):
  """({"image", "metadata"} inputs, the pooled image features joined by the metadata branch).

  The SIIM-ISIC 2020 winners (Ha, Liu, Liu) and the ISIC 2019 winners (Gessert et al.) put a small
  two-layer dense net on the metadata and concatenated its output with the pooled CNN features
  before the classifier; so here, at `metadata_width` units (they used 512/128 and 256 on ImageNet
  backbones' 1-2k features; 32 suits ~10-20 encoded inputs and small sets). No BatchNormalization:
  simple_cnn's docstring measured moving statistics lagging far behind on small sets, and a
  standardised, one-hot input needs none. Every layer follows the global dtype policy, so under
  mixed precision the branch's output has the image features' compute dtype when they meet.
  """
  meta = keras.Input((config.metadata_features,), name="metadata")
  m = meta
  for i in (1, 2):
    m = keras.layers.Dense(config.metadata_width, activation="relu", name=f"metadata_dense{i}")(m)
    m = keras.layers.Dropout(config.metadata_dropout, name=f"metadata_dropout{i}")(m)
  joined = keras.layers.Concatenate(name="image_and_metadata")([pooled, m])
  return {"image": image, "metadata": meta}, joined


def metadata_features(model: keras.Model) -> int:
  """The width of the model's "metadata" input, 0 for an image-only model."""
  if not isinstance(model.input, dict) or "metadata" not in model.input:
    return 0
  return int(model.input["metadata"].shape[-1])


def _backbone_with_weights(config: ModelConfig) -> keras.Model:
  """The backbone with its ImageNet weights (if asked for), or a one-line reason why not."""
  weights = None
  if config.resolved_weights == "imagenet":
    # The four files listed in IMAGENET_FILES are fetched (and verified) here; for every other
    # constructor Keras' own download runs, under the same socket timeout.
    weights = (backbones_lib.fetch_imagenet(config.backbone) if config.backbone in IMAGENET_FILES
               else "imagenet")
  try:
    return _backbone(config, weights)
  except Exception as err:  # pylint: disable=broad-except
    if weights is None:
      raise
    if weights == "imagenet":
      raise WeightsUnavailableError(
          f"ImageNet weights for backbone={config.backbone!r} are not cached and downloading them "
          f"failed ({_short(err)}); run once on a machine with network access and copy "
          f"{backbones_lib.keras_home() / 'models'} over, or pass --weights=none or a weights file.") from err
    raise WeightsUnavailableError(
        f"could not load ImageNet weights for {config.backbone!r} from {weights} "
        f"({_short(err)}); the file may be truncated: delete it to download again, or download "
        f"{IMAGENET_FILES[config.backbone].url} by hand.") from err


def get_backbone(model: keras.Model) -> keras.Model:
  """The backbone sub-model nested in a model built by `build_model`."""
  nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
  if len(nested) != 1:
    raise ValueError(f"model {model.name!r} has {len(nested)} nested sub-models, expected exactly "
                     "one backbone; was it built by skinrecords.model.models.build_model?")
  return nested[0]


def backbone_layer_names(model: keras.Model) -> list[str]:
  """Backbone layer names in order (input layer excluded): the valid LAYERs for 'from:LAYER'."""
  return [layer.name for layer in get_backbone(model).layers
          if not isinstance(layer, keras.layers.InputLayer)]


def _set_trainable(layer: keras.layers.Layer, value: bool) -> None:
  """`layer.trainable = value` that really reaches every sublayer.

  On the TF backend Keras 3.15 skips the assignment when the value is unchanged
  (KerasAutoTrackable.__setattr__ short-circuits `x.a = x.a` because `True is True`), so
  `model.trainable = True` on a trainable model leaves its frozen layers frozen. Flipping the value
  first makes the recursive setter run.
  """
  layer.trainable = not value
  layer.trainable = value


def set_freeze(model: keras.Model, freeze: str) -> None:
  """Sets which backbone layers train: 'all' (none train), 'none' (all train) or 'from:LAYER'.

  Can be called again to unfreeze after a warm-up; recompile (or rebuild the train step) after it,
  since Keras collects trainable variables when compiling. Frozen BatchNormalization layers run in
  inference mode in Keras 3 (trainable=False implies it), so their moving statistics stay put.
  The head is always trainable.
  """
  kind, layer_name = _parse_freeze(freeze)
  backbone = get_backbone(model)
  names = backbone_layer_names(model)
  if kind == "from" and layer_name not in names:
    shown = (", ".join(names[:5]) + ", ..., " + ", ".join(names[-5:]) if len(names) > 10
             else ", ".join(names))
    raise ValueError(f"freeze='from:{layer_name}': {backbone.name!r} has no layer {layer_name!r}; "
                     f"it has {len(names)} layers: {shown}.")
  _set_trainable(model, True)  # Every layer, the head included.
  if kind == "all":
    backbone.trainable = False  # True -> False always runs Keras's recursive setter.
  if kind != "from":
    return
  for layer in backbone.layers:
    if layer.name == layer_name:
      break
    layer.trainable = False


def load_model_dir(model_dir) -> tuple[keras.Model, rundir.RunConfig]:
  """Loads MODEL_DIR/model.keras and MODEL_DIR/config.json (`rundir.check_model_dir`); checks they
  agree. Safe mode stays on: it loads only registered classes, such as `BackbonePreprocess` here."""
  cfg = rundir.check_model_dir(model_dir)
  model_path = fileio.join(os.fspath(model_dir), rundir.MODEL_FILE)
  try:
    model = keras.models.load_model(model_path, compile=False)  # safe_mode stays on
  except Exception as err:  # pylint: disable=broad-except  (Keras raises many types here)
    raise ValueError(f"{model_path}: could not load the Keras model "
                     f"({type(err).__name__}: {err})") from err
  batchnorm.fuse(model)  # a run saved before the fused layer existed predicts on it too
  classes = cfg.classes
  units = model.outputs[0].shape[-1]
  expected = 1 if len(classes) == 2 else len(classes)
  if units != expected:
    raise ValueError(f"{model_path}: the model outputs {units} logit(s) but {rundir.CONFIG_FILE} "
                     f"lists {len(classes)} classes {classes}; expected {expected}")
  return model, cfg
