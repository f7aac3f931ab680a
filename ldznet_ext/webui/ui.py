"""The accordion, its Preview button, and the results-row button that sends an image and its mask
to img2img > Inpaint upload. Gradio is imported only here (and in ``tab``).

Components the accordion needs from the host's page (the img2img images, the galleries, the
Inpaint-upload image and mask) are picked up by elem_id as the host creates them
(:func:`remember_component`, an on_after_component callback); buttons are wired as soon as both
ends exist, whichever tab is built first.
"""

from __future__ import annotations

import html

import numpy as np
from PIL import Image

from ..detail import SEPARATOR, DetailPass
from ..errors import LdznetError, unexpected
from ..images import load_image
from ..job import COMBINE_MODES, HEAD_MODE, MODES, MaskJob
from ..limits import FEATHER
from ..outputs import render_overlay, selected_share
from . import host
from .request import (ARG_NAMES, INFOTEXT_KEYS, TITLE, PasteKey, control_value, from_args, paste_problems,
                      with_prompt_line)

IMG2IMG_INPUTS = ("img2img_image", "img2img_sketch", "img2maskimg", "inpaint_sketch", "img_inpaint_base",
                  "img_inpaint_mask")
"""elem_ids of img2img's images, in the order of its mode tabs (the last two: Inpaint upload)."""
INPAINT_SKETCH = IMG2IMG_INPUTS.index("inpaint_sketch")
"""The mode tab whose mask the host derives from the strokes against the image before them, a state
the page does not name (so Preview cannot read it)."""
WANTED = {*IMG2IMG_INPUTS, "txt2img_gallery", "img2img_gallery", "txt2img_prompt", "img2img_prompt",
          "txt2img_send_to_extras", "img2img_send_to_extras", "img2img_width", "img2img_height"}
_components: dict[str, object] = {}
_accordions: dict[str, dict] = {}
_wired: set[int] = set()


def _status(text: str, error: bool = False) -> str:
    return f"<p class='ldznet-{'error' if error else 'status'}'>{html.escape(text)}</p>"


def remember_component(component, **kwargs) -> None:
    """on_after_component: keep the host components we connect to; add our send button to the
    results rows."""
    elem_id = kwargs.get("elem_id") or getattr(component, "elem_id", None)
    if elem_id not in WANTED:
        return
    _components[elem_id] = component
    if elem_id.endswith("_send_to_extras"):
        from modules.ui_components import ToolButton

        tab = elem_id.split("_", 1)[0]
        _components[f"{tab}_ldznet_send"] = ToolButton(
            "🎭", elem_id=f"{tab}_send_to_ldznet_inpaint",
            tooltip="LD-ZNet: send the selected image and its mask (the accordion's expression) to "
                    "img2img > Inpaint upload")
    _wire_send_buttons()


def build_accordion(script, is_img2img: bool) -> list:
    """The accordion's components; returns the controls whose values arrive as script args
    (ARG_NAMES order)."""
    import gradio as gr

    tab = "img2img" if is_img2img else "txt2img"
    with gr.Accordion(TITLE, open=False, elem_id=script.elem_id("accordion"), elem_classes=["ldznet-accordion"]):
        expression = gr.Textbox(label="Mask expression", lines=1, elem_id=script.elem_id("expression"),
                                placeholder="goblin OR sword  ·  face{+8}  ·  person AND NOT hat  "
                                            "(or a line 'mask: ...' in the prompt)")
        with gr.Row():
            mode = gr.Radio(list(MODES), value=HEAD_MODE, label="Mode", elem_id=script.elem_id("mode"))
            combine = gr.Radio(list(COMBINE_MODES), value=COMBINE_MODES[0], visible=is_img2img,
                               label="With the brush / uploaded mask", elem_id=script.elem_id("combine"))
        with gr.Row():
            threshold, grow, feather = map_controls(script.elem_id)
            invert = gr.Checkbox(False, label="Invert", elem_id=script.elem_id("invert"))
            refine = gr.Checkbox(True, label="Refine edges", elem_id=script.elem_id("refine"))
        controls = [expression, mode, threshold, grow, feather, invert, combine, refine,
                    *more_mask_controls(script.elem_id), *detail_controls(script.elem_id)]
        status = gr.HTML(elem_id=script.elem_id("status"))
        unload_button = gr.Button("Unload LD-ZNet models", size="sm", elem_id=script.elem_id("unload"))
        unload_button.click(fn=unload_models, inputs=[], outputs=[status], show_progress=False)
        if is_img2img:
            preview_button = gr.Button("Preview mask", elem_id=script.elem_id("preview_button"))
            preview = gr.Image(label="LD-ZNet preview", type="pil", interactive=False,
                           elem_id=script.elem_id("preview"))
            inputs = [_components.get(name) for name in IMG2IMG_INPUTS]
            if all(c is not None for c in inputs):
                preview_button.click(fn=preview_mask, _js="ldznet_preview_args",
                                     inputs=[status, _components.get("img2img_prompt", status), *inputs, *controls],
                                     outputs=[preview, status], show_progress=True)
    script.infotext_fields = [*((control, PasteKey(name)) for control, name in zip(controls, ARG_NAMES)),
                              (status, paste_status)]
    script.paste_field_names = list(INFOTEXT_KEYS.values())
    _accordions[tab] = {"controls": controls, "status": status}
    _wire_send_buttons()
    return controls


