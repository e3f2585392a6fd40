"""What every command shares: a quiet start, one-line user errors, and Ctrl-C without a traceback."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Any, Callable

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
  """`cls(**fields)`, validated (`.validate()`); its ValueError becomes a usage error in flag terms
  (`EvalConfig.tta=9` reads `--tta=9`). Commands build theirs with ConfigFlags.usage_config."""
  return validated(cls(**fields))


def validated(config):
  """`config` after its `.validate()`, whose ValueError becomes a usage error in flag terms."""
  try:
    config.validate()
  except ValueError as err:
    raise app.UsageError(str(err).replace(f"{type(config).__name__}.", "--")) from err
  return config


class ConfigFlags:
  """A command's flags as the one source of its configs' fields, so that a field added to a config
  cannot be forgotten in the CLI (issue 22: AugmentConfig.fill_value was, for a release).

  Every field of `configs()` is set from the flag of its name, unless `not_flags` names it with
  the reason (a nested config, a value the command derives). `converters` turns a flag's text into
  the field's type (--split "0.6,0.2,0.2" -> (0.6, 0.2, 0.2)); it also converts the flag's default
  for the comparison with the field's. `build` refuses (AssertionError: a programming error, not
  a user's) a field without a flag; `problems` lists every field without a flag of its name or
  with another default, and a test runs it for every command (tests/test_help.py).
  """

  def __init__(self, namespace: dict, configs: Callable[[], tuple], command: str,
               not_flags: dict[str, str] | None = None,
               converters: dict[str, Callable[[Any], Any]] | None = None):
    # The module's FlagHolders by flag name (not by variable name): --noaugment is "augment".
    self.flags = {h.name: h for h in list(namespace.values()) if isinstance(h, flags.FlagHolder)}
    self.configs, self.command = configs, command
    self.not_flags, self.converters = dict(not_flags or {}), dict(converters or {})

  def _value(self, name: str) -> Any:
    value = self.flags[name].value
    return self.converters[name](value) if name in self.converters else value

  def build(self, cls, **given):
    """`cls` with each field from the flag of its name; `given` fields (the not_flags ones, or a
    value the command has already converted) as given. Not validated (the caller validates the
    whole config once: `usage_config`, or train's)."""
    values = {}
    for field in dataclasses.fields(cls):
      if field.name in given:
        values[field.name] = given.pop(field.name)
      elif field.name in self.flags and field.name not in self.not_flags:
        values[field.name] = self._value(field.name)
      else:
        raise AssertionError(f"{cls.__name__}.{field.name} has no --{field.name} flag in "
                             f"cli/{self.command}.py: define one, or list it in _NOT_FLAGS with "
                             "the reason")
    if given:
      raise AssertionError(f"{cls.__name__} has no fields {sorted(given)}")
    return cls(**values)

  def usage_config(self, cls, **given):
    """`build`, validated; its ValueError becomes a usage error in flag terms (`--tta=9`)."""
    return validated(self.build(cls, **given))

  def problems(self) -> list[str]:
    """Every config field without a flag of its name and default (or a not_flags reason)."""
    problems = []
    for cls in self.configs():
      for field in dataclasses.fields(cls):
        if field.name in self.not_flags:
          continue
        if field.name not in self.flags:
          problems.append(f"{cls.__name__}.{field.name}: no --{field.name} flag")
          continue
        default = self.flags[field.name].default
        if field.name in self.converters and default is not None:
          default = self.converters[field.name](default)
        if field.default is not dataclasses.MISSING and default != field.default:
          problems.append(f"{cls.__name__}.{field.name}={field.default!r} but --{field.name}="
                          f"{self.flags[field.name].default!r}")
    return problems


def as_flags(message: str, names) -> str:
  """A library message in flag terms: `task_index=2` becomes `--task_index=2` for these names."""
  return re.sub(r"(?<![-\w])(" + "|".join(map(re.escape, names)) + r")\b", r"--\1", message)
