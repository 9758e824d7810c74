"""The compiled backends ("cpu" here, "cuda" on a GPU machine) against the float64 formulas.

The extension must be built wherever a build is possible: these tests skip only when no C++
compiler or no csrc/ exists; otherwise an unavailable "cpu" backend is a failure. The CUDA cases
run the same checks on a GPU and skip cleanly without one.
"""
import random
import shutil
import subprocess
import sys
import textwrap

import formulas
import pytest
import torch

import gmem.ops as ops
from gmem.ops import LowRank, _ext_build
from gmem.ops import _cpp_backend as cpp

madafm_weight_op = torch.ops.gmem.madafm_weight.default
modulated_conv2d_op = torch.ops.gmem.modulated_conv2d.default
modulated_conv2d_lowrank_op = torch.ops.gmem.modulated_conv2d_lowrank.default
modulated_linear_op = torch.ops.gmem.modulated_linear.default

DT = torch.float64
HAS_GPU = torch.cuda.is_available()
_BUILD_POSSIBLE = (_ext_build.CSRC / "module.cpp").exists() and any(
    shutil.which(cc) for cc in ("c++", "g++", "clang++")
)

if "cpu" not in ops.available_backends():
    if not _BUILD_POSSIBLE:
        pytest.skip("no C++ compiler or sources: the compiled extension cannot be built here", allow_module_level=True)
    raise AssertionError(f"the compiled extension should load here but did not: {cpp.load_error()}")

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")),
]


@pytest.fixture(autouse=True)
def _exact_matmul():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def random_conv_case(rng, mixed, device):
    n = rng.randint(1, 7)
    i, o = rng.randint(1, 5), rng.randint(1, 6)
    kh, kw = rng.choice([1, 2, 3, 5]), rng.choice([1, 3, 4])
    conv = dict(
        stride=(rng.randint(1, 3), rng.randint(1, 2)),
        padding=(rng.randint(0, 2), rng.randint(0, 2)),
        dilation=(rng.randint(1, 2), rng.randint(1, 2)),
    )
    h = rng.randint(conv["dilation"][0] * (kh - 1) + 1, 10)
    w = rng.randint(conv["dilation"][1] * (kw - 1) + 1, 10)
    t = rng.randint(1, 6) if mixed else None
    lead = (t,) if mixed else ()
    x = torch.randn(n, i, h, w, dtype=DT)
    wn = ops.normalize_weight(torch.randn(o, i, kh, kw, dtype=DT))[0]
    gamma, beta = torch.randn(*lead, o, i, dtype=DT), torch.randn(*lead, o, i, dtype=DT)
    bias = None
    if rng.random() < 0.7:  # per-task bias, or (mixed) the shared [O] bias
        bias = torch.randn(*(lead if rng.random() < 0.6 else ()), o, dtype=DT)
    task_ids = torch.randint(0, t, (n,)) if mixed else None
    return (*to(device, x, wn, gamma, beta, bias, task_ids), conv)


def check_conv(device, x, wn, gamma, beta, bias, task_ids, conv, tol=1e-10):
    leaves = [t.requires_grad_() for t in (x, gamma, beta) + ((bias,) if bias is not None else ())]
    y = ops.modulated_conv2d(x, wn, gamma, beta, bias, task_ids=task_ids, backend=device, **conv)
    expected = formulas.conv2d(x, wn, gamma, beta, bias, task_ids, **conv)
    torch.testing.assert_close(y, expected.to(y.dtype), rtol=tol, atol=tol)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, grad)
    want = torch.autograd.grad(expected, leaves, grad)
    for g, e, name in zip(got, want, ("x", "gamma", "beta", "bias")):
        torch.testing.assert_close(g, e.to(g.dtype), rtol=10 * tol, atol=10 * tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_conv_matches_formula(device, seed, mixed):
    check_conv(device, *random_conv_case(random.Random(1000 + seed * 3 + mixed), mixed, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "task_ids, num_tasks",
    [
        ([3, 0, 3, 1, 0, 0, 3], 5),  # random order, tasks 2 and 4 absent (empty groups)
        ([0, 0, 1, 1, 1, 2], 3),  # already sorted: no gather
        ([2, 2, 2, 2], 4),  # every sample of one task
        ([1], 2),  # one sample
        ([49, 3, 49, 17, 0], 50),  # many tasks stored, few present
        (list(range(9))[::-1], 9),  # every sample its own task
    ],
)
def test_conv_task_mixes(device, task_ids, num_tasks):
    torch.manual_seed(len(task_ids) * 31 + num_tasks)
    n = len(task_ids)
    x = torch.randn(n, 3, 7, 6, dtype=DT)
    wn = ops.normalize_weight(torch.randn(4, 3, 3, 3, dtype=DT))[0]
    g, b = torch.randn(num_tasks, 4, 3, dtype=DT), torch.randn(num_tasks, 4, 3, dtype=DT)
    c = torch.randn(num_tasks, 4, dtype=DT)
    t = torch.tensor(task_ids)
    check_conv(device, *to(device, x, wn, g, b, c, t), dict(stride=(1, 2), padding=(1, 0), dilation=(1, 1)))


@pytest.mark.parametrize("device", DEVICES)
def test_conv_odd_layers(device):
    torch.manual_seed(3)
    conv = dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1))
    for o, i, kh, kw in [(1, 1, 1, 1), (7, 1, 5, 5), (1, 6, 4, 4), (5, 3, 2, 7)]:
        x = torch.randn(3, i, 9, 8, dtype=DT)
        wn = ops.normalize_weight(torch.randn(o, i, kh, kw, dtype=DT))[0]
        g, b = torch.randn(2, o, i, dtype=DT), torch.randn(2, o, i, dtype=DT)
        check_conv(device, *to(device, x, wn, g, b, None, torch.tensor([1, 0, 1])), conv)
        check_conv(device, *to(device, x, wn, g[0], b[0], None, None), conv)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("seed", range(8))
