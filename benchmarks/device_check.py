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
is timed apart. Sections run in :func:`figure_order` (every mode's first batch, then the second batches); compiled
figures that would start after ``--time-budget`` seconds of timing are skipped and recorded as skipped, so the whole
run keeps to its budget on a slower machine. Every compiled figure is a fresh static-shape graph.

A GPU is lent rarely, so one failure must not cost the rest of the run: a check or a figure that raises (a CUDA
error, out of memory, a compiler that cannot run there) is recorded with its error, its traceback printed, and the
run goes on; the command then exits 1 naming it. The JSON is written after the checks and after every timing
section (``"complete": false`` until the end), so a run stopped from outside keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import time
import traceback
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
# the dry run: the GPU plan's models, modes and number of batches (so it compiles as many graphs), at tiny widths
# and depths (FSLA in the 2nd block of stage 1 of BOAT-Swin, in the one block of every BOAT-CSWin stage), every
# compilation a few times cheaper; the fixture checks cover both families at their own sizes
_TINY_SWIN = dict(embed_dim=16, depths=(2, 1, 1, 1), num_heads=(1, 1, 2, 2), num_classes=10)
_TINY_CSWIN = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2), num_classes=10)
DRY_PLAN = Plan(
    models={SWIN: _TINY_SWIN, BOAT_SWIN: _TINY_SWIN, CSWIN_NO_FSLA: _TINY_CSWIN, BOAT_CSWIN: _TINY_CSWIN},
    batches={'inference': (2, 3), 'train': (2, 3)},
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


def compile_families(fixtures: Dict[str, Any], plan: Plan) -> List[str]:
    """What the compile check compares: the fixture models by family, or the plan's tiny model (``'tiny'``)."""
    return list(fixtures) if plan.compile_check_model is None else ['tiny']


def compile_case(
    fixtures: Dict[str, Any], plan: Plan, device: str, family: str
) -> Tuple[torch.nn.Module, torch.Tensor]:
    """The float64 model and input of one compile check (see :func:`compile_families`)."""
    if plan.compile_check_model is None:
        f = fixtures[family]
        return fixture_model(f, device, torch.float64), f.tensors['input'].to(device, torch.float64)
    kwargs = dict(plan.compile_check_model)
    model = build_model(kwargs.pop('spec'), device, **kwargs).double().eval()
    x = torch.randn(2, 3, plan.img_size, plan.img_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return model, x.to(device)


def _describe(error: BaseException) -> str:
    """An exception in one line: its type and the first line of its message (a CUDA error's message runs long)."""
    text = str(error).strip().splitlines()
    return f'{type(error).__name__}: {text[0][:300] if text else ""}'.rstrip(': ')


def _free(device: str) -> None:
    """Give back what the models and steps just dropped held, before the next figure measures its peak."""
    gc.collect()
    if device == 'cuda':
        torch.cuda.empty_cache()


def _guarded_check(
    name: str, limit: float, detail: str, measure: Callable[[], Tuple[bool, float]], device: str
) -> Dict[str, Any]:
    """One correctness check: ``measure()`` gives (passed, value). An exception (a CUDA error, a compiler that cannot
    run) fails this check with its message, printed with its traceback, and the run goes on: a GPU is lent rarely,
    and one broken check must not cost the other checks and the timing."""
    try:
        passed, value = measure()
    except Exception as error:
        traceback.print_exc()
        _free(device)
        return _check(name, False, None, limit, f'ERROR {_describe(error)}; {detail}')
    return _check(name, passed, value, limit, detail)


def _fixture_outputs(fixture: Any, device: str) -> Tuple[bool, float]:
    """float64 logits and the 4 stages on ``device`` against the fixture."""
    model = fixture_model(fixture, device, torch.float64)
    x = fixture.tensors['input'].to(device, torch.float64)
    with torch.no_grad():
        logits = model(x)
        stages = model.forward_intermediates(x, intermediates_only=True)
    pairs = [(logits.cpu(), fixture.tensors['logits'])]
    for i, s in enumerate(stages):
        pairs += fixture.summary_pairs(f'stages.{i}', s.flatten(2).transpose(1, 2))
    close = all(torch.allclose(a.double(), e, **CLOSE) for a, e in pairs)
    return close, max(_max_diff(a, e) for a, e in pairs)


def _fixture_permutation(fixture: Any, device: str) -> Tuple[bool, float]:
    """The first FSLA layer's clustering on ``device``: positions that differ from the fixture's permutation."""
    perm = balanced_hierarchical_clustering(_fixture_queries(fixture, device)).cpu()
    wrong = int((perm != fixture.tensors['fsla.perm']).sum())
    return wrong == 0, wrong


def _batch_independence(fixture: Any, device: str) -> Tuple[bool, float]:
    """float64 logits of 3 images in one batch against one at a time."""
    model = fixture_model(fixture, device, torch.float64)
    x = fixture.tensors['input'].to(device, torch.float64)
    x3 = torch.cat([x, x[:1].flip(-1)])
    with torch.no_grad():
        alone = torch.cat([model(x3[i : i + 1]) for i in range(3)])
        together = model(x3)
    return torch.allclose(together, alone, rtol=1e-12, atol=1e-12), _max_diff(together, alone)


def _bf16_autocast(fixture: Any, device: str) -> Tuple[bool, float]:
    """Finite features and logits under bf16 autocast, and their relative L2 error against float32."""
    model = fixture_model(fixture, device, torch.float32)
    x = fixture.tensors['input'].to(device, torch.float32)
    with torch.no_grad():
        features = model.forward_features(x)
        out = model.forward_head(features)
        with autocast(device, torch.bfloat16):
            half_features = model.forward_features(x)
            half_out = model.forward_head(half_features)
    finite = bool(torch.isfinite(half_features).all() and torch.isfinite(half_out).all())
    error = max(_relative_error(half_features, features), _relative_error(half_out, out))
    return finite and error < BF16_RTOL, error


def _compile_equals_eager(fixtures: Dict[str, Any], plan: Plan, device: str, family: str) -> Tuple[bool, float]:
    """``torch.compile`` (the plan's backend, fullgraph) against eager, float64 logits."""
    model, x = compile_case(fixtures, plan, device, family)
    compiled = compile_model(model, plan.backend)
    with torch.no_grad():
        expected, actual = model(x), compiled(x)
    return torch.allclose(actual, expected, **CLOSE), _max_diff(actual, expected)


def correctness(fixtures: Dict[str, Any], plan: Plan, device: str) -> List[Dict[str, Any]]:
    checks = []
    for family, fixture in fixtures.items():
        for name, limit, detail, measure in (
            (
                'fixture_logits_stages',
                1e-10,
                'float64 logits and the 4 stages (sums, sampled rows) against the fixture, rtol = atol = 1e-10',
                _fixture_outputs,
            ),
            (
                'fixture_permutation',
                0,
                'first FSLA layer clustering on the device, positions differing from the fixture',
                _fixture_permutation,
            ),
            (
                'batch_independence',
                1e-12,
                'float64 logits of 3 images in one batch against one at a time',
                _batch_independence,
            ),
            (
                'bf16_autocast',
                BF16_RTOL,
                'finite, relative L2 error of features and logits under bf16 autocast against float32',
                _bf16_autocast,
            ),
        ):
            checks.append(_guarded_check(f'{name}_{family}', limit, detail, lambda: measure(fixture, device), device))
    for family in compile_families(fixtures, plan):
        checks.append(
            _guarded_check(
                f'compile_equals_eager_{family}',
                1e-10,
                f'torch.compile ({plan.backend}, fullgraph) against eager, float64 logits',
                lambda: _compile_equals_eager(fixtures, plan, device, family),
                device,
            )
        )
        _free(device)
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


def figure_order(plan: Plan) -> List[Tuple[str, int]]:
    """(mode, batch) in the order they are timed: the first batch of every mode, then the second of every mode: when
    the time budget runs out, what it leaves out is the second batches' compiled figures, not a whole mode's."""
    rounds = max(len(b) for b in plan.batches.values())
    return [(mode, b[i]) for i in range(rounds) for mode, b in plan.batches.items() if i < len(b)]


def compilations(plan: Plan, fixtures: Optional[Dict[str, Any]]) -> int:
    """How many graphs the run compiles at most: every compiled figure, and the compile checks."""
    checks = 0 if fixtures is None else len(compile_families(fixtures, plan))
    return len(plan.models) * sum(len(b) for b in plan.batches.values()) + checks


def _prepare(
    spec: str, overrides: Dict[str, Any], route: str, mode: str, batch: int, plan: Plan, device: str
) -> Tuple[Callable[[], None], Dict[str, Any]]:
    """The step of one figure, called once (compiling it; also creating the optimizer state before the memory is
    measured), and its row: first call's seconds, peak memory of a second call."""
    model = build_model(spec, device, route == 'compiled', plan.backend, **overrides)
    step = make_step(model, mode, batch, plan.img_size, device, torch.bfloat16)
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - start
    return step, {'first_call_s': first, 'peak_mib': _peak_memory_mib(step, device)}


def _comparisons(plan: Plan, rows: Dict[str, Any], times: Dict[str, List[float]]) -> List[Dict[str, Any]]:
    comparisons = []
    for route in ('eager', 'compiled'):
        for model, base in PAIRS:
            m, b = f'{model} {route}', f'{base} {route}'
            if m in times and b in times:
                memory = rows[m]['peak_mib'] / rows[b]['peak_mib'] if rows[b]['peak_mib'] else None
                comparisons.append({'model': m, 'baseline': b, **ratio(times, m, b), 'peak_ratio': memory})
    for spec in plan.models:
        m, b = f'{spec} compiled', f'{spec} eager'
        if m in times and b in times:
            comparisons.append({'model': m, 'baseline': b, **ratio(times, m, b), 'peak_ratio': None})
    return comparisons


def timing(
    plan: Plan, device: str, budget_s: float, save: Callable[[Dict[str, Any]], None] = lambda out: None
) -> Dict[str, Any]:
    """Every (mode, batch) section of the plan in :func:`figure_order`, ``save``d after each. A figure whose model
    fails to build, compile or run (a CUDA out-of-memory error, a compiler that cannot run on this machine) is
    recorded under its section's ``errors``, with its traceback printed, and the others go on."""
    start_all = time.perf_counter()
    out = {}
    for mode, batch in figure_order(plan):
        steps, rows, skipped, errors = {}, {}, [], {}
        for route in ('eager', 'compiled'):
            for spec, overrides in plan.models.items():
                label = f'{spec} {route}'
                if route == 'compiled' and time.perf_counter() - start_all > budget_s:
                    skipped.append(label)
                    continue
                try:
                    steps[label], rows[label] = _prepare(spec, overrides, route, mode, batch, plan, device)
                except Exception as error:
                    traceback.print_exc()
                    errors[label] = _describe(error)
                    _free(device)
        try:
            times = time_interleaved(steps, device, plan.repeats, plan.warmup)
        except Exception as error:
            traceback.print_exc()
            errors['interleaved timing'] = _describe(error)
            times = {}
        for label, t in times.items():
            rows[label].update(summary(t), img_per_s=batch / median(t))
        comparisons = _comparisons(plan, rows, times)
        out[f'{mode}_b{batch}'] = {
            'mode': mode,
            'batch': batch,
            'models': rows,
            'comparisons': comparisons,
            'skipped_over_budget': skipped,
            'errors': errors,
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
        for label, message in errors.items():
            print(f'ERROR {label}: {message}')
        del steps
        _free(device)
        save(out)
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

    def save(complete: bool) -> None:
        # after every section, so that a run stopped from outside (a time limit on a lent machine) keeps what it did
        failed = [c['check'] for c in results.get('checks', []) if not c['passed']]
        results.update(complete=complete, passed=not failed)
        write_json(args, 'device_check', results)

    # every compiled figure is a fresh static-shape graph of its model class's forward; BOAT's families share one
    # forward, which the GPU plan compiles 14 times: past dynamo's default limit of 8 graphs per function, where a
    # fullgraph compilation fails
    limit = max(torch._dynamo.config.recompile_limit, compilations(plan, fixtures))
    with torch._dynamo.config.patch(recompile_limit=limit):
        if 'checks' in sections:
            results['checks'] = correctness(fixtures, plan, args.device)
            save(complete=False)
        if 'timing' in sections:

            def save_timing(out: Dict[str, Any]) -> None:
                results['timing'] = out
                save(complete=False)

            results['timing'] = timing(plan, args.device, args.time_budget, save_timing)
            results['targets'] = _targets(results['timing'])
    save(complete=True)
    failed = [c['check'] for c in results.get('checks', []) if not c['passed']]
    errors = [f'{key}: {label}' for key, section in results.get('timing', {}).items() for label in section['errors']]
    if failed:
        print(
            f'device_check: {len(failed)} correctness check(s) FAILED on {args.device}: {", ".join(failed)}; '
            'see the table above and the JSON',
            file=sys.stderr,
        )
    if errors:
        print(
            f'device_check: {len(errors)} figure(s) could not be measured on {args.device}: {"; ".join(errors)}; '
            'their errors are in the tables above and the JSON',
            file=sys.stderr,
        )
    return 1 if failed or errors else 0


if __name__ == '__main__':
    sys.exit(main())
