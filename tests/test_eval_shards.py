"""Evaluation at scale: shards merge to exactly the unsharded metrics, unreadable examples are
skipped, the square protocol, and the paper's table shapes (markdown and JSON)."""

from __future__ import annotations

import argparse
import json
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ldznet_ext.cli import eval as eval_cli
from ldznet_ext.cli import main
from ldznet_ext.data.examples import Example
from ldznet_ext.errors import LdznetError
from ldznet_ext.eval.boundary import BoundaryMetrics
from ldznet_ext.eval.evaluate import FORMAT, VERSION, EvalResult, evaluate, merge_results
from ldznet_ext.eval.metrics import SegmentationMetrics
from ldznet_ext.eval.tables import build_table, default_table, markdown_table

pytestmark = pytest.mark.usefixtures("single_thread")


class ListSource(list):
    description = "list:fixture"


class Noisy:
    """A segmenter stand-in: each phrase's true mask blended with noise seeded by (image, phrase), so
    the maps are the same whichever process or order asks, and the metrics are non-trivial."""

    def __init__(self, source):
        self.backbone = SimpleNamespace(device=torch.device("cpu"))
        self.source = source
        self.image = None
        self.terms = []

    def set_image(self, image: np.ndarray) -> None:
        self.image = image

    def predict_terms(self, terms):
        self.terms.append(list(terms))
        example = next(e for e in self.source if e.image.shape == self.image.shape and np.array_equal(e.image, self.image))
        out = {}
        for phrase, mask in example.pairs:
            if phrase in terms:
                rng = np.random.default_rng(zlib.crc32(phrase.encode()) + int(self.image.sum()))
                out[phrase] = torch.from_numpy(0.6 * mask + 0.4 * rng.random(mask.shape)).float()
        return out

    def reset_image(self) -> None:
        self.image = None


def _source(count: int = 7) -> ListSource:
    rng = np.random.default_rng(0)
    examples = []
    for i in range(count):
        height, width = 6 + i % 3, 9 - i % 2
        pairs = []
        for j in range(1 + i % 3):
            mask = rng.random((height, width)) < 0.3 * j  # j == 0: absent
            pairs.append((f"thing {i}.{j}", mask))
        examples.append(Example(f"e{i}", rng.integers(0, 255, (height, width, 3), dtype=np.uint8), tuple(pairs)))
    return ListSource(examples)


def test_shards_merge_to_exactly_the_unsharded_metrics(tmp_path):
    source = _source()
    whole = evaluate(Noisy(source), source, "m", progress=False)
    assert whole.examples == 7 and len(whole.metrics) == sum(bool(m.any()) for e in source for _, m in e.pairs)
    shards = [evaluate(Noisy(source), source, "m", progress=False, shard=(k, 3)) for k in (1, 2, 3)]
    assert [s.examples for s in shards] == [3, 2, 2]
    assert whole.metrics.keys == sorted(k for s in shards for k in s.metrics.keys)
    # Through JSON and in any order, as `ldznet eval --merge` reads them.
    loaded = [EvalResult.from_dict(json.loads(json.dumps(s.to_dict()))) for s in reversed(shards)]
    (merged,) = merge_results(loaded)
    assert merged.summary == whole.summary  # bit-identical floats, not approximately equal
    assert merged.metrics.records() == whole.metrics.records() and merged.examples == 7
    assert whole.summary.miou not in (0.0, 1.0) and whole.summary.ap > 0


def test_boundary_scores_are_in_the_json_and_merge_exactly():
    source = _source()
    whole = evaluate(Noisy(source), source, "m", progress=False, boundary=1.5)
    assert len(whole.boundary) == len(whole.metrics) and whole.boundary.keys == whole.metrics.keys
    shards = [evaluate(Noisy(source), source, "m", progress=False, shard=(k, 3), boundary=1.5) for k in (1, 2, 3)]
    loaded = [EvalResult.from_dict(json.loads(json.dumps(s.to_dict()))) for s in reversed(shards)]
    (merged,) = merge_results(loaded)
    assert merged.boundary.summary() == whole.boundary.summary()  # bit-identical
    assert merged.boundary.records() == whole.boundary.records()
    summary = whole.to_dict()["boundary_summary"]
    assert summary == whole.boundary.summary().to_dict() and summary["tolerance"] == 1.5
    # The stand-in's maps separate at 0.4 < t < 0.6 and bleed over the edge at t = 0.1 or 0.9.
    assert summary["boundary_f"] == 1.0 and min(min(r) for r in whole.boundary.records()["scores"]) < 0.7
    plain = evaluate(Noisy(source), source, "m", progress=False, shard=(2, 3))
    assert plain.boundary is None and plain.to_dict()["boundary"] is None
    # with and without edges, or other tolerances
    with pytest.raises(LdznetError, match="the parts were not made alike: boundary tolerance 1.5 vs None$"):
        merge_results([shards[0], plain, shards[2]])
    with pytest.raises(ValueError, match="is in more than one part"):
        BoundaryMetrics.merge([shards[1].boundary, shards[1].boundary])  # shard 1 scored no sample


