"""``boatvit convert``: a released BOAT checkpoint to safetensors (`boatvit.convert.convert_checkpoint`) and/or to
timm's hub layout (`boatvit.hub.export_hub`)."""

from __future__ import annotations

import argparse

from ..convert import convert_checkpoint
from ..errors import UsageError
from ..hub import export_hub
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
    parser.add_argument('out', nargs='?', help='output .safetensors file (optional with --hf)')
    parser.add_argument(
        '--hf',
        metavar='DIR',
        help="also (or only) write timm's hub layout to DIR: config.json + model.safetensors, loadable with "
        "timm.create_model('local-dir:DIR') and transformers' from_pretrained after `import boatvit`",
    )
    parser.add_argument('--overwrite', action='store_true', help='replace an existing config.json in the --hf DIR')
    add_model_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.out is None and args.hf is None:
        raise UsageError('nothing to write: give an output .safetensors file, --hf DIR, or both')
    if args.hf is not None:
        try:
            hub = export_hub(
                args.checkpoint,
                args.hf,
                model=args.model,
                model_kwargs=args.model_kwargs,
                use_ema=args.ema,
                overwrite=args.overwrite,
            )
        except FileExistsError as error:
            raise UsageError(f'{error}; pass --overwrite or choose another --hf folder') from None
        labels = f'{len(hub["label_names"])} class names' if hub['label_names'] else 'no class names'
        print(f'wrote {hub["directory"]}: {hub["model"]} in the hub layout, input {hub["input_size"]}, {labels}')
    if args.out is None:
        return 0
    meta = convert_checkpoint(
        args.checkpoint, args.out, model=args.model, model_kwargs=args.model_kwargs, use_ema=args.ema
    )
    weights = 'EMA' if meta['ema'] else 'raw'
    print(
        f'wrote {args.out}: {meta["model"]}, {weights} weights from {meta["source_entry"]!r} of '
        f'{meta["source_file"]} (sha256 {meta["source_sha256"][:12]}...)'
    )
    return 0
