"""A fake WebUI world for tests: ``modules`` importable, a loaded fake SD 1.x model, a heads folder."""
from __future__ import annotations

import sys
from pathlib import Path

FOLDER = Path(__file__).resolve().parent
if str(FOLDER) not in sys.path:
    sys.path.insert(0, str(FOLDER))

import modules.paths  # noqa: E402
import modules.shared  # noqa: E402
import modules.sd_models  # noqa: E402

from ldznet_ext.heads import save_head  # noqa: E402
from ldznet_ext.webui import host  # noqa: E402

from .models import FakeLatentDiffusion, tiny_head, tiny_sd  # noqa: E402

HEAD_NAME = "tiny-ldznet.safetensors"
_MODEL = None


def fake_model() -> FakeLatentDiffusion:
    """One shared fake LatentDiffusion (read-only in tests)."""
    global _MODEL
    if _MODEL is None:
        _MODEL = FakeLatentDiffusion(tiny_sd()).eval()
    return _MODEL


def install(tmp_path: Path, head: bool = True, model=None) -> None:
    """Point the fake WebUI at ``tmp_path`` (models/ldznet with the tiny head), load the model,
    reset options, state and the engine."""
    modules.paths.models_path = str(tmp_path / "models")
    modules.paths.data_path = str(tmp_path)
    heads = tmp_path / "models" / "ldznet"
    heads.mkdir(parents=True, exist_ok=True)
    if head:
        module, config = tiny_head()
        save_head(module, config, heads / HEAD_NAME)
    modules.sd_models.model_data.sd_model = fake_model() if model is None else model
    modules.shared.opts.data = {"ldznet_head": HEAD_NAME if head else "None", "ldznet_resolution": 64}
    modules.shared.state.__init__()
    host._ENGINE = None
