"""Checkpoint files: safe pickle reading, SD v1 single files and family detection, head files,
the official LD-ZNet import, and `ldznet info` / `ldznet convert`."""

from __future__ import annotations

import argparse
import builtins
import json
import os
import pickle
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from fixtures_models import perturb_, random_image
from ldznet_ext import cli, heads
from ldznet_ext.checkpoint_io import read_metadata, read_state_dict, write_safetensors
from ldznet_ext.errors import CheckpointError
from ldznet_ext.heads import (
    OFFICIAL_TRAINING, convert_official, load_head, official_ema_name, official_head_state, read_head_config,
    save_head,
)
from ldznet_ext.modeling.build import build_head, head_config
from ldznet_ext.sd.checkpoint import (
    SD2_FOR_ZERO_SHOT_ONLY, SUPPORTED, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, classify, load_stable_diffusion,
    save_stable_diffusion, stable_diffusion_state_dict, unet_config_from_state_dict,
)
from ldznet_ext.sd.schedule import alphas_cumprod
from ldznet_ext.sd.vae_file import read_vae_file
from ldznet_ext.sd.unet import UNetModel, unet_config

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_HEAD = head_config("ldznet", "tiny", latent_size=8)


# ---------------------------------------------------------------- helpers and fixtures


def _sub(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _random_head(seed: int) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    return perturb_(build_head(TINY_HEAD), seed=seed + 100).state_dict()


@pytest.fixture(scope="module")
def head_a() -> dict[str, Tensor]:
    """The training weights of the official file (``model.diffusion_model.*``)."""
    return _random_head(10)


@pytest.fixture(scope="module")
def head_b() -> dict[str, Tensor]:
    """The EMA weights of the official file (``model_ema.<dotless>``)."""
    return _random_head(20)


class _LightningCallbackState:
    """Stands for the callback objects Lightning pickles beside the weights."""

    def __init__(self, monitor: str):
        self.monitor = monitor
        self.best_score = torch.tensor(0.527)


def _official_state(head_a: dict[str, Tensor], head_b: dict[str, Tensor]) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(5)
    state = {heads.OFFICIAL_MODEL_PREFIX + k: v for k, v in head_a.items()}
    state.update({official_ema_name(k): v for k, v in head_b.items()})
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(123456, dtype=torch.int32)
    for name, shape in (("first_stage_model.encoder.conv_in.weight", (8, 3, 3, 3)),
                        ("first_stage_model.quant_conv.weight", (8, 8, 1, 1)),
                        ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", (16, 8)),
                        ("cond_stage_model.transformer.text_model.final_layer_norm.weight", (8,)),
                        ("sd_features_stage_model.diffusion_model.input_blocks.0.0.weight", (32, 4, 3, 3)),
                        ("sd_features_stage_model.diffusion_model.out.2.weight", (4, 32, 3, 3))):
        state[name] = torch.randn(shape, generator=g)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    state["betas"] = betas
    state["alphas_cumprod"] = torch.cumprod(1 - betas, 0)
    state["alphas_cumprod_prev"] = torch.cat([torch.ones(1, dtype=torch.float64), state["alphas_cumprod"][:-1]])
    return state


def _write_official(path: Path, state: dict[str, Tensor]) -> Path:
    """A PyTorch-Lightning checkpoint in the official release's layout, with pickled objects
    (a Namespace, a callback instance) that ``torch.load(weights_only=True)`` refuses."""
    torch.save({
        "epoch": 11, "global_step": 987654, "pytorch-lightning_version": "1.4.2",
        "state_dict": state,
        "callbacks": {"ModelCheckpoint{'monitor': 'val/loss'}": _LightningCallbackState("val/loss")},
        "optimizer_states": [{"state": {0: {"step": 3, "exp_avg": torch.zeros(2)}},
                              "param_groups": [{"lr": 5e-7 * 32, "betas": (0.9, 0.999), "params": [0]}]}],
        "lr_schedulers": [{"mode": "min", "factor": 0.5, "patience": 1}],
        "hyper_parameters": argparse.Namespace(base_learning_rate=5e-7, ckpt_path=None, scale_factor=0.18215),
    }, path)
    return path


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory, head_a, head_b) -> Path:
    path = tmp_path_factory.mktemp("official") / "LDZNet_txt2mask.ckpt"
    return _write_official(path, _official_state(head_a, head_b))


