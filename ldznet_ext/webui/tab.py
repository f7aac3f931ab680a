"""The "LD-ZNet" tab: masks for a folder (or uploaded files) on the loaded model.

The work is :func:`ldznet_ext.batch.run_batch`, the engine of ``ldznet batch``: ``{stem}.png``
masks (the names img2img's "Inpaint batch mask directory" looks up), a JSONL manifest line per
file, finished masks skipped unless told to overwrite. Here it runs on the host's model, reports
progress and stops on Interrupt through ``shared.state``, and shows overlays of the first results.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
from PIL import Image

from ..batch import (IMAGE_SUFFIXES, MANIFEST_NAME, BatchCallbacks, BatchJob, Manifest, check_folders, check_manifest,
                     check_resume, run_batch)
from ..errors import LdznetError
from ..images import load_image
from ..job import COMBINE_MODES, HEAD_MODE, MODES
from ..outputs import render_overlay
from . import host
from .request import from_args
from .ui import map_controls, more_mask_controls

PREVIEW_COUNT = 12


class StateCallbacks(BatchCallbacks):
    """run_batch <-> ``shared.state``: job_count / job_no / textinfo for progress, ``interrupted``
    to stop after the current file; overlays of the first PREVIEW_COUNT masks for the gallery."""

    def __init__(self, state):
        self.state = state
        self.previews: list[tuple[Image.Image, str]] = []

    def started(self, total: int) -> None:
        self.state.job_count = total

    def file_done(self, entry: dict) -> None:
        name = Path(entry["input"]).name
        self.state.textinfo = f"LD-ZNet: {name}"
        if entry["status"] == "ok" and len(self.previews) < PREVIEW_COUNT:
            try:
                mask = np.asarray(Image.open(entry["output"]).convert("L"))
                image = load_image(entry["input"])
            except (LdznetError, OSError):  # the mask is written; only its preview is lost
                pass
            else:
                self.previews.append((Image.fromarray(render_overlay(image, mask)), name))
        self.state.nextjob()

    def stop_requested(self) -> bool:
        return bool(self.state.interrupted)


def _files(input_dir: str, uploads, output: Path) -> tuple[list[Path], Path | None]:
    """(images, input folder or None for uploads)."""
    if uploads:
        files = [Path(getattr(f, "name", f)) for f in uploads]
        return [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES], None
    if not input_dir.strip():
        raise LdznetError("choose an input folder or upload images")
    folder = _folder(input_dir, "input")
    return check_folders(folder, output), folder


def _folder(text: str, what: str) -> Path:
    """The folder typed as ``text`` ("~" expanded); LdznetError for a "~user" that is no user."""
    try:
        return Path(text.strip()).expanduser()
    except RuntimeError:  # Path.expanduser: "Could not determine home directory."
        raise LdznetError(f"the {what} folder {text.strip()!r} starts with an unknown user's home (~name)") from None


def mask_folder(input_dir: str, uploads, output_dir: str, overwrite: bool, *args) -> tuple[list, str]:
    """Batch button: (preview overlays, status html). ``args`` are the script args (ARG_NAMES)."""
    try:
        job = from_args(args)
        if not job.active:
            raise LdznetError("type a mask expression")
        if not output_dir.strip():
            raise LdznetError("choose an output folder for the masks")
        out = _folder(output_dir, "output")
        files, folder = _files(input_dir, uploads, out)
        if not files:
            raise LdznetError("no images to mask")
        check_manifest(out / MANIFEST_NAME, files, out)  # an unrelated file of that name is not appended to
        check_resume(out / MANIFEST_NAME, job.expression, job.manifest_settings(), overwrite)
        # One image at a time, as in a generation: Interrupt answers after the current file and
        # memory stays at one image's (--medvram / --lowvram hosts).
        batch = BatchJob(folder, out, job.tree(), job.expression, job.mask_options(), job.manifest_settings(),
                         overwrite, batch_size=1, files=files)
        with host.gpu_job("ldznet batch") as state, host.session(job) as segmenter, \
                Manifest(out / MANIFEST_NAME) as manifest:
            callbacks = StateCallbacks(state)
            summary = run_batch(batch, segmenter, manifest, callbacks)
    except (LdznetError, OSError) as error:  # OSError: a path the file system refuses (name too long), a full disk
        return [], f"<p class='ldznet-error'>{html.escape(str(error))}</p>"
    counts = summary.counts
    stopped = " (interrupted)" if summary.interrupted else ""
    text = (f"{counts['ok']} masked{summary.empty_note}, {counts['skipped']} skipped, {counts['error']} failed"
            f"{stopped}; masks in {out}")
    return callbacks.previews, f"<p class='ldznet-status'>{html.escape(text)}</p>"


def _tab_elem_id(name: str) -> str:
    return f"ldznet_tab_{name}"


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
                expression = gr.Textbox(label="Mask expression", placeholder="goblin OR sword",
                                        elem_id="ldznet_tab_expression")
                with gr.Row():
                    mode = gr.Radio(list(MODES), value=HEAD_MODE, label="Mode")
                    invert = gr.Checkbox(False, label="Invert")
                    refine = gr.Checkbox(True, label="Refine edges")
                    overwrite = gr.Checkbox(False, label="Redo finished masks")
                with gr.Row():
                    threshold, grow, feather = map_controls(_tab_elem_id)
                combine = gr.Textbox(COMBINE_MODES[0], visible=False)
                more = more_mask_controls(_tab_elem_id)
                with gr.Row():
                    run = gr.Button("Mask all", variant="primary", elem_id="ldznet_tab_run")
                    stop = gr.Button("Interrupt", elem_id="ldznet_tab_interrupt")
            with gr.Column():
                status = gr.HTML()
                gallery = gr.Gallery(label="First results", columns=4, elem_id="ldznet_tab_gallery")
        run.click(fn=mask_folder, inputs=[input_dir, uploads, output_dir, overwrite, expression, mode, threshold,
                                          grow, feather, invert, combine, refine, *more],
                  outputs=[gallery, status])
        stop.click(fn=lambda: shared.state.interrupt(), inputs=None, outputs=None)
    return [(blocks, "LD-ZNet", "ldznet")]

