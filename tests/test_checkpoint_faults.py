"""Hostile checkpoint files: crafted ``ldznet.*`` metadata, raw safetensors headers, odd tensor
shapes, folders, unreadable files and the wrong file given to `convert`. Every reader (the SD
loader, the head loader, `ldznet info`, `ldznet mask --model/--head`) answers with one
CheckpointError line that names the file and the field, never a traceback."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor

from ldznet_ext import checkpoint_io
from ldznet_ext.checkpoint_io import read_state_dict
from ldznet_ext.errors import CheckpointError
from ldznet_ext.heads import convert_official, load_head
from ldznet_ext.sd.checkpoint import SUPPORTED, load_stable_diffusion

from fixtures_models import random_image

pytestmark = pytest.mark.usefixtures("single_thread")

UNET_KEYS = ("in_channels, out_channels, model_channels, channel_mult, num_res_blocks, attention_levels, "
             "num_heads, context_dim, transformer_depth, level_depths, num_head_channels, linear_projection, "
             "adm_in_channels")
HEAD_KEYS = "arch, unet, sd_blocks, latent_size, timestep, sd_fusion, presence, presence_level"
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
FOLDER_EXPECTED = "a single-file .safetensors or .ckpt"


def _raw_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's ``__metadata__`` exactly as stored (JSON strings)."""
    with open(path, "rb") as f:
        return json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]


def _write(path: Path, state: dict[str, Tensor], metadata: dict[str, str]) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def _write_header(path: Path, header: object) -> Path:
    """A safetensors file that is only a header: 8-byte little-endian length, then the JSON."""
    data = json.dumps(header).encode()
    path.write_bytes(len(data).to_bytes(8, "little") + data)
    return path


def _unet_with(source: Path, **changes: object) -> str:
    return json.dumps({**json.loads(_raw_metadata(source)["ldznet.unet"]), **changes})


def _head_with(source: Path, **changes: object) -> str:
    return json.dumps({**json.loads(_raw_metadata(source)["ldznet.head"]), **changes})


# ---------------------------------------------------------------- crafted SD model files

# name: (metadata changes given the original file, tensor changes, the message after "FILE: ")
SD_CASES: dict[str, tuple[Callable[[Path], dict[str, str]], dict[str, Tensor], str]] = {
    "unet not JSON": (lambda sd: {"ldznet.unet": "{nope"}, {},
                      "metadata field 'ldznet.unet' is not valid JSON (Expecting property name enclosed in double "
                      "quotes: line 1 column 2 (char 1))"),
    "unet of wrong keys": (lambda sd: {"ldznet.unet": '{"foo": 1}'}, {},
                           f"field 'ldznet.unet' has unknown key(s) foo; expected keys among {UNET_KEYS}"),
    "unet a list": (lambda sd: {"ldznet.unet": "[1, 2]"}, {},
                    f"field 'ldznet.unet' is [1, 2]; expected a JSON object with keys {UNET_KEYS}"),
    "unet width a string": (lambda sd: {"ldznet.unet": _unet_with(sd, model_channels="32")}, {},
                            "field 'ldznet.unet', key 'model_channels' is \"32\"; expected an integer >= 0"),
    "unet levels not a list": (lambda sd: {"ldznet.unet": _unet_with(sd, channel_mult=4)}, {},
                               "field 'ldznet.unet', key 'channel_mult' is 4; expected a list of integers >= 0"),
    "resolution a string": (lambda sd: {"ldznet.resolution": '"big"'}, {},
                            "field 'ldznet.resolution' is \"big\"; expected an integer from 64 to 2048 (pixels)"),
    "resolution huge": (lambda sd: {"ldznet.resolution": "1000000000"}, {},
                        "field 'ldznet.resolution' is 1000000000; expected an integer from 64 to 2048 (pixels)"),
    "resolution beyond --resolution's range": (lambda sd: {"ldznet.resolution": "4096"}, {},
                                               "field 'ldznet.resolution' is 4096; expected an integer from 64 to "
                                               "2048 (pixels)"),
    "text a list": (lambda sd: {"ldznet.text": "[]"}, {},
                    "field 'ldznet.text' is []; expected a JSON object of integers >= 1 with keys among hidden_size, "
                    "intermediate_size, num_hidden_layers, num_attention_heads, vocab_size, max_position_embeddings"),
    "0-d conv_in": (lambda sd: {}, {CONV_IN: torch.tensor(1.0)},
                    f"unknown: '{CONV_IN}' has shape (); expected a convolution weight [out, in, k, k]. "
                    f"Supported: {SUPPORTED}."),
    "empty conv_in": (lambda sd: {}, {CONV_IN: torch.zeros(0, 4, 3, 3)},
                      f"unknown: '{CONV_IN}' has shape (0, 4, 3, 3); expected a convolution weight [out, in, k, k]. "
                      f"Supported: {SUPPORTED}."),
}


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("image") / "image.png"
    Image.fromarray(random_image(64, 64, seed=1)).save(path)
    return path


