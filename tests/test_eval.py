"""Evaluation loop and `ldznet eval`: exact metrics with an oracle, real runs on a tiny random SD."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ldznet_ext.cli import main
from ldznet_ext.data.examples import Example
from ldznet_ext.data.spec import open_source
from ldznet_ext.errors import LdznetError
from ldznet_ext.eval.evaluate import evaluate
from ldznet_ext.heads import save_head
from ldznet_ext.train.trainer import training_head

SIZE = 64
pytestmark = pytest.mark.usefixtures("single_thread")


class ListSource(list):
    """Examples in a list: the smallest Source."""

    description = "absent only"


class Oracle:
    """A segmenter stand-in answering each phrase with its true mask (as float probabilities)."""

    def __init__(self, source):
        self.backbone = SimpleNamespace(device=torch.device("cpu"))
        self.masks = {}
        self.source = source
        self.calls = 0

    def set_image(self, image: np.ndarray) -> None:
        example = next(e for e in (self.source[i] for i in range(len(self.source))) if np.array_equal(e.image, image))
        self.masks = dict(example.pairs)

    def predict_terms(self, terms):
        self.calls += 1
        return {t: torch.from_numpy(self.masks[t]).float() for t in terms}

    def reset_image(self) -> None:
        self.masks = {}


def test_oracle_scores_follow_the_plus_one_formulas():
    source = open_source("world:test:3", size=SIZE)
    present = [s.mask.sum() for i in range(3) for s in source[i].samples(include_absent=False)]
    oracle = Oracle(source)
    result = evaluate(oracle, source, "oracle", progress=False)
    m = result.summary
    assert oracle.calls == 3 and m.count == len(present) and result.examples == 3 and not result.skipped
    sizes = np.array(present, np.float64)
    assert m.miou == pytest.approx(float(np.mean(sizes / (1 + sizes))), abs=1e-12)
    assert m.iou_fg == pytest.approx(sizes.sum() / (1 + sizes.sum()), abs=1e-12)
    assert m.ap == 0.0 and m.mean_iou == 1.0 and m.cumulative_iou == 1.0  # a single (recall, precision) point
    everything = evaluate(Oracle(source), source, "oracle", include_absent=True, progress=False).summary
    total = sum(len(source[i].pairs) for i in range(3))
    assert everything.count == total > m.count and everything.mean_iou == 1.0


def test_only_absent_phrases_is_an_error():
    image = np.zeros((8, 8, 3), np.uint8)
    source = ListSource([Example("k", image, (("blue star", np.zeros((8, 8), bool)),))])
    with pytest.raises(LdznetError) as error:
        evaluate(Oracle(source), source, progress=False)
    assert str(error.value) == ("absent only: no phrases to evaluate (readable examples: 1, their phrases all absent; "
                                "include absent phrases to score them)")
    assert evaluate(Oracle(source), source, include_absent=True, progress=False).summary.mean_iou == 1.0


class PartlyUnreadable(ListSource):
    """Examples 1, 2, ... are files that cannot be read (``first_readable`` False: example 0 too)."""

    first_readable = True

    def __getitem__(self, index):
        if index > 0 or not self.first_readable:
            raise LdznetError(f"mask {index}.png: file not found")
        return super().__getitem__(index)


def test_unreadable_examples_are_named_when_nothing_is_left_to_score():
    """Not "all absent" when the examples could not be read at all."""
    image = np.zeros((8, 8, 3), np.uint8)
    broken = PartlyUnreadable([None, None, None])
    broken.first_readable = False
    with pytest.raises(LdznetError) as error:
        evaluate(Oracle(broken), broken, progress=False)
    assert str(error.value) == ("absent only: no phrases to evaluate (unreadable examples: 3 (the first, 0: "
                                "mask 0.png: file not found))")
    mixed = PartlyUnreadable([Example("k", image, (("blue star", np.zeros((8, 8), bool)),)), None])
    with pytest.raises(LdznetError) as error:
        evaluate(Oracle(mixed), mixed, progress=False)
    assert str(error.value) == ("absent only: no phrases to evaluate (unreadable examples: 1 (the first, 1: mask 1.png: "
                                "file not found); readable examples: 1, their phrases all absent; include absent "
                                "phrases to score them)")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_sd, tiny_model_files):
    """The tiny SD file and a freshly initialised LD-ZNet head trained for 64 px, in one folder."""
    folder = tmp_path_factory.mktemp("eval")
    head, config = training_head(tiny_sd, "ldznet", SIZE)
    save_head(head, config, folder / "head.safetensors")
    (folder / "sd.safetensors").symlink_to(tiny_model_files[0])
    return folder


def test_eval_command_with_a_head(files, capsys):
    out_json = files / "result.json"
    assert main(["eval", "--model", str(files / "sd.safetensors"), "--head", str(files / "head.safetensors"),
                 "--data", "world:test:2", "--domain", "photo", "--json", str(out_json)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| Method | mIoU | IoU_FG | AP | mean IoU | cum IoU |"
    assert lines[2].startswith("| head | ")
    report = json.loads(out_json.read_text())
    result = report["results"][0]
    assert result["data"] == "world:test:2 (photo)" and result["examples"] == 2
    assert lines[4].startswith(f"head on world:test:2 (photo): {result['summary']['count']} masks of 2 examples")
    assert 0.0 <= result["summary"]["miou"] <= 1.0 and result["ms_per_mask"] > 0
    assert report["table"]["rows"][0][1] == pytest.approx(100 * result["summary"]["miou"])


def test_eval_command_shards_merge_to_the_whole(files, capsys):
    common = ["eval", "--model", str(files / "sd.safetensors"), "--head", str(files / "head.safetensors"),
              "--data", "world:test:3", "--name", "LD-ZNet"]
    assert main([*common, "--json", str(files / "whole.json")]) == 0
    for k in (1, 2):
        assert main([*common, "--shard", f"{k}/2", "--json", str(files / f"shard{k}.json")]) == 0
    assert "shard 2/2" in capsys.readouterr().out
    assert main(["eval", "--merge", str(files / "shard2.json"), str(files / "shard1.json"),
                 "--json", str(files / "merged.json")]) == 0
    whole, merged = (json.loads((files / n).read_text())["results"][0] for n in ("whole.json", "merged.json"))
    assert merged["summary"] == whole["summary"] and merged["records"] == whole["records"]
    setup = merged["setup"]  # the files by name: shards on other machines find them under other paths
    assert (setup["model"], setup["head"], setup["size"], setup["refine"]["enabled"]) == (
        "sd.safetensors", "head.safetensors", SIZE, True) and "device" not in setup
    assert main([*common, "--shard", "2/2", "--no-refine", "--json", str(files / "plain2.json")]) == 0
    capsys.readouterr()
    assert main(["eval", "--merge", str(files / "shard1.json"), str(files / "plain2.json")]) == 2
    assert "the parts were not made alike: setup refine" in capsys.readouterr().err


def test_eval_command_checks_its_outputs_before_evaluating(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("ldznet_ext.cli.eval.evaluate", lambda *a, **k: pytest.fail("evaluated before the check"))
    (tmp_path / "file").write_text("")
    common = ["eval", "--model", str(files / "sd.safetensors"), "--zero-shot", "--data", "world:test:1"]
    assert main([*common, "--json", str(tmp_path / "file" / "r.json")]) == 2
    assert capsys.readouterr().err == (f"ldznet eval: error: cannot write {tmp_path}/file/r.json: "
                                       f"{tmp_path}/file is a file, not a folder\n")
    assert main([*common, "--markdown", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"ldznet eval: error: cannot write {tmp_path}: it is a folder\n"


def test_eval_command_full_disk_at_the_end_still_prints_the_table(files, tmp_path, capsys, monkeypatch):
    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pathlib.Path.write_text", full_disk)
    assert main(["eval", "--model", str(files / "sd.safetensors"), "--zero-shot", "--data", "world:test:1",
                 "--resolution", "64", "--json", str(tmp_path / "r.json")]) == 1  # a system error, not bad input
    out, err = capsys.readouterr()
    assert out.splitlines()[2].startswith("| zero-shot | ")
    assert err == f"ldznet eval: error: cannot write {tmp_path}/r.json: No space left on device\n"


def test_eval_command_zero_shot(files, capsys):
    assert main(["eval", "--model", str(files / "sd.safetensors"), "--zero-shot", "--data", "world:test:1",
                 "--resolution", "64", "--include-absent"]) == 0
    row = capsys.readouterr().out.splitlines()[2]
    assert row.startswith("| zero-shot | ")
