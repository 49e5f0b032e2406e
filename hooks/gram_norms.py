"""Per-task squared gradient norms ||grad_W L_i||^2 at a shared ``nn.Linear`` or ``nn.Conv2d`` W from the
tasks' gradients at W's output, without forming the T weight gradients.

GradNorm's update needs only the norms n_i = ||grad_W L_i||_2 at the last shared layer W (paper section 3;
3.1: the weight only, "bias terms are left unnormalized"; per output filter of a convolution with
``per_channel``), not the gradients themselves. W acts at positions p (the rows of a batch, the tokens of
a sequence, or batch x output pixels of a convolution), so with X the layer's (unfolded) input and D_i the
gradient of L_i at W's output,

    grad_W L_i = sum_p d_{i,p} x_p^T = D_i^T X,      ||grad_W L_i||_F^2 = < D_i D_i^T , X X^T >
                                                                      = sum_c D_{i,:,c}^T (X X^T) D_{i,:,c}.

The P x P Gram matrix X X^T is formed once per step and shared by every task; per output channel c the
quadratic form D_{i,:,c}^T (X X^T) D_{i,:,c} is that channel's (filter's) squared norm, so ``per_channel``
costs nothing extra. This is the "ghost norm" of per-example gradient clipping in differentially private
training (Goodfellow 2015, "Efficient per-example gradient computations"; Li et al. 2022, "Large language
models can be strong differentially private learners"; Opacus' fast gradient clipping), here grouped per
task over the whole batch instead of per example.

Two routes give the same numbers; ``choose_route`` picks one from the shapes:

- ``gram``: g P^2 (d_in + T d_out) multiply-adds and g P^2 numbers of memory (g groups of a convolution,
  d_in = C_in/g * kh * kw, d_out = C_out/g). Cheap when P is small: a late convolution, a small batch.
- ``direct``: forms each task's grad_W (one matrix product, or one weight-gradient convolution with
  T x C_out output channels, per chunk of tasks) and takes its norm: T P d_in d_out g multiply-adds.
  Cheap when P is large against the layer's width (the toy problem's batch of 1024 at 100x100 layers).

The gradients D_i at W's output come from one T-batched vector-Jacobian product (``is_grads_batched``)
from the losses to W's output, chunked over tasks so that working memory stays bounded at any T; it
crosses whatever lies between W and the heads (batch norm, residual adds, LayerNorm, pooling, dropout with
its saved mask, attention) and the heads may read different tensors. The trunk below W is never visited.

Everything stays on the device, in at least float32 (float64 for float64 inputs, autocast switched off
inside), with no host synchronisation: shapes decide every branch, never tensor values.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_weight

if TYPE_CHECKING:
    from torch.autograd.graph import GradientEdge

GRAM = "gram"
DIRECT = "direct"
ROUTES = (GRAM, DIRECT)
#: The most bytes the Gram matrices X X^T may take at once; above it they are formed in row blocks.
DEFAULT_GRAM_BYTES = 256 << 20
#: Working-memory budget per chunk of tasks: the chunk's gradients at W's output, or its weight gradients.
DEFAULT_CHUNK_BYTES = 64 << 20
#: Calls of the layer a capture keeps between measurements (each holds its forward pass's graph).
DEFAULT_MAX_CALLS = 16

Layer = Union[nn.Linear, nn.Conv2d]
Output = Union[Tensor, "GradientEdge"]


# -- what a layer supports -----------------------------------------------------------------------------
def unsupported(layer: nn.Module) -> Optional[str]:
    """Why the identity cannot be applied to ``layer`` (None when it can).

    Only the stock forward of ``nn.Linear`` and ``nn.Conv2d`` is known to compute x W^T + b or the
    convolution; a subclass that overrides it (LoRA adapters, quantised layers) may not.
    """
    if isinstance(layer, nn.Linear):
        if type(layer).forward is not nn.Linear.forward:
            return f"{type(layer).__name__} overrides nn.Linear.forward"
        return None
    if isinstance(layer, nn.Conv2d):
        if type(layer).forward is not nn.Conv2d.forward or type(layer)._conv_forward is not nn.Conv2d._conv_forward:
            return f"{type(layer).__name__} overrides nn.Conv2d's forward"
        return None
    return f"{type(layer).__name__} is neither nn.Linear nor nn.Conv2d"


def _check_layer(layer: nn.Module) -> None:
    reason = unsupported(layer)
    if reason is not None:
        raise TypeError(f"gram norms: {reason}")


# -- shapes and the cost model ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """The layer as a product over positions: P positions, g groups of d_in inputs and d_out outputs."""

    positions: int
    groups: int
    fan_in: int
    fan_out: int

    @property
    def weight_numel(self) -> int:
        return self.groups * self.fan_in * self.fan_out


def output_shape(layer: Layer, x_shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of ``layer``'s output for an input of shape ``x_shape`` (no call needed)."""
    _check_layer(layer)
    if isinstance(layer, nn.Linear):
        return (*x_shape[:-1], layer.out_features)
    if isinstance(layer.padding, str):
        padding = (0, 0) if layer.padding == "valid" else None
    else:
        padding = (int(layer.padding[0]), int(layer.padding[1]))
    spatial = []
    for axis in range(2):
        extent = int(x_shape[-2 + axis])
        if padding is None:  # 'same' (stride 1 only): the input's extent
            spatial.append(extent)
            continue
        span = layer.dilation[axis] * (layer.kernel_size[axis] - 1) + 1
        spatial.append((extent + 2 * padding[axis] - span) // layer.stride[axis] + 1)
    return (*x_shape[:-3], layer.out_channels, *spatial)


def geometry(layer: Layer, x_shape: Sequence[int], y_shape: Sequence[int]) -> Geometry:
    """P, g, d_in, d_out of one call of ``layer`` with input shape ``x_shape`` and output shape ``y_shape``.

    A Linear's input may have any leading dimensions (tokens): P is their product. A Conv2d's positions are
    batch x output pixels (an unbatched (C, H, W) input is one image).
    """
    _check_layer(layer)
    if isinstance(layer, nn.Linear):
        return Geometry(math.prod(x_shape[:-1]), 1, layer.in_features, layer.out_features)
    batch = x_shape[0] if len(x_shape) == 4 else 1
    groups = layer.groups
    kernel = math.prod(layer.kernel_size)
    return Geometry(batch * y_shape[-2] * y_shape[-1], groups, layer.in_channels // groups * kernel, layer.out_channels // groups)


@dataclass(frozen=True)
class RouteCosts:
    """Multiply-adds and peak extra numbers of each route for T tasks (numbers, not bytes)."""

    gram_flops: float
    direct_flops: float
    gram_numbers: float
    direct_numbers: float
    gram_blocked: bool


def default_chunk(per_task_numbers: int, num_tasks: int, element_size: int = 4, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tasks per chunk so that one chunk's per-task tensors stay within ``budget_bytes``."""
    per_task = max(1, per_task_numbers * element_size)
    return max(1, min(num_tasks, budget_bytes // per_task))


def route_costs(shape: Geometry, num_tasks: int, *, element_size: int = 4, chunk: Optional[int] = None, gram_bytes: int = DEFAULT_GRAM_BYTES) -> RouteCosts:
    """The cost model behind ``choose_route``.

    gram: X X^T once (g P^2 d_in; again for every chunk of tasks when it is too large to keep and is
    formed in row blocks), then one P x P times P x d_out product per task (g P^2 d_out) and the
    elementwise sum. direct: one d_out x P times P x d_in product per task, then its norm.
    """
    p, g, a, b, t = shape.positions, shape.groups, shape.fan_in, shape.fan_out, num_tasks
    gram_full = g * p * p
    blocked = gram_full * element_size > gram_bytes
    chunks = 1 if not blocked else math.ceil(t / (chunk or default_chunk(p * g * b, t, element_size)))
    gram_flops = float(chunks * g * p * p * a + t * g * p * p * b + t * p * g * b)
    direct_flops = float(t * p * a * b * g + t * a * b * g)
    block = max(1, min(p, gram_bytes // max(1, g * p * element_size)))
    gram_numbers = float(g * block * p + p * g * a)  # the Gram (or one row block of it) and the unfolded input
    direct_chunk = default_chunk(shape.weight_numel, t, element_size)
    return RouteCosts(gram_flops, direct_flops, gram_numbers, float(direct_chunk * shape.weight_numel), blocked)


def choose_route(
    layer: Layer,
    x_shape: Sequence[int],
    y_shape: Sequence[int],
    num_tasks: int,
    *,
    element_size: int = 4,
    chunk: Optional[int] = None,
    gram_bytes: int = DEFAULT_GRAM_BYTES,
    positions: Optional[int] = None,
) -> tuple[str, str]:
    """(route, reason): the cheaper of ``gram`` and ``direct`` by multiply-adds for these shapes.

    ``positions`` overrides P (a layer called several times in one forward pass: the sum over calls).
    The reason states the shapes and both estimates, for ``run.json``.
    """
    shape = geometry(layer, x_shape, y_shape)
    if positions is not None:
        shape = Geometry(positions, shape.groups, shape.fan_in, shape.fan_out)
    costs = route_costs(shape, num_tasks, element_size=element_size, chunk=chunk, gram_bytes=gram_bytes)
    route = GRAM if costs.gram_flops < costs.direct_flops else DIRECT
    blocked = ", Gram formed in row blocks (over the memory cap)" if costs.gram_blocked else ""
    groups = f", {shape.groups} groups" if shape.groups > 1 else ""
    reason = (
        f"{route}: P={shape.positions} positions, d_in={shape.fan_in}, d_out={shape.fan_out}{groups}, T={num_tasks}: "
        f"~{costs.gram_flops:.3g} multiply-adds by the Gram identity{blocked} against ~{costs.direct_flops:.3g} forming "
        "the T weight gradients"
    )
    return route, reason


# -- the layer's input and the gradients at its output as rows over positions ------------------------------
def accumulation_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (half-precision inputs are widened)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _full_precision(device: torch.device):
    """Autocast off, so that the products below run in the dtype they are given."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast
        return contextlib.nullcontext()


def _conv_input(conv: nn.Conv2d, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """The input as the convolution reads it, and the zero padding still to apply around it.

    A non-zeros padding mode pads explicitly before a convolution without padding (as nn.Conv2d does);
    ``'same'`` puts the extra row/column of an even total padding after the input, as ATen does.
    """
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if conv.padding_mode != "zeros":
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), (0, 0)
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return x, (0, 0)
        pads = conv._reversed_padding_repeated_twice  # (w_before, w_after, h_before, h_after)
        if pads[0] == pads[1] and pads[2] == pads[3]:
            return x, (pads[2], pads[0])
        return F.pad(x, pads), (0, 0)
    padding = conv.padding
    return x, (int(padding[0]), int(padding[1]))


def input_rows(layer: Layer, x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """(P, g, d_in): the layer's input at every position (a convolution's input unfolded), per group."""
    _check_layer(layer)
    x = x.detach().to(dtype or accumulation_dtype(x))
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, 1, layer.in_features)
    padded, padding = _conv_input(layer, x)
    unfolded = F.unfold(padded, layer.kernel_size, dilation=layer.dilation, padding=padding, stride=layer.stride)  # (N, C_in k k, L)
    # Channel-major columns: group j's input channels are the contiguous block j of C_in/g * k * k columns.
    return unfolded.transpose(1, 2).reshape(-1, layer.groups, unfolded.shape[1] // layer.groups)


def output_rows(layer: Layer, d: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """(T, P, g, d_out): the tasks' gradients at the layer's output, at every position, per group."""
    _check_layer(layer)
    d = d.detach().to(dtype or accumulation_dtype(d))
    tasks = d.shape[0]
    if isinstance(layer, nn.Linear):
        return d.reshape(tasks, -1, 1, layer.out_features)
    if d.dim() == 4:  # an unbatched convolution: (T, C, H, W)
        d = d.unsqueeze(1)
    # Positions ordered (image, row, column), as F.unfold orders them.
    return d.permute(0, 1, 3, 4, 2).reshape(tasks, -1, layer.groups, layer.out_channels // layer.groups)


def _combine(per_channel_sq: Tensor, per_channel: bool) -> Tensor:
    # A Gram quadratic form of a vanishing gradient can round below zero; a norm cannot.
    per_channel_sq = per_channel_sq.clamp_min(0)
    return per_channel_sq if per_channel else per_channel_sq.sum(1)


# -- the Gram route ------------------------------------------------------------------------------------------
class GramOfInput:
    """X X^T of one step, per group, shared by every task and every chunk of tasks.

    Held whole when its g P^2 numbers fit ``gram_bytes``; otherwise only the rows are kept and each call
    forms it again in row blocks of at most ``gram_bytes``.
    """

    def __init__(self, rows: Tensor, gram_bytes: int = DEFAULT_GRAM_BYTES) -> None:
        self.rows = rows.permute(1, 0, 2)  # (g, P, d_in)
        groups, positions = self.rows.shape[0], self.rows.shape[1]
        per_row = max(1, groups * positions * rows.element_size())
        self.block = max(1, min(positions, gram_bytes // per_row))
        self.full: Optional[Tensor] = None
        if self.block >= positions:
            with _full_precision(rows.device):
                self.full = torch.bmm(self.rows, self.rows.transpose(1, 2))

    def sq_norms(self, d_rows: Tensor, per_channel: bool = False) -> Tensor:
        """(t,) squared weight-gradient norms (or (t, C_out) per output channel) of a chunk's (t, P, g, d_out) rows."""
        tasks, positions, groups, fan_out = d_rows.shape
        d_rows = d_rows.to(self.rows.dtype)
        with _full_precision(d_rows.device):
            stacked = d_rows.permute(2, 1, 0, 3).reshape(groups, positions, tasks * fan_out)  # (g, P, t d_out)
            if self.full is not None:
                quadratic = (stacked * torch.bmm(self.full, stacked)).sum(1)
            else:
                quadratic = stacked.new_zeros(groups, tasks * fan_out)
                transposed = self.rows.transpose(1, 2)
                for start in range(0, positions, self.block):
                    stop = min(positions, start + self.block)
                    block = torch.bmm(self.rows[:, start:stop], transposed)  # (g, block, P): rows of X X^T
                    quadratic += (stacked[:, start:stop] * torch.bmm(block, stacked)).sum(1)
        per_channel_sq = quadratic.view(groups, tasks, fan_out).permute(1, 0, 2).reshape(tasks, groups * fan_out)
        return _combine(per_channel_sq, per_channel)


def gram_sq_norms(layer: Layer, x: Tensor, d: Tensor, per_channel: bool = False, *, gram_bytes: int = DEFAULT_GRAM_BYTES) -> Tensor:
    """||grad_W L_i||^2 of the weight only (paper 3.1), by the Gram identity, never forming grad_W.

    ``x``: the layer's input of one call; ``d``: (T, *output.shape), each task's gradient at the output.
    Returns (T,), or (T, C_out) per output channel (filter) with ``per_channel``: the identity holds per
    channel, since selecting channel c of D selects row c of grad_W. Any stride, padding (also 'same',
    'valid' and the non-zeros padding modes), dilation and groups (per group the identity applies to that
    group's input and output channels; the groups are summed).
    """
    dtype = accumulation_dtype(x, d)
    return GramOfInput(input_rows(layer, x, dtype), gram_bytes).sq_norms(output_rows(layer, d, dtype), per_channel)


def bias_sq_norms(layer: Layer, d: Tensor, per_channel: bool = False) -> Tensor:
    """||grad_b L_i||^2 = 1^T D_i D_i^T 1 = ||sum_p d_{i,p}||^2: the bias term is the Gram of D alone."""
    rows = output_rows(layer, d)
    per_channel_sq = rows.sum(1).reshape(rows.shape[0], -1).square()
    return _combine(per_channel_sq, per_channel)


# -- the direct route ---------------------------------------------------------------------------------------
def direct_weight_grads(layer: Layer, x: Tensor, d: Tensor) -> Tensor:
    """(T, *W.shape): each task's grad_W by one product for all T tasks (the route ``direct`` norms)."""
    _check_layer(layer)
    dtype = accumulation_dtype(x, d)
    tasks = d.shape[0]
    x, d = x.detach().to(dtype), d.detach().to(dtype)
    with _full_precision(x.device):
        if isinstance(layer, nn.Linear):
            features = layer.out_features
            stacked = d.reshape(tasks, -1, features).permute(1, 0, 2).reshape(-1, tasks * features)  # row p, column t F + o
            product = torch.mm(stacked.t(), x.reshape(-1, layer.in_features))
            return product.view(tasks, features, layer.in_features)
        conv = layer
        padded, padding = _conv_input(conv, x)
        if d.dim() == 4:
            d = d.unsqueeze(1)
        groups, per_group = conv.groups, conv.out_channels // conv.groups
        batch, height, width = d.shape[1], d.shape[3], d.shape[4]
        # T x C_out output channels, group-major: group j's T x C_out/g channels read input group j.
        grad_output = d.view(tasks, batch, groups, per_group, height, width).permute(1, 2, 0, 3, 4, 5).reshape(batch, groups * tasks * per_group, height, width)
        weight_shape = (groups * tasks * per_group, *conv.weight.shape[1:])
        product = conv2d_weight(padded, weight_shape, grad_output, stride=conv.stride, padding=padding, dilation=conv.dilation, groups=groups)
        return product.view(groups, tasks, per_group, *conv.weight.shape[1:]).transpose(0, 1).reshape(tasks, *conv.weight.shape)


def direct_sq_norms(
    layer: Layer,
    x: Tensor,
    d: Tensor,
    per_channel: bool = False,
    *,
    chunk: Optional[int] = None,
    reduce: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """The same (T,) or (T, C_out) squared norms as ``gram_sq_norms``, by forming grad_W per chunk of tasks.

    ``chunk`` tasks' weight gradients exist at once (default: as many as fit ``DEFAULT_CHUNK_BYTES``).
    ``reduce`` maps a chunk's (t, *W.shape) gradients before the norms (the mean over DDP ranks: the norm
    of a mean gradient needs the gradients, which only this route has).
    """
    tasks = d.shape[0]
    step = chunk or default_chunk(layer.weight.numel(), tasks, torch.finfo(accumulation_dtype(x, d)).bits // 8)
    parts = []
    for start in range(0, tasks, step):
        grads = direct_weight_grads(layer, x, d[start : start + step])
        if reduce is not None:
            grads = reduce(grads)
        parts.append(_combine(grads.flatten(2).square().sum(2), per_channel))
    return torch.cat(parts, 0)


def sq_norms(layer: Layer, x: Tensor, d: Tensor, route: str, per_channel: bool = False) -> Tensor:
    """``gram_sq_norms`` or ``direct_sq_norms`` by name."""
    if route == GRAM:
        return gram_sq_norms(layer, x, d, per_channel)
    if route == DIRECT:
        return direct_sq_norms(layer, x, d, per_channel)
    raise ValueError(f"route must be one of {ROUTES}, got {route!r}")


# -- the tasks' gradients at the layer's output -------------------------------------------------------------
#: Tasks per batched product when the losses come as separate tensors. Each chunk's backward visits only
#: its own tasks' heads, but every head there at the chunk's batch size: the heads cost T x chunk, and
#: fewer, larger chunks save only the per-call overhead (ResNet-18, T = 40 and 100: chunks of 4 to 8 are
#: fastest, all T in one chunk is 1.9x and 2.2x slower).
DEFAULT_TASK_CHUNK = 8


def _separate(losses: Union[Tensor, Sequence[Tensor]]) -> Optional[list[Tensor]]:
    return None if isinstance(losses, Tensor) else [loss.reshape(()) for loss in losses]


def _stack(losses: Union[Tensor, Sequence[Tensor]]) -> Tensor:
    return losses.reshape(-1) if isinstance(losses, Tensor) else torch.stack([loss.reshape(()) for loss in losses])


def _one_hot_columns(count: int, like: Sequence[Tensor]) -> list[Tensor]:
    eye = torch.eye(count, device=like[0].device, dtype=like[0].dtype)
    return [eye[:, j].to(like[j].dtype) for j in range(count)]


def _stack_present(per_task: Sequence[Sequence[Optional[Tensor]]], count: int) -> tuple[Optional[Tensor], ...]:
    """Per output: the tasks' gradients stacked (zeros for a task that does not reach it), or None."""
    stacked: list[Optional[Tensor]] = []
    for k in range(count):
        column = [grads[k] for grads in per_task]
        present = [grad for grad in column if grad is not None]
        if not present:
            stacked.append(None)
            continue
        zero = torch.zeros_like(present[0])
        stacked.append(torch.stack([zero if grad is None else grad for grad in column]))
    return tuple(stacked)


def output_gradients(
    losses: Union[Tensor, Sequence[Tensor]],
    output: Union[Output, Sequence[Output]],
    chunk: Optional[int] = None,
    *,
    batched: bool = True,
) -> Iterator[tuple[slice, tuple[Optional[Tensor], ...]]]:
    """D_i = dL_i/dY for every task, ``chunk`` tasks at a time: yields (tasks' slice, (t, *Y.shape) per output).

    ``losses``: the T per-task losses, best as separate tensors (then a chunk's product runs only through
    its own tasks' heads; default chunk ``DEFAULT_TASK_CHUNK``), or stacked into a (T,) tensor (then every
    chunk runs through every head; default one chunk). ``output`` is W's output Y (a tensor, or its
    ``torch.autograd.graph.GradientEdge``, which stays right when Y is later changed in place), or several
    of them (a layer called more than once). One batched vector-Jacobian product per chunk
    (``is_grads_batched``), keeping the graph for the user's own backward; ``batched=False`` loops over
    the tasks instead (an operator without a batching rule). An output no loss reaches yields None.
    """
    separate = _separate(losses)
    stacked = _stack(losses) if separate is None else None
    # A GradientEdge is a named tuple: one output, not a sequence of them.
    outputs: Any = [output] if isinstance(output, Tensor) or _is_edge(output) else list(output)
    num_tasks = len(separate) if separate is not None else stacked.shape[0]  # type: ignore[union-attr]
    if chunk is None:
        chunk = DEFAULT_TASK_CHUNK if separate is not None else num_tasks
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of tasks, got {chunk}")
    for start in range(0, num_tasks, chunk):
        stop = min(num_tasks, start + chunk)
        grads: Sequence[Optional[Tensor]]
        if separate is not None:
            targets: Sequence[Tensor] = separate[start:stop]
            if batched:
                grads = torch.autograd.grad(
                    targets, outputs, grad_outputs=_one_hot_columns(stop - start, targets), is_grads_batched=True, retain_graph=True, allow_unused=True
                )
            else:
                grads = _stack_present([torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True) for loss in targets], len(outputs))
        else:
            assert stacked is not None
            rows = torch.eye(num_tasks, device=stacked.device, dtype=stacked.dtype)[start:stop]
            if batched:
                grads = torch.autograd.grad(stacked, outputs, grad_outputs=rows, is_grads_batched=True, retain_graph=True, allow_unused=True)
            else:
                per_task = [torch.autograd.grad(stacked, outputs, grad_outputs=row, retain_graph=True, allow_unused=True) for row in rows]
                grads = _stack_present(per_task, len(outputs))
        yield slice(start, stop), tuple(grads)


# -- the capture at the shared layer ------------------------------------------------------------------------
@dataclass
class LayerCall:
    """One call of the layer in the forward pass: its input, that input's version then, and its output's edge."""

    input: Tensor
    input_version: int
    output: Output
    output_shape: torch.Size
    output_dtype: torch.dtype


def _is_edge(value: object) -> bool:
    edge_type = getattr(torch.autograd.graph, "GradientEdge", None)
    return edge_type is not None and isinstance(value, edge_type)


def gradient_edge(tensor: Tensor) -> Output:
    get_edge = getattr(torch.autograd.graph, "get_gradient_edge", None)
    return get_edge(tensor) if get_edge is not None else tensor


class LayerCapture:
    """A forward hook on the shared layer that keeps, per call, its input X and its output's place in the graph.

    Keeping X costs no memory: autograd saves it anyway for the weight gradient. The output is kept as its
    gradient edge, so a later in-place change of Y does not move where its gradient is read. The owner
    calls ``clear()`` once a step's norms are taken (``sq_norms`` does not, so that a caller can measure a
    step twice) and ``remove()`` when done; calls under ``torch.no_grad()`` are not kept.
    """

    def __init__(self, module: nn.Module, max_calls: int = DEFAULT_MAX_CALLS) -> None:
        _check_layer(module)
        if max_calls < 1:
            raise ValueError(f"max_calls must be at least 1, got {max_calls}")
        self.module: Layer = module  # type: ignore[assignment]
        self.calls: list[LayerCall] = []
        self.max_calls = max_calls
        self.dropped = 0  # calls not kept since the last clear(): over max_calls, or while paused
        self.paused = False
        self.batched = True
        self.route: Optional[str] = None  # of the last measurement
        self.reason: Optional[str] = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple, output: object) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, Tensor) or not output.requires_grad:
            return
        if not args or not isinstance(args[0], Tensor):
            return
        # Each kept call holds its output's node, and with it that forward pass's graph: forward passes
        # never measured (paused while another route serves, or more calls than a step makes) are not kept.
        if self.paused or len(self.calls) >= self.max_calls:
            self.dropped += 1
            return
        x = args[0]
        self.calls.append(LayerCall(x, x._version, gradient_edge(output), output.shape, output.dtype))

    def remove(self) -> None:
        self._handle.remove()
        self.calls = []

    def clear(self) -> None:
        self.calls = []
        self.dropped = 0

    def pause(self) -> None:
        """Keep no further calls until ``resume()`` (the calls kept so far stay until ``clear()``)."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def __enter__(self) -> LayerCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def problem(self) -> Optional[str]:
        """Why the captured calls cannot be measured (None when they can)."""
        if self.dropped:
            return f"{self.dropped} call(s) of the shared layer since the last measurement were not kept (paused, or over max_calls={self.max_calls})"
        if not self.calls:
            return "no call of the shared layer with gradients enabled was captured in this forward pass"
        for index, call in enumerate(self.calls):
            if call.input._version != call.input_version:
                return f"the input of call {index} of the shared layer was changed in place after the call"
        return None

    def positions(self) -> int:
        return sum(geometry(self.module, call.input.shape, call.output_shape).positions for call in self.calls)

    def choose_route(self, num_tasks: int, chunk: Optional[int] = None, gram_bytes: int = DEFAULT_GRAM_BYTES) -> tuple[str, str]:
        """``choose_route`` for the captured calls (their positions summed)."""
        if not self.calls:
            raise RuntimeError(self.problem())
        first = self.calls[0]
        size = torch.finfo(accumulation_dtype(first.input)).bits // 8
        return choose_route(
            self.module, first.input.shape, first.output_shape, num_tasks, element_size=size, chunk=chunk, gram_bytes=gram_bytes, positions=self.positions()
        )

    def default_chunk(self, num_tasks: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
        """Tasks per batched backward so that their gradients at W's output fit ``budget_bytes``."""
        numbers = sum(math.prod(call.output_shape) for call in self.calls)
        return default_chunk(numbers, num_tasks, torch.finfo(accumulation_dtype(self.calls[0].input)).bits // 8, budget_bytes)

    def sq_norms(
        self,
        losses: Union[Tensor, Sequence[Tensor]],
        *,
        per_channel: bool = False,
        route: Optional[str] = None,
        chunk: Optional[int] = None,
        reduce: Optional[Callable[[Tensor], Tensor]] = None,
        gram_bytes: int = DEFAULT_GRAM_BYTES,
    ) -> Tensor:
        """(T,) squared norms ||grad_W L_i||^2 of the weight (or (T, C_out) with ``per_channel``) for this step.

        ``losses``: the T per-task losses, best as separate scalar tensors (see ``output_gradients``).
        ``chunk``: tasks per batched product (default: ``DEFAULT_TASK_CHUNK`` for separate losses, at most
        as many as keep their gradients at W's output within ``DEFAULT_CHUNK_BYTES``). ``route``: ``gram``, ``direct`` or None (``choose_route``); the route taken and why are left in
        ``self.route`` / ``self.reason``. ``reduce`` (the mean over DDP ranks) needs the gradients, so it
        runs the direct route. The graph is kept for the user's backward. Falls back once, for good, to a
        loop over tasks where the batched product has no batching rule for some operator.
        """
        problem = self.problem()
        if problem is not None:
            raise RuntimeError(f"gram norms: {problem}")
        num_tasks = len(losses) if not isinstance(losses, Tensor) else losses.numel()
        if chunk is None:
            chunk = self.default_chunk(num_tasks)
            if not isinstance(losses, Tensor):
                chunk = min(chunk, DEFAULT_TASK_CHUNK)
        if reduce is not None:
            self.route, self.reason = DIRECT, "direct: the per-task gradients are averaged across ranks before their norms"
        elif route is None:
            self.route, self.reason = self.choose_route(num_tasks, chunk, gram_bytes)
        elif route in ROUTES:
            self.route, self.reason = route, f"{route}: requested"
        else:
            raise ValueError(f"route must be one of {ROUTES} or None, got {route!r}")
        if self.batched:
            try:
                return self._measure(losses, per_channel, chunk, reduce, gram_bytes)
            except RuntimeError as exc:
                self.batched = False
                warnings.warn(
                    f"gradnorm: batched gradients at the shared layer's output unavailable for this model ({exc}); using one backward per task", RuntimeWarning
                )
        return self._measure(losses, per_channel, chunk, reduce, gram_bytes)

    def _measure(
        self, losses: Union[Tensor, Sequence[Tensor]], per_channel: bool, chunk: int, reduce: Optional[Callable[[Tensor], Tensor]], gram_bytes: int
    ) -> Tensor:
        layer, calls = self.module, self.calls
        dtype = accumulation_dtype(*(call.input for call in calls))
        gram = GramOfInput(torch.cat([input_rows(layer, call.input, dtype) for call in calls], 0), gram_bytes) if self.route == GRAM else None
        outputs = [call.output for call in calls]
        parts = []
        for tasks_slice, grads in output_gradients(losses, outputs, chunk, batched=self.batched):
            tasks = tasks_slice.stop - tasks_slice.start
            # A call no loss of the chunk reaches contributes nothing to grad_W (a chunk of tasks that never
            # reach W: norms zero, as autograd's zero gradient would give).
            present = [(call, g) for call, g in zip(calls, grads) if g is not None]
            if not present and reduce is None:
                shape = (tasks, layer.weight.shape[0]) if per_channel else (tasks,)
                parts.append(torch.zeros(shape, dtype=dtype, device=calls[0].input.device))
                continue
            if gram is not None:
                rows = [output_rows(layer, g if g is not None else _zeros(call, tasks), dtype) for call, g in zip(calls, grads)]
                parts.append(gram.sq_norms(torch.cat(rows, 1), per_channel))
            else:
                step = default_chunk(layer.weight.numel(), tasks, torch.finfo(dtype).bits // 8)
                for start in range(0, tasks, step):
                    # Zeros where no call is reached, so that every rank still takes part in each reduction.
                    count = min(tasks, start + step) - start
                    weight_grads = torch.zeros((count, *layer.weight.shape), dtype=dtype, device=layer.weight.device)
                    for call, g in present:
                        weight_grads = weight_grads + direct_weight_grads(layer, call.input, g[start : start + step])
                    if reduce is not None:
                        weight_grads = reduce(weight_grads)
                    parts.append(_combine(weight_grads.flatten(2).square().sum(2), per_channel))
        return torch.cat(parts, 0)


def _zeros(call: LayerCall, tasks: int) -> Tensor:
    return torch.zeros((tasks, *call.output_shape), dtype=call.output_dtype, device=call.input.device)


def capture(module: nn.Module) -> LayerCapture:
    """Start capturing ``module``'s calls (a Linear or Conv2d); ``.remove()`` stops."""
    return LayerCapture(module)
