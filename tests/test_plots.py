"""The figures' content, read back from the matplotlib objects they were drawn with: the plotted
curve data, markers, labels and cell texts (a PNG's size says nothing about what it shows)."""

from __future__ import annotations

import math

import os

import numpy as np
import pytest

from skinrecords.evaluation import metrics
from skinrecords.evaluation import plots

BINARY = ["NotMelanoma", "Melanoma"]
# Negatives 0.1 0.2 0.3 0.45, positives 0.4 0.6 0.7 0.8 0.9: one inverted pair of 20, AUC 0.95.
PROBS = np.array([0.1, 0.2, 0.3, 0.45, 0.4, 0.6, 0.7, 0.8, 0.9])
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])


@pytest.fixture
def drawn(monkeypatch):
  """Every figure passed to save_figure, by file name (and still saved)."""
  figures = {}
  save = plots.save_figure

  def keep(fig, path):
    figures[os.path.basename(os.fspath(path))] = fig
    save(fig, path)

  monkeypatch.setattr(plots, "save_figure", keep)
  return figures


def _line(ax, label):
  found = [line for line in ax.get_lines() if line.get_label() == label]
  assert len(found) == 1, [line.get_label() for line in ax.get_lines()]
  return np.asarray(found[0].get_xdata(), float), np.asarray(found[0].get_ydata(), float)


def test_binary_roc_and_pr_plots_draw_the_hand_computed_curves(tmp_path, drawn):
  m = metrics.compute_metrics(PROBS, LABELS, BINARY, 0.5, bootstrap=0)
  m.update(split="test", fold=1)
  plots.plot_curves(tmp_path / "roc.png", tmp_path / "pr.png", PROBS, LABELS, m)
  assert (tmp_path / "roc.png").stat().st_size > 0 and (tmp_path / "pr.png").stat().st_size > 0
  roc = drawn["roc.png"].axes[0]
  fpr, tpr = _line(roc, "AUC = 0.950")
  assert np.trapezoid(tpr, fpr) == pytest.approx(0.95)
  # The corners of the staircase, by hand: 4 of 5 positives above every negative, then the 0.45
  # negative, then the 0.4 positive.
  corners = {(0.0, 0.0), (0.0, 0.8), (0.25, 0.8), (0.25, 1.0), (1.0, 1.0)}
  assert corners <= set(zip(fpr.round(6), tpr.round(6)))
  assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
  point = _line(roc, "threshold 0.5")  # at 0.5: FPR 0, TPR 4/5
  assert (point[0].tolist(), point[1].tolist()) == ([0.0], [0.8])
  assert [a.tolist() for a in _line(roc, "chance")] == [[0, 1], [0, 1]]
  assert roc.get_title() == "ROC (Melanoma positive) - test fold 1 split, n=9"
  assert roc.get_legend() is not None

  pr = drawn["pr.png"].axes[0]
  recall, precision = _line(pr, "AP = 0.967")
  # Average precision = sum over recall steps of the precision there: (4 * 1 + 5/6) / 5.
  steps = -np.diff(recall) if recall[0] > recall[-1] else np.diff(recall)
  at = precision[:-1] if recall[0] > recall[-1] else precision[1:]
  assert float(np.sum(steps * at)) == pytest.approx(29 / 30)
  # By hand, down the scores: 4 hits (recall 0.8, precision 1), the 0.45 negative (0.8, 4/5), the
  # 0.4 positive (1, 5/6), then the three lower negatives down to (1, 5/9).
  points = set(zip(recall.round(6), precision.round(6)))
  assert {(0.8, 1.0), (0.8, 0.8), (1.0, round(5 / 6, 6)), (1.0, round(5 / 9, 6))} <= points
  chance = _line(pr, "chance (prevalence 0.556)")
  assert chance[1].tolist() == [5 / 9, 5 / 9]
  assert pr.get_title() == "Precision-recall (Melanoma positive) - test fold 1 split, n=9"


