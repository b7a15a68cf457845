"""The top-k classes of images, with the model's own eval transform: to the terminal, or to a results file that
is written as it goes, resumed, and shared by the processes of a torchrun job.

The transform is the one the weights record (`boatvit train` writes it), else timm's eval transform from the
model's pretrained cfg (resize, centre crop, normalise): `boatvit.data.eval_data_config`. Class names come from the
weights (``classes``), else from timm's ImageNet-1k table for 1000-class models, else they are the class indices.
Images are decoded in data-loader workers; an unreadable one gets its error in place of predictions.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from PIL import Image
from timm.data import ImageNetInfo
from tqdm import tqdm

from .data import (
    ImageFiles,
    collate_image_files,
    default_workers,
    eval_data_config,
    eval_transform,
    find_images,
    normalize_images,
    shard,
)
from .errors import UnreadableImageError, UsageError
from .results_file import ResultsFile, check_results_path, flat_row
from .runtime import autocast, check_amp, init_distributed, out_of_memory, resolve_amp, resolve_device
from .weights import LoadedModel, load_model

__all__ = ['class_names', 'predict_batches', 'predict', 'predict_images', 'predict_to_file', 'PredictionSummary']


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
def predict_batches(
    model: torch.nn.Module,
    images: Sequence[Path],
    transform: Callable[[Image.Image], torch.Tensor],
    names: Sequence[str],
    topk: int = 5,
    batch_size: int = 16,
    device: torch.device = torch.device('cpu'),
    workers: int = 0,
    amp: str = 'none',
    fixed_batch: bool = False,
    progress: bool = True,
    normalize: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
) -> Iterator[List[Dict[str, Any]]]:
    """Top-``topk`` classes and softmax probabilities of ``images``, one list of entries per batch, in order.

    Args:
        model: a classifier, on ``device``, in eval mode.
        workers: data-loader processes that read and transform the images (0: this process).
        amp: an autocast dtype of `boatvit.runtime.AMP_DTYPES`; the softmax is taken in float32.
        fixed_batch: every forward gets ``batch_size`` images, the last batch and those with unreadable images padded
            with copies: a ``torch.compile``d model then runs one graph instead of compiling one per size.
        progress: a progress bar (when there are 2 images or more).
        normalize: ``(mean, std)`` when ``transform`` stops at uint8 images (`boatvit.data.eval_transform` with
            ``normalize=False``): each batch is then normalised on ``device`` (`boatvit.data.normalize_images`).

    Yields:
        ``{'image': str, 'predictions': [{'rank', 'index', 'name', 'probability'}, ...]}`` per image, or
        ``{'image': str, 'error': str}`` for one that cannot be read.

    Raises:
        UsageError: a batch that does not fit in the device's memory.
    """
    k = min(topk, len(names))
    loader = torch.utils.data.DataLoader(
        ImageFiles(images, transform),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_image_files,
        pin_memory=device.type == 'cuda',
    )
    with tqdm(total=len(images), unit='image', disable=not progress or len(images) < 2) as bar:
        for indices, pixels, errors in loader:
            entries = [{'image': str(images[i]), **({'error': e} if e else {})} for i, e in zip(indices, errors)]
            if pixels is not None:
                count = len(pixels)
                if fixed_batch and count < batch_size:
                    pixels = pixels[torch.arange(batch_size) % count]
                pixels = pixels.to(device, non_blocking=True)
                if normalize is not None:
                    pixels = normalize_images(pixels, *normalize)
                try:
                    with autocast(device, amp):
                        logits = model(pixels)
                except RuntimeError as e:
                    if out_of_memory(e):
                        raise UsageError(
                            f'--batch-size {batch_size} does not fit in memory on {device}; lower it'
                        ) from e
                    raise
                probs, top = logits[:count].float().softmax(dim=-1).topk(k, dim=-1)
                read = (entry for entry in entries if 'error' not in entry)
                for entry, p, idx in zip(read, probs.tolist(), top.tolist()):
                    entry['predictions'] = [
                        {'rank': r + 1, 'index': i, 'name': names[i], 'probability': prob}
                        for r, (prob, i) in enumerate(zip(p, idx))
                    ]
            bar.update(len(entries))
            yield entries


def predict(
    model: torch.nn.Module,
    images: Sequence[Path],
    transform: Callable[[Image.Image], torch.Tensor],
    names: Sequence[str],
    topk: int = 5,
    batch_size: int = 16,
    device: torch.device = torch.device('cpu'),
    workers: int = 0,
    amp: str = 'none',
) -> List[Dict[str, Any]]:
    """:func:`predict_batches` as one list, with the model moved to ``device`` in eval mode.

    Raises:
        UnreadableImageError: none of the images could be read.
    """
    model.eval().to(device)
    return _readable(predict_batches(model, images, transform, names, topk, batch_size, device, workers, amp))


def _readable(batches: Iterator[List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """The entries of ``batches`` as one list, unless none of the images could be read."""
    entries = [entry for batch in batches for entry in batch]
    if all('error' in entry for entry in entries):
        reasons = '; '.join(entry['error'] for entry in entries[:3])
        raise UnreadableImageError(f'none of the {len(entries)} images could be read: {reasons}')
    return entries


def _check_arguments(topk: int, batch_size: int, amp: str) -> None:
    if topk < 1:
        raise UsageError(f'--topk must be at least 1, got {topk}')
    if batch_size < 1:
        raise UsageError(f'--batch-size must be at least 1, got {batch_size}')
    check_amp(amp)


def _load_classifier(
    weights: Union[str, os.PathLike], model: Optional[str], model_kwargs: Optional[Mapping[str, Any]], use_ema: bool
) -> LoadedModel:
    loaded = load_model(weights, model=model, model_kwargs=model_kwargs, use_ema=use_ema)
    if loaded.model.num_classes == 0:
        raise UsageError(
            f'{weights}: the weights have no classifier (num_classes 0), so there is nothing to '
            'predict; use weights with a classification head'
        )
    return loaded


def _uint8_pixels(loaded: LoadedModel) -> Dict[str, Any]:
    """The eval transform up to uint8 images, and the mean and std that `predict_batches` normalises them with."""
    config = eval_data_config(loaded.model, loaded.metadata)
    return {
        'transform': eval_transform(loaded.model, loaded.metadata, normalize=False),
        'normalize': (config['mean'], config['std']),
    }


def _runnable(loaded: LoadedModel, device: torch.device, compile: bool) -> torch.nn.Module:
    """The model on ``device``, in eval mode, ``torch.compile``d (inductor, static shapes) when asked."""
    model = loaded.model.eval().to(device)
    return torch.compile(model, dynamic=False) if compile else model


def predict_images(
    paths: Sequence[str],
    weights: Union[str, os.PathLike],
    model: Optional[str] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    use_ema: bool = True,
    topk: int = 5,
    batch_size: int = 16,
    workers: Optional[int] = None,
    amp: str = 'auto',
    compile: bool = False,
    device: str = 'auto',
) -> List[Dict[str, Any]]:
    """:func:`predict` for image files and directories with any weight source (`boatvit.weights.load_model`).

    ``workers`` None: data-loader processes by core count (`boatvit.data.default_workers`). ``compile``:
    ``torch.compile`` the model first (its first batch compiles). ``amp`` 'auto': bf16 where bf16 matrix products
    are faster than float32, as in training (`boatvit.runtime.resolve_amp`).

    Raises:
        UsageError: bad arguments, images or weights, named.
    """
    _check_arguments(topk, batch_size, amp)
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        raise UsageError(
            'under torchrun pass --results-file: its processes share the images and merge their rows into that file'
        )
    images = find_images(paths)
    loaded = _load_classifier(weights, model, model_kwargs, use_ema)
    run_on = resolve_device(device)
    amp = resolve_amp(amp, run_on)[0]
    return _readable(
        predict_batches(
            _runnable(loaded, run_on, compile),
            images,
            names=class_names(loaded.model.num_classes, loaded.metadata),
            topk=topk,
            batch_size=batch_size,
            device=run_on,
            workers=default_workers() if workers is None else workers,
            amp=amp,
            fixed_batch=compile,
            **_uint8_pixels(loaded),
        )
    )


@dataclass
class PredictionSummary:
    """What :func:`predict_to_file` did, over all processes.

    Attributes:
        path: the results file.
        predicted: images predicted by this run.
        failed: images this run could not read (their rows hold the error).
        already: images that had a row before this run (``resume``), not predicted again.
        seconds: from the first batch asked of the loader to this process's last row written.
        amp: the autocast dtype of `boatvit.runtime.AMP_DTYPES` the forward passes ran in ('none': float32).
        main_process: whether this process reports (rank 0, or the only process).
    """

    path: Path
    predicted: int
    failed: int
    already: int
    seconds: float
    amp: str = 'none'
    main_process: bool = True

    @property
    def images_per_s(self) -> float:
        """Images of all processes together per second of this one (they run side by side)."""
        return (self.predicted + self.failed) / self.seconds if self.seconds else 0.0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _record(loaded: LoadedModel, names: Sequence[str], topk: int, amp: str) -> Dict[str, Any]:
    """What a results file is written for (its ``.meta.json``), as JSON reads it back (tuples as lists). The
    precision (``amp``) of the run that started the file is recorded but not checked: a resume on a machine without
    bf16 units may continue it in float32."""
    record = {
        'weights': str(loaded.weights.path),
        'weights_sha256': _sha256(loaded.weights.path),
        'entry': loaded.entry,
        'model': loaded.name,
        'model_kwargs': loaded.model_kwargs,
        'topk': topk,
        'classes': list(names),
        'amp': amp,
    }
    return json.loads(json.dumps(record))


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def _sum_over_ranks(counts: Tuple[int, ...], device: torch.device, world_size: int) -> Tuple[int, ...]:
    if world_size == 1:
        return counts
    total = torch.tensor(counts, dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return tuple(total.tolist())


def predict_to_file(
    paths: Sequence[str],
    weights: Union[str, os.PathLike],
    results_file: Union[str, os.PathLike],
    resume: bool = False,
    overwrite: bool = False,
    model: Optional[str] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    use_ema: bool = True,
    topk: int = 5,
    batch_size: int = 16,
    workers: Optional[int] = None,
    amp: str = 'auto',
    compile: bool = False,
    device: str = 'auto',
    progress: bool = True,
) -> PredictionSummary:
    """Predict image files and directories into a results file (`boatvit.results_file`), row by row.

    Under torchrun (``WORLD_SIZE`` in the environment) every process takes every ``WORLD_SIZE``-th image of the
    sorted list that the file lacks, writes its own rows, and rank 0 merges them into the one file at the end.

    Args:
        paths: image files and directories (searched recursively, sorted).
        weights, model, model_kwargs, use_ema: see `boatvit.weights.load_model`.
        results_file: ``.csv``, ``.jsonl``, ``.json`` or ``.parquet``, in a folder that exists.
        resume: add the images the file lacks to it; it must have been written for the same weights and top-k.
        overwrite: replace an existing file. Without ``resume`` or ``overwrite`` an existing file is refused.
        topk, batch_size, amp, device: how to predict (``batch_size`` per process; ``amp`` 'auto' as in
            :func:`predict_images`).
        workers: data-loader processes per process; None: by core count.
        compile: ``torch.compile`` the model first (its first batch compiles).
        progress: a progress bar on rank 0.

    Raises:
        UsageError: bad arguments, images, weights or results file, named, before anything is written.
        UnreadableImageError: none of the images could be read (their rows, with the errors, are in the file).
    """
    _check_arguments(topk, batch_size, amp)
    path = check_results_path(results_file)
    images = find_images(paths)
    rank, world_size, run_on = init_distributed(device)
    try:
        amp = resolve_amp(amp, run_on)[0]
        loaded = _load_classifier(weights, model, model_kwargs, use_ema)
        names = class_names(loaded.model.num_classes, loaded.metadata)
        results = ResultsFile(path, min(topk, len(names)))
        record = _record(loaded, names, topk, amp)
        results.check(record, resume, overwrite)
        _barrier(world_size)  # every rank has checked the files before rank 0 changes them
        if rank == 0:
            results.start(record, overwrite)
        _barrier(world_size)
        todo, already = results.lacking(images)
        if workers is None:
            workers = default_workers(int(os.environ.get('LOCAL_WORLD_SIZE', '1')))
        batches = predict_batches(
            _runnable(loaded, run_on, compile),
            list(shard(todo, rank, world_size)),
            names=names,
            topk=topk,
            batch_size=batch_size,
            device=run_on,
            workers=workers,
            amp=amp,
            fixed_batch=compile,
            progress=progress and rank == 0,
            **_uint8_pixels(loaded),
        )
        predicted = failed = 0
        start = time.perf_counter()
        try:
            with results.writer(rank, world_size) as out:
                for entries in batches:
                    out.write([flat_row(entry, results.k) for entry in entries])
                    bad = sum('error' in entry for entry in entries)
                    predicted, failed = predicted + len(entries) - bad, failed + bad
        except KeyboardInterrupt as e:
            e.add_note(f'the rows done are in {path}; add --resume to the same command to predict the rest')
            raise
        seconds = time.perf_counter() - start
        predicted, failed = _sum_over_ranks((predicted, failed), run_on, world_size)
        _barrier(world_size)  # every rank's rows are written
        if rank == 0:
            results.finish()
            if failed and not predicted:
                raise UnreadableImageError(
                    f'none of the {failed} images could be read; they are listed with their errors in {path}'
                )
        return PredictionSummary(path, predicted, failed, already, seconds, amp, rank == 0)
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
