"""torch.compile: one graph with no break for both families, inductor equal to eager, and how often a changing
image size or batch size compiles again (dynamo's decisions, so counted with a backend that only counts)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from boatvit.compiled_graphs import OpaqueConv2d
from boatvit.fsla import LePEConv
from reduced_models import reduced

# one block less in the later stages than the shared reduced models: inductor's compile time grows with the blocks
FEWER_BLOCKS = {'swin': dict(depths=(2, 2, 1, 1)), 'cswin': dict(depths=(1, 1, 1, 1))}
# stage 1 at 88 x 88: 22 x 22 = 484 tokens, 3 clustering levels, padded with 4 ghosts; FSLA in stages 1 and 2
SIZE = 88
CLOSE = dict(rtol=1e-5, atol=1e-5)


def compile_model(family: str, **kwargs) -> torch.nn.Module:
    return reduced(family, **FEWER_BLOCKS[family], **kwargs)


def images(batch: int, height: int, width: int) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(height * width + batch))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_one_graph_without_breaks(family):
    model = compile_model(family, img_size=SIZE)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        explanation = torch._dynamo.explain(model)(images(2, SIZE, SIZE))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    # the layout caches are bypassed while tracing rather than traced through with a warning
    assert not [w for w in caught if 'lru_cache' in str(w.message)]


@pytest.mark.slow
@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_inductor_fullgraph_matches_eager(family):
    model = compile_model(family, img_size=SIZE)
    compiled = torch.compile(model, fullgraph=True)
    x = images(2, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), **CLOSE)


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_compiled_training_step_has_eager_gradients(family):
    """Forward and backward in one fullgraph (AOT autograd: the FSLA row gathers' own backward, a gather by the
    inverse index, traced into the backward graph), with the ghosts of 88 x 88; gradients equal eager's."""
    model = compile_model(family, img_size=SIZE).train()
    x = images(2, SIZE, SIZE)

    def loss_of(m):
        torch.manual_seed(0)  # the same drop-path draws
        return m(x).square().mean()

    expected = torch.autograd.grad(loss_of(model), list(model.parameters()))
    got = torch.autograd.grad(
        loss_of(torch.compile(model, fullgraph=True, backend='aot_eager')), list(model.parameters())
    )
    for (name, _), g, e in zip(model.named_parameters(), got, expected):
        torch.testing.assert_close(g, e, **CLOSE, msg=name)


