"""modules.script_callbacks: registration lists, and ImageSaveParams."""
from collections import defaultdict

callbacks = defaultdict(list)


class ImageSaveParams:
    def __init__(self, image, p, filename, pnginfo):
        self.image, self.p, self.filename, self.pnginfo = image, p, filename, pnginfo


def _register(name):
    def on(callback, *, name_=None):
        callbacks[name].append(callback)
    return on


for _name in ("ui_settings", "after_component", "ui_tabs", "app_started", "model_loaded", "script_unloaded",
              "image_saved", "before_ui"):
    globals()[f"on_{_name}"] = _register(_name)


def clear_callbacks():
    callbacks.clear()
