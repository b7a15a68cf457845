"""The fused CPU kernel of FSLA's attention inside clusters (boatvit/csrc/cluster_attention_cpu.cpp): its backward,
routing, arguments and fallback. Its outputs against the naive FSLA and the reference fixtures are in test_fsla.py (the
``backend`` fixture runs every parity test of the CPU route through it, inference and training)."""

import os
import subprocess
import sys

import pytest
import torch

import boatvit.kernels as kernels
from boatvit import FeatureSpaceAttention, cluster_layout, feature_space_attention
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


@pytest.mark.parametrize(
    'shape, cluster_size, overlap',
    [
        ((2, 3, 3136, 32), 49, 20),  # BOAT-Swin stage 1
        ((1, 2, 1000, 34), 49, 20),  # ghosts, an even head size that is no multiple of a vector
        ((1, 2, 300, 33), 49, 20),  # an odd head size: no pairs for the matrix units, the vector route
        ((3, 2, 49, 24), 49, 20),  # one cluster
        ((1, 1, 300, 2), 8, 7),  # the largest overlap
    ],
)
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_forward_and_gradient_are_within_rounding(shape, cluster_size, overlap, dtype):
    """bf16 and fp16 q, k, v (CPU autocast) run through the kernel without a float32 copy: its products read the half
    precision values (on the CPU's matrix units where it has them, see ``cluster_attention_matrix_units``) and
    accumulate in float32, with the softmax in float32. Against the float64 route on the same values and clusters, its
    output and gradient are no further than the PyTorch route's own half-precision results are (which round the
    logits too), and within the half precision's rounding of values of this size."""
    B, heads, N, d = shape
    g = torch.Generator().manual_seed(N + d)
    qkv = torch.randn(B, N, 3, heads, d, generator=g).to(dtype)
    grad = torch.randn(B, N, heads * d, generator=g).to(dtype)
    order = balanced_hierarchical_clustering(
        qkv[:, :, 0].transpose(1, 2), cluster_size, return_padded=True, backend='torch'
    ).contiguous()
    layout = cluster_layout(N, cluster_size)

    def route(x):
        return _attend_in_clusters(x, order, layout, overlap, d**-0.5, 0.0)

    exact, vjp = torch.func.vjp(route, qkv.double())
    exact_grad = vjp(grad.double())[0]
    fused = torch.ops.boatvit.fused_cluster_attention(qkv, order, cluster_size, overlap, d**-0.5, True)
    fused_grad = torch.ops.boatvit.fused_cluster_attention_backward(grad, qkv, order, cluster_size, overlap, d**-0.5)
    assert fused.dtype == fused_grad.dtype == dtype
    torch_out, torch_vjp = torch.func.vjp(route, qkv)
    torch_grad = torch_vjp(grad)[0]
    eps = torch.finfo(dtype).eps
    for result, reference, exact_result in ((fused, torch_out, exact), (fused_grad, torch_grad, exact_grad)):
        error = (result.double() - exact_result).abs().max().item()
        assert error <= max((reference.double() - exact_result).abs().max().item(), 2 * eps * exact_result.abs().max())


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
    monkeypatch.setattr(
        kernels, '_loaded', CPUKernels(kernels_.clustered_order, forbidden, forbidden, kernels_.add_lepe)
    )


@pytest.mark.parametrize('case', ['dropout', 'torch backend', 'traced'])
def test_the_kernel_runs_on_cpu_tensors_without_dropout(monkeypatch, case):
    """Calls that drop attention weights, ask for the PyTorch ops or are traced keep the PyTorch route; CPU
    inference and training in float64, float32, bf16 and fp16 (CPU autocast) take the kernel."""
    q, k, v = _qkv((1, 2, 196, 8), 1, torch.float32)
    _forbid_the_attention_kernel(monkeypatch)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        with pytest.raises(AssertionError, match='attention kernel ran'):
            feature_space_attention(q.to(dtype), k.to(dtype), v.to(dtype))
    with pytest.raises(AssertionError, match='attention kernel ran'):
        feature_space_attention(q.clone().requires_grad_(), k, v)
    if case == 'dropout':
        feature_space_attention(q, k, v, dropout_p=0.1)
    elif case == 'torch backend':
        feature_space_attention(q, k, v, backend='torch')
    else:
        torch.jit.trace(lambda q: feature_space_attention(q, k, v), q, check_trace=False)


