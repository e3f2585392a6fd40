"""skinrecords.serving: SavedModel and TFLite export, the converter's geometry as a graph.

The map of the layout is the docstring of skinrecords/__init__.py."""
