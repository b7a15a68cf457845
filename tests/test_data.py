"""Tests for boatvit.data: the built-in digits split, image folders and the errors bad data directories get."""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_digits

from boatvit.errors import UnreadableImageError, UsageError
from boatvit.data import (
    DigitsDataset,
    canonical_image_size,
    check_same_classes,
    eval_data_config,
    eval_transform,
    image_hw,
    normalize_images,
    open_image,
    open_split,
    shard,
)


def make_image_folder(root: Path, splits: dict, size: int = 32, seed: int = 0) -> Path:
    """``splits`` maps split -> {class: number of images}; writes random RGB PNGs."""
    rng = np.random.default_rng(seed)
    for split, classes in splits.items():
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f'{i}.png')
    return root


def test_digits_split_is_fixed_stratified_and_disjoint():
    train, val = DigitsDataset('train'), DigitsDataset('val')
    assert (len(train), len(val)) == (1437, 360)
    # stratified: every class holds 20 % of its images in val, up to rounding
    total = Counter(load_digits().target.tolist())
    val_counts = Counter(val.targets)
    assert all(abs(val_counts[c] - 0.2 * total[c]) <= 1 for c in range(10))
    train_images = {img.tobytes() for img in train.images}
    # a handful of digits occur twice in the data, so allow a few coincidences but no shared split
    assert sum(img.tobytes() in train_images for img in val.images) <= 5
    again = DigitsDataset('val')
    assert again.targets == val.targets and all(np.array_equal(a, b) for a, b in zip(again.images, val.images))


def test_digits_images_are_upscaled_rgb():
    ds = DigitsDataset('val', img_size=32)
    img, label = ds[0]
    assert img.mode == 'RGB' and img.size == (32, 32)
    assert label == ds.targets[0]
    pixels = np.asarray(img)
    assert pixels[..., 0].tolist() == pixels[..., 2].tolist()  # grey
    # shrunk back to 8x8, the image is closest to a source digit with the same label, and almost equal to it
    digits = load_digits()
    block_means = pixels[..., 0].reshape(8, 4, 8, 4).mean(axis=(1, 3)).ravel()
    corr = [np.corrcoef(block_means, source.ravel())[0, 1] for source in digits.images]
    assert digits.target[int(np.argmax(corr))] == label and max(corr) > 0.95


def test_image_sizes_have_one_form_and_bad_ones_are_named():
    # as given in Python, by the flag's words, or read back from JSON
    assert canonical_image_size(160) == canonical_image_size([160]) == canonical_image_size((160, 160)) == 160
    assert canonical_image_size([128, 192]) == canonical_image_size((128, 192)) == (128, 192)
    assert canonical_image_size(None) is None and image_hw(160) == (160, 160) and image_hw([128, 192]) == (128, 192)
    for bad in (0, [1, 2, 3], [], '64', True, [64.0], (-1, 64)):
        with pytest.raises(UsageError, match='--img-size takes one positive int'):
            canonical_image_size(bad)
    with pytest.raises(UsageError, match='an image size is needed'):
        image_hw(None)


def test_another_eval_size_keeps_the_recorded_normalisation_and_crop():
    model = timm.create_model('boat_swin_nano_32')
    recorded = {'input_size': (3, 32, 32), 'mean': (0.5, 0.5, 0.5), 'std': (0.2, 0.2, 0.2), 'crop_pct': 1.0}
    recorded.update(interpolation='bilinear', crop_mode='center')
    config = eval_data_config(model, {'data_config': recorded}, img_size=(48, 64))
    assert config == dict(recorded, input_size=(3, 48, 64))
    assert eval_data_config(model, {'data_config': recorded}, crop_pct=0.9) == dict(recorded, crop_pct=0.9)
    assert eval_data_config(model, {'data_config': recorded}) == recorded
    assert eval_data_config(model, img_size=48)['input_size'] == (3, 48, 48)  # nothing recorded: the model's cfg


def test_digits_at_a_non_square_size_are_height_by_width():
    img, _ = DigitsDataset('val', img_size=(16, 24))[0]
    assert img.size == (24, 16)  # PIL: (width, height)


def test_open_split_reads_image_folder_classes_in_sorted_order(tmp_path):
    root = make_image_folder(tmp_path, {'train': {'cat': 2, 'ant': 3}})
    ds, classes = open_split(str(root), 'train')
    assert classes == ['ant', 'cat']
    assert sorted(target for _, target in ds) == [0, 0, 0, 1, 1]


