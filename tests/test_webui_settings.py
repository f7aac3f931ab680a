"""Settings > LD-ZNet with values the settings page never offers: sent to POST /sdapi/v1/options (the
host stores whatever it is sent) or written into config.json. The API refuses them before the host
stores any; a bad value already stored stops a mask with its reason, never a traceback, and is never
read as another value."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from PIL import Image

from fake_webui import world  # puts the fake ``modules`` on sys.path

import modules.shared  # noqa: E402
from modules import processing  # noqa: E402
from modules.api.api import Api  # noqa: E402

from ldznet_ext.errors import LdznetError  # noqa: E402
from ldznet_ext.job import MaskJob  # noqa: E402
from ldznet_ext.webui import api, host, register, script, settings  # noqa: E402

pytestmark = pytest.mark.usefixtures("every_term_found")  # option plumbing on tiny random models

BAD = [
    ("ldznet_timestep", "abc", "ldznet_timestep must be an integer in [-1, 999], got 'abc'"),
    ("ldznet_timestep", 5.7, "ldznet_timestep must be an integer in [-1, 999], got 5.7"),  # was read as 5
    ("ldznet_timestep", None, "ldznet_timestep must be an integer in [-1, 999], got None"),
    ("ldznet_timestep", float("inf"), "ldznet_timestep must be an integer in [-1, 999], got inf"),
    ("ldznet_timestep", True, "ldznet_timestep must be an integer in [-1, 999], got True"),  # was read as 1
    ("ldznet_timestep", 10**9, "ldznet_timestep must be an integer in [-1, 999], got 1000000000"),
    ("ldznet_resolution", 32, "ldznet_resolution must be 0 (the head's own) or an integer in [64, 2048], got 32"),
    ("ldznet_resolution", -64, "ldznet_resolution must be 0 (the head's own) or an integer in [64, 2048], got -64"),
    ("ldznet_resolution", [384], "ldznet_resolution must be 0 (the head's own) or an integer in [64, 2048], "
                                 "got [384]"),
    ("ldznet_resolution", float("nan"), "ldznet_resolution must be 0 (the head's own) or an integer in [64, 2048], "
                                        "got nan"),
    ("ldznet_threshold", 1.5, "ldznet_threshold must be a number in [0, 1), got 1.5"),
    ("ldznet_threshold", "0.4", "ldznet_threshold must be a number in [0, 1), got '0.4'"),
    ("ldznet_keep_on_gpu", "false", "ldznet_keep_on_gpu must be true or false, got 'false'"),  # was read as True
    ("ldznet_cuda_graphs", 0, "ldznet_cuda_graphs must be true or false, got 0"),
    ("ldznet_save_masks", "yes", "ldznet_save_masks must be true or false, got 'yes'"),
    ("ldznet_dtype", "fp8", "ldznet_dtype must be one of auto, fp32, fp16, bf16, got 'fp8'"),
    ("ldznet_head", "../evil.safetensors", "ldznet_head must be the name of a file in models/ldznet, "
                                           "got '../evil.safetensors'"),
    ("ldznet_head", "/etc/passwd", "ldznet_head must be the name of a file in models/ldznet, got '/etc/passwd'"),
    ("ldznet_head", "a" * 5000, f"ldznet_head must be the name of a file in models/ldznet, got '{'a' * 255}'"),
    ("ldznet_head", 5, "ldznet_head must be a file name, got 5"),
    ("ldznet_mask_model", ["x"], "ldznet_mask_model must be a file name, got ['x']"),
]


def _options(guard, body: bytes) -> tuple[int, object]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(guard({"type": "http", "method": "POST", "path": api.OPTIONS_ROUTE, "headers": []}, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"])


@pytest.fixture
def guard(tmp_path, monkeypatch):
    world.install(tmp_path)
    monkeypatch.setattr(modules.shared.cmd_opts, "api_auth", None)
    return api.ApiGuard(Api(), lambda payload, is_img2img: None, {},
                        check_options=lambda payload: api.check_options(payload, settings.check_options))


@pytest.mark.parametrize("key, value, message", BAD)
def test_the_api_refuses_a_bad_setting_before_the_host_stores_it(guard, key, value, message):
    before = dict(modules.shared.opts.data)
    status, answer = _options(guard, json.dumps({"sd_model_checkpoint": "x", key: value}).encode())
    assert (status, answer["detail"]) == (422, f"Settings > LD-ZNet: {message}")
    assert modules.shared.opts.data == before


def test_the_api_stores_good_settings_and_names_unknown_ones(guard):
    status, _ = _options(guard, json.dumps({"ldznet_threshold": 0.25, "ldznet_resolution": 384.0,
                                            "ldznet_keep_on_gpu": False, "ldznet_head": "", "other": [1]}).encode())
    assert status == 200 and modules.shared.opts.data["ldznet_threshold"] == 0.25
    assert host.engine_options().resolution == 384 and host.engine_options().head == "None"
    status, answer = _options(guard, b'{"ldznet_treshold": 0.3}')
    assert status == 422 and answer["detail"].startswith("Settings > LD-ZNet has no setting 'ldznet_treshold'; "
                                                         "the settings are ldznet_head, ldznet_mask_model,")
    assert "ldznet_treshold" not in modules.shared.opts.data  # the host's set() fails with a KeyError (500)


def test_the_api_passes_stored_values_posted_back_as_the_host_does(guard):
    """A client posting back the options it read: the host's set() skips a value equal to the stored one,
    so a bad or unknown value config.json already held is not what this request asks to store."""
    modules.shared.opts.data.update(ldznet_timestep="abc", ldznet_old_setting=1)  # hand-edited, older version
    posted = dict(modules.shared.opts.data, ldznet_threshold=0.25)
    assert _options(guard, json.dumps(posted).encode())[0] == 200
    assert modules.shared.opts.data["ldznet_threshold"] == 0.25
    status, answer = _options(guard, json.dumps(dict(posted, ldznet_timestep="abd")).encode())
    assert status == 422 and "ldznet_timestep must be an integer in [-1, 999], got 'abd'" in answer["detail"]


@pytest.mark.parametrize("key, value, message", [case for case in BAD if case[0] not in (
    "ldznet_save_masks", "ldznet_threshold", "ldznet_mask_model")])  # read after the mask, the controls'
# starting value, and only where the loaded model cannot serve the head
def test_a_stored_bad_setting_stops_masks_with_its_reason(tmp_path, key, value, message):
    """config.json edited by hand: the generation stops with the reason in the infotext (not a
    traceback, and not the value read as another), the API answers 422 in one line, and a generation
    without a mask is not touched."""
    world.install(tmp_path)
    modules.shared.opts.data[key] = value
    reason = f"Settings > LD-ZNet: {message}"
    s = script.LdznetScript()
    s.is_img2img = True
    image = Image.new("RGB", (56, 40), (90, 120, 30))
    p = processing.process_images(processing.StableDiffusionProcessingImg2Img(
        prompt="mask: goblin", init_images=[image]), s, ("",))
    assert p.extra_generation_params["LD-ZNet error"] == reason and modules.shared.state.interrupted
    with pytest.raises(api.ApiError) as caught:
        api.check_generation({"prompt": "mask: goblin", "init_images": ["x"]}, True, host.check_ready)
    assert (caught.value.status, caught.value.detail) == (422, reason)
    modules.shared.state.__init__()
    p = processing.process_images(processing.StableDiffusionProcessingImg2Img(
        prompt="a goblin", init_images=[image]), s, ("",))
    assert "LD-ZNet error" not in p.extra_generation_params and p.batches_sampled == 1


def test_the_generation_check_reads_the_settings_a_request_overrides(tmp_path, monkeypatch):
    """override_settings applies to the request's job only (the host sets it before the scripts run):
    a head chosen there is the head the mask uses, so the pre-generation check judges that one, and a
    bad value there is a 422 naming override_settings instead of a failure mid-generation."""
    world.install(tmp_path)
    head = modules.shared.opts.data["ldznet_head"]
    modules.shared.opts.data["ldznet_head"] = "None"
    payload = {"prompt": "mask: goblin", "init_images": ["x"]}
    with pytest.raises(api.ApiError, match="no LD-ZNet head is selected"):
        register.guard_generation(payload, True)
    register.guard_generation({**payload, "override_settings": {"ldznet_head": head, "CLIP_stop_at_last_layers": 2}},
                              True)
    modules.shared.opts.data["ldznet_head"] = head
    with pytest.raises(api.ApiError) as caught:
        register.guard_generation({**payload, "override_settings": {"ldznet_timestep": "abc"}}, True)
    assert (caught.value.status, caught.value.detail) == (
        422, "override_settings: Settings > LD-ZNet: ldznet_timestep must be an integer in [-1, 999], got 'abc'")
    with pytest.raises(api.ApiError, match=r"^override_settings: Settings > LD-ZNet has no setting 'ldznet_hed'"):
        register.guard_generation({**payload, "override_settings": {"ldznet_hed": head}}, True)
    with pytest.raises(api.ApiError, match="head file 'missing.safetensors' not found"):
        register.guard_generation({**payload, "override_settings": {"ldznet_head": "missing.safetensors"}}, True)
    assert modules.shared.opts.data["ldznet_head"] == head  # only read, never set


def test_a_request_naming_a_checkpoint_is_not_judged_on_the_loaded_model(tmp_path, monkeypatch):
    """The host loads the named checkpoint for the job; the loaded one says nothing about the mask."""
    world.install(tmp_path)
    judged = []
    monkeypatch.setattr(host, "loaded_model", lambda: judged.append(1))
    payload = {"prompt": "mask: goblin", "init_images": ["x"]}
    register.guard_generation({**payload, "override_settings": {"sd_model_checkpoint": "other.safetensors"}}, True)
    assert judged == []
    register.guard_generation(payload, True)
    assert judged == [1]
    assert (api.names_a_checkpoint({"override_settings": {"sd_model_checkpoint": None}}),
            api.names_a_checkpoint({"override_settings": "x"}), api.names_a_checkpoint([])) == (False, False, False)


def test_a_bad_save_masks_setting_saves_nothing_and_says_why(tmp_path, capsys):
    world.install(tmp_path)
    modules.shared.opts.data["ldznet_save_masks"] = "yes"  # truthy: masks were saved
    s = script.LdznetScript()
    s.is_img2img = False
    p = processing.process_images(processing.StableDiffusionProcessingTxt2Img(prompt="mask: goblin"), s, ("",))
    from modules.scripts import PostprocessImageArgs

    s.postprocess_image_after_composite(p, PostprocessImageArgs(Image.new("RGB", (56, 40))), "")
    assert getattr(p, "_ldznet_pending", None) is None
    assert capsys.readouterr().err == ("LD-ZNet mask: mask not saved: Settings > LD-ZNet: ldznet_save_masks must be "
                                       "true or false, got 'yes'\n")


def test_a_bad_default_threshold_starts_the_controls_at_the_default(tmp_path, capsys):
    """The accordion and the tab are built whatever the settings hold (a traceback there loses the UI)."""
    world.install(tmp_path)
    modules.shared.opts.data["ldznet_threshold"] = "abc"
    assert host.control_default("ldznet_threshold") == 0.5
    assert capsys.readouterr().err == ("LD-ZNet: Settings > LD-ZNet: ldznet_threshold must be a number in [0, 1), "
                                       "got 'abc'; the controls start at its default, 0.5\n")
    modules.shared.opts.data["ldznet_threshold"] = 0.3
    assert host.control_default("ldznet_threshold") == 0.3 and capsys.readouterr().err == ""


def test_good_settings_read_as_before(tmp_path):
    world.install(tmp_path)
    modules.shared.opts.data.update({"ldznet_timestep": 250.0, "ldznet_resolution": 0, "ldznet_dtype": "fp32"})
    options = host.engine_options()
    assert (options.timestep, options.resolution, options.dtype, options.keep_on_gpu) == (250, None, "fp32", True)
    modules.shared.opts.data["ldznet_timestep"] = -1
    assert host.engine_options().timestep is None
    assert np.array_equal(host.compute(Image.new("RGB", (56, 40)), MaskJob("goblin")).mask.shape, (40, 56))
    modules.shared.opts.data["ldznet_mask_model"] = {"a": 1}  # unhashable: a TypeError in the lookup
    with pytest.raises(LdznetError, match=r"^Settings > LD-ZNet: ldznet_mask_model must be a file name, got \{'a': 1\}$"):
        host.setting("ldznet_mask_model")
    with pytest.raises(LdznetError, match="^Settings > LD-ZNet has no setting 'x'"):
        settings.checked("x", 1)


def test_a_head_name_too_long_for_the_file_system_is_not_found(tmp_path):
    """255 characters pass the setting's check, but as UTF-8 they are over the file system's 255 bytes:
    is_file() raises ENAMETOOLONG, which was a traceback (a 500 on the API)."""
    world.install(tmp_path)
    modules.shared.opts.data["ldznet_head"] = name = "\u00e9" * 200 + ".safetensors"
    with pytest.raises(api.ApiError) as caught:
        api.check_generation({"prompt": "mask: goblin", "init_images": ["x"]}, True, host.check_ready)
    assert caught.value.status == 409 and caught.value.detail.startswith(f"head file {name!r} not found in ")
