"""Transfer really happens: fine-tuning from weights against training from scratch, at the same number of steps.

Two scenarios, each with a source run of the embedded model (boat_swin_nano_32, recipe ``digits``) and, per seed,
a few labelled images per class of a target task trained with ``boatvit train`` several times: from the source
(``--weights``, the ``finetune-swin`` preset) as the preset is (``finetune_preset``), at each ``--finetune-lr``
(``finetune_lr_<lr>``), and with the backbone frozen at ``--frozen-lr`` (``frozen``, a linear probe); and one from
scratch (the ``digits`` recipe's settings, tuned for this model from scratch). All have the same epochs, batch and
augmentation (the digits recipe's), so the same number of optimizer steps on the same images, and are scored with
their last weights on the held-out validation images of the target classes (never trained on by any run).

- ``new-classes`` (the question asked): source on digits 0-4, target digits 5-9.
- ``new-images`` (the control): source on all ten digits, half of the training images of each; target the ten
  digits under other class names (so the head is new), a few images drawn from the other half.

Each row also has linear probes: a logistic regression fitted on the target's few images to the source's pooled
features, to an untrained model's and to the pixels. Fine-tuning can only gain where the source's features tell
the target classes apart better than an untrained model's. Accuracy only, no timing::

    python -m benchmarks.bench_transfer                      # 3 seeds, 5 images per class, both scenarios
    python -m benchmarks.bench_transfer --seeds 5 --shots 10 --scenarios new-classes
    python -m benchmarks.bench_transfer --scenarios photos --photos /data/cifar10   # real photos, 10 and 50 per class

``photos`` (CIFAR-10 as image folders): the source is BOAT trained from scratch (``boatvit train --data`` with its
fitted defaults and ``--source-budget``) on the first five classes, the target the other five with 10 and 50
photos per class (``--photo-shots``); the same runs and probes, with crops and flips as augmentation.
``--source RUN_DIR`` reuses a photos source run (``photos-source`` under an earlier ``--output``) instead of
training one, so that fine-tuning settings compare on the same source.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import timm
import torch
from PIL import Image

from benchmarks.common import environment, positive_int, print_table, write_json
from boatvit.data import DigitsDataset, eval_transform
from boatvit.errors import UsageError
from boatvit.evaluation import evaluate_weights
from boatvit.recipes import RECIPES
from boatvit.runs import read_run_config
from boatvit.training import config_from_values, train
from boatvit.weights import load_model

# the augmentation the digits need (no flips, colour or large crops: digits are small, grey and not symmetric),
# the same in every run so that only the starting weights and the optimiser settings differ
DIGITS_AUG = dict(
    {k: RECIPES['digits'][k] for k in ('hflip', 'color_jitter', 'scale', 'ratio', 'reprob', 'crop_pct')}, aa='none'
)

# photos (CIFAR-10's classes): crops and flips, the same in every run; float32 everywhere (the default, --amp auto,
# is bf16 on some machines), so that the figures of machines with and without bf16 units compare
PHOTO_AUG = dict(
    hflip=0.5,
    scale=(0.35, 1.0),
    ratio=(3 / 4, 4 / 3),
    color_jitter=0.0,
    reprob=0.0,
    aa='none',
    mixup=0.0,
    cutmix=0.0,
    crop_pct=1.0,
    amp='none',
)

# scenario: (source classes, source images per class, target classes, target class-name prefix)
SCENARIOS = {
    'new-classes': (range(5), 'all', range(5, 10), ''),
    'new-images': (range(10), 'even', range(10), 'digit-'),
}


def write_folder(
    root: Path,
    splits: Dict[str, DigitsDataset],
    classes: range,
    shots: int,
    seed: int,
    images: str = 'all',
    prefix: str = '',
) -> Path:
    """An image folder of the digits ``classes`` (folders named ``prefix + digit``): ``val`` (every validation image),
    ``check`` (the first 10 of them per class, validated after every epoch: cheaper) and ``train``: of each class's
    training images, ``images`` ('all', or the 'even' or 'odd' places of its list), ``shots`` of them drawn with
    ``seed`` (all when ``shots`` is 0)."""
    rng = np.random.default_rng(seed)
    for split, ds in (('train', splits['train']), ('val', splits['val']), ('check', splits['val'])):
        for digit in classes:
            indices = [i for i, t in enumerate(ds.targets) if t == digit]
            if split == 'train':
                indices = {'all': indices, 'even': indices[0::2], 'odd': indices[1::2]}[images]
                if shots:
                    indices = sorted(rng.choice(indices, size=shots, replace=False).tolist())
            if split == 'check':
                indices = indices[:10]
            folder = root / split / f'{prefix}{digit}'
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


def scenario(
    name: str, args: argparse.Namespace, splits: Dict[str, DigitsDataset], tmp: Path
) -> Tuple[float, List[Dict[str, float]]]:
    """The source run's held-out top-1 % and one row per seed."""
    source_classes, source_images, target_classes, prefix = SCENARIOS[name]
    source_data = write_folder(tmp / f'{name}-source-data', splits, source_classes, 0, 0, images=source_images)
    source_dir = f'{name}-source'
    digits = dict(data=str(source_data), model='boat_swin_nano_32', img_size=32, epochs=args.source_epochs)
    source = run(digits, 'digits', tmp, source_dir)
    print(f'{name}: source, digits {list(source_classes)}, held-out top-1 {source:.2f} %', flush=True)
    target_images = 'odd' if source_images == 'even' else 'all'
    rows = []
    for seed in range(args.seeds):
        data = write_folder(
            tmp / f'{name}-target-seed{seed}', splits, target_classes, args.shots, seed, target_images, prefix
        )
        same = dict(DIGITS_AUG, data=str(data), epochs=args.epochs, batch_size=args.batch_size, seed=seed)
        rows.append(compare({'scenario': name, 'seed': seed}, same, 'digits', tmp / source_dir, args, tmp))
    return source, rows


