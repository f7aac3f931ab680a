"""train/'s EMA and LR schedule as the head trainer and the micro SD stages share them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldznet_ext.train.ema import EMA
from ldznet_ext.train.schedule import lr_factor


def _weight_one_after_zero(ema: EMA, module: nn.Linear, updates: int) -> list[float]:
    """The averaged weight after each of ``updates`` updates of a weight moved from 0 to 1."""
    with torch.no_grad():
        module.weight.fill_(1.0)
    out = []
    for _ in range(updates):
        ema.update(module)
        out.append(float(ema.shadow["weight"]))
    return out


@pytest.mark.parametrize("count_from, first_decays", [(1, (2 / 11, 3 / 12)), (0, (1 / 10, 2 / 11))])
def test_ema_warm_up_counts_updates_from_count_from(count_from, first_decays):
    module = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.zero_()
    ema = EMA(module, decay=0.9999, count_from=count_from)
    first, second = _weight_one_after_zero(ema, module, 2)
    decay_1, decay_2 = first_decays
    assert first == pytest.approx(1 - decay_1) and second == pytest.approx(1 - decay_2 * decay_1)
    assert ema.state_dict()["updates"] == 2
    target = nn.Linear(1, 1, bias=False)
    assert ema.copy_to(target) is target and float(target.weight.detach()) == pytest.approx(second)


def test_ema_decay_caps_the_warm_up():
    module = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.zero_()
    ema = EMA(module, decay=0.05, count_from=0)
    assert _weight_one_after_zero(ema, module, 1) == [pytest.approx(0.95)]


def test_cosine_schedule_ends_at_min_ratio_and_other_schedules_stay_flat():
    assert [lr_factor(s, 2, 6, "cosine", 0.2) for s in (0, 1, 2, 4, 6, 9)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.6, 0.2, 0.2])
    assert [lr_factor(s, 2, 6, "cosine") for s in (2, 4, 6)] == pytest.approx([1.0, 0.5, 0.0])
    assert [lr_factor(s, 0, 6, schedule) for s in (0, 5) for schedule in ("constant", "plateau")] == [1.0] * 4
