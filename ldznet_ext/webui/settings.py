"""Settings > LD-ZNet: head file, the SD 1.x model for masks when the loaded model is not SD 1.x,
feature timestep, default threshold, head placement and dtype, masks saved beside generated images."""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import LdznetError
from ..limits import RESOLUTION, THRESHOLD, TIMESTEP, Limit
from ..precision import DTYPES
from ..zeroshot import ZERO_SHOT_RESOLUTION, ZeroShotSettings
from . import mask_model
from .engine import NO_HEAD

SECTION = ("ldznet", "LD-ZNet")
DTYPE_CHOICES = ("auto", *DTYPES)
DEFAULTS = {"ldznet_head": NO_HEAD, mask_model.SETTING: mask_model.AUTOMATIC, "ldznet_timestep": -1,
            "ldznet_resolution": 0, "ldznet_threshold": 0.5, "ldznet_keep_on_gpu": True, "ldznet_cuda_graphs": True,
            "ldznet_dtype": "auto", "ldznet_save_masks": False}
"""Every LD-ZNet setting and its default; :func:`checked` knows what each may hold."""
_TIMESTEP_SETTING = Limit(int, -1, TIMESTEP.high)  # -1: the head's own
_MAX_NAME = 255  # a file name's length on common file systems


def checked(key: str, value) -> object:
    """``value`` as setting ``key`` may hold it (an empty head is "None"); LdznetError in one line
    saying what it must be. The settings page offers only valid values, but /sdapi/v1/options and an
    edited config.json take anything: a bad value refused here stops a mask with its reason instead of
    a traceback, and is never read as another value."""
    if key not in DEFAULTS:
        raise LdznetError(f"Settings > LD-ZNet has no setting {key!r}; the settings are {', '.join(DEFAULTS)}")
    try:
        return _checked(key, value)
    except LdznetError as error:
        raise LdznetError(f"Settings > LD-ZNet: {error}") from None


def _checked(key: str, value) -> object:
    if isinstance(DEFAULTS[key], bool):
        if not isinstance(value, bool):
            raise LdznetError(f"{key} must be true or false, got {value!r}")
        return value
    if key == "ldznet_timestep":
        return _TIMESTEP_SETTING.bounded(value, key)
    if key == "ldznet_resolution":
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
            return 0
        try:
            return RESOLUTION.bounded(value, key)
        except LdznetError:
            raise LdznetError(f"{key} must be 0 (the head's own) or {RESOLUTION.describe()}, got {value!r}") from None
    if key == "ldznet_threshold":
        return THRESHOLD.bounded(value, key)
    if key == "ldznet_dtype":
        if value not in DTYPE_CHOICES:
            raise LdznetError(f"{key} must be one of {', '.join(DTYPE_CHOICES)}, got {value!r}")
        return value
    if value is None or value == "":
        return DEFAULTS[key]
    if not isinstance(value, str):
        raise LdznetError(f"{key} must be a file name, got {value!r}")
    if key == "ldznet_head" and (len(value) > _MAX_NAME or "\0" in value or value in (".", "..")
                                 or any(sep in value for sep in "/\\")):
        raise LdznetError(f"{key} must be the name of a file in models/ldznet, got {value[:_MAX_NAME]!r}")
    return value


def check_options(values: Mapping) -> None:
    """LdznetError for the first LD-ZNet setting (a key starting "ldznet_") in ``values`` that
    :func:`checked` refuses (POST /sdapi/v1/options, before the host stores any of them). A value equal
    to the stored one passes, as the host does not set it: a client that posts back what it read (an
    options dict from GET) is not refused for what config.json already held."""
    from . import host

    unset = object()
    for key, value in values.items():
        if isinstance(key, str) and key.startswith("ldznet_") and value != host.opt(key, unset):
            checked(key, value)


def head_choices() -> list[str]:
    from . import host

    return [NO_HEAD, *host.engine().list_heads()]


def mask_model_choices() -> list[str]:
    """"automatic", then the host's checkpoints whose header says SD 1.x."""
    from modules import sd_models

    return [mask_model.AUTOMATIC, *mask_model.sd1_checkpoints(sd_models.checkpoints_list)]


def refresh_mask_models() -> None:
    """The refresh button: rescan the host's checkpoint folder (as its own refresh does)."""
    from modules import sd_models

    sd_models.list_models()


def add_settings() -> None:
    """Add the LD-ZNet section to the host's options, when the extension loads (changing the head or
    dtype drops the cached head)."""
    import gradio as gr
    from modules import shared

    from . import host

    def option(key: str, label: str, *args, reload_ui: bool = False, **kwargs) -> None:
        info = shared.OptionInfo(DEFAULTS[key], label, *args, **kwargs)
        if reload_ui:  # read when the controls are built: the host says so beside the setting
            info = info.needs_reload_ui()
        info.section = SECTION
        shared.opts.add_option(key, info)

    option("ldznet_head", "Segmentation head (files in models/ldznet)", gr.Dropdown,
           lambda: {"choices": head_choices()}, refresh=host.release, onchange=host.release)
    option(mask_model.SETTING, f"{mask_model.SETTING_LABEL} (automatic: the one the head was trained on, else the "
           "first SD 1.x file; loaded on first use, only what the head reads)", gr.Dropdown,
           lambda: {"choices": mask_model_choices()}, refresh=refresh_mask_models, onchange=host.unload_mask_model)
    option("ldznet_timestep", f"Feature timestep (-1: the head's own; zero-shot: {ZeroShotSettings().timestep})",
           gr.Slider, {"minimum": -1, "maximum": 999, "step": 1}, onchange=host.release)
    option("ldznet_resolution", f"Working resolution in pixels (0: the head's own; zero-shot: the model file's, "
           f"else {ZERO_SHOT_RESOLUTION}); higher is sharper and slower", gr.Slider,
           {"minimum": 0, "maximum": 1024, "step": 64})
    option("ldznet_threshold", "Default mask threshold (of the accordion and the tab)", gr.Slider,
           {"minimum": 0.0, "maximum": 0.99, "step": 0.01}, reload_ui=True)
    option("ldznet_keep_on_gpu", "Keep the head (and the SD 1.x mask model) on the GPU between masks (off: move "
           "them to the CPU after each mask; --medvram/--lowvram: the mask model always goes back)",
           onchange=host.release)
    option("ldznet_cuda_graphs", "Replay the mask's model calls as CUDA graphs (faster on NVIDIA GPUs; captured per "
           "image size and term count on first use, each holding GPU memory; not used under --medvram/--lowvram or "
           "with other extensions' hooks on the UNet)", onchange=host.release)
    option("ldznet_dtype", "Head precision (auto: the UNet's)", gr.Radio, {"choices": list(DTYPE_CHOICES)},
           onchange=host.release)
    option("ldznet_save_masks", "Save the LD-ZNet mask beside every generated image (<name>-ldznet-mask.png, when "
           "the accordion has an expression)")
