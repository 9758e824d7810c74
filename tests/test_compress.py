"""gmem.compress: energy truncation (sum of singular values), style compression, knowledge base."""
import pytest
import torch
from torch import nn

import gmem.nn as gnn
from gmem.compress import compress_style, compress_tasks, energy_rank, express_in_base, knowledge_base, truncate_energy


def _matrix(singular, m=7, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(singular), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(singular), generator=g, dtype=torch.float64))
    return (u * torch.tensor(singular, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("keep,rank", [(0.5, 1), (0.51, 2), (0.8, 2), (0.81, 3), (0.95, 3), (0.96, 4), (1.0, 4)])
def test_truncate_energy_uses_sum_of_singular_values(keep, rank):
    # singular values 5, 3, 1.5, 0.5 (total 10): cumulative 0.5, 0.8, 0.95, 1.0 of the energy
    m = _matrix([5.0, 3.0, 1.5, 0.5])
    u, s, v = truncate_energy(m, keep)
    assert s.numel() == rank and u.shape == (7, rank) and v.shape == (5, rank)
    torch.testing.assert_close(s, torch.tensor([5.0, 3.0, 1.5, 0.5], dtype=torch.float64)[:rank])
    if rank == 4:
        torch.testing.assert_close((u * s) @ v.T, m)


def test_truncate_energy_is_fewest_triplets_and_edge_cases():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(9, 6, generator=g)
    s_all = torch.linalg.svdvals(m)
    for keep in (0.3, 0.7, 0.99):
        r = truncate_energy(m, keep)[1].numel()
        assert s_all[:r].sum() >= keep * s_all.sum() * (1 - 1e-6)
        assert r == 1 or s_all[: r - 1].sum() < keep * s_all.sum()
    assert truncate_energy(torch.zeros(3, 4), 0.9)[1].numel() == 0
    assert energy_rank(torch.tensor([1.0, 1.0]), 0.0) == 0
    with pytest.raises(ValueError, match="keep"):
        truncate_energy(m, 1.5)
    with pytest.raises(ValueError, match="matrix"):
        truncate_energy(torch.zeros(2, 2, 2), 0.5)


def test_compress_style_and_knowledge_base():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.LeakyReLU(), nn.Conv2d(8, 4, 3, padding=1))
    gnn.convert(model)
    for name in ("a", "b"):
        gnn.add_task(model, name)
        with torch.no_grad():
            for p in gnn.style_parameters(model, name):
                p.add_(0.05 * torch.randn_like(p))
    comp = compress_style(model, "a", keep=1.0)
    assert set(comp) == {"0", "2"}
    for entry in comp.values():
        assert entry["gamma"]["rel_error"] < 1e-6 and entry["gamma"]["rank"] <= entry["gamma"]["full_rank"]
    low = compress_style(model, "a", keep=0.5)
    assert all(e["gamma"]["rank"] <= comp[k]["gamma"]["rank"] for k, e in low.items())
    with pytest.raises(ValueError, match="source"):
        compress_style(model, "source")

    layer = model[0]
    mats = [layer.style(1)[0].detach(), layer.style(2)[0].detach()]
    L, R = knowledge_base(mats, keep=1.0)
    factors, info = express_in_base(mats[0], L, R, keep=1.0)
    assert info["rel_error"] < 1e-5
    torch.testing.assert_close(factors.dense(), mats[0], rtol=1e-4, atol=1e-5)


def test_compress_tasks_shares_a_basis():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(12, 10, 3, padding=1))
    gnn.convert(model)
    layer = model[0]
    shared_u, shared_v = torch.randn(10, 2), torch.randn(12, 2)
    for k, name in enumerate(("a", "b", "c")):
        gnn.add_task(model, name)
        with torch.no_grad():  # gamma = a common rank-2 part with task-specific weights
            layer.styles[k].gamma.copy_((shared_u * torch.tensor([1.0 + k, 2.0])) @ shared_v.T)
    rep = compress_tasks(model, ["a", "b", "c"], keep_base=0.999, keep_own=0.99)
    entry = rep["layers"]["0"]
    assert entry["shared_rank"] == 2 and rep["max_rel_error"] < 1e-5
    assert all(t["own_rank"] == 0 for t in entry["tasks"].values())
    assert rep["compressed_values"] < rep["dense_values"]
    torch.testing.assert_close(entry["tasks"]["b"]["factors"].dense(), layer.styles[1].gamma.detach(),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="source"):
        compress_tasks(model, ["source"])
