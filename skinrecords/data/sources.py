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
import dataclasses
import os
import posixpath
import re
from typing import Iterator, Sequence

from skinrecords.data import dedup
from skinrecords.data import labels
from skinrecords.data import patients

# Matched in any case; every format `preprocess` decodes.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

LAYOUTS = (
    "class folders ROOT/<class>/<image>; "
    "pre-split folders ROOT/{train,valid|val,test}/<class>/<image>; "
    "or a labels CSV (image id + label columns) with the images anywhere under ROOT")

_SPLIT_FOLDERS = {"train": "train", "valid": "valid", "val": "valid", "test": "test"}
# Rejection reasons of the listing (those of the pixels are `preprocess`'s).
ESCAPES = "path escapes input folder"
STRAY = "not inside a class folder"
FOLDER_LINK = "symbolic link to a folder (not followed)"
UNKNOWN_LABEL = "unknown label"
LABEL_CONFLICT = "label conflict"


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
  warnings: list[str] = dataclasses.field(default_factory=list)  # Class order, patients.
  patient_source: str | None = None  # Where patient ids came from; None: none given.
  missing_patient: int = 0  # Items without a patient id although a patient source was given.
  sha256: dict[str, str] = dataclasses.field(default_factory=dict)  # relpath -> hash, if computed.


def _ignored(name: str) -> bool:
  return name.startswith(".") or name == "__MACOSX"


def inside(path: str, root_real: str) -> bool:
  """Whether real path `path` is `root_real` or under it."""
  return os.path.commonpath([path, root_real]) == root_real


# A records folder (make_records output: manifest.json beside the shards) left inside the input
# folder is not input: its shards showed up as .tfrecord rejections, or as a class (issue 27).
_RECORDS_MANIFEST = "manifest.json"  # manifest.FILE (the write side imports no manifest reader)


def _records_folder(entry: os.DirEntry) -> bool:
  return entry.is_dir(follow_symlinks=False) and os.path.isfile(
      os.path.join(entry.path, _RECORDS_MANIFEST))


def _sorted_entries(directory: str) -> list[os.DirEntry]:
  with os.scandir(directory) as it:
    return sorted((e for e in it if not _ignored(e.name) and not _records_folder(e)),
                  key=lambda e: e.name)


def _skipped_records_folders(root: str) -> list[str]:
  """Relative paths of the records folders _sorted_entries leaves out, for a warning."""
  found = []
  for folder, dirs, _ in os.walk(root):
    dirs[:] = [d for d in dirs if not _ignored(d)]
    for d in list(dirs):
      if os.path.isfile(os.path.join(folder, d, _RECORDS_MANIFEST)):
        found.append(os.path.relpath(os.path.join(folder, d), root).replace(os.sep, "/"))
        dirs.remove(d)
  return sorted(found)


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


def list_image_files(folder) -> list[str]:
  """Sorted paths of the image files under `folder`, recursively; hidden entries skipped.

  The one walker of loose image folders (bin/predict, show_preprocessing): same extensions and
  debris rules as the converter's listing.
  """
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder}: not a folder")
  found: list[tuple[str, str]] = []
  for relpath, path in _walk(os.fspath(folder), "", []):
    if os.path.splitext(relpath)[1].lower() in IMAGE_EXTENSIONS and os.path.isfile(path):
      found.append((relpath, path))
  return sorted(path for _, path in found)


def _file_problem(path: str, root_real: str) -> str | None:
  """Why `path` cannot be an image of this input, or None."""
  if not inside(os.path.realpath(path), root_real):
    return ESCAPES
  if os.path.islink(path) and not os.path.exists(path):
    return "broken symbolic link"
  if os.path.isdir(path):
    return FOLDER_LINK
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
  return problem if problem in (ESCAPES, FOLDER_LINK) else STRAY


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
      return None, ESCAPES
    norm = posixpath.normpath(name)
    if norm == ".." or norm.startswith("../"):
      return None, ESCAPES
    direct = os.path.join(root, *norm.split("/"))
    if os.path.lexists(direct):  # An explicit relative path wins, even into a hidden folder.
      if not inside(os.path.realpath(direct), root_real):
        return None, ESCAPES
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


