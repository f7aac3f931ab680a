"""The SD v1 VAE (ldm ``AutoencoderKL``) in plain PyTorch, state-dict compatible with ldm.

The ``first_stage_model.*`` weights of an SD v1 checkpoint (without ``loss.*``) load
strictly into :class:`AutoencoderKL`: module names mirror ldm's ``encoder.*``,
``decoder.*``, ``quant_conv.*`` and ``post_quant_conv.*``. Images are ``[B, 3, H, W]``
in [-1, 1]; latents are ``[B, 4, H/f, W/f]`` with ``f = 2 ** (len(ch_mult) - 1)``
(8 for SD v1). Latents here are unscaled: multiply by :data:`SCALE_FACTOR` before
the UNet and divide before :meth:`AutoencoderKL.decode`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.sampling import sample_posterior
from ..errors import CheckpointError, ImageError, LdznetError

SCALE_FACTOR = 0.18215
"""SD v1 multiplies the VAE latent by this so it has roughly unit variance."""


_LINEAR_ATTENTION = re.compile(r"(.*\.)?(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")


def conv_attention_weights(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with the VAE's mid-block attention weights as ldm's 1x1 convolutions [C, C, 1, 1]: diffusers
    and single files converted from it by older scripts store them as linear [C, C] (any key prefix; tensors
    of other names, and meta tensors' shapes alike, pass as they are)."""
    return {key: value[:, :, None, None] if value.ndim == 2 and _LINEAR_ATTENTION.fullmatch(key) else value
            for key, value in state.items()}


@dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters of an ldm ``AutoencoderKL`` with attention only in the mid blocks."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3

    def __post_init__(self) -> None:
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % 32]
        if not self.ch_mult or self.num_res_blocks < 1 or bad:
            raise LdznetError(
                f"invalid VAE config ch={self.ch}, ch_mult={self.ch_mult}, "
                f"num_res_blocks={self.num_res_blocks}: expected a non-empty ch_mult, "
                "num_res_blocks >= 1 and every ch * mult a multiple of 32 (GroupNorm(32))"
            )

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor]) -> VAEConfig:
        """Infer the config from the shapes and key names of an ldm VAE state dict.

        ``state`` holds the ``first_stage_model.*`` weights with that prefix removed.
        Raises :class:`CheckpointError` when a key the VAE always has is missing.
        """

        def shape(key: str) -> torch.Size:
            if key not in state:
                raise CheckpointError(
                    f"VAE state dict has no {key!r}: expected the keys of an ldm AutoencoderKL "
                    "(encoder.*, decoder.*, quant_conv.*, post_quant_conv.*)"
                )
            return state[key].shape

        def indices(pattern: str) -> set[int]:
            return {int(m.group(1)) for key in state if (m := re.match(pattern, key))}

        levels = indices(r"encoder\.down\.(\d+)\.")
        blocks = indices(r"encoder\.down\.0\.block\.(\d+)\.")
        ch_out, in_channels = shape("encoder.conv_in.weight")[:2]
        # Every level up to the highest index must be present, level 0 included.
        n_levels = max(levels, default=0) + 1
        mults = [shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(n_levels)]
        if any(c % ch_out for c in mults):
            raise CheckpointError(
                f"VAE encoder level widths {mults} are not multiples of conv_in's {ch_out} channels"
            )
        quant_out, quant_in = shape("quant_conv.weight")[:2]
        return cls(
            ch=ch_out,
            ch_mult=tuple(c // ch_out for c in mults),
            num_res_blocks=len(blocks),
            z_channels=quant_in // 2,
            embed_dim=quant_out // 2,
            in_channels=in_channels,
            out_ch=shape("decoder.conv_out.weight")[0],
        )


_CONFIGS = {
    "sd-v1": VAEConfig(),
    "tiny": VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
}


def vae_config(size: str) -> VAEConfig:
    """The config for a size name: ``"sd-v1"`` (83.7M parameters) or ``"tiny"`` (tests)."""
    if size not in _CONFIGS:
        raise LdznetError(f"unknown VAE size {size!r}; expected one of {sorted(_CONFIGS)}")
    return _CONFIGS[size]


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


def _conv3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class ResnetBlock(nn.Module):
    """Pre-norm residual block, SiLU activations; a 1x1 ``nin_shortcut`` when widths differ."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), _conv3(cin, cout)
        self.norm2, self.conv2 = _norm(cout), _conv3(cout, cout)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all ``H*W`` positions (ldm's "vanilla" AttnBlock)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # [B, 1, HW, C]: one head, so fused SDPA kernels avoid materialising the HW x HW matrix. Contiguous:
        # given the transposed views, torch's CPU kernel falls back to the plain one, which builds that
        # matrix (gigabytes at a 1024 px working size, which --resolution allows).
        q, k, v = (p(y).flatten(2).transpose(1, 2).unsqueeze(1).contiguous() for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.squeeze(1).transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero row/column at the bottom/right (as ldm)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution: residual blocks, then an optional ``downsample`` or ``upsample``."""

    def __init__(self, widths: list[int], resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(a, b) for a, b in zip(widths, widths[1:]))
        self.resample_name = resample_name if resample is not None else None
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return getattr(self, self.resample_name)(x) if self.resample_name else x


class Encoder(nn.Module):
    """Image ``[B, in_channels, H, W]`` -> moments ``[B, 2 * z_channels, H/f, W/f]``."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = _conv3(cfg.in_channels, cfg.ch)
        self.down = nn.ModuleList(
            _Level(
                [cin] + [cout] * cfg.num_res_blocks,
                Downsample(cout) if i != last else None,
                "downsample",
            )
            for i, (cin, cout) in enumerate(zip([cfg.ch] + widths, widths))
        )
        self.mid = _Mid(widths[-1])
        self.norm_out = _norm(widths[-1])
        self.conv_out = _conv3(widths[-1], 2 * cfg.z_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """Latent ``[B, z_channels, h, w]`` -> image ``[B, out_ch, h*f, w*f]``."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = _conv3(cfg.z_channels, widths[-1])
        self.mid = _Mid(widths[-1])
        # up[i] works at resolution level i (as ldm indexes it) but runs from the last level down.
        inputs = widths[1:] + widths[-1:]
        self.up = nn.ModuleList(
            _Level(
                [cin] + [cout] * (cfg.num_res_blocks + 1),
                Upsample(cout) if i != 0 else None,
                "upsample",
            )
            for i, (cin, cout) in enumerate(zip(inputs, widths))
        )
        self.norm_out = _norm(widths[0])
        self.conv_out = _conv3(widths[0], cfg.out_ch)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """The KL-regularised VAE of SD v1; keys match ldm's ``first_stage_model``."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config or VAEConfig()
        cfg = self.config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD v1)."""
        return self.config.downsample_factor

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior ``(mean, logvar)``, each ``[B, embed_dim, H/f, W/f]``; logvar in [-30, 20].

        ``x`` is ``[B, in_channels, H, W]`` in [-1, 1] with H and W multiples of
        :attr:`downsample_factor`; anything else raises :class:`ImageError`.
        """
        self._check_image(x)
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(
        self, x: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Unscaled latent ``[B, embed_dim, H/f, W/f]`` of images ``x`` in [-1, 1].

        The posterior mean by default; with ``sample=True``, ``mean + std * noise`` where
        the noise is drawn in float32 from ``generator`` (on the generator's device, so a
        seeded CPU generator gives the same latent on any device).
        """
        mean, logvar = self.encode_moments(x)
        if not sample:
            return mean
        return sample_posterior(mean, torch.exp(0.5 * logvar), generator)

    def decode(self, z: Tensor) -> Tensor:
        """Image ``[B, out_ch, h*f, w*f]``, roughly in [-1, 1], from an unscaled latent.

        ``z`` is ``[B, embed_dim, h, w]`` (divide a UNet latent by :data:`SCALE_FACTOR` first).
        """
        dim = self.config.embed_dim
        if z.ndim != 4 or z.shape[1] != dim:
            raise LdznetError(f"VAE latent has shape {tuple(z.shape)}; expected [B, {dim}, h, w]")
        return self.decoder(self.post_quant_conv(z))

    def _check_image(self, x: Tensor) -> None:
        f, cin = self.downsample_factor, self.config.in_channels
        if x.ndim != 4 or x.shape[1] != cin:
            raise ImageError(f"VAE input has shape {tuple(x.shape)}; expected [B, {cin}, H, W]")
        h, w = x.shape[-2:]
        if h == 0 or w == 0 or h % f or w % f:
            raise ImageError(
                f"VAE input is {h}x{w} px (HxW); height and width must be positive multiples of {f}"
            )
