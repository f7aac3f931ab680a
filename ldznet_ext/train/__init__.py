"""Training segmentation heads: settings and config files (``config``), the data order (``stream``)
and augmentation (``augment``), the training loop (``trainer``), data-parallel helpers
(``distributed``), ``ldznet train``; the EMA (``ema``), LR schedule (``schedule``) and run logs
(``logs``) also serve the micro SD stages (``world.train_sd``). Data sources are ``ldznet_ext.data``."""
