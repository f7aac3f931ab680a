"""The "LD-ZNet" tab on the fake WebUI: run_batch on the host's model, resumable masks, progress
and Interrupt through shared.state, uploads, folder errors."""
from __future__ import annotations

import html
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")

from fake_webui import world  # noqa: E402

import modules.shared  # noqa: E402

from ldznet_ext.batch import MANIFEST_NAME, read_manifest  # noqa: E402
from ldznet_ext.segmenter import Segmenter  # noqa: E402
from ldznet_ext.webui import host, tab  # noqa: E402
from ldznet_ext.job import MaskJob  # noqa: E402

pytestmark = pytest.mark.usefixtures("every_term_found")  # option plumbing on tiny random models

ARGS = ("goblin", "LD-ZNet head", 0.3, 0, 0, False, "replace")


def _image(seed: int, size=(56, 40)) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8))


def _gallery(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        _image(10 + i).save(folder / f"img{i}.png")
        paths.append(folder / f"img{i}.png")
    return paths


def _expected(seed: int) -> np.ndarray:
    return host.compute(np.asarray(_image(seed)), MaskJob("goblin", threshold=0.3)).mask


def test_tab_masks_a_folder_resumably(tmp_path):
    world.install(tmp_path)
    inputs, out = tmp_path / "in", tmp_path / "out"
    _gallery(inputs, 3)
    (inputs / "broken.jpg").write_bytes(b"not a jpeg")
    previews, status = tab.mask_folder(str(inputs), None, str(out), False, *ARGS)
    assert "3 masked, 0 skipped, 1 failed; masks in" in status and "interrupted" not in status
    assert [name for _, name in previews] == ["img0.png", "img1.png", "img2.png"]
    assert sorted(p.name for p in out.glob("*.png")) == ["img0.png", "img1.png", "img2.png"]
    assert np.array_equal(np.asarray(Image.open(out / "img1.png")), _expected(11))
    (out / "img0.png").unlink()
    modules.shared.state.begun = 0
    previews, status = tab.mask_folder(str(inputs), None, str(out), False, *ARGS)
    assert "1 masked, 2 skipped, 1 failed" in status and modules.shared.state.begun == 1
    assert [name for _, name in previews] == ["img0.png"]
    entries = read_manifest(out / MANIFEST_NAME)
    assert [(Path(e["input"]).name, e["status"]) for e in entries] == [
        ("broken.jpg", "error"), ("img0.png", "ok"), ("img1.png", "ok"), ("img2.png", "ok"),
        ("img1.png", "skipped"), ("img2.png", "skipped"), ("broken.jpg", "error"), ("img0.png", "ok")]
    assert entries[1]["expression"] == "goblin"
    assert entries[1]["settings"] == MaskJob("goblin", threshold=0.3).manifest_settings() == {
        "mode": "LD-ZNet head", "threshold": 0.3, "grow": 0.0, "feather": 0.0, "invert": False, "combine": "replace",
        "refine": True, "keep_largest": None, "min_area": 0, "refine_strength": 1.0, "refine_radius": None,
            "presence": True}


def test_tab_refuses_to_skip_another_jobs_masks(tmp_path):
    world.install(tmp_path)
    inputs, out = tmp_path / "in", tmp_path / "out"
    _gallery(inputs, 1)
    assert "1 masked" in tab.mask_folder(str(inputs), None, str(out), False, *ARGS)[1]
    other = ("sword", *ARGS[1:])
    previews, status = tab.mask_folder(str(inputs), None, str(out), False, *other)
    assert previews == [] and "ldznet-error" in status and "lists masks of another job (expression &#x27;goblin&#x27; " \
        "-&gt; &#x27;sword&#x27;)" in status
    assert "1 masked, 0 skipped" in tab.mask_folder(str(inputs), None, str(out), True, *other)[1]  # overwrite


def test_tab_takes_every_mask_option(tmp_path):
    world.install(tmp_path)
    _gallery(tmp_path / "in", 1)
    # the largest object only, no specks, half-strength refinement, automatic radius (0)
    args = ("goblin", "LD-ZNet head", 0.51, 0, 0, False, "replace", True, 1, 2, 0.5, 0)
    _, status = tab.mask_folder(str(tmp_path / "in"), None, str(tmp_path / "out"), False, *args)
    assert "1 masked" in status
    job = MaskJob("goblin", threshold=0.51, keep_largest=1, min_area=2, refine_strength=0.5)
    expected = host.compute(np.asarray(_image(10)), job).mask
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "img0.png")), expected)
    assert not np.array_equal(expected, host.compute(np.asarray(_image(10)), MaskJob("goblin", threshold=0.51)).mask)
    assert read_manifest(tmp_path / "out" / MANIFEST_NAME)[0]["settings"] == job.manifest_settings()


