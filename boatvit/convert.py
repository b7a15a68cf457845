"""``boatvit convert``: a released BOAT checkpoint to a safetensors file that timm and every boatvit command load.

Also the step ``predict`` and ``clusters`` share with it, `load_model`: read a checkpoint without running code from
it (`boatvit.safe_load`), find out which registered variant it holds, build that model and load it strictly.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import timm
import torch

from . import __version__
from .checkpoint import convert_state_dict, detect_family, load_reference_weights, select_state_dict
from .cli import UsageError
from .evaluate import build_model, parse_kwarg
from .models.base import BoatTransformer
from .runs import WEIGHTS_SUFFIX, read_weights_metadata, save_weights
from .safe_load import CheckpointFileError, load_checkpoint_file

__all__ = ['LoadedModel', 'infer_variant', 'load_model', 'convert_checkpoint', 'add_model_arguments']

PathLike = Union[str, os.PathLike]


@dataclass
class LoadedModel:
    """A BOAT model with a checkpoint's weights, and where they came from.

    Attributes:
        model: the model, in eval mode, on the CPU.
        name: its registered timm name (``boat_swin_tiny_224``).
        model_kwargs: constructor arguments beyond the variant's own, ``num_classes`` excepted.
        entry: the checkpoint entry the weights came from (``state_dict_ema``, ``state_dict``, ``model``, ``<bare>``).
        metadata: what a boatvit safetensors file records about itself (`boatvit.runs.save_weights`); {} otherwise.
    """

    model: BoatTransformer
    name: str
    model_kwargs: Dict[str, Any]
    entry: str
    metadata: Dict[str, Any]


def _num_classes(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Classifier outputs, from the head under reference (``head.weight``) or boatvit (``head.fc.weight``) names."""
    head = state_dict.get('head.fc.weight', state_dict.get('head.weight'))
    return 0 if head is None else head.shape[0]


def _mismatch(state_dict: Mapping[str, torch.Tensor], model: BoatTransformer) -> Optional[int]:
    """How many tensors fail to fit ``model`` (missing, unexpected or of another shape); None when far off."""
    expected = model.state_dict()
    # the key conversion resizes Swin position tables to the model's window; a matching variant needs no resizing
    tables = [k for k in state_dict if k.endswith('relative_position_bias_table')]
    if any(k not in expected or expected[k].shape != state_dict[k].shape for k in tables):
        return None
    converted = convert_state_dict(state_dict, model)
    wrong_shape = [k for k in expected.keys() & converted.keys() if expected[k].shape != converted[k].shape]
    return len(expected.keys() ^ converted.keys()) + len(wrong_shape)


