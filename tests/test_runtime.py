"""Tests for boatvit.runtime: which devices count as fast in bf16, and what ``--amp auto`` resolves to."""

from __future__ import annotations

import pytest
import torch

from boatvit import runtime
from boatvit.errors import UsageError

# fast_bf16 imported at collection, before conftest's session patch of runtime.fast_bf16: the real probe
from boatvit.runtime import AMP_CHOICES, AMP_DTYPES, fast_bf16, resolve_amp

CPU = torch.device('cpu')


@pytest.mark.parametrize(
    'amx, avx512_bf16, fast', [(True, True, True), (True, False, True), (False, True, False), (False, False, False)]
)
def test_only_amx_counts_as_bf16_matrix_units(monkeypatch, amx, avx512_bf16, fast):
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: amx)
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: avx512_bf16, raising=False)
    assert fast_bf16(CPU) is fast
    assert fast_bf16(torch.device('cuda')) and not fast_bf16(torch.device('meta'))


def test_a_torch_without_the_probe_counts_as_a_cpu_without_the_units(monkeypatch):
    monkeypatch.delattr(torch.cpu, '_is_amx_tile_supported', raising=False)
    assert not fast_bf16(CPU)


def test_auto_is_bf16_with_bf16_units_and_says_why(monkeypatch):
    monkeypatch.setattr(runtime, 'fast_bf16', lambda device: True)
    assert resolve_amp('auto', CPU) == (
        'bf16',
        'bf16 autocast: this CPU has bf16 matrix units (AMX); --amp none to run float32',
    )
    amp, why = resolve_amp('auto', torch.device('cuda'))
    assert amp == 'bf16' and 'GPU' in why and '--amp none' in why


def test_auto_is_float32_without_bf16_units_and_says_nothing(monkeypatch):
    monkeypatch.setattr(runtime, 'fast_bf16', lambda device: False)
    assert resolve_amp('auto', CPU) == ('none', None)
    assert isinstance(runtime.autocast(CPU, 'auto'), type(runtime.autocast(CPU, 'none')))


@pytest.mark.parametrize('units', [True, False])
@pytest.mark.parametrize('amp', sorted(AMP_DTYPES))
def test_an_explicit_precision_is_kept(monkeypatch, units, amp):
    monkeypatch.setattr(runtime, 'fast_bf16', lambda device: units)
    assert resolve_amp(amp, CPU) == (amp, None)


def test_autocast_follows_auto(monkeypatch):
    monkeypatch.setattr(runtime, 'fast_bf16', lambda device: True)
    with runtime.autocast(CPU, 'auto'):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_an_unknown_precision_is_refused_by_name():
    with pytest.raises(UsageError, match="--amp must be one of auto, none, bf16, fp16, got 'fp8'"):
        resolve_amp('fp8', CPU)
    assert AMP_CHOICES == ('auto', 'none', 'bf16', 'fp16')
