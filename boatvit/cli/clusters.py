"""``boatvit clusters``: the feature-space attention clusters of an image, drawn
(`boatvit.cluster_pictures.draw_clusters`)."""

from __future__ import annotations

import argparse
import sys

from ..cluster_pictures import MAX_DEFAULT_HEADS, draw_clusters
from ._args import add_model_arguments


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'clusters',
        help='draw the feature-space attention clusters of an image',
        description='Run images through a BOAT model and draw, for chosen FSLA layers and heads, each image with '
        'its tokens coloured by their cluster, beside the plain image. Of several images, unreadable ones are '
        'skipped with a warning.',
    )
    parser.add_argument('images', nargs='+', metavar='IMAGE', help='image files')
    parser.add_argument(
        '-o', '--output', required=True, help='PNG file to write; for several images, a directory for IMAGE_STEM.png'
    )
    parser.add_argument(
        '--weights', help='checkpoint, .safetensors file or run directory; without it the model is untrained'
    )
    add_model_arguments(parser)
    parser.add_argument(
        '--layer',
        nargs='+',
        metavar='NAME',
        help="FSLA layers, e.g. layers.0.blocks.1, or 'all'; default: the first of each stage",
    )
    parser.add_argument(
        '--heads',
        nargs='+',
        type=int,
        metavar='H',
        help=f'heads to draw; default: the first {MAX_DEFAULT_HEADS} of each layer',
    )
    parser.add_argument('--panel-size', type=int, default=256, help='pixels per panel side (default: 256)')
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    drawn = draw_clusters(
        args.images[0] if len(args.images) == 1 else args.images,
        args.output,
        weights=args.weights,
        model=args.model,
        model_kwargs=args.model_kwargs,
        use_ema=args.ema,
        layers=args.layer,
        heads=args.heads,
        panel_px=args.panel_size,
    )
    if not args.weights:
        print(
            f'boatvit clusters: no --weights, so {drawn.name} is untrained and its clusters are those of random'
            ' features',
            file=sys.stderr,
        )
    for error in drawn.skipped:
        print(f'boatvit clusters: warning: skipped {error}', file=sys.stderr)
    for path in drawn.written:
        print(f'wrote {path}: {len(drawn.layers)} FSLA layer(s) of {drawn.name}')
    if drawn.skipped:
        print(
            f'boatvit clusters: skipped {len(drawn.skipped)} of {len(args.images)} images (unreadable)', file=sys.stderr
        )
    return 0
