"""``python -m ldznet_ext.cli ...``: the ``ldznet`` command (torchrun starts training this way)."""

import sys

from . import main

sys.exit(main())
