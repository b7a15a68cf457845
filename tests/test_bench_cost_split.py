"""``benchmarks.bench_cost_split``: its free variants free what they say (and nothing else), and the layer shapes it
times are the model's."""

import pytest
import torch

from benchmarks.bench_cost_split import VARIANTS, freed, fsla_layers
from boatvit import FeatureSpaceAttention


@pytest.fixture
def layer():
    torch.manual_seed(0)
    return FeatureSpaceAttention(32, 2).eval()


def test_kernels_free_leaves_the_rest_of_the_layer_as_it_is(layer):
    # with the clustering and the cluster attention left out, the layer is proj(v + lepe(v))
    x = torch.randn(2, 16 * 16, 32)
    with torch.no_grad(), freed('kernels free', {}):
        out = layer(x, (16, 16))
    with torch.no_grad():
        v = layer.qkv(x).view(2, 256, 3, 32)[:, :, 2]
        lepe = layer.lepe(v.reshape(2, 16, 16, 32).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(2, 256, 32)
        expected = layer.proj(v + lepe)
    torch.testing.assert_close(out, expected)
    # and only inside the block
    with torch.no_grad():
        assert not torch.allclose(layer(x, (16, 16)), expected, atol=1e-3)


def test_clustering_free_replays_the_first_order_of_each_shape(layer):
    x1, x2 = torch.randn(2, 1, 16 * 16, 32)
    first, second = layer.cluster_order(x1, (16, 16)), layer.cluster_order(x2, (16, 16))
    assert not torch.equal(first, second)
    replayed = {}
    with freed('clustering free', replayed):
        assert torch.equal(layer.cluster_order(x1, (16, 16)), first)
        assert torch.equal(layer.cluster_order(x2, (16, 16)), first)
    with freed('clustering free', replayed):  # kept across blocks that share the dict
        assert torch.equal(layer.cluster_order(x2, (16, 16)), first)
    # another shape is computed, not replayed
    x3 = torch.randn(1, 8 * 32, 32)
    with freed('clustering free', replayed):
        assert torch.equal(layer.cluster_order(x3, (8, 32)), layer.cluster_order(x3, (8, 32)))
    assert torch.equal(layer.cluster_order(x2, (16, 16)), second)


def test_as_is_changes_nothing_and_an_unknown_variant_is_named(layer):
    x = torch.randn(1, 256, 32)
    with torch.no_grad():
        expected = layer(x, (16, 16))
        with freed('as is', {}):
            torch.testing.assert_close(layer(x, (16, 16)), expected, rtol=0, atol=0)
    assert VARIANTS == ('as is', 'clustering free', 'kernels free')
    with pytest.raises(ValueError, match="unknown variant 'free'; choose from"):
        with freed('free', {}):
            pass


def test_fsla_layers_counts_each_shape_of_a_model():
    import timm

    model = timm.create_model('boat_swin_nano_32')
    shapes = fsla_layers(model, torch.randn(2, 3, 32, 32), None)
    heads = [m.num_heads for m in model.modules() if isinstance(m, FeatureSpaceAttention)]
    assert sum(shapes.values()) == len(heads)
    assert {(B, N, h) for B, N, h, *_ in shapes} == {(2, 256, heads[0]), (2, 64, heads[1])}
    assert all(overlap == 20 and size == 49 for *_, size, overlap, _ in shapes)
