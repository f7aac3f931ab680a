"""Head training on a tiny random SD: data sources, loss falls per architecture, exact resume, saved
heads that the segmenter runs, and the `ldznet train` command."""

from __future__ import annotations

import csv
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldznet_ext.checkpoint_io import read_metadata
from ldznet_ext.cli import main
from ldznet_ext.errors import CheckpointError, LdznetError
from ldznet_ext.heads import load_head
from ldznet_ext.sd.checkpoint import build_stable_diffusion
from ldznet_ext.modeling.znet import upsampling_decoder
from ldznet_ext.segmenter import Segmenter
from ldznet_ext.data.examples import Sample
from ldznet_ext.data.manifest import ManifestSource
from ldznet_ext.data.spec import open_source
from ldznet_ext.train.augment import PHRASECUT_TEMPLATES, fit_square
from ldznet_ext.train.schedule import lr_factor
import ldznet_ext.train.trainer as trainer_module
from ldznet_ext.train.trainer import (CHECKPOINT, HEAD, LOG, TrainConfig, Trainer, identity_decoder_,
                                     is_cross_attention, is_new_layer, soft_dice_loss)
from ldznet_ext.world.data import render_scene_set

SIZE = 64


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def sd_file(tiny_model_files):
    return tiny_model_files[0]


@pytest.fixture(scope="module")
def backbone(tiny_sd):
    """The tiny SD (f = 8 VAE, UNet with its zero-initialised layers perturbed), 64 px -> 8 x 8 latents."""
    return tiny_sd


def _config(**changes) -> TrainConfig:
    base = dict(data="world:train:4", resolution=SIZE, steps=20, batch_size=2, lr=1e-3, warmup=0, save_every=1000,
                log_every=5)
    return TrainConfig(**{**base, **changes})


def test_world_source_examples_and_spec_errors():
    source = open_source("world:train:3", size=SIZE)
    assert len(source) == 3 and source.description == "world:train:3"
    example = source[1]
    assert example.key == f"world:1:photo:{SIZE}" and example.image.shape == (SIZE, SIZE, 3)
    samples = example.samples()
    present = example.samples(include_absent=False)
    assert 0 < len(present) < len(samples)  # every scene has 1-2 absent phrases
    absent = [s for s in samples if not s.present]
    assert len(present) + len(absent) == len(samples) and all(s.present for s in present)
    cartoon = open_source("world:test:2", size=SIZE, domain="cartoon")[1]
    assert cartoon.key == f"world:1000001:cartoon:{SIZE}" and cartoon.key != open_source("world:test:2")[1].key
    for bad in ("world:train:x", "world:train", "world:nosplit:3", "nothing:1", "world"):
        with pytest.raises(LdznetError):
            open_source(bad)


def test_saved_scene_set_source(tmp_path):
    render_scene_set(range(2), SIZE, workers=1).save(tmp_path / "two.npz")
    source = open_source(f"world:{tmp_path / 'two.npz'}")
    rendered = open_source("world:train:2", size=SIZE)
    assert len(source) == 2 and source[1].key == rendered[1].key
    assert np.array_equal(source[1].image, rendered[1].image)
    assert [p for p, _ in source[1].pairs] == [p for p, _ in rendered[1].pairs]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(source[1].pairs, rendered[1].pairs))


