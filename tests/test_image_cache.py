"""The in-memory image cache (`boatvit.image_cache`), the batched training augmentation (`boatvit.batch_augment`), and
the training defaults fitted to an image folder (`boatvit.recipes.fit_to_data`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_dataset, create_transform
from torchvision.transforms import RandomResizedCrop

from boatvit.batch_augment import BatchAugment, sample_crops
from boatvit.cli import main
from boatvit.cli.train import config_from_args
from boatvit.data import open_image
from boatvit.errors import UsageError
from boatvit.image_cache import InMemoryImages, cache_split, collate_samples
from boatvit.recipes import fit_to_data
from test_data import make_image_folder
from test_evaluate import TINY_FLAGS
from test_train import parse_train

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """PNG and JPEG images of 32x32 in two classes (JPEG, so the cache must decode exactly as the disk reader)."""
    root = make_image_folder(tmp_path_factory.mktemp('cache') / 'data', {'train': {'a': 6, 'b': 5}})
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / 'train' / 'b' / f'j{i}.jpg')
    return root


def samples(root):
    return create_dataset('', root=str(root / 'train'), split='train', search_split=False).reader.samples


def test_the_cache_serves_the_same_images_and_tensors_as_decoding_every_time(folder):
    items = samples(folder)
    cached, why = cache_split(items, 'train', progress=False, threads=2)
    assert isinstance(cached, InMemoryImages) and len(cached) == len(items) == 15
    assert why == 'train: 15 images of 32x32 decoded once and kept in memory (45 KiB)'
    transform = create_transform((3, 32, 32), is_training=False, crop_pct=1.0, mean=MEAN, std=STD)
    cached.transform = transform
    for i, (path, label) in enumerate(items):
        tensor, target = cached[i]
        assert target == label
        assert torch.equal(tensor, transform(open_image(path)))


def test_the_cache_is_refused_politely_when_it_does_not_fit(folder, tmp_path):
    items = samples(folder)
    cached, why = cache_split(items, 'train', memory=100_000, progress=False)
    assert cached is None and why == (
        'train: decoded from disk every epoch: its pixels take 45 KiB (1 copy), more than 25% of the 98 KiB free'
    )
    _, why = cache_split(items, 'train', copies=4, memory=400_000, progress=False)
    assert '180 KiB (4 copies)' in why
    with pytest.raises(UsageError, match='--data-cache memory: train cannot be kept in memory: its pixels take'):
        cache_split(items, 'train', mode='memory', memory=100_000, progress=False)
    assert cache_split(items, 'train', mode='none')[0] is None
    with pytest.raises(UsageError, match="--data-cache must be one of \\['auto', 'memory', 'none'\\], got 'ram'"):
        cache_split(items, 'train', mode='ram')
    # images of several sizes stay on disk
    mixed = make_image_folder(tmp_path / 'mixed', {'train': {'a': 2}})
    Image.new('RGB', (40, 30)).save(mixed / 'train' / 'a' / 'wide.png')
    cached, why = cache_split(samples(mixed), 'train', progress=False)
    assert cached is None and 'its images have 2 sizes (32x32, 40x30, ...)' in why


def test_batches_come_whole_from_the_cache_through_the_loader(folder):
    cached, _ = cache_split(samples(folder), 'train', progress=False)
    cached.batch_transform = lambda pixels: pixels.float() + 1
    loader = torch.utils.data.DataLoader(cached, batch_size=4, collate_fn=collate_samples)
    images, targets = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and torch.equal(images, cached.pixels[:4].permute(0, 3, 1, 2).float() + 1)
    assert torch.equal(targets, cached.targets[:4])
    cached.batch_transform = None  # per image again, through the default collate
    cached.transform = lambda image: torch.from_numpy(np.asarray(image).copy())
    images, targets = next(iter(loader))
    assert torch.equal(images, cached.pixels[:4]) and targets.tolist() == cached.targets[:4].tolist()


def pixels(batch=6, size=16, seed=0):
    return torch.randint(0, 256, (batch, 3, size, size), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)


def normalised(x):
    return (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_a_whole_image_crop_is_the_image_and_a_resize_is_torchs_bilinear_resize():
    x = pixels()
    same = BatchAugment((16, 16), scale=(1, 1), ratio=(1, 1), hflip=0.0, mean=MEAN, std=STD)
    torch.testing.assert_close(same(x), normalised(x), rtol=0, atol=1e-5)
    flipped = BatchAugment((16, 16), scale=(1, 1), ratio=(1, 1), hflip=1.0, mean=MEAN, std=STD)
    torch.testing.assert_close(flipped(x), normalised(x).flip(-1), rtol=0, atol=1e-5)
    larger = BatchAugment((24, 24), scale=(1, 1), ratio=(1, 1), hflip=0.0, mean=MEAN, std=STD)
    resized = F.interpolate(x.float(), size=(24, 24), mode='bilinear', align_corners=False, antialias=False)
    torch.testing.assert_close(larger(x), normalised(resized), rtol=0, atol=1e-4)


def test_crops_are_drawn_as_torchvision_draws_them():
    torch.manual_seed(0)
    boxes = sample_crops(4000, 32, 48, scale=(0.35, 1.0), ratio=(0.75, 4 / 3))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 48).all()
    # torchvision's draws, one image at a time, as the oracle of the distribution (the first of ten tries that fits
    # favours small crops on this wide image, so neither mean is the middle of its range)
    image = torch.zeros(3, 32, 48)
    ours = [(h * w / (32 * 48)).mean().item(), (w / h).mean().item()]
    theirs = torch.tensor(
        [RandomResizedCrop.get_params(image, scale=(0.35, 1.0), ratio=(0.75, 4 / 3))[2:] for _ in range(4000)],
        dtype=torch.float32,
    )
    expected = [(theirs[:, 0] * theirs[:, 1] / (32 * 48)).mean().item(), (theirs[:, 1] / theirs[:, 0]).mean().item()]
    assert ours == pytest.approx(expected, abs=0.015)
    assert (h * w / (32 * 48)).min() > 0.3 and ((w / h) > 0.7).all() and ((w / h) < 1.45).all()
    impossible = sample_crops(10, 8, 8, scale=(2.0, 3.0), ratio=(1, 1))  # nothing fits: the whole image
    assert torch.equal(impossible, torch.tensor([[0.0, 0.0, 8.0, 8.0]]).expand(10, 4))


def test_the_batch_augmentation_flips_half_and_jitters_within_range():
    torch.manual_seed(0)
    x = pixels(batch=400, size=8)
    flips = BatchAugment((8, 8), scale=(1, 1), ratio=(1, 1), hflip=0.5, mean=(0, 0, 0), std=(1, 1, 1))(x)
    flipped = torch.isclose(flips, x.float().flip(-1) / 255, atol=1e-5).flatten(1).all(1)
    assert 150 < int(flipped.sum()) < 250
    jittered = BatchAugment(
        (8, 8), scale=(1, 1), ratio=(1, 1), hflip=0.0, color_jitter=0.4, mean=(0, 0, 0), std=(1, 1, 1)
    )(x)
    assert jittered.min() >= 0 and jittered.max() <= 1 and not torch.allclose(jittered, x.float() / 255)


def test_fitted_defaults_follow_the_number_and_size_of_the_images():
    few, why_few = fit_to_data(100, 32)
    some, _ = fit_to_data(5000, 32)
    many, why_many = fit_to_data(50000, 32)
    assert (few['batch_size'], some['batch_size'], many['batch_size']) == (8, 64, 128)
    assert few['epochs'] > some['epochs'] > many['epochs'] and many['warmup_epochs'] == 1.5
    assert few.get('aa', 'reference') == 'reference' and some['aa'] == 'rand-m6-mstd0.5-inc1' and many['aa'] is None
    assert many['mixup'] == many['cutmix'] == many['reprob'] == 0.0
    # crops keep most of a photo when a short run on many images underfits, and more is cut from a few thousand
    assert many['scale'] == (0.9, 1.0) and some['scale'] == few['scale'] == (0.35, 1.0)
    assert few['model'] == many['model'] == 'boat_swin_nano_convstem_32'
    assert fit_to_data(100, 224)[0]['img_size'] == 64 and few['img_size'] == 32
    assert '100 training images: batch 8' in why_few[1] and 'light augmentation' in why_many[-1]
    assert 'amp' not in few and 'amp' not in many  # every run's default, --amp auto, decides the precision


def test_a_folder_of_100_and_one_of_5000_images_get_different_batches_and_say_so(tmp_path, capsys):
    small = make_image_folder(tmp_path / 'small', {'train': {'a': 50, 'b': 50}, 'val': {'a': 1, 'b': 1}}, size=8)
    large = make_image_folder(tmp_path / 'large', {'train': {'a': 2500, 'b': 2500}, 'val': {'a': 1, 'b': 1}}, size=8)
    config_small, recipe = config_from_args(parse_train('--data', str(small)))
    said_small = capsys.readouterr().out
    config_large, _ = config_from_args(parse_train('--data', str(large), '--epochs', '7'))
    said_large = capsys.readouterr().out
    assert recipe == 'small-data' and (config_small.batch_size, config_large.batch_size) == (8, 64)
    assert config_large.epochs == 7  # a flag given overrides the fitted value
    assert (
        'fitted to the data: images of about 8 px: boat_swin_nano_convstem_32 at 32 px; 100 training images: batch 8'
        in said_small
    )
    assert '5000 training images: batch 64' in said_large and '(yours: --epochs)' in said_large


def test_a_cached_folder_trains_with_the_batched_augmentation(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', {'train': {'a': 8, 'b': 8}, 'val': {'a': 2, 'b': 2}})
    argv = ['train', '--data', str(data), *TINY_FLAGS, '--epochs', '1', '--batch-size', '4', '--workers', '0']
    assert main([*argv, '--aa', 'none', '--quiet', '--output', str(tmp_path), '--name', 'fast']) == 0
    out = capsys.readouterr().out
    assert 'train: 16 images of 32x32 decoded once and kept in memory (48 KiB)' in out
    assert 'this run will take about' in out
    assert main([*argv, '--data-cache', 'none', '--quiet', '--output', str(tmp_path), '--name', 'disk']) == 0
    assert 'train: decoded from disk every epoch (--data-cache none)' in capsys.readouterr().out
    for run in ('fast', 'disk'):
        history = json.loads((tmp_path / run / 'metrics.json').read_text())
        assert len(history) == 1 and np.isfinite(history[0]['train_loss'])
