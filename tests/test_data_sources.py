"""Data sources on tiny fixture data sets built here in each real format: PhraseCut, RefCOCO, AIGI
folders, JSONL manifests; polygon and RLE decoding; the streaming reader; `ldznet data summary`."""

from __future__ import annotations

import itertools
import json
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ldznet_ext.cli import main
from ldznet_ext.errors import ImageError, LdznetError
from ldznet_ext.data import refcoco as refcoco_module
from ldznet_ext.data.examples import Example, resize_square
from ldznet_ext.data import geometry
from ldznet_ext.data.geometry import decode_counts, decode_rle, phrasecut_mask, polygon_mask
from ldznet_ext.data.spec import open_source, parse_spec
from ldznet_ext.data.stream import iterate_examples
from ldznet_ext.eval.boundary import mask_boundary
from ldznet_ext.train.augment import PHRASECUT_TEMPLATES, fit_square

pytestmark = pytest.mark.usefixtures("single_thread")


def _image(path, width: int, height: int, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((height, width, 3), value, np.uint8)
    pixels[..., 1] = np.arange(width, dtype=np.uint8)[None] * 3  # not flat, so a bad crop would show
    Image.fromarray(pixels).save(path)


def _mask(path, width: int, height: int, box: tuple[int, int, int, int] | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((height, width), np.uint8)
    if box:
        left, top, right, bottom = box
        mask[top:bottom, left:right] = 255
    Image.fromarray(mask).save(path)


def _corrupt(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")


# -- geometry ---------------------------------------------------------------------------------


def test_polygon_mask_uses_pixel_centres():
    rect = polygon_mask([[1, 1, 5, 1, 5, 4, 1, 4]], 6, 7)
    assert rect.sum() == 12 and rect[1:4, 1:5].all()  # 4 x 3: columns 1..4, rows 1..3
    nested = polygon_mask([[[1, 1], [5, 1], [5, 4], [1, 4]]], 6, 7)
    assert np.array_equal(rect, nested)
    triangle = polygon_mask([[0, 0, 4, 0, 0, 4]], 5, 5)  # centres with x + y < 4
    assert triangle.astype(int).tolist()[:3] == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert triangle.sum() == 6
    union = polygon_mask([[0, 0, 2, 0, 2, 2, 0, 2], [1, 1, 3, 1, 3, 3, 1, 3]], 4, 4)
    assert union.sum() == 7  # two 2x2 squares sharing one pixel
    clipped = polygon_mask([[-2, -2, 2, -2, 2, 2, -2, 2]], 4, 4)
    assert clipped.sum() == 4 and clipped[:2, :2].all()
    with pytest.raises(LdznetError, match="expected a polygon"):
        polygon_mask([[1, 2, 3]], 4, 4)


def test_polygon_rows_in_blocks_equal_one_block(monkeypatch):
    """A polygon of many vertices is filled a few rows at a time (bounded memory): block edges
    must neither drop nor shift a row."""
    rng = np.random.default_rng(1)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 40))
    radii = rng.uniform(5, 19, 40)
    star = np.stack([20 + radii * np.cos(angles), 20 + radii * np.sin(angles)], 1).ravel().tolist()
    whole = polygon_mask([star], 40, 40)
    assert 300 < whole.sum() < 1200
    monkeypatch.setattr(geometry, "_CROSSINGS_PER_BLOCK", 3 * 40)  # 3 rows a block
    assert np.array_equal(polygon_mask([star], 40, 40), whole)


def test_world_objects_and_coco_polygons_share_one_rasteriser():
    """The micro world's masks follow the same pixel-centre rule as COCO polygons, ties included:
    a centre exactly on the triangle's right edge is outside in both."""
    from ldznet_ext.world import spec
    corners = np.array([[0, 0], [4, 0], [0, 4]], np.float64)
    world = spec.polygon_mask(corners / 5, 5, (0, 0, 5, 5))
    assert np.array_equal(world, polygon_mask([corners.tolist()], 5, 5))
    assert not world[2, 1]  # centre (1.5, 2.5) lies on the edge x + y = 4


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools 2.0 on numpy 2
def test_rle_and_polygons_agree_with_pycocotools():
    """The COCO reference implementation (a test dependency): our RLE decoder equals its decoder
    exactly on its own compressed and uncompressed encodings; our polygon rasteriser differs from
    its rasteriser only along polygon edges."""
    from pycocotools import mask as coco_mask
    rng = np.random.default_rng(0)
    for height, width in ((1, 1), (7, 5), (33, 64), (64, 33)):
        truth = rng.random((height, width)) < rng.random()
        compressed = coco_mask.encode(np.asfortranarray(truth.astype(np.uint8)))
        assert np.array_equal(decode_rle({"size": compressed["size"], "counts": compressed["counts"].decode()}), truth)
        runs = np.diff(np.flatnonzero(np.diff(np.r_[-1, truth.T.ravel().astype(int), -1]))).tolist()
        runs = ([0] if truth.T.ravel()[0] else []) + runs  # runs start with background
        assert np.array_equal(decode_rle({"size": [height, width], "counts": runs}), truth)
    for trial in range(20):
        points = rng.uniform(-5, 45, (int(rng.integers(3, 9)), 2))
        polygon = points[np.argsort(np.arctan2(*(points - points.mean(0)).T[::-1]))].ravel().tolist()
        ours = polygon_mask([polygon], 40, 40)
        theirs = coco_mask.decode(coco_mask.frPyObjects([polygon], 40, 40)).any(axis=2)
        differ = ours ^ theirs
        assert differ.sum() <= 0.5 * max(1, mask_boundary(ours).sum()), trial
        assert not (differ & ~(mask_boundary(ours) | mask_boundary(theirs)
                               | mask_boundary(~ours) | mask_boundary(~theirs))).any(), trial


def test_phrasecut_mask_draws_like_its_evaluator():
    square = phrasecut_mask([[[2, 2], [5, 2], [5, 5], [2, 5]]], 8, 8)
    assert square.sum() == 16 and square[2:6, 2:6].all()  # filled and outlined: 2..5 inclusive
    truncated = phrasecut_mask([[[2.9, 2.9], [5.9, 2.9], [5.9, 5.9], [2.9, 5.9]]], 8, 8)
    assert np.array_equal(truncated, square)  # vertices are truncated to integers


def test_rle_decoding():
    assert decode_counts("12322") == [1, 2, 3, 4, 5]  # the 4th and 5th are deltas to the 2nd and 3rd
    assert decode_counts("X1") == [40]  # 8 + 1 << 5: two groups
    assert decode_counts("`0") == [16]  # 16 needs a second group, else its 0x10 bit would mean negative
    assert decode_counts("11G") == [1, 1, -9]  # a lone group with 0x10 set is negative
    assert decode_counts("Q1") == [33]  # 'Q' = 33: group 1 with the continuation bit, then 1 << 5
    columns = decode_rle({"size": [3, 3], "counts": [2, 3, 4]})  # column-major runs: 0 0 | 1 1 1 | 0 0 0 0
    assert columns.astype(int).tolist() == [[0, 1, 0], [0, 1, 0], [1, 0, 0]]
    assert np.array_equal(decode_rle({"size": [3, 3], "counts": "234"}), columns)
    with pytest.raises(LdznetError, match="cover 8 pixels, the mask has 3x3"):
        decode_rle({"size": [3, 3], "counts": [2, 3, 3]})


def test_hostile_rle_and_polygons_are_refused_in_one_line():
    # an annotation's size is checked against its image before decoding: 1e10 pixels cost nothing
    with pytest.raises(LdznetError, match="RLE of 100000x100000 on a 3x2 image"):
        decode_rle({"size": [100000, 100000], "counts": [10**10]}, shape=(2, 3))
    for counts in (["a"], [1.5, 4.5], [10**30], "\xff\xfe", b"\xff"):
        with pytest.raises(LdznetError, match="RLE"):
            decode_rle({"size": [2, 3], "counts": counts})
    # coordinates near the float range made the crossing NaN (an IndexError); far ones are refused
    with pytest.raises(LdznetError, match=r"coordinate is beyond \+-2147483648 px"):
        polygon_mask([[0, 1e308, 1e308, -1e308, 0, -1e308]], 4, 4)
    with pytest.raises(LdznetError, match="coordinate is beyond"):
        phrasecut_mask([[[0, 0], [1e30, 0], [5, 1e30]]], 4, 4)
    assert polygon_mask([[0, 0, 1e6, 0, 1e6, 1e6, 0, 1e6]], 2, 2).all()  # far but finite: clipped to the image


# -- PhraseCut --------------------------------------------------------------------------------


@pytest.fixture
def phrasecut(tmp_path):
    root = tmp_path / "VGPhraseCut_v0"
    _image(root / "images" / "10.jpg", 20, 12)
    _image(root / "images" / "3.jpg", 8, 8)
    _image(root / "images" / "5.jpg", 9, 9)  # the image list says 10x9
    _corrupt(root / "images" / "7.jpg")
    tasks = [
        {"task_id": "10__1", "image_id": 10, "phrase": "red car", "instance_boxes": [[2, 2, 4, 4], [10, 1, 3, 2]],
         "Polygons": [[[[2, 2], [5, 2], [5, 5], [2, 5]]], [[[10, 1], [12, 1], [12, 2], [10, 2]]]]},
        {"task_id": "3__1", "image_id": 3, "phrase": "sky", "instance_boxes": [[0, 0, 8, 2]],
         "Polygons": [[[[0, 0], [7, 0], [7, 1], [0, 1]], [[6, 6], [7, 6], [7, 7]]]]},
        {"task_id": "10__2", "image_id": 10, "phrase": "road", "instance_boxes": [[0, 10, 20, 2]],
         "Polygons": [[[[0, 10], [19, 10], [19, 11], [0, 11]]]]},
        {"task_id": "7__1", "image_id": 7, "phrase": "tree", "instance_boxes": [], "Polygons": [[[[0, 0], [1, 0], [1, 1]]]]},
        {"task_id": "5__1", "image_id": 5, "phrase": "wall", "instance_boxes": [], "Polygons": [[[[0, 0], [1, 0], [1, 1]]]]},
    ]
    (root / "refer_test.json").write_text(json.dumps(tasks))
    sizes = [{"image_id": 10, "width": 20, "height": 12, "split": "test"}, {"image_id": 5, "width": 10, "height": 9}]
    (root / "image_data_split3000.json").write_text(json.dumps(sizes))
    return root


def test_phrasecut_source(phrasecut):
    source = open_source(f"phrasecut:{phrasecut}:test")
    assert len(source) == 4 and source.description == f"phrasecut:{phrasecut}:test"
    small, wrong_size, corrupt, big = 0, 1, 2, 3  # images in id order: 3, 5, 7, 10
    example = source[big]
    assert example.key == "phrasecut:10" and example.image.shape == (12, 20, 3)
    (car, car_mask), (road, road_mask) = example.pairs
    assert (car, road) == ("red car", "road")  # tasks of one image in file order
    assert car_mask.sum() == 16 + 3 * 2 and car_mask[2:6, 2:6].all() and car_mask[1:3, 10:13].all()
    assert road_mask.sum() == 40 and road_mask[10:12].all()
    sky = source[small].pairs[0][1]
    assert sky.sum() == 16 + 3 and sky[:2].all()  # two polygons of one instance: a band and a triangle
    with pytest.raises(ImageError, match=f"{phrasecut / 'images' / '7.jpg'}: "):
        source[corrupt]
    with pytest.raises(ImageError, match="9x9 but PhraseCut's image list says 10x9"):
        source[wrong_size]


def test_phrasecut_spec_errors_and_image_folders(phrasecut, tmp_path):
    other = tmp_path / "VG_100K_2"
    _image(other / "7.jpg", 4, 4)
    source = open_source(f"phrasecut:{phrasecut}:test?images={other},{phrasecut / 'images'}")
    assert source[2].image.shape == (4, 4, 3)  # the good copy in the first folder
    assert source[3].image.shape == (12, 20, 3)  # only in the second folder
    with pytest.raises(LdznetError, match="expected one of train, val, test, miniv"):
        open_source(f"phrasecut:{phrasecut}:testing")
    with pytest.raises(LdznetError, match="refer_val.json: not found"):
        open_source(f"phrasecut:{phrasecut}:val")
    with pytest.raises(LdznetError, match="unknown option colour"):
        open_source(f"phrasecut:{phrasecut}:test?colour=1")


@pytest.mark.parametrize("polygons, reason", [
    (5, "'Polygons' must be a list of instances, each a list of polygons [[x, y], ...], got 5"),
    ([5], "'Polygons' must be a list of instances, each a list of polygons [[x, y], ...], got [5]"),
    ([[5]], "expected a polygon as [[x, y], ...] or [x0, y0, x1, y1, ...], got 5"),
    ([[[5]]], "expected a polygon as [[x, y], ...] or [x0, y0, x1, y1, ...], got [5]"),
    ([[[[0, 0], [1, "x"], [1, 1]]]], "a polygon must be numbers, got [[0, 0], [1, 'x'], [1, 1]]"),
    (None, "'Polygons' must be a list of instances, each a list of polygons [[x, y], ...], got None"),
])
def test_phrasecut_hostile_polygons_are_unreadable_examples(phrasecut, capsys, polygons, reason):
    """A task's Polygons that is not instances of polygons of [x, y] points (a TypeError traceback when the
    data set was opened) fails its image's example, as a bad RefCOCO annotation does: logged and skipped in
    training and evaluation, listed by data summary; the other images still read."""
    tasks = json.loads((phrasecut / "refer_test.json").read_text())
    tasks[1]["Polygons"] = polygons  # the only task of image 3, example 0
    (phrasecut / "refer_test.json").write_text(json.dumps(tasks))
    source = open_source(f"phrasecut:{phrasecut}:test")
    assert [p for p, _ in source[3].pairs] == ["red car", "road"]
    message = f"{phrasecut / 'refer_test.json'} task 1 (image 3): {reason}"
    with pytest.raises(LdznetError) as error:
        source[0]
    assert str(error.value) == message
    assert main(["data", "summary", f"phrasecut:{phrasecut}:test"]) == 1
    assert f"- unreadable example 0: {message}\n" in capsys.readouterr().out


@pytest.mark.parametrize("phrase", [None, 5, ["red", "car"]])
def test_phrasecut_a_phrase_that_is_not_text_fails_its_example(phrasecut, phrase):
    """str() made a null phrase the text "None", trained on as a phrase."""
    tasks = json.loads((phrasecut / "refer_test.json").read_text())
    tasks[1]["phrase"] = phrase  # the only task of image 3, example 0
    (phrasecut / "refer_test.json").write_text(json.dumps(tasks))
    source = open_source(f"phrasecut:{phrasecut}:test")
    assert [p for p, _ in source[3].pairs] == ["red car", "road"]
    with pytest.raises(LdznetError) as error:
        source[0]
    assert str(error.value) == f"{phrasecut / 'refer_test.json'} task 1 (image 3): 'phrase' must be text, got {phrase}"


@pytest.mark.parametrize("sizes, reason", [
    ([{"image_id": 10, "width": 20}], "entry 0: expected an object with image_id, width and height (integers, sizes "
                                      ">= 1), got {'image_id': 10, 'width': 20}"),
    ([{"image_id": 10, "width": 20, "height": 12}, {"image_id": 5, "height": 9}],
     "entry 1: expected an object with image_id, width and height (integers, sizes >= 1), got {'image_id': 5, "
     "'height': 9}"),
    ([5], "entry 0: expected an object with image_id, width and height (integers, sizes >= 1), got 5"),
    ([{"image_id": 10, "width": "20", "height": 12}], "entry 0: expected an object with image_id, width and height "
                                                      "(integers, sizes >= 1), got {'image_id': 10, 'width': '20', "
                                                      "'height': 12}"),
    ([{"image_id": 10, "width": 0, "height": 12}], "entry 0: expected an object with image_id, width and height "
                                                   "(integers, sizes >= 1), got {'image_id': 10, 'width': 0, "
                                                   "'height': 12}"),
    ({"10": [20, 12]}, "expected PhraseCut's image list: a list of objects with image_id, width and height, got a "
                       "dict"),
])
def test_phrasecut_image_list_must_be_objects_with_sizes(phrasecut, capsys, sizes, reason):
    """The image list is one file for the whole data set (as RefCOCO's instances.json): an entry without a width
    or height, or a file that is not a list of objects, refuses the data set in one line (a KeyError or
    TypeError traceback before)."""
    (phrasecut / "image_data_split3000.json").write_text(json.dumps(sizes))
    message = f"{phrasecut / 'image_data_split3000.json'}: {reason}"
    with pytest.raises(LdznetError) as error:
        open_source(f"phrasecut:{phrasecut}:test")
    assert str(error.value) == message
    assert main(["data", "summary", f"phrasecut:{phrasecut}:test"]) == 1
    assert f"INVALID: cannot open: {message}\n" in capsys.readouterr().out


# -- RefCOCO ----------------------------------------------------------------------------------


@pytest.fixture
def refcoco(tmp_path):
    root = tmp_path / "refer" / "data" / "refcoco"
    images = tmp_path / "refer" / "data" / "images" / "mscoco" / "images" / "train2014"
    _image(images / "COCO_train2014_000000000001.jpg", 10, 6)
    _image(images / "COCO_train2014_000000000002.jpg", 5, 4)
    instances = {
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 6, "width": 10},
                   {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "height": 4, "width": 5},
                   {"id": 3, "file_name": "unused.jpg", "height": 1, "width": 1}],
        "annotations": [{"id": 11, "image_id": 1, "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4]], "category_id": 1},
                        {"id": 12, "image_id": 1, "segmentation": [[6, 0, 9, 0, 9, 2, 6, 2], [0, 5, 1, 5, 1, 6, 0, 6]]},
                        {"id": 21, "image_id": 2, "segmentation": {"size": [4, 5], "counts": "42<0"}}],
        "categories": [{"id": 1, "name": "person"}]}
    root.mkdir(parents=True)
    (root / "instances.json").write_text(json.dumps(instances))

    def ref(ref_id, ann_id, image_id, split, *sentences):
        return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "category_id": 1,
                "file_name": f"COCO_train2014_{image_id:012d}_{ref_id}.jpg",
                "sentences": [{"sent_id": 100 * ref_id + i, "sent": s, "raw": s.upper(), "tokens": s.split()}
                              for i, s in enumerate(sentences)]}

    refs = [ref(1, 11, 1, "testA", "man on left", "guy in red"), ref(2, 12, 1, "testA", "top right thing"),
            ref(3, 21, 2, "testB", "bowl"), ref(4, 21, 2, "train", "a bowl")]
    (root / "refs(unc).json").write_text(json.dumps(refs))
    (root / "refs(google).p").write_bytes(b"\x80\x04N.")  # a pickle: must never be loaded
    return root


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools 2.0 on numpy 2
@pytest.mark.parametrize("rasteriser", ["pycocotools", "ours"])
def test_refcoco_source(refcoco, rasteriser, monkeypatch):
    if rasteriser == "ours":
        monkeypatch.setattr(refcoco_module, "coco_mask", None)
    else:
        assert refcoco_module.coco_mask is not None, "pycocotools is a test dependency (pyproject.toml)"
    test_a = open_source(f"refcoco:{refcoco}:testA")
    assert len(test_a) == 1 and test_a.description == f"refcoco:{refcoco}:testA (unc)"
    example = test_a[0]
    assert example.key == "refcoco:1" and example.image.shape == (6, 10, 3)
    assert [p for p, _ in example.pairs] == ["man on left", "guy in red", "top right thing"]
    person, same, thing = (m for _, m in example.pairs)
    assert person.sum() == 12 and person[1:4, 1:5].all() and person is same  # one mask per object
    assert thing.sum() == 3 * 2 + 1 and thing[0:2, 6:9].all() and thing[5, 0]
    # The RLE "42<0" is the runs [4, 2, 12, 2 (the 4th is a delta to the 2nd)], column-major over 4 x 5.
    bowl = open_source(f"refcoco:{refcoco}:testB")[0].pairs[0][1]
    assert bowl.astype(int).tolist() == [[0, 1, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 1]]
    test = open_source(f"refcoco:{refcoco}:test")  # testA and testB
    assert len(test) == 2 and sum(len(test[i].pairs) for i in range(2)) == 4


