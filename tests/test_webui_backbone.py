"""The host adapters on ldm's real UNetModel (A1111) and on a Forge-style KModel: same numbers as
the model's own calls, refusals, and a host model left exactly as it was after masks, also failed ones."""
from __future__ import annotations

import contextlib
import sys
import types

import numpy as np
import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")

from fake_webui import lora, world  # noqa: E402
from fake_webui.models import FakeLatentDiffusion  # noqa: E402

from ldznet_ext.backbones.a1111 import A1111Backbone, check_a1111_model  # noqa: E402
from ldznet_ext.backbones.base import Conditioning  # noqa: E402
from ldznet_ext.backbones.forge import ForgeBackbone, check_forge_model  # noqa: E402
from ldznet_ext import zeroshot  # noqa: E402
from ldznet_ext.errors import CheckpointError, LdznetError  # noqa: E402
from ldznet_ext.job import MODES, MaskJob  # noqa: E402
from ldznet_ext.sd.tokenizer import term_token_spans  # noqa: E402
from ldznet_ext.webui import host  # noqa: E402

IMAGE = (np.random.default_rng(3).random((40, 56, 3)) * 255).astype(np.uint8)


@pytest.fixture
def fake(tmp_path):
    world.install(tmp_path)
    return world.fake_model()


def _backbone(model) -> A1111Backbone:
    import modules.devices

    return A1111Backbone(model, modules.devices)


def test_a1111_adapter_matches_the_model(fake):
    backbone = _backbone(fake)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = backbone.encode_image(x)
    assert torch.equal(z, fake.encode_first_stage(x).mode() * 0.18215)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(backbone.encode_image(x, sample=True, generator=g1), backbone.encode_image(x, sample=True, generator=g2))
    context = backbone.encode_text(["a cat", "a dog"])
    t = torch.tensor([400, 10])
    assert torch.equal(backbone.predict_noise(z, t, context), fake.model.diffusion_model(z, t, context=context.context))
    assert torch.equal(backbone.schedule.alphas_cumprod, fake.alphas_cumprod.double())
    assert backbone.downsample_factor == 8 and backbone.unet is fake.model.diffusion_model


