"""Head masks on host models that cannot serve the head (SDXL, SD 2.x, inpainting, v-prediction): the
separate SD 1.x mask model chosen among the host's checkpoints, its memory policy and unloading, the
refusals and the API pre-check, on the fake A1111."""
from __future__ import annotations

import re
import sys
import types
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")

from fake_webui import world  # noqa: E402  (first: it puts the fake `modules` on sys.path)
from fake_webui.models import FakeLatentDiffusion, tiny_sd  # noqa: E402

# isort: split

import modules.sd_models  # noqa: E402
import modules.shared  # noqa: E402
from modules import script_callbacks  # noqa: E402

from ldznet_ext.errors import CheckpointError  # noqa: E402
from ldznet_ext.heads import load_head, save_head  # noqa: E402
from ldznet_ext.job import MaskJob  # noqa: E402
from ldznet_ext.loading import load_segmenter  # noqa: E402
from ldznet_ext.sd.checkpoint import save_stable_diffusion  # noqa: E402
from ldznet_ext.sd.parts import SkippedPart  # noqa: E402
from ldznet_ext.webui import api, host, mask_model, register  # noqa: E402

IMAGE = (np.random.default_rng(3).random((40, 56, 3)) * 255).astype(np.uint8)
JOB = MaskJob("goblin OR sword", threshold=0.5)
HOSTS = {"SDXL": dict(is_sd1=False, is_sdxl=True), "SD 2.x": dict(is_sd1=False, is_sd2=True),
         "inpainting": dict(is_inpaint=True), "v-prediction": dict(parameterization="v")}
GUIDANCE = ("put an SD 1.5 .safetensors file (e.g. v1-5-pruned-emaonly.safetensors) into {folder} and press the "
            "refresh button beside Settings > LD-ZNet > 'SD 1.x model for masks when the loaded model is not SD 1.x'")


def _host_model(flags: dict) -> FakeLatentDiffusion:
    """A host model that is not the mask model (other weights), flagged as another family."""
    model = FakeLatentDiffusion(tiny_sd(seed=7)).eval()
    for name, value in flags.items():
        setattr(model, name, value)
    return model


