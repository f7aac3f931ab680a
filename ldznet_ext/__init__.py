"""ldznet: text-prompted masks for Stable Diffusion with LD-ZNet (ICCV 2023)."""

__version__ = "0.1.0"
