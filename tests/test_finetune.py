"""Fine-tuning: ``boatvit train --weights`` from reference-format checkpoints of small models built here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.layers import DropPath

from boatvit.cli import main
from boatvit.cli.train import config_from_args
import boatvit.training as train_mod
from boatvit.recipes import RECIPES
from boatvit.training import Trainer, TrainConfig, learning_rate, train
from boatvit.runs import save_weights
from boatvit.weights import build_model, load_backbone, read_weights
from reference_checkpoints import save_cswin_checkpoint, save_swin_checkpoint
from test_data import make_image_folder
from test_train import parse_train

# small models of the two families, 224 like the released weights; the checkpoints have 7 classes, the data 3
SWIN = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))
CSWIN = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2), split_size=(1, 2, 7, 7))
ARCH = {'swin': ('boat_swin_tiny_224', SWIN), 'cswin': ('boat_cswin_tiny_224', CSWIN)}
CLASSES = ['cat', 'dog', 'eel']


def arch_flags(family: str, **changes) -> list:
    name, kwargs = ARCH[family]
    return ['--model', name, '--model-kwargs', *(f'{k}={v}' for k, v in dict(kwargs, **changes).items())]


def quick(tmp_path: Path, name: str) -> list:
    """One epoch of batches of 6, into ``tmp_path/name``."""
    return [*'--epochs 1 --batch-size 6 --workers 0 --quiet'.split(), '--output', str(tmp_path), '--name', name]


def to_reference_swin(state_dict: dict) -> dict:
    """boatvit BOAT-Swin keys to the reference's (the inverse of the key mapping of `checkpoint_filter_fn`)."""
    out = {}
    for k, v in state_dict.items():
        if k.endswith(('relative_position_index', 'attn_mask')):
            continue
        parts = k.split('.')
        if parts[0] == 'layers' and parts[2] == 'downsample':  # boatvit: start of the next stage
            k = '.'.join(['layers', str(int(parts[1]) - 1), *parts[2:]])
        k = k.replace('.fsla.lepe.', '.attnC.get_v.').replace('.fsla.', '.attnC.').replace('.norm_fsla.', '.norm4.')
        out[k.replace('head.fc.', 'head.')] = v
    return out


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory) -> dict:
    """A 7-class checkpoint per family in its released format (Swin with reference key names), and its model."""
    folder = tmp_path_factory.mktemp('released')
    torch.manual_seed(0)
    swin = timm.create_model(ARCH['swin'][0], num_classes=7, **SWIN)
    save_swin_checkpoint(folder, folder / 'tiny.pth', to_reference_swin(swin.state_dict()), {})
    cswin = timm.create_model(ARCH['cswin'][0], num_classes=7, **CSWIN)
    ema = cswin.state_dict()
    save_cswin_checkpoint(folder / 'cswin_tiny.pth.tar', ema=ema, raw={k: v + 1 for k, v in ema.items()})
    return {'swin': (folder / 'tiny.pth', swin), 'cswin': (folder / 'cswin_tiny.pth.tar', cswin)}


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('folder') / 'pets'
    return make_image_folder(root, {'train': {c: 4 for c in CLASSES}, 'val': {c: 2 for c in CLASSES}}, size=48)


@pytest.fixture(scope='module')
def zero_lr_run(tmp_path_factory, checkpoints, data):
    """One step at learning rate 0 from the Swin checkpoint, at its own size (224)."""
    out = tmp_path_factory.mktemp('runs')
    argv = ['train', '--data', str(data), '--weights', str(checkpoints['swin'][0]), *arch_flags('swin')]
    argv += [*quick(out, 'zero'), '--lr', '0', '--limit-batches', '1', '--warmup-lr', '0', '--min-lr', '0']
    assert main(argv) == 0
    return out / 'zero'


def test_zero_lr_keeps_the_backbone_and_replaces_the_head(zero_lr_run, checkpoints, capfd):
    trained = load_file(zero_lr_run / 'best.safetensors')
    source = checkpoints['swin'][1].state_dict()
    backbone = [k for k in trained if not k.startswith('head.')]
    assert len(backbone) > 20
    for k in backbone:
        assert torch.equal(trained[k], source[k]), k
    assert trained['head.fc.weight'].shape == (3, 16 * 8) and trained['head.fc.bias'].shape == (3,)
    assert not trained['head.fc.weight'].any() and not trained['head.fc.bias'].any()  # a new head starts at zero


