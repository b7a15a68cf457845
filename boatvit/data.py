"""Data for training, evaluation and prediction: the built-in digits set, image folders, timm data sets, single
images, and the eval transform.

Every split is opened by `open_split`, which returns a map-style data set whose ``transform`` attribute takes a PIL
image, and the class names in label order. `eval_data_config` is the one place that decides which eval transform
weights get: the one they record, else the model's pretrained cfg. Bad data directories and images are reported
here, at the boundary, with what was expected and how to fix it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_dataset, create_transform, resolve_data_config
from timm.data.readers.img_extensions import get_img_extensions
from tqdm import tqdm

from .errors import UnreadableImageError, UsageError
from .runtime import require_extra

#: an image size: one int for a square, or (height, width)
ImageSize = Union[int, Tuple[int, int]]


def canonical_image_size(value: Any, flag: str = '--img-size') -> Optional[ImageSize]:
    """``value`` (None, an int, or a sequence of one or two ints, e.g. a JSON list or the flag's words) as None, an
    int for a square, or ``(height, width)``: one form per size, so that sizes compare equal and configs read back
    the same.

    Raises:
        UsageError: anything else, named with ``flag``.
    """
    if value is None:
        return None
    sides = [value] if isinstance(value, int) else list(value) if isinstance(value, (list, tuple)) else []
    if not 1 <= len(sides) <= 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sides):
        raise UsageError(f'{flag} takes one positive int (a square) or two (height width), got {value!r}')
    return sides[0] if len(set(sides)) == 1 else (sides[0], sides[1])


def image_hw(value: Any, flag: str = '--img-size') -> Tuple[int, int]:
    """``(height, width)`` of a size :func:`canonical_image_size` accepts (not None)."""
    size = canonical_image_size(value, flag)
    if size is None:
        raise UsageError(f'{flag}: an image size is needed here, got None')
    return (size, size) if isinstance(size, int) else size


DIGITS = 'digits'
DIGITS_SPLITS = ('train', 'val')


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's handwritten digits (1797 8x8 images, 10 classes), upscaled to RGB images.

    The data ship with scikit-learn, so this set needs no download and no disk. The split is a fixed stratified
    80/20 train/val split (1437/360 images, seed 0) so every machine trains and evaluates on the same images.

    Args:
        split: 'train' or 'val'.
        img_size: output size in pixels (one side for a square, or (height, width)), upscaled bicubically from
            8x8.
        transform: applied to each PIL image; None returns the PIL image.
    """

    classes = [str(d) for d in range(10)]

    def __init__(self, split: str = 'train', img_size: ImageSize = 32, transform: Optional[Callable] = None):
        # imported here: scikit-learn takes a second to import, only the digits need it, and it is optional
        require_extra('sklearn', 'scikit-learn', 'the built-in digits data set')
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in DIGITS_SPLITS:
            raise UsageError(f'the digits data set has splits {DIGITS_SPLITS}, not {split!r}')
        digits = load_digits()
        # pixel values are counts of set bits in 4x4 blocks, 0..16
        pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
        train_idx, val_idx = train_test_split(
            np.arange(len(pixels)), test_size=0.2, stratify=digits.target, random_state=0
        )
        idx = np.sort(train_idx if split == 'train' else val_idx)
        height, width = image_hw(img_size)
        self.images = [
            np.asarray(Image.fromarray(p).resize((width, height), Image.Resampling.BICUBIC)) for p in pixels[idx]
        ]
        self.targets = digits.target[idx].tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index]).convert('RGB')
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def open_split(
    data: str,
    split: str,
    dataset: str = '',
    download: bool = False,
    img_size: ImageSize = 32,
) -> Tuple[torch.utils.data.Dataset, List[str]]:
    """Open one split of a data set, without transforms.

    Args:
        data: 'digits' for the built-in digits, else the root directory: with ``dataset=''`` it must hold
            ``<split>/<class>/<image>`` files, otherwise it is the root that timm's ``create_dataset`` gets.
        split: split name, e.g. 'train' or 'val'; for image folders the name of the sub-folder.
        dataset: a ``timm.data.create_dataset`` name such as 'torch/cifar10' or 'hfds/...'; '' for image folders.
        download: let ``create_dataset`` download the data set if it supports that.
        img_size: output image size for the digits (an int or (height, width)), ignored otherwise.

    Returns:
        (data set with a settable ``transform`` attribute, class names in label order)
    """
    if data == DIGITS and not dataset:
        ds = DigitsDataset(split, img_size=img_size)
        return ds, list(ds.classes)
    root = Path(data)
    if not root.is_dir():
        raise UsageError(
            f'data directory {str(root)!r} does not exist; pass --data DIR with {split}/<class>/<image> files'
            f' inside, or --data {DIGITS} for the built-in digits'
        )
    if dataset:
        return _open_timm_split(dataset, root, split, download)
    return _open_folder_split(root, split)


