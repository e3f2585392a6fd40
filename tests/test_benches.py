"""bin/bench_convert, bin/bench_input and benchmarks.hair at a tiny size, so that they cannot rot.

The speed targets live in the benchmarks themselves and a tiny run on a shared machine meets or
misses them by chance, so these tests check what can be wrong whatever the speed: every row is
printed; each ratio, median and projection is the one computed from the rates printed beside it
(to their printed rounding); each verdict is PASS exactly when its printed value meets its target;
the rates count the images processed; the work folder is removed (or kept with --keep).
"""
# pylint: disable=protected-access

from __future__ import annotations

import ast
import re
import statistics
import types

import pytest

from benchmarks import augment as bench_augment
from benchmarks import hair as bench_hair
from conftest import REPO, run_bin

_INPUT_PY = REPO / "benchmarks" / "input.py"


def _bench_input_parts(**namespace) -> types.SimpleNamespace:
  """benchmarks/input.py's _LABELS, _TARGETS and _time, read from its source: importing it would
  define absl flags that benchmarks/augment.py (imported above) defines too."""
  parts = {}
  for node in ast.parse(_INPUT_PY.read_text()).body:
    if isinstance(node, ast.Assign) and node.targets[0].id in ("_LABELS", "_TARGETS"):
      parts[node.targets[0].id] = ast.literal_eval(node.value)
    elif isinstance(node, ast.FunctionDef) and node.name == "_time":
      code = compile(ast.Module([node], []), str(_INPUT_PY), "exec")
      exec(code, namespace)  # pylint: disable=exec-used
      parts["_time"] = namespace["_time"]
  return types.SimpleNamespace(**parts)

_RATE = r"\s+(\d+(?:\.\d+)?)"


def _rate(stdout: str, label: str, middle: str = "") -> float:
  m = re.search(re.escape(label) + middle + _RATE, stdout)
  assert m, f"row {label!r} missing from:\n{stdout}"
  return float(m[1])


def _verdicts(stdout: str) -> list[str]:
  return [line for line in stdout.splitlines() if re.match(r"(PASS|MISS|n/a) ", line)]


def _near(shown: float, exact: float, places: int) -> bool:
  """Whether `shown`, printed with `places` decimals, is `exact` rounded (plus float slack)."""
  return abs(shown - exact) <= 0.5 * 10 ** -places + 1e-9 * abs(exact)


def _check_verdict(line: str, value: float, op: str, target: float) -> None:
  meets = value >= target if op == ">=" else value <= target
  assert line.startswith("PASS" if meets else "MISS"), (line, value, op, target)


