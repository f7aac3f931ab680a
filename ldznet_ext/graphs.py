"""Captured CUDA graphs for the segmenter's fixed-shape model calls.

At batch 1 a mask's time on a GPU goes to launching thousands of small kernels (VAE encoder, UNet
to the last tapped block, head), not to arithmetic. A CUDA graph records a call's launches once
and replays them as one. :class:`GraphCache` holds the captured calls of one model: one cache per
UNet (:func:`graph_cache`), shared by every Segmenter on it, so a WebUI job or a ``with_settings``
copy reuses what an earlier one captured. A call is keyed by what a replay cannot change: its
purpose and the Python-level constants baked into it, its inputs' shapes, dtypes and device, and
the place of every weight it reads (:func:`inspect_modules`), so a model that is
reloaded, moved, cast or patched with new tensors is captured anew; weights changed in place are
read by the replay as they are, like an eager call.

Eager, always, where a graph could be wrong or cannot help (:meth:`GraphCache.inspect`):
- not on CUDA (CPU, MPS), or turned off (``SegmenterSettings.cuda_graphs``, CLI ``--no-cuda-graphs``);
- a backbone whose calls run host logic a replay would skip (Forge's memory management): it has no
  ``capture_modules``;
- hooks on the models (another extension's, or A1111's --medvram/--lowvram offloading, which moves
  modules in forward pre-hooks): a replay would not call them;
- inside an autocast region entered outside the call (its cast cache would outlive the capture);
- after a capture failed, or its replay disagreed with the eager call, for that purpose (logged once);
- when the weights keep moving between calls (a host offloading between jobs): captured again
  ``RECAPTURE_LIMIT`` times for one call, the purpose goes eager (logged once).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

LOG = logging.getLogger("ldznet_ext.graphs")
# hooks torch calls for every module (register_module_forward_hook): a replay would skip them too
_GLOBAL_HOOKS = (nn.modules.module._global_forward_hooks, nn.modules.module._global_forward_pre_hooks)

WARMUP_CALLS = 2  # eager calls on a side stream before capture: cuDNN / cuBLAS pick their kernels
CACHE_LIMIT = 8  # captured calls kept per model: a few working sizes x term counts x purposes
RECAPTURE_LIMIT = 3  # captures of one call (same shapes) with moved weights before giving up on it
AGREEMENT = 1e-3  # the first replay must match the eager call within this, relative to its largest value

Call = Callable[..., tuple[Tensor, ...]]
Runner = Callable[[str, Call, Sequence[Tensor], Hashable], tuple[Tensor, ...]]
"""How a model call is made: (purpose, call, inputs, constants) -> call(*inputs), eagerly (:func:`eager`)
or replayed from a captured graph (``Segmenter.run_graphed``)."""


def eager(purpose: str, call: Call, inputs: Sequence[Tensor], constants: Hashable = ()) -> tuple[Tensor, ...]:
    """The :data:`Runner` that always calls eagerly."""
    return call(*inputs)


@dataclass
class CapturedCall:
    """A captured call: ``replay()`` reads the static ``inputs`` buffers and writes the static
    ``outputs``; ``memory_bytes`` is the device memory its capture holds."""

    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    replay: Callable[[], None]
    memory_bytes: int


def capture_cuda_graph(call: Call, inputs: tuple[Tensor, ...]) -> CapturedCall:
    """Capture ``call(*inputs)`` as one CUDA graph, on static copies of ``inputs``."""
    device = inputs[0].device
    static = tuple(x.clone() for x in inputs)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(WARMUP_CALLS):
            call(*static)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    reserved = torch.cuda.memory_reserved(device)
    graph = torch.cuda.CUDAGraph()
    # thread_local: a WebUI's other threads may use the GPU meanwhile; only this thread's unsafe calls fail it
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        outputs = call(*static)
    return CapturedCall(static, tuple(outputs), graph.replay, torch.cuda.memory_reserved(device) - reserved)


def inspect_modules(modules: Iterable[nn.Module]) -> tuple[tuple, bool]:
    """One pass over ``modules`` (it runs before every call, so it is kept to one): a fingerprint of
    where their weights live, the storage address of every parameter and buffer and each module's
    device and dtype (a captured graph reads those addresses, so any change means capturing again:
    a model reloaded, moved, cast or given new tensors), and whether any submodule has forward hooks."""
    fingerprint: list = []
    hooked = False
    for module in modules:
        first, stack = None, [module]
        while stack:  # not module.modules(): it builds every submodule's name, a third of the time
            sub = stack.pop()
            stack.extend(child for child in sub._modules.values() if child is not None)
            hooked = hooked or bool(sub._forward_hooks or sub._forward_pre_hooks)
            for tensor in (*sub._parameters.values(), *sub._buffers.values()):
                if tensor is not None:
                    fingerprint.append(tensor.data_ptr())
                    first = tensor if first is None else first
        fingerprint.append(None if first is None else (first.device, first.dtype))
    return tuple(fingerprint), hooked


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 (A1111 v1.10 installs 2.1) takes no device: CUDA's, and CPU's apart
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _on(inputs: Sequence[Tensor], device_type: str) -> bool:
    return bool(inputs) and inputs[0].device.type == device_type


def _agree(output: Tensor, expected: Tensor) -> bool:
    if output.shape != expected.shape or output.dtype != expected.dtype:
        return False
    if not output.is_floating_point():
        return torch.equal(output, expected)
    scale = float(expected.float().abs().nan_to_num(0, 0, 0).max()) if expected.numel() else 0.0
    return torch.allclose(output.float(), expected.float(), rtol=0, atol=AGREEMENT * scale, equal_nan=True)


class GraphCache:
    """The captured calls of one model, least recently used dropped beyond ``limit``.

    ``capture`` makes a :class:`CapturedCall` (tests pass a fake with ``device_type`` "cpu").
    Thread-safe: one lock guards the static buffers from the copy-in to the copy-out.
    """

    def __init__(self, capture: Callable[[Call, tuple[Tensor, ...]], CapturedCall] = capture_cuda_graph,
                 device_type: str = "cuda", limit: int = CACHE_LIMIT):
        if limit < 1:
            raise ValueError(f"a graph cache holds at least one call, got limit {limit}")
        self.capture = capture
        self.device_type = device_type
        self.limit = limit
        self.disabled: dict[str, str] = {}  # purpose -> why it runs eagerly for good
        self._calls: OrderedDict[tuple, CapturedCall] = OrderedDict()
        self._captures: Counter[tuple] = Counter()
        self._logged: set[str] = set()
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._calls)

    @property
    def memory_bytes(self) -> int:
        """Device memory held by the captured calls."""
        return sum(call.memory_bytes for call in self._calls.values())

    def clear(self) -> None:
        """Drop every captured call (their memory is freed when no replay is running), forget how often
        each was captured and give the purposes that went eager another try: a host's model change or
        release may have removed the reason (weights that moved on every call, a setting since changed)."""
        with self._lock:
            self._calls.clear()
            self._captures.clear()
            self.disabled.clear()
            self._logged.clear()

    def inspect(self, inputs: Sequence[Tensor], modules: Sequence[nn.Module] | None) -> tuple[str | None, tuple]:
        """Why a call on ``inputs`` running ``modules`` must run eagerly now (None: it may be captured),
        and the modules' weights fingerprint. Weights on another device need no check: the eager call,
        which comes first, fails on them as it would without graphs."""
        if not _on(inputs, self.device_type):
            return f"not on {self.device_type}", ()
        if modules is None:
            return "the backbone's calls run host code a replay would skip", ()
        fingerprint, hooked = inspect_modules(modules)
        if hooked or any(_GLOBAL_HOOKS):
            return "the models have forward hooks (another extension, or --medvram/--lowvram offloading)", ()
        if _autocast_on(inputs[0].device.type):
            return "called inside an autocast region (its cached casts would outlive a capture)", ()
        return None, fingerprint

    def run(self, purpose: str, call: Call, inputs: Sequence[Tensor], modules: Sequence[nn.Module] | None,
            constants: Hashable = ()) -> tuple[Tensor, ...]:
        """``call(*inputs)``: a replay of its captured graph where that is safe (see the module's
        docstring), else eagerly. ``modules``: every module the call runs (None: never capture);
        ``constants``: every Python value the call bakes in beyond its inputs' shapes."""
        if not _on(inputs, self.device_type):
            return call(*inputs)  # graphs are CUDA's alone: nothing to capture, nothing worth a log line
        reason, fingerprint = ((self.disabled[purpose], ()) if purpose in self.disabled
                               else self.inspect(inputs, modules))
        if reason is not None:
            self._note(purpose, reason)
            return call(*inputs)
        inputs = tuple(inputs)
        # which modules, apart from where their weights are: other models are other entries, while the
        # same modules with moved weights replace their entry (and count towards RECAPTURE_LIMIT)
        call_key = (purpose, constants, tuple((tuple(x.shape), x.dtype, x.device) for x in inputs),
                    tuple(map(id, modules)))
        key = (call_key, fingerprint)
        with self._lock:
            captured = self._calls.get(key)
            if captured is None:
                return self._capture(key, call, inputs)
            self._calls.move_to_end(key)
            return self._replay(captured, inputs)

    @staticmethod
    def _replay(captured: CapturedCall, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        for buffer, value in zip(captured.inputs, inputs):
            buffer.copy_(value)
        captured.replay()
        return tuple(output.clone() for output in captured.outputs)

    def _capture(self, key: tuple, call: Call, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        call_key, purpose = key[0], key[0][0]
        expected = tuple(call(*inputs))
        for stale in [k for k in self._calls if k[0] == call_key]:  # the same call on weights that moved
            del self._calls[stale]
        self._captures[call_key] += 1
        if self._captures[call_key] > RECAPTURE_LIMIT:
            self._disable(purpose, f"its weights moved {RECAPTURE_LIMIT} times (offloaded between calls?)")
            return expected
        try:
            captured = self.capture(call, inputs)
            replayed = self._replay(captured, inputs)
        except Exception as error:  # any capture failure (a host's CPU sync, an unsupported op): eager
            self._disable(purpose, f"capture failed: {type(error).__name__}: {error}".splitlines()[0])
            return expected
        if len(replayed) != len(expected) or not all(map(_agree, replayed, expected)):
            self._disable(purpose, "its captured graph disagreed with the eager call")
            return expected
        self._calls[key] = captured
        while len(self._calls) > self.limit:
            self._calls.popitem(last=False)
        LOG.info("ldznet: captured a CUDA graph for %s %s (%.0f MiB; %d graphs, %.0f MiB in all)", purpose,
                 [tuple(x.shape) for x in inputs], captured.memory_bytes / 2**20, len(self), self.memory_bytes / 2**20)
        return expected

    def _disable(self, purpose: str, reason: str) -> None:
        self.disabled[purpose] = reason
        for stale in [k for k in self._calls if k[0][0] == purpose]:
            del self._calls[stale]
        LOG.warning("ldznet: CUDA graphs off for %s, running eagerly: %s", purpose, reason)
        self._logged.add(f"{purpose}: {reason}")

    def _note(self, purpose: str, reason: str) -> None:
        """Log once per purpose and reason why graphs are off."""
        if f"{purpose}: {reason}" in self._logged:
            return
        self._logged.add(f"{purpose}: {reason}")
        LOG.info("ldznet: CUDA graphs not used for %s: %s", purpose, reason)


_CACHES: weakref.WeakKeyDictionary[nn.Module, GraphCache] = weakref.WeakKeyDictionary()
_CACHES_GUARD = threading.Lock()


def clear_graph_caches() -> None:
    """Drop every model's captured calls, freeing their memory (a host's model change or unload)."""
    with _CACHES_GUARD:
        caches = list(_CACHES.values())
    for cache in caches:
        cache.clear()


def graph_cache(unet: nn.Module) -> GraphCache:
    """The graph cache of the model around ``unet`` (one per UNet, made on first use)."""
    with _CACHES_GUARD:
        cache = _CACHES.get(unet)
        if cache is None:
            cache = _CACHES[unet] = GraphCache()
        return cache