def _conflicts(scan: _Scan, conflicted: dict[str, list[tuple[str, int]]], labels_csv: str
               ) -> None:
  """Rejects every row of an image listed with two labels: which label is right is unknowable."""
  if not conflicted:
    return
  scan.candidates = [c for c in scan.candidates if c.relpath not in conflicted]
  for relpath, rows in conflicted.items():
    listed = ", ".join(f"'{label}' (line {line})" for label, line in rows)
    # One rejection per image, not per row: 5 conflicting images were listed twice each and
    # counted as 10 rejections (issue 27). `found` counts the image once as well.
    scan.found -= len(rows) - 1
    scan.rejected.append(Rejection(relpath, f"{LABEL_CONFLICT}: listed as {listed} in "
                                   f"{labels_csv}; fix the CSV"))


def _scan_csv(root: str, root_real: str, labels_csv: str, columns: dict[str, str | None]) -> _Scan:
  fieldnames, rows = labels.read_csv(labels_csv)
  labels.check_columns(labels_csv, "labels CSV", fieldnames, columns)
  image_col, label_col = columns["image_column"], columns["label_column"]
  patient_col = columns["patient_column"]
  index = _Index(root)
  scan = _Scan(found=len(rows))
  first: dict[str, tuple[str, int]] = {}  # relpath -> (label, line) of its first row
  conflicted: dict[str, list[tuple[str, int]]] = {}
  for line, row in rows:
    value = (row.get(image_col) or "").strip()
    label = labels.normalise_label(row.get(label_col) or "")
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
    if relpath in first:  # Same file named twice: a duplicate, or a conflict if labels differ.
      if label == first[relpath][0] and relpath not in conflicted:
        scan.duplicates.append(Duplicate(relpath, relpath))
      else:
        conflicted.setdefault(relpath, [first[relpath]]).append((label, line))
      continue
    first[relpath] = (label, line)
    patient = (row.get(patient_col) or "").strip() if patient_col else ""
    scan.candidates.append(SourceItem(path, relpath, value, label, patient, None))
  _conflicts(scan, conflicted, labels_csv)
  return scan


def _exclude(scan: _Scan, root_real: str, exclude: str | None) -> None:
  """Forgets everything under `exclude` (the output folder, when it sits inside the input)."""
  if not exclude:
    return
  real = os.path.realpath(exclude)
  if real == root_real or not inside(real, root_real):
    return
  rel = os.path.relpath(real, root_real).replace(os.sep, "/")
  under = lambda path: path == rel or path.startswith(rel + "/")
  before = len(scan.candidates) + len(scan.rejected) + len(scan.duplicates)
  scan.candidates = [c for c in scan.candidates if not under(c.relpath)]
  scan.rejected = [r for r in scan.rejected if not under(r.path)]
  scan.duplicates = [d for d in scan.duplicates if not under(d.path)]
  scan.found -= before - len(scan.candidates) - len(scan.rejected) - len(scan.duplicates)
  if posixpath.basename(rel) not in {c.label for c in scan.candidates}:
    scan.class_names.discard(posixpath.basename(rel))


