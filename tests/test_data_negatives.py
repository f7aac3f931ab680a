"""``?negatives=K`` on a data spec: absent phrases for data that names none, drawn from other examples."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fixtures_models import random_image
from ldznet_ext.data.spec import open_source
from ldznet_ext.errors import LdznetError

COUNT = 6


def _manifest(folder, corrupt: int | None = None) -> str:
    """Image i names `thing i` (image 0 also `THING  1`); a seventh image names only an absent `ghost`."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(COUNT):
        if i == corrupt:
            (folder / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
        else:
            Image.fromarray(random_image(24, 32, seed=i)).save(folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "phrase": f"thing {i}", "polygons": [[2, 2, 12, 2, 12, 12, 2, 12]]})
    rows.append({"image": "0.png", "phrase": "THING  1", "polygons": [[4, 4, 20, 4, 20, 20, 4, 20]]})
    Image.fromarray(random_image(24, 32, seed=COUNT)).save(folder / "ghost.png")
    rows.append({"image": "ghost.png", "phrase": "ghost", "polygons": []})  # absent there: nobody shows it
    (folder / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(folder / "set.jsonl")


def _own(index: int) -> set[str]:
    if index == COUNT:
        return {"ghost"}
    return {f"thing {index}"} | ({"thing 1"} if index == 0 else set())


def _key(phrase: str) -> str:
    return " ".join(phrase.lower().split())


def test_with_room_for_all_each_other_image_gives_one_thing_it_shows(tmp_path):
    source = open_source(f"{_manifest(tmp_path)}?negatives=8")  # more than there are: every other example read
    for index in range(COUNT + 1):
        added = [_key(p) for p, mask in source[index].pairs[len(_own(index)):] if not mask.any()]
        assert len(added) == len(source[index].pairs) - len(_own(index)) == len(set(added))
        # one phrase from each other image that shows something new here; `THING  1` and `thing 1` are one
        others = {f"thing {i}" for i in range(COUNT)} - _own(index)
        assert set(added) <= others and len(added) >= len(others) - 1


def test_each_example_names_other_examples_things_as_absent(tmp_path):
    manifest = _manifest(tmp_path)
    plain, sampled = open_source(manifest), open_source(f"{manifest}?negatives=2")
    assert len(sampled) == len(plain) == COUNT + 1 and sampled.description == f"jsonl:{manifest}?negatives=2"
    for index in range(COUNT + 1):
        before, after = plain[index], sampled[index]
        assert after.key == before.key and np.array_equal(after.image, before.image)
        own = after.pairs[:len(before.pairs)]  # the example's own phrases first, unchanged
        assert [p for p, _ in own] == [p for p, _ in before.pairs]
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(own, before.pairs))
        added = after.pairs[len(before.pairs):]
        assert len(added) == 2 and len({p for p, _ in added}) == 2
        for phrase, mask in added:
            assert phrase in {f"thing {i}" for i in range(COUNT)} | {"THING  1"}
            assert _key(phrase) not in _own(index)
            assert mask.shape == (24, 32) and mask.dtype == bool and not mask.any()


def test_the_draws_depend_on_the_index_alone(tmp_path):
    manifest = _manifest(tmp_path)
    forward = [open_source(f"{manifest}?negatives=1")[i].pairs[-1][0] for i in range(COUNT + 1)]
    backward = open_source(f"{manifest}?negatives=1")
    assert [backward[i].pairs[-1][0] for i in reversed(range(COUNT + 1))] == forward[::-1]
    assert len(set(forward)) > 1


def test_an_unreadable_other_example_is_passed_over(tmp_path):
    manifest = _manifest(tmp_path, corrupt=3)
    source = open_source(f"{manifest}?negatives=3")
    for index in (0, 1, 2, 4, 5, 6):
        added = [p for p, _ in source[index].pairs[len(_own(index)):]]
        assert len(added) == 3 and "thing 3" not in added
    with pytest.raises(LdznetError, match="3.png"):
        source[3]  # the example itself stays unreadable, as without negatives


@pytest.mark.parametrize("value, message", [
    ("0", "data spec option negatives=0: expected an integer in [1, 8], got 0"),
    ("9", "data spec option negatives=9: expected an integer in [1, 8], got 9"),
    ("x", "data spec option negatives=x: expected an integer in [1, 8], got 'x'"),
])
def test_the_count_has_bounds(tmp_path, value, message):
    with pytest.raises(LdznetError) as error:
        open_source(f"{_manifest(tmp_path)}?negatives={value}")
    assert str(error.value) == message


def test_one_example_has_no_other_to_draw_from(tmp_path):
    Image.fromarray(random_image(8, 8, seed=0)).save(tmp_path / "a.png")
    (tmp_path / "one.jsonl").write_text(json.dumps({"image": "a.png", "phrase": "x", "polygons": []}) + "\n")
    with pytest.raises(LdznetError, match="negatives come from other examples; it has 1"):
        open_source(f"{tmp_path / 'one.jsonl'}?negatives=1")


def test_other_options_still_reach_their_source(tmp_path):
    with pytest.raises(LdznetError, match="world data takes no options, got size"):
        open_source("world:test:2?negatives=1&size=3")
