"""``boatvit clusters``: the feature-space attention clusters of an image, drawn as PNGs
(`boatvit.cluster_pictures.draw_clusters`) or on an interactive page (`boatvit.cluster_page.write_cluster_page`)."""

from __future__ import annotations

import argparse
import sys

from ..cluster_page import PAGE_SUFFIXES, write_cluster_page
from ..cluster_pictures import MAX_DEFAULT_HEADS, draw_clusters
from ..errors import UsageError
from ._args import add_model_arguments


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'clusters',
        help='draw the feature-space attention clusters of an image',
        description='Run images through a BOAT model and draw, for chosen FSLA layers and heads, each image with '
        'its tokens coloured by their cluster, beside the plain image; or, with -o PAGE.html, write one '
        'self-contained interactive page (no server, nothing fetched) where you pick an image, layer and head and '
        'point at a patch to see its cluster beside its image-space neighbourhood. Of several images, unreadable '
        'ones are skipped with a warning.',
    )
    parser.add_argument('images', nargs='+', metavar='IMAGE', help='image files')
    parser.add_argument(
        '-o',
        '--output',
        required=True,
        help='PNG file to write; for several images, a directory for IMAGE_STEM.png; or an .html page for all the '
        'images',
    )
    parser.add_argument(
        '--weights', help='checkpoint, .safetensors file or run directory; without it the model is untrained'
    )
    add_model_arguments(parser)
    parser.add_argument(
        '--layer',
        nargs='+',
        metavar='NAME',
        help="FSLA layers, e.g. layers.0.blocks.1, or 'all'; default: the first of each stage (PNG), all (page)",
    )
    parser.add_argument(
        '--heads',
        nargs='+',
        type=int,
        metavar='H',
        help=f'heads to draw in PNGs; default: the first {MAX_DEFAULT_HEADS} of each layer (a page has every head)',
    )
    parser.add_argument('--panel-size', type=int, help='pixels per panel side (default: 256 in PNGs, 384 on a page)')
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # what the page and the PNGs take alike
    common = dict(
        weights=args.weights,
        model=args.model,
        model_kwargs=args.model_kwargs,
        use_ema=args.ema,
        layers=args.layer,
        **({} if args.panel_size is None else {'panel_px': args.panel_size}),
    )
    if args.output.lower().endswith(PAGE_SUFFIXES):
        return _page(args, common)
    images = args.images[0] if len(args.images) == 1 else args.images
    drawn = draw_clusters(images, args.output, heads=args.heads, **common)
    _warn(args, drawn.name, drawn.skipped)
    for path in drawn.written:
        print(f'wrote {path}: {len(drawn.layers)} FSLA layer(s) of {drawn.name}')
    return 0


def _page(args: argparse.Namespace, common: dict) -> int:
    if args.heads:
        raise UsageError(f'--heads {" ".join(map(str, args.heads))}: a page shows every head; --heads is for PNGs')
    page = write_cluster_page(args.images, args.output, **common)
    _warn(args, page.name, page.skipped)
    shown = len(args.images) - len(page.skipped)
    print(
        f'wrote {page.path} ({page.size / 1e6:.1f} MB): {shown} image(s), {len(page.layers)} FSLA layer(s) of '
        f'{page.name}; open it in a browser'
    )
    return 0


def _warn(args: argparse.Namespace, name: str, skipped: list) -> None:
    if not args.weights:
        print(
            f'boatvit clusters: no --weights, so {name} is untrained and its clusters are those of random features',
            file=sys.stderr,
        )
    for error in skipped:
        print(f'boatvit clusters: warning: skipped {error}', file=sys.stderr)
    if skipped:
        print(f'boatvit clusters: skipped {len(skipped)} of {len(args.images)} images (unreadable)', file=sys.stderr)
