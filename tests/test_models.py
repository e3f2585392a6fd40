"""Tests for skinrecords.model.models: every backbone trains, preprocesses like keras.applications,
freezes, saves in safe mode and fails fast without ImageNet weights."""

from __future__ import annotations

import dataclasses
import inspect
import math
import socket

import keras
import numpy as np
import pytest
import tensorflow as tf

from skinrecords.evaluation import explain
from skinrecords.model import backbones
from skinrecords.model import models

SIZE = 32  # The smallest input keras.applications accepts: keeps DenseNet/EfficientNet steps short.


@pytest.fixture(scope="module")
def built():
  """Lazily built binary models at 32 px, one per backbone, shared across tests."""
  cache = {}

  def get(backbone: str) -> keras.Model:
    if backbone not in cache:
      cache[backbone] = models.build_model(models.ModelConfig(backbone=backbone, image_size=SIZE,
                                                              weights="none"))
    return cache[backbone]

  return get


def _images(n: int = 2, size: int = SIZE, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.float32)


def _train_step(model: keras.Model, x: np.ndarray, y: np.ndarray, optimizer=None) -> float:
  optimizer = optimizer or keras.optimizers.Adam(1e-3)
  loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)
  with tf.GradientTape() as tape:
    loss = loss_fn(y, model(x, training=True))
  grads = tape.gradient(loss, model.trainable_variables)
  optimizer.apply_gradients(zip(grads, model.trainable_variables))
  return float(loss)


