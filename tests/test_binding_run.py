"""Issue #26 hypothesis 2: stage unet from a micro SD file, snapshots, the time budget, the binding
measures (world.binding) and tools/binding_run.py, on the smoke recipe."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ldznet_ext.checkpoint_io import read_metadata, read_state_dict
from ldznet_ext.cli import main
from ldznet_ext.data.examples import Example
from ldznet_ext.defaults import WEIGHTS_DIR
from ldznet_ext.errors import CheckpointError, LdznetError
from ldznet_ext.sd.checkpoint import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, save_stable_diffusion
from ldznet_ext.sd.model import StableDiffusion
from ldznet_ext.sd.text import TextEncoder
from ldznet_ext.sd.unet import UNetModel
from ldznet_ext.sd.vae import AutoencoderKL, VAEConfig
from ldznet_ext.world.binding import binding_auc, eps_gaps, pixel_auc, swapped_caption, word_distances
from ldznet_ext.world.micro import MICRO_UNET, micro_recipe, micro_text_config
from ldznet_ext.sd.tokenizer import tokenize
from ldznet_ext.world.scenes import VOCABULARY, caption, sample_scene
from ldznet_ext.world.spec import ObjectSpec
from ldznet_ext.world.train_sd import (LOG_FILE, SD_FILE, UNetOptions, eps_probe, load_micro_sd, snapshot_path,
                                       train_sd)

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("binding_run", ROOT / "tools" / "binding_run.py")
binding_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(binding_run)

SHIPPED = WEIGHTS_DIR / SD_FILE
SMOKE = replace(micro_recipe("smoke"), unet_steps=6)


def _run(out: Path, options: UNetOptions, recipe=SMOKE) -> dict:
    return train_sd(out, recipe, dtype="float32", workers=1, options=options)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory):
    """Stage unet from the shipped file's VAE, text tower and UNet, snapshots every 2 of 6 steps."""
    out = tmp_path_factory.mktemp("resumed")
    return out, _run(out, UNetOptions(SHIPPED, init_unet=True, snapshot_every=2))


def test_a_run_from_a_model_file_keeps_its_vae_and_text_tower(resumed):
    out, log = resumed
    shipped, trained = read_state_dict(SHIPPED), read_state_dict(out / SD_FILE)
    kept = [k for k in shipped if k.startswith((VAE_PREFIX, TEXT_PREFIX))]
    assert kept and all(torch.equal(shipped[k], trained[k]) for k in kept)
    unet = [k for k in shipped if k.startswith(UNET_PREFIX)]
    assert any(not torch.equal(shipped[k], trained[k]) for k in unet)
    assert log["init"] == {"model": str(SHIPPED), "unet": True, "text_tower": "keep"}
    assert list(log["stages"]) == ["unet"]


def test_init_unet_starts_from_the_files_unet(resumed, tmp_path):
    _, log = resumed
    fresh = _run(tmp_path, UNetOptions(SHIPPED))
    # the shipped UNet already denoises; a random one predicts noise no better than zeros (MSE ~1)
    assert log["stages"]["unet"]["log"][0]["loss"] < 0.5 < 0.8 < fresh["stages"]["unet"]["log"][0]["loss"]
    assert fresh["init"] == {"model": str(SHIPPED), "unet": False, "text_tower": "keep"}


@pytest.mark.parametrize("tower", ["train", "random"])
def test_text_tower_trained_with_the_unet_or_random_and_frozen(tmp_path, tower):
    log = _run(tmp_path, UNetOptions(SHIPPED, snapshot_every=3, text_tower=tower))
    assert log["init"]["text_tower"] == tower
    shipped, first, final = (read_state_dict(path) for path in (SHIPPED, snapshot_path(tmp_path, 3),
                                                                   tmp_path / SD_FILE))
    text = [k for k in final if k.startswith(TEXT_PREFIX)]
    vae = [k for k in final if k.startswith(VAE_PREFIX)]
    assert all(torch.equal(shipped[k], final[k]) for k in vae)  # the file's VAE, whatever the tower
    assert not any(torch.equal(shipped[k], final[k]) for k in text if k.endswith("token_embedding.weight"))
    # a frozen tower is the same at every snapshot; a trained one moves between them
    assert all(torch.equal(first[k], final[k]) for k in text) == (tower == "random")


