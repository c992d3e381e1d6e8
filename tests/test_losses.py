"""H-GKD losses and memory queue against direct computations of the equations (Sec. 3.2.2)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hgkd.distill.losses import masked_mse, pearson, pooled_embedding, similarity_loss
from hgkd.distill.queue import MemoryQueue

FIXTURE = Path(__file__).parent / "fixtures" / "hgkd_losses.json"


def fixed_tensors():
    g = torch.Generator().manual_seed(1234)
    t = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    s = t + 0.3 * torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    valid = torch.rand(3, 5, generator=g) > 0.3
    valid[:, 0] = True
    queue = torch.nn.functional.normalize(torch.randn(7, 8, generator=g, dtype=torch.float64), dim=-1)
    return t, s, valid, queue


def direct_similarity_loss(t_pool, s_pool, queue, tau):
    """Element by element: cosines, softmax over the queue, Pearson correlation, 1 - r."""
    losses = []
    for b in range(t_pool.shape[0]):
        def dist(x):
            cos = [float(x @ q) / (float(x.norm()) * float(q.norm())) for q in queue]
            exps = [math.exp(c / tau) for c in cos]
            return [e / sum(exps) for e in exps]

        pt, ps = dist(t_pool[b]), dist(s_pool[b])
        mt, ms = sum(pt) / len(pt), sum(ps) / len(ps)
        cov = sum((a - mt) * (c - ms) for a, c in zip(pt, ps))
        r = cov / math.sqrt(sum((a - mt) ** 2 for a in pt) * sum((c - ms) ** 2 for c in ps))
        losses.append(1 - r)
    return sum(losses) / len(losses)


def test_masked_mse_is_mean_over_valid_tokens_only():
    t, s, valid, _ = fixed_tensors()
    expected = sum(float(((s[b, n] - t[b, n]) ** 2).mean()) for b in range(3) for n in range(5) if valid[b, n])
    expected /= int(valid.sum())
    assert masked_mse(s, t, valid).item() == pytest.approx(expected, rel=1e-12)
    s2 = s.clone()
    s2[~valid] += 100.0  # invalid tokens (MAE: hidden patches) must not matter
    assert masked_mse(s2, t, valid).item() == pytest.approx(expected, rel=1e-12)


def test_pooled_embedding_is_normalised_mean_of_valid_tokens():
    t, _, valid, _ = fixed_tensors()
    pooled = pooled_embedding(t, valid)
    for b in range(3):
        mean = t[b][valid[b]].mean(0)
        torch.testing.assert_close(pooled[b], mean / mean.norm())


@pytest.mark.parametrize("tau", [0.009, 0.07, 1.0])
def test_similarity_loss_matches_the_equations(tau):
    t, s, valid, queue = fixed_tensors()
    t_pool, s_pool = pooled_embedding(t, valid), pooled_embedding(s, valid)
    got = similarity_loss(t_pool, s_pool, queue, tau).item()
    assert got == pytest.approx(direct_similarity_loss(t_pool, s_pool, queue, tau), rel=1e-9, abs=1e-12)
    assert similarity_loss(t_pool, t_pool, queue, tau).item() == pytest.approx(0.0, abs=1e-12)


def test_pearson_is_scale_and_shift_invariant():
    x = torch.randn(4, 30, dtype=torch.float64)
    torch.testing.assert_close(pearson(x, 3 * x + 2), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(pearson(x, -x), -torch.ones(4, dtype=torch.float64))


def test_regression_fixture():
    """Precomputed values on fixed tensors (torchdistill-style regression guard)."""
    t, s, valid, queue = fixed_tensors()
    t_pool, s_pool = pooled_embedding(t, valid), pooled_embedding(s, valid)
    values = {"mse": masked_mse(s, t, valid).item(),
              "sim_tau_0.009": similarity_loss(t_pool, s_pool, queue, 0.009).item(),
              "sim_tau_0.2": similarity_loss(t_pool, s_pool, queue, 0.2).item()}
    expected = json.loads(FIXTURE.read_text())
    assert values == pytest.approx(expected, rel=1e-9)


def test_queue_is_fifo_with_wraparound_and_enqueue_first():
    q = MemoryQueue(length=5, dim=2)
    first = torch.nn.functional.normalize(torch.arange(6.0).view(3, 2) + 1, dim=-1)
    q.push(first * 3)  # stored normalised
    assert int(q.filled) == 3
    torch.testing.assert_close(q.contents(), first)
    second = torch.nn.functional.normalize(torch.arange(6.0, 14.0).view(4, 2), dim=-1)  # 3 + 4 > 5: wraps
    q.push(second)
    assert int(q.filled) == 5 and int(q.ptr) == 2
    # slots 0-2 held first[0..2]; second fills slots 3, 4, 0, 1: only first[2] survives
    torch.testing.assert_close(q.contents(), torch.stack([second[2], second[3], first[2], second[0], second[1]]))
    big = torch.nn.functional.normalize(torch.arange(100.0, 114.0).view(7, 2), dim=-1)
    q.push(big)  # a batch larger than the queue keeps its newest 5
    got = torch.tensor(sorted(map(tuple, q.contents().tolist())))
    torch.testing.assert_close(got, torch.tensor(sorted(map(tuple, big[2:].tolist()))))
