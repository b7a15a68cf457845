"""Top-1, top-5, loss and throughput of a model on a validation set.

`evaluate` is what training calls after every epoch; `evaluate_weights` is ``boatvit eval``: any weight source
(`boatvit.weights.read_weights`) on its own validation data, with its own eval transform.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data import (
    DIGITS,
    ImageSize,
    canonical_image_size,
    check_same_classes,
    default_workers,
    eval_transform,
    open_split,
)
from .errors import UsageError
from .runtime import autocast, out_of_memory, resolve_amp, resolve_device
from .weights import load_model, read_weights

__all__ = ['evaluate', 'evaluate_weights']


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
        sums += torch.stack(
            [
                F.cross_entropy(logits, targets, reduction='sum'),
                hits[:, 0].sum(),
                hits.any(dim=1).sum(),
                torch.tensor(len(targets), device=device),
            ]
        ).double()
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


def evaluate_weights(
    weights: Union[str, os.PathLike],
    data: Optional[str] = None,
    split: str = 'val',
    dataset: Optional[str] = None,
    model: Optional[str] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    use_ema: bool = True,
    img_size: Optional[ImageSize] = None,
    batch_size: int = 64,
    workers: Optional[int] = None,
    amp: str = 'auto',
    device: str = 'auto',
) -> Dict[str, Any]:
    """Evaluate a weight source on a validation split with its eval transform.

    Args:
        weights: a released checkpoint, a safetensors file or a run directory (see `boatvit.weights`).
        data: image folder root or ``'digits'``; default: the data the weights record they were trained on.
        split: the split (sub-folder) to evaluate.
        dataset: ``timm.data.create_dataset`` name; default: the recorded one with the recorded data, else a folder.
        model, model_kwargs, use_ema: see `boatvit.weights.load_model`.
        img_size: input size, an int or (height, width); default: the recorded one, else the model's.
        batch_size, workers, amp, device: how to run (``workers`` None: by core count; ``amp`` 'auto': bf16 where
            bf16 matrix products are faster than float32, as in training, `boatvit.runtime.resolve_amp`).

    Returns:
        :func:`evaluate`'s numbers with ``model``, ``weights``, ``data``, ``split`` and ``amp`` (the autocast dtype
        used, 'none' for float32).

    Raises:
        UsageError: a bad source, data set or argument, or a batch that does not fit in memory.
    """
    if batch_size < 1:
        raise UsageError(f'--batch-size must be at least 1, got {batch_size}')
    img_size = canonical_image_size(img_size)
    source = read_weights(weights, use_ema=use_ema)  # first: a wrong file is the first thing to hear about
    loaded = load_model(source, model=model, model_kwargs=model_kwargs, img_size=img_size)
    own = loaded.metadata
    if data is None:  # the data the weights were trained on
        data, dataset = own.get('data'), own.get('dataset', '') if dataset is None else dataset
        if data is None:
            raise UsageError(f'pass --data DIR (a folder with {split}/<class>/<image>) or --data {DIGITS}')
    ds, classes = open_split(data, split, dataset=dataset or '', img_size=img_size or own.get('img_size') or 32)
    if 'classes' in own:
        check_same_classes(own['classes'], classes, f'the weights and {data!r}')
    if loaded.model.num_classes != len(classes):
        raise UsageError(
            f'{source.path}: the weights classify {loaded.model.num_classes} classes but {data!r} '
            f'[{split}] has {len(classes)}; evaluate them on the data they were trained for'
        )
    ds.transform = eval_transform(loaded.model, own, img_size)

    run_on = resolve_device(device)
    amp = resolve_amp(amp, run_on)[0]
    loaded.model.to(run_on)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=default_workers() if workers is None else workers,
        pin_memory=run_on.type == 'cuda',
    )
    try:
        result = evaluate(loaded.model, loader, run_on, amp=amp)
    except RuntimeError as e:
        if out_of_memory(e):
            raise UsageError(f'--batch-size {batch_size} does not fit in memory on {run_on}; lower it') from e
        raise
    return {'model': loaded.name, 'weights': str(source.path), 'data': data, 'split': split, 'amp': amp, **result}
