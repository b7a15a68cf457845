"""``boatvit clusters``: the clustering it draws is the reference's, and the picture comes out at the right size."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from boatvit import cli
from boatvit.runs import save_weights
from boatvit.cluster_pictures import cluster_labels, first_layer_per_stage
from test_data import write_png_header


@pytest.fixture(scope='module')
def china(tmp_path_factory):
    path = tmp_path_factory.mktemp('images') / 'china.jpg'
    Image.fromarray(load_sample_image('china.jpg')).save(path)
    return path


@pytest.fixture(scope='module')
def nano_weights(tmp_path_factory):
    """boat_swin_nano_32: FSLA in layers.0.blocks.1 (1 head) and layers.1.blocks.1 (2 heads)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('weights') / 'nano.safetensors'
    save_weights(path, timm.create_model('boat_swin_nano_32').state_dict(), {'model': 'boat_swin_nano_32'})
    return path


def test_labels_are_the_reference_clusters(reference_fixture):
    """The first FSLA layer's clusters, from the hooks, equal the reference permutation cut into runs of 49."""
    model = reference_fixture.build()
    module = reference_fixture.meta['first_fsla']['module']
    name = module.replace('stage1.0.content_attn', 'layers.0.blocks.0.fsla').replace('.attnC', '.fsla')

    labels = cluster_labels(model, reference_fixture.tensors['input'].double(), [name])[name]

    perm = reference_fixture.tensors['fsla.perm']
    B, heads, N = perm.shape
    expected = torch.empty_like(perm).scatter_(-1, perm, (torch.arange(N) // 49).expand(B, heads, N))
    assert labels.shape == (B, heads, 56, 56)
    assert torch.equal(labels.flatten(2), expected)


@pytest.mark.parametrize(
    'extra, size',
    [
        ([], (3 * 64, 2 * 64)),  # first layer of each stage, both heads of the second: image + 2 panels, 2 rows
        (['--layer', 'layers.1.blocks.1', '--heads', '1'], (2 * 64, 64)),
    ],
)
def test_png_is_written_at_the_expected_size(tmp_path, china, nano_weights, extra, size, capsys):
    out = tmp_path / 'clusters.png'
    argv = ['clusters', str(china), '--weights', str(nano_weights), '-o', str(out), '--panel-size', '64']
    assert cli.main(argv + extra) == 0
    with Image.open(out) as image:
        assert image.format == 'PNG' and image.size == size
    assert str(out) in capsys.readouterr().out


def test_untrained_model_is_drawn_with_a_warning(tmp_path, china, capsys):
    out = tmp_path / 'clusters.png'
    assert cli.main(['clusters', str(china), '--model', 'boat_swin_nano_32', '-o', str(out), '--layer', 'all']) == 0
    assert 'untrained' in capsys.readouterr().err and out.is_file()


@pytest.mark.parametrize(
    'extra, message',
    [
        (['--layer', 'layers.2.blocks.1'], 'layers.0.blocks.1, layers.1.blocks.1'),
        (['--heads', '2'], 'at most 2 heads'),
        (['-o', 'clusters.jpg'], 'must be a .png file (or .html for the interactive page)'),
    ],
)
def test_bad_choices_are_explained(tmp_path, china, nano_weights, extra, message, capsys):
    argv = ['clusters', str(china), '--weights', str(nano_weights), '-o', str(tmp_path / 'c.png')]
    assert cli.main(argv + extra) == 2
    assert message in capsys.readouterr().err


def test_needs_weights_or_model(tmp_path, china, capsys):
    assert cli.main(['clusters', str(china), '-o', str(tmp_path / 'c.png')]) == 2
    assert '--weights' in capsys.readouterr().err


def test_first_layer_per_stage():
    names = ['layers.0.blocks.1.fsla', 'layers.2.blocks.1.fsla', 'layers.2.blocks.3.fsla', 'layers.3.blocks.0.fsla']
    assert first_layer_per_stage(names) == [names[0], names[1], names[3]]


def test_several_images_skip_the_unreadable_ones(tmp_path, china, nano_weights, capsys):
    broken, bomb = tmp_path / 'broken.jpg', tmp_path / 'bomb.png'
    broken.write_bytes(b'\xff\xd8\xff\xe0 this is not really a jpeg')
    write_png_header(bomb, 20000, 20000)
    out = tmp_path / 'pictures'
    out.mkdir()
    argv = ['clusters', str(china), str(broken), str(bomb), str(china), '--weights', str(nano_weights), '-o', str(out)]
    assert cli.main([*argv, '--panel-size', '64']) == 0
    captured = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ['china-2.png', 'china.png']
    assert f'{out / "china.png"}' in captured.out and f'{out / "china-2.png"}' in captured.out
    assert f'warning: skipped {broken}: not a readable image' in captured.err
    assert f'warning: skipped {bomb}: too large to open safely' in captured.err
    assert 'skipped 2 of 4 images (unreadable)' in captured.err
    # one unreadable image, or none readable of several: one line, exit 2, nothing written
    assert cli.main(['clusters', str(bomb), '--weights', str(nano_weights), '-o', str(tmp_path / 'c.png')]) == 2
    assert f'{bomb}: too large to open safely' in capsys.readouterr().err
    assert cli.main(['clusters', str(broken), str(bomb), '--weights', str(nano_weights), '-o', str(out)]) == 2
    assert 'none of the 2 images could be read' in capsys.readouterr().err
    assert cli.main([*argv[:3], '--weights', str(nano_weights), '-o', str(tmp_path / 'c.png')]) == 2
    assert 'with several images, -o must be an existing directory' in capsys.readouterr().err
    assert not (tmp_path / 'c.png').exists()