def infer_variant(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The one registered BOAT model whose tensor names and shapes the state dict matches exactly.

    Args:
        state_dict: reference or boatvit key names.

    Raises:
        UsageError: when no variant, or more than one, matches.
    """
    family = detect_family(state_dict)
    num_classes = _num_classes(state_dict)
    mismatches = {}
    for name in timm.list_models(f'boat_{family}_*'):
        # shapes are all that is compared: on the meta device even the base models build in a fraction of a second
        with torch.device('meta'):
            candidate = timm.create_model(name, num_classes=num_classes)
        mismatches[name] = _mismatch(state_dict, candidate)
    matches = [name for name, count in mismatches.items() if count == 0]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UsageError(f'the checkpoint fits several registered models ({", ".join(matches)}); pass --model NAME')
    near = sorted((count, name) for name, count in mismatches.items() if count is not None)
    closest = f' (closest: {near[0][1]}, {near[0][0]} tensors differ)' if near else ''
    raise UsageError(
        f'no registered BOAT-{family.capitalize()} variant matches the checkpoint{closest}; pass --model NAME, and '
        '--model-kwargs for a non-standard architecture (e.g. embed_dim=32 depths=(2,2,2,2))')


def load_model(
        path: PathLike,
        model: Optional[str] = None,
        model_kwargs: Optional[Mapping[str, Any]] = None,
        use_ema: bool = True,
) -> LoadedModel:
    """Build the BOAT model a checkpoint holds and load its weights strictly.

    Args:
        path: a released BOAT-Swin / BOAT-CSWin checkpoint, a bare state dict, or a boatvit safetensors file.
        model: registered model name; default: the one a boatvit file records, else inferred from the tensors.
        model_kwargs: extra constructor arguments (``embed_dim``, ``depths``, ...); default: those a boatvit file
            records for its own model. ``num_classes`` defaults to the checkpoint's classifier size.
        use_ema: take ``state_dict_ema`` when the checkpoint has it.

    Raises:
        UsageError: naming the file and the problem.
    """
    path = Path(path)
    try:
        checkpoint = load_checkpoint_file(path)
    except CheckpointFileError as e:
        raise UsageError(str(e)) from e  # the message names the file
    try:
        metadata = read_weights_metadata(path) if path.suffix == WEIGHTS_SUFFIX else {}
        entry, state_dict = select_state_dict(checkpoint, use_ema=use_ema)
        name = model or metadata.get('model') or infer_variant(state_dict)
        boat_models = timm.list_models('boat_*')
        if name not in boat_models:
            raise UsageError(f'{name!r} is not a BOAT model; choose one of {", ".join(boat_models)}')
        if model_kwargs is None:
            # what a file records about its model (`boatvit train` also records img_size) applies to that model only
            own = metadata if name == metadata.get('model') else {}
            model_kwargs = dict(own.get('model_kwargs', {}))
            if own.get('img_size'):
                model_kwargs.setdefault('img_size', own['img_size'])
        kwargs = dict(model_kwargs)
        num_classes = kwargs.pop('num_classes', _num_classes(state_dict))
        built = build_model(name, num_classes=num_classes, model_kwargs=kwargs)
        load_reference_weights(built, checkpoint, use_ema=use_ema)
    except (ValueError, UsageError) as e:
        raise UsageError(f'{path}: {e}') from e
    return LoadedModel(built.eval(), name, kwargs, entry, metadata)


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
        source: the checkpoint (see `load_model`).
        out: the ``.safetensors`` file to write; replaced only once it is complete.
        model, model_kwargs, use_ema: see `load_model`.

    Returns:
        The metadata written with the tensors: ``model``, ``model_kwargs``, ``source_file``, ``source_sha256``,
        ``source_entry``, ``ema`` (whether the EMA weights were taken) and ``boatvit_version``.
    """
    source, out = Path(source), Path(out)
    if out.suffix != WEIGHTS_SUFFIX:
        raise UsageError(f'{out}: the output must be a {WEIGHTS_SUFFIX} file (timm picks the format by suffix)')
    if not out.parent.is_dir():
        raise UsageError(f'{out}: the directory {out.parent} does not exist; create it first')
    if out.exists() and source.exists() and out.resolve() == source.resolve():
        raise UsageError(f'{out}: the output would overwrite the checkpoint being converted; pick another name')
    loaded = load_model(source, model, model_kwargs, use_ema)
    metadata = {
        'model': loaded.name,
        'model_kwargs': loaded.model_kwargs,
        'source_file': source.name,
        'source_sha256': _sha256(source),
        'source_entry': loaded.entry,
        'ema': loaded.entry == 'state_dict_ema',
        'boatvit_version': __version__,
    }
    save_weights(out, loaded.model.state_dict(), metadata)
    return metadata


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--model-kwargs`` and ``--ema/--no-ema``, shared by the commands that read checkpoints."""
    parser.add_argument('--model', help='registered BOAT model (boat_swin_tiny_224, ...); default: recorded in the '
                                        'weights, or inferred from their tensor names and shapes')
    parser.add_argument('--model-kwargs', nargs='*', type=parse_kwarg, default=None, metavar='KEY=VALUE',
                        help='extra model constructor arguments, e.g. embed_dim=32 depths=(2,2,2,2)')
    parser.add_argument('--ema', action=argparse.BooleanOptionalAction, default=True,
                        help='take the EMA weights when the checkpoint has them (default: yes)')


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'convert',
        help='convert a released BOAT checkpoint to safetensors',
        description='Read a BOAT-Swin (.pth) or BOAT-CSWin (.pth.tar) checkpoint without running code from it, '
                    'convert its keys, verify them by a strict load into the boatvit model and write safetensors '
                    'with metadata (variant, source file and sha256, EMA or not).',
    )
    parser.add_argument('checkpoint', help='released checkpoint, bare state dict or safetensors file')
    parser.add_argument('out', help='output .safetensors file')
    add_model_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    kwargs = dict(args.model_kwargs) if args.model_kwargs is not None else None
    meta = convert_checkpoint(args.checkpoint, args.out, model=args.model, model_kwargs=kwargs, use_ema=args.ema)
    weights = 'EMA' if meta['ema'] else 'raw'
    print(f"wrote {args.out}: {meta['model']}, {weights} weights from {meta['source_entry']!r} of "
          f"{meta['source_file']} (sha256 {meta['source_sha256'][:12]}...)")
    return 0
