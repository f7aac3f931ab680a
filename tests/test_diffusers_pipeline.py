"""Masks on a diffusers pipeline held in memory (``segmenter_from_pipeline``): diffusers' own
``StableDiffusionPipeline`` (SD 1.x, SD 2.x) / ``StableDiffusionXLPipeline`` built here from our tiny models, their weights
converted by diffusers' ldm -> diffusers functions. Their maps equal those of the same models loaded our
way (the UNet, VAE and text encoders are diffusers' and transformers' code, not ours), the pipeline is
left as it was, and pipelines whose model cannot serve are refused by name."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from fixtures_models import TINY_VAE8, random_image
from ldznet_ext import ModelSettings, build_segmenter, load_segmenter, segmenter_from_pipeline
from ldznet_ext.backbones.base import ldm_layout
from ldznet_ext.backbones.diffusers_pipeline import DiffusersBackbone, diffusers_layout, pipeline_family
from ldznet_ext.errors import CheckpointError
from ldznet_ext.sd.checkpoint import load_stable_diffusion
from ldznet_ext.sd.diffusers_folder import diffusers_unet_config
from ldznet_ext.sd.text import TextEncoder
from ldznet_ext.sd.tokenizer import load_tokenizer, tokenizer_dir
from ldznet_ext.sd.unet import UNetModel, unet_config
from ldznet_ext.sd.vae import VAEConfig
from test_sd2_model import sd2_file  # noqa: F401  (pytest fixture)
from test_sdxl_model import sdxl_file  # noqa: F401  (pytest fixture)
from test_sdxl_text import reference_bigg
from test_sdxl_unet import TIME_DIM, diffusers_twin

diffusers = pytest.importorskip("diffusers")
single_file = pytest.importorskip("diffusers.loaders.single_file_utils")

pytestmark = pytest.mark.usefixtures("single_thread")

TERMS = ["red ball", "sky", "a cat on a mat"]
# The SD schedule as diffusers' schedulers spell it (equal to ours to 4e-5, as test_diffusers_folder shows).
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def diffusers_vae(ours, config: VAEConfig, scale: float):
    """diffusers' AutoencoderKL with ``ours``' weights, converted by diffusers."""
    levels = len(config.ch_mult)
    fields = {"down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
              "block_out_channels": [config.ch * m for m in config.ch_mult], "layers_per_block": config.num_res_blocks,
              "latent_channels": 4, "scaling_factor": scale}
    vae = diffusers.AutoencoderKL(**fields)
    checkpoint = {"first_stage_model." + k: v for k, v in ours.state_dict().items()}
    vae.load_state_dict(single_file.convert_ldm_vae_checkpoint(checkpoint, fields))
    return vae.eval().requires_grad_(False)


def own_tokenizer(**options):
    """A CLIPTokenizer of its own (not the package's shared one: a textual inversion adds tokens to it);
    ``pad_token="!"`` as open_clip pads (SD 2.x's and SDXL's second tokenizer: 0 after the end token)."""
    return transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir()), local_files_only=True, **options)


def sd1_pipeline(model, **scheduler):
    """A StableDiffusionPipeline of ``model``'s weights (its CLIP text model is transformers' already)."""
    return diffusers.StableDiffusionPipeline(
        vae=diffusers_vae(model.vae, TINY_VAE8, model.scale_factor), text_encoder=model.text_encoder.transformer,
        tokenizer=load_tokenizer(), unet=diffusers_twin(model.unet, TIME_DIM).eval(),
        scheduler=diffusers.DDIMScheduler(**SD_BETAS, clip_sample=False, **scheduler),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def sd1_pipe(tiny_model_files):
    return sd1_pipeline(load_stable_diffusion(tiny_model_files[0]))


@pytest.fixture(scope="module")
def sdxl_pair(sdxl_file):  # noqa: F811  (the fixture imported above)
    """(our SDXL model, a StableDiffusionXLPipeline of the same weights)."""
    model = load_stable_diffusion(sdxl_file, zero_shot=True)
    clip_l, bigg = model.text_encoder.embedders[0], model.text_encoder.embedders[1].model
    twin_bigg = reference_bigg(bigg, width=32, layers=2, heads=1, mlp_width=128, projection=32)
    vae_config = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=diffusers_vae(model.vae, vae_config, model.scale_factor), text_encoder=clip_l.transformer,
        text_encoder_2=twin_bigg, tokenizer=load_tokenizer(),
        tokenizer_2=own_tokenizer(pad_token="!"),
        unet=diffusers_twin(model.unet, TIME_DIM).eval(),
        scheduler=diffusers.EulerDiscreteScheduler(**SD_BETAS))
    return model, pipe


@pytest.fixture(scope="module")
def sd2_pair(sd2_file):  # noqa: F811  (the fixture imported above)
    """(our SD 2.x model, a StableDiffusionPipeline of the same weights): diffusers' SD 2.x text encoder is
    ViT-H without its last layer (test_sd2_model shows it equals ldm's penultimate + ln_final)."""
    model = load_stable_diffusion(sd2_file, zero_shot=True)
    vit_h = model.text_encoder.model
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=1, max_position_embeddings=77, hidden_act="gelu",
                                         layer_norm_eps=1e-5, projection_dim=64, bos_token_id=49406,
                                         eos_token_id=49407, pad_token_id=0)
    checkpoint = {"cond_stage_model.model." + k: v for k, v in vit_h.state_dict().items()
                  if not k.startswith("transformer.resblocks.2.")}
    converted = single_file.convert_open_clip_checkpoint(transformers.CLIPTextModelWithProjection(config), checkpoint)
    text_encoder = TextEncoder(transformers.CLIPTextModel(config))
    text_encoder.load_text_state_dict({k: v for k, v in converted.items() if k.startswith("text_model.")})
    table = model.schedule.alphas_cumprod
    betas = 1 - table / torch.cat([table.new_ones(1), table[:-1]])
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers_vae(model.vae, TINY_VAE8, model.scale_factor), text_encoder=text_encoder.transformer.eval(),
        tokenizer=own_tokenizer(pad_token="!"),
        unet=diffusers_twin(model.unet, TIME_DIM).eval(),
        scheduler=diffusers.DDIMScheduler(trained_betas=betas.float().tolist(), clip_sample=False,
                                          prediction_type="v_prediction" if model.prediction == "v" else "epsilon"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return model, pipe


def _maps(segmenter, image) -> dict[str, torch.Tensor]:
    segmenter.set_image(image)
    return segmenter.predict_terms(TERMS)


def _assert_close(maps, expected) -> None:
    """Equal but for float32 rounding in two implementations (the random head's last-layer gain
    amplifies it to a few 1e-6); a wrong block, scale or text differs by 1e-2 and more."""
    assert maps.keys() == expected.keys()
    for term in TERMS:
        scale = float(expected[term].abs().max())
        assert scale > 0.1, term
        assert float((maps[term] - expected[term]).abs().max()) <= 3e-5 * scale, term


def test_sd1_pipeline_masks_equal_the_single_files(sd1_pipe, tiny_model_files) -> None:
    image = random_image(64, 64, seed=5)
    for head in (None, tiny_model_files[1]):  # zero-shot, then the LD-ZNet head on blocks 6-10
        expected = _maps(load_segmenter(tiny_model_files[0], head, resolution=64), image)
        _assert_close(_maps(segmenter_from_pipeline(sd1_pipe, head, resolution=64), image), expected)


def test_sdxl_pipeline_zero_shot_maps_equal_the_single_file(sdxl_pair) -> None:
    model, pipe = sdxl_pair
    image = random_image(64, 64, seed=6)
    expected = _maps(build_segmenter(model, settings=ModelSettings(resolution=64)), image)
    _assert_close(_maps(segmenter_from_pipeline(pipe, resolution=64), image), expected)


def test_sd2_pipeline_zero_shot_maps_equal_the_single_file(sd2_pair) -> None:
    model, pipe = sd2_pair
    assert pipeline_family(pipe) == "sd2"
    image = random_image(64, 64, seed=10)
    expected = _maps(build_segmenter(model, settings=ModelSettings(resolution=64)), image)
    _assert_close(_maps(segmenter_from_pipeline(pipe, resolution=64), image), expected)


def test_a_v_prediction_scheduler_converts_the_unet_output_to_eps(sdxl_pair) -> None:
    """The backbone's eps equals our SDXL model's for a v-prediction model (the zero-shot maps cannot show
    it: their eps differences are v's scaled, and the maps are normalised)."""
    model, pipe = sdxl_pair
    v_model = copy.copy(model)
    v_model.prediction = "v"
    v_pipe = _with(pipe, scheduler=diffusers.EulerDiscreteScheduler(**SD_BETAS, prediction_type="v_prediction"))
    generator = torch.Generator().manual_seed(2)
    z_t, t = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([100, 400])
    backbone = DiffusersBackbone(v_pipe)
    eps = backbone.predict_noise(z_t, t, backbone.encode_text(["red ball", "sky"]))
    expected = v_model.predict_noise(z_t, t, model.encode_text(["red ball", "sky"]))
    unconverted = DiffusersBackbone(pipe).predict_noise(z_t, t, backbone.encode_text(["red ball", "sky"]))
    assert float((eps - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    assert float((unconverted - expected).abs().max()) > 0.1 * float(expected.abs().max())


def test_the_pipeline_is_left_as_it_was(sd1_pipe, tiny_model_files) -> None:
    """No hook stays on any module, no weight changes, and a denoiser call gives what it gave before."""
    modules = list(sd1_pipe.unet.modules()) + list(sd1_pipe.vae.modules())
    weights = {k: v.clone() for k, v in sd1_pipe.unet.state_dict().items()}
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1))
    before = sd1_pipe.unet(z, 10, encoder_hidden_states=context).sample
    segmenter = segmenter_from_pipeline(sd1_pipe, tiny_model_files[1], resolution=64)
    segmenter.set_image(random_image(64, 64, seed=8))
    segmenter.predict("red ball OR sky")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)
    assert all(torch.equal(v, weights[k]) for k, v in sd1_pipe.unet.state_dict().items())
    assert torch.equal(sd1_pipe.unet(z, 10, encoder_hidden_states=context).sample, before)


