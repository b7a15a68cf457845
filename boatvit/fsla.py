"""Feature-space local attention (FSLA): self-attention inside clusters of tokens with similar queries."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from .clustering import (
    ClusterLayout,
    balanced_hierarchical_clustering,
    check_clustering_args,
    cluster_layout,
    static_shape,
    trace_safe_cache,
)
from .compiled_graphs import OpaqueConv2d, in_compiled_graph
from .kernels import cpu_kernels, resolve_backend, use_cpu_kernel

__all__ = ['feature_space_attention', 'FeatureSpaceAttention', 'LePEConv']


@trace_safe_cache
def _window_key_mask(layout: ClusterLayout, overlap: int, device: torch.device) -> Optional[torch.Tensor]:
    """Which keys of the two key windows of every sibling pair (see ``_packed_feature_space_attention``) are real
    tokens.

    Returns ``(2, pairs, 1, c + overlap)`` bool on ``device`` (cached there): window 0 (cluster 2j) then window 1
    (cluster 2j+1) of every pair; or None when the layout has no ghosts.
    """
    if not layout.ghost_slots:
        return None
    c, pairs = layout.cluster_size, layout.num_clusters // 2
    real = torch.ones(layout.padded_tokens, dtype=torch.bool)
    real[list(layout.ghost_slots)] = False
    start = torch.tensor([0, c - overlap])[:, None, None] + torch.arange(pairs)[:, None] * 2 * c
    return real[start + torch.arange(c + overlap)].unsqueeze(2).to(device)


class _RowIndices(NamedTuple):
    """The constant parts of the row indices of ``_packed_feature_space_attention`` for one shape, cached per device
    so that a call launches none of them. Read only."""

    qkv: torch.Tensor  # (3, B, heads, 1): the row of token 0's q, k, v of (b, h) in qkv.view(-1, d)
    slot: torch.Tensor  # (n_pad,): 0..n_pad-1
    head: torch.Tensor  # (B, heads, 1): first slot row of (b, h) in the clustered rows
    qkv_slot: torch.Tensor  # (3, 1): first slot row of q, k and v
    out: torch.Tensor  # (B, heads, 1): the output row of token 0 of (b, h)
    ghost: Optional[torch.Tensor]  # (n_pad,) bool: the ghost slots; None without ghosts


@trace_safe_cache
def _row_indices(B: int, N: int, heads: int, layout: ClusterLayout, device: torch.device) -> _RowIndices:
    n_pad = layout.padded_tokens
    image = torch.arange(B, device=device).view(1, B, 1, 1) * N
    head = torch.arange(heads, device=device).view(1, 1, heads, 1)
    ghosts = set(layout.ghost_slots)
    ghost = torch.tensor([slot in ghosts for slot in range(n_pad)], device=device) if ghosts else None
    return _RowIndices(
        qkv=image * 3 * heads + head + torch.arange(3, device=device).view(3, 1, 1, 1) * heads,
        slot=torch.arange(n_pad, device=device),
        head=(torch.arange(B * heads, device=device) * n_pad).view(B, heads, 1),
        qkv_slot=torch.arange(3, device=device).view(3, 1) * (B * heads * n_pad),
        out=(image * heads + head)[0],
        ghost=ghost,
    )


def _matmul_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    scale: float,
    dropout_p: float,
) -> torch.Tensor:
    """:func:`_cluster_attention` as matmul, softmax, matmul (shapes there)."""
    logits = torch.matmul(q, k.transpose(-1, -2))
    if scale != 1.0:  # BOAT-CSWin's scale is 1
        logits = logits.mul_(scale)
    if attn_mask is not None:
        logits = logits.masked_fill_(attn_mask.logical_not(), float('-inf'))
    # half-precision logits (CPU autocast) are normalised in float32, as the fused kernels do
    low_precision = logits.dtype in (torch.float16, torch.bfloat16)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32 if low_precision else None).to(v.dtype)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(probs, v)


@torch.library.custom_op('boatvit::matmul_attention', mutates_args=(), device_types='cpu')
def _matmul_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor], scale: float
) -> torch.Tensor:
    """:func:`_matmul_attention` without dropout as one operator of a ``torch.compile`` graph: inductor's attention
    pattern matcher rewrites matmul, softmax, matmul as the CPU flash attention kernel, the one this route avoids."""
    return _matmul_attention(q, k, v, attn_mask, scale, 0.0)


@_matmul_attention_op.register_fake
def _(q, k, v, attn_mask, scale):
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    return q.new_empty((*batch, q.shape[-2], v.shape[-1]), dtype=v.dtype)


def _cluster_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    scale: Optional[float],
    dropout_p: float,
) -> torch.Tensor:
    """Attention of the queries ``(..., c, d)`` of every cluster over its keys and values ``(..., m, d)``;
    ``attn_mask`` (True: attend) broadcasts to ``(..., c, m)``.

    ``F.scaled_dot_product_attention`` whenever autograd records (its kernels keep only the log-sum-exp for
    backward, not the ``c x m`` probabilities) and on every accelerator. CPU inference runs the same product as
    matmul, softmax, matmul instead: the CPU flash kernel cuts 49 queries into tiles of 32 and 17 rows, and on
    clusters this small it is slower than one batched matmul over all of them. Inside a compiled graph that route
    is an operator (``boatvit::matmul_attention``), which inductor's pattern matcher cannot turn back into the flash
    kernel.
    """
    if q.device.type != 'cpu' or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if in_compiled_graph() and not dropout_p:
        return torch.ops.boatvit.matmul_attention(q, k, v, attn_mask, scale)
    return _matmul_attention(q, k, v, attn_mask, scale, dropout_p)


@torch.library.custom_op('boatvit::gather_rows', mutates_args=())
def _gather_rows_op(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, index)`` for ``x`` ``(rows, d)`` and ``index`` ``(n,)`` int64, as one opaque operator of a
    ``torch.compile`` graph. Inductor generates a row gather as a loop of indirect loads and fuses it with what reads
    the rows (the key windows, the index arithmetic): on the CPU a compiled FSLA layer at Swin stage 1 took 55 ms
    against 43 ms eager. As an operator the gather stays ATen's, which copies whole rows."""
    return x.index_select(0, index)


