"""predict --metadata_csv's reader: names matched as predict names images, missing cells and
unseen categories counted, a column the model needs refused by name."""

from __future__ import annotations

import numpy as np
import pytest

from skinrecords.core import metadata as md
from skinrecords.evaluation import metadata_csv

SPEC = md.MetadataSpec((
    md.Column("age_approx", md.NUMERIC, md.Stats(mean=50.0, std=10.0)),
    md.Column("sex", md.CATEGORICAL, md.Stats(vocabulary=("female", "male"))),
))


def _write(tmp_path, text):
  path = tmp_path / "meta.csv"
  path.write_text(text)
  return str(path)


def test_rows_match_stem_or_file_name_and_encode_as_the_reference(tmp_path):
  path = _write(tmp_path, "image_name,age_approx,sex,extra\nISIC_1,60,male,x\nISIC_2,,female,y\n"
                "ISIC_3.png,40,palms,z\n")
  table = metadata_csv.read(path)
  table.check_columns(SPEC, "the model")
  paths = ["/a/ISIC_1.jpg", "b/ISIC_2.png", "ISIC_3.png", "/c/ISIC_4.jpg"]
  rows = metadata_csv.rows_for(table, paths)
  got = metadata_csv.encode(SPEC, rows)
  want = np.array(md.encode_rows(SPEC, [
      {"age_approx": 60, "sex": "male"}, {"sex": "female"}, {"age_approx": 40, "sex": "palms"},
      {}]), np.float32)
  np.testing.assert_array_equal(got, want)
  assert got[0].tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
  assert got[3].tolist() == [0.0, 1.0, 0.0, 0.0, 1.0]  # no row: every value missing
  cov = metadata_csv.coverage([SPEC], table, paths)
  assert (cov.images, cov.with_missing, cov.without_row) == (4, 2, 1)
  assert cov.missing == {"age_approx": 2, "sex": 1}
  assert cov.unseen == {"sex": {"palms": 1}}
  lines = cov.summary()
  assert len(lines) == 2 and "2 of 4 images had missing values" in lines[0]
  assert "'palms' (1)" in lines[1]


def test_a_typo_column_is_named_with_its_close_match(tmp_path):
  table = metadata_csv.read(_write(tmp_path, "image,age_aprox,sex\nx,1,male\n"))
  with pytest.raises(ValueError, match=r"no column age_approx \(did you mean age_aprox\?\)"):
    table.check_columns(SPEC, "the model")


@pytest.mark.parametrize("text, match", [
    ("name,age_approx\nx,1\n", "no image name column"),
    ("image_name,age_approx,sex\nx,1,male\nx,2,male\n", "appears twice"),
    ("image_name,age_approx,sex\n", "no rows"),
])
def test_unusable_csvs_are_refused_in_one_line(tmp_path, text, match):
  with pytest.raises(ValueError, match=match):
    metadata_csv.read(_write(tmp_path, text))


def test_a_word_in_a_numeric_column_is_refused(tmp_path):
  table = metadata_csv.read(_write(tmp_path, "image_name,age_approx,sex\nx,45y,male\ny,NA,\n"))
  with pytest.raises(ValueError, match=r"image_name=x: age_approx='45y' is not a number"):
    table.check_numbers(SPEC)
