"""skinrecords.training: strategies and clusters, distributed input, epoch selection, the loop, CV.

The map of the layout is the docstring of skinrecords/__init__.py."""