def _closed_port_url(name: str) -> str:
  """A URL whose connection is refused at once, so download tests never depend on the network."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return f"http://127.0.0.1:{port}/{name}"


def _first_weighted(backbone: keras.Model) -> keras.layers.Layer:
  return next(layer for layer in backbone.layers if layer.trainable_weights)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", models.BACKBONES)
def test_one_training_step_changes_weights(built, backbone):
  model = built(backbone)
  bb = model.get_layer(index=2)
  assert isinstance(bb, keras.Model)
  first = _first_weighted(bb).trainable_weights[0]
  before_first = first.numpy().copy()
  before_head = model.get_layer("logits").kernel.numpy().copy()
  loss = _train_step(model, _images(), np.array([[0.0], [1.0]], np.float32))
  assert math.isfinite(loss)
  assert np.abs(first.numpy() - before_first).max() > 0
  assert np.abs(model.get_layer("logits").kernel.numpy() - before_head).max() > 0
  assert model.output.shape == (None, 1)


def test_multiclass_output_and_log_prior_bias():
  counts = [50, 30, 15, 5]
  model = models.build_model(
      models.ModelConfig(backbone="simple_cnn", image_size=SIZE, num_classes=4), counts)
  out = model(_images(3))
  assert out.shape == (3, 4) and out.dtype == "float32"
  np.testing.assert_allclose(model.get_layer("logits").bias.numpy(),
                             np.log(np.array(counts) / sum(counts)), rtol=1e-6)


def test_binary_log_prior_bias():
  model = models.build_model(models.ModelConfig(backbone="simple_cnn", image_size=SIZE), [90, 10])
  bias = model.get_layer("logits").bias.numpy()
  p = 10 / 100
  np.testing.assert_allclose(bias, [math.log(p / (1 - p))], rtol=1e-6)
  # With a zero kernel the untrained model predicts the prior exactly.
  model.get_layer("logits").kernel.assign(np.zeros_like(model.get_layer("logits").kernel))
  np.testing.assert_allclose(keras.ops.sigmoid(model(_images())).numpy(), p, rtol=1e-5)


def test_simple_cnn_is_small(built):
  assert built("simple_cnn").count_params() < 300_000


@pytest.mark.parametrize("counts", [[10], [5, 0], [3, -1]])
def test_bad_class_counts(counts):
  with pytest.raises(ValueError, match="class_counts"):
    models.build_model(models.ModelConfig(backbone="simple_cnn", image_size=SIZE), counts)


# Known pixels: black, white, pure red, green, blue and an arbitrary colour, as RGB 0..255.
_PIXELS = np.array([[[[0, 0, 0], [255, 255, 255], [255, 0, 0]],
                     [[0, 255, 0], [0, 0, 255], [12, 200, 37]]]], np.float32)


def _caffe(x):
  return x[..., ::-1] - np.array([103.939, 116.779, 123.68], np.float32)


def _torch(x):
  return (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])


_REFERENCE = {
    "simple_cnn": (None, lambda x: x / 255.0),
    "vgg16": (keras.applications.vgg16.preprocess_input, _caffe),
    "resnet50": (keras.applications.resnet50.preprocess_input, _caffe),
    "densenet121": (keras.applications.densenet.preprocess_input, _torch),
    "efficientnetv2s": (keras.applications.efficientnet_v2.preprocess_input, lambda x: x),
}


@pytest.mark.parametrize("backbone", models.BACKBONES)
def test_preprocessing_matches_keras_applications(built, backbone):
  layer = built(backbone).get_layer("preprocess")
  assert isinstance(layer, models.BackbonePreprocess)
  got = layer(_PIXELS).numpy()
  keras_fn, formula = _REFERENCE[backbone]
  np.testing.assert_allclose(got, formula(_PIXELS.astype(np.float64)), atol=1e-4)
  if keras_fn is not None:
    np.testing.assert_allclose(got, keras_fn(_PIXELS.copy()), atol=1e-4)
  # uint8 pixels give the same result as float32 ones.
  np.testing.assert_array_equal(layer(_PIXELS.astype(np.uint8)).numpy(), got)
  if backbone == "efficientnetv2s":  # It rescales itself: include_preprocessing=True.
    assert any(isinstance(l, keras.layers.Rescaling) for l in built(backbone).layers[2].layers)


def test_model_accepts_uint8(built):
  model = built("simple_cnn")
  x = _images()
  np.testing.assert_allclose(model(x.astype(np.uint8)).numpy(), model(x).numpy(), rtol=1e-6)


def test_head_is_float32_under_mixed_precision():
  try:
    keras.mixed_precision.set_global_policy("mixed_float16")
    for backbone in ("simple_cnn", "vgg16"):
      model = models.build_model(models.ModelConfig(backbone=backbone, image_size=SIZE,
                                                            weights="none"), [3, 1])
      conv = _first_weighted(model.get_layer(index=2))
      assert conv.compute_dtype == "float16"
      assert model.get_layer("preprocess").compute_dtype == "float32"
      assert model.get_layer("logits").compute_dtype == "float32"
      assert model.get_layer("logits").kernel.dtype == "float32"
      out = model(_images())
      assert out.dtype == "float32"
      assert np.isfinite(out.numpy()).all()
  finally:
    keras.mixed_precision.set_global_policy("float32")


def test_freeze_from_layer_vgg16():
  model = models.build_model(
      models.ModelConfig(backbone="vgg16", image_size=SIZE, freeze="from:block4_conv1",
                         weights="none"))
  names = models.backbone_layer_names(model)
  start = names.index("block4_conv1")
  expected = set(names[start:])
  bb = model.get_layer("vgg16")
  assert {l.name for l in bb.layers if l.trainable and l.name in names} == expected
  trainable_ids = {id(v) for v in model.trainable_weights}
  expected_ids = {id(v) for l in bb.layers if l.name in expected for v in l.weights}
  expected_ids |= {id(v) for v in model.get_layer("logits").weights}
  assert trainable_ids == expected_ids
  # block4_conv1..block5_conv3 (6 convs) + head: 7 kernels and 7 biases.
  assert len(model.trainable_weights) == 14

  models.set_freeze(model, "all")
  assert [v.path for v in model.trainable_weights] == [v.path for v in
                                                       model.get_layer("logits").weights]
  models.set_freeze(model, "none")
  assert len(model.trainable_weights) == len(model.weights) == 13 * 2 + 2


def test_freeze_from_layer_resnet50_notebook_name(built):
  model = built("resnet50")
  try:
    models.set_freeze(model, "from:conv4_block1_1_conv")
    bb = model.get_layer("resnet50")
    order = [l.name for l in bb.layers]
    start = order.index("conv4_block1_1_conv")
    assert all(not l.trainable for l in bb.layers[1:start])
    assert all(l.trainable for l in bb.layers[start:])
    assert not bb.get_layer("conv3_block4_out").trainable
    assert bb.get_layer("conv5_block3_3_bn").trainable
  finally:
    models.set_freeze(model, "none")


def test_unknown_freeze_layer_names_valid_choices():
  config = models.ModelConfig(backbone="vgg16", image_size=SIZE, freeze="from:block9_conv1",
                              weights="none")
  with pytest.raises(ValueError) as info:
    models.build_model(config)
  msg = str(info.value)
  assert "block9_conv1" in msg and "block1_conv1" in msg and "block5_pool" in msg
  assert "18 layers" in msg


@pytest.mark.slow
def test_frozen_batchnorm_keeps_moving_stats_until_unfrozen(built):
  model = built("resnet50")  # The notebook's fine-tuning set-up: conv4 onwards trainable.
  bb = model.get_layer("resnet50")
  try:
    models.set_freeze(model, "from:conv4_block1_1_conv")
    frozen, trained = bb.get_layer("conv2_block1_1_bn"), bb.get_layer("conv5_block1_1_bn")
    assert not frozen.trainable and trained.trainable
    frozen_mean = frozen.moving_mean.numpy().copy()
    frozen_gamma = frozen.gamma.numpy().copy()
    trained_mean = trained.moving_mean.numpy().copy()
    x, y = _images(2, seed=1), np.array([[0.0], [1.0]], np.float32)
    _train_step(model, x, y)
    np.testing.assert_array_equal(frozen.moving_mean.numpy(), frozen_mean)
    np.testing.assert_array_equal(frozen.gamma.numpy(), frozen_gamma)
    assert np.abs(trained.moving_mean.numpy() - trained_mean).max() > 0

    # Warm-up over: fine-tune everything (a new optimizer stands in for recompiling).
    models.set_freeze(model, "none")
    assert frozen.trainable and all(l.trainable for l in bb.layers)
    _train_step(model, x, y, keras.optimizers.Adam(1e-3))
    assert np.abs(frozen.moving_mean.numpy() - frozen_mean).max() > 0
    assert np.abs(frozen.gamma.numpy() - frozen_gamma).max() > 0
  finally:
    models.set_freeze(model, "none")


def test_set_freeze_none_unfreezes_after_partial_freeze():
  # Keras 3.15 (TF backend) skips `model.trainable = True` on an already-trainable model, which
  # would leave these layers frozen; set_freeze must not rely on it.
  model = models.build_model(
      models.ModelConfig(backbone="simple_cnn", image_size=SIZE, freeze="from:block3_conv"))
  bb = model.get_layer("simple_cnn")
  assert [l.name for l in bb.layers if l.trainable_weights] == ["block3_conv", "block4_conv"]
  models.set_freeze(model, "none")
  assert len(model.trainable_weights) == len(model.weights) == 10


@pytest.mark.parametrize("backbone", ["simple_cnn", "vgg16"])
def test_save_and_load_keras_in_safe_mode(built, backbone, tmp_path):
  model = built(backbone)
  models.set_freeze(model, "all")
  try:
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
  finally:
    models.set_freeze(model, "none")
  x = _images(3, seed=7)
  np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
  assert isinstance(loaded.get_layer("preprocess"), models.BackbonePreprocess)
  assert loaded.get_layer("preprocess").mode == model.get_layer("preprocess").mode
  assert not loaded.get_layer(index=2).trainable and loaded.get_layer("logits").trainable


def test_a_model_saved_before_the_relayout_still_loads(built, tmp_path):
  """model.keras files name each custom layer's module; before issue 22's sub-packages it was
  "skinrecords.models", now "skinrecords.model.models". Safe-mode loading finds the layer by its
  registered name ("skinrecords>BackbonePreprocess"), so old runs load (checked by hand too: a run
  and records made by release 2747d11 evaluate, predict and resume; BUILD_NOTES, Layout)."""
  import zipfile  # pylint: disable=g-import-not-at-top

  from skinrecords.core import rundir  # pylint: disable=g-import-not-at-top
  model = built("simple_cnn")
  new = tmp_path / "new.keras"
  model.save(new)
  run = tmp_path / "run"
  run.mkdir()
  with zipfile.ZipFile(new) as src, zipfile.ZipFile(run / "model.keras", "w") as dst:
    for item in src.infolist():
      data = src.read(item)
      if item.filename == "config.json":
        text = data.decode()
        assert '"module": "skinrecords.model.models"' in text
        data = text.replace('"module": "skinrecords.model.models"',
                            '"module": "skinrecords.models"').encode()
      dst.writestr(item, data)
  rundir.write_config(run, {"classes": ["a", "b"], "image_size": SIZE})
  loaded, cfg = models.load_model_dir(run)
  x = _images(3, seed=7)
  np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
  assert cfg.classes == ["a", "b"] and cfg.image_size == SIZE


@pytest.mark.slow
def test_weights_from_whole_model_and_backbone_files(tmp_path):
  config = models.ModelConfig(backbone="simple_cnn", image_size=SIZE)
  source = models.build_model(config)
  _train_step(source, _images(4), np.array([[0.0], [1.0], [1.0], [0.0]], np.float32))
  source.save_weights(tmp_path / "whole.weights.h5")
  source.get_layer("simple_cnn").save_weights(tmp_path / "backbone.weights.h5")
  x = _images(3, seed=3)

  whole = models.build_model(
      dataclasses.replace(config, weights=str(tmp_path / "whole.weights.h5")))
  np.testing.assert_array_equal(whole(x).numpy(), source(x).numpy())

  only_bb = models.build_model(
      dataclasses.replace(config, weights=str(tmp_path / "backbone.weights.h5")))
  for a, b in zip(only_bb.get_layer("simple_cnn").weights, source.get_layer("simple_cnn").weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())

  other = models.ModelConfig(backbone="simple_cnn", image_size=SIZE, num_classes=3)
  with pytest.raises(ValueError, match="whole.weights.h5"):
    models.build_model(dataclasses.replace(other, weights=str(tmp_path / "whole.weights.h5")))


def test_missing_weights_path(tmp_path):
  missing = str(tmp_path / "nope.weights.h5")
  with pytest.raises(models.WeightsUnavailableError, match="nope.weights.h5"):
    models.build_model(models.ModelConfig(backbone="vgg16", image_size=SIZE, weights=missing))


def test_imagenet_offline_fails_fast_naming_the_file(tmp_path, monkeypatch):
  monkeypatch.setenv("KERAS_HOME", str(tmp_path))
  spec = models.IMAGENET_FILES["resnet50"]
  monkeypatch.setitem(models.IMAGENET_FILES, "resnet50",
                      dataclasses.replace(spec, url=_closed_port_url(spec.name)))
  # Fast by construction, not by a stopwatch (no wall-clock assertions in tests): one download
  # attempt, under the bounded socket timeout, then the error.
  calls, real_get_file = [], keras.utils.get_file

  def get_file(*args, **kwargs):
    calls.append(socket.getdefaulttimeout())
    return real_get_file(*args, **kwargs)

  monkeypatch.setattr(keras.utils, "get_file", get_file)
  with pytest.raises(models.WeightsUnavailableError) as info:
    models.build_model(models.ModelConfig(backbone="resnet50", image_size=SIZE, weights="imagenet"))
  assert calls == [backbones.DOWNLOAD_TIMEOUT_S]
  msg = str(info.value)
  assert str(tmp_path / "models" / spec.name) in msg
  assert "--weights=none" in msg and "--weights=/path/to/" in msg
  assert not (tmp_path / "models" / spec.name).exists()  # No partial file left behind.


def test_imagenet_uses_cached_file_without_network(tmp_path, monkeypatch):
  monkeypatch.setenv("KERAS_HOME", str(tmp_path))
  spec = models.IMAGENET_FILES["vgg16"]
  monkeypatch.setitem(models.IMAGENET_FILES, "vgg16",
                      dataclasses.replace(spec, url=_closed_port_url(spec.name)))
  # Stand-in for the real notop file: a legacy .h5 of a VGG16 backbone, as keras.applications ships.
  donor = keras.applications.VGG16(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
  cached = models.imagenet_weights_path("vgg16")
  assert cached == tmp_path / "models" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
  cached.parent.mkdir(parents=True)
  donor.save(cached)
  model = models.build_model(
      models.ModelConfig(backbone="vgg16", image_size=SIZE, weights="imagenet"))
  for a, b in zip(model.get_layer("vgg16").weights, donor.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_imagenet_file_names_match_installed_keras():
  # pylint: disable-next=g-import-not-at-top
  from keras.src.applications import densenet, efficientnet_v2, resnet, vgg16
  files = models.IMAGENET_FILES
  assert files["vgg16"].url == vgg16.WEIGHTS_PATH_NO_TOP
  assert files["resnet50"].url == resnet.BASE_WEIGHTS_PATH + files["resnet50"].name
  assert files["densenet121"].url == densenet.DENSENET121_WEIGHT_PATH_NO_TOP
  assert files["efficientnetv2s"].url == (efficientnet_v2.BASE_WEIGHTS_PATH
                                         + "efficientnetv2-s_notop.h5")
  assert files["resnet50"].md5 == resnet.WEIGHTS_HASHES["resnet50"][1]
  assert files["efficientnetv2s"].md5 == efficientnet_v2.WEIGHTS_HASHES["-s"][1]
  for backbone, module in (("vgg16", vgg16), ("densenet121", densenet)):
    source = inspect.getsource(module)
    # keras passes the cache file name and its hash as adjacent literals to get_file.
    name_at = source.rindex(f'"{files[backbone].name}"')
    assert files[backbone].md5 in source[name_at:name_at + 300]
  for backbone, spec in files.items():
    assert spec.url.endswith("/" + spec.name), backbone


@pytest.mark.parametrize("kwargs,field", [
    ({"backbone": "vgg19"}, "backbone"),
    ({"image_size": 16}, "image_size"),
    ({"num_classes": 1}, "num_classes"),
    ({"dropout": 1.0}, "dropout"),
    ({"freeze": "some"}, "freeze"),
    ({"freeze": "from:"}, "freeze"),
    ({"weights": "model.pt"}, "weights"),
    ({"backbone": "simple_cnn", "weights": "imagenet"}, "weights"),  # no ImageNet weights.
])
def test_config_validation_names_field(kwargs, field):
  with pytest.raises(ValueError, match=f"ModelConfig.{field}="):
    models.ModelConfig(**kwargs).validate()


def test_config_to_dict_round_trips():
  config = models.ModelConfig(backbone="densenet121", image_size=64,
                              freeze="from:conv5_block1_0_bn")
  assert models.ModelConfig(**config.to_dict()) == config


def test_weights_auto_means_imagenet_except_for_simple_cnn():
  assert models.ModelConfig().weights == "auto"
  assert models.ModelConfig(backbone="simple_cnn").resolved_weights == "none"
  assert models.ModelConfig(backbone="densenet121").resolved_weights == "imagenet"
  assert models.ModelConfig(backbone="vgg16", weights="none").resolved_weights == "none"
  models.ModelConfig(backbone="simple_cnn").validate()  # auto is valid for every backbone


def test_every_keras_applications_constructor_has_its_family():
  """The family table lists exactly the installed constructors, each under the module defining
  it, so a Keras upgrade that adds a network fails here instead of at a user's --backbone."""
  installed = {name for name in dir(keras.applications)
               if name[0].isupper() and callable(getattr(keras.applications, name))}
  assert installed == set(backbones.CONSTRUCTORS)
  for family in backbones.FAMILIES:
    for name in family.members:
      module = getattr(keras.applications, name).__module__
      assert module.rsplit(".", 1)[-1] == family.module, (name, module)