def _check_convert_report(out: str) -> None:
  """Medians, coordinator line, projection, B ratio and verdicts all follow from the rows."""
  lines = out.splitlines()
  number = r"\s+(\d+\.\d+)x?"
  rows = {}
  for label in ("1", "2", "median"):
    row = next((line for line in lines if line.startswith(f"{label} ")), None)
    assert row, f"round {label!r} missing from:\n{out}"
    values = re.fullmatch(re.escape(label) + number * 9, row)
    assert values and all(float(v) > 0 for v in values.groups()), row
    rows[label] = [float(v) for v in values.groups()]
  places = (1, 1, 2, 1, 1, 2, 2, 3, 2)
  for column, digits in enumerate(places):
    exact = statistics.median([rows["1"][column], rows["2"][column]])
    # The rounds are printed rounded, so their median may be off by one rounding step more.
    assert abs(rows["median"][column] - exact) <= 10 ** -digits + 1e-9, (column, rows)
  median = rows["median"]
  coordinator = re.search(r"coordinator: (\d+\.\d{3}) ms CPU per image, (\d+\.\d\d) ms per MB",
                          out)
  assert coordinator and [float(v) for v in coordinator.groups()] == median[7:9], out
  head = re.search(r"min\(workers x (\d+\.\d) img/s \(1 worker\), 1 / coordinator (\d+\.\d{3}) "
                   r"ms = (\d+) img/s\)", out)
  per_worker, coord_ms, limit = float(head[1]), float(head[2]), int(head[3])
  # The printed rates are rounded: per_worker to 0.1 img/s, the coordinator to 0.001 ms, so the
  # limit 1000 / coord_ms is known to 1000 * 0.0005 / coord_ms^2 (e.g. +-1.1 img/s at 0.688 ms).
  limit_slack = 0.5 + 0.5 / coord_ms ** 2
  assert per_worker == median[3] and coord_ms == median[7]
  assert abs(limit - 1e3 / coord_ms) <= limit_slack, (limit, coord_ms)
  projected = re.findall(r"^\s+(\d+) workers:\s+(\d+) img/s \((workers|coordinator)-bound\)$",
                         out, re.M)
  assert [int(w) for w, _, _ in projected] == [8, 16, 32, 64], out
  for w, rate, bound in projected:
    w, rate = int(w), int(rate)
    slack = limit_slack + 0.05 * w  # w times a rate known to +-0.05
    assert abs(rate - min(w * per_worker, 1e3 / coord_ms)) <= slack, (w, rate)
    if abs(w * per_worker - 1e3 / coord_ms) > slack:  # clear of the rounding: the bound is known
      assert bound == ("workers" if w * per_worker < 1e3 / coord_ms else "coordinator"), (w, bound)
  b_rates = {r: float(v) for r, v in re.findall(
      r"^reduced_decode=(True|False)\s+\d+\.\d\d\s+(\d+\.\d)\s+\d+\.\d$", out, re.M)}
  assert set(b_rates) == {"True", "False"} and all(b_rates.values()), out
  b_ratio = float(re.search(r"reduced / full: (\d+\.\d\d)x wall", out)[1])
  assert abs(b_ratio - b_rates["True"] / b_rates["False"]) <= 0.006 + 0.001 * b_ratio, out
  verdicts = _verdicts(out)
  assert [v.split()[1] for v in verdicts] == ["A", "A", "A", "B"], out
  assert ">= 25 img/s" in verdicts[0] and ">= 0.90 of the machine's 2-process ceiling" in verdicts[1]
  assert "<= 1.0 ms CPU per image" in verdicts[2] and ">= 2.0x" in verdicts[3]
  assert verdicts[0].endswith(f": {median[3]:.1f} img/s")
  assert f": {median[6]:.2f} ({median[5]:.2f}x vs {median[2]:.2f}x)" in verdicts[1]
  assert verdicts[2].endswith(f": {median[7]:.3f} ms") and f": {b_ratio:.2f}x" in verdicts[3]
  for line, value, op, target in zip(verdicts, (median[3], median[6], median[7], b_ratio),
                                     (">=", ">=", "<=", ">="), (25, 0.90, 1.0, 2.0)):
    _check_verdict(line, value, op, target)


def _check_input_report(out: str, num_images: int, image_size: int) -> dict:
  """Every row printed; each verdict's ratios are the quotients of the rates printed above."""
  assert out.startswith(f"{num_images} synthetic {image_size}x{image_size} JPEGs"), out
  lines = out.splitlines()
  rates = {}
  for key, label in _bench_input_parts()._LABELS.items():
    row = next((line for line in lines if line.startswith(label)), None)
    assert row, f"row {label!r} missing from:\n{out}"
    if key == "1" and row.endswith("n/a (pip install -e .[bench])"):
      continue  # Row (1) needs tf_keras (the [bench] extra); without it the row says how.
    found = re.fullmatch(re.escape(label) + r"\s+(\d+\.\d)\s+(\d+\.\d)", row)
    assert found and float(found[1]) > 0 and float(found[2]) > 0, row
    rates[key] = (float(found[1]), float(found[2]))
  verdicts = _verdicts(out)
  targets = _bench_input_parts()._TARGETS
  assert [v.split()[1] for v in verdicts] == [t[0].split()[0] for t in targets], out
  for line, (name, num_key, den_key, target, _) in zip(verdicts, targets):
    if num_key not in rates or den_key not in rates:
      assert line.startswith("n/a "), line
      continue
    shown = re.search(r": (\d+\.\d\d) \[(\d+\.\d\d)\]$", line)
    assert shown and f"{name} >= {target:g}" in line, line
    for i, ratio in enumerate((float(shown[1]), float(shown[2]))):
      exact = rates[num_key][i] / rates[den_key][i]
      # Rates are printed to 0.1 img/s, so their quotient is known to that relative precision.
      slack = 0.005 + exact * (0.05 / rates[num_key][i] + 0.05 / rates[den_key][i])
      assert abs(ratio - exact) <= slack, (line, exact)
    _check_verdict(line, float(shown[1]), ">=", target)
  return rates


