"""Tests for skinrecords.input.augment: exact geometry, fill modes, randomness, XLA, tf.data and
Keras."""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf
from conftest import run_bin

from skinrecords.input import augment

OFF = augment.AugmentConfig.none()
FULL = augment.AugmentConfig(zoom_range=0.2, shear_range=10.0, brightness=30.0, contrast=0.3,
                             saturation=0.4, hue=0.1)


def _images(batch=2, height=32, width=32, seed=0, dtype=np.uint8):
  return np.random.default_rng(seed).integers(0, 256, (batch, height, width, 3)).astype(dtype)


def _matrices(batch=2, height=32, width=32, **params):
  p = dict(angle_deg=0.0, shear_deg=0.0, zx=1.0, zy=1.0, tx=0.0, ty=0.0, hflip=False, vflip=False)
  p.update(params)
  return augment.matrices_from_params(**{k: [v] * batch for k, v in p.items()}, height=height,
                                      width=width)


def _map(matrix, x, y):
  """Input point sampled by output pixel (x, y)."""
  return (np.asarray(matrix) @ np.array([x, y, 1.0]))[:2]


@pytest.mark.parametrize("interpolation", augment.INTERPOLATIONS)
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_identity_is_exact(interpolation, dtype):
  x = _images(dtype=dtype)
  warped = augment.warp(x, _matrices(), interpolation).numpy()
  assert warped.dtype == np.float32
  np.testing.assert_array_equal(warped, x.astype(np.float32))
  np.testing.assert_array_equal(augment.augment_batch(x, [1, 2], OFF).numpy(), x)
  assert not OFF.enabled and augment.AugmentConfig().enabled


@pytest.mark.parametrize("interpolation", augment.INTERPOLATIONS)
@pytest.mark.parametrize("angle,k", [(90.0, 1), (-90.0, -1), (180.0, 2), (270.0, 3)])
def test_right_angles_equal_rot90(interpolation, angle, k):
  x = _images(height=33, width=33)
  got = augment.warp(x, _matrices(height=33, width=33, angle_deg=angle), interpolation).numpy()
  np.testing.assert_array_equal(got, np.rot90(x, k, axes=(1, 2)))


@pytest.mark.parametrize("interpolation", augment.INTERPOLATIONS)
def test_flips(interpolation):
  x = _images(height=24, width=40)
  warp = lambda **p: augment.warp(x, _matrices(height=24, width=40, **p), interpolation).numpy()
  np.testing.assert_array_equal(warp(hflip=True), np.flip(x, axis=2))
  np.testing.assert_array_equal(warp(vflip=True), np.flip(x, axis=1))
  np.testing.assert_array_equal(warp(hflip=True, vflip=True), np.flip(x, axis=(1, 2)))


@pytest.mark.parametrize("interpolation", augment.INTERPOLATIONS)
def test_positive_shift_moves_content_right_and_down(interpolation):
  x = np.zeros((1, 32, 48, 3), np.uint8)
  x[0, 10, 20] = [255, 128, 7]  # row 10, column 20
  got = augment.warp(x, _matrices(1, 32, 48, tx=5.0, ty=-3.0), interpolation).numpy()[0]
  assert np.argwhere(got.any(-1)).tolist() == [[10 - 3, 20 + 5]]
  np.testing.assert_array_equal(got[7, 25], [255, 128, 7])


def test_shear_and_zoom_map_known_points():
  h, w = 32, 48
  cx, cy = (w - 1) / 2, (h - 1) / 2
  s, d = 30.0, 8.0
  # Sh = [[1, -sin s], [0, cos s]] about the centre:
  # output (cx, cy + d) samples input (cx - d sin s, cy + d cos s).
  m = _matrices(1, h, w, shear_deg=s).numpy()[0]
  rad = math.radians(s)
  np.testing.assert_allclose(_map(m, cx, cy + d), [cx - d * math.sin(rad), cy + d * math.cos(rad)],
                             atol=1e-5)
  np.testing.assert_allclose(_map(m, cx + d, cy), [cx + d, cy], atol=1e-5)  # x axis unsheared
  # Zoom scales the sampling grid about the centre: z > 1 samples farther out (zooms out).
  m = _matrices(1, h, w, zx=2.0, zy=0.5).numpy()[0]
  np.testing.assert_allclose(_map(m, cx + 3, cy + 4), [cx + 6, cy + 2], atol=1e-5)
  # +90° turns content counter-clockwise: the output point above the centre shows the input point
  # right of it (q = c + R (p - c), R = [[0, -1], [1, 0]]).
  m = _matrices(1, h, w, angle_deg=90.0).numpy()[0]
  np.testing.assert_allclose(_map(m, cx, cy - d), [cx + d, cy], atol=1e-5)


