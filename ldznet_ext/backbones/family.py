"""Model families: which kind of diffusion model a WebUI host has loaded, in one place.

A family has a name (as the checkpoint loader's ``CheckpointInfo.family`` spells it) and a label
for messages. LD-ZNet reads SD 1.x UNet features, so "sd-v1" is the family every adapter needs;
the others are named so that the refusal says what was found.
"""

from __future__ import annotations

LABELS: dict[str, str] = {
    "sd-v1": "SD 1.x", "sd-v1-inpainting": "an inpainting model (9 input channels)", "sd2": "SD 2.x",
    "sdxl": "SDXL", "sd3": "SD 3", "ssd": "SSD-1B", "flux": "Flux", "unknown": "not SD 1.x",
}
# The flags A1111 and Forge set on their loaded model, most specific first.
_HOST_FLAGS = (("is_sdxl", "sdxl"), ("is_sd2", "sd2"), ("is_sd3", "sd3"), ("is_ssd", "ssd"), ("is_flux", "flux"))


def host_family(sd_model, in_channels: int | None = None, sd1_unless_told: bool = True) -> str:
    """The family of a WebUI host's loaded model from its ``is_*`` flags and, where known, its
    UNet's input channels: a flagged family, "unknown" when the model says it is not SD 1.x
    (``is_sd1`` False; a host that sets no ``is_sd1`` is taken at ``sd1_unless_told``) or its UNet
    takes neither 4 nor 9 channels, "sd-v1-inpainting" (``is_inpaint`` or 9 channels), else "sd-v1"."""
    flagged = next((family for attr, family in _HOST_FLAGS if getattr(sd_model, attr, False)), None)
    if flagged is not None:
        return flagged
    if not getattr(sd_model, "is_sd1", sd1_unless_told):
        return "unknown"
    if getattr(sd_model, "is_inpaint", False) or in_channels == 9:
        return "sd-v1-inpainting"
    return "sd-v1" if in_channels in (None, 4) else "unknown"
