"""`ldznet batch`: resuming after a kill, --overwrite, shards, bad files, a full disk, same-stem
inputs, size batching, and the manifest."""

from __future__ import annotations

import errno
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldznet_ext import outputs
from ldznet_ext.batch import MANIFEST_NAME, list_images, read_manifest, shard
from ldznet_ext.cli import batch as batch_cli
from ldznet_ext.cli.common import parse_shard
from ldznet_ext.job import MaskJob
from ldznet_ext.segmenter import Segmenter

from fixtures_models import random_image

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def batch(ldznet, tmp_path, tiny_model_files):
    """Run `ldznet batch IN "cat OR dog" -o OUT` with the tiny models and extra arguments."""
    sd, head = tiny_model_files

    def run(*extra: object, input_dir: Path | None = None) -> tuple[int, str, str]:
        return ldznet("batch", input_dir or tmp_path / "in", "cat OR dog", "-o", tmp_path / "out",
                      "--model", sd, "--head", head, *extra)
    return run


@pytest.fixture
def no_model_load(monkeypatch):
    """The cases of a test are refused before any model loads."""
    def refuse(*args):
        raise AssertionError("the models were loaded before the outputs were checked")
    monkeypatch.setattr(batch_cli, "segmenter_from_args", refuse)


def make_gallery(folder: Path, names: list[str], size: tuple[int, int] = (64, 64)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, name in enumerate(names):
        Image.fromarray(random_image(size[1], size[0], seed=30 + seed)).save(folder / name)
        paths.append(folder / name)
    return paths


def statuses(manifest: Path) -> dict[str, list[str]]:
    """input file name -> its statuses, in manifest order."""
    result: dict[str, list[str]] = {}
    for entry in read_manifest(manifest):
        result.setdefault(Path(entry["input"]).name, []).append(entry["status"])
    return result


def check_masks(out: Path, stems: list[str], size: tuple[int, int] = (64, 64), manifest: bool = True) -> None:
    """Exactly these masks (and the manifest) are in ``out``; each is a complete PNG of ``size``."""
    expected = [f"{s}.png" for s in stems] + ([MANIFEST_NAME] if manifest else [])
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    for stem in stems:
        with Image.open(out / f"{stem}.png") as mask:
            mask.load()  # a truncated PNG fails here
            assert (mask.mode, mask.size) == ("L", size)


def test_a_killed_run_resumes_without_redoing_or_corrupting(batch, tmp_path, monkeypatch, dead_pid):
    make_gallery(tmp_path / "in", [f"img{i}.png" for i in range(5)])
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".img4.png.{dead_pid}-0123abcd.ldznet-tmp"  # left by an earlier kill -9
    stale.write_bytes(b"\x89PNG half")
    real_replace, renamed = os.replace, []

    def killed_on_the_third_rename(source, target):
        if len(renamed) == 2:  # the third mask is fully written but not yet renamed into place
            raise KeyboardInterrupt
        renamed.append(target)
        real_replace(source, target)

    monkeypatch.setattr(outputs.os, "replace", killed_on_the_third_rename)
    code, _, err = batch("--batch-size", 2)
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    check_masks(out, ["img0", "img1"])  # no temporaries, no half-written img2.png
    monkeypatch.setattr(outputs.os, "replace", real_replace)
    with (out / MANIFEST_NAME).open("a") as manifest:
        manifest.write('{"input": "torn')  # a kill in the middle of a manifest line

    code, stdout, _ = batch("--batch-size", 2)
    assert code == 0 and "3 written, 2 skipped (already done), 0 failed" in stdout
    check_masks(out, [f"img{i}" for i in range(5)])
    assert statuses(out / MANIFEST_NAME) == {"img0.png": ["ok", "skipped"], "img1.png": ["ok", "skipped"],
                                             "img2.png": ["ok"], "img3.png": ["ok"], "img4.png": ["ok"]}


def test_overwrite_redoes_existing_masks(batch, tmp_path):
    make_gallery(tmp_path / "in", ["a.png", "b.png"])
    out = tmp_path / "out"
    assert batch()[0] == 0
    produced = np.asarray(Image.open(out / "a.png"))
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(out / "a.png")  # a stale mask
    assert batch()[0] == 0
    assert (np.asarray(Image.open(out / "a.png")) == 7).all()  # kept
    assert batch("--overwrite")[0] == 0
    assert np.array_equal(np.asarray(Image.open(out / "a.png")), produced)
    assert statuses(out / MANIFEST_NAME) == {"a.png": ["ok", "skipped", "ok"], "b.png": ["ok", "skipped", "ok"]}


def test_shards_partition_the_files(batch, tmp_path):
    names = [f"{c}.png" for c in "abcdefg"]
    make_gallery(tmp_path / "in", names)
    taken = []
    for k in (1, 2, 3):
        code, _, _ = batch("--shard", f"{k}/3", "--manifest", tmp_path / f"shard{k}.jsonl")
        assert code == 0
        taken.append(sorted(statuses(tmp_path / f"shard{k}.jsonl")))
    assert taken == [["a.png", "d.png", "g.png"], ["b.png", "e.png"], ["c.png", "f.png"]]
    check_masks(tmp_path / "out", list("abcdefg"), manifest=False)


def test_shard_arguments():
    files = [Path(f"{i}.png") for i in range(10)]
    parts = [shard(files, k, 4) for k in (1, 2, 3, 4)]
    assert sorted(sum(parts, [])) == sorted(files) and parts[1] == [Path("1.png"), Path("5.png"), Path("9.png")]
    assert parse_shard("2/4") == (2, 4)
    # other scripts' digits and "_" are no numbers here, as in every other option; N is bounded
    for bad in ("0/3", "4/3", "3", "a/b", "1/0", "３/４", "1_0/2_0", "1/1000001"):
        with pytest.raises(Exception, match="K/N"):
            parse_shard(bad)
    assert parse_shard(" 1/1000000") == (1, 1_000_000)


def test_bad_files_are_recorded_and_the_rest_succeed(batch, tmp_path):
    make_gallery(tmp_path / "in", ["good1.png", "good2.jpg"])
    data = (tmp_path / "in" / "good1.png").read_bytes()
    (tmp_path / "in" / "corrupt.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "in" / "notes.webp").write_text("not an image")
    (tmp_path / "in" / "readme.txt").write_text("ignored: not an image suffix")
    (tmp_path / "in" / "._good1.png").write_bytes(b"resource fork")  # hidden: ignored
    (tmp_path / "in" / "moved.png").symlink_to(tmp_path / "gone.png")  # a broken link: reported, not passed over
    (tmp_path / "in" / "sub.png").mkdir()  # a folder: not a file
    code, stdout, err = batch()
    assert code == 1 and "2 written, 0 skipped (already done), 3 failed" in stdout
    assert "corrupt.png: cannot decode the image" in err and "Traceback" not in err
    assert "moved.png: file not found" in err
    entries = {Path(e["input"]).name: e for e in read_manifest(tmp_path / "out" / MANIFEST_NAME)}
    assert sorted(entries) == ["corrupt.png", "good1.png", "good2.jpg", "moved.png", "notes.webp"]
    assert entries["notes.webp"]["status"] == "error" and "not an image" in entries["notes.webp"]["error"]
    assert entries["corrupt.png"]["status"] == "error" and entries["corrupt.png"]["output"] is None
    ok = entries["good2.jpg"]
    assert (ok["status"], ok["error"], ok["expression"]) == ("ok", None, "cat OR dog")
    assert ok["output"] == str(tmp_path / "out" / "good2.png") and ok["seconds"] > 0
    assert ok["settings"]["head"].endswith("head.safetensors") and ok["settings"]["dtype"] == "float32"
    # the job's settings, in the shape the WebUI tab writes, then what was loaded
    assert {k: ok["settings"][k] for k in MaskJob.field_names() if k != "expression"} == MaskJob(
        "cat OR dog").manifest_settings()
    check_masks(tmp_path / "out", ["good1", "good2"])


class _FullDisk:
    """An image whose PNG encoder hits a full disk after writing a few bytes."""

    def save(self, file, format: str) -> None:
        file.write(b"\x89PNG\r\n")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_recorded_and_the_batch_goes_on(batch, tmp_path, monkeypatch):
    make_gallery(tmp_path / "in", ["a.png", "b.png", "c.png"])
    real_save = outputs.save_png
    monkeypatch.setattr(outputs, "save_png",
                        lambda image, path: real_save(_FullDisk() if Path(path).name == "b.png" else image, path))
    code, _, _ = batch()
    assert code == 1
    entries = {Path(e["input"]).name: e for e in read_manifest(tmp_path / "out" / MANIFEST_NAME)}
    assert [entries[n]["status"] for n in ("a.png", "b.png", "c.png")] == ["ok", "error", "ok"]
    assert entries["b.png"]["error"] == "cannot write b.png: No space left on device"
    check_masks(tmp_path / "out", ["a", "c"])  # no b.png, no temporary left


def test_same_stem_is_an_error_never_an_overwrite(batch, tmp_path):
    make_gallery(tmp_path / "in", ["a.jpg", "a.png", "b.png"])
    code, _, _ = batch("--shard", "2/2")  # a.png alone in this shard; a.jpg (shard 1) owns a.png
    assert code == 1
    assert not (tmp_path / "out" / "a.png").exists()
    code, _, _ = batch()
    assert code == 1
    entries = [e for e in read_manifest(tmp_path / "out" / MANIFEST_NAME) if e["input"].endswith("a.png")]
    assert [e["status"] for e in entries] == ["error", "error"]
    assert entries[0]["error"] == "a.jpg has the same stem and already writes a.png; rename one of them"
    assert statuses(tmp_path / "out" / MANIFEST_NAME)["a.jpg"] == ["ok"]
    with Image.open(tmp_path / "in" / "a.jpg") as source, Image.open(tmp_path / "out" / "a.png") as mask:
        assert mask.mode == "L" and mask.size == source.size


def test_same_size_images_are_predicted_together(batch, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    make_gallery(folder, ["a1.png", "a2.png", "a3.png"], size=(64, 64))
    make_gallery(folder, ["b1.png", "b2.png"], size=(80, 48))
    stored = random_image(48, 80, seed=40)  # stored 80x48 like b*, shown rotated: 48 wide, 80 high
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(folder / "b3.jpg", exif=exif)
    calls = []
    real = Segmenter.predict_images

    def recording(self, images, *args, **kwargs):
        calls.append([image.shape[:2] for image in images])
        return real(self, images, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "predict_images", recording)
    assert batch("--batch-size", 2)[0] == 0
    assert calls == [[(64, 64), (64, 64)], [(64, 64)], [(48, 80), (48, 80)], [(80, 48)]]
    with Image.open(tmp_path / "out" / "b3.png") as mask:
        assert mask.size == (48, 80)


def test_folder_errors_stop_before_the_models_load(ldznet, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = ldznet("batch", tmp_path / "empty", "cat", "-o", tmp_path / "out")
    assert code == 2 and "no images in" in err
    code, _, err = ldznet("batch", tmp_path / "absent", "cat", "-o", tmp_path / "out")
    assert code == 2 and "input folder not found" in err
    make_gallery(tmp_path / "in", ["a.png"])
    code, _, err = ldznet("batch", tmp_path / "in", "cat", "-o", tmp_path / "in")
    assert code == 2 and "the output folder is the input folder" in err
    code, _, err = ldznet("batch", tmp_path / "in", "cat AND", "-o", tmp_path / "out")
    assert code == 2 and "expected a term or '(' after 'AND'" in err
    assert list_images(tmp_path / "in") == [tmp_path / "in" / "a.png"]


def test_manifest_lines_are_whole_json_objects(batch, tmp_path):
    make_gallery(tmp_path / "in", ["x.png"])
    batch()
    batch()
    lines = (tmp_path / "out" / MANIFEST_NAME).read_text(encoding="utf-8").splitlines()
    assert Counter(json.loads(line)["status"] for line in lines) == {"ok": 1, "skipped": 1}


def test_a_file_name_that_is_not_utf8_is_recorded_and_resumed(batch, tmp_path):
    """Linux file names are bytes: one in Latin-1 ("caf\xe9.png") is a str with a lone surrogate, which
    the manifest writes as a JSON escape (valid UTF-8) instead of failing the batch with a traceback."""
    name = os.fsdecode(b"caf\xe9.png")
    try:
        make_gallery(tmp_path / "in", [name, "b.png"])
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    code, stdout, err = batch()
    assert (code, "Traceback" in err) == (0, False) and "2 written" in stdout
    manifest = tmp_path / "out" / MANIFEST_NAME
    manifest.read_bytes().decode("utf-8")  # the whole file stays UTF-8
    assert statuses(manifest) == {name: ["ok"], "b.png": ["ok"]}
    assert batch()[0] == 0 and statuses(manifest)[name] == ["ok", "skipped"]  # a manifest a rerun appends to


def test_another_live_runs_temporaries_are_left_alone(batch, tmp_path, dead_pid):
    make_gallery(tmp_path / "in", ["a.png", "b.png"])
    out = tmp_path / "out"
    out.mkdir()
    live = out / f".a.png.{os.getppid()}-0123abcd.ldznet-tmp"  # another run (our parent) writing a.png now
    dead = out / f".b.png.{dead_pid}-4567cdef.ldznet-tmp"
    live.write_bytes(b"\x89PNG being written")
    dead.write_bytes(b"\x89PNG half")
    assert batch()[0] == 0
    assert live.read_bytes() == b"\x89PNG being written" and not dead.exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([live.name, "a.png", "b.png", MANIFEST_NAME])


def _manifest_case(case: str, tmp_path: Path) -> tuple[Path, str]:
    """(the --manifest path of a refused case, the error message)."""
    images, out = tmp_path / "in", tmp_path / "out"
    if case == "input image":
        return images / "b.png", f"{images}/b.png: a manifest is a JSON Lines file; give a name ending in .jsonl"
    if case in ("symlink to an input", "hard link to an input"):
        link = tmp_path / "log.jsonl"
        link.symlink_to(images / "b.png") if case.startswith("symlink") else link.hardlink_to(images / "b.png")
        return link, f"{link}: the same file as the input image {images}/b.png; give the manifest another name"
    if case == "mask name":
        return out / "a.png", f"{out}/a.png: a manifest is a JSON Lines file; give a name ending in .jsonl"
    if case == "symlink to a mask":
        (tmp_path / "log.jsonl").symlink_to(out / "a.png")
        return tmp_path / "log.jsonl", (f"{tmp_path}/log.jsonl: the same file as the mask {out}/a.png; "
                                        "give the manifest another name")
    if case == "not a manifest":
        (tmp_path / "notes.jsonl").write_text("my notes\n")
        return tmp_path / "notes.jsonl", (f"{tmp_path}/notes.jsonl: not an ldznet manifest (its first line is "
                                          "not a manifest entry); give a new file or an earlier run's manifest")
    if case in ("package.json", "training JSONL"):
        name, text = (("package.json", '{"name": "my-app", "version": "1.0.0"}\n') if case == "package.json" else
                      ("train.jsonl", '{"image": "x.png", "text": "cat"}\n{"image": "y.png", "text": "dog"}\n'))
        (tmp_path / name).write_text(text)
        return tmp_path / name, (f"{tmp_path}/{name}: not an ldznet manifest (its first line is not a manifest "
                                 "entry); give a new file or an earlier run's manifest")
    if case == "JSON array":
        (tmp_path / "list.json").write_text("[1, 2]\n")
        return tmp_path / "list.json", (f"{tmp_path}/list.json: not an ldznet manifest (its first line is "
                                        "not a manifest entry); give a new file or an earlier run's manifest")
    assert case == "folder"
    return tmp_path / "in", f"{images}: a manifest is a JSON Lines file; give a name ending in .jsonl"


@pytest.mark.parametrize("case", ["input image", "symlink to an input", "hard link to an input", "mask name",
                                  "symlink to a mask", "not a manifest", "package.json", "training JSONL",
                                  "JSON array", "folder"])
def test_a_manifest_never_lands_on_a_user_file(batch, tmp_path, case, no_model_load):
    make_gallery(tmp_path / "in", ["a.png", "b.png"])
    before = {p.name: p.read_bytes() for p in (tmp_path / "in").iterdir()}
    manifest, message = _manifest_case(case, tmp_path)
    kept = manifest.read_bytes() if manifest.is_file() else None
    code, stdout, err = batch("--manifest", manifest)
    assert (code, stdout, err) == (2, "", f"ldznet batch: error: {message}\n")
    assert {p.name: p.read_bytes() for p in (tmp_path / "in").iterdir()} == before
    assert not (tmp_path / "out" / "a.png").exists()
    assert kept is None or manifest.read_bytes() == kept


def test_existing_manifests_and_json_names_are_accepted(batch, tmp_path):
    make_gallery(tmp_path / "in", ["a.png"])
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert batch("--manifest", tmp_path / "empty.jsonl")[0] == 0
    assert batch("--manifest", tmp_path / "empty.jsonl")[0] == 0  # the manifest it wrote
    assert batch("--manifest", tmp_path / "log.json")[0] == 0
    assert statuses(tmp_path / "empty.jsonl") == {"a.png": ["ok", "skipped"]}
    assert statuses(tmp_path / "log.json") == {"a.png": ["skipped"]}


def test_unusable_outputs_stop_before_the_models_load(ldznet, tmp_path, tiny_model_files, no_model_load):
    make_gallery(tmp_path / "in", ["a.png"])
    (tmp_path / "file").write_text("a file")

    def batch_into(out: object, *extra: object) -> tuple[int, str]:
        code, _, err = ldznet("batch", tmp_path / "in", "cat", "-o", out, "--model", tiny_model_files[0],
                              "--head", tiny_model_files[1], *extra)
        return code, err

    assert batch_into(tmp_path / "file") == (2, f"ldznet batch: error: {tmp_path}/file is a file, not a folder\n")
    code, err = batch_into(tmp_path / "out", "--manifest", tmp_path / "file" / "m.jsonl")
    assert (code, err) == (2, f"ldznet batch: error: cannot write {tmp_path}/file/m.jsonl: "
                              f"{tmp_path}/file is a file, not a folder\n")
    if Path("/proc/self").is_dir():  # nothing can be created in /proc, even by root
        code, err = batch_into(tmp_path / "out", "--manifest", "/proc/m.jsonl")
        assert code == 2 and err.startswith("ldznet batch: error: cannot write /proc/m.jsonl: ")
        code, err = batch_into("/proc")
        assert code == 2 and err.startswith("ldznet batch: error: cannot write to /proc: ")


def test_a_folder_of_another_jobs_masks_is_not_skipped_as_done(batch, ldznet, tmp_path, tiny_model_files):
    """Resuming is for the same job: masks of another expression or other settings in OUT_DIR would be
    reported as "already done"; the run is refused before the models load, and --overwrite makes them again."""
    make_gallery(tmp_path / "in", ["a.png"])
    assert batch()[0] == 0
    first = (tmp_path / "out" / "a.png").read_bytes()
    sd, head = tiny_model_files
    other = ("batch", tmp_path / "in", "cat", "-o", tmp_path / "out", "--model", sd, "--head", head, "--invert")
    code, stdout, err = ldznet(*other)
    manifest = tmp_path / "out" / MANIFEST_NAME
    assert (code, stdout, err) == (2, "", f"ldznet batch: error: {manifest} lists masks of another job (expression "
                                          "'cat OR dog' -> 'cat'; invert False -> True), which this run would skip "
                                          "as done; overwrite them (--overwrite), or choose another output folder\n")
    assert (tmp_path / "out" / "a.png").read_bytes() == first
    assert batch()[1] == "0 written, 1 skipped (already done), 0 failed\n"  # the same job resumes
    assert ldznet(*other, "--overwrite")[1] == "1 written, 0 skipped (already done), 0 failed\n"
    assert ldznet(*other)[1] == "0 written, 1 skipped (already done), 0 failed\n"


def test_masks_of_another_model_setting_or_manifest_are_not_skipped_as_done(batch, ldznet, tmp_path, tiny_model_files,
                                                                           monkeypatch):
    """The model's sampling (resolution, seed, dtype, ...) changes every mask but was never compared, and a
    run given a new --manifest skipped OUT_DIR's masks of another job and recorded them as its own. A
    device or a relative path for the same model file is the same job."""
    make_gallery(tmp_path / "in", ["a.png"])
    assert batch()[0] == 0
    manifest = tmp_path / "out" / MANIFEST_NAME
    code, _, err = batch("--resolution", "128")
    assert (code, err) == (2, f"ldznet batch: error: {manifest} lists masks of another job (resolution 64 -> 128), "
                              "which this run would skip as done; overwrite them (--overwrite), or choose another "
                              "output folder\n")
    code, _, err = ldznet("batch", tmp_path / "in", "cat", "-o", tmp_path / "out", "--manifest", tmp_path / "new.jsonl")
    assert code == 2 and err.startswith(f"ldznet batch: error: {manifest} lists masks of another job (expression ")
    assert not (tmp_path / "new.jsonl").exists()
    assert batch("--device", "cpu")[1] == "0 written, 1 skipped (already done), 0 failed\n"
    sd, head = tiny_model_files
    monkeypatch.chdir(sd.parent)
    assert ldznet("batch", tmp_path / "in", "cat OR dog", "-o", tmp_path / "out", "--model", sd.name, "--head",
                  head)[1] == "0 written, 1 skipped (already done), 0 failed\n"


def test_a_file_name_with_a_line_break_is_one_error_line(batch, tmp_path):
    """A name may hold a newline; printed raw it split one error in two, the second line free to look
    like anything (the manifest keeps the name as it is)."""
    make_gallery(tmp_path / "in", ["ok.png"])
    (tmp_path / "in" / "bad\nERROR: fake line.png").write_text("junk")
    code, _, err = batch()
    assert code == 1 and err.splitlines() == [
        "bad\\nERROR: fake line.png: not an image, or a format Pillow cannot read"]


def test_pillows_bomb_warning_is_not_printed_beside_the_files_error(batch, tmp_path):
    """Grouping images by their header size opened a 90 M pixel file without the warning filter that
    load_image has: Pillow's multi-line 'could be decompression bomb DOS attack' came before our line."""
    from test_mask_cli import png_header

    make_gallery(tmp_path / "in", ["ok.png"])
    (tmp_path / "in" / "huge.png").write_bytes(png_header(9500, 9500))  # above Pillow's 89 M warning
    code, _, err = batch()
    assert code == 1 and err.splitlines() == [line for line in err.splitlines() if line.startswith("huge.png: ")]
    assert len(err.splitlines()) == 1
