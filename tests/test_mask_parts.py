"""load_stable_diffusion(parts="mask"): only what a head reads is read from the file and built, it
computes the same features as the whole model, and the skipped parts refuse to run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from ldznet_ext import checkpoint_io
from ldznet_ext.backbones.base import LDZNET_BLOCKS
from ldznet_ext.errors import CheckpointError, LdznetError
from ldznet_ext.sd import checkpoint
from ldznet_ext.sd.checkpoint import (
    UNET_PREFIX,
    VAE_PREFIX,
    build_stable_diffusion,
    load_stable_diffusion,
    save_stable_diffusion,
    stable_diffusion_state_dict,
)
from ldznet_ext.sd.header import PICKLE_FAMILY, classify_file
from ldznet_ext.tap import FeatureTap

from fixtures_models import perturb_

pytestmark = pytest.mark.usefixtures("single_thread")
SKIPPED = tuple(f"{UNET_PREFIX}output_blocks.{i}." for i in range(6, 12)) + (
    f"{UNET_PREFIX}out.", f"{VAE_PREFIX}decoder.", f"{VAE_PREFIX}post_quant_conv.")


@pytest.fixture(scope="module")
def sd_file(tmp_path_factory):
    model = build_stable_diffusion("tiny", seed=3)
    perturb_(model.unet, seed=4)
    path = tmp_path_factory.mktemp("parts") / "sd.safetensors"
    save_stable_diffusion(model, path)
    return path


def _features(model, seed: int = 0) -> tuple[torch.Tensor, dict[int, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, 32, 48, generator=generator) * 2 - 1
    z = model.encode_image(image)
    context = model.encode_text(["a goblin"])
    with FeatureTap(model.layout, LDZNET_BLOCKS, early_exit=True) as tap:
        features = tap.run(lambda: model.predict_noise(z, torch.tensor([400]), context))
    return z, features, context.context


def _assert_same_features(whole, mask) -> None:
    (z, features, context), (z2, features2, context2) = _features(whole), _features(mask)
    assert torch.equal(z, z2) and torch.equal(context, context2)
    assert features.keys() == features2.keys() == set(LDZNET_BLOCKS)
    assert all(torch.equal(features[b], features2[b]) for b in LDZNET_BLOCKS)


def test_mask_parts_read_only_the_needed_tensors(sd_file, monkeypatch):
    read = []
    real = checkpoint_io.read_tensors
    monkeypatch.setattr(checkpoint, "read_tensors", lambda path, names: read.extend(names) or real(path, names))
    mask = load_stable_diffusion(sd_file, parts="mask")
    all_names = checkpoint_io.read_tensor_shapes(sd_file)
    assert read and not [k for k in read if k.startswith(SKIPPED)]
    assert sorted(k for k in all_names if not k.startswith(SKIPPED)) == sorted(read)
    assert not any(p.is_meta for p in mask.parameters()) and not any(b.is_meta for b in mask.buffers())
    _assert_same_features(load_stable_diffusion(sd_file), mask)


def test_mask_parts_from_a_ckpt_load_all_then_drop(sd_file, tmp_path):
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": stable_diffusion_state_dict(load_stable_diffusion(sd_file))}, path)
    mask = load_stable_diffusion(path, parts="mask")
    assert not [k for k in mask.state_dict() if ("unet." + k[5:]).startswith(SKIPPED)]
    whole = load_stable_diffusion(path)  # without our metadata: the text encoder's head count is guessed
    assert len(mask.unet.state_dict()) < len(whole.unet.state_dict())
    _assert_same_features(whole, mask)


def test_skipped_parts_refuse_to_run(sd_file):
    mask = load_stable_diffusion(sd_file, parts="mask")
    z, context = torch.zeros(1, 4, 16, 16), mask.encode_text(["x"])
    with pytest.raises(LdznetError, match="UNet output block 6 was not loaded: .*parts='mask'"):
        mask.predict_noise(z, torch.tensor([400]), context)
    with pytest.raises(LdznetError, match="VAE decoder's post_quant_conv was not loaded"):
        mask.decode_latent(z)


def test_unknown_parts_are_refused(sd_file):
    with pytest.raises(LdznetError, match="parts must be one of all, mask, got 'head'"):
        load_stable_diffusion(sd_file, parts="head")


def test_a_header_whose_shapes_do_not_fit_their_bytes_is_refused_before_anything_is_built(sd_file, tmp_path):
    """A crafted entry of shape [2^40, 2^40] over 4 bytes overflowed torch's size computation (a traceback)
    where the header's shapes build meta tensors for a partial load."""
    raw = sd_file.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    header["model_ema.junk"] = {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}
    text = json.dumps(header).encode()
    crafted = tmp_path / "crafted.safetensors"
    crafted.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size:])
    for read in (lambda path: load_stable_diffusion(path, parts="mask"), classify_file):
        with pytest.raises(CheckpointError, match=r"^crafted.safetensors: tensor 'model_ema.junk' of shape "
                                                  r"\[1099511627776, 1099511627776\] \(F32\) does not fit its 4 bytes; "
                                                  r"the safetensors header is corrupt$"):
            read(crafted)


def test_classify_file_reads_the_header_only(sd_file, tmp_path):
    header_only = tmp_path / "cut.safetensors"
    raw = sd_file.read_bytes()
    header_only.write_bytes(raw[:8 + int.from_bytes(raw[:8], "little")])  # no tensor data at all
    for read in (load_stable_diffusion, classify_file):  # a partial download is never offered as usable
        with pytest.raises(CheckpointError, match="^cut.safetensors: tensor .* it is truncated"):
            read(header_only)
    assert (classify_file(sd_file).family, classify_file(sd_file).problem) == ("sd-v1", None)
    inpainting = tmp_path / "inpainting.safetensors"
    save_file({f"{UNET_PREFIX}input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)}, str(inpainting))
    assert classify_file(inpainting).family == "sd-v1-inpainting"
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"never unpickled")
    assert classify_file(pickled).family == PICKLE_FAMILY == "unknown (pickle)"
