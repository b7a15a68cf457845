"""Where BOAT's cost over its FSLA-free base goes, and what the cluster attention would cost by PyTorch's own ops.

Whole models (CPU inference, batch 8 at 224 by default), interleaved: the base, the BOAT model as it is, the same
BOAT model with every FSLA layer's clustering replayed (``clustering free``), and with the clustering and the
attention inside the clusters both left out (``kernels free``). The free variants are measurements, not models: a
replayed clustering returns the order the layer computed on its first call (same shapes, so the attention does the
same work), and leaving both out returns V as the attention output, so the rest of every FSLA layer (its qkv and
output Linears, the LePE, the adds and norms around it) runs as it is. ``kernels free`` is the floor: what BOAT
costs before any clustering or cluster attention.

Cluster attention alone, at the shapes of every FSLA layer of the model (found by running it once), summed over
its layers: the fused kernel (``boatvit::fused_cluster_attention``, which also gathers q, k and v from the qkv
Linear's output and writes the output back in token order) against PyTorch's own attention on tiles already gathered
and contiguous (no gathers at all): ``q @ k^T``, softmax, ``@ v`` in one batched call per cluster shape, and
``F.scaled_dot_product_attention``. The tiles are those of the kernel: ``c`` queries against the ``c + overlap`` keys
of their cluster and its sibling's overlap. In the dtype the qkv Linear gives under ``--amp``.

    python -m benchmarks.bench_cost_split                   # bf16 autocast, BOAT-Swin-T and BOAT-CSWin-T, 2 threads
    python -m benchmarks.bench_cost_split --amp none        # float32
    python -m benchmarks.bench_cost_split --pair boat_swin_nano_32 boat_swin_nano_32:fsla_blocks=none --img-size 32
"""

from __future__ import annotations

import argparse
import collections
import contextlib
from typing import Any, Callable, Dict, Iterator, NamedTuple, Optional, Tuple
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F

import boatvit.fsla
import timm
from benchmarks.bench_models import BOAT_CSWIN, BOAT_SWIN, CSWIN_NO_FSLA, SWIN
from benchmarks.common import (
    add_amp_arg,
    add_device_args,
    amp_dtype,
    autocast,
    build_model,
    environment,
    make_step,
    median,
    parse_spec,
    positive_int,
    print_table,
    ratio,
    setup,
    summary,
    time_interleaved,
    write_json,
)
from boatvit import FeatureSpaceAttention, balanced_hierarchical_clustering, cluster_layout


class _Layer(NamedTuple):
    """The FSLA layers of one shape: their count, the kernel's inputs and PyTorch's gathered tiles."""

    tokens: int
    count: int
    qkv: torch.Tensor  # (B, N, 3, heads, head_dim)
    order: torch.Tensor  # (B, heads, padded tokens), the padded clustered order
    cluster_size: int
    overlap: int
    scale: float
    q: torch.Tensor  # (tiles, c, head_dim)
    k: torch.Tensor  # (tiles, keys, head_dim)
    v: torch.Tensor


PAIRS = ((BOAT_SWIN, SWIN), (BOAT_CSWIN, CSWIN_NO_FSLA))
VARIANTS = ('as is', 'clustering free', 'kernels free')


