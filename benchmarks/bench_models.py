"""Whole-model speed and memory of BOAT against plain Swin, and against BOAT with its FSLA switched off.

Sections (``--sections``, all by default):

* ``inference``: forward latency and throughput of all models interleaved in one loop.
* ``share``: the part of BOAT's forward time spent in its ``FeatureSpaceAttention`` modules (pre/post hooks).
* ``train``: training step time (forward, cross-entropy, backward, AdamW), models interleaved.
* ``memory``: peak memory of one inference forward and one training step, each model in a fresh process.
* ``scaling``: inference latency at larger images (``--sizes``) against Swin built for the same size.
* ``precision``: the small-data recipe's ``boat_swin_nano_32`` and its FSLA-free twin, training steps at batch 128
  and 32 px, float32 against bf16 autocast interleaved (the bf16 speed-up of issue 27).

    python -m benchmarks.bench_models                      # CPU, float32, batch 8, 2 threads
    python -m benchmarks.bench_models --amp bf16 --sections inference,share,train,precision
    python -m benchmarks.bench_models --device cuda --compile

Each group compares its models with its first one: timm's Swin-T for BOAT-Swin-T, and the FSLA-free BOAT-CSWin-T
(``fsla_blocks=none``) for BOAT-CSWin-T.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Dict, List

import torch

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
    positive_int,
    print_table,
    ratio,
    run_in_fresh_process,
    setup,
    summary,
    sync,
    time_interleaved,
    write_json,
)
from boatvit import FeatureSpaceAttention

SWIN = 'swin_tiny_patch4_window7_224'
BOAT_SWIN = 'boat_swin_tiny_224'
BOAT_SWIN_NO_FSLA = 'boat_swin_tiny_224:fsla_blocks=none'
CSWIN_NO_FSLA = 'boat_cswin_tiny_224:fsla_blocks=none'
BOAT_CSWIN = 'boat_cswin_tiny_224'
GROUPS = {SWIN: [SWIN, BOAT_SWIN, BOAT_SWIN_NO_FSLA], CSWIN_NO_FSLA: [CSWIN_NO_FSLA, BOAT_CSWIN]}
NANO = 'boat_swin_nano_32'
NANO_TWIN = 'boat_swin_nano_32:fsla_blocks=none'
SECTIONS = ('inference', 'share', 'train', 'memory', 'scaling', 'precision')

# (figure, model, baseline, limit) per --amp: float32 from issue 7, bf16 autocast from issue 27; 'precision' is
# float32 time over bf16 time (a speed-up, at least the limit)
TARGETS = {
    'none': [
        ('inference', BOAT_SWIN, SWIN, 1.3),
        ('inference', BOAT_CSWIN, CSWIN_NO_FSLA, 1.3),
        ('share', BOAT_SWIN, None, 0.25),
        ('train', BOAT_SWIN, SWIN, 1.35),
        ('memory_train', BOAT_SWIN, SWIN, 1.3),
    ],
    'bf16': [
        ('inference', BOAT_SWIN, SWIN, 1.2),
        ('inference', BOAT_CSWIN, CSWIN_NO_FSLA, 1.25),
        ('train', BOAT_SWIN, SWIN, 1.25),
    ],
}
PRECISION_TARGET = (NANO, 1.4)


def _baseline_of(spec: str) -> str:
    return next(base for base, members in GROUPS.items() if spec in members)


def _timed_section(args: argparse.Namespace, mode: str, batch: int) -> Dict[str, Any]:
    models = [spec for members in GROUPS.values() for spec in members]
    steps = {
        spec: make_step(build_model(spec, args.device, args.compile), mode, batch, 224, args.device, amp_dtype(args))
        for spec in models
    }
    times = time_interleaved(steps, args.device, args.repeats, args.warmup)
    rows = {
        spec: {
            **summary(times[spec]),
            'img_per_s': batch / median(times[spec]),
            'baseline': _baseline_of(spec),
            **ratio(times, spec, _baseline_of(spec)),
        }
        for spec in models
    }
    print_table(
        f'{mode}: batch {batch}, median of {args.repeats} interleaved rounds; round_ratio_q1/q3: quartiles '
        'of the per-round ratios',
        [{'model': s, **r} for s, r in rows.items()],
        [
            'model',
            'median_ms',
            'min_ms',
            'max_ms',
            'img_per_s',
            'ratio',
            'round_ratio_q1',
            'round_ratio_q3',
            'baseline',
        ],
    )
    return {'batch': batch, 'models': rows}


def _fsla_share(args: argparse.Namespace, batch: int) -> Dict[str, Any]:
    """Forward time inside FeatureSpaceAttention modules over the whole forward, per call, median over calls."""
    out = {}
    for spec in (BOAT_SWIN, BOAT_CSWIN):
        model = build_model(spec, args.device).eval()  # eager: hooks do not fire inside a compiled graph
        started, spent = {}, []

        def pre(module, inputs):
            sync(args.device)
            started[module] = time.perf_counter()

        def post(module, inputs, output):
            sync(args.device)
            spent.append(time.perf_counter() - started[module])

        for module in model.modules():
            if isinstance(module, FeatureSpaceAttention):
                module.register_forward_pre_hook(pre)
                module.register_forward_hook(post)
        x = torch.randn(batch, 3, 224, 224, device=args.device)
        shares, totals = [], []
        with torch.inference_mode(), autocast(args.device, amp_dtype(args)):
            for i in range(args.warmup + args.repeats):
                spent.clear()
                sync(args.device)
                start = time.perf_counter()
                model(x)
                sync(args.device)
                total = time.perf_counter() - start
                if i >= args.warmup:
                    shares.append(sum(spent) / total)
                    totals.append(total)
        out[spec] = {
            'share': median(shares),
            'share_min': min(shares),
            'share_max': max(shares),
            'forward_median_ms': 1e3 * median(totals),
            'fsla_layers': len(spent),
        }
    print_table(
        f'FSLA share of the forward time: batch {batch}, median of {args.repeats} calls',
        [{'model': s, **r} for s, r in out.items()],
        ['model', 'share', 'share_min', 'share_max', 'forward_median_ms', 'fsla_layers'],
    )
    return {'batch': batch, 'models': out}


def _memory(args: argparse.Namespace) -> Dict[str, Any]:
    out = {}
    for mode, batch in (('inference', args.batch), ('train', args.train_batch)):
        rows = {}
        for spec in (spec for members in GROUPS.values() for spec in members):
            rows[spec] = run_in_fresh_process(
                'benchmarks.peak_memory',
                [
                    '--model',
                    spec,
                    '--mode',
                    mode,
                    '--batch',
                    str(batch),
                    '--device',
                    args.device,
                    '--threads',
                    str(args.threads),
                ],
            )
        for spec, row in rows.items():
            base = rows[_baseline_of(spec)]
            row['ratio_peak_above_base'] = row['peak_above_base_mib'] / base['peak_above_base_mib']
            row['ratio_peak'] = row['peak_mib'] / base['peak_mib']
            row['baseline'] = _baseline_of(spec)
        print_table(
            f'peak memory, {mode}: batch {batch}, one call in a fresh process (MiB)',
            [{'model': s, **r} for s, r in rows.items()],
            ['model', 'base_mib', 'peak_mib', 'peak_above_base_mib', 'ratio_peak_above_base', 'ratio_peak', 'baseline'],
        )
        out[mode] = {'batch': batch, 'models': rows}
    return out


def _scaling(args: argparse.Namespace) -> Dict[str, Any]:
    out = {}
    for size in args.sizes:
        # both built for the size: Swin's masks, BOAT's masks and its FSLA placement (stage 4 gets FSLA above 224)
        specs = {SWIN: f'{SWIN}:img_size={size}', BOAT_SWIN: f'{BOAT_SWIN}:img_size={size}'}
        steps = {
            name: make_step(
                build_model(spec, args.device, args.compile),
                'inference',
                args.scaling_batch,
                size,
                args.device,
                amp_dtype(args),
            )
            for name, spec in specs.items()
        }
        times = time_interleaved(steps, args.device, args.scaling_repeats, 1)
        medians = {name: median(t) for name, t in times.items()}
        out[str(size)] = {name: {**summary(t), 'ratio': medians[name] / medians[SWIN]} for name, t in times.items()}
        del steps
    base = out[str(args.sizes[0])]
    rows = []
    for size, models in out.items():
        for name, row in models.items():
            row['growth'] = row['median_ms'] / base[name]['median_ms']
            rows.append({'size': size, 'model': name, **row})
    print_table(
        f'image size: batch {args.scaling_batch}, median of {args.scaling_repeats} interleaved rounds; '
        f'growth = time over time at {args.sizes[0]}',
        rows,
        ['size', 'model', 'median_ms', 'ratio', 'growth'],
    )
    return {'batch': args.scaling_batch, 'sizes': out}


def _precision(args: argparse.Namespace) -> Dict[str, Any]:
    """Training steps of the nano model and its twin in float32 and under bf16 autocast, all four interleaved."""
    steps = {
        f'{spec} {precision}': make_step(
            build_model(spec, args.device, args.compile), 'train', 128, 32, args.device, dtype
        )
        for spec in (NANO, NANO_TWIN)
        for precision, dtype in (('float32', None), ('bf16', torch.bfloat16))
    }
    times = time_interleaved(steps, args.device, args.repeats, args.warmup)
    rows = {}
    for spec in (NANO, NANO_TWIN):
        fp32, bf16 = (median(times[f'{spec} {p}']) for p in ('float32', 'bf16'))
        rows[spec] = {
            'float32_img_per_s': 128 / fp32,
            'bf16_img_per_s': 128 / bf16,
            'bf16_speedup': fp32 / bf16,
        }
    print_table(
        f'training steps, batch 128 at 32 px, float32 against bf16 autocast: median of {args.repeats} interleaved '
        'rounds',
        [{'model': s, **r} for s, r in rows.items()],
        ['model', 'float32_img_per_s', 'bf16_img_per_s', 'bf16_speedup'],
    )
    return {'batch': 128, 'img_size': 32, 'models': rows}


def _targets(results: Dict[str, Any], amp: str) -> List[Dict[str, Any]]:
    checks = []
    if 'precision' in results:
        spec, limit = PRECISION_TARGET
        value = results['precision']['models'][spec]['bf16_speedup']
        checks.append(
            {
                'figure': 'bf16 speed-up',
                'model': spec,
                'against': 'float32',
                'value': value,
                'limit': limit,
                'met': value >= limit,
            }
        )
    for figure, spec, baseline, limit in TARGETS.get(amp, []):
        if figure == 'share' and 'share' in results:
            value = results['share']['models'][spec]['share']
        elif figure == 'memory_train' and 'memory' in results:
            value = results['memory']['train']['models'][spec]['ratio_peak_above_base']
        elif figure in results and figure in ('inference', 'train'):
            value = results[figure]['models'][spec]['ratio']
        else:
            continue
        checks.append(
            {
                'figure': figure,
                'model': spec,
                'against': baseline,
                'value': value,
                'limit': limit,
                'met': value <= limit,
            }
        )
    print_table('targets (issues 7, 27)', checks, ['figure', 'model', 'against', 'value', 'limit', 'met'])
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(parser)
    add_amp_arg(parser)
    parser.add_argument('--sections', default=','.join(SECTIONS), help=f'comma-separated subset of {SECTIONS}')
    parser.add_argument('--batch', type=positive_int, help='inference batch (default: cpu 8, cuda 64)')
    parser.add_argument('--train-batch', type=positive_int, help='training batch (default: cpu 8, cuda 32)')
    parser.add_argument('--sizes', default='224,448,896', help='image sizes of the scaling section')
    parser.add_argument('--scaling-batch', type=positive_int, help='scaling batch (default: cpu 1, cuda 8)')
    parser.add_argument('--scaling-repeats', type=positive_int, help='scaling rounds (default: --repeats)')
    args = parser.parse_args()
    setup(args)
    cuda = args.device == 'cuda'
    args.batch = args.batch or (64 if cuda else 8)
    args.train_batch = args.train_batch or (32 if cuda else 8)
    args.scaling_batch = args.scaling_batch or (8 if cuda else 1)
    args.scaling_repeats = args.scaling_repeats or args.repeats
    args.sizes = [int(s) for s in args.sizes.split(',')]
    sections = args.sections.split(',')
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f'unknown sections {sorted(unknown)}; choose from {SECTIONS}')
    if 'memory' in sections and args.amp != default_amp(args.device):
        parser.error(f'the memory section measures in fresh processes without --amp {args.amp}: leave it out')

    results: Dict[str, Any] = {'environment': environment(args)}
    print(results['environment'])
    if 'inference' in sections:
        results['inference'] = _timed_section(args, 'inference', args.batch)
    if 'share' in sections:
        results['share'] = _fsla_share(args, args.batch)
    if 'train' in sections:
        results['train'] = _timed_section(args, 'train', args.train_batch)
    if 'memory' in sections:
        results['memory'] = _memory(args)
    if 'scaling' in sections:
        results['scaling'] = _scaling(args)
    if 'precision' in sections:
        results['precision'] = _precision(args)
    results['targets'] = _targets(results, args.amp)
    write_json(args, 'bench_models', results)


if __name__ == '__main__':
    main()
