"""Any image size and batch (issue 4): non-square sizes, per-sample independence, backbone use, resizing."""

import math

import pytest
import timm
import torch

import boatvit
from boatvit.models.boat_cswin import stripe_attention
from boatvit.models.boat_swin import checkpoint_filter_fn

from reduced_models import FAMILIES, REDUCED, reduced

# (H, W): non-square; none gives 49 * 2^k tokens in stage 1 (e.g. 100x76 -> 25x19 = 475 Swin tokens: ghosts)
SIZES = [(100, 76), (64, 160), (131, 97)]


def small(family, **kwargs):
    return reduced(family, **dict(dict(num_classes=4, dynamic_img_size=True, drop_path_rate=0.0), **kwargs))


@pytest.mark.parametrize('family', ['swin', 'cswin'])
@pytest.mark.parametrize('size', SIZES)
def test_forward_backward_at_any_size(family, size):
    torch.manual_seed(0)
    model = small(family).train()
    x = torch.randn(2, 3, *size)
    out = model(x)
    assert out.shape == (2, 4) and torch.isfinite(out).all()
    out.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize('family', ['swin', 'cswin'])
@pytest.mark.parametrize('size', SIZES[:2])
def test_each_image_is_independent_of_its_batch(family, size):
    torch.manual_seed(1)
    model = small(family).double().eval()
    x = torch.randn(3, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
        for batch in (2, 3):
            torch.testing.assert_close(model(x[:batch]), alone[:batch], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_features_only_matches_forward_intermediates_and_features(family):
    torch.manual_seed(2)
    model = small(family).eval()
    name, args = FAMILIES[family], REDUCED[family]
    backbone = timm.create_model(name, features_only=True, out_indices=(1, 2, 3), dynamic_img_size=True, **args)
    missing, unexpected = backbone.model.load_state_dict(
        {k: v for k, v in model.state_dict().items() if k.startswith(('patch_embed', 'layers'))}, strict=False
    )
    assert not missing and not unexpected
    backbone.eval()
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        feats = backbone(x)
        torch.testing.assert_close(final, model.forward_features(x))
    assert backbone.feature_info.channels() == [32, 64, 128]
    assert backbone.feature_info.reduction() == [8, 16, 32]
    for f, i, r in zip(feats, inter[1:], [8, 16, 32]):
        torch.testing.assert_close(f, i)
        assert f.shape[2:] == (math.ceil(96 / r), math.ceil(160 / r))  # NCHW


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_feature_maps_are_nchw_with_the_stated_channels_and_strides(family):
    """What detection and segmentation libraries are handed, at a size that is no multiple of 32: every map NCHW
    (the NHWC stage output, permuted), with the channels feature_info states and ceil(size / reduction) cells."""
    torch.manual_seed(3)
    name, args = FAMILIES[family], REDUCED[family]
    backbone = timm.create_model(name, features_only=True, dynamic_img_size=True, **args).eval()
    x = torch.randn(2, 3, 200, 260)
    with torch.no_grad():
        feats = backbone(x)
        nchw = backbone.model.forward_intermediates(x, intermediates_only=True)
        nhwc = backbone.model.forward_intermediates(x, intermediates_only=True, output_fmt='NHWC')
    info = backbone.feature_info
    assert len(feats) == len(nchw) == len(nhwc) == 4
    for f, a, b, c, r in zip(feats, nchw, nhwc, info.channels(), info.reduction()):
        assert f.shape == (2, c, math.ceil(200 / r), math.ceil(260 / r))
        assert f.is_contiguous()
        torch.testing.assert_close(f, a, rtol=0, atol=0)
        torch.testing.assert_close(f, b.permute(0, 3, 1, 2), rtol=0, atol=0)


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_too_small_images_name_the_minimum(family):
    model = small(family)
    with pytest.raises(ValueError, match='at least 32'):
        model(torch.randn(1, 3, 31, 64))


def test_fixed_input_size_is_reported_truthfully():
    name, args = FAMILIES['swin'], REDUCED['swin']
    assert timm.create_model(name, **args).pretrained_cfg['fixed_input_size'] is True
    assert timm.create_model(name, dynamic_img_size=True, **args).pretrained_cfg['fixed_input_size'] is False


def test_swin_stage4_has_fsla_exactly_when_larger_than_the_window():
    name, args = FAMILIES['swin'], REDUCED['swin']

    def stage4_fsla(img_size):
        return [b.fsla is not None for b in timm.create_model(name, img_size=img_size, **args).layers[3].blocks]

    assert stage4_fsla(224) == [False, False]  # 7x7 stage = window: no shift, no FSLA (reference)
    assert stage4_fsla(448) == [False, True]


def test_swin_set_input_size_rescales_windows():
    name, args = FAMILIES['swin'], REDUCED['swin']
    model = timm.create_model(name, **args).eval()
    model.set_input_size(img_size=256)
    assert model.layers[0].blocks[0].attn.window_size == (8, 8)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 256, 256)).shape == (1, 1000)
    with pytest.raises(ValueError, match='built for 256x256'):
        model(torch.randn(1, 3, 224, 224))


