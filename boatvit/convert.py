"""A BOAT checkpoint to a safetensors file that timm and every boatvit command load (``boatvit convert``).

The checkpoint is read without running code from it and loaded strictly into the variant it holds
(`boatvit.weights.load_model`); the output records where it came from.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from .version import __version__
from .errors import UsageError
from .runs import WEIGHTS_SUFFIX, save_weights
from .weights import load_model, read_weights

__all__ = ['convert_checkpoint']

PathLike = Union[str, os.PathLike]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open('rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def convert_checkpoint(
    source: PathLike,
    out: PathLike,
    model: Optional[str] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    use_ema: bool = True,
) -> Dict[str, Any]:
    """Convert a checkpoint to boatvit safetensors, verified by a strict load, written atomically.

    Args:
        source: the checkpoint (anything `boatvit.weights.read_weights` reads).
        out: the ``.safetensors`` file to write; replaced only once it is complete.
        model, model_kwargs, use_ema: see `boatvit.weights.load_model`.

    Returns:
        The metadata written with the tensors: ``model``, ``model_kwargs``, ``source_file``, ``source_sha256``,
        ``source_entry``, ``ema`` (whether the EMA weights were taken) and ``boatvit_version``.
    """
    out = Path(out)
    if out.suffix != WEIGHTS_SUFFIX:
        raise UsageError(f'{out}: the output must be a {WEIGHTS_SUFFIX} file (timm picks the format by suffix)')
    if not out.parent.is_dir():
        raise UsageError(f'{out}: the directory {out.parent} does not exist; create it first')
    weights = read_weights(source, use_ema=use_ema)
    if out.exists() and out.resolve() == weights.path.resolve():
        raise UsageError(f'{out}: the output would overwrite the checkpoint being converted; pick another name')
    loaded = load_model(weights, model, model_kwargs)
    metadata = {
        'model': loaded.name,
        'model_kwargs': loaded.model_kwargs,
        'source_file': weights.path.name,
        'source_sha256': _sha256(weights.path),
        'source_entry': loaded.entry,
        'ema': loaded.entry == 'state_dict_ema',
        'boatvit_version': __version__,
    }
    save_weights(out, loaded.model.state_dict(), metadata)
    return metadata
