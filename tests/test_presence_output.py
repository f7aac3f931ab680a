"""A head's learned presence output: built, saved and loaded with its level; heads without one keep
their keys; ``ldznet train --init --freeze-head`` trains it alone; the segmenter decides presence
with it; ``ldznet eval --presence`` scores absent phrases the way an expression would use them."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from ldznet_ext.checkpoint_io import read_metadata, read_state_dict, write_safetensors
from ldznet_ext.cli import main
from ldznet_ext.data.examples import Example
from ldznet_ext.data.spec import open_source
from ldznet_ext.errors import CheckpointError, LdznetError
from ldznet_ext.eval.evaluate import EvalResult, evaluate, merge_results
from ldznet_ext.heads import load_head, read_head_config, save_head
from ldznet_ext.masks.ops import MaskOptions
from ldznet_ext.masks.presence import TermPresence
from ldznet_ext.modeling.build import ARCHITECTURES, HeadConfig, build_head, head_config
from ldznet_ext.segmenter import Segmenter, SegmenterSettings
from ldznet_ext.train.trainer import HEAD, TrainConfig, Trainer
from fixtures_models import perturb_, random_image

pytestmark = pytest.mark.usefixtures("single_thread")

SHIPPED = "ldznet_ext/world/weights/micro-ldznet.safetensors"


def _presence_head(config: HeadConfig, seed: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return perturb_(build_head(replace(config, presence=True)), seed=seed + 1)


def test_presence_output_round_trip(tmp_path) -> None:
    config = head_config("znet", "tiny", presence=True, presence_level=0.3)
    head = _presence_head(config)
    assert sorted(k for k in head.state_dict() if k.startswith("presence.")) == [
        "presence.mlp.0.bias", "presence.mlp.0.weight", "presence.mlp.2.bias", "presence.mlp.2.weight"]
    save_head(head, config, tmp_path / "p.safetensors")
    stored = read_metadata(tmp_path / "p.safetensors")["head"]
    assert stored["presence"] is True and stored["presence_level"] == 0.3
    loaded, loaded_config = load_head(tmp_path / "p.safetensors")
    assert loaded_config == config
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in head.state_dict().items())
    z, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, config.unet.context_dim)
    logits, presence = loaded(z, context, with_presence=True)
    assert presence.shape == (2,) and presence.dtype == torch.float32 and presence[0] != presence[1]
    assert torch.equal(logits, loaded(z, context))  # one pass gives both; the map is the same
    metadata = read_metadata(tmp_path / "p.safetensors")
    metadata["head"]["presence_level"] = "high"
    write_safetensors(tmp_path / "bad.safetensors", read_state_dict(tmp_path / "p.safetensors"), metadata)
    with pytest.raises(CheckpointError, match="presence_level' is \"high\"; expected a number"):
        read_head_config(tmp_path / "bad.safetensors")
    metadata["head"]["presence_level"] = 1.5
    write_safetensors(tmp_path / "bad.safetensors", read_state_dict(tmp_path / "p.safetensors"), metadata)
    with pytest.raises(CheckpointError, match="presence_level must be in \\[0, 1\\), got 1.5"):
        read_head_config(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_heads_without_presence_keep_their_keys_and_metadata(arch) -> None:
    config = head_config(arch, "tiny")
    assert config.presence is False and "presence" not in config.to_dict() and "presence_level" not in config.to_dict()
    with torch.device("meta"):
        plain, with_presence = build_head(config), build_head(replace(config, presence=True))
    assert plain.presence is None
    extra = [k for k in with_presence.state_dict() if k not in plain.state_dict()]
    assert list(with_presence.state_dict())[:len(plain.state_dict())] == list(plain.state_dict())
    assert extra == ["presence.mlp.0.weight", "presence.mlp.0.bias", "presence.mlp.2.weight", "presence.mlp.2.bias"]


def test_the_shipped_head_is_read_as_before() -> None:
    config = read_head_config(SHIPPED)
    assert config.presence is False and config.presence_level == 0.5
    with torch.device("meta"):
        assert sorted(build_head(config).state_dict()) == sorted(read_state_dict(SHIPPED))


def _train_config(**changes) -> TrainConfig:
    base = dict(arch="ldznet", data="world:train:4", resolution=64, steps=3, batch_size=4, lr=1e-3, warmup=0,
                save_every=1000, log_every=1, presence_weight=1.0, freeze_head=True)
    return TrainConfig(**{**base, **changes})


def test_freeze_head_trains_the_presence_output_alone(tiny_sd, tiny_model_files, tmp_path) -> None:
    head_file = tiny_model_files[1]
    source = open_source("world:train:4", size=64)
    config = _train_config(init=str(head_file))
    trainer = Trainer(tiny_sd, source, config, tmp_path / "run")
    trainer.run(progress=False)
    before = read_state_dict(head_file)
    for state in (trainer.head.state_dict(), read_state_dict(tmp_path / "run" / HEAD)):
        assert all(torch.equal(state[k], v) for k, v in before.items())  # bit-identical: maps do not change
    fresh = Trainer(tiny_sd, source, replace(config, steps=1), tmp_path / "fresh").head.state_dict()
    trained = trainer.head.state_dict()
    assert all(not torch.equal(trained[k], fresh[k]) for k in trained if k.startswith("presence."))
    saved, saved_config = load_head(tmp_path / "run" / HEAD)
    assert saved_config == replace(read_head_config(head_file), presence=True)
    assert read_metadata(tmp_path / "run" / HEAD)["training"]["freeze_head"] is True
    # resume repeats the uninterrupted run
    Trainer(tiny_sd, source, replace(config, steps=2), tmp_path / "cut").run(progress=False)
    resumed = Trainer(tiny_sd, source, config, tmp_path / "cut")
    resumed.resume()
    resumed.run(progress=False)
    again = read_state_dict(tmp_path / "cut" / HEAD)
    assert all(torch.equal(again[k], v) for k, v in read_state_dict(tmp_path / "run" / HEAD).items())


@pytest.mark.parametrize("presence_weight, init_presence", [(0.0, False), (1.0, False), (1.0, True)])
def test_a_head_trained_from_init_keeps_the_init_heads_config(tiny_sd, tiny_head, tmp_path, presence_weight,
                                                             init_presence) -> None:
    # timestep, SD blocks and presence level are the init head's (calibrated with it), not the defaults
    init_config = replace(tiny_head[1], sd_blocks=(7, 9), timestep=250, presence=init_presence, presence_level=0.25)
    torch.manual_seed(7)
    save_head(build_head(init_config), init_config, tmp_path / "init.safetensors")
    config = _train_config(init=str(tmp_path / "init.safetensors"), presence_weight=presence_weight,
                           freeze_head=presence_weight > 0, steps=2, save_every=1)
    source = open_source("world:train:4", size=64)
    Trainer(tiny_sd, source, replace(config, steps=1), tmp_path / "run").run(progress=False)
    expected = replace(read_head_config(tmp_path / "init.safetensors"), presence=presence_weight > 0)
    level = 0.25 if init_presence else 0.5  # a head without a presence output stores no level
    assert (expected.sd_blocks, expected.timestep, expected.presence_level) == ((7, 9), 250, level)
    assert read_head_config(tmp_path / "run" / HEAD) == expected
    (tmp_path / "init.safetensors").unlink()  # a resumed run takes the config from its own head file
    resumed = Trainer(tiny_sd, source, config, tmp_path / "run", resuming=True)
    resumed.resume()
    resumed.run(progress=False)
    assert resumed.step == 2 and read_head_config(tmp_path / "run" / HEAD) == expected


def test_init_and_freeze_head_are_checked(tiny_sd, tmp_path) -> None:
    with pytest.raises(LdznetError, match="freeze_head .* needs init .* and presence_weight > 0"):
        _train_config()
    with pytest.raises(LdznetError, match=r"presence_weight must be a number in \[0, 1000\], got -1.0"):
        _train_config(presence_weight=-1.0, freeze_head=False)
    source = open_source("world:train:4", size=64)
    other = tmp_path / "znet.safetensors"
    save_head(build_head(head_config("znet", "tiny")), head_config("znet", "tiny"), other)
    with pytest.raises(LdznetError, match=f"init {other}: the head differs .* arch 'znet' \\(training: 'ldznet'\\)"):
        Trainer(tiny_sd, source, _train_config(init=str(other)), tmp_path / "run")


def test_train_command_writes_a_head_with_presence(tiny_model_files, tmp_path, capsys) -> None:
    sd_file, head_file = tiny_model_files
    run = tmp_path / "run"
    assert main(["train", "--arch", "ldznet", "--model", str(sd_file), "--data", "world:train:2", "-o", str(run),
                 "--resolution", "64", "--batch-size", "2", "--steps", "1", "--init", str(head_file),
                 "--freeze-head", "--presence-weight", "2"]) == 0
    assert read_head_config(run / HEAD).presence
    assert read_metadata(run / HEAD)["training"]["presence_weight"] == 2.0
    assert main(["train", "--arch", "ldznet", "--model", str(sd_file), "-o", str(tmp_path / "x"), "--freeze-head"]) == 2
    assert "freeze_head trains the presence output" in capsys.readouterr().err


class SkyOnly(nn.Module):
    """A head whose presence output says "sky" is in the image and nothing else is: its presence
    logit is +10 for the context of ``sky``, -10 for any other."""

    def __init__(self, head: nn.Module, sky: Tensor):
        super().__init__()
        self.head, self.sky = head, sky

    def forward(self, *args, with_presence: bool = False):
        logits = self.head(*args)
        if not with_presence:
            return logits
        is_sky = torch.tensor([torch.equal(c, self.sky) for c in args[1]])
        return logits, torch.where(is_sky, 10.0, -10.0)


def test_the_head_presence_output_decides_and_an_absent_term_adds_nothing(tiny_sd, tiny_head) -> None:
    head, config = tiny_head
    sky = tiny_sd.encode_text(["sky"]).context[0]
    settings = SegmenterSettings(resolution=64)
    learned = Segmenter(tiny_sd, SkyOnly(head, sky), replace(config, presence=True, presence_level=0.5), settings)
    plain = Segmenter(tiny_sd, head, config, settings)
    image = random_image(64, 64, seed=3)
    for segmenter in (learned, plain):
        segmenter.set_image(image)
    prediction = learned.predict("goblin OR sky")
    low, high = (float(torch.sigmoid(torch.tensor(v))) for v in (-10.0, 10.0))
    assert prediction.presence == {"goblin": TermPresence(False, pytest.approx(low)),
                                   "sky": TermPresence(True, pytest.approx(high))}
    assert int(prediction.terms["goblin"].count_nonzero()) == 0
    maps = plain.predict_terms(["goblin", "sky"])
    assert torch.equal(prediction.terms["sky"], maps["sky"])  # the same head call gives the same map
    assert torch.equal(prediction.probability, maps["sky"])  # the sky alone
    both = plain.predict("goblin OR sky", MaskOptions(presence=False))
    assert int(both.mask.sum()) > int(prediction.mask.sum()) > 0
    assert learned.decide_presence(maps) == prediction.presence
    with pytest.raises(LdznetError, match="^no presence score for 'dragon' on this image; call predict_terms with it"):
        learned.decide_presence({"dragon": maps["sky"]})
    score = prediction.presence["sky"].score  # a score at the level is not found: found means above it
    at_level = Segmenter(tiny_sd, SkyOnly(head, sky), replace(config, presence=True, presence_level=score), settings)
    at_level.set_image(image)
    assert at_level.predict("sky").presence == {"sky": TermPresence(False, score)}


class StubSegmenter:
    """Given maps and presence decisions per phrase stand in for a model's (for ``evaluate``)."""

    def __init__(self, maps: dict[str, Tensor], found: dict[str, bool]):
        self.maps, self.found = maps, found
        self.backbone = type("Backbone", (), {"device": torch.device("cpu")})()

    def set_image(self, image) -> None:
        pass

    def reset_image(self) -> None:
        pass

    def predict_terms(self, terms):
        return {t: self.maps[t].clone() for t in terms}

    def decide_presence(self, maps):
        return {t: TermPresence(self.found[t], 0.9 if self.found[t] else 0.1) for t in maps}