def _open_folder_split(root: Path, split: str) -> Tuple[torch.utils.data.Dataset, List[str]]:
    folder = root / split
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise UsageError(
            f'data directory {str(root)!r} has no {split!r} folder (it has {found}); expected'
            f' {root / split}/<class>/<image> with one folder per class'
        )
    extensions = get_img_extensions(as_set=True)
    loose = [p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions]
    if loose or not any(p.is_dir() for p in folder.iterdir()):
        raise UsageError(
            f'{str(folder)!r} must hold one sub-folder of images per class ({folder}/<class>/<image>), but it has'
            f' {"images directly inside, e.g. " + repr(loose[0]) if loose else "no sub-folders"}'
        )
    try:
        ds = create_dataset('', root=str(folder), split=split, search_split=False)
    except RuntimeError as e:  # timm's reader finds no image files
        raise UsageError(
            f"{str(folder)!r} holds no images ({', '.join(sorted(extensions))}); put each class's images in"
            f' {folder}/<class>/'
        ) from e
    check_images([Path(path) for path, _ in ds.reader.samples], str(folder))
    class_to_idx = ds.reader.class_to_idx
    return ds, sorted(class_to_idx, key=class_to_idx.get)


def _open_timm_split(
    dataset: str,
    root: Path,
    split: str,
    download: bool,
) -> Tuple[torch.utils.data.Dataset, List[str]]:
    try:
        ds = create_dataset(dataset, root=str(root), split=split, download=download)
    except (AssertionError, RuntimeError, FileNotFoundError, ValueError) as e:
        raise UsageError(
            f'could not open data set {dataset!r} split {split!r} under {str(root)!r} ({e}); check --dataset and'
            ' --data, or add --download to fetch it'
        ) from e
    if isinstance(ds, torch.utils.data.IterableDataset) or not hasattr(ds, '__len__'):
        raise UsageError(f'data set {dataset!r} streams; use an image folder or a map-style data set (torch/, hfds/)')
    classes = dataset_classes(ds)
    if classes is None:
        raise UsageError(f'cannot tell the classes of data set {dataset!r}; convert it to an image folder')
    return ds, classes


def dataset_classes(ds: torch.utils.data.Dataset) -> Optional[List[str]]:
    """Class names in label order, from a timm reader's ``class_to_idx`` or a torchvision ``classes`` list."""
    class_to_idx = getattr(getattr(ds, 'reader', None), 'class_to_idx', None) or getattr(ds, 'class_to_idx', None)
    if class_to_idx:
        return sorted(class_to_idx, key=class_to_idx.get)
    classes = getattr(ds, 'classes', None)
    return [str(c) for c in classes] if classes else None


def check_same_classes(train_classes: Sequence[str], val_classes: Sequence[str], where: str) -> None:
    """Raise a `UsageError` unless both splits have the same classes in the same label order."""
    if list(train_classes) == list(val_classes):
        return
    only_train = sorted(set(train_classes) - set(val_classes))
    only_val = sorted(set(val_classes) - set(train_classes))
    raise UsageError(
        f'classes differ between the train and val splits of {where} (only in train: {only_train[:10]},'
        f' only in val: {only_val[:10]}); labels are assigned by sorted class name, so every class needs a folder'
        ' in both splits'
    )


