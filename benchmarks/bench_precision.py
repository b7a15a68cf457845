"""Clusters under mixed precision: how many tokens autocast leaves in the cluster float32 puts them in.

For every FSLA layer of a model (random weights of a named model, or trained weights), the layer's input is captured
in a float32 forward and clustered (``FeatureSpaceAttention.cluster_order``) without autocast, then under bf16 and
fp16 autocast in three ways:

* ``float32_input``: the same float32 input under autocast, as on a GPU (where autocast's LayerNorm gives FSLA a
  float32 input): the layer clusters its own float32 queries (``float32_clustering=True``);
* ``rounded_queries``: the same, with ``float32_clustering=False``: the clustering reads the queries the autocast
  qkv Linear rounded to half precision;
* ``whole_model``: the input the layer gets in a forward under autocast (as on a CPU, where autocast's LayerNorm
  hands FSLA a half-precision input, and every earlier layer ran in half precision), clustered under autocast.

And under TF32, emulated on the CPU (:func:`emulated_tf32`: the float32 inputs of every convolution, Linear and
FSLA product rounded to TF32's 10 mantissa bits, as an Ampere or later GPU's tensor cores read them): ``convs``,
what PyTorch does on such a GPU by default in float32 (cuDNN convolutions in TF32, matmuls not), as a whole forward;
``matmuls``, what ``torch.set_float32_matmul_precision('high')`` adds, for the layer given its float32 input
(its qkv Linear and the clustering's products, on the PyTorch route a GPU takes) and as a whole forward.

A token agrees when it is in the same cluster (a run of ``cluster_layout(N).cluster_sizes()`` in the order) in
both; the figures are the share of agreeing (image, head, token) triples, per layer and over all layers with more
than one cluster. Beside them, what the whole forward under autocast changes in the output: the logits' relative L2
distance from float32 and the share of images whose top-1 class stays.

The ``flag`` section weighs ``float32_clustering`` itself in whole forwards: bf16 autocast with the flag on and off
on every FSLA layer, in two forwards. ``gpu_like`` emulates a GPU's autocast on the CPU (:func:`float32_layer_norms`:
every LayerNorm runs in float32, as CUDA autocast runs it, so FSLA gets a float32 input and the residual stream stays
float32), where the flag decides whether the clustering reads float32 or bf16 queries; ``cpu_autocast`` is the CPU's
own, where FSLA's input is already bf16 and the flag should change nothing (a check). For each: the share of tokens
in their float32 cluster over all layers with several clusters, the logits against float32, and (with labels) top-1
accuracy. Then its cost: the FSLA layers alone, and the whole model, in the GPU-like forward with the flag on and
off, interleaved medians in one process (a CPU emulation: on a GPU the extra ``C x C`` product per token, a third of
the qkv Linear's, runs on other units at another relative cost)::

    python -m benchmarks.bench_precision --model boat_swin_tiny_224 --img-size 448      # random weights
    python -m benchmarks.bench_precision --weights runs/digits --img-size 128 --images digits
    python -m benchmarks.bench_precision --weights runs/cifar --img-size 32 --images cifar10/val --batch 10000 \
        --sections flag --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any, ContextManager, Dict, Iterator, List, Optional, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import (
    environment,
    non_negative_int,
    positive_int,
    print_table,
    ratio,
    summary,
    time_interleaved,
    write_json,
)
from boatvit import FeatureSpaceAttention, cluster_layout
from boatvit.clustering import token_clusters
from boatvit.data import DigitsDataset, eval_transform, find_images, open_image
from boatvit.weights import load_model

AMP = {'bf16': torch.bfloat16, 'fp16': torch.float16}


SECTIONS = ('layers', 'tf32', 'flag')


def forward_with_fsla_inputs(
    model: torch.nn.Module, images: torch.Tensor, amp: ContextManager
) -> Tuple[torch.Tensor, List[Tuple[str, Any, torch.Tensor, Any]]]:
    """The float32 logits of one forward of ``images`` under ``amp``, and ``(name, layer, x, size)`` of every FSLA
    call in it."""
    seen = []
    hooks = [
        m.register_forward_pre_hook(lambda m, args, name=name: seen.append((name, m, args[0].detach(), args[1])))
        for name, m in model.named_modules()
        if isinstance(m, FeatureSpaceAttention)
    ]
    try:
        with torch.no_grad(), amp:
            logits = model(images).float()
    finally:
        for hook in hooks:
            hook.remove()
    return logits, seen


def fsla_inputs(model: torch.nn.Module, images: torch.Tensor, dtype=None) -> List[Tuple[str, Any, torch.Tensor, Any]]:
    """``(name, layer, x, size)`` of every FSLA call of one forward of ``images`` (under ``dtype`` autocast)."""
    amp = torch.autocast('cpu', dtype=dtype) if dtype else contextlib.nullcontext()
    return forward_with_fsla_inputs(model, images, amp)[1]


@contextlib.contextmanager
def float32_clustering(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """``float32_clustering`` set to ``enabled`` on every FSLA layer of ``model`` (or on ``model``, an FSLA layer)
    while the body runs."""
    layers = [m for m in model.modules() if isinstance(m, FeatureSpaceAttention)]
    saved = [m.float32_clustering for m in layers]
    for m in layers:
        m.float32_clustering = enabled
    try:
        yield
    finally:
        for m, value in zip(layers, saved):
            m.float32_clustering = value


def _to_tf32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A float32 tensor rounded to TF32 (10 explicit mantissa bits, to nearest, ties to even); others as they are."""
    if t is None or t.dtype != torch.float32:
        return t
    bits = t.view(torch.int32)
    return ((bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF).view(torch.float32)


@contextlib.contextmanager
def emulated_tf32(convolutions: bool, matmuls: bool) -> Iterator[None]:
    """Round the float32 inputs of ``F.conv2d`` (``convolutions``) and of ``F.linear``, ``torch.bmm`` and
    ``torch.matmul`` (``matmuls``) to TF32 while the body runs: every model convolution and Linear, and the FSLA's
    clustering and cluster attention products on the PyTorch route (timm's window attention multiplies with ``@``,
    which stays float32). Products still accumulate in float32, as on the tensor cores."""
    saved = {'conv2d': F.conv2d, 'linear': F.linear, 'bmm': torch.bmm, 'matmul': torch.matmul}
    if convolutions:
        F.conv2d = lambda x, w, *args, **kwargs: saved['conv2d'](_to_tf32(x), _to_tf32(w), *args, **kwargs)
    if matmuls:
        F.linear = lambda x, w, b=None: saved['linear'](_to_tf32(x), _to_tf32(w), b)
        torch.bmm = lambda a, b: saved['bmm'](_to_tf32(a), _to_tf32(b))
        torch.matmul = lambda a, b: saved['matmul'](_to_tf32(a), _to_tf32(b))
    try:
        yield
    finally:
        F.conv2d, F.linear, torch.bmm, torch.matmul = saved['conv2d'], saved['linear'], saved['bmm'], saved['matmul']


TF32 = {'convs': dict(convolutions=True, matmuls=False), 'matmuls': dict(convolutions=True, matmuls=True)}


@contextlib.contextmanager
def _pytorch_route(model: torch.nn.Module) -> Iterator[None]:
    """Every FSLA layer of ``model`` on the PyTorch route (``backend='torch'``), which a GPU's products run through
    and :func:`emulated_tf32` reaches (the CPU kernels are compiled code), while the body runs."""
    layers = [m for m in model.modules() if isinstance(m, FeatureSpaceAttention)]
    backends = [m.backend for m in layers]
    for m in layers:
        m.backend = 'torch'
    try:
        yield
    finally:
        for m, backend in zip(layers, backends):
            m.backend = backend


def tf32_agreement(model: torch.nn.Module, images: torch.Tensor) -> List[Dict[str, Any]]:
    """One row per FSLA layer with several clusters: the agreeing share under emulated TF32 (see the module doc)."""
    with _pytorch_route(model):
        reference = fsla_inputs(model, images)
        with emulated_tf32(**TF32['convs']):
            convs = fsla_inputs(model, images)
        with emulated_tf32(**TF32['matmuls']):
            matmuls = fsla_inputs(model, images)
        rows = []
        for (name, layer, x, size), (_, _, x_convs, _), (_, _, x_matmuls, _) in zip(reference, convs, matmuls):
            if cluster_layout(x.shape[1], layer.cluster_size).levels == 0:
                continue
            with torch.no_grad():
                expected = token_clusters(layer.cluster_order(x, size), layer.cluster_size)
                got = {'tf32_convs_whole_model': layer.cluster_order(x_convs, size)}
                with emulated_tf32(**TF32['matmuls']):
                    got['tf32_matmuls_float32_input'] = layer.cluster_order(x, size)
                    got['tf32_matmuls_whole_model'] = layer.cluster_order(x_matmuls, size)
            row = {'layer': name, 'tokens': x.shape[1]}
            for column, order in got.items():
                row[column] = 100 * (token_clusters(order, layer.cluster_size) == expected).float().mean().item()
            rows.append(row)
    return rows


def _logits_change(logits: torch.Tensor, expected: torch.Tensor) -> Dict[str, float]:
    return {
        'logits_rel_l2': ((logits - expected).norm() / expected.norm()).item(),
        'same_top1': 100 * (logits.argmax(-1) == expected.argmax(-1)).float().mean().item(),
    }


def output_change(model: torch.nn.Module, images: torch.Tensor) -> Dict[str, Dict[str, float]]:
    """Per autocast dtype, and per emulated TF32 setting (``tf32_convs``, ``tf32_matmuls``, on the PyTorch route):
    the logits' relative L2 distance from float32, and the % of images with the same top-1."""
    with torch.no_grad():
        expected = model(images)
        out = {}
        for amp, dtype in AMP.items():
            with torch.autocast('cpu', dtype=dtype):
                out[amp] = _logits_change(model(images).float(), expected)
        with _pytorch_route(model):
            expected = model(images)
            for setting, kwargs in TF32.items():
                with emulated_tf32(**kwargs):
                    out[f'tf32_{setting}'] = _logits_change(model(images), expected)
    return out


def agreement(model: torch.nn.Module, images: torch.Tensor) -> List[Dict[str, Any]]:
    """One row per FSLA layer with several clusters: its token count and the agreeing share of every column."""
    reference = fsla_inputs(model, images)
    rows = []
    for amp, dtype in AMP.items():
        autocast_inputs = fsla_inputs(model, images, dtype)
        for (name, layer, x, size), (_, _, x_amp, _) in zip(reference, autocast_inputs):
            if cluster_layout(x.shape[1], layer.cluster_size).levels == 0:
                continue  # one cluster: nothing can move
            with torch.no_grad():
                expected = token_clusters(layer.cluster_order(x, size), layer.cluster_size)
                with torch.autocast('cpu', dtype=dtype):
                    with float32_clustering(layer, True):
                        got = {
                            'float32_input': layer.cluster_order(x, size),
                            'whole_model': layer.cluster_order(x_amp, size),
                        }
                    with float32_clustering(layer, False):
                        got['rounded_queries'] = layer.cluster_order(x, size)
            row = {'amp': amp, 'layer': name, 'tokens': x.shape[1]}
            for column, order in got.items():
                row[column] = 100 * (token_clusters(order, layer.cluster_size) == expected).float().mean().item()
            rows.append(row)
    return rows


@contextlib.contextmanager
def float32_layer_norms(model: torch.nn.Module) -> Iterator[None]:
    """Every LayerNorm of ``model`` given its input in float32 while the body runs. Under CPU autocast a LayerNorm
    returns its input's dtype, so it then returns float32, as CUDA autocast's float32 LayerNorm does: every FSLA
    layer gets a float32 input and the residual stream stays float32, as in a forward under a GPU's autocast."""
    hooks = [
        m.register_forward_pre_hook(lambda m, args: (args[0].float(), *args[1:]))
        for m in model.modules()
        if isinstance(m, nn.LayerNorm)
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


FORWARDS = ('gpu_like', 'cpu_autocast')


def _bf16_forward(model: torch.nn.Module, forward: str) -> ContextManager:
    """bf16 autocast as a GPU runs it (``'gpu_like'``: float32 LayerNorms) or as the CPU does (``'cpu_autocast'``)."""
    stack = contextlib.ExitStack()
    if forward == 'gpu_like':
        stack.enter_context(float32_layer_norms(model))
    stack.enter_context(torch.autocast('cpu', dtype=torch.bfloat16))
    return stack


def flag_agreement(
    model: torch.nn.Module, images: torch.Tensor, labels: Optional[torch.Tensor], chunk: int
) -> List[Dict[str, Any]]:
    """One row per bf16 forward (``FORWARDS``) and ``float32_clustering`` setting: the % of (image, head, token)
    triples in their float32 cluster over every FSLA layer with several clusters, the logits' relative L2 distance
    from float32 (over all images), the % of images with float32's top-1, and top-1 accuracy when ``labels`` are
    given. ``images`` go through in chunks of ``chunk``."""
    cases = [(forward, flag) for forward in FORWARDS for flag in (True, False)]
    sums = {case: {'agree': 0, 'tokens': 0, 'diff2': 0.0, 'same': 0, 'correct': 0} for case in cases}
    ref_norm2, ref_correct = 0.0, 0
    for start in range(0, len(images), chunk):
        batch = images[start : start + chunk]
        expected, reference = forward_with_fsla_inputs(model, batch, contextlib.nullcontext())
        multi = [
            i for i, (_, layer, x, _) in enumerate(reference) if cluster_layout(x.shape[1], layer.cluster_size).levels
        ]
        with torch.no_grad():
            clusters = {
                i: token_clusters(
                    reference[i][1].cluster_order(reference[i][2], reference[i][3]), reference[i][1].cluster_size
                )
                for i in multi
            }
        ref_norm2 += expected.norm().item() ** 2
        if labels is not None:
            ref_correct += (expected.argmax(-1) == labels[start : start + chunk]).sum().item()
        for forward, flag in cases:
            total = sums[(forward, flag)]
            with float32_clustering(model, flag):
                logits, inputs = forward_with_fsla_inputs(model, batch, _bf16_forward(model, forward))
                for i in multi:
                    _, layer, x, size = inputs[i]
                    # the clusters that forward used: the layer's input clustered again under the same autocast
                    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
                        got = token_clusters(layer.cluster_order(x, size), layer.cluster_size)
                    total['agree'] += (got == clusters[i]).sum().item()
                    total['tokens'] += got.numel()
            total['diff2'] += (logits - expected).norm().item() ** 2
            total['same'] += (logits.argmax(-1) == expected.argmax(-1)).sum().item()
            if labels is not None:
                total['correct'] += (logits.argmax(-1) == labels[start : start + chunk]).sum().item()
    rows = []
    if labels is not None:
        rows.append({'forward': 'float32', 'top1_pct': 100 * ref_correct / len(images)})
    for (forward, flag), total in sums.items():
        row = {
            'forward': f'bf16 {forward}',
            'float32_clustering': flag,
            'tokens_in_float32_cluster_pct': 100 * total['agree'] / total['tokens'] if total['tokens'] else None,
            'logits_rel_l2': (total['diff2'] / ref_norm2) ** 0.5,
            'same_top1_pct': 100 * total['same'] / len(images),
            'images_differing': len(images) - total['same'],
        }
        if labels is not None:
            row['top1_pct'] = 100 * total['correct'] / len(images)
        rows.append(row)
    return rows


def flag_cost(model: torch.nn.Module, images: torch.Tensor, repeats: int, warmup: int) -> Dict[str, Any]:
    """Seconds of the GPU-like bf16 forward (see :func:`float32_layer_norms`) with ``float32_clustering`` on and off:
    of every FSLA layer called on the float32 input that forward gives it, and of the whole model; interleaved rounds
    (:func:`~benchmarks.common.time_interleaved`), and the ratios on / off of the medians."""
    with float32_layer_norms(model):
        _, inputs = forward_with_fsla_inputs(model, images, torch.autocast('cpu', dtype=torch.bfloat16))

    def fsla_layers(flag: bool):
        def step() -> None:
            with float32_clustering(model, flag), torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):
                for _, layer, x, size in inputs:
                    layer(x, size)

        return step

    def whole_model(flag: bool):
        def step() -> None:
            with float32_clustering(model, flag), torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):
                model(images)

        return step

    steps = {
        f'{part} {state}': make(flag)
        for part, make in (('fsla_layers', fsla_layers), ('whole_model', whole_model))
        for state, flag in (('on', True), ('off', False))
    }
    with float32_layer_norms(model):
        times = time_interleaved(steps, 'cpu', repeats, warmup)
        flops = {}
        for flag in (True, False):
            # the products PyTorch ops run (the FSLA's compiled kernels are not counted, and are the same both ways)
            with FlopCounterMode(display=False) as counter:
                whole_model(flag)()
            flops[flag] = counter.get_total_flops()
    out = {name: summary(t) for name, t in times.items()}
    out['counted_flops on/off'] = flops[True] / flops[False]
    for part in ('fsla_layers', 'whole_model'):
        out[f'{part} on/off'] = ratio(times, f'{part} on', f'{part} off')
    return out


