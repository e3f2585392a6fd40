"""Pseudonymous patient ids (and optionally image names) for records that are shared.

Records travel (a bucket, a colleague, a Kaggle-style dataset); the splits need the grouping of
images by patient, not the hospital's identifier. With a secret key (the salt file, kept away from
the records), every patient id becomes HMAC-SHA256(key, id), cut to 64 bits: equal ids stay equal
(so splits, folds and the patient-level bootstrap are unchanged: they depend only on which images
share an id, in listing order), and without the key nobody can test a guessed id against the
records, as they could against a plain (unkeyed) hash of a medical record number. Plain Python.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import hmac
import io
import os
import re
import secrets

from skinrecords.core import fileio

METHOD = "HMAC-SHA256 keyed with a secret salt file (not stored with the records), 64 bits, hex"
# 64 bits: a collision among 1e6 patients has probability ~3e-8; `apply` checks for one anyway.
_DIGITS = 16
_MIN_KEY_BYTES = 16
_FIRST = re.compile(r" \(first: [^)]*\)")


def load_key(salt_file: str, output_dir: str, create: bool = True) -> bytes:
  """The secret in `salt_file` (created with 32 random bytes, hex, mode 0600, when absent).

  ValueError when the file lies inside the output folder (the secret would be shared with the
  records), is too short to be a secret, or cannot be read.
  """
  salt = os.path.abspath(salt_file)
  if not fileio.is_remote(output_dir):
    out = os.path.abspath(output_dir)
    if os.path.commonpath([salt, out]) == out:
      raise ValueError(f"the salt file {salt_file} lies inside the output folder {output_dir}: "
                       "the key would be shared with the records; keep it elsewhere")
  if not fileio.exists(salt) and create:
    try:
      fileio.makedirs(os.path.dirname(salt))
      fd = os.open(salt, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
      with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    except OSError as err:
      raise ValueError(f"the salt file {salt_file} cannot be created ({err.strerror}); give a "
                       "writable path or an existing key file") from err
  try:
    key = fileio.read_bytes(salt).strip()
  except OSError as err:
    raise ValueError(f"the salt file {salt_file} cannot be read ({err.strerror})") from err
  if len(key) < _MIN_KEY_BYTES:
    raise ValueError(f"the salt file {salt_file} holds {len(key)} bytes; a key needs at least "
                     f"{_MIN_KEY_BYTES} random ones (delete the file and one is made for you)")
  return key


def pseudonym(key: bytes, kind: str, value: str) -> str:
  """HMAC-SHA256(key, kind NUL value) as 16 hex digits; kind ("patient", "image") keeps a patient
  and an image with the same text apart. "" (unknown) stays "": each such image is its own group."""
  if not value:
    return ""
  digest = hmac.new(key, f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()
  return digest[:_DIGITS]


def apply(listing, key: bytes, names: bool = False) -> dict[str, str]:
  """Replaces the listing's patient ids (and image names when `names`) by pseudonyms, in place,
  and scrubs identifiers from its warnings. Returns {pseudonym: original image relpath} for the
  names mapping ({} without `names`)."""
  ids = {it.patient_id for it in listing.items}
  mapped = {i: pseudonym(key, "patient", i) for i in ids}
  _check_injective(mapped, "patient ids")
  mapping: dict[str, str] = {}
  items = []
  for it in listing.items:
    fields = {"patient_id": mapped[it.patient_id]}
    if names:
      fields["image_name"] = pseudonym(key, "image", it.relpath)
      mapping[fields["image_name"]] = it.relpath
    items.append(dataclasses.replace(it, **fields))
  if names:
    _check_injective({v: k for k, v in mapping.items()}, "image names")
  listing.items = items
  # The leak and unused-row notes quote a patient id or image names as an example: drop those.
  listing.warnings = [_FIRST.sub("", w) for w in listing.warnings]
  return mapping


def scrub_paths(inputs: dict, key: bytes) -> None:
  """Names mode: the rejected and duplicate inputs the manifest lists by path get pseudonyms."""
  for entry in inputs.get("rejected", []) + inputs.get("duplicates", []):
    for field in ("path", "duplicate_of"):
      if entry.get(field):
        entry[field] = pseudonym(key, "image", entry[field])


def _check_injective(mapped: dict[str, str], what: str) -> None:
  if len(set(mapped.values())) != len(mapped):
    raise ValueError(f"two {what} got the same pseudonym (a 64-bit collision): use another key")


def mapping_path(salt_file: str) -> str:
  """Where the names mapping goes: beside the key, never inside the records."""
  return salt_file + ".names.csv"


def write_mapping(salt_file: str, mapping: dict[str, str]) -> str:
  """Writes pseudonym -> original relative path (CSV, atomically, mode 0600) beside the key."""
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(["image_name", "original_path"])
  for name, relpath in sorted(mapping.items(), key=lambda kv: kv[1]):
    writer.writerow([name, relpath])
  path = mapping_path(salt_file)
  fileio.write_text_atomic(path, buf.getvalue())
  os.chmod(path, 0o600)
  return path


def manifest_entry(names: bool) -> dict:
  """What the manifest says about it: which fields are pseudonymised, and how."""
  return {"patient_id": METHOD, "image_name": METHOD if names else None,
          "note": "the key is not in these records; ids are stable for one key"}


def describe(entry: dict | None) -> str:
  fields = [f for f in ("patient_id", "image_name") if entry and entry.get(f)]
  return f"pseudonymised: {', '.join(fields)} ({METHOD})" if fields else ""

