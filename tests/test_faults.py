"""Faults a run meets in the field: broken dependencies of the augmentation, a full disk, a diverging run, corrupt
run files, unreadable images, interrupts and two processes on one run directory. Each test reproduces the fault
and checks the one-line message, the files left intact and the exit status."""

from __future__ import annotations

import errno
import itertools
import json
import math
import os
import random
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

import boatvit.training as train_mod
from boatvit import runs
from boatvit.cli import main
from boatvit.training import TrainConfig, _set_transforms
from boatvit.weights import build_model, read_weights
from test_data import make_image_folder, write_png_header
from test_evaluate import TINY_FLAGS, TINY_KWARGS


def test_default_training_augmentation_survives_thousands_of_images():
    # timm's RandAugment posterize asks for 0 bits at the top magnitude, which Pillow 13 refuses
    # ('bits must be between or equal to 1 and 8', about 1 call in 1000): pyproject.toml pins pillow<13
    config = TrainConfig(data='digits')
    train_ds, val_ds = types.SimpleNamespace(), types.SimpleNamespace()
    _set_transforms(config, build_model(config.model, num_classes=10), train_ds, val_ds)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    random.seed(0)
    torch.manual_seed(0)
    for _ in range(3000):
        out = train_ds.transform(image)
    assert out.shape == (3, 32, 32) and torch.isfinite(out).all()


# one epoch of one batch of 16 on a tiny BOAT-Swin: a few seconds
FAST = ['--limit-batches', '1', '--batch-size', '16', '--workers', '0', '--quiet', *TINY_FLAGS]


def run_train(tmp_path: Path, name: str, *flags: str, epochs: int = 2) -> int:
    return main(['train', '--output', str(tmp_path), '--name', name, '--epochs', str(epochs), *FAST, *flags])


def no_temporary_files(run_dir: Path) -> bool:
    return not list(run_dir.glob('.*.tmp'))


class Crash(Exception):
    pass


def crash_in_training_forward(monkeypatch, at: int, error: BaseException) -> None:
    """The model raises ``error`` on its training forward number ``at`` (0-based; one per epoch here)."""
    real_build = train_mod.build_model

    def build_crashing(*args, **kwargs):
        model = real_build(*args, **kwargs)
        calls = itertools.count()

        def hook(module, inputs):
            if module.training and next(calls) == at:
                raise error

        model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(train_mod, 'build_model', build_crashing)


FULL_DISK = {
    'safetensors': (
        'save_file',
        SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        ),
    ),
    'torch.save short write': (
        'torch_save',
        RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos'),
    ),
    'ENOSPC': ('torch_save', OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))),
}


@pytest.mark.parametrize('case', sorted(FULL_DISK))
def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys, case):
    writer, error = FULL_DISK[case]
    real_save_file, real_torch_save = runs.save_file, torch.save

    def save_file_failing(tensors, path, metadata):
        if json.loads(metadata['epoch']) == 2:
            Path(path).write_bytes(b'partial')  # the writer got some bytes out before the disk filled up
            raise error
        real_save_file(tensors, path, metadata=metadata)

    def torch_save_failing(obj, path):
        if obj['epoch'] == 2:
            Path(path).write_bytes(b'partial')
            raise error
        real_torch_save(obj, path)

    if writer == 'save_file':
        monkeypatch.setattr(runs, 'save_file', save_file_failing)
    else:
        monkeypatch.setattr(runs.torch, 'save', torch_save_failing)
    assert run_train(tmp_path, 'full') == 2
    err = capsys.readouterr().err.strip()
    run_dir = tmp_path / 'full'
    assert len(err.splitlines()) == 1 and 'Traceback' not in err
    assert 'saving the checkpoint of epoch 2 failed: could not write' in err and 'MiB free' in err
    assert f'{run_dir / "last.pt"} holds epoch 1' in err and f'--resume {run_dir}' in err
    assert no_temporary_files(run_dir)
    assert runs.load_state(run_dir / 'last.pt')['epoch'] == 1
    # the weights are written before the state: complete either way, of epoch 2 when only the state failed
    assert read_weights(run_dir / 'last.safetensors').metadata['epoch'] == (1 if writer == 'save_file' else 2)
    if case == 'ENOSPC':  # once is enough: the run resumes from the epoch named
        monkeypatch.undo()
        assert main(['train', '--resume', str(run_dir), '--quiet', '--workers', '0']) == 0
        assert runs.load_state(run_dir / 'last.pt')['epoch'] == 2


