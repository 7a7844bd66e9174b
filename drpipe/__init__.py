"""drpipe: retinal fundus photographs to reproducible sharded TensorFlow datasets."""

__version__ = "0.1.0"
