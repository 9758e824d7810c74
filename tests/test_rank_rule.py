"""The default rank rule (ResidualEnergyRule): new knowledge-base columns from the residual the basis does
not explain, within a budget; compression by default on the embedded base."""
import pytest
import torch
from compress_tasks import add_compressed, add_naive

import gmem
from gmem.compress import EnergyRule, KnowledgeBase, ResidualEnergyRule, fit_coefficients
from gmem.compress.energy import budget_rank, rank_rule
from gmem.compress.knowledge import CompressionSettings

F64 = torch.float64


def _orthonormal(n, k, g):
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64))
    return q


def _add(kb, name, matrix, rule):
    lam, residual = fit_coefficients(kb, matrix)
    return kb.add_task(name, lam, residual, keep=rule)


def test_similar_task_adds_few_columns_and_new_content_adds_more():
    g = torch.Generator().manual_seed(3)
    o, i = 64, 48
    u, v = _orthonormal(o, 7, g), _orthonormal(i, 7, g)
    first = (u[:, :4] * torch.tensor([10.0, 8.0, 6.0, 4.0], dtype=F64)) @ v[:, :4].T
    first = first + 1e-3 * torch.randn(o, i, generator=g, dtype=F64)
    rule = ResidualEnergyRule(later_budget=0.2)
    kb = KnowledgeBase(o, i, F64)
    assert _add(kb, "a", first, rule)["new_rank"] >= 4
    similar = 1.05 * first + 1e-3 * torch.randn(o, i, generator=g, dtype=F64)  # the same directions, rescaled
    info_similar = _add(kb, "b", similar, rule)
    new = first + (u[:, 4:] * torch.tensor([5.0, 4.0, 3.0], dtype=F64)) @ v[:, 4:].T  # three new directions
    info_new = _add(kb, "c", new, rule)
    assert info_similar["new_rank"] <= 1
    assert info_new["new_rank"] >= 3 and info_new["new_rank"] > info_similar["new_rank"]
    assert not info_new["capped"]
    # the new task's stored matrix keeps what it learned outside the basis
    assert torch.linalg.norm(kb.dense("c") - new) <= 0.05 * torch.linalg.norm(new)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reconstruction_error_is_bounded_by_the_dropped_energy(seed):
    g = torch.Generator().manual_seed(seed)
    o, i = 37, 29
    rule = ResidualEnergyRule(keep=0.8, tolerance=0.01, budget=1.0, later_budget=1.0)
    kb = KnowledgeBase(o, i, F64)
    for name in ("a", "b", "c"):
        matrix = torch.randn(o, 3, generator=g, dtype=F64) @ torch.randn(3, i, generator=g, dtype=F64)
        matrix = matrix + 0.1 * torch.randn(o, i, generator=g, dtype=F64)
        lam, residual = fit_coefficients(kb, matrix)
        s = torch.linalg.svdvals(residual)
        allowed = rule.allowed_loss(s, float(lam.abs().sum()))
        info = kb.add_task(name, lam, residual, keep=rule)
        error = float(torch.linalg.norm(kb.dense(name) - matrix))
        assert not info["capped"]
        assert info["dropped_energy"] <= allowed * (1 + 1e-9)
        assert error <= info["dropped_energy"] + 1e-9
        assert info["rel_error"] == pytest.approx(error / float(torch.linalg.norm(matrix)), rel=1e-6)
        r = info["new_rank"]
        assert r == 0 or float(s[r - 1:].sum()) > allowed  # one column fewer would drop too much


def test_budget_caps_the_new_columns_and_reports_it():
    g = torch.Generator().manual_seed(4)
    o, i = 40, 30
    flat = torch.randn(o, i, generator=g, dtype=F64)  # a flat spectrum: keep 0.9 needs most columns
    rule = ResidualEnergyRule(budget=0.25, later_budget=0.05)
    kb = KnowledgeBase(o, i, F64)
    info = kb.add_task("a", torch.zeros(0, dtype=F64), flat, keep=rule)
    assert info["capped"] and info["new_rank"] == budget_rank(o, i, 0.25) > 0
    assert kb.stored_values("a") <= 0.25 * o * i
    info = _add(kb, "b", torch.randn(o, i, generator=g, dtype=F64), rule)
    assert info["capped"] and info["new_rank"] == budget_rank(o, i, 0.05)
    assert budget_rank(o, i, 0.05) < budget_rank(o, i, 0.25)


def test_rule_descriptions_round_trip_and_bad_ones_raise():
    rule = ResidualEnergyRule(keep=0.8, tolerance=0.05, budget=0.3, later_budget=0.1)
    assert rank_rule(rule.describe()) == rule
    assert rank_rule(None) == ResidualEnergyRule()
    assert rank_rule("width") == EnergyRule(None) and EnergyRule(None).describe() == "width"
    assert rank_rule(0.6) == EnergyRule(0.6)
    settings = CompressionSettings(**CompressionSettings().to_dict())  # a resumed run's settings
    assert settings.keep == ResidualEnergyRule()
    with pytest.raises(ValueError, match="width"):
        rank_rule("all")
    with pytest.raises(ValueError, match="residual rule"):
        rank_rule({"rule": "residual", "keeps": 0.5})
    with pytest.raises(ValueError, match="budget"):
        ResidualEnergyRule(budget=1.5)


def test_default_compress_stores_less_than_naive_on_the_embedded_base():
    mem = gmem.GANMemory.default()
    add_naive(mem, "posthoc", 5)  # every style entry perturbed: a flat spectrum in every matrix
    rec = mem.compress("posthoc")
    c = mem.parameter_counts("posthoc")
    assert rec["dense_layers"] == [] and rec["new_ranks"]
    assert "fc.gamma" in rec["new_ranks"] and "fc" in rec["layers"]  # the default compresses the fc too
    assert c["generator_stored"] < 0.5 * c["generator_style"]
    assert rec["keep"] == ResidualEnergyRule().describe() and rec["capped"]  # flat spectra hit the budget
    add_compressed(mem, "trained", 6, keep=None)  # the training path at the default rule
    c = mem.parameter_counts("trained")
    assert mem.records["trained"]["compression"]["dense_layers"] == []
    assert c["generator_stored"] < 0.2 * c["generator_style"]

