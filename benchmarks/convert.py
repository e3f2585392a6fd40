#!/usr/bin/env python3
"""Times the converter on synthetic sources and checks its speed targets.

A: --num_images sources of --source_size (1024x768) -> --image_size^2 JPEG with hair removal, with 1
   worker and with --workers (2) spawned workers, measured two ways in the same run:
   - "whole run": `convert.convert` end to end, as `make_records` runs it: listing, splits, the
     spawn pool's start-up (~2 s: each worker imports NumPy, OpenCV and skinrecords), preprocessing,
     TFRecord writing and hashing, manifest;
   - "worker path": the converter's own worker functions (`convert._init_worker`/`convert._work`)
     over the same files, in process for 1 worker and in an already started and warmed spawn pool
     for N, so that start-up, listing and writing are left out. The difference to the whole run is
     printed as the overhead.
   Targets: >= 25 img/s per worker (worker path, worst worker count); N workers >= 0.85*N x one
   worker (1.7x for 2; worker path).
B: --num_large sources of --large_size (4000x3000), made like camera JPEGs (A's images upscaled plus
   fine noise: ~3 MB each at q95, real ones are 2-5 MB), preprocessed on one core with
   `preprocess.preprocess_file` and `reduced_decode` True vs False. Target: reduced >= 2x full.

Each measurement runs --repeats times and keeps the fastest pass (other processes on the machine can
only slow a pass down); warm-up work is never timed. Rates are images per wall second
(`time.perf_counter`); B also prints images per CPU second of this process.

Example:
  bench_convert --num_images=200 --num_large=40 --repeats=1
"""

from __future__ import annotations

import multiprocessing
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

_NUM_IMAGES = flags.DEFINE_integer("num_images", 200, "A: number of synthetic sources.")
_SOURCE_SIZE = flags.DEFINE_string("source_size", "1024x768", "A: source WIDTHxHEIGHT in pixels.")
_NUM_LARGE = flags.DEFINE_integer("num_large", 40, "B: number of large synthetic sources.")
_LARGE_SIZE = flags.DEFINE_string("large_size", "4000x3000", "B: large source WIDTHxHEIGHT in "
                                  "pixels; the shorter side must be >= 2x --image_size so that "
                                  "reduced decoding applies.")
_LARGE_NOISE = flags.DEFINE_float("large_noise", 3.5, "B: standard deviation, in grey levels, of "
                                  "the Gaussian noise added to each channel of the upscaled large "
                                  "sources. Without it a 4000x3000 q95 JPEG is ~1.0 MB; 3.5 gives "
                                  "~3 MB, like a camera JPEG (2-5 MB), so the entropy decoder has "
                                  "as much to do as on one.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 512, "Output side in pixels (A and B).")
_REMOVE_HAIR = flags.DEFINE_boolean("remove_hair", True, "Hair removal (black-hat + inpaint) in A "
                                    "and B, as the targets assume.")
_WORKERS = flags.DEFINE_integer("workers", 2, "A: the parallel worker count compared with 1 "
                                "worker; its target is >= 0.85 x workers (1.7x for 2).")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Timed passes per measurement; the fastest is kept.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic images.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder in which a fresh bench_convert-* folder is "
                               "made for sources and outputs (default: the system temp folder).")
_KEEP = flags.DEFINE_boolean("keep", False, "Keep the bench_convert-* folder instead of removing "
                             "it at the end.")

_PER_WORKER_TARGET = 25.0  # img/s per worker, worker path
_SCALING_TARGET = 0.85  # N workers >= 0.85 * N x one worker (1.7x for 2)
_REDUCED_TARGET = 2.0  # reduced decode >= 2x full decode
_CLASSES = ("Melanoma", "NotMelanoma")


