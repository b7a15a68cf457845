"""boatvit.weights: every weight source read once; files that would run code, and metadata that asks for more than
data, refused by every entry point (issue 15, "two holes in safe loading")."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Tuple

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import boatvit
from boatvit.cli import main
from boatvit.errors import UnsafeCheckpointError, WeightsMetadataError
from boatvit.runs import save_weights
from boatvit.weights import MODEL_KWARGS, load_model, read_weights, validate_metadata

TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))


class WritesAFile(torch.nn.Module):
    """A TorchScript module whose ``__setstate__`` (run by ``torch.jit.load``) creates the file at ``path``."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.w = torch.ones(2)

    def forward(self, x):
        return x * self.w

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, torch.Tensor, bool]:
        return (self.path, self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, torch.Tensor, bool]) -> None:
        self.path = state[0]
        self.training = state[2]
        # a shared mapping of a file that does not exist creates it; used, so it is not optimised away
        self.w = state[1] + torch.from_file(self.path, shared=True, size=2, dtype=torch.uint8).fill_(65).float() * 0


class LoopsForever(torch.nn.Module):
    """A TorchScript module whose ``__setstate__`` never returns."""

    def __init__(self):
        super().__init__()
        self.w = torch.ones(2)

    def forward(self, x):
        return x * self.w

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, bool]:
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
        self.training = state[1]
        n = 0
        while n >= 0:
            n += 1
        self.w = state[0] + n


