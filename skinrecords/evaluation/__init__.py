"""skinrecords.evaluation: metrics with intervals, calibration, figures, submissions, ensembles, reports.

The map of the layout is the docstring of skinrecords/__init__.py."""
