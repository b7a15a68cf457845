"""One-command check of a GPU: CUDA correctness first, then speed and peak memory of BOAT against Swin, eager and
compiled, in one table and one JSON file.

    python -m benchmarks.device_check                  # a CUDA machine: under 8 minutes on an H100/H200
    python -m benchmarks.device_check --dry-run        # the same code paths on the CPU, tiny models and batches

Correctness (every check is run; the command exits 1 naming the failed ones, after the timing and the JSON):

* ``fixture``: the reference fixtures (``--fixtures``, default ``tests/fixtures/reference``) in float64 on the
  device: logits and every stage within 1e-10, the first FSLA layer's permutation exactly equal.
* ``batch_independence``: an image's float64 logits do not depend on the rest of its batch (1e-12).
* ``bf16_autocast``: the fixture models in float32 under bfloat16 autocast give finite features and logits within a
  relative L2 error of :data:`BF16_RTOL` of float32 (the tolerance of ``tests/test_mixed_precision.py``).
* ``compile``: ``torch.compile`` (inductor, fullgraph) equals eager in float64 within 1e-10 (the fixture models on a
  GPU; a tiny BOAT model in the dry run, where compiling the fixture models would take minutes).

Timing: inference (bfloat16 autocast; batches 128 and 256) and a training step (bfloat16 autocast, AdamW; batches 64
and 128) of timm Swin-T, BOAT-Swin-T, the FSLA-free BOAT-CSWin-T and BOAT-CSWin-T, eager and compiled, all of one
mode and batch interleaved (``common.time_interleaved``), with the peak memory of one call above what was allocated
before it (``torch.cuda.max_memory_allocated``; not measured on the CPU). A compiled model's first call (compilation)
is timed apart. Compiled figures that would start after ``--time-budget`` seconds of timing are skipped and
recorded as skipped, so the whole run keeps to its budget on a slower machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple
from types import ModuleType

import torch
from safetensors.torch import load_file

from benchmarks.bench_models import BOAT_CSWIN, BOAT_SWIN, CSWIN_NO_FSLA, SWIN
from benchmarks.common import (
    autocast,
    build_model,
    compile_model,
    environment,
    make_step,
    median,
    non_negative_int,
    positive_int,
    print_table,
    ratio,
    summary,
    sync,
    time_interleaved,
    write_json,
)
from boatvit import balanced_hierarchical_clustering
from boatvit.fsla import FeatureSpaceAttention

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FIXTURES = ROOT / 'tests' / 'fixtures' / 'reference'
CLOSE = dict(rtol=1e-10, atol=1e-10)
# relative L2 error of bf16 autocast features and logits against float32: tests/test_mixed_precision.py's HALF_RTOL,
# about 2.5x the worst measured on reduced models (0.020), since bf16 queries move some tokens to other clusters
BF16_RTOL = 0.05
# (model, baseline) of every ratio within one route; compiled-vs-eager ratios are added per model
PAIRS = [(BOAT_SWIN, SWIN), (BOAT_CSWIN, CSWIN_NO_FSLA)]
# issue 18, on a GPU: time ratio limits (throughput >= 0.8x and >= 0.75x) and peak training memory
TARGETS = {'inference': 1 / 0.8, 'train': 1 / 0.75, 'train_memory': 1.3}


@dataclass
class Plan:
    """What one run times: models (spec and constructor overrides), batches per mode, rounds."""

    models: Dict[str, Dict[str, Any]]
    batches: Dict[str, Tuple[int, ...]]
    repeats: int
    warmup: int
    compile_check_model: Optional[Dict[str, Any]] = None  # None: the fixture models
    img_size: int = 224
    backend: str = 'inductor'  # of torch.compile


GPU_PLAN = Plan(
    models={spec: {} for spec in (SWIN, BOAT_SWIN, CSWIN_NO_FSLA, BOAT_CSWIN)},
    batches={'inference': (128, 256), 'train': (64, 128)},
    repeats=10,
    warmup=3,
)
# the dry run: one pair, tiny widths and depths (FSLA in the 2nd block of stage 1), every compilation a few times
# cheaper; the fixture checks cover both families
_TINY_SWIN = dict(embed_dim=16, depths=(2, 1, 1, 1), num_heads=(1, 1, 2, 2), num_classes=10)
DRY_PLAN = Plan(
    models={SWIN: _TINY_SWIN, BOAT_SWIN: _TINY_SWIN},
    batches={'inference': (2,), 'train': (2,)},
    repeats=2,
    warmup=1,
    compile_check_model={'spec': BOAT_SWIN, **_TINY_SWIN},
)


def _test_conftest() -> ModuleType:
    """``tests/conftest.py`` (the fixture names and the fixture-to-model mapping the tests use), loaded from its file:
    a ``tests`` package installed in site-packages would shadow ``import tests.conftest``."""
    path = ROOT / 'tests' / 'conftest.py'
    spec = importlib.util.spec_from_file_location('boatvit_tests_conftest', path)
    if spec is None or not path.is_file():
        raise SystemExit(f'device_check: {path} not found; run from a checkout of the repository')
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def load_fixtures(directory: Path) -> Dict[str, Any]:
    """The reference fixtures in ``directory`` by family, as ``tests/conftest.py``'s ``ReferenceFixture``."""
    conftest = _test_conftest()
    missing = [
        n
        for n in conftest.FIXTURE_NAMES.values()
        for ext in ('json', 'safetensors')
        if not (directory / f'{n}.{ext}').is_file()
    ]
    if missing:
        raise SystemExit(
            f'device_check: --fixtures {directory}: missing {", ".join(sorted(set(missing)))} '
            '(.json and .safetensors); pass the directory of the reference fixtures'
        )
    return {
        family: conftest.ReferenceFixture(
            name, json.loads((directory / f'{name}.json').read_text()), load_file(directory / f'{name}.safetensors')
        )
        for family, name in conftest.FIXTURE_NAMES.items()
    }


