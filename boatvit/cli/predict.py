"""``boatvit predict``: the top-k classes of images, printed (`boatvit.prediction.predict_images`) or written to a
results file that a stopped run resumes and torchrun's processes share (`boatvit.prediction.predict_to_file`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Mapping, Sequence

from ..errors import UsageError
from ..prediction import PredictionSummary, predict_images, predict_to_file
from ..results_file import RESULT_FORMATS
from ..runtime import AMP_CHOICES, AMP_HELP, precision_name
from ._args import DEVICE_HELP, add_model_arguments


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'predict',
        help='top-k classes of images',
        description='Classify images (files or directories of images) with BOAT weights: a released checkpoint, '
        'a safetensors file from `boatvit convert` or `boatvit train`, or a run directory. Without --results-file '
        'the top-k of every image is printed; with it, one row per image is written as it is computed. Under '
        '`torchrun --nproc_per_node N -m boatvit predict ...` the processes share the images and leave one file.',
    )
    parser.add_argument('images', nargs='+', metavar='IMAGE', help='image files or directories of images')
    parser.add_argument('--weights', required=True, help='checkpoint, .safetensors file or run directory')
    add_model_arguments(parser)
    parser.add_argument('--topk', type=int, default=5, help='classes to show per image (default: 5)')
    parser.add_argument('--batch-size', type=int, default=16, help='images per forward pass (default: 16)')
    parser.add_argument('--workers', type=int, default=None, help='data loader processes (default: by core count)')
    parser.add_argument('--amp', choices=AMP_CHOICES, default='auto', help=AMP_HELP)
    parser.add_argument('--compile', action='store_true', help='torch.compile the model (the first batch compiles)')
    parser.add_argument('--device', default='auto', help=DEVICE_HELP)
    parser.add_argument('--json', action='store_true', help='print the results as JSON')
    parser.add_argument(
        '--results-file',
        metavar='FILE',
        help=f'write one row per image to FILE ({", ".join(RESULT_FORMATS)}; .parquet needs pyarrow) as they are '
        'computed, instead of printing them',
    )
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument('--resume', action='store_true', help='add to an existing --results-file the images it lacks')
    existing.add_argument('--overwrite', action='store_true', help='replace an existing --results-file')
    parser.set_defaults(run=run)


def _print_table(results: Sequence[Mapping[str, Any]]) -> None:
    for result in results:
        if 'error' in result:
            continue
        print(result['image'])
        for pred in result['predictions']:
            print(f'  {pred["rank"]:>2}  {100 * pred["probability"]:6.2f} %  {pred["index"]:>5}  {pred["name"]}')


def _print_summary(summary: PredictionSummary) -> None:
    already = f'; {summary.already} already had a row' if summary.already else ''
    print(
        f'boatvit predict: predicted {summary.predicted} images, {summary.failed} failed (listed in {summary.path})'
        f'{already}; {summary.images_per_s:.1f} images/s, {precision_name(summary.amp)}',
        file=sys.stderr,
    )


def run(args: argparse.Namespace) -> int:
    common = dict(
        model=args.model,
        model_kwargs=args.model_kwargs,
        use_ema=args.ema,
        topk=args.topk,
        batch_size=args.batch_size,
        workers=args.workers,
        amp=args.amp,
        compile=args.compile,
        device=args.device,
    )
    if args.results_file and args.json:
        raise UsageError('--json prints the results; with --results-file they go to the file: pass one of them')
    if args.results_file:
        summary = predict_to_file(
            args.images, args.weights, args.results_file, resume=args.resume, overwrite=args.overwrite, **common
        )
        if summary.main_process:
            _print_summary(summary)
        return 0
    if args.resume or args.overwrite:
        raise UsageError(f'{"--resume" if args.resume else "--overwrite"} applies to a --results-file; pass one')
    results = predict_images(args.images, args.weights, **common)
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
