"""Micro SD v1 training: scene sets, the latent rescaling, and the smoke recipe end to end via the CLI."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ldznet_ext.checkpoint_io import read_metadata, read_state_dict
from ldznet_ext.cli import main
from ldznet_ext.defaults import default_model_paths
from ldznet_ext.errors import CheckpointError, LdznetError
from ldznet_ext.sd.checkpoint import (TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, classify, load_stable_diffusion,
                                      save_stable_diffusion)
from ldznet_ext.sd.vae import SCALE_FACTOR, AutoencoderKL
from ldznet_ext.world import data as world_data
from ldznet_ext.world.data import SceneSet, render_scene_set
from ldznet_ext.sd.text import TextEncoder
from ldznet_ext.sd.tokenizer import tokenize
from ldznet_ext.world import train_sd as train_sd_module
from ldznet_ext.world.micro import MICRO_TEXT, MICRO_UNET, MICRO_VAE, build_micro_sd, micro_recipe, micro_text_config
from ldznet_ext.world.scenes import make_scene
from ldznet_ext.train.schedule import lr_factor
from ldznet_ext.world.train_sd import (GRID_FILE, LOG_FILE, SD_FILE, SNAPSHOT_DIR, TEXT_FILE, VAE_FILE, WORLD_VOCABULARY,
                                       UNetOptions, contrastive_loss, load_text_stage, pooled_text, rescale_latents_,
                                       train_sd, vae_losses)

SMOKE = micro_recipe("smoke")
TOKEN_EMBEDDING = "text_model.embeddings.token_embedding.weight"
SMOKE_ARGS = ["--recipe", "smoke", "--dtype", "float32", "--workers", "1", "--quiet"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory):
    """The smoke recipe trained once through the CLI (float32: the same numbers on every CPU)."""
    out = tmp_path_factory.mktemp("micro")
    assert main(["world", "train-sd", "-o", str(out), *SMOKE_ARGS]) == 0
    return out, json.loads((out / LOG_FILE).read_text(encoding="utf-8"))


def test_scene_set_matches_make_scene_and_round_trips(tmp_path):
    scenes = render_scene_set([5, 2_000_001, 8], size=32, workers=1)
    assert len(scenes) == 3 and scenes.images.shape == (3, 32, 32, 3) and scenes.labels.dtype == np.uint8
    for i, seed in enumerate((5, 2_000_001, 8)):
        scene = make_scene(seed, 32)
        np.testing.assert_array_equal(scenes.images[i], scene.image)
        assert scenes.captions[i] == scene.caption and list(scenes.phrases[i]) == list(scene.phrases)
        for phrase, mask in scene.phrases.items():
            np.testing.assert_array_equal(scenes.mask(i, phrase), mask)
    scenes.save(tmp_path / "set.npz")
    loaded = SceneSet.load(tmp_path / "set.npz")
    np.testing.assert_array_equal(loaded.images, scenes.images)
    np.testing.assert_array_equal(loaded.labels, scenes.labels)
    assert loaded.seeds.tolist() == [5, 2_000_001, 8] and loaded.size == 32
    assert loaded.captions == scenes.captions and loaded.phrases == scenes.phrases
    with pytest.raises(LdznetError, match="has no phrase 'pink moon'"):
        scenes.mask(0, "pink moon")


def test_scene_set_is_the_same_with_worker_processes():
    seeds = range(300, 560)  # three chunks
    one, two = render_scene_set(seeds, 16, workers=1), render_scene_set(seeds, 16, workers=2)
    np.testing.assert_array_equal(one.images, two.images)
    np.testing.assert_array_equal(one.labels, two.labels)
    assert one.captions == two.captions and one.phrases == two.phrases
    photos = render_scene_set([4, 7], 16, workers=1, domain="photo")
    np.testing.assert_array_equal(photos.images[0], make_scene(4, 16, "photo").image)
    assert [c.split()[1] for c in photos.captions] == ["photo", "photo"]


def test_render_workers_leave_ctrl_c_to_the_parent(monkeypatch):
    """Each worker starts by ignoring SIGINT (the pool's initializer), so Ctrl-C prints the parent's one
    line, not every worker's traceback. The pool here runs its initializer and tasks in this process."""
    started = []

    class InlinePool:
        def __init__(self, processes, initializer):
            started.append(processes)
            initializer()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def imap(self, function, tasks):
            return map(function, tasks)

    monkeypatch.setattr(world_data.multiprocessing, "get_context", lambda method: SimpleNamespace(Pool=InlinePool))
    previous = signal.getsignal(signal.SIGINT)
    try:
        render_scene_set(range(2 * world_data._CHUNK), 16, workers=2)
        assert started == [2] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_scenes_beyond_the_machines_memory_are_refused_before_rendering(monkeypatch, ldznet):
    """world:train:1000000 rendered into memory for 15 minutes, then the kernel ended it without a word."""
    monkeypatch.setattr(world_data, "physical_memory", lambda: 2**30)  # a 1 GiB machine
    assert len(render_scene_set(range(2), 16, workers=1)) == 2
    monkeypatch.setattr(world_data, "_render_chunk", lambda task: pytest.fail("rendered"))
    with pytest.raises(LdznetError) as error:
        render_scene_set(range(8193), 128, workers=1)
    assert str(error.value) == ("8,193 scenes at 128 px take about 1.0 GiB of memory to render (they are held in "
                                "memory), more than this machine's 1.0 GiB: use fewer scenes or a smaller size")
    code, out, _ = ldznet("data", "summary", "world:train:1000000")
    assert code == 1 and "INVALID: cannot open: 1,000,000 scenes at 128 px take about 122.1 GiB" in out


def test_a_saved_set_that_unpacks_beyond_the_machines_memory_is_refused(monkeypatch, tmp_path):
    """A 2 MB .npz of zeros declared 2.3 GB of scenes; np.load unpacked them before any check."""
    path = tmp_path / "scenes.npz"
    render_scene_set([3, 4], 16, workers=1).save(path)
    assert len(SceneSet.load(path)) == 2
    monkeypatch.setattr(world_data, "physical_memory", lambda: 1024)
    with pytest.raises(LdznetError, match=f"^{path}: its arrays take 0.0 GiB of memory unpacked, more than this "
                                          "machine's 0.0 GiB$"):
        SceneSet.load(path)


def test_latent_rescaling_keeps_reconstructions_and_gives_unit_std():
    torch.manual_seed(0)
    vae = AutoencoderKL(MICRO_VAE).eval().requires_grad_(False)
    images = torch.from_numpy(np.stack([make_scene(s, 64).image for s in range(6)]))
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    mean, logvar = vae.encode_moments(x)
    before = vae.decode(mean)
    std, a = rescale_latents_(vae, images)
    assert std == pytest.approx(float(mean.std()), rel=1e-5)  # fp32 sums in another order
    assert a == pytest.approx(1 / (SCALE_FACTOR * std), rel=1e-12) and not 0.5 < a < 2  # a real change
    mean2, logvar2 = vae.encode_moments(x)
    torch.testing.assert_close(mean2, a * mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logvar2, logvar + 2 * math.log(a), rtol=1e-5, atol=1e-4)
    assert float((mean2 * SCALE_FACTOR).std()) == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(vae.decode(mean2), before, rtol=1e-4, atol=1e-5)


def test_vae_losses_and_lr_schedule_are_exact():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.full_like(x, 0.5)
    mean, logvar = torch.ones(2, 4, 1, 1), torch.zeros(2, 4, 1, 1)  # KL per image: 0.5 * 4 * 1
    losses = vae_losses(x, y, mean, logvar, mse_weight=0.1, kl_weight=0.3)
    assert float(losses["l1"]) == 0.5 and float(losses["mse"]) == 0.25 and float(losses["kl"]) == 2.0
    assert float(losses["loss"]) == pytest.approx(0.5 + 0.025 + 0.3 * 2.0 / 48)
    factors = [lr_factor(s, 4, 14, "cosine", 0.1) for s in (0, 3, 4, 9, 14, 20)]
    assert factors == pytest.approx([0.25, 1.0, 1.0, 0.55, 0.1, 0.1])


def test_smoke_losses_fall_in_every_stage(smoke_run):
    _, log = smoke_run
    for stage, margin in (("vae", 0.05), ("text", 0.05), ("unet", 0.05)):
        entries = log["stages"][stage]["log"]
        assert [e["step"] for e in entries] == list(range(2, 9, 2))
        assert entries[-1]["loss"] < entries[0]["loss"] - margin, (stage, entries)
    assert log["recipe"] == SMOKE.to_dict()
    assert log["dtype"] == {"vae": "float32", "text": "float32", "unet": "float32"}
    assert log["platform"]["torch"] == torch.__version__
    assert set(log["platform"]) == {"torch", "cpu_capability", "numpy", "opencv", "pillow"}
    assert re.fullmatch(r"[0-9a-f]{64}", log["train_images_sha256"])
    vae = log["stages"]["vae"]
    assert vae["latent_rescale"] == pytest.approx(1 / (SCALE_FACTOR * vae["latent_std"]), rel=1e-5)
    probes = log["probes"]
    assert 5 < probes["vae_psnr"] < 60
    assert set(probes["eps_mse"]) == {"100", "400", "700"}
    assert all(0 < v < 2 for t in probes["eps_mse"].values() for v in (t["caption"], t["empty"]))


def test_smoke_output_is_a_micro_sd_v1_file(smoke_run):
    out, _ = smoke_run
    state = read_state_dict(out / SD_FILE)
    assert classify(state, read_metadata(out / SD_FILE)).problem is None
    assert {k for k in state if not k.startswith((UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX))} == {"alphas_cumprod"}
    for key in ("model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight",
                "first_stage_model.post_quant_conv.weight",
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"):
        assert state[key].dtype == torch.float16, key
    model = load_stable_diffusion(out / SD_FILE)
    assert model.unet.config == MICRO_UNET and model.vae.config == MICRO_VAE
    assert model.vocabulary == WORLD_VOCABULARY  # the world's words: "no match" for any other
    config = model.text_encoder.transformer.config
    assert {k: getattr(config, k) for k in MICRO_TEXT} == MICRO_TEXT
    assert (config.vocab_size, config.max_position_embeddings) == (49408, 77)
    grid = Image.open(out / GRID_FILE)
    assert grid.size == (8 * SMOKE.image_size, 2 * SMOKE.image_size) and grid.mode == "RGB"


def test_the_text_stage_tower_is_frozen_into_the_sd_file(smoke_run):
    out, _ = smoke_run
    stage, model = load_text_stage(out / TEXT_FILE), load_stable_diffusion(out / SD_FILE)
    fresh = TextEncoder.from_config(micro_text_config())
    for name, weight in stage.text_state_dict().items():
        assert torch.equal(weight.half(), model.text_encoder.text_state_dict()[name].half()), name
    assert not torch.equal(stage.text_state_dict()[TOKEN_EMBEDDING], fresh.text_state_dict()[TOKEN_EMBEDDING])


def test_unet_stage_reruns_alone_from_the_earlier_stages(smoke_run, tmp_path):
    out, log = smoke_run
    for name in (VAE_FILE, TEXT_FILE, LOG_FILE):
        shutil.copy(out / name, tmp_path / name)
    assert main(["world", "train-sd", "-o", str(tmp_path), "--stages", "unet", *SMOKE_ARGS]) == 0
    rerun = json.loads((tmp_path / LOG_FILE).read_text(encoding="utf-8"))
    assert rerun["stages"]["vae"] == log["stages"]["vae"] and rerun["stages"]["text"] == log["stages"]["text"]
    assert rerun["train_images_sha256"] == log["train_images_sha256"]  # the same scenes, rendered again
    losses = [[(e["step"], e["loss"]) for e in run["stages"]["unet"]["log"]] for run in (log, rerun)]
    assert losses[0] == losses[1]  # seeded: the same run
    first, again = read_state_dict(out / SD_FILE), read_state_dict(tmp_path / SD_FILE)
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_seed_option_changes_the_training_draws_only(smoke_run, tmp_path):
    out, log = smoke_run
    for name in (VAE_FILE, TEXT_FILE):
        shutil.copy(out / name, tmp_path / name)
    assert main(["world", "train-sd", "-o", str(tmp_path), "--stages", "unet", "--seed", "1", *SMOKE_ARGS]) == 0
    other = json.loads((tmp_path / LOG_FILE).read_text(encoding="utf-8"))
    assert other["recipe"] == {**log["recipe"], "seed": 1}
    assert other["probes"]["vae_psnr"] == log["probes"]["vae_psnr"]  # same scenes, same VAE
    first, second = ([e["loss"] for e in run["stages"]["unet"]["log"]] for run in (log, other))
    assert len(first) == len(second) and all(a != b for a, b in zip(first, second))


def test_image_size_option_trains_and_records_that_side(smoke_run, tmp_path):
    out, log = smoke_run
    for name in (VAE_FILE, TEXT_FILE):
        shutil.copy(out / name, tmp_path / name)
    assert main(["world", "train-sd", "-o", str(tmp_path), "--stages", "unet", "--image-size", "128",
                 *SMOKE_ARGS]) == 0
    other = json.loads((tmp_path / LOG_FILE).read_text(encoding="utf-8"))
    assert other["recipe"] == {**log["recipe"], "image_size": 128}
    assert other["train_images_sha256"] != log["train_images_sha256"]  # the same scenes, rendered at 128 px
    assert load_stable_diffusion(tmp_path / SD_FILE).resolution == 128
    assert load_stable_diffusion(out / SD_FILE).resolution == SMOKE.image_size == 64


def test_min_snr_weighting_changes_the_unet_loss_only_where_it_weighs(smoke_run, tmp_path):
    out, log = smoke_run
    losses = {}
    for gamma in ("5", "10000"):  # 10,000 is above SD's largest SNR (1,175 at t = 0): every weight 1
        run = tmp_path / gamma
        run.mkdir()
        for name in (VAE_FILE, TEXT_FILE):
            shutil.copy(out / name, run / name)
        assert main(["world", "train-sd", "-o", str(run), "--stages", "unet", "--unet-min-snr-gamma", gamma,
                     *SMOKE_ARGS]) == 0
        other = json.loads((run / LOG_FILE).read_text(encoding="utf-8"))
        assert other["recipe"] == {**log["recipe"], "unet_min_snr_gamma": float(gamma)}
        losses[gamma] = [e["loss"] for e in other["stages"]["unet"]["log"]]
    plain = [e["loss"] for e in log["stages"]["unet"]["log"]]
    assert losses["10000"] == pytest.approx(plain, rel=1e-5)
    assert all(w < p for w, p in zip(losses["5"], plain))  # weights <= 1, below 1 on the low-noise steps


@pytest.mark.parametrize("size, message", [
    ("96", "image_size must be a multiple of 64 and >= vae_crop (64), got 96"),
    ("32", "argument --image-size: expected an integer in [64, 1024], got 32"),
    ("1088", "argument --image-size: expected an integer in [64, 1024], got 1088")])
def test_bad_image_sizes_are_refused_before_any_work(tmp_path, capsys, size, message):
    args = ["world", "train-sd", "-o", str(tmp_path / "run"), "--image-size", size, *SMOKE_ARGS]
    try:
        code = main(args)
    except SystemExit as exit:  # argparse refuses the out-of-range ones
        code = exit.code
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_recipes_check_their_image_size():
    from dataclasses import replace
    assert replace(SMOKE, image_size=192).image_size == 192
    with pytest.raises(LdznetError, match="image_size must be an integer in \\[64, 1024\\], got 4096"):
        replace(SMOKE, image_size=4096)
    with pytest.raises(LdznetError, match="multiple of 64 and >= vae_crop \\(128\\), got 64"):
        replace(SMOKE, vae_crop=128)


def test_bad_stages_are_refused(tmp_path):
    with pytest.raises(LdznetError, match="unknown or no training stages"):
        train_sd(tmp_path, SMOKE, stages=["vae", "unet", "head"])
    with pytest.raises(LdznetError, match="recipe 'full' has vae, unet"):
        train_sd(tmp_path, micro_recipe("full"), stages=["text"])
    with pytest.raises(LdznetError, match=r"^stage vae given twice in \['vae', 'vae'\]; give each stage once$"):
        train_sd(tmp_path, SMOKE, stages=["vae", "vae"])
    with pytest.raises(CheckpointError, match="vae_stage.safetensors not found: run stage vae first"):
        train_sd(tmp_path, SMOKE, stages=["unet"])
    (tmp_path / VAE_FILE).touch()
    with pytest.raises(CheckpointError, match="text_stage.safetensors not found: run stage text first"):
        train_sd(tmp_path, SMOKE, stages=["unet"])


@pytest.mark.parametrize("option", [["--unet-steps", "5"], ["--unet-batch", "2"], ["--unet-min-snr-gamma", "5"],
                                    ["--snapshot-every", "5"], ["--time-budget-s", "60"]])
def test_stage_unet_options_without_stage_unet_are_refused(tmp_path, capsys, option):
    assert main(["world", "train-sd", "-o", str(tmp_path), "--stages", "vae", *option, *SMOKE_ARGS]) == 2
    assert capsys.readouterr().err == (f"ldznet world train-sd: error: {option[0]} sets stage unet, which --stages "
                                       "vae does not run; drop it or add unet to --stages\n")
    assert list(tmp_path.iterdir()) == []


def test_contrastive_loss_is_clips_symmetric_cross_entropy():
    image = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    text = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    log_scale = torch.tensor(math.log(2.0))
    # logits = 2 x cosines, images in rows, texts in columns: [[2, c], [0, c]] with c = 2 / sqrt2
    c = 2 / math.sqrt(2)
    per_image = [-math.log(math.exp(2) / (math.exp(2) + math.exp(c))), -math.log(math.exp(c) / (1 + math.exp(c)))]
    per_text = [-math.log(math.exp(2) / (math.exp(2) + 1)), -math.log(math.exp(c) / (2 * math.exp(c)))]
    expected = (sum(per_image) + sum(per_text)) / 4
    assert float(contrastive_loss(image, text, log_scale)) == pytest.approx(expected, rel=1e-6)


def test_pooled_text_is_the_state_at_the_end_token():
    torch.manual_seed(0)
    text = TextEncoder.from_config(micro_text_config()).eval()
    tokens = tokenize(["a red star", "two blue circles on grass under the sky"])
    with torch.no_grad():
        full = text(tokens)
        pooled = pooled_text(text, tokens)
    eot = [4, 9]  # <start>, one token per word, <end>
    assert tokens.argmax(-1).tolist() == eot
    assert torch.allclose(pooled, full[torch.arange(2), torch.tensor(eot)], atol=1e-5)


@pytest.mark.parametrize("where", [SD_FILE, f"snapshots/{SD_FILE}"])
def test_a_run_never_writes_over_the_model_it_starts_from(tmp_path, where):
    model = tmp_path / where
    model.parent.mkdir(exist_ok=True)
    shutil.copyfile(default_model_paths()[0], model)
    before = model.read_bytes()
    with pytest.raises(LdznetError, match=r"the model the run starts from \(the initial model\)"):
        train_sd(tmp_path, SMOKE, options=UNetOptions(init_model=model, init_unet=True))
    assert model.read_bytes() == before and sorted(p.name for p in model.parent.iterdir()) == [SD_FILE]


@pytest.mark.parametrize("text, reason", [
    ("{nope", "cannot read a training log; move it away or give another output folder (JSONDecodeError: Expecting property name"),
    ("[1, 2]", "not a training log of `ldznet world train-sd` (no recipe and stages); move it away or give another "
               "output folder"),
    ('{"recipe": {}, "stages": [1]}', "not a training log of `ldznet world train-sd` (no recipe and stages)")])
def test_a_log_that_is_no_training_log_is_refused_and_kept(tmp_path, text, reason):
    (tmp_path / LOG_FILE).write_text(text)
    with pytest.raises(LdznetError) as error:
        train_sd(tmp_path, SMOKE)
    assert str(error.value).startswith(f"{tmp_path / LOG_FILE}: {reason}")
    assert (tmp_path / LOG_FILE).read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == [LOG_FILE]


@pytest.mark.parametrize("files", [{SD_FILE: b"the user's model"}, {GRID_FILE: b"a picture"},
                                   {SD_FILE: b"the user's model", LOG_FILE: b'{"my": "log"}'},
                                   {f"{SNAPSHOT_DIR}/mine.safetensors": b"kept"}])
def test_a_folder_of_files_no_run_wrote_is_refused_and_kept(tmp_path, files):
    """Only a folder an earlier run wrote (its train_sd_log.json says so) has its files replaced."""
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(content)
    with pytest.raises(LdznetError) as error:
        train_sd(tmp_path, SMOKE)
    first = sorted(files)[0]
    if LOG_FILE in files:
        assert str(error.value) == (f"{tmp_path / LOG_FILE}: not a training log of `ldznet world train-sd` (no recipe "
                                    "and stages); move it away or give another output folder")
    else:
        assert str(error.value) == (f"{tmp_path}: holds {first}, which no earlier `ldznet world train-sd` run wrote "
                                    f"(there is no {LOG_FILE}); give another output folder or move it away")
    assert all((tmp_path / name).read_bytes() == content for name, content in files.items())


def test_snapshots_that_would_not_fit_on_the_disk_are_refused_before_rendering(tmp_path, capsys, monkeypatch):
    """--snapshot-every 1 over 2,000 steps writes 28 GB, one 14 MB micro SD a step: the run filled the disk
    hours in. The snapshots' size is compared with the free space before any scene is rendered."""
    one = train_sd_module.snapshot_bytes()
    save_stable_diffusion(build_micro_sd(), tmp_path / "snapshot.safetensors", dtype=torch.float16)
    assert one <= (tmp_path / "snapshot.safetensors").stat().st_size <= 1.02 * one
    free = 3 * one + 1  # room for three snapshots

    def render(*args, **kwargs):
        raise RuntimeError("rendering")

    monkeypatch.setattr(train_sd_module.shutil, "disk_usage", lambda path: SimpleNamespace(free=free))
    monkeypatch.setattr(train_sd_module, "render_scene_set", render)
    out = tmp_path / "run"
    args = ["world", "train-sd", "-o", str(out), "--unet-steps", "8", *SMOKE_ARGS]
    assert main([*args, "--snapshot-every", "2"]) == 2  # four snapshots
    assert capsys.readouterr().err == (
        f"ldznet world train-sd: error: snapshots every 2 steps: 4 files of {one / 1e6:.1f} MB, "
        f"{4 * one / 1e9:.2f} GB in all, and {out} has {free / 1e9:.2f} GB free; snapshot less often\n")
    assert not out.exists()
    with pytest.raises(RuntimeError, match="rendering"):  # two fit: the run goes on to render
        main([*args, "--snapshot-every", "3"])
