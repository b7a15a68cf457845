"""A BOAT model to ONNX (``boatvit export``), checked against PyTorch with ONNX Runtime, written atomically.

The graph is traced by the dynamo-based ``torch.onnx.export`` at one image size, with a dynamic batch axis unless a
batch size is given. At a fixed size everything about the clustering is static (tree depth, ghost padding, index
tables), so the graph holds only standard operators: the Swin shift is ``Slice`` and ``Concat``, the clustering one
``TopK`` with a constant K per level (a sort of every group's keys), the cluster gathers ``Gather`` and the return
to token order ``ScatterElements``.

The sorts are what limits deployment. The first level of an FSLA layer's clustering sorts all its tokens (padded
to ``c * 2^K``), so its ``TopK`` has K = that count: 3136 for stage 1 of every ``*_224`` model at 224x224. TensorRT
caps K at 3840 (:data:`TENSORRT_TOPK_LIMIT`); :func:`fsla_sorts` gives every layer's K for an input size, and the
command says when a layer is above the cap.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from .version import __version__
from .clustering import cluster_layout
from .data import ImageSize, canonical_image_size, eval_data_config, image_hw
from .errors import UsageError
from .fsla import FeatureSpaceAttention
from .models.base import BoatTransformer
from .runs import atomic_path
from .weights import build_model, check_boat_name, load_model

__all__ = [
    'TENSORRT_TOPK_LIMIT',
    'FslaSort',
    'OnnxExport',
    'ExportCheckError',
    'fsla_sorts',
    'export_onnx',
    'export_weights',
    'trace_onnx',
]

# TensorRT's ITopKLayer takes K <= 3840 (1024 before TensorRT 8.6 GA)
TENSORRT_TOPK_LIMIT = 3840
DEFAULT_OPSET = 18
MIN_OPSET = 17
_ONNX_PACKAGES = ('onnx', 'onnxruntime', 'onnxscript')


@dataclass(frozen=True)
class FslaSort:
    """The largest sort of one FSLA layer at one input size.

    Attributes:
        module: the layer's name in the model (``layers.0.blocks.1.fsla``).
        tokens: N, the tokens it clusters.
        topk: K of its largest ``TopK`` (the padded token count), 0 when N is below two clusters and nothing is sorted.
    """

    module: str
    tokens: int
    topk: int


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote and how well ONNX Runtime reproduced PyTorch.

    Attributes:
        path: the ONNX file.
        input_shape: ``(batch, channels, H, W)``; batch is None when the batch axis is dynamic.
        opset: the ONNX opset.
        max_abs_diff: largest ``|onnxruntime - pytorch|`` over the outputs of the check batch that passed.
        sorts: every FSLA layer's largest sort, in forward order.
        check_seed: the seed of that check batch.
        differing_checks: ``(seed, max_abs_diff)`` of the check batches before it, where ONNX Runtime differed
            (a token at a near-tied split, see :func:`export_onnx`).
    """

    path: Path
    input_shape: Tuple[Optional[int], int, int, int]
    opset: int
    max_abs_diff: float
    sorts: Tuple[FslaSort, ...]
    check_seed: int = 0
    differing_checks: Tuple[Tuple[int, float], ...] = ()

    @property
    def largest_sort(self) -> Optional[FslaSort]:
        return max(self.sorts, key=lambda s: s.topk, default=None)

    @property
    def fits_tensorrt(self) -> bool:
        """Whether every sort is within TensorRT's TopK limit."""
        return all(s.topk <= TENSORRT_TOPK_LIMIT for s in self.sorts)


class ExportCheckError(RuntimeError):
    """ONNX Runtime's outputs differ from PyTorch's beyond the tolerance; nothing was written."""


def _check_model(model: Any) -> None:
    if not isinstance(model, BoatTransformer):
        raise TypeError(
            f'model must be a boatvit BOAT model (timm.create_model("boat_...")), got {type(model).__name__}.'
        )
    dtypes = {p.dtype for p in model.parameters()}
    devices = {p.device.type for p in model.parameters()}
    if dtypes != {torch.float32} or devices != {'cpu'}:
        raise ValueError(
            f'export needs a float32 model on the CPU, got parameters of dtype {sorted(map(str, dtypes))} '
            f'on {sorted(devices)}; call model.float().cpu() first.'
        )


def fsla_sorts(model: nn.Module, images: torch.Tensor) -> List[FslaSort]:
    """The largest sort of every :class:`~boatvit.FeatureSpaceAttention` of ``model`` when it runs on ``images``.

    Runs one forward pass (no gradient) and records the token count each FSLA layer sees.
    """
    names = {m: n for n, m in model.named_modules() if isinstance(m, FeatureSpaceAttention)}
    sorts = []

    def record(module: FeatureSpaceAttention, args: Tuple[Any, ...]) -> None:
        layout = cluster_layout(args[0].shape[1], module.cluster_size)
        sorts.append(FslaSort(names[module], layout.num_tokens, layout.padded_tokens if layout.levels else 0))

    handles = [m.register_forward_pre_hook(record) for m in names]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    return sorts


