"""The restricted checkpoint loader: reads both reference formats and safetensors, runs no code from a file."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from boatvit.safe_load import CheckpointFileError, StubObject, UnsafeCheckpointError, load_checkpoint_file

from reference_checkpoints import CFGNODE_SOURCE, save_with_foreign_module


@pytest.mark.parametrize('zipfile', [True, False], ids=['zip', 'legacy'])
def test_swin_checkpoint_with_unimportable_config(tmp_path, zipfile):
    weights = {'head.weight': torch.randn(3, 4), 'layers.0.blocks.0.attn.relative_position_index': torch.arange(4)}
    path = tmp_path / 'tiny.pth'

    def build(mod):
        config = mod.CfgNode({'MODEL': mod.CfgNode({'TYPE': 'swin', 'DROP_PATH_RATE': 0.2}), 'TAGS': ('a', 'b')})
        return {
            'model': weights,
            'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-3, 'params': [0]}]},
            'lr_scheduler': {'base_values': [1e-3]},
            'max_accuracy': 81.2,
            'epoch': 299,
            'config': config,
            'notes': b'\x00bytes',
            'seen': {1, 2},
        }

    module = save_with_foreign_module(tmp_path, path, CFGNODE_SOURCE, build, _use_new_zipfile_serialization=zipfile)
    checkpoint = load_checkpoint_file(path)

    assert module not in sys.modules  # stubbed, never imported
    assert checkpoint.keys() == {
        'model',
        'optimizer',
        'lr_scheduler',
        'max_accuracy',
        'epoch',
        'config',
        'notes',
        'seen',
    }
    for k, v in weights.items():
        assert torch.equal(checkpoint['model'][k], v)
    config = checkpoint['config']
    assert isinstance(config, StubObject) and type(config).stub_of == f'{module}.CfgNode'
    assert config['MODEL']['TYPE'] == 'swin' and config['TAGS'] == ('a', 'b')
    assert config.state == {'__immutable__': True}
    assert checkpoint['notes'] == b'\x00bytes' and checkpoint['seen'] == {1, 2}


def test_cswin_checkpoint_loads_with_weights_only(tmp_path, monkeypatch):
    path = tmp_path / 'cswin_tiny.pth.tar'
    args = argparse.Namespace(model='CSWin_64_12211_tiny_224', lr=2e-3, model_ema=True)
    torch.save(
        {
            'epoch': 299,
            'arch': args.model,
            'state_dict': {'head.weight': torch.ones(2, 2)},
            'version': 2,
            'args': args,
            'state_dict_ema': {'head.weight': torch.zeros(2, 2)},
            'metric': 82.1,
        },
        path,
    )
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, 'load', lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))

    checkpoint = load_checkpoint_file(path)

    assert [kw['weights_only'] for kw in calls] == [True]
    assert checkpoint['args'] == args
    assert torch.equal(checkpoint['state_dict_ema']['head.weight'], torch.zeros(2, 2))


class _RunsCode:
    """Unpickles into a call of ``func(*args)``: the classic pickle code-execution payload."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize('payload', ['os.system', 'builtins.exec', 'importable function'])
def test_refuses_pickle_that_runs_code(tmp_path, payload):
    marker = tmp_path / 'ran'
    path = tmp_path / 'evil.pth'
    if payload == 'os.system':
        evil = _RunsCode(os.system, f'touch {marker}')
    elif payload == 'builtins.exec':
        evil = _RunsCode(exec, f'open({str(marker)!r}, "w").close()')
    else:
        # a function of an imported, harmless-looking module: still never resolved, never called
        evil = _RunsCode(shutil.copyfile, __file__, str(marker))
    torch.save({'model': {'w': torch.ones(1)}, 'config': evil}, path)

    with pytest.raises(UnsafeCheckpointError, match='refused') as info:
        load_checkpoint_file(path)

    assert str(path) in str(info.value)
    assert not marker.exists()