def test_refcoco_errors(refcoco, tmp_path):
    with pytest.raises(LdznetError, match=r"refs\(google\).p is a pickle, which is never loaded"):
        open_source(f"refcoco:{refcoco}:val?partition=google")
    with pytest.raises(LdznetError, match="no refs in split 'val' .splits there: testA, testB, train"):
        open_source(f"refcoco:{refcoco}:val")
    with pytest.raises(LdznetError, match="partitions umd, google, not 'unc'"):
        open_source(f"refcocog:{refcoco}:val?partition=unc")
    source = open_source(f"refcoco:{refcoco}:train?images={tmp_path / 'nowhere'}")
    with pytest.raises(ImageError, match="nowhere.*COCO_train2014_000000000002.jpg: file not found"):
        source[0]
    refs = json.loads((refcoco / "refs(unc).json").read_text())
    refs[0]["sentences"][0]["sent"] = None  # str() made it the phrase "None"
    (refcoco / "refs(unc).json").write_text(json.dumps(refs))
    with pytest.raises(LdznetError, match=r"expected refs with .* \(TypeError\('a sentence is None, not text'\)\)"):
        open_source(f"refcoco:{refcoco}:{refs[0]['split']}")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools 2.0 on numpy 2
@pytest.mark.parametrize("rasteriser", ["pycocotools", "ours"])
def test_refcoco_hostile_annotations_are_unreadable_examples(refcoco, rasteriser, monkeypatch):
    """An annotation of another size, garbage counts or polygons fails its example with an LdznetError (logged and
    skipped), never a traceback; the huge RLE used 13 GB before its size was compared with the image's."""
    if rasteriser == "ours":
        monkeypatch.setattr(refcoco_module, "coco_mask", None)
    instances = json.loads((refcoco / "instances.json").read_text())
    hostile = {"size": [100000, 100000], "counts": [10**10]}, {"size": [4, 5], "counts": ["a"]}, [5, 6, 7], [["x"] * 6]
    for segmentation in hostile:
        instances["annotations"][2]["segmentation"] = segmentation
        (refcoco / "instances.json").write_text(json.dumps(instances))
        with pytest.raises(LdznetError, match="refcoco.* annotation 21: "):
            open_source(f"refcoco:{refcoco}:testB")[0]


