"""Named training presets: the embedded digits default, the small-data and fine-tuning defaults, and the reference
ImageNet-1k recipes of the six models.

A recipe is a dict of `boatvit.training.TrainConfig` fields; command-line flags override it. The reference recipes
come from the configurations the BOAT authors trained with: BOAT-Swin with the Swin Transformer code base
(global batch 1024 as 128 per GPU x 8), BOAT-CSWin with the CSWin code base (global batch 2048 as 256 x 8).
``batch_size`` is per process and the learning rate scales linearly with the global batch
(``lr = lr_base * global_batch / lr_base_size``), so other GPU counts keep the reference lr per image.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

# Swin code base: AdamW, 300 epochs, 20 warm-up, label smoothing 0.1, mixup 0.8 / cutmix 1.0, RandAugment,
# random erasing 0.25, gradient clipping at norm 5, no EMA. Swin also scales its warm-up and minimum lr with the
# batch; 1e-6 and 1e-5 are its values at the reference batch of 1024.
_SWIN = dict(
    epochs=300,
    warmup_epochs=20,
    batch_size=128,
    lr_base=5e-4,
    lr_base_size=512,
    weight_decay=0.05,
    warmup_lr=1e-6,
    min_lr=1e-5,
    clip_grad=5.0,
    smoothing=0.1,
    mixup=0.8,
    cutmix=1.0,
    aa='rand-m9-mstd0.5-inc1',
    reprob=0.25,
    remode='pixel',
    img_size=224,
    # the reference used fp16 AMP; bf16 needs no loss scaling and trains the same on current GPUs
    amp='bf16',
)

# CSWin code base: the same augmentation, lr 2e-3 at batch 2048, EMA of the weights, no gradient clipping.
_CSWIN = dict(_SWIN, batch_size=256, lr_base=2e-3, lr_base_size=2048, clip_grad=None, ema_decay=0.99984)

# Fine-tuning from weights (`boatvit train --weights`). From the Swin and CSWin fine-tuning configurations (224 ->
# 384 on ImageNet-1k): 30 epochs, 5 of warm-up (Swin), weight decay 1e-8, warm-up and minimum lr far below the peak
# (Swin: 1e-3 and 1e-2 of it). Their peak lr (Swin 2e-5 at a batch of 512) fine-tunes a head that already knows the
# classes, over ~40k steps; a new head on a few hundred images gets a few hundred steps, so the peak is far higher:
# 2e-3 at the batch of 32, with timm's and BEiT/MAE's layer-wise decay of 0.75, which keeps the early layers close
# to the weights (the stem of a 12-block model gets 2 % of the peak). Chosen on real photos (CIFAR-10, five classes
# learnt from five others, 10 and 50 photos per class, 3 seeds; benchmarks/RESULTS.md): the former 5e-4 tied with
# training from scratch at 50 photos per class and 2e-3 won by 6 points. The batch follows the folder
# (`fit_finetune_to_data`) and the lr the batch by its square root, the rule for AdamW (timm's default for adaptive
# optimizers), so that a batch of 8 keeps half the peak instead of a quarter. No mixup or cutmix (they pair images
# in batches of a few dozen), no EMA (the CSWin 0.9998 would barely move in a few hundred steps), the RandAugment
# and random erasing of the reference recipes. Large data sets, many steps, want a lower --lr.
_FINETUNE = dict(
    epochs=30,
    warmup_epochs=5,
    batch_size=32,
    lr_base=2e-3,
    lr_base_size=32,
    lr_base_scale='sqrt',
    layer_decay=0.75,
    weight_decay=1e-8,
    warmup_lr=1e-7,
    min_lr=1e-6,
    drop_path=0.1,
    smoothing=0.1,
    mixup=0.0,
    cutmix=0.0,
    aa='rand-m9-mstd0.5-inc1',
    reprob=0.25,
    remode='pixel',
)

RECIPES: Dict[str, Dict[str, Any]] = {
    # the embedded default, `boatvit train` with no arguments: a few minutes on 2 CPU cores
    'digits': dict(
        data='digits',
        model='boat_swin_nano_32',
        img_size=32,
        epochs=30,
        warmup_epochs=2,
        batch_size=64,
        lr_base=2e-3,
        lr_base_size=64,
        weight_decay=0.05,
        warmup_lr=1e-5,
        min_lr=1e-5,
        clip_grad=5.0,
        drop_path=0.1,
        smoothing=0.1,
        mixup=0.0,
        cutmix=0.0,
        aa=None,
        reprob=0.0,
        # digits are not mirror-symmetric and have no colour; mild crops stand in for shifts and scaling
        hflip=0.0,
        color_jitter=0.0,
        scale=(0.7, 1.0),
        ratio=(0.85, 1.15),
        crop_pct=1.0,
    ),
    # `boatvit train --data DIR` without a recipe or weights: a small model from scratch. For an image folder,
    # `fit_to_data` chooses the model, size, batch, epochs and augmentation from its images; these values are for
    # data that cannot be looked at beforehand (timm data sets): the reference augmentation against overfitting
    'small-data': dict(
        epochs=50,
        warmup_epochs=5,
        batch_size=16,
        lr_base=1e-3,
        lr_base_size=64,
        weight_decay=0.05,
        warmup_lr=1e-6,
        min_lr=1e-5,
        clip_grad=5.0,
        drop_path=0.1,
        smoothing=0.1,
        mixup=0.8,
        cutmix=1.0,
        aa='rand-m9-mstd0.5-inc1',
        reprob=0.25,
    ),
    # Swin clips gradients at norm 5 in fine-tuning as in training; CSWin clips none
    'finetune-swin': dict(_FINETUNE, clip_grad=5.0),
    'finetune-cswin': dict(_FINETUNE, clip_grad=None),
    'boat_swin_tiny_224': dict(_SWIN, model='boat_swin_tiny_224', drop_path=0.2),
    'boat_swin_small_224': dict(_SWIN, model='boat_swin_small_224', drop_path=0.3),
    'boat_swin_base_224': dict(_SWIN, model='boat_swin_base_224', drop_path=0.5),
    'boat_cswin_tiny_224': dict(_CSWIN, model='boat_cswin_tiny_224', drop_path=0.2),
    'boat_cswin_small_224': dict(_CSWIN, model='boat_cswin_small_224', drop_path=0.4),
    'boat_cswin_base_224': dict(
        _CSWIN, model='boat_cswin_base_224', drop_path=0.5, lr_base=1e-3, weight_decay=0.1, ema_decay=0.99992
    ),
}

DEFAULT_RECIPE = 'digits'
SMALL_DATA_RECIPE = 'small-data'
#: the preset `boatvit train --weights` uses, per model family
FINETUNE_RECIPES = {'swin': 'finetune-swin', 'cswin': 'finetune-cswin'}


def _fitted_batch(num_images: int, largest: int) -> int:
    """The largest power of two from 8 to ``largest`` that leaves at least 40 steps an epoch of ``num_images``, and
    never more than the images (a batch of 8 from 5 images is 4)."""
    return min(largest, max(8, 2 ** int(math.log2(max(1, num_images // 40)))), 2 ** int(math.log2(num_images)))


def fit_finetune_to_data(num_images: int) -> Tuple[Dict[str, Any], List[str]]:
    """The fine-tuning preset's batch for a training split of ``num_images`` images, and why: its batch of 32 leaves
    a folder of a few hundred photos a handful of steps an epoch, so smaller folders get smaller batches (down to 8,
    for at least 40 steps an epoch where it can), the lr following by its square root (``lr_base_scale``)."""
    if num_images < 1:
        raise ValueError(f'fit_finetune_to_data needs at least one image, got {num_images}')
    batch = _fitted_batch(num_images, largest=_FINETUNE['batch_size'])
    why = f'{num_images} training images: batch {batch} ({num_images // batch} steps an epoch)'
    return {'batch_size': batch}, [why]


def fit_to_data(num_images: int, image_side: int) -> Tuple[Dict[str, Any], List[str]]:
    """The small-data recipe's values for a training split of ``num_images`` images about ``image_side`` pixels on
    their longer side, and why each was chosen (`boatvit.training.config_from_values` prints them).

    From scratch on a CPU, the model is the small `boat_swin_nano_convstem_32` (`boat_swin_nano_32` with a
    convolutional stem, which learns photos faster): at 32 px for images of up to 48 px, at 64 px for larger ones
    (its patches of 2 px give 32x32 tokens, four FSLA clusters at stage 1). The batch is the largest power of two
    that leaves at least 40 steps an epoch, from 8 to 128, with the lr scaled linearly to it (1e-3 at 64). Small
    sets get more epochs and the augmentation of the reference recipes against overfitting; from 20,000 images on,
    a light one (crops and flips, no RandAugment, mixup, cutmix, erasing or stochastic depth): a short run on many
    images underfits, and the strong augmentation meant for 300 ImageNet epochs keeps its loss near chance. Crops
    keep at least 35 % of a small image (timm's 8 % of a 32 px photo is a 9 px patch), and 90 % from 20,000 images
    on: on CIFAR-10 a 3-epoch run reached 49.9, 55.7 and 58.2 % with crops of at least 35, 70 and 90 %.
    The precision is every run's default, ``amp='auto'`` (`boatvit.runtime.resolve_amp`).
    """
    if num_images < 1 or image_side < 1:
        raise ValueError(f'fit_to_data needs at least one image of at least one pixel, got {num_images}, {image_side}')
    reasons = []
    img_size = 32 if image_side <= 48 else 64
    values: Dict[str, Any] = {'model': 'boat_swin_nano_convstem_32', 'img_size': img_size}
    reasons.append(f'images of about {image_side} px: boat_swin_nano_convstem_32 at {img_size} px')
    values['batch_size'] = _fitted_batch(num_images, largest=128)
    reasons.append(
        f'{num_images} training images: batch {values["batch_size"]}'
        f' ({num_images // values["batch_size"]} steps an epoch), lr {1e-3 * values["batch_size"] / 64:.2e}'
    )
    values.update(lr_base=1e-3, lr_base_size=64)
    epochs = 100 if num_images < 1000 else 50 if num_images < 10000 else 30
    values.update(epochs=epochs, warmup_epochs=round(0.05 * epochs, 2))
    reasons.append(f'{epochs} epochs, 5 % of them warm-up')
    if image_side <= 64:
        values['scale'] = (0.35, 1.0)
    if num_images >= 20000:
        values.update(aa=None, mixup=0.0, cutmix=0.0, reprob=0.0, color_jitter=0.0, drop_path=0.0)
        values['scale'] = (0.9, 1.0)
        reasons.append('light augmentation (crops of at least 90 % and flips) for many images')
    elif num_images >= 2000:
        values.update(aa='rand-m6-mstd0.5-inc1', mixup=0.0, cutmix=0.0, reprob=0.1)
        reasons.append('RandAugment m6 and a little random erasing, no mixup or cutmix, for a few thousand images')
    else:
        reasons.append('the reference augmentation (RandAugment m9, mixup, cutmix, random erasing) for few images')
    return values, reasons
