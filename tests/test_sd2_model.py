"""SD 2.x single files for zero-shot masks: the OpenCLIP ViT-H text conditioning against transformers
(diffusers' convert_open_clip_checkpoint, at tiny size), A1111's v-prediction probe, refusals, and
`ldznet mask --zero-shot` end to end on a tiny file with the real key layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from conftest import randomize_
from fixtures_models import TINY_VAE8, random_image
from ldznet_ext.backbones.base import is_backbone
from ldznet_ext.backbones.family import UNET_PREFIX, VAE_PREFIX
from ldznet_ext.checkpoint_io import write_safetensors
from ldznet_ext.errors import CheckpointError
from ldznet_ext.sd.checkpoint import SD2_FOR_ZERO_SHOT_ONLY, SD2_TEXT_PREFIX, load_stable_diffusion
from ldznet_ext.sd import checkpoint
from ldznet_ext.sd.sd2 import OpenCLIPContext, StableDiffusion2, context_blocks, predicts_v
from ldznet_ext.sd.openclip import OpenCLIPTextEncoder, openclip_ids, registered_layers
from ldznet_ext.sd.schedule import v_to_eps
from ldznet_ext.sd.tokenizer import EOS_ID, tokenize
from ldznet_ext.sd.unet import UNetModel, unet_config
from ldznet_ext.sd.vae import AutoencoderKL

single_file = pytest.importorskip("diffusers.loaders.single_file_utils")

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["a red cat on a mat", "sky", ""]
# SD 2.x's UNet topology (linear projections, heads of a fixed width) at test widths.
TINY_SD2_UNET = unet_config("tiny", linear_projection=True, num_head_channels=16)


def tiny_vit_h(seed: int = 4) -> OpenCLIPTextEncoder:
    """ViT-H's shape at test widths: 3 layers, 64 wide (one head of 64, as width // 64 says), MLP x4."""
    return randomize_(OpenCLIPTextEncoder(width=64, layers=3, heads=1, mlp_width=256, embed_dim=64), seed)


def tiny_sd2_state(out_bias: float | None = None) -> dict[str, torch.Tensor]:
    """An SD 2.x single file at test widths under its real prefixes; ``out_bias``: the UNet's last conv
    made a constant of that value (to steer the v-prediction probe)."""
    unet = randomize_(UNetModel(TINY_SD2_UNET), seed=1)
    if out_bias is not None:
        with torch.no_grad():
            unet.out[2].weight.zero_()
            unet.out[2].bias.fill_(out_bias)
    torch.manual_seed(2)
    vae = AutoencoderKL(TINY_VAE8).eval()
    state = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    state.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    state.update({SD2_TEXT_PREFIX + k: v for k, v in tiny_vit_h().state_dict().items()})
    state[SD2_TEXT_PREFIX + "logit_scale"] = torch.tensor(4.6)  # in real files; not part of the text tower
    state["alphas_cumprod"] = torch.linspace(0.999, 0.01, 1000)
    return state


METADATA = {"unet": TINY_SD2_UNET.to_dict()}  # the tiny heads are not 64 wide: the file says so


def write_sd2(path: Path, state: dict[str, torch.Tensor]) -> Path:
    write_safetensors(path, state, METADATA)
    return path


@pytest.fixture(scope="module")
def sd2_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sd2(tmp_path_factory.mktemp("sd2") / "tiny-sd2.safetensors", tiny_sd2_state())