@pytest.mark.parametrize("constructor", backbones.CONSTRUCTORS)
def test_in_model_preprocessing_equals_the_family_preprocess_input(constructor):
  family = backbones.family(constructor)
  layer = models.BackbonePreprocess(backbones.preprocess_mode(constructor))
  expected = getattr(keras.applications, family.module).preprocess_input(_PIXELS.copy())
  np.testing.assert_allclose(layer(_PIXELS).numpy(), expected, atol=1e-4)
  np.testing.assert_allclose(layer(_PIXELS.astype(np.uint8)).numpy(), expected, atol=1e-4)


@pytest.mark.parametrize("alias,constructor", sorted(backbones.ALIASES.items()))
def test_short_names_preprocess_like_their_constructor(alias, constructor):
  assert backbones.preprocess_mode(alias) == backbones.preprocess_mode(constructor)


@pytest.fixture(scope="module")
def smallest():
  """{family module: its first (smallest) member built at the family's minimum size}, lazily."""
  cache = {}

  def get(family: backbones.Family) -> keras.Model:
    if family.module not in cache:
      cache[family.module] = models.build_model(models.ModelConfig(
          backbone=family.members[0], image_size=family.min_size, weights="none"))
    return cache[family.module]

  return get


_FAMILY = {f.module: f for f in backbones.FAMILIES}


