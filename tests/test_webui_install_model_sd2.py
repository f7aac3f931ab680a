"""`ldznet webui install-model` with an SD 2.x-architecture file: ldm's v2-inference(-v).yaml of the file's
own shapes (linear projections, heads of a fixed width, the OpenCLIP embedder as a registered open_clip
architecture built without pretrained weights), eps or v as our loader reads the file (``v_pred`` marker,
else A1111's probe), and the refusals that leave the WebUI folder untouched. The SD v1 YAML of the same
template is checked beside it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fake_webui.installs import installed_config, installed_digest, webui  # noqa: F401  (webui: a pytest fixture)
from fake_webui.sd2_file import METADATA as SD2_METADATA, tiny_a1111_sd2_state, write_tiny_a1111_sd2
from fake_webui.sdxl_file import OPENCLIP_ARCH
from ldznet_ext.backbones.family import UNET_PREFIX
from ldznet_ext.checkpoint_io import write_safetensors
from ldznet_ext.errors import CheckpointError
from ldznet_ext.sd.checkpoint import SD2_TEXT_PREFIX, load_stable_diffusion
from ldznet_ext.sd.openclip import OpenCLIPTextEncoder
from ldznet_ext.webui.install_model import install_model

LDM = "ldm.modules."

pytestmark = pytest.mark.usefixtures("single_thread")


def test_sd2_file_gets_an_ldm_v2_config_of_its_own_shapes(webui, tmp_path) -> None:
    path = tmp_path / "tiny-sd2.safetensors"
    write_tiny_a1111_sd2(path)
    target = install_model(path, webui, hf_home=tmp_path / "hf")
    folder = webui / "models" / "Stable-diffusion"
    assert target == folder / "tiny-sd2.safetensors" and target.read_bytes() == path.read_bytes()
    model = installed_config(webui, "tiny-sd2")
    assert model["target"] == "ldm.models.diffusion.ddpm.LatentDiffusion"
    assert (model["params"]["parameterization"], model["params"]["scale_factor"]) == ("eps", 0.18215)
    unet = model["params"]["unet_config"]["params"]
    assert {k: unet[k] for k in ("in_channels", "model_channels", "channel_mult", "num_res_blocks",
                                 "attention_resolutions", "transformer_depth", "num_head_channels", "context_dim",
                                 "use_linear_in_transformer", "use_spatial_transformer")} == {
        "in_channels": 4, "model_channels": 32, "channel_mult": [1, 1, 2, 2], "num_res_blocks": 2,
        "attention_resolutions": [1, 2, 4], "transformer_depth": 1, "num_head_channels": 16, "context_dim": 256,
        "use_linear_in_transformer": True, "use_spatial_transformer": True}
    cond = model["params"]["cond_stage_config"]
    assert cond["target"] == LDM + "encoders.modules.FrozenOpenCLIPEmbedder"
    assert cond["params"] == {"arch": OPENCLIP_ARCH, "version": None, "freeze": True, "layer": "penultimate"}
    vae = model["params"]["first_stage_config"]["params"]["ddconfig"]
    assert (vae["ch"], vae["ch_mult"], vae["num_res_blocks"]) == (32, [1, 1, 1, 1], 1)
    assert not (folder / "tiny-sd2.clip").exists()  # SD 2.x has no CLIP ViT-L


@pytest.mark.parametrize(("v_by_probe", "marker", "expected"), [(True, False, "v"), (False, True, "v"),
                                                               (False, False, "eps")])
def test_the_yaml_predicts_what_our_loader_reads(webui, tmp_path, v_by_probe, marker, expected) -> None:
    """A1111 uses the YAML's parameterization as given: it is the one `ldznet mask --model FILE` runs."""
    path = tmp_path / "pred.safetensors"
    write_tiny_a1111_sd2(path, v_by_probe=v_by_probe, extra={"v_pred": torch.zeros(())} if marker else None)
    install_model(path, webui, hf_home=tmp_path / "hf")
    assert installed_config(webui, "pred")["params"]["parameterization"] == expected
    assert load_stable_diffusion(path, zero_shot=True).prediction == expected


def test_sd1_yaml_keeps_the_clip_embedder_and_eps(tiny_model_files, webui, tmp_path) -> None:
    install_model(tiny_model_files[0], webui, name="micro", hf_home=tmp_path / "hf")
    model = installed_config(webui, "micro")
    unet = model["params"]["unet_config"]["params"]
    assert (model["params"]["parameterization"], unet["num_head_channels"], unet["use_linear_in_transformer"],
            unet["num_heads"], unet["transformer_depth"]) == ("eps", -1, False, 2, 1)
    clip_dir = str((webui / "models" / "Stable-diffusion" / "micro.clip").resolve())
    assert model["params"]["cond_stage_config"] == {"target": LDM + "encoders.modules.FrozenCLIPEmbedder",
                                                    "params": {"version": clip_dir}}