@pytest.fixture(scope="module")
def sd_state(tiny_sd) -> dict[str, Tensor]:
    return stable_diffusion_state_dict(tiny_sd)


@pytest.fixture(scope="module")
def sd_file(tmp_path_factory, tiny_sd) -> Path:
    path = tmp_path_factory.mktemp("sd") / "tiny-sd.safetensors"
    save_stable_diffusion(tiny_sd, path)
    return path


@pytest.fixture
def ldznet(capsys) -> Callable[..., tuple[int, str, str]]:
    """Run the CLI in-process: (exit status, stdout, stderr)."""
    def run(*args: object) -> tuple[int, str, str]:
        code = cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def _raw_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's ``ldznet.*`` metadata as stored (JSON strings), to copy it to another file."""
    return {f"ldznet.{k}": json.dumps(v) for k, v in read_metadata(path).items()}


def _equal_states(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- 1. official import


def test_official_checkpoint_needs_the_allow_list_reader(official_ckpt, head_a, head_b) -> None:
    with pytest.raises(pickle.UnpicklingError):
        torch.load(official_ckpt, map_location="cpu", weights_only=True)
    state = read_state_dict(official_ckpt)
    assert _equal_states(state, _official_state(head_a, head_b))


@pytest.mark.parametrize("use_ema", [True, False])
def test_convert_official_takes_the_ema_or_the_training_weights(official_ckpt, head_a, head_b, tmp_path, use_ema):
    out = tmp_path / "head.safetensors"
    assert convert_official(official_ckpt, out, use_ema=use_ema, config=TINY_HEAD) == TINY_HEAD
    head, config = load_head(out)
    assert config == TINY_HEAD == read_head_config(out)
    assert _equal_states(head.state_dict(), head_b if use_ema else head_a)
    metadata = read_metadata(out)
    assert metadata["head"] == json.loads(json.dumps(TINY_HEAD.to_dict()))
    assert metadata["training"] == {**OFFICIAL_TRAINING, "weights": "ema" if use_ema else "model",
                                    "converted_from": "LDZNet_txt2mask.ckpt"}


def test_ema_names_of_the_full_sd_v1_layout_are_unambiguous() -> None:
    with torch.device("meta"):
        expected = build_head(head_config("ldznet")).state_dict()
    names = {official_ema_name(k) for k in expected}
    assert len(expected) == len(names) == 760
    assert official_ema_name("out.2.weight") == "model_ema.diffusion_modelout2weight"
    official = {official_ema_name(k): v for k, v in expected.items()}
    official.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1)})
    official.update({heads.OFFICIAL_MODEL_PREFIX + k: v for k, v in expected.items()})
    assert official_head_state(official, expected).keys() == expected.keys()
    assert official_head_state(official, expected, use_ema=False).keys() == expected.keys()


def _drop_one(state: dict[str, Tensor]) -> str:
    del state[official_ema_name("middle_block.1.transformer_blocks.0.attn3.to_q.weight")]
    return "missing 1: middle_block.1.transformer_blocks.0.attn3.to_q.weight"


def _add_one(state: dict[str, Tensor]) -> str:
    state["model_ema.diffusion_modelextraweight"] = torch.zeros(3)
    return "unexpected 1: model_ema.diffusion_modelextraweight"


def _reshape_one(state: dict[str, Tensor]) -> str:
    name = official_ema_name("final.0.weight")
    state[name] = torch.zeros(2, *state[name].shape[1:])
    return "wrong shape: final.0.weight (2, 1, 3, 3) != (1, 1, 3, 3)"