def test_a_saved_scene_set_that_does_not_fit_is_refused_in_one_line(tmp_path):
    """Meta that is a list, lacks phrases or has too few, and arrays of other shapes were AttributeError, KeyError or
    IndexError tracebacks (or trained on wrong masks); a file that is not a zip got numpy's advice to allow pickles."""
    scenes = render_scene_set(range(2), 16, workers=1)
    good = {"format": 1, "size": 16, "captions": list(scenes.captions),
            "phrases": [{p: list(ids) for p, ids in ph.items()} for ph in scenes.phrases]}
    arrays = {"seeds": scenes.seeds, "images": scenes.images, "labels": scenes.labels}
    cases = [([1, 2], {}), ({**good, "phrases": good["phrases"][:1]}, {}), ({**good, "phrases": 5}, {}),
             ({k: v for k, v in good.items() if k != "phrases"}, {}), ({**good, "size": "x"}, {}),
             (good, {"labels": scenes.labels[:, :8, :8]}), (good, {"seeds": scenes.seeds[:1]}),
             (good, {"images": scenes.images.astype(np.float64)})]
    for number, (meta, changed) in enumerate(cases):
        np.savez(tmp_path / f"{number}.npz", meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
                 **{**arrays, **changed})
        with pytest.raises(LdznetError, match=f"{number}.npz: (not a scene set written by SceneSet.save|scene set "
                                              "format None)"):
            open_source(f"world:{tmp_path / f'{number}.npz'}")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(LdznetError, match=r"text.npz: not a scene set written by SceneSet.save \(not an .npz archive\)$"):
        open_source(f"world:{tmp_path / 'text.npz'}")
    with pytest.raises(LdznetError, match=r"gone.npz: no such scene set file$"):  # not "not an .npz archive"
        open_source(f"world:{tmp_path / 'gone.npz'}")
    with pytest.raises(LdznetError, match=r"folder.npz: not a file$"):
        open_source(f"world:{(tmp_path / 'folder.npz').mkdir() or tmp_path / 'folder.npz'}")


def test_manifest_source_groups_rows_by_image(tmp_path):
    image = np.zeros((6, 8, 3), np.uint8)
    image[:, :4] = 255
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray((image[..., 0] > 0).astype(np.uint8) * 255).save(tmp_path / "a_left.png")
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "a_none.png")
    rows = [{"image": "a.png", "phrase": "left", "mask": "a_left.png"},
            {"image": "a.png", "phrase": "nothing", "mask": "a_none.png"}]
    manifest = tmp_path / "set.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    source = open_source(str(manifest))
    assert isinstance(source, ManifestSource) and len(source) == 1
    (left, mask), (nothing, empty) = source[0].pairs
    assert (left, nothing) == ("left", "nothing")
    assert mask.sum() == 24 and mask[:, :4].all() and not empty.any()
    manifest.write_text('{"image": "a.png"}\n')
    with pytest.raises(LdznetError, match="set.jsonl:1"):
        ManifestSource(manifest)


def test_fit_square_crops_where_the_mask_is():
    image = np.zeros((10, 40, 3), np.uint8)
    mask = np.zeros((10, 40), bool)
    mask[2:8, 33:38] = True  # 30 px = 7.5 % of the image, only inside crops starting at x >= 28
    square = fit_square(Sample(image, "thing", mask, "k"), 20, np.random.default_rng(0))
    assert square.image.shape == (20, 20, 3) and square.mask.shape == (20, 20) and square.key is None
    assert square.mask.sum() == 4 * 30  # the whole object, scaled 2x by nearest neighbour
    same = Sample(np.zeros((20, 20, 3), np.uint8), "x", np.zeros((20, 20), bool), "k")
    assert fit_square(same, 20, np.random.default_rng(0)) is same


