"""``python -m benchmarks.device_check``: its CPU dry run takes every code path of the GPU check (fixtures on the
device, batch independence, bf16 autocast, compile against eager, eager and compiled timing with the peak-memory
hook) on tiny models, writes every section, and a failed check makes the command fail by name."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import device_check
from benchmarks.bench_models import BOAT_CSWIN, BOAT_SWIN, CSWIN_NO_FSLA, SWIN
from benchmarks.common import build_model
from conftest import FIXTURE_NAMES, FIXTURES

ROOT = Path(__file__).resolve().parent.parent


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-m', 'benchmarks.device_check', *argv], cwd=ROOT, capture_output=True, text=True, timeout=900
    )


@pytest.mark.slow
def test_dry_run_writes_every_section_and_passes(tmp_path):
    out = tmp_path / 'check.json'
    # aot_eager: the same dynamo and AOTAutograd graphs without inductor's code generation, which takes minutes of a
    # busy 2-core machine; inductor against eager is tests/test_compile.py's
    result = _run(
        '--dry-run',
        '--compile-backend',
        'aot_eager',
        '--fixtures',
        str(FIXTURES),
        '--time-budget',
        '100000',
        '--json',
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report['passed'] and report['environment']['dry_run']
    assert any('aot_eager' in c['detail'] for c in report['checks'])
    names = {c['check'] for c in report['checks']}
    for family in ('swin', 'cswin'):
        assert {
            f'fixture_logits_stages_{family}',
            f'fixture_permutation_{family}',
            f'batch_independence_{family}',
            f'bf16_autocast_{family}',
        } <= names
    assert 'compile_equals_eager_tiny' in names
    assert all(c['passed'] for c in report['checks'])
    # the fixture permutations are exact and the float64 outputs within 1e-10 on this device
    assert all(c['value'] == 0 for c in report['checks'] if c['check'].startswith('fixture_permutation'))
    assert all(c['value'] <= 1e-10 for c in report['checks'] if c['check'].startswith('fixture_logits'))
    # the GPU plan's models and number of batches, timed in figure_order: as many compilations of BOAT's shared
    # forward as on a GPU, past dynamo's default limit of 8 graphs per function
    assert list(report['timing']) == ['inference_b2', 'train_b2', 'inference_b3', 'train_b3']
    assert report['complete']
    for section in report['timing'].values():
        assert not section['skipped_over_budget'] and not section['errors']
        assert len(section['models']) == 2 * len(device_check.DRY_PLAN.models)
        for row in section['models'].values():
            assert row['median_ms'] > 0 and row['first_call_s'] > 0 and row['peak_mib'] is None
        pairs = {(c['model'], c['baseline']) for c in section['comparisons']}
        for route in ('eager', 'compiled'):
            assert (f'{BOAT_SWIN} {route}', f'{SWIN} {route}') in pairs
            assert (f'{BOAT_CSWIN} {route}', f'{CSWIN_NO_FSLA} {route}') in pairs
        assert (f'{BOAT_SWIN} compiled', f'{BOAT_SWIN} eager') in pairs
    assert {t['figure'] for t in report['targets']} >= {'inference_b2 time', 'train_b2 time'}


def test_a_failed_check_fails_the_command_by_name(monkeypatch, tmp_path, capsys):
    # no real model can be within 0 of float32 under bf16: the check must fail, and the command with it
    monkeypatch.setattr(device_check, 'BF16_RTOL', 0.0)
    # and the compile check, minutes of compilation here, is left out
    monkeypatch.setattr(device_check, 'compile_families', lambda *args: [])
    status = device_check.main(
        ['--dry-run', '--sections', 'checks', '--fixtures', str(FIXTURES), '--json', str(tmp_path / 'check.json')]
    )
    assert status == 1
    err = capsys.readouterr().err
    assert 'correctness check(s) FAILED' in err and 'bf16_autocast_swin' in err and 'bf16_autocast_cswin' in err
    report = json.loads((tmp_path / 'check.json').read_text())
    assert report['passed'] is False
    assert all(c['passed'] for c in report['checks'] if not c['check'].startswith('bf16'))


def test_a_check_that_raises_fails_alone(monkeypatch, tmp_path, capsys):
    """An exception in one check (a CUDA error, say) fails that check with its message; the others still run."""

    def broken(fixture, device):
        raise RuntimeError('CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be ...')

    monkeypatch.setattr(device_check, '_fixture_permutation', broken)
    monkeypatch.setattr(device_check, 'compile_families', lambda *args: [])
    argv = ['--dry-run', '--sections', 'checks', '--fixtures', str(FIXTURES), '--json', str(tmp_path / 'c.json')]
    assert device_check.main(argv) == 1
    assert 'fixture_permutation_swin' in capsys.readouterr().err
    checks = {c['check']: c for c in json.loads((tmp_path / 'c.json').read_text())['checks']}
    for family in ('swin', 'cswin'):
        failed = checks.pop(f'fixture_permutation_{family}')
        assert not failed['passed'] and failed['value'] is None
        assert failed['detail'].startswith('ERROR RuntimeError: CUDA error: an illegal memory access was encountered;')
    assert len(checks) == 6 and all(c['passed'] for c in checks.values())


TINY_PAIR = device_check.Plan(
    models={SWIN: device_check._TINY_SWIN, BOAT_SWIN: device_check._TINY_SWIN},
    batches={'inference': (2,), 'train': (2,)},
    repeats=1,
    warmup=0,
)


def test_a_figure_that_fails_is_recorded_and_the_rest_measured(monkeypatch, tmp_path, capsys):
    """A model that cannot be built, compiled or run (CUDA out of memory at a large batch) costs its own figure only:
    the error is in its section, the other figures are timed, and the command exits 1 naming it."""
    monkeypatch.setattr(device_check, 'DRY_PLAN', TINY_PAIR)
    build = device_check.build_model

    def build_or_fail(spec, device, compile=False, backend='inductor', **overrides):
        if compile and spec == BOAT_SWIN:
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB.\nOf the allocated ...')
        return build(spec, device, **overrides)  # the other compiled figure runs eagerly: no compilation here

    monkeypatch.setattr(device_check, 'build_model', build_or_fail)
    json_path = tmp_path / 't.json'
    assert device_check.main(['--dry-run', '--sections', 'timing', '--json', str(json_path)]) == 1
    err = capsys.readouterr().err
    assert 'figure(s) could not be measured' in err and f'train_b2: {BOAT_SWIN} compiled' in err
    report = json.loads(json_path.read_text())
    assert report['complete'] and report['passed']  # no check failed: the figures' errors are apart
    for section in report['timing'].values():
        assert section['errors'] == {
            f'{BOAT_SWIN} compiled': 'OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.'
        }
        assert set(section['models']) == {f'{SWIN} eager', f'{BOAT_SWIN} eager', f'{SWIN} compiled'}
        assert all(row['median_ms'] > 0 for row in section['models'].values())
        pairs = {(c['model'], c['baseline']) for c in section['comparisons']}
        assert pairs == {(f'{BOAT_SWIN} eager', f'{SWIN} eager'), (f'{SWIN} compiled', f'{SWIN} eager')}


def test_a_stopped_run_keeps_what_it_measured(monkeypatch, tmp_path):
    """The JSON is written after every section: a run stopped from outside (a lent machine's time limit) leaves the
    checks and the sections it finished, marked incomplete."""
    monkeypatch.setattr(device_check, 'DRY_PLAN', TINY_PAIR)
    monkeypatch.setattr(device_check, 'compile_families', lambda *args: [])
    monkeypatch.setattr(device_check, 'build_model', lambda spec, device, *args, **kw: build_model(spec, device, **kw))
    timed = []

    def time_or_stop(steps, *args):
        if timed:
            raise KeyboardInterrupt
        timed.append(steps)
        return {label: [1e-3] for label in steps}

    monkeypatch.setattr(device_check, 'time_interleaved', time_or_stop)
    json_path = tmp_path / 'stopped.json'
    with pytest.raises(KeyboardInterrupt):
        device_check.main(['--dry-run', '--fixtures', str(FIXTURES), '--json', str(json_path)])
    report = json.loads(json_path.read_text())
    assert report['complete'] is False and report['passed']
    assert len(report['checks']) == 8
    assert list(report['timing']) == ['inference_b2']
    assert set(report['timing']['inference_b2']['models']) == set(timed[0])


def test_figures_are_timed_first_batches_first():
    plan = device_check.GPU_PLAN
    assert device_check.figure_order(plan) == [('inference', 128), ('train', 64), ('inference', 256), ('train', 128)]
    # every compiled figure and the two fixture families' compile checks: what the recompile limit is raised to
    assert device_check.compilations(plan, {'swin': None, 'cswin': None}) == 18


def test_missing_fixtures_are_named(tmp_path):
    result = _run('--dry-run', '--sections', 'checks', '--fixtures', str(tmp_path))
    assert result.returncode == 1
    names = ', '.join(sorted(FIXTURE_NAMES.values()))
    assert f'--fixtures {tmp_path}: missing {names}' in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason='the usage error is for machines without CUDA')
def test_without_cuda_it_points_to_the_dry_run():
    result = _run()
    assert result.returncode == 2
    assert 'torch sees no CUDA device' in result.stderr and '--dry-run' in result.stderr


@pytest.mark.parametrize(
    'argv, flag',
    [
        (['--time-budget', '0'], '--time-budget'),
        (['--repeats', '0'], '--repeats'),
        (['--sections', 'checks,bogus'], '--sections'),
    ],
)
def test_bad_arguments_are_usage_errors(argv, flag):
    result = _run('--dry-run', *argv)
    assert result.returncode == 2 and flag in result.stderr
