import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from boatvit import balanced_hierarchical_clustering, cluster_layout
from boatvit.clustering import _softmax_of_two, _sort_keys, token_clusters
from boatvit.fsla import FeatureSpaceAttention

from naive_fsla import naive_permutation


def _fixture_queries(fixture):
    info = fixture.meta['first_fsla']
    module = FeatureSpaceAttention(info['dim'], info['num_heads'], scale=info['scale']).double()
    module.load_state_dict(fixture.first_fsla_weights())
    x = fixture.tensors['fsla.input']
    B, N, C = x.shape
    with torch.no_grad():
        return module.qkv(x).view(B, N, 3, info['num_heads'], -1)[:, :, 0].transpose(1, 2)


def test_fixture_permutation_is_exact(reference_fixture, backend):
    perm = balanced_hierarchical_clustering(_fixture_queries(reference_fixture), backend=backend)
    assert torch.equal(perm, reference_fixture.tensors['fsla.perm'])


@pytest.mark.parametrize('n', [49 * 4, 49 * 8, 100, 150, 250, 60, 30, 1, 2])
def test_matches_naive_clustering(n, backend):
    g = torch.Generator().manual_seed(n)
    q = torch.randn(2, 2, n, 8, generator=g, dtype=torch.float64)
    assert torch.equal(balanced_hierarchical_clustering(q, backend=backend), naive_permutation(q))


def test_small_cluster_size_matches_naive(backend):
    q = torch.randn(1, 3, 77, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(
        balanced_hierarchical_clustering(q, cluster_size=5, backend=backend), naive_permutation(q, cluster_size=5)
    )


# the backend fixture is a plain string, the same for every example
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 700),
    batch=st.integers(1, 3),
    heads=st.integers(1, 3),
    cluster_size=st.sampled_from([7, 16, 49]),
    factor=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_permutation_properties(n, batch, heads, cluster_size, factor, seed, backend):
    q = torch.randn(batch, heads, n, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    perm = balanced_hierarchical_clustering(q, cluster_size, backend=backend)
    assert perm.shape == (batch, heads, n)
    expected = torch.arange(n).expand(batch, heads, n)
    assert torch.equal(perm.sort(-1).values, expected)
    layout = cluster_layout(n, cluster_size)
    sizes = layout.cluster_sizes()
    assert sum(sizes) == n
    if layout.levels:
        assert all(cluster_size <= s <= 2 * cluster_size for s in sizes)
        assert max(sizes) - min(sizes) <= 1
    else:
        assert sizes == [n]
    # a positive rescaling of the queries changes no cosine and no split
    assert torch.equal(balanced_hierarchical_clustering(q * factor, cluster_size), perm)


def test_layout_at_reference_sizes_has_no_ghosts():
    for levels in range(7):
        layout = cluster_layout(49 * 2**levels)
        assert (layout.levels, layout.cluster_size, layout.num_ghosts) == (levels, 49, 0)


def test_half_precision_is_clustered_in_float32():
    q = torch.randn(2, 2, 196, 16, generator=torch.Generator().manual_seed(0)).half()
    assert torch.equal(balanced_hierarchical_clustering(q), balanced_hierarchical_clustering(q.float()))


def test_no_gradient_through_assignment():
    q = torch.randn(1, 1, 98, 4, requires_grad=True)
    perm = balanced_hierarchical_clustering(q)
    assert not perm.requires_grad and perm.dtype == torch.int64


@pytest.mark.parametrize(
    'bad, message',
    [
        (torch.randn(4, 8), '2-D tensor'),
        (torch.randint(0, 3, (1, 1, 10, 4)), 'floating'),
        (torch.randn(1, 1, 0, 4), 'at least one token'),
    ],
)
def test_bad_queries(bad, message):
    with pytest.raises(ValueError, match=message):
        balanced_hierarchical_clustering(bad)


def test_bad_arguments():
    q = torch.randn(1, 1, 10, 4)
    with pytest.raises(ValueError, match='cluster_size'):
        balanced_hierarchical_clustering(q, cluster_size=0)
    with pytest.raises(ValueError, match='iterations'):
        balanced_hierarchical_clustering(q, iterations=-1)
    with pytest.raises(ValueError, match='temperature'):
        balanced_hierarchical_clustering(q, temperature=0.0)
    with pytest.raises(TypeError, match='torch.Tensor'):
        balanced_hierarchical_clustering([[1.0]])


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_sort_keys_keep_the_float_order(dtype):
    """The clustering sorts integer codes of its float keys: the same permutation as sorting the floats, ties,
    negative keys and infinities included; NaN keys after +inf ones and ghost slots after everything."""
    g = torch.Generator().manual_seed(0)
    key = (torch.randint(-30, 30, (4, 2, 300), generator=g) / 7).to(dtype)  # many ties, both signs
    key[0, 0, :5] = torch.tensor([float('inf'), float('-inf'), float('nan'), -0.5, 1e-30], dtype=dtype)
    want = torch.sort(torch.where(key.isnan(), float('inf'), key).view(8, 300), dim=-1).indices
    got = torch.sort(_sort_keys(key, None).view(8, 300), dim=-1).indices
    assert torch.equal(got, want)
    ghost = torch.zeros(2, 300, dtype=torch.bool)
    ghost[:, -3:] = True
    order = torch.sort(_sort_keys(key, ghost).view(8, 300), dim=-1).indices
    assert (order[:, -3:] >= 297).all() and (order[:, :-3] < 297).all()


def test_exported_two_way_softmax_is_the_softmax(monkeypatch):
    """The ONNX branch's soft assignment (sigmoids of the logits' differences) gives the Softmax's values, at the
    temperature's large logits too (one side 0 or 1 to float64 precision)."""
    logits = torch.randn(3, 2, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 100
    expected = torch.softmax(logits, dim=1)
    monkeypatch.setattr(torch.onnx, 'is_in_onnx_export', lambda: True)
    got = _softmax_of_two(logits)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-300)
    assert got.shape == expected.shape


def test_token_clusters_names_the_cluster_of_every_token():
    q = torch.randn(2, 3, 900, 8, generator=torch.Generator().manual_seed(0))  # ghosts: 900 is not 49 * 2^K
    order = balanced_hierarchical_clustering(q)
    clusters = token_clusters(order)
    sizes = cluster_layout(900).cluster_sizes()
    start = 0
    for j, size in enumerate(sizes):  # the j-th run of the order is cluster j
        run = order[..., start : start + size]
        assert (clusters.gather(-1, run) == j).all()
        start += size
    assert torch.equal(torch.bincount(clusters[0, 0]), torch.tensor(sizes))


@pytest.mark.parametrize('order', [[0, 1, 2], torch.zeros(3), torch.tensor(1)])
def test_token_clusters_refuses_what_is_not_an_order(order):
    with pytest.raises(ValueError, match='order must be an int64 tensor'):
        token_clusters(order)
