"""Transfer really happens: fine-tuning from weights against training from scratch, at the same number of steps.

The embedded model (boat_swin_nano_32, recipe ``digits``) is trained on digit classes 0-4; then, per seed, a few
labelled images of each of the classes 5-9 are drawn and a model is trained on them with ``boatvit train`` twice:
fine-tuned from the 0-4 run (``--weights``, the ``finetune-swin`` preset), and from scratch (the ``digits``
recipe's settings, which are tuned for this model from scratch), with the same epochs, batch size, learning rate and
augmentation (the digits recipe's), so the same optimizer steps on the same images. Both are scored on the
held-out digits 5-9 (the validation split, never trained on). Accuracy only: no timing::

    python -m benchmarks.bench_transfer                      # 3 seeds, 10 images per class
    python -m benchmarks.bench_transfer --seeds 5 --shots 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import timm
import torch
from PIL import Image

from benchmarks.common import environment, positive_int, print_table, write_json
from boatvit.data import DigitsDataset, eval_transform
from boatvit.evaluation import evaluate_weights
from boatvit.recipes import RECIPES
from boatvit.training import config_from_values, learning_rate, train
from boatvit.weights import load_model

# the augmentation the digits need (no flips, colour or large crops: digits are small, grey and not symmetric),
# the same in every run so that only the starting weights and the optimiser settings differ
DIGITS_AUG = dict(
    {k: RECIPES['digits'][k] for k in ('hflip', 'color_jitter', 'scale', 'ratio', 'reprob', 'crop_pct')}, aa='none'
)

SOURCE_CLASSES, TARGET_CLASSES = range(5), range(5, 10)


def write_folder(root: Path, splits: Dict[str, DigitsDataset], classes: range, shots: int, seed: int) -> Path:
    """An image folder of the digits ``classes``: ``val`` (every validation image), ``check`` (the first 10 of them
    per class, validated after every epoch: cheaper) and ``train`` (``shots`` training images per class drawn with
    ``seed``, all of them when ``shots`` is 0)."""
    rng = np.random.default_rng(seed)
    for split, ds in (('train', splits['train']), ('val', splits['val']), ('check', splits['val'])):
        for digit in classes:
            indices = [i for i, t in enumerate(ds.targets) if t == digit]
            if split == 'train' and shots:
                indices = sorted(rng.choice(indices, size=shots, replace=False).tolist())
            if split == 'check':
                indices = indices[:10]
            folder = root / split / str(digit)
            folder.mkdir(parents=True)
            for i in indices:
                Image.fromarray(ds.images[i]).save(folder / f'{i}.png')
    return root


def run(values: dict, recipe: Optional[str], output: Path, name: str) -> float:
    """Train, then score the last epoch's weights on the whole held-out ``val`` split: top-1 %."""
    config, recipe = config_from_values(dict(values, val_split='check'), recipe)
    train(config, recipe, output=output, name=name, device='cpu', workers=0, progress=False)
    result = evaluate_weights(output / name / 'last.safetensors', data=values['data'], split='val', workers=0)
    return result['top1']


