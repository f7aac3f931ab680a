"""What the `ldznet webui install-model` tests share: an empty WebUI folder (its ``webui.py`` only) and the
YAML an install wrote beside the checkpoint, parsed or as its exact bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml


@pytest.fixture
def webui(tmp_path: Path) -> Path:
    """A WebUI folder as install-model recognizes one: ``webui.py`` and nothing else."""
    (tmp_path / "webui.py").touch()
    return tmp_path


def _installed_yaml(webui: Path, name: str) -> str:
    return (webui / "models" / "Stable-diffusion" / f"{name}.yaml").read_text(encoding="utf-8")


def installed_config(webui: Path, name: str) -> dict:
    """The ``model`` mapping of the YAML installed as ``name``."""
    return yaml.safe_load(_installed_yaml(webui, name))["model"]


def installed_digest(webui: Path, name: str) -> str:
    """sha256 of the YAML installed as ``name`` after install-model's first line (``MARK``, checked here),
    with the WebUI folder's absolute path (in CLIP folder paths) written as ``WEBUI`` so the digest is the
    same in every temporary folder."""
    from ldznet_ext.webui.install_model import MARK

    mark, body = _installed_yaml(webui, name).split("\n", 1)
    assert mark == MARK
    text = body.replace(str(webui.resolve()), "WEBUI")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
