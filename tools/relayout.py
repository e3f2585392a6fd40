#!/usr/bin/env python3
"""Moves skinrecords' flat modules into the sub-packages of the layout map, and rewrites every
reference to them. Run from a clean checkout, then run the tests and commit:

    python tools/relayout.py            # moves (git mv) and rewrites; prints what it did
    python tools/relayout.py --check    # only lists what it would do; exit 1 if anything

MAP: the one map of the layout is the docstring of skinrecords/__init__.py (`skinrecords.layout()`
reads it; tests/test_layout.py keeps it true). This script has no copy of it. A module that the
map does not list (one added by another branch) stops the script before anything changes, and it
names the module: add it to its package in that docstring, then rerun. TEST_RENAMES below is the
only other table: test files named after the module they test.

Idempotent: a module already in its sub-package stays, a reference already rewritten is left as
it is, so it is safe to rerun after more branches are merged. It rewrites, in skinrecords/, tests/,
benchmarks/, bin/, tools/ and setup.cfg (and module paths in the Markdown files):
  from skinrecords import a, b as c      -> one `from skinrecords.<package> import ...` per package
  from skinrecords.a import X            -> from skinrecords.<package>.a import X
  import skinrecords.a [as x]            -> import skinrecords.<package>.a [as x]
  "skinrecords.a.f" (mock.patch strings, `-m skinrecords.a`, setup.cfg) -> skinrecords.<package>.a.f
  skinrecords/a.py (paths in docs and messages)                       -> skinrecords/<package>/a.py
  tests/test_old.py (TEST_RENAMES)                                    -> tests/test_new.py
cli/ stays where it is.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
LIB = REPO / "skinrecords"

# Test files renamed after the module they test (old name -> new name, in tests/).
TEST_RENAMES = {
    "test_storage.py": "test_fileio.py",  # every user path through fileio; ram:// for gs://
    "test_eval_xla.py": "test_steps.py",  # steps.evaluate, the validation pass, under XLA
    "test_multiworker.py": "test_distribute.py",  # multi-worker training and its cluster set-up
    "test_classes.py": "test_labels.py",  # class names, label values and their checks
}

_SCANNED_DIRS = ("skinrecords", "tests", "benchmarks", "bin", "tools")
_SCANNED_FILES = ("setup.cfg", "README.md", "BUILD_NOTES.md", ".ci/run")
_ME = pathlib.Path(__file__).resolve()


def load_map() -> dict[str, str]:
  """{module: package} of the library's modules (cli/ excluded: it does not move)."""
  sys.path.insert(0, str(REPO))
  import skinrecords  # pylint: disable=g-import-not-at-top

  if pathlib.Path(skinrecords.__file__).resolve().parent != LIB.resolve():
    sys.exit(f"relayout: skinrecords imported from {skinrecords.__file__}, not {LIB}")
  packages, _ = skinrecords.layout()
  return {m: p for p, modules in packages.items() if p != "cli" for m in modules}


def _git(*args: str) -> str:
  return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True,
                        text=True).stdout


def find_modules(module_of: dict[str, str]) -> dict[str, pathlib.Path]:
  """{module: its file now}; stops, naming them, on modules the map does not list."""
  found, unknown = {}, []
  for path in sorted(LIB.rglob("*.py")):
    parts = path.relative_to(LIB).with_suffix("").parts
    if parts[-1] == "__init__" or parts[0] == "cli":
      continue
    if len(parts) > 2 or (len(parts) == 2 and parts[0] not in set(module_of.values())):
      unknown.append(str(path.relative_to(REPO)))
    elif parts[-1] not in module_of:
      unknown.append(str(path.relative_to(REPO)))
    else:
      found[parts[-1]] = path
  if unknown:
    sys.exit("relayout: stopped, nothing changed. Not in the layout map:\n  " +
             "\n  ".join(unknown) + "\nAdd each module to its package in the docstring of "
             "skinrecords/__init__.py (the MAP; see this script's docstring), then rerun.")
  return found


def plan_moves(module_of, files) -> list[tuple[pathlib.Path, pathlib.Path]]:
  moves = []
  for module, path in sorted(files.items()):
    target = LIB / module_of[module] / f"{module}.py"
    if path != target:
      if target.exists():
        sys.exit(f"relayout: {path} and {target} both exist; merge them by hand")
      moves.append((path, target))
  tests = REPO / "tests"
  for old, new in TEST_RENAMES.items():
    if (tests / old).exists():
      if (tests / new).exists():
        sys.exit(f"relayout: tests/{old} would become tests/{new}, which exists; merge by hand "
                 "or change TEST_RENAMES")
      moves.append((tests / old, tests / new))
  return moves


def package_docs() -> dict[str, str]:
  """{package: its line of the map} for the sub-packages' __init__.py docstrings."""
  import skinrecords  # pylint: disable=g-import-not-at-top

  docs, current = {}, None
  for line in (skinrecords.__doc__ or "").splitlines():
    m = re.match(r"^    (\w+)/\s", line)
    if m:
      current = m[1]
    elif current and line.strip().startswith("- "):
      docs[current] = line.strip()[2:]
      current = None
  return docs


# ------------------------------------------------------------------------------- rewriting text

_FROM_PKG = re.compile(r"^(?P<indent>[ \t]*)from skinrecords import (?P<names>\([^)]*\)|[^\n]*?)"
                       r"(?P<comment>[ \t]*#[^\n]*)?$", re.M)


