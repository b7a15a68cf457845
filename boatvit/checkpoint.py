"""Model-agnostic checkpoint handling: pick the weights out of a training checkpoint, tell the family from key
names, describe why a state dict does not fit a model, and load one strictly through a family's key filter.

Nothing here imports the models: `boatvit.weights` (which knows the families) and each model's
``load_pretrained`` pass the family's ``checkpoint_filter_fn`` in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from .safe_load import load_checkpoint_file

__all__ = ['LoadResult', 'select_state_dict', 'detect_family', 'state_dict_mismatch', 'load_filtered']

FAMILY_NAMES = {'swin': 'BOAT-Swin', 'cswin': 'BOAT-CSWin'}
# where each training script keeps the weights, in order of preference (EMA first: the released CSWin accuracies
# are EMA weights)
_ENTRIES = ('state_dict_ema', 'state_dict', 'model')
_PREFIXES = ('module.', '_orig_mod.')
# both families end in timm's ClassifierHead
_CLASSIFIER = 'head.fc.'
#: a family's key filter: ``(state dict, model) -> state dict in the model's names`` (``checkpoint_filter_fn``)
FilterFn = Callable[[Dict[str, torch.Tensor], nn.Module], Dict[str, torch.Tensor]]


@dataclass(frozen=True)
class LoadResult:
    """What a strict load (`load_filtered`, `boatvit.load_reference_weights`) loaded: the checkpoint entry
    (``'state_dict_ema'``, ``'state_dict'``, ``'model'`` or ``'<bare>'``), the model family it was mapped from, and
    how many tensors were loaded."""

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
            + f'; top-level keys are {sorted(checkpoint)[:10]}.'
        )
    out = {}
    for k, v in weights.items():
        for prefix in _PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return entry, out


def detect_family(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``'swin'`` or ``'cswin'`` from the key names (reference or boatvit naming)."""
    keys = list(state_dict)
    if any(k.startswith(('stage1_conv_embed.', 'stage1.', 'merge1.')) or '.attn.lepe.' in k for k in keys):
        return 'cswin'
    if any('relative_position_bias_table' in k for k in keys):
        return 'swin'
    raise ValueError(
        'cannot tell the model family from the checkpoint keys: it has neither BOAT-Swin keys '
        '(relative_position_bias_table) nor BOAT-CSWin keys (stage1..., attn.lepe); '
        f'first keys: {keys[:5]}.'
    )


def state_dict_mismatch(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    source: str = 'checkpoint',
    examples: Optional[int] = None,
) -> List[str]:
    """What keeps ``state`` from loading strictly into a module whose state dict is ``expected``: one line each for
    missing keys, unexpected keys and tensors of another shape, naming ``examples`` of each (all when None); empty
    when it fits."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f'{k}: {source} {tuple(state[k].shape)} vs model {tuple(v.shape)}'
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    # load_state_dict would copy integers or booleans into float weights without a word: such a file is not weights
    kinds = [
        f'{k}: {source} {state[k].dtype} vs model {v.dtype}'
        for k, v in expected.items()
        if k in state
        and (state[k].is_floating_point(), state[k].dtype == torch.bool)
        != (v.is_floating_point(), v.dtype == torch.bool)
    ]
    lines = []
    for keys, what in (
        (missing, f'missing (in the model, not in the {source})'),
        (unexpected, f'unexpected (in the {source}, not in the model)'),
        (shapes, 'with another shape'),
        (kinds, 'with another kind of number (integer or boolean against floating point)'),
    ):
        if keys:
            lines.append(f'{len(keys)} {what}: {keys[:examples] if examples else keys}')
    return lines


def _strict_check(converted: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    lines = state_dict_mismatch(converted, expected)
    if lines:
        raise ValueError(
            'the checkpoint does not match the model; nothing was loaded.\n'
            + '\n'.join(lines)
            + '\nCheck that the model variant and its arguments (num_classes, depths, embed_dim; --model and '
            '--model-kwargs on the command line) match the checkpoint.'
        )


def load_filtered(
    model: nn.Module,
    checkpoint: Union[str, os.PathLike, Mapping[str, Any]],
    family: str,
    filter_fn: FilterFn,
    use_ema: bool = True,
    load_classifier: bool = True,
) -> LoadResult:
    """Load a checkpoint of ``family`` into ``model`` through ``filter_fn``; every tensor is filled, or none is.

    Args:
        model: the model (of ``family``).
        checkpoint: a path (read with `boatvit.safe_load.load_checkpoint_file`) or an already loaded dict.
        family: ``'swin'`` or ``'cswin'``; a checkpoint of the other family is refused by name.
        filter_fn: the family's ``checkpoint_filter_fn`` (reference or boatvit keys to the model's).
        use_ema: prefer ``state_dict_ema`` when present.
        load_classifier: False keeps the model's own classifier (``head.fc``), to fine-tune to other classes.

    Raises:
        ValueError: the checkpoint does not fit the model (beginning with the file name when given a path).
    """
    source = None
    if isinstance(checkpoint, (str, os.PathLike)):
        source = os.fspath(checkpoint)
        checkpoint = load_checkpoint_file(source)  # its errors name the file
    expected = model.state_dict()
    try:
        entry, state_dict = select_state_dict(checkpoint, use_ema=use_ema)
        found = detect_family(state_dict)
        if found != family:
            raise ValueError(
                f'the checkpoint holds {FAMILY_NAMES[found]} weights but the model is '
                f'{FAMILY_NAMES[family]}; create a boat_{found}_* model instead.'
            )
        converted = filter_fn(dict(state_dict), model)
        if not load_classifier:
            converted = {k: v for k, v in converted.items() if not k.startswith(_CLASSIFIER)}
            expected = {k: v for k, v in expected.items() if not k.startswith(_CLASSIFIER)}
        _strict_check(converted, expected)
    except ValueError as e:
        if source is None:
            raise
        raise ValueError(f'{source}: {e}') from e
    model.load_state_dict(converted, strict=load_classifier)
    return LoadResult(entry=entry, family=family, num_tensors=len(converted))
