"""The procedural micro world: determinism, geometry across sizes, phrases, captions, splits, CLI."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import replace

import cv2
import numpy as np
import pytest
from PIL import Image

from ldznet_ext.cli import main
from ldznet_ext.errors import LdznetError
from ldznet_ext.world.scenes import (VOCABULARY, Curve, ObjectSpec, Region, SceneSpec, caption, make_scene,
                                     render, sample_scene, split_seeds)
from ldznet_ext.world.spec import OBJECT_RGB, STUFF_RGB, label_map

SEEDS = range(40)  # seed 0 is a cartoon, seed 1 a photo (parity), so both domains are covered


def _hand_scene(domain: str = "cartoon") -> SceneSpec:
    """Sky above y = 0.25 over grass; two red stars, an orange square at [0.5, 0.75]^2 on top."""
    return SceneSpec(
        seed=3, domain=domain, ground="grass",
        regions=(Region("sky", Curve(0.25), "y", -1),),
        objects=(ObjectSpec("star", "red", (0.2, 0.6), 0.2, 0.0, (0.0, 0.0, 0.0)),
                 ObjectSpec("star", "red", (0.85, 0.85), 0.2, 10.0, (0.0, 0.0, 0.0)),
                 ObjectSpec("square", "orange", (0.625, 0.625), 0.25, 0.0, (0.0, 0.0, 0.0))),
        absent=("blue star", "water"), light=-2.0)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text)


def test_same_seed_same_scene_and_domain_keeps_layout():
    for seed in (0, 1, 123_456):
        a, b = make_scene(seed), make_scene(seed)
        assert np.array_equal(a.image, b.image) and a.caption == b.caption
        assert list(a.phrases) == list(b.phrases)
        assert all(np.array_equal(a.phrases[p], b.phrases[p]) for p in a.phrases)
        spec = sample_scene(seed)
        assert spec.domain == VOCABULARY.domains[seed % 2]
        other = "photo" if spec.domain == "cartoon" else "cartoon"
        assert sample_scene(seed, other) == replace(spec, domain=other)
    assert not np.array_equal(make_scene(0).image, make_scene(2).image)


def test_hand_built_scene_exact_geometry_phrases_and_caption():
    scene = render(_hand_scene(), 128)
    assert scene.caption == "a cartoon of two red stars and an orange square on grass under the sky"
    assert list(scene.phrases) == ["red star", "orange square", "stars", "squares", "sky", "grass",
                                   "blue star", "water"]
    square = scene.phrases["orange square"]
    # Pixel centres (j + 0.5) / 128 in [0.5, 0.75] -> columns and rows 64..95.
    expected = np.zeros((128, 128), dtype=bool)
    expected[64:96, 64:96] = True
    assert np.array_equal(square, expected)
    sky = np.zeros((128, 128), dtype=bool)
    sky[:32] = True
    assert np.array_equal(scene.phrases["sky"], sky)
    assert not scene.phrases["blue star"].any() and not scene.phrases["water"].any()
    assert not scene.present("water") and scene.present("stars")
    # Cartoon colours are flat: deep inside a region the image holds the palette colour.
    assert tuple(scene.image[80, 80]) == OBJECT_RGB["orange"]
    assert tuple(scene.image[5, 5]) == STUFF_RGB["sky"]
    assert tuple(scene.image[120, 10]) == STUFF_RGB["grass"]
    assert scene.image.dtype == np.uint8 and scene.image.shape == (128, 128, 3)


def test_masks_agree_across_render_sizes():
    ious = []
    for seed in range(6):
        spec = sample_scene(seed)
        small, large = render(spec, 128), render(spec, 512)
        assert large.caption == small.caption and list(large.phrases) == list(small.phrases)
        for phrase, mask in small.phrases.items():
            down = cv2.resize(large.phrases[phrase].astype(np.float32), (128, 128), interpolation=cv2.INTER_AREA)
            down = down > 0.5
            if not mask.any():
                assert not down.any()
                continue
            iou = (down & mask).sum() / (down | mask).sum()
            ious.append(iou)
            if mask.sum() >= 150:  # below that, half a pixel of edge is over 5 % of the area
                assert iou > 0.95, (seed, phrase, iou)
    assert np.mean(ious) > 0.97


def test_phrase_masks_partition_and_class_is_union_of_attributes():
    shapes = set(VOCABULARY.shapes)
    for seed in SEEDS:
        scene = make_scene(seed)
        present = {p: m for p, m in scene.phrases.items() if scene.present(p)}
        attributes = {p: m for p, m in present.items() if p.split()[-1] in shapes}
        stuff = {p: m for p, m in present.items() if p in VOCABULARY.stuff}
        cover = sum(m.astype(np.int32) for m in [*attributes.values(), *stuff.values()])
        assert np.array_equal(cover, np.ones((128, 128), dtype=np.int32)), seed
        for shape in {p.split()[-1] for p in attributes}:
            union = np.logical_or.reduce([m for p, m in attributes.items() if p.split()[-1] == shape])
            assert np.array_equal(present[VOCABULARY.plural(shape)], union)
        assert len(present) == len(attributes) + len({p.split()[-1] for p in attributes}) + len(stuff)
        assert all(m.any() for m in present.values()), seed
        assert np.array_equal(scene.labels, label_map(scene.spec, 128))


def test_absent_phrases_are_empty_and_unmentioned_and_caption_covers_scene():
    vocabulary = set(VOCABULARY.words())
    for seed in SEEDS:
        scene = make_scene(seed)
        spec = scene.spec
        assert 1 <= len(spec.absent) <= 2 and len(set(spec.absent)) == len(spec.absent)
        text = f" {scene.caption} "
        for phrase in spec.absent:
            assert not scene.phrases[phrase].any()
            assert f" {phrase} " not in text and f" {phrase}s " not in text and f" {phrase}es " not in text
        words = _words(scene.caption)
        assert set(words) <= vocabulary
        assert words[:2] in (["a", "cartoon"], ["a", "photo"]) and words[1] == spec.domain
        for obj in spec.objects:
            assert re.search(rf"\b{obj.colour} ({obj.shape}|{VOCABULARY.plural(obj.shape)})\b", scene.caption)
        for stuff in VOCABULARY.stuff:
            assert (stuff in words) == (stuff in spec.stuff_present())
        counts = Counter((o.colour, o.shape) for o in spec.objects)
        for (colour, shape), n in counts.items():
            if n > 1:
                assert f"{('two', 'three', 'four', 'five')[n - 2]} {colour} {VOCABULARY.plural(shape)}" in text


def test_scene_statistics_cover_the_vocabulary():
    specs = [sample_scene(seed) for seed in split_seeds("train", 400)]
    counts = Counter(len(s.objects) for s in specs)
    assert set(counts) == {1, 2, 3, 4, 5}
    multi = np.mean([max(Counter(o.shape for o in s.objects).values()) > 1 for s in specs])
    assert 0.22 < multi < 0.4
    assert Counter(s.domain for s in specs) == {"cartoon": 200, "photo": 200}
    assert {o.shape for s in specs for o in s.objects} == set(VOCABULARY.shapes)
    assert {o.colour for s in specs for o in s.objects} == set(VOCABULARY.colours)
    assert {x for s in specs for x in s.stuff_present()} == set(VOCABULARY.stuff)
    sizes = [o.size for s in specs for o in s.objects]
    assert 0.08 <= min(sizes) and max(sizes) <= 0.45
    cut = np.mean([any(((o.polygon() < 0) | (o.polygon() > 1)).any() for o in s.objects) for s in specs])
    assert cut > 0.3
    assert set(VOCABULARY.phrases()) >= {p for s in specs for p in s.absent}
    assert len(VOCABULARY.phrases()) == 6 * 6 + 6 + 4


def test_splits_are_fixed_and_disjoint():
    assert split_seeds("train", 3) == range(0, 3)
    assert split_seeds("test", 2) == range(1_000_000, 1_000_002)
    assert split_seeds("val", 2) == range(2_000_000, 2_000_002)
    full = [set(split_seeds(name)) for name in ("train", "val", "test")]
    assert all(len(s) == 1_000_000 for s in full)
    assert not (full[0] & full[1]) and not (full[0] & full[2]) and not (full[1] & full[2])
    with pytest.raises(LdznetError, match="unknown split 'dev'"):
        split_seeds("dev", 3)
    with pytest.raises(LdznetError, match="out of range"):
        split_seeds("val", 1_000_001)


def test_bad_input_raises_ldznet_error():
    with pytest.raises(LdznetError, match="seed must be an integer >= 0"):
        sample_scene(-1)
    with pytest.raises(LdznetError, match="unknown domain 'sketch'"):
        sample_scene(0, "sketch")
    with pytest.raises(LdznetError, match="render size must be an integer in 8..4096"):
        render(sample_scene(0), 4)


def test_caption_counts_and_articles():
    spec = _hand_scene("photo")
    objects = spec.objects + (ObjectSpec("circle", "orange", (0.1, 0.1), 0.1, 0.0, (0.0, 0.0, 0.0)),) * 2
    spec = replace(spec, objects=objects, regions=(Region("water", Curve(0.5), "x", 1),))
    assert caption(spec) == "a photo of two red stars, an orange square and two orange circles on grass by the water"


def test_cli_sample_writes_documented_files(tmp_path, capsys):
    out = tmp_path / "scene"
    assert main(["world", "sample", "--seed", "5", "-o", str(out), "--size", "64", "--domain", "cartoon"]) == 0
    info = json.loads((out / "phrases.json").read_text())
    scene = make_scene(5, 64, "cartoon")
    assert info["seed"] == 5 and info["domain"] == "cartoon" and info["size"] == 64
    assert info["caption"] == scene.caption and info["caption"] in capsys.readouterr().out
    assert [e["phrase"] for e in info["phrases"]] == list(scene.phrases)
    image = Image.open(out / "image.png")
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), scene.image)
    for entry in info["phrases"]:
        assert entry["file"] == "masks/" + entry["phrase"].replace(" ", "_") + ".png"
        mask = Image.open(out / entry["file"])
        assert mask.mode == "L"
        values = np.asarray(mask)
        assert set(np.unique(values)) <= {0, 255}
        assert np.array_equal(values == 255, scene.phrases[entry["phrase"]])
        assert entry["area"] == int(scene.phrases[entry["phrase"]].sum())
        assert entry["present"] == (entry["phrase"] not in scene.spec.absent)
    assert sorted(p.name for p in (out / "masks").iterdir()) == sorted(
        e["file"][len("masks/"):] for e in info["phrases"])


def test_cli_sample_into_an_earlier_sample_leaves_only_the_new_masks(tmp_path):
    out = tmp_path / "scene"
    assert main(["world", "sample", "--seed", "5", "-o", str(out), "--size", "32"]) == 0
    first = {e["file"] for e in json.loads((out / "phrases.json").read_text())["phrases"]}
    (out / "masks" / "mine.png").write_bytes(b"a user's file")
    (out / "notes.txt").write_text("mine")
    assert main(["world", "sample", "--seed", "6", "-o", str(out), "--size", "32"]) == 0
    second = {e["file"] for e in json.loads((out / "phrases.json").read_text())["phrases"]}
    assert first - second and first & second  # seed 6 names some of seed 5's phrases, not all
    assert {f"masks/{p.name}" for p in (out / "masks").iterdir()} == second | {"masks/mine.png"}
    assert (out / "masks" / "mine.png").read_bytes() == b"a user's file" and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("phrases", ['{"seed": 1, "caption": "x", "phrases": [{"file": "../notes.txt"},'
                                     ' {"file": "masks/../../notes.txt"}, {"file": "/etc/passwd"}, {"file": 3}, 7]}',
                                     '{"phrases": [{"file": "masks/keep.png"}]}', "not json", '[1]'])
def test_cli_sample_removes_nothing_a_foreign_phrases_json_lists(tmp_path, phrases, capsys):
    """A phrases.json of the sample's shape lists only masks/NAME.png files for removal; one of another
    shape is someone else's file, and the sample is refused rather than written over it."""
    out = tmp_path / "scene"
    (out / "masks").mkdir(parents=True)
    (out / "masks" / "keep.png").write_text("kept")
    (tmp_path / "notes.txt").write_text("kept")
    (out / "phrases.json").write_text(phrases)
    ours = phrases.startswith('{"seed"')
    assert main(["world", "sample", "--seed", "5", "-o", str(out), "--size", "32"]) == (0 if ours else 2)
    assert (out / "masks" / "keep.png").read_text() == (tmp_path / "notes.txt").read_text() == "kept"
    if not ours:
        assert capsys.readouterr().err == (f"ldznet world sample: error: {out / 'phrases.json'}: exists and is not a world "
                                           "sample's; choose another -o\n")
        assert (out / "phrases.json").read_text() == phrases and not (out / "image.png").exists()


