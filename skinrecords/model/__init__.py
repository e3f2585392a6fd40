"""skinrecords.model: backbones, the model, the training recipe, the XLA policy, the one forward pass.

The map of the layout is the docstring of skinrecords/__init__.py."""
