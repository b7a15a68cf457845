"""What the benchmark scripts share: the device set-up, model specs, interleaved timing, peak memory measured in a
fresh process, the environment record, a text table and the JSON file.

Timing rules: models are built once and timed in interleaved rounds,
each round in a rotated order, so that a slow spell of a shared machine hits every model alike; every figure is the
median over the rounds and the ratios compare medians taken side by side in one process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

import boatvit  # noqa: F401  (registers the BOAT models with timm)
from boatvit.kernels import cpu_kernels
import timm

RESULTS_DIR = Path(__file__).resolve().parent / 'results'


def positive_int(text: str) -> int:
    """argparse type of counts that must be at least 1 (batches, rounds, threads)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    return value


def non_negative_int(text: str) -> int:
    """argparse type of counts that may be 0 (warm-up rounds)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be 0 or more, got {value}')
    return value


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark takes: device, threads, repeats, compile and the JSON path."""
    parser.add_argument(
        '--device',
        default='cpu',
        choices=('cpu', 'cuda'),
        help='cpu: float32; cuda: bfloat16 autocast and larger batches',
    )
    parser.add_argument('--threads', type=positive_int, default=2, help='CPU threads (torch.set_num_threads)')
    parser.add_argument('--repeats', type=positive_int, help='timed rounds per figure (default: cpu 9, cuda 30)')
    parser.add_argument('--warmup', type=non_negative_int, help='untimed rounds first (default: cpu 2, cuda 10)')
    parser.add_argument('--compile', action='store_true', help='torch.compile every model (FSLA hooks are skipped)')
    parser.add_argument('--json', type=Path, default=None, help='where to write the results (default: results/)')


AMP_CHOICES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def default_amp(device: str) -> str:
    """The ``--amp`` of a benchmark that does not set it: bf16 on CUDA, none (float32) on the CPU."""
    return 'bf16' if device == 'cuda' else 'none'


def add_amp_arg(parser: argparse.ArgumentParser) -> None:
    """``--amp``, for the benchmarks whose every timed call runs under it (inference and training steps)."""
    parser.add_argument(
        '--amp',
        choices=sorted(AMP_CHOICES),
        default=None,
        help='autocast dtype of every timed forward (default: bf16 on cuda, none on cpu)',
    )


def setup(args: argparse.Namespace) -> None:
    """Fill the device-dependent defaults and fix the CPU thread count."""
    cuda = args.device == 'cuda'
    if cuda and not torch.cuda.is_available():
        raise SystemExit('--device cuda: torch sees no CUDA device.')
    args.repeats = args.repeats if args.repeats is not None else (30 if cuda else 9)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    torch.set_num_threads(args.threads)
    if hasattr(args, 'amp'):
        args.amp = args.amp or default_amp(args.device)
    if cuda:
        # TF32 would run the clustering's float32 matmuls with 10-bit mantissas, which moves tokens between clusters
        # as half precision does; torch's default is off, and so it stays
        torch.backends.cuda.matmul.allow_tf32 = False


def amp_dtype(args: argparse.Namespace) -> Optional[torch.dtype]:
    """The autocast dtype of ``--amp`` after :func:`setup` (None: float32), or the device's default for benchmarks
    without ``--amp``."""
    return AMP_CHOICES[getattr(args, 'amp', None) or default_amp(args.device)]


def autocast(device: str, dtype: Optional[torch.dtype]) -> ContextManager:
    """``dtype`` autocast on ``device``, None for float32 (:func:`amp_dtype` gives a benchmark's). The FSLA clusters
    in float32 either way."""
    return torch.autocast(device, dtype=dtype) if dtype is not None else nullcontext()


def cpu_features() -> Dict[str, Any]:
    """The CPU's vector and matrix units that decide float32 and bf16 speed (torch's own probes; the private ones
    count as absent on a torch without them), and whether FSLA's bf16 attention kernel runs on matrix units."""
    probe = {name: getattr(torch.cpu, f'_is_{name}_supported', lambda: False)() for name in ('amx_tile', 'avx512_bf16')}
    kernels = cpu_kernels()
    return {
        'capability': torch.backends.cpu.get_cpu_capability(),
        'amx_bf16': probe['amx_tile'],
        'avx512_bf16': probe['avx512_bf16'],
        'fsla_bf16_on_matrix_units': bool(kernels and kernels.cluster_attention_matrix_units(torch.bfloat16, 32)),
    }


def sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def parse_spec(spec: str) -> tuple:
    """``'name'`` or ``'name:key=value,key=value'`` to ``(name, kwargs)``; values are parsed as Python literals
    where they can be (``img_size=448``), else kept as strings (``fsla_blocks=none``)."""
    name, _, rest = spec.partition(':')
    kwargs = {}
    for item in filter(None, rest.split(',')):
        key, _, value = item.partition('=')
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return name, kwargs


def compile_model(model: nn.Module, backend: str = 'inductor') -> nn.Module:
    """``torch.compile`` with ``fullgraph=True`` (a graph break would run part of the model eagerly unnoticed) and
    ``dynamic=False``: every batch size gets the static-shape graph a process compiling only that size gets, where
    dynamo's automatic dynamic shapes would make a later batch size of the same model class a dynamic-shape graph."""
    return torch.compile(model, fullgraph=True, backend=backend, dynamic=False)


def build_model(
    spec: str, device: str, compile: bool = False, backend: str = 'inductor', **overrides: Any
) -> nn.Module:
    """A randomly initialised timm model from a spec (see ``parse_spec``), on ``device``; ``compile``: wrapped by
    :func:`compile_model` with ``backend``."""
    name, kwargs = parse_spec(spec)
    torch.manual_seed(0)
    model = timm.create_model(name, **{**kwargs, **overrides}).to(device)
    return compile_model(model, backend) if compile else model


