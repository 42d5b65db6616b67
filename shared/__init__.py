"""Code shared by training and serving: configs, schemas, the model registry and the
router artifact format."""

__version__ = "0.1.0"
