"""``boatvit eval``: top-1, top-5, loss and images/s of weights on a validation set
(`boatvit.evaluation.evaluate_weights`)."""

from __future__ import annotations

import argparse
import json

from ..data import DIGITS
from ..evaluation import evaluate_weights
from ..runtime import AMP_CHOICES, AMP_HELP, precision_name
from ._args import DEVICE_HELP, add_img_size, add_model_arguments


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'eval',
        help='top-1, top-5, loss and images/s of trained weights on a validation set',
        description="Evaluate weights on a validation set with the model's eval transform. Weights that "
        '`boatvit train` wrote carry their model, classes and transform, so --weights RUN_DIR is enough.',
    )
    parser.add_argument(
        '--weights',
        required=True,
        help='a run directory (its best.safetensors), a .safetensors file or a released checkpoint',
    )
    parser.add_argument(
        '--data', help=f'image folder root, or {DIGITS!r}; default: the data the weights were trained on'
    )
    parser.add_argument('--dataset', default=None, help='timm.data.create_dataset name; default: image folder')
    parser.add_argument('--split', default='val', help='split (sub-folder) to evaluate (default: val)')
    add_model_arguments(parser)
    add_img_size(parser, 'input size (default: from the weights or the model cfg)')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--workers', type=int, default=None, help='data loader processes (default: by core count)')
    parser.add_argument('--amp', choices=AMP_CHOICES, default='auto', help=AMP_HELP)
    parser.add_argument('--device', default='auto', help=DEVICE_HELP)
    parser.add_argument('--json', action='store_true', help='print the result as one JSON object')
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    result = evaluate_weights(
        args.weights,
        data=args.data,
        split=args.split,
        dataset=args.dataset,
        model=args.model,
        model_kwargs=args.model_kwargs,
        use_ema=args.ema,
        img_size=args.img_size,
        batch_size=args.batch_size,
        workers=args.workers,
        amp=args.amp,
        device=args.device,
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f'{result["model"]} on {result["data"]} [{result["split"]}]: top-1 {result["top1"]:.2f} %  top-5 '
            f'{result["top5"]:.2f} %  loss {result["loss"]:.4f}  {result["images"]} images  '
            f'{result["images_per_s"]:.1f} images/s  {precision_name(result["amp"])}'
        )
    return 0
