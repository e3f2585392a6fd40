"""What every command shares: a quiet start, one-line user errors, and Ctrl-C without a traceback."""

from __future__ import annotations

import os
import re
import sys

from absl import app
from absl import flags

from skinrecords.core import tflog


VERBOSE_ENV = "SKINRECORDS_VERBOSE"


def _quiet_tensorflow() -> None:
  """Quiet by default; --verbosity >= 1 or SKINRECORDS_VERBOSE=1 brings every line back."""
  tflog.quiet(verbose=(flags.FLAGS.is_parsed() and flags.FLAGS.verbosity >= 1) or
              os.environ.get(VERBOSE_ENV, "") not in ("", "0"))


def _adopt_flags_for_help(module: str) -> None:
  """--help lists the flags of the main module only: for bin/train or skinrecords-train that is a
  shim defining none, so `--help` showed no flag at all (found by trying it, issue 8's layout
  change). Make the command module's flags key flags of the main module (absl names it by argv[0])."""
  if module == "__main__":  # python -m skinrecords.cli.x: the flags are the main module's already
    return
  for flag in flags.FLAGS.get_key_flags_for_module(module):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  # --help opens with the main module's docstring: the command's (with its examples), not the shim's.
  main_module, command_module = sys.modules.get("__main__"), sys.modules.get(module)
  if main_module is not None and command_module is not None and command_module.__doc__:
    main_module.__doc__ = command_module.__doc__


def run(main, command: str) -> None:
  """`app.run(main)`, with app.UsageError and Ctrl-C turned into short messages on stderr.

  `command` names the program in messages when it runs as `python -m` (argv[0] is then a path to
  the module); otherwise the name it was started by (bin/train: `train`) is used.
  """
  name = os.path.basename(sys.argv[0])
  if not name or name.endswith(".py"):
    name = command
  _adopt_flags_for_help(main.__module__)

  def wrapped(argv):
    _quiet_tensorflow()
    try:
      return main(argv)
    except app.UsageError as err:
      print(f"{name}: {err}\n(see {name} --help)", file=sys.stderr)
      return 2
    except KeyboardInterrupt:
      print(f"{name}: interrupted; what was finished is kept (rerun the same command to resume "
            "where resuming applies)", file=sys.stderr)
      return 130

  def parse(argv):
    # absl's own parser says "FATAL Flags parsing error" and exits 1; every other user error of
    # these commands is one line and exit 2.
    try:
      return flags.FLAGS(argv)
    except flags.Error as err:
      print(f"{name}: {err}\n(see {name} --help)", file=sys.stderr)
      sys.exit(2)

  try:
    app.run(wrapped, flags_parser=parse)
  except KeyboardInterrupt:  # Ctrl-C while flags were parsed or modules imported.
    print(f"{name}: interrupted", file=sys.stderr)
    sys.exit(130)


def make_config(cls, **fields):
  """`cls(**fields)` for a config that validates on construction; its ValueError becomes a usage
  error in flag terms (`EvalConfig.tta=9` reads `--tta=9`)."""
  try:
    return cls(**fields)
  except ValueError as err:
    raise app.UsageError(str(err).replace(f"{cls.__name__}.", "--")) from err


def as_flags(message: str, names) -> str:
  """A library message in flag terms: `task_index=2` becomes `--task_index=2` for these names."""
  return re.sub(r"(?<![-\w])(" + "|".join(map(re.escape, names)) + r")\b", r"--\1", message)
