"""What timm's own model test suite checks (forward, backward, default cfgs, features, intermediates), run on the
registered models at their default configuration (tiny variants and the nano model, to keep CI fast)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import timm
import torch

import boatvit

NAMES = ['boat_swin_tiny_224', 'boat_cswin_tiny_224', 'boat_swin_nano_32', 'boat_swin_nano_convstem_32']


def test_registered_names():
    names = set(timm.list_models('boat_*'))
    assert {
        'boat_swin_tiny_224',
        'boat_swin_small_224',
        'boat_swin_base_224',
        'boat_cswin_tiny_224',
        'boat_cswin_small_224',
        'boat_cswin_base_224',
        'boat_swin_nano_32',
        'boat_swin_nano_convstem_32',
    } <= names


@pytest.mark.slow
@pytest.mark.parametrize('name', NAMES)
def test_timm_forward_backward_and_cfg(name):
    model = timm.create_model(name, num_classes=42).train()
    cfg = model.pretrained_cfg
    x = torch.randn(2, *cfg['input_size'])
    out = model(x)
    assert out.shape == (2, 42) and not torch.isnan(out).any()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f'no gradient for {missing}'

    model.eval()
    x = x[:1]
    state = model.state_dict()
    assert cfg['classifier'] + '.weight' in state and cfg['first_conv'] + '.weight' in state
    with torch.no_grad():
        feats = model.forward_features(x)  # NHWC, as output_fmt says
        assert model.output_fmt == 'NHWC'
        assert feats.shape[1:3] == cfg['pool_size'] and feats.shape[-1] == model.num_features
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0 and model(x).shape == pre.shape
        model.reset_classifier(0, '')
        assert model(x).shape[1:3] == cfg['pool_size']
        headless = timm.create_model(name, num_classes=0, global_pool='').eval()
        assert headless(x).shape[1:3] == cfg['pool_size']


@pytest.mark.slow
@pytest.mark.parametrize('name', NAMES)
def test_timm_features_and_intermediates(name):
    backbone = timm.create_model(name, features_only=True).eval()
    input_size = backbone.pretrained_cfg['input_size']
    x = torch.randn(1, *input_size)
    channels, reductions = backbone.feature_info.channels(), backbone.feature_info.reduction()
    assert len(channels) == 4
    with torch.no_grad():
        for c, r, o in zip(channels, reductions, backbone(x)):
            assert o.shape[1] == c  # NCHW
            assert o.shape[2] <= math.ceil(input_size[1] / r) + 1 and o.shape[3] <= math.ceil(input_size[2] / r) + 1

    model = timm.create_model(name).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, output_fmt='NCHW')
        assert [o.shape[1] for o in inter] == info.channels()
        torch.testing.assert_close(final, model.forward_features(x))
        model.set_grad_checkpointing()
        torch.testing.assert_close(model.forward_intermediates(x)[0], final, rtol=1e-4, atol=1e-5)


REDUCED = {
    'boat_swin_tiny_224': dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), num_classes=5),
    'boat_cswin_tiny_224': dict(embed_dim=16, depths=(1, 2, 1, 1), num_heads=(2, 2, 4, 4), num_classes=5),
}


@pytest.mark.parametrize('name', sorted(REDUCED))
def test_fx_trace_matches_eager_forward_and_backward(name):
    """timm's FX path (torchvision's feature extractor with timm's notrace leaves), as timm's own model tests run it:
    the clustering and the stripe padding are leaves, everything else is traced."""
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model = timm.create_model(name, **REDUCED[name])
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    traced = create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs
    )
    x = torch.randn(2, 3, 224, 224)
    model.eval()
    traced.eval()
    with torch.no_grad():
        torch.testing.assert_close(next(iter(traced(x).values())), model(x), rtol=0, atol=0)
    traced.train()
    next(iter(traced(x).values())).mean().backward()
    missing = [n for n, p in traced.named_parameters() if p.grad is None]
    assert not missing, f'no gradient for {missing}'


@pytest.mark.parametrize('name', sorted(REDUCED))
def test_fx_features_only(name):
    backbone = timm.create_model(name, features_only=True, feature_cls='fx', **REDUCED[name]).eval()
    with torch.no_grad():
        shapes = [tuple(f.shape) for f in backbone(torch.randn(1, 3, 224, 224))]
    assert shapes == [(1, 56 // 2**i, 56 // 2**i, 16 * 2**i) for i in range(4)]  # stage outputs, NHWC


@pytest.mark.parametrize('name', sorted(REDUCED))
def test_output_stride_32_only(name):
    """Segmentation libraries (smp's DeepLabV3+) pass output_stride; BOAT, like timm's models without dilation,
    takes 32 and refuses the others by name."""
    assert timm.create_model(name, output_stride=32, **REDUCED[name]).feature_info[-1]['reduction'] == 32
    for stride in (8, 16):
        with pytest.raises(ValueError, match='output_stride 32 only'):
            timm.create_model(name, output_stride=stride, **REDUCED[name])


@pytest.mark.parametrize('name', sorted(REDUCED))
def test_fixed_input_size_as_timm_reads_it(name):
    """timm derives fixed_input_size from the model (BOAT-Swin: patch_embed.strict_img_size) for its data config and
    its hub export: a model built for one size says so, a dynamic one does not."""
    from timm.data.model_config import resolve_input_data_config
    from timm.models._input import get_model_input_config

    fixed = timm.create_model(name, img_size=(96, 128), **REDUCED[name])
    assert get_model_input_config(fixed)['fixed_input_size'] is True
    assert fixed.pretrained_cfg['fixed_input_size'] is True
    assert resolve_input_data_config(fixed)['input_size'] == (3, 96, 128)  # what save_for_hf writes
    dynamic = timm.create_model(name, dynamic_img_size=True, **REDUCED[name])
    assert get_model_input_config(dynamic)['fixed_input_size'] is False
    assert dynamic.pretrained_cfg['fixed_input_size'] is False


@pytest.mark.parametrize('name', sorted(REDUCED))
def test_set_input_size_survives_save_for_hf_and_local_dir(name, tmp_path):
    """A model resized with set_input_size is exported by timm at its new size (and, for BOAT-Swin, its new windows)
    and reloads from the folder at that size with the same logits."""
    torch.manual_seed(0)
    model = timm.create_model(name, **REDUCED[name]).eval()
    model.set_input_size(img_size=(160, 192))
    timm.models.save_for_hf(model, tmp_path)
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['model_args']['img_size'] == [160, 192]
    assert config['pretrained_cfg']['input_size'] == [3, 160, 192]
    assert config['pretrained_cfg']['fixed_input_size'] is True
    reloaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert reloaded.img_size == (160, 192)
    assert reloaded.pretrained_cfg['input_size'] == (3, 160, 192)
    if name.startswith('boat_swin'):
        assert reloaded.layers[0].blocks[0].attn.window_size == model.layers[0].blocks[0].attn.window_size == (5, 6)
    x = torch.randn(2, 3, 160, 192)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match='built for 160x192'):
        reloaded(torch.randn(1, 3, 224, 224))


def test_torch_hub_loads_every_registered_model_from_the_repo():
    repo = Path(__file__).resolve().parents[1]
    # what torch.hub.list would show (it only takes GitHub repositories): the public callables of hubconf.py
    spec = importlib.util.spec_from_file_location('boatvit_hubconf', repo / 'hubconf.py')
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert hubconf.dependencies == ['torch', 'timm']
    entries = sorted(n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith('_'))
    assert entries == sorted(timm.list_models('boat_*'))
    for name in entries:  # reduced widths: the entry point, not the size, is under test
        model = torch.hub.load(
            str(repo),
            name,
            source='local',
            trust_repo=True,
            embed_dim=16,
            depths=(1, 1, 1, 1),
            num_heads=(2, 2, 4, 4),
            num_classes=3,
        )
        assert isinstance(model, boatvit.models.BoatTransformer) and model.num_classes == 3
        assert model.pretrained_cfg['architecture'] == name
