"""Our SDXL model from a tiny single file with the real key layout (random weights): loading, the
Backbone calls, v-prediction, refusals, and `ldznet mask --zero-shot` end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import randomize_
from fixtures_models import image_file, random_image  # noqa: F401  (pytest fixture)
from ldznet_ext.backbones.base import is_backbone
from ldznet_ext.backbones.family import UNET_PREFIX, VAE_PREFIX
from ldznet_ext.checkpoint_io import write_safetensors
from ldznet_ext.errors import CheckpointError
from ldznet_ext.segmenter import Segmenter, SegmenterSettings
from ldznet_ext.zeroshot import ZeroShotSettings
from ldznet_ext.sd.checkpoint import BIGG_PREFIX, CLIP_L_PREFIX, SDXL_FOR_ZERO_SHOT_ONLY, load_stable_diffusion
from ldznet_ext.sd.schedule import alphas_cumprod, rescale_zero_terminal_snr
from ldznet_ext.sd.schedule import NoiseSchedule
from ldznet_ext.sd.openclip import OpenCLIPTextEncoder
from ldznet_ext.sd.schedule import v_to_eps
from ldznet_ext.sd.sdxl import StableDiffusionXL, size_vector
from ldznet_ext.sd.text import TextEncoder, text_config
from ldznet_ext.sd.unet import UNetModel, unet_config
from ldznet_ext.sd.vae import AutoencoderKL, vae_config

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_sdxl_state() -> dict[str, torch.Tensor]:
    """An SDXL single file at test widths: UNet "tiny-sdxl" (96-d context, y of 32 + 6 x 8), the tiny
    VAE, CLIP ViT-L 64 wide and bigG 32 wide projecting to 32, each under its real prefix."""
    unet = randomize_(UNetModel(unet_config("tiny-sdxl")), seed=1)
    vae = randomize_(AutoencoderKL(vae_config("tiny")), seed=2, std=0.05)
    clip_l = randomize_(TextEncoder.from_config(text_config("tiny")), seed=3)
    bigg = randomize_(OpenCLIPTextEncoder(width=32, layers=2, heads=1, mlp_width=128, embed_dim=32), seed=4)
    state = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    state.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    state.update({CLIP_L_PREFIX + k: v for k, v in clip_l.text_state_dict().items()})
    state.update({BIGG_PREFIX + k: v for k, v in bigg.state_dict().items()})
    state[BIGG_PREFIX + "logit_scale"] = torch.tensor(4.6)  # in real files; not part of the text tower
    return state


# The tiny widths' heads are not 64 channels wide: the file says so, as our own files do.
METADATA = {"unet": unet_config("tiny-sdxl").to_dict(), "text": {"num_attention_heads": 2}}


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl.safetensors"
    write_safetensors(path, tiny_sdxl_state(), METADATA)
    return path


def test_loads_every_weight_and_meets_the_backbone_protocol(sdxl_file) -> None:
    model = load_stable_diffusion(sdxl_file, zero_shot=True)
    assert isinstance(model, StableDiffusionXL) and is_backbone(model)
    assert (model.prediction, model.scale_factor, model.size_dim) == ("eps", 0.13025, 8)
    state = tiny_sdxl_state()
    loaded = {UNET_PREFIX + k: v for k, v in model.unet.state_dict().items()}
    loaded.update({BIGG_PREFIX + k: v for k, v in model.text_encoder.embedders[1].model.state_dict().items()})
    assert all(torch.equal(v, state[k]) for k, v in loaded.items())
    assert len(model.layout.sites) == 11


def test_predict_noise_passes_the_size_vector_of_the_latent(sdxl_file) -> None:
    model = load_stable_diffusion(sdxl_file, zero_shot=True)
    conditioning = model.encode_text(["a cat", "sky"])
    assert conditioning.context.shape == (2, 77, 96) and conditioning.pooled.shape == (2, 32)
    z = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 500])
    with torch.no_grad():
        eps = model.predict_noise(z, t, conditioning)
        # an image of the latent's size (16 x 24 px: the tiny VAE has f = 2), uncropped, original = target
        sizes = torch.tensor([[16, 24, 0, 0, 16, 24]] * 2)
        expected = model.unet(z, t, conditioning.context, size_vector(conditioning.pooled, sizes, 8))
    assert torch.equal(eps, expected)


def test_v_prediction_is_converted_to_eps() -> None:
    schedule = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    t = torch.tensor([10, 900])
    a = schedule.alphas_cumprod[t].float()[:, None, None, None]
    v = a.sqrt() * eps - (1 - a).sqrt() * z0
    z_t = schedule.q_sample(z0, t, eps)
    assert torch.allclose(v_to_eps(v, z_t, schedule, t), eps, atol=1e-5)


def test_the_v_pred_marker_makes_a_v_prediction_model(tmp_path) -> None:
    path = tmp_path / "vpred.safetensors"
    write_safetensors(path, {**tiny_sdxl_state(), "v_pred": torch.zeros(())}, METADATA)
    model = load_stable_diffusion(path, zero_shot=True)
    assert model.prediction == "v"
    conditioning = model.encode_text(["a cat"])
    z, t = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([300])
    sizes = torch.tensor([[8, 8, 0, 0, 8, 8]])  # a 4 x 4 latent of the tiny VAE (f = 2)
    with torch.no_grad():
        v = model.unet(z, t, conditioning.context, size_vector(conditioning.pooled, sizes, 8))
        assert torch.equal(model.predict_noise(z, t, conditioning), v_to_eps(v, z, model.schedule, t))


def test_the_ztsnr_marker_rescales_the_schedule_to_zero_terminal_snr(tmp_path) -> None:
    path = tmp_path / "tiny-ztsnr.safetensors"
    write_safetensors(path, {**tiny_sdxl_state(), "v_pred": torch.zeros(()), "ztsnr": torch.zeros(())}, METADATA)
    model = load_stable_diffusion(path, zero_shot=True)
    assert model.prediction == "v"
    assert torch.equal(model.schedule.alphas_cumprod, rescale_zero_terminal_snr(alphas_cumprod()))


@pytest.mark.parametrize("kwargs", [{}, {"zero_shot": True, "parts": "mask"}])
def test_head_mode_on_sdxl_is_refused_with_what_to_do(sdxl_file, kwargs) -> None:
    with pytest.raises(CheckpointError) as error:
        load_stable_diffusion(sdxl_file, **kwargs)
    assert str(error.value).startswith(f"tiny-sdxl.safetensors: sdxl: {SDXL_FOR_ZERO_SHOT_ONLY}. Supported: ")


def test_a_broken_sdxl_file_is_named(tmp_path) -> None:
    path = tmp_path / "broken.safetensors"
    state = {k: v for k, v in tiny_sdxl_state().items() if k != BIGG_PREFIX + "ln_final.weight"}
    write_safetensors(path, state, METADATA)
    with pytest.raises(CheckpointError, match=r"^broken.safetensors: the SDXL weights do not fit the architecture "
                                              r"they describe: (?s:.*)Missing key\(s\) in state_dict: \"ln_final.weight\""):
        load_stable_diffusion(path, zero_shot=True)
    state = {k: v for k, v in tiny_sdxl_state().items() if k != BIGG_PREFIX + "text_projection"}
    write_safetensors(path, state, METADATA)  # SD 2.x's tower may lack it; SDXL's pooled text reads it
    with pytest.raises(CheckpointError, match=r"^broken.safetensors: its OpenCLIP bigG text encoder has no "
                                              r"text_projection, which SDXL's pooled text needs$"):
        load_stable_diffusion(path, zero_shot=True)


def _refiner(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The refiner's layout: bigG alone, as conditioner.embedders.0.model."""
    kept = {k: v for k, v in state.items() if not k.startswith(("conditioner.embedders.0.", BIGG_PREFIX))}
    return {**kept, **{"conditioner.embedders.0.model." + k[len(BIGG_PREFIX):]: v for k, v in state.items()
                       if k.startswith(BIGG_PREFIX)}}


