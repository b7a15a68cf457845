"""Compiled graphs: ``torch.compile`` (inductor, fullgraph) BOAT against compiled Swin, and compiled against eager BOAT.

Pairs, every model built once and all timed in one interleaved loop per mode (``common.time_interleaved``):

* compiled ``boat_swin_tiny_224`` / compiled timm ``swin_tiny_patch4_window7_224``;
* compiled ``boat_cswin_tiny_224`` / its compiled FSLA-free variant (``fsla_blocks=none``);
* compiled BOAT / eager BOAT, for both families (the eager model runs boatvit's CPU kernels where they are built).

The first call of each model (which compiles it) is timed on its own and reported as ``first_call_s``, apart from the
timed figures. ``--clustering`` adds where a compiled BOAT forward spends its time in the clustering: every FSLA
layer's queries are captured from one eager forward, and ``balanced_hierarchical_clustering`` is timed on them
compiled on its own (the ops a compiled model runs) and eagerly (the CPU kernel), summed over the layers of one
forward. ``--profile N`` prints the top N ops of one compiled BOAT forward by self CPU time (``torch.profiler``).

    python -m benchmarks.bench_compiled                          # CPU, float32, batch 8, 2 threads
    python -m benchmarks.bench_compiled --modes inference --repeats 5 --clustering --profile 15
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable, Dict, List, Tuple

import torch

from benchmarks.bench_models import BOAT_CSWIN, BOAT_SWIN, CSWIN_NO_FSLA, SWIN
from benchmarks.common import (
    add_amp_arg,
    add_device_args,
    amp_dtype,
    autocast,
    build_model,
    default_amp,
    environment,
    make_step,
    median,
    non_negative_int,
    positive_int,
    print_table,
    ratio,
    setup,
    summary,
    sync,
    time_interleaved,
    write_json,
)
from boatvit import FeatureSpaceAttention, balanced_hierarchical_clustering

MODES = ('inference', 'train')
# (label, spec, compiled)
MODELS = [
    ('swin compiled', SWIN, True),
    ('boat_swin compiled', BOAT_SWIN, True),
    ('boat_swin eager', BOAT_SWIN, False),
    ('cswin_no_fsla compiled', CSWIN_NO_FSLA, True),
    ('boat_cswin compiled', BOAT_CSWIN, True),
    ('boat_cswin eager', BOAT_CSWIN, False),
]
# (model, baseline): what each ratio compares
PAIRS = [
    ('boat_swin compiled', 'swin compiled'),
    ('boat_cswin compiled', 'cswin_no_fsla compiled'),
    ('boat_swin compiled', 'boat_swin eager'),
    ('boat_cswin compiled', 'boat_cswin eager'),
]
# (mode, model, baseline, limit) per --amp: float32 from issue 18, bf16 autocast from issue 27
TARGETS = {
    'none': [
        ('inference', 'boat_swin compiled', 'swin compiled', 1.22),
        ('inference', 'boat_cswin compiled', 'cswin_no_fsla compiled', 1.25),
        ('inference', 'boat_swin compiled', 'boat_swin eager', 1.0),
        ('inference', 'boat_cswin compiled', 'boat_cswin eager', 1.0),
    ],
    'bf16': [
        ('inference', 'boat_swin compiled', 'swin compiled', 1.2),
        ('inference', 'boat_cswin compiled', 'cswin_no_fsla compiled', 1.25),
        ('train', 'boat_swin compiled', 'swin compiled', 1.25),
        ('inference', 'boat_swin compiled', 'boat_swin eager', 1.0),
        ('inference', 'boat_cswin compiled', 'boat_cswin eager', 1.0),
    ],
}


def _timed_mode(args: argparse.Namespace, mode: str) -> Tuple[Dict[str, Any], Dict[str, torch.nn.Module]]:
    """The section of one mode, and the models by label (compiled for this mode)."""
    steps: Dict[str, Callable[[], None]] = {}
    models: Dict[str, torch.nn.Module] = {}
    first_call_s = {}
    for label, spec, compiled in MODELS:
        models[label] = build_model(spec, args.device, compiled)
        steps[label] = make_step(models[label], mode, args.batch, 224, args.device, amp_dtype(args))
        # the first call compiles (or, eager, builds the kernel and warms the allocator): kept out of the figures
        sync(args.device)
        start = time.perf_counter()
        steps[label]()
        sync(args.device)
        first_call_s[label] = time.perf_counter() - start
        print(f'{mode}: {label}: first call {first_call_s[label]:.1f} s', flush=True)
    times = time_interleaved(steps, args.device, args.repeats, args.warmup)
    rows = {
        label: {**summary(t), 'img_per_s': args.batch / median(t), 'first_call_s': first_call_s[label]}
        for label, t in times.items()
    }
    comparisons = [{'model': m, 'baseline': b, **ratio(times, m, b)} for m, b in PAIRS]
    print_table(
        f'{mode}: batch {args.batch}, median of {args.repeats} interleaved rounds; first_call_s includes compilation',
        [{'model': k, **v} for k, v in rows.items()],
        ['model', 'median_ms', 'min_ms', 'max_ms', 'img_per_s', 'first_call_s'],
    )
    print_table(
        f'{mode}: ratios of medians; round_ratio_q1/q3: quartiles of the per-round ratios',
        comparisons,
        ['model', 'baseline', 'ratio', 'round_ratio_q1', 'round_ratio_q3'],
    )
    return {'batch': args.batch, 'models': rows, 'comparisons': comparisons}, models


def _fsla_queries(model: torch.nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """The queries ``(B, heads, N, head_dim)`` every FSLA layer of ``model`` clusters in one eager forward of ``x``."""
    queries = []

    def record(module: FeatureSpaceAttention, args: tuple) -> None:
        tokens = args[0]
        B, N, C = tokens.shape
        qkv = module.qkv(tokens).view(B, N, 3, module.num_heads, C // module.num_heads)
        queries.append(qkv[:, :, 0].transpose(1, 2).contiguous())

    fsla = [m for m in model.modules() if isinstance(m, FeatureSpaceAttention)]
    handles = [m.register_forward_pre_hook(record) for m in fsla]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return queries


def _clustering(
    args: argparse.Namespace, inference: Dict[str, Any], models: Dict[str, torch.nn.Module]
) -> Dict[str, Any]:
    """Clustering time per forward, compiled standalone and eager, against the compiled model's forward."""
    out = {}
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(args.device)
    # static shapes, one graph per layer shape, as inside the compiled models (not a dynamic-shape graph)
    compiled_clustering = torch.compile(balanced_hierarchical_clustering, fullgraph=True, dynamic=False)
    for family in ('boat_swin', 'boat_cswin'):
        queries = _fsla_queries(models[f'{family} eager'], x)
        steps = {}
        for route, fn in (('compiled', compiled_clustering), ('eager', balanced_hierarchical_clustering)):

            def step(fn=fn) -> None:
                with torch.inference_mode():
                    for q in queries:
                        fn(q)

            steps[route] = step
        times = time_interleaved(steps, args.device, args.repeats, args.warmup + 1)
        forward_ms = inference['models'][f'{family} compiled']['median_ms']
        rows = {
            route: {**summary(t), 'share_of_compiled_forward': median(t) * 1e3 / forward_ms}
            for route, t in times.items()
        }
        out[family] = {'layers': [list(q.shape) for q in queries], 'compiled_forward_ms': forward_ms, 'routes': rows}
    print_table(
        f'clustering of every FSLA layer of one forward (batch {args.batch}), standalone; share: over the '
        "compiled model's inference median",
        [{'model': f, 'route': r, **row} for f, v in out.items() for r, row in v['routes'].items()],
        ['model', 'route', 'median_ms', 'min_ms', 'max_ms', 'share_of_compiled_forward'],
    )
    return out


