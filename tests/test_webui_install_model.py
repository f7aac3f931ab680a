"""`ldznet webui install-model` with an SDXL-architecture file: the sgm YAML A1111 v1.10.1 builds the
model from (shapes from the file, the OpenCLIP embedder as a registered open_clip architecture), the
per-model CLIP ViT-L folder, and the refusals that leave the WebUI folder untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fake_webui.installs import installed_config, installed_digest, webui  # noqa: F401  (webui: a pytest fixture)
from fake_webui.sdxl_file import OPENCLIP_ARCH, tiny_a1111_sdxl_state, write_tiny_a1111_sdxl
from ldznet_ext.checkpoint_io import write_safetensors
from ldznet_ext.cli import main
from ldznet_ext.errors import CheckpointError, LdznetError
from ldznet_ext.sd.checkpoint import BIGG_PREFIX, CLIP_L_PREFIX
from ldznet_ext.webui.install_model import install_model

SGM = "sgm.modules."


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl.safetensors"
    write_tiny_a1111_sdxl(path)
    return path


def test_sdxl_file_gets_an_sgm_config_of_its_own_shapes(sdxl_file, webui, tmp_path) -> None:
    target = install_model(sdxl_file, webui, hf_home=tmp_path / "hf")
    folder = webui / "models" / "Stable-diffusion"
    assert target == folder / "tiny-sdxl.safetensors" and target.read_bytes() == sdxl_file.read_bytes()
    model = installed_config(webui, "tiny-sdxl")
    assert model["target"] == "sgm.models.diffusion.DiffusionEngine" and model["params"]["scale_factor"] == 0.13025
    unet = model["params"]["network_config"]["params"]
    assert {k: unet[k] for k in ("adm_in_channels", "num_classes", "model_channels", "channel_mult", "num_res_blocks",
                                 "attention_resolutions", "transformer_depth", "num_head_channels", "context_dim",
                                 "use_linear_in_transformer")} == {
        "adm_in_channels": 304, "num_classes": "sequential", "model_channels": 32, "channel_mult": [1, 2, 2],
        "num_res_blocks": 2, "attention_resolutions": [2, 4], "transformer_depth": [0, 1, 2],
        "num_head_channels": 16, "context_dim": 320, "use_linear_in_transformer": True}
    clip_l, openclip, *sizes = model["params"]["conditioner_config"]["params"]["emb_models"]
    assert clip_l["target"] == SGM + "encoders.modules.FrozenCLIPEmbedder"
    clip_dir = str((folder / "tiny-sdxl.clip").resolve())
    assert clip_l["params"] == {"version": clip_dir, "layer": "hidden", "layer_idx": 1}
    assert openclip["target"] == SGM + "encoders.modules.FrozenOpenCLIPEmbedder2"
    assert openclip["params"] == {"arch": OPENCLIP_ARCH, "version": None, "freeze": True, "layer": "penultimate",
                                  "always_return_pooled": True, "legacy": False}
    assert [(s["input_key"], s["params"]["outdim"]) for s in sizes] == [
        ("original_size_as_tuple", 8), ("crop_coords_top_left", 8), ("target_size_as_tuple", 8)]
    vae = model["params"]["first_stage_config"]["params"]["ddconfig"]
    assert (vae["ch"], vae["ch_mult"], vae["num_res_blocks"], vae["attn_type"]) == (32, [1, 1, 1, 1], 1, "vanilla")
    scaling = model["params"]["denoiser_config"]["params"]["scaling_config"]["target"]
    assert scaling == SGM + "diffusionmodules.denoiser_scaling.EpsScaling"
    config = json.loads((folder / "tiny-sdxl.clip" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (64, 2, 2)
    assert (folder / "tiny-sdxl.clip" / "vocab.json").is_file()


def test_the_v_pred_marker_makes_a_v_denoiser(webui, tmp_path) -> None:
    path = tmp_path / "vpred.safetensors"
    write_tiny_a1111_sdxl(path, extra={"v_pred": torch.zeros(())})
    install_model(path, webui, hf_home=tmp_path / "hf")
    denoiser = installed_config(webui, "vpred")["params"]["denoiser_config"]["params"]
    assert denoiser["scaling_config"]["target"] == SGM + "diffusionmodules.denoiser_scaling.VScaling"
    assert denoiser["weighting_config"]["target"] == SGM + "diffusionmodules.denoiser_weighting.VWeighting"


# sha256 of the SDXL YAML (WebUI path as WEBUI), recorded before the ldm and sgm templates shared their
# first-stage block: any byte A1111 would read differently fails here.
SDXL_YAML_SHA256 = {"eps": "6f0824e1a5ddd2e0224ee08621de6bf093fc7b3adf7ac8a735c041bf3d253bdd",
                    "v": "6d109579b5893b04c86aec674bf2a0d1f1bd660fdec6cdaba39ca43f2cb877a0"}


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_the_sdxl_yaml_is_byte_for_byte_the_recorded_one(webui, tmp_path, prediction) -> None:
    path = tmp_path / "tiny-sdxl.safetensors"
    write_tiny_a1111_sdxl(path, extra={"v_pred": torch.zeros(())} if prediction == "v" else None)
    install_model(path, webui, hf_home=tmp_path / "hf")
    assert installed_digest(webui, "tiny-sdxl") == SDXL_YAML_SHA256[prediction]


def _refused(state: dict, webui: Path, tmp_path: Path) -> str:
    path = tmp_path / "odd.safetensors"
    write_safetensors(path, state, {})
    with pytest.raises(CheckpointError) as error:
        install_model(path, webui, hf_home=tmp_path / "hf")
    assert not (webui / "models").exists()  # nothing half-installed
    return str(error.value)


def test_an_openclip_tower_open_clip_does_not_register_is_refused(webui, tmp_path) -> None:
    state = {k: v for k, v in tiny_a1111_sdxl_state().items() if ".resblocks.9." not in k}  # 9 layers
    message = _refused(state, webui, tmp_path)
    assert message.startswith("odd.safetensors: its OpenCLIP text tower (width, layers, MLP width, embedding width) = "
                              "(256, 9, 1024, 256), vocabulary and positions (49408, 77), is no open_clip architecture")
    assert "ViT-S-32-alt (256, 10, 1024, 256)" in message and "ViT-bigG-14 (1280, 32, 5120, 1280)" in message


def test_an_sdxl_file_without_clip_vit_l_is_refused(webui, tmp_path) -> None:
    state = {k: v for k, v in tiny_a1111_sdxl_state().items() if not k.startswith(CLIP_L_PREFIX)}
    assert BIGG_PREFIX + "ln_final.weight" in state
    assert _refused(state, webui, tmp_path).startswith(
        f"odd.safetensors: no CLIP ViT-L text encoder ({CLIP_L_PREFIX}*), which an SDXL base model has")


def test_a_clip_tower_without_its_mlp_or_unlike_its_metadata_is_refused_in_one_line(webui, tmp_path) -> None:
    """The tower's sizes are read as the loader reads them (sd.checkpoint.text_fields): a KeyError's key was
    the message, and metadata that contradicted the weights went into the installed config."""
    fc1 = CLIP_L_PREFIX + "text_model.encoder.layers.0.mlp.fc1.weight"
    state = {k: v for k, v in tiny_a1111_sdxl_state().items() if k != fc1}
    assert _refused(state, webui, tmp_path) == (f"odd.safetensors: the text encoder has no "
                                                f"'{fc1.removeprefix(CLIP_L_PREFIX)}' tensor")
    path = tmp_path / "claims.safetensors"
    write_safetensors(path, tiny_a1111_sdxl_state(), {"text": {"hidden_size": 4096}})
    with pytest.raises(CheckpointError, match="^claims.safetensors: field 'ldznet.text', key 'hidden_size' is 4096; "
                                              "the weights have 64$"):
        install_model(path, webui, hf_home=tmp_path / "hf")
    assert not (webui / "models").exists()


def test_sd1_files_a_webui_would_misread_are_refused(tiny_model_files, webui, tmp_path) -> None:
    """An SD 1.x v-prediction file was installed with an eps config (A1111 would sample it as eps); a
    file without its VAE was told to use --vae, which install-model does not have."""
    from ldznet_ext.checkpoint_io import read_metadata, read_state_dict

    state, metadata = read_state_dict(tiny_model_files[0]), read_metadata(tiny_model_files[0])
    v_file, no_vae = tmp_path / "v.safetensors", tmp_path / "no-vae.safetensors"
    write_safetensors(v_file, {**state, "v_pred": torch.zeros(())}, metadata)
    write_safetensors(no_vae, {k: v for k, v in state.items() if not k.startswith("first_stage_model.")}, metadata)
    with pytest.raises(CheckpointError, match="^v.safetensors: sd-v1-v-prediction: an SD 1.x v-prediction model; "):
        install_model(v_file, webui, hf_home=tmp_path / "hf")
    with pytest.raises(CheckpointError, match=r"^no-vae.safetensors: the file has no VAE \('first_stage_model.\*'\); "
                                              "the WebUI builds a model from one file, so install a checkpoint with "
                                              "its VAE$"):
        install_model(no_vae, webui, hf_home=tmp_path / "hf")
    assert not (webui / "models").exists()


def test_a_config_or_clip_folder_install_model_did_not_write_is_never_replaced(sdxl_file, webui, tmp_path) -> None:
    """A user's own NAME.yaml or NAME.clip/ was overwritten; install-model's own files are replaced by a
    reinstall of the name."""
    from ldznet_ext.webui.install_model import CLIP_MARK, MARK

    models = webui / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    (models / "tiny-sdxl.yaml").write_text("my own config\n")
    with pytest.raises(CheckpointError, match=r"tiny-sdxl.yaml exists and was not written by install-model; pass "
                                              r"--name or remove it$"):
        install_model(sdxl_file, webui, hf_home=tmp_path / "hf")
    assert (models / "tiny-sdxl.yaml").read_text() == "my own config\n" and sorted(models.iterdir()) == [
        models / "tiny-sdxl.yaml"]
    (models / "tiny-sdxl.yaml").unlink()
    (models / "tiny-sdxl.clip").mkdir()
    (models / "tiny-sdxl.clip" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"tiny-sdxl.clip exists and was not written by install-model"):
        install_model(sdxl_file, webui, hf_home=tmp_path / "hf")
    assert (models / "tiny-sdxl.clip" / "config.json").read_text() == "{}"
    (models / "tiny-sdxl.clip" / "config.json").unlink()
    (models / "tiny-sdxl.clip").rmdir()
    for _ in range(2):  # the second install replaces what the first wrote
        install_model(sdxl_file, webui, hf_home=tmp_path / "hf")
    assert (models / "tiny-sdxl.yaml").read_text().startswith(MARK + "\n")
    assert (models / "tiny-sdxl.clip" / CLIP_MARK).read_text() == MARK + "\n"


def test_a_truncated_file_is_refused_before_anything_is_installed(sdxl_file, webui, tmp_path) -> None:
    short = tmp_path / "short.safetensors"
    short.write_bytes(sdxl_file.read_bytes()[:-1000])  # header intact, the last tensor cut
    with pytest.raises(CheckpointError, match=r"^short.safetensors: tensor .* ends at byte \d+ of the data, but the file "
                                              r"holds \d+: it is truncated"):
        install_model(short, webui, hf_home=tmp_path / "hf")
    assert not (webui / "models").exists()


@pytest.mark.parametrize("name", ["../escaped", "a/b", "{tmp}/absolute", ".", "..", ".hidden"])
def test_a_name_that_is_no_plain_file_name_is_refused(sdxl_file, webui, tmp_path, name) -> None:
    name = name.format(tmp=tmp_path)
    with pytest.raises(CheckpointError, match="^--name .*: expected a file name without a folder or a leading dot"):
        install_model(sdxl_file, webui, name=name, hf_home=tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["webui.py"]


def test_another_model_of_the_same_name_is_never_replaced(sdxl_file, webui, tmp_path) -> None:
    target = install_model(sdxl_file, webui, hf_home=tmp_path / "hf")
    assert install_model(sdxl_file, webui, hf_home=tmp_path / "hf") == target  # the same file again: fine
    other = tmp_path / "other" / "tiny-sdxl.safetensors"
    other.parent.mkdir()
    write_tiny_a1111_sdxl(other, seed=1)
    before = {p: p.read_bytes() for p in target.parent.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=f"^{target} is another model already; pass --name or remove it"):
        install_model(other, webui, hf_home=tmp_path / "hf")
    assert {p: p.read_bytes() for p in target.parent.rglob("*") if p.is_file()} == before


def test_a_name_with_the_checkpoints_suffix_is_taken_without_it(sdxl_file, webui, tmp_path) -> None:
    folder = webui / "models" / "Stable-diffusion"
    for name, installed in [("mine.safetensors", "mine"), ("Big.SafeTensors", "Big"), ("v1.5", "v1.5")]:
        target = install_model(sdxl_file, webui, name=name, hf_home=tmp_path / "hf")
        assert target == folder / f"{installed}.safetensors"
    assert sorted(p.name for p in folder.iterdir()) == [
        "Big.clip", "Big.safetensors", "Big.yaml", "mine.clip", "mine.safetensors", "mine.yaml",
        "v1.5.clip", "v1.5.safetensors", "v1.5.yaml"]


@pytest.mark.parametrize("via", ["argument", "environment"])
def test_an_unusable_hf_cache_is_refused_before_anything_is_installed(sdxl_file, webui, tmp_path, monkeypatch,
                                                                     capsys, via) -> None:
    not_a_folder = tmp_path / "hf-file"
    not_a_folder.write_text("x")
    if via == "argument":
        with pytest.raises(LdznetError, match=f"^Hugging Face cache \\(--hf-home or HF_HOME\\): cannot write to "
                                              f"{not_a_folder}/hub: "):
            install_model(sdxl_file, webui, hf_home=not_a_folder)
    else:
        monkeypatch.setenv("HF_HOME", str(not_a_folder))
        assert main(["webui", "install-model", str(sdxl_file), str(webui)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("ldznet webui install-model: error: Hugging Face cache (--hf-home or HF_HOME): ")
        assert err.count("\n") == 1
    assert not (webui / "models").exists() and not_a_folder.read_text() == "x"


def _resaved(source: Path, target: Path, metadata_order: list[str]) -> None:
    """``source`` written again as another process's safetensors would: its ``__metadata__`` keys in
    ``metadata_order`` (the header JSON changes, the tensors' bytes do not)."""
    data = source.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    header["__metadata__"] = {k: header["__metadata__"][k] for k in metadata_order}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    target.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size:])


def test_the_same_model_saved_again_is_not_another_model(sdxl_file, webui, tmp_path) -> None:
    target = install_model(sdxl_file, webui, hf_home=tmp_path / "hf")
    data = sdxl_file.read_bytes()
    keys = list(json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"])
    assert len(keys) > 1
    resaved = tmp_path / "again" / sdxl_file.name
    resaved.parent.mkdir()
    _resaved(sdxl_file, resaved, keys[::-1])
    assert resaved.read_bytes() != data
    assert install_model(resaved, webui, hf_home=tmp_path / "hf") == target
    assert target.read_bytes() == data  # kept as it was
    changed = bytearray(data)
    changed[-1] ^= 1  # same header, one tensor byte differs
    resaved.write_bytes(bytes(changed))
    with pytest.raises(CheckpointError, match=f"^{target} is another model already"):
        install_model(resaved, webui, hf_home=tmp_path / "hf")
    target.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=f"^{target} is another model already"):
        install_model(sdxl_file, webui, hf_home=tmp_path / "hf")