def test_schedule_and_parameter_groups():
    assert [lr_factor(s, 4, 10, "constant") for s in (0, 3, 9)] == [0.25, 1.0, 1.0]
    assert lr_factor(4, 4, 10, "cosine") == 1.0 and lr_factor(7, 4, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(8, 4, 10, "cosine") == pytest.approx(0.25)
    assert is_new_layer("final.0.weight") and is_new_layer("out.2.bias") and is_new_layer("stem.0.weight")
    assert is_new_layer("input_blocks.7.1.transformer_blocks.0.attn3.to_q.weight")
    assert is_new_layer("output_blocks.3.1.attentionpool2D.positional_embedding")
    assert not is_new_layer("input_blocks.7.1.transformer_blocks.0.attn2.to_q.weight")
    assert not is_new_layer("middle_block.0.out_layers.3.weight")
    assert is_cross_attention("input_blocks.7.1.transformer_blocks.0.attn2.to_k.weight")
    assert not is_cross_attention("input_blocks.7.1.transformer_blocks.0.attn3.to_k.weight")


def test_fast_cross_attention_moves_attn2_to_the_fast_group(backbone, tmp_path):
    def fast_names(**changes):
        trainer = Trainer(backbone, open_source("world:train:2", size=SIZE), _config(**changes), tmp_path)
        fast = {id(p) for p in trainer.optimizer.param_groups[1]["params"]}
        return {n for n, p in trainer.head.named_parameters() if id(p) in fast}

    slow_run, fast_run = fast_names(), fast_names(fast_cross_attention=True)
    moved = fast_run - slow_run
    assert slow_run <= fast_run and moved
    assert all(".attn2." in name for name in moved)
    assert {n for n in fast_run if ".attn2." in n} == moved


def test_draw_prompts_and_negatives(backbone, tmp_path):
    source = open_source("world:train:4", size=SIZE)
    batch = Trainer(backbone, source, _config(arch="znet", batch_size=16), tmp_path).draw()
    assert all(prompt == s.phrase for s, prompt in batch)  # the phrase as is, as the Segmenter's default
    assert 0 < sum(not s.present for s, _ in batch) < 16  # absent phrases (empty masks) are drawn too
    assert all(s.key.startswith("world:") and s.image.shape == (SIZE, SIZE, 3) for s, _ in batch)
    positive = Trainer(backbone, source, _config(arch="znet", batch_size=16, templates="phrasecut", negatives=False),
                       tmp_path).draw()
    assert all(s.present for s, _ in positive)
    assert all(prompt in {t.format(s.phrase) for t in PHRASECUT_TEMPLATES} for s, prompt in positive)
    assert len({prompt.replace(s.phrase, "{}") for s, prompt in positive}) > 4


@pytest.mark.parametrize("arch", ["ldznet", "znet", "rgbnet"])
def test_loss_falls(backbone, tmp_path, arch):
    # One scene, six phrases ("sand" covers 74 % of it, "water" nothing): batches of 8 see them all.
    # Seed 1: seed 0's draws hold "sand" 18 times in 160 (27 expected), and the loss falls only 3-4 %.
    source = open_source("world:train:1", size=SIZE)
    trainer = Trainer(backbone, source, _config(arch=arch, batch_size=8, lr=1e-4, seed=1), tmp_path)
    every = [(s, s.phrase) for s in source[0].samples()]
    before = trainer.loss(every, torch.Generator().manual_seed(0)).item()
    losses = [trainer.train_step() for _ in range(20)]
    after = trainer.loss(every, torch.Generator().manual_seed(0)).item()
    assert np.isfinite(losses).all()
    assert after < 0.95 * before, (before, after)  # measured: 0.92


def test_soft_dice_loss_is_per_sample_and_defined_on_empty_masks():
    logits = torch.zeros(2, 1, 2, 2)  # p = 0.5 everywhere
    target = torch.zeros(2, 1, 2, 2)
    target[0, 0, 0, 0] = 1.0  # sample 0: one mask pixel; sample 1: empty
    # sample 0: 1 - (2 * 0.5 + 1) / (2 + 1 + 1) = 0.5; sample 1: 1 - 1 / (2 + 0 + 1) = 2 / 3
    assert soft_dice_loss(logits, target).item() == pytest.approx((0.5 + 2 / 3) / 2)
    confident = torch.where(target > 0, 30.0, -30.0)
    assert soft_dice_loss(confident, target).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_weight_adds_the_dice_of_the_same_logits(backbone, tmp_path):
    source = open_source("world:train:1", size=SIZE)
    batch = [(s, s.phrase) for s in source[0].samples()]
    bce = Trainer(backbone, source, _config(arch="znet"), tmp_path / "bce")
    both = Trainer(backbone, source, _config(arch="znet", dice_weight=0.5), tmp_path / "both")
    inputs = torch.cat([bce._latent(s) for s, _ in batch])
    context = torch.cat([bce._text(p).context for _, p in batch])
    target = torch.from_numpy(np.stack([s.mask for s, _ in batch])).float()[:, None]
    with torch.no_grad():
        dice = soft_dice_loss(bce.model(inputs, context).float(), target).item()
        plain, total = (t.loss(batch, torch.Generator()).item() for t in (bce, both))
    assert 0.1 < dice < 1.0
    assert total == pytest.approx(plain + 0.5 * dice, rel=1e-5)


def test_official_decoder_init_learns_slowly(backbone, tmp_path):
    """Why decoder_init="identity": torch's default init of the one-channel decoder has a gain of
    ~1e-4, so in the same 20 steps the loss falls several times less (only the last bias learns)."""
    source = open_source("world:train:1", size=SIZE)
    trainer = Trainer(backbone, source, _config(arch="znet", batch_size=8, lr=1e-4, decoder_init="default"), tmp_path)
    every = [(s, s.phrase) for s in source[0].samples()]
    before = trainer.loss(every, torch.Generator().manual_seed(0)).item()
    for _ in range(20):
        trainer.train_step()
    assert trainer.loss(every, torch.Generator().manual_seed(0)).item() > 0.97 * before  # measured: 0.985


def test_identity_decoder_is_nearest_upsampling_at_the_prior():
    decoder = upsampling_decoder(1).requires_grad_(False)
    identity_decoder_(decoder, prior=0.25)
    z = torch.zeros(1, 1, 2, 3)
    assert torch.allclose(torch.sigmoid(decoder(z)), torch.full((1, 1, 16, 24), 0.25), atol=1e-6)
    z[0, 0, 1, 2] = 0.5
    change = decoder(z) - decoder(torch.zeros_like(z))
    assert change[0, 0, :8].abs().max() == 0 and change[0, 0, 8:, :16].abs().max() == 0
    assert torch.allclose(change[0, 0, 8:, 16:], torch.full((8, 8), float(change[0, 0, 8, 16])))
    assert 0.5 < float(change[0, 0, 8, 16]) < 0.75  # gain ~1.28: the SiLUs work near their linear part


def _weights(path):
    head, _ = load_head(path)
    return head.state_dict()


def test_resume_gives_the_uninterrupted_result(backbone, tmp_path):
    source = open_source("world:train:4", size=SIZE)
    config = _config(arch="ldznet", steps=6, warmup=2, log_every=2)
    straight = Trainer(backbone, source, config, tmp_path / "straight")
    straight.run(progress=False)
    Trainer(backbone, source, _config(arch="ldznet", steps=3, warmup=2, log_every=2), tmp_path / "cut").run(
        progress=False)
    resumed = Trainer(backbone, source, config, tmp_path / "cut")
    resumed.resume()
    assert resumed.step == 3
    resumed.run(progress=False)
    a, b = _weights(tmp_path / "straight" / HEAD), _weights(tmp_path / "cut" / HEAD)
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)
    assert state["step"] == 6 and set(state) >= {"model", "ema", "optimizer", "scheduler", "rng"}
    assert all(torch.equal(state["model"][k], v) for k, v in straight.head.state_dict().items())
    log = list(csv.DictReader((tmp_path / "cut" / LOG).read_text().splitlines()))
    assert [int(r["step"]) for r in log] == [2, 4, 6]
    other = Trainer(backbone, source, _config(arch="ldznet", steps=6, seed=1), tmp_path / "cut")
    with pytest.raises(LdznetError, match="seed: 0 -> 1"):
        other.resume()


