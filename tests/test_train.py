"""Tests for boatvit.training and `boatvit train`: the default end to end, resume, torchrun, recipes, bad input."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import boatvit.training as train_mod
from boatvit import evaluation, runs, runtime
from boatvit.errors import UsageError
from boatvit.cli import build_parser, main
from boatvit.recipes import RECIPES
from boatvit.weights import read_weights
from boatvit.cli.train import config_from_args
from boatvit.training import TrainConfig, learning_rate
from test_data import make_image_folder
from test_evaluate import TINY_FLAGS

# the embedded default shortened: 2 epochs of 3 batches of 16, validation on 3 batches
SHORT = ['--epochs', '2', '--limit-batches', '3', '--batch-size', '16', '--workers', '0', '--quiet', *TINY_FLAGS]
# augmentation, mixup and EMA on, so a resume must restore every RNG and the EMA to match
RANDOM = ['--mixup', '0.4', '--cutmix', '0.4', '--aa', 'rand-m5', '--reprob', '0.25', '--ema-decay', '0.9']


def train(tmp_path: Path, name: str, *flags: str) -> Path:
    assert main(['train', '--output', str(tmp_path), '--name', name, *SHORT, *flags]) == 0
    return tmp_path / name


def assert_same_tensors(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m: f'{k}: {m}')


@pytest.fixture(scope='module')
def default_run(tmp_path_factory) -> Path:
    """The embedded default, shortened; shared by the tests that only read it."""
    return train(tmp_path_factory.mktemp('runs'), 'default')


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory) -> Path:
    """2 epochs in one go with every random augmentation and EMA."""
    return train(tmp_path_factory.mktemp('runs'), 'straight', *RANDOM)


def test_default_run_writes_every_artefact(default_run, capsys):
    run_dir = default_run
    for name in (
        'config.json',
        'metrics.csv',
        'metrics.json',
        'curves.png',
        'last.safetensors',
        'last.pt',
        'best.safetensors',
        'best.pt',
    ):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob('.*.tmp'))

    config = json.loads((run_dir / 'config.json').read_text())
    assert config['recipe'] == 'digits' and config['config']['model'] == 'boat_swin_nano_32'
    assert config['config']['data'] == 'digits' and config['classes'] == [str(d) for d in range(10)]
    metrics = json.loads((run_dir / 'metrics.json').read_text())
    assert [row['epoch'] for row in metrics] == [1, 2]
    expected = {'train_loss', 'lr', 'val_loss', 'val_top1', 'val_top5', 'train_images_per_s', 'epoch_s'}
    assert expected <= metrics[0].keys()
    csv_lines = (run_dir / 'metrics.csv').read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith('epoch,train_loss')
    assert (run_dir / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    state = runs.load_state(run_dir / 'last.pt')  # weights_only: no pickled code in the resumable state
    assert state['epoch'] == 2 and {'optimizer', 'scheduler', 'scaler', 'model'} <= state['trainer'].keys()
    meta = read_weights(run_dir / 'last.safetensors').metadata
    assert meta['model'] == 'boat_swin_nano_32' and meta['epoch'] == 2 and meta['data'] == 'digits'
    assert_same_tensors(load_file(run_dir / 'last.safetensors'), state['trainer']['model'])
    # the weights carry their model and transform, so the run directory is all eval needs
    assert main(['eval', '--weights', str(run_dir), '--json', '--workers', '0']) == 0
    result = json.loads(capsys.readouterr().out)
    assert result['images'] == 360 and 0 <= result['top1'] <= 100


class Crash(Exception):
    pass


def crash_in_epoch_2(monkeypatch) -> None:
    """The models train builds raise `Crash` on their fifth training forward: the second batch of epoch 2."""
    real_build = train_mod.build_model

    def build_crashing(*args, **kwargs):
        model = real_build(*args, **kwargs)
        calls = itertools.count()

        def hook(module, inputs):
            if module.training and next(calls) == 4:
                raise Crash()

        model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(train_mod, 'build_model', build_crashing)


@pytest.mark.parametrize('crash', ['mid-epoch', 'while saving'])
def test_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch, straight_run, crash):
    """2 epochs in one go equal 1 epoch, a crash, a resume and 1 more epoch: bit for bit on the CPU."""
    straight = straight_run

    if crash == 'mid-epoch':
        crash_in_epoch_2(monkeypatch)
    else:
        # the renaming of epoch 2's resumable state fails: the file still holds epoch 1
        real_replace = os.replace

        def replace_failing(src, dst):
            if Path(dst).name == 'last.pt' and runs.load_state(src)['epoch'] == 2:
                raise Crash()
            real_replace(src, dst)

        monkeypatch.setattr(runs.os, 'replace', replace_failing)
    with pytest.raises(Crash):
        train(tmp_path, 'resumed', *RANDOM)
    monkeypatch.undo()
    resumed = tmp_path / 'resumed'
    assert runs.load_state(resumed / 'last.pt')['epoch'] == 1
    assert not list(resumed.glob('.*.tmp'))

    assert main(['train', '--resume', str(resumed), '--quiet', '--workers', '0']) == 0
    assert_same_tensors(load_file(resumed / 'last.safetensors'), load_file(straight / 'last.safetensors'))
    a, b = runs.load_state(resumed / 'last.pt'), runs.load_state(straight / 'last.pt')
    assert_same_tensors(a['trainer']['model'], b['trainer']['model'])
    assert a['trainer']['optimizer']['state'].keys() == b['trainer']['optimizer']['state'].keys()
    for key in a['trainer']['optimizer']['state']:
        assert_same_tensors(a['trainer']['optimizer']['state'][key], b['trainer']['optimizer']['state'][key])

    def without_timing(history):
        return [{k: v for k, v in row.items() if k not in ('train_images_per_s', 'epoch_s')} for row in history]

    assert without_timing(a['history']) == without_timing(b['history'])


def read_tensorboard(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(run_dir / 'tensorboard')).Reload()


def test_tensorboard_log_is_read_back_and_a_resume_appends_without_duplicate_steps(tmp_path, monkeypatch):
    """2 epochs of 3 steps, interrupted in the second batch of epoch 2 (step 4 logged, step 5 not), then resumed:
    every step is shown once, with the values the resumed run computed, and every epoch's metrics row."""
    crash_in_epoch_2(monkeypatch)
    with pytest.raises(Crash):
        train(tmp_path, 'logged', '--log', 'tensorboard')
    monkeypatch.undo()
    run_dir = tmp_path / 'logged'
    assert [e.step for e in read_tensorboard(run_dir).Scalars('step/loss')] == [1, 2, 3, 4]
    assert main(['train', '--resume', str(run_dir), '--quiet', '--workers', '0']) == 0

    log = read_tensorboard(run_dir)
    assert len(list((run_dir / 'tensorboard').glob('events.out.tfevents.*'))) == 2  # the resume appended a file
    for tag in ('step/loss', 'step/lr', 'step/images_per_s'):
        assert [e.step for e in log.Scalars(tag)] == [1, 2, 3, 4, 5, 6], tag
    metrics = json.loads((run_dir / 'metrics.json').read_text())
    for key in ('train_loss', 'lr', 'train_images_per_s', 'val_loss', 'val_top1', 'val_top5'):
        events = log.Scalars(f'epoch/{key}')
        assert [e.step for e in events] == [3, 6], key
        assert [e.value for e in events] == pytest.approx([row[key] for row in metrics], rel=1e-6), key
    # the steps' mean loss is the epoch's train loss, and the lr a step used
    assert sum(e.value for e in log.Scalars('step/loss')[3:]) / 3 == pytest.approx(metrics[1]['train_loss'], 1e-6)
    assert all(0 < e.value <= 1e-3 for e in log.Scalars('step/lr'))
    (config,) = log.Tensors('config/text_summary')
    assert '"model": "boat_swin_nano_32"' in config.tensor_proto.string_val[0].decode()


