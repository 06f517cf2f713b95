"""The greedy k-center coreset (training.coreset) against brute-force references on small data."""

from __future__ import annotations

import itertools

import pytest
import torch

from defectops.training.coreset import coreset_size, greedy_coreset


def _brute_force_greedy(x: torch.Tensor, k: int, first: int) -> list[int]:
    """The textbook greedy k-center: every step recomputes each point's distance to every selected point."""
    chosen = [first]
    while len(chosen) < k:
        radius = [min(float(torch.dist(x[i], x[c])) for c in chosen) for i in range(len(x))]
        chosen.append(max(range(len(x)), key=lambda i: radius[i]))
    return chosen


def _radius(x: torch.Tensor, chosen: list[int]) -> float:
    return float(torch.cdist(x, x[chosen]).min(1).values.max())


def test_selection_equals_the_brute_force_greedy_without_projection() -> None:
    x = torch.randn(60, 5, generator=torch.Generator().manual_seed(1))
    got = greedy_coreset(x, 12, project_dim=0, seed=3).tolist()
    assert got == _brute_force_greedy(x, 12, got[0])
    assert len(set(got)) == 12


def test_radius_is_within_twice_the_optimum() -> None:
    """Greedy k-center is a 2-approximation: checked against the exhaustive optimum on 14 points."""
    for seed in range(5):
        x = torch.randn(14, 3, generator=torch.Generator().manual_seed(seed))
        k = 3
        optimum = min(_radius(x, list(c)) for c in itertools.combinations(range(len(x)), k))
        got = greedy_coreset(x, k, project_dim=0, seed=seed).tolist()
        assert _radius(x, got) <= 2 * optimum + 1e-6


def test_projection_is_seeded_and_still_finds_every_cluster() -> None:
    """20 tight clusters in 256 dimensions, projected to 32: 20 selected rows hit all 20 clusters."""
    g = torch.Generator().manual_seed(0)
    centres = 10 * torch.randn(20, 256, generator=g)
    cluster = torch.arange(400) % 20
    x = centres[cluster] + 0.1 * torch.randn(400, 256, generator=g)
    a = greedy_coreset(x, 20, project_dim=32, seed=7)
    assert torch.equal(a, greedy_coreset(x, 20, project_dim=32, seed=7))
    assert not torch.equal(a, greedy_coreset(x, 20, project_dim=32, seed=8))
    assert sorted(cluster[a].tolist()) == list(range(20))


def test_progress_counts_every_selected_row() -> None:
    seen: list[int] = []
    greedy_coreset(torch.randn(500, 4), 237, progress=seen.append)
    assert sum(seen) == 237
    one: list[int] = []
    greedy_coreset(torch.randn(5, 4), 1, progress=one.append)
    assert sum(one) == 1


def test_size_from_ratio_and_cap() -> None:
    assert coreset_size(278_000, 0.01, None) == 2780
    assert coreset_size(278_000, 0.01, 1000) == 1000
    assert coreset_size(50, 0.001, None) == 1
    with pytest.raises(ValueError, match="coreset ratio"):
        coreset_size(10, 0.0, None)
    with pytest.raises(ValueError, match="N x D"):
        greedy_coreset(torch.empty(0, 3), 1)


def test_keeping_everything_selects_every_row_in_order() -> None:
    seen: list[int] = []
    assert greedy_coreset(torch.randn(7, 3), 10, progress=seen.append).tolist() == list(range(7))
    assert sum(seen) == 7
