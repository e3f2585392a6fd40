"""The XLA policy: which part of a step is XLA-compiled, for training (`steps`, `train`) and the
forward pass of evaluate and predict (`inference`). TensorFlow-free: it only reads device names.
"""

from __future__ import annotations

# off: TensorFlow's kernels; augment: only the augmentation XLA-compiled; on: the whole step.
XLA_MODES = ("off", "augment", "on")
XLA_SETTINGS = ("auto",) + XLA_MODES


def resolve_xla(setting: str, device_names, augmenting: bool = True) -> str:
  """`auto` -> the XLA mode for these replica devices; other settings are returned as they are.

  GPU/TPU: the whole step (NVIDIA's ResNet-50 figures: 1.4-1.6x from XLA alone; the fused warp's
  gathers are cheap there). CPU: XLA's CPU backend has no oneDNN convolutions, so an XLA-compiled
  conv-net step ran at 0.48-0.52x of TensorFlow's kernels here (simple_cnn 64 and 256 px, resnet50
  64 px), while the fused augmentation needs XLA (~5x its non-XLA speed at 512 px): so only the
  augmentation is compiled (`bin/bench_train --xla=on,off,augment`, BUILD_NOTES "Training step").
  """
  if setting not in XLA_SETTINGS:
    raise ValueError(f"xla={setting!r}; choose one of {', '.join(XLA_SETTINGS)}")
  if setting != "auto":
    return setting
  if any(("GPU" in name.upper() or "TPU" in name.upper()) for name in device_names):
    return "on"
  return "augment" if augmenting else "off"