@pytest.mark.parametrize(
    'log, message',
    [
        ('wandb', "--log 'wandb': not a logger boatvit knows; the loggers are tensorboard"),
        (
            'tensorboard',
            "--log tensorboard needs tensorboard, which is not installed; pip install 'boatvit[tensorboard]'",
        ),
    ],
)
def test_bad_logger_is_refused_before_training(tmp_path, capsys, monkeypatch, log, message):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, 'find_spec', lambda name, *a: None if name == 'tensorboard' else find_spec(name)
    )
    assert main(['train', *SHORT, '--output', str(tmp_path), '--log', log]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_resume_refuses_other_settings_and_finished_runs(tmp_path, default_run, capsys):
    run_dir = default_run
    assert main(['train', '--resume', str(run_dir), '--lr', '0.1']) == 2
    assert "--resume continues with the run's own config.json; drop --lr" in capsys.readouterr().err
    assert main(['train', '--resume', str(run_dir / 'last.pt')]) == 0
    assert 'already finished' in capsys.readouterr().out
    assert main(['train', '--resume', str(tmp_path)]) == 2
    assert 'is not a run directory' in capsys.readouterr().err


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    common = ['--no-aug', '--mixup', '0', '--cutmix', '0', '--drop-path', '0', '--epochs', '1']
    whole = train(tmp_path, 'whole', *common, '--batch-size', '16', '--limit-batches', '2')
    halves = train(tmp_path, 'halves', *common, '--batch-size', '8', '--grad-accum', '2', '--limit-batches', '4')
    assert_same_tensors(load_file(whole / 'last.safetensors'), load_file(halves / 'last.safetensors'), atol=1e-5)


@pytest.mark.parametrize('flags', [['--amp', 'bf16', '--grad-checkpointing'], ['--amp', 'fp16']])
def test_precision_and_checkpointing_options_train(tmp_path, capsys, flags):
    run_dir = train(tmp_path, 'run', '--epochs', '1', '--limit-batches', '1', *flags)
    assert all(torch.isfinite(t).all() for t in load_file(run_dir / 'last.safetensors').values())
    assert 'held-out top-1' in capsys.readouterr().out


def record_precision(monkeypatch) -> list:
    """The ``amp`` of every training and validation forward of the runs that follow."""
    used = []

    def recording(device, amp):
        used.append(amp)
        return runtime.autocast(device, amp)

    monkeypatch.setattr(train_mod, 'autocast', recording)
    monkeypatch.setattr(evaluation, 'autocast', recording)
    return used


BF16_LINE = 'bf16 autocast: this CPU has bf16 matrix units (AMX); --amp none to run float32'


@pytest.mark.parametrize(
    'units, flags, amp',
    [(True, [], 'bf16'), (True, ['--amp', 'none'], 'none'), (False, [], 'none'), (False, ['--amp', 'bf16'], 'bf16')],
)
def test_auto_precision_is_bf16_with_bf16_units_and_said_once(tmp_path, capsys, monkeypatch, units, flags, amp):
    monkeypatch.setattr(runtime, 'fast_bf16', lambda device: units)
    used = record_precision(monkeypatch)
    run_dir = train(tmp_path, 'run', '--epochs', '1', '--limit-batches', '1', '--device', 'cpu', *flags)
    out = capsys.readouterr().out
    assert out.count(BF16_LINE) == (1 if units and not flags else 0)
    if not units:
        assert 'bf16 matrix units' not in out  # a CPU without them hears nothing of them
    assert set(used) == {amp}
    assert json.loads((run_dir / 'config.json').read_text())['config']['amp'] == amp


def test_a_resume_keeps_the_precision_its_run_chose(tmp_path, monkeypatch, capsys):
    """A run started with bf16 units, resumed on a CPU without them, continues in bf16 and says nothing of it."""
    monkeypatch.setattr(runtime, 'fast_bf16', lambda device: True)
    crash_in_epoch_2(monkeypatch)
    with pytest.raises(Crash):
        train(tmp_path, 'run', '--device', 'cpu')
    run_dir = tmp_path / 'run'
    assert json.loads((run_dir / 'config.json').read_text())['config']['amp'] == 'bf16'
    monkeypatch.undo()  # the crash, and the units: a CPU without them
    capsys.readouterr()
    used = record_precision(monkeypatch)
    assert main(['train', '--resume', str(run_dir), '--quiet', '--workers', '0']) == 0
    assert set(used) == {'bf16'} and BF16_LINE not in capsys.readouterr().out
    assert json.loads((run_dir / 'config.json').read_text())['config']['amp'] == 'bf16'


def test_a_config_json_of_before_auto_still_resumes(tmp_path, monkeypatch):
    """Runs written before 'auto' existed hold 'none'; they resume in float32 even with bf16 units."""
    crash_in_epoch_2(monkeypatch)
    with pytest.raises(Crash):
        train(tmp_path, 'run', '--amp', 'none')
    monkeypatch.undo()
    monkeypatch.setattr(runtime, 'fast_bf16', lambda device: True)
    used = record_precision(monkeypatch)
    assert main(['train', '--resume', str(tmp_path / 'run'), '--quiet', '--workers', '0']) == 0
    assert set(used) == {'none'}


def test_an_unknown_precision_is_refused_before_a_run_directory(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(['train', *SHORT, '--amp', 'fp8', '--output', str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --amp: invalid choice: 'fp8'" in err and "'auto', 'none', 'bf16', 'fp16'" in err
    with pytest.raises(UsageError, match="--amp must be one of auto, none, bf16, fp16, got 'fp8'"):
        TrainConfig(data='digits', amp='fp8')
    with pytest.raises(UsageError, match=r"--lr-base-scale must be one of \['linear', 'sqrt'\], got 'log'"):
        TrainConfig(data='digits', lr_base_scale='log')
    with pytest.raises(SystemExit):
        main(['train', *SHORT, '--lr-base-scale', 'log', '--output', str(tmp_path)])
    assert "argument --lr-base-scale: invalid choice: 'log'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    """2 gloo processes x 4 images train the same weights as 1 process x 8 images, to float noise."""
    # SGD rather than AdamW: Adam divides by the gradient's own scale, which would hide mis-averaged gradients
    common = [
        '-m',
        'boatvit',
        'train',
        '--output',
        str(tmp_path),
        '--epochs',
        '1',
        '--limit-batches',
        '3',
        '--workers',
        '0',
        '--quiet',
        '--no-aug',
        '--mixup',
        '0',
        '--cutmix',
        '0',
        '--drop-path',
        '0',
        '--opt',
        'sgd',
        '--lr',
        '0.05',
        '--amp',  # a subprocess does not see conftest's CPU without bf16 units
        'none',
        *TINY_FLAGS,
    ]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    subprocess.run([sys.executable, *common, '--name', 'one', '--batch-size', '8'], check=True, env=env, timeout=300)
    subprocess.run(
        [
            sys.executable,
            '-m',
            'torch.distributed.run',
            '--standalone',
            '--nproc_per_node',
            '2',
            *common,
            '--name',
            'two',
            '--batch-size',
            '4',
            '--logger',  # --log's spelling for torchrun, whose parser takes --log for its own --log-dir
            'tensorboard',
        ],
        check=True,
        env=env,
        timeout=300,
    )
    one, two = load_file(tmp_path / 'one' / 'last.safetensors'), load_file(tmp_path / 'two' / 'last.safetensors')
    # the runs differ only in the order gradients are summed: measured 1.5e-8 apart after 3 steps (weights up to 1)
    assert_same_tensors(one, two, atol=1e-6)
    (row_one,), (row_two,) = (json.loads((tmp_path / n / 'metrics.json').read_text()) for n in ('one', 'two'))
    for key in ('train_loss', 'val_loss', 'val_top1'):
        assert row_one[key] == pytest.approx(row_two[key], rel=1e-5), key
    config = json.loads((tmp_path / 'two' / 'config.json').read_text())
    assert config['world_size'] == 2 and config['global_batch_size'] == 8
    # only rank 0 logs: one event file, each step once
    assert len(list((tmp_path / 'two' / 'tensorboard').glob('events.out.tfevents.*'))) == 1
    assert [e.step for e in read_tensorboard(tmp_path / 'two').Scalars('step/loss')] == [1, 2, 3]


def test_image_folder_with_the_full_augmentation_trains_and_evaluates(tmp_path, capsys):
    # the generic defaults: RandAugment, random erasing, mixup and cutmix, label smoothing
    data = make_image_folder(tmp_path / 'data', {'train': {'a': 8, 'b': 8}, 'val': {'a': 3, 'b': 2}})
    assert (
        main(
            [
                'train',
                '--data',
                str(data),
                '--model',
                'boat_swin_nano_32',
                *TINY_FLAGS,
                '--epochs',
                '1',
                '--batch-size',
                '8',
                '--workers',
                '0',
                '--quiet',
                '--output',
                str(tmp_path),
                '--name',
                'run',
            ]
        )
        == 0
    )
    config = json.loads((tmp_path / 'run' / 'config.json').read_text())
    # the small-data default keeps the reference augmentation
    assert config['recipe'] == 'small-data' and config['config']['aa'] == 'rand-m9-mstd0.5-inc1'
    assert config['classes'] == ['a', 'b'] and config['updates_per_epoch'] == 2
    capsys.readouterr()
    assert main(['eval', '--weights', str(tmp_path / 'run'), '--json', '--workers', '0']) == 0
    result = json.loads(capsys.readouterr().out)
    assert result['images'] == 5 and result['data'] == str(data)


def test_bad_input_gets_a_clear_error(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', {'train': {'a': 2, 'b': 2}, 'val': {'a': 1, 'c': 1}})
    assert main(['train', '--data', str(data), '--output', str(tmp_path)]) == 2
    assert "only in train: ['b'], only in val: ['c']" in capsys.readouterr().err
    assert main(['train', *SHORT, '--batch-size', '2000', '--output', str(tmp_path)]) == 2
    assert 'more than the 1437 training images; lower --batch-size' in capsys.readouterr().err
    assert main(['train', '--model', 'no_such_model', '--output', str(tmp_path)]) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err
    assert main(['train', '--recipe', 'boat_swin_tiny_224']) == 2
    assert 'needs --data' in capsys.readouterr().err
    assert main(['train', '--dataset', 'torch/cifar10', '--data', str(tmp_path), '--output', str(tmp_path)]) == 2
    assert "could not open data set 'torch/cifar10'" in capsys.readouterr().err
    for size in (['32', '32', '32'], ['0']):
        assert main(['train', '--img-size', *size, '--output', str(tmp_path)]) == 2
        assert '--img-size takes one positive int (a square) or two (height width)' in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['data']  # no run directory for any of these


def parse_train(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(['train', *argv])


def test_flags_override_the_recipe_and_the_lr_scales_with_the_global_batch():
    config, recipe = config_from_args(parse_train())
    assert recipe == 'digits' and config.model == 'boat_swin_nano_32' and config.data == 'digits'
    shorter, _ = config_from_args(parse_train('--data', 'digits', '--epochs', '3'))
    assert shorter == dataclasses.replace(config, epochs=3)
    config, recipe = config_from_args(parse_train('--recipe', 'boat_cswin_base_224', '--data', 'x', '--epochs', '5'))
    assert recipe == 'boat_cswin_base_224' and config.epochs == 5 and config.ema_decay == 0.99992
    # reference: lr 1e-3 at 8 GPUs x 256
    assert learning_rate(config, world_size=8) == pytest.approx(1e-3)
    assert learning_rate(config, world_size=2) == pytest.approx(2.5e-4)
    # AdamW's rule: by the square root of the batch ratio, a quarter of the batch at half the lr
    sqrt = dataclasses.replace(config, lr_base_scale='sqrt')
    assert learning_rate(sqrt, world_size=8) == pytest.approx(1e-3)
    assert learning_rate(sqrt, world_size=2) == pytest.approx(5e-4)
    assert learning_rate(dataclasses.replace(sqrt, lr=3e-4), world_size=2) == 3e-4  # --lr is taken as it is
    config, recipe = config_from_args(parse_train('--data', 'x', '--clip-grad', '0', '--aa', 'none'))
    assert recipe == 'small-data' and config.clip_grad is None and config.aa is None
    assert config.epochs == RECIPES['small-data']['epochs'] != TrainConfig.epochs


@pytest.mark.parametrize('name', sorted(RECIPES))
def test_recipes_name_registered_models_and_valid_configs(name):
    # the fine-tuning and small-data presets take the model from the weights or the flags
    assert timm.is_model(RECIPES[name].get('model', TrainConfig.model))
    TrainConfig(**dict(RECIPES[name], data='x'))


def test_reference_recipes():
    swin, cswin = RECIPES['boat_swin_tiny_224'], RECIPES['boat_cswin_tiny_224']
    assert [RECIPES[f'boat_swin_{s}_224']['drop_path'] for s in ('tiny', 'small', 'base')] == [0.2, 0.3, 0.5]
    assert [RECIPES[f'boat_cswin_{s}_224']['drop_path'] for s in ('tiny', 'small', 'base')] == [0.2, 0.4, 0.5]
    assert swin['lr_base'] / swin['lr_base_size'] == 5e-4 / 512 and swin['clip_grad'] == 5.0
    assert cswin['lr_base'] / cswin['lr_base_size'] == 2e-3 / 2048 and cswin['clip_grad'] is None
    assert cswin['ema_decay'] == 0.99984 and RECIPES['boat_cswin_base_224']['weight_decay'] == 0.1
    for recipe in (swin, cswin):
        assert (recipe['epochs'], recipe['warmup_epochs'], recipe['mixup'], recipe['cutmix']) == (300, 20, 0.8, 1.0)
        assert (recipe['smoothing'], recipe['aa'], recipe['reprob']) == (0.1, 'rand-m9-mstd0.5-inc1', 0.25)


def test_missing_matplotlib_is_said_before_training(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'matplotlib' else find_spec(name))
    assert main(['train', *SHORT, '--output', str(tmp_path)]) == 2
    assert "plotting training curves needs matplotlib, which is not installed; pip install 'boatvit[cli]'" in (
        capsys.readouterr().err
    )
    assert not list(tmp_path.iterdir())