def make_step(
    model: nn.Module,
    mode: str,
    batch: int,
    img_size: int,
    device: str,
    amp: Optional[torch.dtype],
) -> Callable[[], None]:
    """One inference forward (``mode='inference'``, eval mode, ``inference_mode``) or one training step
    (``'train'``: forward, cross-entropy on fixed random labels, backward, AdamW step) on a fixed random batch; the
    forward under ``autocast(device, amp)`` (None: float32)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img_size, img_size, generator=g).to(device)
    if mode == 'inference':
        model.eval()

        def step() -> None:
            with torch.inference_mode(), autocast(device, amp):
                model(x)

        return step

    model.train()
    y = torch.randint(0, model.num_classes, (batch,), generator=g).to(device)
    # a tiny learning rate: the weights stay where they were initialised, so every step costs the same
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7)

    def step() -> None:
        with autocast(device, amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_interleaved(
    steps: Dict[str, Callable[[], Any]],
    device: str,
    repeats: int,
    warmup: int,
) -> Dict[str, List[float]]:
    """Seconds per call of every step, ``repeats`` rounds of one call each, the order rotated every round."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            start = time.perf_counter()
            steps[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def ratio(times: Dict[str, List[float]], model: str, baseline: str) -> Dict[str, float]:
    """``model``'s median time over ``baseline``'s, and the quartiles of the per-round ratios: each round's two calls
    run moments apart, so the quartiles show how far the machine's noise moves the ratio of medians."""
    per_round = [t / base for t, base in zip(times[model], times[baseline])]
    q1, _, q3 = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
    return {'ratio': median(times[model]) / median(times[baseline]), 'round_ratio_q1': q1, 'round_ratio_q3': q3}


def summary(seconds: Sequence[float]) -> Dict[str, float]:
    """Median, min and max in milliseconds."""
    return {'median_ms': 1e3 * median(seconds), 'min_ms': 1e3 * min(seconds), 'max_ms': 1e3 * max(seconds)}


def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_name() -> str:
    try:
        text = Path('/proc/cpuinfo').read_text()
        return re.search(r'model name\s*:\s*(.*)', text).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or platform.machine()


def git_commit() -> Optional[str]:
    """The short hash of the checkout's HEAD, with ``+dirty`` when tracked files differ from it; None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ['git', 'rev-parse', '--short', 'HEAD'], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(['git', 'diff', '--quiet', 'HEAD'], cwd=root).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ('+dirty' if dirty else '')


def environment(args: argparse.Namespace) -> Dict[str, Any]:
    """What the figures depend on: machine, versions, commit, threads, date, and how busy the machine was."""
    env = {
        'date': datetime.date.today().isoformat(),
        'commit': git_commit(),
        'machine': f'{_cpu_name()}, {os.cpu_count()} logical CPUs',
        'platform': platform.platform(),
        'python': platform.python_version(),
        'torch': torch.__version__,
        'timm': timm.__version__,
        'boatvit': boatvit.__version__,
        'device': args.device,
        'threads': torch.get_num_threads(),
        'dtype': {None: 'float32', torch.bfloat16: 'bfloat16 autocast', torch.float16: 'float16 autocast'}[
            amp_dtype(args)
        ],
        'cpu_features': cpu_features(),
        'compile': getattr(args, 'compile', None),
        'repeats': args.repeats,
        'warmup': args.warmup,
        'load_average_start': load_average(),
    }
    if args.device == 'cuda':
        env['gpu'] = torch.cuda.get_device_name()
    return env


def print_table(title: str, rows: List[Dict[str, Any]], columns: Sequence[str]) -> None:
    """A plain-text table of ``rows`` (dicts), floats with three significant decimals."""

    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f'{value:.3f}' if abs(value) < 10 else f'{value:.1f}'
        return '' if value is None else str(value)

    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    print(f'\n{title}')
    print('  '.join(c.ljust(w) for c, w in zip(columns, widths)))
    print('  '.join('-' * w for w in widths))
    for r in cells:
        print('  '.join(v.ljust(w) for v, w in zip(r, widths)))
    sys.stdout.flush()


def write_json(args: argparse.Namespace, default_name: str, payload: Dict[str, Any]) -> Path:
    amp = getattr(args, 'amp', None)
    suffix = f'_{amp}' if amp and amp != default_amp(args.device) else ''
    path = args.json or RESULTS_DIR / f'{default_name}_{args.device}{suffix}.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    payload['environment']['load_average_end'] = load_average()
    path.write_text(json.dumps(payload, indent=2) + '\n')
    print(f'\nwrote {path}')
    return path


def run_in_fresh_process(module: str, argv: Sequence[str]) -> Dict[str, Any]:
    """Run ``python -m module *argv`` and return the JSON object it prints last.

    glibc's mmap threshold is fixed at 64 KiB in the child so every large tensor is mapped and unmapped on its own,
    and the resident set size follows what torch holds instead of what malloc keeps cached.
    """
    env = {**os.environ, 'MALLOC_MMAP_THRESHOLD_': '65536'}
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, '-m', module, *argv], cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f'{module} {" ".join(argv)} failed:\n{proc.stderr[-3000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def resident_kib() -> Dict[str, int]:
    """Current and peak resident set size of this process (KiB), from ``/proc/self/status``."""
    text = Path('/proc/self/status').read_text()
    return {key: int(re.search(key + r':\s+(\d+)', text).group(1)) for key in ('VmRSS', 'VmHWM')}