def test_a_pipeline_under_model_cpu_offload_gives_the_same_maps_and_generates_as_before(tiny_model_files) -> None:
    """accelerate's hooks wrap each part's forward and move it to the execution device (here "cpu:0": no GPU):
    zero-shot and head maps equal the plain pipeline's, and a generation after the masks equals its."""
    pytest.importorskip("accelerate")
    plain, offloaded = (sd1_pipeline(load_stable_diffusion(tiny_model_files[0])) for _ in range(2))
    offloaded.enable_model_cpu_offload(device="cpu")
    assert hasattr(offloaded.unet, "_hf_hook") and offloaded._execution_device == torch.device("cpu:0")
    image = random_image(64, 64, seed=5)
    for head in (None, tiny_model_files[1]):
        expected = _maps(segmenter_from_pipeline(plain, head, resolution=64), image)
        _assert_close(_maps(segmenter_from_pipeline(offloaded, head, resolution=64), image), expected)
    generated = [pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images for pipe in (plain, offloaded)]
    assert generated[0].std() > 0 and (generated[0] == generated[1]).all()


def test_the_layout_numbers_blocks_as_an_ldm_unet_does(sd1_pipe, tiny_model_files) -> None:
    ours = load_stable_diffusion(tiny_model_files[0]).layout
    theirs = DiffusersBackbone(sd1_pipe).layout
    assert [s.downscale for s in theirs.sites] == [s.downscale for s in ours.sites]
    assert theirs.tapped == ours.tapped == (6, 7, 8, 9, 10)
    assert [s.name for s in theirs.sites][5:10] == ["down_blocks.2.attentions.1", "mid_block.attentions.0",
                                                    "up_blocks.1.attentions.0", "up_blocks.1.attentions.1",
                                                    "up_blocks.1.attentions.2"]


