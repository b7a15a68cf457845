"""The timm contract and the reference numbers, for both families."""

import pytest
import timm
import torch

import boatvit

from full_size import REFERENCE_PARAMS
from reduced_models import NUM_CLASSES, reduced_kwargs

CLOSE = dict(rtol=1e-10, atol=1e-10)


def small_model(family, **kwargs):
    cls = boatvit.BoatSwinTransformer if family == 'swin' else boatvit.BoatCSWinTransformer
    return cls(**reduced_kwargs(family, num_classes=NUM_CLASSES, drop_path_rate=0.0, **kwargs))


@pytest.mark.parametrize('name', REFERENCE_PARAMS)
def test_default_cfg(name):
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.paper_ids == 'arXiv:2201.13027'
    assert cfg.origin_url == 'https://github.com/mahaoyuHKU/pytorch-boat'
    assert cfg.input_size == (3, 224, 224) and cfg.classifier == 'head.fc' and cfg.first_conv == 'patch_embed.proj'


def test_fixture_logits_and_stages(reference_fixture):
    model = reference_fixture.build()
    t = reference_fixture.tensors
    with torch.no_grad():
        x = t['input'].double()
        torch.testing.assert_close(model(x), t['logits'], **CLOSE)
        stages = model.forward_intermediates(x, intermediates_only=True)
    assert len(stages) == 4
    for i, stage in enumerate(stages):
        reference_fixture.assert_matches(f'stages.{i}', stage.flatten(2).transpose(1, 2))


@pytest.mark.slow
def test_fixture_batch_independence(reference_fixture):
    """An image's output does not depend on its batch (the reference's single-cluster bug leaked across it)."""
    model = reference_fixture.build()
    x = reference_fixture.tensors['input'].double()
    x3 = torch.cat([x, x[:1].flip(-1)])
    with torch.no_grad():
        alone = torch.cat([model(x3[i : i + 1]) for i in range(3)])
        torch.testing.assert_close(model(x3[:2]), alone[:2], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model(x3), alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_backward_every_parameter_gets_a_finite_gradient(family):
    torch.manual_seed(0)
    model = small_model(family, attn_drop_rate=0.1).train()
    model(torch.randn(2, 3, 224, 224)).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_grad_checkpointing_gives_the_same_output_and_gradients(family):
    torch.manual_seed(0)
    model = small_model(family).double()
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    out = model(x)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out_ckpt = model(x)
    out_ckpt.sum().backward()
    torch.testing.assert_close(out_ckpt, out, rtol=1e-12, atol=1e-12)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_forward_features_head_and_intermediates(family):
    model = small_model(family).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (1, 7, 7, model.num_features)
        torch.testing.assert_close(model.forward_head(feats), model(x))
        assert model.forward_head(feats, pre_logits=True).shape == (1, model.num_features)
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, feats)
        assert [t.shape[1:] for t in inter] == [
            (info['num_chs'], 224 // info['reduction'], 224 // info['reduction']) for info in model.feature_info
        ]
        torch.testing.assert_close(model.norm(inter[-1].permute(0, 2, 3, 1)), feats)
        assert len(model.forward_intermediates(x, indices=2, intermediates_only=True)) == 2


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_reset_classifier_and_prune(family):
    model = small_model(family)
    model.reset_classifier(7)
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 7)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, model.num_features)
    kept = model.prune_intermediate_layers(indices=[0, 1])
    assert kept == [0, 1] and len(model.layers) == 2
    assert model.num_features == model.feature_info[1]['num_chs']


