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
    by_status[status.strip()] += 1
    if status.strip() != "killed":
      survivors[func] += 1
  total = sum(by_status.values())
  killed = by_status["killed"]
  print(f"mutants {total}  " + "  ".join(f"{k} {v}" for k, v in sorted(by_status.items())))
  print(f"score {killed}/{total} = {100 * killed / max(total, 1):.1f} %")
  if survivors:
    print("not killed, by function: " + ", ".join(f"{f} {n}" for f, n in survivors.most_common()))


if __name__ == "__main__":
  main(sys.argv[1])
