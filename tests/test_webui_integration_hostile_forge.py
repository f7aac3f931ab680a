"""Opt-in (LDZNET_FORGE_DIR): the seeded hostile mask requests of ``_hostile.py`` against the real Forge.
A module of its own so that its WebUI never runs beside another (pytest stops a module's WebUI before the
next module starts). About a minute and a half on a CPU.
"""
from __future__ import annotations

from test_webui_integration import forge  # noqa: F401 (the fixture)
from test_webui_integration_hostile import hostile_mask_requests


def test_forge_hostile_mask_requests(forge):  # noqa: F811
    hostile_mask_requests(forge)
