"""A fake of A1111 v1.10.1's built-in Lora extension (``extensions-builtin/Lora/networks.py``, imported as
``networks``) as far as masks meet it: the module-level ``loaded_networks`` list, which the next prompt's
``<lora:...>`` tags replace and nothing empties after a generation, and layers that on each call compare
the networks they hold with that list and, where they differ, put their checkpoint weights back and add
the listed networks' deltas (``network_apply_weights``)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

loaded_networks: list = []


@dataclass(frozen=True)
class Network:
    name: str
    deltas: dict[str, Tensor]  # layer name -> weight delta


def network_apply_weights(layer: nn.Module) -> None:
    wanted = tuple(network.name for network in loaded_networks)
    if getattr(layer, "network_current_names", ()) == wanted:
        return
    with torch.no_grad():
        layer.weight.copy_(layer.network_weights_backup)
        for network in loaded_networks:
            delta = network.deltas.get(layer.network_layer_name)
            if delta is not None:
                layer.weight += delta
    layer.network_current_names = wanted


@contextmanager
def attached(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Make ``model``'s layers ``names`` network-aware while the block runs; afterwards they hold their
    checkpoint weights and no hooks."""
    handles = []
    for name in names:
        layer = model.get_submodule(name)
        layer.network_layer_name, layer.network_current_names = name, ()
        layer.network_weights_backup = layer.weight.detach().clone()
        handles.append(layer.register_forward_pre_hook(lambda module, args: network_apply_weights(module)))
    try:
        yield
    finally:
        loaded_networks.clear()
        for name, handle in zip(names, handles):
            handle.remove()
            layer = model.get_submodule(name)
            with torch.no_grad():
                layer.weight.copy_(layer.network_weights_backup)
            del layer.network_layer_name, layer.network_current_names, layer.network_weights_backup
