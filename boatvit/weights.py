"""One way in for weights: read any weight source once, validate what it says about itself, build the model.

Sources (told from the file's first bytes, not its name; `boatvit.safe_load` reads them without running code):

* a released BOAT-Swin ``.pth`` or BOAT-CSWin ``.pth.tar`` (EMA weights preferred unless ``use_ema=False``),
  or a bare / timm-format state dict saved with ``torch.save``;
* a ``.safetensors`` file, with the metadata `boatvit convert` and `boatvit train` record;
* a `boatvit train` run directory: its ``best.safetensors``.

A file's metadata is data from outside: :func:`validate_metadata` keeps only known keys whose values have the right
type and range, and the model is built only from a registered BOAT name and architecture arguments, never loader
arguments (``pretrained``, ``pretrained_cfg_overlay``, ``checkpoint_path``, ...).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import timm
import torch

from .checkpoint import FAMILY_NAMES, LoadResult, detect_family, load_filtered, select_state_dict
from .errors import UsageError, WeightsMetadataError
from .models import boat_cswin, boat_swin
from .models.base import BoatTransformer
from .runs import CONFIG_FILE, WEIGHTS_SUFFIX
from .safe_load import file_kind, read_checkpoint_file

__all__ = [
    'Weights',
    'LoadedModel',
    'read_weights',
    'validate_metadata',
    'check_boat_name',
    'build_model',
    'infer_variant',
    'convert_state_dict',
    'load_reference_weights',
    'resolve_model',
    'load_model',
    'input_size_kwargs',
    'check_backbone',
    'load_backbone',
]

PathLike = Union[str, os.PathLike]

_FILTERS = {'swin': boat_swin.checkpoint_filter_fn, 'cswin': boat_cswin.checkpoint_filter_fn}
#: the file a run directory stands for
BEST_WEIGHTS = 'best' + WEIGHTS_SUFFIX
# bounds on what a file may ask for: far above every registered model, far below what would exhaust memory
MAX_IMG_SIZE = 4096
MAX_WIDTH = 8192
MAX_CLASSES = 1_000_000
_INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos', 'random')
_CROP_MODES = ('center', 'squash', 'border')


# --- metadata validation -----------------------------------------------------------------------------------------


def _int(lo: int, hi: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _float(lo: float, hi: float) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi


def _ints(lo: int, hi: int, max_len: int = 8) -> Callable[[Any], bool]:
    one = _int(lo, hi)
    return lambda v: isinstance(v, (list, tuple)) and 0 < len(v) <= max_len and all(map(one, v))


def _int_or_ints(lo: int, hi: int, max_len: int = 8) -> Callable[[Any], bool]:
    one, many = _int(lo, hi), _ints(lo, hi, max_len)
    return lambda v: one(v) or many(v)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _str(v: Any) -> bool:
    return isinstance(v, str) and len(v) <= 4096


def _window(v: Any) -> bool:
    # an int, (h, w), or one of those per stage
    return _int_or_ints(1, 256)(v) or (
        isinstance(v, (list, tuple)) and 0 < len(v) <= 8 and all(_int_or_ints(1, 256, 2)(w) for w in v)
    )


#: architecture arguments a file may record, with their checks (type and range); nothing else reaches the model
MODEL_KWARGS: Dict[str, Callable[[Any], bool]] = {
    'img_size': _int_or_ints(1, MAX_IMG_SIZE, 2),
    'patch_size': _int(1, 64),
    'in_chans': _int(1, 64),
    'num_classes': _int(0, MAX_CLASSES),
    'global_pool': lambda v: v in ('avg', ''),
    'embed_dim': _int(1, MAX_WIDTH),
    'depths': _ints(1, 64),
    'num_heads': _ints(1, 256),
    'window_size': _window,
    'split_size': _ints(1, 256),
    'mlp_ratio': _float(0.0, 64.0),
    'qkv_bias': lambda v: isinstance(v, bool),
    'drop_rate': _float(0.0, 1.0),
    'proj_drop_rate': _float(0.0, 1.0),
    'attn_drop_rate': _float(0.0, 1.0),
    'drop_path_rate': _float(0.0, 1.0),
    'dynamic_img_size': lambda v: isinstance(v, bool),
    'stem': lambda v: v in ('patch', 'conv'),
    'fsla_blocks': _str,
    'fsla_drop_path': lambda v: isinstance(v, bool),
    'fsla_scale': _optional(_float(0.0, 1e6)),
    'fsla_cluster_size': _int(1, 65536),
    'fsla_overlap': _int(0, 65536),
}


def _data_config(v: Any) -> bool:
    if not isinstance(v, dict) or not set(v) <= {'input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode'}:
        return False
    size = v.get('input_size')
    channels = size[0] if _ints(1, MAX_IMG_SIZE, 3)(size) and len(size) == 3 and size[0] <= 64 else None
    norm = [v.get(k) for k in ('mean', 'std')]
    return (
        channels is not None
        and v.get('interpolation', 'bicubic') in _INTERPOLATIONS
        and all(isinstance(n, (list, tuple)) and len(n) == channels and all(map(_float(-1e3, 1e3), n)) for n in norm)
        and _float(1e-3, 10.0)(v.get('crop_pct', 1.0))
        and v.get('crop_mode', 'center') in _CROP_MODES
    )


#: metadata keys a weights file may carry (`boatvit convert`, `boatvit train`), with their checks
METADATA: Dict[str, Callable[[Any], bool]] = {
    'model': _str,  # and a registered BOAT name: checked by check_boat_name
    'model_kwargs': lambda v: isinstance(v, dict),  # and MODEL_KWARGS: checked key by key
    'img_size': _optional(_int_or_ints(1, MAX_IMG_SIZE, 2)),
    'classes': lambda v: isinstance(v, list) and len(v) <= MAX_CLASSES and all(map(_str, v)),
    'data': _optional(_str),
    'dataset': _str,
    'data_config': _data_config,
    'weights': lambda v: v in ('ema', 'model'),
    'epoch': _int(0, 10**9),
    'top1': _float(0.0, 100.0),
    'source_file': _str,
    'source_sha256': lambda v: isinstance(v, str) and len(v) == 64 and all(c in '0123456789abcdef' for c in v),
    'source_entry': _str,
    'ema': lambda v: isinstance(v, bool),
    'boatvit_version': _str,
}


def _bad(path: Any, what: str) -> WeightsMetadataError:
    return WeightsMetadataError(
        f'{path}: refused: its metadata {what}. Metadata is data: boatvit accepts only the keys `boatvit convert` '
        'and `boatvit train` write, with values of the right type and range; re-create the file with '
        '`boatvit convert`, or pass --model and --model-kwargs yourself.'
    )


def validate_metadata(raw: Mapping[str, str], path: Any = 'weights') -> Dict[str, Any]:
    """The known, well-formed entries of a safetensors header's metadata, JSON-decoded.

    Keys other writers add (``format``, ...) are dropped. A known key whose value is not JSON, has the wrong type or
    lies out of range, a model that is not a registered BOAT name, and model arguments outside :data:`MODEL_KWARGS`
    (loader arguments like ``pretrained`` or ``pretrained_cfg_overlay`` above all) refuse the whole file.

    Raises:
        WeightsMetadataError: naming the file, the key and the value.
    """
    out = {}
    for key, text in raw.items():
        if key not in METADATA:
            continue
        try:
            value = json.loads(text)
        except (TypeError, json.JSONDecodeError):
            raise _bad(path, f'{key!r} is not JSON ({str(text)[:80]!r})') from None
        if not METADATA[key](value):
            raise _bad(path, f'{key!r} has an invalid value ({json.dumps(value)[:80]})')
        out[key] = value
    if 'model' in out:
        try:
            check_boat_name(out['model'])
        except UsageError:
            raise _bad(path, f'names {out["model"][:80]!r}, which is not a registered BOAT model') from None
    for key, value in out.get('model_kwargs', {}).items():
        if key not in MODEL_KWARGS:
            raise _bad(path, f'passes the model argument {key!r}, which is not an architecture argument')
        if not MODEL_KWARGS[key](value):
            raise _bad(path, f'passes model argument {key}={json.dumps(value)[:80]}, of the wrong type or range')
    if 'data_config' in out:
        # JSON has no tuples; timm's transforms expect them
        out['data_config'] = {k: tuple(v) if isinstance(v, list) else v for k, v in out['data_config'].items()}
    return out


# --- reading ----------------------------------------------------------------------------------------------------


@dataclass
class Weights:
    """A weight source, read once.

    Attributes:
        path: the file read (``best.safetensors`` of a run directory).
        kind: ``'safetensors'``, ``'run'`` (a run directory's best weights) or ``'checkpoint'`` (a torch file).
        entry: the checkpoint entry taken (``state_dict_ema``, ``state_dict``, ``model`` or ``<bare>``).
        state_dict: the tensors, wrapper prefixes stripped, reference or boatvit key names.
        metadata: validated metadata (:func:`validate_metadata`); {} for torch files.
    """

    path: Path
    kind: str
    entry: str
    state_dict: Dict[str, torch.Tensor]
    metadata: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Classifier outputs, from the head under reference (``head.weight``) or boatvit (``head.fc.weight``)
        names; 0 without a head."""
        head = self.state_dict.get('head.fc.weight', self.state_dict.get('head.weight'))
        return 0 if head is None else head.shape[0]


def read_weights(source: PathLike, use_ema: bool = True) -> Weights:
    """Read a weight source once: file or run directory, any format of the module docstring.

    Raises:
        CheckpointFileError: missing, unreadable, corrupt, not a checkpoint, a TorchScript archive or a pickle that
            runs code (the message names the file).
        WeightsMetadataError: the metadata has values of the wrong type or range, or loader arguments.
    """
    path, kind = Path(source), None
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file() or not (path / BEST_WEIGHTS).is_file():
            raise UsageError(
                f'{path}: not a finished run directory (no {CONFIG_FILE} and {BEST_WEIGHTS}); pass a '
                'weights file, or the directory `boatvit train` wrote once an epoch has finished'
            )
        path, kind = path / BEST_WEIGHTS, 'run'
    checkpoint, raw_metadata = read_checkpoint_file(path)
    metadata = validate_metadata(raw_metadata, path)
    try:
        entry, state_dict = select_state_dict(checkpoint, use_ema=use_ema)
    except ValueError as e:
        raise UsageError(f'{path}: {e}') from e
    kind = kind or ('safetensors' if file_kind(path) == 'safetensors' else 'checkpoint')
    return Weights(path, kind, entry, state_dict, metadata)


# --- building ---------------------------------------------------------------------------------------------------


def check_boat_name(name: str) -> str:
    """``name`` when it is a registered BOAT model, else a `UsageError` listing them (and close matches)."""
    boat_models = timm.list_models('boat_*')
    if name not in boat_models:
        close = difflib.get_close_matches(str(name), boat_models, n=3, cutoff=0.5)
        hint = f'did you mean {", ".join(close)}? ' if close else ''
        raise UsageError(f'{name!r} is not a BOAT model; {hint}choose one of {", ".join(boat_models)}')
    return name


def build_model(
    name: str,
    num_classes: int,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """``timm.create_model`` with errors a user can act on; never with loader arguments.

    Args:
        name: a registered timm model name (any timm model: training may use one; loading weights takes BOAT only).
        num_classes: classifier outputs.
        model_kwargs: extra constructor arguments (``embed_dim``, ...), as given with ``--model-kwargs``.
        **kwargs: further constructor arguments set by the program (``drop_path_rate``, ``img_size``); None values
            are left out so the model's defaults apply.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.5)
        hint = f'did you mean {", ".join(close)}? ' if close else ''
        raise UsageError(f'unknown model {name!r}; {hint}the BOAT models are {", ".join(timm.list_models("boat*"))}')
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kwargs.update(model_kwargs or {})
    loader_args = sorted(k for k in kwargs if k == 'pretrained' or k.startswith(('pretrained_cfg', 'checkpoint')))
    if loader_args:
        raise UsageError(
            f'{", ".join(loader_args)} is a loader argument, not a model argument; pass the weights '
            'with --weights (boatvit.load_model in Python) instead'
        )
    try:
        return timm.create_model(name, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise UsageError(f'model {name!r} does not take the arguments {sorted(kwargs)}: {e}') from e
    except ValueError as e:  # the model's own argument checks (an image size below its total stride, ...)
        raise UsageError(f'cannot build {name}: {e}') from e


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], model: BoatTransformer) -> Dict[str, torch.Tensor]:
    """Reference (or boatvit) keys to the model's, refusing a checkpoint of the other family."""
    family = detect_family(state_dict)
    if family != model.family:
        raise ValueError(
            f'the checkpoint holds {FAMILY_NAMES[family]} weights but the model is '
            f'{FAMILY_NAMES[model.family]}; create a boat_{family}_* model instead.'
        )
    return _FILTERS[family](dict(state_dict), model)


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


def infer_variant(weights: Weights) -> str:
    """The one registered BOAT model whose tensor names and shapes the weights match exactly.

    Raises:
        UsageError: when no variant, or more than one, matches.
    """
    family = detect_family(weights.state_dict)
    mismatches = {}
    for name in timm.list_models(f'boat_{family}_*'):
        # shapes are all that is compared: on the meta device even the base models build in a fraction of a second
        with torch.device('meta'):
            candidate = timm.create_model(name, num_classes=weights.num_classes)
        mismatches[name] = _mismatch(weights.state_dict, candidate)
    matches = [name for name, count in mismatches.items() if count == 0]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UsageError(f'the checkpoint fits several registered models ({", ".join(matches)}); pass --model NAME')
    near = sorted((count, name) for name, count in mismatches.items() if count is not None)
    closest = f' (closest: {near[0][1]}, {near[0][0]} tensors differ)' if near else ''
    raise UsageError(
        f'no registered {FAMILY_NAMES[family]} variant matches the checkpoint{closest}; pass --model NAME, and '
        '--model-kwargs for a non-standard architecture (e.g. embed_dim=32 depths=(2,2,2,2))'
    )


def load_reference_weights(
    model: BoatTransformer,
    checkpoint: Union[PathLike, Mapping[str, Any], Weights],
    use_ema: bool = True,
    load_classifier: bool = True,
) -> LoadResult:
    """Load a BOAT checkpoint into a boatvit model; every model tensor must be filled, or nothing is.

    Args:
        model: a :class:`~boatvit.BoatSwinTransformer` or :class:`~boatvit.BoatCSWinTransformer`.
        checkpoint: a path, an already loaded dict (a BOAT-Swin training dict ``{'model': ...}``, a BOAT-CSWin one
            ``{'state_dict': ..., 'state_dict_ema': ...}`` or a bare state dict, with reference or boatvit key
            names), or :class:`Weights` from :func:`read_weights`. Swin ``attn_mask`` / ``relative_position_index``
            buffers may be present or not.
        use_ema: prefer ``state_dict_ema`` when present.
        load_classifier: False keeps the model's own classifier (``head.fc``) and ignores the checkpoint's, to
            fine-tune to another number of classes (what timm does when ``num_classes`` differs from the weights').

    Returns:
        :class:`~boatvit.checkpoint.LoadResult`.

    Raises:
        ValueError: the checkpoint does not fit the model (beginning with the file name when given a path).
    """
    if not isinstance(model, BoatTransformer):
        raise TypeError(f'model must be a boatvit BOAT model, got {type(model).__name__}.')
    if isinstance(checkpoint, Weights):
        try:
            result = load_filtered(
                model, checkpoint.state_dict, model.family, _FILTERS[model.family], load_classifier=load_classifier
            )
        except ValueError as e:
            raise ValueError(f'{checkpoint.path}: {e}') from e
        return LoadResult(checkpoint.entry, result.family, result.num_tensors)
    return load_filtered(model, checkpoint, model.family, _FILTERS[model.family], use_ema, load_classifier)


@dataclass
class LoadedModel:
    """A BOAT model with a source's weights, and what the source says about it.

    Attributes:
        model: the model, in eval mode, on the CPU.
        name: its registered timm name (``boat_swin_tiny_224``).
        model_kwargs: constructor arguments beyond the variant's own, ``num_classes`` excepted.
        weights: the source as read (path, kind, entry).
        metadata: the source's metadata when it describes this model ({} when another ``model`` was asked for:
            what a file records about its model applies to that model only).
    """

    model: BoatTransformer
    name: str
    model_kwargs: Dict[str, Any]
    weights: Weights
    metadata: Dict[str, Any]

    @property
    def entry(self) -> str:
        return self.weights.entry


def resolve_model(
    weights: Weights, model: Optional[str] = None, model_kwargs: Optional[Mapping[str, Any]] = None
) -> Tuple[str, Dict[str, Any], Dict[str, Any]]:
    """The BOAT model that ``weights`` hold: its name, constructor arguments and the metadata that describes it.

    ``model`` defaults to the one the metadata records, else the variant the tensors match (:func:`infer_variant`);
    ``model_kwargs`` to those the metadata records for its own model, with its ``img_size``. The metadata returned is
    {} when another model was asked for: what a file records about its model applies to that model only.

    Raises:
        UsageError: an unregistered name, or tensors that match no variant (or several).
    """
    name = check_boat_name(model or weights.metadata.get('model') or infer_variant(weights))
    own = weights.metadata if name == weights.metadata.get('model') else {}
    if model_kwargs is None:
        model_kwargs = dict(own.get('model_kwargs', {}))
        if own.get('img_size'):
            model_kwargs.setdefault('img_size', own['img_size'])
    return name, dict(model_kwargs), own


def load_model(
    source: Union[PathLike, Weights],
    model: Optional[str] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    use_ema: bool = True,
    **build_kwargs: Any,
) -> LoadedModel:
    """Build the BOAT model a weight source holds and load its weights strictly.

    Args:
        source: anything :func:`read_weights` reads, or its result.
        model: registered BOAT model name; default: the one the metadata records, else inferred from the tensors.
        model_kwargs: extra constructor arguments (``embed_dim``, ``depths``, ...); default: those the metadata
            records for its own model (with its ``img_size``). ``num_classes`` defaults to the classifier's size.
        use_ema: take ``state_dict_ema`` when the checkpoint has it.
        **build_kwargs: constructor arguments the program sets over those (``img_size`` from ``--img-size``); None
            values are left out.

    Raises:
        UsageError: naming the file and the problem.
    """
    weights = source if isinstance(source, Weights) else read_weights(source, use_ema=use_ema)
    try:
        name, model_kwargs, own = resolve_model(weights, model, model_kwargs)
        kwargs = dict(model_kwargs, **{k: v for k, v in build_kwargs.items() if v is not None})
        num_classes = kwargs.pop('num_classes', weights.num_classes)
        built = build_model(name, num_classes=num_classes, model_kwargs=kwargs)
        load_reference_weights(built, weights)
    except ValueError as e:
        message = str(e)
        raise UsageError(message if message.startswith(f'{weights.path}:') else f'{weights.path}: {message}') from e
    return LoadedModel(built.eval(), name, kwargs, weights, own)


# --- fine-tuning ------------------------------------------------------------------------------------------------


def input_size_kwargs(
    name: str,
    model_kwargs: Mapping[str, Any],
    img_size: Union[int, Tuple[int, int]],
    built_for: Optional[Union[int, Tuple[int, int]]] = None,
) -> Dict[str, Any]:
    """Constructor arguments that build ``name`` (with ``model_kwargs``) for ``img_size`` as ``set_input_size`` would
    adapt the model built for ``built_for`` (default: the model's own size): for BOAT-Swin the per-stage windows
    scaled with the patch grid (timm's rule, so which blocks shift and carry FSLA stays the same); {} for
    BOAT-CSWin, whose weights fit any size.

    Loading weights of the original size into the model built with these arguments resizes the relative-position
    tables (the family's ``checkpoint_filter_fn``).
    """
    with torch.device('meta'):  # shapes only: even the base models build in a fraction of a second
        model = build_model(name, 0, model_kwargs, img_size=built_for)
        if model.family != 'swin':
            return {}
        model.set_input_size(img_size=img_size)
    return {'window_size': [list(stage.blocks[0].window_size) for stage in model.layers]}


def check_backbone(weights: Weights, name: str, model_kwargs: Mapping[str, Any], **build_kwargs: Any) -> None:
    """Refuse ``weights`` whose backbone does not fit model ``name``: the strict check of
    :func:`load_reference_weights` (classifier aside), on the meta device so that nothing is allocated.

    Raises:
        UsageError: naming the file and the tensors that do not fit (another family, another width, ...).
    """
    with torch.device('meta'):
        model = build_model(name, weights.num_classes, model_kwargs, **build_kwargs)
    with warnings.catch_warnings():
        # copying into meta tensors is the no-op wanted here: only names and shapes are compared
        warnings.filterwarnings('ignore', message='.*copying from a non-meta parameter')
        load_backbone(model, weights)


def load_backbone(model: BoatTransformer, weights: Weights, classes: Optional[List[str]] = None) -> List[str]:
    """Start fine-tuning ``model`` from ``weights``: every tensor must fit, the classifier too when it classifies
    the same classes (as many, and the same names when both ``classes`` and the weights' metadata name them);
    otherwise the model gets a new classifier of zeros.

    Zeros, not the model's random initialisation (MAE and BEiT also start a fine-tuning head at or near zero): the
    first predictions are uniform (loss ln C) and the head learns from the features alone. A random head drawn
    with the seed the weights were trained with would be the one their features were trained against, and would
    predict the old classes' order with confidence.

    Returns:
        the names of the weights' classifier tensors left out (``['head.fc.bias', 'head.fc.weight']``), [] when
        the classifier was loaded.

    Raises:
        UsageError: naming the file and the tensors that do not fit.
    """
    recorded = weights.metadata.get('classes')
    same_head = weights.num_classes == model.num_classes and (not classes or not recorded or classes == recorded)
    try:
        load_reference_weights(model, weights, load_classifier=same_head)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if same_head:
        return []
    with torch.no_grad():
        for param in model.get_classifier().parameters():
            param.zero_()
    return ['head.fc.bias', 'head.fc.weight'] if weights.num_classes else []