def test_a_new_head_for_other_classes_of_the_same_count_starts_at_zero(tmp_path):
    """Weights trained with seed 0 on classes a, b, c, fine-tuned with seed 0 on x, y, z: the model's random head
    would be the very head the weights' features were trained against, and would call x 'a' with confidence."""
    torch.manual_seed(0)
    source = build_model(ARCH['swin'][0], 3, SWIN)
    path = tmp_path / 'abc.safetensors'
    save_weights(
        path, source.state_dict(), {'model': ARCH['swin'][0], 'model_kwargs': SWIN, 'classes': ['a', 'b', 'c']}
    )
    torch.manual_seed(0)
    model = build_model(ARCH['swin'][0], 3, SWIN)
    assert torch.equal(model.head.fc.weight, source.head.fc.weight)  # the same draw: the trap
    assert load_backbone(model, read_weights(path), ['x', 'y', 'z']) == ['head.fc.bias', 'head.fc.weight']
    assert not model.head.fc.weight.any() and not model.head.fc.bias.any()
    logits = model.eval()(torch.randn(2, 3, 224, 224))
    assert torch.equal(logits, torch.zeros(2, 3))  # uniform: loss ln 3, whatever the features
    assert load_backbone(model, read_weights(path), ['a', 'b', 'c']) == []  # the same classes keep their head
    assert torch.equal(model.head.fc.weight, source.head.fc.weight)


def test_the_message_names_the_dropped_head_and_the_recipe(tmp_path, checkpoints, data, capsys):
    argv = ['train', '--data', str(data), '--weights', str(checkpoints['swin'][0]), *arch_flags('swin')]
    assert main([*argv, *quick(tmp_path, 'run'), '--limit-batches', '1']) == 0
    out = capsys.readouterr().out
    assert 'recipe finetune-swin: fine-tuning boat_swin_tiny_224 from --weights' in out
    assert f'fine-tuning from {checkpoints["swin"][0]} (model)' in out
    assert 'head.fc.bias, head.fc.weight: 7 classes) was dropped for a new one of 3 classes (cat, dog, eel)' in out
    config = json.loads((tmp_path / 'run' / 'config.json').read_text())
    assert config['recipe'] == 'finetune-swin' and config['config']['weight_decay'] == 1e-8
    assert config['config']['weights'] == str(checkpoints['swin'][0]) and config['classes'] == CLASSES


def test_predict_and_eval_on_the_run_use_the_folders_classes(zero_lr_run, data, capsys):
    image = data / 'val' / 'dog' / '0.png'
    assert main(['predict', str(image), '--weights', str(zero_lr_run), '--topk', '3']) == 0
    names = [line.split()[-1] for line in capsys.readouterr().out.splitlines()[1:]]
    assert sorted(names) == CLASSES
    assert main(['eval', '--weights', str(zero_lr_run), '--json', '--workers', '0']) == 0
    result = json.loads(capsys.readouterr().out)
    assert result['images'] == 6 and result['data'] == str(data) and result['model'] == 'boat_swin_tiny_224'


@pytest.mark.parametrize('size', [[160], [128, 192]], ids=['square', 'non-square'])
@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_fine_tuning_at_another_size(tmp_path, checkpoints, data, family, size, capsys):
    """From 224 weights to 160 x 160 or 128 x 192: the run, its weights and its transform are of that size,
    Swin's windows and position tables are those ``set_input_size`` gives, every other tensor is the checkpoint's,
    and ``eval`` and ``predict`` on the run take that size with no flags."""
    path, source = checkpoints[family]
    argv = ['train', '--data', str(data), '--weights', str(path), *arch_flags(family), '--img-size', *map(str, size)]
    assert main([*argv, *quick(tmp_path, 'run'), '--limit-batches', '1', '--lr', '0']) == 0
    height, width = size * 2 if len(size) == 1 else size
    recorded = height if len(size) == 1 else [height, width]  # one form per size: an int for a square
    config = json.loads((tmp_path / 'run' / 'config.json').read_text())
    assert config['config']['img_size'] == recorded and config['data_config']['input_size'] == [3, height, width]
    weights = read_weights(tmp_path / 'run')
    assert weights.metadata['img_size'] == recorded
    trained, expected = weights.state_dict, source.state_dict()
    if family == 'swin':
        resized = timm.create_model(ARCH['swin'][0], num_classes=7, **SWIN)
        resized.load_state_dict(expected)
        resized.set_input_size(img_size=(height, width))
        windows = [list(stage.blocks[0].window_size) for stage in resized.layers]
        # windows scaled with the grid (7 of 56 -> 5 of 40, or 4 x 6 of 32 x 48), position tables resized
        assert windows[0] == ([5, 5] if len(size) == 1 else [4, 6])
        assert weights.metadata['model_kwargs']['window_size'] == windows
        table = trained['layers.0.blocks.0.attn.relative_position_bias_table']
        assert table.shape == ((2 * windows[0][0] - 1) * (2 * windows[0][1] - 1), 1)
        expected = resized.state_dict()
    for k in trained:
        if not k.startswith('head.'):
            torch.testing.assert_close(trained[k], expected[k], rtol=0, atol=1e-6, msg=k)
    capsys.readouterr()
    assert main(['eval', '--weights', str(tmp_path / 'run'), '--json', '--workers', '0']) == 0
    result = json.loads(capsys.readouterr().out)
    assert result['images'] == 6
    scores = ('top1', 'top5', 'loss')
    # naming the run's own size changes nothing: the recorded normalisation and crop stay
    assert (
        main(['eval', '--weights', str(tmp_path / 'run'), '--json', '--workers', '0', '--img-size', *map(str, size)])
        == 0
    )
    again = json.loads(capsys.readouterr().out)
    assert [again[k] for k in scores] == [result[k] for k in scores]
    assert main(['predict', str(data / 'val' / 'dog' / '0.png'), '--weights', str(tmp_path / 'run')]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-1] in CLASSES