@pytest.mark.parametrize(
    'layout, message',
    [
        (None, 'does not exist'),
        ({'val': {'a': 1}}, "has no 'train' folder"),
        ({'train': {}}, 'no sub-folders'),
        ({'train': {'a': 0}}, 'holds no images'),
    ],
)
def test_bad_data_directories_say_what_to_do(tmp_path, layout, message):
    root = tmp_path / 'data'
    if layout is not None:
        root.mkdir()
        for split, classes in layout.items():
            (root / split).mkdir()
            for name in classes:
                (root / split / name).mkdir()
    with pytest.raises(UsageError, match=message):
        open_split(str(root), 'train')


def test_images_outside_class_folders_are_rejected(tmp_path):
    make_image_folder(tmp_path, {'train': {'a': 1}})
    Image.new('RGB', (8, 8)).save(tmp_path / 'train' / 'loose.png')
    with pytest.raises(UsageError, match="one sub-folder of images per class.*'loose.png'"):
        open_split(str(tmp_path), 'train')


def test_class_mismatch_names_the_differing_classes():
    check_same_classes(['a', 'b'], ['a', 'b'], 'x')
    with pytest.raises(UsageError, match=r"only in train: \['b'\], only in val: \['c'\]"):
        check_same_classes(['a', 'b'], ['a', 'c'], 'x')


def test_shards_cover_every_item_once():
    items = list(range(11))
    shards = [list(shard(items, rank, 3)) for rank in range(3)]
    assert sorted(sum(shards, [])) == items
    assert shard(items, 0, 1) is items


def test_missing_optional_package_names_the_extra(monkeypatch):
    """scikit-learn is in the `cli` extra, not the core: without it the digits say how to get it."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'sklearn' else find_spec(name))
    with pytest.raises(UsageError, match=r"needs scikit-learn, which is not installed; pip install 'boatvit\[cli\]'"):
        DigitsDataset('train')


def write_png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that claims ``width`` x ``height`` 8-bit RGB pixels and holds none: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b'')) + chunk(b'IEND', b'')
    )
    return path


def write_16_bit_png(path: Path) -> np.ndarray:
    """A 16-bit greyscale PNG of a horizontal ramp over the whole 16-bit range; returns its 8-bit equivalent."""
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (16, 1))
    Image.fromarray(ramp).save(path)
    return (ramp / 257).round().astype(np.uint8)


def test_open_image_scales_16_bit_pngs_instead_of_clipping(tmp_path):
    expected = write_16_bit_png(tmp_path / 'deep.png')
    assert Image.open(tmp_path / 'deep.png').mode == 'I;16'
    rgb = np.asarray(open_image(tmp_path / 'deep.png'))
    assert rgb.shape == (16, 64, 3) and np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    assert 0 < np.mean(rgb) < 255  # PIL's convert('RGB') makes it almost all white


@pytest.mark.parametrize(
    'content, message',
    [
        (None, 'too large to open safely'),
        (b'', 'not a readable image'),
        (b'\x89PNG\r\n\x1a\n garbage', 'not a readable image'),
    ],
)
def test_open_image_names_unreadable_files(tmp_path, content, message):
    path = tmp_path / 'bad.png'
    if content is None:
        write_png_header(path, 20000, 20000)  # 400 Mpx, over twice PIL's limit
    else:
        path.write_bytes(content)
    with pytest.raises(UnreadableImageError, match=f'{path}: {message}'):
        open_image(path)


def test_image_folder_with_bad_images_is_refused_with_the_list(tmp_path):
    root = make_image_folder(tmp_path, {'train': {'a': 3, 'b': 2}})
    (root / 'train' / 'a' / '1.png').write_bytes(b'')
    write_png_header(root / 'train' / 'b' / 'bomb.png', 20000, 20000)
    write_16_bit_png(root / 'train' / 'b' / 'deep.png')
    truncated = root / 'train' / 'a' / '2.png'
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(UnreadableImageError) as info:
        open_split(str(root), 'train')
    message = str(info.value)
    assert message.startswith(f'4 of the 7 images in {root / "train"} cannot be used: ')
    for name, why in (('a/1.png', 'not a readable'), ('a/2.png', 'not a readable'), ('b/bomb.png', 'too large')):
        assert f'{root / "train" / name}: {why}' in message
    assert f'{root / "train" / "b" / "deep.png"}: I;16 pixels' in message and 'remove or replace them' in message


def test_uint8_images_normalized_per_batch_are_the_floats_of_the_eval_transform():
    """predict hands the model uint8 images and normalises them a batch at a time: the same float32 values."""
    model = timm.create_model('boat_swin_nano_32')
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 37, 3), dtype=np.uint8)) for _ in range(3)]
    config = eval_data_config(model)
    uint8 = torch.stack([eval_transform(model, normalize=False)(image) for image in images])
    assert uint8.dtype == torch.uint8
    expected = torch.stack([eval_transform(model)(image) for image in images])
    assert torch.equal(normalize_images(uint8, config['mean'], config['std']), expected)
