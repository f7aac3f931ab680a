"""modules.paths: models_path and data_path (tests point them at a temporary folder)."""
import atexit
import shutil
import tempfile

data_path = tempfile.mkdtemp(prefix="fake-webui-")
# Each test process imports this once; without the clean-up every run left an empty folder in /tmp.
atexit.register(shutil.rmtree, data_path, ignore_errors=True)
models_path = data_path + "/models"
