"""``boatvit eval``: top-1, top-5, loss and throughput of a model on a validation set.

`evaluate` is also what training calls after every epoch; `build_model`, `autocast` and `resolve_device` are
shared with ``boatvit train``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import json
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import create_transform, resolve_data_config

from .cli import UsageError
from .data import DIGITS, check_same_classes, default_workers, open_split
from .runs import CONFIG_FILE, WEIGHTS_SUFFIX, load_weights, read_weights_metadata

AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' is the GPU when there is one, else the CPU."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {name} asks for a GPU but torch sees none; pass --device cpu')
    return device


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Mixed precision for ``amp`` in {'none', 'bf16', 'fp16'}; 'none' runs float32."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure: CUDA raises OutOfMemoryError, the CPU allocator a RuntimeError."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def parse_kwarg(text: str) -> Tuple[str, Any]:
    """Parse ``key=value`` from the command line; the value is a Python literal (``depths=(2,2)``) or a string."""
    key, sep, value = text.partition('=')
    if not sep or not key:
        raise argparse.ArgumentTypeError(f'expected key=value, got {text!r}')
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def build_model(
        name: str, num_classes: int, model_kwargs: Optional[Dict[str, Any]] = None, **kwargs: Any,
) -> torch.nn.Module:
    """``timm.create_model`` with errors a user can act on.

    Args:
        name: a registered timm model name; ``import boatvit`` registers the BOAT models.
        num_classes: classifier outputs.
        model_kwargs: extra constructor arguments (e.g. ``embed_dim``), as given with ``--model-kwargs``.
        **kwargs: further constructor arguments set by the program (``drop_path_rate``, ``img_size``); None
            values are left out so the model's defaults apply.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.5)
        hint = f'did you mean {", ".join(close)}? ' if close else ''
        raise UsageError(f'unknown model {name!r}; {hint}the BOAT models are {", ".join(timm.list_models("boat*"))}')
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kwargs.update(model_kwargs or {})
    try:
        return timm.create_model(name, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise UsageError(f'model {name!r} does not take the arguments {sorted(kwargs)}: {e}') from e


def eval_data_config(model: torch.nn.Module, img_size: Optional[int] = None, crop_pct: Optional[float] = None) -> dict:
    """Input size, crop, interpolation, mean and std for evaluation, from the model's pretrained cfg."""
    args = {'input_size': (3, img_size, img_size) if img_size else None, 'crop_pct': crop_pct}
    return resolve_data_config({k: v for k, v in args.items() if v is not None}, model=model)


@torch.no_grad()
def evaluate(
        model: torch.nn.Module,
        loader: Iterable[Tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
        amp: str = 'none',
) -> Dict[str, float]:
    """Top-1 and top-5 accuracy (%), mean cross-entropy and images/s of ``model`` over ``loader``.

    In a distributed run each process passes its own shard of the data (`boatvit.data.shard`) and the counts are
    summed over processes, so every process returns the numbers for the whole set. With fewer than 5 classes
    top-5 is top-(number of classes). Images/s counts the whole pipeline, data loading included.

    Returns:
        dict with keys top1, top5, loss, images, images_per_s.
    """
    model.eval()
    # loss sum, top-1 hits, top-5 hits, images; float64 so counts stay exact
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    start = time.perf_counter()
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
        sums += torch.stack([
            F.cross_entropy(logits, targets, reduction='sum'),
            hits[:, 0].sum(),
            hits.any(dim=1).sum(),
            torch.tensor(len(targets), device=device),
        ]).double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    seconds = time.perf_counter() - start
    loss, top1, top5, count = sums.tolist()
    if count == 0:
        raise UsageError('the validation set is empty; it needs at least one image')
    return {
        'top1': 100 * top1 / count,
        'top5': 100 * top5 / count,
        'loss': loss / count,
        'images': int(count),
        'images_per_s': count / seconds,
    }


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'eval',
        help='top-1, top-5, loss and images/s of trained weights on a validation set',
        description='Evaluate weights on a validation set with the model\'s eval transform. Weights that '
                    '`boatvit train` wrote carry their model, classes and transform, so --weights RUN_DIR is enough.',
    )
    parser.add_argument('--weights', required=True,
                        help='a .safetensors file, or a run directory (its best.safetensors is used)')
    parser.add_argument('--data', help=f'image folder root, or {DIGITS!r}; default: the data the weights were '
                                       'trained on')
    parser.add_argument('--dataset', default=None, help='timm.data.create_dataset name; default: image folder')
    parser.add_argument('--split', default='val', help='split (sub-folder) to evaluate (default: val)')
    parser.add_argument('--model', help='timm model name; default: the one the weights were saved from')
    parser.add_argument('--model-kwargs', nargs='*', type=parse_kwarg, default=None, metavar='KEY=VALUE',
                        help='extra model constructor arguments, e.g. embed_dim=48')
    parser.add_argument('--img-size', type=int, help='input size; default: from the weights or the model cfg')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--workers', type=int, default=None, help='data loader processes (default: by core count)')
    parser.add_argument('--amp', choices=sorted(AMP_DTYPES), default='none', help='autocast dtype (default: none)')
    parser.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument('--json', action='store_true', help='print the result as one JSON object')
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    weights = Path(args.weights)
    if weights.is_dir():
        if not (weights / CONFIG_FILE).is_file() or not (weights / 'best.safetensors').is_file():
            raise UsageError(f'{str(weights)!r} is not a finished run directory (no best.safetensors); pass a file')
        weights = weights / 'best.safetensors'
    if not weights.is_file():
        raise UsageError(f'weights file {str(weights)!r} does not exist; pass a .safetensors file or a run directory')
    saved = read_weights_metadata(weights) if weights.suffix == WEIGHTS_SUFFIX else {}

    model_name = args.model or saved.get('model')
    if model_name is None:
        raise UsageError(f'{str(weights)!r} does not say which model it holds; pass --model NAME')
    if args.batch_size < 1:
        raise UsageError(f'--batch-size must be at least 1, got {args.batch_size}')
    # what the weights record about themselves applies to their own model only
    own = saved if model_name == saved.get('model') else {}
    if args.data is None:  # the data the weights were trained on
        data, dataset = own.get('data'), own.get('dataset', '')
        if data is None:
            raise UsageError(f'pass --data DIR (a folder with {args.split}/<class>/<image>) or --data {DIGITS}')
    else:
        data, dataset = args.data, ''
    if args.dataset is not None:
        dataset = args.dataset
    model_kwargs = dict(args.model_kwargs) if args.model_kwargs is not None else own.get('model_kwargs', {})
    img_size = args.img_size or own.get('img_size')

    ds, classes = open_split(data, args.split, dataset=dataset, img_size=img_size or 32)
    if 'classes' in own:
        check_same_classes(own['classes'], classes, f'the weights and {data!r}')
    model = build_model(model_name, num_classes=len(classes), model_kwargs=model_kwargs, img_size=img_size)
    load_weights(model, weights, model_name)
    # the transform the run validated with, unless the input size changes
    if 'data_config' in own and not args.img_size:
        data_config = own['data_config']
    else:
        data_config = eval_data_config(model, img_size)
    ds.transform = create_transform(**data_config, is_training=False)

    device = resolve_device(args.device)
    model.to(device)
    workers = default_workers() if args.workers is None else args.workers
    loader = torch.utils.data.DataLoader(
        ds, batch_size=args.batch_size, shuffle=False, num_workers=workers, pin_memory=device.type == 'cuda'
    )
    try:
        result = evaluate(model, loader, device, amp=args.amp)
    except RuntimeError as e:
        if out_of_memory(e):
            raise UsageError(f'--batch-size {args.batch_size} does not fit in memory on {device}; lower it') from e
        raise
    result = {'model': model_name, 'weights': str(weights), 'data': data, 'split': args.split, **result}
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{model_name} on {data} [{args.split}]: top-1 {result['top1']:.2f} %  top-5 {result['top5']:.2f} %  "
            f"loss {result['loss']:.4f}  {result['images']} images  {result['images_per_s']:.1f} images/s"
        )
    return 0
