"""Head architectures: the official LD-ZNet layout, parameter counts, the attention pool, attn3,
initialisation from an SD UNet, and the forward pass on features from a tapped SD UNet."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conftest import randomize_, tiny_unet
from ldznet_ext.backbones.base import LDZNET_BLOCKS, ldm_layout
from ldznet_ext.modeling.build import HeadConfig, build_head, head_config, init_from_sd_unet
from ldznet_ext.modeling.ldznet import AttentionPool2d, SDAttentionTransformerBlock
from ldznet_ext.sd.schedule import NoiseSchedule
from ldznet_ext.sd.unet import count_parameters, unet_config
from ldznet_ext.tap import FeatureTap

# Names and shapes of the official network's state dict (from the project's shared reference
# facts: the official UNetModel instantiated with configs/ldznet/phrasecut.yaml).
OFFICIAL_KEYS = Path(__file__).resolve().parent / "data" / "official_ldznet_unet_keys.json"
SD_UNET_PARAMETERS = 859_520_964


def _meta_head(arch: str) -> nn.Module:
    with torch.device("meta"):
        return build_head(head_config(arch))


def _tiny_head(arch: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the fresh layers' own init draws from the global generator
    return build_head(head_config(arch, "tiny"))


def _sd_features(seed: int = 0, h: int = 16, w: int = 24) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
    """z [2, 4, h, w], text context [2, 77, 64] and SD features of blocks 6-10 from a tiny SD UNet."""
    g = torch.Generator().manual_seed(seed)
    z, noise = torch.randn(2, 4, h, w, generator=g), torch.randn(2, 4, h, w, generator=g)
    context = torch.randn(2, 77, 64, generator=g)
    sd_unet, t = tiny_unet("ours", seed=seed + 1), torch.tensor([400, 400])
    with torch.no_grad(), FeatureTap(ldm_layout(sd_unet), LDZNET_BLOCKS) as tap:
        features = tap.run(lambda: sd_unet(NoiseSchedule().q_sample(z, t, noise), t, context))
    return z, context, features


# --- sizes at SD v1 -------------------------------------------------------------------------


def test_ldznet_layout_equals_the_official_state_dict() -> None:
    official = json.loads(OFFICIAL_KEYS.read_text())
    head = _meta_head("ldznet")
    layout = {name: list(t.shape) for name, t in head.state_dict().items()}
    assert len(layout) == official["tensors"] == 760
    assert layout == official["state_dict"]
    assert count_parameters(head) == official["parameters"] == 925_882_936


def test_znet_parameter_count() -> None:
    head = _meta_head("znet")
    four_channel_out = 320 * 4 * 3 * 3 + 4
    one_channel_out = 320 * 1 * 3 * 3 + 1
    final = (9 + 1) + 3 * ((4 + 1) + (9 + 1))  # 3x3 conv 1->1, then 3 x (2x2 transposed conv, 3x3 conv)
    assert count_parameters(head.final) == final == 55
    assert count_parameters(head) == SD_UNET_PARAMETERS - four_channel_out + one_channel_out + final == 859_512_376


def test_rgbnet_parameter_count() -> None:
    head = _meta_head("rgbnet")
    # Stem: 3x3 conv 3->64, 4x4 stride-2 convs 64->64->128->256, 3x3 conv 256->4 (weights + biases).
    stem = ((3 * 64 * 9 + 64) + (64 * 64 * 16 + 64) + (64 * 128 * 16 + 128) + (128 * 256 * 16 + 256)
            + (256 * 4 * 9 + 4))
    assert count_parameters(head.stem) == stem == 732_356
    assert count_parameters(head) == 859_512_376 + stem == 860_244_732


# --- forward passes at tiny size ------------------------------------------------------------


def test_tiny_ldznet_segments_with_tapped_sd_features() -> None:
    z, context, features = _sd_features(h=16, w=24)
    head = randomize_(_tiny_head("ldznet", seed=0), seed=2)
    randomize_(head.final, seed=3, std=1.0)  # at std 0.1 the seven 1-channel layers damp the signal to ~1e-8
    with torch.no_grad():
        logits = head(z, context, features)
        other = head(z, context, {**features, 7: features[7].flip(-1)})
    assert logits.shape == (2, 1, 128, 192) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert (logits - other).abs().max() > 1e-2  # the middle-block SD feature reaches the logits


def test_ldznet_with_silent_attn3_is_znet() -> None:
    z, context, features = _sd_features()
    ldznet = randomize_(_tiny_head("ldznet", seed=0), seed=2)
    with torch.no_grad():
        for module in ldznet.modules():
            if isinstance(module, SDAttentionTransformerBlock):
                module.attn3.to_out[0].weight.zero_()
                module.attn3.to_out[0].bias.zero_()
    znet = _tiny_head("znet", seed=0)
    znet.load_state_dict({k: v for k, v in ldznet.state_dict().items() if k in znet.state_dict()}, strict=True)
    with torch.no_grad():
        assert torch.equal(ldznet(z, context, features), znet.eval()(z, context))


def test_znet_and_rgbnet_output_sizes() -> None:
    g = torch.Generator().manual_seed(0)
    context = torch.randn(1, 77, 64, generator=g)
    with torch.no_grad():
        assert _tiny_head("znet", 0)(torch.randn(1, 4, 8, 16, generator=g), context).shape == (1, 1, 64, 128)
        rgbnet = _tiny_head("rgbnet", 0)
        assert rgbnet(torch.rand(1, 3, 64, 128, generator=g) * 2 - 1, context).shape == (1, 1, 64, 128)
        with pytest.raises(ValueError, match=r"multiples of 8, got \(64, 100\)"):
            rgbnet(torch.zeros(1, 3, 64, 100), context)


def test_tiny_ldznet_pool_sizes_follow_the_latent_size() -> None:
    head = _tiny_head("ldznet", 0)  # latent_size 48: s = 48 / 4 = 12 at level 2, 48 / 8 = 6 in the middle
    pools = {m.block_number: tuple(m.attentionpool2D.positional_embedding.shape)
             for m in head.modules() if hasattr(m, "attentionpool2D")}
    assert pools == {6: (64, 145), 7: (64, 37), 8: (64, 145), 9: (64, 145), 10: (64, 145)}


def test_feature_of_the_wrong_shape_names_the_block() -> None:
    z, context, features = _sd_features()
    head = _tiny_head("ldznet", 0)
    features[8] = features[8][..., :-1]
    message = r"block 8: SD feature \(64, 4, 5\) does not match the LD-ZNet feature \(64, 4, 6\)"
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        head(z, context, features)


def test_missing_sd_blocks_are_named() -> None:
    z, context, features = _sd_features()
    del features[7]
    with pytest.raises(ValueError, match=r"blocks \[6, 7, 8, 9, 10\]; missing \[7\]"):
        _tiny_head("ldznet", 0)(z, context, features)


# --- the attention pool ---------------------------------------------------------------------


def _official_attention_pool(pool: AttentionPool2d, x: Tensor) -> Tensor:
    """The official AttentionPool2d + QKVAttention ("new order") semantics, written out."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h * w)
    x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
    pe = pool.positional_embedding
    if pe.shape[-1] != x.shape[-1]:
        s = int(math.sqrt(pe.shape[1] - 1))
        grid = F.interpolate(pe[:, 1:].reshape(1, c, s, s), (h, w), mode="bicubic", align_corners=False)
        pe = torch.cat([pe[:, :1], grid.reshape(c, h * w)], dim=1)
    qkv = pool.qkv_proj(x + pe[None])
    heads, tokens = pool.num_heads, qkv.shape[-1]
    ch = c // heads
    q, k, v = qkv.chunk(3, dim=1)  # new order: all queries, then all keys, then all values
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", (q * scale).reshape(b * heads, ch, tokens),
                          (k * scale).reshape(b * heads, ch, tokens)).softmax(dim=-1)
    out = torch.einsum("bts,bcs->bct", weight, v.reshape(b * heads, ch, tokens))
    return pool.c_proj(out.reshape(b, c, tokens))