@pytest.mark.parametrize("damage", [_drop_one, _add_one, _reshape_one], ids=["missing", "unexpected", "shape"])
def test_mismatched_official_weights_abort_the_import(head_a, head_b, tmp_path, damage):
    state = _official_state(head_a, head_b)
    found = damage(state)
    source = _write_official(tmp_path / "damaged.ckpt", state)
    out = tmp_path / "head.safetensors"
    with pytest.raises(CheckpointError) as error:
        convert_official(source, out, config=TINY_HEAD)
    assert str(error.value) == f"damaged.ckpt: the weights do not match the head architecture; {found}"
    assert not out.exists() and list(tmp_path.iterdir()) == [source]


def test_official_file_without_ema_weights_says_so(head_a, tmp_path):
    state = {heads.OFFICIAL_MODEL_PREFIX + k: v for k, v in head_a.items()}
    source = _write_official(tmp_path / "no-ema.ckpt", state)
    with pytest.raises(CheckpointError, match=r"no-ema.ckpt: no EMA weights \('model_ema\.\*'\); .*--no-ema"):
        convert_official(source, tmp_path / "head.safetensors", config=TINY_HEAD)


# ---------------------------------------------------------------- 2. pickles never execute code


def _write_marker(path: str) -> None:
    Path(path).write_text("code from the checkpoint ran")


class _CallsFunction:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return _write_marker, (self.marker,)


class _OpensFile:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


class _RunsShell:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_the_payloads_work_under_plain_pickle(tmp_path) -> None:
    # Guards the tests below: each payload really acts when unpickled the ordinary way.
    for i, payload in enumerate((_CallsFunction, _OpensFile, _RunsShell)):
        marker = tmp_path / f"marker{i}"
        result = pickle.loads(pickle.dumps(payload(marker)))
        if hasattr(result, "close"):
            result.close()
        assert marker.exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickled_code_is_never_executed_and_tensors_survive(tmp_path, zip_format) -> None:
    markers = [tmp_path / f"marker{i}" for i in range(3)]
    weights = {"model.diffusion_model.out.2.weight": torch.randn(1, 4, 3, 3), "betas": torch.rand(10)}
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {**weights, "payload": _CallsFunction(markers[0])},
                "opener": _OpensFile(markers[1]), "shell": [_RunsShell(markers[2])]},
               path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert _equal_states(read_state_dict(path), weights)
    assert not any(m.exists() for m in markers)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_poisoned_legacy_header_is_not_executed(tmp_path) -> None:
    # torch's legacy format starts with header pickles that torch reads with ``pickle_module.load``.
    marker = tmp_path / "marker"
    path = tmp_path / "header.ckpt"
    path.write_bytes(pickle.dumps(_RunsShell(marker)) + pickle.dumps(_CallsFunction(marker)))
    with pytest.raises(CheckpointError, match="header.ckpt: cannot read the file"):
        read_state_dict(path)
    assert not marker.exists()


# ---------------------------------------------------------------- 3. SD v1 loading


def _outputs(model) -> tuple[Tensor, Tensor, Tensor]:
    image = torch.from_numpy(random_image(64, 64, seed=7)).permute(2, 0, 1)[None].float() / 127.5 - 1
    z = model.encode_image(image)
    context = model.encode_text(["a red cube", ""])
    g = torch.Generator().manual_seed(8)
    eps = model.predict_noise(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([400, 37]), context)
    return z, context.context, eps


@pytest.fixture(scope="module")
def reference_outputs(tiny_sd) -> tuple[Tensor, Tensor, Tensor]:
    with torch.no_grad():
        return _outputs(tiny_sd)


def test_safetensors_round_trip_gives_identical_outputs(sd_file, tiny_sd, reference_outputs) -> None:
    model = load_stable_diffusion(sd_file)
    assert model.unet.config == tiny_sd.unet.config
    assert _equal_states(model.state_dict(), tiny_sd.state_dict())
    with torch.no_grad():
        for ours, reference in zip(_outputs(model), reference_outputs):
            assert torch.equal(ours, reference)
    assert reference_outputs[2].abs().min() > 0  # the UNet output is not trivially zero


