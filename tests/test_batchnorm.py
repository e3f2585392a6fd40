"""FusedBatchNormalization against Keras' own BatchNormalization (issue 23).

Same weights in both, same random NHWC data: outputs in training and inference mode, gradients,
moving statistics after several steps, batch 1 and batch > 1, mixed precision, frozen layers,
MirroredStrategy on the two logical CPUs of conftest, XLA, saving and loading both ways.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from skinrecords.core import rundir
from skinrecords.model import batchnorm
from skinrecords.model import models
from skinrecords.training import distribute

CHANNELS = 5


@pytest.fixture(autouse=True)
def _float32_policy():
  yield
  keras.mixed_precision.set_global_policy("float32")


def _pair(shape, **kwargs):
  """A Keras BN and a fused BN, built, holding the same non-trivial weights."""
  plain = keras.layers.BatchNormalization(momentum=0.8, epsilon=1.001e-5, **kwargs)
  fused = batchnorm.FusedBatchNormalization(momentum=0.8, epsilon=1.001e-5, **kwargs)
  plain.build(shape)
  fused.build(shape)
  rng = np.random.default_rng(1)
  weights = []
  for w in plain.weights:
    base = 1.0 if ("gamma" in w.path or "variance" in w.path) else 0.0
    weights.append((base + rng.uniform(0.2, 0.8, w.shape)).astype("float32"))
  plain.set_weights(weights)
  fused.set_weights(weights)
  return plain, fused


def _run(layer, x, training):
  """Outputs, gradients (input and trainable weights) of a weighted sum of squares."""
  x = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = layer(tf.cast(x, layer.compute_dtype), training=training)
    loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2 * tf.range(1.0, CHANNELS + 1.0))
  grads = tape.gradient(loss, [x] + layer.trainable_variables)
  return np.float32(y), [np.float32(g) for g in grads]


@pytest.mark.parametrize("policy,tol", [("float32", 2e-4), ("mixed_float16", 2e-2),
                                        ("mixed_bfloat16", 1e-1)])
@pytest.mark.parametrize("shape", [(1, 6, 6, CHANNELS), (4, 6, 6, CHANNELS)])
@pytest.mark.parametrize("training", [True, False])
def test_outputs_gradients_and_moving_statistics_equal_keras(policy, tol, shape, training):
  keras.mixed_precision.set_global_policy(policy)
  plain, fused = _pair(shape)
  rng = np.random.default_rng(2)
  for step in range(4):  # moving statistics after several steps
    x = rng.normal(3.0, 2.0, shape).astype("float32")
    (y_plain, g_plain), (y_fused, g_fused) = _run(plain, x, training), _run(fused, x, training)
    assert y_fused.dtype == y_plain.dtype
    np.testing.assert_allclose(y_fused, y_plain, rtol=tol, atol=tol, err_msg=f"step {step}")
    for a, b in zip(g_fused, g_plain):
      np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, np.abs(b).max()))
  for a, b in zip(fused.non_trainable_weights, plain.non_trainable_weights):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)
  moved = not np.allclose(fused.moving_mean.numpy(), _pair(shape)[1].moving_mean.numpy())
  assert moved == training  # inference leaves them alone, training moves them


@pytest.mark.parametrize("center,scale", [(False, True), (True, False), (False, False)])
def test_center_and_scale_off(center, scale):
  plain, fused = _pair((3, 4, 4, CHANNELS), center=center, scale=scale)
  x = np.random.default_rng(3).normal(size=(3, 4, 4, CHANNELS)).astype("float32")
  for training in (True, False):
    (y_plain, g_plain), (y_fused, g_fused) = _run(plain, x, training), _run(fused, x, training)
    np.testing.assert_allclose(y_fused, y_plain, rtol=1e-4, atol=1e-4)
    for a, b in zip(g_fused, g_plain):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


def test_batch_of_one_pixel_has_zero_variance_like_keras():
  plain, fused = _pair((1, 1, 1, CHANNELS))
  x = np.random.default_rng(4).normal(size=(1, 1, 1, CHANNELS)).astype("float32")
  for _ in range(3):
    _run(plain, x, True)
    _run(fused, x, True)
  np.testing.assert_allclose(fused.moving_variance.numpy(), plain.moving_variance.numpy(),
                             rtol=1e-6)


def test_frozen_layer_runs_in_inference_mode_and_never_moves():
  plain, fused = _pair((4, 4, 4, CHANNELS))
  fused.trainable = plain.trainable = False
  before = [w.numpy().copy() for w in fused.weights]
  x = np.random.default_rng(5).normal(2.0, 3.0, (4, 4, 4, CHANNELS)).astype("float32")
  y_fused, _ = _run(fused, x, True)
  y_plain, _ = _run(plain, x, True)
  np.testing.assert_allclose(y_fused, y_plain, rtol=1e-5, atol=1e-5)
  for a, b in zip(before, fused.weights):
    np.testing.assert_array_equal(a, b.numpy())


def test_fallbacks_keep_keras_semantics():
  x = tf.random.normal((2, 3, 3, CHANNELS))
  fused = batchnorm.FusedBatchNormalization()
  fused.build(x.shape)
  assert fused._fusable(x, True, None)  # pylint: disable=protected-access
  fused.synchronized = True  # --sync_batchnorm: Keras' all-reducing moments in training
  assert not fused._fusable(x, True, None)  # pylint: disable=protected-access
  assert fused._fusable(x, False, None)  # pylint: disable=protected-access
  channels_first = batchnorm.FusedBatchNormalization(axis=1)
  assert not channels_first._fusable(x, True, None)  # pylint: disable=protected-access
  flat = batchnorm.FusedBatchNormalization()
  flat.build((2, CHANNELS))
  y = flat(tf.random.normal((2, CHANNELS)), training=True)  # rank 2: Keras' code
  assert y.shape == (2, CHANNELS)
  assert not batchnorm.FusedBatchNormalization(epsilon=1e-6)._fusable(x, True, None)  # pylint: disable=protected-access


def test_fused_op_is_in_the_graph():
  fused = batchnorm.FusedBatchNormalization()
  fn = tf.function(lambda x: fused(x, training=True))
  graph = fn.get_concrete_function(tf.TensorSpec((2, 4, 4, CHANNELS))).graph
  assert "FusedBatchNormV3" in {op.type for op in graph.get_operations()}


def _small_model(fused: bool):
  keras.utils.set_random_seed(0)
  inputs = keras.Input((8, 8, 3))
  x = keras.layers.Conv2D(CHANNELS, 3, padding="same", name="conv")(inputs)
  x = keras.layers.BatchNormalization(momentum=0.5, name="bn")(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  model = keras.Model(inputs, keras.layers.Dense(1, name="logits")(x))
  if fused:
    assert batchnorm.fuse(model) == 1
  return model


def _train(strategy, fused: bool, jit: bool = False):
  """Three SGD steps of a conv + BN model under `strategy`; returns its weights."""
  with strategy.scope():
    model = _small_model(fused)
    opt = keras.optimizers.SGD(0.1)
    opt.build(model.trainable_variables)
  rng = np.random.default_rng(6)
  images = rng.normal(1.0, 2.0, (8, 8, 8, 3)).astype("float32")
  labels = rng.normal(size=(8, 1)).astype("float32")
  ds = strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensor_slices((images, labels)).batch(8).repeat())

  @tf.function(jit_compile=jit)
  def forward_backward(x, y):
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum((model(x, training=True) - y) ** 2) / 8.0
    return tape.gradient(loss, model.trainable_variables)

  def replica(x, y):
    opt.apply_gradients(zip(forward_backward(x, y), model.trainable_variables))

  step = tf.function(lambda x, y: strategy.run(replica, args=(x, y)))
  iterator = iter(ds)
  for _ in range(3):
    step(*next(iterator))
  return [w.numpy() for w in model.weights]


@pytest.mark.parametrize("name", ["mirrored", "one_device"])
def test_training_under_a_strategy_equals_keras(name):
  strategy = distribute.make_strategy(name)
  if name == "mirrored" and strategy.num_replicas_in_sync < 2:
    pytest.fail("conftest's two logical CPUs are missing")
  plain, fused = _train(strategy, False), _train(distribute.make_strategy(name), True)
  for a, b in zip(fused, plain):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_xla_compiled_step_equals_keras():
  strategy = distribute.make_strategy("one_device")
  plain, fused = _train(strategy, False), _train(strategy, True, jit=True)
  for a, b in zip(fused, plain):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _run_dir(tmp_path, model, name):
  d = tmp_path / name
  d.mkdir()
  model.save(d / rundir.MODEL_FILE)
  (d / rundir.CONFIG_FILE).write_text(json.dumps({"classes": ["a", "b"], "image_size": 32}))
  return d


@pytest.mark.slow  # builds MobileNetV2 three times: 45 s of the quick subset at load 7
def test_build_model_fuses_every_backbone_batchnorm_and_saved_runs_load_both_ways(tmp_path):
  config = models.ModelConfig(backbone="MobileNetV2", image_size=32, weights="none")
  model = models.build_model(config)
  layers = [l for l in model._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]  # pylint: disable=protected-access
  assert layers and all(type(l) is batchnorm.FusedBatchNormalization for l in layers)  # pylint: disable=unidiomatic-typecheck
  x = np.random.default_rng(7).integers(0, 256, (2, 32, 32, 3)).astype("float32")
  model(x, training=True)  # move the statistics off their initial values
  want = model(x, training=False).numpy()

  new = _run_dir(tmp_path, model, "new")
  assert "skinrecords>BatchNormalization" in _saved_config(new)
  batchnorm.unfuse(model)  # a run saved before this change: plain Keras BN in model.keras
  old = _run_dir(tmp_path, model, "old")
  assert "skinrecords>BatchNormalization" not in _saved_config(old)
  for d in (new, old):
    loaded, _ = models.load_model_dir(d)
    assert batchnorm.fuse(loaded) == len(layers)  # load_model_dir fused them already
    np.testing.assert_allclose(loaded(x, training=False).numpy(), want, rtol=1e-4, atol=1e-4)
  # Weight files are interchangeable: same variables in the same order.
  model.save_weights(tmp_path / "plain.weights.h5")
  refused = models.build_model(config)
  refused.load_weights(tmp_path / "plain.weights.h5")
  np.testing.assert_allclose(refused(x, training=False).numpy(), want, rtol=1e-4, atol=1e-4)


def _saved_config(run_dir) -> str:
  import zipfile  # pylint: disable=g-import-not-at-top

  with zipfile.ZipFile(run_dir / rundir.MODEL_FILE) as z:
    return z.read("config.json").decode()


def test_frozen_backbone_statistics_never_move():
  model = models.build_model(models.ModelConfig(backbone="MobileNetV2", image_size=32,
                                                weights="none", freeze="all"))
  stats = [w for w in models.get_backbone(model).weights if "moving" in w.path]
  before = [w.numpy().copy() for w in stats]
  opt = keras.optimizers.Adam(1e-2)
  x = np.random.default_rng(8).integers(0, 256, (4, 32, 32, 3)).astype("float32")
  for _ in range(2):
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(model(x, training=True) ** 2)
    opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                            model.trainable_variables))
  for a, b in zip(before, stats):
    np.testing.assert_array_equal(a, b.numpy())
