"""bin/bench_metadata at a tiny size, so that it cannot rot: three runs on one split, every row
printed, each difference the one of the AUCs printed beside it, each verdict the one its printed
interval gives, the shuffled copy's metadata really permuted, and the work folder removed."""

from __future__ import annotations

import json
import re

import pytest

from conftest import run_bin

_ROW = re.compile(r"^  (image only|image\+metadata|image\+shuffled metadata)\s+(\d\.\d{4})  "
                  r"\[(\d\.\d{4}), (\d\.\d{4})\]\s*(?:([+-]\d\.\d{4})  \[([+-]\d\.\d{4}), "
                  r"([+-]\d\.\d{4})\])?", re.M)


@pytest.mark.slow
def test_bench_metadata_plumbing(tmp_path):
  proc = run_bin("bench_metadata", "--num_images=80", "--image_size=32", "--epochs=1",
                 "--bootstrap=50", "--batch_size=16", f"--workdir={tmp_path}", "--keep",
                 timeout=900)
  rows = {m[1]: m for m in _ROW.finditer(proc.stdout)}
  assert set(rows) == {"image only", "image+metadata", "image+shuffled metadata"}, proc.stdout
  base = float(rows["image only"][2])
  for name in ("image+metadata", "image+shuffled metadata"):
    auc, delta, lo = float(rows[name][2]), float(rows[name][5]), float(rows[name][6])
    assert abs(delta - (auc - base)) <= 1e-4 + 1e-9  # rounding of the two AUCs printed
    helps = lo > 0
    verdict = ("PASS" if helps else "MISS") if name == "image+metadata" else (
        "MISS" if helps else "PASS")
    what = "beats image only" if name == "image+metadata" else "does not"
    assert re.search(rf"^  {verdict} {re.escape(name)} {what}", proc.stdout, re.M), proc.stdout
  assert "load average:" in proc.stdout
  # The shuffled copy: the same metadata values per split, on other images.
  work = next(tmp_path.glob("bench_metadata_*"))
  a = json.loads((work / "records" / "manifest.json").read_text())["metadata"]
  b = json.loads((work / "records_shuffled" / "manifest.json").read_text())["metadata"]
  assert [c["mean"] if "mean" in c else c["vocabulary"] for c in a["columns"]] == \
      [c["mean"] if "mean" in c else c["vocabulary"] for c in b["columns"]]
  assert _meta_by_name(work / "records") != _meta_by_name(work / "records_shuffled")
  assert sorted(_meta_by_name(work / "records").values()) == sorted(
      _meta_by_name(work / "records_shuffled").values())


def _meta_by_name(records) -> dict:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  out = {}
  for path in sorted(records.glob("*.tfrecord")):
    for raw in tf.data.TFRecordDataset(str(path)):
      f = tf.train.Example.FromString(raw.numpy()).features.feature
      out[f["image_name"].bytes_list.value[0].decode()] = repr(sorted(
          (k, str(v).strip()) for k, v in f.items() if k.startswith("meta/")))
  return out