def _recorded_graphs(module: torch.nn.Module, *args, train: bool) -> tuple:
    """``module`` compiled (aot_autograd, no inductor) and the call targets of its graphs, one list per graph: the
    forward of one call and, if ``train``, the backward of its output's sum."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def record(graph_module, example_inputs):
        graphs.append([str(n.target) for n in graph_module.graph.nodes if n.op == 'call_function'])
        return make_boxed_func(graph_module.forward)

    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    if train:
        compiled(*args).sum().backward()
    else:
        with torch.no_grad():
            compiled(*args)
    return compiled, graphs


def _training_graphs(layer: torch.nn.Module, x: torch.Tensor, size) -> tuple:
    """The call targets of ``layer``'s compiled forward and backward graphs after one backward; checks that the
    compiled layer gives the eager output."""
    compiled, graphs = _recorded_graphs(layer, x, size, train=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, size), layer(x, size), **CLOSE)
    forward, backward = graphs[:2]
    return forward, backward


def test_compiled_fsla_gathers_rows_with_the_aten_kernel():
    """On the PyTorch route (GPUs, CPU autocast, backend='torch') the FSLA row gathers of a compiled graph, forward
    and backward, are ``boatvit::gather_rows`` operators (which inductor calls, instead of generating a loop of
    indirect loads); nothing scatters with adds (inductor's atomic adds on the CPU) and the key windows have no
    unfold backward."""
    from boatvit import FeatureSpaceAttention

    x = torch.randn(2, 22 * 22, 16, requires_grad=True)  # 3 levels and 4 ghosts
    forward, backward = _training_graphs(FeatureSpaceAttention(16, 2, backend='torch'), x, (22, 22))
    # (the forward's clustering, PyTorch ops on this route, has index_selects of its own: it is not differentiated)
    assert 'boatvit.gather_rows.default' in forward and 'boatvit.gather_rows.default' in backward
    scatters = ('index_select', 'index_add', 'index_put', 'scatter_add', 'unfold')
    assert not {op for op in backward if any(s in op for s in scatters)}


def test_compiled_cpu_training_holds_the_fused_cluster_attention_and_its_backward():
    """In float32 on the CPU a compiled training graph attends by the fused kernel and differentiates it by the
    kernel's backward operator: no row gathers or attention ops of its own in either graph."""
    from boatvit import FeatureSpaceAttention

    x = torch.randn(2, 22 * 22, 16, requires_grad=True)
    forward, backward = _training_graphs(FeatureSpaceAttention(16, 2), x, (22, 22))
    assert 'boatvit.fused_cluster_attention.default' in forward
    assert 'boatvit.fused_cluster_attention_backward.default' in backward
    for graph in (forward, backward):
        assert not {op for op in graph if any(name in op for name in ('gather', 'index_select', 'softmax', 'bmm'))}


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_compiled_cpu_graphs_hold_the_convs_after_the_stem_as_an_operator(family):
    """Inductor gives every 4-D tensor between the first and the last ``aten.convolution`` of a CPU graph
    channels-last strides, which stored the ``(B, H, W, C)`` residual stream as ``(B, W, C, H)``: the LePE convs and
    CSWin's patch-merging convs are ``boatvit::conv2d`` in compiled CPU graphs (forward and backward), so the only
    ``aten.convolution`` left is the stem's."""
    model = compile_model(family, img_size=SIZE).train()
    _, (forward, backward) = _recorded_graphs(model, images(2, SIZE, SIZE), train=True)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    opaque = [m for m in convs if isinstance(m, OpaqueConv2d)]
    assert any(isinstance(m, LePEConv) for m in opaque)
    assert forward.count('boatvit.conv2d.default') == len(opaque)
    assert forward.count('aten.convolution.default') == len(convs) - len(opaque) == 1
    assert backward.count('aten.convolution_backward.default') == len(convs)


def test_opaque_conv_operator():
    """``boatvit::conv2d``: torch.library's own checks of its schema, fake tensor and autograd rule, gradients against
    finite differences, equal to ``F.conv2d`` and channels-last out, for a strided conv and LePE's depthwise one;
    ``OpaqueConv2d`` refuses what the operator does not take."""
    from torch.nn.functional import conv2d

    x = torch.randn(2, 7, 9, 6, dtype=torch.float64).permute(0, 3, 1, 2).requires_grad_()  # channels-last
    for stride, padding, groups, out_channels in (
        ([2, 2], [1, 1], 1, 4),
        ([1, 1], [1, 1], 6, 6),
        ([1, 2], [0, 1], 2, 4),
    ):
        weight = torch.randn(out_channels, 6 // groups, 3, 3, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(out_channels, dtype=torch.float64, requires_grad=True)
        args = (x, weight, bias, stride, padding, groups)
        torch.library.opcheck(torch.ops.boatvit.conv2d, args)
        assert torch.autograd.gradcheck(lambda *t: torch.ops.boatvit.conv2d(*t, stride, padding, groups), args[:3])
        out = torch.ops.boatvit.conv2d(*args)
        assert out.is_contiguous(memory_format=torch.channels_last)
        expected = conv2d(x, weight, bias, stride=stride, padding=padding, groups=groups)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    for bad in (dict(dilation=2), dict(padding='same'), dict(padding_mode='reflect')):
        with pytest.raises(ValueError, match='OpaqueConv2d takes dilation 1'):
            OpaqueConv2d(4, 4, 3, **bad)


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_dynamic_shapes_compile_and_match_eager(family):
    """``torch.compile(dynamic=True)`` traces the modules' floats (the clustering temperature) as symbols; the
    clustering takes them without reading them in Python, and one graph serves batch sizes it was not traced at
    (CSWin's stripe LePE convs guarded on batch ranges, 2-3 and 4-15, until they became ``LePEConv``'s operator in
    compiled CPU graphs)."""
    model = compile_model(family, dynamic_img_size=True).eval()
    counter = CompileCounter()
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend=counter)
    with torch.no_grad():
        for batch in (2, 3, 5):
            x = images(batch, 64, 64)
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    assert counter.frame_count == 1


def _inference_graph_ops(layer: torch.nn.Module, x: torch.Tensor, size) -> list:
    """The call targets of ``layer``'s compiled inference graph; checks that the compiled layer gives the eager
    output."""
    compiled, (graph,) = _recorded_graphs(layer, x, size, train=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, size), layer(x, size), rtol=0, atol=0)
    return graph