def test_cli_sample_never_writes_over_a_file_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "scene"
    out.mkdir()
    (out / "image.png").write_text("my photo")
    assert main(["world", "sample", "--seed", "5", "-o", str(out), "--size", "32"]) == 2
    assert capsys.readouterr().err == (f"ldznet world sample: error: {out / 'image.png'}: exists and is no file of an "
                                       f"earlier sample in {out}; choose another -o\n")
    assert sorted(p.name for p in out.iterdir()) == ["image.png"]  # the masks/ folder it made is gone again


def test_cli_sample_that_fails_part_way_leaves_the_earlier_sample_whole(tmp_path, monkeypatch):
    """A full disk (or Ctrl-C) while the new files are written: every file stays the earlier sample's."""
    out = tmp_path / "scene"
    assert main(["world", "sample", "--seed", "5", "-o", str(out), "--size", "32"]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real_save, saved = Image.Image.save, []

    def full_disk(image, fp, *args, **kwargs):
        if len(saved) == 3:
            raise OSError(28, "No space left on device")
        saved.append(fp)
        return real_save(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_disk)
    assert main(["world", "sample", "--seed", "6", "-o", str(out), "--size", "32"]) == 1
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_cli_split_and_errors(capsys):
    assert main(["world", "split", "test", "--count", "3"]) == 0
    assert json.loads(capsys.readouterr().out) == [1_000_000, 1_000_001, 1_000_002]
    with pytest.raises(SystemExit) as refused:  # argparse refuses it, before any work
        main(["world", "sample", "--seed", "-4", "-o", "unused"])
    assert refused.value.code == 2
    assert "argument --seed: expected an integer in [0, 9223372036854775807], got -4" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # a missing command is a usage error, one line
        main(["world"])
    assert refused.value.code == 2


def test_cli_unwritable_output_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    (tmp_path / "scene" / "masks").parent.mkdir()
    (tmp_path / "scene" / "masks").write_text("")
    cases = {("sample", "--seed", "5", "-o", blocker / "scene"): f"cannot write to {blocker}/scene: Not a directory",
             ("sample", "--seed", "5", "-o", blocker): f"{blocker} is a file, not a folder",
             ("sample", "--seed", "5", "-o", tmp_path / "scene"): f"{tmp_path}/scene/masks is a file, not a folder",
             ("train-sd", "--recipe", "smoke", "-o", blocker): f"{blocker} is a file, not a folder"}
    for args, message in cases.items():
        assert main(["world", *map(str, args)]) == 2
        assert capsys.readouterr().err == f"ldznet world {args[0]}: error: {message}\n"
    assert blocker.read_text() == "" and sorted(p.name for p in tmp_path.rglob("*")) == ["file", "masks", "scene"]
