"""`--help` of every command lists that command's flags, however it is started.

absl lists only the main module's flags: through a bin/ shim or an installed console script the
main module defines none, and `--help` showed no flag at all until cli.common adopted them.
"""

import ast
import re
import subprocess
import sys

import pytest

from conftest import REPO, bin_env

COMMANDS = sorted(p.stem for p in (REPO / "skinrecords" / "cli").glob("*.py")
                  if p.stem not in ("__init__", "common"))


def _defined_flags(command: str) -> set[str]:
  """The flag names the command module defines (flags.DEFINE_*("name", ...))."""
  tree = ast.parse((REPO / "skinrecords" / "cli" / f"{command}.py").read_text())
  return {node.args[0].value for node in ast.walk(tree)
          if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr.startswith("DEFINE") and node.args
          and isinstance(node.args[0], ast.Constant)}


def _listed(text: str) -> set[str]:
  return set(re.findall(r"^  --(?:\[no\])?(\w+)", text, re.M))


@pytest.mark.parametrize("command", COMMANDS)
def test_bin_shim_help_lists_every_flag_and_the_command_doc(command):
  proc = subprocess.run([sys.executable, str(REPO / "bin" / command), "--help"],
                        capture_output=True, text=True, env=bin_env(), timeout=120, check=False)
  defined = _defined_flags(command)
  assert defined, command
  assert defined <= _listed(proc.stdout), sorted(defined - _listed(proc.stdout))
  assert "from a checkout" not in proc.stdout  # the command's docstring, not the shim's


def test_console_script_style_entry_lists_the_flags():
  """An installed `skinrecords-train` is a generated script calling run(): the same as a shim."""
  script = ("import sys; sys.argv[0] = 'skinrecords-evaluate'\n"
            "from skinrecords.cli.evaluate import run\nrun()\n")
  proc = subprocess.run([sys.executable, "-c", script, "--help"], capture_output=True, text=True,
                        env=bin_env(), timeout=120, check=False)
  assert _defined_flags("evaluate") <= _listed(proc.stdout)
