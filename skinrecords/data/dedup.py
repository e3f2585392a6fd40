"""Content hashes of the listed files: byte-identical copies, and every item's sha256.

`sources.list_sources` drops the copies; the converter fingerprints its inputs with
`content_hashes`. Works on `sources.SourceItem`s and `sources.Listing` by their fields.
"""

from __future__ import annotations

import collections
import os

from skinrecords.core import fileio


def duplicates(items: list, hashes: dict[str, str]) -> dict[str, str]:
  """Byte-identical copies: {relpath of a dropped copy: relpath of the kept one}.

  The first (by relpath) of each set of identical files is kept; `items` are in relpath order.

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
  return dropped


def label_conflicts(items: list, dropped: dict[str, str]) -> dict[str, list]:
  """Sets of byte-identical copies filed under more than one label: {kept relpath: [items]}.

  Identical bytes under two classes mean one of the labels is wrong and nothing says which, the
  same situation as a CSV that lists one image twice with different labels: both are refused
  (`sources` rejects every copy with a "label conflict" reason), never silently resolved by
  keeping whichever copy sorts first.
  """
  by_relpath = {item.relpath: item for item in items}
  sets: dict[str, list] = {}
  for copy, first in dropped.items():
    sets.setdefault(first, [by_relpath[first]]).append(by_relpath[copy])
  return {first: members for first, members in sets.items()
          if len({m.label for m in members}) > 1}


def content_hashes(listing) -> dict[str, str]:
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
