"""A split of small images decoded once and kept in memory.

Decoding a 32x32 JPEG costs about as much as a small model's forward pass of it, and a training run decodes every
image once an epoch. When a split's images all have one size and its pixels fit in a share of the memory that is
free, `cache_split` decodes them once (in threads: PIL releases the GIL) into one uint8 array; `InMemoryImages`
then serves the same PIL images as the disk would, so every transform sees the same input. Its ``batch_transform``
lets training augment a whole batch of pixels at once instead (`boatvit.batch_augment`).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .data import open_image, usable_cores
from .errors import UsageError

__all__ = ['CACHE_MODES', 'InMemoryImages', 'available_memory', 'cache_split', 'collate_samples']

#: ``--data-cache`` values: keep decoded images in memory when they fit ('auto'), always ('memory'), never ('none')
CACHE_MODES = ('auto', 'memory', 'none')
#: the share of the free memory a cached split may take; the rest is for the model, its activations and the system
MEMORY_SHARE = 0.25


class InMemoryImages(torch.utils.data.Dataset):
    """Decoded RGB images of one size, with their labels.

    Args:
        pixels: ``(N, H, W, 3)`` uint8.
        targets: N class indices.
        transform: applied to each PIL image by ``__getitem__``; None returns the PIL image.

    Attributes:
        batch_transform: when set, the data loader's batches (through ``__getitems__`` and `collate_samples`) are
            ``(batch_transform(pixels), targets)`` with ``pixels`` the batch's ``(B, 3, H, W)`` uint8 tensor, and
            ``transform`` is not used.
    """

    def __init__(self, pixels: np.ndarray, targets: Sequence[int], transform: Optional[Callable] = None):
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[3] != 3 or len(pixels) != len(targets):
            raise ValueError(f'pixels must be (N, H, W, 3) uint8 for N targets, got {pixels.shape} {pixels.dtype}')
        self.pixels = torch.from_numpy(pixels)
        self.targets = torch.as_tensor(list(targets), dtype=torch.long)
        self.transform = transform
        self.batch_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.pixels[index].numpy())
        return (self.transform(image) if self.transform is not None else image), int(self.targets[index])

    def __getitems__(self, indices: List[int]):
        # the DataLoader fetches a whole batch through this when the data set has it
        if self.batch_transform is None:
            return [self[i] for i in indices]
        index = torch.as_tensor(indices)
        return self.batch_transform(self.pixels[index].permute(0, 3, 1, 2)), self.targets[index]


def collate_samples(data):
    """The loaders' ``collate_fn``: a batch `InMemoryImages` made whole as it is, else PyTorch's default."""
    if isinstance(data, tuple):
        return data
    return torch.utils.data.default_collate(data)


def available_memory() -> Optional[int]:
    """Bytes of physical memory free for new allocations (Linux's MemAvailable), or None where it cannot be told."""
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):
        return None


def _image_size(path: Path) -> Tuple[int, int]:
    with Image.open(path) as image:  # reads the header only
        return image.size


def cache_split(
    samples: Sequence[Tuple[str, int]],
    where: str,
    mode: str = 'auto',
    copies: int = 1,
    memory: Optional[int] = None,
    progress: bool = True,
    threads: Optional[int] = None,
) -> Tuple[Optional[InMemoryImages], str]:
    """Decode the images of ``samples`` (path, label) into an `InMemoryImages`, if ``mode`` and the memory allow.

    Args:
        samples: the split's files and labels, in the data set's order.
        where: the split, for messages.
        mode: one of :data:`CACHE_MODES`.
        copies: processes on this machine that each keep a copy (torchrun's local world size).
        memory: free bytes; default: `available_memory`.
        progress: show a progress bar while decoding.
        threads: decoding threads; default: the cores this process may use.

    Returns:
        The cached split (None when it stays on disk) and a sentence for the user that says which and why.

    Raises:
        UsageError: ``mode='memory'`` for a split that cannot be cached (images of several sizes, too little memory).
    """
    if mode not in CACHE_MODES:
        raise UsageError(f'--data-cache must be one of {list(CACHE_MODES)}, got {mode!r}')
    if mode == 'none' or not samples:
        return None, f'{where}: decoded from disk every epoch (--data-cache none)'
    paths = [Path(path) for path, _ in samples]
    sizes = {_image_size(p) for p in paths[:64]}
    if len(sizes) == 1:  # the first images agree: worth reading every header
        sizes = set(_pool_map(_image_size, paths, threads, None))
    needed = len(paths) * 3 * max(w * h for w, h in sizes) * copies
    memory = available_memory() if memory is None else memory
    problem = None
    if len(sizes) > 1:
        shown = ', '.join(f'{w}x{h}' for w, h in sorted(sizes)[:3])
        problem = f'its images have {len(sizes)} sizes ({shown}, ...), and only images of one size are kept in memory'
    elif memory is None:
        problem = 'the free memory of this machine cannot be told'
    elif needed > MEMORY_SHARE * memory:
        problem = (
            f'its pixels take {_mib(needed)} ({copies} cop{"y" if copies == 1 else "ies"}), more than'
            f' {MEMORY_SHARE:.0%} of the {_mib(memory)} free'
        )
    if problem:
        if mode == 'memory':
            raise UsageError(f'--data-cache memory: {where} cannot be kept in memory: {problem}; use --data-cache auto')
        return None, f'{where}: decoded from disk every epoch: {problem}'
    bar = tqdm(total=len(paths), desc=f'decoding {where} into memory', unit='image', disable=not progress, leave=False)
    pixels = np.stack(_pool_map(lambda p: np.asarray(open_image(p)), paths, threads, bar))
    bar.close()
    ((width, height),) = sizes
    cached = InMemoryImages(pixels, [label for _, label in samples])
    return cached, f'{where}: {len(paths)} images of {width}x{height} decoded once and kept in memory ({_mib(needed)})'


def _pool_map(fn: Callable, items: Sequence, threads: Optional[int], bar: Optional[tqdm]) -> list:
    if threads is None:
        threads = usable_cores()
    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = []
        for result in pool.map(fn, items) if threads > 1 else map(fn, items):
            results.append(result)
            if bar is not None:
                bar.update()
    return results


def _mib(nbytes: int) -> str:
    return f'{nbytes / 2**20:.0f} MiB' if nbytes >= 2**20 else f'{nbytes / 1024:.0f} KiB'
