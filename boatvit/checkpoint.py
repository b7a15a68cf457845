"""Load reference BOAT checkpoints (either released format, or a bare state dict) into boatvit models, strictly."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from .models import boat_cswin, boat_swin
from .models.base import BoatTransformer
from .safe_load import load_checkpoint_file

__all__ = ['LoadResult', 'select_state_dict', 'detect_family', 'convert_state_dict', 'load_reference_weights']

_FILTERS = {'swin': boat_swin.checkpoint_filter_fn, 'cswin': boat_cswin.checkpoint_filter_fn}
_FAMILY_NAMES = {'swin': 'BOAT-Swin', 'cswin': 'BOAT-CSWin'}
# where each training script keeps the weights, in order of preference (EMA first: the released CSWin accuracies
# are EMA weights)
_ENTRIES = ('state_dict_ema', 'state_dict', 'model')
_PREFIXES = ('module.', '_orig_mod.')
# both families end in timm's ClassifierHead
_CLASSIFIER = 'head.fc.'


@dataclass(frozen=True)
class LoadResult:
    """What :func:`load_reference_weights` loaded: the checkpoint entry (``'state_dict_ema'``, ``'state_dict'``,
    ``'model'`` or ``'<bare>'``), the model family it was mapped from, and how many tensors were loaded."""

    entry: str
    family: str
    num_tensors: int


def select_state_dict(checkpoint: Mapping[str, Any], use_ema: bool = True) -> Tuple[str, Dict[str, torch.Tensor]]:
    """Pick the weights out of a training checkpoint and strip wrapper prefixes (``module.``, ``_orig_mod.``).

    Preference: ``state_dict_ema`` (unless ``use_ema`` is False), ``state_dict``, ``model``, then the dict itself.

    Returns:
        ``(entry name, state dict)``.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f'expected a checkpoint dict or a state dict, got {type(checkpoint).__name__}.')
    entry, weights = '<bare>', checkpoint
    for name in _ENTRIES:
        if name == 'state_dict_ema' and not use_ema:
            continue
        if isinstance(checkpoint.get(name), Mapping):
            entry, weights = name, checkpoint[name]
            break
    bad = [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if not weights or bad:
        raise ValueError(
            f'the checkpoint entry {entry!r} is not a state dict of tensors'
            + (f' (non-tensor values under {bad[:5]})' if bad else ' (it is empty)')
            + f'; top-level keys are {sorted(checkpoint)[:10]}.')
    out = {}
    for k, v in weights.items():
        for prefix in _PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return entry, out


def detect_family(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``'swin'`` or ``'cswin'`` from the key names (reference or boatvit naming)."""
    keys = list(state_dict)
    if any(k.startswith(('stage1_conv_embed.', 'stage1.', 'merge1.')) or '.attn.lepe.' in k for k in keys):
        return 'cswin'
    if any('relative_position_bias_table' in k for k in keys):
        return 'swin'
    raise ValueError('cannot tell the model family from the checkpoint keys: it has neither BOAT-Swin keys '
                     '(relative_position_bias_table) nor BOAT-CSWin keys (stage1..., attn.lepe); '
                     f'first keys: {keys[:5]}.')


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], model: BoatTransformer) -> Dict[str, torch.Tensor]:
    """Reference (or boatvit) keys to the model's, refusing a checkpoint of the other family."""
    family = detect_family(state_dict)
    if family != model.family:
        raise ValueError(f'the checkpoint holds {_FAMILY_NAMES[family]} weights but the model is '
                         f'{_FAMILY_NAMES[model.family]}; create a boat_{family}_* model instead.')
    return _FILTERS[family](dict(state_dict), model)


def state_dict_mismatch(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                        source: str = 'checkpoint', examples: Optional[int] = None) -> List[str]:
    """What keeps ``state`` from loading strictly into a module whose state dict is ``expected``: one line each for
    missing keys, unexpected keys and tensors of another shape, naming ``examples`` of each (all when None); empty
    when it fits."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f'{k}: {source} {tuple(state[k].shape)} vs model {tuple(v.shape)}'
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    lines = []
    for keys, what in ((missing, f'missing (in the model, not in the {source})'),
                       (unexpected, f'unexpected (in the {source}, not in the model)'),
                       (shapes, 'with another shape')):
        if keys:
            lines.append(f'{len(keys)} {what}: {keys[:examples] if examples else keys}')
    return lines


def _strict_check(converted: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    lines = state_dict_mismatch(converted, expected)
    if lines:
        raise ValueError('the checkpoint does not match the model; nothing was loaded.\n' + '\n'.join(lines)
                         + '\nCheck that the model variant (and num_classes, depths, embed_dim) matches the '
                         'checkpoint.')


def load_reference_weights(
        model: BoatTransformer,
        checkpoint: Union[str, os.PathLike, Mapping[str, Any]],
        use_ema: bool = True,
        load_classifier: bool = True,
) -> LoadResult:
    """Load a reference BOAT checkpoint into a boatvit model; every model tensor must be filled, or nothing is.

    Args:
        model: a :class:`~boatvit.BoatSwinTransformer` or :class:`~boatvit.BoatCSWinTransformer`.
        checkpoint: a path, or an already loaded dict: a BOAT-Swin training dict (``{'model': ...}``), a BOAT-CSWin
            one (``{'state_dict': ..., 'state_dict_ema': ...}``) or a bare state dict, with reference or boatvit
            key names. Swin ``attn_mask`` / ``relative_position_index`` buffers may be present or not.
        use_ema: prefer ``state_dict_ema`` when present.
        load_classifier: False keeps the model's own classifier (``head.fc``) and ignores the checkpoint's, to
            fine-tune to another number of classes (what timm does when ``num_classes`` differs from the weights').

    Returns:
        :class:`LoadResult`.

    Raises:
        ValueError: the checkpoint does not fit the model (beginning with the file name when given a path).
    """
    if not isinstance(model, BoatTransformer):
        raise TypeError(f'model must be a boatvit BOAT model, got {type(model).__name__}.')
    source = None
    if isinstance(checkpoint, (str, os.PathLike)):
        source = os.fspath(checkpoint)
        checkpoint = load_checkpoint_file(source)  # its errors name the file
    expected = model.state_dict()
    try:
        entry, state_dict = select_state_dict(checkpoint, use_ema=use_ema)
        converted = convert_state_dict(state_dict, model)
        if not load_classifier:
            converted = {k: v for k, v in converted.items() if not k.startswith(_CLASSIFIER)}
            expected = {k: v for k, v in expected.items() if not k.startswith(_CLASSIFIER)}
        _strict_check(converted, expected)
    except ValueError as e:
        if source is None:
            raise
        raise ValueError(f'{source}: {e}') from e
    model.load_state_dict(converted, strict=load_classifier)
    return LoadResult(entry=entry, family=model.family, num_tensors=len(converted))