def test_full_disk_while_converting_leaves_the_old_output(tmp_path, monkeypatch, capsys):
    source = tmp_path / 'source.safetensors'
    model = build_model('boat_swin_nano_32', num_classes=10, model_kwargs=TINY_KWARGS)
    runs.save_weights(source, model.state_dict(), {'model': 'boat_swin_nano_32', 'model_kwargs': TINY_KWARGS})
    out = tmp_path / 'out.safetensors'
    out.write_bytes(b'the previous output')

    def full(tensors, path, metadata):
        Path(path).write_bytes(b'partial')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(runs, 'save_file', full)
    assert main(['convert', str(source), str(out)]) == 2
    err = capsys.readouterr().err
    assert f'could not write {out}: No space left on device' in err and 'MiB free' in err
    assert 'the previous one is intact' in err
    assert out.read_bytes() == b'the previous output' and no_temporary_files(tmp_path)


def test_other_errors_inside_an_atomic_write_pass_through(tmp_path):
    with pytest.raises(Crash), runs.atomic_path(tmp_path / 'x') as tmp:
        tmp.write_text('half')
        raise Crash()
    assert list(tmp_path.iterdir()) == []


def test_a_diverging_run_stops_and_keeps_finite_checkpoints(tmp_path, capsys):
    assert run_train(tmp_path, 'diverging', '--lr', '1e4', '--warmup-epochs', '0', epochs=3) == 2
    err = capsys.readouterr().err
    assert 'training diverged' in err and '--lr' in err and '--clip-grad' in err and 'Traceback' not in err
    run_dir = tmp_path / 'diverging'
    for name in ('last', 'best'):
        if (run_dir / f'{name}.safetensors').exists():
            assert all(torch.isfinite(v).all() for v in load_file(run_dir / f'{name}.safetensors').values())
            state = runs.load_state(run_dir / f'{name}.pt')
            assert all(torch.isfinite(v).all() for v in state['trainer']['model'].values())
            assert all(math.isfinite(row['train_loss']) for row in state['history'])


def test_non_finite_loss_stops_at_that_batch(tmp_path, monkeypatch, capsys):
    def nan_loss(self, *args):
        return torch.tensor(float('nan'), requires_grad=True)

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, 'forward', nan_loss)
    assert run_train(tmp_path, 'nan', '--mixup', '0', '--cutmix', '0', '--smoothing', '0') == 2
    err = capsys.readouterr().err
    assert 'training diverged: the loss became nan at batch 1 of epoch 1' in err
    # nothing was saved, so the run directory it created is gone
    assert not (tmp_path / 'nan').exists()


@pytest.fixture(scope='module')
def one_epoch_run(tmp_path_factory) -> Path:
    """A run of 2 epochs stopped after the first (as if killed): last.pt and best.pt hold epoch 1."""
    tmp_path = tmp_path_factory.mktemp('runs')
    with pytest.MonkeyPatch.context() as monkeypatch:
        crash_in_training_forward(monkeypatch, 1, Crash())
        with pytest.raises(Crash):
            run_train(tmp_path, 'stopped')
    return tmp_path / 'stopped'


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    return copy


@pytest.mark.parametrize('damage', ['empty', 'truncated', 'not a state'])
def test_corrupt_last_pt_names_the_file_and_the_way_out(one_epoch_run, tmp_path, capsys, damage):
    run_dir = copy_run(one_epoch_run, tmp_path)
    last = run_dir / 'last.pt'
    if damage == 'empty':
        last.write_bytes(b'')
    elif damage == 'truncated':
        last.write_bytes(last.read_bytes()[:1000])
    else:
        torch.save({'epoch': 1}, last)
    assert main(['train', '--resume', str(run_dir), '--quiet', '--workers', '0']) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(last) in err
    assert f'cp {run_dir / "best.pt"} {last}' in err and 'start the run anew' in err
    if damage != 'empty':
        return
    assert f'{last} is empty' in err
    # the advice works: the best epoch's state resumes
    shutil.copy(run_dir / 'best.pt', last)
    assert main(['train', '--resume', str(run_dir), '--quiet', '--workers', '0']) == 0
    assert runs.load_state(last)['epoch'] == 2


