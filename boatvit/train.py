"""``boatvit train``: train a model on the built-in digits, an image folder or a timm data set.

With no arguments it runs the embedded default (the ``digits`` recipe): a small BOAT-Swin on scikit-learn's
digits, on the CPU, in a few minutes. Under ``torchrun`` it trains with DistributedDataParallel, each process on
its own shard of every global batch; only rank 0 writes. Each run gets a directory (see `boatvit.runs`) and
``--resume RUN_DIR`` continues an interrupted run from its last finished epoch exactly as if it had not stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import timm
import torch
import torch.distributed as dist
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .cli import UsageError
from .data import DIGITS, check_same_classes, default_workers, open_split, shard
from .evaluate import AMP_DTYPES, autocast, build_model, eval_data_config, evaluate, out_of_memory, parse_kwarg, \
    resolve_device
from .recipes import DEFAULT_RECIPE, RECIPES
from .runs import CONFIG_FILE, load_state, new_run_dir, plot_curves, read_run_config, save_checkpoint, write_json, \
    write_metrics


@dataclasses.dataclass
class TrainConfig:
    """Everything that decides what a run computes; saved as the run's ``config.json``.

    The optimizer, schedule and augmentation defaults are the BOAT-Swin reference recipe's (`boatvit.recipes` holds
    the named presets, the embedded default among them).
    """

    # data
    data: Optional[str] = None  # 'digits', an image folder root (train/ and val/ inside) or a create_dataset root
    dataset: str = ''  # timm.data.create_dataset name, '' for an image folder
    train_split: str = 'train'
    val_split: str = 'val'
    download: bool = False
    # model
    model: str = 'boat_swin_nano_32'
    model_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    img_size: Optional[int] = None  # None: the model's default input size
    drop_path: float = 0.1
    grad_checkpointing: bool = False
    # optimisation
    epochs: int = 300
    batch_size: int = 128  # per process
    grad_accum: int = 1  # micro-batches per optimizer step
    opt: str = 'adamw'
    lr: Optional[float] = None  # None: lr_base * global batch / lr_base_size
    lr_base: float = 5e-4
    lr_base_size: int = 512
    weight_decay: float = 0.05
    clip_grad: Optional[float] = 5.0  # max gradient norm, None for no clipping
    warmup_epochs: int = 20
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    ema_decay: Optional[float] = None  # None: no EMA of the weights
    # regularisation and augmentation
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    aa: Optional[str] = 'rand-m9-mstd0.5-inc1'  # timm auto-augment policy, None for none
    reprob: float = 0.25
    remode: str = 'pixel'
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.4
    crop_pct: Optional[float] = None  # eval centre crop; None: the model's
    no_aug: bool = False  # train on the eval transform, no random crops, flips or RandAugment
    # precision, reproducibility and smoke tests
    amp: str = 'none'
    seed: int = 0
    limit_batches: Optional[int] = None  # at most this many batches per epoch, for training and for validation

    def __post_init__(self):
        # JSON turns tuples into lists; keep them hashable and comparable after a resume
        self.scale, self.ratio = tuple(self.scale), tuple(self.ratio)
        for name in ('epochs', 'batch_size', 'grad_accum', 'lr_base_size'):
            if getattr(self, name) < 1:
                raise UsageError(f'--{name.replace("_", "-")} must be at least 1, got {getattr(self, name)}')
        if self.limit_batches is not None and self.limit_batches < 1:
            raise UsageError(f'--limit-batches must be at least 1, got {self.limit_batches}')
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise UsageError(f'--ema-decay must lie in (0, 1), e.g. 0.9998, got {self.ema_decay}')
        if self.amp not in AMP_DTYPES:
            raise UsageError(f'--amp must be one of {sorted(AMP_DTYPES)}, got {self.amp!r}')
        if self.uses_mixup and self.batch_size % 2:
            raise UsageError(
                f'mixup and cutmix pair images within a batch; use an even --batch-size, not {self.batch_size}'
            )

    @property
    def uses_mixup(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


# command-line flags that only change how a run is carried out, not what it computes; --resume accepts them
RUNTIME_FLAGS = ('device', 'workers', 'output', 'name', 'quiet')


TRAIN_EXAMPLES = '''examples:
  boatvit train                                    # the embedded default, a few minutes on a CPU
  boatvit train --data DIR --recipe boat_swin_tiny_224
  boatvit train --data DIR --model boat_swin_tiny_224 --epochs 30 --batch-size 64 --amp bf16
  boatvit train --resume runs/RUN                  # continue an interrupted run
  torchrun --nproc_per_node 8 -m boatvit train --data DIR --recipe boat_cswin_tiny_224
  # 2 machines x 8 GPUs: the same command on each machine, HOST being machine 0
  torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id RUN_ID \\
      -m boatvit train --data DIR --recipe boat_cswin_tiny_224 --output SHARED_DIR/runs
'''


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'train',
        help='train a model; with no arguments, a small BOAT-Swin on the built-in digits in a few minutes on a CPU',
        description='Train a model. With no arguments: the embedded default (recipe "digits").\n'
                    'Flags override the recipe (boatvit/recipes.py); --recipe picks a reference ImageNet recipe.\n'
                    'The values a run used are in RUN_DIR/config.json.',
        epilog=TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # default=None throughout: a flag given on the command line is told apart from the recipe's value
    run_group = parser.add_argument_group('run')
    run_group.add_argument('--recipe', choices=sorted(RECIPES), default=None,
                           help=f'named preset; default: {DEFAULT_RECIPE!r} without --data, none with it')
    run_group.add_argument('--resume', metavar='RUN_DIR', help='continue an interrupted run from its last epoch')
    run_group.add_argument('--output', default='runs', help='parent directory of run directories')
    run_group.add_argument('--name', help='run directory name; default: time, model and data')
    run_group.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda'; under torchrun the local GPU")
    run_group.add_argument('--workers', type=int, default=None, help='data loader processes per training process')
    run_group.add_argument('--quiet', action='store_true', help='no progress bars, one log line per epoch')
    run_group.add_argument('--limit-batches', type=int, help='at most N batches per epoch (smoke tests)')
    run_group.add_argument('--seed', type=int)

    data = parser.add_argument_group('data')
    data.add_argument('--data', help="'digits', or a directory with train/ and val/ folders of class folders")
    data.add_argument('--dataset', help="timm.data.create_dataset name, e.g. 'torch/cifar10'; default: image folder")
    data.add_argument('--train-split', help='default: train')
    data.add_argument('--val-split', help='default: val')
    data.add_argument('--download', action='store_true', default=None, help='let --dataset download the data')

    model = parser.add_argument_group('model')
    model.add_argument('--model', help='timm model name, e.g. boat_swin_tiny_224')
    model.add_argument('--model-kwargs', nargs='*', type=parse_kwarg, metavar='KEY=VALUE',
                       help='extra model constructor arguments, e.g. embed_dim=48 depths=(2,2)')
    model.add_argument('--img-size', type=int, help="input size; default: the model's")
    model.add_argument('--drop-path', type=float, help='stochastic depth rate')
    model.add_argument('--grad-checkpointing', action='store_true', default=None,
                       help='recompute activations in the backward pass to save memory')

    optim = parser.add_argument_group('optimisation')
    optim.add_argument('--epochs', type=int)
    optim.add_argument('--batch-size', type=int, help='images per process and step')
    optim.add_argument('--grad-accum', type=int, help='micro-batches per optimizer step')
    optim.add_argument('--opt', help='timm optimizer name (default: adamw)')
    optim.add_argument('--lr', type=float, help='learning rate; default: --lr-base scaled to the global batch')
    optim.add_argument('--lr-base', type=float, help='learning rate at a global batch of --lr-base-size')
    optim.add_argument('--lr-base-size', type=int)
    optim.add_argument('--weight-decay', type=float)
    optim.add_argument('--clip-grad', type=float, help='max gradient norm; 0 for none')
    optim.add_argument('--warmup-epochs', type=int)
    optim.add_argument('--warmup-lr', type=float)
    optim.add_argument('--min-lr', type=float)
    optim.add_argument('--ema-decay', type=float, help='keep an EMA of the weights with this decay; 0 for none')
    optim.add_argument('--amp', choices=sorted(AMP_DTYPES), help='autocast dtype')

    aug = parser.add_argument_group('regularisation and augmentation')
    aug.add_argument('--smoothing', type=float, help='label smoothing')
    aug.add_argument('--mixup', type=float, help='mixup alpha, 0 for off')
    aug.add_argument('--cutmix', type=float, help='cutmix alpha, 0 for off')
    aug.add_argument('--mixup-prob', type=float)
    aug.add_argument('--mixup-switch-prob', type=float)
    aug.add_argument('--aa', help="timm auto-augment policy, e.g. 'rand-m9-mstd0.5-inc1'; 'none' for off")
    aug.add_argument('--reprob', type=float, help='random erasing probability')
    aug.add_argument('--remode', help='random erasing mode')
    aug.add_argument('--scale', type=float, nargs=2, help='random resized crop area range')
    aug.add_argument('--ratio', type=float, nargs=2, help='random resized crop aspect ratio range')
    aug.add_argument('--hflip', type=float, help='horizontal flip probability')
    aug.add_argument('--color-jitter', type=float)
    aug.add_argument('--crop-pct', type=float, help="eval centre-crop fraction; default: the model's")
    aug.add_argument('--no-aug', action='store_true', default=None, help='train on the eval transform')
    parser.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> Tuple[TrainConfig, Optional[str]]:
    """The recipe (if any) overridden by the flags given; returns the config and the recipe name."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name, None)
             is not None}
    # 0 and 'none' switch these off on the command line, where None cannot be typed
    for name in ('clip_grad', 'ema_decay'):
        if given.get(name) == 0:
            given[name] = None
    if given.get('aa') == 'none':
        given['aa'] = None
    # `--data digits` alone is still the embedded default, with its recipe
    recipe = args.recipe or (DEFAULT_RECIPE if given.get('data', DIGITS) == DIGITS else None)
    values = dict(RECIPES[recipe]) if recipe else {}
    model_kwargs = dict(values.get('model_kwargs', {}), **dict(given.pop('model_kwargs', [])))
    values.update(given, model_kwargs=model_kwargs)
    if values.get('data') is None:
        raise UsageError(f'recipe {recipe!r} needs --data DIR (with train/ and val/ folders of class folders)')
    return TrainConfig(**values), recipe


