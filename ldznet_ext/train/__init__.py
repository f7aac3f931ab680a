"""Training segmentation heads: settings and config files (``config``), data sources (``data``), the
training loop (``trainer``), data-parallel helpers (``distributed``), run logs (``logs``), ``ldznet train``."""
