"""Patient ids: from a patients CSV for folder layouts, and the leak check of pre-split layouts.

Works on `sources.SourceItem`s and `sources.Listing` (by their fields; this module sits below
`sources`, which calls `fill`). Plain Python only.
"""

from __future__ import annotations

import collections
import dataclasses
import posixpath

from skinrecords.data import labels


def attach_patients(items: list, patients_csv: str, image_column: str,
                    patient_column: str) -> tuple[list, list[str]]:
  """Patient ids from a CSV of image name -> patient (or lesion) id, for a folder layout.

  A row matches an image by relative path (with or without extension), file name or stem.
  """
  fieldnames, rows = labels.read_csv(patients_csv, "patients CSV")
  labels.check_columns(patients_csv, "patients CSV", fieldnames,
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


def presplit_leaks(items: list) -> list[str]:
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


def fill(listing, labels_csv: str | None, patients_csv: str | None, image_column: str,
         patient_column: str | None) -> None:
  """Fills the listing's patient ids (from a patients CSV), source, missing count and warnings."""
  if patients_csv is not None:
    if not patient_column:
      raise ValueError(f"patients CSV {patients_csv}: give the patient_column that holds the "
                       "patient (or lesion) ids, e.g. patient_id")
    listing.items, notes = attach_patients(listing.items, patients_csv, image_column,
                                           patient_column)
    listing.warnings += notes
    listing.patient_source = f"patients CSV {patients_csv} column '{patient_column}'"
  elif labels_csv is not None and patient_column:
    listing.patient_source = f"labels CSV column '{patient_column}'"
  if listing.patient_source:
    listing.missing_patient = sum(not item.patient_id for item in listing.items)
  if listing.layout == "presplit":
    listing.warnings += presplit_leaks(listing.items)
