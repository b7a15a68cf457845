"""boatvit.hub: timm's hub layout, loaded back by timm (``local-dir:``) and transformers, in and out of process."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import boatvit  # noqa: F401  (registers the models)
from boatvit.hub import HUB_NOTE, save_hub_format

from reduced_models import FAMILIES, reduced_kwargs

transformers = pytest.importorskip('transformers', reason='the test extra installs transformers')

SMALL = {name: reduced_kwargs(name) for name in FAMILIES.values()}
LABELS = ['cat', 'dog', 'eel']


@pytest.fixture(scope='module', params=list(SMALL))
def saved(request, tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model(request.param, num_classes=3, **SMALL[request.param]).eval()
    directory = save_hub_format(model, tmp_path_factory.mktemp('hub') / request.param, label_names=LABELS)
    return model, directory


def test_config_holds_the_architecture_args_labels_and_data_config(saved):
    model, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == ['config.json', 'model.safetensors']
    config = json.loads((directory / 'config.json').read_text())
    assert config['architecture'] == model.pretrained_cfg['architecture']
    assert config['num_classes'] == 3 and config['label_names'] == LABELS
    args = config['model_args']
    assert {
        k: tuple(v) if isinstance(v, list) else v for k, v in args.items() if k in SMALL[config['architecture']]
    } == SMALL[config['architecture']]
    assert not {'pretrained', 'pretrained_cfg_overlay', 'num_classes', 'drop_path_rate'} & set(args)
    cfg = config['pretrained_cfg']
    assert cfg['input_size'] == [3, 224, 224] and cfg['num_classes'] == 3
    assert cfg['mean'] == list(model.pretrained_cfg['mean']) and cfg['std'] == list(model.pretrained_cfg['std'])
    assert cfg['crop_pct'] == model.pretrained_cfg['crop_pct'] and cfg['interpolation'] == 'bicubic'
    assert cfg['notes'] == [HUB_NOTE]


def test_timm_local_dir_gives_the_same_logits(saved):
    model, directory = saved
    loaded = timm.create_model(f'local-dir:{directory}', pretrained=True).eval()
    assert loaded.pretrained_cfg['label_names'] == LABELS
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_transformers_gives_the_same_logits_and_preprocessing(saved):
    model, directory = saved
    hf_model = transformers.AutoModelForImageClassification.from_pretrained(directory).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(directory)
    assert hf_model.config.id2label == dict(enumerate(LABELS))
    image = Image.fromarray((np.random.default_rng(0).random((200, 300, 3)) * 255).astype('uint8'))
    pixels = processor(image, return_tensors='pt')['pixel_values']
    # timm's own eval transform for the model is the oracle for the processor
    expected = timm.data.create_transform(**timm.data.resolve_data_config(model=model))(image)[None]
    torch.testing.assert_close(pixels, expected)
    with torch.no_grad():
        # transformers assigns the loaded tensors, which drops the channels-last layout of the LePE conv weights
        # (LePEConv); the conv then runs another kernel, equal up to float32 rounding
        torch.testing.assert_close(hf_model(pixels).logits, model(pixels), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('saved', ['boat_swin_tiny_224'], indirect=True)  # one family: a fresh process costs ~10 s
def test_a_fresh_process_needs_the_one_import_line(saved):
    model, directory = saved
    x = torch.randn(1, 3, 224, 224)
    torch.save(dict(x=x, logits=model(x).detach()), directory.parent / f'{directory.name}.pt')
    script = textwrap.dedent(f"""
        import timm, torch, transformers
        d = {str(directory)!r}
        try:
            timm.create_model('local-dir:' + d, pretrained=True)
        except RuntimeError as e:
            print('timm:', e)
        try:
            transformers.AutoModelForImageClassification.from_pretrained(d)
        except ImportError as e:
            print('transformers:', e)
        import boatvit  # the one line
        ref = torch.load(d + '.pt')
        with torch.no_grad():
            a = timm.create_model('local-dir:' + d, pretrained=True).eval()(ref['x'])
            b = transformers.AutoModelForImageClassification.from_pretrained(d).eval()(ref['x']).logits
        print('max differences:', (a - ref['logits']).abs().max().item(), (b - ref['logits']).abs().max().item())
    """)
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f'timm: Unknown model ({model.pretrained_cfg["architecture"]})' in lines
    assert any(line.startswith('transformers:') and 'upgrade timm' in line for line in lines)
    differences = [float(v) for v in lines[-1].removeprefix('max differences:').split()]
    assert lines[-1].startswith('max differences:') and max(differences) < 1e-5, lines[-1]


def test_bad_arguments_say_what_to_do(tmp_path):
    model = timm.create_model('boat_swin_tiny_224', num_classes=3, **SMALL['boat_swin_tiny_224'])
    with pytest.raises(ValueError, match='label_names must be 3 strings'):
        save_hub_format(model, tmp_path / 'a', label_names=['cat', 'dog'])
    with pytest.raises(ValueError, match='made by timm.create_model'):
        save_hub_format(boatvit.BoatSwinTransformer(**SMALL['boat_swin_tiny_224']), tmp_path / 'b')
    with pytest.raises(ValueError, match='BOAT classifier'):
        save_hub_format(torch.nn.Linear(2, 2), tmp_path / 'c')
    save_hub_format(model, tmp_path / 'd')
    with pytest.raises(FileExistsError, match='overwrite=True'):
        save_hub_format(model, tmp_path / 'd')
    save_hub_format(model, tmp_path / 'd', overwrite=True)


def test_convert_hf_writes_a_runs_classes_and_data_config(tmp_path, capsys):
    """`boatvit convert WEIGHTS --hf DIR` carries what the weights record (class names, the data config of a
    fine-tuned run at another size) into the hub folder, and the folder loads with the same logits."""
    from boatvit import cli
    from boatvit.runs import save_weights

    name, kwargs = 'boat_swin_tiny_224', dict(SMALL['boat_swin_tiny_224'], img_size=160)
    torch.manual_seed(1)
    model = timm.create_model(name, num_classes=3, **kwargs).eval()
    data_config = {
        'input_size': (3, 160, 160),
        'interpolation': 'bilinear',
        'mean': (0.5, 0.5, 0.5),
        'std': (0.25, 0.25, 0.25),
        'crop_pct': 1.0,
        'crop_mode': 'center',
    }
    weights = tmp_path / 'best.safetensors'
    metadata = {'model': name, 'model_kwargs': kwargs, 'classes': LABELS, 'data_config': data_config}
    save_weights(weights, model.state_dict(), metadata)
    directory = tmp_path / 'hub'
    assert cli.main(['convert', str(weights), '--hf', str(directory)]) == 0
    assert '3 class names' in capsys.readouterr().out
    config = json.loads((directory / 'config.json').read_text())
    assert config['label_names'] == LABELS
    cfg = config['pretrained_cfg']
    assert cfg['input_size'] == [3, 160, 160] and cfg['mean'] == [0.5] * 3 and cfg['interpolation'] == 'bilinear'
    loaded = timm.create_model(f'local-dir:{directory}', pretrained=True).eval()
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # a second export into the same folder is refused unless asked for
    assert cli.main(['convert', str(weights), '--hf', str(directory)]) == 2
    assert '--overwrite' in capsys.readouterr().err
    assert cli.main(['convert', str(weights), '--hf', str(directory), '--overwrite']) == 0


def test_convert_needs_an_output(tmp_path, capsys):
    from boatvit import cli

    assert cli.main(['convert', str(tmp_path / 'x.pth')]) == 2
    assert 'nothing to write' in capsys.readouterr().err
