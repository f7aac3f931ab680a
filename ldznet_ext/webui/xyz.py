"""Axes of the host's X/Y/Z plot script for the mask's settings: ``[LD-ZNet] threshold`` with
``0.3, 0.4, 0.5`` makes one generation per value, side by side in the grid (adetailer adds its own
the same way). An axis only records its value on the generation's ``p``; the script's process()
lays the recorded values over the job (:func:`apply`), so the prompt's ``mask:`` line and the
accordion give every other setting and the infotext shows each cell's own."""

from __future__ import annotations

import sys

from ..job import MODES, MaskJob

PREFIX = "[LD-ZNet] "
AXES = {"mask": ("expression", str), "mode": ("mode", str), "threshold": ("threshold", float),
        "grow": ("grow", float), "feather": ("feather", float)}
"""Axis label (after PREFIX) -> (MaskJob field, the type the grid parses its values as)."""
_RECORDED = "_ldznet_xyz"


def add_axes() -> None:
    """on_before_ui: add the axes to the X/Y/Z plot script, once, when the host has that script. The
    grid is the host's: a host whose grid module has another shape keeps its UI, with one line why."""
    from modules import scripts

    grid = next((data.module for data in getattr(scripts, "scripts_data", ())
                 if data.script_class.__module__ == "xyz_grid.py"), None)
    if grid is None:
        return
    try:
        if any(option.label.startswith(PREFIX) for option in grid.axis_options):
            return
        grid.axis_options.extend(
            grid.AxisOption(PREFIX + label, kind, _recorder(name), confirm=_confirmer(name),
                            choices=(lambda: list(MODES)) if name == "mode" else None)
            for label, (name, kind) in AXES.items())
    except (AttributeError, TypeError) as error:
        print(f"LD-ZNet: the X/Y/Z plot axes were not added ({type(error).__name__}: {error})", file=sys.stderr)


def _recorder(name: str):
    def record(p, value, values) -> None:
        # A new dict each time: the grid copies p shallowly for every cell.
        setattr(p, _RECORDED, {**getattr(p, _RECORDED, {}), name: value})

    return record


def _confirmer(name: str):
    def confirm(p, values) -> None:
        """Before the grid generates anything: every value as the job would take it."""
        for value in values:
            job = MaskJob(**{name: value})
            if name == "expression":
                job.tree()

    return confirm


def apply(job: MaskJob, p) -> MaskJob:
    """``job`` with the values the X/Y/Z plot axes recorded on ``p`` (LdznetError for a bad one)."""
    recorded = getattr(p, _RECORDED, None)
    return job.replace(**recorded) if recorded else job
