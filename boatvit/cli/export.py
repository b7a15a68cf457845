"""``boatvit export``: a BOAT model to ONNX, checked with ONNX Runtime (`boatvit.export.export_weights`)."""

from __future__ import annotations

import argparse
import sys

from ..export import DEFAULT_OPSET, TENSORRT_TOPK_LIMIT, ExportCheckError, export_weights
from ._args import add_img_size, add_model_arguments


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'export',
        help='export a BOAT model to ONNX, checked with ONNX Runtime',
        description='Export a BOAT model (random weights, or --weights: a released checkpoint, a safetensors file '
        'from `boatvit convert` / `boatvit train` or a run directory) to ONNX at one image size, run the '
        'file with ONNX Runtime on random batches, compare with PyTorch, and only then write it. Says '
        f"when a sort is above TensorRT's TopK limit ({TENSORRT_TOPK_LIMIT}).",
    )
    parser.add_argument('-o', '--output', required=True, help='ONNX file to write')
    parser.add_argument('--weights', help='checkpoint, .safetensors file or run directory (default: random weights)')
    add_model_arguments(parser)
    add_img_size(parser, "image size the graph takes (default: the model's own, 224 for the *_224 models)")
    parser.add_argument('--batch-size', type=int, help='fixed batch size of the graph; default: a dynamic batch axis')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET, help=f'ONNX opset (default: {DEFAULT_OPSET})')
    parser.add_argument(
        '--atol',
        type=float,
        default=1e-4,
        help='tolerance of the ONNX Runtime check, absolute and relative (default: 1e-4)',
    )
    parser.add_argument('--seed', type=int, default=0, help='seed of the first random check batch (default: 0)')
    parser.add_argument(
        '--check-batches',
        type=int,
        default=3,
        help='random batches the check may try (seeds --seed, --seed + 1, ...): it passes at the first one ONNX '
        'Runtime matches, since a token at a near-tied clustering split can move on one batch (default: 3)',
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        result, name = export_weights(
            args.output,
            weights=args.weights,
            model=args.model,
            model_kwargs=args.model_kwargs,
            use_ema=args.ema,
            img_size=args.img_size,
            batch_size=args.batch_size,
            opset=args.opset,
            atol=args.atol,
            seed=args.seed,
            check_batches=args.check_batches,
        )
    except ExportCheckError as e:
        print(f'boatvit export: check failed: {e}', file=sys.stderr)
        return 1
    batch = 'N' if result.input_shape[0] is None else str(result.input_shape[0])
    print(
        f'wrote {result.path}: {name}, input images ({batch}, {", ".join(map(str, result.input_shape[1:]))}), '
        f'opset {result.opset}; ONNX Runtime matches PyTorch (max |diff| {result.max_abs_diff:.2g}, check batch '
        f'seed {result.check_seed})'
    )
    if result.differing_checks:
        seeds = ', '.join(f'{s} (max |diff| {d:.2g})' for s, d in result.differing_checks)
        print(f'note: the check batch(es) of seed {seeds} differed, as at a token near a tied clustering split')
    largest = result.largest_sort
    if largest is not None and largest.topk:
        print(f'largest sort (ONNX TopK): K = {largest.topk} in {largest.module}')
    if not result.fits_tensorrt:
        over = [s for s in result.sorts if s.topk > TENSORRT_TOPK_LIMIT]
        print(
            f'note: {len(over)} FSLA layer(s) sort more than {TENSORRT_TOPK_LIMIT} tokens ({over[0].module}: '
            f"{over[0].topk}), above TensorRT's TopK limit; ONNX Runtime runs the file, TensorRT alone does not "
            '(see the README, "Deployment")',
            file=sys.stderr,
        )
    return 0