def _pool(seed: int = 0) -> AttentionPool2d:
    torch.manual_seed(seed)
    return randomize_(AttentionPool2d(size=4, channels=64, head_channels=16), seed, std=0.2)


def test_pool_embedding_is_used_as_is_for_an_s_by_s_feature() -> None:
    pool = _pool()
    assert pool.resized_embedding(4, 4) is pool.positional_embedding


@pytest.mark.parametrize("size", [(3, 5), (2, 8), (8, 8)], ids=["smaller", "same-count-other-aspect", "larger"])
def test_pool_embedding_is_resized_bicubically(size: tuple[int, int]) -> None:
    pool, (h, w) = _pool(), size
    pe = pool.positional_embedding.detach()
    grid = F.interpolate(pe[:, 1:].reshape(1, 64, 4, 4), (h, w), mode="bicubic", align_corners=False)
    expected = torch.cat([pe[:, :1], grid.reshape(64, h * w)], dim=1)
    assert torch.equal(pool.resized_embedding(h, w).detach(), expected)


@pytest.mark.parametrize("size", [(4, 4), (3, 5), (6, 2)])
def test_pool_matches_the_official_attention_pool(size: tuple[int, int]) -> None:
    pool = _pool()
    x = torch.randn(2, 64, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, expected = pool(x), _official_attention_pool(pool, x)
    assert out.shape == (2, 64, size[0] * size[1] + 1)  # all hw + 1 tokens, the mean token first
    assert (out - expected).abs().max() <= 1e-5


# --- the LD-ZNet transformer block ----------------------------------------------------------


def _attend(attn: nn.Module, x: Tensor, context: Tensor) -> Tensor:
    """ldm's CrossAttention: softmax(q k^T / sqrt(d)) v per head, then to_out."""
    def split(t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], t.shape[1], attn.heads, -1).transpose(1, 2)

    q, k, v = split(attn.to_q(x)), split(attn.to_k(context)), split(attn.to_v(context))
    weights = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
    return attn.to_out((weights @ v).transpose(1, 2).flatten(2))