def test_unparsable_config_names_the_file(one_epoch_run, tmp_path, capsys):
    run_dir = copy_run(one_epoch_run, tmp_path)
    (run_dir / 'config.json').write_text('{"config": ')
    assert main(['train', '--resume', str(run_dir)]) == 2
    assert f'{run_dir / "config.json"} is not valid JSON' in capsys.readouterr().err


def test_a_crash_right_after_the_final_checkpoint_keeps_its_metrics(one_epoch_run, tmp_path, monkeypatch):
    run_dir = copy_run(one_epoch_run, tmp_path)
    real_save = train_mod.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise Crash()

    monkeypatch.setattr(train_mod, 'save_checkpoint', save_then_crash)
    with pytest.raises(Crash):
        main(['train', '--resume', str(run_dir), '--quiet', '--workers', '0'])
    assert runs.load_state(run_dir / 'last.pt')['epoch'] == 2
    assert [row['epoch'] for row in json.loads((run_dir / 'metrics.json').read_text())] == [1, 2]
    assert (run_dir / 'metrics.csv').read_text().count('\n') == 3


def test_ctrl_c_is_one_line_with_the_resume_hint(one_epoch_run, tmp_path, monkeypatch, capsys):
    run_dir = copy_run(one_epoch_run, tmp_path)
    (run_dir / '.last.pt.99999999.tmp').write_bytes(b'left by a killed process')
    crash_in_training_forward(monkeypatch, 0, KeyboardInterrupt())
    assert main(['train', '--resume', str(run_dir), '--quiet', '--workers', '0']) == 130
    err = capsys.readouterr().err.strip()
    assert err == f'boatvit train: interrupted; continue it with boatvit train --resume {run_dir}'
    assert runs.load_state(run_dir / 'last.pt')['epoch'] == 1 and (run_dir / 'train.lock').read_text() == ''
    assert no_temporary_files(run_dir)  # the killed process's, removed under the lock
    # in the first epoch nothing is saved yet: the new run directory goes
    assert run_train(tmp_path, 'early') == 130
    assert 'nothing was saved' in capsys.readouterr().err and not (tmp_path / 'early').exists()


def test_a_failed_new_run_leaves_no_directory(tmp_path):
    with pytest.MonkeyPatch.context() as monkeypatch:
        crash_in_training_forward(monkeypatch, 0, Crash())
        with pytest.raises(Crash):
            run_train(tmp_path, 'failed')
    assert list(tmp_path.iterdir()) == []


def test_output_that_is_a_file(tmp_path, capsys):
    output = tmp_path / 'a_file'
    output.write_text('')
    for out in (output, output / 'below'):
        assert main(['train', '--output', str(out), '--epochs', '1', *FAST]) == 2
        assert f'--output {out} is a file, not a directory' in capsys.readouterr().err


def test_a_run_in_training_refuses_a_second_process(one_epoch_run, tmp_path, capsys):
    run_dir = copy_run(one_epoch_run, tmp_path)
    lock = run_dir / 'train.lock'
    # flock conflicts between two opens of the file in one process as between two processes
    with runs.hold_run_dir(run_dir, created=False):
        assert lock.read_text() == f'{os.getpid()}\n'
        assert main(['train', '--resume', str(run_dir), '--quiet', '--workers', '0']) == 2
        err = capsys.readouterr().err
        assert f'{run_dir} is being trained by process {os.getpid()}' in err
        # the same --output and --name: the directory exists
        assert main(['train', '--output', str(tmp_path), '--name', run_dir.name, '--epochs', '1', *FAST]) == 2
        assert 'exists; pass --resume' in capsys.readouterr().err
    assert runs.load_state(run_dir / 'last.pt')['epoch'] == 1
    # the lock of a killed process (its pid left in the file, the flock gone with it) is taken over with a note
    lock.write_text('999999999\n')
    with runs.hold_run_dir(run_dir, created=False):
        pass
    assert f'taking over {lock} from process 999999999' in capsys.readouterr().err