# -- AIGI folders and manifests ---------------------------------------------------------------


@pytest.fixture
def aigi(tmp_path):
    root = tmp_path / "aigi"
    _image(root / "images" / "castle.png", 8, 6)
    _image(root / "images" / "cat.jpg", 4, 4)
    _mask(root / "masks" / "castle" / "red_roof.png", 8, 6, (0, 0, 8, 2))
    _mask(root / "masks" / "castle" / "moon.png", 8, 6, None)
    _mask(root / "masks" / "castle" / "q1.png", 8, 6, (1, 1, 3, 4))
    _mask(root / "masks" / "cat" / "cat.png", 4, 4, (0, 0, 2, 2))
    (root / "prompts.json").write_text(json.dumps({"castle/q1.png": "what's that? a door"}))
    return root


def test_aigi_folder(aigi):
    source = open_source(f"aigi:{aigi}")
    assert len(source) == 2
    castle = source[0]
    assert castle.image.shape == (6, 8, 3)
    assert [(p, int(m.sum())) for p, m in castle.pairs] == [("moon", 0), ("what's that? a door", 6), ("red roof", 16)]
    assert source[1].pairs[0][0] == "cat" and source[1].pairs[0][1].sum() == 4
    _image(aigi / "images" / "dog.png", 4, 4)
    with pytest.raises(LdznetError, match="images without masks/NAME/.*: dog"):
        open_source(f"folder:{aigi}")
    (aigi / "images" / "dog.png").unlink()
    _mask(aigi / "masks" / "castle" / "wall.png", 4, 4, None)
    with pytest.raises(ImageError, match="wall.png: the mask is 4x4 but its image is 8x6"):
        open_source(f"aigi:{aigi}")[0]


