"""``boatvit convert`` on checkpoints in both reference formats, and timm loading the result."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import boatvit
from boatvit import cli
from boatvit.weights import load_model, read_weights

from reference_checkpoints import save_cswin_checkpoint, save_swin_checkpoint

CLOSE = dict(rtol=1e-10, atol=1e-10)
VARIANT = {'swin': 'boat_swin_tiny_224', 'cswin': 'boat_cswin_tiny_224'}


def model_kwargs_argv(fixture) -> list:
    return ['--model-kwargs'] + [f'{k}={v!r}' for k, v in fixture.model_kwargs().items()]


@pytest.fixture(scope='module')
def reference_files(tmp_path_factory, swin_fixture, cswin_fixture):
    """One checkpoint per family in its reference format; the CSWin raw weights differ from its EMA weights."""
    folder = tmp_path_factory.mktemp('reference')
    save_swin_checkpoint(
        folder, folder / 'tiny.pth', swin_fixture.state_dict, swin_fixture.meta['weights']['omitted_buffers']
    )
    generator = torch.Generator().manual_seed(0)
    raw = {k: v.float() + 0.01 * torch.randn(v.shape, generator=generator) for k, v in cswin_fixture.state_dict.items()}
    save_cswin_checkpoint(folder / 'cswin_tiny.pth.tar', ema=cswin_fixture.state_dict, raw=raw)
    return {'swin': folder / 'tiny.pth', 'cswin': folder / 'cswin_tiny.pth.tar', 'cswin_raw': raw}


@pytest.fixture(scope='module')
def converted(tmp_path_factory, reference_files, swin_fixture, cswin_fixture):
    """Each reference file converted by the command line, with default options."""
    out = {}
    for family, fixture in (('swin', swin_fixture), ('cswin', cswin_fixture)):
        out[family] = tmp_path_factory.mktemp('converted') / f'{family}.safetensors'
        argv = ['convert', str(reference_files[family]), str(out[family]), '--model', VARIANT[family]]
        assert cli.main(argv + model_kwargs_argv(fixture)) == 0
    return out


def fixture_of(family, swin_fixture, cswin_fixture):
    return swin_fixture if family == 'swin' else cswin_fixture


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_converted_reference_checkpoint_reproduces_fixture_logits(
    family, converted, reference_files, swin_fixture, cswin_fixture
):
    fixture = fixture_of(family, swin_fixture, cswin_fixture)
    source = reference_files[family]
    meta = read_weights(converted[family]).metadata
    assert meta['model'] == VARIANT[family]
    assert meta['source_file'] == source.name
    assert meta['source_sha256'] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert (meta['source_entry'], meta['ema']) == (('model', False) if family == 'swin' else ('state_dict_ema', True))

    loaded = load_model(converted[family])  # variant and constructor arguments from the metadata
    with torch.no_grad():
        logits = loaded.model.double()(fixture.tensors['input'].double())
    torch.testing.assert_close(logits, fixture.tensors['logits'], **CLOSE)


def test_no_ema_takes_the_raw_weights(tmp_path, reference_files, cswin_fixture, capsys):
    out = tmp_path / 'raw.safetensors'
    argv = ['convert', str(reference_files['cswin']), str(out), '--model', VARIANT['cswin'], '--no-ema']
    assert cli.main(argv + model_kwargs_argv(cswin_fixture)) == 0
    assert 'raw weights' in capsys.readouterr().out

    meta = read_weights(out).metadata
    assert (meta['source_entry'], meta['ema']) == ('state_dict', False)
    stem = load_file(out)['patch_embed.proj.weight']
    assert torch.equal(stem, reference_files['cswin_raw']['stage1_conv_embed.0.weight'])
    assert not torch.equal(stem, cswin_fixture.state_dict['stage1_conv_embed.0.weight'].float())


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_timm_loads_converted_file(family, converted, swin_fixture, cswin_fixture):
    fixture = fixture_of(family, swin_fixture, cswin_fixture)
    kwargs = fixture.model_kwargs()
    overlay = dict(file=str(converted[family]), num_classes=kwargs.pop('num_classes'))
    model = timm.create_model(VARIANT[family], pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    with torch.no_grad():
        logits = model.double().eval()(fixture.tensors['input'].double())
    torch.testing.assert_close(logits, fixture.tensors['logits'], **CLOSE)


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_timm_loads_reference_checkpoint(family, reference_files, swin_fixture, cswin_fixture):
    """timm's own loader refuses the BOAT-Swin file (pickled config); custom_load hands it to boatvit's."""
    fixture = fixture_of(family, swin_fixture, cswin_fixture)
    kwargs = fixture.model_kwargs()
    overlay = dict(file=str(reference_files[family]), custom_load=True, num_classes=kwargs.pop('num_classes'))
    model = timm.create_model(VARIANT[family], pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    with torch.no_grad():
        logits = model.double().eval()(fixture.tensors['input'].double())
    torch.testing.assert_close(logits, fixture.tensors['logits'], **CLOSE)


def test_timm_fine_tuning_keeps_a_fresh_classifier(reference_files, swin_fixture):
    kwargs = swin_fixture.model_kwargs()
    overlay = dict(file=str(reference_files['swin']), custom_load=True, num_classes=kwargs.pop('num_classes'))
    model = timm.create_model(VARIANT['swin'], pretrained=True, pretrained_cfg_overlay=overlay, num_classes=3, **kwargs)
    reference = swin_fixture.build().state_dict()
    assert model.get_classifier().out_features == 3
    body = {k: v for k, v in model.state_dict().items() if not k.startswith('head.')}
    assert all(torch.equal(v.double(), reference[k]) for k, v in body.items())


def test_infers_the_registered_variant(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('boat_swin_nano_32').eval()
    source, out = tmp_path / 'nano.pth', tmp_path / 'nano.safetensors'
    torch.save({'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()}}, source)

    assert cli.main(['convert', str(source), str(out)]) == 0

    assert read_weights(out).metadata['model'] == 'boat_swin_nano_32'
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(out).model(x), model(x))


def test_non_standard_architecture_needs_model(tmp_path, reference_files, capsys):
    out = tmp_path / 'out.safetensors'
    assert cli.main(['convert', str(reference_files['swin']), str(out)]) == 2
    err = capsys.readouterr().err
    assert 'no registered BOAT-Swin variant matches' in err and '--model' in err
    assert not out.exists()


def test_checkpoint_of_the_other_family_is_refused(tmp_path, reference_files, swin_fixture, capsys):
    out = tmp_path / 'out.safetensors'
    argv = ['convert', str(reference_files['cswin']), str(out), '--model', VARIANT['swin']]
    assert cli.main(argv + model_kwargs_argv(swin_fixture)) == 2
    err = capsys.readouterr().err
    assert str(reference_files['cswin']) in err and 'BOAT-CSWin weights but the model is BOAT-Swin' in err
    assert not out.exists()


def test_missing_fsla_weight_is_refused(tmp_path, swin_fixture, capsys):
    weights = dict(swin_fixture.state_dict)
    del weights['layers.1.blocks.1.attnC.qkv.weight']
    source, out = tmp_path / 'tiny.pth', tmp_path / 'out.safetensors'
    save_swin_checkpoint(tmp_path, source, weights, {})
    argv = ['convert', str(source), str(out), '--model', VARIANT['swin']] + model_kwargs_argv(swin_fixture)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert str(source) in err and 'nothing was loaded' in err and 'layers.1.blocks.1.fsla.qkv.weight' in err
    assert not out.exists()


@pytest.mark.parametrize(
    'kind, message',
    [
        ('image', 'not a checkpoint'),
        ('truncated', 'truncated or corrupt'),
        ('runs code', 'refused'),
    ],
)
def test_bad_checkpoint_files_are_named(tmp_path, reference_files, kind, message, capsys):
    source, out = tmp_path / 'tiny.pth', tmp_path / 'out.safetensors'
    if kind == 'image':
        source.write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(64))
    elif kind == 'truncated':
        data = reference_files['swin'].read_bytes()
        source.write_bytes(data[: len(data) // 3])
    else:
        torch.save({'model': {}, 'config': _RunsCode()}, source)

    assert cli.main(['convert', str(source), str(out), '--model', VARIANT['swin']]) == 2

    err = capsys.readouterr().err
    assert str(source) in err and message in err
    assert not out.exists()


class _RunsCode:
    def __reduce__(self):
        return os.system, ('echo pwned',)


def test_interrupted_write_leaves_the_old_file(tmp_path, reference_files, swin_fixture, monkeypatch, capsys):
    out = tmp_path / 'out.safetensors'
    out.write_bytes(b'previous')

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b'half')
        raise KeyboardInterrupt

    monkeypatch.setattr(boatvit.runs, 'save_file', half_write)
    argv = ['convert', str(reference_files['swin']), str(out), '--model', VARIANT['swin']]
    assert cli.main(argv + model_kwargs_argv(swin_fixture)) == 130  # Ctrl-C: one line, as a shell reports it
    assert capsys.readouterr().err.strip() == 'boatvit convert: interrupted'
    assert out.read_bytes() == b'previous'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out.safetensors']


def test_output_must_be_safetensors(tmp_path, reference_files, capsys):
    assert cli.main(['convert', str(reference_files['swin']), str(tmp_path / 'out.pth')]) == 2
    assert '.safetensors' in capsys.readouterr().err