def _make_sources(root: pathlib.Path, num: int, size, num_large: int, large_size, noise: float,
                  seed: int) -> tuple[list[str], list[str]]:
  """Writes A's sources in class folders and B's large ones; returns both path lists.

  B's images are A's (same seed and index) upscaled with INTER_CUBIC plus one shared field of
  Gaussian noise: drawing 36 M normals per image would take ~0.6 s each and the decoder cannot tell.
  """
  import cv2  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from skinrecords import synthetic  # pylint: disable=g-import-not-at-top

  for cls in _CLASSES:
    (root / "sources" / cls).mkdir(parents=True)
  (root / "large").mkdir()
  field = None
  if num_large and noise > 0:
    shape = (large_size[1], large_size[0], 3)
    field = np.random.default_rng([seed, 0x401]).standard_normal(shape, np.float32) * noise
    field = np.clip(np.round(field), -128, 127).astype(np.int16)
  small, large = [], []
  for i in range(max(num, num_large)):
    melanoma = i % 2 == 0
    img = synthetic.make_image(np.random.default_rng([seed, i]), melanoma, *size)
    if i < num:
      path = root / "sources" / _CLASSES[0 if melanoma else 1] / f"{synthetic.image_name(i)}.jpg"
      path.write_bytes(synthetic.encode_jpeg(img))
      small.append(str(path))
    if i < num_large:
      big = cv2.resize(img, large_size, interpolation=cv2.INTER_CUBIC)
      if field is not None:
        big = cv2.add(big, field, dtype=cv2.CV_8U)  # saturating
      path = root / "large" / f"{synthetic.image_name(i)}.jpg"
      path.write_bytes(synthetic.encode_jpeg(big))
      large.append(str(path))
  return small, large


def _check_results(paths, results) -> None:
  for path, (data, reason) in zip(paths, results):
    if data is None:
      raise RuntimeError(f"{path}: the converter rejected a synthetic source ({reason}); the "
                         "benchmark would time the wrong work")


def _whole_run(src: pathlib.Path, out: pathlib.Path, workers: int, pconfig) -> float:
  """Seconds for one `convert.convert` of `src` into a fresh `out`."""
  from skinrecords import convert  # pylint: disable=g-import-not-at-top

  shutil.rmtree(out, ignore_errors=True)
  config = convert.ConvertConfig(input_dir=str(src), output_dir=str(out), workers=workers,
                                 progress=False, preprocess=pconfig)
  start = time.perf_counter()
  result = convert.convert(config)
  seconds = time.perf_counter() - start
  inputs = result.manifest["inputs"]
  if result.rejected or inputs["converted"] != inputs["found"]:
    raise RuntimeError(f"{src}: convert rejected {len(result.rejected)} synthetic sources: "
                       f"{result.rejected[:3]}")
  shutil.rmtree(out)
  return seconds


def _init_and_wait(pconfig, barrier) -> None:
  """Pool initializer: the converter's own, then wait until all workers and the parent are ready."""
  from skinrecords import convert  # pylint: disable=g-import-not-at-top

  convert._init_worker(pconfig)  # pylint: disable=protected-access
  barrier.wait()


def _worker_path(paths: list[str], workers: int, pconfig, repeats: int) -> float:
  """Fastest seconds for the worker functions over `paths`, start-up and warm-up excluded."""
  from skinrecords import convert  # pylint: disable=g-import-not-at-top

  init, work = convert._init_worker, convert._work  # pylint: disable=protected-access
  warm = paths[:2 * workers]
  best = float("inf")
  if workers == 1:
    init(pconfig)
    _check_results(warm, map(work, warm))
    for _ in range(repeats):
      start = time.perf_counter()
      results = list(map(work, paths))
      best = min(best, time.perf_counter() - start)
      _check_results(paths, results)
    return best
  ctx = multiprocessing.get_context("spawn")  # as convert._imap
  barrier = ctx.Barrier(workers + 1)
  with ctx.Pool(workers, initializer=_init_and_wait, initargs=(pconfig, barrier)) as pool:
    # Waiting for every worker's start-up (imports) keeps it out of the timed pass even when one
    # worker starts much later than another; then each idle worker takes warm-up files.
    try:
      barrier.wait(timeout=300)
    except threading.BrokenBarrierError as err:
      raise RuntimeError(f"{workers} spawned workers did not all start within 300 s") from err
    _check_results(warm, pool.map(work, warm, chunksize=1))
    for _ in range(repeats):
      start = time.perf_counter()
      results = list(pool.imap(work, paths, chunksize=4))  # as convert._imap
      best = min(best, time.perf_counter() - start)
      _check_results(paths, results)
  return best


