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
import difflib
import os
import posixpath
import re
from typing import Iterator, Sequence

from skinrecords import fileio

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


def _read_csv(labels_csv: str, kind: str = "labels CSV"
              ) -> tuple[list[str], list[tuple[int, dict[str, str | None]]]]:
  try:
    # utf-8-sig: spreadsheet exports often start with a byte-order mark that would rename column 1.
    with open(labels_csv, newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f)
      rows = [(reader.line_num, row) for row in reader]
      return list(reader.fieldnames or []), rows
  except (OSError, UnicodeDecodeError, csv.Error) as err:
    raise ValueError(f"cannot read {kind} {labels_csv}: {err}") from err


_INTEGRAL = re.compile(r"[+-]?\d+(?:\.0*)?")


def normalise_label(text: str) -> str:
  """A label cell as a class name: "1.0", "01" and "1" are all "1".

  A spreadsheet or pandas export writes an integer column as floats once one cell is empty; without
  this "1.0" would silently become a third class beside "0" and "1".
  """
  text = text.strip()
  return str(int(text.split(".")[0])) if _INTEGRAL.fullmatch(text) else text


def _conflicts(scan: _Scan, conflicted: dict[str, list[tuple[str, int]]], labels_csv: str
               ) -> None:
  """Rejects every row of an image listed with two labels: which label is right is unknowable."""
  if not conflicted:
    return
  scan.candidates = [c for c in scan.candidates if c.relpath not in conflicted]
  for relpath, rows in conflicted.items():
    listed = ", ".join(f"'{label}' (line {line})" for label, line in rows)
    for _ in rows:
      scan.rejected.append(Rejection(relpath, f"{LABEL_CONFLICT}: listed as {listed} in "
                                     f"{labels_csv}; fix the CSV"))


def _scan_csv(root: str, root_real: str, labels_csv: str, columns: dict[str, str | None]) -> _Scan:
  fieldnames, rows = _read_csv(labels_csv)
  _check_columns(labels_csv, "labels CSV", fieldnames, columns)
  image_col, label_col = columns["image_column"], columns["label_column"]
  patient_col = columns["patient_column"]
  index = _Index(root)
  scan = _Scan(found=len(rows))
  first: dict[str, tuple[str, int]] = {}  # relpath -> (label, line) of its first row
  conflicted: dict[str, list[tuple[str, int]]] = {}
  for line, row in rows:
    value = (row.get(image_col) or "").strip()
    label = normalise_label(row.get(label_col) or "")
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