def linear_probes(source: Path, data: str) -> Dict[str, float]:
    """Held-out top-1 % of a logistic regression on the few training images of ``data``, fitted to three
    representations: the pooled features of the ``source`` model, those of a randomly initialised one, and the
    pixels. Tells whether the source's features carry more about the new classes than no training at all."""
    from sklearn.linear_model import LogisticRegression
    from torchvision.datasets import ImageFolder

    loaded = load_model(source)
    torch.manual_seed(0)
    models = {'source': loaded.model, 'random_init': timm.create_model(loaded.name, num_classes=5).eval()}
    transform = eval_transform(loaded.model, loaded.metadata)
    inputs = {}
    for split in ('train', 'val'):
        ds = ImageFolder(str(Path(data) / split), transform=transform)
        inputs[split] = (torch.stack([image for image, _ in ds]), np.array(ds.targets))
    scores = {}
    for name, model in [*models.items(), ('pixels', None)]:
        with torch.no_grad():
            x = {
                split: (
                    images.flatten(1) if model is None else model.forward_head(model.forward_features(images), True)
                )
                for split, (images, _) in inputs.items()
            }
        clf = LogisticRegression(max_iter=5000).fit(x['train'].numpy(), inputs['train'][1])
        scores[f'probe_{name}'] = 100 * clf.score(x['val'].numpy(), inputs['val'][1])
    return scores


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seeds', type=positive_int, default=3, help='few-shot draws and initialisations')
    parser.add_argument('--shots', type=positive_int, default=10, help='labelled images per new class')
    parser.add_argument('--source-epochs', type=positive_int, default=15, help='epochs on digits 0-4')
    parser.add_argument('--epochs', type=positive_int, default=20, help='epochs on the few images of 5-9')
    parser.add_argument(
        '--lr', type=float, default=None, help="fine-tuning lr; default: the from-scratch run's (the same in both)"
    )
    parser.add_argument('--batch-size', type=positive_int, default=10, help='batch of both runs on 5-9')
    parser.add_argument('--threads', type=positive_int, default=2, help='CPU threads (torch.set_num_threads)')
    parser.add_argument('--output', type=Path, default=None, help='keep the runs here (default: temporary)')
    parser.add_argument('--json', type=Path, default=None, help='where to write the results (default: results/)')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.device, args.compile, args.repeats, args.warmup = 'cpu', False, args.seeds, 0  # for environment()
    env = environment(args)
    splits = {'train': DigitsDataset('train'), 'val': DigitsDataset('val')}

    rows: List[Dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.output or Path(tmp)
        source_data = write_folder(tmp / 'digits0-4', splits, SOURCE_CLASSES, shots=0, seed=0)
        digits = dict(data=str(source_data), model='boat_swin_nano_32', img_size=32)
        source = run(dict(digits, epochs=args.source_epochs), 'digits', tmp, 'source')
        print(f'digits 0-4, {args.source_epochs} epochs: held-out top-1 {source:.2f} %', flush=True)
        for seed in range(args.seeds):
            data = str(write_folder(tmp / f'digits5-9-seed{seed}', splits, TARGET_CLASSES, args.shots, seed))
            same = dict(DIGITS_AUG, data=data, epochs=args.epochs, batch_size=args.batch_size, seed=seed)
            scratch_values = dict(same, model='boat_swin_nano_32', img_size=32)
            # the preset's lr is for a large model on photos; on this small one both runs get the same lr
            lr = args.lr or learning_rate(config_from_values(scratch_values, 'digits')[0], world_size=1)
            finetuned = run(dict(same, weights=str(tmp / 'source'), lr=lr), None, tmp, f'finetune{seed}')
            scratch = run(scratch_values, 'digits', tmp, f'scratch{seed}')
            rows.append({'seed': seed, 'finetune_top1': finetuned, 'scratch_top1': scratch})
            rows[-1].update(linear_probes(tmp / 'source', data))
            print(f'seed {seed}: fine-tuned {finetuned:.2f} %, from scratch {scratch:.2f} %', flush=True)
    mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0] if k != 'seed'}
    print_table(
        f'digits 5-9, {args.shots} images per class, {args.epochs} epochs of batch {args.batch_size}: held-out top-1 %',
        rows,
        ['seed', 'finetune_top1', 'scratch_top1', 'probe_source', 'probe_random_init', 'probe_pixels'],
    )
    print(f'mean: fine-tuned {mean["finetune_top1"]:.2f} %, from scratch {mean["scratch_top1"]:.2f} %')
    write_json(
        args,
        'bench_transfer',
        {'environment': env, 'source_top1': source, 'runs': rows, 'mean': mean},
    )


if __name__ == '__main__':
    main_benchmark()
