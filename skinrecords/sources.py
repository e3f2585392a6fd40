"""Finds the images to convert, their labels and patients, and reports what it leaves out.

Three input layouts are accepted (see ``LAYOUTS``). Every candidate the scan sees ends up in exactly
one of ``Listing.items``, ``Listing.rejected`` or ``Listing.duplicates``, so
``found == len(items) + len(rejected) + len(duplicates)`` always holds and nothing disappears
silently. Hidden entries (name starting with ".") and ``__MACOSX`` folders are never candidates:
they are archive and OS debris (``.DS_Store``, ``._ISIC_0000000.jpg``), not images.

The listing is deterministic: folders are scanned in sorted name order and items are sorted by
relative path, so the same input gives the same shards whatever order the filesystem returns.
Plain Python only (no TensorFlow, no OpenCV): reading a 33,126-image ISIC folder takes seconds.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import os
import posixpath
import re
from typing import Iterator, Sequence

from skinrecords import fileio

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")  # Matched in any case.

LAYOUTS = (
    "class folders ROOT/<class>/<image>; "
    "pre-split folders ROOT/{train,valid|val,test}/<class>/<image>; "
    "or a labels CSV (image id + label columns) with the images anywhere under ROOT")

_SPLIT_FOLDERS = {"train": "train", "valid": "valid", "val": "valid", "test": "test"}
_ESCAPES = "path escapes input folder"
_STRAY = "not inside a class folder"
_FOLDER_LINK = "symbolic link to a folder (not followed)"


@dataclasses.dataclass(frozen=True)
class SourceItem:
  path: str  # Absolute path of the file.
  relpath: str  # Posix path relative to input_dir (used in manifest.json).
  image_name: str  # File stem (the CSV's image id for CSV inputs).
  label: str  # Class name (CSV labels are the cell text, e.g. "0"/"1" or "mel").
  patient_id: str  # "" when unknown.
  split: str | None  # "train" / "valid" / "test" from a pre-split layout, else None.


@dataclasses.dataclass(frozen=True)
class Rejection:
  path: str  # Relpath when inside input_dir, else the value as given.
  reason: str


@dataclasses.dataclass(frozen=True)
class Duplicate:
  path: str  # Relpath of the dropped copy.
  duplicate_of: str  # Relpath of the kept one.


@dataclasses.dataclass
class Listing:
  layout: str  # "class_folders" | "presplit" | "csv".
  classes: list[str]  # Class names in id order.
  items: list[SourceItem]  # Sorted by relpath.
  rejected: list[Rejection]
  duplicates: list[Duplicate]
  found: int  # Every candidate seen: len(items) + len(rejected) + len(duplicates).


def _ignored(name: str) -> bool:
  return name.startswith(".") or name == "__MACOSX"


def _inside(path: str, root_real: str) -> bool:
  return os.path.commonpath([path, root_real]) == root_real


def _sorted_entries(directory: str) -> list[os.DirEntry]:
  with os.scandir(directory) as it:
    return sorted((e for e in it if not _ignored(e.name)), key=lambda e: e.name)


def _walk(directory: str, rel: str, problems: list[Rejection]) -> Iterator[tuple[str, str]]:
  """Yields (relpath, abspath) of every candidate under `directory`, recursively, sorted.

  Symbolic links to folders are yielded (and later rejected), not entered: following them could
  loop or leave the input folder.
  """
  try:
    entries = _sorted_entries(directory)
  except OSError as err:  # Unreadable folder: say so rather than skip it silently.
    problems.append(Rejection(rel, f"cannot read folder: {err.strerror or err}"))
    return
  for entry in entries:
    relpath = posixpath.join(rel, entry.name) if rel else entry.name
    if entry.is_dir(follow_symlinks=False):
      yield from _walk(entry.path, relpath, problems)
    else:
      yield relpath, entry.path


def _file_problem(path: str, root_real: str) -> str | None:
  """Why `path` cannot be an image of this input, or None."""
  if not _inside(os.path.realpath(path), root_real):
    return _ESCAPES
  if os.path.islink(path) and not os.path.exists(path):
    return "broken symbolic link"
  if os.path.isdir(path):
    return _FOLDER_LINK
  if not os.path.isfile(path):
    return "not a regular file"
  ext = os.path.splitext(path)[1]
  if ext.lower() not in IMAGE_EXTENSIONS:
    shown = f"extension '{ext}'" if ext else "file extension ''"
    return f"unsupported {shown} (accepted: {', '.join(IMAGE_EXTENSIONS)})"
  return None


def _stray_reason(path: str, root_real: str) -> str:
  # Escapes and folder links say more than "stray" (a linked folder was likely meant as a class).
  problem = _file_problem(path, root_real)
  return problem if problem in (_ESCAPES, _FOLDER_LINK) else _STRAY


def _class_order(names: set[str]) -> list[str]:
  # Integer labels ("0".."10") sort numerically so that id == label where labels are 0..C-1.
  if names and all(re.fullmatch(r"-?\d+", n) for n in names):
    return sorted(names, key=int)
  return sorted(names)


@dataclasses.dataclass
class _Scan:
  """Candidates before label checks and de-duplication."""
  candidates: list[SourceItem] = dataclasses.field(default_factory=list)
  rejected: list[Rejection] = dataclasses.field(default_factory=list)
  duplicates: list[Duplicate] = dataclasses.field(default_factory=list)
  class_names: set[str] = dataclasses.field(default_factory=set)
  found: int = 0


def _scan_container(root: str, root_real: str, container: str, rel: str, split: str | None,
                    scan: _Scan) -> None:
  """Scans ROOT (or ROOT/<split>): subfolders are classes, anything else is stray."""
  for entry in _sorted_entries(container):
    relpath = posixpath.join(rel, entry.name) if rel else entry.name
    if not entry.is_dir(follow_symlinks=False):
      scan.found += 1
      scan.rejected.append(Rejection(relpath, _stray_reason(entry.path, root_real)))
      continue
    scan.class_names.add(entry.name)
    problems: list[Rejection] = []
    for file_rel, file_path in _walk(entry.path, relpath, problems):
      scan.found += 1
      problem = _file_problem(file_path, root_real)
      if problem:
        scan.rejected.append(Rejection(file_rel, problem))
        continue
      stem = os.path.splitext(os.path.basename(file_rel))[0]
      scan.candidates.append(SourceItem(os.path.join(root, *file_rel.split("/")), file_rel, stem,
                                        entry.name, "", split))
    scan.found += len(problems)
    scan.rejected.extend(problems)


def _scan_folders(root: str, root_real: str) -> tuple[str, _Scan]:
  scan = _Scan()
  subfolders = {e.name for e in _sorted_entries(root) if e.is_dir(follow_symlinks=False)}
  lowered = {name.lower() for name in subfolders}
  if "train" in lowered and lowered <= _SPLIT_FOLDERS.keys():
    for entry in _sorted_entries(root):
      if entry.is_dir(follow_symlinks=False):
        _scan_container(root, root_real, entry.path, entry.name,
                        _SPLIT_FOLDERS[entry.name.lower()], scan)
      else:
        scan.found += 1
        scan.rejected.append(Rejection(entry.name, _stray_reason(entry.path, root_real)))
    return "presplit", scan
  _scan_container(root, root_real, root, "", None, scan)
  return "class_folders", scan


class _Index:
  """Files under ROOT by relative path minus extension, by name and by stem."""

  def __init__(self, root: str):
    self.by_relstem = collections.defaultdict(list)
    self.by_name = collections.defaultdict(list)
    self.by_stem = collections.defaultdict(list)
    for relpath, _ in _walk(root, "", []):  # Unreadable folders just hold no matches here.
      name = posixpath.basename(relpath)
      self.by_name[name].append(relpath)
      stem, ext = posixpath.splitext(name)
      if ext.lower() in IMAGE_EXTENSIONS:  # A "x.txt" beside "x.jpg" must not make "x" ambiguous.
        self.by_relstem[posixpath.splitext(relpath)[0]].append(relpath)
        self.by_stem[stem].append(relpath)

  def resolve(self, value: str, root: str, root_real: str) -> tuple[str | None, str | None]:
    """Returns (relpath, None) for the file `value` names, or (None, reason)."""
    name = value.replace("\\", "/")
    if posixpath.isabs(name) or re.match(r"[A-Za-z]:/", name):
      return None, _ESCAPES
    norm = posixpath.normpath(name)
    if norm == ".." or norm.startswith("../"):
      return None, _ESCAPES
    direct = os.path.join(root, *norm.split("/"))
    if os.path.lexists(direct):  # An explicit relative path wins, even into a hidden folder.
      if not _inside(os.path.realpath(direct), root_real):
        return None, _ESCAPES
      if not os.path.isdir(direct):
        return norm, None
    if "/" in norm:  # "sub/ISIC_1" -> "sub/ISIC_1.jpg"; no guessing about other folders.
      matches = self.by_relstem.get(norm, [])
    else:  # ISIC image_name values have no extension: "ISIC_2637011" -> ".../ISIC_2637011.jpg".
      matches = self.by_name.get(norm) or self.by_stem.get(norm, [])
    if not matches:
      return None, f"not found under {root}"
    if len(matches) > 1:
      return None, f"ambiguous: matches {', '.join(sorted(matches))}"
    return matches[0], None


def _read_csv(labels_csv: str) -> tuple[list[str], list[tuple[int, dict[str, str | None]]]]:
  try:
    # utf-8-sig: spreadsheet exports often start with a byte-order mark that would rename column 1.
    with open(labels_csv, newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f)
      rows = [(reader.line_num, row) for row in reader]
      return list(reader.fieldnames or []), rows
  except (OSError, UnicodeDecodeError, csv.Error) as err:
    raise ValueError(f"cannot read labels CSV {labels_csv}: {err}") from err


def _scan_csv(root: str, root_real: str, labels_csv: str, columns: dict[str, str | None]) -> _Scan:
  fieldnames, rows = _read_csv(labels_csv)
  for arg, column in columns.items():
    if column is not None and column not in fieldnames:
      raise ValueError(f"labels CSV {labels_csv}: column {column!r} (given as {arg}) not found; "
                       f"columns in the file: {', '.join(fieldnames) or '(none: empty file)'}")
  image_col, label_col = columns["image_column"], columns["label_column"]
  patient_col = columns["patient_column"]
  index = _Index(root)
  scan = _Scan(found=len(rows))
  first_row_of: dict[str, str] = {}
  for line, row in rows:
    value = (row.get(image_col) or "").strip()
    label = (row.get(label_col) or "").strip()
    if label:
      scan.class_names.add(label)
    if not value:
      scan.rejected.append(Rejection("", f"empty {image_col!r} cell ({labels_csv} line {line})"))
      continue
    relpath, problem = index.resolve(value, root, root_real)
    path = os.path.join(root, *relpath.split("/")) if relpath else ""
    if relpath and not problem:
      problem = _file_problem(path, root_real)
    if not problem and not label:
      problem = f"empty {label_col!r} cell ({labels_csv} line {line})"
    if problem:
      scan.rejected.append(Rejection(relpath or value, problem))
      continue
    if relpath in first_row_of:  # Same file named twice: keep the first row's label.
      scan.duplicates.append(Duplicate(relpath, relpath))
      continue
    first_row_of[relpath] = value
    patient = (row.get(patient_col) or "").strip() if patient_col else ""
    scan.candidates.append(SourceItem(path, relpath, value, label, patient, None))
  return scan


def _deduplicate(items: list[SourceItem]) -> tuple[list[SourceItem], list[Duplicate]]:
  """Keeps the first (by relpath) of each set of byte-identical files.

  Only files whose size is shared get hashed: in a typical folder almost every size is unique, so
  this reads a small fraction of the bytes. Zero-byte files are left alone (they are broken, not
  copies of each other; preprocessing rejects them with a reason).
  """
  by_size = collections.defaultdict(list)
  for item in items:
    try:
      size = os.path.getsize(item.path)
    except OSError:
      continue  # Preprocessing reports unreadable files with the real error.
    if size:
      by_size[size].append(item)
  dropped: dict[str, str] = {}
  for same_size in by_size.values():
    if len(same_size) < 2:
      continue
    kept: dict[str, str] = {}
    for item in same_size:  # Already in relpath order.
      try:
        first = kept.setdefault(fileio.sha256_file(item.path), item.relpath)
      except OSError:
        continue
      if first != item.relpath:
        dropped[item.relpath] = first
  return ([item for item in items if item.relpath not in dropped],
          [Duplicate(path, first) for path, first in dropped.items()])


def list_sources(input_dir: str, *, labels_csv: str | None = None,
                 image_column: str = "image_name", label_column: str = "target",
                 patient_column: str | None = None, classes: Sequence[str] | None = None,
                 deduplicate: bool = True) -> Listing:
  """Lists the images under `input_dir` with their labels; see the module docstring.

  Args:
    input_dir: the input folder (class folders, pre-split folders, or images for `labels_csv`).
    labels_csv: a CSV with one row per image; its image column holds a path relative to
      `input_dir`, a file name or a file stem (ISIC 2020: image_name, target, patient_id;
      HAM10000: image_id, dx, lesion_id).
    image_column, label_column, patient_column: CSV column names (patient_column optional).
    classes: class names in id order; items with other labels are rejected. Default: every
      class folder name (or every non-empty CSV label), sorted (numerically when all integers).
    deduplicate: drop byte-identical copies, keeping the first by relative path.

  Returns:
    A Listing.

  Raises:
    ValueError: unreadable input, unknown CSV columns, bad `classes`, or no usable image.
  """
  if not os.path.isdir(input_dir):
    raise ValueError(f"input folder {input_dir} does not exist or is not a folder; "
                     f"accepted layouts: {LAYOUTS}")
  if classes is not None:
    classes = list(classes)
    if not classes or any(not isinstance(c, str) or not c for c in classes) or len(
        set(classes)) != len(classes):
      raise ValueError(f"classes {classes!r}: expected distinct non-empty names in id order")
  root = os.path.abspath(input_dir)
  root_real = os.path.realpath(root)
  if labels_csv is not None:
    layout = "csv"
    scan = _scan_csv(root, root_real, labels_csv, {
        "image_column": image_column, "label_column": label_column,
        "patient_column": patient_column})
  else:
    layout, scan = _scan_folders(root, root_real)
  class_list = classes if classes is not None else _class_order(scan.class_names)
  known = set(class_list)
  items: list[SourceItem] = []
  for item in scan.candidates:
    if item.label in known:
      items.append(item)
    else:
      scan.rejected.append(Rejection(
          item.relpath, f"unknown label '{item.label}' (known: {', '.join(class_list)})"))
  items.sort(key=lambda item: item.relpath)
  duplicates = scan.duplicates
  if deduplicate:
    items, content_duplicates = _deduplicate(items)
    duplicates += content_duplicates
  if not items:
    reasons = collections.Counter(r.reason for r in scan.rejected).most_common(3)
    shown = "; ".join(f"{n} x {reason}" for reason, n in reasons)
    raise ValueError(
        f"no usable images under {input_dir} ({layout} layout: {scan.found} found, "
        f"{len(scan.rejected)} rejected{': ' + shown if shown else ''}, "
        f"{len(duplicates)} duplicates); accepted layouts: {LAYOUTS}")
  return Listing(layout=layout, classes=list(class_list), items=items,
                 rejected=sorted(scan.rejected, key=lambda r: (r.path, r.reason)),
                 duplicates=sorted(duplicates, key=lambda d: (d.path, d.duplicate_of)),
                 found=scan.found)
