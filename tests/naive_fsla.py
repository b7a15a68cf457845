"""A deliberately naive FSLA: plain Python loops over images, heads, groups and clusters, written from the
reference algorithm (mahaoyuHKU/pytorch-boat, ``ContentAttention``) and the ghost rule in boatvit/clustering.py's
docstring, for clarity only.

It is the oracle the vectorised ``boatvit.feature_space_attention`` is tested against. It shares no code with it.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch


def _unit(x: torch.Tensor) -> torch.Tensor:
    norm = x.norm()
    return x / norm if norm > 1e-12 else x * 0


def naive_clusters(
    q: torch.Tensor, cluster_size: int = 49, iterations: int = 2, temperature: float = 100.0
) -> List[List[int]]:
    """Clusters of one (image, head): ``q`` is ``(N, d)``. Each cluster is a list of padded slots: a token index,
    or -1 for a ghost."""
    N, d = q.shape
    levels = 0
    while N // cluster_size >= 2 ** (levels + 1):
        levels += 1
    size = math.ceil(N / 2**levels)
    ghosts = size * 2**levels - N
    groups: List[Tuple[List[int], int]] = [(list(range(N)), ghosts)]  # (real tokens in order, ghost count)
    zero = torch.zeros(d, dtype=q.dtype)
    for _ in range(levels):
        children = []
        for reals, g in groups:
            rows = [q[t] for t in reals] + [zero] * g
            n = len(rows)
            first = torch.stack(rows[: n // 2]).mean(0)
            second = torch.stack(rows[n // 2 :]).mean(0)
            centroids = [_unit(first), _unit(second)]
            for _ in range(iterations):
                new = [zero.clone(), zero.clone()]
                for row in rows:
                    cos = torch.stack([_unit(row) @ c for c in centroids])
                    weight = torch.softmax(cos * temperature, dim=0)
                    new[0] = new[0] + weight[0] * row
                    new[1] = new[1] + weight[1] * row
                centroids = [_unit(new[0]), _unit(new[1])]
            keys = []
            for t in reals:
                u = _unit(q[t])
                keys.append(((u @ centroids[0] + 1) / (u @ centroids[1] + 1)).item())
            ranked = [t for _, t in sorted(zip(keys, reals))]
            g0 = g // 2
            cut = n // 2 - g0
            children += [(ranked[:cut], g0), (ranked[cut:], g - g0)]
        groups = children
    return [reals + [-1] * g for reals, g in groups]


def naive_feature_space_attention(q, k, v, scale=None, cluster_size=49, overlap=20):
    """``(B, heads, N, d)`` q, k, v to the ``(B, heads, N, d)`` attention output, one query at a time."""
    B, heads, N, d = q.shape
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(heads):
            clusters = naive_clusters(q[b, h], cluster_size)
            for j, own in enumerate(clusters):
                if len(clusters) == 1:
                    extra = []
                elif j % 2 == 0:
                    extra = clusters[j + 1][:overlap]
                else:
                    extra = clusters[j - 1][len(clusters[j - 1]) - overlap :]
                keys = [t for t in own + extra if t >= 0]
                for t in own:
                    if t < 0:
                        continue
                    logits = torch.stack([q[b, h, t] @ k[b, h, s] for s in keys]) * scale
                    weights = torch.softmax(logits, dim=0)
                    out[b, h, t] = sum(w * v[b, h, s] for w, s in zip(weights, keys))
    return out


def naive_permutation(q: torch.Tensor, cluster_size: int = 49) -> torch.Tensor:
    """``(B, heads, N, d)`` to the ``(B, heads, N)`` real-token clustered order."""
    B, heads = q.shape[:2]
    return torch.tensor(
        [
            [[t for c in naive_clusters(q[b, h], cluster_size) for t in c if t >= 0] for h in range(heads)]
            for b in range(B)
        ]
    )
