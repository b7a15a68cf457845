"""``boatvit convert``: a released BOAT checkpoint to safetensors (`boatvit.convert.convert_checkpoint`)."""

from __future__ import annotations

import argparse

from ..convert import convert_checkpoint
from ._args import add_model_arguments


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'convert',
        help='convert a released BOAT checkpoint to safetensors',
        description='Read a BOAT-Swin (.pth) or BOAT-CSWin (.pth.tar) checkpoint without running code from it, '
        'convert its keys, verify them by a strict load into the boatvit model and write safetensors '
        'with metadata (variant, source file and sha256, EMA or not).',
    )
    parser.add_argument('checkpoint', help='released checkpoint, bare state dict, safetensors file or run directory')
    parser.add_argument('out', help='output .safetensors file')
    add_model_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    meta = convert_checkpoint(
        args.checkpoint, args.out, model=args.model, model_kwargs=args.model_kwargs, use_ema=args.ema
    )
    weights = 'EMA' if meta['ema'] else 'raw'
    print(
        f'wrote {args.out}: {meta["model"]}, {weights} weights from {meta["source_entry"]!r} of '
        f'{meta["source_file"]} (sha256 {meta["source_sha256"][:12]}...)'
    )
    return 0