def finetune_column(lr: float) -> str:
    return f'finetune_lr_{lr:g}'


def compare(row: Dict[str, Any], same: dict, scratch_recipe: str, source: Path, args, tmp: Path) -> Dict[str, Any]:
    """``row`` with the runs on one target folder (``same``: its data, epochs, batch, augmentation and seed) and
    the linear probes."""
    tag = '-'.join(str(v) for v in row.values())
    weights = dict(same, weights=str(source))
    row['finetune_preset'] = run(weights, None, tmp, f'{tag}-ft')
    for lr in args.finetune_lr:
        row[finetune_column(lr)] = run(dict(weights, lr=lr), None, tmp, f'{tag}-ft-lr{lr:g}')
    row['frozen'] = run(dict(weights, lr=args.frozen_lr, freeze_backbone=True), None, tmp, f'{tag}-frozen')
    row['scratch'] = run(dict(same, model='boat_swin_nano_32', img_size=32), scratch_recipe, tmp, f'{tag}-scratch')
    row.update(linear_probes(source, same['data']))
    print(', '.join(f'{k} {v}' if isinstance(v, (str, int)) else f'{k} {v:.2f} %' for k, v in row.items()))
    return row


def link_folder(root: Path, photos: Path, classes: List[str], shots: int, seed: int) -> Path:
    """An image folder of links to the ``photos`` of ``classes``: ``val`` (all their validation photos), ``check``
    (the first 20 of each class, validated after every epoch) and ``train`` (``shots`` photos per class drawn with
    ``seed``, all when 0)."""
    rng = np.random.default_rng(seed)
    for split, source in (('train', 'train'), ('val', 'val'), ('check', 'val')):
        for name in classes:
            files = sorted((photos / source / name).iterdir())
            if split == 'train' and shots:
                files = [files[i] for i in sorted(rng.choice(len(files), size=shots, replace=False))]
            if split == 'check':
                files = files[:20]
            folder = root / split / name
            folder.mkdir(parents=True)
            for f in files:
                (folder / f.name).symlink_to(f.resolve())
    return root


