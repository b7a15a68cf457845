"""The benchmark scripts refuse counts that cannot be right (0 rounds, a negative batch) by name, before any model
is built, instead of falling back to a default or failing deep inside."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize('script, argv, flag', [
    ('benchmarks.bench_models', ['--repeats', '0'], '--repeats'),
    ('benchmarks.bench_models', ['--batch', '-8'], '--batch'),
    ('benchmarks.bench_fsla', ['--warmup', '-1'], '--warmup'),
    ('benchmarks.bench_fsla', ['--threads', '0'], '--threads'),
])
def test_bad_counts_are_usage_errors(script, argv, flag):
    result = subprocess.run([sys.executable, '-m', script, *argv], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert f'argument {flag}' in result.stderr and ('at least 1' in result.stderr or '0 or more' in result.stderr)


def test_unknown_before_revision_is_named():
    result = subprocess.run([sys.executable, '-m', 'benchmarks.bench_fsla', '--before', 'no-such-revision'], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert '--before no-such-revision: boatvit/clustering.py is not in that revision' in result.stderr