def global_batch_size(config: TrainConfig, world_size: int) -> int:
    return config.batch_size * config.grad_accum * world_size


def learning_rate(config: TrainConfig, world_size: int) -> float:
    """``--lr``, or ``--lr-base`` scaled linearly from ``--lr-base-size`` to the global batch."""
    if config.lr is not None:
        return config.lr
    return config.lr_base * global_batch_size(config, world_size) / config.lr_base_size


def rng_state() -> Dict[str, Any]:
    """Python, numpy and torch RNG states as plain Python values.

    Plain values because ``dist.all_gather_object`` cannot carry tensors on every backend, and
    ``torch.load(weights_only=True)`` accepts them.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        'python': random.getstate(),
        'numpy': [kind, keys.tolist(), pos, has_gauss, gauss],
        'torch': torch.get_rng_state().numpy().tobytes(),
        'cuda': [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state['python'])
    kind, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(_byte_tensor(state['torch']))
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in state['cuda']])


def _byte_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def report(message: str) -> None:
    """A line for the user on stdout; callers print from rank 0 only."""
    print(message, flush=True)


class Trainer:
    """The model and everything an optimizer step touches, with a resumable state.

    Args:
        model: the model on its device, wrapped in DistributedDataParallel when distributed.
        config: the run's configuration.
        device: where ``model`` lives.
        world_size: number of training processes.
        updates_per_epoch: optimizer steps per epoch (batches per epoch / grad_accum).
    """

    def __init__(self, model, config: TrainConfig, device: torch.device, world_size: int, updates_per_epoch: int):
        self.model = model
        self.config = config
        self.device = device
        self.world_size = world_size
        self.updates_per_epoch = updates_per_epoch
        self.num_updates = 0
        self.optimizer = create_optimizer_v2(
            unwrap(model), opt=config.opt, lr=learning_rate(config, world_size), weight_decay=config.weight_decay
        )
        # stepped per optimizer update, so short runs get a smooth warm-up and decay too
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched='cosine', num_epochs=config.epochs, warmup_epochs=config.warmup_epochs,
            warmup_lr=config.warmup_lr, min_lr=config.min_lr, step_on_epochs=False,
            updates_per_epoch=updates_per_epoch,
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.amp == 'fp16')
        self.ema = ModelEmaV3(unwrap(model), decay=config.ema_decay) if config.ema_decay else None
        self.mixup = Mixup(
            mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, prob=config.mixup_prob,
            switch_prob=config.mixup_switch_prob, label_smoothing=config.smoothing,
            num_classes=unwrap(model).num_classes,
        ) if config.uses_mixup else None
        if self.mixup is not None:
            self.loss_fn = SoftTargetCrossEntropy()
        elif config.smoothing > 0:
            self.loss_fn = LabelSmoothingCrossEntropy(config.smoothing)
        else:
            self.loss_fn = torch.nn.CrossEntropyLoss()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]['lr']

    def state_dict(self) -> Dict[str, Any]:
        return {
            'model': unwrap(self.model).state_dict(),
            'ema': self.ema.state_dict() if self.ema is not None else None,
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict(),
            'scaler': self.scaler.state_dict(),
            'num_updates': self.num_updates,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(state['model'])
        if self.ema is not None:
            self.ema.load_state_dict(state['ema'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        self.scaler.load_state_dict(state['scaler'])
        self.num_updates = state['num_updates']

    def train_one_epoch(self, loader, epoch: int, progress: bool) -> Dict[str, float]:
        """One pass over ``updates_per_epoch * grad_accum`` batches; returns mean loss, last lr and images/s."""
        config = self.config
        self.model.train()
        batches = self.updates_per_epoch * config.grad_accum
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        start = time.perf_counter()
        bar = tqdm(total=batches, desc=f'epoch {epoch + 1}/{config.epochs}', unit='batch', disable=not progress)
        for i, (images, targets) in enumerate(itertools.islice(loader, batches)):
            images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
            step_now = (i + 1) % config.grad_accum == 0
            # DDP all-reduces gradients on every backward unless told to wait for the last micro-batch
            defer_sync = not step_now and isinstance(self.model, DistributedDataParallel)
            with self.model.no_sync() if defer_sync else contextlib.nullcontext():
                with autocast(self.device, config.amp):
                    loss = self.loss_fn(self.model(images), targets)
                self.scaler.scale(loss / config.grad_accum).backward()
            loss_sum += loss.detach()
            if step_now:
                self._step()
            bar.update()
            if progress and (i % 10 == 0 or i + 1 == batches):
                seen = (i + 1) * config.batch_size * self.world_size
                bar.set_postfix(
                    loss=f'{loss_sum.item() / (i + 1):.4f}', lr=f'{self.lr:.2e}',
                    img_s=f'{seen / (time.perf_counter() - start):.0f}',
                )
        bar.close()
        if self.world_size > 1:
            dist.all_reduce(loss_sum)
        seconds = time.perf_counter() - start
        return {
            'train_loss': loss_sum.item() / (batches * self.world_size),
            'lr': self.lr,
            'train_images_per_s': batches * config.batch_size * self.world_size / seconds,
        }

    def _step(self) -> None:
        if self.config.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            dispatch_clip_grad(self.model.parameters(), self.config.clip_grad, mode='norm')
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.num_updates += 1
        if self.ema is not None:
            self.ema.update(unwrap(self.model), step=self.num_updates)
        self.scheduler.step_update(num_updates=self.num_updates)


def build_loaders(
        config: TrainConfig,
        train_ds: torch.utils.data.Dataset,
        val_ds: torch.utils.data.Dataset,
        rank: int,
        world_size: int,
        workers: int,
        device: torch.device,
) -> Tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader, int]:
    """This process's training and validation loaders, and the optimizer updates per epoch.

    Training batches are drawn by a DistributedSampler (also for one process) reshuffled by the epoch and the seed,
    so process ``r`` of ``n`` gets items ``r, r + n, ...`` of the same permutation a single process would use: the
    global batches are the same whatever ``n`` is. Validation shards count every image once.
    """
    def loader(ds, sampler=None, drop_last=False):
        return torch.utils.data.DataLoader(
            ds, batch_size=config.batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
            pin_memory=device.type == 'cuda',
        )

    sampler = torch.utils.data.DistributedSampler(
        train_ds, num_replicas=world_size, rank=rank, shuffle=True, seed=config.seed
    )
    train_loader = loader(train_ds, sampler, drop_last=True)
    updates_per_epoch = min(len(train_loader), config.limit_batches or len(train_loader)) // config.grad_accum
    if updates_per_epoch == 0:
        raise UsageError(
            f'a global batch of {global_batch_size(config, world_size)} images ({config.batch_size} per process x'
            f' {config.grad_accum} accumulation x {world_size} processes) is more than the {len(train_ds)} training'
            ' images; lower --batch-size or --grad-accum'
        )
    if config.limit_batches:
        # the same images whatever the number of processes
        val_ds = torch.utils.data.Subset(
            val_ds, range(min(len(val_ds), config.limit_batches * config.batch_size * world_size))
        )
    return train_loader, loader(shard(val_ds, rank, world_size)), updates_per_epoch


def fit(
        config: TrainConfig,
        run_dir: Optional[Path],
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        progress: bool = True,
        resume_state: Optional[Dict[str, Any]] = None,
        recipe: Optional[str] = None,
) -> List[Dict[str, Any]]:
    """Train ``config`` and return one metrics row per epoch; rank 0 writes into ``run_dir``.

    With ``resume_state`` (a ``last.pt`` from an earlier run of the same config) training continues after the
    epoch it saved: model, optimizer, scheduler, EMA, loss scaler, RNG, metrics history and best epoch.
    """
    seed_everything(config.seed)  # the same initial weights on every rank
    train_ds, classes = open_split(config.data, config.train_split, config.dataset, config.download,
                                   img_size=config.img_size or 32)
    val_ds, val_classes = open_split(config.data, config.val_split, config.dataset, config.download,
                                     img_size=config.img_size or 32)
    check_same_classes(classes, val_classes, repr(config.data))
    model = build_model(
        config.model, num_classes=len(classes), model_kwargs=config.model_kwargs,
        drop_path_rate=config.drop_path, img_size=config.img_size,
    )
    data_config = eval_data_config(model, config.img_size, config.crop_pct)
    val_ds.transform = create_transform(**data_config, is_training=False)
    train_ds.transform = create_transform(
        data_config['input_size'], is_training=True, no_aug=config.no_aug, scale=config.scale, ratio=config.ratio,
        hflip=config.hflip, color_jitter=config.color_jitter, auto_augment=config.aa,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        re_prob=config.reprob, re_mode=config.remode,
    )
    seed_everything(config.seed + rank)  # different augmentation on every rank

    train_loader, val_loader, updates_per_epoch = build_loaders(
        config, train_ds, val_ds, rank, world_size, workers, device
    )

    model.to(device)
    if device.type == 'cuda':
        # fixed input sizes: let cuDNN pick its fastest kernels (bit-exact resumes are promised on the CPU only)
        torch.backends.cudnn.benchmark = True
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if world_size > 1:
        # depthwise conv weights (C, 1, k, k) have a size-1 dim whose stride may differ between weight and grad
        # although both are contiguous; DDP warns about that layout difference, which costs nothing
        warnings.filterwarnings('ignore', message='Grad strides do not match bucket view strides')
        model = DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None)
    trainer = Trainer(model, config, device, world_size, updates_per_epoch)

    history: List[Dict[str, Any]] = []
    start_epoch = 0
    if resume_state is not None:
        trainer.load_state_dict(resume_state['trainer'])
        history = list(resume_state['history'])
        start_epoch = resume_state['epoch']
        if rank < len(resume_state['rng']):
            set_rng_state(resume_state['rng'][rank])
    elif rank == 0:
        write_json(run_dir / CONFIG_FILE, {
            'config': dataclasses.asdict(config),
            'recipe': recipe,
            'argv': sys.argv[1:],
            'world_size': world_size,
            'global_batch_size': global_batch_size(config, world_size),
            'lr': learning_rate(config, world_size),
            'updates_per_epoch': updates_per_epoch,
            'classes': classes,
            'data_config': data_config,
            'versions': {'torch': torch.__version__, 'timm': timm.__version__},
        })
        report(
            f'run directory {run_dir}: {config.model} on {config.data}, {len(train_ds)} train / {len(val_ds)} val'
            f' images, {len(classes)} classes, global batch {global_batch_size(config, world_size)}, lr'
            f' {learning_rate(config, world_size):.2e}'
        )

    weights_metadata = {
        'model': config.model, 'model_kwargs': config.model_kwargs, 'img_size': config.img_size,
        'classes': classes, 'data': config.data, 'dataset': config.dataset, 'data_config': data_config,
        'weights': 'ema' if trainer.ema is not None else 'model',
    }
    best = max(history, key=lambda row: row['eval_top1'], default=None)
    for epoch in range(start_epoch, config.epochs):
        train_loader.sampler.set_epoch(epoch)
        epoch_start = time.perf_counter()
        try:
            row = {'epoch': epoch + 1, **trainer.train_one_epoch(train_loader, epoch, progress)}
        except RuntimeError as e:
            if out_of_memory(e):
                raise UsageError(
                    f'--batch-size {config.batch_size} does not fit in memory on {device}; halve it and double'
                    ' --grad-accum to keep the global batch and the learning rate'
                ) from e
            raise
        val = evaluate(unwrap(model), val_loader, device, config.amp)
        row.update({f'val_{k}': val[k] for k in ('loss', 'top1', 'top5')})
        if trainer.ema is not None:
            val_ema = evaluate(trainer.ema.module, val_loader, device, config.amp)
            row.update({f'val_{k}_ema': val_ema[k] for k in ('loss', 'top1', 'top5')})
        row['epoch_s'] = time.perf_counter() - epoch_start  # training and validation
        # the weights the run reports and saves: the EMA when there is one, as in the reference
        row['eval_top1'] = row['val_top1_ema'] if trainer.ema is not None else row['val_top1']
        history.append(row)
        is_best = best is None or row['eval_top1'] > best['eval_top1']
        if is_best:
            best = row

        ranks_rng = [rng_state()]
        if world_size > 1:
            ranks_rng = [None] * world_size
            dist.all_gather_object(ranks_rng, rng_state())
        if rank == 0:
            state = {'epoch': epoch + 1, 'trainer': trainer.state_dict(), 'rng': ranks_rng, 'history': history}
            weights = (trainer.ema.module if trainer.ema is not None else unwrap(model)).state_dict()
            metadata = dict(weights_metadata, epoch=epoch + 1, top1=row['eval_top1'])
            save_checkpoint(run_dir, weights, metadata, state, is_best)
            write_metrics(run_dir, history)
            plot_curves(run_dir / 'curves.png', history)
            report(
                f'epoch {epoch + 1}/{config.epochs}  train loss {row["train_loss"]:.4f}  val loss'
                f' {row["val_loss"]:.4f}  val top-1 {row["val_top1"]:.2f} %'
                + (f'  ema top-1 {row["val_top1_ema"]:.2f} %' if trainer.ema is not None else '')
                + f'  lr {row["lr"]:.2e}  {row["train_images_per_s"]:.0f} img/s'
            )
    return history


def _init_distributed(device_name: str) -> Tuple[int, int, torch.device]:
    """Join the process group torchrun describes in the environment; returns rank, world size and device."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    device = resolve_device(device_name)
    if world_size == 1:
        return 0, 1, device
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
        torch.cuda.set_device(device)
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return dist.get_rank(), world_size, device