@pytest.mark.parametrize("case, message", [
    ("inpainting", "sdxl-conditioned: the SDXL UNet takes 9 input channels, not 4 (an inpainting, instruct-pix2pix or "
                   "edit model); use the base model it was made from. Supported: "),
    ("edit", "sdxl-conditioned: the SDXL UNet takes 8 input channels, not 4 (an inpainting, instruct-pix2pix or edit "
             "model); use the base model it was made from. Supported: "),
    ("refiner", "sdxl-refiner: an SDXL refiner (one text encoder, OpenCLIP bigG, and aesthetic-score conditioning); "
                "refiners are not supported: use the SDXL base model or a fine-tune of it. Supported: "),
    ("cosxl", "sdxl-edm: trained with the EDM noise schedule, not SD's (its edm_vpred. tensors: CosXL, Playground v2.5 "
              "and the like), which zero-shot masks do not model. Supported: "),
    ("playground", "sdxl-edm: trained with the EDM noise schedule, not SD's (its edm_mean, edm_std tensors: CosXL, "
                   "Playground v2.5 and the like), which zero-shot masks do not model. Supported: "),
    ("no-vae", "the file has no VAE ('first_stage_model.*'); give the VAE it was published with as --vae "
               "VAE.safetensors"),
])
def test_sdxl_files_that_cannot_serve_are_named(tmp_path, case, message) -> None:
    """They used to end in a traceback (the 9-channel conv met 4 channels) or in a KeyError's key; an
    EDM-schedule model was read as an eps one. Neither mode is offered for a model no mode can use: a
    head is not told to try --zero-shot."""
    state = tiny_sdxl_state()
    conv = UNET_PREFIX + "input_blocks.0.0.weight"
    if case in ("inpainting", "edit"):
        extra = 5 if case == "inpainting" else 4
        state[conv] = torch.cat([state[conv], torch.zeros(state[conv].shape[0], extra, 3, 3)], 1)
    elif case == "refiner":
        state = _refiner(state)
    elif case == "cosxl":
        state = {**state, "edm_vpred.sigma_max": torch.tensor(120.0), "edm_vpred.sigma_min": torch.tensor(0.002)}
    elif case == "playground":
        state = {**state, "edm_mean": torch.zeros(1, 4, 1, 1), "edm_std": torch.ones(1, 4, 1, 1)}
    else:
        state = {k: v for k, v in state.items() if not k.startswith(VAE_PREFIX)}
    path = tmp_path / f"{case}.safetensors"
    write_safetensors(path, state, METADATA)
    for zero_shot in (True, False) if case != "no-vae" else (True,):
        with pytest.raises(CheckpointError) as error:
            load_stable_diffusion(path, zero_shot=zero_shot)
        assert str(error.value).startswith(f"{case}.safetensors: {message}")