class OneExample:
    description = "constructed"

    def __init__(self, example: Example):
        self.example = example

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> Example:
        return self.example


def test_eval_presence_scores_absent_phrases_as_expressions_use_them(capsys) -> None:
    sky_mask = np.zeros((64, 64), bool)
    sky_mask[:30] = True
    empty = np.zeros((64, 64), bool)
    blob = torch.zeros(64, 64)
    blob[40:44, 40:44] = 0.9
    maps = {"sky": torch.from_numpy(sky_mask).float() * 0.95, "goblin": blob, "cat": torch.zeros(64, 64),
            "dog": blob.clone()}
    found = {"sky": True, "goblin": False, "cat": False, "dog": True}
    source = OneExample(Example("e", np.zeros((64, 64, 3), np.uint8),
                                (("sky", sky_mask), ("goblin", empty), ("cat", empty), ("dog", empty))))
    segmenter = StubSegmenter(maps, found)
    decided = evaluate(segmenter, source, include_absent=True, presence=True, progress=False)
    as_is = evaluate(segmenter, source, include_absent=True, progress=False)
    # goblin (not found) and cat (an empty map) come back empty; dog is found and keeps its blob
    assert (decided.absent_summary.absent, decided.absent_summary.absent_empty) == (3, 2)
    assert decided.absent_summary.absent_empty_share == 2 / 3
    assert (as_is.absent_summary.absent, as_is.absent_summary.absent_empty) == (3, 1)
    assert decided.absent_summary.present == 1 and decided.absent_summary.present_miou == 1920 / 1921
    again = EvalResult.from_dict(json.loads(json.dumps(decided.to_dict())))
    assert again.presence and again.absent_summary == decided.absent_summary
    assert decided.to_dict()["absent_summary"]["absent_empty_share"] == 2 / 3
    with pytest.raises(LdznetError, match="presence"):
        merge_results([replace(decided, shard=(1, 2)), replace(as_is, shard=(2, 2))])


def test_eval_command_prints_the_absent_share(tiny_model_files, tmp_path, capsys) -> None:
    sd_file, head_file = tiny_model_files
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(sd_file), "--head", str(head_file), "--data", "world:test:2", "--presence",
                 "--include-absent", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["results"][0]
    share = result["absent_summary"]
    assert result["presence"] is True and share["absent"] > 0
    assert (f"absent phrases (presence decided): {share['absent_empty']} of {share['absent']} returned empty "
            f"({100 * share['absent_empty_share']:.1f} %") in capsys.readouterr().out
