"""One FSLA layer against the image-space attention it sits beside, at the shapes of the Tiny models' stages.

For every shape, interleaved: the ``FeatureSpaceAttention`` forward, its clustering alone, and the image-space
attention branch of the same block at the same shape: timm's shifted-window attention (``SwinTransformerBlock._attn``:
roll, window partition, ``WindowAttention``, reverse) for BOAT-Swin, ``CrossShapedWindowAttention`` for BOAT-CSWin.
Inference forwards and training forwards plus backward. ``macs`` is what torch's FLOP counter finds (mm, bmm, conv,
attention) over 2, so ``time ratio / mac ratio`` is the FSLA's cost per multiply-add relative to the window's.
``--before REV`` also times the ``FeatureSpaceAttention`` of an earlier git revision (its ``clustering.py`` and
``fsla.py``), interleaved with the current one.

    python -m benchmarks.bench_fsla                        # CPU, float32, batch 8, 2 threads
    python -m benchmarks.bench_fsla --device cuda --compile
    python -m benchmarks.bench_fsla --before 30da489      # the FSLA before issue 7's work, side by side
    python -m benchmarks.bench_fsla --amp bf16            # bf16 autocast: FSLA's half-precision kernels on the CPU
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.swin_transformer import SwinTransformerBlock
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import (
    add_amp_arg,
    add_device_args,
    amp_dtype,
    autocast,
    environment,
    median,
    positive_int,
    print_table,
    setup,
    summary,
    time_interleaved,
    write_json,
)
from boatvit import FeatureSpaceAttention, balanced_hierarchical_clustering
from boatvit.models.boat_cswin import CrossShapedWindowAttention

# name: (family, side, dim, heads, FSLA scale, CSWin stripe width); Tiny models at 224
SHAPES = {
    'swin_stage1': ('swin', 56, 96, 3, None, None),
    'swin_stage2': ('swin', 28, 192, 6, None, None),
    'swin_stage3': ('swin', 14, 384, 12, None, None),
    'cswin_stage1': ('cswin', 56, 64, 2, 1.0, 1),
    'cswin_stage3': ('cswin', 14, 256, 8, 1.0, 7),
}


def _git_show(root: Path, rev: str, path: str) -> Optional[str]:
    """The file at ``path`` as it was at ``rev``, or None where it did not exist."""
    shown = subprocess.run(['git', 'show', f'{rev}:{path}'], cwd=root, capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else None


def _fsla_at(rev: str) -> ModuleType:
    """``boatvit/fsla.py`` (with the ``clustering.py``, ``compiled_graphs.py`` and ``kernels.py`` it imports, and the
    CPU kernels' C++ sources) as they were at git revision ``rev``."""
    root = Path(__file__).resolve().parent.parent
    package = Path(tempfile.mkdtemp()) / 'boatvit_before'
    (package / 'csrc').mkdir(parents=True)
    (package / '__init__.py').write_text('')
    sources = ('clustering_cpu.cpp', 'cluster_attention_cpu.cpp')
    for name in ('clustering.py', 'fsla.py', 'compiled_graphs.py', 'kernels.py', *(f'csrc/{c}' for c in sources)):
        source = _git_show(root, rev, f'boatvit/{name}')
        if source is None and name in ('clustering.py', 'fsla.py'):
            raise SystemExit(f'--before {rev}: boatvit/{name} is not in that revision (git show failed)')
        current = root / 'boatvit' / name
        if name.startswith('csrc/') and source != (current.read_text() if current.exists() else None):
            # both builds would register the torch.ops.boatvit namespace, which one process allows once
            raise SystemExit(
                f'--before {rev}: its CPU kernels differ from the current ones ({name}) and two builds cannot '
                f'load in one process; compare with BOATVIT_CPU_KERNEL=off, or check that revision out'
            )
        if source is not None:
            (package / name).write_text(source)
    sys.path.insert(0, str(package.parent))
    return importlib.import_module('boatvit_before.fsla')


def _window_branch(family: str, side: int, dim: int, heads: int, stripe: int) -> Tuple[nn.Module, Callable]:
    """The module holding the image-space attention of a bilateral block at this shape, and the call that runs it
    on ``(B, H, W, C)``."""
    if family == 'swin':
        block = SwinTransformerBlock(dim, (side, side), num_heads=heads, window_size=7, shift_size=3)
        return block, block._attn
    attn = CrossShapedWindowAttention(dim, heads, stripe)
    return attn, attn


def _macs(shape: tuple, batch: int) -> Dict[str, float]:
    """Multiply-adds of one inference call of each, counted on eager CPU modules, the clustering's included. The math
    SDPA backend is forced because the counter has no formula for the CPU flash kernel."""
    family, side, dim, heads, scale, stripe = shape
    # the clustering as PyTorch ops: the FLOP counter cannot see inside the compiled CPU kernel
    fsla = FeatureSpaceAttention(dim, heads, scale=scale, backend='torch').eval()
    _, window_fn = _window_branch(family, side, dim, heads, stripe)
    x = torch.randn(batch, side, side, dim)
    calls = {'fsla': lambda: fsla(x.view(batch, side * side, dim), (side, side)), 'window': lambda: window_fn(x)}
    macs = {}
    for name, call in calls.items():
        with (
            torch.inference_mode(),
            sdpa_kernel(SDPBackend.MATH),
            FlopCounterMode(display=False) as counter,
        ):
            call()
        macs[name] = counter.get_total_flops() / 2
    return macs


def _steps(args: argparse.Namespace, shape: tuple, mode: str) -> Dict[str, Callable[[], Any]]:
    family, side, dim, heads, scale, stripe = shape
    fsla = FeatureSpaceAttention(dim, heads, scale=scale).to(args.device)
    before = None
    if args.before:
        before = args.before_module.FeatureSpaceAttention(dim, heads, scale=scale).to(args.device)
        before.load_state_dict(fsla.state_dict())
    window, window_fn = _window_branch(family, side, dim, heads, stripe)
    window.to(args.device)
    if args.compile:
        fsla, window_fn = torch.compile(fsla), torch.compile(window_fn)
        before = before and torch.compile(before)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, side, side, dim, generator=g).to(args.device).requires_grad_(mode == 'train')
    q = torch.randn(args.batch, heads, side * side, dim // heads, generator=g).to(args.device)
    tokens = x.view(args.batch, side * side, dim)

    def run(module: nn.Module, fn: Callable[[], torch.Tensor]) -> Callable[[], Any]:
        if mode == 'inference':
            module.eval()

            def step() -> None:
                with torch.inference_mode(), autocast(args.device, amp_dtype(args)):
                    fn()

            return step
        module.train()

        def step() -> None:
            with autocast(args.device, amp_dtype(args)):
                out = fn()
            out.float().square().mean().backward()
            module.zero_grad(set_to_none=True)
            x.grad = None

        return step

    steps = {
        'fsla': run(fsla, lambda: fsla(tokens, (side, side))),
        'window': run(window, lambda: window_fn(x)),
    }
    if before is not None:
        steps[f'fsla@{args.before}'] = run(before, lambda: before(tokens, (side, side)))
    if mode == 'inference':
        steps['clustering'] = lambda: balanced_hierarchical_clustering(q)
        if before is not None:
            steps[f'clustering@{args.before}'] = lambda: args.before_module.balanced_hierarchical_clustering(q)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(parser)
    parser.add_argument('--batch', type=positive_int, help='batch (default: cpu 8, cuda 64)')
    parser.add_argument('--shapes', default=','.join(SHAPES), help=f'comma-separated subset of {list(SHAPES)}')
    parser.add_argument('--before', default=None, help='git revision whose FSLA is timed beside the current one')
    add_amp_arg(parser)
    args = parser.parse_args()
    setup(args)
    args.before_module = _fsla_at(args.before) if args.before else None
    args.batch = args.batch or (64 if args.device == 'cuda' else 8)

    results: Dict[str, Any] = {
        'environment': environment(args),
        'batch': args.batch,
        'before': args.before,
        'shapes': {},
    }
    print(results['environment'])
    rows: List[Dict[str, Any]] = []
    for name in args.shapes.split(','):
        shape = SHAPES[name]
        entry = {'family': shape[0], 'side': shape[1], 'dim': shape[2], 'heads': shape[3]}
        for mode in ('inference', 'train'):
            steps = _steps(args, shape, mode)
            times = time_interleaved(steps, args.device, args.repeats, args.warmup)
            medians = {k: median(t) for k, t in times.items()}
            entry[mode] = {
                k: {**summary(t), 'ratio_to_window': medians[k] / medians['window']} for k, t in times.items()
            }
            if mode == 'inference':
                macs = _macs(shape, args.batch)
                entry['macs'] = macs
                entry['mac_ratio'] = macs['fsla'] / macs['window']
            for k, row in entry[mode].items():
                rows.append(
                    {
                        'shape': name,
                        'mode': mode,
                        'op': k,
                        'median_ms': row['median_ms'],
                        'ratio_to_window': row['ratio_to_window'],
                        'mac_ratio': entry['mac_ratio'] if k == 'fsla' else None,
                    }
                )
        results['shapes'][name] = entry
    print_table(
        f'FSLA layer vs image-space attention: batch {args.batch}, median of {args.repeats} interleaved rounds',
        rows,
        ['shape', 'mode', 'op', 'median_ms', 'ratio_to_window', 'mac_ratio'],
    )
    write_json(args, 'bench_fsla', results)


if __name__ == '__main__':
    main()