def _feed_forward(block: nn.Module, x: Tensor) -> Tensor:
    value, gate = block.ff.net[0].proj(x).chunk(2, dim=-1)
    return block.ff.net[2](value * F.gelu(gate))


def test_ldznet_block_order_self_text_sd_feedforward() -> None:
    block = randomize_(SDAttentionTransformerBlock(dim=64, heads=2, dim_head=32, context_dim=48), seed=4)
    g = torch.Generator().manual_seed(5)
    x, text = torch.randn(2, 10, 64, generator=g), torch.randn(2, 7, 48, generator=g)
    sd = torch.randn(2, 5, 64, generator=g)

    def compose(order: list[str]) -> Tensor:
        h = x
        steps = {
            "self": lambda h: _attend(block.attn1, block.norm1(h), block.norm1(h)),
            "text": lambda h: _attend(block.attn2, block.norm2(h), text),
            "sd": lambda h: _attend(block.attn3, block.norm_sd(h), sd),
            "ff": lambda h: _feed_forward(block, block.norm3(h)),
        }
        for step in order:
            h = steps[step](h) + h
        return h

    with torch.no_grad():
        out = block(x, text, sd)
        assert (out - compose(["self", "text", "sd", "ff"])).abs().max() <= 1e-5
        assert (out - compose(["self", "sd", "text", "ff"])).abs().max() > 1e-3


# --- initialisation from the SD UNet --------------------------------------------------------

FRESH_PARTS = {
    "ldznet": ("attn3.", "norm_sd.", "attentionpool2D.", "final."),
    "znet": ("final.",),
    "rgbnet": ("final.", "stem."),
}


@pytest.mark.parametrize("arch", sorted(FRESH_PARTS))
def test_init_from_sd_unet(arch: str) -> None:
    sd_state = tiny_unet("ldm", seed=7).state_dict()  # the host's module tree, random weights
    head = _tiny_head(arch, seed=0)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    fresh = init_from_sd_unet(head, sd_state)
    after = head.state_dict()
    assert fresh == [k for k in after if any(part in k for part in FRESH_PARTS[arch])]
    # final: 7 layers x (weight, bias); LD-ZNet per SD block: attn3 5, norm_sd 2, pool 5; stem: 5 convs
    assert len(fresh) == {"ldznet": 5 * (5 + 2 + 5) + 14, "znet": 14, "rgbnet": 14 + 10}[arch]
    for name, tensor in after.items():
        if name in fresh:
            assert torch.equal(tensor, before[name]), name
        elif name.startswith("out.2."):
            assert torch.equal(tensor, sd_state[name][:1]), name  # noise channel 0 becomes the mask channel
        else:
            assert torch.equal(tensor, sd_state[name]), name


def test_head_config() -> None:
    config = head_config("ldznet", "tiny", latent_size=64)
    assert config.unet == unet_config("tiny", out_channels=1)
    assert (config.sd_blocks, config.latent_size, config.timestep) == ((6, 7, 8, 9, 10), 64, 400)
    assert config.uses_sd_features and config.input_kind == "latent"
    assert head_config("rgbnet").input_kind == "image" and not head_config("znet").uses_sd_features
    assert HeadConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown architecture 'clipseg'"):
        head_config("clipseg")
