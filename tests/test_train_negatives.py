"""Negatives for data that names no absent phrase (PhraseCut-like): CLIPSeg's sampling (``negative_prob``)
and the warning when a presence output meets none."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from fixtures_models import random_image
from ldznet_ext.cli import main
from ldznet_ext.data.spec import open_source
from ldznet_ext.errors import LdznetError
from ldznet_ext.train import trainer as trainer_module
from ldznet_ext.train.config import TrainConfig
from ldznet_ext.train.trainer import Trainer

SIZE = 64
COUNT = 6
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def phrasecut_like(tmp_path_factory) -> str:
    """A manifest of 6 images, image i naming `thing i` (present); image 0 also names `THING  1`, so that
    `thing 1` is never its negative. No absent phrase."""
    folder = tmp_path_factory.mktemp("negatives")
    rows = []
    for i in range(COUNT):
        Image.fromarray(random_image(SIZE, SIZE, seed=i)).save(folder / f"{i}.png")
        box = [[8, 8, 40, 8, 40, 40, 8, 40]]
        rows.append({"image": f"{i}.png", "phrase": f"thing {i}", "polygons": box})
    rows.append({"image": "0.png", "phrase": "THING  1", "polygons": [[20, 20, 60, 20, 60, 60, 20, 60]]})
    (folder / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(folder / "set.jsonl")


def _config(data: str, **changes) -> TrainConfig:
    base = dict(arch="znet", data=data, resolution=SIZE, steps=3, batch_size=COUNT, lr=1e-3, warmup=0,
                save_every=1000, log_every=1)
    return TrainConfig(**{**base, **changes})


def _named(key: str) -> set[str]:
    """The phrases the image of a sample's ``key`` (``jsonl:MANIFEST:i.png``) names."""
    i = int(key.rsplit(":", 1)[1].removesuffix(".png"))
    return {f"thing {i}"} | ({"THING  1"} if i == 0 else set())


def test_negatives_name_another_images_thing_with_an_empty_mask(tiny_sd, phrasecut_like, tmp_path):
    source = open_source(phrasecut_like)
    plain = Trainer(tiny_sd, source, _config(phrasecut_like), tmp_path / "plain")
    sampled = Trainer(tiny_sd, source, _config(phrasecut_like, negative_prob=0.5), tmp_path / "sampled")
    again = Trainer(tiny_sd, source, _config(phrasecut_like, negative_prob=0.5), tmp_path / "again")
    negatives = 0
    for _ in range(8):  # 48 samples
        before, after, repeat = plain.draw(), sampled.draw(), again.draw()
        assert [(s.phrase, p, s.key) for s, p in after] == [(s.phrase, p, s.key) for s, p in repeat]  # seeded
        assert all(s.present for s, _ in before)
        for (kept, kept_prompt), (sample, prompt) in zip(before, after):
            assert sample.key == kept.key and np.array_equal(sample.image, kept.image)  # the same image
            if sample.present:  # untouched: the draw without negatives, to the bit
                assert (sample.phrase, prompt) == (kept.phrase, kept_prompt)
                assert np.array_equal(sample.mask, kept.mask)
                continue
            negatives += 1
            assert not sample.mask.any() and sample.mask.shape == kept.mask.shape and prompt == sample.phrase
            others = set().union(*(_named(s.key) for s, _ in before if s.key != sample.key))
            own = {" ".join(p.lower().split()) for p in _named(sample.key)}
            assert sample.phrase in others and " ".join(sample.phrase.lower().split()) not in own
    assert 12 <= negatives <= 36  # about half of 48
    assert sampled.absent_drawn == again.absent_drawn == negatives and plain.absent_drawn == 0


def test_a_presence_output_without_negatives_is_warned_about(tiny_sd, phrasecut_like, tmp_path, capsys,
                                                            monkeypatch):
    monkeypatch.setattr(trainer_module, "PRESENCE_CHECK_STEPS", 2)
    source = open_source(phrasecut_like)
    with pytest.warns(UserWarning) as shown:
        Trainer(tiny_sd, source, _config(phrasecut_like, presence_weight=1.0), tmp_path / "a").run(progress=False)
    assert [str(w.message) for w in shown] == [
        "no absent phrase in the first 2 steps' samples: the presence output learns that every phrase is present; "
        f"{source.description} names no absent phrase, sample some with --negative-prob (CLIPSeg used 0.2)"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither run warns
        Trainer(tiny_sd, source, _config(phrasecut_like, presence_weight=1.0, negative_prob=0.5),
                tmp_path / "b").run(progress=False)
        Trainer(tiny_sd, source, _config(phrasecut_like), tmp_path / "c").run(progress=False)  # no presence output


@pytest.mark.parametrize("changes, message", [
    ({"negative_prob": 0.2, "batch_size": 1}, "batch_size must be 2 or more, got 1"),
    ({"negative_prob": 1.0}, "negative_prob must be a number in \\[0, 1\\), got 1.0"),
    ({"negative_prob": float("nan")}, "negative_prob must be a number in \\[0, 1\\), got nan"),
])
def test_settings_that_cannot_give_negatives_are_refused(changes, message):
    with pytest.raises(LdznetError, match=message):
        TrainConfig(**changes)


def test_presence_from_sampled_negatives_alone_is_allowed():
    config = TrainConfig(presence_weight=1.0, negatives=False, negative_prob=0.2)
    assert config.negative_prob == 0.2


def test_the_flag_is_bounded_on_the_command_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--arch", "znet", "--model", "m.safetensors", "-o", str(tmp_path / "r"), "--negative-prob", "1.5"])
    assert exit_.value.code == 2
    assert "argument --negative-prob: expected a number in [0, 1), got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