def test_the_family_is_read_from_the_unet_config(sd1_pipe, sdxl_pair) -> None:
    assert pipeline_family(sd1_pipe) == "sd-v1" and pipeline_family(sdxl_pair[1]) == "sdxl"
    assert pipeline_family(_unet_with(sd1_pipe, use_linear_projection=True)) == "sd2"
    assert pipeline_family(_unet_with(sd1_pipe, cross_attention_dim=1024)) == "sd2"
    v_pipe = _with(sd1_pipe, scheduler=diffusers.DDIMScheduler(**SD_BETAS, prediction_type="v_prediction"))
    assert pipeline_family(_unet_with(v_pipe, use_linear_projection=True)) == "sd2"  # SD 2.x 768-v: served


def test_a_head_on_an_sdxl_pipeline_is_refused_before_any_mask(sdxl_pair, tiny_model_files) -> None:
    with pytest.raises(CheckpointError, match=r"head.safetensors: this ldznet head was made for a different SD "
                                              r"model .*; use a head trained on this model, or head=None"):
        segmenter_from_pipeline(sdxl_pair[1], tiny_model_files[1])


class _Flux:
    transformer = torch.nn.Linear(1, 1)


def _with(pipe, **parts):
    changed = copy.copy(pipe)
    for name, value in parts.items():
        setattr(changed, name, value)
    return changed


