"""The benchmark scripts refuse counts that cannot be right (0 rounds, a negative batch) by name, before any model
is built, instead of falling back to a default or failing deep inside."""

import runpy
import sys

import pytest
import torch


def _run(script: str, argv: list, monkeypatch, capsys):
    """``python -m script *argv`` in this process (run as ``__main__``, as the command line runs it, without a fresh
    interpreter importing torch for every case): its exit code or message, and what it wrote to stderr."""
    monkeypatch.setattr(sys, 'argv', [script, *argv])
    # imported by another script before: run afresh as __main__, as runpy asks
    monkeypatch.delitem(sys.modules, script, raising=False)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module(script, run_name='__main__', alter_sys=True)
    finally:
        torch.set_num_threads(threads)  # a script's set-up may have set it before it stopped
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    'script, argv, flag',
    [
        ('benchmarks.bench_models', ['--repeats', '0'], '--repeats'),
        ('benchmarks.bench_models', ['--batch', '-8'], '--batch'),
        ('benchmarks.bench_fsla', ['--warmup', '-1'], '--warmup'),
        ('benchmarks.bench_fsla', ['--threads', '0'], '--threads'),
        ('benchmarks.bench_compiled', ['--repeats', '0'], '--repeats'),
        ('benchmarks.bench_compiled', ['--profile', '-1'], '--profile'),
        ('benchmarks.bench_onnx', ['--batch', '0'], '--batch'),
        ('benchmarks.bench_onnx', ['--profile-runs', '0'], '--profile-runs'),
        ('benchmarks.bench_precision', ['--repeats', '0'], '--repeats'),
        ('benchmarks.bench_precision', ['--warmup', '-1'], '--warmup'),
        ('benchmarks.bench_precision', ['--chunk', '0'], '--chunk'),
    ],
)
def test_bad_counts_are_usage_errors(script, argv, flag, monkeypatch, capsys):
    code, stderr = _run(script, argv, monkeypatch, capsys)
    assert code == 2
    assert f'argument {flag}' in stderr and ('at least 1' in stderr or '0 or more' in stderr)


def test_unknown_before_revision_is_named(monkeypatch, capsys):
    # a message as the exit code: the command line prints it and exits with 1
    code, _ = _run('benchmarks.bench_fsla', ['--before', 'no-such-revision'], monkeypatch, capsys)
    assert '--before no-such-revision: boatvit/clustering.py is not in that revision' in str(code)


@pytest.mark.parametrize(
    'script, argv, message',
    [
        ('benchmarks.bench_compiled', ['--modes', 'inference,bogus'], "unknown modes ['bogus']"),
        ('benchmarks.bench_compiled', ['--compile'], '--compile does not apply'),
        ('benchmarks.bench_compiled', ['--amp', 'bf16', '--clustering'], 'leave out --amp bf16'),
        ('benchmarks.bench_models', ['--amp', 'bf16', '--sections', 'memory'], 'without --amp bf16: leave it out'),
        ('benchmarks.bench_models', ['--amp', 'tf32'], "argument --amp: invalid choice: 'tf32'"),
        ('benchmarks.bench_onnx', ['--device', 'cuda'], 'CPU provider only'),
        ('benchmarks.bench_onnx', ['--keep-dir', '/no/such/dir'], '--keep-dir /no/such/dir: not an existing directory'),
        ('benchmarks.bench_precision', ['--model', 'boat_swin_nano_32', '--sections', 'bogus'], 'invalid choice'),
        ('benchmarks.bench_cost_split', ['--pair', 'boat_swin_tiny_224'], 'argument --pair: expected 2 arguments'),
        ('benchmarks.bench_cost_split', ['--device', 'cuda'], 'the CPU route only'),
        ('benchmarks.bench_cost_split', ['--pair', 'nope', 'boat_swin_nano_32'], 'nope is not a timm model name'),
        (
            'benchmarks.bench_cost_split',
            ['--pair', 'boat_swin_nano_32:fsla_blocks=none', 'boat_swin_nano_32'],
            'has no FSLA layer; the BOAT model goes first',
        ),
    ],
)
def test_options_that_do_not_apply_are_usage_errors(script, argv, message, monkeypatch, capsys):
    code, stderr = _run(script, argv, monkeypatch, capsys)
    assert code == 2
    assert message in stderr


def test_precision_sections_and_counts_parse():
    from benchmarks.bench_precision import SECTIONS, parser

    args = parser().parse_args(['--model', 'boat_swin_nano_32'])
    assert args.sections == list(SECTIONS) and (args.chunk, args.repeats, args.warmup) == (250, 7, 1)
    argv = ['--weights', 'runs/x', '--sections', 'flag', 'tf32', '--chunk', '8', '--repeats', '3', '--warmup', '0']
    args = parser().parse_args(argv)
    assert args.sections == ['flag', 'tf32'] and (args.chunk, args.repeats, args.warmup) == (8, 3, 0)
