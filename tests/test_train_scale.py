"""Training at scale on one process: gradient accumulation and the plateau schedule resume
bit-identically, gradient checkpointing changes nothing but memory, and the concatenation ablation (paper Table 4) builds, runs, trains and round-trips through a file."""

from __future__ import annotations

import pytest
import torch

from ldznet_ext.errors import LdznetError
from ldznet_ext.heads import load_head, read_head_config
from ldznet_ext.modeling.build import HeadConfig, build_head, head_config
from ldznet_ext.modeling.ldznet import SDConcatSpatialTransformer
from ldznet_ext.tap import sd_features
from ldznet_ext.data.spec import open_source
from ldznet_ext.train.trainer import CHECKPOINT, HEAD, TrainConfig, Trainer, is_new_layer

SIZE = 64
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def source():
    return open_source("world:train:4", size=SIZE)


def _config(**changes) -> TrainConfig:
    base = dict(data="world:train:4", resolution=SIZE, steps=4, batch_size=2, lr=1e-4, warmup=1, save_every=1000,
                log_every=1)
    return TrainConfig(**{**base, **changes})


def test_accumulation_and_plateau_resume_bit_identically(tiny_sd, source, tmp_path):
    # patience 0 and a window of one step: every step without a new best loss halves the rate
    config = _config(arch="znet", steps=6, warmup=0, accumulate=2, schedule="plateau", plateau_every=1,
                     plateau_patience=0)
    straight = Trainer(tiny_sd, source, config, tmp_path / "straight")
    straight.run(progress=False)
    assert straight.lr == 2.5e-5  # the loss rose at steps 3 and 5 (measured): the rate was halved twice
    Trainer(tiny_sd, source, TrainConfig(**{**config.__dict__, "steps": 3}), tmp_path / "cut").run(progress=False)
    resumed = Trainer(tiny_sd, source, config, tmp_path / "cut")
    resumed.resume()
    resumed.run(progress=False)
    assert resumed.lr == straight.lr and resumed.plateau.state_dict() == straight.plateau.state_dict()
    a, b = straight.head.state_dict(), resumed.head.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(straight.ema.shadow[k], resumed.ema.shadow[k]) for k in a)
    with pytest.raises(LdznetError, match="accumulate: 2 -> 1"):
        Trainer(tiny_sd, source, TrainConfig(**{**config.__dict__, "accumulate": 1}), tmp_path / "cut").resume()


def test_gradient_checkpointing_gives_the_same_gradients(tiny_sd, source, tmp_path):
    trainer = Trainer(tiny_sd, source, _config(arch="ldznet"), tmp_path)
    batch = trainer.draw()
    grads = []
    for enabled in (False, True, False):
        trainer.head.set_gradient_checkpointing(enabled)
        trainer.head.zero_grad()
        trainer.loss(batch, torch.Generator().manual_seed(0)).backward()
        grads.append({k: p.grad.clone() for k, p in trainer.head.named_parameters()})
    assert all(torch.equal(grads[0][k], grads[1][k]) and torch.equal(grads[0][k], grads[2][k]) for k in grads[0])
    assert "forward" not in vars(trainer.head.input_blocks[1])  # switched off again: the class's forward


def test_concat_ablation_starts_as_znet_and_reads_sd_features(tiny_sd):
    config = head_config("ldznet", "tiny", latent_size=8, sd_fusion="concat")
    torch.manual_seed(0)
    head = build_head(config).eval()
    with torch.no_grad():  # ldm zero-initialises the output conv, which would make every logit the same
        head.out[2].weight.normal_(0, 0.1)
    blocks = [m for m in head.modules() if isinstance(m, SDConcatSpatialTransformer)]
    assert sorted(b.block_number for b in blocks) == list(config.sd_blocks)
    assert not any(hasattr(m, "attentionpool2D") for m in head.modules())
    names = [n for n, _ in head.named_parameters() if ".sd_concat." in n]
    assert names and all(is_new_layer(n) for n in names)
    znet = build_head(head_config("znet", "tiny"))
    missing, unexpected = znet.load_state_dict(head.state_dict(), strict=False)
    assert not missing and set(unexpected) == set(names)  # ZNet's layers plus the 1x1 fusion convs
    z, conditioning = torch.randn(2, 4, 8, 8), tiny_sd.encode_text(["red star", "sky"])
    features = sd_features(tiny_sd, z, conditioning, torch.tensor([300, 450]), torch.randn(2, 4, 8, 8),
                           config.sd_blocks)
    context = conditioning.context
    with torch.no_grad():
        logits = head(z, context, features)
        assert logits.shape == (2, 1, 64, 64)
        assert torch.equal(logits, znet(z, context))  # [identity | 0]: the SD half starts silent
        blocks[0].sd_concat.weight[:, -1] += 0.5
        assert not torch.equal(head(z, context, features), logits)
    with pytest.raises(ValueError, match="does not match"):
        head(z, context, {**features, blocks[0].block_number: torch.randn(2, 3, 4, 4)})


def test_concat_ablation_trains_and_round_trips(tiny_sd, source, tmp_path):
    trainer = Trainer(tiny_sd, source, _config(arch="ldznet", sd_fusion="concat", steps=1), tmp_path)
    start = {k: v.clone() for k, v in trainer.head.state_dict().items() if ".sd_concat." in k}
    trainer.run(progress=False)
    state = trainer.head.state_dict()
    assert all(not torch.equal(state[k], v) for k, v in start.items())  # both halves learn, SD's too
    assert read_head_config(tmp_path / HEAD).sd_fusion == "concat"
    head, config = load_head(tmp_path / HEAD)
    assert config.sd_fusion == "concat" and any(isinstance(m, SDConcatSpatialTransformer) for m in head.modules())
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["config"]["sd_fusion"] == "concat"
    old = {k: v for k, v in config.to_dict().items() if k != "sd_fusion"}  # a head saved before the option
    assert HeadConfig.from_dict(old).sd_fusion == "attention"
    assert "sd_fusion" not in HeadConfig.from_dict(old).to_dict()  # attention heads stay readable by old releases
    with pytest.raises(ValueError, match="reads no SD features"):
        head_config("znet", "tiny", sd_fusion="concat")