def _open_resumed_run(args: argparse.Namespace, world_size: int) -> Tuple[Path, TrainConfig, Optional[str], dict]:
    """The run directory, config, recipe and last saved state of the run ``--resume`` names."""
    run_dir = Path(args.resume)
    if run_dir.is_file():  # RUN_DIR/last.pt or another file of the run
        run_dir = run_dir.parent
    saved = read_run_config(run_dir)
    given = [f'--{k.replace("_", "-")}' for k, v in vars(args).items()
             if v not in (None, False) and k not in (*RUNTIME_FLAGS, 'resume', 'run', 'command')]
    if given:
        raise UsageError(f'--resume continues with the run\'s own {CONFIG_FILE}; drop {", ".join(given)}')
    if saved['world_size'] != world_size:
        raise UsageError(
            f'{run_dir} was trained by {saved["world_size"]} processes; resume it with as many (the global batch and'
            f' learning rate depend on it), not {world_size}'
        )
    if not (run_dir / 'last.pt').is_file():
        raise UsageError(f'{run_dir} has no last.pt: it stopped before its first epoch ended; start it anew')
    return run_dir, TrainConfig(**saved['config']), saved['recipe'], load_state(run_dir / 'last.pt')


def run(args: argparse.Namespace) -> int:
    rank, world_size, device = _init_distributed(args.device)
    try:
        resume_state = None
        if args.resume:
            run_dir, config, recipe, resume_state = _open_resumed_run(args, world_size)
            if resume_state['epoch'] >= config.epochs:
                if rank == 0:
                    report(f'{run_dir} already finished its {config.epochs} epochs')
                return 0
        else:
            config, recipe = config_from_args(args)
            run_dir = None
            if rank == 0:
                data_name = Path(config.data).name or config.data
                run_dir = new_run_dir(args.output, args.name, f'{time.strftime("%Y%m%d-%H%M%S")}-{config.model}'
                                      f'-{data_name}')
        start = time.perf_counter()
        history = fit(
            config, run_dir, device, rank=rank, world_size=world_size,
            workers=default_workers(int(os.environ.get('LOCAL_WORLD_SIZE', '1'))) if args.workers is None
            else args.workers,
            progress=not args.quiet and rank == 0, resume_state=resume_state, recipe=recipe,
        )
        if rank == 0:
            best = max(history, key=lambda row: row['eval_top1'])
            report(
                f'held-out top-1 {history[-1]["eval_top1"]:.2f} % after {len(history)} epochs (best'
                f' {best["eval_top1"]:.2f} % at epoch {best["epoch"]}), {time.perf_counter() - start:.0f} s;'
                f' run directory {run_dir}'
            )
        return 0
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