@pytest.mark.parametrize("case, message", [
    ("null prompt", "prompts.json: 'castle/q1.png': gives no prompt (blank, or not text: None); name the mask after "
                    "its prompt, or give the prompt as text in prompts.json"),
    ("list prompt", "prompts.json: 'castle/q1.png': gives no prompt (blank, or not text: ['a', 'b']); name the mask "
                    "after its prompt, or give the prompt as text in prompts.json"),
    ("blank name", "_.png: gives no prompt (blank, or not text: ''); name the mask after its prompt, or give the "
                   "prompt as text in prompts.json"),
    ("two images", "castle.jpg and castle.png share the name 'castle', which masks/castle/ stands for; keep one"),
])
def test_aigi_prompts_and_names_that_cannot_be_read_are_refused(aigi, case, message):
    """A null or list prompt was trained on as the text 'None' or "['a', 'b']", _.png as a prompt of no words,
    and of castle.png and castle.jpg one was dropped without a word."""
    if case.endswith("prompt"):
        (aigi / "prompts.json").write_text(json.dumps({"castle/q1.png": None if case == "null prompt" else ["a", "b"]}))
    elif case == "blank name":
        _mask(aigi / "masks" / "castle" / "_.png", 8, 6, None)
    else:
        _image(aigi / "images" / "castle.jpg", 8, 6)
    with pytest.raises(LdznetError) as error:
        open_source(f"aigi:{aigi}")
    assert str(error.value).endswith(message)