def test_snapshots_every_k_steps_the_last_equal_to_the_final_file(resumed):
    out, log = resumed
    assert log["snapshots"] == [{"step": s, "file": f"snapshots/micro-sd-v1-step{s:06d}.safetensors"}
                                for s in (2, 4, 6)]
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == [snapshot_path(out, s).name for s in (2, 4, 6)]
    last, final = read_state_dict(snapshot_path(out, 6)), read_state_dict(out / SD_FILE)
    assert all(torch.equal(last[k], final[k]) for k in final)
    first = read_state_dict(snapshot_path(out, 2))
    assert any(not torch.equal(first[k], final[k]) for k in final if k.startswith(UNET_PREFIX))


def test_sd_files_record_the_recipes_image_size(resumed):
    out, _ = resumed
    for path in (out / SD_FILE, snapshot_path(out, 2)):
        assert read_metadata(path)["resolution"] == SMOKE.image_size  # zero-shot masks run at it


def test_time_budget_stops_the_unet_stage_and_still_writes_the_model(tmp_path):
    log = _run(tmp_path, UNetOptions(SHIPPED, snapshot_every=1, time_budget_s=0.0))
    unet = log["stages"]["unet"]
    assert unet["stopped_at_step"] == 1 and [e["step"] for e in unet["log"]] == [1]
    assert log["snapshots"] == [{"step": 1, "file": "snapshots/micro-sd-v1-step000001.safetensors"}]
    assert (tmp_path / SD_FILE).is_file() and set(log["probes"]["eps_mse"]) == {"100", "400", "700"}


def test_bad_starts_are_refused(tmp_path):
    with pytest.raises(LdznetError, match="an initial model starts stage unet alone; got stages"):
        train_sd(tmp_path, SMOKE, stages=["vae", "unet"], options=UNetOptions(SHIPPED))
    with pytest.raises(LdznetError, match="starting from a model's UNet needs the model file"):
        train_sd(tmp_path, SMOKE, options=UNetOptions(init_unet=True))
    with pytest.raises(LdznetError, match="text tower 'random' needs an initial model"):
        UNetOptions(text_tower="random")
    with pytest.raises(LdznetError, match="unknown text tower 'clip'; expected one of keep, train, random"):
        UNetOptions(SHIPPED, text_tower="clip")
    other = StableDiffusion(UNetModel(MICRO_UNET), AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2, 2))),
                            TextEncoder.from_config(micro_text_config()))
    save_stable_diffusion(other, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="other.safetensors: not a micro SD v1"):
        load_micro_sd(tmp_path / "other.safetensors")
    assert not (tmp_path / LOG_FILE).exists()


def test_cli_options_reach_the_unet_stage(tmp_path, capsys):
    args = ["world", "train-sd", "-o", str(tmp_path), "--recipe", "smoke", "--dtype", "float32", "--workers", "1",
            "--quiet", "--init-model", str(SHIPPED), "--unet-steps", "3", "--unet-batch", "4", "--snapshot-every", "3"]
    assert main(args) == 0
    log = json.loads((tmp_path / LOG_FILE).read_text(encoding="utf-8"))
    assert (log["recipe"]["unet_steps"], log["recipe"]["unet_batch"]) == (3, 4)
    assert [s["step"] for s in log["snapshots"]] == [3] and log["init"]["unet"] is False
    assert main(["world", "train-sd", "-o", str(tmp_path), "--init-unet"]) == 2
    assert "ldznet world train-sd: error: starting from a model's UNet needs the model file" in capsys.readouterr().err
    assert main(["world", "train-sd", "-o", str(tmp_path), "--text-tower", "train"]) == 2
    assert "ldznet world train-sd: error: text tower 'train' needs an initial model" in capsys.readouterr().err