def test_safetensors_tensors_are_owned_and_aligned(sd_file) -> None:
    # mapped tensors sit at their file offsets; unaligned data changes CPU results in the last bit
    state = read_state_dict(sd_file)
    assert all(t.data_ptr() % 64 == 0 for t in state.values())


def test_ckpt_of_the_same_state_dict_loads(sd_state, tiny_sd, reference_outputs, tmp_path) -> None:
    path = tmp_path / "tiny-sd.ckpt"
    torch.save({"state_dict": sd_state, "global_step": 470000}, path)
    model = load_stable_diffusion(path)
    assert _equal_states(model.state_dict(), tiny_sd.state_dict())
    # Head counts are invisible in the weights: without metadata the SD v1 values are assumed.
    assert model.unet.config == replace(unet_config("tiny"), num_heads=8)
    assert model.text_encoder.transformer.config.num_attention_heads == 1  # 64-d / 64 per head
    with torch.no_grad():
        assert torch.equal(_outputs(model)[0], reference_outputs[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_file_stored_in_fewer_bits_loads_in_fp32_with_the_exact_schedule(sd_state, tmp_path, dtype) -> None:
    # Community files store everything in fp16, bf16 or fp8 (Forge's fp8 checkpoints), the schedule included.
    rounded = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd_state.items()}
    save_file(rounded, tmp_path / "low.safetensors")
    model = load_stable_diffusion(tmp_path / "low.safetensors")
    loaded = stable_diffusion_state_dict(model)
    weights = [k for k, v in rounded.items() if v.is_floating_point() and k != "alphas_cumprod"]
    assert len(weights) > 800 and all(loaded[k].dtype == torch.float32 for k in weights)
    assert all(torch.equal(loaded[k], rounded[k].float()) for k in weights)
    assert torch.equal(model.schedule.alphas_cumprod, alphas_cumprod())
    assert model.schedule.alphas_cumprod[0] < 1  # rounded, a_0 = 0.99915 would be 1 in bf16 and fp8: no noise


@pytest.mark.parametrize("chain", [(torch.float16, torch.float8_e4m3fn), (torch.float16, torch.bfloat16),
                                   (torch.bfloat16, torch.float8_e5m2), (torch.float16, torch.float32)],
                         ids=["fp16-fp8", "fp16-bf16", "bf16-fp8", "fp16-fp32"])
def test_a_schedule_rounded_twice_is_the_exact_one(sd_state, tmp_path, chain) -> None:
    """An fp16-pruned file cast to fp8 or bf16 later (or upcast to fp32 again) rounds the stored schedule
    twice: fp16 -> fp8 gave a_0 = 1 (no noise at t = 0) and a_300 0.5625 for 0.5905."""
    table = alphas_cumprod()
    for dtype in chain:
        table = table.to(dtype)
    save_file(sd_state | {"alphas_cumprod": table}, tmp_path / "twice.safetensors")
    assert torch.equal(load_stable_diffusion(tmp_path / "twice.safetensors").schedule.alphas_cumprod, alphas_cumprod())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_schedule_of_its_own_is_kept_in_any_precision(sd_state, tmp_path, dtype) -> None:
    table = alphas_cumprod().clone()
    table[-1] = 0.0  # zero terminal SNR, as some fine-tunes ship
    save_file(sd_state | {"alphas_cumprod": table.to(dtype)}, tmp_path / "ztsnr.safetensors")
    schedule = load_stable_diffusion(tmp_path / "ztsnr.safetensors").schedule
    assert torch.equal(schedule.alphas_cumprod, table.to(dtype).double())


@pytest.mark.parametrize("position_ids", [False, True])
def test_old_text_layout_without_text_model_loads(sd_state, sd_file, reference_outputs, tmp_path, position_ids):
    old = {(TEXT_PREFIX + k[len(TEXT_PREFIX + "text_model."):] if k.startswith(TEXT_PREFIX) else k): v
           for k, v in sd_state.items()}
    assert not any(k.startswith(TEXT_PREFIX + "text_model.") for k in old)
    if position_ids:
        old[TEXT_PREFIX + "embeddings.position_ids"] = torch.arange(77)[None]
    path = tmp_path / "old-text.safetensors"
    save_file(old, str(path), metadata=_raw_metadata(sd_file))
    with torch.no_grad():
        for ours, reference in zip(_outputs(load_stable_diffusion(path)), reference_outputs):
            assert torch.equal(ours, reference)


def test_unet_config_is_recovered_from_shapes(sd_state) -> None:
    assert unet_config_from_state_dict(_sub(sd_state, UNET_PREFIX), num_heads=2) == unet_config("tiny")
    with torch.device("meta"):
        full = UNetModel(unet_config("sd-v1")).state_dict()
        head = build_head(head_config("ldznet")).state_dict()
    assert unet_config_from_state_dict(full) == unet_config("sd-v1")
    assert unet_config_from_state_dict(head) == unet_config("sd-v1", out_channels=1)


# ---------------------------------------------------------------- 4. family detection


def _sd2_openclip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {k: v for k, v in state.items() if not k.startswith(TEXT_PREFIX)}
    out["cond_stage_model.model.token_embedding.weight"] = torch.zeros(16, 64)
    out["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(192, 64)
    return out


def _sd2_context(state: dict[str, Tensor]) -> dict[str, Tensor]:
    unet = UNetModel(unet_config("tiny", context_dim=1024)).state_dict()
    return {**{k: v for k, v in state.items() if not k.startswith(UNET_PREFIX)},
            **{UNET_PREFIX + k: v for k, v in unet.items()}}


def _sdxl(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {("conditioner.embedders.0.transformer." + k[len(TEXT_PREFIX):] if k.startswith(TEXT_PREFIX) else k): v
            for k, v in state.items()}


def _inpainting(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {**state, UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)}


def _diffusers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {"conv_in.weight": torch.zeros(32, 4, 3, 3), "time_embedding.linear_1.weight": torch.zeros(128, 32),
            "down_blocks.0.resnets.0.conv1.weight": torch.zeros(32, 32, 3, 3)}


def _no_vae(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(VAE_PREFIX)}


def _no_text(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(TEXT_PREFIX)}


def _wide_text(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {**state, TEXT_PREFIX + "text_model.embeddings.token_embedding.weight": torch.zeros(16, 96)}


def _no_unet(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(UNET_PREFIX)}


def _ddp(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {"module." + k: v for k, v in state.items()}


FAMILIES = {  # case: (transform, family, what the message says was found)
    # SD 2.x serves zero-shot masks only (test_sd2_model.py): a head is refused
    "sd2-openclip": (_sd2_openclip, "sd2", "SD 2.x"),
    "sd2-context": (_sd2_context, "sd2", "SD 2.x"),
    "sdxl": (_sdxl, "sdxl", "SDXL"),  # refused unless zero-shot: test_sdxl_model.py
    "inpainting": (_inpainting, "sd-v1-inpainting", "inpainting UNets (9 input channels) are not supported"),
    "diffusers": (_diffusers, "diffusers", "this is a diffusers-format file; use a single-file SD v1 checkpoint"),
    "no-vae": (_no_vae, "sd-v1", "the file has no VAE ('first_stage_model.*'); give the VAE it was published with "
                                 "as --vae VAE.safetensors"),
    "no-text": (_no_text, "sd-v1", "the file has no text encoder ('cond_stage_model.transformer.*'); a full "
                                   "single-file checkpoint is needed"),
    "wide-text": (_wide_text, "unknown",
                  "mismatched parts: the text encoder is 96-d but the UNet expects a 64-d context"),
    "no-unet": (_no_unet, "unknown", "no UNet found (no 'model.diffusion_model.input_blocks.0.0.weight'); its keys "
                                     "start with 'first_stage_model.*', 'cond_stage_model.*'"),
    "ddp": (_ddp, "unknown", "no UNet found (no 'model.diffusion_model.input_blocks.0.0.weight'); its keys carry an "
                             "extra prefix 'module.' (a wrapped model, e.g. saved from DDP): save it without"),
}


def test_a_plain_sd_v1_file_is_usable(sd_state) -> None:
    info = classify(sd_state)
    assert (info.family, info.problem) == ("sd-v1", None)
    assert info.details == {"unet_in_channels": 4, "model_channels": 32, "context_dim": 64}


@pytest.mark.parametrize("case", FAMILIES)
def test_other_families_are_named_and_refused(sd_state, tmp_path, case) -> None:
    transform, family, found = FAMILIES[case]
    state = transform(sd_state)
    info = classify(state)
    assert info.family == family and found in info.problem
    path = tmp_path / f"{case}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointError) as error:
        load_stable_diffusion(path)
    message = str(error.value)
    assert message.startswith(f"{case}.safetensors: {family}: ") and found in message
    assert message.endswith(f"Supported: {SUPPORTED}.")


def test_ldznet_files_passed_as_the_model_are_named(official_ckpt, head_a, tmp_path) -> None:
    head_file = tmp_path / "head.safetensors"
    save_head(build_head(TINY_HEAD), TINY_HEAD, head_file)
    with pytest.raises(CheckpointError, match=r"^head.safetensors: ldznet-head: this is a segmentation head, "
                                              r"not an SD model; pass it as the head\. Supported: SD v1"):
        load_stable_diffusion(head_file)
    with pytest.raises(CheckpointError, match=r"^LDZNet_txt2mask.ckpt: ldznet-official: this is the official "
                                              r"LD-ZNet release; import its head with `ldznet convert FILE"):
        load_stable_diffusion(official_ckpt)
    assert classify({"final.0.weight": torch.zeros(1)}).family == "ldznet-head"  # a head without metadata


def test_truncated_and_foreign_files_are_refused(sd_file, tmp_path) -> None:
    truncated = tmp_path / "cut.safetensors"
    data = sd_file.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"^cut.safetensors: tensor '.*' ends at byte \d+ of the data, but the "
                                              r"file holds \d+: it is truncated \(an unfinished download or copy\?\)$"):
        load_stable_diffusion(truncated)
    header_cut = tmp_path / "header-cut.safetensors"
    header_cut.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="header-cut.safetensors: cannot read"):
        load_stable_diffusion(header_cut)
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                    dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match=r"^noise.ckpt: cannot read the file \(.*\); it may be truncated"):
        load_stable_diffusion(noise)
    unknown = tmp_path / "model.onnx"
    unknown.write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"^model.onnx: unknown checkpoint format '.onnx'; "
                                              r"supported: .safetensors, .ckpt, .pt, .pth, .bin$"):
        load_stable_diffusion(unknown)
    with pytest.raises(CheckpointError, match=r"^checkpoint not found: .*missing.safetensors$"):
        load_stable_diffusion(tmp_path / "missing.safetensors")
    pickled_list = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], pickled_list)
    with pytest.raises(CheckpointError, match="^list.pt: holds a list, not a state dict of tensors$"):
        read_state_dict(pickled_list)


