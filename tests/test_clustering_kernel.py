"""The compiled CPU clustering kernel (boatvit/csrc/clustering_cpu.cpp) against the eager clustering, its oracle,
and the build and routing of boatvit's CPU kernels."""

import subprocess
import sysconfig

import pytest
import torch

import boatvit.kernels as kernels
from boatvit import balanced_hierarchical_clustering, cluster_layout, feature_space_attention
from boatvit.kernels import KERNEL_ENV, CPUKernels, cpu_kernels


def _clustered(q, route, **kwargs):
    return balanced_hierarchical_clustering(q, return_padded=True, backend=route, **kwargs)


def _without_ghost_ids(order, n):
    """Which ghost goes in which ghost slot is arbitrary (they are all zero queries): every ghost becomes -1."""
    return order.masked_fill(order >= n, -1)


def _queries_with_ties(dtype):
    """Queries of a flat image region: 48 copies of one token, and 10 of another, among random ones."""
    q = torch.randn(2, 3, 392, 8, dtype=dtype, generator=torch.Generator().manual_seed(6))
    q[:, :, 100:148] = q[:, :, :1]
    q[:, :, 300:310] = q[:, :, 299:300]
    return q


def test_kernel_builds_here():
    assert cpu_kernels(required=True) is not None, 'the CPU kernels did not build: a C++ compiler is needed'


@pytest.mark.parametrize('source', kernels._SOURCES, ids=lambda path: path.name)
def test_sources_compile_without_the_x86_vector_routes(source):
    """On a CPU other than x86-64 the kernels keep their portable routes, without the AVX512 helpers of
    ``csrc/avx512_vectors.h``: the sources compile so (``-DBOATVIT_PORTABLE_ONLY``, checked here on x86)."""
    from torch.utils.cpp_extension import include_paths

    includes = [*include_paths(), sysconfig.get_paths()['include']]
    command = ['c++', '-std=c++20', '-fsyntax-only', '-fopenmp', '-DBOATVIT_PORTABLE_ONLY', str(source)]
    result = subprocess.run(
        command + [f'-I{path}' for path in includes], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize(
    'shape, cluster_size',
    [
        ((2, 2, 3136, 32), 49),  # BOAT stage 1: 6 levels, the d = 32 specialisation
        ((3, 4, 196, 32), 49),  # stage 3: 2 levels
        ((2, 3, 1000, 16), 49),  # 8 ghosts over 16 clusters, another head size
        ((1, 2, 999, 6), 7),  # 7 levels, 25 ghosts
        ((2, 1, 77, 5), 5),
        ((1, 1, 3, 2), 1),  # one level, one ghost
        ((0, 2, 300, 8), 49),  # no images
    ],
)
@pytest.mark.parametrize('iterations', [0, 2, 3])
def test_kernel_matches_eager_exactly_in_float64(shape, cluster_size, iterations):
    q = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(shape[2]))
    kwargs = dict(cluster_size=cluster_size, iterations=iterations, temperature=30.0)
    fused = _clustered(q, 'kernel', **kwargs)
    eager = _clustered(q, 'torch', **kwargs)
    assert torch.equal(_without_ghost_ids(fused, shape[2]), _without_ghost_ids(eager, shape[2]))
    assert torch.equal(fused.sort(-1).values, torch.arange(fused.shape[-1]).expand_as(fused))