def test_vit_h_context_matches_transformers() -> None:
    """ldm's penultimate + ln_final is transformers' last_hidden_state of the tower without its last layer
    (diffusers' SD 2.x text encoder has 23 of ViT-H's 24 layers)."""
    ours = OpenCLIPContext(tiny_vit_h(), blocks=2)
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=1, max_position_embeddings=77, hidden_act="gelu",
                                         layer_norm_eps=1e-5, projection_dim=64, bos_token_id=49406,
                                         eos_token_id=EOS_ID, pad_token_id=0)
    # the model with a projection: its keys keep the "text_model." level that the conversion writes
    twin = transformers.CLIPTextModelWithProjection(config).eval()
    checkpoint = {SD2_TEXT_PREFIX + k: v for k, v in ours.model.state_dict().items()
                  if not k.startswith("transformer.resblocks.2.")}
    converted = single_file.convert_open_clip_checkpoint(twin, checkpoint)
    missing, unexpected = twin.load_state_dict(converted, strict=False)
    # diffusers leaves SD 2.x's text projection out: the context does not use it
    assert not unexpected and all(k.endswith("position_ids") or k == "text_projection.weight" for k in missing)
    with torch.no_grad():
        context = ours.encode(PROMPTS)
        expected = twin(input_ids=openclip_ids(tokenize(PROMPTS))).last_hidden_state
    assert context.shape == (3, 77, 64) and ours.context_dim == 64
    assert (context - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (context[0] - context[1]).abs().max() > 0.1


def test_loads_every_weight_and_meets_the_backbone_protocol(sd2_file) -> None:
    model = load_stable_diffusion(sd2_file, zero_shot=True)
    assert isinstance(model, StableDiffusion2) and is_backbone(model)
    assert (model.scale_factor, model.downsample_factor) == (0.18215, 8)
    state = tiny_sd2_state()
    loaded = {UNET_PREFIX + k: v for k, v in model.unet.state_dict().items()}
    loaded.update({SD2_TEXT_PREFIX + k: v for k, v in model.text_encoder.model.state_dict().items()})
    loaded["alphas_cumprod"] = model.schedule.alphas_cumprod
    assert all(torch.equal(v, state[k]) for k, v in loaded.items())
    conditioning = model.encode_text(["a cat"])
    assert torch.equal(conditioning.context, model.text_encoder.encode(["a cat"]))


def test_an_sd2_file_as_published_loads_without_ldznet_metadata(tmp_path) -> None:
    """Real SD 2.x files carry no ldznet metadata: heads 64 wide and the middle block's depth are read
    from the shapes (the middle block used to be built with no transformer, and every such file was refused)."""
    config = unet_config("tiny", model_channels=64, linear_projection=True, num_head_channels=64,
                         level_depths=(1, 1, 1, 1), num_heads=8)  # num_heads: unused beside num_head_channels
    unet = randomize_(UNetModel(config), seed=1)
    state = {k: v for k, v in tiny_sd2_state().items() if not k.startswith(UNET_PREFIX)}
    state.update({UNET_PREFIX + k: v for k, v in unet.state_dict().items()})
    path = tmp_path / "published.safetensors"
    write_safetensors(path, state, {})
    model = load_stable_diffusion(path, zero_shot=True)
    assert model.unet.config == config
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in model.unet.state_dict().items())


def test_a_file_converted_from_diffusers_without_the_towers_last_layer_gives_the_same_context(tmp_path) -> None:
    """diffusers' conversion to a single file writes SD 2.x's tower without its last layer and projection,
    which the context never reads; A1111 loads it into the whole tower. Such a file was refused ('text_projection');
    with the projection kept it was read one layer short. Here the tiny tower plays ViT-H: the file says its depth,
    where the shape of a registered open_clip tower says it (:func:`context_blocks`)."""
    state = tiny_sd2_state()
    whole = load_stable_diffusion(write_sd2(tmp_path / "whole.safetensors", state), zero_shot=True)
    unread = tuple(SD2_TEXT_PREFIX + k for k in ("transformer.resblocks.2.", "text_projection", "logit_scale"))
    short = {k: v for k, v in state.items() if not k.startswith(unread)}
    converted = tmp_path / "converted.safetensors"
    for kept in ({}, {SD2_TEXT_PREFIX + "text_projection": state[SD2_TEXT_PREFIX + "text_projection"]}):
        write_safetensors(converted, {**short, **kept}, {**METADATA, "text": {"num_hidden_layers": 3}})
        model = load_stable_diffusion(converted, zero_shot=True)
        assert len(model.text_encoder.model.transformer.resblocks) == 2 and model.text_encoder.blocks == 2
        assert torch.equal(model.text_encoder.encode(PROMPTS), whole.text_encoder.encode(PROMPTS))
    for depth, held, tensors in ((4, 2, short), (2, 3, state)):  # layers neither all of the tower nor all but one
        write_safetensors(converted, tensors, {**METADATA, "text": {"num_hidden_layers": depth}})
        with pytest.raises(CheckpointError, match=rf"^converted.safetensors: its OpenCLIP text encoder holds {held} "
                                                  rf"layers; SD 2.x's context runs {depth - 1} of a tower {depth} deep, "
                                                  r"held whole or without its last layer$"):
            load_stable_diffusion(converted, zero_shot=True)