def _profile(args: argparse.Namespace, top: int, models: Dict[str, torch.nn.Module]) -> Dict[str, Any]:
    """The top ``top`` ops of one compiled inference forward of each BOAT model by self CPU time."""
    out = {}
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(args.device)
    for family in ('boat_swin', 'boat_cswin'):
        model = models[f'{family} compiled']  # compiled for inference by the timed section: no new compilation
        with torch.inference_mode(), autocast(args.device, amp_dtype(args)):
            model(x)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                model(x)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        rows = [
            {
                'op': e.key[:60],
                'calls': e.count,
                'self_ms': e.self_cpu_time_total / 1e3,
                'share': e.self_cpu_time_total / total,
            }
            for e in events[:top]
        ]
        print_table(
            f'{family} compiled, one inference forward (batch {args.batch}): top {top} ops by self CPU time, '
            f'of {total / 1e3:.1f} ms',
            rows,
            ['op', 'calls', 'self_ms', 'share'],
        )
        out[family] = {'total_self_ms': total / 1e3, 'ops': rows}
    return out


def _targets(results: Dict[str, Any], amp: str) -> List[Dict[str, Any]]:
    checks = []
    for mode, model, baseline, limit in TARGETS.get(amp, []):
        if mode not in results:
            continue
        value = next(
            c['ratio'] for c in results[mode]['comparisons'] if (c['model'], c['baseline']) == (model, baseline)
        )
        checks.append(
            {'figure': mode, 'model': model, 'against': baseline, 'value': value, 'limit': limit, 'met': value <= limit}
        )
    print_table('targets (issues 18, 27)', checks, ['figure', 'model', 'against', 'value', 'limit', 'met'])
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(parser)
    add_amp_arg(parser)
    parser.add_argument('--modes', default=','.join(MODES), help=f'comma-separated subset of {MODES}')
    parser.add_argument('--batch', type=positive_int, default=8, help='batch of every figure (default: 8)')
    parser.add_argument(
        '--clustering',
        action='store_true',
        help='time the clustering of every FSLA layer, compiled standalone and eager',
    )
    parser.add_argument(
        '--profile',
        type=non_negative_int,
        default=0,
        metavar='N',
        help='print the top N ops of one compiled BOAT forward (0: no profile)',
    )
    args = parser.parse_args()
    if args.compile:
        parser.error(
            '--compile does not apply: this script compiles the models it compares and times the eager BOAT beside them'
        )
    modes = args.modes.split(',')
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f'unknown modes {sorted(unknown)}; choose from {MODES}')
    if (args.clustering or args.profile) and 'inference' not in modes:
        parser.error('--clustering and --profile look at the inference models: add inference to --modes')
    setup(args)
    if args.clustering and args.amp != default_amp(args.device):
        parser.error(f'--clustering times the clustering of float32 queries: leave out --amp {args.amp}')
    args.compile = True
    results: Dict[str, Any] = {'environment': environment(args)}
    print(results['environment'])
    for mode in modes:
        results[mode], models = _timed_mode(args, mode)
        if mode == 'inference' and args.clustering:
            results['clustering'] = _clustering(args, results['inference'], models)
        if mode == 'inference' and args.profile:
            results['profile'] = _profile(args, args.profile, models)
        del models
    results['targets'] = _targets(results, args.amp)
    write_json(args, 'bench_compiled', results)


if __name__ == '__main__':
    main()
