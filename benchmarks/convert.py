"""Times the converter on synthetic sources against this machine's own ceiling, and projects it.

A: --num_images sources of --source_size (1024x768) -> --image_size^2 JPEG with hair removal, converted
   by `convert.convert` with 1 worker and with --workers (2), each given an already started
   `workers.RecordPool` so that spawn start-up (a fixed ~0.2 s per run) is left out. In the same run,
   interleaved with those conversions, the machine's own ceiling: --workers processes of a fixed
   CPU-bound OpenCV job (`preprocess.preprocess_bytes` of one source, repeated) against one process.
   --rounds rounds alternate the order; the medians are reported. Also measured: the coordinating
   (parent) process's CPU time per image and per MB of records in the --workers runs, all its threads
   included (pool transport, appending, hashing, listing, manifest), and from it the projected rate
   at 8/16/32/64 workers = min(workers x the 1-worker rate, 1 / coordinator cost).
   Targets: >= 25 img/s per worker; --workers / 1 worker >= 0.9 of the ceiling (same rounds);
   coordinator <= 1 ms per image (the target is for 512^2 images).
B: --num_large sources of --large_size (4000x3000), made like camera JPEGs (A's images upscaled plus
   fine noise: ~3 MB each at q95, real ones are 2-5 MB), preprocessed on one core with
   `preprocess.preprocess_file` and `reduced_decode` True vs False. Target: reduced >= 2x full.

C (issue 25): --num_multi sources of --multi_source_size (2000x1500) converted to every size of
   --multi_sizes (256,384,512) in one pass (`image_sizes`: one decode per image) against one run
   per size, 1 worker each, near-duplicates off in both (the hash pass costs the same either
   way), --rounds interleaved rounds. Target: one pass >= 2x faster than the separate runs.

Rates are images per wall second (`time.perf_counter`); warm-up work is never timed.

Example:
  python -m benchmarks.convert --num_images=200 --num_large=40 --rounds=3
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import pathlib
import shutil
import statistics
import time

from absl import app
from absl import flags

from benchmarks import common as bench_common
from skinrecords.cli import common as cli_common

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
_WORKERS = flags.DEFINE_integer("workers", 2, "A: the worker count compared with 1 worker, and the "
                                "process count of the ceiling job.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "A: interleaved rounds (ceiling and both conversions "
                               "each round); B: timed passes, the fastest kept.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic images.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder in which a fresh bench_convert-* folder is "
                               "made for sources and outputs (default: the system temp folder).")
_PARTS = flags.DEFINE_list("parts", ["A", "B"], "Which parts to run: A, B and/or C (several "
                           "sizes in one pass, issue 25; e.g. --parts=C).")
_NUM_MULTI = flags.DEFINE_integer("num_multi", 24, "C: number of large sources.")
_MULTI_SOURCE_SIZE = flags.DEFINE_string("multi_source_size", "2000x1500", "C: source size.")
_MULTI_SIZES = flags.DEFINE_list("multi_sizes", ["256", "384", "512"], "C: output sizes.")
_KEEP = flags.DEFINE_boolean("keep", False, "Keep the bench_convert-* folder instead of removing "
                             "it at the end.")

_PER_WORKER_TARGET = 25.0  # img/s per worker
_CEILING_TARGET = 0.9  # N workers / 1 worker >= 0.9 x (N processes / 1 process of the OpenCV job)
_COORDINATOR_TARGET_MS = 1.0  # coordinator CPU per 512^2 image: >= 16 workers at ~60 img/s each
_REDUCED_TARGET = 2.0  # reduced decode >= 2x full decode
_MULTI_TARGET = 2.0  # one pass for three sizes >= 2x three runs
_PROJECTED_WORKERS = (8, 16, 32, 64)
_CLASSES = ("Melanoma", "NotMelanoma")


def _make_sources(root: pathlib.Path, num: int, size, num_large: int, large_size, noise: float,
                  seed: int) -> tuple[list[str], list[str]]:
  """Writes A's sources in class folders and B's large ones; returns both path lists.

  B's images are A's (same seed and index) upscaled with INTER_CUBIC plus one shared field of
  Gaussian noise: drawing 36 M normals per image would take ~0.6 s each and the decoder cannot tell.
  """
  import cv2  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from skinrecords.data import synthetic  # pylint: disable=g-import-not-at-top

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


def _whole_run(src: pathlib.Path, out: pathlib.Path, pool, pconfig) -> tuple[float, float, float]:
  """(wall seconds, parent CPU seconds, MB of shards) for one `convert.convert` into a fresh `out`."""
  from skinrecords.data import convert  # pylint: disable=g-import-not-at-top

  shutil.rmtree(out, ignore_errors=True)
  config = convert.ConvertConfig(input_dir=str(src), output_dir=str(out), workers=pool.workers,
                                 progress=False, preprocess=pconfig)
  wall, cpu = time.perf_counter(), time.process_time()
  result = convert.convert(config, pool=pool)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  inputs = result.manifest["inputs"]
  if result.rejected or inputs["converted"] != inputs["found"]:
    raise RuntimeError(f"{src}: convert rejected {len(result.rejected)} synthetic sources: "
                       f"{result.rejected[:3]}")
  megabytes = sum(p.stat().st_size for p in out.glob("*.tfrecord")) / 1e6
  shutil.rmtree(out)
  return wall, cpu, megabytes


def _init_ceiling(ready) -> None:
  import cv2  # pylint: disable=g-import-not-at-top

  cv2.setNumThreads(1)  # as a converter worker
  ready.put(os.getpid())


def _ceiling_job(args) -> tuple[int, float, float]:
  """(pid, start, end): `reps` x `preprocess_bytes(data)`; perf_counter is system-wide on Linux."""
  from skinrecords.data import preprocess  # pylint: disable=g-import-not-at-top

  data, pconfig, reps = args
  start = time.perf_counter()
  for _ in range(reps):
    preprocess.preprocess_bytes(data, pconfig)
  return os.getpid(), start, time.perf_counter()


class _Ceiling:
  """N started processes that run the fixed OpenCV job: rate of N at once over the rate of one."""

  def __init__(self, processes: int, data: bytes, pconfig, reps: int):
    ctx = multiprocessing.get_context("spawn")  # as the converter
    ready = ctx.Queue()
    self.processes, self._args = processes, (data, pconfig, reps)
    self._pool = ctx.Pool(processes, initializer=_init_ceiling, initargs=(ready,))
    for _ in range(processes):
      ready.get(timeout=300)
    self._pool.map(_ceiling_job, [(data, pconfig, 1)] * processes, chunksize=1)  # warm-up

  def single(self) -> float:
    _, start, end = self._pool.apply(_ceiling_job, (self._args,))
    return self._args[2] / (end - start)

  def parallel(self) -> float:
    for _ in range(5):  # two jobs taken by one idle process would time the wrong thing
      runs = self._pool.map(_ceiling_job, [self._args] * self.processes, chunksize=1)
      if len({pid for pid, _, _ in runs}) == self.processes:
        span = max(end for _, _, end in runs) - min(start for _, start, _ in runs)
        return self.processes * self._args[2] / span
    raise RuntimeError(f"the ceiling job never ran on {self.processes} distinct processes")

  def close(self) -> None:
    self._pool.terminate()
    self._pool.join()


@dataclasses.dataclass
class _Round:
  ceiling_1: float = 0.0  # img/s, one process
  ceiling_n: float = 0.0  # img/s, N processes
  convert_1: float = 0.0  # img/s, 1 worker
  convert_n: float = 0.0  # img/s, N workers
  coordinator_ms: float = 0.0  # parent CPU per image, N workers
  coordinator_ms_per_mb: float = 0.0

  @property
  def ceiling(self) -> float:
    return self.ceiling_n / self.ceiling_1

  @property
  def scaling(self) -> float:
    return self.convert_n / self.convert_1

  @property
  def of_ceiling(self) -> float:
    return self.scaling / self.ceiling


def _warm_copy(root: pathlib.Path, paths: list[str]) -> pathlib.Path:
  warm = root / "warm_sources"
  for cls in _CLASSES:
    (warm / cls).mkdir(parents=True)
  for path in paths[:4]:
    shutil.copyfile(path, warm / pathlib.Path(path).parent.name / pathlib.Path(path).name)
  return warm


def _bench_a(root: pathlib.Path, paths: list[str], workers: int, pconfig, rounds: int):
  """The interleaved rounds of ceiling and conversions; returns [_Round]."""
  from skinrecords.data.workers import RecordPool  # pylint: disable=g-import-not-at-top

  reps = max(2, len(paths) // (2 * workers))  # about as long as one conversion pass
  data = pathlib.Path(paths[0]).read_bytes()
  ceiling = _Ceiling(workers, data, pconfig, reps)
  try:
    with RecordPool(1, pconfig) as one, RecordPool(workers, pconfig, wait_ready=True) as many:
      warm = _warm_copy(root, paths)
      for pool in (one, many):  # untimed: imports TensorFlow (manifest versions), tqdm, caches
        _whole_run(warm, root / "warm_records", pool, pconfig)
      results = []
      for r in range(rounds):
        result = _Round()
        steps = [("ceiling", None), ("convert", one), ("convert", many)]
        for kind, pool in (steps if r % 2 == 0 else steps[::-1]):
          if kind == "ceiling":
            result.ceiling_1, result.ceiling_n = ceiling.single(), ceiling.parallel()
            continue
          wall, cpu, mb = _whole_run(root / "sources", root / "records", pool, pconfig)
          if pool is one:
            result.convert_1 = len(paths) / wall
          else:
            result.convert_n = len(paths) / wall
            result.coordinator_ms, result.coordinator_ms_per_mb = 1e3 * cpu / len(paths), 1e3 * cpu / mb
        results.append(result)
  finally:
    ceiling.close()
  return results


def _bench_b(paths: list[str], pconfig, repeats: int) -> dict:
  """{reduced_decode: (wall seconds, CPU seconds)} for one core, fastest of `repeats` passes."""
  import cv2  # pylint: disable=g-import-not-at-top

  from skinrecords.data import preprocess  # pylint: disable=g-import-not-at-top

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


def _report_a(rounds: list[_Round], num: int, size, image_size: int, workers: int):
  lines = [f"A: {num} sources {size[0]}x{size[1]} -> {image_size}^2 JPEG; convert.convert with "
           f"started workers; ceiling = {workers} processes / 1 of a fixed OpenCV job",
           f"{'round':6s} {'ceil 1 img/s':>12s} {f'ceil {workers} img/s':>12s} {'ceiling':>8s} "
           f"{'1 worker img/s':>14s} {f'{workers} workers img/s':>16s} {'scaling':>8s} "
           f"{'of ceiling':>10s} {'coord ms/img':>12s} {'coord ms/MB':>11s}"]

  def row(label, values):
    return (f"{label:6s} {values[0]:12.1f} {values[1]:12.1f} {values[2]:7.2f}x {values[3]:14.1f} "
            f"{values[4]:16.1f} {values[5]:7.2f}x {values[6]:10.2f} {values[7]:12.3f} "
            f"{values[8]:11.2f}")

  table = [(r.ceiling_1, r.ceiling_n, r.ceiling, r.convert_1, r.convert_n, r.scaling, r.of_ceiling,
            r.coordinator_ms, r.coordinator_ms_per_mb) for r in rounds]
  for i, values in enumerate(table):
    lines.append(row(str(i + 1), values))
  medians = [statistics.median(column) for column in zip(*table)]
  lines.append(row("median", medians))
  return lines, medians


def _projection(per_worker: float, coordinator_ms: float) -> list[str]:
  limit = 1e3 / coordinator_ms
  lines = [f"projected conversion rate = min(workers x {per_worker:.1f} img/s (1 worker), "
           f"1 / coordinator {coordinator_ms:.3f} ms = {limit:.0f} img/s):"]
  for w in _PROJECTED_WORKERS:
    rate = min(w * per_worker, limit)
    bound = "workers" if w * per_worker <= limit else "coordinator"
    lines.append(f"  {w:3d} workers: {rate:8.0f} img/s ({bound}-bound)")
  lines.append(f"  the coordinator saturates at {limit / per_worker:.0f} workers")
  return lines


def run_benchmark(num: int, size, num_large: int, large_size, noise: float, image_size: int,
                  remove_hair: bool, workers: int, rounds: int, seed: int,
                  root: pathlib.Path) -> str:
  """Generates the sources under `root`, times A and B, returns the printed report."""
  from skinrecords.data import preprocess  # pylint: disable=g-import-not-at-top

  pconfig = preprocess.PreprocessConfig(image_size=image_size, remove_hair=remove_hair)
  start = time.perf_counter()
  small, large = _make_sources(root, num, size, num_large, large_size, noise, seed)
  large_mb = statistics.mean(os.path.getsize(p) for p in large) / 1e6
  lines = [f"sources: {num} x {size[0]}x{size[1]} and {num_large} x {large_size[0]}x"
           f"{large_size[1]} (mean {large_mb:.2f} MB) made in {time.perf_counter() - start:.1f} s "
           f"under {root}",
           f"cpus={os.cpu_count()} image_size={image_size} remove_hair={remove_hair} "
           f"rounds={rounds}", ""]

  a_lines, m = _report_a(_bench_a(root, small, workers, pconfig, rounds), num, size, image_size,
                         workers)
  per_worker, of_ceiling, coordinator_ms = m[3], m[6], m[7]
  lines += a_lines
  lines.append(f"coordinator: {coordinator_ms:.3f} ms CPU per image, {m[8]:.2f} ms per MB of "
               f"records (parent process, all threads, {workers}-worker runs, median)")
  lines += _projection(per_worker, coordinator_ms)
  lines.append("")

  b = _bench_b(large, pconfig, rounds)
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

  lines.append("verdicts:")
  lines.append(_verdict(per_worker >= _PER_WORKER_TARGET,
                        f"A per worker >= {_PER_WORKER_TARGET:.0f} img/s (1 worker, median): "
                        f"{per_worker:.1f} img/s"))
  lines.append(_verdict(of_ceiling >= _CEILING_TARGET,
                        f"A {workers} workers / 1 worker >= {_CEILING_TARGET:.2f} of the machine's "
                        f"{workers}-process ceiling (median of rounds): {of_ceiling:.2f} "
                        f"({m[5]:.2f}x vs {m[2]:.2f}x)"))
  lines.append(_verdict(coordinator_ms <= _COORDINATOR_TARGET_MS,
                        f"A coordinator <= {_COORDINATOR_TARGET_MS:.1f} ms CPU per image "
                        f"({image_size}^2): {coordinator_ms:.3f} ms"))
  lines.append(_verdict(b_ratio >= _REDUCED_TARGET,
                        f"B reduced / full decode >= {_REDUCED_TARGET:.1f}x: {b_ratio:.2f}x "
                        f"(CPU: {b_cpu_ratio:.2f}x)"))
  return "\n".join(lines)


def _bench_c(root: pathlib.Path, num: int, size, sizes: list[int], rounds: int) -> list[str]:
  """One several-size pass against one run per size, interleaved; returns the report lines."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from skinrecords.data import convert  # pylint: disable=g-import-not-at-top
  from skinrecords.data import preprocess  # pylint: disable=g-import-not-at-top
  from skinrecords.data import synthetic  # pylint: disable=g-import-not-at-top
  from skinrecords.data.workers import RecordPool  # pylint: disable=g-import-not-at-top

  src = root / "multi_sources"
  for i in range(num):
    cls = _CLASSES[i % 2]
    (src / cls).mkdir(parents=True, exist_ok=True)
    img = synthetic.make_image(np.random.default_rng([7, i]), i % 2 == 0, *size)
    (src / cls / f"{synthetic.image_name(i)}.jpg").write_bytes(synthetic.encode_jpeg(img))
  sizes = sorted(sizes)

  def run(image_sizes: tuple[int, ...]) -> float:
    pre = preprocess.PreprocessConfig(image_size=max(image_sizes))
    config = convert.ConvertConfig(input_dir=str(src), output_dir=str(root / "multi_out"),
                                   workers=1, progress=False, preprocess=pre,
                                   image_sizes=image_sizes if len(image_sizes) > 1 else (),
                                   near_duplicates="off")
    shutil.rmtree(root / "multi_out", ignore_errors=True)
    with RecordPool(1, pre, sizes=image_sizes if len(image_sizes) > 1 else None) as pool:
      start = time.perf_counter()
      convert.convert(config, pool=pool)
      return time.perf_counter() - start

  run(tuple(sizes))  # warm-up: imports, page cache
  lines = [f"C: {num} sources {size[0]}x{size[1]} -> {','.join(map(str, sizes))}, 1 worker, "
           f"load average before: {os.getloadavg()[0]:.1f}",
           f"{'round':6s} {'one pass s':>10s} {'separate s':>10s} {'speed-up':>9s}"]
  ratios = []
  for r in range(rounds):
    order = [True, False] if r % 2 == 0 else [False, True]
    times = {}
    for multi in order:
      times[multi] = run(tuple(sizes)) if multi else sum(run((s,)) for s in sizes)
    ratios.append(times[False] / times[True])
    lines.append(f"{r + 1:<6d} {times[True]:10.2f} {times[False]:10.2f} {ratios[-1]:8.2f}x")
  median = statistics.median(ratios)
  lines.append(f"load average after: {os.getloadavg()[0]:.1f}")
  lines.append(_verdict(median >= _MULTI_TARGET, f"C one pass >= {_MULTI_TARGET:.1f}x the "
                        f"separate runs (median of rounds): {median:.2f}x"))
  return lines


