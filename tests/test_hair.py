"""Hair removal removes hair only: scored on synthetic truth and on placed structures."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from skinrecords.data import hair
from skinrecords.data import synthetic

SKIN, LESION = (205, 150, 130), (130, 90, 70)


def _scene(size: int, hair: tuple[int, int, int] | None) -> tuple[np.ndarray, dict, np.ndarray]:
  """Skin, a lesion with a dot, a globule and a network patch; optionally one crossing hair.

  Returns (image, {structure: its mask}, hair core mask). Sizes scale with `size`.
  """
  s = size / 512
  rng = np.random.default_rng(size)
  img = np.clip(np.full((size, size, 3), SKIN, np.float64) + rng.normal(0, 2, (size, size, 3)),
                0, 255).astype(np.uint8)
  cv2.circle(img, (size // 2, size // 2), int(170 * s), LESION, -1, cv2.LINE_AA)
  parts = {k: np.zeros((size, size), np.uint8) for k in ("dot", "globule", "network")}
  cv2.circle(parts["dot"], (int(180 * s), int(300 * s)), max(1, round(1.5 * s)), 255, -1)
  cv2.circle(parts["globule"], (int(300 * s), int(200 * s)), round(5 * s), 255, -1)
  r = 8 * s  # a honeycomb patch: hexagons of 8-px radius at 512, lines 2 px
  hexagon = np.array([[np.cos(a), np.sin(a)] for a in np.arange(6) * np.pi / 3]) * r
  for row in range(4):
    for col in range(5):
      centre = np.array([220 * s + col * 1.5 * r, 300 * s + (row + col % 2 / 2) * 1.732 * r])
      cv2.polylines(parts["network"], [np.round((centre + hexagon) * 16).astype(np.int32)], True,
                    255, max(1, round(2 * s)), cv2.LINE_AA, shift=4)
  for m in parts.values():
    img[m > 0] = (60, 38, 30)
  core = np.zeros((size, size), np.uint8)
  if hair is not None:  # crosses the lesion and every structure's neighbourhood diagonally
    p, q = (int(40 * s), int(120 * s)), (int(480 * s), int(420 * s))
    cv2.line(img, p, q, hair, max(1, round(3 * s)), cv2.LINE_AA)
    cv2.line(core, p, q, 255, max(1, round(3 * s)))
  return img, parts, core


@pytest.mark.parametrize("size", [128, 256, 512])
@pytest.mark.parametrize("colour", [(30, 22, 18), (232, 226, 216)], ids=["dark", "light"])
def test_structures_survive_and_the_hair_goes(size, colour):
  img, parts, core = _scene(size, colour)
  mask = hair.hair_mask(img) > 0
  assert mask[core > 0].mean() >= 0.85, mask[core > 0].mean()
  # 3 px either side of the hair: where a structure touches a hair the mask may spill a pixel.
  away = cv2.dilate(core, np.ones((7, 7), np.uint8)) == 0
  for name, part in parts.items():
    sel = (part > 0) & away  # where the hair does not pass over the structure
    assert mask[sel].mean() <= 0.02, (name, mask[sel].mean())
  out = hair.remove_hair(img)
  hair_err = np.abs(out.astype(int) - _scene(size, None)[0])[core > 0].mean()
  assert hair_err < 25, hair_err
  for name, part in parts.items():
    sel = (part > 0) & away
    assert np.abs(out[sel].astype(int) - img[sel]).mean() < 3, name


@pytest.mark.parametrize("size", [128, 256, 512])
def test_no_hair_no_mask_and_the_old_kernel_masks_structures(size):
  img, parts, _ = _scene(size, None)
  assert not hair.hair_mask(img).any()
  np.testing.assert_array_equal(hair.remove_hair(img), img)
  # The Kaggle-kernel mask, kept for comparison, takes the structures as hair.
  old = hair.hair_mask_kernel(img) > 0
  assert old[parts["dot"] > 0].mean() > 0.5 and old[parts["globule"] > 0].mean() > 0.5


def test_recall_precision_and_hair_free_masking_on_a_generated_set():
  hit = core_n = masked = true_pos = 0
  free = []
  for i in range(6):
    rng = np.random.default_rng([11, i])
    img, truth = synthetic.make_image(rng, i % 2 == 0, 512, 512, return_truth=True)
    mask = hair.hair_mask(img) > 0
    core = truth.hair_alpha >= 0.5
    hit, core_n = hit + (mask & core).sum(), core_n + core.sum()
    masked, true_pos = masked + mask.sum(), true_pos + (mask & (truth.hair_alpha > 0)).sum()
    free.append((hair.hair_mask(truth.hair_free) > 0).mean())
    # The hair-free twin differs from the image only where hair was drawn.
    assert not np.any(img[truth.hair_alpha == 0] != truth.hair_free[truth.hair_alpha == 0])
  assert core_n > 5000
  assert hit / core_n >= 0.85, hit / core_n
  assert true_pos / masked >= 0.75, true_pos / masked
  assert np.median(free) <= 0.01, free


def test_hair_masks_are_written_beside_the_images(tmp_path):
  config = synthetic.SyntheticConfig(num_images=3, seed=5, min_size=(96, 72), max_size=(96, 72))
  synthetic.write_dataset(tmp_path / "d", config, progress=False, hair_masks_dir=tmp_path / "m")
  for i in range(3):
    mask = cv2.imread(str(tmp_path / "m" / f"{synthetic.image_name(i)}.png"), cv2.IMREAD_UNCHANGED)
    _, truth = synthetic.render_with_truth(config, i, synthetic.assign_labels(config)[i])
    np.testing.assert_array_equal(mask, np.round(truth.hair_alpha * 255).astype(np.uint8))
  assert not list((tmp_path / "m").glob("*.tmp"))