def test_the_context_runs_all_but_the_last_layer_of_the_tower_ldm_builds() -> None:
    """Every SD 2.x config builds ViT-H-14, 24 layers deep: a file of 24 or 23 layers runs 23."""
    vit_h = registered_layers(1024, 4096)
    assert vit_h == 24 and [context_blocks(held, vit_h) for held in (24, 23)] == [23, 23]
    assert [context_blocks(3), context_blocks(2, depth=3), context_blocks(3, depth=3)] == [2, 2, 2]
    assert registered_layers(64, 256) is None  # the tiny towers here: the file's layers, or its metadata, say
    for held in (22, 25):
        with pytest.raises(CheckpointError, match=rf"^its OpenCLIP text encoder holds {held} layers; SD 2.x's context "
                                                  r"runs 23 of a tower 24 deep, held whole or without its last layer$"):
            context_blocks(held, vit_h)
    with pytest.raises(CheckpointError, match=r"^its OpenCLIP text tower is 1 layer deep; SD 2.x's context reads the "
                                              r"layer before the last$"):
        context_blocks(1)


@pytest.mark.parametrize(("out_bias", "marker", "prediction"),
                         [(-2.0, False, "v"), (0.0, False, "eps"), (0.0, True, "v")])
def test_v_prediction_as_a1111_decides_it(tmp_path, out_bias, marker, prediction) -> None:
    """A1111's probe: (UNet(0.5) - 0.5).mean() < -1 at t = 999 means v; -2.5 is v, -0.5 eps; the marker wins."""
    state = tiny_sd2_state(out_bias)
    if marker:
        state["v_pred"] = torch.zeros(())
    model = load_stable_diffusion(write_sd2(tmp_path / "m.safetensors", state), zero_shot=True)
    assert model.prediction == prediction


def test_v_prediction_is_probed_in_float32_whatever_the_load_dtype(tmp_path) -> None:
    """-0.5005 - 0.5 is below -1 in float32 (v), but bf16 rounds the bias to -0.5: probed after the cast
    the model was read as eps. A1111 probes in float32."""
    path = write_sd2(tmp_path / "m.safetensors", tiny_sd2_state(-0.5005))
    assert [load_stable_diffusion(path, zero_shot=True, dtype=dtype).prediction
            for dtype in (torch.float32, torch.bfloat16)] == ["v", "v"]


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_v_prediction_is_probed_in_float32_whatever_the_files_dtype(tmp_path, monkeypatch, stored) -> None:
    """A file stored in fp16 or bf16 was probed in that dtype (its tensors become the UNet's): not as A1111
    probes, and on torch < 2.2 an fp16 file failed to load on the CPU (no fp16 matmul there)."""
    state = {k: v.to(stored) if v.is_floating_point() else v for k, v in tiny_sd2_state(-2.0).items()}
    probed = []

    def probe(unet):
        probed.append({p.dtype for p in unet.parameters()})
        return predicts_v(unet)

    monkeypatch.setattr(checkpoint, "predicts_v", probe)
    model = load_stable_diffusion(write_sd2(tmp_path / "m.safetensors", state), zero_shot=True, dtype=stored)
    assert probed == [{torch.float32}] and model.prediction == "v"
    assert {p.dtype for p in model.unet.parameters()} == {stored}


def test_a_v_model_answers_eps(tmp_path) -> None:
    state = {**tiny_sd2_state(), "v_pred": torch.zeros(())}
    model = load_stable_diffusion(write_sd2(tmp_path / "v.safetensors", state), zero_shot=True)
    conditioning = model.encode_text(["a cat"])
    z, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([300])
    with torch.no_grad():
        v = model.unet(z, t, conditioning.context)
        assert torch.equal(model.predict_noise(z, t, conditioning), v_to_eps(v, z, model.schedule, t))


@pytest.mark.parametrize("kwargs", [{}, {"zero_shot": True, "parts": "mask"}])
def test_head_mode_on_sd2_is_refused_with_what_to_do(sd2_file, kwargs) -> None:
    with pytest.raises(CheckpointError) as error:
        load_stable_diffusion(sd2_file, **kwargs)
    assert str(error.value).startswith(f"tiny-sd2.safetensors: sd2: {SD2_FOR_ZERO_SHOT_ONLY}. Supported: ")


