"""What the `ldznet webui install-model` tests share: an empty WebUI folder (its ``webui.py`` only) and the
YAML an install wrote beside the checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml


@pytest.fixture
def webui(tmp_path: Path) -> Path:
    """A WebUI folder as install-model recognizes one: ``webui.py`` and nothing else."""
    (tmp_path / "webui.py").touch()
    return tmp_path


def installed_config(webui: Path, name: str) -> dict:
    """The ``model`` mapping of the YAML installed as ``name``."""
    return yaml.safe_load((webui / "models" / "Stable-diffusion" / f"{name}.yaml").read_text(encoding="utf-8"))["model"]

