"""skinrecords.core: file access, record schema, manifest.json, run directory, TF logs, bounded waits.

The map of the layout is the docstring of skinrecords/__init__.py."""
