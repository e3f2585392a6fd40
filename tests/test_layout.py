"""The package layout's contracts: flags only in the command layer, thin bin/ shims, namespaced
commands, benchmarks outside the library, and an import graph with nothing flowing upward."""

from __future__ import annotations

import ast
import configparser
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
LIB = REPO / "skinrecords"

# The data-flow order of the library's stages; a module may import only modules at its own stage or
# earlier. "cli" sits on top and may import anything.
STAGES = [
    {"fileio", "tfrecord", "features", "manifest", "splits", "labels", "patients", "dedup",
     "sources", "synthetic_structures", "synthetic", "hair", "preprocess", "uncertainty"},
    {"records", "workers", "convert"},
    {"pipeline", "kaggle"},
    {"augment"},
    {"backbones", "recipes", "models"},
    {"metrics", "plots", "rundir", "distribute", "data_service", "calibration", "submission",
     "thresholds"},
    {"inference", "steps", "run_state", "train", "ensemble", "selection"},
    {"evaluate", "predict", "export", "explain"},
    {"cv"},
]


def _stage(module: str) -> int:
  for i, names in enumerate(STAGES):
    if module in names:
      return i
  raise AssertionError(f"skinrecords/{module}.py has no stage in tests/test_layout.py:STAGES; add "
                       "it where it sits in the data flow")


def _imports(path: pathlib.Path) -> set[str]:
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == "skinrecords":
        found.update(a.name for a in node.names)
      elif node.module.startswith("skinrecords."):
        found.add(node.module.split(".")[1])
      elif node.module.startswith("absl.flags") or (node.module == "absl" and any(
          a.name == "flags" for a in node.names)):
        found.add("absl.flags")
    elif isinstance(node, ast.Import):
      found.update("absl.flags" if a.name.startswith("absl.flags") else
                   a.name.split(".")[1] if a.name.startswith("skinrecords.") else ""
                   for a in node.names)
  found.discard("")
  return found


def test_library_never_imports_flags_and_nothing_flows_upward():
  upward = []
  for path in sorted(LIB.glob("*.py")):
    if path.name == "__init__.py":
      continue
    module, imports = path.stem, _imports(path)
    assert "absl.flags" not in imports, f"{path.name} imports absl.flags; flags belong in cli/"
    assert "cli" not in imports and "benchmarks" not in imports, path.name
    upward += [f"{module} -> {m}" for m in imports if _stage(m) > _stage(module)]
  assert not upward, f"imports against the data flow: {upward}"


def test_bin_scripts_are_shims_into_importable_modules():
  for path in sorted((REPO / "bin").iterdir()):
    text = path.read_text()
    code = [l for l in text.splitlines() if l.strip() and not l.lstrip().startswith(("#", '"""'))]
    assert len(code) <= 6, f"bin/{path.name} holds {len(code)} lines of code; move it to a module"
    m = re.search(r"from (skinrecords\.cli|benchmarks)\.(\w+) import run", text)
    assert m, f"bin/{path.name} does not call a module's run()"
    module = REPO.joinpath(*m[1].split("."), f"{m[2]}.py")
    assert "def run()" in module.read_text(), module
    if m[1] == "skinrecords.cli":
      assert "sys.path" not in text, f"bin/{path.name} edits sys.path"
    # Without the guard, each spawned converter worker re-ran the whole command (a hang).
    assert 'if __name__ == "__main__":' in text, f"bin/{path.name} runs on import"


def test_installed_commands_are_namespaced_and_benchmarks_not_installed():
  cfg = configparser.ConfigParser()
  cfg.read(REPO / "setup.cfg")
  assert "scripts" not in cfg["options"], "bin/ copies go stale after git pull; use entry points"
  scripts = [l.split("=")[0].strip() for l in
             cfg["options.entry_points"]["console_scripts"].strip().splitlines()]
  assert scripts and all(s.startswith("skinrecords-") for s in scripts), scripts
  cli = {p.stem for p in (LIB / "cli").glob("*.py")} - {"__init__", "common"}
  assert {s[len("skinrecords-"):].replace("-", "_") for s in scripts} == cli
  assert "benchmarks" in cfg["options.packages.find"]["exclude"]


def _flag_defaults(module: str) -> dict:
  """{flag: default} of the literal-default flags a cli module defines (read, not imported: absl
  keeps one global flag registry, and two commands define --output_dir)."""
  found = {}
  for node in ast.walk(ast.parse((LIB / "cli" / f"{module}.py").read_text())):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and
        node.func.attr.startswith("DEFINE_") and len(node.args) >= 2):
      try:
        found[ast.literal_eval(node.args[0])] = ast.literal_eval(node.args[1])
      except ValueError:
        pass
  return found


