"""Package layering: data sources serve training and evaluation alike, so reading data never
pulls in the trainer; the library front ends share (the batch engine, the WebUI tab) read no
command-line arguments."""

from __future__ import annotations

import subprocess
import sys

IMPORTS = """
import importlib, pkgutil, sys
import ldznet_ext.data, ldznet_ext.eval
for package in (ldznet_ext.data, ldznet_ext.eval):
    for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        importlib.import_module(module.name)
import ldznet_ext.cli.data
print(sorted(name for name in sys.modules if name.startswith("ldznet_ext.train")))
"""


def test_data_eval_and_data_summary_import_no_training_module():
    # A fresh interpreter: this test session has imported the trainer already.
    result = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, check=True)
    assert result.stdout == "[]\n"


FRONT_ENDS = """
import sys
import ldznet_ext.batch, ldznet_ext.webui.tab
print(sorted(name for name in sys.modules
             if name.startswith("ldznet_ext") and name.split(".")[1:2] == ["cli"]))
"""


def test_the_batch_engine_and_the_tab_import_no_command_line_module():
    result = subprocess.run([sys.executable, "-c", FRONT_ENDS], capture_output=True, text=True, check=True)
    assert result.stdout == "[]\n"
