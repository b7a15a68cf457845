"""Balanced hierarchical clustering of query features, the grouping step of BOAT's feature-space attention.

The reference (mahaoyuHKU/pytorch-boat, ``ContentAttention``) splits the N tokens of every (image, head) into two
equal halves, then each half into two, ``K`` times, until 2^K clusters of 49 tokens remain. It only works when
``N == 49 * 2^K``. This module keeps that algorithm bit-for-bit at such N and extends it to any N >= 1:

* Levels: ``K = floor(log2(N // cluster_size))`` (0 when ``N < 2 * cluster_size``), the reference's own formula.
* The token set is padded with ``P = c * 2^K - N`` *ghost* tokens, ``c = ceil(N / 2^K)`` being the padded cluster
  size (``cluster_size <= c <= 2 * cluster_size`` whenever ``K >= 1``). Ghosts have a zero query, so they add
  nothing to any centroid, and they always sort after the real tokens of their group.
* Ghosts are spread over the tree so the real halves of every split differ by at most one token: a group with g
  ghosts gives ``g // 2`` to its first child and the rest to its second. Since ``P < 2^K`` each final cluster holds
  ``floor(N / 2^K)`` or ``ceil(N / 2^K)`` real tokens (between ``cluster_size`` and ``2 * cluster_size``), and its
  ghost, if any, sits in its last slot.

Everything about the ghosts depends only on ``(N, cluster_size)``: it is the :class:`ClusterLayout`.

Two implementations compute the clustering, chosen by the ``backend`` argument: the PyTorch ops here (every device,
tracing, export) and, for CPU tensors, eager or in a ``torch.compile`` graph, the compiled kernel of
``csrc/clustering_cpu.cpp`` (``boatvit.kernels``), which fuses each level's ~20 small ops per (image, head). The
kernel is reached through the operator ``torch.ops.boatvit.fused_clustering``, registered here at import: its
fake implementation lets compiled graphs hold it, and its CPU implementation builds the kernel on first use. The
two sum in different orders: in float64 the rounding (about 1e-16) is far below the gaps between keys and the
permutations are equal (tested); in float32 a token within rounding of a cut can fall on the other side.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, TypeVar

import torch
import torch.nn.functional as F
from torch._guards import detect_fake_mode

from .kernels import cpu_kernels, resolve_backend, use_cpu_kernel

__all__ = [
    'ClusterLayout',
    'cluster_layout',
    'balanced_hierarchical_clustering',
    'clustering_levels',
    'static_shape',
    'token_slots',
    'token_clusters',
]

_F = TypeVar('_F', bound=Callable)


def trace_safe_cache(fn: _F) -> _F:
    """``functools.lru_cache`` for the helpers that derive Python structure or constant index tensors from a size.

    While ``torch.export`` (and with it the ONNX exporter) traces a model, every new tensor is a fake tensor: a
    cached one would be handed to all later eager calls, which then fail, and a real one cached before would fail
    under a fake tensor mode. Under tracing or fake tensors the helper runs uncached, so its tensors become
    constants of the graph; torch.compile, which ignores lru_cache anyway, stops warning, and a TorchScript trace
    records the same graph at every invocation (its sanity check traces twice).
    """
    cached = functools.lru_cache(maxsize=256)(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tracing = torch.compiler.is_compiling() or torch.jit.is_tracing() or detect_fake_mode() is not None
        return fn(*args, **kwargs) if tracing else cached(*args, **kwargs)

    return wrapper


def static_shape(t: torch.Tensor) -> Tuple[int, ...]:
    """``t.shape``, as Python ints also while TorchScript traces (which makes sizes 0-dim tensors): the clustering
    tree is built from the sizes, so a trace is specialised to its example's token count, as a compiled graph is."""
    return tuple(int(size) for size in t.shape) if torch.jit.is_tracing() else tuple(t.shape)


