"""The VAE against the reference ldm modules: parity, parameter count, keys, config inference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldznet_ext.errors import CheckpointError, ImageError, LdznetError
from ldznet_ext.sd.vae import SCALE_FACTOR, AutoencoderKL, VAEConfig, vae_config

ldm_model = pytest.importorskip("ldm.modules.diffusionmodules.model")
ldm_dist = pytest.importorskip("ldm.modules.distributions.distributions")

THREE_LEVELS = VAEConfig(ch=32, ch_mult=(1, 2, 3), num_res_blocks=2, z_channels=3, embed_dim=2)


class LdmAutoencoderKL(nn.Module):
    """ldm's AutoencoderKL minus Lightning and the loss: the same modules and the same keys."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dd = dict(
            ch=cfg.ch, out_ch=cfg.out_ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
            attn_resolutions=[], dropout=0.0, in_channels=cfg.in_channels, resolution=256,
            z_channels=cfg.z_channels, double_z=True,
        )  # fmt: skip
        self.encoder = ldm_model.Encoder(**dd)
        self.decoder = ldm_model.Decoder(**dd)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor):
        return ldm_dist.DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


def _pair(cfg: VAEConfig) -> tuple[AutoencoderKL, LdmAutoencoderKL]:
    torch.manual_seed(0)
    ours = AutoencoderKL(cfg).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name:  # GroupNorm affine, moved away from the identity init
                is_scale = name.endswith("weight")
                p.copy_(torch.rand_like(p) + 0.5 if is_scale else 0.2 * torch.randn_like(p))
    ref = LdmAutoencoderKL(cfg).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("cfg", [vae_config("tiny"), THREE_LEVELS], ids=["tiny", "three-levels"])
def test_matches_ldm(cfg: VAEConfig) -> None:
    ours, ref = _pair(cfg)
    f = ours.downsample_factor
    x = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        mean, logvar = ours.encode_moments(x)
        post = ref.encode(x)
        torch.manual_seed(7)  # ldm draws its noise from the global generator
        ref_sample = post.sample()
        sample = ours.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
        z_gen = torch.Generator().manual_seed(2)
        z = torch.randn(2, cfg.embed_dim, 40 // f, 56 // f, generator=z_gen)
        image, ref_image = ours.decode(z), ref.decode(z)
    assert mean.shape == (2, cfg.embed_dim, 40 // f, 56 // f)
    assert image.shape == (2, 3, 40, 56)
    assert mean.std() > 0.1 and logvar.std() > 0.1 and image.std() > 0.1  # not a trivial comparison
    close = dict(atol=1e-5, rtol=0)
    torch.testing.assert_close(mean, post.mean, **close)
    torch.testing.assert_close(logvar, post.logvar, **close)
    torch.testing.assert_close(ours.encode(x), post.mode(), **close)
    torch.testing.assert_close(sample, ref_sample, **close)
    assert (sample - mean).abs().max() > 1e-2  # the sample really differs from the mean
    torch.testing.assert_close(image, ref_image, **close)


def test_logvar_is_clamped_like_ldm() -> None:
    ours, ref = _pair(vae_config("tiny"))
    with torch.no_grad():
        for model in (ours, ref):
            model.quant_conv.bias[4:6] = torch.tensor([80.0, -80.0])  # logvar channels 0 and 1
        x = torch.zeros(1, 3, 8, 8)
        _, logvar = ours.encode_moments(x)
        ref_logvar = ref.encode(x).logvar
    assert torch.equal(logvar[:, 0], torch.full_like(logvar[:, 0], 20.0))
    assert torch.equal(logvar[:, 1], torch.full_like(logvar[:, 1], -30.0))
    torch.testing.assert_close(logvar, ref_logvar, atol=1e-5, rtol=0)


def test_sd_v1_matches_ldm_on_meta() -> None:
    cfg = vae_config("sd-v1")
    with torch.device("meta"):
        ours, ref = AutoencoderKL(cfg), LdmAutoencoderKL(cfg)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters()) == 83_653_863
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: v.shape for k, v in ref.state_dict().items()}
    assert ours.downsample_factor == 8 and SCALE_FACTOR == 0.18215


@pytest.mark.parametrize("cfg", [vae_config("sd-v1"), vae_config("tiny"), THREE_LEVELS])
def test_config_from_state_dict(cfg: VAEConfig) -> None:
    with torch.device("meta"):
        state = AutoencoderKL(cfg).state_dict()
    assert VAEConfig.from_state_dict(state) == cfg


def test_from_state_dict_names_missing_key() -> None:
    with torch.device("meta"):
        state = AutoencoderKL(vae_config("tiny")).state_dict()
    del state["quant_conv.weight"]
    with pytest.raises(CheckpointError, match="quant_conv.weight"):
        VAEConfig.from_state_dict(state)


def test_bad_inputs_raise() -> None:
    vae = AutoencoderKL(vae_config("tiny"))
    with pytest.raises(ImageError, match=r"40x57 px .* multiples of 2"):
        vae.encode(torch.zeros(1, 3, 40, 57))
    with pytest.raises(ImageError, match=r"\(1, 4, 8, 8\); expected \[B, 3, H, W\]"):
        vae.encode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ImageError, match=r"expected \[B, 3, H, W\]"):
        vae.encode(torch.zeros(3, 8, 8))
    with pytest.raises(LdznetError, match=r"\(1, 3, 4, 4\); expected \[B, 4, h, w\]"):
        vae.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(LdznetError, match="unknown VAE size 'sd-v2'"):
        vae_config("sd-v2")
    with pytest.raises(LdznetError, match="multiple of 32"):
        VAEConfig(ch=48, ch_mult=(1, 2))


def test_the_attention_gives_sdpa_contiguous_inputs(monkeypatch) -> None:
    """Given transposed views, torch's CPU attention falls back to the kernel that builds the HW x HW
    matrix: gigabytes for the VAE at a 1024 px working size."""
    import ldznet_ext.sd.vae as vae_module

    seen, real = [], vae_module.F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        seen.append(all(t.is_contiguous() for t in (q, k, v)))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(vae_module.F, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        AutoencoderKL(vae_config("tiny")).encode(torch.zeros(1, 3, 32, 32))
    assert seen and all(seen)