@pytest.fixture(scope="module")
def sd_state(tiny_model_files) -> dict[str, Tensor]:
    return read_state_dict(tiny_model_files[0])


@pytest.fixture(scope="module")
def head_state(tiny_model_files) -> dict[str, Tensor]:
    return read_state_dict(tiny_model_files[1])


def _crafted_sd(case: str, folder: Path, sd: Path, sd_state: dict[str, Tensor]) -> Path:
    metadata, tensors, _ = SD_CASES[case]
    return _write(folder / "crafted.safetensors", {**sd_state, **tensors}, {**_raw_metadata(sd), **metadata(sd)})


def _one_line_error(result: tuple[int, str, str], command: str, message: str) -> None:
    code, out, err = result
    assert (code, out, err) == (2, "", f"ldznet {command}: error: {message}\n")


@pytest.mark.parametrize("case", SD_CASES)
def test_crafted_sd_files_are_refused_by_the_loader_and_mask(case, tiny_model_files, sd_state, image, tmp_path, ldznet):
    path = _crafted_sd(case, tmp_path, tiny_model_files[0], sd_state)
    message = f"crafted.safetensors: {SD_CASES[case][2]}"
    with pytest.raises(CheckpointError) as error:
        load_stable_diffusion(path)
    assert str(error.value) == message
    out = tmp_path / "mask.png"
    _one_line_error(ldznet("mask", image, "cube", "-o", out, "--model", path, "--zero-shot"), "mask", message)
    assert not out.exists()


@pytest.mark.parametrize("case", [c for c in SD_CASES if not SD_CASES[c][1]])
def test_info_refuses_crafted_sd_metadata(case, tiny_model_files, sd_state, tmp_path, ldznet):
    path = _crafted_sd(case, tmp_path, tiny_model_files[0], sd_state)
    _one_line_error(ldznet("info", path), "info", f"crafted.safetensors: {SD_CASES[case][2]}")


@pytest.mark.parametrize("case", [c for c in SD_CASES if SD_CASES[c][1]])
def test_info_calls_sd_files_of_crafted_shapes_unusable(case, tiny_model_files, sd_state, tmp_path, ldznet):
    path = _crafted_sd(case, tmp_path, tiny_model_files[0], sd_state)
    code, out, err = ldznet("info", path, "--json")
    report = json.loads(out)
    assert (code, err, report["family"], report["usable"]) == (0, "", "unknown", False)
    assert report["note"] == SD_CASES[case][2].removeprefix("unknown: ")


def test_a_0d_tensor_inside_the_unet_is_named(tiny_model_files, sd_state, tmp_path, ldznet):
    # Without 'ldznet.unet' the architecture is read from the shapes, tensor by tensor.
    key = "input_blocks.1.0.out_layers.3.weight"
    metadata = {k: v for k, v in _raw_metadata(tiny_model_files[0]).items() if k != "ldznet.unet"}
    path = _write(tmp_path / "shapes.safetensors", {**sd_state, "model.diffusion_model." + key: torch.tensor(2.0)},
                  metadata)
    problem = f"tensor '{key}' has shape (); expected a non-empty axis 0"
    with pytest.raises(CheckpointError) as error:
        load_stable_diffusion(path)
    assert str(error.value) == f"shapes.safetensors: {problem}"
    code, out, _ = ldznet("info", path, "--json")
    assert code == 0 and json.loads(out)["note"] == f"the UNet's {problem}. Supported: {SUPPORTED}."


