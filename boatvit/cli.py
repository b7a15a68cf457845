"""The ``boatvit`` command line: one entry point, one module per sub-command.

Each module in ``COMMANDS`` defines ``add_parser(subparsers)``, which adds its sub-command and sets the parser's
``run`` default to a function taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# sub-command name -> module that implements it
COMMANDS = {
    'train': 'boatvit.train',
    'eval': 'boatvit.evaluate',
    'convert': 'boatvit.convert',
    'predict': 'boatvit.predict',
    'clusters': 'boatvit.visualize',
    'export': 'boatvit.export',
}


class UsageError(Exception):
    """Bad input the user can fix: printed as one line, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='boatvit',
        description='BOAT vision transformers: train, evaluate, convert released weights, predict, visualise.',
    )
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    sub.required = True
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UsageError as e:
        print(f'boatvit {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
