"""Opt-in, like test_webui_integration.py (LDZNET_FORGE_DIR): the extension in Forge while an SDXL model
is loaded. Forge recognises a checkpoint only by the real models' shapes, so the test writes a random
full-size SDXL base (6.9 GB in fp16) into its ``models/Stable-diffusion/`` once, beside the embedded
micro SD v1, and the micro head into ``models/ldznet/``. Forge runs it on the CPU with its UNet in fp32
(10.3 GB of weights alone), so the machine needs well over that in free RAM. Zero-shot masks come from
the host's own SDXL model; head mode runs the micro LD-ZNet head on the micro SD v1 (our loader reads
it, not Forge's), in /ldznet/v1/mask and in an img2img ``mask:`` line alike.

A module of its own so that its WebUI starts after the other modules' have stopped.
"""
from __future__ import annotations

import filecmp
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from test_webui_integration import (FORGE, IMAGE, _call, _serve, check_masks_ignore_the_last_generations_lora,
                                    write_test_lora)
from test_webui_integration_sdxl import (SIZE, check_head_mode_on_the_micro_sd_v1,
                                        check_zero_shot_on_the_loaded_model)

SDXL_FILE = "ldznet-test-sdxl-random.safetensors"
# Settings the fixture changes, with the values it leaves behind (Forge keeps them in config.json).
RESTORED = {"ldznet_mask_model": "automatic", "ldznet_resolution": 0, "live_previews_enable": True}


def _install(source: Path, target: Path) -> None:
    if not target.exists() or not filecmp.cmp(source, target, shallow=False):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


@contextmanager
def forge_with(tmp_path_factory, checkpoint_name: str, write: Callable[[Path], None],
               extra_files: Callable[[Path], None] = lambda folder: None) -> Iterator[str]:
    """Forge on the CPU with ``models/Stable-diffusion/checkpoint_name`` loaded (``write`` makes it once),
    the micro SD v1 among its checkpoints (``extra_files``: more, into that folder) and the micro head
    selected; yields the base URL. Live previews are off: with an SDXL model loaded, the default
    "Approx NN" preview downloads vaeapprox-sdxl.pt before a generation, which fails offline."""
    if not FORGE:
        pytest.skip("set LDZNET_FORGE_DIR to a Forge folder to run")
    from ldznet_ext.defaults import default_model_paths

    forge_dir, work = Path(FORGE), tmp_path_factory.mktemp("forge")
    checkpoints = forge_dir / "models" / "Stable-diffusion"
    if not (checkpoints / checkpoint_name).exists():
        write(checkpoints / checkpoint_name)
    extra_files(checkpoints)
    sd, head = default_model_paths()
    _install(sd, checkpoints / sd.name)
    _install(head, forge_dir / "models" / "ldznet" / head.name)
    flags = ["--skip-install", "--always-cpu", "--ckpt", str(checkpoints / checkpoint_name)]
    options = {"ldznet_head": head.name, "return_mask": True, "ldznet_mask_model": "automatic",
               "ldznet_resolution": 0, "live_previews_enable": False}
    with _serve(forge_dir, work, flags, options, "LDZNET_FORGE_PYTHON") as base:
        try:
            yield base
        finally:
            _call(base, "/sdapi/v1/options", RESTORED)


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    """Forge with the random full-size SDXL file loaded (forge_with)."""
    from fake_webui.full_size import write_full_size_sdxl

    with forge_with(tmp_path_factory, SDXL_FILE, write_full_size_sdxl) as base:
        yield base


def test_zero_shot_masks_come_from_the_host_sdxl_model(forge):
    """Zero-shot on Forge's SDXL model (check_zero_shot_on_the_loaded_model)."""
    check_zero_shot_at_256_px(forge, Path(SDXL_FILE).stem)


def test_zero_shot_masks_ignore_the_last_generations_lora(forge):
    """Zero-shot on Forge's SDXL model: a LoRA the last generation left in Forge's patched parts does not
    reach the masks (features at 128 px, generations at 64 px, to keep it quick)."""
    forge_dir = Path(FORGE)
    write_test_lora(forge_dir / "models" / "Stable-diffusion" / SDXL_FILE, forge_dir, 0.01)
    assert _call(forge, "/sdapi/v1/options", {"ldznet_resolution": 128})[0] == 200
    try:
        check_masks_ignore_the_last_generations_lora(forge, IMAGE, 64, 64, mode="zero-shot")
    finally:
        assert _call(forge, "/sdapi/v1/options", {"ldznet_resolution": 0})[0] == 200


def check_zero_shot_at_256_px(forge: str, stem: str) -> np.ndarray:
    """``check_zero_shot_on_the_loaded_model`` on Forge's loaded model at 256 px, to keep it quick."""
    assert _call(forge, "/sdapi/v1/options", {"ldznet_resolution": SIZE})[0] == 200
    try:
        return check_zero_shot_on_the_loaded_model(forge, stem)
    finally:
        assert _call(forge, "/sdapi/v1/options", {"ldznet_resolution": 0})[0] == 200


def test_head_mode_mask_line_inpaints_with_the_routes_mask(forge):
    """LD-ZNet head mode with Forge's SDXL model loaded (check_head_mode_on_the_micro_sd_v1)."""
    check_head_mode_on_the_micro_sd_v1(forge, Path(SDXL_FILE).stem)