def _generate(model) -> Tensor:
    """A UNet call as a sampler makes it, with a fixed seed."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        return model.apply_model(x, torch.tensor([500.0]), model.get_learned_conditioning(["a goblin"]))


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("mode", ["LD-ZNet head", "zero-shot"])
def test_generation_is_bit_identical_after_masks_and_failures(fake, mode, monkeypatch):
    before_state = {k: v.clone() for k, v in fake.state_dict().items()}
    grads = [p.requires_grad for p in fake.parameters()]
    before = _generate(fake)
    hooks = _hook_count(fake)
    result = host.compute(IMAGE, MaskJob("goblin OR sword", mode, threshold=0.3))
    assert result.mask.shape == (40, 56) and result.mask.dtype == np.uint8
    assert _hook_count(fake) == hooks
    assert torch.equal(_generate(fake), before)

    calls = []

    def exploding_head(*args, **kwargs):  # fails inside the UNet call, with the tap's hooks installed
        calls.append(_hook_count(fake))
        raise RuntimeError("boom")

    if mode == "LD-ZNet head":
        engine_head = host.engine()._head[0]
        monkeypatch.setattr(engine_head.__class__, "forward", exploding_head)
        with pytest.raises(RuntimeError, match="boom"):
            host.compute(IMAGE, MaskJob("goblin", mode))
        monkeypatch.undo()
    unet = fake.model.diffusion_model
    block = unet.output_blocks[3][1]
    handle = block.register_forward_hook(lambda *a: exploding_head())
    with pytest.raises(RuntimeError, match="boom"):
        host.compute(IMAGE, MaskJob("dragon", mode))
    handle.remove()
    assert calls and calls[-1] > hooks  # the tap's hooks were in place when it failed...
    assert _hook_count(fake) == hooks  # ...and are gone now
    assert torch.equal(_generate(fake), before)
    assert all(torch.equal(v, before_state[k]) for k, v in fake.state_dict().items())
    assert [p.requires_grad for p in fake.parameters()] == grads and not fake.training


def test_masks_are_deterministic(fake):
    request = MaskJob("goblin", threshold=0.2)
    first = host.compute(IMAGE, request)
    host.release()
    second = host.compute(IMAGE, request)
    assert np.array_equal(first.mask, second.mask)
    assert torch.equal(first.prediction.probability, second.prediction.probability)


def test_masks_ignore_the_networks_the_last_generation_left(fake, monkeypatch):
    """A1111 applies a prompt's LoRAs after the scripts' ``process`` (where ``mask:`` runs) and leaves them
    applied after the generation: a mask comes from the checkpoint alone, and the next generation still
    gets the networks it asked for."""
    import modules.shared

    monkeypatch.setitem(sys.modules, host.A1111_LORA_MODULE, lora)
    hypernetworks = ["a hypernetwork"]
    monkeypatch.setattr(modules.shared, "loaded_hypernetworks", hypernetworks, raising=False)
    names = [name for name, module in fake.named_modules()  # where A1111's Lora reaches: UNet and text encoder
             if isinstance(module, (nn.Linear, nn.Conv2d)) and not name.startswith("first_stage_model")]
    g = torch.Generator().manual_seed(7)
    weights = {name: fake.get_submodule(name).weight for name in names}
    network = lora.Network("goblin-style", {name: torch.randn(w.shape, generator=g) * w.std()
                                            for name, w in weights.items()})
    checkpoint = {name: w.detach().clone() for name, w in weights.items()}
    job = MaskJob("goblin", threshold=0.2, presence=False)  # the map itself, not a found/not-found decision
    with lora.attached(fake, names):
        plain = host.compute(IMAGE, job).prediction.probability
        base = _generate(fake)
        lora.loaded_networks.append(network)  # a generation with <lora:goblin-style:1> ran
        styled = _generate(fake)
        assert not torch.equal(styled, base)
        with host.checkpoint_only(fake):  # put back before any call: what a captured graph replays
            assert lora.loaded_networks == [] and modules.shared.loaded_hypernetworks == []
            assert all(torch.equal(w, checkpoint[name]) for name, w in weights.items())
        assert torch.equal(host.compute(IMAGE, job).prediction.probability, plain)
        assert lora.loaded_networks == [network] and modules.shared.loaded_hypernetworks == ["a hypernetwork"]
        assert torch.equal(_generate(fake), styled)
        with monkeypatch.context() as unguarded:  # the network does move masks where it is left applied
            unguarded.setattr(host, "checkpoint_only", lambda sd_model: contextlib.nullcontext())
            assert not torch.equal(host.compute(IMAGE, job).prediction.probability, plain)  # masks are bit-exact
    assert names and torch.equal(_generate(fake), base)


@pytest.mark.parametrize("setting", ["Default", "Zero Terminal SNR"])
def test_a1111_schedule_is_the_models_own_not_the_last_generations(fake, monkeypatch, setting):
    """A1111 rewrites ``alphas_cumprod`` at every generation from ``alphas_cumprod_original`` (cast to fp16
    by its setting for old seeds): masks read the original, rescaled when "Noise schedule for sampling" says
    zero terminal SNR, whatever the last generation left."""
    import modules.shared

    from ldznet_ext.sd.schedule import rescale_zero_terminal_snr

    original = fake.alphas_cumprod
    monkeypatch.setitem(modules.shared.opts.data, "sd_noise_schedule", setting)
    expected = rescale_zero_terminal_snr(original) if setting == "Zero Terminal SNR" else original.double()
    fake.alphas_cumprod_original, fake.alphas_cumprod = original, original.half().float()  # a downcasting generation
    try:
        for mode in MODES:
            with host.job_backbone(MaskJob("cat", mode=mode)) as backbone:
                assert torch.equal(backbone.schedule.alphas_cumprod, expected)
    finally:
        fake.alphas_cumprod = original
        del fake.alphas_cumprod_original


def test_refusals(fake):
    cases = [(dict(is_sd1=False, is_sdxl=True), "is SDXL"), (dict(is_sd1=False, is_sd2=True), "is SD 2.x"),
             (dict(parameterization="v"), "predicts 'v'")]
    for flags, message in cases:
        model = types.SimpleNamespace(**{**vars(fake), "model": fake.model, **flags})
        with pytest.raises(CheckpointError, match=message):
            check_a1111_model(model)
    inpainting = FakeLatentDiffusion.__new__(FakeLatentDiffusion)
    nn.Module.__init__(inpainting)
    inpainting.model = types.SimpleNamespace(diffusion_model=types.SimpleNamespace(
        input_blocks=[[nn.Conv2d(9, 32, 3)]]))
    with pytest.raises(CheckpointError, match="inpainting model \\(9 input channels\\)"):
        check_a1111_model(inpainting)
    trt = types.SimpleNamespace(option=types.SimpleNamespace(label="[TRT] tiny"))
    with pytest.raises(CheckpointError, match="TensorRT.*SD Unet to None"):
        check_a1111_model(fake, trt)
    with pytest.raises(CheckpointError, match="no Stable Diffusion model is loaded"):
        check_a1111_model(None)


def test_missing_and_mismatched_heads(tmp_path):
    world.install(tmp_path, head=False)
    with pytest.raises(LdznetError, match="no LD-ZNet head is selected"):
        host.compute(IMAGE, MaskJob("cat"))
    import modules.shared

    modules.shared.opts.data["ldznet_head"] = "gone.safetensors"
    with pytest.raises(CheckpointError, match="'gone.safetensors' not found"):
        host.compute(IMAGE, MaskJob("cat"))
    world.install(tmp_path)
    other = FakeLatentDiffusion(_wider_sd())
    import modules.sd_models

    modules.sd_models.model_data.sd_model = other
    with pytest.raises(CheckpointError, match="made for a different SD model.*model_channels 32 vs 64"):
        host.compute(IMAGE, MaskJob("cat"))


def _wider_sd():
    from ldznet_ext.sd.model import StableDiffusion
    from ldznet_ext.sd.text import TextEncoder, text_config
    from ldznet_ext.sd.unet import UNetModel, unet_config
    from ldznet_ext.sd.vae import AutoencoderKL

    from fake_webui.models import WEBUI_VAE

    return StableDiffusion(UNetModel(unet_config("tiny", model_channels=64)), AutoencoderKL(WEBUI_VAE),
                           TextEncoder.from_config(text_config("tiny"))).eval()


class _Predictor(nn.Module):
    """Forge's k_prediction.Prediction (eps) for SD 1.x's schedule: sigma <-> t, input scaling, x0."""

    prediction_type = "epsilon"

    def __init__(self, alphas_cumprod: Tensor):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.set_sigmas(((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5)

    def set_sigmas(self, sigmas: Tensor) -> None:
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())

    def timestep(self, sigma: Tensor) -> Tensor:
        return (sigma.log()[None] - self.log_sigmas[:, None]).abs().argmin(dim=0)


class _KModel(nn.Module):
    """Forge's KModel.apply_model for an eps model: sigma in, denoised x0 out."""

    def __init__(self, unet: nn.Module, alphas_cumprod: Tensor):
        super().__init__()
        self.diffusion_model = unet
        self.predictor = _Predictor(alphas_cumprod)
        self.computation_dtype = torch.float32

    def apply_model(self, x, t, c_crossattn=None, **kwargs):
        sigma = t.view(-1, 1, 1, 1)
        out = self.diffusion_model(x / (sigma ** 2 + 1) ** 0.5, self.predictor.timestep(t).float(), context=c_crossattn)
        return x - out.float() * sigma