def test_layer_decay_gives_the_stem_a_smaller_lr_than_the_last_stage():
    config = TrainConfig(data='x', layer_decay=0.5, lr=1e-3, mixup=0, cutmix=0, model_kwargs={})
    model = build_model('boat_swin_tiny_224', 3, SWIN)
    trainer = Trainer(model, config, torch.device('cpu'), world_size=1, updates_per_epoch=1)
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[id(p)]: g['lr_scale'] for g in trainer.optimizer.param_groups for p in g['params']}
    assert scale['patch_embed.proj.weight'] < scale['layers.3.blocks.0.attn.qkv.weight'] < scale['head.fc.weight']
    assert scale['head.fc.weight'] == 1.0 and scale['patch_embed.proj.weight'] == pytest.approx(0.5**5)
    trainer.scheduler.step_update(1)  # the schedule applies the scales
    lr = {names[id(p)]: g['lr'] for g in trainer.optimizer.param_groups for p in g['params']}
    assert lr['patch_embed.proj.weight'] < lr['layers.3.blocks.0.attn.qkv.weight']


def test_frozen_backbone_trains_only_the_head(tmp_path, checkpoints, data, monkeypatch):
    placed = []
    place_model = train_mod._place_model
    monkeypatch.setattr(
        train_mod, '_place_model', lambda model, *args: placed.append(model) or place_model(model, *args)
    )
    argv = ['train', '--data', str(data), '--weights', str(checkpoints['cswin'][0]), *arch_flags('cswin')]
    argv += ['--drop-path', '0.3']
    assert main([*argv, *quick(tmp_path, 'probe'), '--freeze-backbone', '--lr', '0.1', '--warmup-epochs', '0']) == 0
    # the head learns on the features the frozen backbone gives at inference: no DropPath despite --drop-path 0.3
    assert [type(m) for m in placed[0].modules() if isinstance(m, DropPath)] == []
    assert any(isinstance(m, DropPath) for m in build_model(ARCH['cswin'][0], 3, CSWIN, drop_path_rate=0.3).modules())
    trained, source = load_file(tmp_path / 'probe' / 'best.safetensors'), checkpoints['cswin'][1].state_dict()
    for k in trained:
        if not k.startswith('head.'):
            assert torch.equal(trained[k], source[k]), k  # the EMA entry of the CSWin file, not the raw one
    assert not torch.equal(trained['head.fc.bias'], torch.zeros(3))  # the head did learn


class Stop(Exception):
    pass


def test_resume_continues_and_does_not_reload_the_source(tmp_path, checkpoints, data, monkeypatch):
    source = tmp_path / 'tiny.pth'
    source.write_bytes(checkpoints['swin'][0].read_bytes())
    save_epoch = train_mod._save_epoch

    def stop_after_the_first_epoch(run_dir, trainer, history, *args):
        save_epoch(run_dir, trainer, history, *args)
        raise Stop

    monkeypatch.setattr(train_mod, '_save_epoch', stop_after_the_first_epoch)
    argv = ['--data', str(data), '--weights', str(source), *arch_flags('swin'), '--epochs', '2', '--lr', '1e-2']
    config, recipe = config_from_args(parse_train(*argv, '--warmup-epochs', '0', '--batch-size', '6'))
    with pytest.raises(Stop):
        train(config, recipe, output=tmp_path, name='run', workers=0, progress=False)
    monkeypatch.undo()
    after_one = load_file(tmp_path / 'run' / 'last.safetensors')
    source.unlink()  # a resume that read the source again would fail
    assert main(['train', '--resume', str(tmp_path / 'run'), '--quiet', '--workers', '0']) == 0
    history = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
    assert [row['epoch'] for row in history] == [1, 2]
    state = torch.load(tmp_path / 'run' / 'last.pt', weights_only=True)
    assert state['epoch'] == 2
    # epoch 2 started from epoch 1's weights: they moved on from there, not from the source
    resumed = load_file(tmp_path / 'run' / 'last.safetensors')
    assert not torch.equal(resumed['head.fc.weight'], after_one['head.fc.weight'])


