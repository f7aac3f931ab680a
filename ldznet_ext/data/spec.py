"""Opening a data source from its spec string (``ldznet train``, ``ldznet eval`` and ``ldznet data summary``)::

    SPEC    = PREFIX ":" ARGUMENT [ "?" OPTION { "&" OPTION } ]  |  PATH ".jsonl"
    OPTION  = KEY "=" VALUE

- ``world:SPLIT:N``: the first N scenes of a micro-world split (train, val, test; the seed ranges
  are fixed, see ``world.scenes.split_seeds``), rendered once at the requested size into memory
  (about 65 KB a scene at 128 px, twice that while rendering; a set beyond the machine's memory is
  refused before rendering), in parallel processes (so a script that opens one needs the
  ``if __name__ == "__main__":`` guard of multiprocessing); ``world:FILE.npz``: a saved scene set;
- ``jsonl:PATH`` or ``PATH.jsonl``: a manifest, one JSON object a line, ``{"image": "a.png",
  "phrase": "red star", "mask": "a_red_star.png"}`` (a mask is any image, non-zero = inside) or
  ``{"image": "a.png", "phrase": "red star", "polygons": [[x0, y0, x1, y1, ...], ...]}`` (pixel
  units, COCO's pixel-centre rule, ``geometry``; ``[]`` = absent); paths are relative to the
  manifest; rows of one image form one example (``manifest``);
- ``phrasecut:DIR:SPLIT[?images=DIR1,DIR2]``: PhraseCut (``phrasecut``);
- ``refcoco:DIR:SPLIT``, ``refcoco+:DIR:SPLIT``, ``refcocog:DIR:SPLIT``
  ``[?partition=unc|google|umd&images=DIR]``: the refer toolkit's layout (``refcoco``);
- ``aigi:DIR`` (alias ``folder:DIR``): images/NAME.png with masks/NAME/PROMPT.png (``folder``);
- any of them with ``?negatives=K`` (1..8): each example also names up to K absent phrases, phrases of
  other examples that it does not name, with empty masks (``negatives``; for data that names none).

DIR may contain ':' (the split is what follows the last one); options follow the last '?'.
docs/datasets.md has the downloads and layouts.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path

from ..errors import LdznetError
from ..limits import SCENES
from ..world.data import SceneSet, render_scene_set
from ..world.scenes import VOCABULARY, split_seeds
from .examples import Source
from .manifest import ManifestSource
from .negatives import SampledNegatives, negatives_option
from .world import WorldSource


def _open_world(argument: str, size: int, domain: str | None, options: dict[str, str]) -> Source:
    if options:
        raise LdznetError(f"world data takes no options, got {', '.join(options)}")
    if argument.endswith(".npz"):
        if domain is not None:
            raise LdznetError("a saved scene set keeps the domains it was rendered with; drop the domain")
        return WorldSource(SceneSet.load(argument), f"world:{argument}")
    split, _, count = argument.partition(":")
    # isascii: '²' and '٣' pass isdigit() but not int(); the length: int() refuses over 4300 digits
    if not (count.isascii() and count.isdigit() and len(count) < 20):
        raise LdznetError(f"world data spec 'world:{argument}': expected world:SPLIT:N (e.g. world:train:5000) "
                          "or world:FILE.npz (a saved scene set)")
    if domain is not None and domain not in VOCABULARY.domains:
        raise LdznetError(f"unknown domain {domain!r}; expected one of {', '.join(VOCABULARY.domains)}")
    SCENES.check(int(count), f"the number of scenes in 'world:{argument}'")
    scenes = render_scene_set(split_seeds(split, int(count)), size, progress=sys.stderr.isatty(), domain=domain)
    return WorldSource(scenes, f"world:{argument}" + (f" ({domain})" if domain else ""), domain)


def _file_source(module: str, factory: str) -> Callable[[str, int, str | None, dict[str, str]], Source]:
    """A factory for a source of real files (no render size, no domain), imported when first used."""

    def open_files(argument: str, size: int, domain: str | None, options: dict[str, str]) -> Source:
        if domain is not None:
            raise LdznetError("a domain can only be chosen for micro-world data (world:...)")
        return getattr(importlib.import_module(module, __package__), factory)(argument, options)

    return open_files


def _open_manifest(argument: str, size: int, domain: str | None, options: dict[str, str]) -> Source:
    if domain is not None:
        raise LdznetError("a domain can only be chosen for micro-world data (world:...)")
    if options:
        raise LdznetError(f"a JSONL manifest takes no options, got {', '.join(options)}")
    return ManifestSource(argument)


SOURCES: dict[str, Callable[[str, int, str | None, dict[str, str]], Source]] = {
    "world": _open_world,
    "jsonl": _open_manifest,
    "phrasecut": _file_source(".phrasecut", "open_phrasecut"),
    "refcoco": _file_source(".refcoco", "open_refcoco"),
    "refcoco+": _file_source(".refcoco", "open_refcoco_plus"),
    "refcocog": _file_source(".refcoco", "open_refcocog"),
    "aigi": _file_source(".folder", "open_folder"),
    "folder": _file_source(".folder", "open_folder"),
}
"""Source factories by spec prefix: ``factory(argument after 'prefix:', render size, domain, options)``."""


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """(prefix, argument, options) of a spec (module docstring); a bare ``PATH.jsonl`` is ``jsonl``."""
    body, options = spec, {}
    if "?" in spec:
        body, _, query = spec.rpartition("?")
        for item in query.split("&"):
            key, equals, value = item.partition("=")
            if not key or not equals:
                raise LdznetError(f"data spec {spec!r}: options are KEY=VALUE joined by '&', got {item!r}")
            if key in options:  # which one a run used would be a guess
                raise LdznetError(f"data spec {spec!r}: option {key} is given twice")
            options[key] = value
    prefix, _, argument = body.partition(":")
    if prefix in SOURCES and argument:
        return prefix, argument, options
    if body.endswith(".jsonl"):
        return "jsonl", body, options
    raise LdznetError(f"unknown data spec {spec!r}; expected world:SPLIT:N, world:FILE.npz, jsonl:PATH, PATH.jsonl, "
                      "phrasecut:DIR:SPLIT, refcoco:DIR:SPLIT, refcoco+:DIR:SPLIT, refcocog:DIR:SPLIT or aigi:DIR")


def spec_file(spec: str) -> Path | None:
    """The file a spec reads by its name (a manifest, a saved scene set), which no output of a run may
    overwrite; None for folders, rendered splits and text that is not a spec (opening it says why)."""
    try:
        prefix, argument, _ = parse_spec(spec)
    except LdznetError:
        return None
    if prefix == "jsonl" or (prefix == "world" and argument.endswith(".npz")):
        return Path(argument)
    return None


def renders_scenes(spec: str) -> bool | None:
    """Whether opening ``spec`` renders micro-world scenes (world:SPLIT:N, the one source a render size
    applies to); None for text that is not a spec (opening it says why)."""
    try:
        prefix, argument, _ = parse_spec(spec)
    except LdznetError:
        return None
    return prefix == "world" and not argument.endswith(".npz")


def open_source(spec: str, size: int = 128, domain: str | None = None) -> Source:
    """Open a data source from its spec (see the module docstring); ``size`` is the render size of
    sources that render (the world), ``domain`` a micro-world domain."""
    prefix, argument, options = parse_spec(spec)
    negatives = options.pop("negatives", None)
    source = SOURCES[prefix](argument, size, domain, options)
    return source if negatives is None else SampledNegatives(source, negatives_option(negatives))
