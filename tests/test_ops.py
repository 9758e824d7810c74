"""gmem.ops (reference backend) against the float64 formulas, gradients, opcheck, LowRank, bad input."""
import random

import formulas
import pytest
import torch

import gmem.ops as ops
from gmem.ops import LowRank

madafm_weight_op = torch.ops.gmem.madafm_weight.default
modulated_conv2d_op = torch.ops.gmem.modulated_conv2d.default
modulated_linear_op = torch.ops.gmem.modulated_linear.default

DT = torch.float64


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    """These tests check the reference itself ("auto" would pick a compiled backend where built)."""
    monkeypatch.setenv("GMEM_BACKEND", "reference")


def random_conv_case(rng: random.Random, mixed: bool):
    n = rng.randint(1, 6)
    i, o = rng.randint(1, 5), rng.randint(1, 6)
    kh, kw = rng.choice([1, 2, 3]), rng.choice([1, 3, 4])
    stride = (rng.randint(1, 3), rng.randint(1, 2))
    padding = (rng.randint(0, 2), rng.randint(0, 2))
    dilation = (rng.randint(1, 2), rng.randint(1, 2))
    h = rng.randint(dilation[0] * (kh - 1) + 1, 9)
    w = rng.randint(dilation[1] * (kw - 1) + 1, 9)
    t = rng.randint(1, 5) if mixed else None
    lead = (t,) if mixed else ()
    x = torch.randn(n, i, h, w, dtype=DT)
    weight_norm = ops.normalize_weight(torch.randn(o, i, kh, kw, dtype=DT))[0]
    gamma, beta = torch.randn(*lead, o, i, dtype=DT), torch.randn(*lead, o, i, dtype=DT)
    bias = torch.randn(*lead, o, dtype=DT) if rng.random() < 0.7 else None
    task_ids = torch.randint(0, t, (n,)) if mixed else None
    return x, weight_norm, gamma, beta, bias, task_ids, dict(stride=stride, padding=padding, dilation=dilation)


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("seed", range(10))
def test_conv_matches_formula(seed, mixed):
    x, wn, gamma, beta, bias, task_ids, conv = random_conv_case(random.Random(seed * 7 + mixed), mixed)
    leaves = [t.requires_grad_() for t in (x, gamma, beta) + ((bias,) if bias is not None else ())]
    y = ops.modulated_conv2d(x, wn, gamma, beta, bias, task_ids=task_ids, **conv)
    expected = formulas.conv2d(x, wn, gamma, beta, bias, task_ids, **conv)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, grad)
    want = torch.autograd.grad(expected, leaves, grad)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("seed", range(8))
def test_linear_matches_formula(seed, mixed):
    rng = random.Random(100 + seed)
    n, i, o = rng.randint(1, 7), rng.randint(1, 9), rng.randint(1, 8)
    t = rng.randint(1, 4)
    lead = (t,) if mixed else ()
    x = torch.randn(n, i, dtype=DT, requires_grad=True)
    wn = ops.normalize_weight(torch.randn(o, i, dtype=DT))[0]
    gamma = torch.randn(*lead, o, dtype=DT, requires_grad=True)
    beta = torch.randn(*lead, o, dtype=DT, requires_grad=True)
    bias = torch.randn(*lead, o, dtype=DT, requires_grad=True)
    task_ids = torch.randint(0, t, (n,)) if mixed else None
    y = ops.modulated_linear(x, wn, gamma, beta, bias, task_ids=task_ids)
    expected = formulas.linear(x, wn, gamma, beta, bias, task_ids)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(y)
    leaves = (x, gamma, beta, bias)
    for g, e in zip(torch.autograd.grad(y, leaves, grad), torch.autograd.grad(expected, leaves, grad)):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


def test_linear_inner_dimensions_share_the_sample_task():
    x = torch.randn(3, 4, 5, dtype=DT)
    wn = ops.normalize_weight(torch.randn(6, 5, dtype=DT))[0]
    gamma, beta = torch.randn(2, 6, dtype=DT), torch.randn(2, 6, dtype=DT)
    task_ids = torch.tensor([1, 0, 1])
    y = ops.modulated_linear(x, wn, gamma, beta, task_ids=task_ids)
    for n in range(3):
        t = task_ids[n]
        torch.testing.assert_close(y[n], ops.modulated_linear(x[n], wn, gamma[t], beta[t]))


