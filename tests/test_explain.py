"""Grad-CAM: a conv block is found in every backbone, the heat sits on the lesion, galleries and
overlays hold what they claim."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from conftest import convert_folder
from skinrecords.evaluation import explain
from skinrecords.model import models
from test_export import train_tiny

SIZE = 48
RADIUS = 6
LAST_CONV = {"simple_cnn": "block4_conv", "vgg16": "block5_conv3", "resnet50": "conv5_block3_out",
             "densenet121": "relu", "efficientnetv2s": "top_activation"}


def blob_images(n: int, seed: int, with_blob: bool):
  """Dark noisy skin; with_blob: a bright disc (the 'lesion') somewhere. Returns images, masks."""
  rng = np.random.default_rng(seed)
  images = np.clip(70 + rng.normal(0, 18, (n, SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
  masks = np.zeros((n, SIZE, SIZE), bool)
  yy, xx = np.mgrid[:SIZE, :SIZE]
  for i in range(n if with_blob else 0):
    cy, cx = rng.integers(RADIUS + 2, SIZE - RADIUS - 2, 2)
    masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= RADIUS ** 2
    images[i][masks[i]] = np.clip(210 + rng.normal(0, 15, (masks[i].sum(), 3)), 0, 255)
  return images, masks


@pytest.fixture(scope="module")
def blob_model(tmp_path_factory):
  """simple_cnn trained on records of plain skin (class a) vs skin with a bright blob (class b)."""
  root = tmp_path_factory.mktemp("explain")
  for cls, with_blob in (("a", False), ("b", True)):
    (root / "in" / cls).mkdir(parents=True)
    for i, image in enumerate(blob_images(60, seed=int(with_blob), with_blob=with_blob)[0]):
      cv2.imwrite(str(root / "in" / cls / f"{cls}{i:03d}.png"), image[..., ::-1])
  convert_folder(root / "in", root / "records", SIZE, split=(0.8, 0.1, 0.1), min_train_shards=2)
  model_dir = train_tiny(root / "records", root / "model", SIZE, steps=60)
  return models.load_model_dir(model_dir)[0]


@pytest.mark.slow
@pytest.mark.parametrize("backbone", models.BACKBONES)
def test_last_conv_block_found_for_every_backbone(backbone):
  model = models.build_model(models.ModelConfig(backbone=backbone, image_size=32, weights="none"))
  assert explain.last_conv_layer(model).name == LAST_CONV[backbone]
  rng = np.random.default_rng(0)
  heat = explain.gradcam(model, rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8))
  assert heat.shape[0] == 2 and heat.ndim == 3 and heat.dtype == np.float32
  assert heat.min() >= 0 and heat.max() <= 1


@pytest.mark.slow
def test_heat_concentrates_on_the_lesion(blob_model):
  images, masks = blob_images(24, seed=7, with_blob=True)
  heats, predicted, _ = explain.explain_batch(blob_model, images, ["a", "b"])
  assert predicted.mean() > 0.9, predicted  # the model sees the blob: Grad-CAM of class b
  ratios = []
  for heat, mask in zip(heats, masks):
    up = explain.upsample(heat, SIZE)
    ratios.append(up[mask].mean() / max(up[~mask].mean(), 1e-6))
  assert np.median(ratios) >= 2.0, np.round(ratios, 2)
  assert np.mean(np.array(ratios) >= 2.0) >= 0.75, np.round(ratios, 2)


@pytest.mark.slow
def test_overlay_is_rgb_uint8_and_shows_heat_where_it_is():
  image = np.full((40, 40, 3), 128, np.uint8)
  heat = np.zeros((4, 4), np.float32)
  heat[0, 0] = 1.0  # hot top-left cell: jet red there, jet blue elsewhere
  out = explain.overlay(image, heat)
  assert out.shape == (40, 40, 3) and out.dtype == np.uint8
  assert out[2, 2, 0] > out[2, 2, 2] and out[37, 37, 2] > out[37, 37, 0]  # RGB order, not BGR


@pytest.mark.slow
def test_gallery_and_overlays_hold_the_examples(blob_model, tmp_path):
  images = np.concatenate([blob_images(3, 1, False)[0], blob_images(3, 2, True)[0]])
  path = explain.write_gallery(tmp_path / "examples.png", blob_model, images,
                               [f"img{i}" for i in range(6)], ["a", "b"], labels=[0] * 3 + [1] * 3,
                               columns=3)
  grid = cv2.imread(str(path))
  assert grid is not None and grid.shape[1] > grid.shape[0]  # 3 examples x 2 cells per row, 2 rows
  written = explain.write_overlays(tmp_path, blob_model, images[:2], ["x/one.jpg", "two.png"],
                                   ["a", "b"])
  assert [os.path.basename(p) for p in written] == ["one.gradcam.png", "two.gradcam.png"]
  assert cv2.imread(str(written[0])).shape == (SIZE, SIZE, 3)
  with pytest.raises(ValueError, match="must match"):
    explain.gallery(tmp_path / "bad.png", images, None, ["only one title"])


@pytest.mark.slow
def test_most_confident_picks_the_right_examples():
  probs = np.array([0.9, 0.2, 0.6, 0.05, 0.4, 0.99])
  labels = np.array([0, 1, 0, 1, 1, 1])
  assert explain.most_confident(probs, labels, "false_positive", 5).tolist() == [0, 2]
  assert explain.most_confident(probs, labels, "false_negative", 2).tolist() == [3, 1]
  assert explain.most_confident(probs, labels, "true_positive", 5).tolist() == [5]
