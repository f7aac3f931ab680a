"""Presence: every term found or not with a score; a term not found adds an empty map to its expression."""

from __future__ import annotations

import pytest
import torch

from ldznet_ext.errors import LdznetError
from ldznet_ext.masks.ops import MaskOptions
from ldznet_ext.masks.presence import HEAD_RULE, ZERO_SHOT_RULE, PresenceRule, TermPresence, presence_score
from oracle import OracleSegmenter


def _maps() -> dict[str, torch.Tensor]:
    """100 x 100: sky over the top 30 rows (0.95); a faint 'goblin' blob, 0.6 over 8 x 8 pixels."""
    sky = torch.zeros(100, 100)
    sky[:30] = 0.95
    goblin = torch.zeros(100, 100)
    goblin[60:68, 60:68] = 0.6
    return {"sky": sky, "goblin": goblin}


def test_presence_score_is_the_value_the_top_share_reaches() -> None:
    p = torch.zeros(10, 10)
    p[0, :5] = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    assert presence_score(p, 0.0) == pytest.approx(0.9)  # the peak
    assert presence_score(p, 0.03) == pytest.approx(0.7)  # the 3rd largest of 100
    assert presence_score(p, 0.025) == pytest.approx(0.7)  # ceil(2.5) = 3 pixels
    assert PresenceRule(0.03, 0.65).decide(p) == TermPresence(True, pytest.approx(0.7))
    assert not PresenceRule(0.04, 0.65).decide(p).found


def test_found_means_above_the_level_not_at_it() -> None:
    p = torch.zeros(10, 10)
    p[0, 0] = 0.5  # exact in float32
    assert PresenceRule(0.0, 0.5).decide(p) == TermPresence(False, 0.5)
    p[0, 0] = 0.5 + 2 ** -20
    assert PresenceRule(0.0, 0.5).decide(p).found


def test_the_rules_are_the_documented_ones() -> None:
    """README: with a head, found when the map's top 0.1 % reaches above 0.64; zero-shot, when its top
    0.5 % is above 0.5. On 100 x 100 that is the 10th and the 50th largest value."""
    def blob(pixels: int, value: float) -> torch.Tensor:
        p = torch.zeros(100, 100)
        p.view(-1)[:pixels] = value
        return p

    assert HEAD_RULE.decide(blob(10, 0.65)).found
    assert not HEAD_RULE.decide(blob(10, 0.63)).found
    assert HEAD_RULE.decide(blob(9, 0.99)) == TermPresence(False, 0.0)
    assert ZERO_SHOT_RULE.decide(blob(50, 0.51)).found
    assert not ZERO_SHOT_RULE.decide(blob(50, 0.49)).found
    assert ZERO_SHOT_RULE.decide(blob(49, 0.99)) == TermPresence(False, 0.0)


def test_rules_are_checked() -> None:
    with pytest.raises(LdznetError, match="presence level must be a number in"):
        PresenceRule(0.001, 1.0)


def test_absent_term_adds_nothing_to_the_expression() -> None:
    prediction = OracleSegmenter(_maps()).predict("goblin OR sky")
    assert prediction.presence["sky"] == TermPresence(True, pytest.approx(0.95))
    assert prediction.presence["goblin"] == TermPresence(False, pytest.approx(0.6))
    assert prediction.missing == ["goblin"]
    assert int(prediction.mask.sum()) == 3000  # the sky alone; without presence the blob passes 0.5
    assert int(prediction.terms["goblin"].count_nonzero()) == 0
    assert int(OracleSegmenter(_maps()).predict("goblin").mask.sum()) == 0


@pytest.mark.parametrize("expression, selected", [("goblin{+4}", 0), ("goblin[1]", 0), ("NOT goblin", 10_000),
                                                  ("sky AND NOT goblin{+2}", 3000), ("(goblin OR sky)[1]", 3000)])
def test_an_absent_term_is_one_expanded_zero(expression, selected) -> None:
    """No image-size copy per absent term (16 on an 8192 x 8192 image were 4 GB of zeros); every
    operator still reads it as zeros."""
    prediction = OracleSegmenter(_maps()).predict(expression)
    assert prediction.terms["goblin"].untyped_storage().nbytes() == 4
    assert int(prediction.mask.sum()) == selected


def test_presence_off_keeps_every_map() -> None:
    prediction = OracleSegmenter(_maps()).predict("goblin OR sky", MaskOptions(presence=False))
    assert prediction.presence == {} and prediction.missing == []
    assert int(prediction.mask.sum()) == 3000 + 64


def test_the_mode_picks_the_rule() -> None:
    assert OracleSegmenter(_maps()).presence_rule == HEAD_RULE
    assert OracleSegmenter(_maps(), zero_shot=True).presence_rule == ZERO_SHOT_RULE
    assert OracleSegmenter(_maps(), zero_shot=True).predict("goblin").presence["goblin"].found


def test_prediction_instances_follow_the_final_mask() -> None:
    maps = _maps()
    maps["goblin"][60:68, 10:18] = 0.9
    maps["goblin"][60:68, 60:68] = 0.9
    found = OracleSegmenter(maps).predict("goblin", MaskOptions(feather=2.0)).instances()
    assert [(i.order, i.box, i.area) for i in found] == [(1, (10, 60, 18, 68), 64), (2, (60, 60, 68, 68), 64)]
    assert [i.to_dict()["score"] for i in found] == [0.9, 0.9]


def test_an_inverted_mask_s_instances_are_scored_on_the_inverted_map() -> None:
    """Under invert the instances are what the expression does not describe: each one's score is how
    surely its pixels are selected, 1 - probability, not the expression's own low probability there."""
    maps = _maps()
    maps["goblin"][:, :] = 0.1
    maps["goblin"][:, 40:48] = 0.9  # a band splits the inverted mask into two objects
    options = MaskOptions(invert=True, presence=False)
    found = OracleSegmenter(maps).predict("goblin", options).instances()
    assert [(i.box[0], i.box[2], i.to_dict()["score"]) for i in found] == [(0, 40, 0.9), (48, 100, 0.9)]
