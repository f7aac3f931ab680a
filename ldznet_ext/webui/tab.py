"""The "LD-ZNet" tab: masks for a folder (or uploaded files) on the loaded model.

Writes ``{stem}.png`` masks (the names img2img's "Inpaint batch mask directory" looks up) and a
JSONL manifest line per file, skips finished masks unless told to overwrite, reports progress and
stops on Interrupt through ``shared.state``, and shows overlays of the first results.
"""

from __future__ import annotations

import html
import time
from pathlib import Path

from PIL import Image

from ..batch import MANIFEST_NAME, IMAGE_SUFFIXES, Manifest, check_folders, stem_owners
from ..errors import LdznetError
from ..images import load_image
from ..outputs import render_overlay, write_mask
from . import host
from .request import COMBINE_MODES, MODES, MaskRequest

PREVIEW_COUNT = 12


def _files(input_dir: str, uploads) -> tuple[list[Path], Path | None]:
    """(images, input folder or None for uploads)."""
    if uploads:
        files = [Path(getattr(f, "name", f)) for f in uploads]
        return [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES], None
    if not input_dir.strip():
        raise LdznetError("choose an input folder or upload images")
    return [], Path(input_dir.strip()).expanduser()


def mask_folder(input_dir: str, uploads, output_dir: str, overwrite: bool, *args) -> tuple[list, str]:
    """Batch button: (preview overlays, status html). ``args`` are the script args (ARG_NAMES)."""
    try:
        request = MaskRequest.from_args(list(args))
        if not request.active:
            raise LdznetError("type a mask expression")
        if not output_dir.strip():
            raise LdznetError("choose an output folder for the masks")
        out = Path(output_dir.strip()).expanduser()
        files, folder = _files(input_dir, uploads)
        if folder is not None:
            files = check_folders(folder, out)
        if not files:
            raise LdznetError("no images to mask")
        out.mkdir(parents=True, exist_ok=True)
        with host.gpu_job("ldznet batch") as state:
            return _run(files, out, request, overwrite, state)
    except LdznetError as error:
        return [], f"<p class='ldznet-error'>{html.escape(str(error))}</p>"


def _run(files: list[Path], out: Path, request: MaskRequest, overwrite: bool, state) -> tuple[list, str]:
    owners = stem_owners(files)
    counts = {"ok": 0, "skipped": 0, "error": 0}
    previews: list = []
    state.job_count = len(files)
    settings = {k: v for k, v in request.as_dict().items() if k != "expression"}
    with Manifest(out / MANIFEST_NAME) as manifest:
        for path in files:
            if state.interrupted:
                break
            state.textinfo = f"LD-ZNet: {path.name}"
            target = out / f"{path.stem}.png"
            start, error, status = time.perf_counter(), None, "ok"
            if owners[path.stem.casefold()] != path:
                status, error = "error", f"{owners[path.stem.casefold()].name} already writes {target.name}"
            elif target.exists() and not overwrite:
                status = "skipped"
            else:
                try:
                    image = load_image(path)
                    result = host.compute(image, request)
                    write_mask(target, result.mask)
                    if len(previews) < PREVIEW_COUNT:
                        previews.append((Image.fromarray(render_overlay(image, result.mask)), path.name))
                except (LdznetError, OSError) as failure:
                    status, error = "error", str(failure)
            manifest.write({"input": str(path), "expression": request.expression, "settings": settings,
                            "output": str(target) if status != "error" else None, "status": status,
                            "error": error, "seconds": round(time.perf_counter() - start, 4)})
            counts[status] += 1
            state.nextjob()
    stopped = " (interrupted)" if state.interrupted else ""
    summary = f"{counts['ok']} masked, {counts['skipped']} skipped, {counts['error']} failed{stopped}; masks in {out}"
    return previews, f"<p class='ldznet-status'>{html.escape(summary)}</p>"


def build_tab():
    """on_ui_tabs: [(blocks, "LD-ZNet", "ldznet")]."""
    import gradio as gr
    from modules import paths, shared

    default_out = str(Path(paths.data_path) / "outputs" / "ldznet-masks")
    with gr.Blocks(analytics_enabled=False) as blocks:
        with gr.Row():
            with gr.Column():
                input_dir = gr.Textbox(label="Input folder", placeholder="/path/to/images", elem_id="ldznet_tab_input")
                uploads = gr.File(label="...or upload images", file_count="multiple", elem_id="ldznet_tab_uploads")
                output_dir = gr.Textbox(label="Output folder ({stem}.png masks)", value=default_out,
                                        elem_id="ldznet_tab_output")
                expression = gr.Textbox(label="Mask expression", placeholder="goblin OR sword", elem_id="ldznet_tab_expression")
                with gr.Row():
                    mode = gr.Radio(list(MODES), value=MODES[0], label="Mode")
                    invert = gr.Checkbox(False, label="Invert")
                    overwrite = gr.Checkbox(False, label="Redo finished masks")
                with gr.Row():
                    threshold = gr.Slider(0.0, 0.99, value=float(host.opt("ldznet_threshold", 0.5)), step=0.01,
                                          label="Threshold")
                    grow = gr.Slider(-64, 64, value=0, step=1, label="Grow (+) / shrink (-), px")
                    feather = gr.Slider(0, 64, value=0, step=1, label="Feather, px")
                combine = gr.Textbox(COMBINE_MODES[0], visible=False)
                with gr.Row():
                    run = gr.Button("Mask all", variant="primary", elem_id="ldznet_tab_run")
                    stop = gr.Button("Interrupt", elem_id="ldznet_tab_interrupt")
            with gr.Column():
                status = gr.HTML()
                gallery = gr.Gallery(label="First results", columns=4, elem_id="ldznet_tab_gallery")
        run.click(fn=mask_folder, inputs=[input_dir, uploads, output_dir, overwrite, expression, mode, threshold,
                                          grow, feather, invert, combine], outputs=[gallery, status])
        stop.click(fn=lambda: shared.state.interrupt(), inputs=None, outputs=None)
    return [(blocks, "LD-ZNet", "ldznet")]