def _checkpoints(tmp_path: Path) -> Path:
    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _sdxl_file(path: Path) -> None:
    """A file whose header says SDXL (its data is never read)."""
    save_file({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(2, 2),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(path))


@pytest.fixture
def sdxl_host(tmp_path):
    """The fake A1111 with an SDXL-flagged model loaded and the world's SD 1.x model as a checkpoint
    beside an SDXL file and a .ckpt (both left out of the list)."""
    world.install(tmp_path, model=_host_model(HOSTS["SDXL"]))
    folder = _checkpoints(tmp_path)
    _sdxl_file(folder / "a-sdxl.safetensors")
    (folder / "b-pickled.ckpt").write_bytes(b"not read")
    save_stable_diffusion(tiny_sd(), folder / "sd15.safetensors")
    modules.sd_models.list_models()
    return folder


def _generate(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        return model.apply_model(x, torch.tensor([500.0]), model.get_learned_conditioning(["a goblin"]))


def _cli_prediction(sd_file: Path, tmp_path: Path):
    """What `ldznet mask --model sd_file --head HEAD --resolution 64` computes for IMAGE and JOB."""
    segmenter = load_segmenter(sd_file, tmp_path / "models" / "ldznet" / world.HEAD_NAME, device="cpu",
                               dtype="fp32", resolution=64)
    segmenter.set_image(IMAGE)
    return segmenter.predict(JOB.tree(), JOB.mask_options())


def _scores(prediction) -> dict[str, float]:
    """Each term's presence score: read from its map before the found / not-found decision."""
    return {term: decision.score for term, decision in prediction.presence.items()}


@pytest.mark.parametrize("family", list(HOSTS))
def test_head_mode_on_a_host_that_cannot_serve_it_equals_the_cli(tmp_path, family):
    world.install(tmp_path, model=_host_model(HOSTS[family]))
    folder = _checkpoints(tmp_path)
    save_stable_diffusion(tiny_sd(), folder / "sd15.safetensors")
    modules.sd_models.list_models()
    loaded = modules.shared.sd_model
    state = {k: v.clone() for k, v in loaded.state_dict().items()}
    before = _generate(loaded)

    result = host.compute(IMAGE, JOB)

    expected = _cli_prediction(folder / "sd15.safetensors", tmp_path)
    assert torch.equal(result.prediction.probability, expected.probability)
    assert np.array_equal(result.mask, expected.mask_image())
    assert _scores(result.prediction) == _scores(expected) and len(_scores(expected)) == 2
    separate = host.engine().mask_model.loaded
    assert isinstance(separate.unet.output_blocks[6], SkippedPart) and isinstance(separate.vae.decoder, SkippedPart)
    assert separate.dtype == torch.float32  # the host UNet's precision (fake: --no-half)
    assert torch.equal(_generate(loaded), before)
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    for name, value in dict(is_sd1=True, is_sdxl=False, is_sd2=False, is_inpaint=False, parameterization="eps").items():
        setattr(loaded, name, value)  # now an SD 1.x host: its own model serves the head, with other weights
    assert _scores(host.compute(IMAGE, JOB).prediction) != _scores(result.prediction)


def test_zero_shot_on_flux_is_refused_with_a_pointer_to_head_mode(sdxl_host):
    modules.shared.sd_model.is_sdxl, modules.shared.sd_model.is_flux = False, True  # SDXL serves zero-shot itself
    message = ("is Flux; LD-ZNet reads the features of SD 1.x UNets (for zero-shot masks also of SD 2.x and "
               "SDXL-family ones). Zero-shot masks read the "
               "loaded model's own features; mode 'LD-ZNet head' works with any loaded model: it runs on the SD 1.x "
               "model set in Settings > LD-ZNet > 'SD 1.x model for masks when the loaded model is not SD 1.x'")
    zero_shot = MaskJob("goblin", "zero-shot")
    with pytest.raises(CheckpointError, match=re.escape(message) + "$"):
        host.compute(IMAGE, zero_shot)
    with pytest.raises(api.ApiError) as refused:
        api.check_generation({"init_images": ["x"], "alwayson_scripts": {
            "ld-znet mask": {"args": ["goblin", "zero-shot"]}}}, True, host.check_ready)
    assert refused.value.status == 409 and refused.value.detail.endswith(message)
    assert host.engine().mask_model.loaded is None


def test_no_sd1_file_gives_the_exact_guidance_before_generating(tmp_path):
    world.install(tmp_path, model=_host_model(HOSTS["SDXL"]))
    folder = _checkpoints(tmp_path)
    _sdxl_file(folder / "xl.safetensors")
    modules.sd_models.list_models()
    expected = ("the loaded model cannot serve the LD-ZNet head (the loaded model is SDXL); head mode then runs on a "
                "separate SD 1.x model, and none of the WebUI's checkpoints is one: "
                + GUIDANCE.format(folder=tmp_path / "models" / "Stable-diffusion"))
    with pytest.raises(CheckpointError) as error:
        host.compute(IMAGE, JOB)
    assert str(error.value) == expected
    with pytest.raises(api.ApiError) as refused:
        api.check_generation({"init_images": ["x"], "alwayson_scripts": {"ld-znet mask": {"args": ["goblin"]}}},
                             True, host.check_ready)
    assert (refused.value.status, refused.value.detail) == (409, expected)
    save_stable_diffusion(tiny_sd(), folder / "sd15.safetensors")
    modules.sd_models.list_models()  # what the refresh button does
    host.check_ready(JOB)


def test_the_choices_and_the_automatic_default(sdxl_host, tmp_path, monkeypatch):
    from ldznet_ext.webui import settings

    save_stable_diffusion(tiny_sd(), sdxl_host / "0-first.safetensors")
    whole = (sdxl_host / "0-first.safetensors").read_bytes()
    (sdxl_host / "0-a-partial-download.safetensors").write_bytes(whole[:len(whole) // 2])  # never offered
    modules.sd_models.list_models()
    assert settings.mask_model_choices() == ["automatic", "0-first.safetensors", "sd15.safetensors"]
    head = tmp_path / "models" / "ldznet" / world.HEAD_NAME
    no_training = host.mask_model_path(CheckpointError("x is SDXL; ..."))
    assert no_training == sdxl_host / "0-first.safetensors"
    save_head(*load_head(head), head, training={"sd_model": "sd15.safetensors"})
    assert host.mask_model_path(CheckpointError("x is SDXL; ...")) == sdxl_host / "sd15.safetensors"
    modules.shared.opts.data[mask_model.SETTING] = "0-first.safetensors"
    assert host.mask_model_path(CheckpointError("x is SDXL; ...")) == sdxl_host / "0-first.safetensors"
    modules.shared.opts.data[mask_model.SETTING] = "gone.safetensors"
    with pytest.raises(CheckpointError, match="is 'gone.safetensors', which is not among the WebUI's SD 1.x "
                                              "checkpoints \\(0-first.safetensors, sd15.safetensors\\)"):
        host.compute(IMAGE, JOB)


def test_setting_change_reload_ui_and_unload_release_it(sdxl_host, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", types.SimpleNamespace(Dropdown=object, Slider=object, Radio=object))
    monkeypatch.setattr(script_callbacks, "callbacks", defaultdict(list))
    register.register()
    for callback in script_callbacks.callbacks["ui_settings"]:
        callback()
    separate = host.engine().mask_model
    host.compute(IMAGE, JOB)
    first = separate.loaded
    host.compute(IMAGE, JOB)
    assert first is not None and separate.loaded is first  # kept between masks
    modules.shared.opts.set(mask_model.SETTING, "sd15.safetensors")
    assert separate.loaded is None
    host.compute(IMAGE, JOB)
    for callback in script_callbacks.callbacks["script_unloaded"]:  # Reload UI
        callback()
    assert separate.loaded is None and host.engine()._head is None
    host.compute(IMAGE, JOB)
    from ldznet_ext.webui import ui

    assert "unloaded" in ui.unload_models() and separate.loaded is None
    host.compute(IMAGE, JOB)
    for callback in script_callbacks.callbacks["model_loaded"]:  # another SDXL model: kept
        callback(_host_model(HOSTS["SDXL"]))
    assert separate.loaded is not None and host.engine()._head is None
    for callback in script_callbacks.callbacks["model_loaded"]:  # an SD 1.x model serves the head itself
        callback(world.fake_model())
    assert separate.loaded is None


@pytest.mark.parametrize("keep_on_gpu, flag, rests", [(True, None, False), (False, None, True), (True, "medvram", True),
                                                      (True, "lowvram", True), (True, "medvram_sdxl", True)])
def test_memory_policy_between_jobs(sdxl_host, monkeypatch, keep_on_gpu, flag, rests):
    modules.shared.opts.data["ldznet_keep_on_gpu"] = keep_on_gpu
    if flag:
        monkeypatch.setattr(modules.shared.cmd_opts, flag, True)
    calls = []
    monkeypatch.setattr(mask_model.SeparateModel, "rest", lambda self: calls.append("rest"))
    host.compute(IMAGE, JOB)
    assert calls == (["rest"] if rests else [])
    assert not mask_model.rests_on_cpu(True, types.SimpleNamespace(medvram_sdxl=True), "sd2")


def test_make_room_is_asked_before_moving_to_a_gpu(sdxl_host):
    asked = []
    separate = mask_model.SeparateModel()
    path = sdxl_host / "sd15.safetensors"
    model = separate.get(path, torch.device("cpu"), torch.float16, lambda n, d: asked.append((n, d)))
    assert asked == [] and model.dtype == torch.float32  # fp16 on the CPU computes in fp32
    size = mask_model.model_bytes(model)
    separate.get(path, torch.device("meta"), torch.float32, lambda n, d: asked.append((n, d)))
    assert asked == [(size, torch.device("meta"))]
    separate.get(path, torch.device("meta"), torch.float32, lambda n, d: asked.append((n, d)))
    assert len(asked) == 1  # already there


def test_forge_makes_room_through_its_memory_manager(monkeypatch):
    freed = []
    memory_management = types.SimpleNamespace(minimum_inference_memory=lambda: 100,
                                              free_memory=lambda size, device: freed.append((size, device)))
    monkeypatch.setitem(sys.modules, "backend", types.SimpleNamespace(memory_management=memory_management))
    monkeypatch.setattr(host, "is_forge", lambda: True)
    engine = types.SimpleNamespace(forge_objects=types.SimpleNamespace(unet=types.SimpleNamespace(
        load_device="cpu", model=types.SimpleNamespace(computation_dtype=torch.bfloat16))))
    device, dtype, make_room = host._placement(engine)
    make_room(10, device)
    assert (device, dtype, freed) == (torch.device("cpu"), torch.bfloat16, [(110, torch.device("cpu"))])


def test_forge_without_a_unet_patcher_computes_in_its_computation_dtype_not_its_fp8_storage(monkeypatch):
    memory_management = types.SimpleNamespace(get_torch_device=lambda: "cpu",
                                              unet_dtype=lambda *a, **k: torch.float8_e4m3fn,
                                              get_computation_dtype=lambda device, *a, **k: torch.bfloat16)
    monkeypatch.setitem(sys.modules, "backend", types.SimpleNamespace(memory_management=memory_management))
    monkeypatch.setattr(host, "is_forge", lambda: True)
    device, dtype, _ = host._placement(types.SimpleNamespace())
    assert (device, dtype) == (torch.device("cpu"), torch.bfloat16)