def _bench_a(root: pathlib.Path, paths: list[str], workers: int, pconfig, repeats: int) -> dict:
  """{workers: (whole-run seconds, worker-path seconds)} for 1 and `workers` workers."""
  # Untimed warm-up conversion: imports TensorFlow (for the manifest's versions) and tqdm once.
  warm = root / "warm_sources"
  for cls in _CLASSES:
    (warm / cls).mkdir(parents=True)
  for path in paths[:4]:
    target = warm / pathlib.Path(path).parent.name / pathlib.Path(path).name
    shutil.copyfile(path, target)
  _whole_run(warm, root / "warm_records", 1, pconfig)
  timings = {}
  for n in (1, workers):
    whole = min(_whole_run(root / "sources", root / f"records_w{n}", n, pconfig)
                for _ in range(repeats))
    timings[n] = (whole, _worker_path(paths, n, pconfig, repeats))
  return timings


def _bench_b(paths: list[str], pconfig, repeats: int) -> dict:
  """{reduced_decode: (wall seconds, CPU seconds)} for one core, fastest of `repeats` passes."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  import cv2  # pylint: disable=g-import-not-at-top

  from skinrecords import preprocess  # pylint: disable=g-import-not-at-top

  cv2.setNumThreads(1)  # one core, as in a converter worker
  configs = {r: dataclasses.replace(pconfig, reduced_decode=r) for r in (True, False)}
  for config in configs.values():  # warm-up
    for path in paths[:2]:
      preprocess.preprocess_file(path, config)
  best = {r: (float("inf"), float("inf")) for r in configs}
  for _ in range(repeats):
    for reduced, config in configs.items():
      wall, cpu = time.perf_counter(), time.process_time()
      for path in paths:
        preprocess.preprocess_file(path, config)
      wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
      best[reduced] = min(best[reduced], (wall, cpu))
  return best


def _verdict(ok: bool, text: str) -> str:
  return f"{'PASS' if ok else 'MISS'}  {text}"


def run_benchmark(num: int, size, num_large: int, large_size, noise: float, image_size: int,
                  remove_hair: bool, workers: int, repeats: int, seed: int,
                  root: pathlib.Path) -> str:
  """Generates the sources under `root`, times A and B, returns the printed report."""
  from skinrecords import preprocess  # pylint: disable=g-import-not-at-top

  pconfig = preprocess.PreprocessConfig(image_size=image_size, remove_hair=remove_hair)
  start = time.perf_counter()
  small, large = _make_sources(root, num, size, num_large, large_size, noise, seed)
  large_mb = statistics.mean(os.path.getsize(p) for p in large) / 1e6
  lines = [f"sources: {num} x {size[0]}x{size[1]} and {num_large} x {large_size[0]}x"
           f"{large_size[1]} (mean {large_mb:.2f} MB) made in {time.perf_counter() - start:.1f} s "
           f"under {root}",
           f"cpus={os.cpu_count()} image_size={image_size} remove_hair={remove_hair} "
           f"repeats={repeats} (fastest pass kept)", ""]

  timings = _bench_a(root, small, workers, pconfig, repeats)
  lines.append(f"A: {num} sources {size[0]}x{size[1]} -> {image_size}^2 JPEG")
  lines.append(f"{'path':52s} {'workers':>7s} {'seconds':>8s} {'img/s':>8s} {'img/s/worker':>12s} "
               f"{'vs 1 worker':>11s}")
  rates = {}
  for label, k in (("convert.convert, whole run (incl. any start-up)", 0),
                   ("worker path only (warm pool, excl. start-up)", 1)):
    for n in (1, workers):
      seconds = timings[n][k]
      rates[k, n] = num / seconds
      lines.append(f"{label:52s} {n:7d} {seconds:8.2f} {rates[k, n]:8.1f} "
                   f"{rates[k, n] / n:12.1f} {rates[k, n] / rates[k, 1]:10.2f}x")
  for n in (1, workers):
    over = timings[n][0] - timings[n][1]
    lines.append(f"overhead with {n} worker{'s' if n > 1 else ''} (whole run - worker path): "
                 f"{over:.2f} s" + (" (spawn start-up, listing, writing, manifest)" if n > 1 else
                                   " (listing, writing, manifest; no pool)"))
  lines.append("")

  b = _bench_b(large, pconfig, repeats)
  lines.append(f"B: {num_large} sources {large_size[0]}x{large_size[1]} -> {image_size}^2, one "
               "core, preprocess.preprocess_file")
  lines.append(f"{'path':52s} {'seconds':>8s} {'img/s':>8s} {'img/CPU-s':>9s}")
  for reduced in (True, False):
    wall, cpu = b[reduced]
    lines.append(f"{f'reduced_decode={reduced}':52s} {wall:8.2f} {num_large / wall:8.1f} "
                 f"{num_large / cpu:9.1f}")
  b_ratio, b_cpu_ratio = b[False][0] / b[True][0], b[False][1] / b[True][1]
  lines.append(f"reduced / full: {b_ratio:.2f}x wall, {b_cpu_ratio:.2f}x CPU")
  lines.append("")

  per_worker = {n: rates[1, n] / n for n in (1, workers)}
  worst = min(per_worker, key=per_worker.get)
  scaling = rates[1, workers] / rates[1, 1]
  target = _SCALING_TARGET * workers
  lines.append("verdicts:")
  lines.append(_verdict(
      per_worker[worst] >= _PER_WORKER_TARGET,
      f"A per worker >= {_PER_WORKER_TARGET:.0f} img/s (worker path, worst of 1 and {workers} "
      f"workers): {per_worker[worst]:.1f} img/s/worker with {worst} "
      f"(whole run: {min(rates[0, n] / n for n in (1, workers)):.1f})"))
  lines.append(_verdict(
      scaling >= target,
      f"A {workers} workers / 1 worker >= {target:.2f}x (worker path): {scaling:.2f}x "
      f"(whole run: {rates[0, workers] / rates[0, 1]:.2f}x)"))
  lines.append(_verdict(b_ratio >= _REDUCED_TARGET,
                        f"B reduced / full decode >= {_REDUCED_TARGET:.1f}x: {b_ratio:.2f}x "
                        f"(CPU: {b_cpu_ratio:.2f}x)"))
  return "\n".join(lines)


def _size(flag) -> tuple[int, int]:
  from skinrecords import synthetic  # pylint: disable=g-import-not-at-top

  try:
    size = synthetic.parse_size(flag.value)
  except ValueError as err:
    raise app.UsageError(f"--{flag.name}={flag.value}: {err}") from err
  if min(size) < 16:
    raise app.UsageError(f"--{flag.name}={flag.value}: both sides must be >= 16 pixels")
  return size


def main(argv):
  del argv  # Unused.
  for flag, least in ((_NUM_IMAGES, 8), (_NUM_LARGE, 2), (_WORKERS, 2), (_REPEATS, 1),
                      (_IMAGE_SIZE, 16), (_SEED, 0)):
    if flag.value < least:
      raise app.UsageError(f"--{flag.name}={flag.value}: must be an integer >= {least}")
  if _LARGE_NOISE.value < 0:
    raise app.UsageError(f"--large_noise={_LARGE_NOISE.value}: must be >= 0")
  size, large_size = _size(_SOURCE_SIZE), _size(_LARGE_SIZE)
  if min(size) < _IMAGE_SIZE.value:
    raise app.UsageError(f"--source_size={_SOURCE_SIZE.value}: the shorter side must be >= "
                         f"--image_size={_IMAGE_SIZE.value}")
  if min(large_size) < 2 * _IMAGE_SIZE.value:
    raise app.UsageError(f"--large_size={_LARGE_SIZE.value}: the shorter side must be >= 2 x "
                         f"--image_size={_IMAGE_SIZE.value}, or reduced decoding never applies")
  if _WORKDIR.value:
    pathlib.Path(_WORKDIR.value).mkdir(parents=True, exist_ok=True)
  root = pathlib.Path(tempfile.mkdtemp(prefix="bench_convert-", dir=_WORKDIR.value))
  try:
    print(run_benchmark(_NUM_IMAGES.value, size, _NUM_LARGE.value, large_size, _LARGE_NOISE.value,
                        _IMAGE_SIZE.value, _REMOVE_HAIR.value, _WORKERS.value, _REPEATS.value,
                        _SEED.value, root), flush=True)
  finally:
    if _KEEP.value:
      print(f"kept {root}")
    else:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