@pytest.mark.parametrize(
    'n, cluster_size, overlap',
    [(196, 49, 20), (150, 49, 20), (49, 49, 20), (90, 10, 3), (80, 10, 0), (43, 10, 9)],
    ids=['no-ghosts', 'ghosts', 'one-cluster', 'ghost-pairs', 'no-overlap', 'largest-overlap'],
)
def test_backward_equals_the_pytorch_route(n, cluster_size, overlap):
    """The kernel's backward (every cluster's probabilities recomputed; a key's gradient from both clusters of its
    pair) against autograd through the PyTorch route, float64, on the same clusters; and gradcheck's numerical
    derivative on a small case."""
    qkv = torch.randn(2, n, 3, 2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    order = balanced_hierarchical_clustering(qkv[:, :, 0].transpose(1, 2), cluster_size, return_padded=True)
    grad = torch.randn(2, n, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    layout = cluster_layout(n, cluster_size)
    leaf = qkv.clone().requires_grad_()
    (expected,) = torch.autograd.grad(_attend_in_clusters(leaf, order, layout, overlap, 0.3, 0.0), leaf, grad)
    leaf = qkv.clone().requires_grad_()
    out = torch.ops.boatvit.fused_cluster_attention(leaf, order, cluster_size, overlap, 0.3, True)
    (got,) = torch.autograd.grad(out, leaf, grad)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    if n <= 50:
        torch.autograd.gradcheck(
            lambda x: torch.ops.boatvit.fused_cluster_attention(x, order, cluster_size, overlap, 0.3, True),
            qkv.clone().requires_grad_(),
        )


def test_training_step_of_a_layer_equals_the_pytorch_route():
    """A FeatureSpaceAttention training step (LePE, projections, float32) gives the PyTorch route's gradients."""
    torch.manual_seed(0)
    layers = [FeatureSpaceAttention(32, 2, backend=backend) for backend in ('kernel', 'torch')]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(2, 28 * 28, 32)
    grads = []
    for layer in layers:
        layer(x, (28, 28)).square().mean().backward()
        grads.append([p.grad for p in layer.parameters()])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_failed_build_falls_back_to_the_pytorch_ops_or_raises_when_required(kernels_fail_to_build):
    q, k, v = _qkv((2, 2, 150, 8), 2)
    with pytest.warns(RuntimeWarning, match='could not build its CPU kernels.*no C\\+\\+ compiler'):
        fallback = feature_space_attention(q, k, v, backend='auto')
    assert torch.equal(fallback, feature_space_attention(q, k, v, backend='torch'))
    # training too: the operator's backward differentiates the PyTorch route it fell back to
    grads = [
        torch.autograd.grad(feature_space_attention(q.requires_grad_(), k, v, backend=b).sum(), q)[0]
        for b in ('auto', 'torch')
    ]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)
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
    with pytest.raises(RuntimeError, match='float64, float32, bfloat16 or float16'):
        op(qkv.to(torch.int32), order, 63, 4, 20, 0.5)
    with pytest.raises(RuntimeError, match='contiguous \\(B, N, 3, heads, head_dim\\)'):
        op(qkv.transpose(3, 4), order, 63, 4, 20, 0.5)
    with pytest.raises(RuntimeError, match='order must be a contiguous int64 \\(B, heads, n_pad\\)'):
        op(qkv, order[:, :1], 63, 4, 20, 0.5)
    with pytest.raises(RuntimeError, match='order must be'):
        op(qkv, order.int(), 63, 4, 20, 0.5)
    for size, num, overlap in ((62, 4, 20), (63, 3, 20), (84, 3, 20), (63, 4, 63), (63, 4, -1)):
        with pytest.raises(RuntimeError, match='not a cluster layout'):
            op(qkv, order, size, num, overlap, 0.5)
    backward = cpu_kernels(required=True).cluster_attention_backward
    grad = torch.randn(1, 250, 16)
    assert backward(grad, qkv, order, 63, 4, 20, 0.5).shape == qkv.shape
    for bad_grad in (grad[:, :249], grad.double(), grad.transpose(1, 2).contiguous().view(1, 250, 16)[:, ::2]):
        with pytest.raises(RuntimeError, match='grad_out must be a contiguous \\(B, N, heads \\* head_dim\\)'):
            backward(bad_grad, qkv, order, 63, 4, 20, 0.5)
    for bad in (-1, 252):
        corrupt = order.clone()
        corrupt[0, 1, 100] = bad
        with pytest.raises(RuntimeError, match='slot index outside \\[0, n_pad\\)'):
            op(qkv, corrupt, 63, 4, 20, 0.5)


@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16, torch.float16])
def test_operators_pass_opcheck(dtype):
    """The Python operators around the kernel (those compiled graphs hold): their fake implementations, schemas,
    dispatch and autograd registration, by torch.library.opcheck, in float64 and in the half precisions."""
    qkv, order = _packed(dtype=dtype)
    torch.library.opcheck(
        torch.ops.boatvit.fused_cluster_attention.default, (qkv.requires_grad_(), order, 49, 20, 0.25, True)
    )
    grad = torch.randn(1, 250, 16, dtype=dtype)
    torch.library.opcheck(
        torch.ops.boatvit.fused_cluster_attention_backward.default, (grad, qkv.detach(), order, 49, 20, 0.25)
    )


