"""The XLA policy: which part of a step is XLA-compiled, for training (`steps`, `train`) and the
forward pass of evaluate and predict (`inference`). TensorFlow-free: it only reads device names.
"""

from __future__ import annotations

# off: TensorFlow's kernels; augment: only the augmentation XLA-compiled; on: the whole step.
XLA_MODES = ("off", "augment", "on")
XLA_SETTINGS = ("auto",) + XLA_MODES


# On the CPU, compiling the warp costs ~2-4 CPU s once (3.9 at 128 px in a fresh process, 2.0 at
# 512 px) and saves ~0.02 CPU s per batch of 16 at 128 px (XLA 0.013 vs 0.033) and ~0.7 at 512 px
# (0.21 vs 0.91), i.e. >= ~7.6e-8 CPU s per augmented pixel (/tmp bench, load 8, BUILD_NOTES
# "First epoch"). Below ~4 / 7.6e-8 = 5e7 augmented pixels in a whole run (~3,000 images at 128 px,
# ~190 at 512 px) the compilation never pays back, so auto leaves the warp to TensorFlow's kernels.
AUGMENT_BREAK_EVEN_PIXELS = 5e7


def resolve_xla(setting: str, device_names, augmenting: bool = True,
                augmented_pixels: float | None = None) -> str:
  """`auto` -> the XLA mode for these replica devices; other settings are returned as they are.

  GPU/TPU: the whole step (NVIDIA's ResNet-50 figures: 1.4-1.6x from XLA alone; the fused warp's
  gathers are cheap there). CPU: XLA's CPU backend has no oneDNN convolutions, so an XLA-compiled
  conv-net step ran at 0.48-0.52x of TensorFlow's kernels here (simple_cnn 64 and 256 px, resnet50
  64 px), while the fused augmentation needs XLA (~5x its non-XLA speed at 512 px): so only the
  augmentation is compiled (`bin/bench_train --xla=on,off,augment`, BUILD_NOTES "Training step"),
  unless the run is too short for the compilation to pay back (`augmented_pixels`, the whole run's
  images x pixels, below AUGMENT_BREAK_EVEN_PIXELS; None: not known, compile).
  """
  if setting not in XLA_SETTINGS:
    raise ValueError(f"xla={setting!r}; choose one of {', '.join(XLA_SETTINGS)}")
  if setting != "auto":
    return setting
  if any(("GPU" in name.upper() or "TPU" in name.upper()) for name in device_names):
    return "on"
  if not augmenting:
    return "off"
  if augmented_pixels is not None and augmented_pixels < AUGMENT_BREAK_EVEN_PIXELS:
    return "off"
  return "augment"
