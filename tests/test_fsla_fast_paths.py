"""The parts of the fast FSLA that the forward parity tests do not reach: its backward and autocast."""

import pytest
import torch

from boatvit import FeatureSpaceAttention, balanced_hierarchical_clustering, feature_space_attention

from naive_fsla import naive_feature_space_attention


@pytest.mark.parametrize('n', [196, 150])  # no ghosts; ghosts and uneven clusters
def test_gradients_match_naive(n):
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, 2, n, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    weight = torch.randn(1, 2, n, 4, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((feature_space_attention(q, k, v) * weight).sum(), (q, k, v))
    expected = torch.autograd.grad((naive_feature_space_attention(q, k, v) * weight).sum(), (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_module_gradients_match_naive_with_lepe():
    torch.manual_seed(0)
    module = FeatureSpaceAttention(8, 2).double()
    x = torch.randn(2, 10 * 15, 8, dtype=torch.float64, requires_grad=True)
    B, N, C = x.shape

    def naive(x):
        q, k, v = module.qkv(x).view(B, N, 3, 2, 4).permute(2, 0, 3, 1, 4)
        attn = naive_feature_space_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        lepe = module.lepe(v.permute(0, 1, 3, 2).reshape(B, C, 10, 15)).flatten(2).transpose(1, 2)
        return module.proj(attn + lepe)

    params = [x, *module.parameters()]
    grads = torch.autograd.grad(module(x, (10, 15)).square().sum(), params)
    expected = torch.autograd.grad(naive(x).square().sum(), params)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_autocast_does_not_change_the_clustering():
    q = torch.randn(2, 3, 392, 16, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        under_autocast = balanced_hierarchical_clustering(q)
    assert torch.equal(under_autocast, balanced_hierarchical_clustering(q.float()))


def test_attention_route_sdpa_only_while_autograd_records(monkeypatch):
    """The PyTorch route (GPUs, or backend='torch'): CPU inference attends by matmul (the faster route there);
    autograd-recording calls keep SDPA, whose kernels store no attention probabilities for backward."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []
    monkeypatch.setattr(
        torch.nn.functional,
        'scaled_dot_product_attention',
        lambda *args, **kwargs: calls.append(1) or sdpa(*args, **kwargs),
    )
    q, k, v = torch.randn(3, 1, 2, 196, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    with torch.inference_mode():
        feature_space_attention(q, k, v, backend='torch')
    assert calls == []
    feature_space_attention(q.requires_grad_(), k, v, backend='torch')
    assert len(calls) == 2  # the even and the odd clusters