def test_merge_refuses_incomplete_or_mixed_shards():
    source = _source()
    shards = [evaluate(Noisy(source), source, "m", progress=False, shard=(k, 3)) for k in (1, 2, 3)]
    with pytest.raises(LdznetError, match="expected shards 1..3 of 3 once each, got 1, 3"):
        merge_results([shards[0], shards[2]])
    with pytest.raises(LdznetError, match="expected shards 1..3 of 3 once each, got 1, 1, 2, 3"):
        merge_results([*shards, shards[0]])
    other = evaluate(Noisy(source), source, "m", progress=False, shard=(2, 3), binary_threshold=0.3)
    with pytest.raises(LdznetError, match=r"^m on list:fixture: the parts were not made alike: binary threshold 0.5 vs "
                                          r"0.3$"):
        merge_results([shards[0], other, shards[2]])
    setup = {"model": "sd.safetensors", "head": "a.safetensors", "refine": {"enabled": True}}
    alike = [evaluate(Noisy(source), source, "m", progress=False, shard=(k, 2), setup=setup) for k in (1, 2)]
    assert merge_results(alike)[0].setup == setup
    other_head = evaluate(Noisy(source), source, "m", progress=False, shard=(2, 2), setup={**setup, "head": "b"})
    with pytest.raises(LdznetError, match=r'^m on list:fixture: the parts were not made alike: setup head '
                                          r'"a.safetensors" vs "b"$'):
        merge_results([alike[0], other_head])
    two = merge_results([*shards, evaluate(Noisy(source), source, "n", progress=False)])
    assert [r.name for r in two] == ["m", "n"]
    a, b = SegmentationMetrics(), SegmentationMetrics()
    for metrics in (a, b):
        metrics.add(torch.zeros(2, 2), np.eye(2, dtype=bool), key=(0, 1))
    with pytest.raises(ValueError, match=r"sample \[0, 1\] is in more than one part"):
        SegmentationMetrics.merge([a, b])
    other_threshold = SegmentationMetrics(0.3)
    other_threshold.add(torch.zeros(2, 2), np.eye(2, dtype=bool), key=(1, 0))
    with pytest.raises(ValueError, match=r"^parts measured at different binary thresholds: \[0.3, 0.5\]$"):
        SegmentationMetrics.merge([a, other_threshold])