def test_two_processes_on_one_run_directory(one_epoch_run, tmp_path):
    run_dir = copy_run(one_epoch_run, tmp_path)
    hold = (
        'import time\nfrom boatvit import runs\n'
        f'with runs.hold_run_dir({str(run_dir)!r}, False):\n'
        '    print("held", flush=True)\n'
        '    time.sleep(60)'
    )
    holder = subprocess.Popen([sys.executable, '-c', hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        second = subprocess.run(
            [sys.executable, '-m', 'boatvit', 'train', '--resume', str(run_dir), '--quiet'],
            capture_output=True,
            text=True,
        )
        assert second.returncode == 2
        assert f'is being trained by process {holder.pid}' in second.stderr and 'Traceback' not in second.stderr
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize('header', [b'\xff' * 8 + b'garbage', (100).to_bytes(8, 'little') + b'{"not": json', b''])
def test_garbage_safetensors_header_is_not_a_checkpoint_for_every_command(tmp_path, capsys, header):
    weights = tmp_path / 'garbage.safetensors'
    weights.write_bytes(header)
    image = tmp_path / 'image.png'
    Image.new('RGB', (32, 32)).save(image)
    # eval without --model or --data: the weights file is the first (and only) thing it reports
    commands = {
        'eval': ['eval', '--weights', str(weights)],
        'convert': ['convert', str(weights), str(tmp_path / 'out.safetensors')],
        'predict': ['predict', str(image), '--weights', str(weights)],
        'clusters': ['clusters', str(image), '-o', str(tmp_path / 'c.png'), '--weights', str(weights)],
    }
    messages = {}
    for name, argv in commands.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
        messages[name] = err.split(': error: ', 1)[1]
    assert len(set(messages.values())) == 1, messages
    assert str(weights) in messages['eval']
    assert not (tmp_path / 'out.safetensors').exists() and not (tmp_path / 'c.png').exists()


def test_a_folder_with_a_corrupt_image_fails_before_training(tmp_path, capsys):
    root = make_image_folder(tmp_path / 'data', {'train': {'a': 2, 'b': 2}, 'val': {'a': 1, 'b': 1}})
    (root / 'train' / 'b' / '0.png').write_bytes(b'not a png')
    write_png_header(root / 'val' / 'a' / 'bomb.png', 20000, 20000)
    argv = ['train', '--data', str(root), '--output', str(tmp_path / 'runs'), '--epochs', '1', '--batch-size', '2']
    assert main([*argv, '--workers', '0', '--quiet', *TINY_FLAGS]) == 2
    err = capsys.readouterr().err
    assert f'1 of the 4 images in {root / "train"} cannot be used: {root / "train" / "b" / "0.png"}' in err
    assert list((tmp_path / 'runs').iterdir()) == []  # nothing trained, no run directory left


def test_non_finite_weights_after_the_last_step_are_never_saved(tmp_path, monkeypatch, capsys):
    real_step = train_mod.Trainer._step

    def step_then_poison(self):
        real_step(self)
        if self.num_updates == 2:  # the last step of epoch 2: the loss that led to it was finite
            with torch.no_grad():
                next(self.model.parameters()).fill_(float('inf'))

    monkeypatch.setattr(train_mod.Trainer, '_step', step_then_poison)
    assert run_train(tmp_path, 'poisoned', epochs=3) == 2
    err = capsys.readouterr().err
    assert 'training diverged: ' in err and 'became non-finite in epoch 2' in err
    run_dir = tmp_path / 'poisoned'
    for name in ('last', 'best'):
        state = runs.load_state(run_dir / f'{name}.pt')
        assert state['epoch'] == 1 and read_weights(run_dir / f'{name}.safetensors').metadata['epoch'] == 1
    assert [row['epoch'] for row in json.loads((run_dir / 'metrics.json').read_text())] == [1]