def test_tab_reports_progress_per_file(tmp_path, monkeypatch):
    world.install(tmp_path)
    _gallery(tmp_path / "in", 3)
    _image(1).save(tmp_path / "out.png")  # not an input: a file beside the folder
    (tmp_path / "out").mkdir()
    Image.new("L", (56, 40)).save(tmp_path / "out" / "img1.png")  # finished earlier: skipped, still counted
    state, seen = modules.shared.state, []
    real_next = state.nextjob

    def recording_next():
        seen.append((state.job, state.job_no, state.job_count, state.textinfo))
        real_next()

    monkeypatch.setattr(state, "nextjob", recording_next)
    _, status = tab.mask_folder(str(tmp_path / "in"), None, str(tmp_path / "out"), False, *ARGS)
    assert "2 masked, 1 skipped, 0 failed" in status
    assert seen == [("ldznet batch", 0, 3, "LD-ZNet: img1.png"), ("ldznet batch", 1, 3, "LD-ZNet: img0.png"),
                    ("ldznet batch", 2, 3, "LD-ZNet: img2.png")]  # skipped files are settled first
    assert state.job_no == 3 and state.job == ""  # state.end() ran


def test_interrupt_stops_after_the_current_file(tmp_path, monkeypatch):
    world.install(tmp_path)
    paths = _gallery(tmp_path / "in", 5)
    out = tmp_path / "out"
    calls = []
    real_predict = Segmenter.predict_images

    def interrupted_during_the_second(self, images, *args, **kwargs):
        calls.append(len(images))
        if len(calls) == 2:  # the Interrupt button, pressed while the second file computes
            modules.shared.state.interrupt()
        return real_predict(self, images, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "predict_images", interrupted_during_the_second)
    previews, status = tab.mask_folder(str(tmp_path / "in"), None, str(out), False, *ARGS)
    assert calls == [1, 1] and "2 masked, 0 skipped, 0 failed (interrupted)" in status and len(previews) == 2
    assert sorted(p.name for p in out.iterdir()) == ["img0.png", "img1.png", MANIFEST_NAME]  # no temporaries
    assert np.array_equal(np.asarray(Image.open(out / "img1.png")), _expected(11))
    entries = read_manifest(out / MANIFEST_NAME)
    assert [(e["input"], e["status"], e["output"]) for e in entries] == [
        (str(p), "ok", str(out / p.name)) for p in paths[:2]]

    _, status = tab.mask_folder(str(tmp_path / "in"), None, str(out), False, *ARGS)  # begin() clears the flag
    assert "3 masked, 2 skipped, 0 failed; masks in" in status and calls == [1, 1, 1, 1, 1]
    assert np.array_equal(np.asarray(Image.open(out / "img4.png")), _expected(14))
    statuses = [(Path(e["input"]).name, e["status"]) for e in read_manifest(out / MANIFEST_NAME)]
    assert statuses[2:] == [("img0.png", "skipped"), ("img1.png", "skipped"), ("img2.png", "ok"),
                            ("img3.png", "ok"), ("img4.png", "ok")]


def test_uploaded_files_and_folder_errors(tmp_path):
    world.install(tmp_path)
    first, second = _gallery(tmp_path / "up1", 1)[0], tmp_path / "up2" / "other.png"
    second.parent.mkdir()
    _image(11).save(second)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("not an image")
    uploads = [SimpleNamespace(name=str(first)), SimpleNamespace(name=str(second)), tmp_path / "text" / "notes.txt"]
    out = tmp_path / "out"
    _, status = tab.mask_folder("", uploads, str(out), False, *ARGS)
    assert "2 masked, 0 skipped, 0 failed" in status
    assert np.array_equal(np.asarray(Image.open(out / "other.png")), _expected(11))
    errors = {
        "output folder is the input folder": ("up1", str(tmp_path / "up1"), ARGS),
        "no images in": ("text", str(out), ARGS),
        "choose an input folder or upload images": ("", str(out), ARGS),
        "choose an output folder": ("up1", " ", ARGS),
        "type a mask expression": ("up1", str(out), ("",)),
    }
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / MANIFEST_NAME).write_text("my notes\n")  # someone's file under the manifest's name
    errors["not an ldznet manifest"] = ("up1", str(tmp_path / "notes"), ARGS)
    for message, (folder, output, args) in errors.items():
        modules.shared.state.begun = 0
        previews, status = tab.mask_folder(str(tmp_path / folder) if folder else "", None, output, False, *args)
        assert previews == [] and message in status and "ldznet-error" in status
        assert modules.shared.state.begun == 0  # refused before taking the GPU
    assert (tmp_path / "notes" / MANIFEST_NAME).read_text() == "my notes\n"
    assert sorted(p.name for p in (tmp_path / "notes").iterdir()) == [MANIFEST_NAME]


@pytest.mark.parametrize("input_dir, output_dir, message", [
    ("~no-such-user-ldznet/in", "OUT", "the input folder '~no-such-user-ldznet/in' starts with an unknown user's "
                                      "home (~name)"),
    ("IN", "~no-such-user-ldznet/out", "the output folder '~no-such-user-ldznet/out' starts with an unknown "
                                       "user's home (~name)"),
    ("a" * 5000, "OUT", "[Errno 36] File name too long: 'aaaa"),
])
def test_folder_fields_the_file_system_refuses_are_one_line(tmp_path, input_dir, output_dir, message):
    """Path.expanduser's RuntimeError and is_dir's ENAMETOOLONG were tracebacks (gradio's "Error")."""
    world.install(tmp_path)
    _gallery(tmp_path / "in", 1)
    input_dir = input_dir.replace("IN", str(tmp_path / "in"))
    output_dir = output_dir.replace("OUT", str(tmp_path / "out"))
    previews, status = tab.mask_folder(input_dir, None, output_dir, False, *ARGS)
    assert previews == [] and status.startswith("<p class='ldznet-error'>" + html.escape(message))
