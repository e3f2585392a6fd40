"""bin/show_preprocessing: the contact sheet shows each image, its hair mask and the result."""

import cv2
import numpy as np

from tests.conftest import run_bin

SIZE = 64


def _hairy_images(folder, count=3):
  """Skin-coloured images with one dark diagonal 'hair' each, at known pixels."""
  folder.mkdir()
  for i in range(count):
    img = np.full((SIZE, SIZE, 3), (150, 170, 200), np.uint8)  # BGR skin tone
    cv2.circle(img, (SIZE // 2, SIZE // 2), 12, (60, 70, 110), -1)  # a lesion
    cv2.line(img, (0, 4 + 3 * i), (SIZE - 1, SIZE - 8), (20, 20, 20), 1)
    cv2.imwrite(str(folder / f"img_{i}.png"), img)


def test_sheet_rows_show_image_mask_and_result(tmp_path):
  _hairy_images(tmp_path / "imgs")
  out = tmp_path / "sheet.png"
  proc = run_bin("show_preprocessing", f"--input_dir={tmp_path / 'imgs'}", f"--output={out}",
                 "--num=2", f"--image_size={SIZE}")
  assert "2 images" in proc.stdout
  sheet = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)
  assert sheet.shape == (2 * SIZE, 3 * SIZE, 3)
  for row in range(2):
    original = sheet[row * SIZE:(row + 1) * SIZE, :SIZE].astype(int)
    mask = sheet[row * SIZE:(row + 1) * SIZE, SIZE:2 * SIZE].astype(int)
    result = sheet[row * SIZE:(row + 1) * SIZE, 2 * SIZE:].astype(int)
    red = (mask[..., 0] == 255) & (mask[..., 1] == 40) & (mask[..., 2] == 40)
    assert red.sum() > SIZE // 2, "the hair line is drawn red in the mask column"
    dark = original.sum(axis=-1) < 200  # the hair's pixels in the original
    assert (red & dark).sum() >= 0.5 * red.sum(), "the mask lies on the hair"
    # Hair pixels are repainted in the result; pixels away from the mask are left alone (the
    # repainting reaches a pixel or two beyond it: the mask is dilated before inpainting).
    assert result[red].sum(axis=-1).mean() > original[red].sum(axis=-1).mean() + 100
    near = cv2.dilate(red.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert np.abs(result[~near] - original[~near]).max() <= 1


def test_bad_output_is_one_line_and_leaves_nothing(tmp_path):
  _hairy_images(tmp_path / "imgs", count=1)
  (tmp_path / "file").write_text("")
  for output in (tmp_path / "file" / "sheet.png", tmp_path / "missing" / "sheet.png"):
    proc = run_bin("show_preprocessing", f"--input_dir={tmp_path / 'imgs'}",
                   f"--output={output}", "--num=1", f"--image_size={SIZE}", check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "--output=" in proc.stderr and "choose another path" in proc.stderr
  proc = run_bin("show_preprocessing", f"--input_dir={tmp_path / 'nope'}", "--num=1",
                 check=False)
  assert proc.returncode == 2 and "no images under" in proc.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "imgs"]