@pytest.mark.parametrize('name', ['boat_swin_tiny_224', 'boat_cswin_tiny_224'])
def test_create_model_overrides(name):
    swin = name.startswith('boat_swin')
    extra = dict(window_size=4) if swin else dict(split_size=(1, 2, 4, 4))
    model = timm.create_model(
        name,
        embed_dim=16,
        depths=(1, 2, 1, 1),
        num_heads=(2, 2, 4, 4),
        num_classes=3,
        drop_path_rate=0.2,
        img_size=128,
        **extra,
    )
    assert model.layers[0].blocks[0].norm1.normalized_shape == (16,)
    assert [len(stage.blocks) for stage in model.layers] == [1, 2, 1, 1]
    assert model.layers[1].blocks[1].attn.num_heads == 2
    assert model.head.fc.out_features == 3
    block = model.layers[3].blocks[0]
    assert block.drop_path1.drop_prob == block.drop_path2.drop_prob == pytest.approx(0.2)
    # the reference applies drop-path to BOAT-CSWin's FSLA branch, not to BOAT-Swin's
    fsla_block = model.layers[1].blocks[1] if swin else block
    assert fsla_block.fsla is not None
    assert isinstance(fsla_block.drop_path_fsla, torch.nn.Identity) == swin
    if swin:
        assert model.layers[0].blocks[0].attn.window_size == (4, 4)
    else:
        assert model.layers[2].blocks[0].attn.split_size == 4
    assert model(torch.randn(1, 3, 128, 128)).shape == (1, 3)


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_group_matcher_and_no_weight_decay(family):
    model = small_model(family)
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))
    nwd = model.no_weight_decay()
    assert all('relative_position_bias_table' in n for n in nwd)
    assert bool(nwd) == (family == 'swin')


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_bad_input_raises_clear_errors(family):
    model = small_model(family)
    with pytest.raises(ValueError, match='input channels'):
        model(torch.randn(1, 1, 224, 224))
    with pytest.raises(ValueError, match='4-D'):
        model(torch.randn(224, 224))
    with pytest.raises(ValueError, match='floating-point'):
        model(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    with pytest.raises(ValueError, match='built for 224x224.*dynamic_img_size=True'):
        model(torch.randn(1, 3, 200, 240))
    with pytest.raises(ValueError, match='empty batch'):
        model(torch.randn(0, 3, 224, 224))
    with pytest.raises(TypeError, match='torch.Tensor'):
        model([1, 2, 3])
    with pytest.raises(ValueError, match='img_size'):
        small_model(family, img_size=16)
    with pytest.raises(ValueError, match='fsla_blocks'):
        small_model(family, fsla_blocks='sometimes')


def test_conv_stem_keeps_the_patch_grid_and_the_model_around_it():
    patch = timm.create_model('boat_swin_nano_32', dynamic_img_size=True).eval()
    conv = timm.create_model('boat_swin_nano_convstem_32', dynamic_img_size=True).eval()
    # only the stem's convolution differs: its one patch-sized conv becomes 3x3 convs with BatchNorm
    differ = set(patch.state_dict()) ^ set(conv.state_dict())
    assert differ and all(k.startswith('patch_embed.proj.') for k in differ)
    assert conv.pretrained_cfg['first_conv'] + '.weight' in conv.state_dict()
    x = torch.randn(3, 3, 45, 37)  # odd sides: padded to the patch, as PatchEmbed pads
    with torch.no_grad():
        assert conv.forward_features(x).shape == patch.forward_features(x).shape
        # BatchNorm in eval mode uses its running statistics: an image's logits do not depend on its batch
        torch.testing.assert_close(conv(x[1:2]), conv(x)[1:2], rtol=1e-5, atol=1e-5)
    for patch_size, grid in ((2, 16), (4, 8)):
        model = timm.create_model('boat_swin_nano_32', stem='conv', patch_size=patch_size, window_size=2)
        halvings = [m.stride for m in model.patch_embed.proj if isinstance(m, torch.nn.Conv2d)][1:]
        assert halvings == [(2, 2)] * (patch_size.bit_length() - 1)
        assert model.patch_embed(torch.randn(1, 3, 32, 32)).shape == (1, grid, grid, 32)
    with pytest.raises(ValueError, match="stem must be 'patch' or 'conv'"):
        timm.create_model('boat_swin_nano_32', stem='convolution')
    with pytest.raises(ValueError, match='power of two'):
        timm.create_model('boat_swin_nano_32', stem='conv', patch_size=3)
    with pytest.raises(ValueError, match="model's weights are torch.float64"):
        conv.double()(x)
