"""skinrecords.data: the converter's write side: inputs, labels, splits, OpenCV preprocessing, shards.

The map of the layout is the docstring of skinrecords/__init__.py."""