def test_linear_matches_formula(device, seed, mixed):
    rng = random.Random(200 + seed)
    n, i, o, t = rng.randint(1, 9), rng.randint(1, 11), rng.randint(1, 9), rng.randint(1, 5)
    lead = (t,) if mixed else ()
    x = torch.randn(n, i, dtype=DT)
    wn = ops.normalize_weight(torch.randn(o, i, dtype=DT))[0]
    gamma, beta = torch.randn(*lead, o, dtype=DT), torch.randn(*lead, o, dtype=DT)
    bias = torch.randn(*(lead if seed % 2 else ()), o, dtype=DT) if seed % 3 else None
    task_ids = torch.randint(0, t, (n,)) if mixed else None
    x, wn, gamma, beta, bias, task_ids = to(device, x, wn, gamma, beta, bias, task_ids)
    leaves = [v.requires_grad_() for v in (x, gamma, beta) + ((bias,) if bias is not None else ())]
    y = ops.modulated_linear(x, wn, gamma, beta, bias, task_ids=task_ids, backend=device)
    expected = formulas.linear(x, wn, gamma, beta, bias, task_ids)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(y)
    for g, e in zip(torch.autograd.grad(y, leaves, grad), torch.autograd.grad(expected, leaves, grad)):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_inner_dimensions_and_many_tasks(device):
    torch.manual_seed(4)
    x = torch.randn(3, 4, 5, dtype=DT, device=device)  # inner dimension shares its sample's task
    wn = ops.normalize_weight(torch.randn(6, 5, dtype=DT))[0].to(device)
    g, b = torch.randn(40, 6, dtype=DT, device=device), torch.randn(40, 6, dtype=DT, device=device)
    t = torch.tensor([39, 0, 39], device=device)
    y = ops.modulated_linear(x, wn, g, b, task_ids=t, backend=device)
    want = ops.modulated_linear(x, wn, g, b, task_ids=t, backend="reference")
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_madafm_weight(device):
    torch.manual_seed(5)
    wn = ops.normalize_weight(torch.randn(4, 3, 3, 3, dtype=DT))[0].to(device)
    for lead in [(), (5,)]:
        g = torch.randn(*lead, 4, 3, dtype=DT, device=device, requires_grad=True)
        b = torch.randn(*lead, 4, 3, dtype=DT, device=device, requires_grad=True)
        w = ops.madafm_weight(wn, g, b, backend=device)
        want = g[..., None, None] * wn + b[..., None, None]
        torch.testing.assert_close(w, want, rtol=0, atol=1e-15)
        grad = torch.randn_like(w)
        for got, exp in zip(torch.autograd.grad(w, (g, b), grad), torch.autograd.grad(want, (g, b), grad)):
            torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)
    # the mFiLM row form: weight_norm [O, I], gamma [T, O]
    wl = ops.normalize_weight(torch.randn(6, 7, dtype=DT))[0].to(device)
    gl, bl = torch.randn(2, 6, dtype=DT, device=device), torch.randn(2, 6, dtype=DT, device=device)
    torch.testing.assert_close(ops.madafm_weight(wl, gl, bl, backend=device), gl[..., None] * wl + bl[..., None])


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_through_public_ops(device):
    torch.manual_seed(6)
    kw = dict(dtype=DT, device=device)
    x = torch.randn(4, 2, 5, 5, **kw, requires_grad=True)
    wn = ops.normalize_weight(torch.randn(3, 2, 3, 3, dtype=DT))[0].to(device)
    g = torch.randn(3, 3, 2, **kw, requires_grad=True)
    b = torch.randn(3, 3, 2, **kw, requires_grad=True)
    c = torch.randn(3, 3, **kw, requires_grad=True)
    t = torch.tensor([2, 0, 2, 2], device=device)  # task 1 absent
    f = lambda x, g, b, c: ops.modulated_conv2d(x, wn, g, b, c, task_ids=t, stride=2, padding=1, backend=device)
    assert torch.autograd.gradcheck(f, (x, g, b, c))
    assert torch.autograd.gradgradcheck(f, (x, g, b, c))
    f1 = lambda x, g, b, c: ops.modulated_conv2d(x, wn, g[0], b[0], c[0], dilation=2, padding=(2, 1), backend=device)
    assert torch.autograd.gradcheck(f1, (x, g, b, c))
    z = torch.randn(4, 5, **kw, requires_grad=True)
    wl = ops.normalize_weight(torch.randn(6, 5, dtype=DT))[0].to(device)
    gl = torch.randn(3, 6, **kw, requires_grad=True)
    bl = torch.randn(3, 6, **kw, requires_grad=True)
    fl = lambda z, g, b: ops.modulated_linear(z, wl, g, b, 0.5 * g, task_ids=t, backend=device)
    assert torch.autograd.gradcheck(fl, (z, gl, bl))
    fl1 = lambda z, g, b: ops.modulated_linear(z, wl, g[1], b[1], backend=device)
    assert torch.autograd.gradcheck(fl1, (z, gl, bl))
    fw = lambda g, b: ops.madafm_weight(wn, g, b, backend=device)
    assert torch.autograd.gradcheck(fw, (g, b))


