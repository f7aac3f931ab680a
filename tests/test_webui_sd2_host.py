"""Zero-shot masks from the host's own SD 2.x model (A1111's ldm LatentDiffusion, Forge's SD 2.x engine), eps
and v-prediction: the same masks as our StableDiffusion2 on the same weights, the host model untouched, and
the SD 2.x models that cannot serve them (inpainting, depth, unCLIP, TensorRT) refused by name."""
from __future__ import annotations

import sys
import types

import pytest
import torch

pytest.importorskip("ldm.modules.distributions.distributions")

from fake_webui import world  # noqa: E402  (first: it puts the fake `modules` on sys.path)
from fake_webui.sd2_models import FakeForgeSD2, fake_a1111_sd2, tiny_sd2  # noqa: E402
from fake_webui.zero_shot_host import (  # noqa: E402
    IMAGE, ZERO_SHOT, assert_host_zero_shot_is_ours, checked_forge_adapter, our_model)

# isort: split

import modules.shared  # noqa: E402

from ldznet_ext.backbones.a1111 import A1111Backbone, check_a1111_sd2_model  # noqa: E402
from ldznet_ext.backbones.forge import ForgeBackbone, check_forge_sd2_model  # noqa: E402
from ldznet_ext.errors import CheckpointError  # noqa: E402
from ldznet_ext.webui import host  # noqa: E402

HEAD_MODE = ("mode 'LD-ZNet head' works with any loaded model: it runs on the SD 1.x model set in "
             "Settings > LD-ZNet")


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_a1111_sd2_zero_shot_equals_our_sd2(tmp_path, prediction):
    sd = tiny_sd2(prediction)
    loaded = fake_a1111_sd2(sd)
    world.install(tmp_path, head=False, model=loaded)
    assert_host_zero_shot_is_ours(sd, loaded, lambda backbone: type(backbone) is A1111Backbone
                                  and backbone.sd_model is loaded)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_a1111_sd2_adapter_calls(prediction):
    import modules.devices

    sd = tiny_sd2(prediction)
    loaded = fake_a1111_sd2(sd)
    backbone = A1111Backbone(loaded, modules.devices)
    ours = our_model(sd, loaded.alphas_cumprod)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(backbone.encode_image(x), ours.encode_image(x))
        conditioning = backbone.encode_text(["a cat", ""])
        assert conditioning.context.shape == (2, 77, 64)
        assert torch.equal(conditioning.context, ours.encode_text(["a cat", ""]).context)
        z, t = ours.encode_image(x), torch.tensor([400, 10])
        eps = backbone.predict_noise(z, t, conditioning)
        assert torch.equal(eps, ours.predict_noise(z, t, conditioning))
        # v is converted: the raw UNet output is eps only for an eps model
        assert torch.equal(eps, loaded.apply_model(z, t, conditioning.context)) == (prediction == "eps")
    assert backbone.downsample_factor == 8 and len(backbone.layout.sites) == len(ours.layout.sites) == 16


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_forge_sd2_adapter_matches_our_sd2(prediction_type):
    engine = FakeForgeSD2(tiny_sd2("eps" if prediction_type == "epsilon" else "v"), prediction_type)
    backbone, ours, loads = checked_forge_adapter(engine, check_forge_sd2_model, ForgeBackbone)
    with torch.no_grad():
        conditioning = backbone.encode_text(["a cat", ""])
        assert torch.equal(conditioning.context, ours.encode_text(["a cat", ""]).context)
        z, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([400, 37])
        # sigma in and x0 out round the input: close, not bit-equal
        assert torch.allclose(backbone.predict_noise(z, t, conditioning), ours.predict_noise(z, t, conditioning),
                              atol=2e-4, rtol=1e-4)
    assert loads == [engine.forge_objects.unet]


