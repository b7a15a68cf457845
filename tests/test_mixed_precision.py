"""Mixed precision: the clustering stays float32 under autocast, forward and backward stay finite under bf16 and
fp16 autocast (and with half-precision weights) for both families, and bf16 stays within a stated tolerance of
float32.

The tolerance is loose on purpose: the clustering is discontinuous, and under CPU autocast the block's LayerNorm
hands FSLA a bfloat16/float16 input, whose rounding alone moves most tokens of a random-weight model to other
clusters than in float32 (FSLA clusters float32 queries of a float32 input, see
``test_fsla_clusters_float32_queries_under_autocast``, but cannot undo an input's rounding). Measured
on these reduced models at 224x224 (5 seeds), the relative L2 error of ``forward_features`` against float32 is
0.017-0.020 (BOAT-Swin) and 0.009 (BOAT-CSWin) under bf16, 0.010-0.016 and 0.002 under fp16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.bench_precision import _to_tf32, agreement, emulated_tf32, output_change, tf32_agreement
from boatvit import FeatureSpaceAttention, balanced_hierarchical_clustering, cluster_layout
from boatvit.clustering import token_clusters

from reduced_models import reduced

AMP = {'bf16': torch.bfloat16, 'fp16': torch.float16}
# relative L2 error of a half-precision forward against float32 (features and logits), about 2.5x the worst measured
HALF_RTOL = 0.05


def images(batch: int, height: int, width: int) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(0))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_clustering_under_autocast_is_float32(amp):
    # 900 tokens: 4 levels of splits, 12 ghosts
    q = torch.randn(2, 3, 900, 16, generator=torch.Generator().manual_seed(0))
    expected = balanced_hierarchical_clustering(q)
    with torch.autocast('cpu', dtype=AMP[amp]):
        assert torch.equal(balanced_hierarchical_clustering(q), expected)
    # half-precision queries are clustered as their float32 values
    half = q.to(AMP[amp])
    assert torch.equal(balanced_hierarchical_clustering(half), balanced_hierarchical_clustering(half.float()))


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_autocast_forward_and_backward_are_finite(family, amp):
    # 112 x 120: stage 1 has 28 x 30 = 840 tokens (4 levels, 8 ghosts), so the ghost masking runs in half precision
    model = reduced(family, img_size=(112, 120)).train()
    x = images(2, 112, 120)
    with torch.autocast('cpu', dtype=AMP[amp]):
        logits = model(x)
    assert logits.dtype == AMP[amp]
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits.float(), torch.tensor([0, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_autocast_forward_close_to_float32(family, amp):
    model = reduced(family).eval()
    x = images(2, 224, 224)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model.forward_head(features)
        with torch.autocast('cpu', dtype=AMP[amp]):
            half_features = model.forward_features(x)
            half_logits = model.forward_head(half_features)
    assert relative_error(half_features, features) < HALF_RTOL
    assert relative_error(half_logits, logits) < HALF_RTOL


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_half_precision_weights(family, dtype):
    model = reduced(family, img_size=(112, 120)).eval()
    x = images(2, 112, 120)
    with torch.no_grad():
        expected = model(x)
        logits = model.to(dtype)(x.to(dtype))
    assert logits.dtype == dtype
    assert relative_error(logits, expected) < HALF_RTOL


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_fsla_clusters_float32_queries_under_autocast(amp):
    """A 56 x 56 grid (BOAT-Swin-T stage 1, 6 levels) on random weights: the queries the qkv Linear rounds to half
    precision put most tokens in other clusters (24 % stay under bf16, 73 % under fp16); the layer's own float32
    queries keep >= 99.9 % (measured: all) where float32 put them."""
    layer = FeatureSpaceAttention(96, 3, float32_clustering=True).eval()
    x = F.layer_norm(torch.randn(2, 3136, 96, generator=torch.Generator().manual_seed(0)), (96,))
    with torch.no_grad():
        expected = token_clusters(layer.cluster_order(x, (56, 56)), 49)
        with torch.autocast('cpu', dtype=AMP[amp]):
            kept = token_clusters(layer.cluster_order(x, (56, 56)), 49)
            layer.float32_clustering = False
            rounded = token_clusters(layer.cluster_order(x, (56, 56)), 49)
    assert (kept == expected).float().mean() >= 0.999
    assert (rounded == expected).float().mean() < 0.9


def test_cluster_order_is_what_forward_clusters(monkeypatch):
    """Under autocast too, ``cluster_order`` returns the clustering the forward attends in (400 tokens: no ghosts)."""
    import boatvit.fsla as fsla

    layer = FeatureSpaceAttention(32, 2).eval()
    x = torch.randn(1, 400, 32, generator=torch.Generator().manual_seed(1))
    seen = []

    def spy(*args, **kwargs):
        seen.append(balanced_hierarchical_clustering(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(fsla, 'balanced_hierarchical_clustering', spy)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        layer(x, (20, 20))
        order = layer.cluster_order(x, (20, 20))
    assert not cluster_layout(400).ghost_slots
    assert len(seen) == 2 and torch.equal(seen[0], order)


def test_bench_precision_measures_what_fsla_controls():
    """``benchmarks/bench_precision.py`` on a reduced BOAT-Swin at 112 x 120 (stage 1: 840 tokens, 4 levels, ghosts):
    a row per FSLA layer with several clusters and dtype, every FSLA layer given its float32 input keeps all tokens
    in their float32 clusters under autocast, and the script's other columns are shares."""
    model = reduced('swin', img_size=(112, 120)).eval()
    rows = agreement(model, images(1, 112, 120))
    assert {r['amp'] for r in rows} == set(AMP) and {r['tokens'] for r in rows} >= {840}
    for row in rows:
        assert row['float32_input'] == 100.0, row
        assert 0 <= row['rounded_queries'] <= 100 and 0 <= row['whole_model'] <= 100
    change = output_change(model, images(2, 112, 120))
    assert set(change) == {*AMP, 'tf32_convs', 'tf32_matmuls'}
    assert all(0 <= c['logits_rel_l2'] < HALF_RTOL and 0 <= c['same_top1'] <= 100 for c in change.values())
    # the emulated TF32 rounding reaches the logits (how far depends on the tokens it moves, as under autocast)
    assert change['tf32_convs']['logits_rel_l2'] > 0 and change['tf32_matmuls']['logits_rel_l2'] > 0


