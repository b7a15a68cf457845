"""Checkpoints in exactly the two reference training formats (the released `tiny.pth` and `cswin_tiny.pth.tar`), built
in tests.

The released files cannot be downloaded here, so these stand in for them: the same top-level entries, a config
object pickled from a module that is gone when the file is read (yacs is not installed), DDP prefixes, and an EMA
entry that differs from the raw weights.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Mapping

import torch

CFGNODE_SOURCE = '''
class CfgNode(dict):
    """Like yacs.config.CfgNode: a dict subclass with attributes in its __dict__."""

    def __init__(self, init=None):
        super().__init__(init or {})
        self.__dict__['__immutable__'] = True
'''


def save_with_foreign_module(
    tmp_path: Path, path: Path, source: str, build: Callable[[Any], Any], **save_kwargs: Any
) -> str:
    """``torch.save(build(module), path)`` where ``module`` is a throw-away module made from ``source``; the module
    is gone from disk, ``sys.path`` and ``sys.modules`` afterwards, as on a machine without yacs. Returns its name."""
    name = f'foreign_{uuid.uuid4().hex[:8]}'
    folder = tmp_path / f'{name}_src'
    folder.mkdir()
    (folder / f'{name}.py').write_text(source)
    sys.path.insert(0, str(folder))
    try:
        torch.save(build(importlib.import_module(name)), path, **save_kwargs)
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(name, None)
        (folder / f'{name}.py').unlink()
    return name


def _optimizer_state() -> Dict[str, Any]:
    params = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    return optimizer.state_dict()


def save_swin_checkpoint(
    tmp_path: Path, path: Path, weights: Mapping[str, torch.Tensor], attn_masks: Mapping[str, Any]
) -> None:
    """A BOAT-Swin ``utils.save_checkpoint`` file: ``model`` (with the ``attn_mask`` buffers of the shifted blocks,
    shapes from ``attn_masks``), optimizer, scheduler, accuracy, epoch and a yacs-like ``config``."""
    model = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    model.update({k: torch.zeros(shape) for k, shape in attn_masks.items()})

    def build(yacs):
        config = yacs.CfgNode({'MODEL': yacs.CfgNode({'TYPE': 'swin', 'DROP_PATH_RATE': 0.2}), 'AMP_OPT_LEVEL': 'O0'})
        return {
            'model': model,
            'optimizer': _optimizer_state(),
            'max_accuracy': 81.2,
            'epoch': 299,
            'config': config,
            'lr_scheduler': {'t_initial': 300, 'base_values': [1e-3]},
        }

    save_with_foreign_module(tmp_path, path, CFGNODE_SOURCE, build)


def save_cswin_checkpoint(path: Path, ema: Mapping[str, torch.Tensor], raw: Mapping[str, torch.Tensor]) -> None:
    """A BOAT-CSWin ``CheckpointSaver`` file, both weight entries DDP-prefixed (``module.``)."""
    args = argparse.Namespace(model='CSWin_64_12211_tiny_224', lr=2e-3, model_ema=True, model_ema_decay=0.99984)
    torch.save(
        {
            'epoch': 299,
            'arch': args.model,
            'state_dict': {f'module.{k}': v.float() for k, v in raw.items()},
            'optimizer': _optimizer_state(),
            'version': 2,
            'args': args,
            'amp_scaler': {
                'scale': 65536.0,
                'growth_factor': 2.0,
                'backoff_factor': 0.5,
                'growth_interval': 2000,
                '_growth_tracker': 17,
            },
            'state_dict_ema': {f'module.{k}': v.float() for k, v in ema.items()},
            'metric': 82.1,
        },
        path,
    )
