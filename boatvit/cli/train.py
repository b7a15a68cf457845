"""``boatvit train``: train a model (`boatvit.training.train`); the flags are `TrainConfig`'s fields."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Optional, Tuple

from ..recipes import DEFAULT_RECIPE, FINETUNE_RECIPES, RECIPES, SMALL_DATA_RECIPE
from ..runs import CONFIG_FILE
from ..errors import UsageError
from ..training import TrainConfig, config_from_values, train
from ._args import add_model_kwargs

# command-line flags that only change how a run is carried out, not what it computes; --resume accepts them
RUNTIME_FLAGS = ('device', 'workers', 'output', 'name', 'quiet')

TRAIN_EXAMPLES = """examples:
  boatvit train                                    # the embedded default, a few minutes on a CPU
  boatvit train --data DIR --recipe boat_swin_tiny_224
  boatvit train --data DIR --weights tiny.pth      # fine-tune released weights on your classes
  boatvit train --data DIR --weights tiny.pth --img-size 384 --layer-decay 0.65
  boatvit train --data DIR --weights RUN_DIR --freeze-backbone   # a linear probe
  boatvit train --data DIR --model boat_swin_tiny_224 --epochs 30 --batch-size 64 --amp bf16
  boatvit train --resume runs/RUN                  # continue an interrupted run
  torchrun --nproc_per_node 8 -m boatvit train --data DIR --recipe boat_cswin_tiny_224
  # 2 machines x 8 GPUs: the same command on each machine, HOST being machine 0
  torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id RUN_ID \\
      -m boatvit train --data DIR --recipe boat_cswin_tiny_224 --output SHARED_DIR/runs
"""


def _add_config_flag(group: argparse._ArgumentGroup, field: dataclasses.Field, hint: type) -> None:
    """``--field-name`` (and the field's ``aliases``) for one `TrainConfig` field, its argparse type taken from the
    field's type hint.

    Every flag defaults to None, so a flag given on the command line is told apart from the recipe's value.
    """
    meta = dict(field.metadata)
    meta.pop('group')
    flag = [f'--{field.name.replace("_", "-")}', *meta.pop('aliases', ())]
    if field.name == 'model_kwargs':
        add_model_kwargs(group, meta['help'])
        return
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) is typing.Union else hint
    if base is bool:
        group.add_argument(*flag, action='store_true', default=None, **meta)
    elif typing.get_origin(base) is tuple:
        elements = typing.get_args(base)
        group.add_argument(*flag, type=elements[0], nargs=len(elements), **meta)
    else:
        group.add_argument(*flag, type=base, **meta)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'train',
        help='train a model; with no arguments, a small BOAT-Swin on the built-in digits in a few minutes on a CPU',
        description='Train a model. With no arguments: the embedded default (recipe "digits").\n'
        'With --weights: fine-tune them on --data (recipe "finetune-swin" or "finetune-cswin").\n'
        'Flags override the recipe (boatvit/recipes.py); --recipe picks another, e.g. a reference ImageNet recipe.\n'
        'The values a run used are in RUN_DIR/config.json.',
        epilog=TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run_group = parser.add_argument_group('run')
    run_group.add_argument(
        '--recipe',
        choices=sorted(RECIPES),
        default=None,
        help=f'named preset; default: {FINETUNE_RECIPES["swin"]!r} or {FINETUNE_RECIPES["cswin"]!r} with --weights,'
        f' {DEFAULT_RECIPE!r} without --data, {SMALL_DATA_RECIPE!r} with it',
    )
    run_group.add_argument('--resume', metavar='RUN_DIR', help='continue an interrupted run from its last epoch')
    run_group.add_argument('--output', default='runs', help='parent directory of run directories')
    run_group.add_argument('--name', help='run directory name; default: time, model and data')
    run_group.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda'; under torchrun the local GPU")
    run_group.add_argument('--workers', type=int, default=None, help='data loader processes per training process')
    run_group.add_argument('--quiet', action='store_true', help='no progress bars, one log line per epoch')
    groups = {'run': run_group}
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        group = field.metadata['group']
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        _add_config_flag(groups[group], field, hints[field.name])
    parser.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> Tuple[TrainConfig, Optional[str]]:
    """The recipe (if any) overridden by the flags given; returns the config and the recipe name."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    return config_from_values(given, args.recipe)


def run(args: argparse.Namespace) -> int:
    config, recipe = None, None
    if args.resume:
        given = [
            f'--{k.replace("_", "-")}'
            for k, v in vars(args).items()
            if v not in (None, False) and k not in (*RUNTIME_FLAGS, 'resume', 'run', 'command')
        ]
        if given:
            raise UsageError(f"--resume continues with the run's own {CONFIG_FILE}; drop {', '.join(given)}")
    else:
        config, recipe = config_from_args(args)
    result = train(
        config,
        recipe,
        resume=args.resume,
        output=args.output,
        name=args.name,
        device=args.device,
        workers=args.workers,
        progress=not args.quiet,
    )
    if result.run_dir is not None and not result.already_finished:  # rank 0
        history = result.history
        best = max(history, key=lambda row: row['eval_top1'])
        print(
            f'held-out top-1 {history[-1]["eval_top1"]:.2f} % after {len(history)} epochs (best'
            f' {best["eval_top1"]:.2f} % at epoch {best["epoch"]}), {result.seconds:.0f} s;'
            f' run directory {result.run_dir}',
            flush=True,
        )
    return 0