def test_compiled_cpu_inference_holds_the_fused_cluster_attention():
    """CPU inference in float32 attends inside the clusters by the fused kernel and adds the LePE by its own: a
    compiled graph holds them as the operators ``boatvit::fused_cluster_attention`` and ``boatvit::fused_lepe``,
    with no row gather, no attention op and no conv of its own."""
    from boatvit import FeatureSpaceAttention

    graph = _inference_graph_ops(FeatureSpaceAttention(16, 2).eval(), torch.randn(2, 22 * 22, 16), (22, 22))
    assert {'boatvit.fused_cluster_attention.default', 'boatvit.fused_lepe.default'} <= set(graph)
    unfused = ('gather', 'index_select', 'matmul', 'softmax', 'conv')
    assert not {op for op in graph if any(name in op for name in unfused)}


def test_compiled_cpu_inference_keeps_the_matmul_attention():
    """Without the kernels (backend 'torch', or where they cannot be built) inference attends on the clusters by
    matmul, softmax, matmul (faster than the CPU flash kernel on 49 x 69 clusters); in a compiled graph it is the
    operator ``boatvit::matmul_attention``, so inductor's attention pattern matcher cannot rewrite it as that kernel
    (it did: 10 flash-attention calls per BOAT-Swin-T forward). Under CPU autocast the graph holds the kernels'
    operators, which take the bf16 queries and qkv as they are."""
    from boatvit import FeatureSpaceAttention

    x = torch.randn(2, 22 * 22, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        graph = _inference_graph_ops(FeatureSpaceAttention(16, 2, backend='torch').eval(), x, (22, 22))
        fused = _inference_graph_ops(FeatureSpaceAttention(16, 2).eval(), x, (22, 22))
    assert 'boatvit.matmul_attention.default' in graph
    assert not {op for op in graph if 'scaled_dot_product' in op or 'flash' in op}
    assert {'boatvit.fused_cluster_attention.default', 'boatvit.fused_clustering.default'} <= set(fused)
    assert not {op for op in fused if 'softmax' in op or 'matmul_attention' in op}


def test_dynamic_shapes_with_the_pytorch_clustering():
    """The same for the clustering by PyTorch ops (the route of every device but the CPU), ghosts included."""
    from boatvit import FeatureSpaceAttention

    layer = FeatureSpaceAttention(16, 2, backend='torch').eval()
    compiled = torch.compile(layer, dynamic=True, fullgraph=True, backend='aot_eager')
    with torch.no_grad():
        for batch in (2, 3, 5):
            x = torch.randn(batch, 30 * 30, 16, generator=torch.Generator().manual_seed(batch))
            torch.testing.assert_close(compiled(x, (30, 30)), layer(x, (30, 30)), rtol=0, atol=0)


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_changing_image_size_compiles_once_per_size(family):
    """With ``dynamic_img_size`` every new (H, W) compiles one graph (the clustering tree and the window padding are
    specialised to it) and a size seen before reuses its graph; torch caps the count at
    ``torch._dynamo.config.recompile_limit`` (8)."""
    model = compile_model(family, img_size=64, dynamic_img_size=True)
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    sizes = [(64, 64), (88, 88), (64, 64), (64, 96), (88, 88)]
    with torch.no_grad():
        for height, width in sizes:
            x = images(2, height, width)
            torch.testing.assert_close(compiled(x), model(x), **CLOSE)
    assert counter.frame_count == len(set(sizes)) == 3


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_changing_batch_size_compiles_a_few_graphs(family):
    """Batch sizes 2, 3 and 4 at one image size: dynamo makes the batch symbolic after the first change (one more
    graph, then no more: CSWin's stripe convolutions guarded on batch ranges, 2-3 and 4-15, until its LePE convs
    became ``LePEConv``'s operator in compiled CPU graphs)."""
    model = compile_model(family, img_size=64)
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with torch.no_grad():
        for batch in (2, 3, 4):
            x = images(batch, 64, 64)
            torch.testing.assert_close(compiled(x), model(x), **CLOSE)
    assert counter.frame_count == 2