def _unet_with(pipe, **config):
    unet = copy.copy(pipe.unet)
    unet._internal_dict = diffusers.configuration_utils.FrozenDict({**pipe.unet.config, **config})
    return _with(pipe, unet=unet)


@pytest.mark.parametrize("change, message", [
    (lambda p: _Flux(), r"^_Flux has a transformer, no UNet \(Flux, SD 3 and the like\)"),
    (lambda p: _with(p, unet=torch.nn.Linear(1, 1)),
     r"^StableDiffusionPipeline's unet is torch.nn.modules.linear.Linear, not a diffusers UNet2DConditionModel$"),
    (lambda p: None, r"^expected a diffusers Stable Diffusion pipeline .*, got None;"),
    (lambda p: "v1-5.safetensors", r"^expected a diffusers Stable Diffusion pipeline \(pipe.unet, "
     r"pipe.encode_prompt\), got str; for a model file or folder use load_segmenter\(PATH\)$"),
    (lambda p: _unet_with(p, in_channels=9), r"UNet takes 9 input channels, not 4 \(an inpainting, depth, upscaler "
                                             r"or edit model\); use the base model it was made from"),
    (lambda p: _with(p, scheduler=diffusers.FlowMatchEulerDiscreteScheduler()),
     r"\(FlowMatchEulerDiscreteScheduler\) has no alphas_cumprod table of 1000 steps"),
    (lambda p: _with(p, scheduler=diffusers.DDIMScheduler(**SD_BETAS, prediction_type="v_prediction")),
     r"predicts 'v_prediction'; LD-ZNet reads eps-prediction SD 1.x models .* \(SD 1.x here\)"),
    (lambda p: _with(p, scheduler=diffusers.DDIMScheduler(**SD_BETAS, prediction_type="sample")),
     r"predicts 'sample'"),
    (lambda p: _with(p, scheduler=diffusers.DDIMScheduler(**SD_BETAS, num_train_timesteps=2000)),
     r"\(DDIMScheduler\) has no alphas_cumprod table of 1000 steps"),
    (lambda p: _with(p, unet=None), r"^StableDiffusionPipeline's unet is None, not a diffusers UNet2DConditionModel$"),
    (lambda p: _with(p, vae=None, scheduler=None), r"^StableDiffusionPipeline has no vae, scheduler; masks need every "),
    (lambda p: _with(p, text_encoder=None), r"^StableDiffusionPipeline has no text_encoder; masks need every part"),
    (lambda p: _unet_with(p, class_embed_type="projection"),
     r"UNet is conditioned on more than text \(class or image embeddings: unCLIP and the like\)"),
])
def test_pipelines_that_cannot_serve_are_named(sd1_pipe, change, message) -> None:
    with pytest.raises(CheckpointError, match=message):
        segmenter_from_pipeline(change(sd1_pipe))


def test_an_ip_adapter_in_the_unet_is_refused_also_when_loaded_after_the_segmenter(sd1_pipe, tiny_model_files):
    segmenter = segmenter_from_pipeline(sd1_pipe, tiny_model_files[1], resolution=64)
    segmenter.set_image(random_image(64, 64, seed=9))
    message = r"UNet is conditioned on an image beside the text \(ip_image_proj: an IP-Adapter\?\).*unload_ip_adapter"
    try:  # what diffusers' load_ip_adapter sets on the UNet
        sd1_pipe.unet.encoder_hid_proj = torch.nn.Identity()
        sd1_pipe.unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
        with pytest.raises(CheckpointError, match=message):
            segmenter.predict("red ball")
        with pytest.raises(CheckpointError, match=message):
            segmenter_from_pipeline(sd1_pipe)
    finally:
        sd1_pipe.unet.encoder_hid_proj = None
        sd1_pipe.unet.register_to_config(encoder_hid_dim_type=None)
    assert segmenter.predict("red ball").mask.shape == (64, 64)


