"""Helpers shared by the benchmark scripts: random-weight models built fast, timing, process isolation.

The scripts import this module by its bare name, so run them as ``python benchmarks/NAME.py``
(or ``./dev bench NAME``), which puts this folder first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from queue import Empty
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from ldznet_ext.devices import resolve_device
from ldznet_ext.errors import LdznetError


def device_argument(text: str) -> str:
    """``--device``'s type: a device this machine has (cpu, cuda, cuda:N, mps), as the ldznet commands
    take it; argparse's one-line error otherwise (torch's traceback came only at the first model)."""
    try:
        return str(resolve_device(text))
    except LdznetError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Register every new parameter on the meta device, so constructors and their weight
    initialisation cost nothing; buffers stay real (CLIP's position ids, for one, must keep their
    values, which a build under ``torch.device("meta")`` followed by ``to_empty`` would lose)."""

    def to_meta(module: nn.Module, name: str, parameter: nn.Parameter | None) -> nn.Parameter | None:
        if parameter is None or parameter.is_meta:
            return parameter
        return nn.Parameter(parameter.to("meta"), requires_grad=parameter.requires_grad)

    handle = register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


def materialise(build: Callable[[], nn.Module], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``build()`` with parameters allocated on ``device`` in ``dtype`` and filled with cheap random
    values (norm scales 1, other 1-d parameters 0, the rest N(0, 0.02^2)): timing ignores values,
    but zeros or denormals could hit fast or slow paths. Returns the module in eval mode, no grads."""
    with _parameters_on_meta():
        model = build()
    for module in model.modules():
        for name, parameter in module._parameters.items():
            if parameter is not None:
                module._parameters[name] = nn.Parameter(torch.empty_like(parameter, device=device, dtype=dtype),
                                                        requires_grad=False)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) in norms:
                p.fill_(1.0)
            elif p.ndim == 1:
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    return model.to(device=device, dtype=dtype).eval()


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock interval covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(run: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``run`` after one untimed warm-up call (allocator, kernel
    selection, lazy initialisation)."""
    run()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def time_interleaved(runs: Mapping[str, Callable[[], object]], device: torch.device, repeats: int,
                     report: Callable[[int, dict[str, list[float]]], None] | None = None) -> dict[str, list[float]]:
    """Seconds of each of ``runs`` {label: call}, taken in ``repeats`` rounds that call every run once
    in turn, after one untimed warm-up round. On a shared machine the load drifts over minutes; in
    rounds it weighs on every run alike, so ratios of medians stay fair where back-to-back blocks of
    runs would not be. ``report(round, times so far)`` is called after each timed round."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {label: [] for label in runs}
    for round_number in range(1, repeats + 1):
        for label, run in runs.items():
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            times[label].append(time.perf_counter() - start)
        if report is not None:
            report(round_number, times)
    return times


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_average() -> str:
    """The machine's load averages over 1, 5 and 15 minutes, as text: how busy a shared CPU was."""
    if not hasattr(os, "getloadavg"):  # Windows
        return "load average unknown"
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def environment(device: str, dtype: str) -> str:
    """One line naming what the numbers were measured on."""
    where = device
    if torch.device(device).type == "cuda":
        where += f" ({torch.cuda.get_device_name(torch.device(device))})"
    return f"torch {torch.__version__}, device {where}, {dtype}, {torch.get_num_threads()} threads"


def _child(queue: multiprocessing.Queue, target: Callable[..., Any], args: tuple) -> None:
    queue.put(target(*args))


def run_isolated(target: Callable[..., Any], *args: Any) -> Any:
    """``target(*args)`` in a fresh spawned process (no memory inherited from this one), so that its
    peak memory is its own. ``target`` must be a module-level function; its result must pickle."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(queue, target, args))
    process.start()
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except Empty:
            if process.exitcode is not None:  # died without a result (its traceback is on stderr)
                raise RuntimeError(f"{target.__name__}{args} failed with exit code {process.exitcode}") from None
    process.join()
    return result