def test_a_cpu_without_bf16_matrix_units_runs_the_vector_route(tmp_path):
    """On a CPU without AMX or AVX512 (emulated by capping oneDNN's instruction set, as such a CPU would report it,
    which also turns off the kernels' own AVX512 routes) bf16 runs the vector route, converted to float32 as it is
    gathered: no warning, and within bf16 rounding of the float64 route, as on the matrix units; the clustering's
    AVX2 route gives the PyTorch route's clusters of ``q.float()``."""
    script = tmp_path / 'no_amx.py'
    script.write_text(
        'import warnings\n'
        'import torch\n'
        'from boatvit import cluster_layout\n'
        'from boatvit.clustering import balanced_hierarchical_clustering\n'
        'from boatvit.fsla import _attend_in_clusters\n'
        'from boatvit.kernels import cpu_kernels\n'
        "warnings.simplefilter('error')\n"
        'qkv = torch.randn(2, 784, 3, 2, 32, generator=torch.Generator().manual_seed(0)).bfloat16()\n'
        'q = qkv[:, :, 0].transpose(1, 2)\n'
        "order = balanced_hierarchical_clustering(q, return_padded=True, backend='kernel').contiguous()\n"
        "assert torch.equal(order, balanced_hierarchical_clustering(q.float(), return_padded=True, backend='torch'))\n"
        'kernels = cpu_kernels(required=True)\n'
        'assert not kernels.cluster_attention_matrix_units(torch.bfloat16, 32)\n'
        'out = torch.ops.boatvit.fused_cluster_attention(qkv, order, 49, 20, 32**-0.5, True)\n'
        'exact = _attend_in_clusters(qkv.double(), order, cluster_layout(784), 20, 32**-0.5, 0.0)\n'
        'error = (out.double() - exact).abs().max().item()\n'
        'assert error <= 2 * torch.finfo(torch.bfloat16).eps * exact.abs().max().item(), error\n'
    )
    env = {**os.environ, 'ONEDNN_MAX_CPU_ISA': 'AVX2', 'OMP_NUM_THREADS': '1'}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
