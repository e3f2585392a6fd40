"""The command-line layer: absl flags become frozen configs here, and nowhere below.

Each module is one command, runnable as `python -m skinrecords.cli.<name>`, installed as
`skinrecords-<name>` and shimmed as `bin/<name>` in a checkout. The library (every other module of
`skinrecords`) never imports `absl.flags`; `tests/test_layout.py` checks that.
"""