def test_tf32_emulation_rounds_to_ten_mantissa_bits():
    """``_to_tf32`` against rounding the significand to 11 bits (``frexp``, ``torch.round`` ties to even), ties
    included; the emulation rounds what F.linear and torch.bmm read and puts the functions back afterwards."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10000, generator=g) * 10.0 ** torch.randint(-20, 20, (10000,), generator=g)
    one = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11), 0.0, 2.0**-126])
    for t in (x, one):
        mantissa, exponent = torch.frexp(t.double())
        expected = torch.ldexp(torch.round(mantissa * 2**11) / 2**11, exponent.double()).float()
        assert torch.equal(_to_tf32(t), expected)
    assert _to_tf32(one)[:2].tolist() == [1.0, 1 + 2**-9]
    a, b = torch.randn(3, 4, 5, generator=g), torch.randn(3, 5, 6, generator=g)
    linear, bmm = F.linear, torch.bmm
    with emulated_tf32(convolutions=True, matmuls=True):
        got = torch.bmm(a, b)
        got_linear = F.linear(a, b[0].T)
    assert F.linear is linear and torch.bmm is bmm
    torch.testing.assert_close(got, (_to_tf32(a).double() @ _to_tf32(b).double()).float())
    torch.testing.assert_close(got_linear, (_to_tf32(a).double() @ _to_tf32(b[0]).double()).float())
    assert not torch.allclose(got, torch.bmm(a, b), rtol=1e-6, atol=0)


def test_bench_precision_tf32_columns():
    model = reduced('swin', img_size=(112, 120)).eval()
    backends = [m.backend for m in model.modules() if isinstance(m, FeatureSpaceAttention)]
    rows = tf32_agreement(model, images(1, 112, 120))
    assert {r['tokens'] for r in rows} >= {840}
    for row in rows:
        for column in ('tf32_convs_whole_model', 'tf32_matmuls_float32_input', 'tf32_matmuls_whole_model'):
            assert 0 <= row[column] <= 100
    assert [m.backend for m in model.modules() if isinstance(m, FeatureSpaceAttention)] == backends
