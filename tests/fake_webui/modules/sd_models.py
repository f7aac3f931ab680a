"""modules.sd_models: ``model_data.sd_model`` is the loaded model or None (never loads); the checkpoint
list as A1111 v1.10.1 keeps it: ``list_models()`` scans models/Stable-diffusion for .ckpt and .safetensors
files (not .vae.*) into ``checkpoints_list`` {title: CheckpointInfo}. Titles carry no hash here (A1111
adds " [shorthash]" only once the file's sha256 is cached)."""
import os
import re

from modules import paths

model_dir = "Stable-diffusion"
checkpoints_list = {}
checkpoint_aliases = {}


class SdModelData:
    def __init__(self):
        self.sd_model = None


model_data = SdModelData()


def _model_path():
    # A1111 fixes this at import; the fake reads it per call because tests move models_path.
    return os.path.abspath(os.path.join(paths.models_path, model_dir))


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        abspath = os.path.abspath(filename)
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        name = abspath.replace(_model_path(), "") if abspath.startswith(_model_path()) else os.path.basename(filename)
        if name.startswith("\\") or name.startswith("/"):
            name = name[1:]
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.metadata = {}
        self.shorthash = None
        self.title = name
        self.short_title = self.name_for_extra
        self.ids = [self.model_name, self.title, name, self.name_for_extra]

    def register(self):
        checkpoints_list[self.title] = self
        for id in self.ids:
            checkpoint_aliases[id] = self


def _natural_sort_key(s):
    return [int(text) if text.isdigit() else text.lower() for text in re.split(r"(\d+)", s)]


def list_models():
    """modelloader.load_models over shared.walk_files: folders, then files, in natural order."""
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    for root, _, files in sorted(os.walk(_model_path(), followlinks=True), key=lambda x: _natural_sort_key(x[0])):
        for file in sorted(files, key=_natural_sort_key):
            if os.path.splitext(file)[1].lower() not in (".ckpt", ".safetensors") or "/." in root:
                continue
            if file.endswith((".vae.ckpt", ".vae.safetensors")):
                continue
            CheckpointInfo(os.path.join(root, file)).register()