def folder_summary(root: Union[str, os.PathLike], split: str, samples: int = 200) -> Optional[Tuple[int, int]]:
    """The number of images in an image folder's ``split`` and their typical longer side in pixels (the median over
    ``samples`` images spread through the sorted list; headers only); None when there is no such folder or it holds
    no images."""
    folder = Path(root) / split
    if not folder.is_dir():
        return None
    extensions = get_img_extensions(as_set=True)
    paths = sorted(p for p in folder.rglob('*') if p.suffix.lower() in extensions and p.is_file())
    sides = []
    for p in paths[:: max(1, len(paths) // samples)]:
        try:
            with Image.open(p) as image:
                sides.append(max(image.size))
        except _DECODE_ERRORS:
            continue  # reported by name when the split is opened
    return (len(paths), int(np.median(sides))) if sides else None


def shard(ds: torch.utils.data.Dataset, rank: int, world_size: int) -> torch.utils.data.Dataset:
    """Every ``world_size``-th item from ``rank`` on, so evaluation shards count each image exactly once."""
    if world_size == 1:
        return ds
    return torch.utils.data.Subset(ds, range(rank, len(ds), world_size))


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system tells it, else all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


def default_workers(processes: int = 1) -> int:
    """Data loader processes for each of ``processes`` training processes on this machine: the cores shared out, at
    most 8 each; none when a process has 2 cores or fewer, which the training itself needs."""
    share = usable_cores() // processes
    return 0 if share <= 2 else min(8, share)


def eval_data_config(
    model: torch.nn.Module,
    metadata: Optional[Mapping[str, Any]] = None,
    img_size: Optional[ImageSize] = None,
    crop_pct: Optional[float] = None,
) -> Dict[str, Any]:
    """Input size, crop, interpolation, mean and std for evaluation.

    The ``data_config`` the weights record (``metadata``: `boatvit train` writes it), with its size replaced by
    ``img_size`` and its crop by ``crop_pct`` when given: another size keeps the normalisation the weights were
    trained with. Weights that record none get timm's, from the model's pretrained cfg.
    """
    if metadata and 'data_config' in metadata:
        config = dict(metadata['data_config'])
        if img_size:
            config['input_size'] = (config['input_size'][0], *image_hw(img_size))
        if crop_pct is not None:
            config['crop_pct'] = crop_pct
        return config
    args = {'input_size': (3, *image_hw(img_size)) if img_size else None, 'crop_pct': crop_pct}
    return resolve_data_config({k: v for k, v in args.items() if v is not None}, model=model)


def eval_transform(
    model: torch.nn.Module,
    metadata: Optional[Mapping[str, Any]] = None,
    img_size: Optional[ImageSize] = None,
    normalize: bool = True,
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image to the normalised ``(3, H, W)`` tensor the model evaluates on (see `eval_data_config`); with
    ``normalize=False`` to the uint8 ``(3, H, W)`` tensor before that, for `normalize_images` to finish."""
    return create_transform(**eval_data_config(model, metadata, img_size), is_training=False, normalize=normalize)


def normalize_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` images to the float32 ones the model takes, with the same operations in the same order
    as torchvision's ``ToTensor`` and ``Normalize`` on each image (so the same floats), but once per batch and on the
    images' device: a GPU gets a quarter of the bytes and does the arithmetic."""
    mean_, std_ = (torch.as_tensor(v, dtype=torch.float32, device=images.device).view(1, -1, 1, 1) for v in (mean, std))
    return images.float().div_(255).sub_(mean_).div_(std_)


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


# what decoding a broken file raises besides OSError: PIL's plugins report bad chunks and headers with these
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)
# integer modes of more than 8 bits per pixel, which ``convert('RGB')`` clips (a 16-bit PNG turns white)
_WIDE_INT_MODES = ('I', 'I;16', 'I;16L', 'I;16B', 'I;16N')


def image_problem(path: Path) -> Optional[str]:
    """Why an image file cannot be trained on, from its header and PIL's ``verify`` (no pixel is decoded); None if
    it looks fine. Cheap enough for every file of a data set: JPEG data errors are found only when decoded (timm's
    data set skips such a file with a warning), PNG ones here."""
    try:
        with Image.open(path) as image:
            if image.mode in _WIDE_INT_MODES or image.mode == 'F':
                return (
                    f'{image.mode} pixels (more than 8 bits) would be clipped by the training reader; save it as 8-bit'
                )
            image.verify()
    except Image.DecompressionBombError as e:
        return f'too large to open safely ({e})'
    except _DECODE_ERRORS as e:
        return f'not a readable image ({type(e).__name__}: {e})'
    return None


def check_images(paths: Sequence[Path], where: str) -> None:
    """Raise an `UnreadableImageError` listing the files of ``paths`` that `image_problem` finds fault with.

    Run on the image folders before training, so a bad file is reported at the start, not epochs later.
    """
    bad = [
        (p, problem)
        for p in tqdm(paths, desc='checking images', unit='image', disable=len(paths) < 5000, leave=False)
        if (problem := image_problem(p))
    ]
    if bad:
        listed = '; '.join(f'{p}: {problem}' for p, problem in bad[:10])
        more = f' (and {len(bad) - 10} more)' if len(bad) > 10 else ''
        raise UnreadableImageError(
            f'{len(bad)} of the {len(paths)} images in {where} cannot be used: {listed}{more}; remove or replace them'
        )


def open_image(path: Path) -> Image.Image:
    """The image as RGB, or an `UnreadableImageError` naming the file and why.

    Integer images of more than 8 bits (16-bit greyscale PNGs) are scaled to 8 bits, not clipped; images larger
    than PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) are refused.
    """
    try:
        with Image.open(path) as image:
            if image.mode == 'F':
                raise UnreadableImageError(f'{path}: floating-point pixels have no fixed range; save it as 8-bit')
            if image.mode in _WIDE_INT_MODES:
                # 16-bit range to 8: 65535 / 255 = 257
                pixels = np.asarray(image, dtype=np.float64) / 257
                return Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8)).convert('RGB')
            return image.convert('RGB')
    except Image.DecompressionBombError as e:
        raise UnreadableImageError(f'{path}: too large to open safely ({e})') from e
    except _DECODE_ERRORS as e:
        raise UnreadableImageError(f'{path}: not a readable image ({type(e).__name__}: {e})') from e