def test_composed_warp_of_a_ramp_matches_the_analytic_map():
  # Bilinear interpolation of a linear ramp is exact, so every output pixel must equal the ramp at
  # the analytic sample point q = c + F R Sh Z (p - c - t).
  h, w = 40, 48
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
  ramp = np.repeat((2.0 * xx + 3.0 * yy + 5.0)[None, ..., None], 3, axis=-1).astype(np.float32)
  params = dict(angle_deg=25.0, shear_deg=12.0, zx=1.3, zy=0.8, tx=2.5, ty=-1.5, hflip=True)
  got = augment.warp(ramp, _matrices(1, h, w, **params)).numpy()[0, ..., 0]
  th, sh = math.radians(25.0), math.radians(12.0)
  rotation = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
  shear = np.array([[1.0, -math.sin(sh)], [0.0, math.cos(sh)]])
  a = np.diag([-1.0, 1.0]) @ rotation @ shear @ np.diag([1.3, 0.8])
  c = np.array([(w - 1) / 2, (h - 1) / 2])
  p = np.stack([xx, yy], -1) - c - np.array([2.5, -1.5])
  q = c + p @ a.T
  inside = (q[..., 0] >= 0) & (q[..., 0] <= w - 1) & (q[..., 1] >= 0) & (q[..., 1] <= h - 1)
  assert inside.mean() > 0.5
  np.testing.assert_allclose(got[inside], (2.0 * q[..., 0] + 3.0 * q[..., 1] + 5.0)[inside],
                             atol=2e-3)


def test_fill_modes_at_the_border():
  x = _images(1, 16, 16).astype(np.float32)
  m = _matrices(1, 16, 16, tx=5.0)  # columns 0..4 of the output come from columns -5..-1
  const = augment.warp(x, m, "nearest", "constant", 7.0).numpy()[0]
  np.testing.assert_array_equal(const[:, :5], 7.0)
  np.testing.assert_array_equal(const[:, 5:], x[0, :, :11])
  near = augment.warp(x, m, "bilinear", "nearest").numpy()[0]
  np.testing.assert_array_equal(near[:, :5], np.repeat(x[0, :, :1], 5, axis=1))
  refl = augment.warp(x, m, "bilinear", "reflect").numpy()[0]  # -1 -> 0, -5 -> 4
  np.testing.assert_array_equal(refl[:, :5], x[0, :, 4::-1])


@pytest.mark.parametrize("fill_mode", augment.FILL_MODES)
def test_absurd_matrices_only_read_inside_the_batch(fill_mode):
  x = _images(2, 16, 16)
  m = _matrices(2, 16, 16, tx=1e12, ty=-3e11)
  for fn in (augment.warp, tf.function(augment.warp, jit_compile=True)):
    got = fn(x, m, "bilinear", fill_mode, 5.0).numpy()
    assert np.isfinite(got).all() and got.min() >= 0 and got.max() <= 255


@pytest.mark.parametrize("interpolation,order", [("bilinear", 1), ("nearest", 0)])
@pytest.mark.parametrize("fill_mode,scipy_mode", [("nearest", "nearest"), ("reflect", "reflect"),
                                                  ("constant", "grid-constant")])
def test_matches_scipy_affine_transform(interpolation, order, fill_mode, scipy_mode):
  x = _images(1, 30, 34, seed=3).astype(np.float32)
  m = _matrices(1, 30, 34, angle_deg=33.0, shear_deg=10.0, zx=1.4, zy=0.7, tx=4.5,
                ty=-3.2).numpy()[0]
  got = augment.warp(x, m[None], interpolation, fill_mode, 9.0).numpy()[0]
  # scipy indexes (row, col) = (y, x): swap the axes of our (x, y) matrix.
  matrix, offset = np.array([[m[1, 1], m[1, 0]], [m[0, 1], m[0, 0]]]), np.array([m[1, 2], m[0, 2]])
  want = np.stack([scipy.ndimage.affine_transform(x[0, ..., c].astype(np.float64), matrix, offset,
                                                  order=order, mode=scipy_mode, cval=9.0)
                   for c in range(3)], -1)
  if interpolation == "nearest":  # a float32 vs float64 tie at .5 may round the other way
    assert np.mean(got != want) < 0.01
  else:
    np.testing.assert_allclose(got, want, atol=0.01)


