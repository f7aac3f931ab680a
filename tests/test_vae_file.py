"""--vae: a VAE file of its own, in place of a checkpoint's VAE or where its file has none.

Every layout reads to the same tensors (ldm, a whole checkpoint, diffusers' ``vae/`` weights converted by
diffusers itself, a pickle); a checkpoint without a VAE plus its VAE file masks exactly as the whole
checkpoint; another VAE file masks exactly as a checkpoint with that VAE baked in; files that are no
4-channel SD VAE, and choices that would use the VAE on the wrong model, are refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fixtures_models import TINY_VAE8, perturb_, random_image
from ldznet_ext.checkpoint_io import read_metadata, read_state_dict, write_safetensors
from ldznet_ext.errors import CheckpointError, LdznetError
from ldznet_ext.loading import load_segmenter
from ldznet_ext.sd.checkpoint import load_stable_diffusion
from ldznet_ext.sd.diffusers_folder import load_diffusers_folder
from ldznet_ext.sd.unet import unet_config
from ldznet_ext.sd.vae import AutoencoderKL
from ldznet_ext.sd.vae_file import read_vae_file

pytestmark = pytest.mark.usefixtures("single_thread")

VAE = "first_stage_model."


def _vae_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(VAE):]: v for k, v in state.items() if k.startswith(VAE)}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def files(tiny_model_files, tmp_path_factory) -> dict[str, Path]:
    """The tiny SD file without its VAE, its VAE in each layout, another VAE, and the SD file with that one."""
    folder = tmp_path_factory.mktemp("vae-files")
    sd_file = tiny_model_files[0]
    state = read_state_dict(sd_file)
    own = _vae_part(state)
    torch.manual_seed(11)
    other = {k: v.contiguous() for k, v in perturb_(AutoencoderKL(TINY_VAE8), seed=12).state_dict().items()}
    rest = {k: v for k, v in state.items() if not k.startswith(VAE)}
    paths = {"sd": sd_file, "no-vae": folder / "no-vae.safetensors", "ldm": folder / "vae.safetensors",
             "pickle": folder / "vae.pt", "other": folder / "other-vae.safetensors",
             "sd-other": folder / "sd-other-vae.safetensors"}
    metadata = read_metadata(sd_file)  # the tiny text tower's head count, which shapes do not show
    write_safetensors(paths["no-vae"], rest, metadata)
    # A VAE as A1111 saves it, with a training loss's tensors that the reader drops, and as Stability
    # published vae-ft-mse-840000-ema-pruned, with the EMA's bookkeeping scalars (A1111 ignores them too).
    save_file({**own, "loss.logvar": torch.zeros(())}, str(paths["ldm"]))
    paths["ema"] = folder / "vae-ft-mse-840000-ema-pruned.safetensors"
    save_file({**own, "model_ema.decay": torch.tensor(0.9999),
               "model_ema.num_updates": torch.tensor(840000, dtype=torch.int32)}, str(paths["ema"]))
    torch.save({"state_dict": own}, paths["pickle"])
    save_file(other, str(paths["other"]))
    write_safetensors(paths["sd-other"], {**rest, **{VAE + k: v for k, v in other.items()}}, metadata)
    write_folder = pytest.importorskip("test_diffusers_folder").write_folder
    paths["folder"] = write_folder(folder / "tiny-sd1", state, unet_config("tiny"), TINY_VAE8, text_heads=2)
    paths["diffusers"] = paths["folder"] / "vae" / "diffusion_pytorch_model.safetensors"
    paths["diffusers-folder"] = paths["folder"] / "vae"
    return paths


@pytest.mark.parametrize("layout", ["ldm", "ema", "sd", "diffusers", "diffusers-folder", "pickle"])
def test_every_layout_reads_to_the_checkpoints_vae(files, layout) -> None:
    assert _equal(read_vae_file(files[layout]), _vae_part(read_state_dict(files["sd"])))


def _probability(model: Path, head: Path, vae: Path | None = None) -> torch.Tensor:
    segmenter = load_segmenter(model, head, vae=vae, device="cpu")
    segmenter.set_image(random_image(64, 64, seed=5))
    return segmenter.predict_terms(["cat"])["cat"]


def test_a_checkpoint_without_a_vae_masks_as_the_whole_one_with_its_vae_file(files, tiny_model_files) -> None:
    head = tiny_model_files[1]
    whole = _probability(files["sd"], head)
    assert torch.equal(_probability(files["no-vae"], head, files["ldm"]), whole)
    assert torch.equal(_probability(files["no-vae"], head, files["diffusers"]), whole)


def test_a_vae_file_replaces_the_checkpoints_own(files, tiny_model_files) -> None:
    head = tiny_model_files[1]
    baked = _probability(files["sd-other"], head)
    assert not torch.equal(baked, _probability(files["sd"], head))  # the other VAE changes the mask...
    assert torch.equal(_probability(files["sd"], head, files["other"]), baked)  # ...exactly as if baked in


def test_every_loader_puts_the_vae_file_in_place(files) -> None:
    other = read_vae_file(files["other"])
    mask_parts = load_stable_diffusion(files["sd"], parts="mask", vae=other)  # the file's VAE is never read
    encoder = {k: v for k, v in other.items() if k.startswith(("encoder.", "quant_conv."))}
    assert _equal({k: v for k, v in mask_parts.vae.state_dict().items()}, encoder)
    for model in (load_stable_diffusion(files["no-vae"], vae=other), load_diffusers_folder(files["folder"], vae=other)):
        assert _equal(model.vae.state_dict(), other)


def test_a_model_folder_is_read_without_its_vae_when_a_vae_file_replaces_it(files, tmp_path) -> None:
    """A folder published without VAE weights takes one as a single file does; a whole model folder given
    as the VAE gives its vae/ (it said "no weights in" the model folder)."""
    import shutil
    folder = shutil.copytree(files["folder"], tmp_path / "no-vae-weights")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    other = read_vae_file(files["other"])
    assert _equal(load_diffusers_folder(folder, vae=other).vae.state_dict(), other)
    assert _equal(read_vae_file(files["folder"]), read_vae_file(files["diffusers-folder"]))


def test_an_sdxl_model_takes_a_vae_file_for_zero_shot_masks(files, tmp_path) -> None:
    from test_sdxl_model import METADATA, tiny_sdxl_state
    state = {k: v for k, v in tiny_sdxl_state().items() if not k.startswith(VAE)}
    write_safetensors(tmp_path / "xl.safetensors", state, METADATA)
    other = read_vae_file(files["other"])
    assert _equal(load_stable_diffusion(tmp_path / "xl.safetensors", zero_shot=True, vae=other).vae.state_dict(), other)


def test_files_that_are_no_sd_vae_are_refused_by_name(files, tiny_model_files, tmp_path, monkeypatch) -> None:
    with pytest.raises(CheckpointError, match=r"^head.safetensors: not a VAE: it has no 'encoder.conv_in.weight' "
                                              r"\(ldm layout\), 'encoder.down_blocks.\*' \(diffusers\) or "
                                              r"'first_stage_model.\*' \(a whole checkpoint\)$"):
        read_vae_file(tiny_model_files[1])
    own = read_vae_file(files["ldm"])
    flux_like = {**own, "encoder.conv_out.weight": torch.zeros(32, *own["encoder.conv_out.weight"].shape[1:])}
    save_file(flux_like, str(tmp_path / "flux-ae.safetensors"))
    with pytest.raises(CheckpointError, match=r"^flux-ae.safetensors: a VAE with 16-channel latents \(SD 3 and Flux "
                                              r"VAEs have 16\); SD 1.x, SD 2.x and SDXL models need one with 4$"):
        read_vae_file(tmp_path / "flux-ae.safetensors")
    save_file({k: v for k, v in own.items() if not k.startswith("quant_conv.")}, str(tmp_path / "part.safetensors"))
    with pytest.raises(CheckpointError, match=r"^part.safetensors: not a VAE this program reads: VAE state dict has "
                                              r"no 'quant_conv.weight'"):
        read_vae_file(tmp_path / "part.safetensors")
    with pytest.raises(CheckpointError, match=r"^VAE file not found: .*missing.safetensors$"):
        read_vae_file(tmp_path / "missing.safetensors")
    (tmp_path / "model" / "vae").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"^model: no weights in vae/ \(found nothing\); expected one of "):
        read_vae_file(tmp_path / "model" / "vae")
    monkeypatch.chdir(tmp_path / "model" / "vae")  # the folder given as '.' is named by its parent all the same
    with pytest.raises(CheckpointError, match=r"^model: no weights in vae/ \(found nothing\); expected one of "):
        read_vae_file(".")
    with pytest.raises(LdznetError, match=r"^vae.safetensors: a VAE file replaces the VAE of --model, but with "
                                          r"--mask-model the masks come from the mask model"):
        load_segmenter(files["sd"], tiny_model_files[1], mask_model=files["sd"], vae=files["ldm"])


def test_the_command_line_masks_with_a_vae_file_and_records_it(ldznet, files, tiny_model_files, tmp_path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(random_image(64, 64, seed=3)).save(images / "a.png")
    common = ("--head", tiny_model_files[1], "--device", "cpu", "--no-presence")
    code, _, err = ldznet("mask", images / "a.png", "cat", "-o", tmp_path / "whole.png", "--model", files["sd"], *common)
    assert (code, err) == (0, "")
    code, _, err = ldznet("batch", images, "cat", "-o", tmp_path / "out", "--model", files["no-vae"], "--vae",
                          files["ldm"], *common)
    assert (code, err) == (0, "")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "a.png")), np.asarray(Image.open(tmp_path / "whole.png")))
    entry = json.loads((tmp_path / "out" / "ldznet-manifest.jsonl").read_text().splitlines()[0])
    assert entry["settings"]["vae"] == str(files["ldm"])


@pytest.mark.parametrize(("args", "message"), [
    (("--vae", "VAE"), "vae.safetensors: --vae replaces the VAE of --model, and the embedded micro model keeps its "
                       "own; pass --model SD.safetensors with --vae"),
    (("--vae", "FOLDER/.."), "tiny-sd1: --vae replaces the VAE of --model, and the embedded micro model keeps its "
                             "own; pass --model SD.safetensors with --vae"),  # '..' named by the folder it stands for
    (("--model", "SD", "--mask-model", "SD", "--head", "HEAD", "--vae", "VAE"),
     "vae.safetensors: a VAE file replaces the VAE of --model, but with --mask-model the masks come from the mask "
     "model and its own VAE; drop --vae, or drop --mask-model"),
])
def test_vae_choices_that_cannot_apply_are_one_line(ldznet, files, tiny_model_files, image_file, tmp_path, args,
                                                    message) -> None:
    named = {"VAE": files["ldm"], "SD": files["sd"], "HEAD": tiny_model_files[1],
             "FOLDER/..": files["diffusers-folder"] / ".."}
    code, out, err = ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", *(named.get(a, a) for a in args))
    assert (code, out, err) == (2, "", f"ldznet mask: error: {message}\n")
    assert not (tmp_path / "m.png").exists()


def test_eval_refuses_to_write_over_the_vae_file(ldznet, files, tiny_model_files, tmp_path) -> None:
    import shutil
    vae = shutil.copy(files["ldm"], tmp_path / "vae.json")
    before = Path(vae).read_bytes()
    code, _, err = ldznet("eval", "--model", files["sd"], "--vae", vae, "--head", tiny_model_files[1],
                          "--data", "world:test:1", "--json", vae)
    assert (code, err) == (2, f"ldznet eval: error: {vae}: the same file as the VAE; give each output its own name\n")
    assert Path(vae).read_bytes() == before


def test_a_head_trains_on_a_checkpoint_without_a_vae_given_its_vae_file(ldznet, files, tmp_path) -> None:
    run = tmp_path / "run"
    code, out, err = ldznet("train", "--arch", "znet", "--model", files["no-vae"], "--vae", files["ldm"], "--data",
                            "world:train:2", "-o", run, "--resolution", 64, "--batch-size", 2, "--steps", 1)
    assert (code, err) == (0, "") and "znet head, 1 step" in out
    assert read_metadata(run / "head.safetensors")["training"]["sd_model"] == "no-vae.safetensors (VAE vae.safetensors)"
    code, _, err = ldznet("train", "--arch", "znet", "--model", files["no-vae"], "--data", "world:train:2", "-o",
                          tmp_path / "run2", "--resolution", 64, "--batch-size", 2, "--steps", 1)
    assert code == 2 and "no-vae.safetensors: sd-v1: the file has no VAE" in err
