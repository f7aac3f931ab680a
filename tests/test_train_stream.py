"""The trainer reads its data as a stream: a data order that is a pure function of (seed, rank,
processes, position), unreadable examples logged and skipped, worker processes that change no bit,
and an exact resume from the consumed (not the prefetched) position."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from fixtures_models import random_image
from ldznet_ext.errors import LdznetError
from ldznet_ext.train.config import TrainConfig, read_config_file
from ldznet_ext.data.spec import open_source
from ldznet_ext.train.stream import ShardOrder
from ldznet_ext.train import trainer as trainer_module
from ldznet_ext.train.trainer import CHECKPOINT, Trainer

SIZE = 64
CORRUPT = 3  # the unreadable image; seed 0's order reads it at positions 0 and 10 (of 6 per epoch)
pytestmark = pytest.mark.usefixtures("single_thread")


def _manifest(folder, count: int, corrupt: set[int], present: bool = True) -> str:
    """A JSONL manifest of ``count`` 80x64 images (not square: the crop draws from the rng), each
    with a present phrase (unless not ``present``) and an absent one; the ``corrupt`` images are
    truncated PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        if i in corrupt:
            (folder / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
        else:
            Image.fromarray(random_image(64, 80, seed=i)).save(folder / f"{i}.png")
        box = [[4 * i, 8, 4 * i + 40, 8, 4 * i + 40, 50, 4 * i, 50]] if present else []
        rows += [{"image": f"{i}.png", "phrase": f"thing {i}", "polygons": box},
                 {"image": f"{i}.png", "phrase": "nothing", "polygons": []}]
    (folder / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(folder / "set.jsonl")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return _manifest(tmp_path_factory.mktemp("stream"), 6, {CORRUPT})


def _config(data: str, **changes) -> TrainConfig:
    base = dict(arch="znet", data=data, resolution=SIZE, steps=3, batch_size=2, lr=1e-3, warmup=0, save_every=1000,
                log_every=1)
    return TrainConfig(**{**base, **changes})


def _same_weights(a: Trainer, b: Trainer) -> bool:
    x, y = a.head.state_dict(), b.head.state_dict()
    return all(torch.equal(x[k], y[k]) for k in x) and all(torch.equal(a.ema.shadow[k], b.ema.shadow[k]) for k in x)


def test_data_order_is_a_pure_function_of_the_position():
    order = ShardOrder(6, seed=0)
    # pinned: a changed order would make every saved run resume onto other data
    assert [order.index(p) for p in range(12)] == [3, 4, 1, 5, 2, 0, 1, 2, 0, 5, 3, 4]
    backwards = ShardOrder(6, seed=0)
    assert [backwards.index(p) for p in reversed(range(18))] == [order.index(p) for p in reversed(range(18))]
    assert [ShardOrder(6, seed=1).index(p) for p in range(12)] != [order.index(p) for p in range(12)]
    ranks = [ShardOrder(7, seed=5, rank=rank, world_size=2) for rank in (0, 1)]
    assert [r.shard for r in ranks] == [4, 3]
    for epoch in range(4):
        zero, one = (r.epoch(epoch).tolist() for r in ranks)
        assert sorted(zero) == [0, 2, 4, 6] and sorted(one) == [1, 3, 5]  # disjoint shards, each covered
        assert [ranks[0].index(4 * epoch + p) for p in range(4)] == zero
    assert len({tuple(ranks[0].epoch(e)) for e in range(6)}) > 1  # a fresh permutation per epoch
    with pytest.raises(LdznetError, match="indices: 5 examples cannot be shared by 8 processes"):
        ShardOrder(5, 0, 0, 8, "indices")


def test_unreadable_example_is_logged_and_skipped(tiny_sd, manifest, tmp_path, caplog, capsys):
    trainer = Trainer(tiny_sd, open_source(manifest), _config(manifest, steps=6), tmp_path)
    with caplog.at_level(logging.WARNING, logger="ldznet_ext.data"):
        trainer.run(progress=False)
    assert trainer.step == 6 and trainer.position == 14  # 12 samples and the bad image twice (positions 0, 10)
    warnings = [r.getMessage() for r in caplog.records if r.name == "ldznet_ext.data"]
    bad = str(Path(manifest).parent / f"{CORRUPT}.png")
    assert len(warnings) == trainer.unreadable == 2
    assert all(m.startswith(f"skipping example {CORRUPT}: ") and bad in m for m in warnings), warnings
    assert "skipped 2 unreadable example(s)" in capsys.readouterr().err
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["data"] == {"positions": [14], "world_size": 1}


def test_worker_processes_change_nothing(tiny_sd, manifest, tmp_path):
    source = open_source(manifest)
    alone = Trainer(tiny_sd, source, _config(manifest), tmp_path / "alone")
    alone.run(progress=False)
    workers = Trainer(tiny_sd, source, _config(manifest, workers=2), tmp_path / "workers")
    workers.run(progress=False)
    assert alone.position == workers.position == 7 and alone.unreadable == workers.unreadable == 1
    assert _same_weights(alone, workers)


def test_latent_cache_is_bounded_and_changes_nothing(tiny_sd, tmp_path, monkeypatch):
    data = "world:train:6"  # square scenes: their latents are cached by key
    source = open_source(data, size=SIZE)
    unbounded = Trainer(tiny_sd, source, _config(data, steps=4), tmp_path / "unbounded")
    unbounded.run(progress=False)
    monkeypatch.setattr(trainer_module, "LATENT_CACHE", 2)
    bounded = Trainer(tiny_sd, source, _config(data, steps=4), tmp_path / "bounded")
    bounded.run(progress=False)
    assert len(unbounded._z) == 6 and 1 <= len(bounded._z) <= 2
    assert _same_weights(unbounded, bounded)


def test_resume_with_workers_continues_at_the_consumed_position(tiny_sd, manifest, tmp_path):
    source = open_source(manifest)
    config = _config(manifest, arch="ldznet", steps=5)
    straight = Trainer(tiny_sd, source, config, tmp_path / "straight")
    straight.run(progress=False)
    Trainer(tiny_sd, source, _config(manifest, arch="ldznet", steps=2, workers=2), tmp_path / "cut").run(
        progress=False)
    # saved while the workers had read 8 positions ahead: the position after the 4 samples used
    assert torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)["data"]["positions"] == [5]
    resumed = Trainer(tiny_sd, source, TrainConfig(**{**config.__dict__, "workers": 2}), tmp_path / "cut")
    resumed.resume()
    assert (resumed.step, resumed.position) == (2, 5)
    resumed.run(progress=False)
    assert resumed.position == straight.position == 12  # both bad reads (positions 0 and 10), one each side
    assert _same_weights(straight, resumed)


def test_no_usable_example_stops_with_a_clear_message(tiny_sd, tmp_path):
    unreadable = _manifest(tmp_path / "unreadable", 2, {0, 1})
    trainer = Trainer(tiny_sd, open_source(unreadable), _config(unreadable), tmp_path / "a")
    with pytest.raises(LdznetError, match=r"set.jsonl: 100 examples in a row were unreadable or had no usable phrase"):
        trainer.train_step()
    assert trainer.unreadable == 100
    absent = _manifest(tmp_path / "absent", 2, set(), present=False)
    trainer = Trainer(tiny_sd, open_source(absent), _config(absent, negatives=False), tmp_path / "b")
    with pytest.raises(LdznetError, match=r"absent/set.jsonl: 100 examples in a row"):
        trainer.train_step()
    assert trainer.position == 100 and trainer.unreadable == 0


def test_workers_setting(tmp_path):
    (tmp_path / "run.yaml").write_text("workers: 3\n")
    assert read_config_file(tmp_path / "run.yaml") == {"workers": 3}
    with pytest.raises(LdznetError, match=r"workers must be an integer in \[0, 64\], got -1"):
        TrainConfig(workers=-1)