@pytest.mark.parametrize("positive, negative, expected", [
    ([0.9, 0.8], [0.1, 0.2, 0.3], 1.0), ([0.1], [0.9, 0.8], 0.0), ([0.5, 0.5], [0.5], 0.5),
    ([1.0, 3.0], [2.0], 0.5), ([2.0, 3.0], [2.0, 1.0], 0.875)])
def test_pixel_auc_is_mann_whitney_with_half_ties(positive, negative, expected):
    assert pixel_auc(np.array(positive), np.array(negative)) == pytest.approx(expected, abs=1e-12)


class _MapSegmenter:
    """predict_terms answers each phrase's map from ``maps(example, phrase)``."""

    def __init__(self, maps):
        self.maps, self.example = maps, None

    def set_image(self, image):
        self.example = image

    def predict_terms(self, terms):
        return {t: torch.from_numpy(self.maps(self.example, t)) for t in terms}


def _scene_source() -> list[Example]:
    a, b, sky = (np.zeros((8, 8), bool) for _ in range(3))
    a[:3, :3], b[5:, 5:], sky[3:5] = True, True, True
    absent = np.zeros((8, 8), bool)
    image = np.zeros((8, 8, 3), np.uint8)
    return [Example("0", image, (("red star", a), ("blue moon", b), ("sky", sky), ("tree", absent)))]


def test_binding_auc_of_maps_equal_to_the_masks_is_one_and_of_swapped_maps_zero():
    source = _scene_source()
    masks = dict(source[0].pairs)
    exact = _MapSegmenter(lambda image, phrase: masks[phrase].astype(np.float32))
    assert binding_auc(exact, source) == 1.0
    others = {"red star": "blue moon", "blue moon": "red star", "sky": "red star"}
    swapped = _MapSegmenter(lambda image, phrase: masks[others[phrase]].astype(np.float32))
    # red star's map is blue moon's mask: 0 against the others' pixels, part of which it marks
    expected = [pixel_auc(np.zeros(9), np.r_[np.ones(9), np.zeros(16)]),
                pixel_auc(np.zeros(9), np.r_[np.ones(9), np.zeros(16)]),
                pixel_auc(np.zeros(16), np.r_[np.ones(9), np.zeros(9)])]
    assert binding_auc(swapped, source) == pytest.approx(np.mean(expected))
    assert np.mean(expected) == pytest.approx((0.32 + 0.32 + 0.25) / 3)


def test_eps_gaps_are_empty_minus_caption():
    gaps = eps_gaps({"400": {"caption": 0.05, "empty": 0.0625}})
    assert gaps == {"400": {"caption": 0.05, "empty": 0.0625, "gap": 0.0125, "relative_gap": 0.2}}


def test_word_gaps_are_the_swapped_caption_minus_the_true_one():
    gaps = eps_gaps({"400": {"caption": 0.05, "empty": 0.0625, "shape swapped": 0.0525, "colour swapped": 0.049}})
    assert gaps["400"]["shape_gap"] == 0.0025 and gaps["400"]["colour_gap"] == -0.001


def test_per_scene_probes_give_each_gap_the_standard_error_of_its_paired_differences():
    # shape swapped - caption per scene: 0.001, 0.003, 0.002, 0.006 -> mean 0.003, sd sqrt(14/3) e-3, se / 2
    gaps = eps_gaps({"400": {"caption": [0.05, 0.04, 0.06, 0.05], "empty": [0.06, 0.05, 0.07, 0.06],
                             "shape swapped": [0.051, 0.043, 0.062, 0.056]}})["400"]
    assert gaps["caption"] == 0.05 and gaps["empty"] == 0.06 and gaps["shape swapped"] == 0.053
    assert (gaps["gap"], gaps["gap_se"]) == (0.01, 0.0)  # the same difference in every scene
    assert gaps["shape_gap"] == 0.003 and gaps["shape_gap_se"] == round((14 / 3) ** 0.5 / 2 * 1e-3, 6)
    assert binding_run.word_gap_cell(gaps, "shape") == "0.003000 ± 0.001080"
    assert binding_run.word_gap_cell({"shape_gap": -0.00002}, "shape") == "-0.000020"  # a result without errors