@_gather_rows_op.register_fake
def _(x, index):
    return x.new_empty((index.shape[0], x.shape[1]))


def _index_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, index)``: the operator above inside ``torch.compile`` graphs, the ATen op elsewhere (eager,
    and the graphs of ``torch.export``, ONNX and TorchScript, which need ops every consumer knows)."""
    return torch.ops.boatvit.gather_rows(x, index) if in_compiled_graph() else x.index_select(0, index)


class _GatherRows(torch.autograd.Function):
    """``x.index_select(0, index)`` for an ``index`` that reads every row of ``x`` whose gradient is not zero once,
    with a backward that gathers too: ``grad.index_select(0, inverse)``, where ``inverse[r]`` is the output row that
    read row ``r`` of ``x``, or ``len(index)`` for a row that nothing read (it gets a zero gradient).

    The gradient of a plain ``index_select`` is a scatter-add, which ``torch.compile`` generates as atomic adds on
    the CPU: in a compiled BOAT-CSWin-T training step those were 150 ms against 20 ms eagerly. Reads whose gradient
    is exactly zero (ghost slots: masked as keys, their query outputs dropped) may repeat a row; ``inverse`` names
    the one read that carries the gradient.
    """

    @staticmethod
    def forward(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, unread: bool) -> torch.Tensor:
        return _index_rows(x, index)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # apart from forward: torch.func transforms need it so
        _, _, inverse, unread = inputs
        ctx.save_for_backward(inverse)
        ctx.unread = unread

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        if ctx.unread:
            grad = torch.cat([grad, grad.new_zeros(1, grad.shape[1])])
        return _index_rows(grad, inverse), None, None, None


def _gather_rows(x: torch.Tensor, index: torch.Tensor, inverse, unread: bool = False) -> torch.Tensor:
    """:class:`_GatherRows` while autograd records through ``x``, a plain row gather otherwise; ``inverse`` is
    a function that builds the inverse index (only computed when a backward will need it)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _GatherRows.apply(x, index, inverse(), unread)
    return _index_rows(x, index)