def map_controls(elem_id) -> list:
    """Threshold, grow and feather sliders (ARG_NAMES order), for the accordion and the tab; ``elem_id(name)``
    names each. Grow and feather hold floats: the host converts a pasted value to the type of the
    control's value, and both take fractional pixels."""
    import gradio as gr

    return [gr.Slider(0.0, 0.99, value=host.control_default("ldznet_threshold"), step=0.01, label="Threshold",
                      elem_id=elem_id("threshold")),
            gr.Slider(-64, 64, value=0.0, step=1, label="Grow (+) / shrink (-), px", elem_id=elem_id("grow")),
            gr.Slider(0, min(64, FEATHER.high), value=0.0, step=1, label="Feather, px", elem_id=elem_id("feather"))]


def more_mask_controls(elem_id) -> list:
    """Keep-largest, min-area, refinement strength/radius and presence controls (ARG_NAMES order),
    for the accordion and the tab; ``elem_id(name)`` names each."""
    import gradio as gr

    default = MaskJob()
    with gr.Row():
        return [gr.Number(control_value(default, "keep_largest"), precision=0,
                          label="Keep the largest N objects (0: all)", elem_id=elem_id("keep_largest")),
                gr.Number(default.min_area, precision=0, label="Drop objects under N px",
                          elem_id=elem_id("min_area")),
                gr.Slider(0.0, 1.0, value=default.refine_strength, step=0.05, label="Edge refinement strength",
                          elem_id=elem_id("refine_strength")),
                gr.Number(float(control_value(default, "refine_radius")), label="Refinement radius, px (0: automatic)",
                          elem_id=elem_id("refine_radius")),
                gr.Checkbox(default.presence, label="A term not found selects nothing",
                            elem_id=elem_id("presence"))]


def detail_controls(elem_id) -> list:
    """The detail pass's controls (DETAIL_ARG_NAMES order), in an accordion of their own."""
    import gradio as gr

    default = DetailPass()
    with gr.Accordion("Detail pass", open=False, elem_id=elem_id("detail")):
        expression = gr.Textbox(label="Detail pass: each instance of this expression is inpainted after generation",
                                lines=1, placeholder="face  ·  face[1,2]  ·  hand OR face  (empty: off)",
                                elem_id=elem_id("detail_expression"))
        prompts = gr.Textbox(label=f"Prompts, one per instance left to right, separated by {SEPARATOR} "
                                   "(fewer: the last repeats; empty: the generation's prompt)", lines=2,
                             elem_id=elem_id("detail_prompts"))
        with gr.Row():
            denoising = gr.Slider(0.01, 1.0, value=default.denoising, step=0.01, label="Denoising strength",
                                  elem_id=elem_id("detail_denoising"))
            steps = gr.Slider(1, 150, value=default.steps, step=1, label="Steps", elem_id=elem_id("detail_steps"))
            padding = gr.Slider(0, 256, value=default.padding, step=4, label="Padding around each instance, px",
                                elem_id=elem_id("detail_padding"))
    return [expression, prompts, denoising, steps, padding]


def paste_status(params) -> str:
    """The accordion's status after PNG Info or a send-to button pasted ``params`` (parsed infotext): what
    could not be restored, or nothing."""
    problems = paste_problems(params)
    return _status("PNG Info: not restored: " + "; ".join(problems), error=True) if problems else ""


def _accordion_job(prompt: str | None, args) -> MaskJob:
    job = with_prompt_line(from_args(args), prompt)
    if not job.active:
        raise LdznetError("type a mask expression (or a line 'mask: ...' in the prompt)")
    return job


