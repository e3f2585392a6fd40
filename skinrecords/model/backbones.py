"""Which backbones `--backbone` accepts, each one's family, and where ImageNet weights come from.

Every keras.applications constructor is accepted by its own name (`EfficientNetB3`,
`ConvNeXtTiny`, `ResNet50V2`...), besides the five short names the project started with. What a
backbone needs from us depends only on its family (the keras.applications module it lives in): the
ImageNet normalisation its weights were trained with, which `models.BackbonePreprocess` applies
inside the model, and the smallest input side keras.applications accepts. The table below is that
knowledge, one row per family; tests/test_models.py checks every row against the installed
Keras (each family's `preprocess_input` on known pixels, and that every constructor is listed).

ImageNet weights: the four original backbones' files are fetched and verified here (IMAGENET_FILES,
with an offline error naming the file to place); every other constructor uses Keras' own download.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import pathlib
import socket

import keras

SIMPLE_CNN = "simple_cnn"
# Per-read socket timeout for the ImageNet download: generous for a slow link (it bounds one read,
# not the whole 60-95 MB file) but short enough that a firewalled machine fails instead of hanging.
DOWNLOAD_TIMEOUT_S = 20


@dataclasses.dataclass(frozen=True)
class Family:
  """One keras.applications module: how its inputs are normalised and how small they may be."""
  module: str  # keras.applications.<module>, whose preprocess_input this reproduces
  # models.BackbonePreprocess mode equal to <module>.preprocess_input on RGB 0..255: "caffe"
  # (BGR minus means), "torch" (/255, ImageNet mean/std), "tf" (/127.5 - 1), "none" (the network
  # rescales inside itself and preprocess_input is the identity).
  mode: str
  members: tuple[str, ...]
  # The min_size keras.applications passes to obtain_input_shape (it raises below it): 75 for the
  # Inception nets, 71 for Xception, 32 for the rest (mobilenet_v3 does not check; 32 is kept for
  # it too, and tests/test_models.py trains each family's first member at its min_size).
  min_size: int = 32
  # Constructor arguments: the families that can include their own rescaling do (so the "none"
  # mode is right), and say so explicitly in case Keras changes a default.
  kwargs: tuple[tuple[str, object], ...] = ()


_OWN_PREPROCESSING = (("include_preprocessing", True),)

FAMILIES = (
    Family("vgg16", "caffe", ("VGG16",)),
    Family("vgg19", "caffe", ("VGG19",)),
    Family("resnet", "caffe", ("ResNet50", "ResNet101", "ResNet152")),
    Family("resnet_v2", "tf", ("ResNet50V2", "ResNet101V2", "ResNet152V2")),
    Family("densenet", "torch", ("DenseNet121", "DenseNet169", "DenseNet201")),
    Family("efficientnet", "none", tuple(f"EfficientNetB{i}" for i in range(8))),
    Family("efficientnet_v2", "none", ("EfficientNetV2B0", "EfficientNetV2B1", "EfficientNetV2B2",
                                       "EfficientNetV2B3", "EfficientNetV2S", "EfficientNetV2M",
                                       "EfficientNetV2L"), kwargs=_OWN_PREPROCESSING),
    Family("convnext", "none", ("ConvNeXtTiny", "ConvNeXtSmall", "ConvNeXtBase", "ConvNeXtLarge",
                                "ConvNeXtXLarge"), kwargs=_OWN_PREPROCESSING),
    Family("mobilenet", "tf", ("MobileNet",)),
    Family("mobilenet_v2", "tf", ("MobileNetV2",)),
    Family("mobilenet_v3", "none", ("MobileNetV3Small", "MobileNetV3Large"),
           kwargs=_OWN_PREPROCESSING),
    Family("inception_v3", "tf", ("InceptionV3",), min_size=75),
    Family("inception_resnet_v2", "tf", ("InceptionResNetV2",), min_size=75),
    Family("xception", "tf", ("Xception",), min_size=71),
    Family("nasnet", "tf", ("NASNetMobile", "NASNetLarge")),
)

# The original short names, kept (config.json files and READMEs use them).
ALIASES = {"vgg16": "VGG16", "resnet50": "ResNet50", "densenet121": "DenseNet121",
           "efficientnetv2s": "EfficientNetV2S"}
_FAMILY_OF = {member: family for family in FAMILIES for member in family.members}
CONSTRUCTORS = tuple(_FAMILY_OF)
NAMES = (SIMPLE_CNN, *ALIASES, *CONSTRUCTORS)


def constructor_name(backbone: str) -> str:
  """The keras.applications constructor behind `backbone` (an alias or a constructor name)."""
  return ALIASES.get(backbone, backbone)


def family(backbone: str) -> Family:
  """The family row of a keras.applications backbone; ValueError listing the valid names."""
  check(backbone)
  if backbone == SIMPLE_CNN:
    raise ValueError(f"backbone={SIMPLE_CNN!r} is not a keras.applications network")
  return _FAMILY_OF[constructor_name(backbone)]


def check(backbone: str) -> None:
  """ValueError naming the closest valid names and listing all of them, for an unknown name."""
  if backbone in NAMES:
    return
  lowered = {name.lower(): name for name in NAMES}
  close = difflib.get_close_matches(str(backbone).lower(), list(lowered), n=3, cutoff=0.6)
  hint = f"did you mean {' or '.join(lowered[c] for c in close)}? " if close else ""
  raise ValueError(f"backbone={backbone!r} is unknown; {hint}valid: {', '.join(NAMES)} "
                   "(names are case-sensitive)")


def preprocess_mode(backbone: str) -> str:
  """The models.BackbonePreprocess mode for `backbone` ("scale" for simple_cnn)."""
  return "scale" if backbone == SIMPLE_CNN else family(backbone).mode


def min_image_size(backbone: str) -> int:
  """The smallest image side `backbone` is built at."""
  return 32 if backbone == SIMPLE_CNN else family(backbone).min_size


def constructor_kwargs(backbone: str) -> dict:
  return dict(family(backbone).kwargs)


@dataclasses.dataclass(frozen=True)
class _ImagenetFile:
  name: str  # file name under $KERAS_HOME/models/, as keras.applications names it
  url: str
  md5: str  # the no-top hash keras.applications verifies downloads with


_KERAS_APPS = "https://storage.googleapis.com/tensorflow/keras-applications/"
# Names, URLs and hashes as in keras/src/applications/{vgg16,resnet,densenet,efficientnet_v2}.py
# (Keras 3.15); tests/test_models.py checks them against the installed Keras.
IMAGENET_FILES = {
    "vgg16": _ImagenetFile(
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _KERAS_APPS + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "6d6bbae143d832006294945121d1f1fc"),
    "resnet50": _ImagenetFile(
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _KERAS_APPS + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "4d473c1dd8becc155b73f8504c6f6626"),
    "densenet121": _ImagenetFile(
        "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _KERAS_APPS + "densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "30ee3e1110167f948a6b9946edeeb738"),
    "efficientnetv2s": _ImagenetFile(
        "efficientnetv2-s_notop.h5",
        _KERAS_APPS + "efficientnet_v2/efficientnetv2-s_notop.h5",
        "af0682fb74e8c54910f2d4393339c070"),
}


class WeightsUnavailableError(RuntimeError):
  """Requested weights cannot be found or fetched (missing file, no network, corrupt cache)."""


def keras_home() -> pathlib.Path:
  # keras.config reads KERAS_HOME once at import; read it per call so a later setenv is honoured.
  if "KERAS_HOME" in os.environ:
    return pathlib.Path(os.path.expanduser(os.environ["KERAS_HOME"]))
  base = os.path.expanduser("~")
  if not os.access(base, os.W_OK):
    base = "/tmp"  # Same fallback as keras.src.backend.config.
  return pathlib.Path(base) / ".keras"


def imagenet_weights_path(backbone: str) -> pathlib.Path:
  """Where the ImageNet no-top weights of `backbone` are cached ($KERAS_HOME/models/<file>)."""
  if backbone not in IMAGENET_FILES:
    raise ValueError(f"backbone={backbone!r} has no ImageNet weights; "
                     f"choose from {tuple(IMAGENET_FILES)}.")
  return keras_home() / "models" / IMAGENET_FILES[backbone].name


@contextlib.contextmanager
def socket_timeout(seconds: float):
  old = socket.getdefaulttimeout()
  socket.setdefaulttimeout(seconds)
  try:
    yield
  finally:
    socket.setdefaulttimeout(old)


def fetch_imagenet(backbone: str) -> str:
  """Returns a local path to the ImageNet weights, downloading once; fails fast when offline."""
  path = imagenet_weights_path(backbone)
  if path.exists():
    return str(path)
  spec = IMAGENET_FILES[backbone]
  try:
    with socket_timeout(DOWNLOAD_TIMEOUT_S):
      return keras.utils.get_file(spec.name, spec.url, cache_dir=str(path.parent.parent),
                                  cache_subdir="models", file_hash=spec.md5)
  except Exception as err:  # pylint: disable=broad-except  (URL, socket, hash errors alike)
    raise WeightsUnavailableError(
        f"ImageNet weights for backbone={backbone!r} are not cached at {path} and downloading "
        f"them failed ({type(err).__name__}: {err}). Download {spec.url} on a machine with "
        f"network access and place it as {path} (the directory is $KERAS_HOME/models, default "
        "~/.keras/models), or pass --weights=none (random init) or "
        f"--weights=/path/to/{spec.name}.") from err