def test_madafm_weight_shapes_and_values():
    wn = torch.randn(4, 3, 3, 2, dtype=DT)
    g, b = torch.randn(4, 3, dtype=DT), torch.randn(4, 3, dtype=DT)
    w = ops.madafm_weight(wn, g, b)
    torch.testing.assert_close(w, g[:, :, None, None] * wn + b[:, :, None, None])
    gs, bs = torch.randn(5, 4, 3, dtype=DT), torch.randn(5, 4, 3, dtype=DT)
    assert ops.madafm_weight(wn, gs, bs).shape == (5, 4, 3, 3, 2)
    lin = torch.randn(6, 7, dtype=DT)
    gl, bl = torch.randn(2, 6, dtype=DT), torch.randn(2, 6, dtype=DT)
    torch.testing.assert_close(ops.madafm_weight(lin, gl, bl), gl[:, :, None] * lin + bl[:, :, None])


def test_source_identity_and_statistics():
    for shape in [(5, 4, 3, 3), (3, 2, 1, 1), (2, 3, 1, 4), (6, 9), (4, 1)]:
        w = torch.randn(*shape, dtype=DT)
        wn, mean, std = ops.normalize_weight(w)
        lead = (slice(None), slice(None)) if w.ndim == 4 else (slice(None),)
        expand = (Ellipsis, None, None) if w.ndim == 4 else (Ellipsis, None)
        torch.testing.assert_close(std[expand] * wn + mean[expand], w, rtol=1e-12, atol=1e-12)
        assert torch.isfinite(wn).all() and torch.isfinite(std).all()
        if w[lead][0].numel() == 1 or (w.ndim == 4 and shape[2] * shape[3] == 1) or (w.ndim == 2 and shape[1] == 1):
            # one-element slices are not normalised: mean 0, std 1, weight_norm == weight
            assert torch.equal(wn, w) and (std == 1).all() and (mean == 0).all()


def test_constant_slices_are_finite():
    w = torch.ones(3, 2, 3, 3)
    w[0, 0] = 2.5
    wn, mean, std = ops.normalize_weight(w)
    assert torch.isfinite(wn).all() and (wn == 0).all() and (std == 1).all()
    torch.testing.assert_close(mean[0, 0], torch.tensor(2.5))
    torch.testing.assert_close(ops.madafm_weight(wn, std, mean), w)


def test_paper_statistics_for_3x3():
    w = torch.randn(4, 3, 3, 3, dtype=DT)
    wn, mean, std = ops.normalize_weight(w)
    torch.testing.assert_close(mean, w.mean((2, 3)))
    torch.testing.assert_close(std, w.std((2, 3)))
    torch.testing.assert_close(wn.mean((2, 3)), torch.zeros_like(mean), atol=1e-12, rtol=0)


def test_gradcheck_single_and_mixed():
    torch.manual_seed(0)
    x = torch.randn(4, 2, 5, 5, dtype=DT, requires_grad=True)
    wn = ops.normalize_weight(torch.randn(3, 2, 3, 3, dtype=DT))[0]
    g = torch.randn(3, 3, 2, dtype=DT, requires_grad=True)
    b = torch.randn(3, 3, 2, dtype=DT, requires_grad=True)
    c = torch.randn(3, 3, dtype=DT, requires_grad=True)
    t = torch.tensor([2, 0, 2, 2])  # task 1 absent
    f = lambda x, g, b, c: ops.modulated_conv2d(x, wn, g, b, c, task_ids=t, stride=2, padding=1)
    assert torch.autograd.gradcheck(f, (x, g, b, c))
    assert torch.autograd.gradgradcheck(f, (x, g, b, c))  # R1 penalties need double backward
    f1 = lambda x, g, b, c: ops.modulated_conv2d(x, wn, g[0], b[0], c[0], dilation=2, padding=(2, 1))
    assert torch.autograd.gradcheck(f1, (x, g, b, c))
    z = torch.randn(4, 5, dtype=DT, requires_grad=True)
    wl = ops.normalize_weight(torch.randn(6, 5, dtype=DT))[0]
    gl = torch.randn(3, 6, dtype=DT, requires_grad=True)
    bl = torch.randn(3, 6, dtype=DT, requires_grad=True)
    fl = lambda z, g, b: ops.modulated_linear(z, wl, g, b, 0.5 * g, task_ids=t)
    assert torch.autograd.gradcheck(fl, (z, gl, bl))
    assert torch.autograd.gradgradcheck(fl, (z, gl, bl))


