"""Training segmentation heads: data sources (``data``), the training loop (``trainer``), ``ldznet train``."""
