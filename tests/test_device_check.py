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
    assert set(report['timing']) == {'inference_b2', 'train_b2'}
    for section in report['timing'].values():
        assert not section['skipped_over_budget']
        assert len(section['models']) == 2 * len(device_check.DRY_PLAN.models)
        for row in section['models'].values():
            assert row['median_ms'] > 0 and row['first_call_s'] > 0 and row['peak_mib'] is None
        pairs = {(c['model'], c['baseline']) for c in section['comparisons']}
        assert ('boat_swin_tiny_224 compiled', 'swin_tiny_patch4_window7_224 compiled') in pairs
        assert ('boat_swin_tiny_224 compiled', 'boat_swin_tiny_224 eager') in pairs
    assert {t['figure'] for t in report['targets']} >= {'inference_b2 time', 'train_b2 time'}


def test_a_failed_check_fails_the_command_by_name(monkeypatch, tmp_path, capsys):
    # no real model can be within 0 of float32 under bf16: the check must fail, and the command with it
    monkeypatch.setattr(device_check, 'BF16_RTOL', 0.0)
    # and the compile check, minutes of compilation here, is left out
    monkeypatch.setattr(device_check, 'compile_cases', lambda *args: {})
    status = device_check.main(
        ['--dry-run', '--sections', 'checks', '--fixtures', str(FIXTURES), '--json', str(tmp_path / 'check.json')]
    )
    assert status == 1
    err = capsys.readouterr().err
    assert 'correctness check(s) FAILED' in err and 'bf16_autocast_swin' in err and 'bf16_autocast_cswin' in err
    report = json.loads((tmp_path / 'check.json').read_text())
    assert report['passed'] is False
    assert all(c['passed'] for c in report['checks'] if not c['check'].startswith('bf16'))


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
