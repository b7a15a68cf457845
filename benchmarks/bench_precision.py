"""Clusters under mixed precision: how many tokens autocast leaves in the cluster float32 puts them in.

For every FSLA layer of a model (random weights of a named model, or trained weights), the layer's input is captured
in a float32 forward and clustered (``FeatureSpaceAttention.cluster_order``) without autocast, then under bf16 and
fp16 autocast in three ways:

* ``float32_input``: the same float32 input under autocast, as on a GPU (where autocast's LayerNorm gives FSLA a
  float32 input): the layer clusters its own float32 queries (``float32_clustering=True``, the default);
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
distance from float32 and the share of images whose top-1 class stays. Accuracy only, no timing::

    python -m benchmarks.bench_precision --model boat_swin_tiny_224 --img-size 448      # random weights
    python -m benchmarks.bench_precision --weights runs/digits --img-size 128 --images digits
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import timm
import torch
import torch.nn.functional as F

from benchmarks.common import environment, positive_int, print_table, write_json
from boatvit import FeatureSpaceAttention, cluster_layout
from boatvit.clustering import token_clusters
from boatvit.data import DigitsDataset, eval_transform, find_images, open_image
from boatvit.weights import load_model

AMP = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def fsla_inputs(model: torch.nn.Module, images: torch.Tensor, dtype=None) -> List[Tuple[str, Any, torch.Tensor, Any]]:
    """``(name, layer, x, size)`` of every FSLA call of one forward of ``images`` (under ``dtype`` autocast)."""
    seen = []
    hooks = [
        m.register_forward_pre_hook(lambda m, args, name=name: seen.append((name, m, args[0].detach(), args[1])))
        for name, m in model.named_modules()
        if isinstance(m, FeatureSpaceAttention)
    ]
    amp = torch.autocast('cpu', dtype=dtype) if dtype else contextlib.nullcontext()
    try:
        with torch.no_grad(), amp:
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


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
                    got = {
                        'float32_input': layer.cluster_order(x, size),
                        'whole_model': layer.cluster_order(x_amp, size),
                    }
                    layer.float32_clustering = False
                    try:
                        got['rounded_queries'] = layer.cluster_order(x, size)
                    finally:
                        layer.float32_clustering = True
            row = {'amp': amp, 'layer': name, 'tokens': x.shape[1]}
            for column, order in got.items():
                row[column] = 100 * (token_clusters(order, layer.cluster_size) == expected).float().mean().item()
            rows.append(row)
    return rows


def main() -> None:
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
    parser.add_argument('--threads', type=positive_int, default=2, help='CPU threads (torch.set_num_threads)')
    parser.add_argument('--json', type=Path, default=None, help='where to write the results (default: results/)')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.device, args.repeats, args.warmup = 'cpu', 1, 0  # for environment()
    torch.manual_seed(0)
    if args.weights:
        # the trained windows at any size (dynamic_img_size), as `boatvit export` takes a model to another size
        loaded = load_model(args.weights, dynamic_img_size=True)
        model, metadata = loaded.model, loaded.metadata
    else:
        model, metadata = timm.create_model(args.model, img_size=args.img_size), {}
    model.eval()
    if args.images == 'digits':
        transform = eval_transform(model, metadata, args.img_size)
        ds = DigitsDataset('val', img_size=args.img_size)
        images = torch.stack([transform(ds[i][0]) for i in range(args.batch)])
    elif args.images != 'random':
        transform = eval_transform(model, metadata, args.img_size)
        paths = find_images([args.images])
        # spread over the sorted list, so a folder of class folders gives every class
        picked = [paths[i * len(paths) // args.batch] for i in range(args.batch)]
        images = torch.stack([transform(open_image(p)) for p in picked])
    else:
        images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
    rows = agreement(model, images)
    outputs = output_change(model, images)
    columns = ('float32_input', 'rounded_queries', 'whole_model')
    totals = []
    for amp in AMP:
        mine = [r for r in rows if r['amp'] == amp]
        weight = sum(r['tokens'] for r in mine)
        total = {c: sum(r[c] * r['tokens'] for r in mine) / weight for c in columns} if mine else {}
        totals.append({'amp': amp, 'layer': 'all (token-weighted)', 'tokens': weight, **total, **outputs[amp]})
    what = args.weights or f'{args.model} (random weights)'
    print_table(
        f'{what} at {args.img_size}x{args.img_size}, {args.batch} {args.images} images: % of tokens in their float32'
        ' cluster',
        rows + totals,
        ['amp', 'layer', 'tokens', *columns],
    )
    print_table(
        'the whole forward under autocast against float32',
        totals,
        ['amp', 'logits_rel_l2', 'same_top1'],
    )
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
    name = Path(args.weights).name if args.weights else args.model
    payload = {
        'environment': environment(args),
        'source': what,
        'layers': rows,
        'totals': totals,
        'tf32': tf32_rows,
        'tf32_outputs': {s: outputs[f'tf32_{s}'] for s in TF32},
    }
    write_json(args, f'bench_precision_{name}_{args.img_size}', payload)


if __name__ == '__main__':
    main()
