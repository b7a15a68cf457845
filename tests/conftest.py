"""Shared test helpers: the reference fixtures in tests/fixtures/reference, loaded into boatvit models."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
from safetensors.torch import load_file

import boatvit
import boatvit.runtime

# made with the reference code, see tests/fixtures/README.md
FIXTURES = Path(__file__).resolve().parent / 'fixtures' / 'reference'
FIXTURE_NAMES = {'swin': 'boat_swin_w16_224', 'cswin': 'boat_cswin_w16_224'}
CLOSE = dict(rtol=1e-10, atol=1e-10)


@dataclass
class ReferenceFixture:
    name: str
    meta: dict
    tensors: Dict[str, torch.Tensor]

    @property
    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Reference-named weights, float16 storage of exact values."""
        return {k[len('state_dict.') :]: v for k, v in self.tensors.items() if k.startswith('state_dict.')}

    def model_kwargs(self) -> dict:
        """The reference constructor arguments as boatvit constructor arguments."""
        kw = dict(self.meta['constructor_kwargs'])
        for k in ('qk_scale', 'ape', 'patch_norm', 'use_checkpoint'):
            kw.pop(k, None)
        if 'depth' in kw:  # BOAT-CSWin
            kw['depths'] = kw.pop('depth')
            kw.pop('patch_size')
        return kw

    def build(self, **overrides) -> boatvit.models.BoatTransformer:
        """The fixture's model in float64 eval mode with the fixture's weights."""
        cls = boatvit.BoatCSWinTransformer if self.meta['family'] == 'BOAT-CSWin' else boatvit.BoatSwinTransformer
        model = cls(**dict(self.model_kwargs(), **overrides)).double().eval()
        boatvit.load_reference_weights(model, self.state_dict)
        return model

    def summary_pairs(self, name: str, ours: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(ours, expected) pairs that summarise a (B, N, C) output (``name`` is ``'stages.<i>'`` or
        ``'fsla.output'``) as the fixture stores it: its sums over channels and over tokens, and its full rows at the
        sampled tokens."""
        t = self.tensors
        ours = ours.double().cpu()
        return [
            (ours.sum(-1), t[f'{name}.token_sum']),
            (ours.sum(1), t[f'{name}.channel_sum']),
            (ours[:, t[f'{name}.sample_idx']], t[f'{name}.sample']),
        ]

    def assert_matches(self, name: str, ours: torch.Tensor) -> None:
        """Checks a (B, N, C) float64 output against the fixture's summary of it at 1e-10 (see `summary_pairs`)."""
        for actual, expected in self.summary_pairs(name, ours):
            torch.testing.assert_close(actual, expected, **CLOSE)

    def first_fsla_weights(self) -> Dict[str, torch.Tensor]:
        prefix = 'state_dict.' + self.meta['first_fsla']['module'] + '.'
        return {
            k[len(prefix) :].replace('get_v', 'lepe'): v.double()
            for k, v in self.tensors.items()
            if k.startswith(prefix)
        }


def _load(name: str) -> ReferenceFixture:
    return ReferenceFixture(
        name, json.loads((FIXTURES / f'{name}.json').read_text()), load_file(FIXTURES / f'{name}.safetensors')
    )


@pytest.fixture(scope='session', autouse=True)
def cpu_without_bf16_units():
    """Every test runs as on a CPU without bf16 matrix units, whatever this machine has: ``--amp auto`` (the default)
    is float32, so runs compare at float32 tolerances. The tests of 'auto' patch `boatvit.runtime.fast_bf16` again.
    Session-wide, so that module-scoped runs see it too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(boatvit.runtime, 'fast_bf16', lambda device: device.type == 'cuda')
        yield


@pytest.fixture(scope='session')
def swin_fixture() -> ReferenceFixture:
    return _load(FIXTURE_NAMES['swin'])


@pytest.fixture(scope='session')
def cswin_fixture() -> ReferenceFixture:
    return _load(FIXTURE_NAMES['cswin'])


@pytest.fixture(params=['swin', 'cswin'], scope='session')
def reference_fixture(request, swin_fixture, cswin_fixture) -> ReferenceFixture:
    return swin_fixture if request.param == 'swin' else cswin_fixture


@pytest.fixture
def kernels_fail_to_build(monkeypatch) -> None:
    """boatvit's CPU kernels as on a machine without a C++ compiler: nothing loaded yet, and the build fails."""
    import boatvit.kernels as kernels

    def no_compiler():
        raise OSError('no C++ compiler found')

    monkeypatch.setattr(kernels, '_loaded', None)
    monkeypatch.setattr(kernels, '_failure', None)
    monkeypatch.setattr(kernels, '_build', no_compiler)


@pytest.fixture(params=['kernel', 'torch'])
def backend(request) -> str:
    """Runs a test with boatvit's compiled CPU kernels (required: a failed build fails the test) and with the
    PyTorch ops, chosen by the ``backend`` argument."""
    return request.param
