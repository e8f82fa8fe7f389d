"""Reading module outputs during a forward pass, by module name."""

from __future__ import annotations

from collections.abc import Callable

import torch


def run_with_hooks(
    model: torch.nn.Module, modules: list[str], forward: Callable[[], object]
) -> tuple[dict[str, torch.Tensor], object]:
    """({module name: its output}, forward's return value) of one call of `forward`."""
    captured: dict[str, torch.Tensor] = {}

    def capture(name):
        def hook(_module, _inputs, output):
            captured[name] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [model.get_submodule(name).register_forward_hook(capture(name)) for name in modules]
    try:
        returned = forward()
    finally:
        for handle in handles:
            handle.remove()
    return captured, returned