def test_head_loading_checks_metadata_and_tensors(sd_file, head_a, tmp_path) -> None:
    with pytest.raises(CheckpointError, match=r"^tiny-sd.safetensors: SD 1.x, not an ldznet head \(no 'ldznet.head' "
                                              r"metadata\); use it as the model$"):
        load_head(sd_file)
    save_file({"weights": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match=r"^other.safetensors: not an ldznet head \(no 'ldznet.head' "
                                              r"metadata\); an official LD-ZNet .ckpt must first be imported"):
        load_head(tmp_path / "other.safetensors")
    path = tmp_path / "short.safetensors"
    save_file({k: v for k, v in head_a.items() if k != "final.0.bias"}, str(path),
              metadata={"ldznet.head": json.dumps(TINY_HEAD.to_dict())})
    with pytest.raises(CheckpointError, match=r"^short.safetensors: the weights do not match the head "
                                              r"architecture; missing 1: final.0.bias$"):
        load_head(path)


# ---------------------------------------------------------------- 5. CLI


def test_info_on_architectures(ldznet) -> None:
    code, out, _ = ldznet("info", "--arch", "ldznet", "--size", "sd-v1", "--json")
    assert code == 0
    assert out == json.dumps({"arch": "ldznet", "size": "sd-v1", "parameters": 925_882_936, "tensors": 760},
                             indent=2) + "\n"
    code, out, _ = ldznet("info", "--arch", "sd-unet", "--json")
    assert code == 0 and json.loads(out)["parameters"] == 859_520_964


def test_info_reads_a_safetensors_header_and_one_tensor(ldznet, sd_file, monkeypatch) -> None:
    """A 7 GB SDXL file is described without reading its weights (it used to take twice its size in RAM)."""
    from ldznet_ext.cli import checkpoint
    read, read_tensors = [], checkpoint.read_tensors
    monkeypatch.setattr(checkpoint, "read_state_dict", lambda path: pytest.fail("every tensor was read"))
    monkeypatch.setattr(checkpoint, "read_tensors", lambda path, names: read.append(list(names)) or
                        read_tensors(path, names))
    code, out, _ = ldznet("info", sd_file, "--json")
    assert code == 0 and json.loads(out)["dtype"] == "float32"
    assert read == [["model.diffusion_model.input_blocks.0.0.bias"]]  # the header lists names in order


def test_info_on_files(ldznet, sd_file, sd_state, head_a, tmp_path) -> None:
    code, out, _ = ldznet("info", sd_file, "--json")
    report = json.loads(out)
    assert code == 0 and report["family"] == "sd-v1" and "usable" not in report
    assert report["tensors"] == len(sd_state) and report["parameters"] == sum(v.numel() for v in sd_state.values())
    assert report["unet"] == json.loads(json.dumps(unet_config("tiny").to_dict()))
    assert report["unet_parameters"] + report["vae_parameters"] + report["text_encoder_parameters"] == \
        report["parameters"] - 1000  # alphas_cumprod
    assert report["dtype"] == "float32" and "prediction" not in report and "noise_schedule" not in report

    head_file = tmp_path / "head.safetensors"
    save_head(build_head(TINY_HEAD), TINY_HEAD, head_file, training={"steps": 3})
    code, out, _ = ldznet("info", head_file, "--json")
    report = json.loads(out)
    assert code == 0 and report["family"] == "ldznet-head" and report["usable"] is False
    assert report["head"] == json.loads(json.dumps(TINY_HEAD.to_dict())) and report["training"] == {"steps": 3}

    sd2 = tmp_path / "sd2.safetensors"
    save_file({k: v.contiguous() for k, v in _sd2_openclip(sd_state).items()}, str(sd2))
    code, out, _ = ldznet("info", sd2, "--json")
    report = json.loads(out)
    assert code == 0 and report["family"] == "sd2" and report["usable"] == "zero-shot"
    assert report["note"] == f"{SD2_FOR_ZERO_SHOT_ONLY}."
    marked = tmp_path / "sd2-v-ztsnr.safetensors"
    save_file({**{k: v.contiguous().half() for k, v in _sd2_openclip(sd_state).items()}, "v_pred": torch.zeros(()),
               "ztsnr": torch.zeros(())}, str(marked))
    report = json.loads(ldznet("info", marked, "--json")[1])
    assert (report["dtype"], report["prediction"], report["noise_schedule"]) == (
        "float16", "v (the 'v_pred' marker)", "rescaled to zero terminal SNR (the 'ztsnr' marker)")

    partial = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in sd_state.items() if not k.startswith(UNET_PREFIX + "middle_block.")},
              str(partial))
    code, out, _ = ldznet("info", partial, "--json")
    report = json.loads(out)
    assert code == 0 and report["family"] == "sd-v1" and report["usable"] is False and "unet" not in report
    assert report["note"].startswith("the UNet is incomplete (no "
                                     "'model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight')")


