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