class ImageFiles(torch.utils.data.Dataset):
    """Image files for a loader to decode in its workers: item ``i`` is ``(i, pixels, None)``, or ``(i, None,
    reason)`` for a file `open_image` cannot read, so that one bad file is reported in its row instead of stopping
    the loader. Batch them with :func:`collate_image_files`.

    Args:
        paths: the image files.
        transform: PIL image to a ``(3, H, W)`` tensor (`eval_transform`).
    """

    def __init__(self, paths: Sequence[Path], transform: Callable[[Image.Image], torch.Tensor]):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tuple[int, Optional[torch.Tensor], Optional[str]]:
        try:
            return index, self.transform(open_image(self.paths[index])), None
        except UnreadableImageError as e:
            return index, None, str(e)


def collate_image_files(
    items: Sequence[Tuple[int, Optional[torch.Tensor], Optional[str]]],
) -> Tuple[List[int], Optional[torch.Tensor], List[Optional[str]]]:
    """A batch of :class:`ImageFiles` items: the indices, the readable images stacked ``(B', 3, H, W)`` (None when
    none is), and each item's error (None for a readable one)."""
    pixels = [p for _, p, _ in items if p is not None]
    return [i for i, _, _ in items], torch.stack(pixels) if pixels else None, [e for _, _, e in items]