def load_images(
    args: argparse.Namespace, model: torch.nn.Module, metadata: Dict[str, Any]
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``--batch`` images of ``--images``, and their labels where the source has them (the digits; a folder of
    class folders named as the weights' classes), else None."""
    if args.images == 'digits':
        transform = eval_transform(model, metadata, args.img_size)
        ds = DigitsDataset('val', img_size=args.img_size)
        samples = [ds[i] for i in range(args.batch)]
        return torch.stack([transform(image) for image, _ in samples]), torch.tensor([y for _, y in samples])
    if args.images != 'random':
        transform = eval_transform(model, metadata, args.img_size)
        paths = find_images([args.images])
        # spread over the sorted list, so a folder of class folders gives every class
        picked = [paths[i * len(paths) // args.batch] for i in range(args.batch)]
        images = torch.stack([transform(open_image(p)) for p in picked])
        classes = metadata.get('classes') or []
        if all(p.parent.name in classes for p in picked):
            return images, torch.tensor([classes.index(p.parent.name) for p in picked])
        return images, None
    g = torch.Generator().manual_seed(0)
    return torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g), None


def report_layers(
    model: torch.nn.Module, images: torch.Tensor, outputs: Dict[str, Dict[str, float]], title: str
) -> Dict[str, Any]:
    """The ``layers`` section: print the per-layer agreement under bf16 and fp16 and the logits; its JSON keys."""
    rows = agreement(model, images)
    columns = ('float32_input', 'rounded_queries', 'whole_model')
    totals = []
    for amp in AMP:
        mine = [r for r in rows if r['amp'] == amp]
        weight = sum(r['tokens'] for r in mine)
        total = {c: sum(r[c] * r['tokens'] for r in mine) / weight for c in columns} if mine else {}
        totals.append({'amp': amp, 'layer': 'all (token-weighted)', 'tokens': weight, **total, **outputs[amp]})
    print_table(
        f'{title}, {len(images)} images: % of tokens in their float32 cluster',
        rows + totals,
        ['amp', 'layer', 'tokens', *columns],
    )
    print_table('the whole forward under autocast against float32', totals, ['amp', 'logits_rel_l2', 'same_top1'])
    return {'layers': rows, 'totals': totals}


def report_tf32(model: torch.nn.Module, images: torch.Tensor, outputs: Dict[str, Dict[str, float]]) -> Dict[str, Any]:
    """The ``tf32`` section: print the agreement and the logits under emulated TF32; its JSON keys."""
    tf32_rows = tf32_agreement(model, images)
    tf32_columns = ('tf32_convs_whole_model', 'tf32_matmuls_float32_input', 'tf32_matmuls_whole_model')
    weight = sum(r['tokens'] for r in tf32_rows)
    if weight:
        tf32_rows.append(
            {
                'layer': 'all (token-weighted)',
                'tokens': weight,
                **{c: sum(r[c] * r['tokens'] for r in tf32_rows) / weight for c in tf32_columns},
            }
        )
    print_table(
        'TF32, emulated on the CPU: % of tokens in their float32 cluster', tf32_rows, ['layer', 'tokens', *tf32_columns]
    )
    print_table(
        'the whole forward under emulated TF32 against float32 (the PyTorch route)',
        [{'tf32': f'tf32_{s}', **outputs[f'tf32_{s}']} for s in TF32],
        ['tf32', 'logits_rel_l2', 'same_top1'],
    )
    return {'tf32': tf32_rows, 'tf32_outputs': {s: outputs[f'tf32_{s}'] for s in TF32}}


def report_flag(
    model: torch.nn.Module, images: torch.Tensor, labels: Optional[torch.Tensor], args: argparse.Namespace
) -> Dict[str, Any]:
    """The ``flag`` section: print ``float32_clustering``'s effect and cost under bf16; its JSON keys. The cost is
    timed on the first ``--chunk`` images."""
    rows = flag_agreement(model, images, labels, args.chunk)
    print_table(
        f"float32_clustering under bf16, {len(images)} images: whole forwards against float32 (gpu_like: a GPU's"
        ' autocast emulated on the CPU, float32 LayerNorms)',
        rows,
        ['forward', 'float32_clustering', 'tokens_in_float32_cluster_pct', 'logits_rel_l2', 'same_top1_pct']
        + ['images_differing']
        + (['top1_pct'] if labels is not None else []),
    )
    timed = images[: args.chunk]
    cost = flag_cost(model, timed, args.repeats, args.warmup)
    print_table(
        f'its cost: the GPU-like bf16 forward emulated on the CPU, batch {len(timed)}, {torch.get_num_threads()}'
        f' thread(s), median of {args.repeats} interleaved rounds (ms); ratio on / off with the per-round quartiles',
        [
            {'part': part, 'on_ms': cost[f'{part} on']['median_ms'], 'off_ms': cost[f'{part} off']['median_ms']}
            | {k: cost[f'{part} on/off'][k] for k in ('ratio', 'round_ratio_q1', 'round_ratio_q3')}
            for part in ('fsla_layers', 'whole_model')
        ],
        ['part', 'on_ms', 'off_ms', 'ratio', 'round_ratio_q1', 'round_ratio_q3'],
    )
    print(f"products counted in the whole model's PyTorch ops, on / off: {cost['counted_flops on/off']:.4f}")
    return {'float32_clustering': rows, 'float32_clustering_cost': {'batch': len(timed), **cost}}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--model', help='a registered BOAT model, random weights (seed 0)')
    source.add_argument('--weights', help='trained weights: a run directory, a .safetensors file, a checkpoint')
    parser.add_argument('--img-size', type=positive_int, default=224, help='square input size (default: 224)')
    parser.add_argument('--batch', type=positive_int, default=2, help='images (default: 2)')
    parser.add_argument(
        '--images',
        default='random',
        help="'random' (normal noise), 'digits' (the digits' val images) or a folder of images (the first --batch of"
        ' its sorted images, e.g. CIFAR-10 val/)',
    )
    parser.add_argument(
        '--sections',
        nargs='+',
        choices=SECTIONS,
        default=list(SECTIONS),
        help="what to measure: 'layers' (per-layer clusters under bf16/fp16 and the logits), 'tf32' (emulated TF32),"
        " 'flag' (float32_clustering on/off in whole bf16 forwards, and its cost); default: all",
    )
    parser.add_argument(
        '--chunk', type=positive_int, default=250, help="images per forward in the 'flag' section (default: 250)"
    )
    parser.add_argument(
        '--repeats', type=positive_int, default=7, help="timed rounds of the 'flag' section's cost (default: 7)"
    )
    parser.add_argument('--warmup', type=non_negative_int, default=1, help='untimed rounds before them (default: 1)')
    parser.add_argument('--threads', type=positive_int, default=2, help='CPU threads (torch.set_num_threads)')
    parser.add_argument('--json', type=Path, default=None, help='where to write the results (default: results/)')
    return parser


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    args.device = 'cpu'  # for environment()
    torch.manual_seed(0)
    if args.weights:
        # the trained windows at any size (dynamic_img_size), as `boatvit export` takes a model to another size
        loaded = load_model(args.weights, dynamic_img_size=True)
        model, metadata = loaded.model, loaded.metadata
    else:
        model, metadata = timm.create_model(args.model, img_size=args.img_size), {}
    model.eval()
    images, labels = load_images(args, model, metadata)
    what = args.weights or f'{args.model} (random weights)'
    payload = {'environment': environment(args), 'source': what, 'images': f'{len(images)} {args.images}'}
    if 'layers' in args.sections or 'tf32' in args.sections:
        outputs = output_change(model, images)
    if 'layers' in args.sections:
        payload.update(
            report_layers(model, images, outputs, f'{what} at {args.img_size}x{args.img_size}, {args.images}')
        )
    if 'tf32' in args.sections:
        payload.update(report_tf32(model, images, outputs))
    if 'flag' in args.sections:
        payload.update(report_flag(model, images, labels, args))
    name = Path(args.weights).name if args.weights else args.model
    write_json(args, f'bench_precision_{name}_{args.img_size}', payload)


if __name__ == '__main__':
    main()