def clustering_levels(num_tokens: int, cluster_size: int) -> int:
    """Number of balanced binary splits for ``num_tokens`` tokens: ``floor(log2(N // cluster_size))``, at least 0."""
    return max(num_tokens // cluster_size, 1).bit_length() - 1


@dataclass(frozen=True)
class ClusterLayout:
    """The data-independent part of a clustering of ``num_tokens`` tokens.

    Attributes:
        num_tokens: N, the number of real tokens.
        levels: K, the number of balanced binary splits.
        cluster_size: c, the padded size of every cluster (real tokens plus at most one ghost).
        ghosts_per_level: for each level k (0..K-1), the ghost count of each of its 2^k groups, in tree order.
        ghost_slots: sorted positions in the padded (clustered) order that hold a ghost; empty when N = c * 2^K.
    """

    num_tokens: int
    levels: int
    cluster_size: int
    ghosts_per_level: Tuple[Tuple[int, ...], ...]
    ghost_slots: Tuple[int, ...]

    @property
    def num_clusters(self) -> int:
        return 2**self.levels

    @property
    def padded_tokens(self) -> int:
        return self.cluster_size * self.num_clusters

    @property
    def num_ghosts(self) -> int:
        return self.padded_tokens - self.num_tokens

    def cluster_sizes(self) -> List[int]:
        """Real-token count of each cluster, in clustered order."""
        sizes = [self.cluster_size] * self.num_clusters
        for slot in self.ghost_slots:
            sizes[slot // self.cluster_size] -= 1
        return sizes


@trace_safe_cache
def cluster_layout(num_tokens: int, cluster_size: int = 49) -> ClusterLayout:
    """The :class:`ClusterLayout` of ``num_tokens`` tokens clustered into groups of about ``cluster_size``."""
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f'num_tokens must be a positive int, got {num_tokens!r}.')
    if not isinstance(cluster_size, int) or cluster_size < 1:
        raise ValueError(f'cluster_size must be a positive int, got {cluster_size!r}.')
    return _layout_of_levels(num_tokens, clustering_levels(num_tokens, cluster_size))


@trace_safe_cache
def _layout_of_levels(num_tokens: int, levels: int) -> ClusterLayout:
    """The layout of ``num_tokens`` tokens split ``levels`` times (what the kernel's operator is given)."""
    size = math.ceil(num_tokens / 2**levels)
    ghosts = [size * 2**levels - num_tokens]
    per_level = []
    for _ in range(levels):
        per_level.append(tuple(ghosts))
        ghosts = [g for parent in ghosts for g in (parent // 2, parent - parent // 2)]
    # after the last split every cluster has 0 or 1 ghost, in its last slot
    slots = tuple(j * size + size - 1 for j, g in enumerate(ghosts) if g)
    return ClusterLayout(num_tokens, levels, size, tuple(per_level), slots)


@trace_safe_cache
def _split_index(group_size: int, ghosts: Tuple[int, ...], device: torch.device) -> Optional[torch.Tensor]:
    """Where each slot of the two children comes from in a sorted parent row (reals ascending, then ghosts).

    Returns ``(groups, group_size)`` int64 on ``device`` (cached there: no host-to-device copy per call) or None when
    no group has a ghost (the children are plain halves).
    """
    if not any(ghosts):
        return None
    half = group_size // 2
    rows = []
    for g in ghosts:
        g0 = g // 2
        real = group_size - g
        real0, real1 = half - g0, half - (g - g0)
        child0 = list(range(real0)) + list(range(real, real + g0))
        child1 = list(range(real0, real0 + real1)) + list(range(real + g0, group_size))
        rows.append(child0 + child1)
    return torch.tensor(rows, dtype=torch.long, device=device)


@trace_safe_cache
def _arange(n: int, device: torch.device) -> torch.Tensor:
    """``torch.arange(n)`` cached on ``device``. Read only."""
    return torch.arange(n, device=device)


@trace_safe_cache
def _group_starts(groups: int, n: int, device: torch.device) -> torch.Tensor:
    """``(groups, 1)`` int64 on ``device`` (cached there): where each group of ``n`` slots starts in the flat order.
    Read only."""
    return torch.arange(0, groups * n, n, device=device).view(groups, 1)


@trace_safe_cache
def _norm_scales(temperature: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(2, 1)`` of ``dtype`` on ``device``: 1 and ``temperature``, which turn the inverse norms into the two
    factors the clustering needs (the cosines' and the soft assignment's) in one product."""
    return torch.tensor([[1.0], [temperature]], dtype=dtype, device=device)


@trace_safe_cache
def _real_slots(layout: ClusterLayout, device: torch.device) -> torch.Tensor:
    """The slots of the padded order that hold real tokens, int64 on ``device``: selecting them by index rather
    than by a boolean mask leaves nothing for the host to wait for (a mask's selection sizes its output on the
    device)."""
    ghosts = set(layout.ghost_slots)
    return torch.tensor([s for s in range(layout.padded_tokens) if s not in ghosts], device=device)


def check_clustering_args(iterations: int, temperature: float) -> None:
    """Refuse soft k-means settings that cannot cluster, by name: ``iterations`` a non-negative int,
    ``temperature`` a positive finite number."""
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 0:
        raise ValueError(f'iterations must be a non-negative int, got {iterations!r}.')
    if not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f'temperature must be a positive finite number, got {temperature!r}.')


def _check_queries(q: torch.Tensor) -> None:
    if not isinstance(q, torch.Tensor):
        raise TypeError(f'q must be a torch.Tensor of shape (B, heads, N, head_dim), got {type(q).__name__}.')
    if q.ndim != 4:
        raise ValueError(
            f'q must have shape (B, heads, N, head_dim), got a {q.ndim}-D tensor of shape {tuple(q.shape)}.'
        )
    if not q.is_floating_point():
        raise ValueError(f'q must be a floating-point tensor, got dtype {q.dtype}.')
    if q.shape[2] < 1 or q.shape[3] < 1:
        raise ValueError(f'q needs at least one token and one channel, got shape {tuple(q.shape)}.')


@trace_safe_cache
def _ghost_keys(group_size: int, ghosts: Tuple[int, ...], device: torch.device) -> Optional[torch.Tensor]:
    """``(groups, group_size)`` bool on ``device``, True at the ghost slots of every group (its last ones), or None
    if none."""
    if not any(ghosts):
        return None
    real = group_size - torch.tensor(ghosts, device=device)
    return torch.arange(group_size, device=device) >= real[:, None]


def _sort_keys(key: torch.Tensor, ghost_keys: Optional[torch.Tensor]) -> torch.Tensor:
    """What the rows of ``key`` ``(rows, groups, n)`` are sorted by: the same order, with NaN keys (from a
    non-finite query) after every finite one and the ghost slots (``ghost_keys``, broadcast over rows) after every
    real token, also one with a NaN or +inf key: a ghost among the real half would leave a real token out of the
    clusters and a ghost in them.

    Eager and compiled: integers whose order is the float order, which torch.sort puts in the same permutation,
    ties included, and faster (no NaN test per comparison). ONNX and TorchScript traces have no bitcast: they
    sort the floats, NaN and +inf keys clamped to the largest finite float so that the ghosts can come after them.
    """
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        big = torch.finfo(key.dtype).max
        key = key.nan_to_num(big, big)
        return key if ghost_keys is None else key.masked_fill(ghost_keys, float('inf'))
    int_dtype = torch.int32 if key.dtype == torch.float32 else torch.int64
    info = torch.iinfo(int_dtype)
    bits = key.nan_to_num(nan=float('inf'), posinf=float('inf'), neginf=float('-inf')).view(int_dtype)
    # the bits of a negative float grow as it falls: flipping all but the sign bit makes them fall too
    codes = bits ^ ((bits >> (info.bits - 1)) & info.max)
    return codes if ghost_keys is None else codes.masked_fill_(ghost_keys, info.max)


def _argsort_rows(key: torch.Tensor, tokens: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Ascending order of every row of ``key`` ``(rows, n)``, equal keys in the order of their ``tokens``
    ``(rows, n)`` (input indices, distinct in a row), as indices into the flattened ``key``: ``offsets`` ``(rows, 1)``
    holds where each row starts (``0, n, 2n, ...``).

    Equal keys come from equal queries, which tie at every level. ``torch.sort`` would order them in a way of its own
    that differs between devices; breaking ties by the token index gives one clustering everywhere, the compiled
    CPU kernel's too. A per-row sort: a 1-D radix sort of 64-bit (row, float bits) codes was tried, faster on one
    thread but slower on a busy machine (it synchronises its threads at every pass).
    """
    n = static_shape(key)[1]
    if torch.onnx.is_in_onnx_export():
        # an exported graph sorts the rows as a full-length TopK with a constant K: TensorRT needs K when it builds
        # the engine, and an exported sort reads K from the runtime shape (dynamic batch). Ties are TopK's own.
        return (torch.topk(key, n, dim=-1, largest=False).indices + offsets).view(-1)
    if key.dtype == torch.int32:
        # the 32-bit code above the 31-bit token: one sort of int64 (an add with alpha shifts and packs in one op)
        order = torch.sort(torch.add(tokens, key.long(), alpha=1 << 32), dim=-1).indices
    else:
        # 64-bit codes (or a traced graph's float keys) leave no room for the token: a stable sort of the rows put in
        # token order
        by_token = torch.sort(tokens, dim=-1).indices
        order = by_token.gather(-1, torch.sort(key.gather(-1, by_token), dim=-1, stable=True).indices)
    return (order + offsets).view(-1)


@torch.library.custom_op('boatvit::fused_clustering', mutates_args=(), device_types='cpu')
def _fused_clustering(
    q: torch.Tensor,
    num_tokens_padded: int,
    levels: int,
    iterations: int,
    temperature: float,
    required: bool,
) -> torch.Tensor:
    """The compiled CPU kernel's padded clustered order ``(B, heads, num_tokens_padded)`` int64 of ``q``
    ``(B, heads, N, d)`` float64/float32/bfloat16/float16 (half precision clustered in float32), built on first use;
    where it cannot be built, the PyTorch ops' (after one warning) or, if ``required``, a RuntimeError. No gradient:
    the queries come detached."""
    kernels = cpu_kernels(required)
    if kernels is None:
        q = q.float() if q.dtype in (torch.float16, torch.bfloat16) else q
        return _torch_clustered_order(q, _layout_of_levels(q.shape[2], levels), iterations, temperature)
    return kernels.clustered_order(
        q if q.stride(-1) == 1 else q.contiguous(), num_tokens_padded, levels, iterations, temperature
    )


@_fused_clustering.register_fake
def _(q, num_tokens_padded, levels, iterations, temperature, required):
    return q.new_empty((q.shape[0], q.shape[1], num_tokens_padded), dtype=torch.long)


def _clustered_order(
    q: torch.Tensor,
    layout: ClusterLayout,
    iterations: int,
    temperature: float,
    backend: str,
) -> torch.Tensor:
    """Padded clustered order ``(B, heads, layout.padded_tokens)``; ghosts are the indices >= N."""
    B, heads, N, d = static_shape(q)
    n_pad = layout.padded_tokens
    if layout.levels == 0:
        return torch.arange(n_pad, device=q.device).expand(B, heads, n_pad)
    # the assignment is discrete (a sort): nothing differentiable flows through it
    q = q.detach()
    # a split decided in half precision moves many tokens: half-precision queries are clustered in float32, by the
    # kernel as it reads them (no float32 copy of q), by the PyTorch ops on a float32 copy
    if use_cpu_kernel(q, backend):
        return torch.ops.boatvit.fused_clustering(
            q, n_pad, layout.levels, iterations, float(temperature), backend == 'kernel'
        )
    if q.dtype in (torch.float16, torch.bfloat16):
        q = q.float()
    return _torch_clustered_order(q, layout, iterations, temperature)


def _softmax_of_two(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1 of ``logits`` ``(groups, 2, n)``: the soft assignment of every token to two centroids.

    An exported graph takes it as the sigmoids of the two logits' differences, the same values: ONNX Runtime runs a
    Softmax over an axis that is not the last through a transpose of the whole tensor to and from the last axis, and
    these are the largest Softmax nodes of the exported clustering. The products that give the logits stay as they are.
    """
    if not torch.onnx.is_in_onnx_export():
        return torch.softmax(logits, dim=1)
    first, second = logits.unbind(1)
    return torch.stack([torch.sigmoid(first - second), torch.sigmoid(second - first)], dim=1)


def _torch_clustered_order(
    q: torch.Tensor,
    layout: ClusterLayout,
    iterations: int,
    temperature: float,
) -> torch.Tensor:
    """:func:`_clustered_order` by PyTorch ops, for ``q`` detached float32/float64 and ``layout.levels >= 1``."""
    B, heads, N, d = static_shape(q)
    n_pad = layout.padded_tokens
    rows = B * heads
    # the only copy of the queries, zero-padded with the ghosts; every level moves it once, to its new order
    if n_pad == N:
        raw = q.reshape(rows * N, d)
    else:
        raw = q.new_zeros(rows * n_pad, d)
        raw.view(B, heads, n_pad, d)[:, :, :N] = q
    # cosines are (q . c) / max(|q|, eps), F.normalize's convention; the norms travel with the tokens
    inv_norm = raw.norm(dim=-1).clamp_min(1e-12).reciprocal()
    # the inverse norms, and times the temperature for the soft assignment: one tensor, moved by one index_select
    inv_norms = inv_norm * _norm_scales(temperature, q.dtype, q.device)
    order = None  # every slot's token, rows after rows; before the first split slot p of every row holds token p

    for level in range(layout.levels):
        groups = rows * 2**level
        n = n_pad >> level
        x = raw.view(groups, n, d)
        x_t = x.transpose(1, 2)
        inv, inv_temperature = inv_norms.view(2, groups, 1, n).unbind(0)
        # initial centroids: the two halves of the group in its current order (ghosts add zeros)
        centroids = F.normalize(x.view(groups, 2, n // 2, d).mean(2), dim=-1)  # (groups, 2, d)
        # (groups, 2, n) layout: the softmax over the two centroids runs along a strided axis, vectorised over n
        for _ in range(iterations):
            assign = _softmax_of_two(torch.bmm(centroids, x_t).mul_(inv_temperature))
            centroids = F.normalize(torch.bmm(assign, x), dim=-1)
        cos_plus_1 = torch.bmm(centroids, x_t).mul_(inv).add_(1)
        key = cos_plus_1[:, 0] / cos_plus_1[:, 1]  # (groups, n)
        ghosts = layout.ghosts_per_level[level]
        sort_keys = _sort_keys(key.view(rows, 2**level, n), _ghost_keys(n, ghosts, q.device))
        tokens = _arange(n_pad, q.device).expand(rows, n_pad) if order is None else order.view(groups, n)
        flat = _argsort_rows(sort_keys.view(groups, n), tokens, _group_starts(groups, n, q.device))
        split = _split_index(n, ghosts, q.device)
        if split is not None:
            flat = flat.view(rows, 2**level, n).gather(-1, split.expand(rows, -1, -1)).view(-1)
        order = flat.remainder(n_pad) if order is None else order.index_select(0, flat)
        if level + 1 < layout.levels:
            raw = raw.index_select(0, flat)
            inv_norms = inv_norms.index_select(1, flat)
    return order.view(B, heads, n_pad)


def balanced_hierarchical_clustering(
    q: torch.Tensor,
    cluster_size: int = 49,
    iterations: int = 2,
    temperature: float = 100.0,
    return_padded: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Group the tokens of every (image, head) into equal-size clusters by their query features.

    At each of ``K = floor(log2(N // cluster_size))`` levels every group is cut in two balanced halves:
    the initial centroids are the L2-normalised means of the group's first and second halves (in its current
    order; raster order at the first level), refined by ``iterations`` soft k-means steps
    (``a = softmax(temperature * cos)``, ``centroid = normalize(q^T a)`` with un-normalised q), then the tokens
    are sorted ascending by ``(cos0 + 1) / (cos1 + 1)`` (equal keys, from equal queries, by token index) and the
    sorted list is cut in half. The sorted order is carried into the next level. See the module docstring for N that
    is not ``cluster_size * 2^K``.

    On the CPU a compiled kernel (``boatvit.kernels``) computes the same clustering, in eager mode and inside
    ``torch.compile`` graphs (the operator ``torch.ops.boatvit.fused_clustering``); it is built on first use.

    Args:
        q: query features, ``(B, heads, N, head_dim)``, any floating dtype. float16/bfloat16 are clustered in
            float32, with autocast off. No gradient flows through the result.
        cluster_size: target tokens per cluster (49 in BOAT); clusters hold between ``cluster_size`` and
            ``2 * cluster_size`` tokens (sizes differ by at most one), or all N when ``N < 2 * cluster_size``.
        iterations: soft k-means refinement steps per split (2 in BOAT).
        temperature: softmax temperature multiplier of the soft assignment (100 in BOAT).
        return_padded: return the padded order ``(B, heads, c * 2^K)`` with ghost indices >= N in the slots
            ``cluster_layout(N, cluster_size).ghost_slots``, instead of the real tokens only.
        backend: ``'auto'``: the compiled kernel for CPU tensors, eager or in ``torch.compile`` graphs, and the
            PyTorch ops elsewhere (other devices, ``torch.export``, ONNX, TorchScript traces) or, after one warning,
            where the kernel cannot be built; ``'kernel'``: the compiled kernel, an error where it cannot be built
            or run; ``'torch'``: the PyTorch ops. None: the default set by ``BOATVIT_CPU_KERNEL`` (``auto``,
            ``on`` for ``'kernel'``, ``off`` for ``'torch'``; unset is ``auto``). In float64 all give the same
            permutation; in float32 a token within rounding of a cut may fall on the other side.

    Returns:
        ``(B, heads, N)`` int64: token indices (raster order over the input's N tokens) in clustered order;
        consecutive runs of ``cluster_layout(N, cluster_size).cluster_sizes()`` tokens form the clusters, the two
        children of each last-level split are adjacent (clusters 2j and 2j+1), and inside a cluster tokens are in
        ascending order of the last split key.
    """
    _check_queries(q)
    if not torch.compiler.is_compiling():
        # torch.compile(dynamic=True) traces a module's floats as symbols, which math.isfinite cannot read; the
        # layers check theirs when they are built
        check_clustering_args(iterations, temperature)
    backend = resolve_backend(backend)
    layout = cluster_layout(static_shape(q)[2], cluster_size)
    # autocast would run the centroid matmuls in half precision even on float32 queries; a device type
    # without autocast (meta, for shape inference) has nothing to switch off
    no_autocast = (
        torch.autocast(q.device.type, enabled=False)
        if torch.amp.is_autocast_available(q.device.type)
        else contextlib.nullcontext()
    )
    with torch.no_grad(), no_autocast:
        order = _clustered_order(q, layout, iterations, temperature, backend)
    if return_padded or not layout.ghost_slots:
        return order
    return order.index_select(-1, _real_slots(layout, order.device))


def token_slots(order: torch.Tensor, cluster_size: int = 49) -> torch.Tensor:
    """Every token's slot in the padded clustered order, from a clustered order as
    :func:`balanced_hierarchical_clustering` returns it.

    Cluster ``k`` holds the slots ``k * c`` to ``(k + 1) * c - 1``, ``c = cluster_layout(N, cluster_size)
    .cluster_size``, its ghost (if any) in the last one. The slot says what a token's query attends to: cluster
    ``2j`` attends to its own slots and the first ``overlap`` of cluster ``2j+1``, cluster ``2j+1`` to the last
    ``overlap`` of cluster ``2j`` and its own.

    Args:
        order: ``(..., N)`` int64, a permutation of ``0..N-1`` along the last axis (the real tokens, no ghosts).
        cluster_size: the ``cluster_size`` the order was clustered with.

    Returns:
        ``(..., N)`` int64: the slot of each token (in raster order).
    """
    if not isinstance(order, torch.Tensor) or order.dtype != torch.long or order.ndim < 1:
        what = f'{order.dtype} tensor of shape {tuple(order.shape)}' if isinstance(order, torch.Tensor) else type(order)
        raise ValueError(f'order must be an int64 tensor (..., N) of token indices, got {what}.')
    real = _real_slots(cluster_layout(order.shape[-1], cluster_size), order.device)
    return torch.empty_like(order).scatter_(-1, order, real.expand_as(order))


def token_clusters(order: torch.Tensor, cluster_size: int = 49) -> torch.Tensor:
    """Every token's cluster, from a clustered order as :func:`balanced_hierarchical_clustering` returns it.

    Args:
        order: ``(..., N)`` int64, a permutation of ``0..N-1`` along the last axis (the real tokens, no ghosts).
        cluster_size: the ``cluster_size`` the order was clustered with.

    Returns:
        ``(..., N)`` int64: the index of the cluster holding each token (in raster order), clusters numbered in
        clustered order (``2j`` and ``2j+1`` are siblings of the last split).
    """
    slots = token_slots(order, cluster_size)
    return slots // cluster_layout(order.shape[-1], cluster_size).cluster_size