def test_sampled_parameters_stay_in_range():
  n, size = 256, 40
  rot = augment.affine_matrices(n, size, size, [5, 6],
                                dataclasses.replace(OFF, rotation_range=60.0))
  angles = np.degrees(np.arctan2(rot[:, 1, 0], rot[:, 0, 0]))
  assert np.abs(angles).max() <= 60.0 + 1e-3 and np.abs(angles).max() > 50.0
  assert angles.min() < -30 < 30 < angles.max()
  shift = augment.affine_matrices(n, size, size, [5, 6],
                                  dataclasses.replace(OFF, width_shift_range=0.25)).numpy()
  np.testing.assert_array_equal(shift[:, :2, :2], np.broadcast_to(np.eye(2), (n, 2, 2)))
  assert np.abs(shift[:, 0, 2]).max() <= 0.25 * size and np.abs(shift[:, 0, 2]).max() > 8.0
  np.testing.assert_array_equal(shift[:, 1, 2], 0.0)
  flips = augment.affine_matrices(n, size, size, [5, 6],
                                  dataclasses.replace(OFF, horizontal_flip=True)).numpy()
  assert set(flips[:, 0, 0].tolist()) == {-1.0, 1.0} and 0.3 < np.mean(flips[:, 0, 0] < 0) < 0.7
  zoom = augment.affine_matrices(n, size, size, [5, 6], dataclasses.replace(OFF, zoom_range=0.2))
  assert 0.8 <= np.min(zoom[:, :2, :2].numpy().sum(-1)) and np.max(zoom[:, 0, 0]) <= 1.2


def test_same_seed_same_output_and_seed_dtypes():
  x = _images(4)
  a = augment.augment_batch(x, tf.constant([3, 4], tf.int32), FULL).numpy()
  b = augment.augment_batch(x, tf.constant([3, 4], tf.int64), FULL).numpy()
  c = augment.augment_batch(x, tf.constant([3, 5], tf.int64), FULL).numpy()
  d = augment.augment_batch(x, tf.constant([4, 4], tf.int64), FULL).numpy()
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).mean() > 5 and np.abs(a - d).mean() > 5
  assert not np.array_equal(a[0], a[1])  # images of one batch get their own parameters


@pytest.mark.slow
def test_xla_compiles_and_matches_eager():
  x = _images(3, 40, 40)
  seed = tf.constant([11, 12], tf.int64)
  eager = augment.augment_batch(x, seed, FULL).numpy()
  compiled = tf.function(lambda im, s: augment.augment_batch(im, s, FULL), jit_compile=True)
  # Same random parameters bit for bit; pixels agree up to float rounding (XLA fuses differently).
  np.testing.assert_allclose(compiled(x, seed).numpy(), eager, atol=0.02)
  assert 0.0 <= eager.min() and eager.max() <= 255.0


@pytest.mark.slow
def test_inside_tf_data_map():
  x = _images(6)
  ds = tf.data.Dataset.from_tensor_slices(x).batch(3).enumerate().map(
      lambda i, b: augment.augment_batch(b, tf.stack([tf.constant(7, tf.int64), i]), FULL))
  got = np.concatenate([b.numpy() for b in ds])
  want = np.concatenate([augment.augment_batch(x[:3], [7, 0], FULL).numpy(),
                         augment.augment_batch(x[3:], [7, 1], FULL).numpy()])
  np.testing.assert_allclose(got, want, atol=0.01)  # graph rewrites reorder float ops


