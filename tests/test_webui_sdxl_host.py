"""Zero-shot masks from the host's own SDXL-family model (A1111's sgm DiffusionEngine, Forge's engine):
the same masks as our StableDiffusionXL on the same weights, the host model untouched, refusals."""
from __future__ import annotations

import sys
import types

import pytest
import torch

pytest.importorskip("ldm.modules.distributions.distributions")

from fake_webui import world  # noqa: E402  (first: it puts the fake `modules` on sys.path)
from fake_webui.sdxl_models import FakeDiffusionEngine, FakeForgeSDXL, tiny_sdxl  # noqa: E402
from fake_webui.zero_shot_host import (  # noqa: E402
    IMAGE, ZERO_SHOT, assert_host_zero_shot_is_ours, checked_forge_adapter, our_model)

# isort: split

import modules.shared  # noqa: E402

from ldznet_ext.backbones.a1111_sdxl import A1111SDXLBackbone, check_a1111_sdxl_model  # noqa: E402
from ldznet_ext.backbones.forge_sdxl import ForgeSDXLBackbone, check_forge_sdxl_model  # noqa: E402
from ldznet_ext.errors import CheckpointError  # noqa: E402
from ldznet_ext.webui import host  # noqa: E402



@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_a1111_sdxl_zero_shot_equals_our_sdxl(tmp_path, parameterization):
    sd = tiny_sdxl("eps" if parameterization == "eps" else "v")
    loaded = FakeDiffusionEngine(sd, parameterization).eval()
    world.install(tmp_path, head=False, model=loaded)
    assert_host_zero_shot_is_ours(sd, loaded, lambda backbone: isinstance(backbone, A1111SDXLBackbone)
                                  and backbone.size_dim == 8)


def test_a1111_sdxl_adapter_calls(tmp_path):
    import modules.devices

    sd = tiny_sdxl()
    loaded = FakeDiffusionEngine(sd).eval()
    backbone = A1111SDXLBackbone(loaded, modules.devices)
    ours = our_model(sd, loaded.alphas_cumprod)
    x = torch.rand(2, 3, 32, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(backbone.encode_image(x), ours.encode_image(x))
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        assert torch.equal(backbone.encode_image(x, sample=True, generator=g1),
                           ours.encode_image(x, sample=True, generator=g2))
        conditioning, expected = backbone.encode_text(["a cat", ""]), ours.encode_text(["a cat", ""])
        assert torch.equal(conditioning.context, expected.context) and torch.equal(conditioning.pooled, expected.pooled)
        z, t = ours.encode_image(x), torch.tensor([400, 10])
        assert torch.equal(backbone.predict_noise(z, t, conditioning), ours.predict_noise(z, t, expected))
    assert backbone.downsample_factor == 8 and len(backbone.layout.sites) == len(ours.layout.sites) == 11
    assert backbone.text_wrapper() is loaded.conditioner.embedders[0]  # whose tokenize_line places the tokens


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_forge_sdxl_adapter_matches_our_sdxl(prediction_type):
    engine = FakeForgeSDXL(tiny_sdxl("eps" if prediction_type == "epsilon" else "v"), prediction_type)
    backbone, ours, loads = checked_forge_adapter(engine, check_forge_sdxl_model, ForgeSDXLBackbone)
    engine.text_processing_engine_l = types.SimpleNamespace(tokenize_line=lambda line: ([], 4))
    assert backbone.token_spans(["a cat"]) == [(1, 5)]  # the ViT-L engine places the tokens
    with torch.no_grad():
        conditioning, expected = backbone.encode_text(["a cat", ""]), ours.encode_text(["a cat", ""])
        assert torch.equal(conditioning.context, expected.context) and torch.equal(conditioning.pooled, expected.pooled)
        z, t = torch.randn(2, 4, 4, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([400, 37])
        eps = backbone.predict_noise(z, t, conditioning)
        # sigma in and x0 out round the input: close, not bit-equal
        assert torch.allclose(eps, ours.predict_noise(z, t, expected), atol=2e-4, rtol=1e-4)
    assert loads == [engine.forge_objects.unet]


def test_forge_host_serves_sdxl_zero_shot(tmp_path, monkeypatch):
    engine = FakeForgeSDXL(tiny_sdxl())
    world.install(tmp_path, head=False, model=engine)
    monkeypatch.setattr(host, "is_forge", lambda: True)
    monkeypatch.setattr(host, "_host_model", lambda: engine)
    monkeypatch.setitem(sys.modules, "backend", types.SimpleNamespace(memory_management=types.SimpleNamespace(
        load_model_gpu=lambda patcher: None)))
    with host.job_backbone(ZERO_SHOT) as backbone:
        assert isinstance(backbone, ForgeSDXLBackbone) and backbone.sd_model is engine
    engine.text_processing_engine_l = None
    del engine.text_processing_engine_l  # Forge's refiner engine has bigG only
    with pytest.raises(CheckpointError, match="^the loaded model is an SDXL refiner .*mode 'LD-ZNet head' works"):
        with host.job_backbone(ZERO_SHOT):
            pass


def test_sdxl_models_zero_shot_cannot_read(tmp_path):
    loaded = FakeDiffusionEngine(tiny_sdxl()).eval()
    world.install(tmp_path, head=False, model=loaded)
    loaded.is_sdxl_inpaint = True
    with pytest.raises(CheckpointError, match="is an SDXL inpainting model \\(4 input channels\\)"):
        check_a1111_sdxl_model(loaded)
    loaded.is_sdxl_inpaint = False
    loaded.conditioner.embedders[-1].input_key = "aesthetic_score"
    with pytest.raises(CheckpointError, match="has no SDXL size conditioning \\(an SDXL refiner\\?\\)"):
        host.compute(IMAGE, ZERO_SHOT)
    loaded.conditioner.embedders[-1].input_key = "target_size_as_tuple"
    with pytest.raises(CheckpointError, match="TensorRT"):
        check_a1111_sdxl_model(loaded, types.SimpleNamespace(option=types.SimpleNamespace(label="TRT")))
    loaded.parameterization = "edm"
    with pytest.raises(CheckpointError, match="predicts 'edm'"):
        check_a1111_sdxl_model(loaded)


@pytest.mark.parametrize("flag, family", [("is_sd3", "SD 3"), ("is_flux", "Flux")])
def test_zero_shot_without_an_sdxl_unet_points_to_head_mode(tmp_path, flag, family):
    loaded = FakeDiffusionEngine(tiny_sdxl()).eval()
    loaded.is_sdxl = False
    setattr(loaded, flag, True)
    world.install(tmp_path, head=False, model=loaded)
    message = (f"the loaded model is {family}; LD-ZNet reads the features of SD 1.x UNets (for zero-shot masks "
               "also of SD 2.x and SDXL-family ones). "
               "Zero-shot masks read the loaded model's own features; mode 'LD-ZNet head' works with any loaded "
               "model: it runs on the SD 1.x model set in Settings > LD-ZNet")
    for call in (lambda: host.compute(IMAGE, ZERO_SHOT), lambda: host.check_ready(ZERO_SHOT)):
        with pytest.raises(CheckpointError) as error:
            call()
        assert str(error.value).startswith(message)
    assert modules.shared.sd_model is loaded
