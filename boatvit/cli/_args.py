"""Flags that several commands share."""

from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence

from timm.utils import ParseKwargs

DEVICE_HELP = "'auto', 'cpu', 'cuda', 'cuda:1', ..."


class KwargsAction(ParseKwargs):
    """timm's ``KEY=VALUE`` parser (values are Python literals, else strings), with a usage error for a word
    without ``=`` instead of a traceback."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Sequence[str],
        option_string: Optional[str] = None,
    ) -> None:
        bad = [v for v in values if v and ('=' not in v or v.startswith('='))]
        if bad:
            parser.error(f'{option_string}: expected KEY=VALUE, got {bad[0]!r}')
        super().__call__(parser, namespace, values, option_string)


def add_model_kwargs(
    parser: Any, help: str = 'extra model constructor arguments, e.g. embed_dim=32 depths=(2,2,2,2)'
) -> None:
    """``--model-kwargs KEY=VALUE ...`` into a dict (None when not given)."""
    parser.add_argument('--model-kwargs', nargs='*', action=KwargsAction, default=None, metavar='KEY=VALUE', help=help)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--model-kwargs`` and ``--ema/--no-ema``, shared by the commands that read weights."""
    parser.add_argument(
        '--model',
        help='registered BOAT model (boat_swin_tiny_224, ...); default: recorded in the '
        'weights, or inferred from their tensor names and shapes',
    )
    add_model_kwargs(parser)
    parser.add_argument(
        '--ema',
        action=argparse.BooleanOptionalAction,
        default=True,
        help='take the EMA weights when the checkpoint has them (default: yes)',
    )


def add_img_size(parser: argparse.ArgumentParser, help: str) -> None:
    """``--img-size SIZE`` (a square) or ``--img-size HEIGHT WIDTH``, as a list the library reads
    (`boatvit.data.canonical_image_size`)."""
    parser.add_argument('--img-size', type=int, nargs='+', metavar='SIZE', help=f'{help}: SIZE or HEIGHT WIDTH')
