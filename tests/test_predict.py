"""``boatvit predict`` end to end on images that scikit-learn ships, with a small BOAT model."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_sample_image
from timm.data import ImageNetInfo, create_transform, resolve_data_config

from boatvit import cli
from boatvit.errors import UsageError
from boatvit.prediction import class_names, predict_batches
from boatvit.runs import save_weights
from test_data import make_image_folder, write_16_bit_png, write_png_header

CLASSES = ['apple', 'bear', 'cat', 'dog', 'eel', 'fox', 'gnu', 'hen', 'ibis', 'jay']


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """A folder with china.jpg and flower.jpg (and a file that is not an image, which is skipped)."""
    folder = tmp_path_factory.mktemp('images')
    for name in ('china.jpg', 'flower.jpg'):
        Image.fromarray(load_sample_image(name)).save(folder / name)
    (folder / 'notes.txt').write_text('not an image')
    return folder


@pytest.fixture(scope='module')
def nano(tmp_path_factory):
    """An untrained boat_swin_nano_32, saved as `boatvit train` saves weights, and the model itself."""
    torch.manual_seed(0)
    model = timm.create_model('boat_swin_nano_32').eval()
    path = tmp_path_factory.mktemp('weights') / 'nano.safetensors'
    save_weights(path, model.state_dict(), {'model': 'boat_swin_nano_32', 'model_kwargs': {}, 'classes': CLASSES})
    return path, model


def expected_top(model, image_path, k):
    transform = create_transform(**resolve_data_config(model=model), is_training=False)
    with torch.no_grad():
        probs = model(transform(Image.open(image_path).convert('RGB'))[None]).softmax(-1)[0]
    return probs.topk(k)


def test_table_lists_top_k_with_class_names(images, nano, capsys):
    weights, model = nano
    assert cli.main(['predict', str(images / 'china.jpg'), '--weights', str(weights), '--topk', '3']) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(images / 'china.jpg') and len(lines) == 4
    probs, indices = expected_top(model, images / 'china.jpg', 3)
    for line, p, i in zip(lines[1:], probs.tolist(), indices.tolist()):
        rank, percent, _, index, name = line.split()
        assert (int(index), name) == (i, CLASSES[i]) and float(percent) == pytest.approx(100 * p, abs=0.01)


def test_directory_gives_json_and_a_progress_bar(images, nano, capsys):
    weights, model = nano
    assert cli.main(['predict', str(images), '--weights', str(weights), '--json', '--batch-size', '1']) == 0

    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert [r['image'] for r in results] == [str(images / 'china.jpg'), str(images / 'flower.jpg')]
    for result in results:
        probs, indices = expected_top(model, result['image'], 5)
        assert [p['index'] for p in result['predictions']] == indices.tolist()
        assert [p['rank'] for p in result['predictions']] == [1, 2, 3, 4, 5]
        assert [p['probability'] for p in result['predictions']] == pytest.approx(probs.tolist(), abs=1e-6)
    assert '2/2' in captured.err  # tqdm


def test_reference_checkpoint_with_1000_classes_gets_imagenet_names(tmp_path, images, capsys):
    torch.manual_seed(0)
    model = timm.create_model('boat_swin_nano_32', num_classes=1000)
    weights = tmp_path / 'nano.pth.tar'
    torch.save({'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()}}, weights)

    argv = ['predict', str(images / 'flower.jpg'), '--weights', str(weights), '--model', 'boat_swin_nano_32', '--json']
    assert cli.main(argv) == 0

    names = set(ImageNetInfo().label_descriptions())
    predictions = json.loads(capsys.readouterr().out)[0]['predictions']
    assert len(predictions) == 5 and all(p['name'] in names for p in predictions)


def test_class_names():
    assert class_names(1000, {})[0] == 'tench, Tinca tinca'
    assert class_names(10, {'classes': CLASSES}) == CLASSES
    assert class_names(3, {'classes': CLASSES}) == ['0', '1', '2']  # names for another head are not used


@pytest.mark.parametrize(
    'kind, message',
    [
        ('broken image', 'not a readable image'),
        ('missing', 'no such file or directory'),
        ('topk', '--topk must be at least 1'),
    ],
)
def test_bad_input_is_named(tmp_path, nano, kind, message, capsys):
    image = tmp_path / 'broken.jpg'
    argv = ['predict', str(image), '--weights', str(nano[0])]
    if kind == 'broken image':
        image.write_bytes(b'\xff\xd8\xff\xe0 this is not really a jpeg')
    elif kind == 'topk':
        image.write_bytes(b'')
        argv += ['--topk', '0']
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and (kind == 'topk' or str(image) in err)


def test_a_folder_with_unreadable_images_predicts_the_rest(tmp_path, images, nano, capsys):
    folder = tmp_path / 'mixed'
    shutil.copytree(images, folder)
    (folder / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not really a jpeg')
    write_png_header(folder / 'bomb.png', 20000, 20000)  # 400 Mpx
    expected = write_16_bit_png(folder / 'deep.png')
    assert cli.main(['predict', str(folder), '--weights', str(nano[0]), '--json', '--batch-size', '2']) == 0
    captured = capsys.readouterr()
    results = {Path(r['image']).name: r for r in json.loads(captured.out)}
    assert sorted(results) == ['bomb.png', 'broken.jpg', 'china.jpg', 'deep.png', 'flower.jpg']
    assert 'not a readable image' in results['broken.jpg']['error']
    assert 'too large to open safely' in results['bomb.png']['error']
    for name in ('china.jpg', 'flower.jpg', 'deep.png'):
        assert len(results[name]['predictions']) == 5
    # the 16-bit image is predicted as its 8-bit equivalent
    Image.fromarray(expected).save(tmp_path / 'deep8.png')
    probs, indices = expected_top(nano[1], tmp_path / 'deep8.png', 5)
    assert [p['index'] for p in results['deep.png']['predictions']] == indices.tolist()
    assert f'warning: skipped {folder / "broken.jpg"}: not a readable image' in captured.err
    assert f'warning: skipped {folder / "bomb.png"}: too large' in captured.err
    assert 'skipped 2 of 5 images (unreadable)' in captured.err

    assert cli.main(['predict', str(folder / 'broken.jpg'), str(folder / 'bomb.png'), '--weights', str(nano[0])]) == 2
    err = capsys.readouterr().err
    assert 'none of the 2 images could be read' in err and 'Traceback' not in err


def test_predict_top1_accuracy_equals_eval_top1(tmp_path, capsys):
    """On one labelled folder and one set of weights, the top-1 column of predict's results file is as accurate as
    `boatvit eval` says (the class is each image's folder name)."""
    from test_evaluate import TINY_KWARGS

    root = make_image_folder(tmp_path / 'data', {'val': {'a': 6, 'b': 5, 'c': 7}}, size=32, seed=3)
    torch.manual_seed(3)
    model = timm.create_model('boat_swin_nano_32', num_classes=3, **TINY_KWARGS)
    weights = tmp_path / 'w.safetensors'
    save_weights(weights, model.state_dict(), {'model': 'boat_swin_nano_32', 'model_kwargs': TINY_KWARGS,
                                               'classes': ['a', 'b', 'c']})  # fmt: skip
    flags = ['--weights', str(weights), '--batch-size', '4', '--workers', '0']
    assert cli.main(['eval', '--data', str(root), *flags, '--json']) == 0
    top1 = json.loads(capsys.readouterr().out)['top1']

    out = tmp_path / 'val.csv'
    assert cli.main(['predict', str(root / 'val'), *flags, '--results-file', str(out)]) == 0
    with open(out, newline='') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18 and len({row['name_1'] for row in rows}) > 1  # not one class for every image
    hits = sum(row['name_1'] == Path(row['image']).parent.name for row in rows)
    assert 100 * hits / len(rows) == pytest.approx(top1, abs=1e-9)


def test_a_batch_too_large_for_memory_says_lower_the_batch_size(images):
    class OutOfMemory(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99 GB")

    batches = predict_batches(OutOfMemory(), [images / 'china.jpg'], lambda image: torch.zeros(3, 8, 8), ['a'], 1, 32)
    with pytest.raises(UsageError, match='--batch-size 32 does not fit in memory on cpu; lower it'):
        next(batches)