def list_sources(input_dir: str, *, labels_csv: str | None = None,
                 image_column: str = "image_name", label_column: str = "target",
                 patient_column: str | None = None, patients_csv: str | None = None,
                 classes: Sequence[str] | None = None, deduplicate: bool = True,
                 exclude: str | None = None) -> Listing:
  """Lists the images under `input_dir` with their labels; see the module docstring.

  Args:
    input_dir: the input folder (class folders, pre-split folders, or images for `labels_csv`).
    labels_csv: a CSV with one row per image; its image column holds a path relative to
      `input_dir`, a file name or a file stem (ISIC 2020: image_name, target, patient_id;
      HAM10000: image_id, dx, lesion_id). Integral labels are normalised ("1.0" is "1").
    image_column, label_column, patient_column: CSV column names (patient_column optional).
    patients_csv: for folder layouts, a CSV of `image_column` -> `patient_column`.
    classes: class names in id order; items with other labels are rejected. Default: every
      class folder name (or every non-empty CSV label), sorted (numerically when all integers).
    deduplicate: drop byte-identical copies, keeping the first by relative path.
    exclude: a folder inside `input_dir` to leave out (the converter's output).

  Returns:
    A Listing.

  Raises:
    ValueError: unreadable input, unknown CSV columns, bad `classes`, a class without images,
      fewer than 2 classes, labels that look like typos (without `classes`), or no usable image.
  """
  if not os.path.isdir(input_dir):
    raise ValueError(f"input folder {input_dir} does not exist or is not a folder; "
                     f"accepted layouts: {LAYOUTS}")
  classes = labels.given_classes(classes)
  root = os.path.abspath(input_dir)
  root_real = os.path.realpath(root)
  layout, kind, where, scan = _scan(input_dir, root, root_real, labels_csv, {
      "image_column": image_column, "label_column": label_column,
      "patient_column": patient_column})
  _exclude(scan, root_real, exclude)
  if classes is not None:
    labels.check_given(classes, scan.class_names, where, kind)
  class_list = classes if classes is not None else labels.class_order(scan.class_names)
  items, duplicates = _labelled(scan, class_list, deduplicate, hashes := {})
  if not items:
    raise _no_usable_images(input_dir, layout, scan, duplicates)
  if layout != "csv":
    _explain_empty_classes(class_list, items, scan.rejected, layout, input_dir)
  labels.check_classes(class_list, classes is not None, [c.label for c in scan.candidates],
                       [item.label for item in items], where, kind, LAYOUTS)
  listing = Listing(layout=layout, classes=list(class_list), items=items,
                    rejected=sorted(scan.rejected, key=lambda r: (r.path, r.reason)),
                    duplicates=sorted(duplicates, key=lambda d: (d.path, d.duplicate_of)),
                    found=scan.found, sha256=hashes)
  patients.fill(listing, labels_csv, patients_csv, image_column, patient_column)
  listing.items = _unique_image_names(listing.items)
  if classes is None and (note := labels.class_order_warning(class_list)):
    listing.warnings.insert(0, note)
  if labels_csv is None and (skipped := _skipped_records_folders(root)):
    listing.warnings.append(f"left out {', '.join(skipped)}: a records folder (it holds "
                            f"{_RECORDS_MANIFEST}), not images")
  return listing


def _scan(input_dir: str, root: str, root_real: str, labels_csv: str | None, columns: dict):
  """(layout, what a label is called, where labels come from, the scan) of the CSV or folders."""
  if labels_csv is not None:
    return "csv", "label", f"labels CSV {labels_csv}", _scan_csv(root, root_real, labels_csv,
                                                                  columns)
  layout, scan = _scan_folders(root, root_real)
  return layout, "class folder", input_dir, scan


def _no_usable_images(input_dir: str, layout: str, scan, duplicates) -> ValueError:
  """The error for an input without one usable image, with its three most common reasons."""
  reasons = collections.Counter(r.reason for r in scan.rejected).most_common(3)
  shown = "; ".join(f"{n} x {reason}" for reason, n in reasons)
  return ValueError(
      f"no usable images under {input_dir} ({layout} layout: {scan.found} found, "
      f"{len(scan.rejected)} rejected{': ' + shown if shown else ''}, "
      f"{len(duplicates)} duplicates); accepted layouts: {LAYOUTS}")