def test_resuming_a_finished_run_writes_its_head_again(backbone, tmp_path):
    """docs/training.md: a resume writes the head again, also of a run that has no step left (its head
    deleted, or replaced by a link to another file, which stays as it is)."""
    source = open_source("world:train:4", size=SIZE)
    config = _config(arch="ldznet", steps=2, warmup=1, log_every=2)
    Trainer(backbone, source, config, tmp_path / "run").run(progress=False)
    written = _weights(tmp_path / "run" / HEAD)
    (tmp_path / "run" / HEAD).unlink()
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"another file")
    for _ in range(2):  # missing, then a link to another file
        resumed = Trainer(backbone, source, config, tmp_path / "run")
        resumed.resume()
        resumed.run(progress=False)
        again = _weights(tmp_path / "run" / HEAD)
        assert all(torch.equal(written[k], again[k]) for k in written)
        (tmp_path / "run" / HEAD).unlink()
        (tmp_path / "run" / HEAD).symlink_to(other)
    assert other.read_bytes() == b"another file"


def test_ctrl_c_while_writing_last_pt_keeps_the_previous_one_and_no_temporary(backbone, tmp_path, monkeypatch):
    source = open_source("world:train:4", size=SIZE)
    Trainer(backbone, source, _config(arch="ldznet", steps=2, warmup=1, log_every=2), tmp_path / "run").run(
        progress=False)
    before = (tmp_path / "run" / CHECKPOINT).read_bytes()
    save = torch.save

    def interrupted_save(state, path):
        save(state, path)
        Path(path).write_bytes(Path(path).read_bytes()[:100])  # half written when the key is pressed
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    resumed = Trainer(backbone, source, _config(arch="ldznet", steps=4, warmup=1, log_every=2), tmp_path / "run")
    resumed.resume()
    with pytest.raises(KeyboardInterrupt):
        resumed.run(progress=False)
    assert (tmp_path / "run" / CHECKPOINT).read_bytes() == before
    assert sorted(f.name for f in (tmp_path / "run").iterdir() if f.name.startswith(".")) == []