def test_224_weights_load_into_a_384_model_with_larger_windows():
    name, args = FAMILIES['swin'], REDUCED['swin']
    source = timm.create_model(name, **args)
    target = timm.create_model(name, img_size=384, window_size=12, **args)
    state = checkpoint_filter_fn(source.state_dict(), target)
    table = state['layers.0.blocks.0.attn.relative_position_bias_table']
    assert table.shape == (23 * 23, 1)
    target.load_state_dict(state)
    with torch.no_grad():
        assert torch.isfinite(target(torch.randn(1, 3, 384, 384))).all()


def _stripes_one_by_one(q, k, v, width, heads, lepe):
    """Oracle: vertical stripes of ``width`` columns (the last one narrower), attention and LePE per stripe."""
    out = []
    for start in range(0, q.shape[2], width):
        cols = slice(start, start + width)
        qs, ks, vs = (t[:, :, cols] for t in (q, k, v))
        B, H, W, C = qs.shape
        d = C // heads
        split = [t.reshape(B, H * W, heads, d).transpose(1, 2) for t in (qs, ks, vs)]
        attn = torch.softmax(split[0] @ split[1].transpose(-1, -2) * d**-0.5, -1) @ split[2]
        pos = lepe(vs.permute(0, 3, 1, 2)).flatten(2).view(B, heads, d, H * W).transpose(-1, -2)
        out.append((attn + pos).transpose(1, 2).reshape(B, H, W, C))
    return torch.cat(out, dim=2)


def test_stripe_attention_pads_and_masks_like_narrower_stripes():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 11, 8, generator=g, dtype=torch.float64) for _ in range(3))
    lepe = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8).double()
    expected = _stripes_one_by_one(q, k, v, 4, 2, lepe)
    torch.testing.assert_close(stripe_attention(q, k, v, (9, 4), 2, lepe), expected, rtol=1e-12, atol=1e-12)
    # a horizontal stripe is the transposed problem
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out = stripe_attention(qt, kt, vt, (4, 9), 2, lepe)
    expected_t = _stripes_one_by_one(q, k, v, 4, 2, lambda x: lepe(x.transpose(-1, -2)).transpose(-1, -2))
    torch.testing.assert_close(out, expected_t.transpose(1, 2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('size', [(224, 224), (100, 76)])
def test_boat_swin_without_fsla_is_timm_swin(size):
    """With no FSLA branch BOAT-Swin is exactly Swin: timm's model is the oracle, weights shared."""
    torch.manual_seed(3)
    args = dict(
        embed_dim=16,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 2, 4),
        num_classes=4,
        drop_path_rate=0.0,
        dynamic_img_size=size != (224, 224),
    )
    swin = timm.create_model('swin_tiny_patch4_window7_224', **args).double().eval()
    boat = timm.create_model('boat_swin_tiny_224', fsla_blocks='none', **args).double().eval()
    boat.load_state_dict(swin.state_dict())
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(boat(x), swin(x), rtol=1e-12, atol=1e-12)


def test_reference_sizes_keep_the_reference_layout():
    for n in (3136, 784, 196, 49):
        layout = boatvit.cluster_layout(n)
        assert layout.num_ghosts == 0 and layout.cluster_size == 49