def _explain_empty_classes(class_list, items, rejected, layout: str, input_dir: str) -> None:
  """ValueError saying why a class folder whose every file was rejected has no usable image (a
  class of symbolic links out of the input folder only said "holds none, or every one was
  rejected", issue 27)."""
  have = {it.label for it in items}
  depth = 1 if layout == "presplit" else 0  # class folder: the path's first (or second) part
  for name in class_list:
    if name in have:
      continue
    mine = [r for r in rejected if r.path.split("/")[depth:depth + 1] == [name]
            and r.path.count("/") > depth]
    if not mine:
      continue  # an empty folder: labels.check_classes says so
    reasons = collections.Counter(r.reason for r in mine).most_common(3)
    shown = "; ".join(f"{n} x {reason}" for reason, n in reasons)
    fix = (" (symbolic links must point inside the input folder: copy those files in, or pass "
           "the folder they live in as --input_dir)" if any(r.reason == ESCAPES for r in mine)
           else "")
    raise ValueError(f"class '{name}' has no usable images in {input_dir}: all {len(mine)} of "
                     f"its files were rejected: {shown}{fix}")


def unique_names(relpaths: Sequence[str], stems: Sequence[str] | None = None) -> list[str]:
  """One name per file, unique: its stem where no other file has that stem, else its relative path
  spelled without "/" and "." (Melanoma/sub/gray.png -> Melanoma_sub_gray_png).

  Issue 27: gray.png, gray.jpg and sub/gray.png all became "gray", so their predictions, OOF rows
  and ISIC rows collided. Stems stay the names wherever they are unique, so ISIC_0000000 and Kaggle
  image_name values are unchanged; a colliding name keeps its folder, and has neither "/" nor "."
  because the ISIC and Kaggle CSVs reduce a name to its base name without extension.
  Raises ValueError listing the files when even these names collide (a_b/c.png and a/b_c.png).
  """
  stems = list(stems) if stems is not None else [
      posixpath.splitext(posixpath.basename(r))[0] for r in relpaths]
  count = collections.Counter(stems)
  names = [stem if count[stem] == 1 else re.sub(r"[/\\.]", "_", rel)
           for rel, stem in zip(relpaths, stems)]
  clash = [n for n, c in collections.Counter(names).items() if c > 1]
  if clash:
    files = sorted(r for r, n in zip(relpaths, names) if n in clash)
    raise ValueError(f"{len(files)} images would share a name ({', '.join(files[:10])}"
                     f"{', ...' if len(files) > 10 else ''}); rename them")
  return names


def _unique_image_names(items: list[SourceItem]) -> list[SourceItem]:
  """Items whose image_name is unique within the records folder (unique_names)."""
  names = unique_names([it.relpath for it in items], [it.image_name for it in items])
  return [it if it.image_name == name else dataclasses.replace(it, image_name=name)
          for it, name in zip(items, names)]


def _labelled(scan: _Scan, class_list: list[str], deduplicate: bool, hashes: dict[str, str]
              ) -> tuple[list[SourceItem], list[Duplicate]]:
  """Candidates with a known label, sorted and de-duplicated; the others go to scan.rejected."""
  known = set(class_list)
  items: list[SourceItem] = []
  for item in scan.candidates:
    if item.label in known:
      items.append(item)
    else:
      scan.rejected.append(Rejection(item.relpath, f"{UNKNOWN_LABEL} '{item.label}' (known: "
                                     f"{', '.join(class_list)})"))
  items.sort(key=lambda item: item.relpath)
  duplicates = list(scan.duplicates)
  if deduplicate:
    dropped = dedup.duplicates(items, hashes)
    conflicted = _identical_conflicts(scan, dedup.label_conflicts(items, dropped))
    items = [item for item in items if item.relpath not in dropped
             and item.relpath not in conflicted]
    duplicates += [Duplicate(path, first) for path, first in dropped.items()
                   if path not in conflicted]
  return items, duplicates


def _identical_conflicts(scan: _Scan, conflicts: dict[str, list[SourceItem]]) -> set[str]:
  """Rejects every copy of identical bytes filed under two labels; returns their relpaths.

  Treated as a CSV conflict is: which label is right is unknowable, so no copy is kept."""
  rejected = set()
  for members in conflicts.values():
    listed = ", ".join(f"'{m.label}' ({m.relpath})" for m in members)
    for member in members:
      scan.rejected.append(Rejection(member.relpath, f"{LABEL_CONFLICT}: identical bytes filed "
                                     f"as {listed}; keep one copy under the right label"))
      rejected.add(member.relpath)
  return rejected