# ---------------------------------------------------------------- raw safetensors headers

HEADER_CASES = {
    "a JSON list": ([1, 2], "the safetensors header is a JSON list, not a JSON object"),
    "a string": ("x", "the safetensors header is a string, not a JSON object"),
    "metadata a list": ({"__metadata__": ["ldznet.unet"]},
                        "the safetensors '__metadata__' is a JSON list, not a JSON object of strings"),
    "metadata value not a string": ({"__metadata__": {"ldznet.unet": 5}},
                                    "metadata field 'ldznet.unet' is not valid JSON (the JSON object must be str, "
                                    "bytes or bytearray, not int)"),
}


@pytest.mark.parametrize("case", HEADER_CASES)
def test_crafted_headers_are_refused_everywhere(case, tiny_model_files, image, tmp_path, ldznet):
    header, problem = HEADER_CASES[case]
    path = _write_header(tmp_path / "raw.safetensors", header)
    message = f"raw.safetensors: {problem}"
    for load in (load_stable_diffusion, load_head):
        with pytest.raises(CheckpointError) as error:
            load(path)
        assert str(error.value) == message
    _one_line_error(ldznet("info", path), "info", message)
    out = tmp_path / "mask.png"
    _one_line_error(ldznet("mask", image, "cube", "-o", out, "--model", path, "--zero-shot"), "mask", message)
    _one_line_error(ldznet("mask", image, "cube", "-o", out, "--model", tiny_model_files[0], "--head", path),
                    "mask", message)
    assert not out.exists()


# ---------------------------------------------------------------- crafted head files

# name: (the 'ldznet.head' value given the original head file, the message after "FILE: ", whether
# `info` (which reads the metadata but builds nothing) refuses it too)
HEAD_CASES: dict[str, tuple[Callable[[Path], str], str, bool]] = {
    "not JSON": (lambda head: "{x", "metadata field 'ldznet.head' is not valid JSON (Expecting property name "
                                    "enclosed in double quotes: line 1 column 2 (char 1))", True),
    "a string": (lambda head: '"ldznet"',
                 f"field 'ldznet.head' is \"ldznet\"; expected a JSON object with keys {HEAD_KEYS}", True),
    "no unet": (lambda head: '{"arch": "ldznet"}',
                f"field 'ldznet.head' has no key unet; expected keys among {HEAD_KEYS}", True),
    "unet a list": (lambda head: _head_with(head, unet=[32]),
                    f"field 'ldznet.head', key 'unet' is [32]; expected a JSON object with keys {UNET_KEYS}", True),
    "unknown arch": (lambda head: _head_with(head, arch="clipseg"),
                     "field 'ldznet.head': unknown architecture 'clipseg'; choose one of ldznet, znet, rgbnet", True),
    "negative timestep": (lambda head: _head_with(head, timestep=-1),
                          "field 'ldznet.head', key 'timestep' is -1; expected an integer >= 0", True),
    "blocks out of range": (lambda head: _head_with(head, sd_blocks=[6, 99]),
                            "field 'ldznet.head', key 'sd_blocks' is [6, 99]; expected block numbers from 1 to 16",
                            False),
    "no attention heads": (lambda head: _head_with(head, unet={**json.loads(_head_with(head))["unet"], "num_heads": 0}),
                           "field 'ldznet.head' describes no head that can be built (integer division or modulo by "
                           "zero)", False),
}


@pytest.mark.parametrize("case", HEAD_CASES)
def test_crafted_heads_are_refused_by_the_loader_mask_and_info(case, tiny_model_files, head_state, image, tmp_path,
                                                              ldznet):
    sd, head = tiny_model_files
    value, problem, info_refuses = HEAD_CASES[case]
    metadata = {**_raw_metadata(head), "ldznet.head": value(head)}
    path = _write(tmp_path / "crafted-head.safetensors", head_state, metadata)
    message = f"crafted-head.safetensors: {problem}"
    with pytest.raises(CheckpointError) as error:
        load_head(path)
    assert str(error.value) == message
    out = tmp_path / "mask.png"
    _one_line_error(ldznet("mask", image, "cube", "-o", out, "--model", sd, "--head", path), "mask", message)
    assert not out.exists()
    if info_refuses:
        _one_line_error(ldznet("info", path), "info", message)