def photo_scenario(args: argparse.Namespace, tmp: Path) -> Tuple[float, List[Dict[str, Any]]]:
    """``photos``: CIFAR-10's first five classes (all their photos) as the source, trained from scratch in
    ``--source-budget`` (or ``--source``, trained before); its last five as the target, ``--photo-shots`` photos per
    class. The source's held-out top-1 % and one row per shots and seed."""
    classes = sorted(p.name for p in (args.photos / 'train').iterdir() if p.is_dir())
    if args.source:
        source_dir = args.source
        source_data = args.source_config['config']['data']
        source = evaluate_weights(source_dir / 'last.safetensors', data=source_data, split='val', workers=0)['top1']
    else:
        source_dir = tmp / 'photos-source'
        source_data = link_folder(tmp / 'photos-source-data', args.photos, classes[:5], 0, 0)
        source = run(dict(data=str(source_data), time_budget=args.source_budget), None, tmp, 'photos-source')
    print(f'photos: source, {classes[:5]}, held-out top-1 {source:.2f} %', flush=True)
    rows = []
    for shots in args.photo_shots:
        for seed in range(args.seeds):
            data = link_folder(tmp / f'photos-target-{shots}-seed{seed}', args.photos, classes[5:], shots, seed)
            same = dict(PHOTO_AUG, data=str(data), epochs=args.epochs, batch_size=args.batch_size, seed=seed)
            row = {'scenario': 'photos', 'shots': shots, 'seed': seed}
            rows.append(compare(row, same, 'small-data', source_dir, args, tmp))
    return source, rows


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        '--scenarios',
        nargs='+',
        choices=[*sorted(SCENARIOS), 'photos'],
        default=sorted(SCENARIOS),
        help="'photos' needs --photos",
    )
    parser.add_argument('--photos', type=Path, help='CIFAR-10 as image folders (train/, val/) for --scenarios photos')
    parser.add_argument('--photo-shots', type=positive_int, nargs='+', default=[10, 50], help='photos per class')
    parser.add_argument('--source-budget', default='10m', help='time budget of the photos source run')
    parser.add_argument('--seeds', type=positive_int, default=3, help='few-shot draws and initialisations')
    parser.add_argument('--shots', type=positive_int, default=5, help='labelled images per target class')
    parser.add_argument('--source-epochs', type=positive_int, default=6, help='epochs of the source runs')
    parser.add_argument('--epochs', type=positive_int, default=15, help='epochs on the few target images')
    parser.add_argument(
        '--finetune-lr',
        type=float,
        nargs='+',
        default=[2e-3],
        help="peak lrs of the fine-tuning runs beside the preset's, a run each (the preset's layer decay scales each"
        ' down towards the stem)',
    )
    parser.add_argument('--frozen-lr', type=float, default=2e-3, help='lr of the frozen-backbone run')
    parser.add_argument(
        '--source', type=Path, default=None, help='a photos source run directory to reuse instead of training one'
    )
    parser.add_argument('--batch-size', type=positive_int, default=5, help='batch of the runs on the target')
    parser.add_argument('--threads', type=positive_int, default=2, help='CPU threads (torch.set_num_threads)')
    parser.add_argument('--output', type=Path, default=None, help='keep the runs here (default: temporary)')
    parser.add_argument('--json', type=Path, default=None, help='where to write the results (default: results/)')
    args = parser.parse_args()
    if 'photos' in args.scenarios and not (args.photos and (args.photos / 'train').is_dir()):
        parser.error('--scenarios photos needs --photos DIR with train/ and val/ folders of class folders')
    try:  # a photos source run to reuse, read before any training
        args.source_config = read_run_config(args.source) if args.source else None
    except UsageError as e:
        parser.error(f'--source: {e}')
    torch.set_num_threads(args.threads)
    args.device, args.compile, args.repeats, args.warmup = 'cpu', False, args.seeds, 0  # for environment()
    env = environment(args)
    splits = {'train': DigitsDataset('train'), 'val': DigitsDataset('val')}

    sources: Dict[str, float] = {}
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.output or Path(tmp)
        for name in args.scenarios:
            if name == 'photos':
                sources[name], scenario_rows = photo_scenario(args, tmp)
            else:
                sources[name], scenario_rows = scenario(name, args, splits, tmp)
            for row in scenario_rows:
                row.setdefault('shots', args.shots)
            rows += scenario_rows
    columns = ['finetune_preset', *map(finetune_column, args.finetune_lr), 'frozen', 'scratch']
    columns += ['probe_source', 'probe_random_init', 'probe_pixels']
    groups = sorted({(r['scenario'], r['shots']) for r in rows})
    means = {
        f'{name} {shots}': {
            k: statistics.mean(r[k] for r in rows if (r['scenario'], r['shots']) == (name, shots)) for k in columns
        }
        for name, shots in groups
    }
    print_table(
        f'{args.epochs} epochs of batch {args.batch_size}: held-out top-1 %',
        rows + [{'scenario': name, 'seed': 'mean', **mean} for name, mean in means.items()],
        ['scenario', 'shots', 'seed', *columns],
    )
    write_json(args, 'bench_transfer', {'environment': env, 'source_top1': sources, 'runs': rows, 'mean': means})


if __name__ == '__main__':
    main_benchmark()