@pytest.mark.parametrize("phrase", ["", "   "])
def test_a_manifest_row_with_a_blank_phrase_is_refused_by_line(tmp_path, phrase):
    _image(tmp_path / "a.png", 6, 5)
    rows = [{"image": "a.png", "phrase": "box", "polygons": []}, {"image": "a.png", "phrase": phrase, "polygons": []}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(LdznetError, match=f"^{tmp_path / 'm.jsonl'}:2: the phrase is blank$"):
        open_source(str(tmp_path / "m.jsonl"))


def test_json_nested_thousands_deep_is_one_line(tmp_path):
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(LdznetError, match=r"deep.jsonl:1: expected a JSON object with 'image'"):
        open_source(str(tmp_path / "deep.jsonl"))
    (tmp_path / "pc" / "images").mkdir(parents=True)
    (tmp_path / "pc" / "refer_test.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(LdznetError, match=r"refer_test.json: cannot read .* \(RecursionError: "):
        open_source(f"phrasecut:{tmp_path / 'pc'}:test")


def test_manifest_polygons_and_bad_files(tmp_path):
    _image(tmp_path / "a.png", 6, 5)
    _corrupt(tmp_path / "bad_mask.png")
    rows = [{"image": "a.png", "phrase": "box", "polygons": [[1, 1, 5, 1, 5, 4, 1, 4]]},
            {"image": "a.png", "phrase": "nothing", "polygons": []},
            {"image": "a.png", "phrase": "broken", "mask": "bad_mask.png"},
            {"image": "missing.png", "phrase": "x", "polygons": []}]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    source = open_source(f"jsonl:{tmp_path / 'set.jsonl'}")
    with pytest.raises(ImageError, match=f"{tmp_path / 'bad_mask.png'}: cannot read the mask"):
        source[0]
    with pytest.raises(ImageError, match=f"{tmp_path / 'missing.png'}: file not found"):
        source[1]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:2]))
    (box, mask), (nothing, empty) = open_source(str(tmp_path / "set.jsonl"))[0].pairs
    assert (box, int(mask.sum()), nothing, int(empty.sum())) == ("box", 12, "nothing", 0)


