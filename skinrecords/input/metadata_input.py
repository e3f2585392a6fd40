"""Patient metadata on the read side: parse a `core.metadata.MetadataSpec`'s columns from records
and encode them in TensorFlow exactly as `core.metadata.encode_rows` does (the NumPy reference).

A model trained with metadata takes {"image": uint8 [B, S, S, 3], "metadata": float32 [B, width]};
the pipeline yields that dict in place of the image tensor when it is given a spec, and the image
tensor alone otherwise. Everything downstream that touches pixels (augmentation, test-time
augmentation, padding of a last batch) goes through `image_of` / `with_image`, so the metadata
vector passes untouched.

Missing values are parsed into a sentinel the encoder recognises: NaN for our float columns (the
writer leaves the feature out), "" for our bytes columns, the column's `missing_code` (Kaggle: -1)
for int64 columns, absent or stored. Strings are judged missing by the same words as
`core.metadata.is_missing` ("", "nan", "unknown", ...), so both encoders agree on every input.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import tensorflow as tf

from skinrecords.core import manifest
from skinrecords.core import metadata as md

INPUT = md.INPUT
IMAGE = "image"  # the image input's name (models.build_model)
# int64 columns without a missing code still need a default for an absent feature.
_ABSENT_INT64 = -(2 ** 63)
_MISSING_WORDS = ("", "nan", "na", "n/a", "none", "null", "unknown")  # core.metadata.is_missing


def image_of(x):
  """The image tensor of a model input (a dict with metadata, or the image itself)."""
  return x[IMAGE] if isinstance(x, Mapping) else x


def with_image(x, image):
  """`x` with its image replaced (the metadata, if any, kept as it is)."""
  return {**x, IMAGE: image} if isinstance(x, Mapping) else image


def as_input(image, meta):
  """The model input for `image` and encoded `meta` (None: an image-only model)."""
  return image if meta is None else {IMAGE: image, INPUT: meta}


def records_spec(info: manifest.DatasetInfo) -> md.MetadataSpec:
  """The metadata columns a records folder holds (manifest "metadata", or what the folder's
  DatasetInfo derived for published Kaggle files); empty when it holds none."""
  spec = getattr(info, "metadata", None)  # DatasetInfo.metadata (issue 24, the write side)
  if isinstance(spec, md.MetadataSpec):
    return spec
  return md.MetadataSpec.from_dict((info.manifest or {}).get("metadata"))


def _have(spec: md.MetadataSpec) -> str:
  return ", ".join(spec.names) or "none (convert with make_records --metadata_columns=...)"


def select(info: manifest.DatasetInfo, names: str, fold: int | None = None) -> md.MetadataSpec:
  """The spec `--metadata=names` asks for ("" -> none, "all", or "COL,COL"), with the statistics of
  `fold`'s training part (None: the training split's); ValueError in one line listing what the
  records have."""
  names = (names or "").strip()
  if not names:
    return md.MetadataSpec()
  have = records_spec(info)
  if not have:
    raise ValueError(f"metadata={names}: {info.records_dir} holds no metadata columns; convert "
                     "with make_records --metadata_columns=..., or train without --metadata")
  wanted = [n.strip() for n in names.split(",") if n.strip()]
  unknown = [n for n in wanted if n != "all" and n not in have.names]
  if unknown or ("all" in wanted and len(wanted) > 1):
    what = (f"no column {', '.join(map(repr, unknown))}" if unknown else
            "'all' cannot be combined with column names")
    raise ValueError(f"metadata={names}: {what}; {info.records_dir} has {_have(have)} "
                     "(or pass --metadata=all)")
  chosen = have.select(wanted).for_fold(fold)
  # A run keeps only the statistics it encodes with (for_fold(None) leaves every fold's).
  return md.MetadataSpec(tuple(dataclasses.replace(c, fold_stats={}) for c in chosen.columns))


def check_records(info: manifest.DatasetInfo, spec: md.MetadataSpec, model_dir) -> None:
  """ValueError unless the records store every column a model was trained with: absent keys would
  parse as missing everywhere, and the model would score images without their metadata, silently."""
  if not spec:
    return
  have = records_spec(info)
  missing = [c.name for c in spec.columns if c.name not in have.names]
  if missing:
    raise ValueError(f"{model_dir} was trained with metadata columns {', '.join(spec.names)}, "
                     f"but {info.records_dir} has " + (
                         f"{', '.join(have.names)} (missing: {', '.join(missing)})" if have else
                         "none") + f"; convert them with --metadata_columns={','.join(spec.names)}")
  stored = {c.name: (c.key, c.dtype) for c in have.columns}
  differ = [c.name for c in spec.columns if stored[c.name] != (c.key, c.dtype)]
  if differ:
    raise ValueError(f"{info.records_dir} stores metadata columns {', '.join(differ)} otherwise "
                     f"than the records {model_dir} was trained on (key/dtype "
                     f"{[stored[n] for n in differ]}); convert them the same way")


def _default(column: md.Column):
  if column.dtype == "float":
    return float("nan")
  if column.dtype == "int64":
    return _ABSENT_INT64 if column.missing_code is None else int(column.missing_code)
  return ""


def parse_spec(spec: md.MetadataSpec) -> dict:
  """`tf.io.parse_*example` features of the spec's columns, each defaulting to its missing mark."""
  dtypes = {"float": tf.float32, "int64": tf.int64, "bytes": tf.string}
  return {c.key: tf.io.FixedLenFeature([], dtypes[c.dtype], default_value=_default(c))
          for c in spec.columns}


