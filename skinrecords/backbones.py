"""Which backbones `--backbone` accepts, and each one's family: input preprocessing, minimum size.

Every keras.applications constructor is accepted by its own name (`EfficientNetB3`,
`ConvNeXtTiny`, `ResNet50V2`...), besides the five short names the project started with. What a
backbone needs from us depends only on its family (the keras.applications module it lives in): the
ImageNet normalisation its weights were trained with, which `models.BackbonePreprocess` applies
inside the model, and the smallest input side keras.applications accepts. The table below is that
knowledge, one row per family; tests/test_models.py checks every row against the installed
Keras (each family's `preprocess_input` on known pixels, and that every constructor is listed).
"""

from __future__ import annotations

import dataclasses
import difflib

SIMPLE_CNN = "simple_cnn"


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
  # Inception nets, 71 for Xception, 32 for the rest (mobilenet_v3 does not check; 32 is its
  # smallest side that keeps every stride-2 stage >= 1 px).
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
