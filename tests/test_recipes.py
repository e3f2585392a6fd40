"""Training recipes: losses against their formulas, the learning-rate schedule, AdamW's exclusions,
synchronised BatchNorm over two replicas (issue 12), early stopping and config.json, end to end."""

from __future__ import annotations

import csv
import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import convert_folder, run_bin, synthetic_records, write_dark_bright
from skinrecords.input import augment
from skinrecords.model import models
from skinrecords.model import recipes
from skinrecords.training import distribute
from skinrecords.training import steps as steps_lib
from skinrecords.training import train


def _config(**fields) -> train.TrainConfig:
  """A TrainConfig; the recipe's fields (recipes.FIELDS) go into its RecipeConfig."""
  recipe = recipes.RecipeConfig(**{k: fields.pop(k) for k in recipes.FIELDS if k in fields})
  return train.TrainConfig(records_dir="r", model_dir="m", augment=augment.AugmentConfig.none(),
                           recipe=recipe, **fields)


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


_LABELS = np.array([0, 1, 2, 1])
_LOGITS = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [-3.0, 1.0, 4.0], [1.0, 1.0, -2.0]],
                   np.float32)


def test_default_recipe_is_plain_cross_entropy():
  binary = recipes.loss_fn(2, _config())(tf.constant([0, 1]), tf.constant([[0.3], [-0.7]]))
  expected = [math.log1p(math.exp(0.3)), math.log1p(math.exp(0.7))]
  np.testing.assert_allclose(binary, expected, rtol=1e-5)
  multi = recipes.loss_fn(3, _config())(tf.constant(_LABELS), tf.constant(_LOGITS))
  np.testing.assert_allclose(multi, -_log_softmax(_LOGITS)[np.arange(4), _LABELS], rtol=1e-5)


def test_multiclass_label_smoothing_spreads_over_all_classes():
  s = 0.2
  got = recipes.loss_fn(3, _config(label_smoothing=s))(tf.constant(_LABELS), tf.constant(_LOGITS))
  target = np.eye(3)[_LABELS] * (1 - s) + s / 3
  np.testing.assert_allclose(got, -(target * _log_softmax(_LOGITS)).sum(-1), rtol=1e-5)


def test_binary_label_smoothing_pulls_targets_towards_one_half():
  s, z = 0.1, np.array([0.3, -0.7], np.float32)
  got = recipes.loss_fn(2, _config(label_smoothing=s))(tf.constant([0, 1]), tf.constant(z[:, None]))
  y = np.array([0, 1]) * (1 - s) + s / 2
  p = 1 / (1 + np.exp(-z))
  np.testing.assert_allclose(got, -(y * np.log(p) + (1 - y) * np.log(1 - p)), rtol=1e-5)


def test_focal_losses_follow_their_formula_and_reduce_to_cross_entropy_at_gamma_0():
  gamma = 2.0
  multi = recipes.loss_fn(3, _config(loss="focal", focal_gamma=gamma))
  p = np.exp(_log_softmax(_LOGITS))[np.arange(4), _LABELS]
  # alpha=1: the categorical focal loss is NOT scaled by Keras' default alpha of 0.25.
  np.testing.assert_allclose(multi(tf.constant(_LABELS), tf.constant(_LOGITS)),
                             -((1 - p) ** gamma) * np.log(p), rtol=1e-4)
  z = np.array([[0.3], [-0.7], [2.0]], np.float32)
  y = np.array([0, 1, 1])
  binary = recipes.loss_fn(2, _config(loss="focal", focal_gamma=gamma))(tf.constant(y),
                                                                         tf.constant(z))
  p1 = 1 / (1 + np.exp(-z[:, 0]))
  pt = np.where(y == 1, p1, 1 - p1)
  np.testing.assert_allclose(binary, -((1 - pt) ** gamma) * np.log(pt), rtol=1e-4)
  for k, labels, logits in ((2, y, z), (3, _LABELS, _LOGITS)):
    focal0 = recipes.loss_fn(k, _config(loss="focal", focal_gamma=0.0, label_smoothing=0.1))
    ce = recipes.loss_fn(k, _config(label_smoothing=0.1))
    np.testing.assert_allclose(focal0(tf.constant(labels), tf.constant(logits)),
                               ce(tf.constant(labels), tf.constant(logits)), rtol=1e-5)


