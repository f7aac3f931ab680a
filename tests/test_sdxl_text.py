"""SDXL's conditioning against transformers' CLIP text models: bigG in open_clip's layout converted by
diffusers' convert_open_clip_checkpoint, ViT-L through transformers directly, at tiny sizes."""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest import randomize_
from ldznet_ext.sd.openclip import OpenCLIPTextEncoder, openclip_ids
from ldznet_ext.sd.sdxl import SDXLConditioner, size_vector
from ldznet_ext.sd.text import TextEncoder, text_config
from ldznet_ext.sd.tokenizer import EOS_ID, tokenize

single_file = pytest.importorskip("diffusers.loaders.single_file_utils")

pytestmark = pytest.mark.usefixtures("single_thread")

PREFIX = "conditioner.embedders.1.model."
PROMPTS = ["a red cat on a mat", "sky", ""]


def tiny_bigg(seed: int = 0) -> OpenCLIPTextEncoder:
    """bigG's shape at test widths: 3 layers, 64 wide in 2 heads of 32, MLP x4, projection to 48."""
    return randomize_(OpenCLIPTextEncoder(width=64, layers=3, heads=2, mlp_width=256, embed_dim=48), seed)


def reference_bigg(ours: OpenCLIPTextEncoder, width: int = 64, layers: int = 3, heads: int = 2, mlp_width: int = 256,
                   projection: int = 48) -> transformers.CLIPTextModelWithProjection:
    """transformers' twin of ``ours`` (of :func:`tiny_bigg`'s shape unless told), converted by diffusers."""
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=mlp_width,
                                         num_hidden_layers=layers, num_attention_heads=heads,
                                         max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                                         projection_dim=projection,
                                         bos_token_id=49406, eos_token_id=EOS_ID, pad_token_id=0)
    twin = transformers.CLIPTextModelWithProjection(config).eval()
    checkpoint = {PREFIX + k: v for k, v in ours.state_dict().items()}
    checkpoint[PREFIX + "logit_scale"] = torch.tensor(4.6)
    converted = single_file.convert_open_clip_checkpoint(twin, checkpoint, prefix=PREFIX)
    missing, unexpected = twin.load_state_dict(converted, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    return twin


def test_openclip_pads_with_zeros_after_the_end_token() -> None:
    ids = tokenize(["sky", ""])
    padded = openclip_ids(ids)
    assert padded[0, :3].tolist() == ids[0, :3].tolist() and padded[0, 2] == EOS_ID
    assert padded[0, 3:].eq(0).all() and padded[1, :2].tolist() == [49406, EOS_ID] and padded[1, 2:].eq(0).all()


def test_bigg_penultimate_and_pooled_match_transformers() -> None:
    ours = tiny_bigg()
    twin = reference_bigg(ours)
    ids = openclip_ids(tokenize(PROMPTS))
    with torch.no_grad():
        penultimate, pooled = ours(ids)
        expected = twin(input_ids=ids, output_hidden_states=True)
    reference_hidden = expected.hidden_states[-2]
    assert penultimate.shape == (3, 77, 64) and pooled.shape == (3, 48)
    assert (penultimate - reference_hidden).abs().max() <= 1e-5 * reference_hidden.abs().max()
    assert (pooled - expected.text_embeds).abs().max() <= 1e-5 * expected.text_embeds.abs().max()
    assert (pooled[0] - pooled[1]).abs().max() > 0.1


def test_conditioner_concatenates_vit_l_layer_minus_2_and_bigg() -> None:
    clip_l = randomize_(TextEncoder.from_config(text_config("tiny")), seed=5)
    conditioner = SDXLConditioner(clip_l, tiny_bigg())
    with torch.no_grad():
        context, pooled = conditioner.encode(PROMPTS)
        ids = tokenize(PROMPTS)
        vit_l = clip_l.transformer(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        bigg, bigg_pooled = conditioner.embedders[1].model(openclip_ids(ids))
    assert context.shape == (3, 77, 128) and conditioner.context_dim == 128
    assert torch.equal(context, torch.cat([vit_l, bigg], dim=-1)) and torch.equal(pooled, bigg_pooled)
    # layer -2 of ViT-L is not its output (no final layer norm, one layer fewer)
    assert (vit_l - clip_l(ids)).abs().max() > 0.1


def test_size_vector_is_pooled_then_six_sinusoids() -> None:
    pooled = torch.arange(6.0).view(2, 3)
    sizes = torch.tensor([[1024, 768, 0, 0, 1024, 768], [512, 512, 8, 16, 512, 512]])
    y = size_vector(pooled, sizes, 4)
    assert y.shape == (2, 3 + 24) and torch.equal(y[:, :3], pooled)
    # each number n as [cos(n), cos(n / 100), sin(n), sin(n / 100)] (frequencies 10000^(-i/2))
    n = torch.tensor(768.0)
    assert torch.allclose(y[0, 7:11], torch.stack([n.cos(), (n / 100).cos(), n.sin(), (n / 100).sin()]), atol=1e-6)
    assert torch.equal(y[0, 11:15], torch.tensor([1.0, 1.0, 0.0, 0.0]))  # crop top 0
