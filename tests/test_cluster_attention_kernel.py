"""The fused CPU kernel of FSLA's attention inside clusters (boatvit/csrc/cluster_attention_cpu.cpp): its routing,
arguments and fallback. Its outputs against the naive FSLA and the reference fixtures are in test_fsla.py (the
``backend`` fixture runs every parity test of CPU inference through it)."""

import pytest
import torch

import boatvit.kernels as kernels
from boatvit import cluster_layout, feature_space_attention
from boatvit.clustering import balanced_hierarchical_clustering
from boatvit.fsla import _attend_in_clusters
from boatvit.kernels import CPUKernels, cpu_kernels


def _qkv(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=dtype) for _ in range(3))


@pytest.mark.parametrize(
    'shape, cluster_size, overlap',
    [
        ((2, 3, 3136, 32), 49, 20),  # BOAT-Swin stage 1: 64 clusters, the products' full register blocks
        ((1, 2, 1000, 33), 49, 20),  # ghosts; a head size that is no multiple of a vector
        ((3, 2, 49, 24), 49, 20),  # one cluster (BOAT-Swin stage 4)
        ((1, 1, 300, 1), 8, 7),  # one channel, the largest overlap
        ((0, 2, 300, 8), 49, 20),  # no images
    ],
)
def test_float32_agrees_with_the_pytorch_ops(shape, cluster_size, overlap):
    """On the same clusters (in float32 the two clusterings may put a token within rounding of a cut on either
    side), the kernel's attention is the PyTorch route's to float32 rounding."""
    B, heads, N, d = shape
    qkv = torch.randn(B, N, 3, heads, d, generator=torch.Generator().manual_seed(N))
    order = balanced_hierarchical_clustering(
        qkv[:, :, 0].transpose(1, 2), cluster_size, return_padded=True, backend='torch'
    )
    fused = torch.ops.boatvit.fused_cluster_attention(qkv, order, cluster_size, overlap, d**-0.5, True)
    expected = _attend_in_clusters(qkv, order, cluster_layout(N, cluster_size), overlap, d**-0.5, 0.0)
    torch.testing.assert_close(fused, expected)


def test_same_result_on_any_thread_count():
    """Every sibling pair is computed by one thread from start to end: the split of the work changes nothing."""
    q, k, v = _qkv((2, 3, 784, 32), 0, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = feature_space_attention(q, k, v, backend='kernel')
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, feature_space_attention(q, k, v, backend='kernel'))


def _forbid_the_attention_kernel(monkeypatch):
    def forbidden(*args):
        raise AssertionError('the attention kernel ran')

    kernels_ = cpu_kernels(required=True)
    monkeypatch.setattr(kernels, '_loaded', CPUKernels(kernels_.clustered_order, forbidden))


@pytest.mark.parametrize(
    'case',
    ['autograd', 'dropout', 'bfloat16', 'torch backend', 'traced'],
)
def test_the_kernel_runs_in_cpu_inference_only(monkeypatch, case):
    """Calls that record autograd (the kernel has no backward), drop attention weights, hold half-precision q, k, v
    (CPU autocast), ask for the PyTorch ops or are traced keep the PyTorch route; plain CPU inference takes the
    kernel."""
    q, k, v = _qkv((1, 2, 196, 8), 1, torch.float32)
    _forbid_the_attention_kernel(monkeypatch)
    with pytest.raises(AssertionError, match='attention kernel ran'):
        feature_space_attention(q, k, v)
    if case == 'autograd':
        feature_space_attention(q.requires_grad_(), k, v).sum().backward()
    elif case == 'dropout':
        feature_space_attention(q, k, v, dropout_p=0.1)
    elif case == 'bfloat16':
        feature_space_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    elif case == 'torch backend':
        feature_space_attention(q, k, v, backend='torch')
    else:
        torch.jit.trace(lambda q: feature_space_attention(q, k, v), q, check_trace=False)


def test_failed_build_falls_back_to_the_pytorch_ops_or_raises_when_required(kernels_fail_to_build):
    q, k, v = _qkv((2, 2, 150, 8), 2)
    with pytest.warns(RuntimeWarning, match='could not build its CPU kernels.*no C\\+\\+ compiler'):
        fallback = feature_space_attention(q, k, v, backend='auto')
    assert torch.equal(fallback, feature_space_attention(q, k, v, backend='torch'))
    with pytest.raises(RuntimeError, match="backend 'kernel'.*could not be built.*no C\\+\\+ compiler"):
        feature_space_attention(q, k, v, backend='kernel')


def _packed(shape=(1, 250, 3, 2, 8), dtype=torch.float32):
    """A packed qkv and its padded clustered order (250 tokens: 4 clusters of 63 slots, 2 ghosts)."""
    qkv = torch.randn(*shape, dtype=dtype)
    order = balanced_hierarchical_clustering(qkv[:, :, 0].float().transpose(1, 2), return_padded=True)
    return qkv, order.contiguous()


def test_op_checks_its_arguments():
    """The op is reachable as torch.ops.boatvit.cluster_attention: what is not a packed qkv, an order of its tokens
    and their cluster layout is refused before anything is read or written."""
    op = cpu_kernels(required=True).cluster_attention
    qkv, order = _packed()
    layout = cluster_layout(250)
    assert (layout.cluster_size, layout.num_clusters) == (63, 4)
    assert op(qkv, order, 63, 4, 20, 0.5).shape == (1, 250, 16)
    with pytest.raises(RuntimeError, match='float32 or float64'):
        op(qkv.half(), order, 63, 4, 20, 0.5)
    with pytest.raises(RuntimeError, match='contiguous \\(B, N, 3, heads, head_dim\\)'):
        op(qkv.transpose(3, 4), order, 63, 4, 20, 0.5)
    with pytest.raises(RuntimeError, match='order must be a contiguous int64 \\(B, heads, n_pad\\)'):
        op(qkv, order[:, :1], 63, 4, 20, 0.5)
    with pytest.raises(RuntimeError, match='order must be'):
        op(qkv, order.int(), 63, 4, 20, 0.5)
    for size, num, overlap in ((62, 4, 20), (63, 3, 20), (84, 3, 20), (63, 4, 63), (63, 4, -1)):
        with pytest.raises(RuntimeError, match='not a cluster layout'):
            op(qkv, order, size, num, overlap, 0.5)
    for bad in (-1, 252):
        corrupt = order.clone()
        corrupt[0, 1, 100] = bad
        with pytest.raises(RuntimeError, match='slot index outside \\[0, n_pad\\)'):
            op(qkv, corrupt, 63, 4, 20, 0.5)


def test_operator_passes_opcheck():
    """The Python operator around the kernel (the one compiled graphs hold): its fake implementation, schema and
    dispatch, by torch.library.opcheck."""
    qkv, order = _packed(dtype=torch.float64)
    torch.library.opcheck(torch.ops.boatvit.fused_cluster_attention.default, (qkv, order, 49, 20, 0.25, True))