def _deduplicate(items: list[SourceItem], hashes: dict[str, str]
                 ) -> tuple[list[SourceItem], list[Duplicate]]:
  """Keeps the first (by relpath) of each set of byte-identical files.

  Only files whose size is shared get hashed: in a typical folder almost every size is unique, so
  this reads a small fraction of the bytes. Zero-byte files are left alone (they are broken, not
  copies of each other; preprocessing rejects them with a reason). The hashes computed go into
  `hashes` (relpath -> sha256) so that `content_hashes` need not read those files again.
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
        hashes[item.relpath] = fileio.sha256_file(item.path)
        first = kept.setdefault(hashes[item.relpath], item.relpath)
      except OSError:
        continue
      if first != item.relpath:
        dropped[item.relpath] = first
  return ([item for item in items if item.relpath not in dropped],
          [Duplicate(path, first) for path, first in dropped.items()])


def content_hashes(listing: Listing) -> dict[str, str]:
  """sha256 of every item's file (streamed), reusing those de-duplication computed.

  An unreadable file hashes as "unreadable" (preprocessing reports it with the real error).
  """
  for item in listing.items:
    if item.relpath not in listing.sha256:
      try:
        listing.sha256[item.relpath] = fileio.sha256_file(item.path)
      except OSError:
        listing.sha256[item.relpath] = "unreadable"
  return listing.sha256


def _check_columns(path: str, kind: str, fieldnames: list[str], columns: dict) -> None:
  for arg, column in columns.items():
    if column is not None and column not in fieldnames:
      raise ValueError(f"{kind} {path}: column {column!r} (given as {arg}) not found; "
                       f"columns in the file: {', '.join(fieldnames) or '(none: empty file)'}")


def _attach_patients(items: list[SourceItem], patients_csv: str, image_column: str,
                     patient_column: str) -> tuple[list[SourceItem], list[str]]:
  """Patient ids from a CSV of image name -> patient (or lesion) id, for a folder layout.

  A row matches an image by relative path (with or without extension), file name or stem.
  """
  fieldnames, rows = _read_csv(patients_csv, "patients CSV")
  _check_columns(patients_csv, "patients CSV", fieldnames,
                 {"image_column": image_column, "patient_column": patient_column})
  ids: dict[str, str] = {}
  for _, row in rows:
    key = (row.get(image_column) or "").strip().replace("\\", "/")
    if key:
      ids.setdefault(key, (row.get(patient_column) or "").strip())
  used, out = set(), []
  for item in items:
    keys = (item.relpath, posixpath.splitext(item.relpath)[0], posixpath.basename(item.relpath),
            item.image_name)
    key = next((k for k in keys if k in ids), None)
    used.add(key)
    out.append(item if key is None else dataclasses.replace(item, patient_id=ids[key]))
  unused = sorted(set(ids) - used)
  notes = [f"patients CSV {patients_csv}: {len(unused)} of {len(ids)} rows name no listed image "
           f"(first: {', '.join(unused[:3])})"] if unused else []
  return out, notes


def _presplit_leaks(items: list[SourceItem]) -> list[str]:
  """A pre-split layout is kept as given; say when one patient sits in two of its splits."""
  splits_of = collections.defaultdict(set)
  for item in items:
    if item.patient_id:
      splits_of[item.patient_id].add(item.split)
  leaking = sorted(p for p, s in splits_of.items() if len(s) > 1)
  if not leaking:
    return []
  return [f"{len(leaking)} patients have images in more than one of the given splits (first: "
          f"{leaking[0]} in {', '.join(sorted(splits_of[leaking[0]]))}): validation and test "
          "scores on these splits are optimistic; re-split with the class-folder layout and "
          "--patients_csv"]


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


def _check_given(classes: list[str], scan: _Scan, where: str, kind: str) -> None:
  """A --classes name that matches no folder or label names its near match (a case typo)."""
  found = sorted(scan.class_names)
  for name in classes:
    if name not in scan.class_names:
      near = ([f for f in found if f.lower() == name.lower()] or
              difflib.get_close_matches(name, found, 1, 0.6))
      hint = f"did you mean '{near[0]}'?" if near else "remove it or add its images"
      raise ValueError(f"class '{name}' (from --classes) matches no {kind} in {where} (found: "
                       f"{', '.join(found) or 'none'}); {hint}")


def _check_classes(class_list: list[str], given: bool, items: list[SourceItem], scan: _Scan,
                   where: str, kind: str) -> None:
  """Every class has images and there are at least 2 classes; ValueError otherwise."""
  if not given:
    odd = _unexpected_labels(collections.Counter(c.label for c in scan.candidates))
    if odd:
      raise ValueError(f"unexpected {kind}s in {where} (count in brackets): {', '.join(odd)}; "
                       f"fix them, or pass --classes=<expected names> to reject those one by one")
  counts = collections.Counter(item.label for item in items)
  for name in class_list:
    if not counts[name]:
      raise ValueError(f"class '{name}' has no usable images in {where} (its {kind} holds none, "
                       "or every one was rejected or a duplicate); add images or "
                       f"{'remove it from --classes' if given else 'remove that ' + kind}")
  if len(class_list) < 2:
    raise ValueError(f"only one class ('{class_list[0]}') in {where}: a classifier needs at least "
                     f"2; add the other class's images (accepted layouts: {LAYOUTS})")


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
  if classes is not None:
    classes = list(classes)
    if len(classes) < 2 or any(not isinstance(c, str) or not c for c in classes) or len(
        set(classes)) != len(classes):
      raise ValueError(f"classes {classes!r}: expected 2 or more distinct non-empty names in id "
                       "order, e.g. NotMelanoma,Melanoma")
  root = os.path.abspath(input_dir)
  root_real = os.path.realpath(root)
  if labels_csv is not None:
    layout, kind, where = "csv", "label", f"labels CSV {labels_csv}"
    scan = _scan_csv(root, root_real, labels_csv, {
        "image_column": image_column, "label_column": label_column,
        "patient_column": patient_column})
  else:
    layout, scan = _scan_folders(root, root_real)
    kind, where = "class folder", input_dir
  _exclude(scan, root_real, exclude)
  if classes is not None:
    _check_given(classes, scan, where, kind)
  class_list = classes if classes is not None else _class_order(scan.class_names)
  items, duplicates = _labelled(scan, class_list, deduplicate, hashes := {})
  if not items:
    reasons = collections.Counter(r.reason for r in scan.rejected).most_common(3)
    shown = "; ".join(f"{n} x {reason}" for reason, n in reasons)
    raise ValueError(
        f"no usable images under {input_dir} ({layout} layout: {scan.found} found, "
        f"{len(scan.rejected)} rejected{': ' + shown if shown else ''}, "
        f"{len(duplicates)} duplicates); accepted layouts: {LAYOUTS}")
  _check_classes(class_list, classes is not None, items, scan, where, kind)
  listing = Listing(layout=layout, classes=list(class_list), items=items,
                    rejected=sorted(scan.rejected, key=lambda r: (r.path, r.reason)),
                    duplicates=sorted(duplicates, key=lambda d: (d.path, d.duplicate_of)),
                    found=scan.found, sha256=hashes)
  _patients(listing, labels_csv, patients_csv, image_column, patient_column)
  if classes is None and (note := class_order_warning(class_list)):
    listing.warnings.insert(0, note)
  return listing


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
    items, content_duplicates = _deduplicate(items, hashes)
    duplicates += content_duplicates
  return items, duplicates


def _patients(listing: Listing, labels_csv: str | None, patients_csv: str | None,
              image_column: str, patient_column: str | None) -> None:
  """Fills the listing's patient ids (from a patients CSV), source, missing count and warnings."""
  if patients_csv is not None:
    if not patient_column:
      raise ValueError(f"patients CSV {patients_csv}: give the patient_column that holds the "
                       "patient (or lesion) ids, e.g. patient_id")
    listing.items, notes = _attach_patients(listing.items, patients_csv, image_column,
                                            patient_column)
    listing.warnings += notes
    listing.patient_source = f"patients CSV {patients_csv} column '{patient_column}'"
  elif labels_csv is not None and patient_column:
    listing.patient_source = f"labels CSV column '{patient_column}'"
  if listing.patient_source:
    listing.missing_patient = sum(not item.patient_id for item in listing.items)
  if listing.layout == "presplit":
    listing.warnings += _presplit_leaks(listing.items)