@pytest.mark.parametrize('other', ['cswin', 'width'])
def test_weights_of_another_family_or_width_are_refused_without_a_run_directory(
    tmp_path, checkpoints, data, other, capsys
):
    flags = arch_flags('swin') if other == 'cswin' else arch_flags('swin', embed_dim=32)
    source = checkpoints['cswin' if other == 'cswin' else 'swin'][0]
    out = tmp_path / 'runs'
    assert main(['train', '--data', str(data), '--weights', str(source), *flags, '--output', str(out)]) == 2
    err = capsys.readouterr().err
    assert str(source) in err and 'Traceback' not in err
    if other == 'cswin':
        assert 'BOAT-CSWin weights but the model is BOAT-Swin' in err
    else:
        assert 'nothing was loaded' in err and 'with another shape' in err
    assert not out.exists() or not list(out.iterdir())


def test_defaults_follow_what_the_user_gives(checkpoints, capsys):
    config, recipe = config_from_args(parse_train('--data', 'DIR'))
    assert recipe == 'small-data' and config.epochs == 50 and config.batch_size == 16
    assert 'recipe small-data: --data DIR without --recipe or --weights' in capsys.readouterr().out
    config, recipe = config_from_args(
        parse_train('--data', 'DIR', '--weights', str(checkpoints['cswin'][0]), *arch_flags('cswin'), '--epochs', '3')
    )
    assert recipe == 'finetune-cswin' and config.epochs == 3 and config.clip_grad is None
    assert config.model == 'boat_cswin_tiny_224' and config.layer_decay == 0.75


def test_the_preset_fits_its_batch_to_the_folder_and_its_lr_follows_the_batch_by_the_square_root(
    tmp_path, checkpoints, capsys
):
    def fitted(train_per_class: int, *flags: str) -> tuple:
        root = tmp_path / f'{train_per_class}{"".join(flags)}'
        sizes = {'train': {c: train_per_class for c in CLASSES}, 'val': {c: 1 for c in CLASSES}}
        data = make_image_folder(root, sizes, size=8)
        argv = ['--data', str(data), '--weights', str(checkpoints['swin'][0]), *arch_flags('swin'), *flags]
        config, recipe = config_from_args(parse_train(*argv))
        assert recipe == 'finetune-swin'
        return config, capsys.readouterr().out

    few, said_few = fitted(40)  # 120 photos: the preset's batch of 32 would leave 3 steps an epoch
    many, _ = fitted(500)
    tiny, _ = fitted(2)  # 6 photos: never a batch larger than the folder
    yours, said_yours = fitted(40, '--batch-size', '16')
    assert (few.batch_size, many.batch_size, tiny.batch_size, yours.batch_size) == (8, 32, 4, 16)
    assert 'fitted to the data: 120 training images: batch 8 (15 steps an epoch)' in said_few
    assert '(yours: --batch-size)' in said_yours
    preset = RECIPES['finetune-swin']
    assert few.lr_base_scale == 'sqrt' and preset['lr_base_size'] == many.batch_size
    assert learning_rate(many, world_size=1) == pytest.approx(preset['lr_base'])
    assert learning_rate(few, world_size=1) == pytest.approx(preset['lr_base'] / 2)  # a quarter of the batch


def test_the_head_is_kept_for_the_same_classes_only(tmp_path, zero_lr_run, capsys):
    """A run's weights name their classes: the same names keep the head, other names of as many classes drop it."""
    kept, other = (
        make_image_folder(tmp_path / name, {'train': {c: 2 for c in classes}, 'val': {c: 1 for c in classes}})
        for name, classes in (('same', CLASSES), ('other', ['ant', 'bee', 'fly']))
    )
    lr0 = ['--lr', '0', '--warmup-lr', '0', '--min-lr', '0', '--limit-batches', '1', '--batch-size', '2']
    assert main(['train', '--data', str(kept), '--weights', str(zero_lr_run), *quick(tmp_path, 'kept'), *lr0]) == 0
    assert 'dropped' not in capsys.readouterr().out
    source = load_file(zero_lr_run / 'best.safetensors')
    assert torch.equal(load_file(tmp_path / 'kept' / 'best.safetensors')['head.fc.weight'], source['head.fc.weight'])
    assert main(['train', '--data', str(other), '--weights', str(zero_lr_run), *quick(tmp_path, 'new'), *lr0]) == 0
    assert (
        '3 classes (cat, dog, eel)) was dropped for a new one of 3 classes (ant, bee, fly)' in capsys.readouterr().out
    )
