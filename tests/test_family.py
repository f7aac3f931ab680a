"""One model-family classifier: checkpoint files by their tensor names and shapes alone, WebUI
hosts by their flags (backbones/family.py)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from ldznet_ext.backbones.family import UNET_PREFIX, classify
from ldznet_ext.sd.checkpoint import stable_diffusion_state_dict

CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"


@pytest.fixture(scope="module")
def sd_state(tiny_sd) -> dict[str, Tensor]:
    return stable_diffusion_state_dict(tiny_sd)


def _unet_with(state: dict[str, Tensor], **extra) -> dict[str, Tensor]:
    return {**state, **{UNET_PREFIX + k: v for k, v in extra.items()}}


def _context(state: dict[str, Tensor], width: int) -> dict[str, Tensor]:
    return {k: torch.zeros(v.shape[0], width) if k.endswith("attn2.to_k.weight") else v for k, v in state.items()}


CASES = {  # case: (transform, family, what the problem says)
    "pix2pix": (lambda s: _unet_with(s, **{"input_blocks.0.0.weight": torch.zeros(32, 8, 3, 3)}), "instruct-pix2pix",
                "the UNet takes 8 input channels, not 4 (an instruct-pix2pix UNet"),
    "sdxl-label-emb": (lambda s: _unet_with(s, **{"label_emb.0.0.weight": torch.zeros(128, 2816)}), "sdxl",
                       "SDXL's pooled-text and size conditioning (label_emb)"),
    "sdxl-context": (lambda s: _context(s, 2048), "sdxl", "2048-d text context; SDXL checkpoints serve zero-shot masks only"),
    "sd3": (lambda s: {UNET_PREFIX + "joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(6, 2)}, "sd3",
            "SD 3 checkpoints (an MMDiT with joint blocks, no UNet) are not supported"),
    "flux": (lambda s: {"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, "flux",
             "Flux checkpoints (a transformer with double blocks, no UNet) are not supported"),
    "sd2-context": (lambda s: _context(s, 1024), "sd2",
                    "the UNet's text context is 1024-d (SD 2.x); SD 2.x checkpoints serve zero-shot masks only"),
    "inpainting": (lambda s: _unet_with(s, **{"input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)}),
                   "sd-v1-inpainting", "inpainting UNets (9 input channels) are not supported"),
    "vae": (lambda s: {k[len("first_stage_model."):]: v for k, v in s.items() if k.startswith("first_stage_model.")},
            "vae", "this is a VAE file, not an SD model; pass it as --vae beside the model"),
    "lora-kohya": (lambda s: {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
                              "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.zeros(())},
                   "lora", "this is a LoRA (weights added to an SD model), not an SD model; pass the model itself"),
    "lora-peft": (lambda s: {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32)},
                  "lora", "this is a LoRA"),
    "loha": (lambda s: {"lycoris_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(32, 4),
                        "lycoris_down_blocks_0_attentions_0_proj_in.alpha": torch.zeros(())}, "lora", "this is a LoRA"),
    "sd-v1-with-a-stray-lora-key": (lambda s: {**s, "lora_te_text_model_encoder_layers_0.alpha": torch.zeros(())},
                                    "sd-v1", None),
    "embedding": (lambda s: {"emb_params": torch.zeros(2, 768)}, "embedding",
                  "this is a textual-inversion embedding, not an SD model; pass the model itself"),
    "embedding-sdxl": (lambda s: {"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, "embedding",
                       "textual-inversion embedding"),
    "sd-v1": (lambda s: s, "sd-v1", None),
}


@pytest.mark.parametrize("case", CASES)
def test_families_are_named_from_the_shapes_alone(sd_state, case) -> None:
    transform, family, problem = CASES[case]
    state = transform(sd_state)
    shapes = {k: tuple(v.shape) for k, v in state.items()}  # what a safetensors header says
    meta = {k: torch.empty(v.shape, device="meta") for k, v in state.items()}
    infos = [classify(state), classify(shapes), classify(meta)]
    assert infos[0] == infos[1] == infos[2]
    assert infos[0].family == family
    assert infos[0].problem == problem if problem is None else problem in infos[0].problem


def test_a_crafted_conv_in_shape_is_named_from_the_header(sd_state) -> None:
    info = classify({**{k: tuple(v.shape) for k, v in sd_state.items()}, CONV_IN: (0, 4, 3, 3)})
    assert (info.family, info.problem) == ("unknown", f"'{CONV_IN}' has shape (0, 4, 3, 3); "
                                                      "expected a convolution weight [out, in, k, k]")
