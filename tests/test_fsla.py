import warnings

import pytest
import torch

from boatvit import FeatureSpaceAttention, feature_space_attention
from boatvit.fsla import LePEConv

from naive_fsla import naive_feature_space_attention


def _qkv(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize(
    'n, heads, scale',
    [
        (196, 2, None),  # 4 clusters of 49, no ghosts
        (392, 1, 1.0),  # 8 clusters
        (49, 2, None),  # a single cluster: no overlap
        (150, 2, None),  # ghosts: 3 real clusters of 75 padded to 2 x 75
        (257, 1, 0.3),  # ghosts spread over 4 clusters
        (20, 3, None),  # fewer tokens than a cluster
    ],
)
@pytest.mark.parametrize('recording', [False, True], ids=['inference', 'autograd'])
def test_matches_naive(n, heads, scale, recording, backend):
    """Both attention routes: matmul-softmax-matmul in CPU inference, SDPA while autograd records."""
    q, k, v = (t.requires_grad_(recording) for t in _qkv((2, heads, n, 8), n))
    out = feature_space_attention(q, k, v, scale=scale, backend=backend)
    expected = naive_feature_space_attention(q, k, v, scale=scale)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    'n, overlap',
    [
        (90, 3),  # 8 clusters of 12 slots, 6 of them with a ghost (both clusters of a pair, too)
        (80, 0),  # no overlap: each cluster attends to itself only
        (80, 9),  # the largest overlap a cluster of 10 allows
        (43, 5),  # 4 clusters of 11 slots, one ghost
    ],
)
@pytest.mark.parametrize('recording', [False, True], ids=['inference', 'autograd'])
def test_matches_naive_small_clusters_and_overlap(n, overlap, recording, backend):
    q, k, v = (t.requires_grad_(recording) for t in _qkv((1, 2, n, 4), 7))
    out = feature_space_attention(q, k, v, cluster_size=10, overlap=overlap, backend=backend)
    expected = naive_feature_space_attention(q, k, v, cluster_size=10, overlap=overlap)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_module_matches_naive_with_lepe_and_projection():
    torch.manual_seed(0)
    module = FeatureSpaceAttention(16, 2).double().eval()
    x = torch.randn(2, 10 * 13, 16, dtype=torch.float64)
    B, N, C = x.shape
    q, k, v = module.qkv(x).view(B, N, 3, 2, 8).permute(2, 0, 3, 1, 4)
    attn = naive_feature_space_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
    lepe = module.lepe(v.permute(0, 1, 3, 2).reshape(B, C, 10, 13)).flatten(2).transpose(1, 2)
    expected = module.proj(attn + lepe)
    torch.testing.assert_close(module(x, (10, 13)), expected, rtol=1e-12, atol=1e-12)


def test_fixture_output(reference_fixture, backend):
    info = reference_fixture.meta['first_fsla']
    module = FeatureSpaceAttention(info['dim'], info['num_heads'], scale=info['scale'], backend=backend)
    module = module.double().eval()
    module.load_state_dict(reference_fixture.first_fsla_weights())
    side = int(info['tokens'] ** 0.5)
    with torch.no_grad():
        out = module(reference_fixture.tensors['fsla.input'], (side, side))
    reference_fixture.assert_matches('fsla.output', out)


def test_attention_dropout_applies_in_both_routes():
    """``dropout_p`` is not dropped by the inference route: it zeroes attention weights, so outputs move."""
    q, k, v = _qkv((1, 2, 150, 4), 3)
    plain = feature_space_attention(q, k, v)
    for recording in (False, True):
        torch.manual_seed(0)
        dropped = feature_space_attention(*(t.requires_grad_(recording) for t in (q, k, v)), dropout_p=0.5)
        assert torch.isfinite(dropped).all()
        assert (dropped - plain).abs().max() > 1e-3
        q, k, v = (t.detach() for t in (q, k, v))


