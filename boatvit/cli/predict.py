"""``boatvit predict``: the top-k classes of images (`boatvit.prediction.predict_images`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Mapping, Sequence

from ..prediction import predict_images
from ._args import DEVICE_HELP, add_model_arguments


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'predict',
        help='top-k classes of images',
        description='Classify images (files or directories of images) with BOAT weights: a released checkpoint, '
        'a safetensors file from `boatvit convert` or `boatvit train`, or a run directory.',
    )
    parser.add_argument('images', nargs='+', metavar='IMAGE', help='image files or directories of images')
    parser.add_argument('--weights', required=True, help='checkpoint, .safetensors file or run directory')
    add_model_arguments(parser)
    parser.add_argument('--topk', type=int, default=5, help='classes to show per image (default: 5)')
    parser.add_argument('--batch-size', type=int, default=16, help='images per forward pass (default: 16)')
    parser.add_argument('--device', default='auto', help=DEVICE_HELP)
    parser.add_argument('--json', action='store_true', help='print the results as JSON')
    parser.set_defaults(run=run)


def _print_table(results: Sequence[Mapping[str, Any]]) -> None:
    for result in results:
        if 'error' in result:
            continue
        print(result['image'])
        for pred in result['predictions']:
            print(f'  {pred["rank"]:>2}  {100 * pred["probability"]:6.2f} %  {pred["index"]:>5}  {pred["name"]}')


def run(args: argparse.Namespace) -> int:
    results = predict_images(
        args.images,
        args.weights,
        model=args.model,
        model_kwargs=args.model_kwargs,
        use_ema=args.ema,
        topk=args.topk,
        batch_size=args.batch_size,
        device=args.device,
    )
    skipped = [result['error'] for result in results if 'error' in result]
    for error in skipped:
        print(f'boatvit predict: warning: skipped {error}', file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print_table(results)
    if skipped:
        print(f'boatvit predict: skipped {len(skipped)} of {len(results)} images (unreadable)', file=sys.stderr)
    return 0
