"""Does the data keep up? The training loop of ``boatvit train --data DATA`` against its bare training step.

Three ways to run the same training steps, with the config ``boatvit train --data DATA [flags]`` would use::

    python -m benchmarks.bench_data_pipeline /data/cifar10
    python -m benchmarks.bench_data_pipeline /data/cifar10 --flags --amp none

* ``loop, in memory``: the run's own loader with the split decoded once into memory (``--data-cache auto``), and
  its augmentation on whole batches when the recipe has no RandAugment;
* ``loop, from disk``: the loader decoding every JPEG and augmenting it image by image (``--data-cache none``);
* ``bare step``: the same trainer on one fixed batch of random tensors: what the model alone costs.

Each figure is the median images/s over interleaved rounds (each round a rotation of the three), all in one
process; the ratio of a loop to the bare step is the share of the machine the model gets. The loader's workers are
the run's own (none on two cores: the training takes both).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from benchmarks.common import environment, median, positive_int, print_table, write_json
from boatvit.data import default_workers, usable_cores
from boatvit.runtime import resolve_amp
from boatvit.cli import build_parser
from boatvit.cli.train import config_from_args
from boatvit.training import Trainer, _open_data, _set_transforms, build_loaders
from boatvit.weights import build_model

MODES = ('loop, in memory', 'loop, from disk', 'bare step')


def trainer_for(config, steps: int, workers: int):
    """A trainer of ``config`` for ``steps`` optimizer steps an epoch, and its training loader."""
    train_ds, val_ds, classes = _open_data(config, say=False, progress=False)
    torch.manual_seed(0)
    model = build_model(
        config.model,
        num_classes=len(classes),
        model_kwargs=config.model_kwargs,
        drop_path_rate=config.drop_path,
        img_size=config.img_size,
    )
    _set_transforms(config, model, train_ds, val_ds)
    loader, _, _ = build_loaders(config, train_ds, val_ds, 0, 1, workers, torch.device('cpu'))
    return Trainer(model, config, torch.device('cpu'), 1, updates_per_epoch=steps), loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('data', help='image folder root with train/ and val/')
    parser.add_argument('--steps', type=positive_int, default=20, help='optimizer steps per figure and round')
    parser.add_argument('--rounds', type=positive_int, default=5, help='interleaved rounds')
    parser.add_argument('--threads', type=positive_int, default=None, help='torch threads (default: all cores)')
    parser.add_argument('--json', type=Path, default=None, help='where to write the results (default: results/)')
    parser.add_argument('--flags', nargs=argparse.REMAINDER, default=[], help='train flags, e.g. --amp none')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config, _ = config_from_args(build_parser().parse_args(['train', '--data', args.data, *args.flags]))
    # the precision a run would use here ('auto' resolved), as the JSON records it
    config = dataclasses.replace(config, amp=resolve_amp(config.amp, torch.device('cpu'))[0])
    workers = default_workers()
    trainers = {
        MODES[0]: trainer_for(dataclasses.replace(config, data_cache='memory'), args.steps, workers),
        MODES[1]: trainer_for(dataclasses.replace(config, data_cache='none'), args.steps, workers),
    }
    trainer, loader = trainer_for(config, args.steps, workers)
    images, targets = next(iter(loader))
    trainers[MODES[2]] = trainer, [(images, targets)] * args.steps
    times = {mode: [] for mode in MODES}
    for round_ in range(args.rounds + 1):  # the first round warms up
        for mode in MODES[round_ % 3 :] + MODES[: round_ % 3]:
            trainer, batches = trainers[mode]
            start = time.perf_counter()
            trainer.train_one_epoch(batches, 0)
            if round_:
                times[mode].append(time.perf_counter() - start)
    per_s = {mode: args.steps * config.batch_size / median(seconds) for mode, seconds in times.items()}
    rows = [
        {'pipeline': mode, 'images_per_s': per_s[mode], 'share_of_bare_step': per_s[mode] / per_s[MODES[2]]}
        for mode in MODES
    ]
    args.device, args.compile, args.repeats, args.warmup = 'cpu', False, args.rounds, 1  # for environment()
    env = dict(
        environment(args),
        amp=config.amp,
        batch_size=config.batch_size,
        model=config.model,
        workers=workers,
        cores=usable_cores(),
    )
    print_table(
        f'{config.model} at {config.img_size} px, batch {config.batch_size}, amp {config.amp}, {workers} workers,'
        f' {torch.get_num_threads()} threads: training images/s',
        rows,
        ['pipeline', 'images_per_s', 'share_of_bare_step'],
    )
    write_json(args, 'bench_data_pipeline', {'environment': env, 'rows': rows, 'seconds': times})


if __name__ == '__main__':
    main()