def _png_header(path, width: int, height: int) -> None:
    """A PNG that claims width x height grey pixels and holds none: only its header can be read."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_manifest_encoding_and_field_types(tmp_path):
    """A non-UTF-8 manifest was a UnicodeDecodeError traceback; a null phrase was read as the text "None"."""
    _image(tmp_path / "a.png", 6, 5)
    path = tmp_path / "set.jsonl"
    path.write_bytes(b'{"image": "a.png", "phrase": "caf\xe9", "polygons": []}\n')
    with pytest.raises(LdznetError, match="set.jsonl: cannot read the manifest .'utf-8' codec can't decode"):
        open_source(str(path))
    for phrase in ("null", '{"a": 1}', "3"):
        path.write_text(f'{{"image": "a.png", "phrase": {phrase}, "polygons": []}}\n')
        with pytest.raises(LdznetError, match="set.jsonl:1: expected a JSON object with 'image', 'phrase'"):
            open_source(str(path))
    path.write_bytes(b'\xef\xbb\xbf{"image": "a.png", "phrase": "box", "polygons": [[1, 1, 5, 1, 5, 4]]}\n')
    assert open_source(str(path))[0].pairs[0][0] == "box"  # a byte-order mark, as some editors write one


def test_a_mask_of_another_size_is_refused_from_its_header(tmp_path):
    """Pillow's decompression-bomb error escaped as a traceback; a mask is now compared by its header's size
    before any pixel is decoded."""
    _image(tmp_path / "a.png", 6, 5)
    _png_header(tmp_path / "bomb.png", 20000, 20000)  # 400 M pixels: over Pillow's limit
    _png_header(tmp_path / "wide.png", 60000, 5)
    for name in ("bomb.png", "wide.png"):
        (tmp_path / "set.jsonl").write_text(json.dumps({"image": "a.png", "phrase": "x", "mask": name}))
        with pytest.raises(ImageError, match=f"{name}: (the mask is .* but its image is 6x5|cannot read the mask)"):
            open_source(str(tmp_path / "set.jsonl"))[0]


def test_a_postscript_mask_is_never_handed_to_ghostscript(tmp_path, monkeypatch):
    """A manifest's mask is decoded as images are (images.open_image): an EPS file named .png would run
    Ghostscript when converted to grey."""
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: pytest.fail("Ghostscript was run on a mask"))
    _image(tmp_path / "a.png", 16, 12)
    (tmp_path / "m.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 12\nshowpage\n")
    (tmp_path / "set.jsonl").write_text(json.dumps({"image": "a.png", "phrase": "x", "mask": "m.png"}))
    with pytest.raises(ImageError, match="m.png: cannot read the mask"):
        open_source(str(tmp_path / "set.jsonl"))[0]


def test_spec_grammar():
    assert parse_spec("phrasecut:C:/data:x/VG:test?images=a,b&x=") == ("phrasecut", "C:/data:x/VG:test",
                                                                       {"images": "a,b", "x": ""})
    assert parse_spec("runs/set.jsonl") == ("jsonl", "runs/set.jsonl", {})
    assert parse_spec("refcoco+:/d:val") == ("refcoco+", "/d:val", {})
    with pytest.raises(LdznetError, match="options are KEY=VALUE"):
        parse_spec("aigi:/d?images")
    with pytest.raises(LdznetError, match="unknown data spec 'coco:/d'"):
        parse_spec("coco:/d")
    with pytest.raises(LdznetError, match="world data takes no options"):
        open_source("world:test:1?x=1")
    with pytest.raises(LdznetError, match="option negatives is given twice"):
        parse_spec("world:test:5?negatives=1&negatives=2")  # the last one won silently
    for count in ("²", "٣", "9" * 5000, "1e3", "-1"):  # int() raised ValueError tracebacks for the first three
        with pytest.raises(LdznetError, match="expected world:SPLIT:N"):
            open_source(f"world:test:{count}")
    for count in (0, 1_000_001):  # the limits' bound, as --count's: not the seed range's own message
        with pytest.raises(LdznetError) as error:
            open_source(f"world:test:{count}")
        assert str(error.value) == (f"the number of scenes in 'world:test:{count}' must be an integer in "
                                    f"[1, 1000000], got {count}")


def test_resize_square_is_clipseg_geometry():
    image = np.zeros((4, 2, 3), np.uint8)
    image[:, 1] = 255
    mask = np.zeros((4, 2), bool)
    mask[1] = True  # row 1 only: torch's nearest takes source rows floor(i * 4 / 2) = 0, 2
    mask[2, 0] = True
    square = resize_square(Example("k", image, (("thing", mask),)), 2)
    assert square.key == "k@square2" and square.image.shape == (2, 2, 3)
    assert square.image[..., 0].tolist() == [[0, 255], [0, 255]]  # align_corners keeps the corner columns
    assert square.pairs[0][1].tolist() == [[False, False], [True, False]]
    wide = resize_square(Example("w", np.zeros((2, 3, 3), np.uint8), (("t", np.ones((2, 3), bool)),)), 5)
    assert wide.image.shape == (5, 5, 3) and wide.pairs[0][1].all()


# -- streaming and the summary command --------------------------------------------------------


@pytest.fixture
def manifest(tmp_path):
    rows = []
    for i in range(5):
        if i == 2:
            _corrupt(tmp_path / f"{i}.png")
        else:
            _image(tmp_path / f"{i}.png", 4 + i, 4, value=10 * i)
        rows.append({"image": f"{i}.png", "phrase": f"thing {i}", "polygons": [[0, 0, 2, 0, 2, 2, 0, 2]] if i % 2 else []})
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return tmp_path / "set.jsonl"


@pytest.mark.parametrize("workers", [0, 2])
def test_iterate_examples_skips_unreadable(manifest, workers):
    source = open_source(str(manifest))
    errors = []
    order = [4, 2, 0, 1, 2, 3]
    out = list(iterate_examples(source, order, workers, on_error=lambda i, e: errors.append((i, e))))
    assert [i for i, _ in out] == [4, 0, 1, 3]
    assert all(ex.key == source[i].key and ex.image.shape == (4, 4 + i, 3) for i, ex in out)
    assert [i for i, _ in errors] == [2, 2]
    assert all(isinstance(e, ImageError) and str(manifest.parent / "2.png") in str(e) for _, e in errors)


def test_iterate_examples_logs_by_default(manifest, caplog):
    with caplog.at_level(logging.WARNING, logger="ldznet_ext.data"):
        assert [i for i, _ in iterate_examples(open_source(str(manifest)), range(3))] == [0, 1]
    assert "skipping example 2: " in caplog.text and "2.png" in caplog.text


def test_data_summary_command(manifest, aigi, tmp_path, capsys):
    out = tmp_path / "summary.json"
    assert main(["data", "summary", f"aigi:{aigi}", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "- images: 2 (2 read, 0 unreadable)" in text and "- phrases: 4 (3 present, 1 absent; 4 distinct)" in text
    assert "- image sizes: 4x4 .. 8x6" in text and text.rstrip().endswith("OK")
    # present areas: 4/16, 6/48, 16/48
    summary = json.loads(out.read_text())[0]
    assert summary["valid"] and summary["area"]["min"] == pytest.approx(0.125)
    assert summary["area"]["max"] == pytest.approx(1 / 3) and summary["area"]["median"] == pytest.approx(0.25)
    assert main(["data", "summary", str(manifest), "world:nowhere", "--workers", "2"]) == 1
    text = capsys.readouterr().out
    assert "- images: 5 (4 read, 1 unreadable)" in text and "- phrases: 4 (2 present, 2 absent" in text
    assert f"- unreadable example 2: {manifest.parent / '2.png'}: " in text
    assert "INVALID: unreadable examples" in text and "INVALID: cannot open: world data spec" in text


def test_iterate_examples_takes_endless_orders(manifest):
    """A training order can be endless: the reader follows it lazily, in order, skipping index 2."""
    stream = iterate_examples(open_source(str(manifest)), (i % 5 for i in itertools.count(1)), workers=2)
    assert [i for i, _ in itertools.islice(stream, 6)] == [1, 3, 4, 0, 1, 3]
    stream.close()


def test_phrasecut_examples_take_the_official_crop_and_templates(phrasecut):
    assert PHRASECUT_TEMPLATES == (  # the official recipe's templates (koutilya-pnvr/LD-ZNet), in CLIPSeg's order
        "a photo of a {}.", "a photograph of a {}.", "an image of a {}.", "{}.", "a cropped photo of a {}.",
        "a good photo of a {}.", "a photo of one {}.", "a bad photo of a {}.", "a photo of the {}.")
    road = open_source(f"phrasecut:{phrasecut}:test")[3].samples()[1]
    assert road.phrase == "road" and road.mask.shape == (12, 20)
    # Square side min(12, 20) = 12: the road (rows 10-11) gives every crop 24 px = 10 % > 5 % of the
    # image, so the first draw is kept: top 0, left = the generator's first integer below 9.
    rng = np.random.default_rng(7)
    top, left = int(rng.integers(1)), int(rng.integers(9))  # the draws fit_square makes
    square = fit_square(road, 6, np.random.default_rng(7))
    assert square.image.shape == (6, 6, 3) and square.key is None
    assert square.mask.sum() == 6 and square.mask[5].all()  # nearest rows 1, 3, ..., 11 of the crop
    expected = np.asarray(Image.fromarray(road.image[top:top + 12, left:left + 12]).resize((6, 6), Image.BILINEAR))
    assert np.array_equal(square.image, expected)


def _mask_files(inside: np.ndarray) -> dict[str, Image.Image]:
    """One mask, stored as the tools that make masks store it."""
    dark = np.zeros((*inside.shape, 3), np.uint8)
    dark[inside] = (0, 0, 1)
    palette = Image.fromarray(inside.astype(np.uint8), "P")
    palette.putpalette([0, 0, 0, 0, 0, 2] + [0] * 762)  # index 1 a colour whose grey rounds to 0
    inverted = Image.fromarray(inside.astype(np.uint8), "P")
    inverted.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)  # index 0 shown white: still outside
    alpha = np.dstack([inside.astype(np.uint8) * 255] * 3 + [np.full(inside.shape, 255, np.uint8)])
    return {"grey.png": Image.fromarray(inside.astype(np.uint8) * 255), "dark.png": Image.fromarray(dark),
            "palette.png": palette, "inverted.png": inverted,
            "float.tif": Image.fromarray(inside.astype(np.float32) * 0.5, "F"),
            "bits.png": Image.fromarray(inside.astype(np.uint8) * 255).convert("1"),
            "sixteen.png": Image.fromarray(inside.astype(np.uint16) * 3),
            "rgba.png": Image.fromarray(alpha, "RGBA"),
            "cmyk.tif": Image.fromarray(inside.astype(np.uint8) * 255).convert("CMYK")}


def test_a_mask_is_inside_where_any_stored_value_is_not_zero(tmp_path):
    """docs/datasets.md: any image, non-zero = inside. Read through an 8-bit grey, a dark colour, a faint
    palette colour or a float of 0.5 became 0 (absent phrases, silently), an inverted palette inverted."""
    inside = np.zeros((6, 8), bool)
    inside[1:4, 2:6] = True
    Image.fromarray(np.full((6, 8, 3), 90, np.uint8)).save(tmp_path / "image.png")
    lines = []
    for name, image in _mask_files(inside).items():
        image.save(tmp_path / name)
        lines.append(json.dumps({"image": "image.png", "phrase": name, "mask": name}))
    (tmp_path / "masks.jsonl").write_text("\n".join(lines) + "\n")
    source = open_source(str(tmp_path / "masks.jsonl"))
    read = {phrase: mask for example in (source[i] for i in range(len(source))) for phrase, mask in example.pairs}
    assert {name: bool(np.array_equal(mask, inside)) for name, mask in read.items()} == {name: True for name in read}


@pytest.mark.parametrize("image_id", ["1e400", "100000000000000000000000", "1.9", "true", '"7"'])
def test_data_set_ids_that_are_not_integers_are_named(tmp_path, image_id):
    """1e400 and 10^23 were an OverflowError traceback, 1.9 silently image 1."""
    (tmp_path / "pc" / "images").mkdir(parents=True)
    (tmp_path / "pc" / "refer_test.json").write_text(
        '[{"image_id": ' + image_id + ', "phrase": "box", "Polygons": [[[[2, 2], [10, 2], [10, 10], [2, 10]]]]}]')
    with pytest.raises(LdznetError, match=r"^refer_test.json task 0: expected image_id, phrase and Polygons"):
        open_source(f"phrasecut:{tmp_path / 'pc'}:test")
    root = tmp_path / "rc"
    (root / "images").mkdir(parents=True)
    (root / "refs(unc).json").write_text(
        '[{"image_id": ' + image_id + ', "ann_id": 7, "split": "val", "sentences": [{"sent": "box"}]}]')
    (root / "instances.json").write_text('{"images": [], "annotations": []}')
    with pytest.raises(LdznetError, match=r"expected refs with ann_id, image_id, split and sentences\[\].sent"):
        open_source(f"refcoco:{root}:val")
