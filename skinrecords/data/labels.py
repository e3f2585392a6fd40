"""Labels: reading the input CSVs, label cells as class names, and the checks on class names.

Every check raises a ValueError that names the problem and the fix (a typo'd label or --classes
name, a class without images, a single class); `class_order_warning` only warns. Plain Python only.
"""

from __future__ import annotations

import collections
import csv
import difflib
import re
from typing import Iterable, Sequence


def read_csv(labels_csv: str, kind: str = "labels CSV"
             ) -> tuple[list[str], list[tuple[int, dict[str, str | None]]]]:
  """(column names, [(line number, row)]) of a CSV; ValueError naming it when unreadable."""
  try:
    # utf-8-sig: spreadsheet exports often start with a byte-order mark that would rename column 1.
    with open(labels_csv, newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f)
      rows = [(reader.line_num, row) for row in reader]
      return list(reader.fieldnames or []), rows
  except (OSError, UnicodeDecodeError, csv.Error) as err:
    raise ValueError(f"cannot read {kind} {labels_csv}: {err}") from err


def check_columns(path: str, kind: str, fieldnames: list[str], columns: dict) -> None:
  """ValueError naming the first given column (`columns`: argument -> name) absent from the file."""
  for arg, column in columns.items():
    if column is not None and column not in fieldnames:
      raise ValueError(f"{kind} {path}: column {column!r} (given as {arg}) not found; "
                       f"columns in the file: {', '.join(fieldnames) or '(none: empty file)'}")


_INTEGRAL = re.compile(r"[+-]?\d+(?:\.0*)?")


def normalise_label(text: str) -> str:
  """A label cell as a class name: "1.0", "01" and "1" are all "1".

  A spreadsheet or pandas export writes an integer column as floats once one cell is empty; without
  this "1.0" would silently become a third class beside "0" and "1".
  """
  text = text.strip()
  return str(int(text.split(".")[0])) if _INTEGRAL.fullmatch(text) else text


def class_order(names: set[str]) -> list[str]:
  """The default class order: sorted by name."""
  # Integer labels ("0".."10") sort numerically so that id == label where labels are 0..C-1.
  if names and all(re.fullmatch(r"-?\d+", n) for n in names):
    return sorted(names, key=int)
  return sorted(names)


_POSITIVE = re.compile(r"melanoma|malignan|^mel$", re.IGNORECASE)
_NEGATED = re.compile(r"no[nt]?[\W_]*(?:mel|malig)", re.IGNORECASE)


def _looks_positive(name: str) -> bool:
  return bool(_POSITIVE.search(name)) and not _NEGATED.match(name)


def class_order_warning(classes: Sequence[str]) -> str | None:
  """Sorted binary names that put the positive-looking class at id 0 ("Melanoma" < "Other")."""
  if len(classes) != 2 or not _looks_positive(classes[0]) or _looks_positive(classes[1]):
    return None
  return (f"class order: '{classes[0]}' is class 0, the negative class, because names are sorted; "
          f"training scores P(class 1) = P('{classes[1]}'). If '{classes[0]}' is the positive "
          f"class, convert again with --classes={classes[1]},{classes[0]}")


def _unexpected_labels(counts: collections.Counter) -> list[str]:
  """Labels that look like mistakes: text among integer labels (or the reverse, whichever kind is
  rarer), or a rarer near-copy of another label (case or a typo: "Mel" beside "mel")."""
  integer = {label for label in counts if re.fullmatch(r"-?\d+", label)}
  rows = lambda labels: sum(counts[label] for label in labels)
  odd_kind = (set(counts) - integer if rows(integer) >= rows(set(counts) - integer) else integer
              ) if integer and len(integer) < len(counts) else set()
  found = []
  for label, n in sorted(counts.items()):
    # A typo changes a character or the case ("nevv", "Mel"): same length +-1 and 80% alike.
    # "Melanoma" beside "NotMelanoma" is 84% alike but 3 letters longer: two real classes.
    lowered = {o.lower(): o for o in counts if (counts[o], o) > (n, label) and
               abs(len(o) - len(label)) <= 1}
    near = difflib.get_close_matches(label.lower(), list(lowered), 1, 0.8)
    if label in odd_kind or near:
      found.append(f"'{label}' ({n}{', like ' + repr(lowered[near[0]]) if near else ''})")
  return found


def given_classes(classes: Sequence[str] | None) -> list[str] | None:
  """The --classes names as a list (None stays None); ValueError unless 2+ distinct names."""
  if classes is not None:
    classes = list(classes)
    if len(classes) < 2 or any(not isinstance(c, str) or not c for c in classes) or len(
        set(classes)) != len(classes):
      raise ValueError(f"classes {classes!r}: expected 2 or more distinct non-empty names in id "
                       "order, e.g. NotMelanoma,Melanoma")
  return classes


def check_given(classes: list[str], class_names: set[str], where: str, kind: str) -> None:
  """A --classes name that matches no folder or label names its near match (a case typo)."""
  found = sorted(class_names)
  for name in classes:
    if name not in class_names:
      near = ([f for f in found if f.lower() == name.lower()] or
              difflib.get_close_matches(name, found, 1, 0.6))
      hint = f"did you mean '{near[0]}'?" if near else "remove it or add its images"
      raise ValueError(f"class '{name}' (from --classes) matches no {kind} in {where} (found: "
                       f"{', '.join(found) or 'none'}); {hint}")


def check_classes(class_list: list[str], given: bool, candidate_labels: Iterable[str],
                  item_labels: Iterable[str], where: str, kind: str, layouts: str) -> None:
  """Every class has usable items and there are at least 2 classes; ValueError otherwise.

  `candidate_labels`: the label of every candidate (checked for typos unless the classes were
  `given`); `item_labels`: those of the usable items; `layouts`: the accepted input layouts.
  """
  if not given:
    odd = _unexpected_labels(collections.Counter(candidate_labels))
    if odd:
      raise ValueError(f"unexpected {kind}s in {where} (count in brackets): {', '.join(odd)}; "
                       f"fix them, or pass --classes=<expected names> to reject those one by one")
  counts = collections.Counter(item_labels)
  for name in class_list:
    if not counts[name]:
      raise ValueError(f"class '{name}' has no usable images in {where} (its {kind} holds none, "
                       "or every one was rejected or a duplicate); add images or "
                       f"{'remove it from --classes' if given else 'remove that ' + kind}")
  if len(class_list) < 2:
    raise ValueError(f"only one class ('{class_list[0]}') in {where}: a classifier needs at least "
                     f"2; add the other class's images (accepted layouts: {layouts})")