def fixture_model(fixture: Any, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The fixture's model with its weights, in eval mode."""
    return fixture.build().to(device, dtype)


def _fixture_queries(fixture: Any, device: str) -> torch.Tensor:
    """The first FSLA layer's queries ``(B, heads, N, head_dim)`` in float64, computed on ``device``."""
    info = fixture.meta['first_fsla']
    module = FeatureSpaceAttention(info['dim'], info['num_heads'], scale=info['scale']).double()
    module.load_state_dict(fixture.first_fsla_weights())
    module.to(device)
    x = fixture.tensors['fsla.input'].to(device)
    B, N, C = x.shape
    with torch.no_grad():
        return module.qkv(x).view(B, N, 3, info['num_heads'], -1)[:, :, 0].transpose(1, 2)


def _max_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double().cpu() - expected.double().cpu()).abs().max().item()


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def _check(name: str, passed: bool, value: float, limit: float, detail: str) -> Dict[str, Any]:
    return {'check': name, 'passed': bool(passed), 'value': value, 'limit': limit, 'detail': detail}


def compile_cases(fixtures: Dict[str, Any], plan: Plan, device: str) -> Dict[str, Tuple[torch.nn.Module, torch.Tensor]]:
    """The float64 models and inputs the compile check compares: the fixture models, or the plan's tiny model."""
    if plan.compile_check_model is None:
        return {
            family: (fixture_model(f, device, torch.float64), f.tensors['input'].to(device, torch.float64))
            for family, f in fixtures.items()
        }
    kwargs = dict(plan.compile_check_model)
    model = build_model(kwargs.pop('spec'), device, **kwargs).double().eval()
    x = torch.randn(2, 3, plan.img_size, plan.img_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return {'tiny': (model, x.to(device))}


def correctness(fixtures: Dict[str, Any], plan: Plan, device: str) -> List[Dict[str, Any]]:
    checks = []
    for family, fixture in fixtures.items():
        t = fixture.tensors
        model = fixture_model(fixture, device, torch.float64)
        x = t['input'].to(device, torch.float64)
        with torch.no_grad():
            logits = model(x)
            stages = model.forward_intermediates(x, intermediates_only=True)
        pairs = [(logits.cpu(), t['logits'])]
        for i, s in enumerate(stages):
            pairs += fixture.summary_pairs(f'stages.{i}', s.flatten(2).transpose(1, 2))
        diffs = [_max_diff(a, e) for a, e in pairs]
        close = all(torch.allclose(a.double(), e, **CLOSE) for a, e in pairs)
        checks.append(
            _check(
                f'fixture_logits_stages_{family}',
                close,
                max(diffs),
                1e-10,
                'float64 logits and the 4 stages (sums, sampled rows) against the fixture, rtol = atol = 1e-10',
            )
        )
        perm = balanced_hierarchical_clustering(_fixture_queries(fixture, device)).cpu()
        wrong = int((perm != t['fsla.perm']).sum())
        checks.append(
            _check(
                f'fixture_permutation_{family}',
                wrong == 0,
                wrong,
                0,
                'first FSLA layer clustering on the device, positions differing from the fixture',
            )
        )

        x3 = torch.cat([x, x[:1].flip(-1)])
        with torch.no_grad():
            alone = torch.cat([model(x3[i : i + 1]) for i in range(3)])
            together = model(x3)
        diff = _max_diff(together, alone)
        checks.append(
            _check(
                f'batch_independence_{family}',
                torch.allclose(together, alone, rtol=1e-12, atol=1e-12),
                diff,
                1e-12,
                'float64 logits of 3 images in one batch against one at a time',
            )
        )

        model = model.float()
        with torch.no_grad():
            features = model.forward_features(x.float())
            out = model.forward_head(features)
            with autocast(device, torch.bfloat16):
                half_features = model.forward_features(x.float())
                half_out = model.forward_head(half_features)
        finite = bool(torch.isfinite(half_features).all() and torch.isfinite(half_out).all())
        error = max(_relative_error(half_features, features), _relative_error(half_out, out))
        checks.append(
            _check(
                f'bf16_autocast_{family}',
                finite and error < BF16_RTOL,
                error,
                BF16_RTOL,
                'finite, relative L2 error of features and logits under bf16 autocast against float32',
            )
        )
        del model

    for family, (model, x) in compile_cases(fixtures, plan, device).items():
        compiled = compile_model(model, plan.backend)
        with torch.no_grad():
            expected, actual = model(x), compiled(x)
        checks.append(
            _check(
                f'compile_equals_eager_{family}',
                torch.allclose(actual, expected, **CLOSE),
                _max_diff(actual, expected),
                1e-10,
                f'torch.compile ({plan.backend}, fullgraph) against eager, float64 logits',
            )
        )
    print_table('correctness on ' + device, checks, ['check', 'passed', 'value', 'limit', 'detail'])
    return checks


def _peak_memory_mib(step: Callable[[], None], device: str) -> Optional[float]:
    """Peak memory of one call of ``step`` above what was allocated before it (MiB); None on the CPU."""
    if device != 'cuda':
        return None
    sync(device)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    sync(device)
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def timing(plan: Plan, device: str, budget_s: float) -> Dict[str, Any]:
    start_all = time.perf_counter()
    out = {}
    for mode, batches in plan.batches.items():
        for batch in batches:
            steps, rows, skipped = {}, {}, []
            for route in ('eager', 'compiled'):
                for spec, overrides in plan.models.items():
                    label = f'{spec} {route}'
                    if route == 'compiled' and time.perf_counter() - start_all > budget_s:
                        skipped.append(label)
                        continue
                    model = build_model(spec, device, route == 'compiled', plan.backend, **overrides)
                    step = make_step(model, mode, batch, plan.img_size, device, torch.bfloat16)
                    sync(device)
                    start = time.perf_counter()
                    step()  # compiles; also creates the optimizer state before the memory is measured
                    sync(device)
                    first = time.perf_counter() - start
                    rows[label] = {'first_call_s': first, 'peak_mib': _peak_memory_mib(step, device)}
                    steps[label] = step
            times = time_interleaved(steps, device, plan.repeats, plan.warmup)
            for label, t in times.items():
                rows[label].update(summary(t), img_per_s=batch / median(t))
            comparisons = []
            for route in ('eager', 'compiled'):
                for model, base in PAIRS:
                    m, b = f'{model} {route}', f'{base} {route}'
                    if m in times and b in times:
                        memory = rows[m]['peak_mib'] / rows[b]['peak_mib'] if rows[b]['peak_mib'] else None
                        comparisons.append({'model': m, 'baseline': b, **ratio(times, m, b), 'peak_ratio': memory})
            for spec in plan.models:
                m, b = f'{spec} compiled', f'{spec} eager'
                if m in times:
                    comparisons.append({'model': m, 'baseline': b, **ratio(times, m, b), 'peak_ratio': None})
            out[f'{mode}_b{batch}'] = {
                'mode': mode,
                'batch': batch,
                'models': rows,
                'comparisons': comparisons,
                'skipped_over_budget': skipped,
            }
            print_table(
                f'{mode}, batch {batch}, bf16 autocast: median of {plan.repeats} interleaved rounds; '
                'first_call_s includes compilation',
                [{'model': k, **v} for k, v in rows.items()],
                ['model', 'median_ms', 'img_per_s', 'peak_mib', 'first_call_s'],
            )
            print_table(
                f'{mode}, batch {batch}: ratios of medians (time; peak memory)',
                comparisons,
                ['model', 'baseline', 'ratio', 'round_ratio_q1', 'round_ratio_q3', 'peak_ratio'],
            )
            if skipped:
                print(f'skipped over the {budget_s:.0f} s time budget: {", ".join(skipped)}')
            del steps
    return out


def _targets(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows = []
    for key, section in results.items():
        for c in section['comparisons']:
            if (c['model'].split()[0], c['baseline'].split()[0]) not in PAIRS:
                continue
            mode = section['mode']
            rows.append(
                {
                    'figure': f'{key} time',
                    'model': c['model'],
                    'value': c['ratio'],
                    'limit': TARGETS[mode],
                    'met': c['ratio'] <= TARGETS[mode],
                }
            )
            if mode == 'train' and c['peak_ratio'] is not None:
                rows.append(
                    {
                        'figure': f'{key} peak memory',
                        'model': c['model'],
                        'value': c['peak_ratio'],
                        'limit': TARGETS['train_memory'],
                        'met': c['peak_ratio'] <= TARGETS['train_memory'],
                    }
                )
    print_table(
        'targets (issue 18, GPU): time ratio <= 1/throughput target', rows, ['figure', 'model', 'value', 'limit', 'met']
    )
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--dry-run',
        action='store_true',
        help='run every code path on the CPU with tiny models and batches (for the test suite)',
    )
    parser.add_argument(
        '--fixtures',
        type=Path,
        default=DEFAULT_FIXTURES,
        help=f'directory of the reference fixtures (default: {DEFAULT_FIXTURES.relative_to(ROOT)})',
    )
    parser.add_argument('--sections', default='checks,timing', help='comma-separated subset of checks, timing')
    parser.add_argument(
        '--time-budget',
        type=positive_int,
        default=330,
        help='seconds of timing after which compiled figures are skipped (default: 330)',
    )
    parser.add_argument('--repeats', type=positive_int, help='timed rounds (default: 10 on a GPU, 2 in the dry run)')
    parser.add_argument('--warmup', type=non_negative_int, help='untimed rounds (default: 3 on a GPU, 1 dry)')
    parser.add_argument(
        '--compile-backend',
        default='inductor',
        choices=('inductor', 'aot_eager'),
        help='torch.compile backend (default: inductor); aot_eager traces the same graphs (dynamo, AOTAutograd) '
        "without generating code, minutes faster on a small CPU (the test suite's dry run)",
    )
    parser.add_argument('--threads', type=positive_int, help="CPU threads (default: torch's)")
    parser.add_argument('--json', type=Path, default=None, help='where to write the results (default: results/)')
    args = parser.parse_args(argv)
    sections = set(args.sections.split(','))
    if not sections or sections - {'checks', 'timing'}:
        parser.error(f'--sections {args.sections}: choose from checks, timing')
    if not args.dry_run and not torch.cuda.is_available():
        parser.error('torch sees no CUDA device; run on a machine with a GPU, or pass --dry-run for the CPU code paths')
    args.device = 'cpu' if args.dry_run else 'cuda'
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    plan = Plan(
        **{
            **plan.__dict__,
            'repeats': args.repeats or plan.repeats,
            'warmup': plan.warmup if args.warmup is None else args.warmup,
            'backend': args.compile_backend,
        }
    )
    args.repeats, args.warmup = plan.repeats, plan.warmup
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == 'cuda':
        # TF32 would run float32 matmuls with 10-bit mantissas (see common.setup)
        torch.backends.cuda.matmul.allow_tf32 = False
    fixtures = load_fixtures(args.fixtures) if 'checks' in sections else None

    results: Dict[str, Any] = {
        'environment': {
            **environment(args),
            'dry_run': args.dry_run,
            'compile_backend': plan.backend,
            'dtype': 'bfloat16 autocast (timing); float64, float32 (checks)',
        }
    }
    print(results['environment'])
    if 'checks' in sections:
        results['checks'] = correctness(fixtures, plan, args.device)
    if 'timing' in sections:
        results['timing'] = timing(plan, args.device, args.time_budget)
        results['targets'] = _targets(results['timing'])
    failed = [c['check'] for c in results.get('checks', []) if not c['passed']]
    results['passed'] = not failed
    write_json(args, 'device_check', results)
    if failed:
        print(
            f'device_check: {len(failed)} correctness check(s) FAILED on {args.device}: {", ".join(failed)}; '
            'see the table above and the JSON',
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
