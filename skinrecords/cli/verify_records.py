"""Reads every shard listed in manifest.json and checks sha256, record counts, labels and decoding.

Also checks each shard's DALI index file (idx/*.idx) against the shard's framing, and that no
near-duplicate group kept together lies across splits. Given the folder of a several-size output
(records_set.json), verifies every size and that they hold the same splits, folds and shards.

Exits 0 when everything matches; otherwise prints one line per problem (file, record, what) and exits 1.
"""

import sys

from absl import app
from absl import flags

from skinrecords.cli import common as cli_common
from skinrecords.core import fileio

_RECORDS_DIR = flags.DEFINE_string("records_dir", None, "Folder written by make_records.")
_PROGRESS = flags.DEFINE_boolean("progress", True, "Show a progress bar.")
flags.mark_flag_as_required("records_dir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from skinrecords.data import records  # pylint: disable=g-import-not-at-top

  several = fileio.exists(fileio.join(_RECORDS_DIR.value, "records_set.json"))
  try:
    reports = (records.verify_set(_RECORDS_DIR.value, progress=_PROGRESS.value) if several
               else [records.verify(_RECORDS_DIR.value, progress=_PROGRESS.value)])
  except (FileNotFoundError, ValueError) as err:
    print(f"verify_records: {err}", file=sys.stderr)
    return 2
  except OSError as err:  # a remote folder that cannot be read (permissions, network)
    print(f"verify_records: {fileio.describe_error(err)}", file=sys.stderr)
    return 2
  for report in reports:
    for problem in report.problems:
      print(f"verify_records: {problem}", file=sys.stderr)
    status = "OK" if report.ok else f"FAILED ({len(report.problems)} problem(s))"
    if several and report is reports[-1]:
      print(f"{report.records_dir}: the sizes hold the same splits, folds and shards: {status}")
    else:
      print(f"{report.records_dir}: {report.shards} shards, {report.examples} records "
            f"(index files checked): {status}")
  return 0 if all(r.ok for r in reports) else 1


def run():
  """Console entry point (`skinrecords-verify-records`)."""
  cli_common.run(main, "skinrecords-verify-records")


if __name__ == "__main__":
  run()