# ---------------------------------------------------------------- folders, unreadable and special files


def test_folders_say_what_is_expected(tiny_model_files, image, tmp_path, ldznet):
    sd, _ = tiny_model_files
    folder = tmp_path / "sd15-diffusers"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    out = tmp_path / "mask.png"
    # a diffusers folder is read (test_diffusers_folder.py): this one is named with what it lacks
    _one_line_error(ldznet("mask", image, "cube", "-o", out, "--model", folder, "--zero-shot"), "mask",
                    "sd15-diffusers: diffusers folder without unet/config.json")
    (folder / "model_index.json").unlink()
    _one_line_error(ldznet("mask", image, "cube", "-o", out, "--model", folder, "--zero-shot"), "mask",
                    f"model file {folder} is a folder without model_index.json; expected an SD checkpoint, "
                    f"{FOLDER_EXPECTED}, or a diffusers folder")
    _one_line_error(ldznet("mask", image, "cube", "-o", out, "--model", sd, "--head", folder), "mask",
                    f"head file {folder} is a folder; expected a head .safetensors file")
    _one_line_error(ldznet("info", folder), "info", f"checkpoint {folder} is a folder; expected {FOLDER_EXPECTED}")
    named_like_a_file = tmp_path / "model.safetensors"
    named_like_a_file.mkdir()
    with pytest.raises(CheckpointError, match=f"^checkpoint {named_like_a_file} is a folder; expected a single-file"):
        load_stable_diffusion(named_like_a_file)
    assert not out.exists()


def test_unreadable_files_say_permission_denied(tiny_model_files, tmp_path, ldznet, monkeypatch):
    locked = tmp_path / "locked.safetensors"
    locked.write_bytes((tiny_model_files[0]).read_bytes()[:64])
    real_open = open

    def denying_open(file, *args, **kwargs):
        if Path(file) == locked:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    # Root reads any file whatever its mode, so the refusal is simulated where the package opens files.
    monkeypatch.setattr(checkpoint_io, "open", denying_open, raising=False)
    message = f"cannot read checkpoint {locked}: permission denied"
    for load in (load_stable_diffusion, load_head):
        with pytest.raises(CheckpointError) as error:
            load(locked)
        assert str(error.value) == message
    _one_line_error(ldznet("info", locked), "info", message)


def _timed_out(signum: int, frame: object) -> None:
    raise TimeoutError("blocked opening the named pipe")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are a POSIX feature")
def test_a_named_pipe_is_not_opened(tmp_path, ldznet):
    pipe = tmp_path / "pipe.safetensors"
    os.mkfifo(pipe)  # opening it for reading would block until a writer comes
    previous = signal.signal(signal.SIGALRM, _timed_out)  # a regression fails the test instead of hanging it
    signal.alarm(10)
    try:
        result = ldznet("info", pipe)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    _one_line_error(result, "info", f"checkpoint {pipe} is a pipe, not a file; expected {FOLDER_EXPECTED}")


# ---------------------------------------------------------------- convert given the wrong file


def test_convert_says_what_the_file_is(tiny_model_files, tmp_path, ldznet):
    sd, head = tiny_model_files
    stray = _write(tmp_path / "stray.safetensors", {"weight": torch.zeros(2)}, {})
    cases = {sd: "sd.safetensors: SD 1.x", head: "head.safetensors: an LD-ZNet segmentation head",
             stray: "stray.safetensors: not a model checkpoint this tool recognises"}
    for source, what in cases.items():
        out = tmp_path / "converted.safetensors"
        message = f"{what}, not the official LD-ZNet release (LDZNet_txt2mask.ckpt)"
        with pytest.raises(CheckpointError) as error:
            convert_official(source, out)
        assert str(error.value) == message
        _one_line_error(ldznet("convert", source, "-o", out), "convert", message)
        assert not out.exists()


