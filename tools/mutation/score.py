"""Counts `mutmut results --all true` lines ("module.x_func__mutmut_N: status") per status and
function; prints the score (killed / all) and the survivors to read."""

import collections
import re
import sys

_LINE = re.compile(r"^\s*(\S+)\.x_(\w+?)__mutmut_\d+: (.+)$")


def main(path: str) -> None:
  by_status, survivors = collections.Counter(), collections.Counter()
  for line in open(path, encoding="utf-8"):
    match = _LINE.match(line)
    if not match:
      continue
    _, func, status = match.groups()
    status = status.strip()
    by_status[status] += 1
    if status not in ("killed", "not checked"):
      survivors[func] += 1
  # Mutants outside a MUTANT_GLOB run are listed as "not checked": they are not in the score.
  unchecked = by_status.pop("not checked", 0)
  total = sum(by_status.values())
  killed = by_status["killed"]
  print(f"mutants {total}  " + "  ".join(f"{k} {v}" for k, v in sorted(by_status.items())))
  print(f"score {killed}/{total} = {100 * killed / max(total, 1):.1f} %"
        + (f" ({unchecked} mutants outside the globs not run)" if unchecked else ""))
  if survivors:
    print("not killed, by function: " + ", ".join(f"{f} {n}" for f, n in survivors.most_common()))


if __name__ == "__main__":
  main(sys.argv[1])
