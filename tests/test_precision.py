"""`--mixed_precision` resolved per device (issue 23 item 4, issue 27's warning), with stubbed GPUs
and CPU flags like the XLA-policy test in test_train.py."""

from __future__ import annotations

import pytest

from skinrecords.training import distribute

AVX2 = {"fpu", "sse2", "avx", "avx2", "fma"}  # this machine's kind of CPU: no native bfloat16
SAPPHIRE = AVX2 | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


def _policy(setting, gpus=(), flags=AVX2):
  return distribute.resolve_mixed_precision(setting, gpu_capabilities=list(gpus), flags=flags)


def test_auto_on_the_cpu_uses_bfloat16_only_where_it_is_native():
  assert _policy("auto").policy == "float32"
  assert "no native bfloat16" in _policy("auto").reason
  assert not _policy("auto").warning
  chosen = _policy("auto", flags=SAPPHIRE)
  assert chosen.policy == "mixed_bfloat16" and "amx_bf16" in chosen.reason
  assert _policy("auto", flags=AVX2 | {"avx512_bf16"}).policy == "mixed_bfloat16"


def test_auto_on_gpus_needs_tensor_cores_on_every_gpu():
  assert _policy("auto", gpus=[(8, 0)]).policy == "mixed_float16"
  assert _policy("auto", gpus=[(7, 0), (9, 0)]).policy == "mixed_float16"
  assert _policy("auto", gpus=[(6, 1)]).policy == "float32"
  assert _policy("auto", gpus=[(8, 0), (6, 0)]).policy == "float32"
  # A GPU decides, whatever the CPU has.
  assert _policy("auto", gpus=[(6, 1)], flags=SAPPHIRE).policy == "float32"


def test_on_without_native_support_warns_in_one_line():
  chosen = _policy("on")
  assert chosen.policy == "mixed_float16"
  assert "--mixed_precision=on" in chosen.warning and "auto" in chosen.warning
  assert "\n" not in chosen.warning
  assert _policy("on", flags=SAPPHIRE).policy == "mixed_bfloat16"
  assert not _policy("on", flags=SAPPHIRE).warning
  assert not _policy("on", flags=AVX2 | {"avx512_fp16"}).warning
  assert _policy("on", gpus=[(7, 5)]).policy == "mixed_float16"
  assert not _policy("on", gpus=[(7, 5)]).warning
  assert "< 7.0" in _policy("on", gpus=[(6, 0)]).warning


def test_off_and_bad_settings():
  for gpus, flags in (((), AVX2), ((), SAPPHIRE), ([(9, 0)], AVX2)):
    assert _policy("off", gpus, flags).policy == "float32"
  with pytest.raises(ValueError, match="mixed_precision='yes'"):
    _policy("yes")


def test_this_machine_resolves_without_stubs():
  chosen = distribute.resolve_mixed_precision("auto")
  native = distribute.cpu_flags() & set(distribute.NATIVE_BF16_CPU_FLAGS)
  if not distribute.gpu_compute_capabilities():
    assert chosen.policy == ("mixed_bfloat16" if native else "float32")
  assert distribute.use_mixed_precision("auto") == (chosen.policy != "float32")
