"""The embedded default end to end: ``boatvit train`` with no arguments, its held-out accuracy and wall time.

Each run is the full default (recipe ``digits``: boat_swin_nano_32 on scikit-learn's digits), run in this process
exactly as the command line runs it, with only ``--seed`` changed between runs::

    python -m benchmarks.train_digits              # one run, seed 0 (the default), 2 CPU threads
    python -m benchmarks.train_digits --runs 3     # seeds 0, 1, 2

Wall time covers everything ``boatvit train`` does (data, model, training, validation, checkpoints, plots) but not
the Python start-up and imports. CPU time (user + system, both threads) is given beside it because on a shared
machine other jobs stretch the wall time; the load averages in the JSON say how busy the machine was.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import environment, load_average, positive_int, print_table, write_json
from boatvit.cli import main


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_default(output: Path, seed: int, device: str) -> dict:
    """Train the default once; returns its accuracy and timing figures."""
    cpu_start, start = _cpu_seconds(), time.perf_counter()
    status = main(
        ['train', '--quiet', '--output', str(output), '--name', f'seed{seed}', '--seed', str(seed), '--device', device]
    )
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    if status != 0:
        raise SystemExit(f'boatvit train exited with {status}')
    history = json.loads((output / f'seed{seed}' / 'metrics.json').read_text())
    best = max(history, key=lambda row: row['eval_top1'])
    epoch_s = [row['epoch_s'] for row in history]
    return {
        'seed': seed,
        'epochs': len(history),
        'final_top1': history[-1]['eval_top1'],
        'best_top1': best['eval_top1'],
        'best_epoch': best['epoch'],
        'first_epoch_reaching_95': next((row['epoch'] for row in history if row['eval_top1'] >= 95), None),
        'wall_s': wall,
        'cpu_s': cpu,
        'load_average_after': load_average(),
        's_per_epoch': wall / len(history),
        'median_epoch_s': statistics.median(epoch_s),
        # the wall time with every epoch as long as the median one: what a run takes without other jobs' slow
        # spells, as long as fewer than half the epochs were slowed
        'wall_s_at_median_epoch': wall - sum(epoch_s) + len(epoch_s) * statistics.median(epoch_s),
        'train_images_per_s': sum(row['train_images_per_s'] for row in history) / len(history),
        'top1_per_epoch': [round(row['eval_top1'], 2) for row in history],
    }


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--runs', type=positive_int, default=1, help='number of runs, seeds 0, 1, ...')
    parser.add_argument('--threads', type=positive_int, default=2, help='CPU threads (torch.set_num_threads)')
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    parser.add_argument('--output', type=Path, default=None, help='where the run directories go (default: temporary)')
    parser.add_argument('--json', type=Path, default=None, help='where to write the results (default: results/)')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # the fields benchmarks.common.environment reads
    args.compile, args.repeats, args.warmup = False, args.runs, 0
    env = environment(args)

    with tempfile.TemporaryDirectory() as tmp:
        output = args.output or Path(tmp)
        rows = [run_default(output, seed, args.device) for seed in range(args.runs)]
    print_table(
        'boatvit train (embedded default: boat_swin_nano_32 on digits)',
        rows,
        [
            'seed',
            'epochs',
            'final_top1',
            'best_top1',
            'first_epoch_reaching_95',
            'wall_s',
            'cpu_s',
            'median_epoch_s',
            'wall_s_at_median_epoch',
        ],
    )
    write_json(args, 'train_digits', {'environment': env, 'runs': rows})


if __name__ == '__main__':
    main_benchmark()