# sha256 of each family's YAML (WebUI path as WEBUI), recorded before the ldm and sgm templates shared their
# first-stage block: any byte A1111 would read differently fails here.
SD1_YAML_SHA256 = "81818adeecbd4f8bc18ec6ec60ee6d5d46044d70fb0280a2e9d57e8f5f7ed4ea"
SD2_YAML_SHA256 = {"eps": "108c078fe982c2fb2652c9ff22fe781cff89c85289649fe6c096096ebaa9f813",
                   "v": "9337871a21bf649919d9302f183b73e41462db16ea7f866645ef7e7b3658f2e2"}


def test_the_sd1_yaml_is_byte_for_byte_the_recorded_one(tiny_model_files, webui, tmp_path) -> None:
    install_model(tiny_model_files[0], webui, name="micro", hf_home=tmp_path / "hf")
    assert installed_digest(webui, "micro") == SD1_YAML_SHA256


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_the_sd2_yaml_is_byte_for_byte_the_recorded_one(webui, tmp_path, prediction) -> None:
    path = tmp_path / "tiny-sd2.safetensors"
    write_tiny_a1111_sd2(path, v_by_probe=prediction == "v")
    install_model(path, webui, hf_home=tmp_path / "hf")
    assert installed_digest(webui, "tiny-sd2") == SD2_YAML_SHA256[prediction]


def _refused(state: dict, webui: Path, tmp_path: Path, metadata: dict | None = None) -> str:
    path = tmp_path / "odd.safetensors"
    write_safetensors(path, state, metadata or {})
    with pytest.raises(CheckpointError) as error:
        install_model(path, webui, hf_home=tmp_path / "hf")
    assert not (webui / "models").exists()  # nothing half-installed
    return str(error.value)


def test_an_sd2_inpainting_file_is_refused(webui, tmp_path) -> None:
    state = tiny_a1111_sd2_state()
    key = UNET_PREFIX + "input_blocks.0.0.weight"
    state[key] = torch.cat([state[key]] * 3, dim=1)[:, :9]
    assert _refused(state, webui, tmp_path).startswith(
        "odd.safetensors: sd2-conditioned: an SD 2.x inpainting model (9 input channels); use the base model it was "
        "made from. Supported: ")


def test_an_sd2_tower_open_clip_does_not_register_is_refused(webui, tmp_path) -> None:
    """Without two of ViT-S-32-alt's layers: none A1111 builds."""
    last_two = tuple(f"{SD2_TEXT_PREFIX}transformer.resblocks.{i}." for i in (8, 9))
    state = {k: v for k, v in tiny_a1111_sd2_state().items() if not k.startswith(last_two)}
    assert _refused(state, webui, tmp_path).startswith(
        "odd.safetensors: its OpenCLIP text tower (width, layers, MLP width, embedding width) = (256, 8, 1024, 256)")


# What SD 2.x's context does not read of ViT-S-32-alt's 10 layers, and diffusers' conversion leaves out.
UNREAD = tuple(SD2_TEXT_PREFIX + k for k in ("transformer.resblocks.9.", "text_projection", "logit_scale"))


def test_an_sd2_file_without_the_towers_unread_layer_gets_the_whole_files_yaml(webui, tmp_path) -> None:
    """As diffusers' conversion writes SD 2.x files (A1111 loads them into the whole tower): it was refused.
    Our loader reads the registered tower's depth from the shape and gives the whole file's context."""
    whole, converted = tmp_path / "whole.safetensors", tmp_path / "converted.safetensors"
    write_tiny_a1111_sd2(whole)
    state = tiny_a1111_sd2_state()
    write_safetensors(converted, {k: v.half() for k, v in state.items() if not k.startswith(UNREAD)},
                      SD2_METADATA)
    for path in (whole, converted):
        install_model(path, webui, hf_home=tmp_path / "hf")
    assert installed_config(webui, "converted") == installed_config(webui, "whole")
    prompts = ["a red cat", ""]
    contexts = [load_stable_diffusion(path, zero_shot=True).text_encoder.encode(prompts) for path in (whole, converted)]
    assert torch.equal(*contexts) and contexts[0].std() > 0


def test_a_unet_context_other_than_the_towers_width_is_refused(webui, tmp_path) -> None:
    state = {k: v for k, v in tiny_a1111_sd2_state().items() if not k.startswith(SD2_TEXT_PREFIX)}
    vit_b = OpenCLIPTextEncoder(width=512, layers=12, heads=8, mlp_width=2048, embed_dim=512)  # ViT-B-32's
    state.update({SD2_TEXT_PREFIX + k: v for k, v in vit_b.state_dict().items()})
    assert _refused(state, webui, tmp_path) == (
        "odd.safetensors: its UNet reads a 256-wide context, but its OpenCLIP text tower (ViT-B-32) gives 512")


def test_the_command_names_what_it_wrote(ldznet, webui, tmp_path) -> None:
    path = tmp_path / "tiny-sd2.safetensors"
    write_tiny_a1111_sd2(path)
    code, out, err = ldznet("webui", "install-model", path, webui, "--hf-home", tmp_path / "hf")
    target = webui / "models" / "Stable-diffusion" / "tiny-sd2.safetensors"
    assert (code, out, err) == (0, f"installed {target} (+ tiny-sd2.yaml)\n", "")