@pytest.mark.parametrize(("channels", "unclip", "variant"), [
    (9, False, r"an SD 2.x inpainting model \(9 input channels\)"),
    (5, False, r"an SD 2.x depth model \(5 input channels: a depth map beside the latent\)"),
    (7, False, r"an SD 2.x x4 upscaler \(7 input channels: the low-resolution image beside the latent\)"),
    (4, True, r"an SD 2.x unCLIP model \(conditioned on an image embedding\)"),
])
def test_sd2_models_conditioned_on_more_than_text_are_refused_by_name(tmp_path, channels, unclip, variant) -> None:
    """unCLIP was refused as weights that "do not fit" (its label_emb), the upscaler as an inpainting or depth model."""
    state = tiny_sd2_state()
    state[UNET_PREFIX + "input_blocks.0.0.weight"] = torch.zeros(32, channels, 3, 3)
    if unclip:  # the image embedding's projection, as SD 2.1 unCLIP's
        state[UNET_PREFIX + "label_emb.0.0.weight"] = torch.zeros(128, 1024)
    path = write_sd2(tmp_path / "variant.safetensors", state)
    for zero_shot in (True, False):  # a head is not told to try --zero-shot
        with pytest.raises(CheckpointError, match=rf"^variant.safetensors: sd2-conditioned: {variant}; use the base "
                                                  r"model it was made from. Supported: "):
            load_stable_diffusion(path, zero_shot=zero_shot)


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s.update({SD2_TEXT_PREFIX + "token_embedding.weight": torch.zeros(100, 64)}),
     "the text encoder has 100 token embeddings; CLIP's tokenizer needs 49408"),
    (lambda s: s.update({SD2_TEXT_PREFIX + "positional_embedding": torch.zeros(10, 64)}),
     "the text encoder has 10 positions; CLIP's tokenizer makes prompts of 77 tokens"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith(SD2_TEXT_PREFIX + "transformer.")],
     r"its OpenCLIP text encoder has no layers \(no transformer.resblocks.\*\)"),
])
def test_an_sd2_text_tower_that_cannot_encode_a_prompt_is_refused(tmp_path, change, message) -> None:
    """These failed at the first prompt, inside torch."""
    state = tiny_sd2_state()
    change(state)
    with pytest.raises(CheckpointError, match=rf"^odd.safetensors: {message}$"):
        load_stable_diffusion(write_sd2(tmp_path / "odd.safetensors", state), zero_shot=True)


def test_an_sd2_text_tower_narrower_than_the_unets_context_is_refused(tmp_path) -> None:
    """A 64-d context into a UNet that reads 48: it failed at the first mask, inside torch."""
    unet = UNetModel(unet_config("tiny", linear_projection=True, num_head_channels=16, context_dim=48)).state_dict()
    state = {k: v for k, v in tiny_sd2_state().items() if not k.startswith(UNET_PREFIX)}
    state.update({UNET_PREFIX + k: v for k, v in unet.items()})
    write_safetensors(tmp_path / "odd.safetensors", state,
                      {"unet": unet_config("tiny", linear_projection=True, num_head_channels=16,
                                           context_dim=48).to_dict()})
    with pytest.raises(CheckpointError, match=r"^odd.safetensors: mismatched parts: the text encoders give a 64-d "
                                              r"context but the UNet expects a 48-d context$"):
        load_stable_diffusion(tmp_path / "odd.safetensors", zero_shot=True)


@pytest.mark.parametrize("claim", [{"hidden_size": 128}, {"num_attention_heads": 2}, {"vocab_size": 50000}])
def test_an_sd2_files_text_metadata_that_contradicts_its_weights_is_refused(tmp_path, claim) -> None:
    """Ignored before: a head count of 2 claimed for a tower run with one."""
    (name, value), = claim.items()
    shown = {"hidden_size": 64, "num_attention_heads": 1, "vocab_size": 49408}[name]
    write_safetensors(tmp_path / "odd.safetensors", tiny_sd2_state(), {**METADATA, "text": claim})
    with pytest.raises(CheckpointError, match=rf"^odd.safetensors: field 'ldznet.text', key '{name}' is {value}; the "
                                              rf"weights have {shown}$"):
        load_stable_diffusion(tmp_path / "odd.safetensors", zero_shot=True)


def test_ldznet_mask_zero_shot_on_an_sd2_file(ldznet, sd2_file, tmp_path) -> None:
    image = tmp_path / "in.png"
    Image.fromarray(random_image(64, 64, seed=3)).save(image)
    code, out, err = ldznet("mask", image, "cat OR sky", "-o", tmp_path / "m.png", "--probability", tmp_path / "p.png",
                            "--model", sd2_file, "--zero-shot", "--resolution", 64, "--draws", 1, "--device", "cpu")
    assert (code, err) == (0, "") and out.startswith(f"{tmp_path / 'm.png'}: 64x64, ")
    probability = np.asarray(Image.open(tmp_path / "p.png"))
    assert probability.shape == (64, 64) and probability.std() > 0