def test_gradients_reach_q_k_v():
    q, k, v = (t.requires_grad_() for t in _qkv((1, 2, 150, 4), 1))
    feature_space_attention(q, k, v).square().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_bad_input():
    module = FeatureSpaceAttention(8, 2)
    with pytest.raises(ValueError, match=r'\(B, N, 8\)'):
        module(torch.randn(2, 10, 4), (2, 5))
    with pytest.raises(ValueError, match='positions'):
        module(torch.randn(2, 10, 8), (3, 3))
    with pytest.raises(ValueError, match='divisible'):
        FeatureSpaceAttention(10, 3)
    with pytest.raises(ValueError, match='overlap'):
        FeatureSpaceAttention(8, 2, cluster_size=10, overlap=10)
    with pytest.raises(ValueError, match='same shape'):
        feature_space_attention(torch.randn(1, 1, 4, 2), torch.randn(1, 1, 5, 2), torch.randn(1, 1, 4, 2))


def test_factory_kwargs_build_on_the_device_and_dtype():
    """timm's ``device=``/``dtype=`` convention: every parameter is created there (the meta device builds nothing)."""
    meta = FeatureSpaceAttention(64, 2, device='meta', dtype=torch.float64)
    assert {(p.device.type, p.dtype) for p in meta.parameters()} == {('meta', torch.float64)}
    assert list(meta.state_dict()) == list(FeatureSpaceAttention(64, 2).state_dict())


class _OnGrid(torch.nn.Module):
    """A FeatureSpaceAttention on a fixed grid: ``torch.jit.trace`` takes tensors only."""

    def __init__(self, layer, size):
        super().__init__()
        self.layer, self.size = layer, size

    def forward(self, x):
        return self.layer(x, self.size)


@pytest.mark.parametrize('size', [(20, 20), (15, 26)], ids=['no-ghosts', 'ghosts'])
def test_torch_jit_trace_equals_eager(size):
    """fvcore counts FLOPs from a TorchScript trace: the trace is specialised to the token count (as a compiled
    graph is), and on another input of that size it gives the eager output. A trace records the PyTorch ops (the CPU
    kernels are left out of traced graphs), so the eager layer runs them too, for exact equality."""
    layer = _OnGrid(FeatureSpaceAttention(32, 2, backend='torch').double().eval(), size)
    x, other = (
        torch.randn(2, size[0] * size[1], 32, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
        for s in (0, 1)
    )
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        traced = torch.jit.trace(layer, x)
        assert torch.equal(traced(other), layer(other))
        assert torch.equal(traced(x), layer(x))


def test_lepe_weight_gradient_has_the_weight_strides():
    """DDP warns at every step when a gradient's strides differ from its parameter's: the LePE conv is fed
    channels-last, so its weight is channels-last too (a float64 cast and a meta build keep that)."""
    for layer in (
        FeatureSpaceAttention(64, 2),
        FeatureSpaceAttention(64, 2).double(),
        FeatureSpaceAttention(64, 2, device='meta').to_empty(device='cpu'),
    ):
        x = torch.randn(2, 196, 64, dtype=layer.lepe.weight.dtype)
        layer(x, (14, 14)).sum().backward()
        assert layer.lepe.weight.grad.stride() == layer.lepe.weight.stride()


def test_no_ddp_bucket_stride_warning():
    import torch.distributed as dist

    store = dist.HashStore()
    dist.init_process_group('gloo', store=store, rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_OnGrid(FeatureSpaceAttention(64, 2), (14, 14)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            model(torch.randn(2, 196, 64)).sum().backward()
    finally:
        dist.destroy_process_group()
    assert not [w for w in caught if 'stride' in str(w.message)]


def test_lepe_conv_is_channels_last_and_refuses_bad_widths():
    conv = LePEConv(8, dtype=torch.float64)
    assert conv.weight.shape == (8, 1, 3, 3) and conv.weight.dtype == torch.float64
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    for bad in (0, -3, 2.0, True, '8'):
        with pytest.raises(ValueError, match='dim must be a positive int'):
            LePEConv(bad)