@pytest.mark.slow
@pytest.mark.parametrize("family", backbones.FAMILIES, ids=lambda f: f.module)
def test_smallest_member_of_each_family_trains_at_its_minimum_size(smallest, family):
  """One step at the family's smallest input (32 px; Inception 75, Xception 71), without weights,
  with the family's preprocessing in the model. (The largest members cost minutes on 2 CPU cores;
  they differ from these in depth and width only.)"""
  name, size = family.members[0], family.min_size
  model = smallest(family)
  assert model.get_layer("preprocess").mode == family.mode
  bb = models.get_backbone(model)
  if family.mode == "none":  # the network rescales itself (include_preprocessing or built in)
    own = (keras.layers.Rescaling, keras.layers.Normalization)
    assert any(isinstance(l, own) for l in bb.layers[:4]), [l.name for l in bb.layers[:4]]
  first = _first_weighted(bb).trainable_weights[0]
  before = first.numpy().copy()
  # SGD: no optimizer slots to allocate (ConvNeXtTiny and InceptionResNetV2 hold 28M and 54M
  # weights); the step is what is tested, not Adam.
  loss = _train_step(model, _images(size=size), np.array([[0.0], [1.0]], np.float32),
                     keras.optimizers.SGD(0.01))
  assert math.isfinite(loss), name
  assert np.abs(first.numpy() - before).max() > 0, name