def test_loss_is_float32_for_float16_logits():
  for k, logits in ((2, _LOGITS[:, :1]), (3, _LOGITS)):
    for recipe in ({}, {"loss": "focal", "label_smoothing": 0.1}):
      got = recipes.loss_fn(k, _config(**recipe))(tf.constant(_LABELS % k),
                                                   tf.constant(logits, tf.float16))
      assert got.dtype == tf.float32, (k, recipe)


def test_warmup_then_cosine_to_the_floor():
  schedule = recipes.learning_rate(_config(lr_schedule="cosine", warmup_steps=4, lr_floor=0.1),
                                   1e-3, total_steps=24)
  lr = np.array([float(schedule(s)) for s in range(26)])
  np.testing.assert_allclose(lr[:4], [2.5e-4, 5e-4, 7.5e-4, 1e-3], rtol=1e-5)
  np.testing.assert_allclose(lr[4 + 10], 1e-4 + 0.5 * 9e-4, rtol=1e-5)  # half-way: the midpoint
  np.testing.assert_allclose(lr[24:], 1e-4, rtol=1e-5)  # the floor, and it stays there
  assert lr[3] == lr[4] and np.all(np.diff(lr[4:24]) < 0)  # peak, then down
  constant = recipes.learning_rate(_config(warmup_steps=2), 1e-3, total_steps=10)
  np.testing.assert_allclose([float(constant(s)) for s in (0, 1, 2, 9)],
                             [5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6)
  assert recipes.learning_rate(_config(), 1e-3, total_steps=10) == 1e-3  # the old recipe


def test_adamw_decays_kernels_but_not_biases_or_norm_parameters():
  inputs = keras.Input((3,))
  x = keras.layers.Dense(2, name="dense")(inputs)
  model = keras.Model(inputs, keras.layers.BatchNormalization(name="bn")(x))
  for w in model.trainable_variables:
    w.assign(tf.ones_like(w))
  opt = recipes.make_optimizer(_config(optimizer="adamw", weight_decay=0.5), 0.1, 10, False)
  opt.apply_gradients([(tf.zeros_like(w), w) for w in model.trainable_variables])
  after = {w.path: float(w.numpy().ravel()[0]) for w in model.trainable_variables}
  assert after == {"dense/kernel": pytest.approx(1 - 0.1 * 0.5), "dense/bias": 1.0,
                   "bn/gamma": 1.0, "bn/beta": 1.0}


@pytest.mark.parametrize("recipe,message", [
    ({"optimizer": "sgd"}, "optimizer='sgd'"),
    ({"optimizer": "adamw"}, "weight_decay=0 is plain Adam"),
    ({"optimizer": "adamw", "weight_decay": -1.0}, "weight_decay=-1.0 must be >= 0"),
    ({"weight_decay": 0.1}, "needs optimizer=adamw"),
    ({"lr_schedule": "step"}, "lr_schedule='step'"),
    ({"warmup_steps": -1}, "warmup_steps=-1"),
    ({"lr_floor": 1.0, "lr_schedule": "cosine"}, "lr_floor=1.0"),
    ({"lr_floor": 0.1}, "applies to lr_schedule=cosine only"),
    ({"loss": "mse"}, "loss='mse'"),
    ({"label_smoothing": 1.0}, "label_smoothing=1.0"),
    ({"focal_gamma": -1.0}, "focal_gamma=-1.0"),
    ({"focal_gamma": 3.0}, "focal_gamma=3.0 applies to loss=focal only"),
    ({"early_stopping_patience": -1}, "early_stopping_patience=-1"),
])
def test_bad_recipes_name_the_field(recipe, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    _config(**recipe).validate()


def test_warmup_must_end_inside_each_phase():
  config = _config(warmup_steps=6, epochs=3, warmup_epochs=1)
  recipes.check_warmup_fits(config, {"warm-up": 10, "training": 7})
  with pytest.raises(ValueError, match="warmup_steps=6 is not shorter than the training phase"):
    recipes.check_warmup_fits(config, {"warm-up": 10, "training": 6})
  recipes.check_warmup_fits(config, {"warm-up": 0, "training": 7})  # an empty phase is skipped


def test_early_stopping_counts_from_the_best_epoch_after_the_warmup():
  config = _config(early_stopping_patience=2, warmup_epochs=2, epochs=10)
  assert not recipes.should_stop(config, epochs_done=2, best_epoch=0)  # nothing best yet
  assert not recipes.should_stop(config, epochs_done=2, best_epoch=1)  # still warming up
  assert not recipes.should_stop(config, epochs_done=4, best_epoch=3)
  assert recipes.should_stop(config, epochs_done=5, best_epoch=3)
  assert not recipes.should_stop(_config(), epochs_done=9, best_epoch=1)  # patience 0: never


def _bn_model(size: int) -> keras.Model:
  """BatchNorm straight on the pixels, so its statistics are those of the input batch."""
  inputs = keras.Input((size, size, 3))
  x = keras.layers.BatchNormalization(momentum=0.5, name="bn")(inputs)
  x = keras.layers.GlobalAveragePooling2D()(x)
  return keras.Model(inputs, keras.layers.Dense(1, name="logits")(x))


@pytest.mark.parametrize("sync", [True, False])
@pytest.mark.parametrize("xla", ["off", "augment"])
def test_sync_batchnorm_keeps_two_replicas_moving_statistics_identical(sync, xla):
  """Issue 12. Each replica sees a different half of the batch (dark vs bright pixels): with
  sync_batchnorm both copies of the moving statistics equal those of the whole batch; without it
  each replica keeps its own half's (Keras 3 creates them with aggregation NONE), and which copy
  gets saved is an accident."""
  assert len(tf.config.list_logical_devices("CPU")) == 2, "conftest sets up 2 logical CPUs"
  strategy = distribute.make_strategy("mirrored")  # its own collective keys (BUILD_NOTES)
  size, per_replica = 4, 2
  rng = np.random.default_rng(0)
  dark = rng.integers(0, 60, (per_replica, size, size, 3))
  bright = rng.integers(180, 256, (per_replica, size, size, 3))
  images = np.concatenate([dark, bright]).astype(np.uint8)
  config = _config(batch_size=2 * per_replica, xla=xla, sync_batchnorm=sync)
  with strategy.scope():
    model = _bn_model(size)
    assert recipes.synchronize_batchnorm(model, sync) == 1
    opt = recipes.make_optimizer(config, 1e-3, 10, False)
    opt.build(model.trainable_variables)
  step = steps_lib.CompiledSteps(strategy, model, opt, config, [1.0, 1.0], xla_mode=xla)
  ds = tf.data.Dataset.from_tensor_slices((images, np.array([0, 0, 1, 1]))).batch(4).repeat()
  step.train_step(iter(strategy.experimental_distribute_dataset(ds)), tf.constant(0, tf.int64))
  bn = model.get_layer("bn")
  means = [v.numpy() for v in bn.moving_mean.value.values]
  variances = [v.numpy() for v in bn.moving_variance.value.values]
  whole = images.reshape(-1, 3).astype(np.float64)
  if sync:
    for mean, var in zip(means, variances):
      np.testing.assert_allclose(mean, 0.5 * whole.mean(0), rtol=1e-4)
      np.testing.assert_allclose(var, 0.5 + 0.5 * whole.var(0), rtol=1e-4)
  else:
    assert np.abs(means[0] - means[1]).min() > 50, means  # ~15 vs ~108 (momentum 0.5): diverged


@pytest.fixture(scope="module")
def small_records(tmp_path_factory):
  """Synthetic ABCD lesions, 32 px records (120/40/40 images)."""
  return synthetic_records(tmp_path_factory.mktemp("recipes"), 200, (64, 48), (96, 72), 32)


@pytest.mark.slow
def test_early_stopping_and_the_recipe_in_config_json(small_records, tmp_path):
  """learning_rate=0 never improves on epoch 1, so patience 2 stops after epoch 3 of 10; config.json
  records the recipe; rerunning the same command trains nothing."""
  args = ["--records_dir", small_records, "--model_dir", tmp_path / "run", "--backbone=simple_cnn",
          "--weights=none", "--epochs=10", "--steps_per_epoch=2", "--batch_size=16",
          "--learning_rate=0", "--early_stopping_patience=2", "--optimizer=adamw",
          "--weight_decay=0.01", "--lr_schedule=cosine", "--warmup_steps=3", "--lr_floor=0.1",
          "--loss=focal", "--focal_gamma=1.5", "--label_smoothing=0.05", "--noprogress",
          "--noaugment"]
  out = run_bin("train", *args).stdout
  assert "model.keras holds epoch 1 of 3" in out and "stopped early after epoch 3" in out, out
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["stopped_early"] and summary["epochs_done"] == 3 and summary["best_epoch"] == 1
  recorded = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
  assert {k: recorded[k] for k in ("optimizer", "weight_decay", "lr_schedule", "warmup_steps",
                                   "lr_floor", "loss", "focal_gamma", "label_smoothing",
                                   "sync_batchnorm", "early_stopping_patience")} == {
      "optimizer": "adamw", "weight_decay": 0.01, "lr_schedule": "cosine", "warmup_steps": 3,
      "lr_floor": 0.1, "loss": "focal", "focal_gamma": 1.5, "label_smoothing": 0.05,
      "sync_batchnorm": False, "early_stopping_patience": 2}
  again = run_bin("train", *args).stdout
  assert "stopped early after 3 epochs; nothing to train" in again, again


@pytest.mark.slow
def test_bad_recipe_flags_are_one_line_usage_errors(small_records, tmp_path):
  """One error caught with the flags (in flag terms), one by train() once the run's length is
  known; the rest of the checks are the library's, tested above and in test_models.py."""
  base = ["--records_dir", small_records, "--model_dir", tmp_path / "run", "--weights=none",
          "--epochs=2", "--steps_per_epoch=2"]
  for extra, message in (
      (["--backbone=efficientnetb0"], "--backbone='efficientnetb0' is unknown; did you mean "
                                      "EfficientNetB0"),
      (["--backbone=simple_cnn", "--warmup_steps=4"],
       "--warmup_steps=4 is not shorter than the training phase (4 steps")):
    proc = run_bin("train", *base, *extra, check=False)
    assert proc.returncode == 2, (extra, proc.stderr[-2000:])
    assert message in proc.stderr and "Traceback" not in proc.stderr, (extra, proc.stderr)


def test_sync_batchnorm_over_replicas_keeps_xla_off_the_forward_pass():
  sync = _config(sync_batchnorm=True)
  assert recipes.xla_mode(sync, "on", replicas=2) == "augment"  # auto resolved to on (GPUs)
  assert recipes.xla_mode(sync, "on", replicas=1) == "on"  # nothing to all-reduce
  assert recipes.xla_mode(_config(), "on", replicas=2) == "on"
  with pytest.raises(ValueError, match="use xla=augment"):
    recipes.xla_mode(_config(sync_batchnorm=True, xla="on"), "on", replicas=2)


@pytest.mark.slow
def test_three_classes_train_with_focal_loss_and_label_smoothing(tmp_path):
  """The multi-class path through the compiled step (one-hot targets, categorical focal loss, XLA
  augmentation, 2 replicas): grey levels 40/128/215 are learnt within 6 short epochs."""
  write_dark_bright(tmp_path / "in", {"a": (30, 40), "b": (30, 128), "c": (30, 215)}, 20,
                    lambda i: (36, 36, 3))
  records = convert_folder(tmp_path / "in", tmp_path / "records", 32, split=(0.6, 0.2, 0.2))
  result = train.train(train.TrainConfig(
      records_dir=str(records), model_dir=str(tmp_path / "run"), strategy="mirrored",
      model=models.ModelConfig(backbone="simple_cnn", weights="none", image_size=32),
      augment=augment.AugmentConfig(rotation_range=0.0, shear_range=0.0, width_shift_range=0.0,
                                    height_shift_range=0.0),  # flips only: still XLA-compiled
      batch_size=8, learning_rate=3e-3, epochs=6, progress=False,
      recipe=recipes.RecipeConfig(loss="focal", label_smoothing=0.1, lr_schedule="cosine",
                                  warmup_steps=2)))
  history = [float(r["loss"]) for r in csv.DictReader(open(tmp_path / "run" / "history.csv"))]
  # The smoothed focal loss has a floor above 0, so only its direction is checked; validation AUC
  # (on the true labels) is what says the classes were learnt.
  assert result["best_metrics"]["val_auc"] >= 0.95, (result["best_metrics"], history)
  assert history[-1] < history[0], history
  assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["num_classes"] == 3


def test_the_recipe_is_nested_in_the_config_and_flat_in_config_json():
  """TrainConfig.recipe is a RecipeConfig; config.json's "train" keeps its fields flat, as runs of
  the release before wrote them, so a resume compares them field by field as it did."""
  config = _config(loss="focal", focal_gamma=1.5, early_stopping_patience=3)
  assert config.recipe == recipes.RecipeConfig(loss="focal", focal_gamma=1.5,
                                               early_stopping_patience=3)
  saved = config.to_dict()
  assert "recipe" not in saved and {k: saved[k] for k in recipes.FIELDS} == config.recipe.to_dict()
  assert recipes.RecipeConfig.from_dict(saved) == config.recipe