@pytest.mark.parametrize("case", ["unet of wrong keys", "unet a list", "unet width a string"])
def test_webui_install_model_refuses_crafted_unet_metadata(case, tiny_model_files, sd_state, tmp_path):
    from ldznet_ext.webui.install_model import install_model

    path = _crafted_sd(case, tmp_path, tiny_model_files[0], sd_state)
    webui = tmp_path / "webui"
    webui.mkdir()
    (webui / "webui.py").write_text("")
    with pytest.raises(CheckpointError) as error:
        install_model(path, webui, hf_home=tmp_path / "hf")
    assert str(error.value) == f"crafted.safetensors: {SD_CASES[case][2]}"
    assert not (webui / "models").exists()


# ---------------------------------------------------------------- weights that do not fit what they describe


def _refused_in_one_line(result: tuple[int, str, str], command: str, *words: str) -> None:
    code, out, err = result
    assert (code, out, err.count("\n")) == (2, "", 1) and err.startswith(f"ldznet {command}: error: "), err
    for word in words:
        assert word in err, err


def test_a_unet_the_metadata_describes_wider_than_its_weights_is_refused_in_one_line(tiny_model_files, sd_state,
                                                                                   image, tmp_path, ldznet):
    sd = tiny_model_files[0]
    path = _write(tmp_path / "wider.safetensors", sd_state,
                  {**_raw_metadata(sd), "ldznet.unet": _unet_with(sd, model_channels=64)})
    with pytest.raises(CheckpointError) as error:
        load_stable_diffusion(path)
    message = str(error.value)
    assert "\n" not in message and "size mismatch for time_embed.0.weight" in message
    assert message.startswith("wider.safetensors: the SD v1 weights do not fit the architecture they describe: ")
    _refused_in_one_line(ldznet("mask", image, "cube", "-o", tmp_path / "m.png", "--model", path, "--zero-shot"),
                         "mask", "wider.safetensors: the SD v1 weights do not fit", "size mismatch")


def test_integer_weights_are_named(tiny_model_files, sd_state, head_state, image, tmp_path, ldznet):
    # "quantized" files: int8 tensors where the architecture has floating-point parameters
    sd, head = tiny_model_files
    out = tmp_path / "m.png"
    key = "model.diffusion_model.time_embed.0.weight"
    path = _write(tmp_path / "int8.safetensors", {**sd_state, key: sd_state[key].to(torch.int8)}, _raw_metadata(sd))
    message = f"int8.safetensors: tensor '{key}' is int8; expected floating-point weights (fp32, fp16, bf16 or fp8)"
    for parts in ("all", "mask"):
        with pytest.raises(CheckpointError) as error:
            load_stable_diffusion(path, parts=parts)
        assert str(error.value) == message
    _one_line_error(ldznet("mask", image, "cube", "-o", out, "--model", path, "--zero-shot"), "mask", message)
    int_head = _write(tmp_path / "int8-head.safetensors", {k: v.to(torch.int8) for k, v in head_state.items()},
                      _raw_metadata(head))
    with pytest.raises(CheckpointError, match=r"^int8-head.safetensors: the weights do not match the head "
                                              r"architecture; not floating point: "):
        load_head(int_head)
    _refused_in_one_line(ldznet("mask", image, "cube", "-o", out, "--model", sd, "--head", int_head), "mask",
                         "int8-head.safetensors: the weights do not match the head architecture; not floating point:")
    assert not out.exists()


UNET_COUNTS = {  # the 'ldznet.unet' change, and the words of the refusal
    "res blocks": ({"num_res_blocks": 10**6}, "num_res_blocks is 1000000; expected at most 8"),
    "levels": ({"channel_mult": [1] * 5000, "attention_levels": [0]}, "channel_mult has 5000 levels; expected at most 8"),
    "depth": ({"transformer_depth": 10**6}, "transformer blocks; expected at most 256"),
    "level depths": ({"level_depths": [0, 10**5, 10**5, 10**5]}, "transformer blocks; expected at most 256"),
}