def _assert_noise_is_the_unets(fake, backbone: ForgeBackbone) -> None:
    """The adapter's eps at two timesteps is what the UNet predicts for z_t at those timesteps."""
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([400, 37])
    context = fake.get_learned_conditioning(["a", "b"])
    with torch.no_grad():
        expected = fake.model.diffusion_model(z, t, context=context)
    assert torch.allclose(backbone.predict_noise(z, t, Conditioning(context)), expected, atol=2e-4, rtol=1e-4)


def test_zero_shot_reads_a_term_where_the_hosts_text_wrapper_puts_it(fake, monkeypatch):
    """A textual-inversion embedding takes as many positions as it has vectors (A1111's and Forge's
    tokenize_line count them), not the pieces SD's tokenizer makes of its name; a wrapper without
    tokenize_line keeps SD's tokenizer's spans."""
    backbone = _backbone(fake)
    assert zeroshot.token_spans(backbone, ["red ball", ""]) == term_token_spans(["red ball", ""]) == [(1, 3), (1, 1)]
    counts = {"ldznetkitty": 2, "red ball": 2, "a" * 400: 90}
    monkeypatch.setattr(fake.cond_stage_model, "tokenize_line", lambda line: ([], counts[line]), raising=False)
    assert zeroshot.token_spans(backbone, list(counts)) == [(1, 3), (1, 3), (1, 76)]  # the first chunk's 75
    assert term_token_spans(["ldznetkitty"]) != [(1, 3)]
    kmodel = _KModel(fake.model.diffusion_model, fake.alphas_cumprod)
    engine = types.SimpleNamespace(text_processing_engine=types.SimpleNamespace(tokenize_line=lambda line: ([], 1)),
                                   forge_objects=types.SimpleNamespace(unet=types.SimpleNamespace(model=kmodel)))
    assert zeroshot.token_spans(ForgeBackbone(engine, None), ["ldznetkitty"]) == [(1, 2)]


