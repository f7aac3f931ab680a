"""modules.paths: models_path and data_path (tests point them at a temporary folder)."""
import tempfile

data_path = tempfile.mkdtemp(prefix="fake-webui-")
models_path = data_path + "/models"
