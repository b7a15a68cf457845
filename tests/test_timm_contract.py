"""What timm's own model test suite checks (forward, backward, default cfgs, features, intermediates), run on the
registered models at their default configuration (tiny variants and the nano model, to keep CI fast)."""

import math

import pytest
import timm
import torch

import boatvit  # noqa: F401

NAMES = ['boat_swin_tiny_224', 'boat_cswin_tiny_224', 'boat_swin_nano_32']


def test_registered_names():
    names = set(timm.list_models('boat_*'))
    assert {'boat_swin_tiny_224', 'boat_swin_small_224', 'boat_swin_base_224', 'boat_cswin_tiny_224',
            'boat_cswin_small_224', 'boat_cswin_base_224', 'boat_swin_nano_32'} <= names


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
    traced = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                      eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)
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
