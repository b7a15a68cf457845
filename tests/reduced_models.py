"""The reduced BOAT models the tests build: each family's full structure (four stages, shifted Swin windows, CSWin
stripes, FSLA where the released models have it, several clusters in stage 1) at a sixth of the width and a fraction
of the depth. One table for every test file; a test that needs less (fewer blocks to compile, say) overrides a field
and says why."""

from __future__ import annotations

from typing import Any, Dict

import timm
import torch

import boatvit  # noqa: F401  (registers the models)

# the timm name each family's reduced model is built from
FAMILIES = {'swin': 'boat_swin_tiny_224', 'cswin': 'boat_cswin_tiny_224'}
# constructor arguments over the tiny model's: BOAT-Swin keeps two blocks per stage (FSLA sits in the second, shifted,
# block of stages 1-3); BOAT-CSWin gets FSLA in the first block of every stage
REDUCED = {
    'swin': dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)),
    'cswin': dict(embed_dim=16, depths=(1, 2, 1, 1), num_heads=(2, 2, 4, 4)),
}
NUM_CLASSES = 5


def family_of(name: str) -> str:
    """'swin' or 'cswin' for a family key or a timm name."""
    return name if name in REDUCED else next(f for f, n in FAMILIES.items() if n == name)


def reduced_kwargs(family: str, **overrides: Any) -> Dict[str, Any]:
    """The reduced model's constructor arguments (``family`` a key of `FAMILIES` or its timm name), ``overrides`` on
    top."""
    return dict(REDUCED[family_of(family)], **overrides)


def reduced(family: str, **overrides: Any) -> torch.nn.Module:
    """The reduced model of ``family`` from ``timm.create_model``, ``NUM_CLASSES`` classes, in eval mode."""
    kwargs = reduced_kwargs(family, **dict(dict(num_classes=NUM_CLASSES), **overrides))
    return timm.create_model(FAMILIES[family_of(family)], **kwargs).eval()
