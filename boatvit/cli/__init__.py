"""The ``boatvit`` command line: thin front-ends over the library, one module per sub-command.

Each module in `COMMANDS` defines ``add_parser(subparsers)``, which adds its sub-command and sets the parser's ``run``
default to a function that takes the parsed arguments, calls one library function, prints its result and returns an
exit code. The library raises `boatvit.errors.BoatvitError` for input a user can fix; `main` prints it as one line
and exits with status 2. Ctrl-C is one line too (with the library's hint, e.g. how to resume), exit status 130 as
for a shell. Nothing outside this package imports it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from ..errors import BoatvitError

__all__ = ['COMMANDS', 'build_parser', 'main']

# sub-command name -> module that implements it
COMMANDS = {
    'train': 'boatvit.cli.train',
    'eval': 'boatvit.cli.eval',
    'convert': 'boatvit.cli.convert',
    'predict': 'boatvit.cli.predict',
    'clusters': 'boatvit.cli.clusters',
    'export': 'boatvit.cli.export',
}


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
    except BoatvitError as e:
        print(f'boatvit {args.command}: error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        hints = ''.join(f'; {note}' for note in getattr(e, '__notes__', ()))
        print(f'\nboatvit {args.command}: interrupted{hints}', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