def _missing_text(text: tf.Tensor) -> tf.Tensor:
  lowered = tf.strings.lower(text)
  return tf.reduce_any(tf.equal(lowered[..., None], tf.constant(_MISSING_WORDS)), axis=-1)


def _numeric(column: md.Column, value: tf.Tensor) -> tf.Tensor:
  if value.dtype == tf.string:  # a CSV's text (predict): missing words, else a number
    text = tf.strings.strip(value)
    missing = _missing_text(text)
    x = tf.strings.to_number(tf.where(missing, "0", text), tf.float64)
  else:
    x = tf.cast(value, tf.float64)
    missing = tf.math.is_nan(x)
    if value.dtype == tf.int64:
      missing = tf.equal(value, _default(column)) | tf.equal(value, _ABSENT_INT64)
  # float64 as encode_rows computes (Python floats), then float32: the two agree bit for bit.
  z = (x - column.stats.mean) / column.stats.std
  z = tf.where(missing, tf.zeros_like(z), z)
  return tf.cast(tf.stack([z, tf.cast(missing, tf.float64)], axis=-1), tf.float32)


def _categorical(column: md.Column, value: tf.Tensor) -> tf.Tensor:
  if value.dtype == tf.int64:
    # Kaggle's codes: the decimal string of the code is the category (core.metadata.Column).
    missing = tf.equal(value, _default(column)) | tf.equal(value, _ABSENT_INT64)
    text = tf.strings.as_string(value)
  elif value.dtype == tf.string:
    text = tf.strings.strip(value)
    missing = _missing_text(text)
  else:
    raise ValueError(f"metadata column {column.name!r} is categorical: stored as bytes or int64 "
                     f"codes, not {value.dtype.name}")
  # A missing value is "" or a missing word after stripping, never in the vocabulary (whose
  # values compute_stats stripped); [""] stands in for an empty vocabulary and never matches.
  vocab = tf.constant(list(column.stats.vocabulary) or [""], tf.string)
  hits = tf.equal(text[..., None], vocab) & ~missing[..., None]
  hot = tf.cast(hits[..., :len(column.stats.vocabulary)], tf.float32)
  unknown = 1.0 - tf.reduce_max(tf.cast(hits, tf.float32), axis=-1, keepdims=True)
  return tf.concat([hot, unknown], axis=-1)


def encode(spec: md.MetadataSpec, values: Mapping[str, tf.Tensor]) -> tf.Tensor:
  """float32 [..., spec.width]: `values` maps each column's record key (as `parse_spec` parses it,
  scalar or batched) to its value; a column's missing mark, or a key left out, is missing."""
  parts = []
  for c in spec.columns:
    value = values.get(c.key)
    if value is None:
      value = tf.constant(_default(c))
    value = tf.convert_to_tensor(value)
    parts.append(_numeric(c, value) if c.kind == md.NUMERIC else _categorical(c, value))
  return tf.concat(parts, axis=-1)


def pad_value(spec: md.MetadataSpec) -> tf.Tensor:
  """A [width] vector of zeros, for padding examples (label -1) that are dropped after scoring."""
  return tf.zeros([spec.width], tf.float32)