def test_an_edm_vae_and_an_sdxl_refiner_are_refused(sdxl_pair) -> None:
    pipe = sdxl_pair[1]
    vae = copy.copy(pipe.vae)
    vae._internal_dict = diffusers.configuration_utils.FrozenDict({**pipe.vae.config, "latents_mean": [0.0] * 4,
                                                                    "latents_std": [1.0] * 4})
    with pytest.raises(CheckpointError, match=r"VAE has latent statistics beyond SD's scale factor"):
        segmenter_from_pipeline(_with(pipe, vae=vae))
    with pytest.raises(CheckpointError, match=r"^StableDiffusionXLPipeline has no tokenizer, text_encoder \(an SDXL "
                                              r"refiner\?\); masks need every part of an SD 1.x, SD 2.x or SDXL"):
        segmenter_from_pipeline(_with(pipe, tokenizer=None, text_encoder=None))


# The published unet/config.json fields of SD 1.5 and SDXL base 1.0 that fix their structure.
SD15_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "attention_head_dim": 8,
             "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
SDXL_UNET = {"sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
             "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
             "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}


@pytest.mark.parametrize("fields, size, sites", [(SD15_UNET, "sd-v1", 16), (SDXL_UNET, "sdxl", 11)])
def test_full_size_unets_read_as_our_configs_with_the_ldm_numbering(fields, size, sites) -> None:
    """At full size, on the meta device: diffusers' SD 1.5 and SDXL UNets give our UNet configs (what the
    head-fits check compares) and their spatial transformers in the ldm UNet's order and scales."""
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**fields)
        ours = UNetModel(unet_config(size))
    assert diffusers_unet_config(theirs.state_dict(), theirs.config, "unet") == unet_config(size)
    layout = diffusers_layout(theirs)
    assert len(layout.sites) == sites
    assert [s.downscale for s in layout.sites] == [s.downscale for s in ldm_layout(ours).sites]
    assert [len(s.module.transformer_blocks) for s in layout.sites] == [
        len(s.module.transformer_blocks) for s in ldm_layout(ours).sites]


