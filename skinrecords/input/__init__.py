"""skinrecords.input: the tf.data reader (ours and SIIM-ISIC files), the tf.data service, augmentation.

The map of the layout is the docstring of skinrecords/__init__.py."""