def _split_names(text: str) -> list[str]:
  text = text.strip()
  if text.startswith("("):
    text = re.sub(r"#[^\n]*", "", text[1:-1])
  return [n.strip() for n in text.replace("\n", " ").split(",") if n.strip()]


def _rewrite_from_package(match: re.Match, module_of: dict[str, str]) -> str:
  """`from skinrecords import a, b as c` -> one import line per package, in first-seen order."""
  indent, comment = match["indent"], match["comment"] or ""
  groups: dict[str, list[str]] = {}
  for name in _split_names(match["names"]):
    module = name.split(" as ")[0].strip()
    groups.setdefault(module_of.get(module, ""), []).append(name)
  if list(groups) == [""]:
    return match[0]  # nothing of the map: cli, __version__, layout
  lines = []
  for package, names in groups.items():
    where = f"skinrecords.{package}" if package else "skinrecords"
    lines.append(f"{indent}from {where} import {', '.join(names)}{comment}")
  return "\n".join(lines)


_IMPORT_LINE = re.compile(r"^([ \t]*)(from skinrecords[\w.]* import [^(\n]*|import skinrecords[\w.]*"
                          r"(?: as \w+)?)$")


def _sort_import_runs(text: str) -> str:
  """Sorts each run of consecutive one-line skinrecords imports at one indent (the rewrite
  renames their modules, so their old order no longer reads sorted)."""
  lines, out, run = text.split("\n"), [], []

  def flush():
    out.extend(sorted(run, key=lambda l: l.split("#")[0]))
    run.clear()

  for line in lines:
    m = _IMPORT_LINE.match(line)
    if m and (not run or _IMPORT_LINE.match(run[0])[1] == m[1]):
      run.append(line)
      continue
    flush()
    if m:
      run.append(line)
    else:
      out.append(line)
  flush()
  return "\n".join(out)


def rewrite_text(text: str, module_of: dict[str, str], renames: dict[str, str]) -> str:
  text = _FROM_PKG.sub(lambda m: _rewrite_from_package(m, module_of), text)
  modules = "|".join(sorted(module_of, key=len, reverse=True))
  # Dotted: `from skinrecords.a import X`, `import skinrecords.a`, "skinrecords.a.f", -m skinrecords.a.
  text = re.sub(rf"\bskinrecords\.({modules})\b(?!\.py)",
                lambda m: f"skinrecords.{module_of[m[1]]}.{m[1]}", text)
  # Paths: skinrecords/a.py, skinrecords/a (also in Markdown).
  text = re.sub(rf"\bskinrecords/({modules})\.py\b",
                lambda m: f"skinrecords/{module_of[m[1]]}/{m[1]}.py", text)
  for old, new in renames.items():
    text = re.sub(rf"\b{re.escape(old)}\b", new, text)
  return _sort_import_runs(text)


def scanned_files() -> list[pathlib.Path]:
  tracked = set(_git("ls-files").splitlines())
  files = []
  for rel in sorted(tracked):
    path = REPO / rel
    top = rel.split("/")[0]
    if path.resolve() == _ME or not path.is_file():
      continue
    if (top in _SCANNED_DIRS and (path.suffix in (".py", ".md", ".cfg", ".txt", ".sh", "") or
                                   top == "bin")) or rel in _SCANNED_FILES:
      files.append(path)
  return files


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--check", action="store_true", help="list what would change; change nothing")
  args = parser.parse_args()
  module_of = load_map()
  files = find_modules(module_of)
  moves = plan_moves(module_of, files)
  renames = {f"{o[:-3]}": f"{n[:-3]}" for o, n in TEST_RENAMES.items()}
  docs, new_packages = package_docs(), sorted(set(module_of.values()))
  todo = [f"git mv {a.relative_to(REPO)} {b.relative_to(REPO)}" for a, b in moves]
  todo += [f"create skinrecords/{p}/__init__.py" for p in new_packages
           if not (LIB / p / "__init__.py").exists()]
  if args.check:
    changed = [str(p.relative_to(REPO)) for p in scanned_files()
               if rewrite_text(p.read_text(), module_of, renames) != p.read_text()]
    todo += [f"rewrite {c}" for c in changed]
    print("\n".join(todo) or "relayout: nothing to do")
    return 1 if todo else 0
  for package in new_packages:
    init = LIB / package / "__init__.py"
    if not init.exists():
      init.parent.mkdir(exist_ok=True)
      init.write_text(f'"""skinrecords.{package}: {docs.get(package, "").rstrip(".")}.\n\n'
                      'The map of the layout is the docstring of skinrecords/__init__.py."""\n')
      _git("add", str(init.relative_to(REPO)))
  for source, target in moves:
    _git("mv", str(source.relative_to(REPO)), str(target.relative_to(REPO)))
  rewritten, long_lines = [], []
  for path in scanned_files():
    before = path.read_text()
    after = rewrite_text(before, module_of, renames)
    if after != before:
      path.write_text(after)
      rel = str(path.relative_to(REPO))
      rewritten.append(rel)
      old = set(before.splitlines())
      long_lines += [f"{rel}:{i}" for i, l in enumerate(after.splitlines(), 1)
                     if len(l) > 100 and l not in old and path.suffix == ".py"]
  print("\n".join(todo + [f"rewrote {r}" for r in rewritten]) or "relayout: nothing to do")
  if long_lines:
    print("lines now over 100 characters (rewrap by hand):\n  " + "\n  ".join(long_lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