def _object(shape: str, colour: str) -> ObjectSpec:
    return ObjectSpec(shape, colour, (0.5, 0.5), 0.2, 0.0, (0.0, 0.0, 0.0))


def test_swapped_captions_name_the_next_shape_or_colour_and_keep_the_groups():
    spec = replace(sample_scene(0, "cartoon"), ground="grass", regions=(),
                   objects=(_object("star", "red"), _object("star", "red"), _object("cross", "purple")))
    assert caption(spec) == "a cartoon of two red stars and a purple cross on grass"
    assert swapped_caption(spec, "shape") == "a cartoon of two red hearts and a purple circle on grass"
    assert swapped_caption(spec, "colour") == "a cartoon of two orange stars and a red cross on grass"
    with pytest.raises(ValueError, match="unknown word kind 'size'"):
        swapped_caption(spec, "size")


def test_word_distances_are_zero_for_words_the_tower_merges():
    model = load_micro_sd(SHIPPED)
    assert word_distances(model)["shape"] > 0
    with torch.no_grad():
        circles = model.encode_text([f"a cartoon of {'an' if c == 'orange' else 'a'} {c} circle on grass"
                                     for c in VOCABULARY.colours]).context
    circle_colour_distance = float(torch.pdist(circles.flatten(1)).mean())
    embeddings = model.text_encoder.transformer.get_input_embeddings().weight
    shape_tokens = [int(tokenize([shape])[0, 1]) for shape in VOCABULARY.shapes]
    with torch.no_grad():
        embeddings[shape_tokens] = embeddings[shape_tokens[0]].clone()  # every shape word now reads as "circle"
    assert word_distances(model) == {"shape": 0.0, "colour": pytest.approx(circle_colour_distance, abs=1e-4)}


def test_every_caption_set_of_the_eps_probe_sees_the_same_noise():
    model = load_micro_sd(SHIPPED)
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    captions = ["a photo of a red star on sand", "a cartoon of two blue circles on grass"]
    plain = eps_probe(model, latents, captions, timesteps=(400,))
    probe = eps_probe(model, latents, captions, timesteps=(400,),
                      variants={"same": captions, "empty again": ["", ""], "other": captions[::-1]})
    row = probe["400"]
    assert {k: row[k] for k in ("caption", "empty")} == plain["400"]
    assert row["same"] == row["caption"] and row["empty again"] == row["empty"] and row["other"] != row["caption"]
    scenes = eps_probe(model, latents, captions, timesteps=(400,), variants={"other": captions[::-1]},
                       per_sample=True)["400"]
    assert all(len(v) == 2 for v in scenes.values())
    assert scenes["other"][::-1] != scenes["other"]  # each scene its own error
    for name in ("caption", "empty", "other"):
        assert np.mean(scenes[name]) == pytest.approx(row[name], abs=2e-6)


@pytest.mark.parametrize("option, value, message", [
    ("--image-size", "100", "error: image_size must be a multiple of 64"),
    ("--unet-min-snr-gamma", "-1", "error: unet_min_snr_gamma"),
    ("--unet-min-snr-gamma", "nan", "error: unet_min_snr_gamma"),
    ("--text-tower", "clip", "argument --text-tower: invalid choice: 'clip'")])
