"""The package layout's contracts: the one map of the layout (the docstring of
skinrecords/__init__.py) matches the files, the import graph has no cycle and keeps each package's
"must never import" rules, flags live only in the command layer, bin/ scripts are thin shims,
commands are namespaced, and benchmarks stay outside the library.

A module is found at skinrecords/<package>/<module>.py (or, as before the move into sub-packages,
skinrecords/<module>.py), and imports are read in either spelling."""

from __future__ import annotations

import ast
import configparser
import pathlib
import re

import skinrecords

REPO = pathlib.Path(__file__).resolve().parents[1]
LIB = REPO / "skinrecords"
_TF = ("tensorflow", "keras", "tf_keras")
_TF_FREE = ("core", "data")  # packages that never import TensorFlow at module level


def layout() -> tuple[dict[str, list[str]], dict[str, set[str]]]:
  """The map of skinrecords/__init__.py: {package: modules} in table order, {package: never}."""
  assert pathlib.Path(skinrecords.__file__).parent == LIB, (
      f"skinrecords is imported from {skinrecords.__file__}, not this checkout")
  return skinrecords.layout()


def _module_of() -> dict[str, str]:
  """{module name: package} ("cli.<name>" for the commands, whose names repeat the library's)."""
  packages, _ = layout()
  found = {}
  for package, modules in packages.items():
    for module in modules:
      key = f"cli.{module}" if package == "cli" else module
      assert key not in found, f"{key} is listed twice in the map"
      found[key] = package
  return found


def _files() -> dict[str, pathlib.Path]:
  """{module name: file} of every module in the package, flat or in a sub-package."""
  packages, _ = layout()
  files = {}
  for path in sorted(LIB.rglob("*.py")):
    parts = path.relative_to(LIB).with_suffix("").parts
    if parts[-1] == "__init__":
      continue
    assert len(parts) <= 2, f"{path}: deeper than one sub-package"
    if len(parts) == 1:
      key = parts[0]
    elif parts[0] == "cli":
      key = f"cli.{parts[1]}"
    else:
      assert parts[0] in packages, f"skinrecords/{parts[0]}/ is no package of the map"
      key = parts[1]
    assert key not in files, f"two files for {key}: {files.get(key)} and {path}"
    files[key] = path
  return files


def _resolve(dotted: str, module_of: dict[str, str]) -> str | None:
  """The module named by an import's dotted path after "skinrecords." (None: not a module)."""
  parts = dotted.split(".") if dotted else []
  if parts and parts[0] == "cli":
    return f"cli.{parts[1]}" if len(parts) > 1 and f"cli.{parts[1]}" in module_of else None
  if len(parts) > 1 and parts[0] not in module_of:  # a sub-package: core.manifest
    parts = parts[1:]
  return parts[0] if parts and parts[0] in module_of else None


def imports(path: pathlib.Path, module_level: bool = False) -> set[str]:
  """The skinrecords modules `path` imports (in any spelling), plus "absl.flags", "benchmarks"
  and the TensorFlow family; with module_level, only what importing `path` runs (no function
  bodies)."""
  module_of = _module_of()
  found = set()

  def add_external(name: str, names=()):
    root = name.split(".")[0]
    if name.startswith("absl.flags") or (name == "absl" and "flags" in names):
      found.add("absl.flags")
    elif root in _TF or root == "benchmarks":
      found.add(root)

  def visit(node):
    if module_level and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      return
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module == "skinrecords" or node.module.startswith("skinrecords."):
        rest = node.module[len("skinrecords."):] if "." in node.module else ""
        for alias in node.names:
          found.add(_resolve(f"{rest}.{alias.name}".lstrip("."), module_of) or
                    _resolve(rest, module_of) or "")
      else:
        add_external(node.module, [a.name for a in node.names])
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("skinrecords."):
          found.add(_resolve(alias.name[len("skinrecords."):], module_of) or "")
        else:
          add_external(alias.name)
    for child in ast.iter_child_nodes(node):
      visit(child)

  visit(ast.parse(path.read_text()))
  found.discard("")
  return found