def test_photometric_is_off_by_default_and_stays_in_range():
  default = augment.AugmentConfig()
  assert not default.photometric and default.geometric
  geo_only = dataclasses.replace(OFF, brightness=40.0)
  x = np.full((4, 16, 16, 3), 100, np.uint8)
  x[:, :8] = 150  # mid-range, so nothing clips
  bright = augment.augment_batch(x, [1, 1], geo_only).numpy()
  delta = bright - x
  np.testing.assert_allclose(delta, delta[:, :1, :1, :1] * np.ones_like(delta), atol=1e-4)
  assert np.abs(delta).max() <= 40.0 and np.ptp(delta[:, 0, 0, 0]) > 0
  contrast = augment.augment_batch(x, [1, 1], dataclasses.replace(OFF, contrast=0.5)).numpy()
  np.testing.assert_allclose(contrast.mean((1, 2)), x.mean((1, 2)), atol=1e-3)
  grey = np.repeat(_images(2, 16, 16)[..., :1], 3, axis=-1)
  colour = dataclasses.replace(OFF, saturation=0.9, hue=0.5)
  got = augment.augment_batch(grey, [2, 2], colour).numpy()
  np.testing.assert_allclose(got, grey, atol=1e-3)  # no hue or saturation to change
  rgb = _images(2, 16, 16)
  assert np.abs(augment.augment_batch(rgb, [2, 2], colour).numpy() - rgb).mean() > 5
  extreme = augment.augment_batch(rgb, [3, 3], dataclasses.replace(
      FULL, brightness=255.0, contrast=1.0, saturation=1.0, hue=0.5)).numpy()
  assert extreme.min() >= 0.0 and extreme.max() <= 255.0


def test_channels_other_than_rgb():
  grey = _images(2, 16, 16)[..., :1]
  flipped = augment.warp(grey, _matrices(2, 16, 16, hflip=True)).numpy()
  np.testing.assert_array_equal(flipped, np.flip(grey, axis=2))
  with pytest.raises(ValueError, match="RGB"):
    augment.augment_batch(grey, [0, 0], dataclasses.replace(OFF, hue=0.1))


def test_keras_layer_train_and_inference():
  layer = augment.Augment(FULL, seed=3)
  x = _images(2)
  np.testing.assert_array_equal(layer(x, training=False).numpy(), x)
  first, second = layer(x, training=True).numpy(), layer(x, training=True).numpy()
  assert first.dtype == np.float32 and np.abs(first - x).mean() > 5
  assert np.abs(first - second).mean() > 5  # a fresh seed per call

  inputs = keras.Input((32, 32, 3), dtype="uint8")
  outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(
      augment.Augment(FULL, seed=1)(inputs)))
  model = keras.Model(inputs, outputs)
  np.testing.assert_allclose(model(x, training=False).numpy(), model(x, training=False).numpy())
  assert not np.allclose(model(x, training=True).numpy(), model(x, training=False).numpy())

  clone = augment.Augment.from_config(layer.get_config())
  assert clone.config == FULL and clone.seed == 3


def test_keras_layer_in_jit_compiled_function():
  layer = augment.Augment(augment.AugmentConfig(), seed=5)
  step = tf.function(lambda im: layer(im, training=True), jit_compile=True)
  x = _images(2)
  a, b = step(x).numpy(), step(x).numpy()
  assert np.abs(a - b).mean() > 5


def test_replicas_draw_different_augmentations():
  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  with strategy.scope():
    layer = augment.Augment(augment.AugmentConfig(), seed=0)
  x = tf.constant(_images(1))
  out = strategy.run(lambda: layer(x, training=True))
  a, b = [v.numpy() for v in strategy.experimental_local_results(out)]
  assert np.abs(a - b).mean() > 5


@pytest.mark.parametrize("field,value", [("rotation_range", -1.0), ("rotation_range", 181.0),
                                         ("shear_range", 90.0), ("width_shift_range", 1.5),
                                         ("zoom_range", 1.0), ("hue", 0.6), ("brightness", "x"),
                                         ("interpolation", "bicubic"), ("fill_mode", "wrap"),
                                         ("horizontal_flip", 1), ("fill_value", 300.0)])
def test_validate_names_the_field(field, value):
  config = dataclasses.replace(augment.AugmentConfig(), **{field: value})
  with pytest.raises(ValueError, match=field):
    config.validate()
  with pytest.raises(ValueError, match=field):
    augment.augment_batch(_images(1, 8, 8), [0, 0], config)
  assert augment.AugmentConfig().to_dict()["shear_range"] == 0.3


def test_bench_augment_rejects_bad_flags():
  # The full run starts TensorFlow in a fresh process (~35 s here), so only the flag check runs.
  proc = run_bin("bench_augment", "--iters=0", check=False)
  assert proc.returncode != 0 and "--iters=0" in proc.stderr