def test_a_bad_recipe_value_is_refused_before_any_work(tmp_path, monkeypatch, capsys, option, value, message):
    monkeypatch.setattr(sys, "argv", ["binding_run.py", "-o", str(tmp_path / "out"), option, value])
    with pytest.raises(SystemExit) as exit:
        binding_run.main()
    assert exit.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_planned_steps_fit_the_time_left_in_multiples_of_the_snapshots():
    assert binding_run.planned_steps(100.0, 0.1, 8) == 896  # 0.9 x 1000 = 900, down to a multiple of 8
    assert binding_run.planned_steps(-5.0, 0.1, 4) == 4


def test_tool_writes_the_table_and_measures_the_final_model_after_the_budget(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["binding_run.py", "-o", str(out), "--work", str(tmp_path / "work"),
                                      "--recipe", "smoke", "--unet-steps", "8", "--snapshots", "4",
                                      "--eval-scenes", "1", "--device", "cpu", "--dtype", "float32",
                                      "--workers", "1", "--time-budget-s", "0", "--measure-reserve-s", "0",
                                      "--image-size", "128", "--unet-min-snr-gamma", "5"])
    binding_run.main()
    result = json.loads((out / "binding.json").read_text(encoding="utf-8"))
    assert result["train"]["stopped_at_step"] == 1 and result["plan"] == {"unet_steps": 8}
    assert result["recipe"]["unet_min_snr_gamma"] == 5.0
    assert result["recipe"]["image_size"] == 128 and load_micro_sd(out / SD_FILE).resolution == 128
    assert [r["model"] for r in result["rows"]] == ["final"] and result["unmeasured"] == ["reference"]
    row = result["rows"][0]
    assert row["steps"] == 1 and set(row["eps"]) == {"100", "400", "700"} and 0 <= row["binding_auc"] <= 1
    table = (out / "binding.md").read_text(encoding="utf-8")
    assert "| final | 1 | 16 |" in table and "Not measured within the time budget: reference" in table
    assert table == capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(["binding.json", "binding.md", LOG_FILE, SD_FILE])


def test_measure_reads_an_existing_run_and_adds_the_word_gaps(resumed, tmp_path, monkeypatch, capsys):
    run, log = resumed
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["binding_run.py", "-o", str(out), "--measure", str(run), "--eval-scenes", "1",
                                      "--device", "cpu"])
    binding_run.main()
    result = json.loads((out / "binding.json").read_text(encoding="utf-8"))
    assert [r["model"] for r in result["rows"]] == ["final", "reference", "step 2", "step 4"]
    assert result["rows"][1]["file"] == str(SHIPPED) and result["recipe"] == log["recipe"]
    for row in result["rows"]:
        assert set(row["eps"]["400"]) == {"caption", "empty", "shape swapped", "colour swapped", "gap", "gap_se",
                                          "relative_gap", "shape_gap", "shape_gap_se", "colour_gap",
                                          "colour_gap_se"}
        assert set(row["word_distances"]) == {"shape", "colour"}
    assert sorted(p.name for p in out.iterdir()) == ["binding.json", "binding.md"]
    assert "| shape gap t=400 | colour gap t=400 | word distance shape / colour |" in capsys.readouterr().out


@pytest.mark.parametrize("make, message", [
    (lambda run: None, "the run's train_sd_log.json not found: "),
    (lambda run: (run / LOG_FILE).write_text("{}") and (run / SD_FILE).write_bytes(b"x"),
     "train_sd_log.json is not the log of a finished train-sd run"),
    (lambda run: (run / LOG_FILE).write_text('{"recipe": {"name": "x", "colour": 1}, "stages": {"unet": {}}}')
     and (run / SD_FILE).write_bytes(b"x"), "holds a recipe this version cannot read"),
])
def test_measure_refuses_what_is_not_a_run_in_one_line(tmp_path, monkeypatch, capsys, make, message):
    run = tmp_path / "run"
    run.mkdir()
    make(run)
    monkeypatch.setattr(sys, "argv", ["binding_run.py", "-o", str(tmp_path / "out"), "--measure", str(run)])
    with pytest.raises(SystemExit) as exit:
        binding_run.main()
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