@pytest.mark.parametrize("device", DEVICES)
def test_lowrank_styles(device):
    torch.manual_seed(7)
    x = torch.randn(5, 3, 6, 6, dtype=DT, device=device)
    wn = ops.normalize_weight(torch.randn(4, 3, 3, 3, dtype=DT))[0].to(device)
    u = torch.randn(2, 4, 2, dtype=DT, device=device, requires_grad=True)
    s = torch.rand(2, 2, dtype=DT, device=device, requires_grad=True)
    v = torch.randn(2, 3, 2, dtype=DT, device=device, requires_grad=True)
    beta = torch.randn(2, 4, 3, dtype=DT, device=device)
    t = torch.tensor([0, 1, 1, 0, 1], device=device)
    f = lambda u, s, v: ops.modulated_conv2d(x, wn, LowRank(u, s, v), beta, task_ids=t, padding=1, backend=device)
    dense = torch.einsum("tor,tr,tir->toi", u, s, v)
    torch.testing.assert_close(f(u, s, v), formulas.conv2d(x, wn, dense, beta, None, t, padding=(1, 1)))
    assert torch.autograd.gradcheck(f, (u, s, v))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_samples(device):
    x = torch.randn(0, 2, 4, 4, device=device, requires_grad=True)
    wn = ops.normalize_weight(torch.randn(3, 2, 3, 3))[0].to(device)
    g = torch.randn(2, 3, 2, device=device, requires_grad=True)
    c = torch.randn(2, 3, device=device, requires_grad=True)
    ids = torch.zeros(0, dtype=torch.long, device=device)
    y = ops.modulated_conv2d(x, wn, g, torch.randn(2, 3, 2, device=device), c, task_ids=ids, backend=device)
    assert y.shape == (0, 3, 2, 2)
    y.sum().backward()
    assert x.grad.shape == x.shape and (g.grad == 0).all() and (c.grad == 0).all()
    z = torch.randn(0, 5, device=device, requires_grad=True)
    wl = ops.normalize_weight(torch.randn(4, 5))[0].to(device)
    gl = torch.randn(2, 4, device=device, requires_grad=True)
    yl = ops.modulated_linear(z, wl, gl, torch.randn(2, 4, device=device), task_ids=ids, backend=device)
    assert yl.shape == (0, 4)
    yl.sum().backward()
    assert (gl.grad == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_float32_matches_reference(device):
    rng = random.Random(8)
    for mixed in (False, True):
        x, wn, gamma, beta, bias, task_ids, conv = random_conv_case(rng, mixed, device)
        x, wn, gamma, beta = (t.float() for t in (x, wn, gamma, beta))
        bias = None if bias is None else bias.float()
        check_conv(device, x, wn, gamma, beta, bias, task_ids, conv, tol=2e-5)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision(dtype):
    torch.manual_seed(9)
    x = torch.randn(6, 8, 12, 12, device="cuda")
    wn = ops.normalize_weight(torch.randn(16, 8, 3, 3))[0].cuda()
    g, b = torch.randn(3, 16, 8, device="cuda"), torch.randn(3, 16, 8, device="cuda")
    c = torch.randn(3, 16, device="cuda")
    t = torch.tensor([2, 0, 2, 1, 0, 0], device="cuda")
    args = [v.to(dtype) for v in (x, wn, g, b, c)]
    y = ops.modulated_conv2d(*args, task_ids=t, padding=1, backend="cuda")
    want = formulas.conv2d(*[a.double() for a in args], task_ids=t, padding=(1, 1))
    err = (y.double() - want).abs().max() / (1 + want.abs().max())
    assert y.dtype == dtype and err < 3e-2
    z = torch.randn(10, 32, device="cuda", dtype=dtype)
    wl = ops.normalize_weight(torch.randn(24, 32))[0].cuda().to(dtype)
    gl, bl = torch.randn(3, 24, device="cuda", dtype=dtype), torch.randn(3, 24, device="cuda", dtype=dtype)
    tl = torch.randint(0, 3, (10,), device="cuda")
    yl = ops.modulated_linear(z, wl, gl, bl, task_ids=tl, backend="cuda")
    want = formulas.linear(z, wl, gl, bl, None, tl)
    assert (yl.double() - want).abs().max() / (1 + want.abs().max()) < 3e-2


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_linear_under_autocast(dtype):
    # Under CUDA autocast the extension's own x.sum(1) comes back float32 for a half x: the FiLM
    # launch must not read it (or any float32 buffer) as half. Forward and backward both in autocast.
    torch.manual_seed(10)
    z = torch.randn(10, 32, device="cuda", requires_grad=True)
    wl = ops.normalize_weight(torch.randn(24, 32))[0].cuda()
    gl = torch.randn(3, 24, device="cuda", requires_grad=True)
    bl = torch.randn(3, 24, device="cuda", requires_grad=True)
    cl = torch.randn(3, 24, device="cuda", requires_grad=True)
    tl = torch.randint(0, 3, (10,), device="cuda")
    leaves = (z, gl, bl, cl)
    with torch.autocast("cuda", dtype=dtype):
        y = ops.modulated_linear(z, wl, gl, bl, cl, task_ids=tl, backend="cuda")
        got = torch.autograd.grad(y.float().square().sum(), leaves)
    assert y.dtype == dtype
    # the float64 oracle on the values autocast computes with (inputs rounded to dtype)
    want_leaves = [t.detach().to(dtype).double().requires_grad_() for t in leaves]
    want = formulas.linear(want_leaves[0], wl.to(dtype), *want_leaves[1:3], want_leaves[3], tl)
    assert (y.double() - want).abs().max() / (1 + want.abs().max()) < 3e-2
    want_grads = torch.autograd.grad(want.square().sum(), want_leaves)
    for name, g, w in zip(("x", "gamma", "beta", "bias"), got, want_grads):
        assert g.dtype == torch.float32, name  # float32 leaves get float32 gradients
        assert (g.double() - w).abs().max() / (1 + w.abs().max()) < 5e-2, name


@pytest.mark.parametrize("device", DEVICES)
def test_repeatable(device):
    # deterministic reductions: two runs give the same bits
    torch.manual_seed(10)
    z = torch.randn(300, 40, device=device, requires_grad=True)
    wl = ops.normalize_weight(torch.randn(70, 40))[0].to(device)
    g = torch.randn(4, 70, device=device, requires_grad=True)
    t = torch.randint(0, 4, (300,), device=device)
    beta = torch.randn(4, 70, device=device)
    grads = []
    for _ in range(2):
        y = ops.modulated_linear(z, wl, g, beta, g, task_ids=t, backend=device)
        grads.append(torch.autograd.grad(y.square().sum(), (z, g)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# the compiled kernels on the gmem:: ops: opcheck (schema, fake tensors, torch.compile tracing)
# ---------------------------------------------------------------------------------------------
class _Kernels:
    """``torch.ops.gmem`` called below autograd, as the "cpu"/"cuda" backends call it: the C++ kernel
    registered for the device (forward ops called as they are would first choose a backend)."""

    def __getattr__(self, name):
        op = getattr(torch.ops.gmem, name)

        def call(*args):
            with torch._C._AutoDispatchBelowAutograd():
                return op(*args)

        return call


KERNELS = _Kernels()


def _ext_cases(device):
    torch.manual_seed(11)
    kw = dict(device=device)
    x = torch.randn(5, 3, 6, 7, **kw)
    wn = ops.normalize_weight(torch.randn(4, 3, 3, 3))[0].to(device)
    g, b, c = torch.randn(3, 4, 3, **kw), torch.randn(3, 4, 3, **kw), torch.randn(3, 4, **kw)
    t = torch.tensor([2, 0, 2, 1, 2], **kw)
    gy = torch.randn(5, 4, 6, 7, **kw)
    z, wl = torch.randn(5, 7, **kw), ops.normalize_weight(torch.randn(6, 7))[0].to(device)
    gl, bl, cl = torch.randn(3, 6, **kw), torch.randn(3, 6, **kw), torch.randn(3, 6, **kw)
    gz = torch.randn(5, 6, **kw)
    E = torch.ops.gmem
    conv = ([1, 1], [1, 1], [1, 1])
    return [
        (E.madafm_weight.default, (wn, g, b)),
        (E.madafm_weight.default, (wn, g[0], b[0])),
        (E.madafm_weight_backward.default, (torch.randn(3, 4, 3, 3, 3, **kw), wn)),
        (E.modulated_conv2d.default, (x, wn, g, b, c, t, *conv)),
        (E.modulated_conv2d.default, (x, wn, g[1], b[1], None, None, [2, 1], [0, 1], [1, 2])),
        (E.modulated_conv2d_backward.default, (gy, x, wn, g, b, c, t, *conv, [True, True, True, True])),
        (E.modulated_conv2d_backward.default, (gy, x, wn, g[0], b[0], c[0], None, *conv, [False, True, False, True])),
        (E.modulated_linear.default, (z, wl, gl, bl, cl, t)),
        (E.modulated_linear.default, (z, wl, gl[0], bl[0], None, None)),
        (E.modulated_linear_backward.default, (gz, z, wl, gl, bl, cl, t, [True, True, True, True])),
        (E.modulated_linear_backward.default, (gz, z, wl, gl[2], bl[2], None, None, [True, False, True, False])),
        (E.modulated_linear_forward.default, (z, wl, gl, bl, cl, t)),
        (E.modulated_linear_forward.default, (z, wl, gl[0], bl[0], None, None)),
        (E.modulated_linear_backward.default, (gz, z, wl, gl, bl, cl, t, [True, True, True, True], z @ wl.T)),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(_ext_cases("cpu"))))
def test_opcheck_ext_ops(device, case):
    op, args = _ext_cases(device)[case]
    with ops.use_backend(device):  # the forward ops choose the compiled kernels, the backward ops are them
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mixed", [False, True])
def test_linear_forward_hands_over_x_wn_and_the_backward_uses_it(device, mixed):
    # modulated_linear_forward: the same output as modulated_linear plus x @ Wn^T; the backward given
    # that product returns what it computes without it (the product is the same GEMM), bit for bit
    torch.manual_seed(13)
    E = KERNELS
    m, i, o, tasks = 9, 7, 5, 3
    z, wn = torch.randn(m, i, device=device), ops.normalize_weight(torch.randn(o, i))[0].to(device)
    lead = (tasks,) if mixed else ()
    g, b, c = (torch.randn(*lead, o, device=device) for _ in range(3))
    ids = torch.randint(0, tasks, (m,), device=device) if mixed else None
    y, x_wn = E.modulated_linear_forward(z, wn, g, b, c, ids)
    assert torch.equal(y, E.modulated_linear(z, wn, g, b, c, ids))
    torch.testing.assert_close(x_wn, z @ wn.T)
    gz = torch.randn(m, o, device=device)
    for mask in ([True] * 4, [False, True, False, False], [True, False, True, True]):
        with_product = E.modulated_linear_backward(gz, z, wn, g, b, c, ids, mask, x_wn)
        without = E.modulated_linear_backward(gz, z, wn, g, b, c, ids, mask)
        for a, r in zip(with_product, without):
            assert torch.equal(a, r)
    with pytest.raises(RuntimeError, match=r"x_wn \(x @ weight_norm\^T from the forward\) must be \[9, 5\]"):
        E.modulated_linear_backward(gz, z, wn, g, b, c, ids, [True] * 4, x_wn[:, :4])
    with pytest.raises(RuntimeError, match="x_wn"):
        E.modulated_linear_backward(gz, z, wn, g, b, c, ids, [True] * 4, x_wn.double())


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_public_ops_with_backend(device):
    torch.manual_seed(12)
    x = torch.randn(5, 3, 6, 6, device=device, requires_grad=True)
    wn = ops.normalize_weight(torch.randn(4, 3, 3, 3))[0].to(device)
    g = torch.randn(3, 4, 3, device=device, requires_grad=True)
    b = torch.randn(3, 4, 3, device=device, requires_grad=True)
    c = torch.randn(3, 4, device=device, requires_grad=True)
    t = torch.tensor([2, 0, 2, 1, 2], device=device)
    z = torch.randn(5, 7, device=device, requires_grad=True)
    wl = ops.normalize_weight(torch.randn(6, 7))[0].to(device)
    gl = torch.randn(3, 6, device=device, requires_grad=True)
    with ops.use_backend(device):
        torch.library.opcheck(modulated_conv2d_op, (x, wn, g, b, c, t, [1, 1], [1, 1], [1, 1]))
        torch.library.opcheck(modulated_linear_op, (z, wl, gl, gl * 2, None, t))
        torch.library.opcheck(madafm_weight_op, (wn, g, b))


def test_auto_picks_the_compiled_backend():
    names = ops.available_backends()
    assert names.index("cpu") < names.index("reference")
    # "auto" never falls back to the reference while a compiled backend runs here
    assert ops.backends.resolve_backend("auto", torch.device("cpu"), torch.float64, "t") != "reference"
    # half precision (autocast) is computed in float32 by the float32 kernels, rounded back
    args = (torch.randn(2, 3).half(), torch.randn(4, 3).half(), torch.ones(4).half(), torch.zeros(4).half())
    y = ops.modulated_linear(*args, backend="cpu")
    assert y.dtype == torch.float16
    assert torch.equal(y, ops.modulated_linear(*(a.float() for a in args), backend="cpu").half())


def test_direct_calls_check_their_arguments():
    E = KERNELS
    wn = torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        E.madafm_weight(wn.half(), torch.randn(4, 3).half(), torch.randn(4, 3).half())
    with pytest.raises(RuntimeError, match="gamma must be"):
        E.madafm_weight(wn, torch.randn(3, 4), torch.randn(3, 4))
    x, g = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 3)
    with pytest.raises(IndexError, match=r"task_ids must lie in \[0, 2\)"):
        E.modulated_conv2d(x, wn, g, g, None, torch.tensor([0, 2]), [1, 1], [0, 0], [1, 1])
    with pytest.raises(IndexError, match="task_ids must lie"):
        E.modulated_linear(torch.randn(2, 5), torch.randn(6, 5), torch.randn(2, 6), torch.randn(2, 6), None,
                           torch.tensor([-1, 0]))
    with pytest.raises(RuntimeError, match="x has 2 channels"):
        E.modulated_conv2d(torch.randn(2, 2, 5, 5), wn, g[0], g[0], None, None, [1, 1], [0, 0], [1, 1])


def test_failed_load_warns_once_and_disables_the_backends():
    # gmem._C unimportable and no JIT build: one warning, "cpu" unavailable, "auto" falls back
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["gmem._C"] = None  # makes `import gmem._C` raise ImportError
        import torch, gmem.ops as ops
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = ops.available_backends()
            second = ops.available_backends()
            y = ops.modulated_linear(torch.randn(2, 3), torch.randn(4, 3), torch.ones(4), torch.zeros(4))
        mine = [w for w in caught if "compiled extension is unavailable" in str(w.message)]
        assert "cpu" not in first and first == second, first
        assert len(mine) == 1, [str(w.message) for w in caught]
        assert y.shape == (2, 4)
        print("ok")
        """
    )
    env = {**__import__("os").environ, "GMEM_NO_JIT": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# LowRank styles: the factored path (gmem::modulated_conv2d_lowrank), never densified
# ---------------------------------------------------------------------------------------------
def lowrank_factors(lead, o, i, rank, device, dtype=DT):
    """``[u, s, v]`` leaves of one LowRank: ``u [*lead, O, r], s [*lead, r], v [*lead, I, r]``."""
    return [
        torch.randn(*lead, o, rank, dtype=dtype, device=device).requires_grad_(),
        torch.rand(*lead, rank, dtype=dtype, device=device).add_(0.5).requires_grad_(),
        torch.randn(*lead, i, rank, dtype=dtype, device=device).requires_grad_(),
    ]


def check_conv_lowrank(device, x, wn, gamma_parts, beta_parts, bias, task_ids, conv, tol=1e-10, make=None):
    """Forward and every gradient (x, factors, bias) of the cpu/cuda backend against the reference
    backend on the densified LowRank, in float64. ``make(parts)`` builds the LowRank (default: one term)."""
    make = make or (lambda parts: LowRank(*parts))
    x = x.detach().requires_grad_()
    leaves = [x, *gamma_parts, *beta_parts] + ([bias.requires_grad_()] if bias is not None else [])
    y = ops.modulated_conv2d(x, wn, make(gamma_parts), make(beta_parts), bias, task_ids=task_ids,
                             backend=device, **conv)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, rest = leaves64[0], leaves64[1:]
    g64, b64 = rest[: len(gamma_parts)], rest[len(gamma_parts): len(gamma_parts) + len(beta_parts)]
    bias64 = rest[-1] if bias is not None else None
    expected = ops.modulated_conv2d(x64, wn.double(), make(g64), make(b64), bias64, task_ids=task_ids,
                                    backend="reference", **conv)
    torch.testing.assert_close(y, expected.to(y.dtype), rtol=tol, atol=tol)
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(y, leaves, grad.to(y.dtype))
    want = torch.autograd.grad(expected, leaves64, grad)
    names = ["x"] + [f"gamma factor {k}" for k in range(len(gamma_parts))]
    names += [f"beta factor {k}" for k in range(len(beta_parts))] + ["bias"]
    for g, e, name in zip(got, want, names):
        torch.testing.assert_close(g, e.to(g.dtype), rtol=10 * tol, atol=10 * tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("seed", range(10))
def test_conv_lowrank_matches_reference(device, seed, mixed):
    rng = random.Random(5000 + seed * 7 + mixed)
    x, wn, _, _, bias, task_ids, conv = random_conv_case(rng, mixed, device)
    o, i = wn.shape[:2]
    lead = (int(task_ids.max()) + 1 + rng.randint(0, 2),) if mixed else ()  # some stored tasks absent
    if mixed and bias is not None and bias.ndim == 2:
        bias = torch.randn(*lead, o, dtype=DT, device=device)
    gamma = lowrank_factors(lead, o, i, rng.randint(1, 4), device)
    beta = lowrank_factors(lead, o, i, rng.randint(1, 4), device)  # ranks of gamma and beta differ
    check_conv_lowrank(device, x, wn, gamma, beta, bias, task_ids, conv)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "task_ids, num_tasks",
    [
        ([3, 0, 3, 1, 0, 0, 3], 5),  # random order, tasks 2 and 4 absent
        ([0, 0, 1, 1, 1, 2], 3),  # already sorted: no gather
        ([2, 2, 2, 2], 4),  # every sample of one task
        ([1], 2),  # one sample
        ([49, 3, 49, 17, 0], 50),  # many tasks stored, few present
    ],
)
def test_conv_lowrank_task_mixes(device, task_ids, num_tasks):
    torch.manual_seed(len(task_ids) * 17 + num_tasks)
    x = torch.randn(len(task_ids), 3, 7, 6, dtype=DT, device=device)
    wn = ops.normalize_weight(torch.randn(4, 3, 3, 3, dtype=DT))[0].to(device)
    c = torch.randn(num_tasks, 4, dtype=DT, device=device)
    gamma, beta = lowrank_factors((num_tasks,), 4, 3, 2, device), lowrank_factors((num_tasks,), 4, 3, 1, device)
    t = torch.tensor(task_ids, device=device)
    check_conv_lowrank(device, x, wn, gamma, beta, c, t, dict(stride=(1, 2), padding=(1, 0), dilation=(1, 1)))


@pytest.mark.parametrize("device", DEVICES)
def test_conv_lowrank_rank_one_one_sample_and_wide_layers(device):
    torch.manual_seed(21)
    conv = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    # rank 1, one sample, single task
    x = torch.randn(1, 2, 5, 5, dtype=DT, device=device)
    wn = ops.normalize_weight(torch.randn(3, 2, 3, 3, dtype=DT))[0].to(device)
    check_conv_lowrank(device, x, wn, lowrank_factors((), 3, 2, 1, device), lowrank_factors((), 3, 2, 1, device),
                       None, None, conv)
    # C_in beyond one 128-wide style block of the CPU kernel, 1x1 window, mixed
    x = torch.randn(3, 131, 3, 3, dtype=DT, device=device)
    wn = ops.normalize_weight(torch.randn(5, 131, 1, 1, dtype=DT))[0].to(device)
    check_conv_lowrank(device, x, wn, lowrank_factors((2,), 5, 131, 3, device),
                       lowrank_factors((2,), 5, 131, 2, device), torch.randn(5, dtype=DT, device=device),
                       torch.tensor([1, 1, 0], device=device), dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mixed", [False, True])
def test_conv_lowrank_shared_knowledge_base(device, mixed):
    # LowRank.concat(base, own): the shared base (no task dimension) plus each task's own factors
    torch.manual_seed(22 + mixed)
    o, i, t = 5, 4, 3
    lead = (t,) if mixed else ()
    x = torch.randn(4, i, 6, 5, dtype=DT, device=device)
    wn = ops.normalize_weight(torch.randn(o, i, 3, 2, dtype=DT))[0].to(device)
    gamma = lowrank_factors((), o, i, 2, device) + lowrank_factors(lead, o, i, 1, device)
    beta = lowrank_factors((), o, i, 1, device) + lowrank_factors(lead, o, i, 2, device)
    bias = torch.randn(*lead, o, dtype=DT, device=device)
    task_ids = torch.tensor([2, 0, 2, 2], device=device) if mixed else None  # task 1 absent
    concat = lambda p: LowRank.concat(LowRank(*p[:3]), LowRank(*p[3:]))  # noqa: E731
    check_conv_lowrank(device, x, wn, gamma, beta, bias, task_ids,
                       dict(stride=(2, 1), padding=(1, 0), dilation=(1, 1)), make=concat)


@pytest.mark.parametrize("device", DEVICES)
def test_conv_lowrank_float32(device):
    torch.manual_seed(23)
    x = torch.randn(5, 6, 8, 8, device=device)
    wn = ops.normalize_weight(torch.randn(7, 6, 3, 3))[0].to(device)
    gamma = lowrank_factors((3,), 7, 6, 2, device, torch.float32)
    beta = lowrank_factors((3,), 7, 6, 3, device, torch.float32)
    c = torch.randn(3, 7, device=device)
    t = torch.tensor([2, 0, 2, 1, 0], device=device)
    check_conv_lowrank(device, x, wn, gamma, beta, c, t, dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1)),
                       tol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_conv_lowrank_gradcheck(device):
    torch.manual_seed(24)
    x = torch.randn(4, 2, 5, 5, dtype=DT, device=device, requires_grad=True)
    wn = ops.normalize_weight(torch.randn(3, 2, 3, 3, dtype=DT))[0].to(device)
    c = torch.randn(3, 3, dtype=DT, device=device, requires_grad=True)
    t = torch.tensor([2, 0, 2, 2], device=device)  # task 1 absent
    mixed = lowrank_factors((3,), 3, 2, 2, device) + lowrank_factors((3,), 3, 2, 1, device)

    def f(x, c, gu, gs, gv, bu, bs, bv):
        return ops.modulated_conv2d(x, wn, LowRank(gu, gs, gv), LowRank(bu, bs, bv), c, task_ids=t, stride=2,
                                    padding=1, backend=device)

    assert torch.autograd.gradcheck(f, (x, c, *mixed))
    assert torch.autograd.gradgradcheck(f, (x, c, *mixed))  # double backward: the reference formulas
    single = lowrank_factors((), 3, 2, 1, device) + lowrank_factors((), 3, 2, 2, device)

    def f1(x, c, gu, gs, gv, bu, bs, bv):
        return ops.modulated_conv2d(x, wn, LowRank(gu, gs, gv), LowRank(bu, bs, bv), c[0], dilation=2,
                                    padding=(2, 1), backend=device)

    assert torch.autograd.gradcheck(f1, (x, c, *single))


@pytest.mark.parametrize("device", DEVICES)
def test_conv_lowrank_zero_samples(device):
    x = torch.randn(0, 2, 4, 4, device=device, requires_grad=True)
    wn = ops.normalize_weight(torch.randn(3, 2, 3, 3))[0].to(device)
    gamma, beta = lowrank_factors((2,), 3, 2, 2, device, torch.float32), lowrank_factors((2,), 3, 2, 1, device,
                                                                                         torch.float32)
    ids = torch.zeros(0, dtype=torch.long, device=device)
    y = ops.modulated_conv2d(x, wn, LowRank(*gamma), LowRank(*beta), task_ids=ids, backend=device)
    assert y.shape == (0, 3, 2, 2)
    y.sum().backward()
    assert x.grad.shape == x.shape and all((f.grad == 0).all() for f in gamma + beta)


def test_lowrank_conv_takes_the_factored_path(monkeypatch):
    # the public op hands the factors to the compiled backend: no dense style matrix, no dense op
    backend = ops.get_backend("cpu")
    assert backend.supports_lowrank
    calls = []
    for method in ("modulated_conv2d_lowrank", "modulated_conv2d_lowrank_backward", "modulated_conv2d",
                   "modulated_conv2d_backward"):
        original = getattr(type(backend), method)
        monkeypatch.setattr(type(backend), method,
                            lambda self, *a, _m=method, _o=original, **k: calls.append(_m) or _o(self, *a, **k))
    monkeypatch.setattr(LowRank, "dense", lambda self: pytest.fail("LowRank.dense() called on the factored path"))
    torch.manual_seed(25)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    wn = ops.normalize_weight(torch.randn(4, 3, 3, 3))[0]
    gamma, beta = lowrank_factors((2,), 4, 3, 2, "cpu", torch.float32), lowrank_factors((2,), 4, 3, 2, "cpu",
                                                                                        torch.float32)
    y = ops.modulated_conv2d(x, wn, LowRank(*gamma), LowRank(*beta), task_ids=torch.tensor([1, 0]), padding=1,
                             backend="cpu")
    y.sum().backward()
    assert calls == ["modulated_conv2d_lowrank", "modulated_conv2d_lowrank_backward"]
    assert y.shape == (2, 4, 4, 4) and all(f.grad is not None for f in gamma + beta)


def _lowrank_ext_cases(device):
    torch.manual_seed(26)
    kw = dict(device=device)
    x, gy = torch.randn(5, 3, 6, 7, **kw), torch.randn(5, 4, 6, 7, **kw)
    wn = ops.normalize_weight(torch.randn(4, 3, 3, 3))[0].to(device)
    g = [torch.randn(3, 4, 2, **kw), torch.rand(3, 2, **kw), torch.randn(3, 3, 2, **kw)]
    b = [torch.randn(3, 4, 1, **kw), torch.rand(3, 1, **kw), torch.randn(3, 3, 1, **kw)]
    c, t = torch.randn(3, 4, **kw), torch.tensor([2, 0, 2, 1, 2], **kw)
    g1, b1 = [f[0] for f in g], [f[1] for f in b]
    E = torch.ops.gmem
    conv = ([1, 1], [1, 1], [1, 1])
    return [
        (E.modulated_conv2d_lowrank.default, (x, wn, *g, *b, c, t, *conv)),
        (E.modulated_conv2d_lowrank.default, (x, wn, *g1, *b1, None, None, [2, 1], [0, 1], [1, 2])),
        (E.modulated_conv2d_lowrank_backward.default, (gy, x, wn, *g, *b, c, t, *conv, [True] * 4)),
        (E.modulated_conv2d_lowrank_backward.default, (gy, x, wn, *g, *b, None, t, *conv, [False, True, False, False])),
        (E.modulated_conv2d_lowrank_backward.default,
         (gy, x, wn, *g1, *b1, c[0], None, *conv, [True, False, True, True])),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(_lowrank_ext_cases("cpu"))))
def test_opcheck_lowrank_ext_ops(device, case):
    op, args = _lowrank_ext_cases(device)[case]
    with ops.use_backend(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_public_lowrank_op_with_backend(device):
    torch.manual_seed(27)
    x = torch.randn(5, 3, 6, 6, device=device, requires_grad=True)
    wn = ops.normalize_weight(torch.randn(4, 3, 3, 3))[0].to(device)
    fac = lowrank_factors((3,), 4, 3, 2, device, torch.float32) + lowrank_factors((3,), 4, 3, 1, device, torch.float32)
    c = torch.randn(3, 4, device=device, requires_grad=True)
    t = torch.tensor([2, 0, 2, 1, 2], device=device)
    with ops.use_backend(device):
        torch.library.opcheck(modulated_conv2d_lowrank_op, (x, wn, *fac, c, t, [1, 1], [1, 1], [1, 1]))


def test_lowrank_direct_calls_check_their_arguments():
    E = KERNELS
    x, wn = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    g = [torch.randn(2, 4, 2), torch.rand(2, 2), torch.randn(2, 3, 2)]
    conv = ([1, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="gamma factors must be"):
        E.modulated_conv2d_lowrank(x, wn, g[0], g[1], torch.randn(2, 5, 2), *g, None, torch.tensor([0, 1]), *conv)
    with pytest.raises(RuntimeError, match="beta factors must be"):
        E.modulated_conv2d_lowrank(x, wn, *g, g[0], torch.rand(2, 3), g[2], None, torch.tensor([0, 1]), *conv)
    with pytest.raises(RuntimeError, match="same number of tasks"):
        E.modulated_conv2d_lowrank(x, wn, *g, *(f[0] for f in g), None, torch.tensor([0, 1]), *conv)
    with pytest.raises(IndexError, match=r"task_ids must lie in \[0, 2\)"):
        E.modulated_conv2d_lowrank(x, wn, *g, *g, None, torch.tensor([0, 2]), *conv)
    with pytest.raises(RuntimeError, match="task_ids \\[N\\] is required"):
        E.modulated_conv2d_lowrank(x, wn, *g, *g, None, None, *conv)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        E.modulated_conv2d_lowrank(x.half(), wn.half(), *(f.half() for f in g + g), None, torch.tensor([0, 1]), *conv)
