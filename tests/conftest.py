"""Shared test helpers: the reference fixtures in ../shared/fixtures/reference, loaded into boatvit models."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import pytest
import torch
from safetensors.torch import load_file

import boatvit
from boatvit.kernels import KERNEL_ENV

# ../shared sits beside the checkout, here and in CI
FIXTURES = Path(__file__).resolve().parents[2] / 'shared' / 'fixtures' / 'reference'


@dataclass
class ReferenceFixture:
    name: str
    meta: dict
    tensors: Dict[str, torch.Tensor]

    @property
    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Reference-named weights, float16 storage of exact values."""
        return {k[len('state_dict.'):]: v for k, v in self.tensors.items() if k.startswith('state_dict.')}

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

    def first_fsla_weights(self) -> Dict[str, torch.Tensor]:
        prefix = 'state_dict.' + self.meta['first_fsla']['module'] + '.'
        return {k[len(prefix):].replace('get_v', 'lepe'): v.double() for k, v in self.tensors.items()
                if k.startswith(prefix)}


def _load(name: str) -> ReferenceFixture:
    if not FIXTURES.is_dir():
        pytest.fail(f'reference fixtures not found at {FIXTURES}; ../shared must sit beside the checkout')
    return ReferenceFixture(name, json.loads((FIXTURES / f'{name}.json').read_text()),
                            load_file(FIXTURES / f'{name}.safetensors'))


@pytest.fixture(scope='session')
def swin_fixture() -> ReferenceFixture:
    return _load('boat_swin_w32_224')


@pytest.fixture(scope='session')
def cswin_fixture() -> ReferenceFixture:
    return _load('boat_cswin_w32_224')


@pytest.fixture(params=['swin', 'cswin'], scope='session')
def reference_fixture(request, swin_fixture, cswin_fixture) -> ReferenceFixture:
    return swin_fixture if request.param == 'swin' else cswin_fixture


@pytest.fixture(params=['kernel', 'eager'])
def clustering_route(request, monkeypatch) -> str:
    """Runs a test once with the compiled CPU clustering kernel (required: a failed build fails the test) and once
    with the eager PyTorch clustering."""
    monkeypatch.setenv(KERNEL_ENV, 'on' if request.param == 'kernel' else 'off')
    return request.param