def _require_onnx_packages() -> None:
    missing = [p for p in _ONNX_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise UsageError(f'ONNX export needs {", ".join(missing)}; install them with pip install "boatvit[onnx]".')


def _check_opset(opset: Any) -> None:
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f'opset must be an int >= {MIN_OPSET}, got {opset!r}.')


def trace_onnx(model: nn.Module, images: torch.Tensor, dynamic_batch: bool, opset: int) -> Any:
    """The dynamo exporter's ONNX program of ``model`` (any module whose forward takes ``x``) traced on ``images``
    (a dynamic batch axis if asked); :func:`export_onnx` checks and writes it, the ONNX benchmark traces timm's Swin
    by it too.

    Raises:
        TypeError / ValueError: a ``model`` that is not a module, ``images`` that are not a 4-D floating-point
            batch, an ``opset`` below 17.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f'model must be a torch.nn.Module, got {type(model).__name__}.')
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f'images must be a floating-point (batch, channels, height, width) tensor, got {shape}.')
    _check_opset(opset)
    dynamic_shapes = {'x': {0: torch.export.Dim('batch', min=1)}} if dynamic_batch else None
    # the exporter's constant folding logs a warning for every Concat of more than 64 inputs it leaves alone
    folding_log = logging.getLogger('onnxscript.optimizer._constant_folding')
    level = folding_log.level
    folding_log.setLevel(logging.ERROR)
    try:
        return torch.onnx.export(
            model,
            (images,),
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            input_names=['images'],
            output_names=['logits'],
            external_data=False,
            verbose=False,
        )
    finally:
        folding_log.setLevel(level)


def export_onnx(
    model: BoatTransformer,
    path: Union[str, os.PathLike],
    img_size: Optional[ImageSize] = None,
    batch_size: Optional[int] = None,
    opset: int = DEFAULT_OPSET,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    seed: int = 0,
    metadata: Optional[Mapping[str, Any]] = None,
    check_batches: int = 3,
) -> OnnxExport:
    """Export ``model`` to ONNX, run the file with ONNX Runtime on random batches and compare with PyTorch.

    The file appears at ``path`` only once the check has passed (it is written beside it, then renamed).

    Args:
        model: a float32 BOAT model on the CPU; it runs in eval mode (its train/eval mode is restored afterwards).
        path: the ``.onnx`` file to write (weights inside, so at most 2 GB: every registered model fits).
        img_size: input size the graph is traced at, an int or (height, width); default: ``model.img_size``. A model
            built without ``dynamic_img_size`` only takes its own size.
        batch_size: a fixed batch size, or None for a dynamic batch axis.
        opset: ONNX opset, at least 17.
        atol, rtol: a check batch passes when ``|ort - torch| <= atol + rtol * |torch|`` everywhere.
        seed: seed of the first random check batch (standard normal, like normalised images); the next ones take
            ``seed + 1``, ``seed + 2``...
        metadata: stored JSON-encoded in the file's ``metadata_props`` (with ``boatvit_version``).
        check_batches: how many check batches may differ before the check fails. The clustering is discontinuous:
            where a token's two centroid cosines are within float32 rounding of a tie, ONNX Runtime's rounding
            can put it in the other cluster, and that batch's outputs differ; the next random batch rarely has
            such a token, while a graph that computes something else differs on every batch. The check passes at
            the first batch that matches.

    Returns:
        :class:`OnnxExport`.

    Raises:
        ExportCheckError: ONNX Runtime disagrees with PyTorch on every check batch; nothing is written.
    """
    _check_model(model)
    height, width = tuple(model.img_size) if img_size is None else image_hw(img_size, 'img_size')
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f'batch_size must be a positive int or None (dynamic batch), got {batch_size!r}.')
    _check_opset(opset)
    if not isinstance(check_batches, int) or isinstance(check_batches, bool) or check_batches < 1:
        raise ValueError(f'check_batches must be a positive int, got {check_batches!r}.')
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f'seed must be an int, got {seed!r}.')
    path = Path(path)
    if path.is_dir() or not path.parent.is_dir():
        raise ValueError(f'{path}: the output must be a file in an existing directory.')
    _require_onnx_packages()
    import onnxruntime

    # a dynamic batch is traced and checked at 2: torch.export specialises a size-1 dimension
    check_shape = (batch_size or 2, model.in_chans, height, width)
    seeds = range(seed, seed + check_batches)
    batches = [torch.randn(check_shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    model.check_input(batches[0])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = [model(images).numpy() for images in batches]
        sorts = tuple(fsla_sorts(model, batches[0][:1]))
        program = trace_onnx(model, batches[0], dynamic_batch=batch_size is None, opset=opset)
    finally:
        model.train(was_training)
    props = dict(metadata or {}, boatvit_version=__version__)
    program.model.metadata_props.update({k: json.dumps(v) for k, v in props.items()})

    with atomic_path(path) as tmp:
        program.save(tmp, external_data=False)
        session = onnxruntime.InferenceSession(str(tmp), providers=['CPUExecutionProvider'])
        differing = []
        for s, images, want in zip(seeds, batches, expected):
            (actual,) = session.run(None, {'images': images.numpy()})
            diff = abs(actual - want)
            if (diff <= atol + rtol * abs(want)).all():
                input_shape = (batch_size, model.in_chans, height, width)
                result = OnnxExport(path, input_shape, opset, float(diff.max()), sorts, s, tuple(differing))
                break
            differing.append((s, float(diff.max())))
        else:
            diffs = ', '.join(f'{d:.3g} (seed {s})' for s, d in differing)
            raise ExportCheckError(
                f'ONNX Runtime differs from PyTorch on all {check_batches} random {check_shape} batches, by up to '
                f'{diffs} (atol {atol:g}, rtol {rtol:g}); {path} was not written. One batch can differ where a token '
                'sits at a near-tie of a clustering split, every batch rarely: report the model and size.'
            )
    return result


def _model_to_export(
    weights: Optional[Union[str, os.PathLike]],
    model: Optional[str],
    model_kwargs: Optional[Mapping[str, Any]],
    use_ema: bool,
    img_size: Optional[ImageSize],
) -> Tuple[BoatTransformer, Tuple[int, int], Dict[str, Any]]:
    """The model to export, the image size and what the ONNX file records about it."""
    if model:
        check_boat_name(model)
    if weights:
        loaded = load_model(weights, model=model, model_kwargs=model_kwargs, use_ema=use_ema)
        name, kwargs, metadata, built = loaded.name, loaded.model_kwargs, loaded.metadata, loaded.model
        if img_size and not built.dynamic_img_size and tuple(built.img_size) != image_hw(img_size):
            # the same network taking other sizes: built at another img_size, Swin would fit its windows (and their
            # position tables) to the new stage sizes, and the trained weights would no longer apply as trained
            state = built.state_dict()
            built = build_model(name, built.num_classes, dict(kwargs, dynamic_img_size=True))
            built.load_state_dict(state)
    elif model:
        name, kwargs, metadata = model, dict(model_kwargs or {}), {}
        built = build_model(name, kwargs.pop('num_classes', 1000), kwargs, img_size=img_size)
    else:
        raise UsageError('pass --model NAME (a registered BOAT model), and --weights PATH for trained weights')
    size = image_hw(img_size) if img_size else tuple(built.img_size)
    if min(size) < built.min_img_size:
        given = str(size[0]) if size[0] == size[1] else f'{size[0]} {size[1]}'
        raise UsageError(
            f'--img-size {given} is too small: {name} takes images of at least {built.min_img_size} pixels a side'
        )
    config = dict(eval_data_config(built, metadata), input_size=(built.in_chans, *size))
    return built, size, {'model': name, 'model_kwargs': kwargs, 'data_config': config}


def export_weights(
    path: Union[str, os.PathLike],
    weights: Optional[Union[str, os.PathLike]] = None,
    model: Optional[str] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    use_ema: bool = True,
    img_size: Optional[ImageSize] = None,
    batch_size: Optional[int] = None,
    opset: int = DEFAULT_OPSET,
    atol: float = 1e-4,
    seed: int = 0,
    check_batches: int = 3,
) -> Tuple[OnnxExport, str]:
    """:func:`export_onnx` of a weight source (`boatvit.weights.load_model`), or of a named model's random weights.

    The file records the model, its arguments and its eval ``data_config`` in its metadata.

    Returns:
        The export and the model name.

    Raises:
        UsageError: bad arguments or weights, named. ExportCheckError: see :func:`export_onnx`.
    """
    img_size = canonical_image_size(img_size)
    if batch_size is not None and batch_size < 1:
        raise UsageError(f'--batch-size must be a positive integer, got {batch_size}')
    if opset < MIN_OPSET:
        raise UsageError(f'--opset must be at least {MIN_OPSET}, got {opset}')
    if not atol > 0:
        raise UsageError(f'--atol must be positive, got {atol}')
    if check_batches < 1:
        raise UsageError(f'--check-batches must be a positive integer, got {check_batches}')
    path = Path(path)
    if path.is_dir() or not path.parent.is_dir():
        raise UsageError(f'{path}: the output must be a file in an existing directory')
    if weights and path.exists() and path.resolve() == Path(weights).resolve():
        raise UsageError(f'{path}: the output would overwrite the weights; pick another name')
    built, size, metadata = _model_to_export(weights, model, model_kwargs, use_ema, img_size)
    result = export_onnx(
        built,
        path,
        img_size=size,
        batch_size=batch_size,
        opset=opset,
        atol=atol,
        rtol=atol,
        seed=seed,
        metadata=metadata,
        check_batches=check_batches,
    )
    return result, metadata['model']
