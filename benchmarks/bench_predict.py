"""``boatvit predict`` at scale: images/s of the whole pipeline (read and decode the JPEGs, eval transform, forward,
softmax, top-k, a CSV row per image) against the bare forward pass of the same model at the same batch.

A folder of photo-like JPEGs is generated per case: random crops of scikit-learn's two sample photos (china.jpg,
flower.jpg), saved a little larger than the model's input so that the eval transform resizes and centre-crops as it
does for real photos. Both figures are timed in interleaved rounds (see ``benchmarks.common``), each round one full
pass over the images: the bare forward over random tensors of the same shape, and
``boatvit.prediction.predict_to_file`` into a CSV (``--overwrite``), whose own clock starts at the first batch
asked of the loader (the weights are read before it). Randomly initialised weights.

    python -m benchmarks.bench_predict                                  # both cases, CPU, 2 threads
    python -m benchmarks.bench_predict --cases 32 --images 512 --workers 0 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from benchmarks.common import (
    add_device_args,
    build_model,
    environment,
    median,
    non_negative_int,
    positive_int,
    print_table,
    ratio,
    setup,
    sync,
    write_json,
)
from boatvit.prediction import predict_to_file
from boatvit.runs import save_weights

# case -> (model, input size, images, batch)
CASES = {
    '32': ('boat_swin_nano_32', 32, 4096, 64),
    '224': ('boat_swin_tiny_224', 224, 64, 16),
}
COLUMNS = [
    'case',
    'model',
    'workers',
    'batch',
    'images',
    'forward_img_s',
    'predict_img_s',
    'ratio',
    'round_ratio_q1',
    'round_ratio_q3',
]


def write_photos(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """``count`` JPEGs of ``size * 8/7`` pixels a side (the eval transform's crop is 7/8), random crops of the sample
    photos at random scales."""
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(load_sample_image(name)) for name in ('china.jpg', 'flower.jpg')]
    side = round(size * 8 / 7)
    folder.mkdir(parents=True)
    for i in range(count):
        photo = photos[i % 2]
        crop = int(rng.integers(min(photo.size) // 4, min(photo.size)))
        left, top = (int(rng.integers(0, extent - crop + 1)) for extent in photo.size)
        image = photo.crop((left, top, left + crop, top + crop)).resize((side, side), Image.Resampling.BICUBIC)
        image.save(folder / f'{i:06d}.jpg', quality=90)


def bare_forward(model: torch.nn.Module, images: int, batch: int, size: int, device: str) -> float:
    """Seconds of the forward passes over ``images`` random images in batches of ``batch``."""
    x = torch.randn(batch, 3, size, size, device=device)
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, images, batch):
            model(x[: min(batch, images - first)])
    sync(device)
    return time.perf_counter() - start


def run_case(args: argparse.Namespace, case: str, root: Path) -> List[Dict[str, Any]]:
    name, size, images, batch = CASES[case]
    images = args.images or images
    folder = root / f'photos_{case}'
    write_photos(folder, images, size)
    model = build_model(name, args.device).eval()
    weights = root / f'{case}.safetensors'
    save_weights(weights, model.state_dict(), {'model': name, 'model_kwargs': {}})
    rows = []
    for workers in args.workers:

        def predict() -> float:
            summary = predict_to_file(
                [str(folder)],
                weights,
                root / f'{case}.csv',
                overwrite=True,
                batch_size=batch,
                workers=workers,
                device=args.device,
                progress=False,
            )
            return summary.seconds

        passes = {'forward': lambda: bare_forward(model, images, batch, size, args.device), 'predict': predict}
        for _ in range(args.warmup):
            for step in passes.values():
                step()
        seconds = {key: [] for key in passes}
        for r in range(args.repeats):
            for key in list(passes)[r % 2 :] + list(passes)[: r % 2]:
                seconds[key].append(passes[key]())
        forward, predicted = (images / median(seconds[key]) for key in ('forward', 'predict'))
        spread = ratio(seconds, 'forward', 'predict')  # forward time over predict time: predict's share of the speed
        rows.append(
            {
                'case': f'{size} px',
                'model': name,
                'workers': workers,
                'batch': batch,
                'images': images,
                'forward_img_s': forward,
                'predict_img_s': predicted,
                'ratio': predicted / forward,
                'round_ratio_q1': spread['round_ratio_q1'],
                'round_ratio_q3': spread['round_ratio_q3'],
                'seconds': seconds,
            }
        )
        print_table(f'{name}, {size} px JPEGs', rows[-1:], COLUMNS)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_args(parser)
    parser.add_argument('--cases', nargs='+', choices=sorted(CASES), default=list(CASES), help='input sizes')
    parser.add_argument('--images', type=positive_int, help='images per case (default: 4096 at 32 px, 64 at 224)')
    parser.add_argument(
        '--workers', type=non_negative_int, nargs='+', default=[0, 1], help='data-loader processes to time'
    )
    args = parser.parse_args()
    if args.compile:
        parser.error('--compile: this benchmark times the eager model that predict runs by default')
    # fewer rounds than the model benchmarks by default: each round is a whole pass over the folder
    args.repeats = 3 if args.repeats is None else args.repeats
    args.warmup = 1 if args.warmup is None else args.warmup
    setup(args)
    env = environment(args)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for case in args.cases for row in run_case(args, case, Path(tmp))]
    print_table('predict against the bare forward pass (images/s)', rows, COLUMNS)
    write_json(args, 'bench_predict', {'environment': env, 'rows': rows})


if __name__ == '__main__':
    main()
