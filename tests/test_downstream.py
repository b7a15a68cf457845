"""BOAT inside segmentation_models_pytorch (timm universal encoders, ``tu-<name>``), reduced widths; FLOP counters."""

import math
import warnings

import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import boatvit  # noqa: F401  (registers the models)

from reduced_models import FAMILIES, reduced_kwargs

smp = pytest.importorskip('segmentation_models_pytorch', reason='the test extra installs segmentation_models_pytorch')

ENCODER_KWARGS = {f'tu-{name}': reduced_kwargs(name) for name in FAMILIES.values()}


def _segmenter(cls, encoder_name: str, **kwargs):
    decoder = dict(decoder_channels=(32, 16, 16, 8, 8)) if cls is smp.Unet else dict(decoder_channels=32)
    # smp forwards unknown kwargs to timm.create_model
    return cls(
        encoder_name=encoder_name,
        encoder_weights=None,
        classes=2,
        dynamic_img_size=True,
        **decoder,
        **ENCODER_KWARGS[encoder_name],
        **kwargs,
    )


def _square_task(height: int, width: int):
    """A tiny synthetic task: segment a bright rectangle from noise."""
    g = torch.Generator().manual_seed(0)
    images = 0.1 * torch.randn(2, 3, height, width, generator=g)
    masks = torch.zeros(2, height, width, dtype=torch.long)
    masks[0, 4:20, 8:30] = 1
    masks[1, 10:28, 20:44] = 1
    images += masks[:, None].float()
    return images, masks


@pytest.mark.parametrize('cls', ['Unet', 'UPerNet'])
@pytest.mark.parametrize('encoder_name', list(ENCODER_KWARGS))
def test_segmentation_trains_at_a_non_square_size(cls, encoder_name):
    torch.manual_seed(0)
    model = _segmenter(getattr(smp, cls), encoder_name)
    width = ENCODER_KWARGS[encoder_name]['embed_dim']
    # smp's empty stride-2 slot before BOAT's stages at strides 4..32
    assert model.encoder.out_channels == [3, 0, width, 2 * width, 4 * width, 8 * width]
    images, masks = _square_task(32, 64)  # UPerNet needs multiples of 32 (smp checks), Unet does not
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        logits = model(images)
        assert logits.shape == (2, 2, 32, 64)
        loss = torch.nn.functional.cross_entropy(logits, masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_unet_takes_sizes_that_are_not_multiples_of_32():
    model = _segmenter(smp.Unet, 'tu-boat_swin_tiny_224').eval()
    features = model.encoder(torch.randn(1, 3, 70, 100))
    # smp's encoder list: the image, an empty stride-2 map, then BOAT's NCHW stage maps at strides 4..32
    width = ENCODER_KWARGS['tu-boat_swin_tiny_224']['embed_dim']
    assert [tuple(f.shape[1:]) for f in features] == [
        (3, 70, 100),
        (0, 35, 50),
        (width, 18, 25),
        (2 * width, 9, 13),
        (4 * width, 5, 7),
        (8 * width, 3, 4),
    ]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 70, 100)).shape == (1, 2, 70, 100)


def test_nano_needs_encoder_depth_4():
    # boat_swin_nano_32 has patch size 2: stage strides 2, 4, 8, 16, which smp reads as a 'traditional' encoder and
    # asks for a fifth stage at stride 32; encoder_depth=4 asks for the four stages it has
    with pytest.raises(AssertionError, match='feature index 4 is out of range'):
        smp.Unet(encoder_name='tu-boat_swin_nano_32', encoder_weights=None, classes=2)
    model = smp.Unet(
        encoder_name='tu-boat_swin_nano_32',
        encoder_weights=None,
        classes=2,
        encoder_depth=4,
        decoder_channels=(32, 16, 16, 8),
        dynamic_img_size=True,
    )
    assert model(torch.randn(2, 3, 32, 48)).shape == (2, 2, 32, 48)


# FLOP counting (docs/BACKBONES.md, "Counting FLOPs")


def _gmacs(model, x, grad: bool = False, math_attention: bool = True) -> float:
    """torch's FlopCounterMode total over 2 (one multiply-add counted once). The math SDPA backend runs attention as
    bmm's the counter sees; the CPU flash kernel has no flop formula in torch 2.14."""
    backends = [SDPBackend.MATH] if math_attention else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    with torch.set_grad_enabled(grad), sdpa_kernel(backends), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2e9


def test_flop_counter_gives_the_readme_figure_with_the_pytorch_clustering():
    model = timm.create_model('boat_swin_tiny_224', fsla_backend='torch').eval()
    assert abs(_gmacs(model, torch.randn(1, 3, 224, 224)) - 5.20) < 0.01  # README: 5.20 (reference: 5.197)


def test_what_the_flop_counter_cannot_see():
    kwargs = ENCODER_KWARGS['tu-boat_swin_tiny_224']
    model = timm.create_model('boat_swin_tiny_224', fsla_backend='torch', **kwargs).eval()
    x = torch.randn(1, 3, 224, 224)
    full = _gmacs(model, x)
    # the FSLA attention runs through the CPU flash kernel while autograd records: not counted
    assert _gmacs(model, x, grad=True, math_attention=False) < full - 1e-4
    # the products of boatvit's CPU kernels (clustering, cluster attention) are not torch ops: not counted
    with_kernel = timm.create_model('boat_swin_tiny_224', fsla_backend='kernel', **kwargs).eval()
    with_kernel.load_state_dict(model.state_dict())
    assert _gmacs(with_kernel, x) < full - 1e-5


# smp decoders that ask for another output stride (last: the one test that needs the models' output_stride check)


def test_deeplabv3plus_output_stride_is_a_clear_error():
    # NEEDS helper B1's models change (BOAT raises ValueError for output_stride != 32); fails before that merge
    with pytest.raises(ValueError, match='output_stride'):
        smp.DeepLabV3Plus(
            encoder_name='tu-boat_swin_tiny_224', encoder_weights=None, **ENCODER_KWARGS['tu-boat_swin_tiny_224']
        )


def _sdpa_macs(inputs, outputs):
    """fvcore handle for ``aten::scaled_dot_product_attention``: L * S * (d + dv) multiply-adds per (batch, head)."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(i) for i in inputs[:3])
    return math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


@pytest.mark.slow
@pytest.mark.parametrize('name, gmacs', [('boat_swin_tiny_224', 5.219), ('boat_cswin_tiny_224', 5.220)])
def test_fvcore_counts_the_reference_figures(name, gmacs):
    """fvcore traces BOAT (torch.jit.trace) and, with the SDPA handle of docs/BACKBONES.md and the PyTorch
    clustering, gives the reference's fvcore totals (its FlopCounterMode figure plus the LayerNorms)."""
    fvcore_nn = pytest.importorskip('fvcore.nn', reason='the integrations extra installs fvcore')
    model = timm.create_model(name, fsla_backend='torch').eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        counter = fvcore_nn.FlopCountAnalysis(model, torch.randn(1, 3, 224, 224))
        counter.set_op_handle('aten::scaled_dot_product_attention', _sdpa_macs)
        counter.unsupported_ops_warnings(False)
        counter.uncalled_modules_warnings(False)
        assert abs(counter.total() / 1e9 - gmacs) < 0.005