def test_lowrank_matches_dense_and_trains_factors():
    torch.manual_seed(1)
    x = torch.randn(5, 3, 6, 6, dtype=DT)
    wn = ops.normalize_weight(torch.randn(4, 3, 3, 3, dtype=DT))[0]
    u = torch.randn(2, 4, 2, dtype=DT, requires_grad=True)
    s = torch.rand(2, 2, dtype=DT, requires_grad=True)
    v = torch.randn(2, 3, 2, dtype=DT, requires_grad=True)
    lr = LowRank(u, s, v)
    assert lr.shape == (2, 4, 3) and lr.rank == 2
    beta = torch.randn(2, 4, 3, dtype=DT)
    t = torch.tensor([0, 1, 1, 0, 1])
    dense = torch.einsum("tor,tr,tir->toi", u, s, v)
    y = ops.modulated_conv2d(x, wn, lr, beta, task_ids=t, padding=1)
    torch.testing.assert_close(y, formulas.conv2d(x, wn, dense, beta, None, t, padding=(1, 1)))
    assert torch.autograd.gradcheck(
        lambda u, s, v: ops.modulated_conv2d(x, wn, LowRank(u, s, v), beta, task_ids=t, padding=1), (u, s, v)
    )
    # a shared knowledge base plus a task's own factors is one LowRank of the summed rank
    base = LowRank(torch.randn(4, 3, dtype=DT), torch.rand(3, dtype=DT), torch.randn(3, 3, dtype=DT))
    both = LowRank.concat(base, lr)
    assert both.rank == 5 and both.shape == (2, 4, 3)
    torch.testing.assert_close(both.dense(), base.dense()[None] + lr.dense())


def test_many_tasks_stored_few_present():
    x = torch.randn(3, 2, 4, 4, dtype=DT)
    wn = ops.normalize_weight(torch.randn(2, 2, 3, 3, dtype=DT))[0]
    g, b = torch.randn(50, 2, 2, dtype=DT), torch.randn(50, 2, 2, dtype=DT)
    t = torch.tensor([49, 3, 49])
    y = ops.modulated_conv2d(x, wn, g, b, task_ids=t, padding=1)
    torch.testing.assert_close(y, formulas.conv2d(x, wn, g, b, None, t, padding=(1, 1)))


def test_zero_samples():
    x = torch.randn(0, 2, 4, 4)
    wn = ops.normalize_weight(torch.randn(3, 2, 3, 3))[0]
    no_ids = torch.zeros(0, dtype=torch.long)
    y = ops.modulated_conv2d(x, wn, torch.randn(2, 3, 2), torch.randn(2, 3, 2), task_ids=no_ids)
    assert y.shape == (0, 3, 2, 2)


def test_weight_norm_gets_no_gradient():
    x = torch.randn(2, 2, 4, 4)
    wn = ops.normalize_weight(torch.randn(3, 2, 3, 3))[0].requires_grad_()
    g = torch.randn(3, 2, requires_grad=True)
    ops.modulated_conv2d(x, wn, g, torch.randn(3, 2)).sum().backward()
    assert wn.grad is None and g.grad is not None


def _opcheck_args():
    torch.manual_seed(2)
    x = torch.randn(5, 3, 6, 6, requires_grad=True)
    wn = ops.normalize_weight(torch.randn(4, 3, 3, 3))[0]
    g, b = torch.randn(3, 4, 3, requires_grad=True), torch.randn(3, 4, 3, requires_grad=True)
    c = torch.randn(3, 4, requires_grad=True)
    t = torch.tensor([2, 0, 2, 1, 2])
    z = torch.randn(5, 7, requires_grad=True)
    wl = ops.normalize_weight(torch.randn(6, 7))[0]
    gl, bl = torch.randn(3, 6, requires_grad=True), torch.randn(3, 6, requires_grad=True)
    return [
        (modulated_conv2d_op, (x, wn, g, b, c, t, [1, 1], [1, 1], [1, 1])),
        (modulated_conv2d_op, (x, wn, g[0], b[0], None, None, [2, 1], [0, 1], [1, 2])),
        (modulated_linear_op, (z, wl, gl, bl, None, t)),
        (modulated_linear_op, (z, wl, gl[0], bl[0], gl[1], None)),
        (madafm_weight_op, (wn, g, b)),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_args())))
def test_opcheck(case):
    op, args = _opcheck_args()[case]
    with ops.use_backend("reference"):  # the op takes no backend: the context chooses it
        torch.library.opcheck(op, args)


def test_available_backends_and_errors():
    names = ops.available_backends()
    assert "reference" in names
    x = torch.randn(1, 1, 3, 3)
    wn = torch.randn(1, 1, 3, 3)
    with pytest.raises(ValueError, match="backend='nope' is unknown"):
        ops.modulated_conv2d(x, wn, torch.ones(1, 1), torch.zeros(1, 1), backend="nope")


