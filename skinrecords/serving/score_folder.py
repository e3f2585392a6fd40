"""Scores a folder of image files with an exported SavedModel and prints bin/predict's CSV.

`skinrecords-export` writes this file next to the SavedModel (OUTPUT_DIR/score_folder.py). It needs
TensorFlow and the Python standard library only, never skinrecords, so a deployment can be checked
where our package is not installed:

    python OUTPUT_DIR/score_folder.py IMAGE_FOLDER [--version=N] [--output_csv=FILE]

The images go in as raw files (the `serving_default` signature takes the encoded bytes and does
the converter's geometry in the graph). Files are listed as bin/predict --input_dir lists them
(recursively, sorted, hidden entries skipped), and the CSV has predict's columns and number format:
`image,probability,predicted` (two classes: P(class 1); more: P(predicted) then p_<class>).
A file the graph cannot decode is reported on stderr and skipped, as predict rejects it.

A model trained with patient metadata needs --metadata_csv=FILE, as bin/predict does: a name
column (image_name, image, image_id or isic_id: the file name with or without extension) and the
columns preprocessing.json["metadata"]["inputs"] lists. Each is sent raw (numbers as float32, NaN
for an empty cell; categories as strings, "" for an empty cell) and encoded by the graph with the
training statistics; an image without a row is sent with every value missing. How many images had
missing values is said on stderr.
"""

import argparse
import contextlib
import csv
import json
import os
import sys
import tempfile

NAME_COLUMNS = ("image_name", "image", "image_id", "isic_id")  # evaluation/metadata_csv.py
MISSING = ("", "nan", "na", "n/a", "none", "null", "unknown")  # core.metadata.is_missing
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")  # sources.IMAGE_EXTENSIONS
BATCH = 16


@contextlib.contextmanager
def _stderr_held_back():
  """File descriptor 2 goes to a temporary file, replayed only if the block raises."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    except BaseException:
      os.dup2(saved, 2)
      held.seek(0)
      sys.stderr.write(held.read().decode(errors="replace"))
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def _ignored(name):
  return name.startswith(".") or name == "__MACOSX"


def list_images(folder):
  """Sorted paths of the image files under `folder` (sources.list_image_files' rules)."""
  found = []

  def walk(directory):
    with os.scandir(directory) as it:
      entries = sorted((e for e in it if not _ignored(e.name)), key=lambda e: e.name)
    for entry in entries:
      if entry.is_dir(follow_symlinks=False):
        walk(entry.path)
      elif os.path.splitext(entry.name)[1].lower() in EXTENSIONS and os.path.isfile(entry.path):
        found.append(entry.path)

  walk(folder)
  return sorted(found)


def _latest_version(export_dir):
  versions = [int(v) for v in os.listdir(export_dir) if v.isdigit() and
              os.path.isfile(os.path.join(export_dir, v, "saved_model.pb"))]
  return max(versions) if versions else None


def read_metadata(path, inputs):
  """{image name: {input name: raw value}} from the CSV; ValueError in one line when unusable."""
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f)
    header = [(c or "").strip() for c in reader.fieldnames or ()]
    name_column = next((c for c in NAME_COLUMNS if c in header), None)
    if name_column is None:
      raise ValueError(f"{path}: no image name column; expected one of {', '.join(NAME_COLUMNS)}")
    absent = [i["column"] for i in inputs if i["column"] not in header]
    if absent:
      raise ValueError(f"{path} has no column {', '.join(absent)}, which the model was trained "
                       f"with; it has {', '.join(header)} (empty cells count as missing)")
    table = {}
    for raw in reader:
      row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
      if row.get(name_column):
        table[row[name_column]] = {i["input"]: _raw(i, row[i["column"]], path) for i in inputs}
  return table


def _raw(spec, text, path):
  if spec["kind"] != "numeric":
    return "" if text.lower() in MISSING else text
  if text.lower() in MISSING:
    return float("nan")
  try:
    return float(text)
  except ValueError:
    raise ValueError(f"{path}: {spec['column']}={text!r} is not a number; leave the cell empty "
                     "for missing") from None


def _metadata_for(chunk, inputs, table):
  """{input: [value per image]}: each image's CSV row (by name without extension, or with)."""
  rows = []
  for p in chunk:
    base = os.path.basename(p)
    rows.append(table.get(os.path.splitext(base)[0], table.get(base)) or {})
  return {i["input"]: [r.get(i["input"], float("nan") if i["kind"] == "numeric" else "")
                       for r in rows] for i in inputs}


def _is_missing(value):
  return value != value or value == ""  # NaN, or an empty category


def _call(serve, tf, data, meta):
  feeds = {k: tf.constant(v, tf.float32 if v and isinstance(v[0], float) else tf.string)
           for k, v in meta.items()}
  return serve(image_bytes=tf.constant(data), **feeds)