def test_forge_adapter_converts_x0_to_eps(fake):
    kmodel = _KModel(fake.model.diffusion_model, fake.alphas_cumprod)
    loads = []
    engine = types.SimpleNamespace(forge_objects=types.SimpleNamespace(
        unet=types.SimpleNamespace(model=kmodel, load_device="cpu")), is_sd1=True, is_inpaint=False)
    check_forge_model(engine)
    backbone = ForgeBackbone(engine, loads.append)
    _assert_noise_is_the_unets(fake, backbone)
    assert loads == [engine.forge_objects.unet]
    engine.is_inpaint = True
    with pytest.raises(CheckpointError, match="inpainting model"):
        check_forge_model(engine)
    with pytest.raises(CheckpointError, match="is SDXL"):
        check_forge_model(types.SimpleNamespace(forge_objects=object(), is_sd1=False, is_sdxl=True))


def test_forge_masks_run_on_the_unpatched_model(fake, monkeypatch):
    """Forge leaves the last generation's LoRA patchers in ``forge_objects`` until its next generation
    starts from ``forge_objects_original``: a mask job runs on the original parts and puts the others back."""
    import modules.sd_models

    kmodel = _KModel(fake.model.diffusion_model, fake.alphas_cumprod)

    class Parts(types.SimpleNamespace):
        def shallow_copy(self):
            return Parts(**vars(self))

    original = Parts(unet=types.SimpleNamespace(model=kmodel, load_device="cpu"), clip="clip")
    patched = Parts(unet=types.SimpleNamespace(model=kmodel, load_device="cpu"), clip="clip with a LoRA")
    engine = types.SimpleNamespace(forge_objects=patched, forge_objects_original=original, is_sd1=True,
                                   is_inpaint=False)
    loads = []
    monkeypatch.setattr(host, "is_forge", lambda: True)
    monkeypatch.setattr(modules.sd_models, "forge_model_reload", lambda: (engine, False), raising=False)
    monkeypatch.setitem(sys.modules, "backend", types.SimpleNamespace(
        memory_management=types.SimpleNamespace(load_model_gpu=loads.append)))
    with host.job_backbone(MaskJob("cat", mode="zero-shot")) as backbone:
        assert backbone.patcher is original.unet and engine.forge_objects.clip == "clip"
        assert engine.forge_objects is not original  # a copy: the job cannot change Forge's own
    assert engine.forge_objects is patched
    with pytest.raises(RuntimeError, match="boom"), host.job_backbone(MaskJob("cat", mode="zero-shot")):
        raise RuntimeError("boom")
    assert engine.forge_objects is patched


