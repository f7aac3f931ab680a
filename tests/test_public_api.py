"""The package root: every public name resolves to its defining module, lazily."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import ldznet_ext


@pytest.mark.parametrize("name", [n for n in ldznet_ext.__all__ if n != "__version__"])
def test_every_public_name_is_the_object_its_module_defines(name: str) -> None:
    module = __import__(ldznet_ext._EXPORTS[name], fromlist=[name])
    assert getattr(ldznet_ext, name) is getattr(module, name)


def test_all_lists_exactly_the_exports() -> None:
    assert sorted(ldznet_ext.__all__) == sorted(["__version__", *ldznet_ext._EXPORTS])


def test_the_readme_lists_exactly_the_exports() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    listed = re.search(r"Every public name is importable from `ldznet_ext`[^:]*:(.*?)\.\s", readme, re.S).group(1)
    assert sorted(re.findall(r"`(\w+)`", listed)) == sorted(ldznet_ext._EXPORTS)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'Segmentor'"):
        ldznet_ext.Segmentor  # noqa: B018


def test_importing_the_package_loads_no_torch() -> None:
    code = "import sys, ldznet_ext; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_the_readme_example_runs_on_the_embedded_model(tmp_path) -> None:
    from ldznet_ext import LdznetError, MaskJob, default_model_paths, load_segmenter
    from ldznet_ext.world.scenes import make_scene

    with pytest.raises(LdznetError, match=r"^model is None: give an SD checkpoint's path; the embedded micro model "
                                          r"is load_segmenter\(\*ldznet_ext.default_model_paths\(\)\)$"):
        load_segmenter(None)

    segmenter = load_segmenter(*default_model_paths())
    scene = make_scene(1000007, size=256)  # the demo's scene
    segmenter.set_image(scene.image)
    job = MaskJob("grass")
    mask = segmenter.predict(job.tree(), job.mask_options()).mask_image() == 255
    truth = scene.phrases["grass"]
    assert mask.shape == truth.shape
    assert (mask & truth).sum() / (mask | truth).sum() > 0.9