def _score(serve, paths, tf, inputs=(), table=None):
  """Yields (path, probabilities row or None, predicted label, reason)."""
  for start in range(0, len(paths), BATCH):
    chunk = paths[start:start + BATCH]
    data = []
    for p in chunk:
      with open(p, "rb") as f:
        data.append(f.read())
    meta = _metadata_for(chunk, inputs, table or {})
    try:
      out = _call(serve, tf, data, meta)
      labels = [x.decode("utf-8") for x in out["predicted_label"].numpy()]
      yield from zip(chunk, out["probabilities"].numpy(), labels, [None] * len(chunk))
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
      for k, (p, one) in enumerate(zip(chunk, data)):  # one bad file must not lose the others
        try:
          out = _call(serve, tf, [one], {i: v[k:k + 1] for i, v in meta.items()})
          yield (p, out["probabilities"].numpy()[0],
                 out["predicted_label"].numpy()[0].decode("utf-8"), None)
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as err:
          yield p, None, None, _reason(err.message)


def _reason(message):
  """TensorFlow's own sentence from a graph error (its first line is "Graph execution error:")."""
  skip = ("Graph execution error", "Detected at node", "File ", "[[", "{{", "Stack trace",
          "<stack traces unavailable>")
  lines = [l.strip() for l in str(message).splitlines() if l.strip()]
  useful = [l for l in lines if not l.startswith(skip) and not l.startswith("  ")]
  return (useful[-1] if useful else lines[-1] if lines else "undecodable")[:200]


def _rows(results, classes):
  """predict.write_csv's rows; the predicted class is the graph's (its threshold built in)."""
  binary = len(classes) == 2
  yield ["image", "probability", "predicted"] + ([] if binary else [f"p_{c}" for c in classes])
  for path, p, label, _ in results:
    if p is None:
      continue
    if binary:
      yield [path, f"{float(p):.8g}", label]
    else:
      q = [float(x) for x in p]
      yield [path, f"{max(q):.8g}", label] + [f"{x:.8g}" for x in q]


def _metadata_table(path, inputs):
  """The CSV's rows for a model with metadata inputs (None without); ValueError when it needs
  one and has none."""
  if inputs and not path:
    raise ValueError(f"the model takes patient metadata "
                     f"({', '.join(i['column'] for i in inputs)}): pass --metadata_csv=FILE")
  if path and not inputs:
    print(f"score_folder: WARNING: --metadata_csv={path} ignored: the model was trained without "
          "metadata", file=sys.stderr)
  return read_metadata(path, inputs) if inputs else None


def main(argv=None):
  here = os.path.dirname(os.path.abspath(__file__))
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("image_folder", help="folder of image files (searched recursively)")
  parser.add_argument("--export_dir", default=here, help="the export folder (default: this "
                      "script's folder)")
  parser.add_argument("--version", type=int, default=None, help="SavedModel version folder "
                      "(default: the highest)")
  parser.add_argument("--output_csv", default=None, help="write the CSV here (default: stdout)")
  parser.add_argument("--metadata_csv", default=None, help="a model trained with patient "
                      "metadata: the images' metadata (an image_name column and the model's "
                      "columns; empty cells are missing)")
  args = parser.parse_args(argv)
  if not os.path.isdir(args.image_folder):
    print(f"score_folder: {args.image_folder}: not a folder; pass a folder of images",
          file=sys.stderr)
    return 2
  version = args.version or _latest_version(args.export_dir)
  model = os.path.join(args.export_dir, str(version))
  if version is None or not os.path.isfile(os.path.join(model, "saved_model.pb")):
    print(f"score_folder: no SavedModel {model if version else args.export_dir + '/N'}/"
          "saved_model.pb; pass --export_dir=the folder skinrecords-export wrote",
          file=sys.stderr)
    return 2
  with open(os.path.join(args.export_dir, "preprocessing.json"), encoding="utf-8") as f:
    settings = json.load(f)
  inputs = (settings.get("metadata") or {}).get("inputs") or []
  try:
    table = _metadata_table(args.metadata_csv, inputs)
  except (OSError, ValueError) as err:
    print(f"score_folder: {err}", file=sys.stderr)
    return 2
  paths = list_images(args.image_folder)
  if not paths:
    print(f"score_folder: found no images in {args.image_folder} (extensions: "
          f"{', '.join(EXTENSIONS)})", file=sys.stderr)
    return 2
  with _stderr_held_back():  # TensorFlow's C++ start-up lines (CUDA probes) are not ours to print
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (after the argument checks)
    serve = tf.saved_model.load(model).signatures["serving_default"]
    results = list(_score(serve, paths, tf, inputs, table))
  out = open(args.output_csv, "w", newline="", encoding="utf-8") if args.output_csv else sys.stdout
  try:
    csv.writer(out).writerows(_rows(results, settings["classes"]))
  finally:
    if out is not sys.stdout:
      out.close()
  for path, _, _, reason in results:
    if reason:
      print(f"score_folder: rejected {path}: {reason}", file=sys.stderr)
  if inputs:
    meta = _metadata_for(paths, inputs, table)
    gaps = sum(any(_is_missing(v[k]) for v in meta.values()) for k in range(len(paths)))
    print(f"score_folder: metadata: {gaps} of {len(paths)} images had missing values (sent as "
          "missing)", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
