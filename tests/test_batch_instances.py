"""The batch engine records each term's presence and, with instances, writes one mask per object."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldznet_ext.batch import BatchJob, Manifest, check_folders, read_manifest, run_batch
from ldznet_ext.errors import LdznetError
from ldznet_ext.masks.expression import parse
from oracle import OracleSegmenter


def _maps() -> dict[str, torch.Tensor]:
    star = torch.zeros(30, 40)
    star[5:10, 25:30] = 0.9
    star[20:26, 3:9] = 0.9
    return {"star": star, "goblin": torch.full((30, 40), 0.2)}


def test_manifest_has_terms_and_instances(tmp_path: Path) -> None:
    source, out = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    for stem in ("a", "a-1"):
        Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(source / f"{stem}.png")
    three = _maps()
    three["star"][15:18, 15:18] = 0.9
    job = BatchJob(source, out, parse("star OR goblin"), "star OR goblin", instances=True, overwrite=True)
    with Manifest(out / "m.jsonl") as manifest:  # an earlier run found three stars in each image
        run_batch(job, OracleSegmenter(three), manifest)
    assert (out / "instances" / "a-3.png").is_file()
    with Manifest(out / "m.jsonl") as manifest:
        summary = run_batch(job, OracleSegmenter(_maps()), manifest)
    assert summary.counts["ok"] == 2
    entry = next(e for e in read_manifest(out / "m.jsonl")[2:] if Path(e["input"]).name == "a.png")
    assert entry["terms"] == {"star": {"found": True, "score": 0.9}, "goblin": {"found": False, "score": 0.2}}
    assert [(i["order"], i["box"], i["area"], Path(i["file"]).name) for i in entry["instances"]] == [
        (1, [3, 20, 9, 26], 36, "a-1.png"), (2, [25, 5, 30, 10], 25, "a-2.png")]
    assert sorted(p.name for p in (out / "instances").iterdir()) == ["a-1-1.png", "a-1-2.png", "a-1.png", "a-2.png"]
    first = np.asarray(Image.open(out / "instances" / "a-1.png"))
    assert int((first == 255).sum()) == 36 and first[20, 3] == 255


def test_the_input_folder_is_never_the_instances_folder(tmp_path: Path) -> None:
    """OUT/instances as INPUT_DIR: a.png's first object would overwrite the image a-1.png, and the
    clean-up of an earlier run's extra objects would delete images; refused before anything is written."""
    out = tmp_path / "out"
    source = out / "instances"
    source.mkdir(parents=True)
    for stem in ("a", "a-1"):
        Image.fromarray(np.full((30, 40, 3), 7, np.uint8)).save(source / f"{stem}.png")
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    job = BatchJob(source, out, parse("star"), "star", instances=True)
    with pytest.raises(LdznetError, match="^the input folder is where --instances writes each object's mask"):
        with Manifest(tmp_path / "m.jsonl") as manifest:
            run_batch(job, OracleSegmenter(_maps()), manifest)
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    assert check_folders(source, out) == sorted(source.iterdir())  # without instances it is any input folder


def test_files_in_the_instances_folder_that_no_run_wrote_are_never_replaced_or_removed(tmp_path: Path) -> None:
    source, out = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    for stem in ("a", "b"):
        Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(source / f"{stem}.png")
    (out / "instances").mkdir(parents=True)
    mine = {name: bytes([k]) * 10 for k, name in enumerate(("a-2.png", "b-3.png", "b-4.png"))}
    for name, data in mine.items():
        (out / "instances" / name).write_bytes(data)
    job = BatchJob(source, out, parse("star"), "star", instances=True)
    with Manifest(out / "manifest.jsonl") as manifest:
        summary = run_batch(job, OracleSegmenter(_maps()), manifest)
    assert {name: (out / "instances" / name).read_bytes() for name in mine} == mine
    assert summary.counts == {"ok": 1, "error": 1}
    entries = {Path(e["input"]).name: e for e in read_manifest(out / "manifest.jsonl")}
    assert entries["a.png"]["error"] == ("instances/a-2.png: exists and is no instance mask that an earlier run of "
                                         "this folder wrote; move it, or choose another output folder")
    assert not (out / "a.png").exists() and not (out / "instances" / "a-1.png").exists()  # nothing of a.png written
    # b.png has two objects: b-3.png and b-4.png follow its last one but are no earlier run's: they stay
    assert sorted(p.name for p in (out / "instances").iterdir()) == ["a-2.png", "b-1.png", "b-2.png", "b-3.png",
                                                                     "b-4.png"]


def test_the_summary_counts_the_masks_that_select_nothing(tmp_path: Path) -> None:
    """Every file 'masked' with an empty mask read as a success ("2 masked, 0 skipped, 0 failed")."""
    source, out = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    for stem in ("a", "b"):
        Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(source / f"{stem}.png")
    with Manifest(out / "m.jsonl") as manifest:
        summary = run_batch(BatchJob(source, out, parse("goblin"), "goblin"), OracleSegmenter(_maps()), manifest)
    assert summary.counts["ok"] == 2 and summary.empty == 2 and summary.empty_note == " (2 of them empty)"
    with Manifest(out / "m.jsonl") as manifest:
        summary = run_batch(BatchJob(source, out, parse("star"), "star", overwrite=True), OracleSegmenter(_maps()),
                            manifest)
    assert summary.counts["ok"] == 2 and summary.empty == 0 and summary.empty_note == ""
