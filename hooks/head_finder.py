"""``heads="auto"``: find the task heads from one forward pass and the step's losses.

A task head, for the fast path of ``hooks/taps.py``, is a module that takes the shared representation H
as its first argument and whose output reaches exactly one task's loss. During the first step a global
module forward hook notes every module call (input, output); when that step's losses arrive, each loss's
autograd graph tells which calls lead to which tasks. If one tensor H has, for every task, a call that
takes H and leads to that task alone, and the shared layer W lies below H, those calls' modules are the
heads (for nested modules, the outermost). Otherwise the reason is returned and the general path stays.
Nothing of this runs after the first step.
"""

from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass
from typing import Optional, Sequence

from torch import Tensor, nn

from .shared_layer import graph_nodes, reaches

MAX_CALLS = 4096
#: Why a model run under torch.compile gets the general path (run.json's heads_search).
COMPILED_REASON = (
    "not used: the model runs under torch.compile, whose compiled graph replaces the module calls and autograd nodes "
    "the heads' taps hook (they would never see the backward); the general path measures the norms"
)


@dataclass
class ModuleCall:
    module: nn.Module
    input: Tensor
    input_version: int
    output_node: object  # the output's grad_fn when the call returned (before any in-place op on it)


@dataclass
class FoundHeads:
    heads: Optional[list[nn.Module]]  # in task order, or None
    reason: str  # what was found, or why nothing was
    shared: Optional[Tensor] = None  # H
    calls: Sequence[ModuleCall] = ()


class HeadFinder:
    """Notes the module calls of one forward pass, then names the heads for the step's losses."""

    def __init__(self) -> None:
        # Bounded, so that forwards run before the first balanced loss cannot pile up tensors.
        self.calls: deque[ModuleCall] = deque(maxlen=MAX_CALLS)
        self.compiled = False  # a module compiled by torch.compile was called
        # Public so that its owner (the session) can remove the hook without keeping the noted calls alive.
        self.handle = nn.modules.module.register_module_forward_hook(self._record)

    def _record(self, module: nn.Module, args: tuple, output) -> None:
        # torch.compile(module) calls its OptimizedModule wrapper (which holds _orig_mod), module.compile() a
        # _compiled_call_impl: the compiled graph replaces the module calls and autograd nodes the taps hook.
        if hasattr(module, "_orig_mod") or getattr(module, "_compiled_call_impl", None) is not None:
            self.compiled = True
        if not args or not isinstance(args[0], Tensor):
            return
        if not isinstance(output, Tensor) or output.grad_fn is None:
            return
        self.calls.append(ModuleCall(module, args[0], args[0]._version, output.grad_fn))

    def stop(self) -> None:
        """Remove the global hook (again: a no-op); the calls noted so far stay for :meth:`find`."""
        self.handle.remove()

    def find(self, losses: Sequence[Tensor], parameter: Tensor) -> FoundHeads:
        """The heads of ``losses`` (one per task, in task order) above the shared parameter W."""
        self.stop()
        if self.compiled:
            warnings.warn(
                "gradnorm: the model runs under torch.compile: the heads' taps cannot see its backward (the compiled graph "
                "replaces the module calls and autograd nodes they hook), so the general path measures the gradient norms "
                "(run.json: heads_search, grad_norm_path)",
                RuntimeWarning,
            )
            return FoundHeads(None, COMPILED_REASON, calls=self.calls)
        reach = [graph_nodes(loss) for loss in losses]
        by_input: dict[int, tuple[Tensor, dict[int, ModuleCall]]] = {}
        for call in self.calls:
            if not call.input.requires_grad:
                continue
            tasks = [i for i, nodes in enumerate(reach) if call.output_node in nodes]
            if len(tasks) != 1:
                continue
            shared, per_task = by_input.setdefault(id(call.input), (call.input, {}))
            # Calls are noted as they return, so an enclosing module comes after the modules inside it.
            per_task[tasks[0]] = call
        candidates = [(shared, per_task) for shared, per_task in by_input.values() if len(per_task) == len(losses)]
        if not candidates:
            return FoundHeads(None, "no tensor is the input of one module per task whose output reaches that task's loss alone", calls=self.calls)
        for shared, per_task in candidates:
            if reaches(shared, parameter):
                heads = [per_task[i].module for i in range(len(losses))]
                if len({id(h) for h in heads}) == len(heads):
                    names = ", ".join(type(h).__name__ for h in heads)
                    return FoundHeads(heads, f"found {len(heads)} heads reading one tensor: {names}", shared, self.calls)
        return FoundHeads(None, "the modules that split the tasks read a tensor the shared layer does not feed", calls=self.calls)


def layer_call(calls: Sequence[ModuleCall], module: Optional[nn.Module]) -> tuple[Optional[ModuleCall], int]:
    """The last call of ``module`` in ``calls`` and how many times it ran."""
    mine = [call for call in calls if call.module is module] if module is not None else []
    return (mine[-1] if mine else None), len(mine)