def _forge_host(monkeypatch, engine) -> None:
    monkeypatch.setattr(host, "is_forge", lambda: True)
    monkeypatch.setattr(host, "_host_model", lambda: engine)
    monkeypatch.setattr(host, "loaded_model", lambda: engine)
    monkeypatch.setitem(sys.modules, "backend", types.SimpleNamespace(memory_management=types.SimpleNamespace(
        load_model_gpu=lambda patcher: None)))


def test_forge_host_serves_sd2_zero_shot_and_refuses_its_inpainting_model(tmp_path, monkeypatch):
    engine = FakeForgeSD2(tiny_sd2("v"), "v_prediction")
    world.install(tmp_path, head=False, model=engine)
    _forge_host(monkeypatch, engine)
    host.check_ready(ZERO_SHOT)
    with host.job_backbone(ZERO_SHOT) as backbone:
        assert type(backbone) is ForgeBackbone and backbone.sd_model is engine
    inpainting = FakeForgeSD2(tiny_sd2(in_channels=9))
    inpainting.is_inpaint = True
    _forge_host(monkeypatch, inpainting)
    message = ("the loaded model is an SD 2.x inpainting model (9 input channels); zero-shot masks need a "
               "text-to-image SD 2.x model: load the SD 2.x model it was made from. Zero-shot masks read the "
               f"loaded model's own features; {HEAD_MODE}")
    for call in (lambda: host.check_ready(ZERO_SHOT), lambda: host.compute(IMAGE, ZERO_SHOT)):
        with pytest.raises(CheckpointError) as error:
            call()
        assert str(error.value).startswith(message)
    inpainting.forge_objects.unet.model.predictor.prediction_type = "edm"
    inpainting.forge_objects.unet.model.diffusion_model = engine.forge_objects.unet.model.diffusion_model
    with pytest.raises(CheckpointError, match="^the loaded model predicts 'edm'; zero-shot masks need an eps- or v-"):
        check_forge_sd2_model(inpainting)


@pytest.mark.parametrize(("in_channels", "conditioning_key", "variant"), [
    (9, "hybrid", "an SD 2.x inpainting model (9 input channels)"),
    (5, "hybrid", "an SD 2.x depth model (5 input channels: a depth map beside the latent)"),
    (4, "crossattn-adm", "an SD 2.x unCLIP model (conditioned on an image embedding)"),
])
def test_a1111_sd2_models_conditioned_on_more_than_text_are_refused(tmp_path, in_channels, conditioning_key, variant):
    loaded = fake_a1111_sd2(tiny_sd2(in_channels=in_channels), conditioning_key)
    world.install(tmp_path, head=False, model=loaded)
    message = (f"the loaded model is {variant}; zero-shot masks need a text-to-image SD 2.x model: load the SD 2.x "
               f"model it was made from. Zero-shot masks read the loaded model's own features; {HEAD_MODE}")
    for call in (lambda: host.compute(IMAGE, ZERO_SHOT), lambda: host.check_ready(ZERO_SHOT)):
        with pytest.raises(CheckpointError) as error:
            call()
        assert str(error.value).startswith(message)
    assert modules.shared.sd_model is loaded


def test_a1111_sd2_tensorrt_and_other_predictions_are_refused():
    loaded = fake_a1111_sd2(tiny_sd2())
    check_a1111_sd2_model(loaded)
    trt = types.SimpleNamespace(option=types.SimpleNamespace(label="TRT"))
    with pytest.raises(CheckpointError, match="^the UNet is replaced by 'TRT' \\(TensorRT or another SD Unet\\)"):
        check_a1111_sd2_model(loaded, trt)
    loaded.parameterization = "x0"
    with pytest.raises(CheckpointError, match="^the loaded model predicts 'x0'; zero-shot masks need an eps- or v-"):
        check_a1111_sd2_model(loaded)
    loaded.is_sd2, loaded.is_sdxl = False, True
    with pytest.raises(CheckpointError, match="^the loaded model is SDXL, not SD 2.x$"):
        check_a1111_sd2_model(loaded)