def test_convert_end_to_end(ldznet, official_ckpt, head_b, tmp_path, monkeypatch) -> None:
    # The CLI converts the sd-v1 layout of the release; a tiny file in that layout stands in for it.
    monkeypatch.setattr(heads, "head_config", lambda arch: TINY_HEAD)
    out = tmp_path / "ldznet.safetensors"
    code, stdout, _ = ldznet("convert", official_ckpt, "-o", out, "--fp16")
    assert code == 0
    assert stdout == f"wrote {out}: ldznet head, blocks [6, 7, 8, 9, 10], EMA weights\n"
    stored = read_state_dict(out)
    assert all(v.dtype == torch.float16 for v in stored.values())
    assert _equal_states(stored, {k: v.half() for k, v in head_b.items()})
    head, config = load_head(out)
    assert config == TINY_HEAD and next(head.parameters()).dtype == torch.float32


def test_convert_and_info_report_bad_files_with_status_2(ldznet, tmp_path) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    for command in (("convert", bad, "-o", tmp_path / "out.safetensors"), ("info", bad)):
        code, out, err = ldznet(*command)
        assert code == 2 and out == ""
        assert err.startswith(f"ldznet {command[0]}: error: bad.ckpt: cannot read the file (")
    assert not (tmp_path / "out.safetensors").exists()
    assert ldznet("info") == (2, "", "ldznet info: error: give a checkpoint FILE or --arch NAME\n")


