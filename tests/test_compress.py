"""gmem.compress: energy rule, training-time prior, knowledge base (Algorithm 1), storage, study outputs."""
import math

import pytest
import torch
from torch import nn

import gmem.nn as gnn
from gmem.compress import (
    EnergyRule,
    KnowledgeBase,
    RankRule,
    ResidualEnergyRule,
    compress_style,
    compress_tasks,
    energy_rank,
    energy_table,
    express_in_base,
    fit_coefficients,
    knowledge_base,
    plot_singular_values,
    residual_rank,
    singular_values,
    storage_table,
    truncate_energy,
    width_fraction,
)
from gmem.lowrank import LowRankStyle, nuclear_prior, prior_weights
from gmem.ops import LowRank, modulated_conv2d, normalize_weight

F64 = torch.float64


def _matrix(singular, m=7, n=5, seed=0, dtype=F64):
    """A matrix [m, n] with exactly the given singular values (random orthonormal factors)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(singular), generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(n, len(singular), generator=g, dtype=F64))
    return ((u * torch.tensor(singular, dtype=F64)) @ v.T).to(dtype)


# ---- the energy rule ---------------------------------------------------------------------------------
@pytest.mark.parametrize("keep,rank", [(0.5, 1), (0.51, 2), (0.8, 2), (0.81, 3), (0.95, 3), (0.96, 4), (1.0, 4)])
def test_truncate_energy_uses_sum_of_singular_values(keep, rank):
    # singular values 5, 3, 1.5, 0.5 (total 10): cumulative 0.5, 0.8, 0.95, 1.0 of the energy
    m = _matrix([5.0, 3.0, 1.5, 0.5])
    u, s, v = truncate_energy(m, keep)
    assert s.numel() == rank and u.shape == (7, rank) and v.shape == (5, rank)
    torch.testing.assert_close(s, torch.tensor([5.0, 3.0, 1.5, 0.5], dtype=F64)[:rank])


def test_truncate_energy_diagonal_closed_form():
    d = torch.tensor([1.0, 4.0, 2.0, 3.0], dtype=F64)  # unsorted on the diagonal: 4, 3, 2, 1 (total 10)
    for keep, rank in ((0.4, 1), (0.41, 2), (0.7, 2), (0.9, 3), (0.91, 4)):
        u, s, v = truncate_energy(torch.diag(d), keep)
        assert s.tolist() == sorted(d.tolist(), reverse=True)[:rank]
        # singular vectors of a diagonal matrix are (signed) unit vectors at the value's position
        for k in range(rank):
            pos = int((d == s[k]).nonzero())
            assert abs(float(u[pos, k])) == pytest.approx(1.0) and abs(float(v[pos, k])) == pytest.approx(1.0)


def test_truncate_energy_ties_count_by_value():
    d = torch.diag(torch.tensor([2.0, 2.0, 1.0, 1.0], dtype=F64))  # total 6
    for keep, rank in ((1 / 3, 1), (0.34, 2), (2 / 3, 2), (0.67, 3), (5 / 6, 3), (0.84, 4)):
        assert truncate_energy(d, keep)[1].numel() == rank, keep
    u, s, v = truncate_energy(torch.diag(torch.tensor([2.0, 2.0, 1.0], dtype=F64)), 0.4)  # one of a tie
    assert s.tolist() == [2.0] and abs(float(u[2, 0])) < 1e-12 and abs(float(v[2, 0])) < 1e-12


def test_truncate_energy_keep_zero_and_one():
    m = _matrix([3.0, 2.0, 1.0], m=6, n=4, dtype=torch.float32)
    u, s, v = truncate_energy(m, 0.0)  # documented: an empty sum already reaches 0 -> rank 0
    assert u.shape == (6, 0) and s.shape == (0,) and v.shape == (4, 0) and s.dtype == torch.float32
    g = torch.Generator().manual_seed(3)
    for dtype, tol in ((F64, 1e-12), (torch.float32, 1e-6)):
        full = torch.randn(8, 5, generator=g, dtype=F64).to(dtype)
        u, s, v = truncate_energy(full, 1.0)
        assert s.numel() == 5 and s.dtype == dtype
        torch.testing.assert_close((u * s) @ v.T, full, rtol=tol, atol=tol)
    # exact zero singular values are not counted at keep = 1; a zero matrix has rank 0
    assert truncate_energy(torch.diag(torch.tensor([3.0, 1.0, 0.0])), 1.0)[1].numel() == 2
    assert truncate_energy(torch.zeros(3, 4), 0.9)[1].numel() == 0


def test_truncate_energy_is_fewest_triplets():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(9, 6, generator=g)
    s_all = torch.linalg.svdvals(m.double())
    for keep in (0.3, 0.7, 0.99):
        r = truncate_energy(m, keep)[1].numel()
        assert s_all[:r].sum() >= keep * s_all.sum() * (1 - 1e-9)
        assert s_all[: r - 1].sum() < keep * s_all.sum()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_truncate_energy_rejects_non_finite(bad):
    m = torch.ones(3, 3)
    m[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        truncate_energy(m, 0.5)


def test_energy_rule_input_errors():
    with pytest.raises(ValueError, match="keep"):
        truncate_energy(torch.eye(2), 1.5)
    with pytest.raises(ValueError, match="keep"):
        truncate_energy(torch.eye(2), float("nan"))
    with pytest.raises(TypeError, match="keep"):
        truncate_energy(torch.eye(2), True)
    with pytest.raises(ValueError, match="matrix"):
        truncate_energy(torch.zeros(2, 2, 2), 0.5)
    with pytest.raises(ValueError, match="matrix"):
        truncate_energy(torch.eye(2, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="descending"):
        energy_rank(torch.tensor([1.0, 2.0]), 0.5)
    with pytest.raises(ValueError, match=">= 0"):
        energy_rank(torch.tensor([1.0, -1.0]), 0.5)
    with pytest.raises(ValueError, match="base_energy"):
        residual_rank(torch.tensor([1.0]), 0.5, -1.0)


def test_residual_rank_counts_the_base_energy():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # residual energy 8
    # base energy 3: total 11
    assert residual_rank(s, 0.25, 3.0) == 0  # 3 >= 2.75: the base alone suffices
    assert residual_rank(s, 0.6, 3.0) == 1  # need 6.6: 3 + 4
    assert residual_rank(s, 0.8, 3.0) == 2  # need 8.8: 3 + 4 + 2
    assert energy_rank(s, 0.8) == 3  # the residual alone needs 6.4: 4 + 2 + 1
    assert residual_rank(s, 1.0, 3.0) == 4 and residual_rank(s, 0.8, 0.0) == energy_rank(s, 0.8)


@pytest.mark.parametrize("width,frac", [(1, 1.0), (16, 1.0), (63, 1.0), (64, 1.0), (96, 1.0), (128, 1.0),
                                        (256, 0.95), (384, 0.95), (512, 0.9), (1023, 0.9), (1024, 0.8), (4096, 0.8)])
def test_width_fraction(width, frac):
    assert width_fraction(width) == frac


def test_width_fraction_rejects_bad_width():
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="width"):
            width_fraction(bad)


# ---- the prior and the training-time parameterisation -----------------------------------------------
def test_prior_weights_and_closed_form():
    eta = prior_weights(3, F64)
    torch.testing.assert_close(eta, 0.1 + torch.sigmoid(torch.tensor([0.0, 10 / 3, 20 / 3], dtype=F64)))
    assert float(eta[0]) == pytest.approx(0.6) and bool((eta[1:] > eta[:-1]).all())
    m = _matrix([3.0, 2.0, 1.0], m=3, n=4)  # J = min(O, I) = 3 singular values
    want = 0.01 * (3 * float(eta[0]) + 2 * float(eta[1]) + 1 * float(eta[2]))
    assert float(nuclear_prior(m)) == pytest.approx(want, rel=1e-12)
    assert float(nuclear_prior(m, weighted=False)) == pytest.approx(0.06, rel=1e-12)
    assert float(nuclear_prior(m, weighted=False, weight=1.0)) == pytest.approx(6.0, rel=1e-12)
    stack = torch.stack([m, 2 * m])  # a stack's priors are summed
    assert float(nuclear_prior(stack)) == pytest.approx(3 * want, rel=1e-12)
    # J counts every singular value, zeros included (as the released code): a 5 x 4 matrix has J = 4
    eta4 = prior_weights(4, F64)
    wide = _matrix([3.0, 2.0, 1.0], m=5, n=4)
    assert float(nuclear_prior(wide)) == pytest.approx(0.01 * float((torch.tensor([3.0, 2, 1, 0]) * eta4).sum()))


@pytest.mark.parametrize("weighted", [True, False])
def test_nuclear_prior_gradcheck(weighted):
    m = _matrix([3.0, 2.0, 1.0, 0.5], m=5, n=4, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: nuclear_prior(x, weighted=weighted), (m,))


def test_nuclear_prior_at_zero_is_finite_and_rejects_nan():
    z = torch.zeros(4, 3, requires_grad=True)
    nuclear_prior(z).backward()
    assert bool(torch.isfinite(z.grad).all())
    with pytest.raises(ValueError, match="NaN or Inf"):
        nuclear_prior(torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="matrix"):
        nuclear_prior(torch.ones(3))


def test_lowrank_style_dense_and_gradients():
    g = torch.Generator().manual_seed(4)
    L, R = torch.randn(6, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    lam, e = torch.randn(3, generator=g, dtype=F64), torch.randn(6, 5, generator=g, dtype=F64)
    style = LowRankStyle(L, R, lam, e)
    want = sum(lam[k] * torch.outer(L[:, k], R[:, k]) for k in range(3)) + e
    torch.testing.assert_close(style.dense(), want, rtol=1e-12, atol=1e-12)
    w = torch.randn(6, 5, generator=g, dtype=F64)
    (style.dense() * w).sum().backward()
    torch.testing.assert_close(style.lam.grad, torch.diag(L.T @ w @ R))  # d/dlam_k = l_k^T W r_k
    torch.testing.assert_close(style.residual.grad, w)
    assert [n for n, _ in style.named_parameters()] == ["lam", "residual"]
    assert {n for n, _ in style.named_buffers()} == {"L", "R"}
    torch.testing.assert_close(style.prior(first_task=True), nuclear_prior(e, weighted=False))
    torch.testing.assert_close(style.prior(), nuclear_prior(e))
    fresh = LowRankStyle(L, R)  # defaults: lam = ones, residual = zeros
    assert torch.equal(fresh.lam.detach(), torch.ones(3, dtype=F64)) and not fresh.residual.detach().any()


def test_lowrank_style_errors():
    with pytest.raises(ValueError, match="column counts"):
        LowRankStyle(torch.zeros(4, 2), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="lam"):
        LowRankStyle(torch.zeros(4, 2), torch.zeros(3, 2), lam=torch.ones(3))
    with pytest.raises(ValueError, match="residual"):
        LowRankStyle(torch.zeros(4, 2), torch.zeros(3, 2), residual=torch.ones(3, 4))


# ---- the knowledge base --------------------------------------------------------------------------------
def _train_stream(o=6, i=5, tasks=("a", "b", "c"), keep=None, seed=5):
    """Simulate training: each task on the current base with lam moved and a random residual.

    Returns the base and each task's dense G_t = L diag(lam) R^T + E in float64 (the oracle).
    """
    g = torch.Generator().manual_seed(seed)
    kb, dense = KnowledgeBase(o, i), {}
    for name in tasks:
        style = LowRankStyle.from_base(kb, residual=torch.randn(o, i, generator=g) * 0.3)
        assert torch.equal(style.lam.detach(), kb.next_coefficients())
        with torch.no_grad():  # "training" moves lam and E
            style.lam.add_(0.1 * torch.randn(style.lam.shape, generator=g))
        L, R = kb.columns()
        dense[name] = (L.double() * style.lam.detach().double()) @ R.double().T + style.residual.detach().double()
        kb.add_task(name, style.lam.detach(), style.residual.detach(), keep=keep)
    return kb, dense


def test_base_full_rank_reconstruction_and_express_factors():
    kb, dense = _train_stream(keep="width")  # width 6 < 64: the released width rule keeps all energy
    assert kb.rank == 15 and kb.column_tasks() == ["a"] * 5 + ["b"] * 5 + ["c"] * 5
    for name, k_prev in (("a", 0), ("b", 5), ("c", 10)):
        lr = kb.express(name)
        assert isinstance(lr, LowRank) and lr.dtype == torch.float32 and lr.rank == k_prev + 5
        torch.testing.assert_close(lr.dense().double(), dense[name], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kb.dense(name), lr.dense())
        L, R = kb.columns()  # P_t = [L_used | U_t], Q_t = [R_used | V_t], q_t = [lam_t; s_t]
        assert torch.equal(lr.u, L[:, : k_prev + 5]) and torch.equal(lr.v, R[:, : k_prev + 5])
        s = torch.linalg.svdvals((dense[name] - (L[:, :k_prev].double() * lr.s[:k_prev].double())
                                  @ R[:, :k_prev].double().T))
        torch.testing.assert_close(lr.s[k_prev:].double(), s, rtol=1e-5, atol=1e-5)


def test_base_only_grows_and_earlier_tasks_stay_bit_identical():
    kb, _ = _train_stream(tasks=("a",), keep=0.8)
    before = kb.express("a")
    u, s, v = before.u.clone(), before.s.clone(), before.v.clone()
    L0 = kb.columns()[0].clone()
    g = torch.Generator().manual_seed(9)
    for name in ("b", "c", "d"):
        lam = kb.next_coefficients() + 0.05 * torch.randn(kb.rank, generator=g)
        kb.add_task(name, lam, 0.2 * torch.randn(6, 5, generator=g), keep=0.8)
        L = kb.columns()[0]
        assert L.shape[1] >= L0.shape[1] and torch.equal(L[:, : L0.shape[1]], L0)
        L0 = L.clone()
        after = kb.express("a")
        assert torch.equal(after.u, u) and torch.equal(after.s, s) and torch.equal(after.v, v)


def test_add_task_energy_rule_counts_the_base():
    kb = KnowledgeBase(8, 8, F64)
    kb.add_task_factors("a", torch.zeros(0, dtype=F64), *truncate_energy(_matrix([2.0, 1.0], 8, 8, seed=1), 1.0))
    lam = torch.tensor([2.0, -1.0], dtype=F64)  # base energy sum |lam| = 3
    residual = _matrix([4.0, 2.0, 1.0, 1.0], 8, 8, seed=2)  # energy 8, total 11
    for keep, new in ((0.25, 0), (0.6, 1), (0.8, 2)):
        probe = KnowledgeBase.from_state_dict(kb.state_dict())
        info = probe.add_task("b", lam, residual, keep=keep)
        assert info["new_rank"] == new and info["base_energy"] == pytest.approx(3.0)
        assert probe.rank == 2 + new and probe.stored_values("b") == 2 + new * (8 + 8 + 1)
        assert info["kept_energy"] == pytest.approx((3.0 + [0, 4, 6][new]) / 11)
        g = (probe.columns()[0][:, :2] * lam) @ probe.columns()[1][:, :2].T + residual
        err = torch.linalg.norm(g - probe.dense("b")) / torch.linalg.norm(g)
        assert info["rel_error"] == pytest.approx(float(err), rel=1e-9)
    assert probe.coefficients("b")[:2].tolist() == lam.tolist()


class FixedRank:
    """A rank rule other than the energy rule: at most ``rank`` new directions per task."""

    def __init__(self, rank):
        self.rank = rank

    def __call__(self, s, base_energy, rows, cols):
        return min(self.rank, int((s > 0).sum()))

    def describe(self):
        return f"fixed rank {self.rank}"


def test_rank_rule_is_a_callable_and_the_energy_rule_one_of_them():
    from gmem.compress.knowledge import CompressionSettings

    kb = KnowledgeBase(8, 8, F64)
    residual = _matrix([4.0, 2.0, 1.0, 1.0], 8, 8, seed=2)
    lam = torch.zeros(0, dtype=F64)
    assert isinstance(EnergyRule(0.6), RankRule) and isinstance(FixedRank(1), RankRule)
    by_fraction = KnowledgeBase.from_state_dict(kb.state_dict()).add_task("b", lam, residual, keep=0.6)
    by_rule = KnowledgeBase.from_state_dict(kb.state_dict()).add_task("b", lam, residual, keep=EnergyRule(0.6))
    assert by_fraction == by_rule and by_rule["keep"] == 0.6
    info = KnowledgeBase.from_state_dict(kb.state_dict()).add_task("b", lam, residual, keep=FixedRank(1))
    assert info["new_rank"] == 1 and info["keep"] == "fixed rank 1"
    settings = CompressionSettings(keep=FixedRank(2))
    assert settings.keep.rank == 2 and settings.to_dict()["keep"] == "fixed rank 2"
    assert CompressionSettings(keep=0.9).to_dict()["keep"] == 0.9
    assert CompressionSettings(keep="width").to_dict()["keep"] == "width"
    assert CompressionSettings().to_dict()["keep"] == ResidualEnergyRule().describe()
    with pytest.raises(ValueError):
        CompressionSettings(keep=1.5)


def test_stored_values_next_coefficients_and_removal():
    kb, _ = _train_stream(tasks=("a", "b"), keep=0.8)
    ra = kb.express("a").rank
    assert kb.stored_values("a") == ra * (6 + 5 + 1)
    rb = kb.rank - ra
    assert kb.stored_values("b") == ra + rb * (6 + 5 + 1)
    assert kb.stored_values() == kb.stored_values("a") + kb.stored_values("b")
    assert torch.equal(kb.next_coefficients(), kb.coefficients("b"))
    kb.add_task("c", kb.next_coefficients(), torch.zeros(6, 5))  # nothing of its own
    assert kb.express("c").rank == kb.rank and kb.stored_values("c") == kb.rank
    assert kb.tasks_using([0]) == ["a", "b", "c"] and kb.tasks_using([kb.rank - 1]) == ["b", "c"]
    assert kb.tasks_using([]) == []
    with pytest.raises(IndexError, match="column"):
        kb.tasks_using([kb.rank])
    with pytest.raises(ValueError, match=r"cannot remove task 'a'.*\['b', 'c'\]"):
        kb.remove_task("a")
    with pytest.raises(ValueError, match=r"'b'.*\['c'\]"):
        kb.remove_task("b")
    kb.remove_task("c")  # it added no columns
    kb.remove_task("b")  # now nobody uses its columns: the base shrinks back to a's
    assert kb.tasks == ["a"] and kb.rank == ra
    with pytest.raises(KeyError, match="'b'"):
        kb.express("b")


def test_add_task_input_errors():
    kb, _ = _train_stream(tasks=("a",), keep="width")
    with pytest.raises(ValueError, match="already exists"):
        kb.add_task("a", kb.next_coefficients(), torch.zeros(6, 5))
    with pytest.raises(ValueError, match=r"lam must be .*\[5\]"):
        kb.add_task("b", torch.ones(4), torch.zeros(6, 5))
    with pytest.raises(ValueError, match="residual must be"):
        kb.add_task("b", kb.next_coefficients(), torch.zeros(5, 6))
    with pytest.raises(ValueError, match="NaN or Inf"):
        kb.add_task("b", kb.next_coefficients(), torch.full((6, 5), float("inf")))
    with pytest.raises(ValueError, match="keep"):
        kb.add_task("b", kb.next_coefficients(), torch.zeros(6, 5), keep=2.0)
    assert kb.tasks == ["a"]


def test_fit_coefficients_converts_a_dense_task():
    kb, dense = _train_stream(tasks=("a", "b"), keep=1.0)
    L, R = kb.columns()
    lam_true = torch.randn(kb.rank, generator=torch.Generator().manual_seed(7))
    g = (L * lam_true) @ R.T
    lam, residual = fit_coefficients(kb, g)  # g lies in the span of the base's outer products
    torch.testing.assert_close((L * lam) @ R.T, g, rtol=1e-4, atol=1e-4)
    assert float(residual.abs().max()) < 1e-4
    other = dense["a"].float() + 0.5
    lam, residual = fit_coefficients(kb, other)
    kb.add_task("naive", lam, residual, keep=1.0)
    torch.testing.assert_close(kb.dense("naive"), other, rtol=1e-4, atol=1e-4)


def test_state_dict_round_trip_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    kb, _ = _train_stream(tasks=("a", "b.x", "c"), keep=0.8)
    kb.add_task("none", kb.next_coefficients(), torch.zeros(6, 5))
    sd = kb.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    save_file(sd, str(tmp_path / "base.safetensors"))
    back = KnowledgeBase.from_state_dict(load_file(str(tmp_path / "base.safetensors")))
    assert back.tasks == kb.tasks and back.shape == kb.shape and back.dtype == kb.dtype
    for a, b in zip(kb.columns(), back.columns()):
        assert torch.equal(a, b)
    for t in kb.tasks:
        x, y = kb.express(t), back.express(t)
        assert torch.equal(x.u, y.u) and torch.equal(x.s, y.s) and torch.equal(x.v, y.v)
    one = {k: v for k, v in sd.items() if k.startswith("tasks.b.x.")}  # one task's own keys
    assert set(one) == {f"tasks.b.x.{f}" for f in ("position", "lam", "u", "s", "v")}


def _damaged(sd, key, value):
    out = dict(sd)
    if value is None:
        del out[key]
    else:
        out[key] = value
    return out


def test_damaged_state_dict_names_the_key():
    kb, _ = _train_stream(tasks=("a", "b"), keep=0.8)
    sd = kb.state_dict()
    with pytest.raises(KeyError, match="'tasks.b.u'"):
        KnowledgeBase.from_state_dict(_damaged(sd, "tasks.b.u", None))
    with pytest.raises(KeyError, match="'shape'"):
        KnowledgeBase.from_state_dict(_damaged(sd, "shape", None))
    with pytest.raises(KeyError, match="'tasks.a.position'"):
        KnowledgeBase.from_state_dict(_damaged(sd, "tasks.a.position", None))
    with pytest.raises(ValueError, match="'tasks.b.v' has shape"):
        KnowledgeBase.from_state_dict(_damaged(sd, "tasks.b.v", sd["tasks.b.v"][:-1]))
    with pytest.raises(ValueError, match="'tasks.b.lam' has shape"):
        KnowledgeBase.from_state_dict(_damaged(sd, "tasks.b.lam", sd["tasks.b.lam"][:-1]))
    nan = sd["tasks.a.s"].clone()
    nan[0] = float("nan")
    with pytest.raises(ValueError, match="'tasks.a.s' must be finite"):
        KnowledgeBase.from_state_dict(_damaged(sd, "tasks.a.s", nan))
    with pytest.raises(ValueError, match="unexpected key 'tasks.a.w'"):
        KnowledgeBase.from_state_dict(_damaged(sd, "tasks.a.w", torch.zeros(1)))
    with pytest.raises(ValueError, match="positions"):
        KnowledgeBase.from_state_dict(_damaged(sd, "tasks.b.position", torch.tensor(5)))
    with pytest.raises(ValueError, match="'shape'"):
        KnowledgeBase.from_state_dict(_damaged(sd, "shape", torch.tensor([6.0, 5.0])))
    with pytest.raises(ValueError, match="'tasks.a.u' must be a Tensor"):
        KnowledgeBase.from_state_dict(_damaged(sd, "tasks.a.u", [1.0]))
    with pytest.raises(TypeError, match="mapping"):
        KnowledgeBase.from_state_dict([("shape", sd["shape"])])


# ---- sampling through the LowRank ops -----------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_compressed_conv_equals_dense(backend):
    o, i = 6, 4
    kb_g, dense_g = _train_stream(o, i, tasks=("a", "b"), keep=0.9, seed=11)
    kb_b, dense_b = _train_stream(o, i, tasks=("a", "b"), keep=0.9, seed=12)
    g = torch.Generator().manual_seed(13)
    x = torch.randn(3, i, 7, 7, generator=g)
    wn = normalize_weight(torch.randn(o, i, 3, 3, generator=g))[0]
    bias = torch.randn(o, generator=g)
    for t in ("a", "b"):
        out = modulated_conv2d(x, wn, kb_g.express(t), kb_b.express(t), bias, padding=1, backend=backend)
        want = modulated_conv2d(x, wn, kb_g.dense(t), kb_b.dense(t), bias, padding=1, backend="reference")
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    ids = torch.tensor([1, 0, 1])  # a mixed batch: the stacked factors share L, R
    out = modulated_conv2d(x, wn, kb_g.express_stack(["a", "b"]), kb_b.express_stack(["a", "b"]), bias,
                           padding=1, task_ids=ids, backend=backend)
    for n, t in enumerate(("b", "a", "b")):
        want = modulated_conv2d(x[n:n + 1], wn, kb_g.dense(t), kb_b.dense(t), bias, padding=1, backend="reference")
        torch.testing.assert_close(out[n:n + 1], want, rtol=1e-5, atol=1e-5)


# ---- study outputs -----------------------------------------------------------------------------------
def test_study_plot_and_tables(tmp_path):
    from PIL import Image

    mats = {"B0.conv0": _matrix([4.0, 2.0, 1.0], 6, 5), "B1.conv1": _matrix([3.0, 3.0, 0.5, 0.1], 8, 4, seed=1)}
    spectra = singular_values(mats)
    torch.testing.assert_close(spectra["B0.conv0"][:3], torch.tensor([4.0, 2.0, 1.0], dtype=F64))
    path = tmp_path / "sv.png"
    plot_singular_values(spectra, path, title="test")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert [p.name for p in tmp_path.iterdir()] == ["sv.png"]  # no temporary left behind
    table = energy_table(spectra, keeps=(0.5, 0.9))
    row = next(r for r in table.splitlines() if r.startswith("| B1.conv1"))
    assert row.split("|")[2:5] == [" 4 ", f" {energy_rank(spectra['B1.conv1'], 0.5)} ",
                                   f" {energy_rank(spectra['B1.conv1'], 0.9)} "]
    kb, _ = _train_stream(tasks=("a", "b"), keep=0.8)
    table = storage_table({"B0.gamma": kb})
    row = next(r for r in table.splitlines() if r.startswith("| b "))
    assert f"| {kb.stored_values('b'):,} |" in row and "| 30 |" in row
    with pytest.raises(ValueError, match="NaN or Inf"):
        singular_values({"x": torch.full((2, 2), math.nan)})


# ---- post-hoc compression of naive tasks -------------------------------------------------------------
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
            layer.styles[name].gamma.copy_((shared_u * torch.tensor([1.0 + k, 2.0])) @ shared_v.T)
    rep = compress_tasks(model, ["a", "b", "c"], keep_base=0.999, keep_own=0.99)
    entry = rep["layers"]["0"]
    assert entry["shared_rank"] == 2 and rep["max_rel_error"] < 1e-5
    assert all(t["own_rank"] == 0 for t in entry["tasks"].values())
    assert rep["compressed_values"] < rep["dense_values"]
    torch.testing.assert_close(entry["tasks"]["b"]["factors"].dense(), layer.styles["b"].gamma.detach(),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="source"):
        compress_tasks(model, ["source"])
