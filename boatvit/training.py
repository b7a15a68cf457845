"""Training: the run configuration, the optimizer step, the epoch loop, resumable runs.

`train` is what ``boatvit train`` calls: a new run from a `TrainConfig`, or an interrupted run resumed from its
directory. With one process it trains on the CPU or one GPU; under ``torchrun`` it trains with
DistributedDataParallel, each process on its own shard of every global batch, and only rank 0 writes. Each run gets
a directory (see `boatvit.runs`), and a resumed run continues from its last finished epoch exactly as if it had
not stopped. The embedded default (the ``digits`` recipe) is a small BOAT-Swin on scikit-learn's digits, on the
CPU, in a few minutes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import timm
import torch
import torch.distributed as dist
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad, random_seed, unwrap_model
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .data import (
    DIGITS,
    ImageSize,
    canonical_image_size,
    check_same_classes,
    default_workers,
    eval_data_config,
    folder_summary,
    open_split,
    shard,
)
from .errors import TrainingDivergedError, UsageError
from .evaluation import evaluate
from .image_cache import CACHE_MODES, InMemoryImages, cache_split, collate_samples
from .batch_augment import BatchAugment
from .loggers import TensorBoardLog, check_logger
from .recipes import DEFAULT_RECIPE, FINETUNE_RECIPES, RECIPES, SMALL_DATA_RECIPE, fit_finetune_to_data, fit_to_data
from .runs import (
    CONFIG_FILE,
    hold_run_dir,
    load_state,
    new_run_dir,
    plot_curves,
    read_run_config,
    save_checkpoint,
    write_json,
    write_metrics,
)
from .runtime import (
    AMP_CHOICES,
    AMP_HELP,
    autocast,
    check_amp,
    init_distributed,
    out_of_memory,
    require_extra,
    resolve_amp,
)
from .time_budget import StepTimes, format_duration, parse_duration, plan_schedule, replan_schedule
from .weights import (
    Weights,
    build_model,
    check_backbone,
    input_size_kwargs,
    load_backbone,
    read_weights,
    resolve_model,
)

__all__ = [
    'TrainConfig',
    'TrainResult',
    'Trainer',
    'config_from_values',
    'global_batch_size',
    'learning_rate',
    'fit',
    'train',
]

#: how ``lr_base`` follows the global batch: linearly (SGD's rule, the reference recipes') or by its square root
#: (the rule for adaptive optimizers such as AdamW, and timm's default for them)
LR_BASE_SCALES = ('linear', 'sqrt')


def _field(default: Any, group: str, help: str = '', **flag: Any) -> Any:
    """A `TrainConfig` field whose command-line flag (``--name-with-dashes``) is described by its metadata: the
    help ``group`` and ``help`` text, and further argparse settings (``choices``, ``metavar``)."""
    factory = {'default_factory': default} if callable(default) else {'default': default}
    return dataclasses.field(**factory, metadata={'group': group, 'help': help, **flag})


@dataclasses.dataclass
class TrainConfig:
    """Everything that decides what a run computes (and where it logs); saved as the run's ``config.json``.

    The optimizer, schedule and augmentation defaults are the BOAT-Swin reference recipe's (`boatvit.recipes` holds
    the named presets, the embedded default among them). Each field is a ``boatvit train`` flag; its metadata holds
    the flag's help.
    """

    data: Optional[str] = _field(
        None,
        'data',
        f'{DIGITS!r}, or a directory with train/ and val/ folders of class folders (or a create_dataset root)',
    )
    dataset: str = _field('', 'data', "timm.data.create_dataset name, e.g. 'torch/cifar10'; default: image folder")
    train_split: str = _field('train', 'data', 'training split (sub-folder); default: train')
    val_split: str = _field('val', 'data', 'validation split (sub-folder); default: val')
    download: bool = _field(False, 'data', 'let --dataset download the data')
    model: str = _field('boat_swin_nano_32', 'model', 'timm model name, e.g. boat_swin_tiny_224')
    model_kwargs: Dict[str, Any] = _field(
        dict, 'model', 'extra model constructor arguments, e.g. embed_dim=48 depths=(2,2)', metavar='KEY=VALUE'
    )
    weights: Optional[str] = _field(
        None,
        'model',
        'fine-tune from these weights: a released checkpoint (EMA weights preferred), a .safetensors file, a run'
        ' directory or a timm-format state dict; the classifier is new when the data have another number of classes',
        metavar='SOURCE',
    )
    img_size: Optional[ImageSize] = _field(
        None,
        'model',
        "input size: SIZE for a square, or HEIGHT WIDTH; default: the weights' or the model's",
        nargs='+',
        metavar='SIZE',
    )
    drop_path: float = _field(0.1, 'model', 'stochastic depth rate')
    grad_checkpointing: bool = _field(False, 'model', 'recompute activations in the backward pass to save memory')
    epochs: int = _field(300, 'optimisation', 'training epochs')
    batch_size: int = _field(128, 'optimisation', 'images per process and step')
    grad_accum: int = _field(1, 'optimisation', 'micro-batches per optimizer step')
    opt: str = _field('adamw', 'optimisation', 'timm optimizer name (default: adamw)')
    lr: Optional[float] = _field(None, 'optimisation', 'learning rate; default: --lr-base scaled to the global batch')
    lr_base: float = _field(5e-4, 'optimisation', 'learning rate at a global batch of --lr-base-size')
    lr_base_size: int = _field(512, 'optimisation', 'the global batch --lr-base is for')
    lr_base_scale: str = _field(
        'linear',
        'optimisation',
        "how --lr-base follows the global batch: 'linear' (the reference recipes') or 'sqrt' (the fine-tuning"
        " presets': adaptive optimizers' rule, timm's --lr-base-scale)",
        choices=LR_BASE_SCALES,
    )
    weight_decay: float = _field(0.05, 'optimisation', 'AdamW weight decay')
    layer_decay: Optional[float] = _field(
        None, 'optimisation', 'layer-wise lr decay: each block towards the stem gets this factor more, e.g. 0.75'
    )
    freeze_backbone: bool = _field(
        False, 'optimisation', 'train the classifier only (a linear probe), on features without --drop-path'
    )
    clip_grad: Optional[float] = _field(5.0, 'optimisation', 'max gradient norm; 0 for none')
    warmup_epochs: float = _field(20, 'optimisation', 'epochs of linear learning-rate warm-up (a fraction is fine)')
    warmup_lr: float = _field(1e-6, 'optimisation', 'learning rate at the start of the warm-up')
    min_lr: float = _field(1e-5, 'optimisation', 'learning rate at the end of the cosine decay')
    ema_decay: Optional[float] = _field(None, 'optimisation', 'keep an EMA of the weights with this decay; 0 for none')
    amp: str = _field(
        'auto', 'optimisation', f"{AMP_HELP}; the run's config.json holds what it chose", choices=AMP_CHOICES
    )
    smoothing: float = _field(0.1, 'regularisation and augmentation', 'label smoothing')
    mixup: float = _field(0.8, 'regularisation and augmentation', 'mixup alpha, 0 for off')
    cutmix: float = _field(1.0, 'regularisation and augmentation', 'cutmix alpha, 0 for off')
    mixup_prob: float = _field(1.0, 'regularisation and augmentation', 'probability of mixup or cutmix per batch')
    mixup_switch_prob: float = _field(0.5, 'regularisation and augmentation', 'probability of cutmix over mixup')
    aa: Optional[str] = _field(
        'rand-m9-mstd0.5-inc1',
        'regularisation and augmentation',
        "timm auto-augment policy, e.g. 'rand-m9-mstd0.5-inc1'; 'none' for off",
    )
    reprob: float = _field(0.25, 'regularisation and augmentation', 'random erasing probability')
    remode: str = _field('pixel', 'regularisation and augmentation', 'random erasing mode')
    scale: Tuple[float, float] = _field(
        (0.08, 1.0), 'regularisation and augmentation', 'random resized crop area range'
    )
    ratio: Tuple[float, float] = _field(
        (3 / 4, 4 / 3), 'regularisation and augmentation', 'random resized crop aspect ratio range'
    )
    hflip: float = _field(0.5, 'regularisation and augmentation', 'horizontal flip probability')
    color_jitter: float = _field(0.4, 'regularisation and augmentation', 'color jitter strength')
    crop_pct: Optional[float] = _field(
        None, 'regularisation and augmentation', "eval centre-crop fraction; default: the model's"
    )
    no_aug: bool = _field(
        False, 'regularisation and augmentation', 'train on the eval transform, no random crops, flips or RandAugment'
    )
    time_budget: Optional[str] = _field(
        None,
        'run',
        'fit the schedule to this much time (e.g. 20m, 1.5h): the run measures its own speed, then chooses the'
        ' epochs, batches per epoch and warm-up that end annealed, validated and saved within it',
        metavar='DURATION',
    )
    train_batches: Optional[int] = _field(
        None, 'run', 'training batches per epoch (default: the whole split; --time-budget chooses it)'
    )
    data_cache: str = _field(
        'auto',
        'data',
        "keep the decoded images of an image folder in memory: 'auto' when they have one size and fit, 'memory'"
        " (or fail), 'none'",
        choices=CACHE_MODES,
    )
    limit_batches: Optional[int] = _field(
        None, 'run', 'at most N batches per epoch, for training and for validation (smoke tests)'
    )
    seed: int = _field(0, 'run', 'seed of the initial weights, the data order and the augmentation')
    log: Optional[str] = _field(
        None,
        'run',
        "also log to TensorBoard: 'tensorboard' (RUN_DIR/tensorboard; pip install 'boatvit[tensorboard]'); a resumed"
        ' run keeps its logger. Under torchrun spell it --logger: torchrun refuses --log as an ambiguous prefix of'
        ' its own --log-dir and --logs-specs',
        metavar='LOGGER',
        aliases=('--logger',),
    )

    def __post_init__(self):
        # JSON turns tuples into lists; keep them hashable and comparable after a resume
        self.scale, self.ratio = tuple(self.scale), tuple(self.ratio)
        self.img_size = canonical_image_size(self.img_size)
        for name in ('epochs', 'batch_size', 'grad_accum', 'lr_base_size'):
            if getattr(self, name) < 1:
                raise UsageError(f'--{name.replace("_", "-")} must be at least 1, got {getattr(self, name)}')
        for name in ('limit_batches', 'train_batches'):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f'--{name.replace("_", "-")} must be at least 1, got {getattr(self, name)}')
        if self.warmup_epochs < 0:
            raise UsageError(f'--warmup-epochs must be 0 or more, got {self.warmup_epochs}')
        if self.time_budget is not None:
            parse_duration(self.time_budget)
        if self.lr_base_scale not in LR_BASE_SCALES:
            raise UsageError(f'--lr-base-scale must be one of {list(LR_BASE_SCALES)}, got {self.lr_base_scale!r}')
        if self.data_cache not in CACHE_MODES:
            raise UsageError(f'--data-cache must be one of {list(CACHE_MODES)}, got {self.data_cache!r}')
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise UsageError(f'--layer-decay must lie in (0, 1], e.g. 0.75, got {self.layer_decay}')
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise UsageError(f'--ema-decay must lie in (0, 1), e.g. 0.9998, got {self.ema_decay}')
        check_amp(self.amp)
        check_logger(self.log)
        if self.uses_mixup and self.batch_size % 2:
            raise UsageError(
                f'mixup and cutmix pair images within a batch; use an even --batch-size, not {self.batch_size}'
            )

    @property
    def uses_mixup(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


def config_from_values(given: Mapping[str, Any], recipe: Optional[str] = None) -> Tuple[TrainConfig, Optional[str]]:
    """The recipe overridden by the values given; returns the config and the recipe name, and says which recipe is
    in use and why (rank 0).

    Without ``recipe``: the family's fine-tuning preset with ``weights``, the embedded default when the data are
    the digits (or not given), else the small-data preset. The small-data and fine-tuning presets are fitted to an
    image folder's images (`boatvit.recipes.fit_to_data`, `~boatvit.recipes.fit_finetune_to_data`; the flags given
    override them). With ``weights``, the model, its arguments and image
    size default to those of the weights (`boatvit.weights.resolve_model`), and another ``img_size`` gets the
    Swin windows ``set_input_size`` would choose. ``clip_grad`` and ``ema_decay`` of 0 and ``aa`` of ``'none'``
    switch those off (the command line cannot type None).
    """
    given = {k: v for k, v in given.items() if v is not None}
    for name in ('clip_grad', 'ema_decay'):
        if given.get(name) == 0:
            given[name] = None
    if given.get('aa') == 'none':
        given['aa'] = None
    if 'weights' in given:
        given = _from_weights(given)
    if 'time_budget' in given and 'epochs' in given:
        raise UsageError('--time-budget chooses the number of epochs to fit the budget; drop --epochs or the budget')
    recipe, why = (recipe, 'asked for') if recipe else _default_recipe(given)
    values = dict(RECIPES[recipe]) if recipe else {}
    fitted = []
    fits_folder = recipe == SMALL_DATA_RECIPE or recipe in FINETUNE_RECIPES.values()
    if fits_folder and given.get('data') not in (None, DIGITS) and not given.get('dataset'):
        summary = folder_summary(given['data'], given.get('train_split', 'train'))
        if summary is not None:  # fitted to the image folder it trains on
            num_images, image_side = summary
            fitted_values, fitted = (
                fit_to_data(num_images, image_side) if recipe == SMALL_DATA_RECIPE else fit_finetune_to_data(num_images)
            )
            values.update(fitted_values)
    model_kwargs = dict(values.get('model_kwargs', {}), **given.pop('model_kwargs', {}))
    values.update(given, model_kwargs=model_kwargs)
    if values.get('data') is None:
        raise UsageError(f'recipe {recipe!r} needs --data DIR (with train/ and val/ folders of class folders)')
    config = TrainConfig(**values)
    if os.environ.get('RANK', '0') == '0':
        report(f'recipe {recipe}: {why}; flags given override it (boatvit/recipes.py)')
        if fitted:
            overridden = ', '.join(f'--{k.replace("_", "-")}' for k in sorted(set(fitted_values) & set(given)))
            report('fitted to the data: ' + '; '.join(fitted) + (f' (yours: {overridden})' if overridden else ''))
    return config, recipe


def _default_recipe(given: Mapping[str, Any]) -> Tuple[str, str]:
    """The recipe for what the user gave, and why."""
    if 'weights' in given:
        family = 'cswin' if given['model'].startswith('boat_cswin') else 'swin'
        return FINETUNE_RECIPES[family], f'fine-tuning {given["model"]} from --weights'
    if given.get('data', DIGITS) == DIGITS:
        return DEFAULT_RECIPE, 'the embedded default'
    return SMALL_DATA_RECIPE, f'--data {given["data"]} without --recipe or --weights (--recipe NAME for another)'


def _from_weights(given: Dict[str, Any]) -> Dict[str, Any]:
    """``given`` with the model, its arguments and image size of ``given['weights']`` where not given, and the
    windows for another image size."""
    weights = read_weights(given['weights'])
    name, model_kwargs, _ = resolve_model(weights, given.get('model'), given.get('model_kwargs'))
    # the image size is a field of its own: the one the weights were built for, unless another is asked for
    own_size = canonical_image_size(model_kwargs.pop('img_size', None), f'{given["weights"]}: img_size')
    img_size = canonical_image_size(given.get('img_size', own_size))
    if img_size is not None and img_size != own_size:
        model_kwargs.update(input_size_kwargs(name, model_kwargs, img_size, built_for=own_size))
    return dict(given, model=name, model_kwargs=model_kwargs, img_size=img_size)


def global_batch_size(config: TrainConfig, world_size: int) -> int:
    return config.batch_size * config.grad_accum * world_size


def learning_rate(config: TrainConfig, world_size: int) -> float:
    """``--lr``, or ``--lr-base`` scaled from ``--lr-base-size`` to the global batch, linearly or by its square root
    (``--lr-base-scale``)."""
    if config.lr is not None:
        return config.lr
    ratio = global_batch_size(config, world_size) / config.lr_base_size
    return config.lr_base * (math.sqrt(ratio) if config.lr_base_scale == 'sqrt' else ratio)


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


def diverged(what: str, config: TrainConfig, lr: float) -> str:
    """The message of a `TrainingDivergedError`: what became non-finite, and the fixes."""
    clip = f'a smaller --clip-grad than {config.clip_grad}' if config.clip_grad else '--clip-grad 1'
    amp = '--amp bf16 instead of fp16' if config.amp == 'fp16' else '--amp none' if config.amp == 'bf16' else ''
    fixes = ', '.join(f for f in (f'a lower --lr (it was {lr:.2e} at that step)', clip, amp) if f)
    return (
        f'training diverged: {what}. Nothing non-finite was saved (the checkpoints of earlier epochs are kept);'
        f' start a new run with {fixes}'
    )


#: the batches a run times itself over before it says how long it will take (the first is not counted)
PROBE_BATCHES = 21


def report(message: str) -> None:
    """A line for the user on stdout, above the progress bar if one is showing; callers print from rank 0 only."""
    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


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
        # the models' group_matcher gives timm the layers for --layer-decay; frozen parameters are left out
        self.optimizer = create_optimizer_v2(
            unwrap_model(model),
            opt=config.opt,
            lr=learning_rate(config, world_size),
            weight_decay=config.weight_decay,
            layer_decay=config.layer_decay,
        )
        # stepped per optimizer update, so short runs get a smooth warm-up and decay too
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer,
            sched='cosine',
            num_epochs=config.epochs,
            warmup_epochs=config.warmup_epochs,
            warmup_lr=config.warmup_lr,
            min_lr=config.min_lr,
            step_on_epochs=False,
            updates_per_epoch=updates_per_epoch,
        )
        # where the schedule is: scheduler update = origin + (num_updates - origin_updates) * rate; a budgeted run whose
        # epochs are re-planned stretches or shrinks the rest of the schedule by moving it (stretch_schedule)
        self.lr_clock = (0, 0.0, 1.0)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.amp == 'fp16')
        self.ema = ModelEmaV3(unwrap_model(model), decay=config.ema_decay) if config.ema_decay else None
        self.mixup = (
            Mixup(
                mixup_alpha=config.mixup,
                cutmix_alpha=config.cutmix,
                prob=config.mixup_prob,
                switch_prob=config.mixup_switch_prob,
                label_smoothing=config.smoothing,
                num_classes=unwrap_model(model).num_classes,
            )
            if config.uses_mixup
            else None
        )
        if self.mixup is not None:
            self.loss_fn = SoftTargetCrossEntropy()
        elif config.smoothing > 0:
            self.loss_fn = LabelSmoothingCrossEntropy(config.smoothing)
        else:
            self.loss_fn = torch.nn.CrossEntropyLoss()

    @property
    def lr(self) -> float:
        """The learning rate now; with layer decay, the top layers' (the others get a fraction of it)."""
        return max(group['lr'] for group in self.optimizer.param_groups)

    def state_dict(self) -> Dict[str, Any]:
        return {
            'model': unwrap_model(self.model).state_dict(),
            'ema': self.ema.state_dict() if self.ema is not None else None,
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict(),
            'scaler': self.scaler.state_dict(),
            'num_updates': self.num_updates,
            'lr_clock': list(self.lr_clock),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        unwrap_model(self.model).load_state_dict(state['model'])
        if self.ema is not None:
            self.ema.load_state_dict(state['ema'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        self.scaler.load_state_dict(state['scaler'])
        self.num_updates = state['num_updates']
        self.lr_clock = tuple(state.get('lr_clock', (0, 0.0, 1.0)))  # runs saved before it had their schedule's own

    def schedule_position(self) -> float:
        """The scheduler's update count for the optimizer updates done so far (`lr_clock`)."""
        origin_updates, origin, rate = self.lr_clock
        return origin + (self.num_updates - origin_updates) * rate

    def stretch_schedule(self, remaining_updates: int) -> None:
        """Make the rest of the learning-rate schedule, from where it is now, take ``remaining_updates`` more
        optimizer updates, so that it still ends annealed (at the minimum lr) after them."""
        scheduler = self.scheduler
        end = scheduler.t_initial + (scheduler.warmup_t if scheduler.warmup_prefix else 0)
        now = self.schedule_position()
        self.lr_clock = (self.num_updates, now, max(0.0, end - now) / max(1, remaining_updates))

    def train_one_epoch(
        self,
        loader,
        epoch: int,
        bar: Optional[tqdm] = None,
        on_probe: Optional[Callable[[float], None]] = None,
        on_step: Optional[Callable[[int, Dict[str, float]], None]] = None,
    ) -> Dict[str, float]:
        """One pass over ``updates_per_epoch * grad_accum`` batches; returns mean loss, last lr and images/s.

        ``bar``, the run's progress bar, advances by one per batch. ``on_probe`` is called once with the seconds a
        batch took, averaged over batches 2 to 21 (the first pays for allocations and kernel builds), or over the
        epoch's when it is shorter. ``on_step(step, values)`` is called after every optimizer step with its number
        and this process's mean loss over its micro-batches, the lr it used and the images of all processes per
        second since the step before.

        Stops with a `TrainingDivergedError` at the first non-finite loss. The optimizer steps that the fp16 loss
        scaler skips for non-finite gradients (while it lowers its scale) are its normal working, not a divergence.
        """
        config = self.config
        self.model.train()
        batches = self.updates_per_epoch * config.grad_accum
        probe_at = min(PROBE_BATCHES, batches - 1)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        start = probe_start = time.perf_counter()
        step_start, loss_before = start, 0.0
        if bar is not None:
            bar.set_description(f'epoch {epoch + 1}/{config.epochs}')
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
                # before the backward pass, so no non-finite gradient reaches the weights
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(
                        diverged(
                            f'the loss became {loss.item()} at batch {i + 1} of epoch {epoch + 1}', config, self.lr
                        )
                    )
                self.scaler.scale(loss / config.grad_accum).backward()
            loss_sum += loss.detach()
            if step_now:
                lr = self.lr
                self._step()
                if on_step is not None:
                    # loss_sum.item() waits for the device, as the finiteness check above already does every batch
                    now, loss_now = time.perf_counter(), loss_sum.item()
                    images = config.grad_accum * config.batch_size * self.world_size
                    step_loss = (loss_now - loss_before) / config.grad_accum
                    speed = images / (now - step_start)
                    on_step(self.num_updates, {'loss': step_loss, 'lr': lr, 'images_per_s': speed})
                    step_start, loss_before = now, loss_now
            if i == 0:
                probe_start = time.perf_counter()
            elif i == probe_at and on_probe is not None:
                on_probe((time.perf_counter() - probe_start) / probe_at)
            if bar is not None:
                bar.update()
                if i % 10 == 0 or i + 1 == batches:
                    seen = (i + 1) * config.batch_size * self.world_size
                    bar.set_postfix(
                        loss=f'{loss_sum.item() / (i + 1):.4f}',
                        lr=f'{self.lr:.2e}',
                        img_s=f'{seen / (time.perf_counter() - start):.0f}',
                    )
        if batches == 1 and on_probe is not None:
            on_probe(time.perf_counter() - start)
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
            self.ema.update(unwrap_model(self.model), step=self.num_updates)
        self.scheduler.step_update(num_updates=self.schedule_position())


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
            ds,
            batch_size=config.batch_size,
            sampler=sampler,
            num_workers=workers,
            drop_last=drop_last,
            pin_memory=device.type == 'cuda',
            collate_fn=collate_samples,
        )

    sampler = torch.utils.data.DistributedSampler(
        train_ds, num_replicas=world_size, rank=rank, shuffle=True, seed=config.seed
    )
    train_loader = loader(train_ds, sampler, drop_last=True)
    batches = min([len(train_loader), *(n for n in (config.limit_batches, config.train_batches) if n is not None)])
    updates_per_epoch = batches // config.grad_accum
    if updates_per_epoch == 0:
        raise UsageError(
            f'a global batch of {global_batch_size(config, world_size)} images ({config.batch_size} per process x'
            f' {config.grad_accum} accumulation x {world_size} processes) is more than the {len(train_ds)} training'
            f' images; lower --batch-size (to {max(1, len(train_ds) // (config.grad_accum * world_size))} or less'
            ' here) or --grad-accum'
        )
    if config.limit_batches:
        # the same images whatever the number of processes
        val_ds = torch.utils.data.Subset(
            val_ds, range(min(len(val_ds), config.limit_batches * config.batch_size * world_size))
        )
    return train_loader, loader(shard(val_ds, rank, world_size)), updates_per_epoch


def _open_data(
    config: TrainConfig, say: bool, progress: bool
) -> Tuple[torch.utils.data.Dataset, torch.utils.data.Dataset, List[str]]:
    """Both splits, without transforms, and the class names (the same in both, or a `UsageError`); the splits of an
    image folder decoded into memory as ``config.data_cache`` says (`boatvit.image_cache.cache_split`)."""
    splits = [
        open_split(config.data, split, config.dataset, config.download, img_size=config.img_size or 32)
        for split in (config.train_split, config.val_split)
    ]
    (train_ds, classes), (val_ds, val_classes) = splits
    check_same_classes(classes, val_classes, repr(config.data))
    if config.data != DIGITS and not config.dataset:  # an image folder, read by timm's reader
        copies = int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
        cached = []
        for name, ds in ((config.train_split, train_ds), (config.val_split, val_ds)):
            in_memory, why = cache_split(ds.reader.samples, name, config.data_cache, copies, progress=progress)
            cached.append(in_memory or ds)
            if say:
                report(why)
        train_ds, val_ds = cached
    return train_ds, val_ds, classes


def _set_transforms(config: TrainConfig, model: torch.nn.Module, train_ds, val_ds) -> Dict[str, Any]:
    """The eval transform on ``val_ds``, the augmenting one on ``train_ds`` (for a whole batch at once when the
    split is in memory and the augmentation has a batch form, `boatvit.batch_augment`); returns the eval data
    config."""
    data_config = eval_data_config(model, img_size=config.img_size, crop_pct=config.crop_pct)
    val_ds.transform = create_transform(**data_config, is_training=False)
    # timm's create_transform and BatchAugment take these under the same names
    augmentation = dict(
        scale=config.scale,
        ratio=config.ratio,
        hflip=config.hflip,
        color_jitter=config.color_jitter,
        interpolation=data_config['interpolation'],
        mean=data_config['mean'],
        std=data_config['std'],
        re_prob=config.reprob,
        re_mode=config.remode,
    )
    if isinstance(train_ds, InMemoryImages) and config.aa is None and not config.no_aug:
        train_ds.batch_transform = BatchAugment(data_config['input_size'][1:], **augmentation)
    else:
        train_ds.transform = create_transform(
            data_config['input_size'], is_training=True, no_aug=config.no_aug, auto_augment=config.aa, **augmentation
        )
    return data_config


def _place_model(model: torch.nn.Module, config: TrainConfig, device: torch.device, world_size: int) -> torch.nn.Module:
    """The model on its device, with gradient checkpointing if asked, in DDP when distributed."""
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
    return model


def _write_run_config(
    run_dir: Path,
    config: TrainConfig,
    recipe: Optional[str],
    world_size: int,
    updates_per_epoch: int,
    classes: List[str],
    data_config: Dict[str, Any],
) -> None:
    write_json(
        run_dir / CONFIG_FILE,
        {
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
        },
    )


def _train_and_validate(
    trainer: Trainer,
    train_loader,
    val_loader,
    epoch: int,
    bar: Optional[tqdm],
    on_probe: Optional[Callable],
    log: Optional[TensorBoardLog],
) -> Dict[str, Any]:
    """One epoch of training and its validation (of the EMA too): the epoch's metrics row."""
    config, device = trainer.config, trainer.device
    epoch_start = time.perf_counter()
    try:
        on_step = None if log is None else log.step
        row = {'epoch': epoch + 1, **trainer.train_one_epoch(train_loader, epoch, bar, on_probe, on_step)}
    except RuntimeError as e:
        if out_of_memory(e):
            raise UsageError(
                f'--batch-size {config.batch_size} does not fit in memory on {device}; halve it and double'
                ' --grad-accum to keep the global batch and the learning rate'
            ) from e
        raise
    val = evaluate(unwrap_model(trainer.model), val_loader, device, config.amp)
    row.update({f'val_{k}': val[k] for k in ('loss', 'top1', 'top5')})
    if trainer.ema is not None:
        val_ema = evaluate(trainer.ema.module, val_loader, device, config.amp)
        row.update({f'val_{k}_ema': val_ema[k] for k in ('loss', 'top1', 'top5')})
    row['epoch_s'] = time.perf_counter() - epoch_start  # training and validation
    # the weights the run reports and saves: the EMA when there is one, as in the reference
    row['eval_top1'] = row['val_top1_ema'] if trainer.ema is not None else row['val_top1']
    return row


def _save_epoch(
    run_dir: Path,
    trainer: Trainer,
    history: List[Dict[str, Any]],
    ranks_rng: List[Any],
    weights_metadata: Mapping[str, Any],
    is_best: bool,
) -> None:
    """Rank 0: the epoch's weights and resumable state (and as ``best``), metrics, curves and a log line."""
    row = history[-1]
    state = {'epoch': row['epoch'], 'trainer': trainer.state_dict(), 'rng': ranks_rng, 'history': history}
    weights = (trainer.ema.module if trainer.ema is not None else unwrap_model(trainer.model)).state_dict()
    metadata = dict(weights_metadata, epoch=row['epoch'], top1=row['eval_top1'])
    # the metrics first: a crash between them and last.pt repeats the epoch on resume, which rewrites them; the
    # other order would lose the final epoch's metrics for good (its resume finds the run finished)
    write_metrics(run_dir, history)
    plot_curves(run_dir / 'curves.png', history)
    save_checkpoint(run_dir, weights, metadata, state, is_best)
    report(
        f'epoch {row["epoch"]}/{trainer.config.epochs}  train loss {row["train_loss"]:.4f}  val loss'
        f' {row["val_loss"]:.4f}  val top-1 {row["val_top1"]:.2f} %'
        + (f'  ema top-1 {row["val_top1_ema"]:.2f} %' if trainer.ema is not None else '')
        + f'  lr {row["lr"]:.2e}  {row["train_images_per_s"]:.0f} img/s'
    )


def _check_finite_weights(trainer: Trainer, epoch: int) -> None:
    """Raise a `TrainingDivergedError` if a weight is non-finite: the last step of an epoch can do that with a
    finite loss. Every rank checks (DDP keeps the weights equal), so all stop together."""
    for key, value in unwrap_model(trainer.model).state_dict().items():
        if value.is_floating_point() and not value.isfinite().all():
            raise TrainingDivergedError(
                diverged(f'{key} became non-finite in epoch {epoch + 1}', trainer.config, trainer.lr)
            )


def _gather_rng(world_size: int) -> List[Any]:
    """Every process's RNG state, in rank order."""
    if world_size == 1:
        return [rng_state()]
    ranks_rng = [None] * world_size
    dist.all_gather_object(ranks_rng, rng_state())
    return ranks_rng


def _weights_metadata(
    config: TrainConfig, classes: List[str], data_config: Dict[str, Any], ema: bool
) -> Dict[str, Any]:
    """What every saved weights file records about itself (read back by `boatvit.weights.read_weights`)."""
    return {
        'model': config.model,
        'model_kwargs': config.model_kwargs,
        'img_size': config.img_size,
        'classes': classes,
        'data': config.data,
        'dataset': config.dataset,
        'data_config': data_config,
        'weights': 'ema' if ema else 'model',
    }


def _start_from_weights(model: torch.nn.Module, weights: Weights, classes: List[str], say: bool) -> None:
    """Load the backbone (and the classifier when it classifies ``classes``) of ``weights`` into ``model``, saying
    what was dropped."""
    dropped = load_backbone(model, weights, classes)
    if say:
        recorded = weights.metadata.get('classes')
        named = f' {_names(recorded)}' if recorded else ''
        head = (
            f'; its classifier ({", ".join(dropped)}: {weights.num_classes} classes{named}) was dropped for a new one'
            f' of {model.num_classes} classes {_names(classes)}'
            if dropped
            else ''
        )
        report(f'fine-tuning from {weights.path} ({weights.entry}){head}')


def _names(classes: List[str], shown: int = 5) -> str:
    return '(' + ', '.join(classes[:shown]) + (', ...' if len(classes) > shown else '') + ')'


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
    initial_weights: Optional[Weights] = None,
    started: Optional[float] = None,
) -> List[Dict[str, Any]]:
    """Train ``config`` and return one metrics row per epoch; rank 0 writes into ``run_dir``.

    With ``resume_state`` (a ``last.pt`` from an earlier run of the same config) training continues after the
    epoch it saved: model, optimizer, scheduler, EMA, loss scaler, RNG, metrics history and best epoch. Otherwise
    a config with ``weights`` starts from them (``initial_weights``: the source already read), and a config with a
    ``time_budget`` (counted from ``started``, a ``time.perf_counter()``; default: now) first measures itself and
    gets the schedule that fits (`fit_to_budget`); the config the run writes holds that schedule, and the precision
    that ``amp='auto'`` chose on ``device`` (`boatvit.runtime.resolve_amp`), so a resume elsewhere keeps it.
    """
    started = time.perf_counter() if started is None else started
    config = _resolve_precision(config, device, world_size, say=rank == 0)
    random_seed(config.seed)  # the same initial weights on every rank
    train_ds, val_ds, classes = _open_data(config, say=rank == 0, progress=progress)
    model = build_model(
        config.model,
        num_classes=len(classes),
        model_kwargs=config.model_kwargs,
        # a frozen backbone gives the head the features it will have at inference: no blocks dropped
        drop_path_rate=0.0 if config.freeze_backbone else config.drop_path,
        img_size=config.img_size,
    )
    if config.weights and resume_state is None:  # a resumed run has its own trained weights in resume_state
        _start_from_weights(model, initial_weights or read_weights(config.weights), classes, rank == 0)
    if config.freeze_backbone:
        for param in model.parameters():
            param.requires_grad = False
        for param in model.get_classifier().parameters():
            param.requires_grad = True
    data_config = _set_transforms(config, model, train_ds, val_ds)
    random_seed(config.seed, rank)  # different augmentation on every rank
    train_loader, val_loader, updates_per_epoch = build_loaders(
        config, train_ds, val_ds, rank, world_size, workers, device
    )
    model = _place_model(model, config, device, world_size)
    if config.time_budget and resume_state is None:
        config = fit_to_budget(model, config, device, world_size, train_loader, val_loader, started, rank == 0)
        train_loader, val_loader, updates_per_epoch = build_loaders(
            config, train_ds, val_ds, rank, world_size, workers, device
        )
    trainer = Trainer(model, config, device, world_size, updates_per_epoch)

    history: List[Dict[str, Any]] = []
    start_epoch = 0
    if resume_state is not None:
        trainer.load_state_dict(resume_state['trainer'])
        history, start_epoch = list(resume_state['history']), resume_state['epoch']
        if rank < len(resume_state['rng']):
            set_rng_state(resume_state['rng'][rank])
    elif rank == 0:
        _write_run_config(run_dir, config, recipe, world_size, updates_per_epoch, classes, data_config)
        report(
            f'run directory {run_dir}: {config.model} on {config.data}, {len(train_ds)} train / {len(val_ds)} val'
            f' images, {len(classes)} classes, global batch {global_batch_size(config, world_size)}, lr'
            f' {learning_rate(config, world_size):.2e}'
        )

    weights_metadata = _weights_metadata(config, classes, data_config, ema=trainer.ema is not None)
    best = max(history, key=lambda row: row['eval_top1'], default=None)
    batches = updates_per_epoch * config.grad_accum
    # one bar for the whole run, its rate averaged over all of it (validations included), so its remaining time is
    # the run's
    bar = tqdm(total=(config.epochs - start_epoch) * batches, unit='batch', smoothing=0, disable=not progress)

    def say_how_long(step_s: float) -> None:
        if rank == 0 and not config.time_budget:
            # validation runs the forward pass only, about a third of a training step's work
            epoch_s = batches * step_s + len(val_loader) * step_s / 3 * (2 if trainer.ema is not None else 1)
            report(
                f'at {_rate(config.batch_size * world_size / step_s)} images/s this run will take about'
                f' {format_duration((config.epochs - start_epoch) * epoch_s)} for its'
                f' {config.epochs - start_epoch} epochs on this machine'
            )

    resumed_at = None if resume_state is None else trainer.num_updates
    # TensorBoard is the one logger (loggers.LOGGERS); config.log was checked when the config was made
    log = TensorBoardLog(run_dir, read_run_config(run_dir), resumed_at) if rank == 0 and config.log else None
    # the budget is the wall time of the first process; a resumed run keeps the schedule it had, re-planned or not
    replan = config.time_budget is not None and resume_state is None
    save_s = 0.0
    try:
        epoch = start_epoch
        while epoch < config.epochs:
            train_loader.sampler.set_epoch(epoch)
            on_probe = say_how_long if epoch == start_epoch else None
            row = _train_and_validate(trainer, train_loader, val_loader, epoch, bar, on_probe, log)
            _check_finite_weights(trainer, epoch)  # before it can count as the best or be saved
            history.append(row)
            is_best = best is None or row['eval_top1'] > best['eval_top1']
            if is_best:
                best = row
            epoch += 1
            if replan:  # before the save, so that last.pt holds the schedule the config will name
                planned = config
                full = _full_epoch_batches(config, train_loader)
                config = _replan(config, trainer, full, epoch, row, save_s, started, world_size, rank)
                batches = trainer.updates_per_epoch * config.grad_accum
                bar.total = bar.n + (config.epochs - epoch) * batches
                bar.refresh()
            ranks_rng = _gather_rng(world_size)
            if rank == 0:
                save_start = time.perf_counter()
                _save_epoch(run_dir, trainer, history, ranks_rng, weights_metadata, is_best)
                if replan and config != planned:
                    updates = trainer.updates_per_epoch
                    _write_run_config(run_dir, config, recipe, world_size, updates, classes, data_config)
                save_s = time.perf_counter() - save_start
                if log is not None:
                    log.epoch(trainer.num_updates, row)
    finally:
        bar.close()
        if log is not None:
            log.close()
    return history


def _resolve_precision(config: TrainConfig, device: torch.device, world_size: int, say: bool) -> TrainConfig:
    """``config`` with the autocast dtype its ``amp`` means on ``device`` (rank 0's, so that the processes of
    machines with and without bf16 units agree), saying so when 'auto' chose bf16."""
    amp, why = resolve_amp(config.amp, device)
    if world_size > 1:
        chosen = [(amp, why)]
        dist.broadcast_object_list(chosen, src=0)
        amp, why = chosen[0]
    if say and why:
        report(why)
    return dataclasses.replace(config, amp=amp)


def _rate(per_s: float) -> str:
    return f'{per_s:.0f}' if per_s >= 10 else f'{per_s:.2g}'


def _measure_run(
    model: torch.nn.Module,
    config: TrainConfig,
    device: torch.device,
    world_size: int,
    train_loader,
    val_loader,
    budget: float,
) -> StepTimes:
    """Time a few training steps, validation batches and a save of this run, then put the model and the random
    generators back as they were: the measurements train nothing.

    Every process gets the slowest process's times, so all plan the same schedule.
    """
    weights = {k: v.clone() for k, v in unwrap_model(model).state_dict().items()}
    rng = rng_state()
    # a short warm-up pass (allocations, kernel builds), then enough steps for about 2 % of the budget (3 to 50)
    trial = Trainer(model, config, device, world_size, updates_per_epoch=1)
    start = time.perf_counter()
    trial.train_one_epoch(train_loader, 0)
    guess = time.perf_counter() - start
    updates = int(min(50, len(train_loader) // config.grad_accum, max(3, min(20.0, 0.02 * budget) / guess)))
    updates = max(1, updates)
    trial.updates_per_epoch = updates
    start = time.perf_counter()
    trial.train_one_epoch(train_loader, 0)
    step = (time.perf_counter() - start) / (updates * config.grad_accum)
    val_batches = min(2, len(val_loader))
    start = time.perf_counter()
    images = evaluate(unwrap_model(model), itertools.islice(val_loader, val_batches), device, config.amp)['images']
    # evaluate counts the images of every process, each of which validates its own shard meanwhile
    per_image = (time.perf_counter() - start) / max(1, images / world_size)
    eval_epoch = per_image * len(val_loader.dataset) * (2 if trial.ema is not None else 1)
    start = time.perf_counter()
    for _ in range(2):  # last.pt, and the weights twice (last and best) are about as much again
        torch.save(trial.state_dict(), io.BytesIO())
    save_epoch = time.perf_counter() - start + 0.5  # and the metrics and curves
    unwrap_model(model).load_state_dict(weights)
    set_rng_state(rng)
    times = torch.tensor([step, eval_epoch, save_epoch], dtype=torch.float64)
    if world_size > 1:
        times = times.to(device)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
    return StepTimes(*times.tolist())


def fit_to_budget(
    model: torch.nn.Module,
    config: TrainConfig,
    device: torch.device,
    world_size: int,
    train_loader,
    val_loader,
    started: float,
    say: bool,
) -> TrainConfig:
    """``config`` with the epochs, batches per epoch and warm-up that fit its ``time_budget``
    (`boatvit.time_budget.plan_schedule`), from the run's own measured speed; the warm-up keeps the recipe's share
    of the schedule. Says what it chose when ``say``."""
    budget = parse_duration(config.time_budget)
    times = _measure_run(model, config, device, world_size, train_loader, val_loader, budget)
    full = _full_epoch_batches(config, train_loader)
    warmup_fraction = min(0.5, config.warmup_epochs / config.epochs)
    plan = plan_schedule(budget, time.perf_counter() - started, times, full, warmup_fraction, config.grad_accum)
    planned = dataclasses.replace(
        config,
        epochs=plan.epochs,
        warmup_epochs=round(plan.warmup_epochs, 3),
        train_batches=plan.batches_per_epoch if plan.batches_per_epoch < full else None,
    )
    if say:
        share = '' if plan.batches_per_epoch == full else f' ({plan.batches_per_epoch} of its {full} batches)'
        report(
            f'time budget {format_duration(budget)}: measured {_rate(config.batch_size * world_size / times.step)}'
            f' images/s training, {format_duration(times.eval_epoch)} a validation; the schedule is {plan.epochs}'
            f' epochs{share}, {planned.warmup_epochs:g} of warm-up, cosine decay to lr {config.min_lr:.0e};'
            f' planned to end in {format_duration(plan.seconds)}'
        )
    return planned


def _full_epoch_batches(config: TrainConfig, train_loader) -> int:
    """The training batches of a whole pass, as far as ``--limit-batches`` allows: the most a plan can give an epoch."""
    return len(train_loader) if config.limit_batches is None else min(len(train_loader), config.limit_batches)


def _replan(
    config: TrainConfig,
    trainer: Trainer,
    full_epoch_batches: int,
    epochs_done: int,
    row: Dict[str, Any],
    save_s: float,
    started: float,
    world_size: int,
    rank: int,
) -> TrainConfig:
    """``config`` with the rest of its schedule planned again for the time its budget has left when the epoch just
    done (``row``, saved in about ``save_s``) shows that the plan no longer fits (`replan_schedule`): its epochs and
    batches per epoch, and ``trainer``'s lr schedule stretched or shrunk over them. Rank 0 decides for every
    process."""
    budget = parse_duration(config.time_budget)
    elapsed = time.perf_counter() - started
    batches = trainer.updates_per_epoch * config.grad_accum
    train_s = batches * config.batch_size * world_size / row['train_images_per_s']
    times = StepTimes(train_s / batches, max(0.0, row['epoch_s'] - train_s), save_s)
    plan = [
        replan_schedule(
            budget, elapsed, times, epochs_done, config.epochs, batches, full_epoch_batches, config.grad_accum
        )
    ]
    if world_size > 1:
        dist.broadcast_object_list(plan, src=0)
    plan = plan[0]
    if plan is None:
        return config
    trainer.updates_per_epoch = plan.batches_per_epoch // config.grad_accum
    trainer.stretch_schedule(plan.epochs * trainer.updates_per_epoch)
    replanned = dataclasses.replace(
        config,
        epochs=epochs_done + plan.epochs,
        train_batches=plan.batches_per_epoch if plan.batches_per_epoch < full_epoch_batches else None,
    )
    trainer.config = replanned  # its progress bar names the epochs
    if rank == 0:
        share = '' if plan.batches_per_epoch == full_epoch_batches else f' of {plan.batches_per_epoch} batches'
        report(
            f'time budget {format_duration(budget)}: after {format_duration(elapsed)} an epoch takes'
            f" {format_duration(row['epoch_s'] + save_s)}, not as planned (the machine's load changed): the rest of"
            f' the schedule is {plan.epochs} more epochs{share}, {replanned.epochs} in all instead of'
            f' {config.epochs}, its cosine decay fitted to them; planned to end in'
            f' {format_duration(elapsed + plan.seconds)}'
        )
    return replanned


def _check_weights(config: TrainConfig) -> Weights:
    """``config.weights`` read, and checked to fit ``config.model`` (the classifier aside)."""
    weights = read_weights(config.weights)
    check_backbone(weights, config.model, config.model_kwargs, img_size=config.img_size)
    return weights


def open_resumed_run(run_dir: os.PathLike, world_size: int) -> Tuple[Path, TrainConfig, Optional[str], Dict[str, Any]]:
    """The run directory, config, recipe and last saved state of a run to resume (``RUN_DIR`` or a file in it)."""
    run_dir = Path(run_dir)
    if run_dir.is_file():  # RUN_DIR/last.pt or another file of the run
        run_dir = run_dir.parent
    saved = read_run_config(run_dir)
    if saved['world_size'] != world_size:
        raise UsageError(
            f'{run_dir} was trained by {saved["world_size"]} processes; resume it with as many (the global batch and'
            f' learning rate depend on it), not {world_size}'
        )
    if not (run_dir / 'last.pt').is_file():
        raise UsageError(f'{run_dir} has no last.pt: it stopped before its first epoch ended; start it anew')
    return run_dir, TrainConfig(**saved['config']), saved['recipe'], load_state(run_dir / 'last.pt')


@dataclasses.dataclass
class TrainResult:
    """What `train` did: the run directory (None on ranks other than 0), one metrics row per epoch (all epochs of
    a resumed run), the seconds it took, and whether the run had already finished (nothing was trained)."""

    run_dir: Optional[Path]
    history: List[Dict[str, Any]]
    seconds: float
    already_finished: bool = False


def train(
    config: Optional[TrainConfig] = None,
    recipe: Optional[str] = None,
    resume: Optional[os.PathLike] = None,
    output: os.PathLike = 'runs',
    name: Optional[str] = None,
    device: str = 'auto',
    workers: Optional[int] = None,
    progress: bool = True,
) -> TrainResult:
    """Train a new run of ``config`` in ``output/name``, or continue the run directory ``resume``.

    Joins the process group torchrun describes, if any. ``workers`` None: data loader processes by core count.
    """
    start = time.perf_counter()  # a time budget counts from here
    if (config is None) == (resume is None):
        raise UsageError('train takes either a config (a new run) or resume (a run directory), not both or neither')
    # every epoch ends by plotting the curves: a missing matplotlib is said before training, not after an epoch
    require_extra('matplotlib', 'matplotlib', 'plotting training curves')
    rank, world_size, run_on = init_distributed(device)
    try:
        resume_state, run_dir, initial_weights = None, None, None
        if resume is not None:
            run_dir, config, recipe, resume_state = open_resumed_run(resume, world_size)
            if resume_state['epoch'] >= config.epochs:
                if rank == 0:
                    report(f'{run_dir} already finished its {config.epochs} epochs')
                return TrainResult(run_dir, list(resume_state['history']), 0.0, already_finished=True)
        else:
            # weights that do not fit the model are refused before a run directory exists
            initial_weights = _check_weights(config) if config.weights else None
            if rank == 0:
                data_name = Path(config.data).name or config.data
                run_dir = new_run_dir(output, name, f'{time.strftime("%Y%m%d-%H%M%S")}-{config.model}-{data_name}')
        if workers is None:
            workers = default_workers(int(os.environ.get('LOCAL_WORLD_SIZE', '1')))
        # rank 0 holds the run directory: no second process trains it, a failed new run leaves no empty directory
        with hold_run_dir(run_dir, created=resume is None) if rank == 0 else contextlib.nullcontext():
            history = fit(
                config,
                run_dir,
                run_on,
                rank=rank,
                world_size=world_size,
                workers=workers,
                progress=progress and rank == 0,
                resume_state=resume_state,
                recipe=recipe,
                initial_weights=initial_weights,
                started=start,
            )
        return TrainResult(run_dir, history, time.perf_counter() - start)
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