def test_written_tensor_files_take_the_users_file_mode(tmp_path) -> None:
    """safetensors creates its files 0600, so a head trained by one user was unreadable to a WebUI run by another."""
    umask = os.umask(0o022)
    try:
        write_safetensors(tmp_path / "head.safetensors", {"w": torch.zeros(1)}, {})
    finally:
        os.umask(umask)
    assert (tmp_path / "head.safetensors").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("parts", ["all", "mask"])
def test_vae_attention_stored_as_linear_weights_loads_as_the_convolutions(sd_file, tmp_path, parts) -> None:
    """Older diffusers-to-ldm scripts wrote the VAE's mid-block q, k, v and proj_out as [C, C]; the diffusers
    folder reader reshaped them, a single file, a VAE file and the lazily read mask parts were refused."""
    state, metadata = read_state_dict(sd_file), read_metadata(sd_file)
    linear = {k: v[:, :, 0, 0] if ".mid.attn_1." in k and k.endswith(("q.weight", "k.weight", "v.weight",
                                                                      "proj_out.weight")) else v
              for k, v in state.items()}
    assert sum(v.ndim == 2 for k, v in linear.items() if ".mid.attn_1." in k) == 8  # encoder and decoder
    write_safetensors(tmp_path / "linear.safetensors", linear, metadata)
    loaded = load_stable_diffusion(tmp_path / "linear.safetensors", parts=parts)
    reference = load_stable_diffusion(sd_file, parts=parts)
    assert all(torch.equal(v, reference.vae.state_dict()[k]) for k, v in loaded.vae.state_dict().items()
               if v.device.type != "meta")
    vae_only = {k[len(VAE_PREFIX):]: v for k, v in linear.items() if k.startswith(VAE_PREFIX)}
    write_safetensors(tmp_path / "vae.safetensors", vae_only, {})
    from_file, canonical = read_vae_file(tmp_path / "vae.safetensors"), read_vae_file(sd_file)
    assert from_file.keys() == canonical.keys() and all(torch.equal(v, canonical[k]) for k, v in from_file.items())