class _PeftLinear(torch.nn.Module):
    """A linear layer as peft wraps it for a LoRA (``base_layer``, ``lora_A`` / ``lora_B`` by adapter name)."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.ModuleDict({"default_0": torch.nn.Linear(base.in_features, rank, bias=False)})
        self.lora_B = torch.nn.ModuleDict({"default_0": torch.nn.Linear(rank, base.out_features, bias=False)})
        torch.nn.init.zeros_(self.lora_B["default_0"].weight)  # a LoRA of no effect: the maps stay the plain ones

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default_0"](self.lora_A["default_0"](x))


def test_a_pipeline_with_a_lora_loaded_serves_heads_and_zero_shot(tiny_model_files) -> None:
    pipe = sd1_pipeline(load_stable_diffusion(tiny_model_files[0]))
    image = random_image(64, 64, seed=11)
    plain = [_maps(segmenter_from_pipeline(pipe, head, resolution=64), image) for head in (None, tiny_model_files[1])]
    for module in list(pipe.unet.modules()):
        if type(module).__name__ == "Attention":
            module.to_q, module.to_k, module.to_v = (_PeftLinear(m) for m in (module.to_q, module.to_k, module.to_v))
    assert any(".base_layer." in k for k in pipe.unet.state_dict()) and any(".lora_A." in k for k in pipe.unet.state_dict())
    for head, expected in zip((None, tiny_model_files[1]), plain):
        _assert_close(_maps(segmenter_from_pipeline(pipe, head, resolution=64), image), expected)


def test_a_textual_inversion_term_is_read_at_the_tokens_the_pipeline_gives_it(tiny_model_files) -> None:
    """A new token holding the embedding of "cat" makes the same zero-shot map as "cat": its span is the one
    token the pipeline's tokenizer makes of it (SD's tokenizer would split "<kitty>" into three pieces)."""
    model = load_stable_diffusion(tiny_model_files[0])
    pipe = _with(sd1_pipeline(model), tokenizer=own_tokenizer())
    embeddings = pipe.text_encoder.get_input_embeddings().weight
    cat = pipe.tokenizer("cat").input_ids[1]
    pipe.load_textual_inversion({"<kitty>": embeddings[cat].detach().clone()}, token="<kitty>")
    segmenter = segmenter_from_pipeline(pipe, resolution=64)
    segmenter.set_image(random_image(64, 64, seed=12))
    maps = segmenter.predict_terms(["cat", "<kitty>"])
    assert segmenter.backbone.token_spans(["<kitty>", "a cat"]) == [(1, 2), (1, 3)]
    assert float((maps["<kitty>"] - maps["cat"]).abs().max()) <= 1e-6


def test_zero_shot_serves_a_unet_of_varying_depth_and_a_head_is_refused_by_name(sdxl_pair, tiny_model_files) -> None:
    """SSD-1B-like: transformer depths that vary within a level, which our UNetConfig cannot describe."""
    pipe = sdxl_pair[1]
    fields = {**pipe.unet.config, "reverse_transformer_layers_per_block": [[2, 3, 2], [1, 2, 1], [1, 2, 1]]}
    torch.manual_seed(0)
    distilled = _with(pipe, unet=diffusers.UNet2DConditionModel(**{k: v for k, v in fields.items()
                                                                    if not k.startswith("_")}).eval())
    segmenter = segmenter_from_pipeline(distilled, resolution=64)
    segmenter.set_image(random_image(64, 64, seed=13))
    assert torch.isfinite(segmenter.predict_terms(["sky"])["sky"]).all()
    with pytest.raises(CheckpointError, match=r"^StableDiffusionXLPipeline.unet does not fit its config: "):
        segmenter_from_pipeline(distilled, tiny_model_files[1])


def test_parts_replaced_after_the_segmenter_are_followed_or_refused(tiny_model_files) -> None:
    pipe = sd1_pipeline(load_stable_diffusion(tiny_model_files[0]))
    segmenter = segmenter_from_pipeline(pipe, resolution=64)
    segmenter.set_image(random_image(64, 64, seed=14))
    zero_snr = diffusers.DDIMScheduler(**SD_BETAS, rescale_betas_zero_snr=True)
    pipe.scheduler = zero_snr  # read again: the schedule is the new scheduler's
    assert torch.equal(segmenter.backbone.schedule.alphas_cumprod, zero_snr.alphas_cumprod.double())
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    with pytest.raises(CheckpointError, match=r"\(FlowMatchEulerDiscreteScheduler\) has no alphas_cumprod table"):
        segmenter.predict("red ball")
    pipe.scheduler = zero_snr
    pipe.unet = diffusers_twin(load_stable_diffusion(tiny_model_files[0]).unet, TIME_DIM)
    with pytest.raises(CheckpointError, match=r"^the StableDiffusionPipeline's UNet was replaced after the segmenter "
                                              r"was made; make a new one with segmenter_from_pipeline\(pipe\)$"):
        segmenter.predict("red ball")
    pipe.unet = copy.deepcopy(pipe.unet).to("meta")
    with pytest.raises(CheckpointError, match=r"^the StableDiffusionPipeline's UNet is on the meta device \(no "
                                              r"weights\); load its weights first$"):
        segmenter_from_pipeline(pipe)


def test_a_compiled_unet_is_read_through_its_wrapper(sd1_pipe, tiny_model_files) -> None:
    """torch.compile wraps the UNet (its weights' names gain '_orig_mod.'); the layout and the head check read
    the module it wraps. (Only made here: compiling on the CPU takes minutes.)"""
    compiled = _with(sd1_pipe, unet=torch.compile(sd1_pipe.unet))
    segmenter = segmenter_from_pipeline(compiled, tiny_model_files[1], resolution=64)
    assert segmenter.backbone.layout.unet is sd1_pipe.unet
    assert segmenter.backbone.layout.sites[5].module is sd1_pipe.unet.down_blocks[2].attentions[1]


@pytest.mark.parametrize("dtype, hint", [
    (torch.float16, "it overflows in float16, as its config's force_upcast says: set pipe.vae.to(torch.float32) or "
                    "use an fp16-fixed VAE"),
    (torch.float32, "its weights may be corrupt")])
def test_a_vae_that_overflows_says_what_to_do(sd1_pipe, dtype, hint) -> None:
    vae = copy.deepcopy(sd1_pipe.vae)
    with torch.no_grad():  # beyond float16's range (65504); in float32, a weight that is not a number
        vae.quant_conv.bias.fill_(1e5 if dtype == torch.float16 else float("nan"))
    segmenter = segmenter_from_pipeline(_with(sd1_pipe, vae=vae.to(dtype)), resolution=64)
    with pytest.raises(CheckpointError) as caught:
        segmenter.set_image(random_image(64, 64, seed=15))
    assert str(caught.value) == f"the StableDiffusionPipeline's VAE produced NaN/inf latents; {hint}"