@pytest.mark.parametrize("case", UNET_COUNTS)
def test_a_unet_of_millions_of_blocks_is_refused_before_it_is_built(case, tiny_model_files, sd_state, head_state,
                                                                    image, tmp_path, ldznet):
    # one crafted number would otherwise build millions of modules (minutes, then gigabytes)
    sd, head = tiny_model_files
    change, words = UNET_COUNTS[case]
    path = _write(tmp_path / "deep.safetensors", sd_state, {**_raw_metadata(sd), "ldznet.unet": _unet_with(sd, **change)})
    with pytest.raises(CheckpointError, match=rf"^deep.safetensors: field 'ldznet.unet': .*{words}"):
        load_stable_diffusion(path)
    unet = {**json.loads(_raw_metadata(head)["ldznet.head"])["unet"], **change}
    deep_head = _write(tmp_path / "deep-head.safetensors", head_state,
                       {**_raw_metadata(head), "ldznet.head": _head_with(head, unet=unet)})
    with pytest.raises(CheckpointError, match=rf"^deep-head.safetensors: field 'ldznet.head', key 'unet': .*{words}"):
        load_head(deep_head)
    out = tmp_path / "m.png"
    _refused_in_one_line(ldznet("mask", image, "cube", "-o", out, "--model", sd, "--head", deep_head), "mask", words)
    _refused_in_one_line(ldznet("info", deep_head), "info", words)


TEXT_KEY = "cond_stage_model.transformer.text_model.embeddings."
# name: ('ldznet.text' changes, tensor changes given the file's tensors, the message after "FILE: ")
TEXT_CASES: dict[str, tuple[dict[str, int], Callable[[dict[str, Tensor]], dict[str, Tensor]], str]] = {
    # sizes the weights show: built as the metadata says, they would allocate gigabytes first
    "wider than the weights": ({"hidden_size": 200000}, lambda s: {},
                               "field 'ldznet.text', key 'hidden_size' is 200000; the weights have 64"),
    "deeper than the weights": ({"num_hidden_layers": 100000}, lambda s: {},
                                "field 'ldznet.text', key 'num_hidden_layers' is 100000; the weights have 2"),
    # shapes that load but fail at the first prompt
    "heads that do not divide": ({"num_attention_heads": 7}, lambda s: {},
                                 "the text encoder's 7 attention heads do not divide its width 64"),
    "too few positions": ({"max_position_embeddings": 10}, lambda s: {TEXT_KEY + "position_embedding.weight": s[TEXT_KEY + "position_embedding.weight"][:10]},
                          "the text encoder has 10 positions; CLIP's tokenizer makes prompts of 77 tokens"),
    "too few tokens": ({"vocab_size": 100}, lambda s: {TEXT_KEY + "token_embedding.weight": s[TEXT_KEY + "token_embedding.weight"][:100]},
                       "the text encoder has 100 token embeddings; CLIP's tokenizer needs 49408"),
}


@pytest.mark.parametrize("case", TEXT_CASES)
def test_a_text_encoder_that_cannot_encode_prompts_is_refused_at_load(case, tiny_model_files, sd_state, image,
                                                                     tmp_path, ldznet):
    sd, head = tiny_model_files
    text, tensors, problem = TEXT_CASES[case]
    metadata = _raw_metadata(sd)
    metadata["ldznet.text"] = json.dumps({**json.loads(metadata["ldznet.text"]), **text})
    path = _write(tmp_path / "text.safetensors", {**sd_state, **tensors(sd_state)}, metadata)
    message = f"text.safetensors: {problem}"
    for parts in ("all", "mask"):
        with pytest.raises(CheckpointError) as error:
            load_stable_diffusion(path, parts=parts)
        assert str(error.value) == message
    out = tmp_path / "m.png"
    _one_line_error(ldznet("mask", image, "cube", "-o", out, "--model", path, "--zero-shot"), "mask", message)
    _one_line_error(ldznet("mask", image, "cube", "-o", out, "--model", sd, "--head", head, "--mask-model", path),
                    "mask", message)
    assert not out.exists()


@pytest.mark.parametrize("table", [torch.full((3,), 0.5), torch.full((1000,), float("nan")), torch.linspace(2, 3, 1000),
                                   torch.full((10, 100), 0.5)], ids=["3 steps", "NaN", "above 1", "2-d"])