def test_flags_and_library_configs_share_their_defaults():
  """One source of defaults: a flag named like a config field has that field's default."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  from skinrecords import augment, convert, evaluate, export, models, predict, preprocess, splits, train  # pylint: disable=g-import-not-at-top
  pairs = [("train", [train.TrainConfig, models.ModelConfig, augment.AugmentConfig]),
           ("evaluate", [evaluate.EvalConfig]), ("predict", [predict.PredictConfig]),
           ("export", [export.ExportConfig]),
           ("make_records", [convert.ConvertConfig, preprocess.PreprocessConfig])]
  checked, differ = 0, []
  for module, configs in pairs:
    flag_defaults = _flag_defaults(module)
    for config in configs:
      for field in dataclasses.fields(config):
        if field.name not in flag_defaults or field.default is dataclasses.MISSING:
          continue
        flag, lib = flag_defaults[field.name], field.default
        if dataclasses.is_dataclass(lib) or (module, field.name) == ("train", "image_size"):
          continue  # --augment switches a whole config; --image_size=0 means "the records' size"
        checked += 1
        if (module, field.name) == ("make_records", "split"):
          flag = splits.parse_fractions(flag)
        if isinstance(lib, tuple) and flag is not None:
          flag = tuple(flag)
        if flag != lib and not (flag is None and lib in ((), None)):
          differ.append(f"cli/{module}.py --{field.name}={flag!r} vs "
                        f"{config.__name__}.{field.name}={lib!r}")
  assert checked > 30, checked
  assert not differ, "\n".join(differ)


# Direct file access (builtin open, os.path checks, os renames and listings, shutil, glob, pathlib)
# is for fileio.py alone: every user path may be gs://, and pathlib.Path("gs://b/x") is "gs:/b/x".
# The modules below may still do it, each for the reason given. Shrink this list; never grow it
# for a user path (records, runs, reports, plots, CSVs): call fileio instead.
_DIRECT_FILE_ACCESS = {
    "fileio": "the file-system helper itself",
    "sources": "lists the input images, which stay local (symlinks, real paths)",
    "dedup": "sizes of the local input images",
    "preprocess": "reads one local input image",
    "labels": "reads the labels CSV that lives with the local input images",
    "synthetic": "writes synthetic input images for make_records (local by design)",
    "backbones": "the ~/.keras weights cache (local by design)",
}
_FILE_CALLS = {
    "open", "os.path.exists", "os.path.lexists", "os.path.isfile", "os.path.isdir",
    "os.path.getsize", "os.listdir", "os.scandir", "os.walk", "os.makedirs", "os.mkdir",
    "os.replace", "os.rename", "os.remove", "os.unlink", "os.rmdir", "shutil.rmtree",
    "shutil.copy", "shutil.copy2", "shutil.copyfile", "shutil.copytree", "shutil.move",
    "glob.glob"}


def _dotted(node) -> str | None:
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    base = _dotted(node.value)
    return base and f"{base}.{node.attr}"
  return None


def _direct_file_access(path: pathlib.Path) -> set[str]:
  """The direct file calls in a module, and "pathlib" if it imports pathlib."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import) and any(a.name == "pathlib" for a in node.names):
      found.add("pathlib")
    elif isinstance(node, ast.ImportFrom) and node.module == "pathlib":
      found.add("pathlib")
    elif isinstance(node, ast.Call) and _dotted(node.func) in _FILE_CALLS:
      found.add(_dotted(node.func))
  return found


def test_only_fileio_touches_user_paths_directly():
  offenders, stale = [], []
  for path in sorted(LIB.rglob("*.py")):
    module = path.relative_to(LIB).with_suffix("").as_posix()
    found = _direct_file_access(path)
    if found and module not in _DIRECT_FILE_ACCESS:
      offenders.append(f"skinrecords/{module}.py: {', '.join(sorted(found))}")
    elif not found and module in _DIRECT_FILE_ACCESS:
      stale.append(module)
  assert not offenders, ("direct file access outside fileio (a gs:// path would break; use "
                         f"skinrecords.fileio): {offenders}")
  assert not stale, f"no direct file access left in {stale}: remove them from _DIRECT_FILE_ACCESS"