def test_a_run_removes_the_temporaries_a_killed_run_left(backbone, tmp_path, dead_pid):
    run = tmp_path / "run"
    run.mkdir()
    left = [f".{name}.{dead_pid}-0123abcd.ldznet-tmp" for name in (CHECKPOINT, HEAD, LOG)]
    live = f".{HEAD}.{os.getppid()}-4567cdef.ldznet-tmp"  # a process writing it now (our parent): not ours to remove
    for name in [*left, live, f".other.{dead_pid}-89abcdef.ldznet-tmp"]:
        (run / name).write_bytes(b"half")
    Trainer(backbone, open_source("world:train:4", size=SIZE), _config(arch="znet", steps=1, log_every=1), run).run(
        progress=False)
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [live, f".other.{dead_pid}-89abcdef.ldznet-tmp", CHECKPOINT, HEAD, LOG])


def test_ctrl_c_while_writing_the_final_head_is_resumed_to_it(backbone, tmp_path, monkeypatch):
    """The head is written before last.pt: a run stopped while writing its final head keeps the previous
    last.pt, so --resume trains the last steps again and writes the final head (last.pt was written first,
    and a resume of a run "at its last step" left the older head as the final one)."""
    source = open_source("world:train:4", size=SIZE)
    config = _config(arch="znet", steps=4, warmup=1, save_every=2, log_every=2)
    Trainer(backbone, source, config, tmp_path / "straight").run(progress=False)
    real_save_head, heads = trainer_module.save_head, []

    def interrupted(head, head_config, path, training):
        if training["steps"] == 4:
            raise KeyboardInterrupt
        heads.append(training["steps"])
        return real_save_head(head, head_config, path, training=training)

    monkeypatch.setattr(trainer_module, "save_head", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Trainer(backbone, source, config, tmp_path / "cut").run(progress=False)
    assert heads == [2] and torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)["step"] == 2
    monkeypatch.setattr(trainer_module, "save_head", real_save_head)
    resumed = Trainer(backbone, source, config, tmp_path / "cut")
    resumed.resume()
    resumed.run(progress=False)
    a, b = _weights(tmp_path / "straight" / HEAD), _weights(tmp_path / "cut" / HEAD)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_model_another_domain_or_fewer_steps(backbone, tmp_path):
    source = open_source("world:train:4", size=SIZE)
    config = _config(arch="znet", steps=2, warmup=1)
    Trainer(backbone, source, config, tmp_path / "run", model_name="a.safetensors").run(progress=False)
    other = Trainer(backbone, source, config, tmp_path / "run", model_name="b.safetensors")
    with pytest.raises(LdznetError, match=r"the run was started with other settings \(sd_model: 'a.safetensors' -> "
                                          r"'b.safetensors'\)"):
        other.resume()
    cartoons = open_source("world:train:4", size=SIZE, domain="cartoon")
    with pytest.raises(LdznetError, match=r"source: 'world:train:4' -> 'world:train:4 \(cartoon\)'"):
        Trainer(backbone, cartoons, config, tmp_path / "run", model_name="a.safetensors").resume()
    fewer = Trainer(backbone, source, _config(arch="znet", steps=1, warmup=1), tmp_path / "run",
                    model_name="a.safetensors")
    with pytest.raises(LdznetError, match=r"the run is at step 2, past --steps 1; give --steps 2 or more$"):
        fewer.resume()