@contextlib.contextmanager
def freed(variant: str, replayed: Dict[Tuple, torch.Tensor]) -> Iterator[None]:
    """Run every ``FeatureSpaceAttention`` as ``variant`` (one of :data:`VARIANTS`) inside the block; see the module
    docstring. ``clustering free`` computes an order the first time it meets a call (the queries' shape and the
    clustering's arguments) and keeps it in ``replayed``; later blocks given the same dict return it again."""
    if variant not in VARIANTS:
        raise ValueError(f'unknown variant {variant!r}; choose from {VARIANTS}')
    if variant == 'as is':
        yield
    elif variant == 'clustering free':
        compute = boatvit.fsla.balanced_hierarchical_clustering

        def replay(q: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            key = (tuple(q.shape), args, tuple(sorted(kwargs.items())))
            if key not in replayed:
                replayed[key] = compute(q, *args, **kwargs)
            return replayed[key]

        with mock.patch.object(boatvit.fsla, 'balanced_hierarchical_clustering', replay):
            yield
    else:

        def v_as_output(qkv: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            B, N, _, heads, d = qkv.shape
            return qkv[:, :, 2].reshape(B, N, heads * d).clone()

        with mock.patch.object(boatvit.fsla, '_packed_feature_space_attention', v_as_output):
            yield


def _in_variant(step: Callable[[], None], variant: str) -> Callable[[], None]:
    """``step`` run as ``variant``, replaying the orders of its own first call (a warm-up round)."""
    replayed: Dict[Tuple, torch.Tensor] = {}

    def run() -> None:
        with freed(variant, replayed):
            step()

    return run


def whole_models(args: argparse.Namespace, boat_spec: str, base_spec: str) -> Dict[str, Any]:
    """Inference time of the base and of the BOAT model in each of :data:`VARIANTS`, interleaved; ratios to the
    base."""
    amp = amp_dtype(args)
    base = make_step(build_model(base_spec, args.device), 'inference', args.batch, args.img_size, args.device, amp)
    boat = make_step(build_model(boat_spec, args.device), 'inference', args.batch, args.img_size, args.device, amp)
    steps = {base_spec: base, **{f'{boat_spec} ({v})': _in_variant(boat, v) for v in VARIANTS}}
    times = time_interleaved(steps, args.device, args.repeats, args.warmup)
    rows = [{'model': name, **summary(t), **ratio(times, name, base_spec)} for name, t in times.items()]
    print_table(
        f'{boat_spec} against {base_spec}: inference, batch {args.batch} at {args.img_size}, median of '
        f'{args.repeats} interleaved rounds',
        rows,
        ['model', 'median_ms', 'min_ms', 'max_ms', 'ratio', 'round_ratio_q1', 'round_ratio_q3'],
    )
    return {'base': base_spec, 'boat': boat_spec, 'rows': rows}


def fsla_layers(model: nn.Module, x: torch.Tensor, amp: Optional[torch.dtype]) -> collections.Counter:
    """How many FSLA layers of ``model`` run at each shape on input ``x``: a Counter of
    ``(B, N, heads, head_dim, cluster_size, overlap, scale)``."""
    shapes: collections.Counter = collections.Counter()

    def record(module: FeatureSpaceAttention, inputs: Tuple, output: torch.Tensor) -> None:
        B, N, C = inputs[0].shape
        d = C // module.num_heads
        scale = d**-0.5 if module.scale is None else module.scale
        shapes[(B, N, module.num_heads, d, module.cluster_size, module.overlap, scale)] += 1

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, FeatureSpaceAttention)]
    try:
        with torch.inference_mode(), autocast(x.device.type, amp):
            model.eval()(x)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def cluster_attention(args: argparse.Namespace, boat_spec: str) -> Dict[str, Any]:
    """The cluster attention of every FSLA layer of ``boat_spec``: the fused kernel against PyTorch's attention on
    gathered tiles (see the module docstring), each summed over the model's layers."""
    amp = amp_dtype(args)
    dtype = amp or torch.float32
    model = build_model(boat_spec, args.device)
    shapes = fsla_layers(model, torch.randn(args.batch, 3, args.img_size, args.img_size), amp)
    g = torch.Generator().manual_seed(0)
    layers = []
    for (B, N, heads, d, cluster_size, overlap, scale), count in shapes.items():
        layout = cluster_layout(N, cluster_size)
        keys = layout.cluster_size + overlap if layout.num_clusters > 1 else layout.cluster_size
        tiles = B * heads * layout.num_clusters
        qkv = torch.randn(B, N, 3, heads, d, generator=g).to(dtype)
        q = torch.randn(tiles, layout.cluster_size, d, generator=g).to(dtype)
        k, v = (torch.randn(tiles, keys, d, generator=g).to(dtype) for _ in range(2))
        order = balanced_hierarchical_clustering(qkv[:, :, 0].transpose(1, 2), cluster_size, return_padded=True)
        layers.append(_Layer(N, count, qkv, order, cluster_size, overlap, scale, q, k, v))

    def fused() -> None:
        for layer in layers:
            for _ in range(layer.count):
                torch.ops.boatvit.fused_cluster_attention(
                    layer.qkv, layer.order, layer.cluster_size, layer.overlap, layer.scale, True
                )

    def matmul_softmax_matmul() -> None:
        for layer in layers:
            for _ in range(layer.count):
                torch.softmax((layer.q @ layer.k.transpose(1, 2)).mul_(layer.scale), dim=-1) @ layer.v

    def sdpa() -> None:
        for layer in layers:
            for _ in range(layer.count):
                F.scaled_dot_product_attention(layer.q, layer.k, layer.v, scale=layer.scale)

    steps = {'fused kernel (with its gathers)': fused, 'matmul, softmax, matmul': matmul_softmax_matmul, 'sdpa': sdpa}
    with torch.inference_mode():
        times = time_interleaved(steps, args.device, args.repeats, args.warmup)
    # q k^T and p v: two products of (queries x keys x head_dim) per tile
    macs = sum(layer.count * 2 * layer.q.numel() * layer.k.shape[1] for layer in layers)
    first = next(iter(steps))
    rows = [
        {'attention': name, **summary(t), 'gmac_per_s': macs / median(t) / 1e9, **ratio(times, name, first)}
        for name, t in times.items()
    ]
    print_table(
        f'{boat_spec}: the cluster attention of its {sum(shapes.values())} FSLA layers '
        f'({", ".join(f"{layer.tokens} tokens x{layer.count}" for layer in layers)}), {dtype}, '
        f'{macs / 1e9:.2f} GMAC, median of {args.repeats} interleaved rounds',
        rows,
        ['attention', 'median_ms', 'min_ms', 'max_ms', 'gmac_per_s', 'ratio'],
    )
    return {'model': boat_spec, 'dtype': str(dtype), 'gmac': macs / 1e9, 'layers': sum(shapes.values()), 'rows': rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(parser)
    add_amp_arg(parser)
    parser.set_defaults(amp='bf16')
    parser.add_argument(
        '--pair',
        nargs=2,
        action='append',
        metavar=('BOAT_SPEC', 'BASE_SPEC'),
        help=f'a BOAT model and its base, repeatable (default: {" and ".join(" against ".join(p) for p in PAIRS)})',
    )
    parser.add_argument('--batch', type=positive_int, default=8, help='inference batch')
    parser.add_argument('--img-size', type=positive_int, default=224, help='image side')
    args = parser.parse_args()
    if args.device != 'cpu':
        parser.error('--device cuda: the fused kernel and the free variants measured here are the CPU route only')
    if args.compile:
        parser.error('--compile does not apply: the free variants patch eager Python functions')
    pairs = args.pair or PAIRS
    for boat_spec, base_spec in pairs:
        unknown = [spec for spec in (boat_spec, base_spec) if not timm.is_model(parse_spec(spec)[0])]
        if unknown:
            parser.error(f'--pair {boat_spec} {base_spec}: {", ".join(unknown)} is not a timm model name')
        if not any(isinstance(m, FeatureSpaceAttention) for m in build_model(boat_spec, 'meta').modules()):
            parser.error(f'--pair {boat_spec} {base_spec}: {boat_spec} has no FSLA layer; the BOAT model goes first')
    setup(args)

    results: Dict[str, Any] = {'environment': environment(args), 'pairs': []}
    print(results['environment'])
    for boat_spec, base_spec in pairs:
        results['pairs'].append(
            {'whole_model': whole_models(args, boat_spec, base_spec), 'attention': cluster_attention(args, boat_spec)}
        )
    write_json(args, 'bench_cost_split', results)


if __name__ == '__main__':
    main()
