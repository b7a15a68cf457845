"""The top-k classes of images, with the model's own eval transform.

The transform is the one the weights record (`boatvit train` writes it), else timm's eval transform from the
model's pretrained cfg (resize, centre crop, normalise): `boatvit.data.eval_data_config`. Class names come from the
weights (``classes``), else from timm's ImageNet-1k table for 1000-class models, else they are the class indices.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from PIL import Image
from timm.data import ImageNetInfo
from tqdm import tqdm

from .data import eval_transform, find_images, open_image
from .errors import UnreadableImageError, UsageError
from .runtime import resolve_device
from .weights import load_model

__all__ = ['class_names', 'predict', 'predict_images']


def class_names(num_classes: int, metadata: Mapping[str, Any]) -> List[str]:
    """Names in label order: the weights' own ``classes``, ImageNet-1k's for 1000 classes, else the indices."""
    classes = metadata.get('classes')
    if isinstance(classes, list) and len(classes) == num_classes:
        return [str(c) for c in classes]
    if num_classes == 1000:
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(num_classes)]
    return [str(i) for i in range(num_classes)]


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    images: Sequence[Path],
    transform: Callable[[Image.Image], torch.Tensor],
    names: Sequence[str],
    topk: int = 5,
    batch_size: int = 16,
    device: torch.device = torch.device('cpu'),
) -> List[Dict[str, Any]]:
    """Top-``topk`` classes and softmax probabilities of every image, in batches, with a progress bar.

    An image that cannot be read is skipped: its entry holds the reason instead of predictions.

    Returns:
        One entry per image, in order: ``{'image': str, 'predictions': [{'rank', 'index', 'name', 'probability'},
        ...]}``, or ``{'image': str, 'error': str}`` for an unreadable one.

    Raises:
        UnreadableImageError: none of the images could be read.
    """
    model.eval().to(device)
    k = min(topk, len(names))
    results: List[Dict[str, Any]] = []
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    with tqdm(total=len(images), unit='image', disable=len(images) < 2) as progress:
        for batch in batches:
            entries, pixels = [], []
            for path in batch:
                try:
                    pixels.append(transform(open_image(path)))
                    entries.append({'image': str(path)})
                except UnreadableImageError as e:
                    entries.append({'image': str(path), 'error': str(e)})
            if pixels:
                probs, indices = model(torch.stack(pixels).to(device)).float().softmax(dim=-1).topk(k, dim=-1)
                read = (entry for entry in entries if 'error' not in entry)
                for entry, p, idx in zip(read, probs.tolist(), indices.tolist()):
                    entry['predictions'] = [
                        {'rank': r + 1, 'index': i, 'name': names[i], 'probability': prob}
                        for r, (prob, i) in enumerate(zip(p, idx))
                    ]
            results.extend(entries)
            progress.update(len(batch))
    if all('error' in entry for entry in results):
        reasons = '; '.join(entry['error'] for entry in results[:3])
        raise UnreadableImageError(f'none of the {len(results)} images could be read: {reasons}')
    return results


def predict_images(
    paths: Sequence[str],
    weights: Union[str, os.PathLike],
    model: Optional[str] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    use_ema: bool = True,
    topk: int = 5,
    batch_size: int = 16,
    device: str = 'auto',
) -> List[Dict[str, Any]]:
    """:func:`predict` for image files and directories with any weight source (`boatvit.weights.load_model`).

    Raises:
        UsageError: bad arguments, images or weights, named.
    """
    if topk < 1:
        raise UsageError(f'--topk must be at least 1, got {topk}')
    if batch_size < 1:
        raise UsageError(f'--batch-size must be at least 1, got {batch_size}')
    images = find_images(paths)
    loaded = load_model(weights, model=model, model_kwargs=model_kwargs, use_ema=use_ema)
    if loaded.model.num_classes == 0:
        raise UsageError(
            f'{weights}: the weights have no classifier (num_classes 0), so there is nothing to '
            'predict; use weights with a classification head'
        )
    return predict(
        loaded.model,
        images,
        eval_transform(loaded.model, loaded.metadata),
        class_names(loaded.model.num_classes, loaded.metadata),
        topk=topk,
        batch_size=batch_size,
        device=resolve_device(device),
    )