def script_to(module: torch.nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.jit.script is deprecated; attackers do not care
        torch.jit.save(torch.jit.script(module), str(path))
    return path


@pytest.fixture(scope='module')
def archives(tmp_path_factory):
    folder = tmp_path_factory.mktemp('torchscript')
    marker = folder / 'pwned'
    return {
        'writes': script_to(WritesAFile(str(marker)), folder / 'writes.pt'),
        'loops': script_to(LoopsForever(), folder / 'loops.pth.tar'),
        'marker': marker,
    }


def test_the_file_writing_archive_really_writes_when_loaded_by_torch(archives, tmp_path):
    """The attack is real: torch.jit.load runs the archive's __setstate__ (in a child process)."""
    marker = tmp_path / 'written'
    archive = script_to(WritesAFile(str(marker)), tmp_path / 'a.pt')
    subprocess.run([sys.executable, '-c', f'import torch; torch.jit.load({str(archive)!r})'], check=True, timeout=120)
    assert marker.read_bytes() == b'AA'


@pytest.fixture
def image(tmp_path):
    path = tmp_path / 'img.png'
    Image.new('RGB', (40, 40), (90, 120, 200)).save(path)
    return path


def entry_points(source: Path, tmp_path: Path, image: Path):
    """Every command line that reads weights, with ``source`` as the weights."""
    return {
        'convert': ['convert', str(source), str(tmp_path / 'out.safetensors')],
        'predict': ['predict', str(image), '--weights', str(source)],
        'eval': ['eval', '--weights', str(source), '--data', 'digits'],
        'export': ['export', '--weights', str(source), '-o', str(tmp_path / 'out.onnx')],
        'clusters': ['clusters', str(image), '--weights', str(source), '-o', str(tmp_path / 'out.png')],
    }


@pytest.mark.parametrize('command', ['convert', 'predict', 'eval', 'export', 'clusters'])
def test_torchscript_archive_is_refused_by_every_command(command, archives, tmp_path, image, capsys):
    argv = entry_points(archives['writes'], tmp_path, image)[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert 'TorchScript archive' in err and str(archives['writes']) in err and 'refused' in err
    assert not archives['marker'].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['img.png']  # nothing written


def test_torchscript_archive_is_refused_by_the_library(archives):
    model = timm.create_model('boat_swin_nano_32', num_classes=2, **TINY)
    with pytest.raises(UnsafeCheckpointError, match='TorchScript archive'):
        boatvit.load_reference_weights(model, archives['writes'])
    with pytest.raises(UnsafeCheckpointError, match='TorchScript archive'):
        timm.create_model(
            'boat_swin_nano_32',
            pretrained=True,
            **TINY,
            pretrained_cfg_overlay=dict(file=str(archives['writes']), custom_load=True),
        )
    assert not archives['marker'].exists()


def test_looping_archive_is_refused_without_running(archives, tmp_path, image):
    """Every entry point in a child process: a hang (the loop ran) fails on the timeout."""
    script = textwrap.dedent(f"""
        import timm, boatvit
        from boatvit.cli import main
        from boatvit.errors import UnsafeCheckpointError
        argvs = {json.dumps(list(entry_points(archives['loops'], tmp_path, image).values()))}
        assert all(main(argv) == 2 for argv in argvs)
        model = timm.create_model('boat_swin_nano_32')
        for load in (lambda: boatvit.load_reference_weights(model, {str(archives['loops'])!r}),
                     lambda: timm.create_model('boat_swin_nano_32', pretrained=True, pretrained_cfg_overlay=dict(
                         file={str(archives['loops'])!r}, custom_load=True))):
            try:
                load()
                raise SystemExit('loaded')
            except UnsafeCheckpointError as e:
                assert 'TorchScript archive' in str(e)
        print('all refused')
    """)
    done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'all refused' in done.stdout
    assert done.stderr.count('TorchScript archive') == 5


def tiny_weights(path: Path, **metadata) -> Path:
    model = timm.create_model('boat_swin_nano_32', num_classes=2, **TINY)
    save_weights(path, model.state_dict(), {'model': 'boat_swin_nano_32', 'model_kwargs': TINY, **metadata})
    return path


def with_raw_metadata(path: Path, raw: dict) -> Path:
    """A tiny model's weights whose safetensors header metadata is ``raw`` (strings, as stored)."""
    model = timm.create_model('boat_swin_nano_32', num_classes=2, **TINY)
    save_file(model.state_dict(), str(path), metadata=raw)
    return path


MALICIOUS = {
    'loader arguments': (
        {'model_kwargs': {'pretrained': True, 'pretrained_cfg_overlay': {'file': 'OTHER', 'custom_load': True}}},
        "'pretrained'",
    ),
    'a checkpoint path': ({'model_kwargs': {'checkpoint_path': 'OTHER'}}, "'checkpoint_path'"),
    'features only': ({'model_kwargs': {'features_only': True}}, "'features_only'"),
    'a huge image size': ({'model_kwargs': {'img_size': 100000}}, 'img_size=100000'),
    'a huge image size at the top': ({'img_size': 100000}, "'img_size'"),
    'a huge data config': (
        {
            'data_config': {
                'input_size': [3, 100000, 100000],
                'interpolation': 'bicubic',
                'mean': [0.5] * 3,
                'std': [0.5] * 3,
                'crop_pct': 1.0,
            }
        },
        "'data_config'",
    ),
    'an unknown model': ({'model': 'resnet50'}, "'resnet50', which is not a registered BOAT model"),
    'classes that are not names': ({'classes': [{'a': 1}]}, "'classes'"),
    'not JSON': (None, "'model' is not JSON"),
}


@pytest.mark.parametrize('case', sorted(MALICIOUS))
def test_metadata_beyond_data_is_refused(case, tmp_path, archives, image, capsys):
    metadata, message = MALICIOUS[case]
    path = tmp_path / 'w.safetensors'
    if metadata is None:
        with_raw_metadata(path, {'model': 'boat_swin_nano_32 (not json)'})
    else:
        if 'model_kwargs' in metadata and 'OTHER' in json.dumps(metadata):
            metadata = json.loads(json.dumps(metadata).replace('OTHER', str(archives['writes'])))
        raw = {'model': 'boat_swin_nano_32', 'model_kwargs': TINY, **metadata}
        with_raw_metadata(path, {k: json.dumps(v) for k, v in raw.items()})
    with pytest.raises(WeightsMetadataError, match='refused: its metadata') as error:
        read_weights(path)
    assert message in str(error.value) and str(path) in str(error.value)
    for command in ('convert', 'predict', 'eval'):
        argv = entry_points(path, tmp_path, image)[command]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and 'Metadata is data' in err
    assert not archives['marker'].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['img.png', 'w.safetensors']


def test_every_registered_model_and_its_size_pass_validation():
    for name in timm.list_models('boat_*'):
        size = timm.models.get_pretrained_cfg(name).input_size[-1]
        raw = {'model': json.dumps(name), 'img_size': json.dumps(size), 'model_kwargs': json.dumps({'img_size': size})}
        assert validate_metadata(raw) == {'model': name, 'img_size': size, 'model_kwargs': {'img_size': size}}
    assert {'pretrained', 'pretrained_cfg', 'pretrained_cfg_overlay', 'checkpoint_path'}.isdisjoint(MODEL_KWARGS)


def test_unknown_keys_are_dropped_and_json_decoded():
    raw = {
        'format': 'pt',
        'model': '"boat_swin_nano_32"',
        'data_config': json.dumps(
            {
                'input_size': [3, 32, 32],
                'interpolation': 'bicubic',
                'mean': [0.1] * 3,
                'std': [0.2] * 3,
                'crop_pct': 0.9,
            }
        ),
    }
    meta = validate_metadata(raw)
    assert meta == {
        'model': 'boat_swin_nano_32',
        'data_config': {
            'input_size': (3, 32, 32),
            'interpolation': 'bicubic',
            'mean': (0.1,) * 3,
            'std': (0.2,) * 3,
            'crop_pct': 0.9,
        },
    }


def test_sources_are_read_once_into_the_same_weights(tmp_path):
    """A safetensors file, a run directory and a torch file of the same weights give the same tensors."""
    file = tiny_weights(tmp_path / 'w.safetensors', classes=['a', 'b'])
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'config.json').write_text('{}')
    tiny_weights(run / 'best.safetensors', classes=['a', 'b'])
    torch_file = tmp_path / 'w.pth'
    torch.save({'model': read_weights(file).state_dict}, torch_file)
    sources = {kind: read_weights(p) for kind, p in (('safetensors', file), ('run', run), ('checkpoint', torch_file))}
    for kind, weights in sources.items():
        assert weights.kind == kind
        assert weights.state_dict.keys() == sources['safetensors'].state_dict.keys()
        assert weights.num_classes == 2
    assert sources['run'].path == run / 'best.safetensors' and sources['checkpoint'].entry == 'model'
    assert sources['run'].metadata['classes'] == ['a', 'b'] and sources['checkpoint'].metadata == {}
    # metadata applies to its own model only: another model name keeps none of it
    loaded = load_model(file)
    assert loaded.name == 'boat_swin_nano_32' and loaded.metadata['classes'] == ['a', 'b']
    assert loaded.model_kwargs == {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}


def test_model_kwargs_never_carry_loader_arguments(tmp_path, capsys):
    file = tiny_weights(tmp_path / 'w.safetensors')
    argv = ['convert', str(file), str(tmp_path / 'o.safetensors'), '--model-kwargs', 'pretrained=True']
    assert main(argv) == 2
    assert 'pretrained is a loader argument, not a model argument' in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # argparse's usage error
        main(['convert', str(file), str(tmp_path / 'o.safetensors'), '--model-kwargs', 'embed_dim'])
    assert exit_.value.code == 2
    assert "expected KEY=VALUE, got 'embed_dim'" in capsys.readouterr().err


def test_eval_takes_a_released_checkpoint(tmp_path, capsys):
    """`eval` accepts every source `predict` accepts: here a torch training dict without metadata."""
    model = timm.create_model('boat_swin_nano_32', num_classes=10, **TINY)
    torch.save({'model': model.state_dict()}, tmp_path / 'ckpt.pth')
    flags = ['--model', 'boat_swin_nano_32', '--model-kwargs', *(f'{k}={v}' for k, v in TINY.items())]
    argv = ['eval', '--weights', str(tmp_path / 'ckpt.pth'), '--data', 'digits', '--json', '--workers', '0']
    assert main(argv + flags) == 0
    result = json.loads(capsys.readouterr().out)
    assert result['model'] == 'boat_swin_nano_32' and result['images'] == 360
