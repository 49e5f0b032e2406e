"""Resolve the shared layer W whose per-task gradient norms GradNorm balances (paper 3.1).

W is "one downstream filter" of the shared trunk, usually its last layer. For a dense or convolutional
module we take its weight and leave the bias out, as the paper does ("Bias terms are left unnormalized").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

SharedLayer = Union[nn.Module, nn.Parameter, torch.Tensor]


@dataclass
class ResolvedLayer:
    parameter: torch.Tensor
    module: Optional[nn.Module]
    description: str

    def config(self) -> dict:
        return {"layer": self.description, "shape": list(self.parameter.shape), "bias": "excluded"}


def resolve_shared_layer(shared: SharedLayer) -> ResolvedLayer:
    """A module (its ``weight``) or a parameter; anything else is a clear error."""
    if isinstance(shared, nn.Module):
        weight = getattr(shared, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(
                f"shared layer {type(shared).__name__} has no 'weight' parameter; pass the parameter "
                "itself (e.g. model.trunk[-1].weight) or a Linear/Conv module"
            )
        parameter, module, description = weight, shared, f"{type(shared).__name__}.weight"
    elif isinstance(shared, torch.Tensor):
        parameter, module, description = shared, None, f"parameter{tuple(shared.shape)}"
    else:
        raise TypeError(f"shared layer must be an nn.Module or a parameter tensor, got {type(shared).__name__}")
    if not parameter.requires_grad:
        raise ValueError(f"shared layer {description} does not require grad: GradNorm needs its gradients")
    return ResolvedLayer(parameter=parameter, module=module, description=description)


def graph_nodes(tensor: torch.Tensor) -> set:
    """Every autograd node ``tensor``'s gradient can flow through (empty for a tensor without a graph)."""
    seen: set = set()
    stack = [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return seen


def reaches(loss: torch.Tensor, parameter: torch.Tensor) -> bool:
    """Whether ``parameter`` is a leaf of ``loss``'s autograd graph (a gradient can flow to it)."""
    return any(getattr(node, "variable", None) is parameter for node in graph_nodes(loss))