def test_a_noise_schedule_that_is_none_is_refused_at_load(table, tiny_model_files, sd_state, image, tmp_path, ldznet):
    # the schedule is looked up at the head's timestep (400) or the zero-shot ones: a short table failed
    # there with an IndexError traceback, and NaN or values above 1 gave NaN maps
    sd, head = tiny_model_files
    path = _write(tmp_path / "schedule.safetensors", {**sd_state, "alphas_cumprod": table}, _raw_metadata(sd))
    message = (f"schedule.safetensors: tensor 'alphas_cumprod' of shape {tuple(table.shape)} is no noise schedule; "
               "expected 1000 values in [0, 1]")
    with pytest.raises(CheckpointError) as error:
        load_stable_diffusion(path, parts="mask")
    assert str(error.value) == message
    _one_line_error(ldznet("mask", image, "cube", "-o", tmp_path / "m.png", "--model", path, "--head", head), "mask",
                    message)


def test_a_symlink_loop_is_not_found_not_a_traceback(tiny_model_files, tmp_path, ldznet):
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop.name)  # resolving it raises RuntimeError, not OSError
    out = tmp_path / "converted.safetensors"
    _one_line_error(ldznet("convert", loop, "-o", out), "convert", f"checkpoint not found: {loop}")
    _one_line_error(ldznet("convert", tiny_model_files[0], "-o", loop), "convert",
                    f"{loop}: the file exists; convert writes a new head file, so give a new name (or remove the old "
                    "file first)")
    assert not out.exists() and loop.is_symlink()


def test_a_file_name_with_a_line_break_keeps_the_error_on_one_line(tiny_model_files, image, tmp_path, ldznet):
    odd = tmp_path / "two\nlines.safetensors"
    odd.write_bytes(tiny_model_files[0].read_bytes())
    _one_line_error(ldznet("mask", image, "cube", "-o", tmp_path / "m.png", "--model", tiny_model_files[0], "--head", odd),
                    "mask", "two\\nlines.safetensors: SD 1.x, not an ldznet head (no 'ldznet.head' metadata); use it "
                    "as the model")


@pytest.mark.parametrize("content, message", [
    ({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(2, 8)}, "name": "emb", "step": 100},
     "emb.pt: a textual-inversion embedding (string_to_param), not a model"),
    ({"model": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, "epoch": 3},
     "emb.pt: no tensors at its top level (only under 'model': a wrapper, a hypernetwork or training state, not a "
     "model's weights; only 'state_dict' is looked into)"),
    ({"name": "nothing"}, "emb.pt: no tensors at its top level"),
])
def test_a_pickle_whose_tensors_are_nested_says_what_it_holds(tmp_path, content, message):
    """They read "contains no tensors", which the file plainly does."""
    torch.save(content, tmp_path / "emb.pt")
    with pytest.raises(CheckpointError) as error:
        read_state_dict(tmp_path / "emb.pt")
    assert str(error.value) == message


def test_a_file_of_the_other_format_than_its_suffix_is_told_what_to_rename(tmp_path) -> None:
    """The suffix decides how a file is read; a safetensors file named .ckpt failed as an invalid pickle
    ("it may be truncated, corrupt ..."), a torch.save file named .safetensors as an implausible header."""
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model.ckpt"))
    torch.save({"state_dict": {"a": torch.zeros(2)}}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"^model.ckpt: a safetensors file named .ckpt; rename it to "
                                              r"model.safetensors, the suffix that says how it is read$"):
        load_stable_diffusion(tmp_path / "model.ckpt")
    for read in (load_stable_diffusion, load_head, read_state_dict):
        with pytest.raises(CheckpointError, match=r"^model.safetensors: a pickle file named .safetensors; rename it "
                                                  r"to model.ckpt, the suffix that says how it is read$"):
            read(tmp_path / "model.safetensors")


@pytest.mark.skipif(os.name == "nt", reason="POSIX file names are bytes")
def test_a_safetensors_path_that_is_not_utf8_is_told_to_be_renamed(tmp_path) -> None:
    """The safetensors library opens UTF-8 paths only; its error read "it may be truncated, corrupt ..."."""
    path = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.safetensors"))
    save_file({"a": torch.zeros(2)}, str(tmp_path / "ok.safetensors"))
    os.rename(tmp_path / "ok.safetensors", path)
    for read in (load_stable_diffusion, load_head, read_state_dict):
        with pytest.raises(CheckpointError, match=r"'caf\\udce9.safetensors': its path is not valid UTF-8, which "
                                                  r"the safetensors library cannot open; rename it \(or its folder\)$"):
            read(path)