def pick_image(mode: int, images: list) -> tuple[Image.Image, np.ndarray | None]:
    """(image, brush mask uint8 [H, W] or None) from img2img's images for mode tab ``mode``."""
    from modules import processing

    if mode == 2:
        edited = images[2] or {}
        image, mask = edited.get("image"), edited.get("mask")
        brush = processing.create_binary_mask(mask) if mask is not None else None
    elif mode == 4:
        image, brush = images[4], (processing.create_binary_mask(images[5]) if images[5] is not None else None)
    elif 0 <= mode < 4:
        image, brush = images[mode], None
    else:
        raise LdznetError("Preview works on the single-image tabs (img2img, Sketch, Inpaint, Inpaint upload)")
    if image is None:
        raise LdznetError("put an image into the img2img tab first")
    if brush is not None:
        brush = np.asarray(brush.resize(image.size, Image.BILINEAR) if brush.size != image.size else brush)
        if not brush.any():
            brush = None  # an untouched canvas is no brush mask
    return image, brush


def preview_mask(mode, prompt, *values):
    """Preview button: (overlay image, status html) without generating."""
    images, args = list(values[:len(IMG2IMG_INPUTS)]), values[len(IMG2IMG_INPUTS):]
    try:
        job = _accordion_job(prompt, args)
        image, brush = pick_image(int(mode), images)
        with host.gpu_job("ldznet preview"):
            result = host.compute(image, job, brush)
    except LdznetError as error:
        return None, _status(str(error), error=True)
    except Exception as error:  # noqa: BLE001 - out of memory, a host failure: the status line, not a toast
        return None, _status(unexpected(error), error=True)
    overlay = render_overlay(load_image(image), result.mask)
    share = selected_share(result.mask)
    notes = [f"{job.expression}: {share:.1%} of the image selected", *result.prediction.missing_notes()]
    if int(mode) == INPAINT_SKETCH and job.combine != "replace":
        notes.append(f"Inpaint sketch: this is the text mask alone; the generation combines it with the mask of "
                     f"your strokes ({job.combine})")
    return Image.fromarray(overlay), _status("; ".join(notes))


def unload_models() -> str:
    """Unload button: drop the cached head and the separate SD 1.x mask model (status html)."""
    with host.gpu_job("ldznet unload"):  # not while a mask is being made with them
        host.unload()
    return _status("LD-ZNet models unloaded; they load again on the next mask")


def send_to_inpaint(gallery, index, *args):
    """Send button: (image, mask, width, height, status) for img2img > Inpaint upload; the size goes
    along unless Settings > "Send size" is off, as with the host's own send buttons."""
    import gradio as gr
    from modules.infotext_utils import image_from_url_text

    try:
        if not gallery:
            raise LdznetError("no image in the results gallery to send")
        index = int(index) if index is not None and 0 <= int(index) < len(gallery) else 0
        image = image_from_url_text(gallery[index])
        job = _accordion_job(None, args)
        with host.gpu_job("ldznet send to inpaint"):
            result = host.compute(image, job)
    except LdznetError as error:
        return gr.update(), gr.update(), gr.update(), gr.update(), _status(str(error), error=True)
    except Exception as error:  # noqa: BLE001 - out of memory, a host failure: the status line, not a toast
        return gr.update(), gr.update(), gr.update(), gr.update(), _status(unexpected(error), error=True)
    width, height = image.size if host.opt("send_size", True) else (gr.update(), gr.update())
    sent = f"sent to Inpaint upload with the mask of {job.expression}"
    status = (_status(sent) if result.mask.any() else
              _status(f"{sent}, which is empty ({result.empty_reason(job)})", error=True))
    return image, Image.fromarray(result.mask, "L"), width, height, status


def _wire_send_buttons() -> None:
    base, mask = _components.get("img_inpaint_base"), _components.get("img_inpaint_mask")
    width, height = _components.get("img2img_width"), _components.get("img2img_height")
    for tab in ("txt2img", "img2img"):
        button, gallery = _components.get(f"{tab}_ldznet_send"), _components.get(f"{tab}_gallery")
        accordion = _accordions.get(tab)
        if None in (button, gallery, accordion, base, mask, width, height) or id(button) in _wired:
            continue
        _wired.add(id(button))
        button.click(fn=send_to_inpaint, _js="ldznet_send_args",
                     inputs=[gallery, accordion["status"], *accordion["controls"]],
                     outputs=[base, mask, width, height, accordion["status"]], show_progress=False,
                     ).then(fn=None, _js="ldznet_switch_to_inpaint_upload", inputs=None, outputs=None)