@pytest.mark.parametrize("marker, setting", [(True, "Default"), (False, "Zero Terminal SNR")])
def test_forge_zero_terminal_snr_schedule(fake, monkeypatch, marker, setting):
    """A model Forge samples with zero terminal SNR (its file's marker, or the setting): the rescaled schedule,
    and the predictor's sigma table rescaled for the call only, so that the UNet sees the timestep asked for."""
    import modules.shared
    import modules.sd_models

    from ldznet_ext.sd.schedule import rescale_zero_terminal_snr

    kmodel = _KModel(fake.model.diffusion_model, fake.alphas_cumprod)
    parts = types.SimpleNamespace(unet=types.SimpleNamespace(model=kmodel, load_device="cpu"))
    engine = types.SimpleNamespace(forge_objects=parts, is_sd1=True, is_inpaint=False,
                                   model_config=types.SimpleNamespace(ztsnr=marker))
    monkeypatch.setattr(host, "is_forge", lambda: True)
    monkeypatch.setattr(modules.sd_models, "forge_model_reload", lambda: (engine, False), raising=False)
    monkeypatch.setitem(sys.modules, "backend", types.SimpleNamespace(
        memory_management=types.SimpleNamespace(load_model_gpu=lambda patcher: None)))
    monkeypatch.setitem(modules.shared.opts.data, "sd_noise_schedule", setting)
    sigmas = kmodel.predictor.sigmas
    with host.job_backbone(MaskJob("cat", mode="zero-shot")) as backbone:
        assert backbone.zero_terminal_snr
        assert torch.equal(backbone.schedule.alphas_cumprod, rescale_zero_terminal_snr(fake.alphas_cumprod))
        _assert_noise_is_the_unets(fake, backbone)
    assert kmodel.predictor.sigmas is sigmas
    modules.shared.opts.data["sd_noise_schedule"] = "Default"
    engine.model_config.ztsnr = False
    with host.job_backbone(MaskJob("cat", mode="zero-shot")) as backbone:
        assert not backbone.zero_terminal_snr
        assert torch.equal(backbone.schedule.alphas_cumprod, fake.alphas_cumprod.double())


def test_forge_model_is_loaded_lazily(fake, monkeypatch):
    """Forge's ``sd_model`` is a placeholder until something loads the selected checkpoint (and the
    previous model after the setting changed): validation never loads it, a mask computation does."""
    import sys

    import modules.sd_models

    kmodel = _KModel(fake.model.diffusion_model, fake.alphas_cumprod)
    engine = types.SimpleNamespace(forge_objects=types.SimpleNamespace(
        unet=types.SimpleNamespace(model=kmodel, load_device="cpu")), is_sd1=True, is_inpaint=False)
    data = types.SimpleNamespace(sd_model=types.SimpleNamespace(chunk_length=75), forge_hash="",
                                 forge_loading_parameters={"checkpoint_info": "sd15.safetensors"})
    reloads = []

    def forge_model_reload():
        reloads.append(str(data.forge_loading_parameters))
        data.sd_model, data.forge_hash = engine, str(data.forge_loading_parameters)
        return engine, True

    monkeypatch.setattr(host, "is_forge", lambda: True)
    monkeypatch.setattr(modules.sd_models, "model_data", data)
    monkeypatch.setattr(modules.sd_models, "forge_model_reload", forge_model_reload, raising=False)
    monkeypatch.setitem(sys.modules, "backend", types.SimpleNamespace(memory_management=types.SimpleNamespace(
        load_model_gpu=lambda patcher: None)))
    zero_shot = MaskJob("cat", mode="zero-shot")
    host.check_ready(zero_shot)
    assert reloads == [] and host.loaded_model() is None
    with host.job_backbone(zero_shot) as backbone:
        assert isinstance(backbone, ForgeBackbone) and backbone.sd_model is engine and len(reloads) == 1
    assert host.loaded_model() is engine
    engine.is_inpaint = True
    with pytest.raises(CheckpointError, match="inpainting model"):
        host.check_ready(zero_shot)
    data.forge_loading_parameters = {"checkpoint_info": "other.safetensors"}  # chosen, not yet loaded
    host.check_ready(zero_shot)
    assert host.loaded_model() is None and len(reloads) == 1