def test_a_resumed_run_logs_each_step_once(backbone, tmp_path, monkeypatch):
    """Rows logged after the last checkpoint of an interrupted run are logged again by the resumed run."""
    source = open_source("world:train:4", size=SIZE)
    config = _config(arch="znet", steps=6, warmup=1, save_every=2, log_every=1)
    real_train_step = Trainer.train_step

    def stopped_at_step_4(self):
        if self.step == 3:  # step 3 logged, step 4 begun: the last checkpoint is step 2's
            raise KeyboardInterrupt
        return real_train_step(self)

    monkeypatch.setattr(Trainer, "train_step", stopped_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        Trainer(backbone, source, config, tmp_path / "run").run(progress=False)
    assert [int(r["step"]) for r in csv.DictReader((tmp_path / "run" / LOG).read_text().splitlines())] == [1, 2, 3]
    monkeypatch.setattr(Trainer, "train_step", real_train_step)
    resumed = Trainer(backbone, source, config, tmp_path / "run")
    resumed.resume()
    resumed.run(progress=False)
    assert [int(r["step"]) for r in csv.DictReader((tmp_path / "run" / LOG).read_text().splitlines())] == [
        1, 2, 3, 4, 5, 6]


def test_resume_with_a_folder_for_last_pt_says_so(tmp_path, capsys):
    (tmp_path / "run" / CHECKPOINT).mkdir(parents=True)
    assert main(["train", "--model", "unused.safetensors", "-o", str(tmp_path / "run"), "--resume"]) == 2
    assert capsys.readouterr().err == f"ldznet train: error: --resume: {tmp_path / 'run' / CHECKPOINT} is not a file\n"


def test_an_init_run_without_its_head_file_says_what_to_put_back(backbone, tmp_path):
    source = open_source("world:train:4", size=SIZE)
    Trainer(backbone, source, _config(arch="znet", steps=1), tmp_path / "first").run(progress=False)
    config = _config(arch="znet", steps=1, init=str(tmp_path / "first" / HEAD))
    Trainer(backbone, source, config, tmp_path / "run").run(progress=False)
    (tmp_path / "run" / HEAD).rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(LdznetError) as error:
        Trainer(backbone, source, config, tmp_path / "run", resuming=True)
    assert str(error.value) == (f"{tmp_path / 'run' / HEAD} is missing: a run started from --init reads its head's "
                                "shape from it to resume; put the run's head.safetensors back")


def test_a_truncated_foreign_or_tampered_last_pt_is_refused_in_one_line(backbone, tmp_path, capsys):
    """last.pt is read with weights_only (a pickle that would run code is refused, not run); a truncated, empty,
    foreign or tampered one was a RuntimeError, EOFError, KeyError or TypeError traceback."""
    source = open_source("world:train:2", size=SIZE)
    config = _config(arch="znet", steps=1)
    Trainer(backbone, source, config, tmp_path / "run").run(progress=False)
    data = (tmp_path / "run" / CHECKPOINT).read_bytes()

    class Exploit:
        def __reduce__(self):
            return (open, (str(tmp_path / "executed"), "w"))

    files = {"truncated": data[: len(data) // 2], "empty": b"", "pickle": pickle.dumps({"config": Exploit()}),
             "list": None, "noconfig": None}
    for name, content in files.items():
        (tmp_path / name).mkdir()
        if content is None:
            torch.save([1, 2] if name == "list" else {"model": {}}, tmp_path / name / CHECKPOINT)
        else:
            (tmp_path / name / CHECKPOINT).write_bytes(content)
        assert main(["train", "--model", "unused.safetensors", "-o", str(tmp_path / name), "--resume"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ldznet train: error: {tmp_path / name / CHECKPOINT}: ") and err.count("\n") == 1
        assert ("cannot resume from it" in err) or ("not a last.pt written by ldznet train" in err)
        if name == "empty":
            assert err.endswith(f"{CHECKPOINT}: cannot resume from it: the file is empty\n")
    assert not (tmp_path / "executed").exists()
    state = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    for key, value in (("model", {"x": torch.zeros(1)}), ("rng", {"torch": ["x"]}), ("step", "abc"), ("ema", None),
                       ("data", 5)):
        torch.save({**state, key: value}, tmp_path / "run" / CHECKPOINT)
        with pytest.raises(CheckpointError, match="cannot resume from it, its state does not fit this run"):
            Trainer(backbone, source, config, tmp_path / "run").resume()


def test_train_never_writes_over_a_folder_s_files_without_resume(tmp_path, capsys):
    """A fresh run into a folder holding a run's files appended to a user's log.csv, replaced another run's
    last.pt and head, and overwrote the --init head when it was RUN/head.safetensors."""
    for name, content in ((LOG, "my notes\n"), (HEAD, "my head"), (CHECKPOINT, "an earlier run")):
        run = tmp_path / name.replace(".", "_")
        run.mkdir()
        (run / name).write_text(content)
        (run / "notes.txt").write_text("mine")
        init = ["--init", str(run / HEAD)] if name == HEAD else []
        assert main(["train", "--arch", "znet", "--model", "unused.safetensors", "-o", str(run), *init]) == 2
        reason = (": continue that run with --resume, or give a new folder" if name == CHECKPOINT else
                  f" but no {CHECKPOINT} to resume from; remove them or give a new folder")
        assert capsys.readouterr().err == f"ldznet train: error: {run} already holds {name}{reason}\n"
        assert (run / name).read_text() == content and sorted(p.name for p in run.iterdir()) == sorted([name, "notes.txt"])
    manifest = tmp_path / "new" / "log.csv"
    assert main(["train", "--arch", "znet", "--model", "unused.safetensors", "-o", str(tmp_path / "new"),
                 "--data", f"jsonl:{manifest}"]) == 2
    assert "log.csv: the same file as the data jsonl:" in capsys.readouterr().err


def test_saved_head_runs_in_the_segmenter(tmp_path):
    backbone = build_stable_diffusion("tiny")  # f = 2: the head's logits are 4x the image, resized for the loss
    trainer = Trainer(backbone, open_source("world:train:2", size=SIZE), _config(arch="znet", steps=2), tmp_path)
    trainer.run(progress=False)
    head, config = load_head(tmp_path / HEAD)
    assert config.arch == "znet" and config.latent_size == SIZE // backbone.downsample_factor
    assert torch.equal(head.state_dict()["out.2.weight"], trainer.ema.shadow["out.2.weight"])
    segmenter = Segmenter(backbone, head, config)
    assert segmenter.resolution == SIZE
    segmenter.set_image(np.full((48, 80, 3), 128, np.uint8))
    maps = segmenter.predict_terms(["red star", "sky"])
    assert maps["sky"].shape == (48, 80) and 0.0 <= float(maps["sky"].min()) <= float(maps["sky"].max()) <= 1.0


def test_train_command(sd_file, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["train", "--model", str(sd_file), "--data", "world:train:2", "-o", str(run), "--resolution", "64",
              "--batch-size", "2", "--save-every", "1", "--log-every", "1"]
    assert main([*common, "--arch", "rgbnet", "--steps", "1"]) == 0
    assert main([*common, "--resume", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "rgbnet head, 2 steps on world:train:2" in out
    assert read_metadata(run / HEAD)["training"]["steps"] == 2
    assert len((run / LOG).read_text().splitlines()) == 3  # the header and steps 1 and 2
    assert main(["train", "--model", str(sd_file), "-o", str(tmp_path / "x")]) == 2
    assert "--arch is required" in capsys.readouterr().err