def _packed_feature_space_attention(
    qkv: torch.Tensor,
    scale: Optional[float],
    cluster_size: int,
    overlap: int,
    iterations: int,
    temperature: float,
    dropout_p: float,
    backend: Optional[str],
    cluster_queries: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`feature_space_attention` on ``qkv`` packed as ``(B, N, 3, heads, head_dim)``, the layout of a qkv
    Linear's output; returns the attention output ``(B, N, heads * head_dim)`` in token order, the layout the output
    projection takes. The clustering reads ``cluster_queries`` ``(B, heads, N, head_dim)`` when given (the queries
    at a higher precision than ``qkv``'s), else the queries of ``qkv``.

    ``backend`` chooses the clustering's implementation and, for CPU tensors (float64, float32, and the bf16/fp16 of
    CPU autocast, which the kernels take as they are) without attention dropout, that of the attention inside the
    clusters: the fused kernel (``boatvit::fused_cluster_attention``, with
    a fused backward) or :func:`_attend_in_clusters`, its oracle and the route everywhere else.
    """
    B, N, _, heads, d = static_shape(qkv)
    if cluster_queries is None:
        cluster_queries = qkv[:, :, 0].transpose(1, 2)
    backend = resolve_backend(backend)
    order = balanced_hierarchical_clustering(
        cluster_queries, cluster_size, iterations, temperature, return_padded=True, backend=backend
    )
    scale = d**-0.5 if scale is None else scale
    if not dropout_p and use_cpu_kernel(qkv, backend):
        return torch.ops.boatvit.fused_cluster_attention(
            qkv, order, cluster_size, overlap, float(scale), backend == 'kernel'
        )
    return _attend_in_clusters(qkv, order, cluster_layout(N, cluster_size), overlap, scale, dropout_p)


@torch.library.custom_op('boatvit::fused_cluster_attention', mutates_args=(), device_types='cpu')
def _fused_cluster_attention(
    qkv: torch.Tensor, order: torch.Tensor, cluster_size: int, overlap: int, scale: float, required: bool
) -> torch.Tensor:
    """:func:`_attend_in_clusters` without dropout by the compiled CPU kernel (``csrc/cluster_attention_cpu.cpp``),
    built on first use; where it cannot be built, by :func:`_attend_in_clusters` (after one warning) or, if
    ``required``, a RuntimeError. Its gradient is the kernel's backward (``boatvit::fused_cluster_attention_backward``),
    which keeps nothing from the forward but ``qkv`` and ``order``."""
    layout = cluster_layout(qkv.shape[1], cluster_size)
    kernels = cpu_kernels(required)
    if kernels is None:
        return _attend_in_clusters(qkv, order, layout, overlap, scale, 0.0)
    return kernels.cluster_attention(
        qkv.contiguous(), order.contiguous(), layout.cluster_size, layout.num_clusters, overlap, scale
    )


@_fused_cluster_attention.register_fake
def _(qkv, order, cluster_size, overlap, scale, required):
    return qkv.new_empty((qkv.shape[0], qkv.shape[1], qkv.shape[3] * qkv.shape[4]))


@torch.library.custom_op('boatvit::fused_cluster_attention_backward', mutates_args=(), device_types='cpu')
def _fused_cluster_attention_backward(
    grad: torch.Tensor, qkv: torch.Tensor, order: torch.Tensor, cluster_size: int, overlap: int, scale: float
) -> torch.Tensor:
    """The gradient of ``boatvit::fused_cluster_attention`` with respect to ``qkv``, for its output's gradient
    ``grad`` ``(B, N, heads * head_dim)``: the kernel's backward, which recomputes every cluster's probabilities; or,
    where the kernels are not built (the forward then ran :func:`_attend_in_clusters`), the vector-Jacobian product
    of that (``torch.func``: an operator's implementation runs below autograd, where ``torch.autograd`` records
    nothing)."""
    layout = cluster_layout(qkv.shape[1], cluster_size)
    kernels = cpu_kernels()
    if kernels is None:
        _, vjp = torch.func.vjp(lambda x: _attend_in_clusters(x, order, layout, overlap, scale, 0.0), qkv)
        return vjp(grad)[0]
    return kernels.cluster_attention_backward(
        grad.contiguous(),
        qkv.contiguous(),
        order.contiguous(),
        layout.cluster_size,
        layout.num_clusters,
        overlap,
        scale,
    )


@_fused_cluster_attention_backward.register_fake
def _(grad, qkv, order, cluster_size, overlap, scale):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _save_for_the_backward(ctx, inputs, output) -> None:
    qkv, order, cluster_size, overlap, scale, _ = inputs
    ctx.save_for_backward(qkv, order)
    ctx.arguments = (cluster_size, overlap, scale)


def _fused_cluster_attention_gradient(ctx, grad):
    qkv, order = ctx.saved_tensors
    grad_qkv = torch.ops.boatvit.fused_cluster_attention_backward(grad, qkv, order, *ctx.arguments)
    return grad_qkv, None, None, None, None, None


_fused_cluster_attention.register_autograd(_fused_cluster_attention_gradient, setup_context=_save_for_the_backward)


def _lepe_by_conv(conv: Callable[[torch.Tensor], torch.Tensor], qkv: torch.Tensor, height: int, width: int):
    """The LePE term of the V of ``qkv`` ``(B, N, 3, heads, head_dim)`` on its ``height x width`` grid: ``conv``
    (the depthwise 3x3 conv) on V laid out as an NHWC image, returned as ``(B, N, heads * head_dim)``."""
    B, N, _, heads, d = static_shape(qkv)
    # the conv keeps its input for backward, and a view would keep all of q, k and v alive: V is copied out of qkv
    v = qkv[:, :, 2].contiguous().view(B, height, width, heads * d).permute(0, 3, 1, 2)
    return conv(v).permute(0, 2, 3, 1).reshape(B, N, heads * d)


@torch.library.custom_op('boatvit::fused_lepe', mutates_args=(), device_types='cpu')
def _fused_lepe(
    out: torch.Tensor,
    qkv: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    height: int,
    width: int,
    required: bool,
) -> torch.Tensor:
    """``out`` ``(B, N, heads * head_dim)`` plus the LePE of the V of ``qkv`` ``(B, N, 3, heads, head_dim)`` (the
    depthwise 3x3 conv of ``weight`` ``(C, 1, 3, 3)`` and ``bias`` on V as a ``height x width`` image), for
    inference: one pass of the compiled CPU kernel (``csrc/lepe_cpu.cpp``), which reads V straight from ``qkv`` and
    rounds the sum once; where the kernels cannot be built, the conv (after one warning) or, if ``required``, a
    RuntimeError. No gradient: :class:`FeatureSpaceAttention` calls it only where autograd records nothing."""
    kernels = cpu_kernels(required)
    if kernels is None:

        def conv(v: torch.Tensor) -> torch.Tensor:
            b = None if bias is None else bias.to(v.dtype)
            return F.conv2d(v, weight.to(v.dtype), b, padding=1, groups=v.shape[1])

        return out + _lepe_by_conv(conv, qkv, height, width)
    return kernels.add_lepe(out.contiguous(), qkv.contiguous(), weight, bias, height, width)


@_fused_lepe.register_fake
def _(out, qkv, weight, bias, height, width, required):
    return torch.empty_like(out, memory_format=torch.contiguous_format)


def _attend_in_clusters(
    qkv: torch.Tensor, order: torch.Tensor, layout: ClusterLayout, overlap: int, scale: float, dropout_p: float
) -> torch.Tensor:
    """Attention inside the clusters of ``order`` ``(B, heads, layout.padded_tokens)`` (the padded clustered order)
    by PyTorch ops, for ``qkv`` ``(B, N, 3, heads, head_dim)``; returns ``(B, N, heads * head_dim)`` in token order.

    q, k and v are put in clustered order by one row gather (``index_select`` of whole ``head_dim`` rows) straight
    from that layout, so backward scatters into ``qkv`` once; the output goes back to token order by a second one.
    The sibling overlap copies nothing: the keys of cluster 2j are the ``c + overlap`` consecutive slots from its
    start (itself, then the head of cluster 2j+1) and those of cluster 2j+1 the ``c + overlap`` slots ending at its
    end (the tail of cluster 2j, then itself). Both windows lie in the 2c slots of the pair, so each is a slice of
    the clustered keys and values viewed as pairs (its backward adds the windows back, no scatter; an ``unfold``,
    the same view, has a backward that ``torch.compile`` generates slower on the CPU), and the even and odd clusters
    attend in two calls.
    """
    B, N, _, heads, d = static_shape(qkv)
    c, num, n_pad = layout.cluster_size, layout.num_clusters, layout.padded_tokens
    rows = _row_indices(B, N, heads, layout, qkv.device)

    # q[b, t, h] is row (b * N + t) * 3 * heads + h of qkv.view(-1, d); its k and v are heads and 2 * heads rows
    # further. Ghost slots read the last real token: they are masked as keys and their query outputs are dropped.
    tokens = order.clamp(max=N - 1) if layout.ghost_slots else order
    index = torch.add(rows.qkv, tokens, alpha=3 * heads).view(-1)  # (3, B, heads, n_pad): q, k, v in clustered order
    # token t of (b, h) sits in the slot where order[b, h] is t
    slot_of = torch.empty_like(order).scatter_(-1, order, rows.slot.expand_as(order))
    token_slots = (slot_of[..., :N] + rows.head).transpose(1, 2)  # (B, N, heads): the slot row of every (b, t, h)

    def qkv_slots() -> torch.Tensor:
        # row (b, t, s, h) of qkv is read by slot row s * B * heads * n_pad + token_slots[b, t, h]
        return (token_slots.unsqueeze(2) + rows.qkv_slot).reshape(-1)

    clustered = _gather_rows(qkv.reshape(-1, d), index, qkv_slots)
    q, k, v = clustered.view(3, B * heads, n_pad, d).unbind(0)
    if num == 1:
        q, k, v = (t.view(B, heads, n_pad, d) for t in (q, k, v))
        out = _cluster_attention(q, k, v, None, scale, dropout_p)
    else:
        # the key windows of clusters 2j and 2j+1 start at 0 and c - overlap in the 2c slots of their pair
        q = q.view(B * heads, num // 2, 2, c, d)
        k, v = (t.view(B * heads, num // 2, 2 * c, d) for t in (k, v))
        windows = [
            (k[:, :, start : start + c + overlap], v[:, :, start : start + c + overlap]) for start in (0, c - overlap)
        ]
        masks = _window_key_mask(layout, overlap, qkv.device)
        out = torch.stack(
            [
                _cluster_attention(q[:, :, i], k_i, v_i, None if masks is None else masks[i], scale, dropout_p)
                for i, (k_i, v_i) in enumerate(windows)
            ],
            dim=2,
        )

    def token_rows() -> torch.Tensor:
        # slot p of (b, h) is read by output row (b * N + order[b, h, p]) * heads + h; a ghost slot by none
        out_rows = torch.add(rows.out, order, alpha=heads)
        return (out_rows if rows.ghost is None else out_rows.masked_fill(rows.ghost, B * N * heads)).view(-1)

    # out holds the clustered slots of every (b, h), in token order again by one more row gather
    out = _gather_rows(out.reshape(-1, d), token_slots.reshape(-1), token_rows, unread=bool(layout.ghost_slots))
    return out.view(B, N, heads * d)


def _check_cluster_args(cluster_size: int, overlap: int) -> None:
    if not isinstance(cluster_size, int) or cluster_size < 1:
        raise ValueError(f'cluster_size must be a positive int, got {cluster_size!r}.')
    if not isinstance(overlap, int) or not 0 <= overlap < cluster_size:
        raise ValueError(f'overlap must be an int in [0, cluster_size={cluster_size}), got {overlap!r}.')


def feature_space_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    cluster_size: int = 49,
    overlap: int = 20,
    iterations: int = 2,
    temperature: float = 100.0,
    dropout_p: float = 0.0,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Attention inside the balanced hierarchical clusters of the queries.

    Every (image, head) is clustered independently by :func:`balanced_hierarchical_clustering` of ``q``; each
    cluster's queries attend to the cluster's own keys plus ``overlap`` keys of its last-level sibling
    (see ``_packed_feature_space_attention``). Padding ghosts of an N that is not ``c * 2^K`` are never attended to.

    Args:
        q, k, v: ``(B, heads, N, head_dim)``.
        scale: attention logit scale; None means ``head_dim ** -0.5``.
        cluster_size, iterations, temperature: clustering parameters, see ``balanced_hierarchical_clustering``.
        overlap: sibling keys and values added to each cluster (20 in BOAT); must be < ``cluster_size``.
        dropout_p: attention dropout probability.
        backend: the implementation of the clustering (see ``balanced_hierarchical_clustering``) and, in CPU
            inference and training in any float dtype, of the attention inside the clusters (the compiled kernel for
            ``'auto'`` and ``'kernel'``, PyTorch ops for ``'torch'``); the same result either way.

    Returns:
        ``(B, heads, N, head_dim)``, tokens in their input order.
    """
    for name, t in (('q', q), ('k', k), ('v', v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f'{name} must be a torch.Tensor of shape (B, heads, N, head_dim), got {type(t).__name__}.')
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f'q, k and v must have the same shape (B, heads, N, head_dim), got {tuple(q.shape)}, '
            f'{tuple(k.shape)}, {tuple(v.shape)}.'
        )
    _check_cluster_args(cluster_size, overlap)
    B, heads, N, d = static_shape(q)
    qkv = torch.stack([t.transpose(1, 2) for t in (q, k, v)], dim=2)
    out = _packed_feature_space_attention(
        qkv, scale, cluster_size, overlap, iterations, temperature, dropout_p, backend
    )
    return out.view(B, N, heads, d).transpose(1, 2)


class LePEConv(OpaqueConv2d):
    """The depthwise 3x3 conv of a locally-enhanced positional term (LePE) on V, for inputs fed channels-last (FSLA's
    V image, CSWin's V stripes); inside compiled CPU graphs an operator (see ``boatvit.compiled_graphs``).

    A channels-last input gives a channels-last weight gradient: strides (9, 1, 3, 1) where a weight made NCHW has
    (9, 9, 3, 1). The values are laid out the same (the second axis has size 1), but DDP compares strides and warns at
    every step, so the weight is made channels-last like its gradient.
    """

    def __init__(self, dim: int, device=None, dtype=None):
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f'dim must be a positive int (the channels of V), got {dim!r}.')
        super().__init__(dim, dim, kernel_size=3, padding=1, groups=dim, device=device, dtype=dtype)
        weight = self.weight.detach()
        self.weight = nn.Parameter(torch.empty_like(weight, memory_format=torch.channels_last).copy_(weight))


