"""`--help` of every command lists that command's flags, however it is started.

absl lists only the main module's flags: through a bin/ shim or an installed console script the
main module defines none, and `--help` showed no flag at all until cli.common adopted them.
"""

import ast
import json
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


# Commands without a config of their own: their flags are checked by --help above.
_NO_CONFIG = {"verify_records": "two flags passed to records.verify",
              "show_preprocessing": "three flags, one of them PreprocessConfig.image_size"}


def test_every_config_field_is_a_flag_with_its_default():
  """Each command builds its configs from the flags named like their fields
  (cli_common.ConfigFlags); a field without one, or with another default, is listed here. In a
  subprocess, each command's flags removed before the next is imported: absl keeps one global flag
  registry, and commands share flag names (--model_dir)."""
  commands = [c for c in COMMANDS if c not in _NO_CONFIG]
  code = ("import importlib, json\n"
          "from absl import flags\n"
          "found = {}\n"
          f"for command in {commands!r}:\n"
          "  c = importlib.import_module('skinrecords.cli.' + command)\n"
          "  found[command] = [len(c._CONFIG_FLAGS.flags), c._CONFIG_FLAGS.problems()]\n"
          "  for name in list(flags.FLAGS.get_key_flags_for_module(c.__name__)):\n"
          "    delattr(flags.FLAGS, name.name)\n"
          "print(json.dumps(found))\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=bin_env(), check=False, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  found = json.loads(proc.stdout.strip().splitlines()[-1])
  assert sorted(found) == commands
  for command, (count, problems) in found.items():
    assert count >= 5, (command, count)  # the module's flags were found
    assert not problems, f"cli/{command}.py: " + "\n".join(problems)


def test_a_config_field_without_a_flag_is_found():
  """The check can fail: a field added to a config with no flag of its name, and a flag whose
  default differs from its field's, are both reported (and the build refuses the first)."""
  code = ("import dataclasses\n"
          "from absl import flags\n"
          "from skinrecords.cli import common\n"
          "A = flags.DEFINE_integer('alpha', 1, 'a')\n"
          "B = flags.DEFINE_integer('beta', 2, 'b')\n"
          "@dataclasses.dataclass\n"
          "class C:\n"
          "  alpha: int = 1\n"
          "  beta: int = 3\n"
          "  gamma: int = 0\n"
          "cf = common.ConfigFlags(globals(), lambda: (C,), 'x')\n"
          "print('\\n'.join(cf.problems()))\n"
          "flags.FLAGS(['x'])\n"
          "try:\n"
          "  cf.build(C)\n"
          "except AssertionError as err:\n"
          "  print(err)\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=bin_env(), check=True, timeout=120)
  assert proc.stdout.splitlines() == [
      "C.beta=3 but --beta=2", "C.gamma: no --gamma flag",
      "C.gamma has no --gamma flag in cli/x.py: define one, or list it in _NOT_FLAGS with the "
      "reason"], proc.stdout
