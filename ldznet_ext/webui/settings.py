"""Settings > LD-ZNet: head file, feature timestep, default threshold, head placement and dtype,
masks saved beside generated images."""

from __future__ import annotations

from ..precision import DTYPES
from . import host
from .engine import NO_HEAD

SECTION = ("ldznet", "LD-ZNet")


def head_choices() -> list[str]:
    return [NO_HEAD, *host.engine().list_heads()]


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
    option("ldznet_timestep", shared.OptionInfo(
        -1, "Feature timestep (-1: the head's own; zero-shot: 400)", gr.Slider,
        {"minimum": -1, "maximum": 999, "step": 1}, onchange=host.release))
    option("ldznet_resolution", shared.OptionInfo(
        0, "Working resolution in pixels (0: the head's own; 384 for zero-shot); higher is sharper and slower",
        gr.Slider, {"minimum": 0, "maximum": 1024, "step": 64}))
    option("ldznet_threshold", shared.OptionInfo(
        0.5, "Default mask threshold", gr.Slider, {"minimum": 0.0, "maximum": 0.99, "step": 0.01}))
    option("ldznet_keep_on_gpu", shared.OptionInfo(
        True, "Keep the head on the GPU between masks (off: move it to the CPU after each mask)",
        onchange=host.release))
    option("ldznet_dtype", shared.OptionInfo(
        "auto", "Head precision (auto: the UNet's)", gr.Radio, {"choices": ["auto", *DTYPES]}, onchange=host.release))
    option("ldznet_save_masks", shared.OptionInfo(
        False, "Save the LD-ZNet mask beside every generated image (<name>-ldznet-mask.png, when the accordion has "
        "an expression)"))