def _size(flag) -> tuple[int, int]:
  from skinrecords.data import synthetic  # pylint: disable=g-import-not-at-top

  try:
    size = synthetic.parse_size(flag.value)
  except ValueError as err:
    raise app.UsageError(f"--{flag.name}={flag.value}: {err}") from err
  if min(size) < 16:
    raise app.UsageError(f"--{flag.name}={flag.value}: both sides must be >= 16 pixels")
  return size


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for flag, least in ((_NUM_IMAGES, 8), (_NUM_LARGE, 2), (_WORKERS, 2), (_ROUNDS, 1),
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
  with bench_common.work_folder("bench_convert-", _WORKDIR.value, _KEEP.value) as root:
    if "C" in _PARTS.value:
      print("\n".join(_bench_c(root, _NUM_MULTI.value, _size(_MULTI_SOURCE_SIZE),
                                [int(s) for s in _MULTI_SIZES.value], _ROUNDS.value)), flush=True)
    if not {"A", "B"} & set(_PARTS.value):
      return
    print(run_benchmark(_NUM_IMAGES.value, size, _NUM_LARGE.value, large_size, _LARGE_NOISE.value,
                        _IMAGE_SIZE.value, _REMOVE_HAIR.value, _WORKERS.value, _ROUNDS.value,
                        _SEED.value, root), flush=True)


def run():
  """Console entry point (`bin/bench_convert`)."""
  cli_common.run(main, "bench_convert")


if __name__ == "__main__":
  run()