def test_unreadable_examples_are_skipped_and_listed(tmp_path, capsys):
    Image.fromarray(np.full((4, 4, 3), 50, np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    rows = [{"image": "bad.png", "phrase": "x", "polygons": [[0, 0, 2, 0, 2, 2]]},
            {"image": "good.png", "phrase": "corner", "polygons": [[0, 0, 2, 0, 2, 2, 0, 2]]}]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    from ldznet_ext.data.spec import open_source

    source = open_source(str(tmp_path / "set.jsonl"))
    result = evaluate(Noisy([source[1]]), source, progress=False, workers=2)
    assert result.examples == 1 and len(result.metrics) == 1
    assert [i for i, _ in result.skipped] == [0] and str(tmp_path / "bad.png") in result.skipped[0][1]
    report = {"format": FORMAT, "version": VERSION, "table": None, "results": [result.to_dict()]}
    (tmp_path / "r.json").write_text(json.dumps(report))
    assert main(["eval", "--merge", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "1 masks of 1 examples (1 unreadable, skipped)" in out
    assert f"\n  unreadable example 0: {result.skipped[0][1]}\n" in out  # named, not only counted
    report["results"][0]["skipped"] = [[i, f"reason {i}"] for i in range(5)]
    (tmp_path / "r.json").write_text(json.dumps(report))
    assert main(["eval", "--merge", str(tmp_path / "r.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[lines.index("  unreadable example 0: reason 0"):][:4] == [
        "  unreadable example 0: reason 0", "  unreadable example 1: reason 1", "  unreadable example 2: reason 2",
        "  and 2 more (every one in the --json result's 'skipped')"]


def test_square_protocol_scores_binary_iou_on_the_original_mask():
    mask = np.zeros((4, 8), bool)
    mask[:, :4] = True  # the left half
    example = Example("k", np.zeros((4, 8, 3), np.uint8), (("left", mask),))
    source = ListSource([example])

    class Fixed(Noisy):
        def predict_terms(self, terms):
            assert self.image.shape == (2, 2, 3)
            return {"left": torch.tensor([[1.0, 0.0], [1.0, 0.0]])}

    result = evaluate(Fixed(source), source, progress=False, square=2)
    s = result.summary
    # CLIPSeg's counts at 2 x 2: the squashed mask is [[1, 0], [1, 0]], TP 2 at every threshold.
    assert s.iou_fg == pytest.approx(2 / 3) and result.square == 2
    # Binary IoU at 4 x 8: the map resized with align_corners=True is 1 - c / 7 along a row: > 0.5 for c <= 3.
    assert s.mean_iou == 1.0 and result.metrics.unions == [16]


def _result(name: str, data: str, scale: float) -> EvalResult:
    metrics = SegmentationMetrics()
    truth = np.array([[1, 1, 0, 0]], bool)
    metrics.add(torch.tensor([[0.9, 0.4 * scale, 0.2, 0.1]]), truth, key=(0, 0))
    return EvalResult(name, data, metrics, seconds=0.01, examples=1)


def test_tables_have_the_papers_shapes():
    results = [_result("RGBNet", "phrasecut:/d:test", 1.0), _result("LD-ZNet", "phrasecut:/d:test", 2.0)]
    table = build_table(results, 1)
    assert table["columns"] == ["Method", "mIoU", "IoU_FG", "AP", "mean IoU", "cum IoU"]
    s = results[1].summary
    assert table["rows"][1] == ["LD-ZNet", 100 * s.miou, 100 * s.iou_fg, 100 * s.ap, 100 * s.mean_iou,
                                100 * s.cumulative_iou]
    text = markdown_table(table).splitlines()
    assert text[1] == "|---|---:|---:|---:|---:|---:|"
    # LD-ZNet: 0.8 > t for t < 0.8 gives TP 2 (IoU 2/3); at 0.5 I 2, U 2.
    assert text[3] == f"| LD-ZNet | 66.7 | 66.7 | {100 * s.ap:.1f} | 100.0 | 100.0 |"
    assert build_table(results, 2)["columns"] == ["Method", "mIoU", "AP"]
    assert build_table(results, 4)["columns"][0] == "Diffusion features via"
    refer = [_result("ZNet", "refcoco:/r/refcoco:val (unc)", 1.0), _result("ZNet", "refcocog:/r/refcocog:val (umd)", 1.0),
             _result("LD-ZNet", "refcocog:/r/refcocog:val (umd)", 2.0)]
    assert default_table(refer) == 3 and default_table(results) == 1
    table3 = build_table(refer, 3)
    assert table3["columns"] == ["Method", "refcoco val (unc) IoU", "refcoco val (unc) AP",
                                 "refcocog val (umd) IoU", "refcocog val (umd) AP"]
    assert markdown_table(table3).splitlines()[3].startswith("| LD-ZNet | - | - | 66.7 | ")
    mixed = build_table(results + refer[:1], 1)
    assert mixed["columns"][:2] == ["Method", "data"] and mixed["rows"][2][:2] == ["ZNet", refer[0].data]


def test_merge_command_writes_markdown_and_json(tmp_path, capsys):
    source = _source()
    for k in (1, 2):
        shard = evaluate(Noisy(source), source, "LD-ZNet", progress=False, shard=(k, 2))
        report = {"format": FORMAT, "version": VERSION, "table": None, "results": [shard.to_dict()]}
        (tmp_path / f"s{k}.json").write_text(json.dumps(report))
    whole = evaluate(Noisy(source), source, "LD-ZNet", progress=False)
    assert main(["eval", "--merge", str(tmp_path / "s1.json"), str(tmp_path / "s2.json"), "--table", "2",
                 "--markdown", str(tmp_path / "t.md"), "--json", str(tmp_path / "all.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    s = whole.summary
    assert out[:3] == ["| Method | mIoU | AP |", "|---|---:|---:|", f"| LD-ZNet | {100 * s.miou:.1f} | {100 * s.ap:.1f} |"]
    assert (tmp_path / "t.md").read_text().splitlines()[2:] == out[:3]
    saved = json.loads((tmp_path / "all.json").read_text())
    assert saved["table"]["table"] == 2 and saved["results"][0]["summary"] == s.to_dict()
    assert main(["eval", "--merge", str(tmp_path / "s1.json")]) == 2  # shard 2/2 missing
    assert "expected shards 1..2 of 2 once each, got 1" in capsys.readouterr().err
    (tmp_path / "x.json").write_text("{}")
    assert main(["eval", "--merge", str(tmp_path / "x.json")]) == 2


def test_markdown_replaces_only_an_earlier_table_and_keeps_its_cells(tmp_path, capsys):
    source = _source()
    report = {"format": FORMAT, "version": VERSION, "table": None,
              "results": [evaluate(Noisy(source), source, "LD|ZNet\nv2", progress=False).to_dict()]}
    (tmp_path / "r.json").write_text(json.dumps(report))
    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n")
    assert main(["eval", "--merge", str(tmp_path / "r.json"), "--markdown", str(notes)]) == 2
    assert capsys.readouterr().err == (f"ldznet eval: error: {notes}: exists and is not an earlier ldznet eval "
                                       "--markdown table; give a new name, or remove the file first\n")
    assert notes.read_text() == "# my notes\n"
    table = tmp_path / "table.md"
    for _ in range(2):  # the second run replaces the first's table
        assert main(["eval", "--merge", str(tmp_path / "r.json"), "--markdown", str(table)]) == 0
    row = table.read_text().splitlines()[4]
    assert row.startswith("| LD\\|ZNet v2 | ") and row.count(" | ") == 5  # one cell, as the header has


def test_shards_count_from_1_and_version_1_files_from_0(tmp_path, capsys):
    """Since version 2 of the result files, eval's shards are 1..N like batch's; a version-1 file
    (shards 0..N-1) is read as 1-based, so old and new shards of one evaluation still merge."""
    source = _source()
    with pytest.raises(LdznetError, match="expected K/N with 1 <= K <= N"):
        evaluate(Noisy(source), source, "m", progress=False, shard=(0, 2))
    first, second = (evaluate(Noisy(source), source, "m", progress=False, shard=(k, 2)) for k in (1, 2))
    assert (first.examples, second.examples) == (4, 3) and first.to_dict()["shard"] == [1, 2]
    old = {**first.to_dict(), "shard": [0, 2]}  # the first shard, as version 1 wrote it
    (tmp_path / "old.json").write_text(json.dumps({"format": FORMAT, "version": 1, "results": [old]}))
    new = {"format": FORMAT, "version": VERSION, "results": [second.to_dict()]}
    (tmp_path / "new.json").write_text(json.dumps(new))
    whole = evaluate(Noisy(source), source, "m", progress=False)
    assert main(["eval", "--merge", str(tmp_path / "old.json"), str(tmp_path / "new.json"),
                 "--json", str(tmp_path / "all.json")]) == 0
    merged = json.loads((tmp_path / "all.json").read_text())
    assert merged["version"] == VERSION == 2
    assert merged["results"][0]["records"] == json.loads(json.dumps(whole.metrics.records()))
    # version 1's second shard was "1/2": with a version-2 first shard it is a duplicate, not a silent overlap
    (tmp_path / "old.json").write_text(json.dumps({"format": FORMAT, "version": 1,
                                                   "results": [{**second.to_dict(), "shard": [1, 2]}]}))
    capsys.readouterr()
    assert main(["eval", "--merge", str(tmp_path / "old.json"), str(tmp_path / "new.json")]) == 2
    assert "expected shards 1..2 of 2 once each, got 2, 2" in capsys.readouterr().err


def test_shard_option_counts_from_1_and_reads_the_old_first_shard(capsys):
    parser = argparse.ArgumentParser()
    eval_cli.register(parser.add_subparsers())
    assert parser.parse_args(["eval", "--shard", "2/4"]).shard == (2, 4)
    assert capsys.readouterr().err == ("ldznet eval: note: --shard counts from 1 (K = 1..N, as in ldznet batch) "
                                       "since eval results version 2; --merge checks that the shards cover 1..N "
                                       "once each\n")
    assert parser.parse_args(["eval", "--shard", "0/4"]).shard == (1, 4)
    assert capsys.readouterr().err == ("ldznet eval: warning: --shard 0/4 counts from 0, which is deprecated: "
                                       "read as 1/4 (shards are 1..N, as in ldznet batch)\n")
    assert parser.parse_args(["eval"]).shard == (1, 1) and capsys.readouterr().err == ""
    for bad in ("0/0", "5/4", "4", "a/b"):
        with pytest.raises(SystemExit):
            parser.parse_args(["eval", "--shard", bad])
        assert "ldznet eval: warning" not in capsys.readouterr().err


@pytest.mark.parametrize("table", [["--markdown", "t.md"], ["--table", "2"]])
def test_a_shard_makes_no_table_and_says_so(ldznet, table, tmp_path, monkeypatch):
    """A shard's results are of part of the data: its table is written after --merge, not silently never."""
    monkeypatch.chdir(tmp_path)
    code, out, err = ldznet("eval", "--data", "world:test:2", "--shard", "1/2", *table)
    assert (code, out) == (2, "")
    assert err.splitlines()[-1] == (f"ldznet eval: error: {table[0]} makes a table of the whole evaluation, and --shard 1/2 evaluates "
                   "part of it: write each shard's --json, then ldznet eval --merge them with " + table[0])
    assert not (tmp_path / "t.md").exists()


@pytest.mark.parametrize("data", ["rows.jsonl", "jsonl:rows.jsonl", "world:scenes.npz"])
def test_a_render_size_for_data_that_is_not_rendered_is_refused(ldznet, data):
    code, out, err = ldznet("eval", "--data", data, "--size", "512")
    assert (code, out) == (2, "")
    assert err == (f"ldznet eval: error: --size is the size micro-world scenes are rendered at, and {data} is not "
                   "rendered (world:SPLIT:N is): drop --size\n")


def _write_report(path, results) -> str:
    path.write_text(json.dumps({"format": FORMAT, "version": VERSION, "results": results}))
    return str(path)


def _crafted(*fields) -> dict:
    """One scored sample's result with each (dotted path, value) of ``fields`` set; a number in the
    path indexes a list."""
    result = _result("m", "d", 1.0)
    result.boundary = BoundaryMetrics(1.5)
    result.boundary.add(torch.tensor([[0.9, 0.4, 0.2, 0.1]]), np.array([[1, 1, 0, 0]], bool), key=(0, 0))
    data = json.loads(json.dumps(result.to_dict()))
    for path, value in fields:
        *outer, last = (int(p) if p.isdigit() else p for p in path.split("."))
        where = data
        for key in outer:
            where = where[key]
        where[last] = value
    return data


@pytest.mark.parametrize("fields, message", [
    ([("records.tp.0.0", 10**30)], "each value of 'records.tp' must be an integer in [0, 1000000000], got 10000000"),
    ([("records.pixels.0", 10**30)], "'records.pixels' must be an integer in [0, 1000000000], got 1000000"),
    ([("records.tp.0", [-5] * 49), ("records.fp.0", [-5] * 49)], "'records.tp' must be an integer in [0, "),
    ([("records.intersection.0", -1)], "'records.intersection' must be an integer in [0, 1000000000], got -1"),
    ([("records.tp.0.0", 1.5)], "'records.tp' must be an integer in [0, 1000000000], got 1.5"),
    ([("records.fp.0.3", True)], "'records.fp' must be an integer in [0, 1000000000], got True"),
    ([("records.tp", 5)], "'records.tp' must be 1 rows of 49 integers (one per key), got 5"),
    ([("records.union", [2, 2])], "'records.union' must be 1 integers (one per key), got [2, 2]"),
    ([("records", 5)], "'records' must be an object, got 5"),
    ([("records.keys.0", [-1, 0])], "'records.keys' must be a list of lists of integers in [0, "),
    ([("records.positives.0", 0)], "'records.tp' of sample [0, 0] is more than its mask's pixels ('positives')"),
    ([("records.fp.0.0", 4)], "'records.fp' of sample [0, 0] is more than its pixels outside the mask"),
    ([("records.positives.0", 5)], "'records.positives' of sample [0, 0] is more than its pixels"),
    ([("records.intersection.0", 3)], "'records.intersection' of sample [0, 0] is more than its union"),
    ([("binary_threshold", float("nan"))], "'binary_threshold' must be a number in [0, 1), got nan"),
    ([("binary_threshold", "0.5")], "'binary_threshold' must be a number in [0, 1), got '0.5'"),
    ([("examples", 10**30)], "'examples' must be an integer in [0, 100000000], got 10000000"),
    ([("examples", -1)], "'examples' must be an integer in [0, 100000000], got -1"),
    ([("examples", 0)], "'examples' must count at least the 1 examples its records score, got 0"),
    ([("seconds", -1)], "'seconds' must be a number in [0, 1000000000], got -1"),
    ([("seconds", "fast")], "'seconds' must be a number in [0, 1000000000], got 'fast'"),
    ([("seconds", 1e308)], "'seconds' must be a number in [0, 1000000000], got 1e+308"),  # printed 'inf ms per mask'
    ([("shard", [3, 2])], "'shard' must be [K, N] with 1 <= K <= N <= 100000000, got [3, 2]"),
    ([("shard", [1, 10**30])], "'shard' must be [K, N] with 1 <= K <= N <= 100000000, got [1, 1000000"),
    ([("name", 5)], "'name' must be a string, got 5"),
    ([("square", 0)], "'square' must be null or an integer in [8, 4096], got 0"),
    ([("skipped", [[-1, "unreadable"]])], "'skipped' must be a list of [example index, reason], got [[-1, 'unre"),
    ([("boundary.tolerance", float("nan"))], "'boundary.tolerance' must be a number in (0, 64], got nan"),
    ([("boundary.binary_threshold", 0.3)], "'boundary.binary_threshold' must be the result's binary_threshold 0.5"),
    ([("boundary.scores.0.0", 7)], "each value of 'boundary.scores' must be a number in [0, 1], got 7"),
    ([("boundary.keys.0", [1, 0])], "'boundary.keys' must be the keys of 'records.keys'"),
])
def test_merge_refuses_values_no_evaluation_writes(tmp_path, capsys, fields, message):
    """Each was a TypeError or OverflowError traceback, or merged into a meaningless table with exit 0."""
    path = _write_report(tmp_path / "bad.json", [_crafted(*fields)])
    assert main(["eval", "--merge", path]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(f"ldznet eval: error: {path} result 0: not an ldznet eval result (")
    assert message in captured.err


@pytest.mark.parametrize("results, message", [
    (5, ": 'results' must be a list of eval results, got 5"),
    ([5], " result 0: not an ldznet eval result (expected an object, got 5)"),
    ([{"name": "m"}], " result 0: not an ldznet eval result (no field 'records')"),
])
def test_merge_refuses_results_that_are_not_results(tmp_path, capsys, results, message):
    path = _write_report(tmp_path / "bad.json", results)
    assert main(["eval", "--merge", path]) == 2
    assert capsys.readouterr().err == f"ldznet eval: error: {path}{message}\n"


def test_merge_names_a_nan_threshold_not_a_difference_between_the_parts(tmp_path, capsys):
    """NaN != NaN: two shards both at a NaN threshold were reported as parts that differ."""
    paths = [_write_report(tmp_path / f"s{k}.json", [_crafted(("shard", [k, 2]), ("records.keys.0", [k, 0]),
                                                                ("boundary.keys.0", [k, 0]), ("binary_threshold", float("nan")))])
             for k in (1, 2)]
    assert main(["eval", "--merge", *paths]) == 2
    err = capsys.readouterr().err
    assert err == (f"ldznet eval: error: {paths[0]} result 0: not an ldznet eval result ('binary_threshold' must be "
                   "a number in [0, 1), got nan)\n")


def test_a_crafted_result_is_still_read_and_huge_shard_counts_allocate_nothing(tmp_path):
    assert EvalResult.from_dict(_crafted()).summary == _result("m", "d", 1.0).summary
    parts = [EvalResult.from_dict(_crafted(("shard", [k, 10**8]))) for k in (1, 2)]
    with pytest.raises(LdznetError, match="expected shards 1..100000000 of 100000000 once each, got 1, 2"):
        merge_results(parts)


def test_merge_refuses_evaluation_options_it_would_ignore(tmp_path, capsys):
    """--merge combines results as they were made; --data or --threshold beside it were dropped without a word."""
    from ldznet_ext.cli import main

    for extra, named in ((["--data", "world:test:1", "--threshold", "0.3"], "--data, --threshold set"),
                         (["--model", "m.safetensors"], "--model sets")):
        assert main(["eval", "--merge", str(tmp_path / "r.json"), *extra]) == 2
        assert capsys.readouterr().err == (f"ldznet eval: error: {named} an evaluation, and --merge evaluates nothing: "
                                           "it combines the results as they were made; drop "
                                           f"{'them' if len(extra) > 2 else 'it'} or --merge\n")