def test_refuses_call_to_unknown_function(tmp_path):
    path = tmp_path / 'evil.pth'
    source = 'def setup(*args):\n    return args\n'
    save_with_foreign_module(tmp_path, path, source, lambda mod: {'x': _RunsCode(mod.setup, 1)})

    with pytest.raises(UnsafeCheckpointError, match=r'calls foreign_\w+\.setup\(\)'):
        load_checkpoint_file(path)


def test_refuses_old_protocol_objects_of_unknown_classes(tmp_path):
    """Protocols 0 and 1 rebuild objects by calling copyreg._reconstructor: a call, so refused."""
    path = tmp_path / 'old.pth'
    save_with_foreign_module(
        tmp_path, path, CFGNODE_SOURCE, lambda mod: {'config': mod.CfgNode({'a': 1})}, pickle_protocol=1
    )
    with pytest.raises(UnsafeCheckpointError, match=r'calls copy_?reg\._reconstructor\(\)'):
        load_checkpoint_file(path)


def test_reads_safetensors(tmp_path):
    path = tmp_path / 'weights.bin'  # the format is told by content, not by name
    tensors = {'a': torch.randn(2, 3), 'b': torch.arange(4)}
    save_file(tensors, path)

    loaded = load_checkpoint_file(path)

    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_safetensors_whose_header_size_starts_with_the_pickle_opcode(tmp_path):
    """The header size is little-endian: one in 256 headers (metadata of some length) begins with 0x80, the byte that
    opens a legacy torch pickle; such a file is still read as safetensors."""
    tensors = {'a': torch.randn(2, 3)}
    for pad in range(256):
        path = tmp_path / 'weights.bin'
        save_file(tensors, path, metadata={'note': 'x' * pad})
        if path.read_bytes()[:1] == b'\x80':
            break
    else:
        pytest.fail('no metadata length gave a header size whose low byte is 0x80')
    assert torch.equal(load_checkpoint_file(path)['a'], tensors['a'])


def _truncated_copy(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


@pytest.mark.parametrize(
    'kind, message',
    [
        ('missing', 'no such file'),
        ('directory', 'not a file'),
        ('empty', 'empty'),
        ('jpeg', 'not a checkpoint'),
        ('truncated torch', 'truncated or corrupt'),
        ('truncated safetensors', 'truncated or corrupt'),
        ('tensor, not a dict', 'not a checkpoint dict'),
    ],
)
def test_bad_files_are_named(tmp_path, kind, message):
    path = tmp_path / 'bad.pth'
    if kind == 'directory':
        path.mkdir()
    elif kind == 'empty':
        path.write_bytes(b'')
    elif kind == 'jpeg':
        path.write_bytes(b'\xff\xd8\xff\xe0\x00\x10JFIF' + bytes(100))
    elif kind == 'truncated torch':
        torch.save({'model': {'w': torch.randn(64, 64)}}, tmp_path / 'full.pth')
        _truncated_copy(tmp_path / 'full.pth', path)
    elif kind == 'truncated safetensors':
        save_file({'w': torch.randn(64, 64)}, tmp_path / 'full.safetensors')
        path = _truncated_copy(tmp_path / 'full.safetensors', tmp_path / 'bad.safetensors')
    elif kind == 'tensor, not a dict':
        torch.save(torch.ones(3), path)

    with pytest.raises(CheckpointFileError, match=message) as info:
        load_checkpoint_file(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize('entry', ['constants.pkl', 'code/__torch__.py'])
def test_torch_zip_with_torchscript_entries_is_refused_unread(tmp_path, entry, monkeypatch):
    """A torch.save zip given either entry of a TorchScript archive is refused before torch.load sees it."""
    import zipfile

    path = tmp_path / 'w.pth'
    torch.save({'w': torch.ones(2)}, path)
    with zipfile.ZipFile(path, 'a') as archive:
        archive.writestr(f'w/{entry}', b'')

    def no_load(*args, **kwargs):
        raise AssertionError('torch.load was called')

    monkeypatch.setattr(torch, 'load', no_load)
    with pytest.raises(UnsafeCheckpointError, match=r'w\.pth: refused: this is a TorchScript archive'):
        load_checkpoint_file(path)
