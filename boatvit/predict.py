"""``boatvit predict``: the top-k classes of images, with the model's own eval transform.

The transform is the one the weights record (`boatvit train` writes it), else timm's eval transform from the
model's pretrained cfg (resize, centre crop, normalise). Class names come from the weights (``classes``), else
from timm's ImageNet-1k table for 1000-class models, else they are the class indices.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from timm.data import ImageNetInfo, create_transform
from timm.data.readers.img_extensions import get_img_extensions
from tqdm import tqdm

from .cli import UsageError
from .convert import add_model_arguments, load_model
from .evaluate import eval_data_config, resolve_device

__all__ = ['find_images', 'open_image', 'data_config', 'eval_transform', 'class_names', 'predict']


def find_images(paths: Sequence[str]) -> List[Path]:
    """The image files among ``paths``; a directory stands for the images in it and its sub-directories, sorted."""
    extensions = get_img_extensions()
    images = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob('*') if f.is_file() and f.suffix.lower() in extensions)
            if not found:
                raise UsageError(f'{p}: no images ({", ".join(sorted(extensions))}) in this directory')
            images.extend(found)
        elif p.is_file():
            images.append(p)
        else:
            raise UsageError(f'{p}: no such file or directory')
    return images


def open_image(path: Path) -> Image.Image:
    """The image as RGB, or a `UsageError` naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert('RGB')
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f'{path}: not a readable image ({e})') from e


def data_config(model: torch.nn.Module, metadata: Mapping[str, Any]) -> Dict[str, Any]:
    """Input size, crop, interpolation, mean and std: those the weights record, else the model's pretrained cfg."""
    return metadata['data_config'] if 'data_config' in metadata else eval_data_config(model)


def eval_transform(model: torch.nn.Module, metadata: Mapping[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image to the normalised ``(3, H, W)`` tensor the model evaluates on."""
    return create_transform(**data_config(model, metadata), is_training=False)


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

    Returns:
        One ``{'image': str, 'predictions': [{'rank', 'index', 'name', 'probability'}, ...]}`` per image.
    """
    model.eval().to(device)
    k = min(topk, len(names))
    results = []
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    with tqdm(total=len(images), unit='image', disable=len(images) < 2) as progress:
        for batch in batches:
            x = torch.stack([transform(open_image(p)) for p in batch]).to(device)
            probs, indices = model(x).float().softmax(dim=-1).topk(k, dim=-1)
            for path, p, idx in zip(batch, probs.tolist(), indices.tolist()):
                results.append({'image': str(path), 'predictions': [
                    {'rank': r + 1, 'index': i, 'name': names[i], 'probability': prob}
                    for r, (prob, i) in enumerate(zip(p, idx))]})
            progress.update(len(batch))
    return results


def _print_table(results: Sequence[Mapping[str, Any]]) -> None:
    for result in results:
        print(result['image'])
        for pred in result['predictions']:
            print(f"  {pred['rank']:>2}  {100 * pred['probability']:6.2f} %  {pred['index']:>5}  {pred['name']}")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'predict',
        help='top-k classes of images',
        description='Classify images (files or directories of images) with BOAT weights: a released checkpoint or '
                    'a safetensors file from `boatvit convert` or `boatvit train`.',
    )
    parser.add_argument('images', nargs='+', metavar='IMAGE', help='image files or directories of images')
    parser.add_argument('--weights', required=True, help='checkpoint or .safetensors file')
    add_model_arguments(parser)
    parser.add_argument('--topk', type=int, default=5, help='classes to show per image (default: 5)')
    parser.add_argument('--batch-size', type=int, default=16, help='images per forward pass (default: 16)')
    parser.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument('--json', action='store_true', help='print the results as JSON')
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.topk < 1:
        raise UsageError(f'--topk must be at least 1, got {args.topk}')
    if args.batch_size < 1:
        raise UsageError(f'--batch-size must be at least 1, got {args.batch_size}')
    images = find_images(args.images)
    kwargs = dict(args.model_kwargs) if args.model_kwargs is not None else None
    loaded = load_model(args.weights, model=args.model, model_kwargs=kwargs, use_ema=args.ema)
    if loaded.model.num_classes == 0:
        raise UsageError(f'{args.weights}: the weights have no classifier (num_classes 0), so there is nothing to '
                         'predict; use weights with a classification head')
    results = predict(
        loaded.model,
        images,
        eval_transform(loaded.model, loaded.metadata),
        class_names(loaded.model.num_classes, loaded.metadata),
        topk=args.topk,
        batch_size=args.batch_size,
        device=resolve_device(args.device),
    )
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print_table(results)
    return 0
