"""The diversity figure: share of near-duplicate pairs."""
import pytest
import torch


def test_near_duplicate_share_counts_close_pairs():
    from gmem.eval import near_duplicate_share

    g = torch.Generator().manual_seed(0)
    distinct = torch.rand(20, 3, 32, 32, generator=g) * 2 - 1
    assert near_duplicate_share(distinct) == 0.0
    assert near_duplicate_share(distinct[:1].expand(10, -1, -1, -1).clone()) == 1.0
    mixed = torch.cat([distinct[:10], distinct[:1] + 0.01])  # one near-copy of image 0: 1 of 55 pairs
    assert near_duplicate_share(mixed) == pytest.approx(1 / 55)
    with pytest.raises(ValueError, match="at least 2"):
        near_duplicate_share(distinct[:1])


def test_nearest_neighbour_ratio_separates_collapse_from_the_data():
    from gmem.eval import nearest_neighbour_ratio

    g = torch.Generator().manual_seed(1)
    real = torch.rand(64, 3, 16, 16, generator=g) * 2 - 1
    other = torch.rand(64, 3, 16, 16, generator=g) * 2 - 1  # a second draw of the same distribution
    assert 0.8 < nearest_neighbour_ratio(other, real) < 1.25
    assert nearest_neighbour_ratio(real, real) == 1.0
    # four modes with small jitter: every sample has a close neighbour
    collapsed = real[:4].repeat(16, 1, 1, 1) + 0.01 * torch.randn(64, 3, 16, 16, generator=g)
    assert nearest_neighbour_ratio(collapsed, real) < 0.1
    with pytest.raises(ValueError, match="same"):
        nearest_neighbour_ratio(real[:, :1], real)
    with pytest.raises(ValueError, match="at least 2"):
        nearest_neighbour_ratio(real[:1], real)
    with pytest.raises(ValueError, match="duplicate"):
        nearest_neighbour_ratio(real, real[:1].expand(8, -1, -1, -1))