@pytest.mark.slow
def test_bench_convert_prints_every_row_and_removes_its_folder(tmp_path):
  proc = run_bin("bench_convert", "--num_images=8", "--num_large=2", "--source_size=128x96",
                 "--large_size=384x288", "--image_size=64", "--rounds=2", f"--workdir={tmp_path}")
  _check_convert_report(proc.stdout)
  assert list(tmp_path.iterdir()) == []  # sources and records removed


@pytest.mark.slow
def test_bench_convert_runs_as_a_module(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  from conftest import REPO, bin_env  # pylint: disable=g-import-not-at-top

  proc = subprocess.run([sys.executable, "-m", "benchmarks.convert", "--image_size=64",
                         "--large_size=120x100", f"--workdir={tmp_path}"], cwd=REPO,
                        capture_output=True, text=True, env=bin_env(), timeout=120, check=False)
  assert proc.returncode != 0 and "--large_size=120x100" in proc.stderr, proc.stderr
  assert "Traceback" not in proc.stderr


def test_bench_convert_rejects_a_large_size_too_small_for_reduced_decoding(tmp_path):
  proc = run_bin("bench_convert", "--image_size=64", "--large_size=120x100",
                 f"--workdir={tmp_path}", check=False)
  assert proc.returncode != 0
  assert "--large_size=120x100" in proc.stderr and "2 x --image_size=64" in proc.stderr
  assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_bench_input_prints_every_row_and_keeps_its_folder(tmp_path):
  proc = run_bin("bench_input", "--num_images=16", "--image_size=64", "--batch_size=8",
                 "--batches=2", "--batches_slow=1", "--warmup=1", "--keep", f"--workdir={tmp_path}")
  out = proc.stdout
  _check_input_report(out, 16, 64)
  kept = list(tmp_path.iterdir())
  assert len(kept) == 1 and kept[0].name.startswith("bench_input-"), kept
  assert f"kept {kept[0]}" in out
  assert (kept[0] / "records" / "manifest.json").is_file()
  assert len(list((kept[0] / "images").glob("*/*.jpg"))) == 16


@pytest.mark.slow
def test_benchmark_reports_every_path():
  rows = bench_augment.benchmark(image_size=24, batch_size=2, iters=1)
  assert [row[0][:3] for row in rows] == ["(a)", "(b)", "(b)", "(c)"]
  assert all(rate > 0 and cpu_rate > 0 for _, rate, cpu_rate in rows)


def test_rates_count_the_images_each_timed_call_returns():
  """_time divides the images the timed calls returned (warm-up calls excluded) by the seconds."""
  clock = {"wall": 0.0, "cpu": 0.0}
  fake_time = types.SimpleNamespace(perf_counter=lambda: clock["wall"],
                                    process_time=lambda: clock["cpu"])
  time_fn = _bench_input_parts(time=fake_time)._time
  sizes = iter([100, 100, 8, 8, 5])  # two warm-up batches, then three timed ones

  def next_batch():
    clock["wall"] += 2.0
    clock["cpu"] += 0.5
    return next(sizes)

  wall_rate, cpu_rate = time_fn(next_batch, warmup=2, batches=3)
  assert (wall_rate, cpu_rate) == (21 / 6.0, 21 / 1.5)


def test_hair_report_rows_and_verdicts_follow_the_scores(capsys):
  assert bench_hair.main(["--num_images=2", "--sizes=48", "--rounds=1"]) == 0
  out = capsys.readouterr().out
  lines = out.splitlines()
  assert lines[1] == "## 48 px" and all(name in lines[2] for name in bench_hair.METHODS)
  data = bench_hair.make_set(48, 2, 0)
  for method in bench_hair.METHODS:  # the printed scores are those of the same data, recomputed
    row = bench_hair.score(method, data)
    column = list(bench_hair.METHODS).index(method)
    for metric, value in row.items():
      line = next(l for l in lines if l.startswith(metric))
      assert line[34:].split()[column] == bench_hair._fmt(value), (metric, method)
    before, after = map(int, row["dots/globules before/after"].split("/"))
    assert row["dots/globules kept"] == after / max(before, 1)
    assert 0 <= row["precision"] <= 1 and 0 <= row["recall (all hair)"] <= 1
  assert next(l for l in lines if l.startswith("ms / image"))  # timing row printed too
  assert "PASS" not in out and "MISS" not in out  # verdicts are for 512 px only


def test_hair_verdicts_meet_targets_inclusively():
  at_target = {metric: target for metric, _, target in bench_hair.TARGETS_512}
  assert all(v.startswith("PASS") for v in bench_hair.verdicts(at_target))
  for i, (metric, op, target) in enumerate(bench_hair.TARGETS_512):
    worse = dict(at_target, **{metric: target - 0.001 if op == ">=" else target + 0.001})
    got = [v[:4] for v in bench_hair.verdicts(worse)]
    assert got == ["PASS"] * i + ["MISS"] + ["PASS"] * (len(got) - i - 1), metric


def test_report_checks_on_saved_style_output_catch_a_wrong_ratio():
  """The checkers themselves can fail: a ratio that is not the quotient of its rates is caught."""
  rows = "\n".join(f"{label:68s} {100.0:9.1f} {50.0:9.1f}"
                   for label in _bench_input_parts()._LABELS.values())
  head = "16 synthetic 64x64 JPEGs (stored: mean 2 KB) prepared in 1.0 s under /x\n\n"
  good = (f"{head}{rows}\n\nverdicts\nPASS  (3)/(5) >= 0.95 (x): 1.00 [1.00]\n"
          "MISS  aug ours/Keras >= 30 (x): 1.00 [1.00]\nMISS  (4)/(1) >= 20 (x): 1.00 [1.00]")
  _check_input_report(good, 16, 64)
  wrong_ratio = good.replace("(x): 1.00 [1.00]\nMISS  (4)", "(x): 1.10 [1.00]\nMISS  (4)")
  wrong_verdict = good.replace("MISS  (4)/(1)", "PASS  (4)/(1)")
  missing_row = good.replace("(5) decode limit", "(5) decode limits")
  for bad in (wrong_ratio, wrong_verdict, missing_row):
    with pytest.raises(AssertionError):
      _check_input_report(bad, 16, 64)


def test_bench_speed_reports_each_check_with_a_verdict_that_matches_its_time():
  from benchmarks import speed  # pylint: disable=g-import-not-at-top

  rows = speed.measure(rounds=2, n=500, size=96)
  assert [r["name"] for r in rows] == ["bootstrap 500 x 1000", "notebook cleanup 96 px"]
  for r in rows:
    assert 0 < r["best"] <= r["median"]
    assert r["verdict"] == ("PASS" if r["best"] <= r["target"] else "MISS")
  table = speed.report(rows).splitlines()
  assert len(table) == 3 and all(r["name"] in line for r, line in zip(rows, table[1:]))


def test_bench_convert_part_c_compares_one_pass_with_one_run_per_size(tmp_path):
  proc = run_bin("bench_convert", "--parts=C", "--num_multi=4", "--multi_source_size=200x150",
                 "--multi_sizes=32,48", "--rounds=1", f"--workdir={tmp_path}")
  lines = proc.stdout.splitlines()
  assert lines[0].startswith("C: 4 sources 200x150 -> 32,48, 1 worker, load average before:")
  row = lines[2].split()
  ratio = float(row[3].rstrip("x"))  # from the unrounded times (the printed ones are tiny here)
  assert row[0] == "1" and float(row[1]) > 0 and float(row[2]) > 0 and ratio > 0
  assert f"(median of rounds): {ratio:.2f}x" in lines[-1]
  assert lines[-1].startswith(("PASS", "MISS")) and "one pass >= 2.0x" in lines[-1]
  assert not list(tmp_path.iterdir())  # its folder is removed