def _conv_inputs():
    x = torch.randn(2, 3, 5, 5)
    wn = ops.normalize_weight(torch.randn(4, 3, 3, 3))[0]
    return x, wn, torch.randn(4, 3), torch.randn(4, 3)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: a.update(x=a["x"][0]), ValueError, "x must be"),
        (lambda a: a.update(x=a["x"][:, :2]), ValueError, "C_in = 3"),
        (lambda a: a.update(x=a["x"].long()), TypeError, "floating point"),
        (lambda a: a.update(gamma=a["gamma"].double()), TypeError, "gamma has dtype"),
        (lambda a: a.update(gamma=a["gamma"][:, :2]), ValueError, "gamma must be"),
        (lambda a: a.update(beta=a["beta"][None]), ValueError, "beta must have the shape"),
        (lambda a: a.update(gamma="nope"), TypeError, "gamma must be a Tensor or LowRank"),
        (lambda a: a.update(bias=torch.randn(5)), ValueError, "bias must be"),
        (lambda a: a.update(bias=torch.randn(4).double()), TypeError, "bias has dtype"),
        (lambda a: a.update(stride=0), ValueError, "stride must be >= 1"),
        (lambda a: a.update(padding=(1, 2, 3)), TypeError, "padding must be an int or a pair"),
        (lambda a: a.update(padding=-1), ValueError, "padding must be >= 0"),
        (lambda a: a.update(task_ids=torch.tensor([0, 0])), ValueError, "task_ids was given"),
        (lambda a: a.update(gamma=a["gamma"][None].repeat(2, 1, 1), beta=a["beta"][None].repeat(2, 1, 1)),
         ValueError, "task_ids \\[N\\] must say"),
        (lambda a: a.update(x=torch.randn(1, 3, 2, 2)), ValueError, "smaller than the dilated kernel"),
    ],
)
def test_conv_bad_input(change, error, match):
    x, wn, g, b = _conv_inputs()
    args = dict(x=x, weight_norm=wn, gamma=g, beta=b, bias=None)
    kwargs = {}
    change(args)
    for k in ("stride", "padding", "task_ids"):
        if k in args:
            kwargs[k] = args.pop(k)
    with pytest.raises(error, match=match):
        ops.modulated_conv2d(args["x"], args["weight_norm"], args["gamma"], args["beta"], args["bias"], **kwargs)


@pytest.mark.parametrize(
    "task_ids, error, match",
    [
        (torch.tensor([0, 3]), IndexError, "must lie in \\[0, 3\\)"),
        (torch.tensor([-1, 0]), IndexError, "must lie in"),
        (torch.tensor([0, 1, 2]), ValueError, "shape \\[N\\] = \\[2\\]"),
        (torch.tensor([0.0, 1.0]), TypeError, "integer"),
        ([0, 1], TypeError, "LongTensor"),
    ],
)
def test_bad_task_ids(task_ids, error, match):
    x, wn, g, b = _conv_inputs()
    gs, bs = g[None].repeat(3, 1, 1), b[None].repeat(3, 1, 1)
    with pytest.raises(error, match=match):
        ops.modulated_conv2d(x, wn, gs, bs, task_ids=task_ids)
    with pytest.raises(error, match=match):
        ops.modulated_linear(torch.randn(2, 5), torch.randn(4, 5), torch.randn(3, 4), torch.randn(3, 4),
                             task_ids=task_ids)


def test_linear_bad_input():
    with pytest.raises(ValueError, match="d_in = 5"):
        ops.modulated_linear(torch.randn(2, 4), torch.randn(3, 5), torch.randn(3), torch.randn(3))
    with pytest.raises(ValueError, match="gamma must be"):
        ops.modulated_linear(torch.randn(2, 5), torch.randn(3, 5), torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match="weight_norm must be"):
        ops.modulated_linear(torch.randn(2, 5), torch.randn(3, 5, 1), torch.randn(3), torch.randn(3))


def test_lowrank_bad_factors():
    with pytest.raises(ValueError, match="disagree"):
        LowRank(torch.randn(4, 2), torch.randn(3), torch.randn(5, 2))
    with pytest.raises(TypeError, match="u must be a Tensor"):
        LowRank([1.0], torch.randn(3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="expected u"):
        LowRank(torch.randn(4), torch.randn(3), torch.randn(5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_reference_on_gpu_matches_cpu():
    x, wn, gamma, beta, bias, task_ids, conv = random_conv_case(random.Random(5), True)
    y = ops.modulated_conv2d(x.cuda(), wn.cuda(), gamma.cuda(), beta.cuda(),
                             None if bias is None else bias.cuda(), task_ids=task_ids.cuda(),
                             backend="reference", **conv)
    torch.testing.assert_close(y.cpu(), formulas.conv2d(x, wn, gamma, beta, bias, task_ids, **conv))


def test_zero_samples_backward():
    x = torch.randn(0, 2, 4, 4, requires_grad=True)
    g = torch.randn(2, 3, 2, requires_grad=True)
    wn = ops.normalize_weight(torch.randn(3, 2, 3, 3))[0]
    y = ops.modulated_conv2d(x, wn, g, torch.randn(2, 3, 2), task_ids=torch.zeros(0, dtype=torch.long))
    y.sum().backward()
    assert x.grad.shape == x.shape and (g.grad == 0).all()