def _graph(module_level: bool = False) -> dict[str, set[str]]:
  files = _files()
  return {m: imports(p, module_level) & set(files) for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as [a, b, ..., a], or None (depth-first search)."""
  done, stack = set(), []

  def dfs(node):
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if nxt in stack:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in done:
        cycle = dfs(nxt)
        if cycle:
          return cycle
    stack.pop()
    done.add(node)
    return None

  for node in sorted(graph):
    if node not in done:
      cycle = dfs(node)
      if cycle:
        return cycle
  return None


def test_find_cycle_finds_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # a diamond is no cycle
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"a"}}) == ["a", "a"]
  assert find_cycle({"x": {"a"}, "a": {"b"}, "b": {"a"}}) == ["x", "a", "b", "a"][1:]


def test_imports_are_read_in_every_spelling(tmp_path):
  source = tmp_path / "m.py"
  source.write_text(
      "import tensorflow as tf\n"
      "from skinrecords import fileio, pipeline as p\n"
      "from skinrecords.core import manifest\n"
      "from skinrecords.core.features import IMAGE\n"
      "import skinrecords.input.augment\n"
      "from skinrecords.cli import common\n"
      "from absl import flags\n"
      "def f():\n"
      "  import keras\n"
      "  from skinrecords import models\n")
  assert imports(source) == {"tensorflow", "keras", "fileio", "pipeline", "manifest", "features",
                             "augment", "cli.common", "absl.flags", "models"}
  assert imports(source, module_level=True) == {"tensorflow", "fileio", "pipeline", "manifest",
                                                "features", "augment", "cli.common", "absl.flags"}


def test_the_map_lists_every_module_once():
  files, module_of = _files(), _module_of()
  unmapped = sorted(set(files) - set(module_of))
  assert not unmapped, (f"{unmapped}: not in the map of the layout; add each to its package in the "
                        "docstring of skinrecords/__init__.py (and nowhere else)")
  gone = sorted(set(module_of) - set(files))
  assert not gone, f"{gone}: in the map of skinrecords/__init__.py but no such file"
  misplaced = [f"{files[m]} (map: {p}/)" for m, p in module_of.items()
               if len(files[m].relative_to(LIB).parts) == 2 and files[m].parent.name != p]
  assert not misplaced, f"modules outside their package of the map: {misplaced}"


def test_the_import_graph_has_no_cycle():
  """Every import counts, those inside functions too: a lazy import hides a cycle, not ends it."""
  graph = _graph()
  cycle = find_cycle(graph)
  assert cycle is None, f"import cycle: {' -> '.join(cycle)}"
  module_of, packages = _module_of(), {}
  for module, deps in graph.items():
    packages.setdefault(module_of[module], set()).update(
        module_of[d] for d in deps if module_of[d] != module_of[module])
  cycle = find_cycle(packages)
  assert cycle is None, f"import cycle between packages: {' -> '.join(cycle)}"


def test_packages_import_only_what_the_map_allows():
  packages, never = layout()
  order, module_of = list(packages), _module_of()
  broken = []
  for module, path in sorted(_files().items()):
    package, found = module_of[module], imports(path)
    if package != "cli":
      broken += [f"{module} imports {x}; flags belong in cli/, benchmarks outside the library"
                 for x in sorted(found & {"absl.flags", "benchmarks"})]
    for dep in sorted(d for d in found if d in module_of):
      target = module_of[dep]
      if target == "cli" and package != "cli":
        broken.append(f"{module} ({package}/) imports the command layer {dep}")
      elif package != "cli" and order.index(target) > order.index(package):
        broken.append(f"{module} ({package}/) imports {dep} ({target}/), a package below it")
      elif target in never.get(package, ()):
        broken.append(f"{module} ({package}/) imports {dep} ({target}/): never")
  assert not broken, "\n".join(broken)


def test_core_and_write_side_import_no_tensorflow_at_module_level():
  """Nothing that importing a core/ or data/ module runs imports TensorFlow or Keras."""
  graph, module_of, files = _graph(module_level=True), _module_of(), _files()
  heavy = []
  for module in sorted(m for m in files if module_of[m] in _TF_FREE):
    seen, todo = set(), [module]
    while todo:
      m = todo.pop()
      if m not in seen:
        seen.add(m)
        tf = set(_TF) & imports(files[m], module_level=True)
        heavy += [f"{module}: {m} imports {', '.join(sorted(tf))} at module level"] if tf else []
        todo += graph[m]
  assert not heavy, "\n".join(heavy)


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
    "distribute": "reads /proc/cpuinfo for the CPU's native low-precision flags",
    "score_folder": "export copies it next to the SavedModel, where it runs without skinrecords "
                    "(TensorFlow and the standard library only) on a local folder of photos",
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
    module = path.stem if path.stem != "__init__" else path.relative_to(LIB).as_posix()
    module = f"cli.{module}" if path.parent.name == "cli" else module
    found = _direct_file_access(path)
    if found and module not in _DIRECT_FILE_ACCESS:
      offenders.append(f"{path.relative_to(REPO)}: {', '.join(sorted(found))}")
    elif not found and module in _DIRECT_FILE_ACCESS:
      stale.append(module)
  assert not offenders, ("direct file access outside fileio (a gs:// path would break; use "
                         f"skinrecords.core.fileio): {offenders}")
  assert not stale, f"no direct file access left in {stale}: remove them from _DIRECT_FILE_ACCESS"


MAX_FUNCTION_LINES = 60  # the brief: functions of named phases, <= ~60 lines (docstring included)


def test_no_function_is_longer_than_60_lines():
  """A longer function is split into named phases (issue 22 found three: train's main, list_sources,
  verify)."""
  long = []
  for path in sorted(LIB.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > MAX_FUNCTION_LINES:
          long.append(f"{path.relative_to(LIB.parent)}:{node.lineno} {node.name}: {lines} lines")
  assert not long, "split into named phases:\n" + "\n".join(long)
