"""Settings > LD-ZNet: head file, the SD 1.x model for masks when the loaded model is not SD 1.x,
feature timestep, default threshold, head placement and dtype, masks saved beside generated images."""

from __future__ import annotations

from ..precision import DTYPES
from . import host, mask_model
from .engine import NO_HEAD

SECTION = ("ldznet", "LD-ZNet")


def head_choices() -> list[str]:
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

    def option(key: str, info: shared.OptionInfo) -> None:
        info.section = SECTION
        shared.opts.add_option(key, info)

    option("ldznet_head", shared.OptionInfo(
        NO_HEAD, "Segmentation head (files in models/ldznet)", gr.Dropdown, lambda: {"choices": head_choices()},
        refresh=host.release, onchange=host.release))
    option(mask_model.SETTING, shared.OptionInfo(
        mask_model.AUTOMATIC, f"{mask_model.SETTING_LABEL} (automatic: the one the head was trained on, else the "
        "first SD 1.x file; loaded on first use, only what the head reads)", gr.Dropdown,
        lambda: {"choices": mask_model_choices()}, refresh=refresh_mask_models, onchange=host.unload_mask_model))
    option("ldznet_timestep", shared.OptionInfo(
        -1, "Feature timestep (-1: the head's own; zero-shot: 100)", gr.Slider,
        {"minimum": -1, "maximum": 999, "step": 1}, onchange=host.release))
    option("ldznet_resolution", shared.OptionInfo(
        0, "Working resolution in pixels (0: the head's own; 384 for zero-shot); higher is sharper and slower",
        gr.Slider, {"minimum": 0, "maximum": 1024, "step": 64}))
    option("ldznet_threshold", shared.OptionInfo(
        0.5, "Default mask threshold", gr.Slider, {"minimum": 0.0, "maximum": 0.99, "step": 0.01}))
    option("ldznet_keep_on_gpu", shared.OptionInfo(
        True, "Keep the head (and the SD 1.x mask model) on the GPU between masks (off: move them to the CPU after "
        "each mask; --medvram/--lowvram: the mask model always goes back)",
        onchange=host.release))
    option("ldznet_cuda_graphs", shared.OptionInfo(
        True, "Replay the mask's model calls as CUDA graphs (faster on NVIDIA GPUs; captured per image size and term "
        "count on first use, each holding GPU memory; not used under --medvram/--lowvram or with other "
        "extensions' hooks on the UNet)", onchange=host.release))
    option("ldznet_dtype", shared.OptionInfo(
        "auto", "Head precision (auto: the UNet's)", gr.Radio, {"choices": ["auto", *DTYPES]}, onchange=host.release))
    option("ldznet_save_masks", shared.OptionInfo(
        False, "Save the LD-ZNet mask beside every generated image (<name>-ldznet-mask.png, when the accordion has "
        "an expression)"))