# a leaf for torch.fx (timm's FX feature extraction): the clustering builds its tree from the token count
@register_notrace_module
class FeatureSpaceAttention(nn.Module):
    """BOAT's feature-space local attention with its LePE positional term.

    ``x -> proj(FSLA(q, k, v) + dwconv3x3(v))``, with its own ``qkv`` and ``proj`` (nothing shared with the
    image-space attention) and the depthwise 3x3 conv applied to V laid out as the ``H x W`` image.

    Key names map to the reference's ``ContentAttention``: ``qkv``, ``proj``, ``lepe`` (reference ``get_v``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        scale: Optional[float] = None,
        cluster_size: int = 49,
        overlap: int = 20,
        iterations: int = 2,
        temperature: float = 100.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: Optional[str] = None,
        float32_clustering: bool = False,
        device=None,
        dtype=None,
    ):
        """
        Args:
            dim: channels C.
            num_heads: heads; must divide ``dim``.
            qkv_bias: bias of the qkv projection.
            scale: attention logit scale; None means ``head_dim ** -0.5`` (BOAT-Swin). BOAT-CSWin uses 1.0.
            cluster_size: target tokens per cluster (49).
            overlap: sibling tokens added to each cluster's keys and values (20).
            iterations: soft k-means refinement steps per split (2).
            temperature: soft-assignment temperature multiplier (100).
            attn_drop: attention dropout.
            proj_drop: output dropout.
            backend: which implementation clusters the queries (see ``balanced_hierarchical_clustering``'s
                ``backend``) and, in CPU inference, attends inside the clusters: ``'auto'``, ``'kernel'`` (boatvit's
                compiled CPU kernels) or ``'torch'`` (PyTorch ops); None follows ``BOATVIT_CPU_KERNEL``.
            float32_clustering: under autocast, a float32 input's queries are computed in float32 by their own
                matmul for the clustering, so that the layer clusters as without autocast. False (the default)
                clusters the half-precision queries of the qkv Linear, with no extra matmul: in whole bf16 forwards
                the earlier layers' rounding moves as many tokens as the queries' does, and the flag changed neither
                the clusters nor top-1 measurably while it cost up to 6 % of the forward (issue 27, RESULTS.md).
            device, dtype: factory arguments of every parameter (timm's convention).
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if not all(isinstance(n, int) and n > 0 for n in (dim, num_heads)) or dim % num_heads:
            raise ValueError(
                f'dim and num_heads must be positive ints, dim divisible by num_heads; got dim={dim!r}, '
                f'num_heads={num_heads!r}.'
            )
        _check_cluster_args(cluster_size, overlap)
        check_clustering_args(iterations, temperature)
        if backend is not None:
            resolve_backend(backend)  # a bad name is refused when the model is built
        self.dim = dim
        self.num_heads = num_heads
        self.scale = scale
        self.cluster_size = cluster_size
        self.overlap = overlap
        self.iterations = iterations
        self.temperature = temperature
        self.backend = backend
        self.float32_clustering = float32_clustering
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = attn_drop
        self.lepe = LePEConv(dim, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (
            f'dim={self.dim}, num_heads={self.num_heads}, scale={self.scale}, cluster_size={self.cluster_size}, '
            f'overlap={self.overlap}'
        )

    def _check_input(self, x: torch.Tensor, size: Tuple[int, int]) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f'x must be a torch.Tensor of shape (B, N, {self.dim}), got {type(x).__name__}.')
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f'FeatureSpaceAttention expects (B, N, {self.dim}) tokens, got shape {tuple(x.shape)}.')
        if not isinstance(size, (tuple, list)) or len(size) != 2:
            raise TypeError(f'size must be the token grid (H, W), got {size!r}.')
        if size[0] * size[1] != static_shape(x)[1]:
            raise ValueError(f'size {tuple(size)} has {size[0] * size[1]} positions but x has N={x.shape[1]} tokens.')

    def _cluster_queries(self, x: torch.Tensor, qkv: torch.Tensor) -> Optional[torch.Tensor]:
        """The queries the clustering reads when autocast rounded those of ``qkv`` (``self.qkv(x)``) below the
        precision of ``x``: ``(B, heads, N, d)`` at the precision of ``x``, or None to read those of ``qkv``.

        Under autocast the qkv Linear rounds the queries to bfloat16/float16, and a split decided on rounded
        queries moves many tokens (on random weights, 14-25 % of the tokens of a 56 x 56 or 112 x 112 grid stay in
        their float32 cluster under bf16, given the float32 input). With ``float32_clustering`` (off by default) the
        clustering gets its own queries from a matmul of the q rows of the weight at the precision of ``x``: one
        more ``C x C`` product per token, a third of the qkv Linear's. In a whole forward the input already carries
        the earlier layers' rounding, which moves as many tokens, so the flag gains nothing measurable there. A
        ``x`` already rounded to half precision (CPU autocast's LayerNorm output) is clustered as the qkv Linear
        gives it either way.
        """
        B, N, C = static_shape(x)
        if not (self.float32_clustering and qkv.dtype != x.dtype and cluster_layout(N, self.cluster_size).levels):
            return None
        weight, bias = self.qkv.weight[:C], None if self.qkv.bias is None else self.qkv.bias[:C]
        with torch.autocast(x.device.type, enabled=False):
            q = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        return q.view(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)

    def cluster_order(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """The clustered order of the queries of ``x`` ``(B, N, C)`` on the ``size`` ``(H, W)`` grid, as
        :meth:`forward` clusters them: ``(B, heads, N)`` int64 token indices, consecutive runs of
        ``cluster_layout(N, cluster_size).cluster_sizes()`` forming the clusters."""
        self._check_input(x, size)
        B, N, C = static_shape(x)
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads)
        q = self._cluster_queries(x, qkv)
        return balanced_hierarchical_clustering(
            qkv[:, :, 0].transpose(1, 2) if q is None else q,
            self.cluster_size,
            self.iterations,
            self.temperature,
            backend=self.backend,
        )

    def forward(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """
        Args:
            x: ``(B, N, C)`` tokens in raster order of an ``H x W`` grid.
            size: ``(H, W)`` with ``H * W == N``.

        Returns:
            ``(B, N, C)``.
        """
        self._check_input(x, size)
        B, N, C = static_shape(x)
        H, W = size
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads)
        out = _packed_feature_space_attention(
            qkv,
            scale=self.scale,
            cluster_size=self.cluster_size,
            overlap=self.overlap,
            iterations=self.iterations,
            temperature=self.temperature,
            dropout_p=self.attn_drop if self.training else 0.0,
            backend=self.backend,
            cluster_queries=self._cluster_queries(x, qkv),
        )
        if self._lepe_in_kernel(qkv):
            lepe = self.lepe
            out = torch.ops.boatvit.fused_lepe(
                out, qkv, lepe.weight, lepe.bias, H, W, resolve_backend(self.backend) == 'kernel'
            )
        else:
            # the attention output is a fresh gather that nothing else holds: the LePE adds into it
            out = out.add_(_lepe_by_conv(self.lepe, qkv, H, W))
        return self.proj_drop(self.proj(out))

    def _lepe_in_kernel(self, qkv: torch.Tensor) -> bool:
        """Whether the LePE term is added by the CPU kernel (``boatvit::fused_lepe``): where the cluster attention's
        kernel would run and autograd records nothing (the kernel has no backward). In a BOAT-Swin-T forward it
        saves the copy of V, the conv's output and the add, about 1 % in bf16 (benchmarks/RESULTS.md)."""
        records = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (qkv, self.lepe.weight, self.lepe.bias)
        )
        return not records and use_cpu_kernel(qkv, self.backend)
