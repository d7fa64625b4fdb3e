"""Weight offload (vLLM's ``--cpu-offload-gb``): some decoder layers keep their weights in pinned
host memory and are copied to the device one offloaded layer ahead of use, on a side stream.

Design: the offloaded layers (``plan_offload``: whole layers, from the last one backwards, while they
fit the budget, so the first copy overlaps every resident layer before it) share two device slots.
Offloaded layer k always lives in slot ``k % 2``: its parameters are views into that slot, bound
once, so a copy into the slot is all it takes to make the layer current. The schedule
(``prefetch_schedule``): the forward's start issues the first offloaded layer's copy; before
offloaded layer k runs, the compute stream waits for its copy, then the copy of layer k + 1 is
issued into the other slot once layer k - 1 (its previous user) has finished. So at most one copy
runs ahead, and a slot is never overwritten while a layer still reads it.
NOTE: with the weights on a CPU there is nothing to offload: the engine refuses the flag there.
The same class runs on a CPU in tests (copies are then synchronous), which checks the binding and
the order of copies; CUDA graphs are off with offloading (the copies run outside any graph).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

_ALIGN = 256  # bytes: every parameter view in a slot starts at a multiple of this


def plan_offload(layer_bytes: Sequence[int], budget_bytes: int) -> list[int]:
    """Indices of the layers to offload, ascending: whole layers from the last one backwards while
    their weights fit in ``budget_bytes``."""
    chosen, used = [], 0
    for i in reversed(range(len(layer_bytes))):
        if used + layer_bytes[i] > budget_bytes:
            break
        chosen.append(i)
        used += layer_bytes[i]
    return sorted(chosen)


@dataclass(frozen=True)
class PrefetchStep:
    """Before ``layer`` runs: wait for the copy of ``wait`` (if any), then issue the copy of
    ``issue`` into ``slot`` after ``after`` (the slot's previous user) has finished."""
    layer: int
    wait: int | None
    issue: int | None
    slot: int | None
    after: int | None


def prefetch_schedule(num_layers: int, offloaded: Sequence[int]) -> tuple[int | None, list[PrefetchStep]]:
    """(the layer whose copy the forward's start issues, the step before each layer)."""
    order = list(offloaded)
    steps = []
    for layer in range(num_layers):
        if layer not in order:
            steps.append(PrefetchStep(layer, None, None, None, None))
            continue
        k = order.index(layer)
        nxt = order[k + 1] if k + 1 < len(order) else None
        steps.append(PrefetchStep(layer, layer, nxt, None if nxt is None else (k + 1) % 2,
                                  order[k - 1] if nxt is not None and k >= 1 else None))
    return (order[0] if order else None), steps


def _param_bytes(module: nn.Module) -> int:
    return sum(-(-p.numel() * p.element_size() // _ALIGN) * _ALIGN for p in module.parameters())


class LayerOffloader:
    """Moves the planned layers' parameters to host memory and streams them back as scheduled.
    With ``trace``, records ("copy", layer) and ("run", layer) in order (tests read it)."""

    def __init__(self, layers: nn.ModuleList, budget_bytes: int, device: torch.device, trace: bool = False) -> None:
        self.layers, self.device = layers, device
        self.offloaded = plan_offload([_param_bytes(layer) for layer in layers], budget_bytes)
        self.first, self.steps = prefetch_schedule(len(layers), self.offloaded)
        self.trace: list[tuple[str, int]] | None = [] if trace else None
        self.offloaded_bytes = sum(_param_bytes(layers[i]) for i in self.offloaded)
        if not self.offloaded:
            return
        cuda = device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(device) if cuda else None
        self._copied = {i: torch.cuda.Event() if cuda else None for i in self.offloaded}
        self._finished = {i: torch.cuda.Event() if cuda else None for i in self.offloaded}
        slot_bytes = max(_param_bytes(layers[i]) for i in self.offloaded)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=device)
                      for _ in range(min(2, len(self.offloaded)))]
        self._host: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # layer -> (host copy, slot view)
        for k, i in enumerate(self.offloaded):
            self._host[i] = self._bind(layers[i], self.slots[k % 2], pin=cuda)
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(self._before(i))
            if i in self._finished:
                layer.register_forward_hook(self._after(i))

    def _bind(self, layer: nn.Module, slot: torch.Tensor, pin: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each parameter: a host copy, and its data now a view into the slot (filled by copies)."""
        pairs, offset = [], 0
        for p in layer.parameters():
            nbytes = p.numel() * p.element_size()
            view = slot[offset:offset + nbytes].view(p.dtype).view(p.shape)
            host = p.detach().to("cpu").contiguous()
            pairs.append((host.pin_memory() if pin else host, view))
            p.data = view
            offset += -(-nbytes // _ALIGN) * _ALIGN
        return pairs

    def start_forward(self) -> None:
        """Called before the model's first layer: start copying the first offloaded layer."""
        if self.first is not None:
            self._issue(self.first, after=None)

    def _issue(self, layer: int, after: int | None) -> None:
        if self.trace is not None:
            self.trace.append(("copy", layer))
        if self._copy_stream is None:
            for host, view in self._host[layer]:
                view.copy_(host)
            return
        finished, copied = self._finished.get(after) if after is not None else None, self._copied[layer]
        if finished is None:  # the slot's last reader was queued before now
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        else:
            self._copy_stream.wait_event(finished)
        with torch.cuda.stream(self._copy_stream):
            for host, view in self._host[layer]:
                view.copy_(host, non_blocking=True)
            assert copied is not None
            copied.record()

    def _before(self, i: int):
        step = self.steps[i]

        def hook(module: nn.Module, args: tuple) -> None:
            if i == 0:
                self.start_forward()
            copied = self._copied[step.wait] if step.wait is not None else None
            if copied is not None:
                torch.cuda.current_stream(self.device).wait_event(copied)
            if step.issue is not None:
                self._issue(step.issue, after=step.after)
            if self.trace is not None:
                self.trace.append(("run", i))

        return hook

    def _after(self, i: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            event = self._finished[i]
            if event is not None:
                event.record()

        return hook