def test_kernel_reads_strided_queries():
    """q as FSLA hands it over: a view into the packed qkv projection, (B, N, 3, heads, d) transposed."""
    qkv = torch.randn(2, 392, 3, 4, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    q = qkv[:, :, 0].transpose(1, 2)
    assert not q.is_contiguous()
    assert torch.equal(_clustered(q, 'kernel'), _clustered(q.contiguous(), 'torch'))


def test_float32_clusters_agree_with_eager():
    """In float32 the kernel sums in another order than the eager matmuls, so a token whose key is within
    rounding of a cut may land on the other side, and takes the tokens the later splits group with it along (on
    these seeds the float32 eager route itself parts from float64 so once, in one row of one seed); nearly all must
    not."""
    layout = cluster_layout(3136)
    agreement = []
    for seed in range(4):
        q = torch.randn(4, 2, 3136, 32, generator=torch.Generator().manual_seed(seed))
        cluster_of = []
        for route in ('kernel', 'torch'):
            order = _clustered(q, route)
            slots = torch.arange(layout.padded_tokens).expand_as(order)
            cluster_of.append(torch.empty_like(order).scatter_(-1, order, slots // layout.cluster_size))
        agreement.append((cluster_of[0] == cluster_of[1]).float().mean())
    assert torch.stack(agreement).mean() > 0.99


def test_same_result_on_any_thread_count():
    q = torch.randn(8, 2, 784, 32, generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _clustered(q, 'kernel')
        torch.set_num_threads(2)
        two = _clustered(q, 'kernel')
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize('route', ['kernel', 'torch'])
def test_ties_are_broken_by_token_index(route):
    """Equal queries give equal keys at every level: both routes keep them in token order."""
    q = torch.ones(1, 2, 196, 8, dtype=torch.float64)
    assert torch.equal(_clustered(q, route), torch.arange(196).expand(1, 2, 196))


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('route', ['kernel', 'torch'])
def test_copies_of_a_token_stay_in_index_order(route, dtype):
    order = _clustered(_queries_with_ties(dtype), route)
    for copies in ((order == 0) | ((order >= 100) & (order < 148)), (order >= 299) & (order < 310)):
        positions = order[copies].view(2 * 3, -1)  # every (image, head) holds all the copies
        assert torch.equal(positions, positions.sort(-1).values)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_queries_are_clustered_as_their_float32_values(dtype):
    """The kernel reads bf16/fp16 queries (no float32 copy of them) and clusters them in float32: the same order as
    the PyTorch route on ``q.float()``, ties included (half precision rounds many queries to equal values), and
    from a strided view of a packed qkv as from a contiguous tensor."""
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 3136, 3, 3, 32, generator=g).to(dtype)
    qkv[:, 100:160, 0] = qkv[:, 7:8, 0]  # exact copies
    q = qkv[:, :, 0].transpose(1, 2)
    fused = balanced_hierarchical_clustering(q, return_padded=True, backend='kernel')
    assert torch.equal(fused, balanced_hierarchical_clustering(q.float(), return_padded=True, backend='torch'))
    assert torch.equal(fused, balanced_hierarchical_clustering(q.contiguous(), return_padded=True, backend='kernel'))


def test_large_clusters_are_sorted_as_small_ones():
    """The last level sorts a group's keys by rank up to 256 keys (BOAT's groups of 98, the test above) and by
    std::sort beyond: with clusters of 196 slots (groups of 392) the kernel still clusters bf16 queries as the PyTorch
    route clusters them in float32, but for the tokens within rounding of a cut (the two sum in different orders)."""
    q = torch.randn(2, 3, 3136, 32, generator=torch.Generator().manual_seed(3)).bfloat16()
    layout = cluster_layout(3136, 150)
    cluster_of = []
    for route, queries in (('kernel', q), ('torch', q.float())):
        order = balanced_hierarchical_clustering(queries, 150, return_padded=True, backend=route)
        slots = torch.arange(layout.padded_tokens).expand_as(order)
        cluster_of.append(torch.empty_like(order).scatter_(-1, order, slots // layout.cluster_size))
    assert layout.cluster_size * 2 > 256
    assert (cluster_of[0] == cluster_of[1]).float().mean() > 0.999


def test_tied_tokens_are_clustered_as_in_eager():
    """Which copy of a repeated token falls on which side of a cut changes the attention output at its index:
    both routes put the copies in the same places."""
    q = _queries_with_ties(torch.float64)
    fused, eager = (_clustered(q, route) for route in ('kernel', 'torch'))
    assert torch.equal(fused, eager)
    k, v = torch.randn_like(q), torch.randn_like(q)
    outputs = []
    for route in ('kernel', 'torch'):
        outputs.append(feature_space_attention(q, k, v, backend=route))
    # the routes' attention kernels round differently (1e-16); a copy on the other side of a cut moves a row by ~0.1
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-12)


def test_non_finite_queries_still_give_a_permutation():
    q = torch.randn(1, 2, 200, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    q[0, 0, 3] = float('nan')
    q[0, 1, 7] = float('inf')
    order = _clustered(q, 'kernel')
    layout = cluster_layout(200)
    assert torch.equal(order.sort(-1).values, torch.arange(layout.padded_tokens).expand_as(order))
    assert (order[..., list(layout.ghost_slots)] >= 200).all()


def test_environment_variable_sets_the_default_backend(monkeypatch):
    def forbidden(*args):
        raise AssertionError('the kernel ran')

    monkeypatch.setattr(kernels, '_loaded', CPUKernels(forbidden, forbidden, forbidden, forbidden))
    monkeypatch.setenv(KERNEL_ENV, 'off')
    balanced_hierarchical_clustering(torch.randn(1, 1, 196, 4))
    for setting in ('auto', 'on'):
        monkeypatch.setenv(KERNEL_ENV, setting)
        with pytest.raises(AssertionError, match='kernel ran'):
            balanced_hierarchical_clustering(torch.randn(1, 1, 196, 4))
    # an argument overrides the variable
    balanced_hierarchical_clustering(torch.randn(1, 1, 196, 4), backend='torch')


def test_torch_backend_never_runs_the_kernel(monkeypatch):
    def forbidden(*args):
        raise AssertionError('the kernel ran')

    monkeypatch.setattr(kernels, '_loaded', CPUKernels(forbidden, forbidden, forbidden, forbidden))
    q = torch.randn(1, 1, 196, 4)
    balanced_hierarchical_clustering(q, backend='torch')
    with pytest.raises(AssertionError, match='kernel ran'):
        balanced_hierarchical_clustering(q, backend='auto')


def test_kernel_is_left_out_of_traced_graphs(monkeypatch):
    """'auto' keeps the PyTorch ops for fake tensors outside torch.compile and for devices other than the CPU."""

    def forbidden(*args):
        raise AssertionError('the kernel ran on a traced or non-CPU tensor')

    monkeypatch.setattr(kernels, '_loaded', CPUKernels(forbidden, forbidden, forbidden, forbidden))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert balanced_hierarchical_clustering(torch.randn(1, 1, 196, 4), backend='auto').shape == (1, 1, 196)
    meta = torch.randn(1, 1, 196, 4, device='meta')
    assert balanced_hierarchical_clustering(meta, backend='auto').shape == (1, 1, 196)
    with pytest.raises(ValueError, match="backend 'kernel' runs on CPU tensors only.*a meta tensor.*'auto' or 'torch'"):
        balanced_hierarchical_clustering(meta, backend='kernel')


def test_routing_refuses_an_unknown_backend_by_name():
    from boatvit.kernels import use_cpu_kernel

    with pytest.raises(ValueError, match="backend must be one of \\('auto', 'kernel', 'torch'\\).*'fast'"):
        use_cpu_kernel(torch.zeros(1), 'fast')


def test_bad_setting_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, 'fast')
    with pytest.raises(ValueError, match="BOATVIT_CPU_KERNEL='fast'.*'auto', 'on', 'off'"):
        balanced_hierarchical_clustering(torch.randn(1, 1, 196, 4))
    with pytest.raises(ValueError, match="backend must be one of \\('auto', 'kernel', 'torch'\\).*'fast'"):
        balanced_hierarchical_clustering(torch.randn(1, 1, 196, 4), backend='fast')


def test_failed_build_warns_once_then_runs_eager_or_raises_when_required(kernels_fail_to_build):
    q = torch.randn(1, 2, 196, 4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match='could not build its CPU kernels.*no C\\+\\+ compiler'):
        fallback = balanced_hierarchical_clustering(q, backend='auto')
    assert torch.equal(fallback, balanced_hierarchical_clustering(q, backend='torch'))
    with pytest.raises(RuntimeError, match="backend 'kernel'.*could not be built.*no C\\+\\+ compiler"):
        balanced_hierarchical_clustering(q, backend='kernel')


def test_op_checks_its_arguments():
    """The op is reachable as torch.ops.boatvit.clustered_order: arguments that are not a cluster layout of the
    tokens are refused before anything is read or written."""
    op = cpu_kernels(required=True).clustered_order
    q = torch.randn(1, 1, 250, 4)
    layout = cluster_layout(250)  # 2 levels, 4 clusters of 63 slots, 2 ghosts
    assert (layout.levels, layout.padded_tokens) == (2, 252)
    assert op(q, 252, 2, 2, 100.0).shape == (1, 1, 252)
    for n_pad, levels in ((250, 2), (248, 2), (256, 2), (252, 0), (252, 3)):
        with pytest.raises(RuntimeError, match='cluster layout of the N tokens'):
            op(q, n_pad, levels, 2, 100.0)
    with pytest.raises(RuntimeError, match='float64, float32, bfloat16 or float16'):
        op(q.to(torch.int32), 252, 2, 2, 100.0)
    with pytest.raises(RuntimeError, match='iterations'):
        op(q, 252, 2, -1, 100.0)
    with pytest.raises(RuntimeError, match='unit stride'):
        op(q.transpose(2, 3), 252, 2, 2, 100.0)


def _graph_targets(fn, *args):
    """Runs ``fn`` compiled with fullgraph=True by a backend that records the FX graph; returns the graph's call
    targets and the result."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        out = torch.compile(fn, fullgraph=True, backend=record)(*args)
    finally:
        torch._dynamo.reset()
    return {str(node.target) for gm in graphs for node in gm.graph.nodes}, out


@pytest.mark.parametrize('backend, in_graph', [('kernel', True), ('auto', True), ('torch', False)])
def test_compiled_graph_holds_the_kernel_operator(backend, in_graph):
    """torch.compile keeps the compiled kernel as one operator in the graph (its fake implementation gives the
    shape), with the permutation of the eager PyTorch ops in float64."""
    q = torch.randn(2, 3, 1000, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    targets, order = _graph_targets(lambda q: balanced_hierarchical_clustering(q, backend=backend), q)
    assert any(t.startswith('boatvit.fused_clustering') for t in targets) == in_graph, targets
    assert torch.equal(order, balanced_hierarchical_clustering(q, backend='torch'))


def test_fake_implementation_gives_the_padded_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    layout = cluster_layout(1000)
    with FakeTensorMode():
        out = torch.ops.boatvit.fused_clustering(
            torch.randn(2, 3, 1000, 16), layout.padded_tokens, layout.levels, 2, 100.0, True
        )
    assert (tuple(out.shape), out.dtype) == ((2, 3, layout.padded_tokens), torch.int64)


@pytest.mark.slow  # about 20 s on 2 cores
def test_inductor_graph_with_the_kernel_equals_torch_ops_in_float64():
    """Inductor runs the operator inside its compiled graph: a FeatureSpaceAttention call with backend='kernel'
    equals the eager one with the PyTorch ops."""
    from boatvit import FeatureSpaceAttention

    torch._dynamo.reset()
    layer = FeatureSpaceAttention(32, 2, backend='kernel').double().eval()
    reference = FeatureSpaceAttention(32, 2, backend='torch').double().eval()
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 900, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        compiled = torch.compile(layer, fullgraph=True)(x, (30, 30))
        expected = reference(x, (30, 30))
        assert torch.equal(
            torch.compile(layer.cluster_order, fullgraph=True)(x, (30, 30)), reference.cluster_order(x, (30, 30))
        )
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_operator_passes_opcheck(dtype):
    """``boatvit::fused_clustering`` (the operator compiled graphs hold): its fake implementation, schema and
    dispatch, by torch.library.opcheck, in every dtype the kernel reads (half precision without a float32 copy)."""
    q = torch.randn(2, 3, 250, 8, generator=torch.Generator().manual_seed(4)).to(dtype)
    layout = cluster_layout(250)
    torch.library.opcheck(
        torch.ops.boatvit.fused_clustering.default, (q, layout.padded_tokens, layout.levels, 2, 100.0, True)
    )
