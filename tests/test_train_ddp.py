"""`ldznet train` data-parallel over two gloo processes on the CPU, as torchrun would start it:
the loss falls, both ranks hold the same weights, and a run stopped and resumed ends bit-identical
to an uninterrupted one."""

from __future__ import annotations

import argparse
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from ldznet_ext.cli import train as train_cli
from ldznet_ext.data.spec import open_source
from ldznet_ext.train import distributed
from ldznet_ext.train.trainer import CHECKPOINT, TrainConfig, Trainer
from ldznet_ext.world.data import render_scene_set

SIZE = 64
STEPS, CUT = 4, 2
pytestmark = pytest.mark.usefixtures("single_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers())
    return parser.parse_args(["train", *argv])


def _rank(rank: int, port: int, common: list[str], out: str) -> None:
    """One torchrun-like process: the environment torchrun sets, the process group joined from it,
    then `ldznet train` three times in that group (uninterrupted; stopped at CUT; resumed), each
    rank saving the weights it ends with."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    assert distributed.init_from_env(torch.device("cpu")) == (torch.device("cpu"), True)
    assert distributed.world() == (rank, 2)
    straight = train_cli.train(_parse([*common, "--arch", "ldznet", "--steps", str(STEPS), "-o", f"{out}/straight"]))
    torch.save(straight.head.state_dict(), f"{out}/straight-rank{rank}.pt")
    # gradient checkpointing (under DDP) before the cut only: it changes memory, not a single bit
    train_cli.train(_parse([*common, "--arch", "ldznet", "--steps", str(CUT), "--grad-checkpoint", "-o", f"{out}/cut"]))
    resumed = train_cli.train(_parse([*common, "--resume", "--steps", str(STEPS), "--no-grad-checkpoint",
                                      "-o", f"{out}/cut"]))
    torch.save(resumed.head.state_dict(), f"{out}/resumed-rank{rank}.pt")
    distributed.shutdown()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_model_files):
    """Run the three trainings on two processes; the folder with their results."""
    out = tmp_path_factory.mktemp("ddp")
    # one scene (six phrases) twice: each rank's shard holds it, and 4 steps visibly fit it
    render_scene_set([0, 0], SIZE, workers=1).save(out / "scenes.npz")
    common = ["--model", str(tiny_model_files[0]), "--data", f"world:{out / 'scenes.npz'}", "--device", "cpu",
              "--resolution", str(SIZE), "--batch-size", "3", "--lr", "1e-4", "--warmup", "0", "--save-every", "3",
              "--log-every", "1"]
    mp.spawn(_rank, args=(_free_port(), common, str(out)), nprocs=2, join=True)
    return out


def _fixed_batch_loss(backbone, out, weights) -> float:
    """The training loss of every phrase of the scene (t and noise fixed) with ``weights`` (None: the start)."""
    source = open_source(f"world:{out / 'scenes.npz'}")
    trainer = Trainer(backbone, source, TrainConfig(arch="ldznet", resolution=SIZE), out / "probe")
    if weights is not None:
        trainer.head.load_state_dict(weights)
    every = [(s, s.phrase) for s in source[0].samples()]
    with torch.no_grad():
        return trainer.loss(every, torch.Generator().manual_seed(0)).item()


def test_two_ranks_learn_in_lockstep(two_ranks, tiny_sd):
    rank0 = torch.load(two_ranks / "straight-rank0.pt", weights_only=True)
    rank1 = torch.load(two_ranks / "straight-rank1.pt", weights_only=True)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # gradients all-reduced, same optimiser steps
    before, after = _fixed_batch_loss(tiny_sd, two_ranks, None), _fixed_batch_loss(tiny_sd, two_ranks, rank0)
    assert after < 0.97 * before, (before, after)  # measured: 0.958
    state = torch.load(two_ranks / "straight" / CHECKPOINT, weights_only=True)
    assert state["step"] == STEPS and state["data"] == {"positions": [STEPS * 3] * 2, "world_size": 2}
    assert len(state["rng"]["torch"]) == 2  # each rank's RNG state
    log = (two_ranks / "straight" / "log.csv").read_text().splitlines()
    assert log[0] == "step,loss,lr,seconds,samples_per_second" and len(log) == 1 + STEPS  # rank 0 alone logs
    losses = [float(line.split(",")[1]) for line in log[1:]]
    assert np.isfinite(losses).all()


def test_two_ranks_resume_bit_identically(two_ranks):
    for rank in (0, 1):
        straight = torch.load(two_ranks / f"straight-rank{rank}.pt", weights_only=True)
        resumed = torch.load(two_ranks / f"resumed-rank{rank}.pt", weights_only=True)
        assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    a = torch.load(two_ranks / "straight" / CHECKPOINT, weights_only=True)
    b = torch.load(two_ranks / "cut" / CHECKPOINT, weights_only=True)
    assert all(torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]) for k in a["ema"]["shadow"])
    assert a["losses"][-1] == b["losses"][-1]
