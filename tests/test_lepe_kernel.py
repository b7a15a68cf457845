"""The CPU kernel that adds FSLA's LePE term to its attention output in inference (boatvit/csrc/lepe_cpu.cpp, the
operator ``boatvit::fused_lepe``): against the depthwise conv, where FeatureSpaceAttention takes it and where not,
its arguments and its operator registration."""

import pytest
import torch
import torch.nn.functional as F

import boatvit.kernels as kernels
from boatvit import FeatureSpaceAttention
from boatvit.kernels import cpu_kernels


def _inputs(B, H, W, heads, d, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    C = heads * d
    qkv = torch.randn(B, H * W, 3, heads, d, generator=g, dtype=torch.float64)
    out = torch.randn(B, H * W, C, generator=g, dtype=torch.float64)
    weight = torch.randn(C, 1, 3, 3, generator=g, dtype=torch.float64)
    shift = torch.randn(C, generator=g, dtype=torch.float64) if bias else None
    return qkv.to(dtype), out.to(dtype), weight, shift


def _by_conv(out, qkv, weight, bias, H, W):
    """out + the conv of V, in float64."""
    B, N, _, heads, d = qkv.shape
    v = qkv[:, :, 2].double().reshape(B, H, W, heads * d).permute(0, 3, 1, 2)
    lepe = F.conv2d(v, weight.double(), None if bias is None else bias.double(), padding=1, groups=heads * d)
    return out.double() + lepe.permute(0, 2, 3, 1).reshape(B, N, heads * d)


GRIDS = [
    (2, 56, 56, 3, 32),  # BOAT-Swin stage 1
    (1, 5, 7, 3, 8),  # not square; 24 channels, no multiple of a 16-lane vector
    (3, 1, 9, 2, 10),  # one row: every tap above and below is padding
    (2, 6, 1, 1, 20),  # one column
    (1, 1, 1, 1, 1),  # one token, one channel
]


@pytest.mark.parametrize('grid', GRIDS)
@pytest.mark.parametrize('bias', [True, False])
def test_equals_the_conv_in_float64_and_float32(grid, bias):
    B, H, W, heads, d = grid
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        qkv, out, weight, shift = _inputs(B, H, W, heads, d, dtype, bias=bias)
        # the weight and bias in float32 (a model's parameters) for float32 inputs, float64 for float64
        weight, shift = weight.to(dtype), None if shift is None else shift.to(dtype)
        got = torch.ops.boatvit.fused_lepe(out, qkv, weight, shift, H, W, True)
        assert got.dtype == dtype and got.shape == out.shape
        torch.testing.assert_close(
            got.double(), _by_conv(out, qkv, weight, shift, H, W), rtol=tolerance, atol=tolerance
        )


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_is_rounded_once(dtype):
    """bf16/fp16 out and qkv with float32 parameters (CPU autocast): the sum is taken in float32 and rounded once,
    so it lies within half a unit of its dtype's last place of the exact sum of the same inputs (the conv route
    rounds the conv's output and then the sum)."""
    B, H, W, heads, d = 2, 14, 14, 4, 32
    qkv, out, weight, shift = _inputs(B, H, W, heads, d, dtype, seed=1)
    weight, shift = weight.float(), shift.float()
    got = torch.ops.boatvit.fused_lepe(out, qkv, weight, shift, H, W, True)
    exact = _by_conv(out, qkv, weight, shift, H, W)
    assert got.dtype == dtype
    # half an ulp of the result, plus float32's rounding of the nine products
    bound = exact.abs() * torch.finfo(dtype).eps / 2 + 1e-5 * (1 + exact.abs())
    assert ((got.double() - exact).abs() <= bound).all()


def _count_kernel_calls(monkeypatch) -> list:
    calls = []
    loaded = cpu_kernels(required=True)

    def counted(*args):
        calls.append(args)
        return loaded.add_lepe(*args)

    monkeypatch.setattr(kernels, '_loaded', loaded._replace(add_lepe=counted))
    return calls


def test_the_layer_takes_it_in_cpu_inference_only(monkeypatch):
    """FeatureSpaceAttention adds its LePE by the kernel where autograd records nothing, the same output as the
    conv route (float64: to rounding); while autograd records, with the 'torch' backend, and in exported graphs the
    conv runs."""
    calls = _count_kernel_calls(monkeypatch)
    torch.manual_seed(0)
    layer = FeatureSpaceAttention(24, 3).double().eval()
    x = torch.randn(2, 10 * 15, 24, dtype=torch.float64)
    by_conv = layer(x, (10, 15))  # parameters that require grad: autograd records, the conv runs
    assert not calls and by_conv.requires_grad
    with torch.no_grad():
        fused = layer(x, (10, 15))
    assert len(calls) == 1
    torch.testing.assert_close(fused, by_conv.detach(), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        FeatureSpaceAttention(24, 3, backend='torch').double().eval()(x, (10, 15))
    layer.requires_grad_(False)
    layer(x, (10, 15))  # nothing requires grad: nothing to record
    assert len(calls) == 2


def test_the_layer_under_cpu_autocast_is_within_rounding_of_the_conv_route():
    torch.manual_seed(0)
    layer = FeatureSpaceAttention(64, 2).eval()
    x = torch.randn(2, 28 * 28, 64)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        by_conv = layer(x, (28, 28))
        with torch.no_grad():
            fused = layer(x, (28, 28))
    assert fused.dtype == by_conv.dtype == torch.bfloat16
    # the same clusters and attention; the LePE's sum rounded once instead of twice
    torch.testing.assert_close(fused.float(), by_conv.detach().float(), rtol=0.02, atol=0.02)


def test_kernel_checks_its_arguments():
    qkv, out, weight, shift = _inputs(1, 4, 5, 2, 8, torch.float32)
    weight, shift = weight.float(), shift.float()
    op = cpu_kernels(required=True).add_lepe
    with pytest.raises(RuntimeError, match='H x W grid must hold the N tokens'):
        op(out, qkv, weight, shift, 5, 5)
    with pytest.raises(RuntimeError, match=r'weight must be the depthwise 3x3 kernel \(C, 1, 3, 3\)'):
        op(out, qkv, weight[:, :, :2], shift, 4, 5)
    with pytest.raises(RuntimeError, match=r'out must be a contiguous CPU tensor \(B, N, heads \* head_dim\)'):
        op(out.double(), qkv, weight, shift, 4, 5)
    with pytest.raises(RuntimeError, match=r'bias must be \(C,\)'):
        op(out, qkv, weight, shift[:3], 4, 5)
    with pytest.raises(RuntimeError, match=r'qkv must be a contiguous CPU tensor \(B, N, 3, heads, head_dim\)'):
        op(out, qkv.transpose(1, 2), weight, shift, 4, 5)


@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16])
def test_operator_passes_opcheck(dtype):
    """``boatvit::fused_lepe`` (what compiled inference graphs hold): its fake implementation, schema and dispatch,
    by torch.library.opcheck."""
    qkv, out, weight, shift = _inputs(2, 6, 7, 2, 16, dtype)
    torch.library.opcheck(torch.ops.boatvit.fused_lepe.default, (out, qkv, weight.float(), shift.float(), 6, 7, True))


def test_a_failed_build_adds_the_lepe_by_the_conv(kernels_fail_to_build):
    """Where the kernels cannot be built the layer's inference still adds its LePE (by the conv, after the one
    warning), in float32 and under CPU autocast, as the PyTorch route does; backend 'kernel' refuses by name."""
    torch.manual_seed(0)
    layer = FeatureSpaceAttention(24, 3).eval()
    reference = FeatureSpaceAttention(24, 3, backend='torch').eval()
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 10 * 15, 24)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match='could not build its CPU kernels'):
            fallback = layer(x, (10, 15))
        torch.testing.assert_close(fallback, reference(x, (10, 15)), rtol=1e-6, atol=1e-6)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            torch.testing.assert_close(layer(x, (10, 15)), reference(x, (10, 15)), rtol=0.02, atol=0.02)
    qkv, out, weight, _ = _inputs(1, 2, 2, 1, 4, torch.float32)
    with pytest.raises(RuntimeError, match="backend 'kernel'.*could not be built"):
        torch.ops.boatvit.fused_lepe(out, qkv, weight.float(), None, 2, 2, True)