# Grad-CAM reads the last spatial layer; these families end differently (ResNetV2 post_relu,
# EfficientNet top_activation, MobileNetV3 a numbered activation);
# the five original backbones are covered in tests/test_explain.py. ConvNeXt, NASNet and
# InceptionResNetV2 were checked by hand (10 s each here).
@pytest.mark.slow
@pytest.mark.parametrize("module", ["resnet_v2", "efficientnet", "mobilenet_v3"])
def test_gradcam_explains_other_families(smallest, module):
  family = _FAMILY[module]
  heat = explain.gradcam(smallest(family), _images(size=family.min_size).astype(np.uint8))
  # At 32 px the map is 1x1 (all five stride-2 stages): its one value is 0 or 1 by chance.
  assert heat.shape[0] == 2 and heat.ndim == 3 and 0 <= heat.min() <= heat.max() <= 1
  # Each of these backbones ends in its last block's activation: that is the map explained.
  model = smallest(family)
  assert explain.last_conv_layer(model) is models.get_backbone(model).layers[-1]


@pytest.mark.parametrize("backbone,size", [("InceptionV3", 74), ("Xception", 70),
                                           ("EfficientNetB0", 31)])
def test_below_the_minimum_size_names_it(backbone, size):
  least = size + 1
  with pytest.raises(ValueError, match=f"image_size={size} must be an int >= {least}.*{backbone}"):
    models.ModelConfig(backbone=backbone, image_size=size).validate()
  models.ModelConfig(backbone=backbone, image_size=least).validate()


def test_unknown_backbone_suggests_and_lists_the_valid_names():
  with pytest.raises(ValueError) as info:
    models.ModelConfig(backbone="efficientnetb3").validate()
  msg = str(info.value)
  assert msg.startswith("ModelConfig.backbone='efficientnetb3' is unknown; did you mean "
                        "EfficientNetB3")
  assert all(name in msg for name in backbones.NAMES)