@pytest.mark.parametrize("settings", [ZeroShotSettings(draws=1, attention_scales=((2, 1.0),)),
                                      ZeroShotSettings(score="agreement", timestep=400, draws=2)])
def test_zero_shot_masks_on_an_sdxl_file(sdxl_file, settings) -> None:
    model = load_stable_diffusion(sdxl_file, zero_shot=True)
    segmenter = Segmenter(model, settings=SegmenterSettings(resolution=64, zero_shot=settings))
    prediction = segmenter.predict_images([random_image(64, 64, seed=3)], "cat OR blue sky")[0]
    maps = prediction.terms
    assert set(maps) == {"cat", "blue sky"} and maps["cat"].shape == (64, 64)
    assert not torch.equal(maps["cat"], maps["blue sky"])  # the text reaches the maps


def test_ldznet_mask_with_a_head_on_an_sdxl_file_is_refused(ldznet, sdxl_file, tiny_model_files, image_file,
                                                             tmp_path) -> None:
    _, head = tiny_model_files
    code, _, err = ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", "--model", sdxl_file, "--head", head)
    assert code == 2 and f"tiny-sdxl.safetensors: sdxl: {SDXL_FOR_ZERO_SHOT_ONLY}" in err


def test_ldznet_mask_zero_shot_on_an_sdxl_file(ldznet, sdxl_file, image_file, tmp_path) -> None:
    code, _, err = ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", "--probability", tmp_path / "p.png",
                          "--model", sdxl_file, "--zero-shot", "--resolution", 64, "--draws", 1, "--device", "cpu")
    assert (code, err) == (0, "")
    assert np.asarray(Image.open(tmp_path / "p.png")).shape == (64, 64)


def test_integer_weights_of_an_sdxl_file_are_named_with_the_file(tmp_path):
    path = tmp_path / "sdxl-int8.safetensors"
    key = "model.diffusion_model.time_embed.0.weight"
    state = tiny_sdxl_state()
    write_safetensors(path, {**state, key: state[key].to(torch.int8)}, METADATA)
    with pytest.raises(CheckpointError) as error:
        load_stable_diffusion(path, zero_shot=True)
    assert str(error.value) == (f"sdxl-int8.safetensors: tensor '{key}' is int8; expected floating-point weights "
                                "(fp32, fp16, bf16 or fp8)")
