"""Capture a denoiser's features with forward hooks during one call, optionally stopping early.

The tap knows the denoiser only by its layout (``backbone.layout``, a ``backbones.base.UNetLayout``):
the spatial transformers in execution order, numbered from 1, hooked only inside the ``with``
block. With ``early_exit`` the call is stopped as soon as the last tapped block has produced its
output, which skips the rest of the decoder (for SD v1 output_blocks 6-11 and ``out``, the most
expensive part of the UNet). Nothing about the host model changes: hooks are removed on exit, also
when the call raises.

Threads: the UNet may be shared (between segmenters, or with the WebUI host that owns it). Hooks act
only in the thread that installed them, so a UNet call of another thread is neither recorded nor
stopped; and a tap holds the UNet's re-entrant lock (:func:`unet_lock`) from ``__enter__`` to
``__exit__``, so two taps on one UNet run one after the other and no hook is added or removed while
another tap's call runs. A thread may nest taps on the same UNet (the lock is re-entrant).

:func:`sd_features` / :func:`tapped_features` are what inference and training call: a backbone's
features at given blocks, in one early-stopped call.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .backbones.base import Backbone, Conditioning, UNetLayout

_UNET_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_UNET_LOCKS_GUARD = threading.Lock()


def unet_lock(unet: nn.Module) -> threading.RLock:
    """The re-entrant lock that serialises hooked calls of ``unet`` (one per UNet, made on first use)."""
    with _UNET_LOCKS_GUARD:
        lock = _UNET_LOCKS.get(unet)
        if lock is None:
            lock = _UNET_LOCKS[unet] = threading.RLock()
        return lock


class _StopUNet(BaseException):
    """Raised by the last hook to end the UNet call.

    A BaseException, not an Exception: host code and other extensions often wrap model calls in
    ``except Exception`` fallbacks, which would swallow the stop and silently run the rest.
    """


_Hooks = TypeVar("_Hooks", bound="UNetHooks")


class UNetHooks:
    """Forward hooks on a possibly shared UNet, installed for one ``with`` block: the block holds the
    UNet's lock (:func:`unet_lock`), and the hooks act only in the thread that entered it
    (:meth:`owns_call`). Subclasses add their hooks in :meth:`_install` and may finish their records in
    :meth:`_finish`, after the hooks are gone and before the lock is released."""

    def __init__(self, unet: nn.Module):
        self._lock = unet_lock(unet)
        self._thread: int | None = None
        self._handles: list = []

    def __enter__(self: _Hooks) -> _Hooks:
        self._lock.acquire()
        self._thread = threading.get_ident()
        try:
            for handle in self._install():  # one at a time, so a failure part-way removes those made
                self._handles.append(handle)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._thread = None
            self._finish()
        finally:
            self._lock.release()

    def owns_call(self) -> bool:
        """True in the thread that entered the block: another thread's call of a shared UNet is not ours."""
        return threading.get_ident() == self._thread

    def _install(self) -> Iterator[RemovableHandle]:
        """Register the hooks, yielding each one's handle."""
        raise NotImplementedError

    def _finish(self) -> None:
        """After the hooks are removed: complete what they recorded."""


class FeatureTap(UNetHooks):
    """Context manager that records the outputs of chosen spatial-transformer blocks.

    >>> with FeatureTap(backbone.layout, blocks=(6, 7, 8, 9, 10)) as tap:
    ...     features = tap.run(lambda: backbone.predict_noise(z_t, t, conditioning))   # {6: [B, C, h, w], ...}

    ``blocks``: None taps the layout's own (``layout.tapped``). ``run`` returns the features by
    block number; ``tap.output`` holds the call's return value, or None when the call was stopped early.
    """

    def __init__(self, layout: UNetLayout, blocks: Iterable[int] | None = None, early_exit: bool = True):
        self.blocks = layout.pick(layout.tapped if blocks is None else blocks)
        if not self.blocks:
            raise ValueError("choose at least one block to tap")
        super().__init__(layout.unet)
        self.modules = [site.module for site in layout.sites]
        self.early_exit = early_exit
        self.features: dict[int, Tensor] = {}
        self.output: Any = None

    def _install(self) -> Iterator[RemovableHandle]:
        last = self.blocks[-1]
        for number in self.blocks:
            yield self.modules[number - 1].register_forward_hook(self._hook(number, number == last))

    def _hook(self, number: int, is_last: bool) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if not self.owns_call():
                return
            # diffusers' Transformer2DModel returns (sample,) or an output object holding it.
            self.features[number] = output if isinstance(output, Tensor) else output[0]
            if is_last and self.early_exit:
                raise _StopUNet

        return hook

    def run(self, call: Callable[[], Any]) -> dict[int, Tensor]:
        """Make the one UNet call and return the captured features {block number: [B, C, h, w]}."""
        if not self._handles:
            raise RuntimeError("FeatureTap.run must be called inside its `with` block")
        self.features, self.output = {}, None
        try:
            self.output = call()
        except _StopUNet:
            pass
        missing = [b for b in self.blocks if b not in self.features]
        if missing:
            raise RuntimeError(
                f"the UNet call did not run tapped blocks {missing}; the torch UNet was bypassed "
                "(a TensorRT or compiled UNet?) or does not have the backbone's layout")
        return dict(self.features)


def sd_features(backbone: Backbone, z: Tensor, conditioning: Conditioning, timesteps: Tensor, noise: Tensor,
                blocks: Sequence[int]) -> dict[int, Tensor]:
    """The denoiser's features {block: [B, C', h', w']} for z_t = q_sample(z [B, C, h, w], t [B], noise),
    conditioned on ``conditioning`` (B rows), in ONE call that stops after the last tapped block of
    the backbone's layout. ``noise`` is [B or 1, C, h, w]. Training computes its features here;
    inference noises z once per draw and calls :meth:`Segmenter.head_features`, which tools may replace."""
    return tapped_features(backbone, backbone.schedule.q_sample(z, timesteps, noise), timesteps, conditioning,
                           blocks)


def tapped_features(backbone: Backbone, z_t: Tensor, timesteps: Tensor, conditioning: Conditioning,
                    blocks: Sequence[int]) -> dict[int, Tensor]:
    """``sd_features`` of latents already noised: one denoiser call, stopped after the last tapped block."""
    with FeatureTap(backbone.layout, blocks, early_exit=True) as tap:
        return tap.run(lambda: backbone.predict_noise(z_t, timesteps, conditioning))