def test_multiclass_curves_one_per_present_class_and_none_for_one_class(tmp_path, drawn):
  p3 = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.7, 0.1],
                 [0.5, 0.3, 0.2]])
  y3 = np.array([0, 0, 1, 1, 1])
  m = metrics.compute_metrics(p3, y3, ["mel", "nv", "bkl"], None, bootstrap=0)
  plots.plot_curves(tmp_path / "roc.png", tmp_path / "pr.png", p3, y3, m)
  roc = drawn["roc.png"].axes[0]
  assert [line.get_label() for line in roc.get_lines()] == [
      "mel: AUC = 1.000", "nv: AUC = 0.917", "chance"]  # bkl has no image: no curve
  fpr, tpr = _line(roc, "nv: AUC = 0.917")
  assert np.trapezoid(tpr, fpr) == pytest.approx(5.5 / 6)
  assert roc.get_title().startswith("ROC (one-vs-rest)")

  one = np.array([0.2, 0.7, 0.9])
  m = metrics.compute_metrics(one, [1, 1, 1], BINARY, 0.5, bootstrap=0)
  plots.plot_curves(tmp_path / "roc1.png", tmp_path / "pr1.png", one, np.array([1, 1, 1]), m)
  for name in ("roc1.png", "pr1.png"):
    ax = drawn[name].axes[0]
    assert [t.get_text() for t in ax.texts] == ["undefined: only one class present"]
    assert ax.get_legend() is None
  assert [line.get_label() for line in drawn["roc1.png"].axes[0].get_lines()] == ["chance"]


def test_confusion_matrix_cells_colours_and_title(tmp_path, drawn):
  m = metrics.compute_metrics(PROBS, LABELS, BINARY, 0.5, bootstrap=0)
  m.update(split="valid")
  plots.plot_confusion(tmp_path / "cm.png", m)
  ax = drawn["cm.png"].axes[0]
  cells = {(t.get_position(), t.get_text(), t.get_color()) for t in ax.texts}
  # [[4, 0], [1, 4]]: colour by the fraction of the true class; white above one half.
  assert cells == {((0, 0), "4\n(100%)", "white"), ((1, 0), "0\n(0%)", "black"),
                   ((0, 1), "1\n(20%)", "black"), ((1, 1), "4\n(80%)", "white")}
  np.testing.assert_allclose(ax.images[0].get_array(), [[1.0, 0.0], [0.2, 0.8]])
  assert ax.get_title() == ("Confusion matrix - valid split, n=9\n"
                            "accuracy 0.889, P(Melanoma) >= 0.5")
  assert [t.get_text() for t in ax.get_xticklabels()] == BINARY

  collapsed = metrics.compute_metrics(np.full(9, 0.9), LABELS, BINARY, 0.5, bootstrap=0)
  plots.plot_confusion(tmp_path / "cm2.png", collapsed)
  ax = drawn["cm2.png"].axes[0]
  assert ax.get_title().endswith("\nWARNING: collapsed to one class")
  assert ax.title.get_color() == "red"


def test_history_curves_are_the_history_and_skip_an_all_nan_series(tmp_path, drawn):
  history = [dict(epoch=e, loss=1.0 / e, accuracy=0.5 + 0.1 * e, auc=0.6 + 0.1 * e,
                  val_loss=1.5 / e, val_accuracy=0.4 + 0.1 * e, val_auc=math.nan)
             for e in (1, 2, 3)]
  paths = plots.plot_history(history, tmp_path)
  assert paths == [str(tmp_path / f) for f in ("accuracy.png", "loss.png", "auc.png")]
  assert all(os.path.getsize(p) > 0 for p in paths)
  loss = drawn["loss.png"].axes[0]
  assert [a.tolist() for a in _line(loss, "train")] == [[1, 2, 3], [1.0, 0.5, 1 / 3]]
  assert [a.tolist() for a in _line(loss, "validation")] == [[1, 2, 3], [1.5, 0.75, 0.5]]
  assert _line(drawn["accuracy.png"].axes[0], "validation")[1] == pytest.approx([0.5, 0.6, 0.7])
  auc = drawn["auc.png"].axes[0]
  assert [line.get_label() for line in auc.get_lines()] == ["train"]  # validation AUC all NaN
  assert auc.get_title() == "ROC AUC: train vs validation"


def test_a_failed_save_leaves_neither_the_png_nor_its_temporary_file(tmp_path):
  class Broken:
    def savefig(self, buf, format):  # pylint: disable=redefined-builtin
      assert format == "png"
      buf.write(b"half a png")
      raise OSError("disk full")

  with pytest.raises(OSError, match="disk full"):
    plots.save_figure(Broken(), tmp_path / "roc.png")
  assert list(tmp_path.iterdir()) == []
